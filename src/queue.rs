//! The build queue: the effectful shell around the build state machine
//! ([`crate::machine::Machine`]).
//!
//! Every event (trigger, schedule, cancel, resolve, running, finish, shutdown, recovery) goes
//! to the machine under one mutex, and the effects it returns are applied here, still under
//! that mutex, in order: records written to the store, runners started or asked to stop,
//! waiters woken, log lines written, metrics counted. Holding the lock across "look up, then
//! insert" is what makes "exactly one build under any number of concurrent identical
//! triggers" true. The lock is held only for in-memory work and sled inserts (microseconds);
//! waiting for durability, spawning processes and killing them all happen outside it.
//!
//! # Durability
//! A trigger that creates a build (and a cancel) answers only after [`Store::durable`], and so
//! does a trigger that joins a build whose creator is still waiting for that flush, or whose
//! join changed the record (a pushed SHA appended to `requested_commits`). The build may
//! already be starting meanwhile, which costs nothing if the flush then fails: the database
//! error is fatal and the daemon exits.
//!
//! # Quiet periods
//! Builds waiting out a quiet period (SPEC §2.2) are started by one timer task: after every
//! event the shell publishes the machine's [`Machine::next_wake`] on a watch channel, and the
//! task sleeps until that time (or until it changes), then runs the scheduler. Nothing polls.
//!
//! # Logging
//! Joins are free by design (no rate limit), and so is their logging: the first join of a
//! build is logged, the rest are counted, and one line says how many triggers a build
//! absorbed when it leaves `pending` (a leaked hook URL hammered at full speed adds two lines,
//! not one per request).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::blocking;
use crate::buildlog::{self, LogStats};
use crate::config::{ProjectConfig, SharedConfig};
use crate::machine::{
    CancelStep, Effect, LogCounts, LogLine, LogWhat, Machine, Plan, Refusal, RunEnd, Tell,
    TriggerInput,
};
use crate::metrics::Metrics;
use crate::model::{Build, BuildId, Outcome, Phase, Target, Timestamp, Trigger};
use crate::ratelimit::{self, Limited, Limits, RateLimiter};
use crate::runner::{self, RunSettings};
use crate::store::{Store, StoreError};

pub use crate::machine::{Resolution, StopReason};

/// A request for a build of a target.
#[derive(Debug, Clone)]
pub struct TriggerRequest {
    /// What to build.
    pub target: Target,
    /// Who asks.
    pub trigger: Trigger,
    /// SHA announced by a Git push.
    pub requested_commit: Option<String>,
    /// An exact commit to build (API `commit`, redeploy): never joins, never joined.
    pub commit: Option<String>,
    /// The build a redeploy repeats.
    pub redeploy_of: Option<BuildId>,
    /// Request body for `DEPLOYHOOK_PAYLOAD` (`None` for API triggers).
    pub payload: Option<bytes::Bytes>,
}

impl TriggerRequest {
    /// A trigger of a branch, with no params, commit or payload (API, schedule, tests).
    pub fn branch(project: &str, branch: &str, trigger: Trigger) -> Self {
        TriggerRequest {
            target: Target::branch(project, branch),
            trigger,
            requested_commit: None,
            commit: None,
            redeploy_of: None,
            payload: None,
        }
    }
}

/// What a trigger did.
#[derive(Debug, Clone)]
pub struct Triggered {
    /// The build created or joined, as it was then (shared with the queue: no copy per join).
    pub build: std::sync::Arc<Build>,
    /// Whether it joined an existing pending build.
    pub already_exists: bool,
}

/// Why a trigger was refused.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// No such project in the config.
    #[error("project {0:?} is not configured")]
    UnknownProject(String),
    /// The ref is not one the project builds.
    #[error("{branch} is not one of project {project}'s refs ({allowed})")]
    BranchNotAllowed {
        /// Project.
        project: String,
        /// The ref asked for, as `branch NAME` or `tag NAME`.
        branch: String,
        /// The allowed branches and tags (patterns), comma-separated.
        allowed: String,
    },
    /// Over a rate limit.
    #[error("rate limited: {0}")]
    RateLimited(Limited),
    /// The daemon is shutting down.
    #[error("deployhook is shutting down")]
    ShuttingDown,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a cancel was refused.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No such build.
    #[error("no build with that id")]
    NotFound,
    /// The build had already stopped.
    #[error("build {} has already stopped ({})", .0.id, .0.phase.outcome().map_or("?", Outcome::as_str))]
    AlreadyStopped(Box<Build>),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What readers of a live build's log need.
