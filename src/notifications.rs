//! Notification bodies (SPEC §5.1): the `json` format signed per Standard Webhooks, and the
//! Slack and Discord webhook bodies. Pure apart from [`log_tail`], which reads the build's log.
//!
//! The JSON body is fixed when the entry is delivered the first time only in its content:
//! `timestamp` is the time of the event (stored in the entry, the same on every retry), the
//! `webhook-id` is the entry's id (stable across retries, so receivers can deduplicate), and
//! `webhook-timestamp` is the time of the attempt (receivers reject old ones).

use base64::Engine as _;
use hmac::{KeyInit as _, Mac as _};
use http::{HeaderName, HeaderValue};
use serde_json::{Value, json};

use crate::config::{Event, SinkConfig, SinkFormat};
use crate::model::{Build, Outcome, Phase, Timestamp};

/// Most log lines in a failure's `log_tail`.
pub const LOG_TAIL_LINES: u64 = 20;

/// Longest log line kept in a tail (a line may be 64 KiB in the log itself).
const TAIL_LINE_CHARS: usize = 500;

/// Most characters of log in a Slack or Discord message (Discord's `content` holds 2000).
const CHAT_LOG_CHARS: usize = 1500;

/// What to send.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Headers besides `User-Agent`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body.
    pub body: Vec<u8>,
}

/// The event's `log_tail` matters for these (SPEC: "the last log lines for failures").
pub fn wants_log(event: Event) -> bool {
    matches!(event, Event::Failed | Event::TimedOut | Event::Interrupted)
}

/// The last ≤ [`LOG_TAIL_LINES`] lines of a build's log, as the log API's line objects, each
/// line clipped to a few hundred characters.
pub fn log_tail(state_dir: &std::path::Path, b: &Build) -> Vec<Value> {
    let path = crate::buildlog::log_path(state_dir, b.id);
    let from = b.log_lines.saturating_sub(LOG_TAIL_LINES);
    let Ok(page) = crate::buildlog::read_page(&path, from, LOG_TAIL_LINES as usize, 2 << 20) else {
        return Vec::new();
    };
    page.lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|mut v| {
            if let Some(line) = v.get("line").and_then(Value::as_str) {
                let clipped = crate::model::clip(line, TAIL_LINE_CHARS);
                v["line"] = Value::String(clipped);
            }
            v
        })
        .collect()
}

/// The Standard Webhooks signature: `v1,` + base64 of HMAC-SHA256 over
/// `"{id}.{timestamp}.{body}"` with `key` (the decoded part of `whsec_…`).
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length: new_from_slice cannot fail for it.
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// One notification to render: the event, the build as it was, and where it is seen.
#[derive(Debug, Clone, Copy)]
pub struct Notice<'a> {
    /// What happened.
    pub event: Event,
    /// When it happened (the JSON `timestamp`).
    pub at: Timestamp,
    /// The build (`None` for a test).
    pub build: Option<&'a Build>,
    /// Its last log lines (failures only; empty otherwise).
    pub log_tail: &'a [Value],
    /// `public_url`, without a trailing slash.
    pub public_url: &'a str,
}

impl Notice<'_> {
    fn link(&self) -> Option<String> {
        self.build
            .map(|b| format!("{}/ui/builds/{}", self.public_url, b.id))
    }
}

/// Renders `n` for `sink`. `id` is the entry's id (`webhook-id`), `now_unix` the attempt's
/// Unix time (`webhook-timestamp`).
pub fn render(sink: &SinkConfig, n: &Notice<'_>, id: &str, now_unix: i64) -> Rendered {
    let json_type = HeaderValue::from_static("application/json");
    match sink.format {
        SinkFormat::Json => {
            let body = json_body(n).to_string().into_bytes();
            let mut headers = vec![(http::header::CONTENT_TYPE, json_type)];
            if let Some(secret) = &sink.secret {
                let sig = sign(secret.expose(), id, now_unix, &body);
                let mut push = |k: &'static str, v: String| {
                    if let Ok(v) = HeaderValue::from_str(&v) {
                        headers.push((HeaderName::from_static(k), v));
                    }
                };
                push("webhook-id", id.to_owned());
                push("webhook-timestamp", now_unix.to_string());
                push("webhook-signature", sig);
            }
            Rendered { headers, body }
        }
        SinkFormat::Slack => Rendered {
            headers: vec![(http::header::CONTENT_TYPE, json_type)],
            body: slack_body(n).to_string().into_bytes(),
        },
        SinkFormat::Discord => Rendered {
            headers: vec![(http::header::CONTENT_TYPE, json_type)],
            body: discord_body(n).to_string().into_bytes(),
        },
    }
}

