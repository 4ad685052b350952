//! The durable outbox (SPEC §5): everything that leaves the daemon about a build —
//! notifications (§5.1) and commit statuses (§5.2) — as entries in sled, written in the same
//! transaction as the build change that causes them, and one worker that delivers them.
//!
//! # Planning (pure)
//! The state machine emits a [`Tell`] after each change the outside may hear of; [`plan`]
//! turns (build, tell, config, the previous outcome of the target) into [`Entry`]s, and the
//! queue writes them with the build record (`Store::put_build_with`).
//!
//! # Order and staleness
//! - A commit status belongs to a *lane*: (project, SHA, context). The store keeps one pending
//!   entry per lane: a newer state replaces the older one in the transaction that writes it,
//!   and the worker never has two entries of one lane in flight. So no earlier state of a SHA
//!   can land after a later one, whichever build caused them.
//! - Notifications are never dropped and go out in creation order per sink: the oldest
//!   pending entry of a sink holds back the others until it is delivered or failed.
//!
//! # Delivery
//! One worker task pages through the pending entries (never all of them in memory), starts
//! at most [`MAX_IN_FLIGHT`] deliveries at once, and waits for a new entry, a finished
//! delivery, or the next retry time. Failures (no answer, timeouts, 5xx, 408, 429) are retried
//! after 5 s, 30 s, 2 min, 10 min, 30 min, then hourly, until 24 h after the entry was
//! created ([`Schedule`]); any other answer outside 2xx (3xx included) fails the entry at once.
//! A failure is logged once, with the receiver as `scheme://host` only. Retry times are kept
//! on the monotonic clock in memory; the store keeps the wall time of the next attempt for the
//! listing and for a restart, which resumes every pending entry.
//!
//! Nothing here touches a build: the queue only writes entries and wakes the worker.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::{Config, Event, Provider, SharedConfig, SinkConfig};
use crate::machine::Tell;
use crate::metrics::Metrics;
use crate::model::{Build, BuildId, CancelReason, Outcome, Phase, Timestamp};
use crate::notifications::{self, Notice};
use crate::outbound::{Answer, Outbound, SendError};
use crate::statuses::{self, State};
use crate::store::Store;

/// Deliveries in flight at once, all sinks and hosts together.
pub const MAX_IN_FLIGHT: usize = 8;

/// Pending entries read from the store per page while scanning.
const PAGE: usize = 256;

/// Test-only: divide every retry delay and the 24 h give-up by this (never user config).
const SCALE_ENV: &str = "DEPLOYHOOK_TEST_OUTBOX_SCALE";

/// What an entry delivers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum What {
    /// A notification to a sink.
    Notification {
        /// The sink's name.
        sink: String,
        /// The event.
        event: Event,
        /// The build as it was when the event happened.
        build: Box<Build>,
    },
    /// A commit status.
    Status {
        /// The project whose `[status]` says where.
        project: String,
        /// The provider at planning time (for the listing).
        provider: Provider,
        /// The status context at planning time (part of the lane).
        context: String,
        /// The commit.
        sha: String,
        /// The state.
        state: State,
        /// The description.
        description: String,
        /// The build the status links to (for a superseded SHA: the newer build).
        link: BuildId,
    },
}

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    /// Not yet delivered.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Given up.
    Failed,
}

impl Delivery {
    fn as_str(self) -> &'static str {
        match self {
            Delivery::Pending => "pending",
            Delivery::Delivered => "delivered",
            Delivery::Failed => "failed",
        }
    }
}

/// One outbox entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// What to deliver.
    pub what: What,
    /// The build that caused it.
    pub build: BuildId,
    /// When it was created (the event's time; 24 h of retries count from it).
    pub created_on: Timestamp,
    /// Where it stands.
    pub delivery: Delivery,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure, without secrets.
    pub last_error: Option<String>,
    /// When the next attempt is due (wall clock, for the listing and restarts).
    pub next_attempt_on: Option<Timestamp>,
}

impl Entry {
    fn new(what: What, build: BuildId, now: Timestamp) -> Entry {
        Entry {
            what,
            build,
            created_on: now,
            delivery: Delivery::Pending,
            attempts: 0,
            last_error: None,
            next_attempt_on: None,
        }
    }

    /// The commit-status lane (project, SHA, context), `None` for notifications.
    pub fn status_lane(&self) -> Option<Vec<u8>> {
        match &self.what {
            What::Status {
                project,
                sha,
                context,
                ..
            } => Some(format!("{project}\0{sha}\0{context}").into_bytes()),
            What::Notification { .. } => None,
        }
    }

    /// The project the entry is about.
    pub fn project(&self) -> &str {
        match &self.what {
            What::Status { project, .. } => project,
            What::Notification { build, .. } => &build.project,
        }
    }

