//! The things deployhook keeps: builds and hooks, and their JSON shapes of SPEC §4.
//!
//! A build's status and outcome live in one [`Phase`], so "stopped without an outcome" or
//! "running with an outcome" cannot be written down. Records are plain serde structs: the
//! store encodes them with bincode behind a format-version byte, the HTTP layer renders them
//! with [`Build::to_json`] and [`Hook::to_json`].

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Shortens `s` to at most `max` characters for error messages, marking the cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

/// Wall-clock time in microseconds since the Unix epoch. Only for display and ordering hints:
/// anything that measures elapsed time (timeouts, kill grace, rate windows) uses a monotonic
/// clock instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Now, by the wall clock.
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    /// Converts a `SystemTime`.
    pub fn from_system(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }

    /// This time minus `d` (for windows like "seen in the last 7 days").
    pub fn before(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_sub(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        )
    }

    /// RFC 3339 UTC with microseconds, e.g. `2026-01-21T18:50:00.123456Z`.
    pub fn rfc3339(self) -> String {
        let t = if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.0 as u64)
        } else {
            UNIX_EPOCH
        };
        humantime::format_rfc3339_micros(t).to_string()
    }

    /// Seconds since the epoch, as a float (for metrics).
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e6
    }
}

/// A build's id: a UUID v4, shown lowercase and hyphenated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BuildId(pub uuid::Uuid);

impl BuildId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    /// Parses the canonical hyphenated lowercase form only (what we hand out).
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 36 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        uuid::Uuid::try_parse(s).ok().map(Self)
    }

    /// The 16 raw bytes, for keys.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for BuildId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

/// A hook's id: a UUID v4 like builds', so ids never collide across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HookId(pub uuid::Uuid);

impl HookId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    /// Parses the canonical form.
    pub fn parse(s: &str) -> Option<Self> {
        BuildId::parse(s).map(|b| Self(b.0))
    }

    /// The 16 raw bytes, for keys.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for HookId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for HookId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

/// How a stopped build ended (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// Exit status 0.
    Success,
    /// Non-zero exit, death by signal, or a failed checkout.
    Fail,
    /// Cancelled through the API or superseded by a newer build.
    Cancelled,
    /// Ran past the project's `timeout`.
    TimedOut,
    /// The daemon stopped or crashed while the build was initializing or running.
    Interrupted,
}

impl Outcome {
    /// The SPEC word.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Fail => "fail",
            Outcome::Cancelled => "cancelled",
            Outcome::TimedOut => "timed_out",
            Outcome::Interrupted => "interrupted",
        }
    }

    /// Every outcome, for metrics.
    pub const ALL: [Outcome; 5] = [
        Outcome::Success,
        Outcome::Fail,
        Outcome::Cancelled,
        Outcome::TimedOut,
        Outcome::Interrupted,
    ];
}

/// Where a build is in its life. Status and outcome in one value, so they cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Waiting for a slot.
    Queued,
    /// Preparing the workspace (fetch and checkout).
    Initializing,
    /// The command runs.
    Running,
    /// Over, with how it ended.
    Stopped(Outcome),
}

impl Phase {
    /// The SPEC `status` word.
    pub fn status(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Initializing => "initializing",
            Phase::Running => "running",
            Phase::Stopped(_) => "stopped",
        }
    }

    /// The outcome, once stopped.
    pub fn outcome(self) -> Option<Outcome> {
        match self {
            Phase::Stopped(o) => Some(o),
            _ => None,
        }
    }

    /// Whether the build is over.
    pub fn is_stopped(self) -> bool {
        matches!(self, Phase::Stopped(_))
    }
}

/// The `status` filter of build listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// `queued`
    Queued,
    /// `initializing`
    Initializing,
    /// `running`
    Running,
    /// `stopped`
    Stopped,
}

impl StatusFilter {
    /// Parses a SPEC status word.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "initializing" => Self::Initializing,
            "running" => Self::Running,
            "stopped" => Self::Stopped,
            _ => return None,
        })
    }

    /// Whether a build in `phase` passes the filter.
    pub fn matches(self, phase: Phase) -> bool {
        matches!(
            (self, phase),
            (Self::Queued, Phase::Queued)
                | (Self::Initializing, Phase::Initializing)
                | (Self::Running, Phase::Running)
                | (Self::Stopped, Phase::Stopped(_))
        )
    }
}

