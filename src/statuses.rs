//! Commit statuses on the Git host (SPEC §5.2): the state of a build as each provider's API
//! spells it, the description, and the exact request. Pure: the outbox plans the entries and
//! its worker sends what [`request`] returns.
//!
//! | provider | request | auth | body |
//! |---|---|---|---|
//! | github | `POST {api}/repos/{repo}/statuses/{sha}` | `Authorization: Bearer T` | state, target_url, description, context |
//! | gitea, forgejo | `POST {api}/api/v1/repos/{repo}/statuses/{sha}` | `Authorization: token T` | the same |
//! | gitlab | `POST {api}/api/v4/projects/{url-encoded repo}/statuses/{sha}` | `PRIVATE-TOKEN: T` | state, name, target_url, description |
//! | bitbucket | `POST {api}/2.0/repositories/{repo}/commit/{sha}/statuses/build` | `Authorization: Bearer T` | state, key, url, description |
//! | bitbucket-server | `POST {api}/rest/build-status/1.0/commits/{sha}` | `Authorization: Bearer T` | the same |

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{Provider, StatusConfig};
use crate::model::{Build, CancelReason, Outcome, Phase};

/// Longest description sent (GitHub's limit is 140 characters).
pub const MAX_DESCRIPTION: usize = 140;

/// A build's state as far as a commit status is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Queued (pending).
    Queued,
    /// Initializing (pending).
    Building,
    /// Running (pending; GitLab `running`).
    Running,
    /// Superseded by a newer build (pending until that one stops).
    Superseded,
    /// Outcome `success`.
    Success,
    /// Outcome `fail` or `timed_out`.
    Failure,
    /// Cancelled through the API.
    Cancelled,
    /// Outcome `interrupted`.
    Interrupted,
}

impl State {
    /// The state of a build as it is now; `None` for a build stopped because it was
    /// superseded (its SHAs take the newer build's state instead).
    pub fn of(b: &Build) -> Option<State> {
        Some(match b.phase {
            Phase::Queued => State::Queued,
            Phase::Initializing => State::Building,
            Phase::Running => State::Running,
            Phase::Stopped(Outcome::Success) => State::Success,
            Phase::Stopped(Outcome::Fail | Outcome::TimedOut) => State::Failure,
            Phase::Stopped(Outcome::Cancelled) => {
                if b.cancel_reason == Some(CancelReason::Superseded) {
                    return None;
                }
                State::Cancelled
            }
            Phase::Stopped(Outcome::Interrupted) => State::Interrupted,
        })
    }

    /// The word the provider's API takes for this state.
    pub fn word(self, p: Provider) -> &'static str {
        use State::*;
        match p {
            Provider::Github | Provider::Gitea | Provider::Forgejo => match self {
                Queued | Building | Running | Superseded => "pending",
                Success => "success",
                Failure => "failure",
                Cancelled | Interrupted => "error",
            },
            Provider::Gitlab => match self {
                Queued | Building | Superseded => "pending",
                Running => "running",
                Success => "success",
                Failure | Interrupted => "failed",
                Cancelled => "canceled",
            },
            Provider::Bitbucket | Provider::BitbucketServer => match self {
                Queued | Building | Running | Superseded => "INPROGRESS",
                Success => "SUCCESSFUL",
                Cancelled if p == Provider::Bitbucket => "STOPPED",
                Failure | Cancelled | Interrupted => "FAILED",
            },
        }
    }
}

/// A duration as SPEC §5.2 writes it: `1h 2m 5s`, zero parts left out, whole seconds
/// (`0s` for less than a second).
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, (s / 60) % 60, s % 60);
    let mut parts = Vec::new();
    if h > 0 {
        parts.push(format!("{h}h"));
    }
    if m > 0 {
        parts.push(format!("{m}m"));
    }
    if sec > 0 || parts.is_empty() {
        parts.push(format!("{sec}s"));
    }
    parts.join(" ")
}