#[derive(Clone)]
pub struct LiveLog {
    /// Complete lines written so far; changes as lines arrive.
    pub lines: watch::Receiver<u64>,
    /// Shared counters (for `truncated`).
    pub stats: Arc<LogStats>,
}

/// The channels of a live build: what the machine cannot hold because it is pure.
struct Handles {
    /// Asks the runner to stop (the machine decides when; first reason wins).
    stop_tx: watch::Sender<Option<StopReason>>,
    /// Flips to true when the build stops.
    done_tx: watch::Sender<bool>,
    /// The log, once the runner has opened it.
    log: Option<LiveLog>,
}

impl Handles {
    fn new() -> Self {
        Handles {
            stop_tx: watch::channel(None).0,
            done_tx: watch::channel(false).0,
            log: None,
        }
    }
}

/// Everything behind the queue's one mutex.
struct Locked {
    machine: Machine,
    handles: HashMap<BuildId, Handles>,
}

/// What a started build's runner is handed.
pub struct Start {
    /// The build as it left the queue.
    pub build: Build,
    /// Its project's config at start time (`None` if the project was removed meanwhile).
    pub project: Option<Arc<ProjectConfig>>,
    /// Stop requests.
    pub stop: watch::Receiver<Option<StopReason>>,
    /// `kill_grace` in force at start: a reload applies to builds started after it, never
    /// to one in flight.
    pub kill_grace: Duration,
    /// `max_log_bytes` in force at start (likewise).
    pub max_log_bytes: u64,
}

/// Handle to the queue; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    config: Arc<SharedConfig>,
    settings: RunSettings,
    /// Counts builds as they stop.
    metrics: Arc<Metrics>,
    state: Mutex<Locked>,
    /// Notified whenever a build stops (shutdown waits on it).
    stopped: Notify,
    /// Woken after outbox entries are written (the outbox worker waits on it).
    outbox_wake: Arc<Notify>,
    /// The earliest `not_before` of a queued build, for the quiet-period timer task.
    wake: watch::Sender<Option<Timestamp>>,
    /// Turns true at shutdown: held waits answer at once (SPEC §4.3).
    closing: watch::Sender<bool>,
}