/// What asked for a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TriggerSource {
    /// `POST /hooks/{token}`.
    DeployHook,
    /// `POST /git/{project}`.
    GitPush,
    /// `POST /api/projects/{p}/builds` (and the CLI's `trigger`).
    Api,
}

impl TriggerSource {
    /// The SPEC `build_trigger_source` word.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerSource::DeployHook => "deploy_hook",
            TriggerSource::GitPush => "git_push",
            TriggerSource::Api => "api",
        }
    }

    /// The SPEC `trigger.label`.
    pub fn label(self) -> &'static str {
        match self {
            TriggerSource::DeployHook => "deploy hook",
            TriggerSource::GitPush => "git push",
            TriggerSource::Api => "api",
        }
    }
}

/// Who triggered a build; the hook fields only for deploy hooks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    /// The source.
    pub source: TriggerSource,
    /// The hook that fired, if one did.
    pub hook: Option<(HookId, String)>,
}

/// Why a build was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelReason {
    /// `POST /api/builds/{uuid}/cancel`.
    Api,
    /// A newer build of the same branch replaced it.
    Superseded,
}

impl CancelReason {
    /// The SPEC word.
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::Api => "api",
            CancelReason::Superseded => "superseded",
        }
    }
}

/// A build record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Build {
    /// Its id.
    pub id: BuildId,
    /// Monotonic creation sequence: orders listings even if the wall clock steps back.
    pub seq: u64,
    /// Project name.
    pub project: String,
    /// Branch to build.
    pub branch: String,
    /// The full SHA checked out, once resolved (repo projects only).
    pub commit: Option<String>,
    /// The SHA a Git push announced, if a push triggered it.
    pub requested_commit: Option<String>,
    /// Status and outcome.
    pub phase: Phase,
    /// Exit status of the main process, if it exited normally.
    pub exit_code: Option<i32>,
    /// Who asked.
    pub trigger: Trigger,
    /// When it was created.
    pub created_on: Timestamp,
    /// When it left the queue.
    pub initializing_on: Option<Timestamp>,
    /// When the command started.
    pub running_on: Option<Timestamp>,
    /// When it stopped.
    pub stopped_on: Option<Timestamp>,
    /// Why it was cancelled, if it was.
    pub cancel_reason: Option<CancelReason>,
    /// The build that superseded it.
    pub superseded_by: Option<BuildId>,
    /// Whether a request body was stored for `DEPLOYHOOK_PAYLOAD`.
    pub has_payload: bool,
    /// Lines in the log file.
    pub log_lines: u64,
    /// Bytes in the log file.
    pub log_bytes: u64,
    /// Whether output was dropped at `max_log_bytes`.
    pub log_truncated: bool,
}

impl Build {
    /// A new queued build.
    pub fn new_queued(
        seq: u64,
        project: &str,
        branch: &str,
        trigger: Trigger,
        requested_commit: Option<String>,
        has_payload: bool,
    ) -> Self {
        Self {
            id: BuildId::new(),
            seq,
            project: project.to_owned(),
            branch: branch.to_owned(),
            commit: None,
            requested_commit,
            phase: Phase::Queued,
            exit_code: None,
            trigger,
            created_on: Timestamp::now(),
            initializing_on: None,
            running_on: None,
            stopped_on: None,
            cancel_reason: None,
            superseded_by: None,
            has_payload,
            log_lines: 0,
            log_bytes: 0,
            log_truncated: false,
        }
    }

    /// The SPEC §4 build object.
    pub fn to_json(&self) -> Value {
        let ts = |t: Option<Timestamp>| t.map(Timestamp::rfc3339);
        let (hook_id, hook_name) = match &self.trigger.hook {
            Some((id, name)) => (Some(id.to_string()), Some(name.clone())),
            None => (None, None),
        };
        json!({
            "build_uuid": self.id.to_string(),
            "project": self.project,
            "branch": self.branch,
            "commit": self.commit,
            "requested_commit": self.requested_commit,
            "status": self.phase.status(),
            "build_outcome": self.phase.outcome().map(Outcome::as_str),
            "exit_code": self.exit_code,
            "build_trigger_source": self.trigger.source.as_str(),
            "trigger": {
                "hook_id": hook_id,
                "hook_name": hook_name,
                "label": self.trigger.source.label(),
            },
            "created_on": self.created_on.rfc3339(),
            "initializing_on": ts(self.initializing_on),
            "running_on": ts(self.running_on),
            "stopped_on": ts(self.stopped_on),
            "cancel_reason": self.cancel_reason.map(CancelReason::as_str),
            "superseded_by": self.superseded_by.map(|b| b.to_string()),
        })
    }

