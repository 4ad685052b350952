//! The things deployhook keeps: builds and hooks, and their JSON shapes of SPEC §4.
//!
//! A build's status and outcome live in one [`Phase`], so "stopped without an outcome" or
//! "running with an outcome" cannot be written down. The other SPEC §2 invariants (cancel
//! fields only on cancelled builds, an exit code only for `success` and `fail`) are not in
//! the types: the state machine (`crate::machine`) keeps them, and
//! [`Build::check_invariants`] states them for its property test. Records are plain serde structs: the
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
        self.rfc3339_display().to_string()
    }

    /// The same as a `Display` value, to write without an intermediate `String` (times
    /// before the epoch show as the epoch).
    pub fn rfc3339_display(self) -> humantime::Rfc3339Timestamp {
        let t = if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.0 as u64)
        } else {
            UNIX_EPOCH
        };
        humantime::format_rfc3339_micros(t)
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
    /// A `[[projects.P.schedule]]` (v2). Last: bincode stores the variant's index.
    Schedule,
}

impl TriggerSource {
    /// The SPEC `build_trigger_source` word.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerSource::DeployHook => "deploy_hook",
            TriggerSource::GitPush => "git_push",
            TriggerSource::Api => "api",
            TriggerSource::Schedule => "schedule",
        }
    }

    /// The SPEC `trigger.label`.
    pub fn label(self) -> &'static str {
        match self {
            TriggerSource::DeployHook => "deploy hook",
            TriggerSource::GitPush => "git push",
            TriggerSource::Api => "api",
            TriggerSource::Schedule => "schedule",
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

/// What a build builds: a branch, or a tag for projects with `tags` (SPEC §1 "target").
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GitRef {
    /// `refs/heads/<name>`.
    Branch(String),
    /// `refs/tags/<name>`.
    Tag(String),
}

impl GitRef {
    /// The full ref name (`refs/heads/main`, `refs/tags/v1.2.0`).
    pub fn full(&self) -> String {
        match self {
            GitRef::Branch(b) => format!("refs/heads/{b}"),
            GitRef::Tag(t) => format!("refs/tags/{t}"),
        }
    }

    /// The short name, branch or tag.
    pub fn name(&self) -> &str {
        match self {
            GitRef::Branch(n) | GitRef::Tag(n) => n,
        }
    }

    /// The branch, for branch refs.
    pub fn branch(&self) -> Option<&str> {
        match self {
            GitRef::Branch(b) => Some(b),
            GitRef::Tag(_) => None,
        }
    }

    /// The tag, for tag refs.
    pub fn tag(&self) -> Option<&str> {
        match self {
            GitRef::Tag(t) => Some(t),
            GitRef::Branch(_) => None,
        }
    }
}

impl fmt::Display for GitRef {
    /// `branch main` / `tag v1.2.0`, for messages and log lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GitRef::Branch(b) => write!(f, "branch {b}"),
            GitRef::Tag(t) => write!(f, "tag {t}"),
        }
    }
}

/// A trigger's accepted parameters (SPEC §2.3), sorted by name so equal sets compare equal.
pub type Params = std::collections::BTreeMap<String, String>;

/// What a trigger asks to build (SPEC §1): dedupe and supersede work per target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Project name.
    pub project: String,
    /// Branch or tag.
    pub git_ref: GitRef,
    /// Accepted parameters (usually none).
    pub params: Params,
}