/// The description of a build's state (≤ [`MAX_DESCRIPTION`] characters).
pub fn describe(b: &Build) -> String {
    let took = crate::metrics::ran_for(b).map(human_duration);
    let d = match b.phase {
        Phase::Queued => "queued".to_owned(),
        Phase::Initializing => "building".to_owned(),
        Phase::Running => "running".to_owned(),
        Phase::Stopped(Outcome::Success) => match took {
            Some(t) => format!("succeeded in {t}"),
            None => "succeeded".to_owned(),
        },
        Phase::Stopped(Outcome::Fail) => match (b.exit_code, took) {
            (Some(c), Some(t)) => format!("failed with exit code {c} after {t}"),
            (Some(c), None) => format!("failed with exit code {c}"),
            (None, Some(t)) => format!("failed after {t}"),
            (None, None) => "failed".to_owned(),
        },
        Phase::Stopped(Outcome::TimedOut) => match took {
            Some(t) => format!("timed out after {t}"),
            None => "timed out".to_owned(),
        },
        Phase::Stopped(Outcome::Cancelled) => "cancelled".to_owned(),
        Phase::Stopped(Outcome::Interrupted) => "interrupted".to_owned(),
    };
    clip(d)
}

/// The description of SHAs a newer build superseded.
pub fn superseded_description(by: crate::model::BuildId) -> String {
    let id = by.to_string();
    format!("superseded by build {}", &id[..8.min(id.len())])
}

fn clip(s: String) -> String {
    if s.chars().count() <= MAX_DESCRIPTION {
        s
    } else {
        s.chars().take(MAX_DESCRIPTION - 1).chain(['…']).collect()
    }
}

/// What to send for one status.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusRequest {
    /// The full URL.
    pub url: String,
    /// Authorization and content type.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// JSON body.
    pub body: Vec<u8>,
}

/// Percent-encodes everything but unreserved characters (GitLab's `group%2Fname`).
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why a status cannot be sent with this config.
#[derive(Debug, thiserror::Error)]
#[error("the status token is not a valid header value")]
pub struct BadToken;