    /// The entry as `GET /api/notifications` shows it.
    pub fn to_json(&self, id: u64) -> Value {
        let (sink, kind, event) = match &self.what {
            What::Notification { sink, event, .. } => {
                (sink.clone(), "notification", event.as_str().to_owned())
            }
            What::Status {
                provider, state, ..
            } => (
                provider.as_str().to_owned(),
                "commit_status",
                state.word(*provider).to_owned(),
            ),
        };
        json!({
            "id": id.to_string(),
            "sink": sink,
            "kind": kind,
            "event": event,
            "build_uuid": self.build.to_string(),
            "status": self.delivery.as_str(),
            "attempts": self.attempts,
            "last_error": self.last_error,
            "next_attempt_on": self.next_attempt_on.map(Timestamp::rfc3339),
            "created_on": self.created_on.rfc3339(),
        })
    }
}

// ---- planning (pure) --------------------------------------------------------------------

/// The notification event a change is, if any. `prev` is the outcome of the previous build
/// of the same target that ended in success, fail, timed_out or interrupted.
pub fn event_of(b: &Build, tell: &Tell, prev: Option<Outcome>) -> Option<Event> {
    match tell {
        Tell::Running => Some(Event::Started),
        Tell::Stopped => match b.phase {
            Phase::Stopped(Outcome::Success) => Some(match prev {
                Some(p) if p != Outcome::Success => Event::Recovered,
                _ => Event::Succeeded,
            }),
            Phase::Stopped(Outcome::Fail) => Some(Event::Failed),
            Phase::Stopped(Outcome::TimedOut) => Some(Event::TimedOut),
            Phase::Stopped(Outcome::Interrupted) => Some(Event::Interrupted),
            Phase::Stopped(Outcome::Cancelled) if b.cancel_reason == Some(CancelReason::Api) => {
                Some(Event::Cancelled)
            }
            _ => None,
        },
        _ => None,
    }
}

/// Whether [`plan`] would want the previous outcome for this change (a success with a sink
/// that could hear it): the queue looks it up only then.
pub fn needs_previous(b: &Build, tell: &Tell, cfg: &Config) -> bool {
    *tell == Tell::Stopped
        && b.phase == Phase::Stopped(Outcome::Success)
        && sinks_of(cfg, &b.project).any(|s| s.hears(Event::Succeeded) || s.hears(Event::Recovered))
}

fn sinks_of<'a>(
    cfg: &'a Config,
    project: &'a str,
) -> impl Iterator<Item = &'a crate::config::SinkConfig> + 'a {
    let list = cfg.project(project).and_then(|p| p.notify.clone());
    cfg.sinks
        .values()
        .filter(move |s| list.as_ref().is_none_or(|l| l.contains(&s.name)))
}

/// SHAs in first-seen order, without repeats.
fn shas<'a>(lists: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in lists {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

/// The entries a change causes (SPEC §5.1, §5.2).
pub fn plan(
    b: &Build,
    tell: &Tell,
    cfg: &Config,
    prev: Option<Outcome>,
    now: Timestamp,
) -> Vec<Entry> {
    let mut out = Vec::new();
    if let Some(event) = event_of(b, tell, prev) {
        for sink in sinks_of(cfg, &b.project).filter(|s| s.hears(event)) {
            out.push(Entry::new(
                What::Notification {
                    sink: sink.name.clone(),
                    event,
                    build: Box::new(b.clone()),
                },
                b.id,
                now,
            ));
        }
    }
    let Some(status) = cfg.project(&b.project).and_then(|p| p.status.as_ref()) else {
        return out;
    };
    let own = || shas(b.requested_commits.iter().chain(&b.commit));
    let (commits, state, description, link) = match tell {
        Tell::Queued | Tell::Initializing | Tell::Running => {
            let Some(state) = State::of(b) else {
                return out;
            };
            (own(), state, statuses::describe(b), b.id)
        }
        Tell::Joined(sha) => {
            let Some(state) = State::of(b) else {
                return out;
            };
            (vec![sha.clone()], state, statuses::describe(b), b.id)
        }
        Tell::SupersededBy(newer) => (
            shas(
                b.superseded_commits
                    .iter()
                    .chain(&b.requested_commits)
                    .chain(&b.commit),
            ),
            State::Superseded,
            statuses::superseded_description(*newer),
            *newer,
        ),
        Tell::Stopped => {
            // A superseded build reports nothing: its SHAs wait for the newer build.
            let Some(state) = State::of(b) else {
                return out;
            };
            (
                shas(
                    b.requested_commits
                        .iter()
                        .chain(&b.commit)
                        .chain(&b.superseded_commits),
                ),
                state,
                statuses::describe(b),
                b.id,
            )
        }
    };
    for sha in commits {
        out.push(Entry::new(
            What::Status {
                project: b.project.clone(),
                provider: status.provider,
                context: status.context.clone(),
                sha,
                state,
                description: description.clone(),
                link,
            },
            b.id,
            now,
        ));
    }
    out
}