impl Target {
    /// A branch target with no params.
    pub fn branch(project: &str, branch: &str) -> Self {
        Target {
            project: project.to_owned(),
            git_ref: GitRef::Branch(branch.to_owned()),
            params: Params::new(),
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
    /// Branch or tag to build.
    pub git_ref: GitRef,
    /// Accepted trigger parameters (SPEC §2.3).
    pub params: Params,
    /// The full SHA checked out, once resolved (repo projects only).
    pub commit: Option<String>,
    /// The newest SHA a trigger announced (a Git push's `after`).
    pub requested_commit: Option<String>,
    /// Every SHA announced by the triggers this build absorbed, oldest first, no repeats.
    pub requested_commits: Vec<String>,
    /// An exact commit to build (API `commit`, redeploy): such a build never joins, is never
    /// joined and supersedes nothing (SPEC §2.1).
    pub exact_commit: Option<String>,
    /// When a queued build becomes eligible to start (quiet period, SPEC §2.2).
    pub not_before: Option<Timestamp>,
    /// The build a redeploy repeats.
    pub redeploy_of: Option<BuildId>,
    /// SHAs of the builds this one superseded (and of those they had superseded): their
    /// commit statuses take this build's final state (SPEC §5.2). Not part of the JSON.
    pub superseded_commits: Vec<String>,
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
    /// A new queued build of `target`, created at `now`.
    pub fn new_queued(
        seq: u64,
        target: &Target,
        trigger: Trigger,
        requested_commit: Option<String>,
        has_payload: bool,
        now: Timestamp,
    ) -> Self {
        Self {
            id: BuildId::new(),
            seq,
            project: target.project.clone(),
            git_ref: target.git_ref.clone(),
            params: target.params.clone(),
            commit: None,
            requested_commits: requested_commit.iter().cloned().collect(),
            requested_commit,
            exact_commit: None,
            not_before: None,
            redeploy_of: None,
            superseded_commits: Vec::new(),
            phase: Phase::Queued,
            exit_code: None,
            trigger,
            created_on: now,
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

    /// Whether this build stands alone (an exact commit, or a redeploy): it never joins, is
    /// never joined and supersedes nothing (SPEC §2.1).
    pub fn stands_alone(&self) -> bool {
        self.exact_commit.is_some() || self.redeploy_of.is_some()
    }

    /// The build's target.
    pub fn target(&self) -> Target {
        Target {
            project: self.project.clone(),
            git_ref: self.git_ref.clone(),
            params: self.params.clone(),
        }
    }

    /// Whether this build is of `target` (without cloning it).
    pub fn is_of(&self, target: &Target) -> bool {
        self.project == target.project
            && self.git_ref == target.git_ref
            && self.params == target.params
    }

    /// The SPEC §4 build object.
    pub fn to_json(&self) -> Value {
        // Serializing a plain struct cannot fail (no maps with non-string keys).
        serde_json::to_value(BuildJson::new(self, None)).unwrap_or(Value::Null)
    }

    /// The build object plus `already_exists`, as trigger responses carry it.
    pub fn to_trigger_json(&self, already_exists: bool) -> Value {
        serde_json::to_value(BuildJson::new(self, Some(already_exists))).unwrap_or(Value::Null)
    }

    /// The SPEC §2 invariants every stored build keeps; `Err` names the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let outcome = self.phase.outcome();
        if (outcome == Some(Outcome::Cancelled)) != self.cancel_reason.is_some() {
            return Err(format!(
                "cancel_reason {:?} with outcome {:?}",
                self.cancel_reason, outcome
            ));
        }
        if self.superseded_by.is_some() && self.cancel_reason != Some(CancelReason::Superseded) {
            return Err(format!(
                "superseded_by set with cancel_reason {:?}",
                self.cancel_reason
            ));
        }
        if self.exit_code.is_some() && !matches!(outcome, Some(Outcome::Success | Outcome::Fail)) {
            return Err(format!("exit_code set with outcome {outcome:?}"));
        }
        if outcome == Some(Outcome::Success) && self.exit_code != Some(0) {
            return Err(format!("success with exit_code {:?}", self.exit_code));
        }
        if self.phase.is_stopped() != self.stopped_on.is_some() {
            return Err("stopped_on disagrees with status".into());
        }
        if self.phase != Phase::Queued && self.not_before.is_some() {
            return Err("not_before set after leaving queued".into());
        }
        if let Some(last) = self.requested_commits.last()
            && self.requested_commit.as_ref() != Some(last)
        {
            return Err("requested_commit is not the newest of requested_commits".into());
        }
        Ok(())
    }
}

/// Serializes any `Display` value as a JSON string, without allocating it first.
struct Shown<T>(T);

impl<T: fmt::Display> Serialize for Shown<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A timestamp as RFC 3339, written straight into the output.
fn shown_time(t: Timestamp) -> Shown<humantime::Rfc3339Timestamp> {
    Shown(t.rfc3339_display())
}

/// The SPEC §4 build object, borrowed from a [`Build`] and serialized straight to bytes: a
/// trigger's answer is the hot path (issue 7), and going through a `serde_json::Value` first
/// cost an allocation per field.
#[derive(Serialize)]
pub struct BuildJson<'a> {
    build_uuid: Shown<BuildId>,
    project: &'a str,
    branch: Option<&'a str>,
    commit: Option<&'a str>,
    requested_commit: Option<&'a str>,
    status: &'static str,
    build_outcome: Option<&'static str>,
    exit_code: Option<i32>,
    build_trigger_source: &'static str,
    trigger: TriggerJson<'a>,
    created_on: Shown<humantime::Rfc3339Timestamp>,
    initializing_on: Option<Shown<humantime::Rfc3339Timestamp>>,
    running_on: Option<Shown<humantime::Rfc3339Timestamp>>,
    stopped_on: Option<Shown<humantime::Rfc3339Timestamp>>,
    cancel_reason: Option<&'static str>,
    superseded_by: Option<Shown<BuildId>>,
    #[serde(rename = "ref")]
    git_ref: Shown<RefDisplay<'a>>,
    tag: Option<&'a str>,
    requested_commits: &'a [String],
    params: &'a Params,
    not_before: Option<Shown<humantime::Rfc3339Timestamp>>,
    redeploy_of: Option<Shown<BuildId>>,
    followed_from: Option<Shown<BuildId>>,
    /// Only in trigger answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    already_exists: Option<bool>,
}

/// A ref's full name, written without building a `String` first.
struct RefDisplay<'a>(&'a GitRef);

impl fmt::Display for RefDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            GitRef::Branch(b) => write!(f, "refs/heads/{b}"),
            GitRef::Tag(t) => write!(f, "refs/tags/{t}"),
        }
    }
}