/// The quiet-period timer (see the module doc): runs the scheduler when the earliest
/// `not_before` passes. Ends when the queue is gone.
async fn quiet_timer(inner: std::sync::Weak<Inner>, mut wake: watch::Receiver<Option<Timestamp>>) {
    loop {
        let next = *wake.borrow_and_update();
        match next {
            None => {
                if wake.changed().await.is_err() {
                    return;
                }
            }
            Some(t) => {
                let now = Timestamp::now();
                let wait =
                    Duration::from_micros(u64::try_from(t.0.saturating_sub(now.0)).unwrap_or(0));
                tokio::select! {
                    changed = wake.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    _ = tokio::time::sleep(wait) => {
                        let Some(inner) = inner.upgrade() else { return };
                        let q = Queue { inner };
                        q.schedule();
                        // Still the same wake time (the wall clock is behind the timer's):
                        // wait a moment instead of spinning.
                        if *wake.borrow() == Some(t) && Timestamp::now() < t {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
        }
    }
}

/// What a wait for a build's outcome found (SPEC §4.3).
#[derive(Debug, Clone)]
pub struct Waited {
    /// The build waited for, or the newest one it was superseded by; stopped unless the time
    /// ran out or the daemon is shutting down.
    pub build: Build,
    /// The build first waited for, when supersedes were followed.
    pub followed_from: Option<BuildId>,
}

/// Writes one of the machine's log lines. Branch builds carry `branch`, tag builds `tag`.
fn write_log(line: &LogLine) {
    let LogLine {
        build,
        project,
        git_ref,
        what,
    } = line;
    let (branch, tag) = (git_ref.branch(), git_ref.tag());
    match what {
        LogWhat::Queued(source) => tracing::info!(
            build = %build, project = %project, branch, tag, source = %source.as_str(),
            "build queued"
        ),
        LogWhat::FirstJoin => tracing::info!(
            build = %build, project = %project, branch, tag,
            "a trigger joined this pending build; further joins are counted until it leaves the queue"
        ),
        LogWhat::Absorbed(n) => tracing::info!(
            build = %build, project = %project, branch, tag, absorbed = n,
            "build absorbed {n} trigger(s) while pending"
        ),
        LogWhat::Initializing => {
            tracing::info!(build = %build, project = %project, branch, tag, "build initializing")
        }
        LogWhat::Running => {
            tracing::info!(build = %build, project = %project, branch, tag, "build running")
        }
        LogWhat::StopRequested(reason) => {
            let why = match reason {
                StopReason::Cancel(c) => c.as_str(),
                StopReason::Timeout => "timeout",
                StopReason::Shutdown => "shutdown",
            };
            tracing::info!(build = %build, project = %project, branch, tag, reason = why, "stopping build")
        }
        LogWhat::Stopped(outcome, exit_code) => tracing::info!(
            build = %build, project = %project, branch, tag, outcome = %outcome.as_str(), exit_code,
            "build stopped"
        ),
    }
}

impl Queue {
    /// Recovers state from the store (see [`Machine::recover`]) and starts whatever can start.
    pub fn start(
        store: Store,
        config: Arc<SharedConfig>,
        settings: RunSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Queue, StoreError> {
        let mut machine = Machine::new(RateLimiter::default());
        let mut builds = store.all_builds()?;
        // A crash left these in progress: say so in their logs before the machine stops them.
        for b in builds
            .iter_mut()
            .filter(|b| matches!(b.phase, Phase::Initializing | Phase::Running))
        {
            let path = buildlog::log_path(store.state_dir(), b.id);
            let note = "interrupted: deployhook stopped while this build was in progress";
            if let Ok(summary) = buildlog::append_system_line(&path, note) {
                b.log_lines = summary.lines;
                b.log_bytes = summary.bytes;
            }
        }
        let effects = machine.recover(builds, Timestamp::now());
        let events = store.rate_events()?;
        let mono_now = machine.limiter.now();
        machine.limiter.restore(
            events.iter().map(|(p, at)| (p.as_str(), *at)),
            &ratelimit::Clocks::now(),
            mono_now,
        );
        let q = Queue {
            inner: Arc::new(Inner {
                store,
                config,
                settings,
                metrics,
                state: Mutex::new(Locked {
                    machine,
                    handles: HashMap::new(),
                }),
                stopped: Notify::new(),
                outbox_wake: Arc::new(Notify::new()),
                wake: watch::channel(None).0,
                closing: watch::channel(false).0,
            }),
        };
        tokio::spawn(quiet_timer(
            Arc::downgrade(&q.inner),
            q.inner.wake.subscribe(),
        ));
        {
            let mut st = q.lock();
            // Queued builds recovered into the machine need their channels.
            for id in st.machine.live_ids() {
                st.handles.insert(id, Handles::new());
            }
            q.apply(&mut st, effects)?;
        }
        q.inner.store.flush_blocking()?;
        runner::clean_leftovers(q.inner.store.state_dir());
        q.inner.settings.pool.refill();
        q.schedule();
        Ok(q)
    }

    fn lock(&self) -> MutexGuard<'_, Locked> {
        // A panic while holding the lock would be a bug; the state itself stays consistent
        // enough to keep serving (every mutation is a few assignments).
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies the machine's effects in order. Store writes that fail are logged and the
    /// first error is returned (sled's errors are sticky: the daemon is going down anyway);
    /// the rest are still applied, so waiters are woken and runners stopped.
    ///
    /// The [`Effect::Tell`]s right after a [`Effect::Put`] become outbox entries written in
    /// the same transaction as that record (SPEC §5); those of a new build
    /// ([`Tell::Queued`]) were written with its insert by [`Queue::trigger`].
    fn apply(&self, st: &mut Locked, effects: Vec<Effect>) -> Result<(), StoreError> {
        let r = self.apply_effects(st, effects);
        let next = st.machine.next_wake();
        self.inner.wake.send_if_modified(|w| {
            let changed = *w != next;
            *w = next;
            changed
        });
        r
    }

    fn apply_effects(&self, st: &mut Locked, effects: Vec<Effect>) -> Result<(), StoreError> {
        let mut first_err = None;
        let mut effects = effects.into_iter().peekable();
        while let Some(e) = effects.next() {
            match e {
                Effect::Put(b) => {
                    let mut entries = Vec::new();
                    while let Some(Effect::Tell(told, tell)) =
                        effects.next_if(|e| matches!(e, Effect::Tell(..)))
                    {
                        entries.extend(self.plan_outbox(&told, &tell));
                    }
                    if let Err(err) = self.inner.store.put_build_with(&b, &entries) {
                        tracing::error!(build = %b.id, "cannot record a build change: {err}");
                        first_err.get_or_insert(err);
                    } else if !entries.is_empty() {
                        self.inner.outbox_wake.notify_one();
                    }
                }
                Effect::Stop(id, reason) => {
                    if let Some(h) = st.handles.get(&id) {
                        h.stop_tx.send_replace(Some(reason));
                    }
                }
                Effect::Start(build) => {
                    let config = self.inner.config.get();
                    let stop = st
                        .handles
                        .entry(build.id)
                        .or_insert_with(Handles::new)
                        .stop_tx
                        .subscribe();
                    let start = Start {
                        project: config.project(&build.project).cloned(),
                        build,
                        stop,
                        kill_grace: config.server.kill_grace,
                        max_log_bytes: config.server.max_log_bytes,
                    };
                    tokio::spawn(runner::run(
                        self.clone(),
                        self.inner.settings.clone(),
                        start,
                    ));
                }
                Effect::Stopped(b) => {
                    if let Some(h) = st.handles.remove(&b.id) {
                        h.done_tx.send_replace(true);
                    }
                    self.inner.stopped.notify_waiters();
                    self.prune_later(b.project);
                }
                Effect::CountStopped {
                    project,
                    outcome,
                    ran_for,
                } => self.inner.metrics.build_stopped(&project, outcome, ran_for),
                Effect::Log(line) => write_log(&line),
                // Written with the insert of the build (see above).
                Effect::Tell(_, Tell::Queued) => {}
                // A tell with no record change of its own (none today): its entries alone.
                Effect::Tell(told, tell) => {
                    let entries = self.plan_outbox(&told, &tell);
                    if let Err(err) = self.inner.store.add_entries(&entries) {
                        tracing::error!(build = %told.id, "cannot record outbox entries: {err}");
                        first_err.get_or_insert(err);
                    } else if !entries.is_empty() {
                        self.inner.outbox_wake.notify_one();
                    }
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The outbox entries a change causes (see [`crate::outbox::plan`]).
    fn plan_outbox(&self, b: &Build, tell: &Tell) -> Vec<crate::outbox::Entry> {
        let config = self.inner.config.get();
        if config.sinks.is_empty()
            && config
                .project(&b.project)
                .is_none_or(|p| p.status.is_none())
        {
            return Vec::new();
        }
        let prev = if crate::outbox::needs_previous(b, tell, &config) {
            self.previous_outcome(b)
        } else {
            None
        };
        crate::outbox::plan(b, tell, &config, prev, Timestamp::now())
    }

    /// The outcome of the newest earlier build of `b`'s target that ended in success, fail,
    /// timed_out or interrupted (cancelled builds are skipped), for `recovered` (SPEC §5.1).
    /// Reads at most `keep_builds` records, and only for a success some sink may hear.
    fn previous_outcome(&self, b: &Build) -> Option<Outcome> {
        let target = b.target();
        let ids = self.inner.store.project_build_ids(&b.project).ok()?;
        for id in ids {
            let Ok(Some(other)) = self.inner.store.build(id) else {
                continue;
            };
            if other.seq >= b.seq || !other.is_of(&target) {
                continue;
            }
            match other.phase {
                Phase::Stopped(Outcome::Cancelled) => continue,
                Phase::Stopped(o) => return Some(o),
                _ => continue,
            }
        }
        None
    }

    /// What the outbox worker waits on: woken after entries are written.
    pub fn outbox_wake(&self) -> Arc<Notify> {
        self.inner.outbox_wake.clone()
    }

    /// Runs the scheduler and applies its effects (under the lock already held).
    fn schedule_locked(&self, st: &mut Locked) {
        let max = self.inner.config.get().server.max_concurrent_builds;
        let fx = st.machine.schedule(max, Timestamp::now());
        // Errors were logged; a start is never refused because its record failed to write.
        let _ = self.apply(st, fx);
    }

    /// The store behind the queue.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// A trigger from any source (SPEC §2 "Trigger semantics").
    pub async fn trigger(&self, req: TriggerRequest) -> Result<Triggered, TriggerError> {
        let config = self.inner.config.get();
        // Borrowed, not cloned: a project's config (its branch list, its env) would otherwise
        // be copied on every trigger, the hot path included.
        let project = config
            .project(&req.target.project)
            .ok_or_else(|| TriggerError::UnknownProject(req.target.project.clone()))?;
        if !project.allows(&req.target.git_ref) {
            return Err(TriggerError::BranchNotAllowed {
                project: req.target.project.clone(),
                allowed: project
                    .branches
                    .iter()
                    .map(|b| format!("branch {}", b.as_str()))
                    .chain(project.tags.iter().map(|t| format!("tag {}", t.as_str())))
                    .collect::<Vec<_>>()
                    .join(", "),
                branch: req.target.git_ref.to_string(),
            });
        }
        let limits = Limits {
            daemon: config.server.builds_per_minute,
            project: project.project_builds_per_minute,
        };
        let input = TriggerInput {
            target: &req.target,
            trigger: &req.trigger,
            requested_commit: req.requested_commit.as_deref(),
            exact_commit: req.commit.as_deref(),
            redeploy_of: req.redeploy_of,
            has_payload: req.payload.is_some(),
            quiet: project.access.quiet,
        };
        let plan = {
            let mut st = self.lock();
            let mono = st.machine.limiter.now();
            let (plan, fx) = st
                .machine
                .trigger(&input, limits, mono, Timestamp::now())
                .map_err(|r| match r {
                    Refusal::ShuttingDown => TriggerError::ShuttingDown,
                    Refusal::RateLimited(l) => TriggerError::RateLimited(l),
                })?;
            self.apply(&mut st, fx)?;
            if let Plan::Create(build) = &plan {
                let entries = self.plan_outbox(build, &Tell::Queued);
                self.inner
                    .store
                    .insert_build_with(build, req.payload.as_deref(), &entries)?;
                if !entries.is_empty() {
                    self.inner.outbox_wake.notify_one();
                }
                st.handles.insert(build.id, Handles::new());
                let fx = st
                    .machine
                    .created(Build::clone(build), project.cancel_superseded, mono);
                self.apply(&mut st, fx)?;
                self.schedule_locked(&mut st);
            }
            plan
        };
        let build = match plan {
            Plan::Joined { build, needs_flush } => {
                if needs_flush {
                    // Rare: the first moments of a build's life, or a push that added its
                    // SHA. The usual join stays free of I/O.
                    self.inner.store.durable().await?;
                }
                return Ok(Triggered {
                    build,
                    already_exists: true,
                });
            }
            Plan::Create(build) => *build,
        };
        // Events older than the window are dead weight; this is usually a no-op range scan.
        self.inner
            .store
            .prune_rate_events(&ratelimit::Clocks::now(), ratelimit::WINDOW)?;
        self.inner.store.durable().await?;
        self.lock().machine.flushed(build.id);
        Ok(Triggered {
            build: std::sync::Arc::new(build),
            already_exists: false,
        })
    }

    /// Starts queued builds while slots are free.
    pub fn schedule(&self) {
        let mut st = self.lock();
        self.schedule_locked(&mut st);
    }

    /// Cancels a build (SPEC §4.2): a queued one stops at once; a running one is asked to stop
    /// and this waits (bounded by the kill grace plus a margin) for it to be gone.
    pub async fn cancel(&self, id: BuildId) -> Result<Build, CancelError> {
        let (step, done_rx) = {
            let mut st = self.lock();
            let (step, fx) = st.machine.cancel(id, Timestamp::now());
            let done_rx = st.handles.get(&id).map(|h| h.done_tx.subscribe());
            self.apply(&mut st, fx)?;
            if matches!(step, CancelStep::StoppedNow(_)) {
                self.schedule_locked(&mut st);
            }
            (step, done_rx)
        };
        match step {
            CancelStep::NotLive => match self.inner.store.build(id)? {
                Some(b) => Err(CancelError::AlreadyStopped(Box::new(b))),
                None => Err(CancelError::NotFound),
            },
            CancelStep::StoppedNow(b) => {
                self.inner.store.durable().await?;
                Ok(*b)
            }
            CancelStep::Stopping => {
                if let Some(mut done_rx) = done_rx {
                    let limit = self.inner.config.get().server.kill_grace
                        + runner::DRAIN_DEADLINE
                        + Duration::from_secs(2);
                    let _ = tokio::time::timeout(limit, done_rx.wait_for(|d| *d)).await;
                }
                self.inner.store.durable().await?;
                let b = self.inner.store.build(id)?.ok_or(CancelError::NotFound)?;
                match b.phase {
                    // It ended on its own (or by a timeout) before the cancel could act.
                    Phase::Stopped(o) if o != Outcome::Cancelled => {
                        Err(CancelError::AlreadyStopped(Box::new(b)))
                    }
                    _ => Ok(b),
                }
            }
        }
    }

    /// `(queued, initializing or running)` counts.
    pub fn counts(&self) -> (usize, usize) {
        self.lock().machine.counts()
    }

    /// Queued count and active build of a project.
    pub fn project_status(&self, project: &str) -> (usize, Option<BuildId>) {
        self.lock().machine.project_status(project)
    }

    /// The live log of a build that has not stopped, if its runner has opened one.
    pub fn live_log(&self, id: BuildId) -> Option<LiveLog> {
        self.lock().handles.get(&id).and_then(|h| h.log.clone())
    }

    /// Whether a build is still live (not stopped).
    pub fn is_live(&self, id: BuildId) -> bool {
        self.lock().machine.is_live(id)
    }

    /// A receiver that turns true when the build stops (`None` if it is not live).
    pub fn done_watch(&self, id: BuildId) -> Option<watch::Receiver<bool>> {
        self.lock().handles.get(&id).map(|h| h.done_tx.subscribe())
    }

    /// Waits until build `id` stops or `timeout` passes (SPEC §4.3), following supersedes to
    /// the newest build, whose code includes the waited-for trigger. `None`: no such build.
    /// Costs no polling and holds no lock while it waits: it watches the build's `done`
    /// channel, and dropping the future (a client that hung up) frees everything.
    pub async fn wait(&self, id: BuildId, timeout: Duration) -> Result<Option<Waited>, StoreError> {
        let _held = self.inner.metrics.hold_wait();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut closing = self.inner.closing.subscribe();
        let mut current = id;
        let mut followed_from = None;
        loop {
            let done = self.done_watch(current);
            if let Some(mut done) = done {
                let stopped = tokio::select! {
                    // An Err means the sender is gone: the build stopped.
                    _ = done.wait_for(|d| *d) => true,
                    _ = tokio::time::sleep_until(deadline) => false,
                    _ = closing.wait_for(|c| *c) => false,
                };
                if !stopped {
                    let now = self.lock().machine.build(current).cloned();
                    let build = match now {
                        Some(b) => b,
                        None => match self.inner.store.build(current)? {
                            Some(b) => b,
                            None => return Ok(None),
                        },
                    };
                    return Ok(Some(Waited {
                        build,
                        followed_from,
                    }));
                }
                continue;
            }
            // Not live: the stored record is final (it is written before `done` flips).
            let Some(build) = self.inner.store.build(current)? else {
                return Ok(None);
            };
            match (build.cancel_reason, build.superseded_by) {
                (Some(crate::model::CancelReason::Superseded), Some(next)) if next != current => {
                    followed_from.get_or_insert(id);
                    current = next;
                }
                _ => {
                    return Ok(Some(Waited {
                        build,
                        followed_from,
                    }));
                }
            }
        }
    }

    /// Waits until no build is active, or `deadline`; true if none is.
    async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.inner.stopped.notified();
            if self.lock().machine.idle() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Stops accepting triggers, lets active builds run for up to `grace`, then interrupts
    /// them and waits until they are gone. Queued builds stay queued in the store and resume
    /// at the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.lock().machine.stop_accepting();
        self.inner.closing.send_replace(true);
        if self.wait_idle(tokio::time::Instant::now() + grace).await {
            return;
        }
        {
            let mut st = self.lock();
            let fx = st.machine.interrupt_active();
            let _ = self.apply(&mut st, fx);
        }
        let limit = tokio::time::Instant::now()
            + self.inner.config.get().server.kill_grace
            + runner::DRAIN_DEADLINE
            + Duration::from_secs(5);
        if !self.wait_idle(limit).await {
            tracing::error!(
                "builds did not stop in time; exiting anyway (their supervisors kill them)"
            );
        }
    }

    // ---- runner-facing ------------------------------------------------------------------

    /// A fetch is starting: triggers joining from now on are covered by it.
    pub(crate) fn begin_fetch(&self, id: BuildId) {
        self.lock().machine.begin_fetch(id);
    }

    /// The build's source is resolved (see [`Machine::resolve`]); false: fetch again.
    pub(crate) fn resolve(&self, id: BuildId, source: Resolution) -> bool {
        let mut st = self.lock();
        let (ok, fx) = st.machine.resolve(id, source);
        let _ = self.apply(&mut st, fx);
        ok
    }

    /// The runner opened the build's log.
    pub(crate) fn set_log(&self, id: BuildId, log: LiveLog) {
        if let Some(h) = self.lock().handles.get_mut(&id) {
            h.log = Some(log);
        }
    }

    /// The command is running.
    pub(crate) fn mark_running(&self, id: BuildId) {
        let mut st = self.lock();
        let fx = st.machine.running(id, Timestamp::now());
        let _ = self.apply(&mut st, fx);
    }

    /// The build is over and every process of it is gone; `end` is what really happened.
    pub(crate) fn finish(&self, id: BuildId, end: RunEnd, log: buildlog::LogSummary) {
        let mut st = self.lock();
        let counts = LogCounts {
            lines: log.lines,
            bytes: log.bytes,
            truncated: log.truncated,
        };
        let fx = st.machine.finish(id, end, counts, Timestamp::now());
        let _ = self.apply(&mut st, fx);
        self.schedule_locked(&mut st);
    }

    /// Prunes a project's builds beyond `keep_builds`, with their logs, in the background.
    fn prune_later(&self, project: String) {
        let q = self.clone();
        let p = project.clone();
        let started = blocking::spawn("pruning old builds", move || {
            if let Err(e) = q.prune(&p) {
                tracing::error!(project = %p, "cannot prune old builds: {e}");
            }
        });
        // At the task limit: the next stopped build of the project prunes these too.
        if let Err(e) = started {
            tracing::warn!(project = %project, "old builds not pruned now: {e}");
        }
    }

    fn prune(&self, project: &str) -> Result<usize, StoreError> {
        let keep = self.inner.config.get().server.keep_builds;
        let ids = self.inner.store.project_build_ids(project)?;
        let doomed = self.lock().machine.prune_plan(&ids, keep);
        let mut n = 0;
        for id in doomed {
            if self.inner.store.delete_build(id)? {
                let _ = std::fs::remove_file(buildlog::log_path(self.inner.store.state_dir(), id));
                n += 1;
            }
        }
        Ok(n)
    }
}