// ---- retry schedule (pure) ----------------------------------------------------------------

/// The retry schedule of SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Divides every delay (1 in production; test-only otherwise).
    pub scale: u32,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule { scale: 1 }
    }
}

impl Schedule {
    /// The delays after the first five failures; after that, hourly.
    pub const DELAYS: [Duration; 5] = [
        Duration::from_secs(5),
        Duration::from_secs(30),
        Duration::from_secs(120),
        Duration::from_secs(600),
        Duration::from_secs(1800),
    ];

    /// How long after its creation an entry is given up.
    pub const GIVE_UP: Duration = Duration::from_secs(24 * 3600);

    /// The production schedule, or the test-only scaled one.
    pub fn from_env() -> Schedule {
        let scale = std::env::var(SCALE_ENV)
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|s| *s > 0)
            .unwrap_or(1);
        Schedule { scale }
    }

    /// The wait after the `failures`-th failure (1-based).
    pub fn delay(&self, failures: u32) -> Duration {
        let d = Self::DELAYS
            .get(failures.saturating_sub(1) as usize)
            .copied()
            .unwrap_or(Duration::from_secs(3600));
        d / self.scale
    }

    /// How long entries are retried.
    pub fn give_up(&self) -> Duration {
        Self::GIVE_UP / self.scale
    }

    /// After the `failures`-th failure of an entry `age` old: the wait before the next try,
    /// or `None` when the next try would come 24 h or more after its creation.
    pub fn next(&self, failures: u32, age: Duration) -> Option<Duration> {
        let d = self.delay(failures);
        (age + d < self.give_up()).then_some(d)
    }
}

/// What an attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx.
    Delivered,
    /// Worth another try (no answer, timeout, 5xx, 408, 429).
    Retry(String),
    /// Never worth another try (3xx, other 4xx, a config that cannot be used).
    Fail(String),
}

/// Classifies an answer (SPEC §5).
pub fn judge(r: &Result<Answer, SendError>) -> Verdict {
    match r {
        Ok(a) if (200..300).contains(&a.status) => Verdict::Delivered,
        Ok(a) if a.status >= 500 || a.status == 408 || a.status == 429 => {
            Verdict::Retry(format!("HTTP {}", a.status))
        }
        Ok(a) if (300..400).contains(&a.status) => {
            Verdict::Fail(format!("HTTP {} (redirects are not followed)", a.status))
        }
        Ok(a) => Verdict::Fail(format!("HTTP {}", a.status)),
        Err(SendError::Bad(..)) => {
            Verdict::Fail(r.as_ref().err().map(|e| e.to_string()).unwrap_or_default())
        }
        Err(e) => Verdict::Retry(e.to_string()),
    }
}

// ---- the worker ---------------------------------------------------------------------------

/// Handle to the outbox worker; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

/// What the worker works with.
pub struct Parts {
    /// Where the entries wait (written by the queue in the builds' own transactions).
    pub store: Store,
    /// Read at every attempt: a reload changes a sink's URL or secret for its next try.
    pub config: Arc<SharedConfig>,
    /// Delivery counts by sink and result.
    pub metrics: Arc<Metrics>,
    /// The outbound HTTP(S) client (no redirects, bounded answers).
    pub client: Outbound,
    /// Woken by the queue after it writes entries (see `Queue::outbox_wake`).
    pub wake: Arc<Notify>,
    /// `public_url` (or the bound address), for links.
    pub public_url: String,
}

struct Inner {
    parts: Parts,
    schedule: Schedule,
    /// Set at shutdown: no new deliveries start.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The worker task (awaited at shutdown).
    worker: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Why a test notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// No such sink.
    #[error("no sink [notify.{0}] is configured")]
    UnknownSink(String),
    /// The request got no answer.
    #[error(transparent)]
    Send(#[from] SendError),
}

/// A retry time known to this process.
#[derive(Debug, Clone, Copy)]
struct Due {
    /// The entry's creation on the monotonic clock.
    born: Instant,
    /// When it may be tried again.
    next: Instant,
}

impl Outbox {
    /// Starts the worker.
    pub fn start(mut parts: Parts) -> Outbox {
        parts.public_url = parts.public_url.trim_end_matches('/').to_owned();
        let ob = Outbox {
            inner: Arc::new(Inner {
                parts,
                schedule: Schedule::from_env(),
                stopping: tokio::sync::watch::channel(false).0,
                worker: std::sync::Mutex::new(None),
            }),
        };
        let handle = tokio::spawn(ob.clone().run());
        if let Ok(mut w) = ob.inner.worker.lock() {
            *w = Some(handle);
        }
        ob
    }