#[derive(Serialize)]
struct TriggerJson<'a> {
    hook_id: Option<Shown<HookId>>,
    hook_name: Option<&'a str>,
    label: &'static str,
}

impl<'a> BuildJson<'a> {
    /// The build object of `b`; with `already_exists` for a trigger's answer.
    pub fn new(b: &'a Build, already_exists: Option<bool>) -> Self {
        BuildJson {
            build_uuid: Shown(b.id),
            project: &b.project,
            branch: b.git_ref.branch(),
            commit: b.commit.as_deref(),
            requested_commit: b.requested_commit.as_deref(),
            status: b.phase.status(),
            build_outcome: b.phase.outcome().map(Outcome::as_str),
            exit_code: b.exit_code,
            build_trigger_source: b.trigger.source.as_str(),
            trigger: TriggerJson {
                hook_id: b.trigger.hook.as_ref().map(|(id, _)| Shown(*id)),
                hook_name: b.trigger.hook.as_ref().map(|(_, name)| name.as_str()),
                label: b.trigger.source.label(),
            },
            created_on: shown_time(b.created_on),
            initializing_on: b.initializing_on.map(shown_time),
            running_on: b.running_on.map(shown_time),
            stopped_on: b.stopped_on.map(shown_time),
            cancel_reason: b.cancel_reason.map(CancelReason::as_str),
            superseded_by: b.superseded_by.map(Shown),
            git_ref: Shown(RefDisplay(&b.git_ref)),
            tag: b.git_ref.tag(),
            requested_commits: &b.requested_commits,
            params: &b.params,
            not_before: b.not_before.map(shown_time),
            redeploy_of: b.redeploy_of.map(Shown),
            followed_from: None,
            already_exists,
        }
    }