    /// The build object plus `already_exists`, as trigger responses carry it.
    pub fn to_trigger_json(&self, already_exists: bool) -> Value {
        let mut v = self.to_json();
        if let Value::Object(m) = &mut v {
            m.insert("already_exists".into(), Value::Bool(already_exists));
        }
        v
    }
}

/// A deploy hook record. The token itself is never kept, only its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hook {
    /// Its id.
    pub id: HookId,
    /// Project it triggers.
    pub project: String,
    /// Name, unique within the project.
    pub name: String,
    /// Branch it builds.
    pub branch: String,
    /// SHA-256 of the token.
    pub token_hash: [u8; 32],
    /// When it was created.
    pub created_on: Timestamp,
    /// When it last fired.
    pub last_triggered_on: Option<Timestamp>,
    /// How often it fired.
    pub trigger_count: u64,
}

impl Hook {
    /// The SPEC §4.2 hook object (never the token).
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id.to_string(),
            "name": self.name,
            "branch": self.branch,
            "created_on": self.created_on.rfc3339(),
            "last_triggered_on": self.last_triggered_on.map(Timestamp::rfc3339),
            "trigger_count": self.trigger_count,
        })
    }
}

/// Validates a hook name: 1 to 100 characters, no control characters, not only spaces.
pub fn validate_hook_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        Err("name must not be empty".into())
    } else if name.chars().count() > 100 {
        Err("name must be at most 100 characters".into())
    } else if name.chars().any(char::is_control) {
        Err("name must not contain control characters".into())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_json_has_every_spec_field() {
        let hook = HookId::new();
        let mut b = Build::new_queued(
            1,
            "site",
            "main",
            Trigger {
                source: TriggerSource::DeployHook,
                hook: Some((hook, "cms".into())),
            },
            None,
            true,
        );
        let v = b.to_trigger_json(false);
        for key in [
            "build_uuid",
            "project",
            "branch",
            "commit",
            "requested_commit",
            "status",
            "build_outcome",
            "exit_code",
            "build_trigger_source",
            "trigger",
            "created_on",
            "initializing_on",
            "running_on",
            "stopped_on",
            "cancel_reason",
            "superseded_by",
            "already_exists",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["status"], "queued");
        assert_eq!(v["build_outcome"], Value::Null);
        assert_eq!(v["build_trigger_source"], "deploy_hook");
        assert_eq!(v["trigger"]["label"], "deploy hook");
        assert_eq!(v["trigger"]["hook_name"], "cms");
        assert_eq!(v["trigger"]["hook_id"], hook.to_string());
        assert_eq!(v["already_exists"], false);
        b.phase = Phase::Stopped(Outcome::TimedOut);
        assert_eq!(b.to_json()["status"], "stopped");
        assert_eq!(b.to_json()["build_outcome"], "timed_out");
    }

    #[test]
    fn before_subtracts_without_overflow() {
        assert_eq!(
            Timestamp(5_000_000).before(Duration::from_secs(2)),
            Timestamp(3_000_000)
        );
        assert_eq!(
            Timestamp(i64::MIN + 1).before(Duration::from_secs(1)),
            Timestamp(i64::MIN)
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(Timestamp(0).rfc3339(), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            Timestamp(1_769_021_400_000_000).rfc3339(),
            "2026-01-21T18:50:00.000000Z"
        );
    }

    #[test]
    fn build_ids_parse_only_canonical_form() {
        let id = BuildId::new();
        assert_eq!(BuildId::parse(&id.to_string()), Some(id));
        assert_eq!(BuildId::parse(&id.to_string().to_uppercase()), None);
        assert_eq!(BuildId::parse(&id.to_string().replace('-', "")), None);
        assert_eq!(BuildId::parse("x"), None);
    }

    #[test]
    fn hook_names() {
        assert!(validate_hook_name("cms").is_ok());
        assert!(validate_hook_name("Contentful (prod)").is_ok());
        assert!(validate_hook_name(" ").is_err());
        assert!(validate_hook_name("a\nb").is_err());
        assert!(validate_hook_name(&"x".repeat(101)).is_err());
    }
}