    /// Stops starting deliveries and waits up to `grace` for those in flight; the rest
    /// stay pending and go out after the next start (at least once).
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stopping.send_replace(true);
        let handle = self.inner.worker.lock().ok().and_then(|mut w| w.take());
        if let Some(mut h) = handle
            && tokio::time::timeout(grace, &mut h).await.is_err()
        {
            h.abort();
        }
    }

    /// Sends a `test` event to one sink now, outside the outbox.
    pub async fn test(&self, sink: &str) -> Result<Answer, TestError> {
        let config = self.inner.parts.config.get();
        let s = config
            .sinks
            .get(sink)
            .ok_or_else(|| TestError::UnknownSink(sink.to_owned()))?;
        let n = Notice {
            event: Event::Test,
            at: Timestamp::now(),
            build: None,
            log_tail: &[],
            public_url: &self.inner.parts.public_url,
        };
        let id = format!("test_{}", BuildId::new().0.simple());
        Ok(self.post_notice(s, &n, &id).await?)
    }

    /// Renders a notice for one sink and posts it: the one way a notice leaves, whether a
    /// `test` event or an outbox delivery, so both sign and redact alike.
    async fn post_notice(
        &self,
        sink: &SinkConfig,
        n: &Notice<'_>,
        id: &str,
    ) -> Result<Answer, SendError> {
        let r = notifications::render(sink, n, id, unix_now());
        self.inner
            .parts
            .client
            .post(
                sink.url.expose(),
                &sink.url.redacted(),
                &r.headers,
                Bytes::from(r.body),
            )
            .await
    }

    async fn run(self) {
        let mut stopping = self.inner.stopping.subscribe();
        let mut in_flight: JoinSet<(u64, Entry, Verdict)> = JoinSet::new();
        let mut busy: HashSet<Vec<u8>> = HashSet::new();
        let mut due: HashMap<u64, Due> = HashMap::new();
        loop {
            if *stopping.borrow() {
                break;
            }
            let mut next_wake = None;
            if in_flight.len() < MAX_IN_FLIGHT {
                next_wake = self.scan(&mut in_flight, &mut busy, &mut due);
            }
            let sleep = async {
                match next_wake {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.inner.parts.wake.notified() => {}
                _ = sleep => {}
                _ = stopping.changed() => {}
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok((id, entry, verdict)) = done {
                        busy.remove(&lane_key(&entry));
                        self.settle(id, entry, verdict, &mut due);
                    }
                }
            }
        }
        // Let deliveries in flight finish (the caller bounds this with its grace).
        while let Some(done) = in_flight.join_next().await {
            if let Ok((id, entry, verdict)) = done {
                self.settle(id, entry, verdict, &mut due);
            }
        }
    }