    /// The same object for a wait that followed supersedes from `first` (SPEC §4.3).
    pub fn followed_from(mut self, first: Option<BuildId>) -> Self {
        self.followed_from = first.map(Shown);
        self
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
    /// Whether it also fires on `GET` (SPEC §4.1 (v2)); off unless asked for at creation.
    pub allow_get: bool,
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
            "allow_get": self.allow_get,
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
            &crate::model::Target::branch("site", "main"),
            Trigger {
                source: TriggerSource::DeployHook,
                hook: Some((hook, "cms".into())),
            },
            None,
            true,
            crate::model::Timestamp::now(),
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
    fn build_json_is_exactly_the_spec_object_in_order() {
        let hook = HookId::new();
        let mut b = Build::new_queued(
            7,
            &crate::model::Target::branch("site", "main"),
            Trigger {
                source: TriggerSource::GitPush,
                hook: None,
            },
            Some("ab".repeat(20)),
            false,
            crate::model::Timestamp::now(),
        );
        b.created_on = Timestamp(1_768_000_000_123_456);
        b.initializing_on = Some(Timestamp(1_768_000_001_000_000));
        b.stopped_on = Some(Timestamp(-5));
        b.commit = Some("cd".repeat(20));
        b.exit_code = Some(3);
        b.phase = Phase::Stopped(Outcome::Cancelled);
        b.cancel_reason = Some(CancelReason::Superseded);
        let other = BuildId::new();
        b.superseded_by = Some(other);
        let expected = json!({
            "build_uuid": b.id.to_string(),
            "project": "site",
            "branch": "main",
            "commit": "cd".repeat(20),
            "requested_commit": "ab".repeat(20),
            "status": "stopped",
            "build_outcome": "cancelled",
            "exit_code": 3,
            "build_trigger_source": "git_push",
            "trigger": {"hook_id": null, "hook_name": null, "label": "git push"},
            "created_on": b.created_on.rfc3339(),
            "initializing_on": Timestamp(1_768_000_001_000_000).rfc3339(),
            "running_on": null,
            "stopped_on": Timestamp(-5).rfc3339(),
            "cancel_reason": "superseded",
            "superseded_by": other.to_string(),
            "ref": "refs/heads/main",
            "tag": null,
            "requested_commits": ["ab".repeat(20)],
            "params": {},
            "not_before": null,
            "redeploy_of": null,
            "followed_from": null,
        });
        // Same keys in the same order, same values: compare the serialized text.
        assert_eq!(b.to_json().to_string(), expected.to_string());
        let bytes = serde_json::to_string(&BuildJson::new(&b, None)).unwrap();
        assert_eq!(bytes, expected.to_string());
        let mut with = expected.clone();
        with["already_exists"] = json!(true);
        assert_eq!(b.to_trigger_json(true).to_string(), with.to_string());
        b.trigger.hook = Some((hook, "cms".into()));
        assert_eq!(b.to_json()["trigger"]["hook_id"], hook.to_string());
    }

    fn api_build(t: &Target) -> Build {
        let api = Trigger {
            source: TriggerSource::Api,
            hook: None,
        };
        Build::new_queued(1, t, api, None, false, Timestamp(0))
    }

    #[test]
    fn tag_builds_have_a_null_branch_and_params_show_sorted() {
        let mut t = Target {
            project: "site".into(),
            git_ref: GitRef::Tag("v1.2.0".into()),
            params: Params::new(),
        };
        t.params.insert("zone".into(), "eu".into());
        t.params.insert("env".into(), "prod".into());
        let mut b = api_build(&t);
        let first = BuildId::new();
        b.redeploy_of = Some(first);
        let v = b.to_json();
        assert_eq!(v["branch"], Value::Null);
        assert_eq!(v["ref"], "refs/tags/v1.2.0");
        assert_eq!(v["tag"], "v1.2.0");
        assert_eq!(v["redeploy_of"], first.to_string());
        assert_eq!(
            serde_json::to_string(&v["params"]).unwrap(),
            r#"{"env":"prod","zone":"eu"}"#
        );
        let followed =
            serde_json::to_value(BuildJson::new(&b, None).followed_from(Some(first))).unwrap();
        assert_eq!(followed["followed_from"], first.to_string());
        assert!(b.is_of(&t) && b.target() == t);
        assert_eq!(t.git_ref.full(), "refs/tags/v1.2.0");
        assert_eq!(t.git_ref.to_string(), "tag v1.2.0");
    }

    #[test]
    fn invariants_catch_a_self_contradicting_record() {
        let mut b = api_build(&Target::branch("site", "main"));
        b.check_invariants().unwrap();
        // The stored contradiction of the outside review: success, exit 0, superseded.
        b.phase = Phase::Stopped(Outcome::Success);
        b.stopped_on = Some(Timestamp(1));
        b.exit_code = Some(0);
        b.check_invariants().unwrap();
        b.cancel_reason = Some(CancelReason::Superseded);
        b.superseded_by = Some(BuildId::new());
        assert!(b.check_invariants().is_err());
        b.cancel_reason = None;
        assert!(
            b.check_invariants().is_err(),
            "superseded_by without the reason"
        );
        b.superseded_by = None;
        b.phase = Phase::Stopped(Outcome::Cancelled);
        b.exit_code = None;
        assert!(b.check_invariants().is_err(), "cancelled without a reason");
        b.cancel_reason = Some(CancelReason::Api);
        b.check_invariants().unwrap();
        b.exit_code = Some(1);
        assert!(
            b.check_invariants().is_err(),
            "exit code on a cancelled build"
        );
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