/// The `json` body (SPEC §5.1).
pub fn json_body(n: &Notice<'_>) -> Value {
    match n.build {
        None => json!({"type": "test", "timestamp": n.at.rfc3339(), "data": {}}),
        Some(b) => json!({
            "type": format!("build.{}", n.event.as_str()),
            "timestamp": n.at.rfc3339(),
            "data": {
                "build": b.to_json(),
                "log_tail": n.log_tail,
                "url": n.link(),
            }
        }),
    }
}

/// The facts every chat message says: (headline, field lines, log excerpt).
fn facts(n: &Notice<'_>) -> (String, Vec<(String, String)>, Option<String>) {
    let Some(b) = n.build else {
        return (
            "deployhook test notification: this sink works".to_owned(),
            Vec::new(),
            None,
        );
    };
    let outcome = match b.phase {
        Phase::Stopped(o) => o.as_str(),
        other => other.status(),
    };
    let verb = match n.event {
        Event::Started => "started",
        Event::Succeeded => "succeeded",
        Event::Recovered => "recovered (succeeded after a failure)",
        Event::Failed => "failed",
        Event::TimedOut => "timed out",
        Event::Cancelled => "was cancelled",
        Event::Interrupted => "was interrupted",
        Event::Test => "test",
    };
    let headline = format!("{} {}: build {}", b.project, b.git_ref.name(), verb);
    let commit = b
        .commit
        .as_deref()
        .map(|c| c.chars().take(7).collect::<String>())
        .unwrap_or_else(|| "-".to_owned());
    let mut outcome_text = outcome.to_owned();
    if let (Phase::Stopped(Outcome::Fail), Some(c)) = (b.phase, b.exit_code) {
        outcome_text = format!("{outcome} (exit code {c})");
    }
    let trigger = match &b.trigger.hook {
        Some((_, name)) => format!("{} {name}", b.trigger.source.label()),
        None => b.trigger.source.label().to_owned(),
    };
    let duration = crate::metrics::ran_for(b)
        .map(crate::statuses::human_duration)
        .unwrap_or_else(|| "-".to_owned());
    let fields = vec![
        ("Project".to_owned(), b.project.clone()),
        ("Ref".to_owned(), b.git_ref.name().to_owned()),
        ("Outcome".to_owned(), outcome_text),
        ("Commit".to_owned(), commit),
        ("Trigger".to_owned(), trigger),
        ("Duration".to_owned(), duration),
        ("Link".to_owned(), n.link().unwrap_or_default()),
    ];
    let log = if n.log_tail.is_empty() {
        None
    } else {
        let mut lines: Vec<&str> = n
            .log_tail
            .iter()
            .filter_map(|l| l.get("line").and_then(Value::as_str))
            .collect();
        // Keep the last lines that fit.
        let mut total = 0;
        let mut keep = Vec::new();
        while let Some(l) = lines.pop() {
            total += l.chars().count() + 1;
            if total > CHAT_LOG_CHARS && !keep.is_empty() {
                break;
            }
            keep.push(crate::model::clip(l, CHAT_LOG_CHARS));
        }
        keep.reverse();
        // Code fences in a log line would end the block early.
        Some(keep.join("\n").replace("```", "'''"))
    };
    (headline, fields, log)
}

/// A Slack incoming-webhook body: `text` (the notification's fallback) and `blocks`.
pub fn slack_body(n: &Notice<'_>) -> Value {
    let (headline, fields, log) = facts(n);
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut text = esc(&headline);
    for (k, v) in &fields {
        text.push_str(&format!("\n{k}: {}", esc(v)));
    }
    let mut blocks = vec![
        json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("*{}*", esc(&headline))}}),
    ];
    if !fields.is_empty() {
        blocks.push(
            json!({"type": "section", "fields": fields.iter().map(|(k, v)| {
            let v = if k == "Link" { format!("<{v}|open the build>") } else { esc(v) };
            json!({"type": "mrkdwn", "text": format!("*{k}*\n{v}")})
        }).collect::<Vec<_>>()}),
        );
    }
    if let Some(log) = log {
        text.push_str(&format!("\nLast log lines:\n{}", esc(&log)));
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("```{}```", esc(&log))}}));
    }
    json!({"text": text, "blocks": blocks})
}