    /// Walks the pending entries oldest first and starts those that may go now. Returns
    /// the earliest time one that must wait becomes due.
    fn scan(
        &self,
        in_flight: &mut JoinSet<(u64, Entry, Verdict)>,
        busy: &mut HashSet<Vec<u8>>,
        due: &mut HashMap<u64, Due>,
    ) -> Option<Instant> {
        let now = Instant::now();
        let wall = Timestamp::now();
        let mut next_wake: Option<Instant> = None;
        // Sinks whose oldest pending entry is waiting or in flight: later ones wait too.
        let mut held: HashSet<String> = HashSet::new();
        let mut after = None;
        let mut seen = HashSet::new();
        'pages: loop {
            let page = match self.inner.parts.store.outbox_page(after, PAGE) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("cannot read the outbox: {e}");
                    return Some(now + Duration::from_secs(5));
                }
            };
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            for (id, entry) in page {
                seen.insert(id);
                let lane = lane_key(&entry);
                let sink = match &entry.what {
                    What::Notification { sink, .. } => Some(sink.clone()),
                    What::Status { .. } => None,
                };
                if let Some(s) = &sink
                    && held.contains(s)
                {
                    continue;
                }
                let d = *due.entry(id).or_insert_with(|| {
                    let age = Duration::from_micros(
                        u64::try_from(wall.0.saturating_sub(entry.created_on.0)).unwrap_or(0),
                    );
                    let wait = entry.next_attempt_on.map_or(Duration::ZERO, |t| {
                        Duration::from_micros(
                            u64::try_from(t.0.saturating_sub(wall.0)).unwrap_or(0),
                        )
                    });
                    Due {
                        born: now.checked_sub(age).unwrap_or(now),
                        next: now + wait.min(Duration::from_secs(3600)),
                    }
                });
                let blocked = busy.contains(&lane) || d.next > now;
                if blocked {
                    if !busy.contains(&lane) {
                        next_wake = Some(next_wake.map_or(d.next, |w: Instant| w.min(d.next)));
                    }
                    if let Some(s) = sink {
                        held.insert(s);
                    }
                    continue;
                }
                if in_flight.len() >= MAX_IN_FLIGHT {
                    break 'pages;
                }
                busy.insert(lane);
                if let Some(s) = sink {
                    held.insert(s);
                }
                let me = self.clone();
                in_flight.spawn(async move {
                    let verdict = me.attempt(id, &entry).await;
                    (id, entry, verdict)
                });
            }
        }
        // Forget retry times of entries that are gone (dropped for a newer status).
        if after.is_none() || in_flight.len() < MAX_IN_FLIGHT {
            due.retain(|id, _| seen.contains(id));
        }
        next_wake
    }

    /// Records what an attempt came to.
    fn settle(&self, id: u64, mut entry: Entry, verdict: Verdict, due: &mut HashMap<u64, Due>) {
        entry.attempts += 1;
        let now = Instant::now();
        let born = due.get(&id).map_or(now, |d| d.born);
        let (result, error) = match verdict {
            Verdict::Delivered => {
                entry.delivery = Delivery::Delivered;
                entry.last_error = None;
                entry.next_attempt_on = None;
                ("delivered", None)
            }
            Verdict::Retry(why) => match self.inner.schedule.next(entry.attempts, now - born) {
                Some(wait) => {
                    entry.last_error = Some(why);
                    entry.next_attempt_on = Some(Timestamp(
                        Timestamp::now().0
                            + i64::try_from(wait.as_micros()).unwrap_or(i64::MAX / 2),
                    ));
                    due.insert(
                        id,
                        Due {
                            born,
                            next: now + wait,
                        },
                    );
                    // Counted before it is stored: whoever sees the store sees the count.
                    self.count(&entry, "retried");
                    if let Err(e) = self.inner.parts.store.outbox_update(id, &entry) {
                        tracing::error!("cannot record an outbox attempt: {e}");
                    }
                    return;
                }
                None => {
                    entry.delivery = Delivery::Failed;
                    entry.next_attempt_on = None;
                    let why = format!(
                        "{why}; gave up {} after it was created",
                        humantime::format_duration(self.inner.schedule.give_up())
                    );
                    entry.last_error = Some(why.clone());
                    ("failed", Some(why))
                }
            },
            Verdict::Fail(why) => {
                entry.delivery = Delivery::Failed;
                entry.next_attempt_on = None;
                entry.last_error = Some(why.clone());
                ("failed", Some(why))
            }
        };
        due.remove(&id);
        if let Some(why) = error {
            let (kind, to) = match &entry.what {
                What::Notification { sink, event, .. } => {
                    ("notification", format!("{} to sink {sink}", event.as_str()))
                }
                What::Status { provider, sha, .. } => (
                    "commit status",
                    format!("{} status of {sha}", provider.as_str()),
                ),
            };
            tracing::warn!(build = %entry.build, attempts = entry.attempts, "{kind} failed ({to}): {why}");
        }
        self.count(&entry, result);
        if let Err(e) = self.inner.parts.store.outbox_finish(id, &entry) {
            tracing::error!("cannot record an outbox delivery: {e}");
        }
    }

    fn count(&self, entry: &Entry, result: &'static str) {
        match &entry.what {
            What::Notification { sink, .. } => {
                self.inner.parts.metrics.count_notification(sink, result)
            }
            What::Status { project, .. } => self
                .inner
                .parts
                .metrics
                .count_commit_status(project, result),
        }
    }

    /// One attempt, with the config (and secrets) in force now.
    async fn attempt(&self, entry_id: u64, entry: &Entry) -> Verdict {
        let config = self.inner.parts.config.get();
        match &entry.what {
            What::Notification { sink, event, build } => {
                let Some(s) = config.sinks.get(sink) else {
                    return Verdict::Fail(format!("sink {sink} is no longer configured"));
                };
                let tail = if notifications::wants_log(*event) {
                    let dir = self.inner.parts.store.state_dir().to_path_buf();
                    let b = (**build).clone();
                    // Without a thread (the service at its task limit) the notice goes
                    // without its log tail rather than not at all.
                    crate::blocking::run("reading a build log", move || {
                        notifications::log_tail(&dir, &b)
                    })
                    .await
                    .unwrap_or_default()
                } else {
                    Vec::new()
                };
                let n = Notice {
                    event: *event,
                    at: entry.created_on,
                    build: Some(build),
                    log_tail: &tail,
                    public_url: &self.inner.parts.public_url,
                };
                // The entry's id: the same on every retry, so receivers can deduplicate.
                let id = format!("msg_{entry_id:016x}");
                judge(&self.post_notice(s, &n, &id).await)
            }
            What::Status {
                project,
                sha,
                state,
                description,
                link,
                ..
            } => {
                let Some(cfg) = config.project(project).and_then(|p| p.status.as_ref()) else {
                    return Verdict::Fail(format!(
                        "project {project} no longer has [projects.{project}.status]"
                    ));
                };
                let target = format!("{}/ui/builds/{link}", self.inner.parts.public_url);
                let req = match statuses::request(cfg, sha, *state, description, &target) {
                    Ok(r) => r,
                    Err(e) => return Verdict::Fail(e.to_string()),
                };
                let shown = crate::config::sinks::redact_url(&req.url);
                let res = self
                    .inner
                    .parts
                    .client
                    .post(&req.url, &shown, &req.headers, Bytes::from(req.body))
                    .await;
                judge(&res)
            }
        }
    }
}