/// The request that sets `sha`'s status to `state` on `cfg`'s host.
pub fn request(
    cfg: &StatusConfig,
    sha: &str,
    state: State,
    description: &str,
    target_url: &str,
) -> Result<StatusRequest, BadToken> {
    let token = String::from_utf8_lossy(cfg.token.expose()).into_owned();
    let api = &cfg.api_url;
    let word = state.word(cfg.provider);
    let sha_enc = encode_component(sha);
    let (url, auth, body) = match cfg.provider {
        Provider::Github => (
            format!("{api}/repos/{}/statuses/{sha_enc}", cfg.repo),
            (http::header::AUTHORIZATION, format!("Bearer {token}")),
            json!({"state": word, "target_url": target_url, "description": description, "context": cfg.context}),
        ),
        Provider::Gitea | Provider::Forgejo => (
            format!("{api}/api/v1/repos/{}/statuses/{sha_enc}", cfg.repo),
            (http::header::AUTHORIZATION, format!("token {token}")),
            json!({"state": word, "target_url": target_url, "description": description, "context": cfg.context}),
        ),
        Provider::Gitlab => (
            format!(
                "{api}/api/v4/projects/{}/statuses/{sha_enc}",
                encode_component(&cfg.repo)
            ),
            (HeaderName::from_static("private-token"), token),
            json!({"state": word, "name": cfg.context, "target_url": target_url, "description": description}),
        ),
        Provider::Bitbucket => (
            format!(
                "{api}/2.0/repositories/{}/commit/{sha_enc}/statuses/build",
                cfg.repo
            ),
            (http::header::AUTHORIZATION, format!("Bearer {token}")),
            json!({"state": word, "key": cfg.context, "url": target_url, "description": description}),
        ),
        Provider::BitbucketServer => (
            format!("{api}/rest/build-status/1.0/commits/{sha_enc}"),
            (http::header::AUTHORIZATION, format!("Bearer {token}")),
            json!({"state": word, "key": cfg.context, "url": target_url, "description": description}),
        ),
    };
    let mut auth_value = HeaderValue::from_str(&auth.1).map_err(|_| BadToken)?;
    auth_value.set_sensitive(true);
    Ok(StatusRequest {
        url,
        headers: vec![
            (auth.0, auth_value),
            (
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                http::header::ACCEPT,
                HeaderValue::from_static("application/json"),
            ),
        ],
        body: body.to_string().into_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_leave_zero_parts_out() {
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m 5s");
        assert_eq!(human_duration(Duration::from_secs(1200)), "20m");
        assert_eq!(human_duration(Duration::from_secs(3725)), "1h 2m 5s");
        assert_eq!(human_duration(Duration::from_secs(3605)), "1h 5s");
        assert_eq!(human_duration(Duration::from_millis(300)), "0s");
        assert_eq!(human_duration(Duration::from_millis(42_900)), "42s");
    }

    #[test]
    fn state_words_follow_the_table() {
        use Provider::*;
        let row = |p| {
            [
                State::Queued,
                State::Running,
                State::Superseded,
                State::Success,
                State::Failure,
                State::Cancelled,
                State::Interrupted,
            ]
            .map(|s| s.word(p))
        };
        for p in [Github, Gitea, Forgejo] {
            assert_eq!(
                row(p),
                [
                    "pending", "pending", "pending", "success", "failure", "error", "error"
                ]
            );
        }
        assert_eq!(
            row(Gitlab),
            [
                "pending", "running", "pending", "success", "failed", "canceled", "failed"
            ]
        );
        assert_eq!(
            row(Bitbucket),
            [
                "INPROGRESS",
                "INPROGRESS",
                "INPROGRESS",
                "SUCCESSFUL",
                "FAILED",
                "STOPPED",
                "FAILED"
            ]
        );
        assert_eq!(
            row(BitbucketServer),
            [
                "INPROGRESS",
                "INPROGRESS",
                "INPROGRESS",
                "SUCCESSFUL",
                "FAILED",
                "FAILED",
                "FAILED"
            ]
        );
    }

    #[test]
    fn long_descriptions_are_clipped() {
        let s = clip("x".repeat(500));
        assert_eq!(s.chars().count(), MAX_DESCRIPTION);
        assert_eq!(clip("short".into()), "short");
    }

    fn stopped(outcome: Outcome, exit_code: Option<i32>, secs: i64) -> Build {
        use crate::model::{Target, Timestamp, Trigger, TriggerSource};
        let mut b = Build::new_queued(
            1,
            &Target::branch("site", "main"),
            Trigger {
                source: TriggerSource::Api,
                hook: None,
            },
            None,
            false,
            Timestamp(0),
        );
        b.phase = Phase::Stopped(outcome);
        b.exit_code = exit_code;
        b.initializing_on = Some(Timestamp(1_000_000));
        b.stopped_on = Some(Timestamp(1_000_000 + secs * 1_000_000 + 400_000));
        b
    }

    #[test]
    fn descriptions_say_the_outcome_and_duration() {
        assert_eq!(
            describe(&stopped(Outcome::Success, Some(0), 42)),
            "succeeded in 42s"
        );
        assert_eq!(
            describe(&stopped(Outcome::Fail, Some(1), 65)),
            "failed with exit code 1 after 1m 5s"
        );
        assert_eq!(
            describe(&stopped(Outcome::Fail, None, 3725)),
            "failed after 1h 2m 5s"
        );
        assert_eq!(
            describe(&stopped(Outcome::TimedOut, None, 1200)),
            "timed out after 20m"
        );
        let mut c = stopped(Outcome::Cancelled, None, 3);
        c.cancel_reason = Some(CancelReason::Api);
        assert_eq!(describe(&c), "cancelled");
        assert_eq!(State::of(&c), Some(State::Cancelled));
        c.cancel_reason = Some(CancelReason::Superseded);
        assert_eq!(State::of(&c), None, "superseded builds report nothing");
        assert_eq!(
            describe(&stopped(Outcome::Interrupted, None, 3)),
            "interrupted"
        );
        let id = crate::model::BuildId::parse("1a2b3c4d-0000-4000-8000-000000000000").unwrap();
        assert_eq!(superseded_description(id), "superseded by build 1a2b3c4d");
    }

    #[test]
    fn gitlab_repos_are_url_encoded_and_tokens_are_sensitive() {
        let cfg = StatusConfig {
            provider: Provider::Gitlab,
            repo: "group/sub group/site".into(),
            token: crate::config::sinks::FileSecret::for_tests(b"t0k"),
            token_file: "/x".into(),
            api_url: "https://gitlab.example.com".into(),
            context: "deploy".into(),
        };
        let r = request(
            &cfg,
            "abc",
            State::Running,
            "running",
            "https://d/ui/builds/x",
        )
        .unwrap();
        assert_eq!(
            r.url,
            "https://gitlab.example.com/api/v4/projects/group%2Fsub%20group%2Fsite/statuses/abc"
        );
        assert!(r.headers[0].1.is_sensitive());
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            json!({"state": "running", "name": "deploy", "target_url": "https://d/ui/builds/x", "description": "running"})
        );
    }
}