/// A Discord webhook body: `content` and one embed.
pub fn discord_body(n: &Notice<'_>) -> Value {
    let (headline, fields, log) = facts(n);
    let colour = match n.build.map(|b| b.phase) {
        Some(Phase::Stopped(Outcome::Success)) => 0x2e7d32,
        Some(Phase::Stopped(_)) => 0xc62828,
        _ => 0x1565c0,
    };
    let mut content = headline.clone();
    let mut embed = json!({
        "title": headline,
        "color": colour,
        "fields": fields.iter().map(|(k, v)| json!({"name": k, "value": if v.is_empty() { "-" } else { v }, "inline": k != "Link"})).collect::<Vec<_>>(),
    });
    if let Some(link) = n.link() {
        embed["url"] = Value::String(link);
    }
    if let Some(log) = log {
        content.push_str(&format!("\n```\n{log}\n```"));
    }
    // Mentions in a log line or branch name must not ping anyone.
    json!({"content": content, "embeds": [embed], "allowed_mentions": {"parse": []}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Target, Trigger, TriggerSource};

    fn build() -> Build {
        let mut b = Build::new_queued(
            1,
            &Target::branch("site", "main"),
            Trigger {
                source: TriggerSource::Api,
                hook: None,
            },
            None,
            false,
            Timestamp(1_700_000_000_000_000),
        );
        b.phase = Phase::Stopped(Outcome::Fail);
        b.exit_code = Some(2);
        b.commit = Some("0123456789abcdef0123456789abcdef01234567".into());
        b.initializing_on = Some(Timestamp(1_700_000_000_000_000));
        b.stopped_on = Some(Timestamp(1_700_000_065_000_000));
        b
    }

    #[test]
    fn signatures_match_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn json_body_has_type_timestamp_build_tail_and_link() {
        let b = build();
        let tail = vec![json!({"n": 0, "ts": "x", "stream": "stderr", "line": "boom"})];
        let n = Notice {
            event: Event::Failed,
            at: Timestamp(1_700_000_065_000_000),
            build: Some(&b),
            log_tail: &tail,
            public_url: "https://deploy.example",
        };
        let v = json_body(&n);
        assert_eq!(v["type"], "build.failed");
        assert_eq!(v["timestamp"], Timestamp(1_700_000_065_000_000).rfc3339());
        assert_eq!(v["data"]["build"]["build_uuid"], b.id.to_string());
        assert_eq!(v["data"]["log_tail"][0]["line"], "boom");
        assert_eq!(
            v["data"]["url"],
            format!("https://deploy.example/ui/builds/{}", b.id)
        );
    }

    #[test]
    fn chat_bodies_say_project_ref_outcome_commit_trigger_duration_link_and_log() {
        let b = build();
        let tail = vec![json!({"n": 0, "ts": "x", "stream": "stderr", "line": "npm ERR! <boom>"})];
        let n = Notice {
            event: Event::Failed,
            at: Timestamp(0),
            build: Some(&b),
            log_tail: &tail,
            public_url: "https://d.example",
        };
        let s = slack_body(&n);
        let text = s["text"].as_str().unwrap();
        for want in [
            "site",
            "main",
            "fail (exit code 2)",
            "0123456",
            "api",
            "1m 5s",
            "/ui/builds/",
            "npm ERR! &lt;boom&gt;",
        ] {
            assert!(text.contains(want), "slack text lacks {want:?}: {text}");
        }
        assert!(s["blocks"].as_array().unwrap().len() >= 3);
        let d = discord_body(&n);
        let all = d.to_string();
        for want in [
            "site",
            "main",
            "fail (exit code 2)",
            "0123456",
            "api",
            "1m 5s",
            "/ui/builds/",
            "npm ERR! <boom>",
        ] {
            assert!(all.contains(want), "discord body lacks {want:?}: {all}");
        }
        assert!(d["content"].as_str().unwrap().len() <= 2000);
        assert_eq!(d["allowed_mentions"]["parse"], json!([]));
    }
}