/// The in-memory "in flight" key: the status lane, or the sink.
fn lane_key(e: &Entry) -> Vec<u8> {
    match &e.what {
        What::Notification { sink, .. } => format!("sink\0{sink}").into_bytes(),
        What::Status { .. } => e.status_lane().unwrap_or_default(),
    }
}

fn unix_now() -> i64 {
    Timestamp::now().0 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Target, Trigger, TriggerSource};
    use crate::store::Store;

    fn config(dir: &std::path::Path, extra: &str) -> Config {
        std::fs::write(dir.join("t.token"), "tok\n").unwrap();
        let text = format!(
            "[projects.site]\nbranches = [\"main\"]\nrepo = \"https://example.com/r.git\"\ncommand = \"true\"\n{extra}\n[projects.site.status]\nprovider = \"github\"\nrepo = \"acme/site\"\ntoken_file = \"t.token\"\n\n[notify.ops]\nurl = \"http://127.0.0.1:9/hook\"\nevents = [\"started\", \"succeeded\", \"failed\", \"cancelled\"]\n\n[notify.alerts]\nurl = \"http://127.0.0.1:9/alerts\"\n"
        );
        Config::parse(&text, &dir.join("deploy.toml")).unwrap()
    }

    /// SPEC §5: a stale status never overwrites a newer one. A newer state for the same
    /// (project, SHA, context) drops the older pending entry in the same transaction; another
    /// SHA's entry and notifications are never dropped.
    #[test]
    fn a_newer_status_of_a_sha_drops_its_pending_older_one() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let status = |sha: &str, state: crate::statuses::State| Entry {
            what: What::Status {
                project: "site".into(),
                provider: crate::config::sinks::Provider::Github,
                context: "deployhook".into(),
                sha: sha.into(),
                state,
                description: "x".into(),
                link: BuildId::new(),
            },
            build: BuildId::new(),
            created_on: Timestamp::now(),
            delivery: Delivery::Pending,
            attempts: 0,
            last_error: None,
            next_attempt_on: None,
        };
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        store
            .add_entries(&[status(&a, crate::statuses::State::Queued)])
            .unwrap();
        store
            .add_entries(&[status(&b, crate::statuses::State::Queued)])
            .unwrap();
        store
            .add_entries(&[status(&a, crate::statuses::State::Success)])
            .unwrap();
        let pending: Vec<(String, crate::statuses::State)> = store
            .outbox_page(None, 100)
            .unwrap()
            .into_iter()
            .filter_map(|(_, e)| match e.what {
                What::Status { sha, state, .. } => Some((sha, state)),
                What::Notification { .. } => None,
            })
            .collect();
        assert_eq!(
            pending,
            vec![
                (b.clone(), crate::statuses::State::Queued),
                (a.clone(), crate::statuses::State::Success)
            ]
        );
        assert_eq!(store.outbox_pending(), 2);
    }

    fn build(shas: &[&str]) -> Build {
        let mut b = Build::new_queued(
            1,
            &Target::branch("site", "main"),
            Trigger {
                source: TriggerSource::GitPush,
                hook: None,
            },
            shas.last().map(|s| s.to_string()),
            false,
            Timestamp(0),
        );
        b.requested_commits = shas.iter().map(|s| s.to_string()).collect();
        b
    }

    fn statuses(es: &[Entry]) -> Vec<(String, State, String)> {
        es.iter()
            .filter_map(|e| match &e.what {
                What::Status {
                    sha,
                    state,
                    description,
                    ..
                } => Some((sha.clone(), *state, description.clone())),
                _ => None,
            })
            .collect()
    }

    fn sinks(es: &[Entry]) -> Vec<(String, Event)> {
        es.iter()
            .filter_map(|e| match &e.what {
                What::Notification { sink, event, .. } => Some((sink.clone(), *event)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn queue_and_join_are_pending_for_each_sha() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), "");
        let b = build(&["a1", "b2"]);
        let e = plan(&b, &Tell::Queued, &cfg, None, Timestamp(0));
        assert_eq!(
            statuses(&e),
            [
                ("a1".into(), State::Queued, "queued".into()),
                ("b2".into(), State::Queued, "queued".into())
            ]
        );
        assert!(sinks(&e).is_empty(), "queued is not a notification event");
        let mut b = b;
        b.phase = Phase::Initializing;
        let e = plan(&b, &Tell::Joined("c3".into()), &cfg, None, Timestamp(0));
        assert_eq!(
            statuses(&e),
            [("c3".into(), State::Building, "building".into())]
        );
    }

    #[test]
    fn superseded_shas_stay_pending_and_take_the_newer_builds_final_state() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), "");
        let mut old = build(&["a1"]);
        old.commit = Some("a1".into());
        old.phase = Phase::Running;
        let newer = BuildId::new();
        let e = plan(&old, &Tell::SupersededBy(newer), &cfg, None, Timestamp(0));
        assert_eq!(
            statuses(&e),
            [(
                "a1".into(),
                State::Superseded,
                statuses::superseded_description(newer)
            )]
        );
        let What::Status { link, .. } = &e[0].what else {
            panic!()
        };
        assert_eq!(*link, newer);
        // The old build stopping as superseded says nothing, to sinks or statuses.
        old.phase = Phase::Stopped(Outcome::Cancelled);
        old.cancel_reason = Some(CancelReason::Superseded);
        assert!(plan(&old, &Tell::Stopped, &cfg, None, Timestamp(0)).is_empty());
        // The newer build's stop covers its own SHAs and the superseded ones.
        let mut b = build(&["b2"]);
        b.commit = Some("b2".into());
        b.superseded_commits = vec!["a1".into()];
        b.phase = Phase::Stopped(Outcome::Fail);
        b.exit_code = Some(1);
        b.initializing_on = Some(Timestamp(0));
        b.stopped_on = Some(Timestamp(65_000_000));
        let e = plan(&b, &Tell::Stopped, &cfg, None, Timestamp(0));
        let want = "failed with exit code 1 after 1m 5s".to_string();
        assert_eq!(
            statuses(&e),
            [
                ("b2".into(), State::Failure, want.clone()),
                ("a1".into(), State::Failure, want)
            ]
        );
    }

    #[test]
    fn events_go_to_sinks_that_hear_them_and_recovered_replaces_succeeded() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), "");
        let mut b = build(&[]);
        b.phase = Phase::Running;
        let e = plan(&b, &Tell::Running, &cfg, None, Timestamp(0));
        assert_eq!(sinks(&e), [("ops".into(), Event::Started)]);
        b.phase = Phase::Stopped(Outcome::Success);
        // No previous build, or a previous success: succeeded (alerts has the default
        // events, which do not include it).
        for prev in [None, Some(Outcome::Success)] {
            let e = plan(&b, &Tell::Stopped, &cfg, prev, Timestamp(0));
            assert_eq!(sinks(&e), [("ops".into(), Event::Succeeded)]);
        }
        // After a failure, timeout or interruption: recovered, to both.
        for prev in [Outcome::Fail, Outcome::TimedOut, Outcome::Interrupted] {
            let e = plan(&b, &Tell::Stopped, &cfg, Some(prev), Timestamp(0));
            assert_eq!(
                sinks(&e),
                [
                    ("alerts".into(), Event::Recovered),
                    ("ops".into(), Event::Recovered)
                ]
            );
        }
        // API cancels are reported, supersedes are not.
        b.phase = Phase::Stopped(Outcome::Cancelled);
        b.cancel_reason = Some(CancelReason::Api);
        assert_eq!(
            sinks(&plan(&b, &Tell::Stopped, &cfg, None, Timestamp(0))),
            [("ops".into(), Event::Cancelled)]
        );
    }

    #[test]
    fn a_projects_notify_list_limits_its_sinks() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = build(&[]);
        b.phase = Phase::Stopped(Outcome::Fail);
        let only = config(tmp.path(), "notify = [\"alerts\"]");
        assert_eq!(
            sinks(&plan(&b, &Tell::Stopped, &only, None, Timestamp(0))),
            [("alerts".into(), Event::Failed)]
        );
        let none = config(tmp.path(), "notify = []");
        assert!(sinks(&plan(&b, &Tell::Stopped, &none, None, Timestamp(0))).is_empty());
    }

    #[test]
    fn the_retry_schedule_is_the_specs() {
        let s = Schedule::default();
        let secs: Vec<u64> = (1..=8).map(|n| s.delay(n).as_secs()).collect();
        assert_eq!(secs, [5, 30, 120, 600, 1800, 3600, 3600, 3600]);
        // Tried at 0, 5 s, 35 s, 155 s, 755 s, 2555 s, then hourly while under 24 h.
        let mut age = Duration::ZERO;
        let mut attempts = 1;
        while let Some(d) = s.next(attempts, age) {
            age += d;
            attempts += 1;
        }
        assert_eq!(attempts, 29);
        assert!(age < Schedule::GIVE_UP);
        let fast = Schedule { scale: 100 };
        assert_eq!(fast.delay(1), Duration::from_millis(50));
    }

    #[test]
    fn answers_are_judged_as_the_spec_says() {
        let a = |status| {
            Ok(Answer {
                status,
                body: Bytes::new(),
            })
        };
        assert_eq!(judge(&a(200)), Verdict::Delivered);
        assert_eq!(judge(&a(204)), Verdict::Delivered);
        for s in [500, 502, 503, 408, 429] {
            assert!(matches!(judge(&a(s)), Verdict::Retry(_)), "{s}");
        }
        for s in [301, 302, 400, 401, 404, 410] {
            assert!(matches!(judge(&a(s)), Verdict::Fail(_)), "{s}");
        }
        let t: Result<Answer, SendError> = Err(SendError::Timeout("http://x".into(), 30));
        assert!(matches!(judge(&t), Verdict::Retry(_)));
    }

    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// 10 000 pending entries of ~10 KiB each (100 MiB in all) for a receiver that refuses
    /// every connection: the worker pages through them, holds a few bytes per entry, retries
    /// and keeps them all pending.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_entries_for_a_dead_receiver_stay_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        // A port nobody listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let text = format!(
            "[projects.site]\nbranches = [\"main\"]\nworkdir = \"/tmp\"\ncommand = \"true\"\n[notify.dead]\nurl = \"http://127.0.0.1:{port}/\"\nevents = [\"failed\"]\n"
        );
        let cfg = Config::parse(&text, &tmp.path().join("deploy.toml")).unwrap();
        let store = Store::open(&tmp.path().join("state")).unwrap();
        let mut b = build(&[]);
        b.phase = Phase::Stopped(Outcome::Fail);
        b.requested_commits = (0..250).map(|i| format!("{i:040x}")).collect();
        let entry = plan(&b, &Tell::Stopped, &cfg, None, Timestamp::now())
            .pop()
            .unwrap();
        for _ in 0..100 {
            store.add_entries(&vec![entry.clone(); 100]).unwrap();
        }
        assert_eq!(store.outbox_pending(), 10_000);
        // sled's page cache (`CACHE_CAPACITY_BYTES`) fills on any pass over the tree: read it once first, so
        // that what is measured is the worker's own memory.
        let mut after_id = None;
        while let Some((id, _)) = store.outbox_page(after_id, PAGE).unwrap().last() {
            after_id = Some(*id);
        }
        let before = rss_kib();
        let metrics = Arc::new(Metrics::new());
        let ob = Outbox::start(Parts {
            store: store.clone(),
            config: Arc::new(SharedConfig::new(cfg)),
            metrics: metrics.clone(),
            client: Outbound::new().unwrap(),
            wake: Arc::new(Notify::new()),
            public_url: "http://127.0.0.1:1".into(),
        });
        // Measured once the worker has paged through every entry and tried the first.
        let retried = "deployhook_notifications_total{sink=\"dead\",result=\"retried\"} 1";
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let tried_once = |text: &str| text.lines().any(|l| l == retried);
        while !tried_once(&metrics.render_outbox(["dead"], [], store.outbox_pending())) {
            assert!(std::time::Instant::now() < deadline, "no attempt in 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = rss_kib();
        ob.shutdown(Duration::from_secs(2)).await;
        let text = metrics.render_outbox(["dead"], [], store.outbox_pending());
        assert!(text.contains("deployhook_outbox_pending 10000"), "{text}");
        // Only the sink's oldest entry is tried (the rest wait behind it), and retried.
        assert!(tried_once(&text), "{text}");
        let first = store.outbox_page(None, 1).unwrap();
        assert_eq!(first[0].1.attempts, 1);
        assert!(
            first[0]
                .1
                .last_error
                .as_deref()
                .unwrap()
                .contains("127.0.0.1")
        );
        eprintln!("RSS while delivering 10 000 pending entries: {before} KiB -> {after} KiB");
        assert!(
            after < before + 48 * 1024,
            "RSS grew from {before} KiB to {after} KiB"
        );
    }
}
