//! The build queue: the one owner of build state transitions.
//!
//! Every transition of every build that is not yet stopped happens under one mutex around a
//! small state machine (`State`), so dedupe, supersede, cancel and scheduling cannot race:
//! "exactly one build under any number of concurrent identical triggers" is a property of
//! holding that lock across look-up-then-insert. The lock is held only for in-memory work and
//! sled inserts (microseconds); waiting for durability, spawning processes and killing them all
//! happen outside it.
//!
//! # States
//! ```text
//!            trigger                 schedule              source resolved    command spawned
//!   (none) ─────────▶ queued ─────────────────▶ initializing ─ ─ ─ ─ ─ ─ ─ ─ ─▶ running
//!                       │                           │  (pending until here)          │
//!                       │ cancel                    │ cancel / supersede* / timeout /  │ exit / cancel / supersede /
//!                       ▼                           ▼ shutdown / git failure           ▼ timeout / shutdown
//!                    stopped ◀──────────────────────┴──────────────────────────────────┘
//! ```
//! (*) supersede only reaches builds whose source is resolved.
//!
//! A *pending* build (SPEC §1) is one in `queued`, or in `initializing` before its commit is
//! resolved. At most one pending build exists per (project, branch); a trigger that finds one
//! joins it (`already_exists: true`). A trigger that joins an initializing build while its
//! fetch is under way makes the runner fetch again before it resolves, so the build always
//! includes every commit pushed before any trigger it absorbed.
//!
//! # Who moves a build
//! * Triggers (HTTP handlers) create builds, join pending ones, and mark superseded ones.
//! * [`Queue::cancel`] stops queued builds itself and asks runners to stop the others.
//! * The scheduler (run after every trigger and every stop) moves `queued` → `initializing`:
//!   oldest first, one per project, at most `max_concurrent_builds` in all.
//! * A build's runner (`crate::runner`) moves it through resolution, `running` and `stopped`;
//!   it alone stops a build that has left the queue, after its processes are gone.
//! * Startup recovery marks builds left `initializing`/`running` by a crash `interrupted`, and
//!   puts `queued` ones back in the queue.
//!
//! # Durability
//! A trigger that creates a build (and a cancel) answers only after [`Store::durable`], and so
//! does a trigger that joins a build whose creator is still waiting for that flush; the
//! build may already be starting meanwhile, which costs nothing if the flush then fails: the
//! database error is fatal and the daemon exits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::blocking;
use crate::buildlog::{self, LogStats};
use crate::config::{ProjectConfig, SharedConfig};
use crate::metrics::{self, Metrics};
use crate::model::{Build, BuildId, CancelReason, Outcome, Phase, Timestamp, Trigger};
use crate::ratelimit::{self, Limited, Limits, RateLimiter};
use crate::runner::{self, RunSettings};
use crate::store::{Store, StoreError};

/// Why a runner is asked to stop its build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// API cancel or supersede.
    Cancel(CancelReason),
    /// Ran past the project's timeout.
    Timeout,
    /// The daemon is shutting down.
    Shutdown,
}

impl StopReason {
    /// The outcome a build stopped for this reason gets.
    pub fn outcome(self) -> Outcome {
        match self {
            StopReason::Cancel(_) => Outcome::Cancelled,
            StopReason::Timeout => Outcome::TimedOut,
            StopReason::Shutdown => Outcome::Interrupted,
        }
    }
}

/// A request for a build of (project, branch).
#[derive(Debug, Clone)]
pub struct TriggerRequest {
    /// Project name.
    pub project: String,
    /// Branch (must be one of the project's).
    pub branch: String,
    /// Who asks.
    pub trigger: Trigger,
    /// SHA announced by a Git push.
    pub requested_commit: Option<String>,
    /// Request body for `DEPLOYHOOK_PAYLOAD` (`None` for API triggers).
    pub payload: Option<bytes::Bytes>,
}

/// What a trigger did.
#[derive(Debug, Clone)]
pub struct Triggered {
    /// The build created or joined.
    pub build: Build,
    /// Whether it joined an existing pending build.
    pub already_exists: bool,
}

/// Why a trigger was refused.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// No such project in the config.
    #[error("project {0:?} is not configured")]
    UnknownProject(String),
    /// The branch is not one of the project's `branches`.
    #[error("branch {branch:?} is not one of project {project}'s branches ({allowed})")]
    BranchNotAllowed {
        /// Project.
        project: String,
        /// Branch asked for.
        branch: String,
        /// The allowed ones, comma-separated.
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

/// What a trigger found under the queue lock, when it cannot answer at once.
enum Found {
    /// It created this build (answered after its flush).
    New(Build),
    /// It joined a build that is not known to be flushed yet.
    JoinedBeforeFlush(Triggered),
}

/// A build that is not stopped.
struct Live {
    /// The authoritative copy of its record (written through to the store on every change).
    build: Build,
    /// Past source resolution: no longer pending, eligible for supersede.
    resolved: bool,
    /// A trigger joined while a fetch was under way: fetch again before resolving.
    joined_during_fetch: bool,
    /// Asks the runner to stop (first reason wins).
    stop_tx: watch::Sender<Option<StopReason>>,
    /// Flips to true when the build stops.
    done_tx: watch::Sender<bool>,
    /// The log, once the runner has opened it.
    log: Option<LiveLog>,
    /// Its record is known to be flushed. Until then a trigger that joins it waits for a
    /// flush too, so `already_exists: true` never names a build a `kill -9` could still lose.
    on_disk: bool,
}

/// The in-memory state machine. Pure: no I/O, so its rules are unit-tested directly.
#[derive(Default)]
struct State {
    next_seq: u64,
    accepting: bool,
    live: HashMap<BuildId, Live>,
    /// Queued builds by creation sequence: the scheduler takes the oldest eligible one.
    queued: BTreeMap<u64, BuildId>,
    /// The same builds by project (creation sequences), so that finding the oldest queued
    /// build of an idle project looks at one entry per project instead of walking every
    /// queued build, thousands of which may belong to busy projects.
    queued_by_project: HashMap<String, BTreeSet<u64>>,
    /// The pending build of each (project, branch).
    pending: HashMap<(String, String), BuildId>,
    /// The build initializing or running in each project.
    active: HashMap<String, BuildId>,
    /// Rolling windows of new builds, checked and recorded under this lock so concurrent
    /// triggers cannot both take the last slot.
    limiter: RateLimiter,
}

impl State {
    fn add(&mut self, build: Build, on_disk: bool) -> watch::Receiver<bool> {
        let (stop_tx, _) = watch::channel(None);
        let (done_tx, done_rx) = watch::channel(false);
        let key = (build.project.clone(), build.branch.clone());
        if build.phase == Phase::Queued {
            self.queued.insert(build.seq, build.id);
            self.queued_by_project
                .entry(build.project.clone())
                .or_default()
                .insert(build.seq);
            self.pending.insert(key, build.id);
        }
        self.live.insert(
            build.id,
            Live {
                build,
                resolved: false,
                joined_during_fetch: false,
                stop_tx,
                done_tx,
                log: None,
                on_disk,
            },
        );
        done_rx
    }

    /// The build of (project, branch) past source resolution, not stopped, not already
    /// cancelled, if any. Such a build is always its project's active one (one build per
    /// project initializes or runs at a time; `resolved` is set only while active), so this
    /// looks at one entry instead of every live build: it runs under the lock on every new
    /// build, with thousands of builds queued.
    fn supersede_target(&self, project: &str, branch: &str) -> Option<BuildId> {
        let id = self.active.get(project)?;
        let l = self.live.get(id)?;
        (l.resolved && l.build.branch == branch && l.build.cancel_reason.is_none()).then_some(*id)
    }

    /// The next queued build to start, if a slot is free: the oldest whose project is idle.
    fn next_to_start(&self, max_concurrent: usize) -> Option<BuildId> {
        if self.active.len() >= max_concurrent {
            return None;
        }
        let seq = self
            .queued_by_project
            .iter()
            .filter(|(project, _)| !self.active.contains_key(*project))
            .filter_map(|(_, seqs)| seqs.first())
            .min()?;
        self.queued.get(seq).copied()
    }

    /// Forgets a queued build's place in the queue (it started or was removed).
    fn dequeue(&mut self, project: &str, seq: u64) {
        self.queued.remove(&seq);
        if let Some(seqs) = self.queued_by_project.get_mut(project) {
            seqs.remove(&seq);
            if seqs.is_empty() {
                self.queued_by_project.remove(project);
            }
        }
    }

    /// Moves a queued build to initializing (in memory).
    fn start(&mut self, id: BuildId, now: Timestamp) -> Option<&Build> {
        let (project, seq) = {
            let l = self.live.get(&id)?;
            (l.build.project.clone(), l.build.seq)
        };
        self.dequeue(&project, seq);
        let l = self.live.get_mut(&id)?;
        l.build.phase = Phase::Initializing;
        l.build.initializing_on = Some(now);
        self.active.insert(l.build.project.clone(), id);
        Some(&l.build)
    }

    /// Removes a build from every index; returns its entry.
    fn remove(&mut self, id: BuildId) -> Option<Live> {
        let l = self.live.remove(&id)?;
        self.dequeue(&l.build.project, l.build.seq);
        let key = (l.build.project.clone(), l.build.branch.clone());
        if self.pending.get(&key) == Some(&id) {
            self.pending.remove(&key);
        }
        if self.active.get(&l.build.project) == Some(&id) {
            self.active.remove(&l.build.project);
        }
        Some(l)
    }

    fn unpend(&mut self, id: BuildId) {
        if let Some(l) = self.live.get(&id) {
            let key = (l.build.project.clone(), l.build.branch.clone());
            if self.pending.get(&key) == Some(&id) {
                self.pending.remove(&key);
            }
        }
    }

    fn counts(&self) -> (usize, usize) {
        (self.queued.len(), self.active.len())
    }
}

/// How a build's source was resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// No repo: the command runs in the project's workdir as it is.
    Workdir,
    /// This commit was fetched and is about to be checked out.
    Fetched(String),
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
    state: Mutex<State>,
    /// Notified whenever a build stops (shutdown waits on it).
    stopped: Notify,
}

impl Queue {
    /// Recovers state from the store (see the module doc) and starts whatever can start.
    pub fn start(
        store: Store,
        config: Arc<SharedConfig>,
        settings: RunSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Queue, StoreError> {
        let mut st = State {
            accepting: true,
            ..State::default()
        };
        let mut builds = store.all_builds()?;
        builds.sort_by_key(|b| b.seq);
        let now = Timestamp::now();
        let mut interrupted = Vec::new();
        for mut b in builds {
            st.next_seq = st.next_seq.max(b.seq + 1);
            match b.phase {
                Phase::Stopped(_) => {}
                Phase::Queued => {
                    // Two queued builds of one branch cannot normally exist; if they do, the
                    // newer one is the pending one and both still run.
                    st.add(b, true);
                }
                Phase::Initializing | Phase::Running => {
                    let path = buildlog::log_path(store.state_dir(), b.id);
                    let note = "interrupted: deployhook stopped while this build was in progress";
                    if let Ok(summary) = buildlog::append_system_line(&path, note) {
                        b.log_lines = summary.lines;
                        b.log_bytes = summary.bytes;
                    }
                    b.phase = Phase::Stopped(Outcome::Interrupted);
                    b.stopped_on = Some(now);
                    store.put_build(&b)?;
                    tracing::info!(build = %b.id, project = %b.project, branch = %b.branch, outcome = %Outcome::Interrupted.as_str(), "build stopped");
                    metrics.build_stopped(&b.project, Outcome::Interrupted, None);
                    interrupted.push(b.project.clone());
                }
            }
        }
        let events = store.rate_events()?;
        let mono_now = st.limiter.now();
        st.limiter.restore(
            events.iter().map(|(p, at)| (p.as_str(), *at)),
            &ratelimit::Clocks::now(),
            mono_now,
        );
        store.flush_blocking()?;
        runner::clean_leftovers(store.state_dir());
        settings.pool.refill();
        let q = Queue {
            inner: Arc::new(Inner {
                store,
                config,
                settings,
                metrics,
                state: Mutex::new(st),
                stopped: Notify::new(),
            }),
        };
        for p in interrupted {
            q.prune_later(p);
        }
        q.schedule();
        Ok(q)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; the state itself stays consistent
        // enough to keep serving (every mutation is a few assignments).
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
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
            .project(&req.project)
            .ok_or_else(|| TriggerError::UnknownProject(req.project.clone()))?;
        if !project.has_branch(&req.branch) {
            return Err(TriggerError::BranchNotAllowed {
                project: req.project.clone(),
                allowed: project
                    .branches
                    .iter()
                    .map(|b| b.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                branch: req.branch.clone(),
            });
        }
        let build = {
            let mut st = self.lock();
            if !st.accepting {
                return Err(TriggerError::ShuttingDown);
            }
            let key = (req.project.clone(), req.branch.clone());
            if let Some(id) = st.pending.get(&key).copied()
                && let Some(l) = st.live.get_mut(&id)
            {
                if l.build.phase == Phase::Initializing {
                    l.joined_during_fetch = true;
                }
                let joined = Triggered {
                    build: l.build.clone(),
                    already_exists: true,
                };
                if l.on_disk {
                    return Ok(joined);
                }
                Found::JoinedBeforeFlush(joined)
            } else {
                // Rate limits: after dedupe (a deduplicated trigger never counts) and before
                // anything is written, so a refused trigger leaves no trace.
                let limits = Limits {
                    daemon: config.server.builds_per_minute,
                    project: project.project_builds_per_minute,
                };
                let mono = st.limiter.now();
                st.limiter
                    .check(&req.project, limits, mono)
                    .map_err(TriggerError::RateLimited)?;
                let seq = st.next_seq;
                let build = Build::new_queued(
                    seq,
                    &req.project,
                    &req.branch,
                    req.trigger.clone(),
                    req.requested_commit.clone(),
                    req.payload.is_some(),
                );
                self.inner
                    .store
                    .insert_build(&build, req.payload.as_deref())?;
                st.next_seq += 1;
                st.limiter.record(&req.project, mono);
                if project.cancel_superseded
                    && let Some(old) = st.supersede_target(&req.project, &req.branch)
                    && let Some(l) = st.live.get_mut(&old)
                {
                    l.build.cancel_reason = Some(CancelReason::Superseded);
                    l.build.superseded_by = Some(build.id);
                    self.inner.store.put_build(&l.build)?;
                    l.stop_tx.send_if_modified(|r| {
                        r.is_none() && {
                            *r = Some(StopReason::Cancel(CancelReason::Superseded));
                            true
                        }
                    });
                }
                st.add(build.clone(), false);
                Found::New(build)
            }
        };
        let build = match build {
            Found::New(b) => b,
            Found::JoinedBeforeFlush(joined) => {
                // Joined a build whose creator is still waiting for its flush: a flush
                // requested now covers it. Rare (the first moments of a build's life), so the
                // usual join stays free of I/O.
                self.inner.store.durable().await?;
                return Ok(joined);
            }
        };
        tracing::info!(build = %build.id, project = %build.project, branch = %build.branch, source = %build.trigger.source.as_str(), "build queued");
        self.schedule();
        // Events older than the window are dead weight; this is usually a no-op range scan.
        self.inner
            .store
            .prune_rate_events(&ratelimit::Clocks::now(), ratelimit::WINDOW)?;
        self.inner.store.durable().await?;
        if let Some(l) = self.lock().live.get_mut(&build.id) {
            l.on_disk = true;
        }
        Ok(Triggered {
            build,
            already_exists: false,
        })
    }

    /// Starts queued builds while slots are free.
    pub fn schedule(&self) {
        let starts = {
            let mut st = self.lock();
            if !st.accepting {
                // Shutting down: what is queued stays queued for the next start.
                return;
            }
            let config = self.inner.config.get();
            let max = config.server.max_concurrent_builds;
            let mut starts = Vec::new();
            while let Some(id) = st.next_to_start(max) {
                let Some(build) = st.start(id, Timestamp::now()).cloned() else {
                    break;
                };
                if let Err(e) = self.inner.store.put_build(&build) {
                    tracing::error!(build = %id, "cannot record a build start: {e}");
                }
                let stop = match st.live.get(&id) {
                    Some(l) => l.stop_tx.subscribe(),
                    None => continue,
                };
                starts.push(Start {
                    project: config.project(&build.project).cloned(),
                    build,
                    stop,
                    kill_grace: config.server.kill_grace,
                    max_log_bytes: config.server.max_log_bytes,
                });
            }
            starts
        };
        if starts.is_empty() {
            return;
        }
        for s in starts {
            tracing::info!(build = %s.build.id, project = %s.build.project, branch = %s.build.branch, "build initializing");
            tokio::spawn(runner::run(self.clone(), self.inner.settings.clone(), s));
        }
    }

    /// Cancels a build (SPEC §4.2): a queued one stops at once; a running one is asked to stop
    /// and this waits (bounded by the kill grace plus a margin) for it to be gone.
    pub async fn cancel(&self, id: BuildId) -> Result<Build, CancelError> {
        enum Step {
            NotLive,
            StoppedNow(Box<Build>),
            Stopping(watch::Receiver<bool>),
        }
        let step = {
            let mut st = self.lock();
            match st.live.get(&id).map(|l| l.build.phase) {
                None => Step::NotLive,
                Some(Phase::Queued) => {
                    let mut l = st.remove(id).ok_or(CancelError::NotFound)?;
                    l.build.phase = Phase::Stopped(Outcome::Cancelled);
                    l.build.cancel_reason = Some(CancelReason::Api);
                    l.build.stopped_on = Some(Timestamp::now());
                    self.inner.store.put_build(&l.build)?;
                    tracing::info!(build = %id, project = %l.build.project, branch = %l.build.branch, outcome = %Outcome::Cancelled.as_str(), "build stopped");
                    self.inner
                        .metrics
                        .build_stopped(&l.build.project, Outcome::Cancelled, None);
                    l.done_tx.send_replace(true);
                    Step::StoppedNow(Box::new(l.build))
                }
                Some(_) => {
                    let l = st.live.get_mut(&id).ok_or(CancelError::NotFound)?;
                    if l.build.cancel_reason.is_none() {
                        l.build.cancel_reason = Some(CancelReason::Api);
                        self.inner.store.put_build(&l.build)?;
                    }
                    l.stop_tx.send_if_modified(|r| {
                        r.is_none() && {
                            *r = Some(StopReason::Cancel(CancelReason::Api));
                            true
                        }
                    });
                    let done_rx = l.done_tx.subscribe();
                    // A cancelled build no longer absorbs triggers: the next one queues anew.
                    st.unpend(id);
                    Step::Stopping(done_rx)
                }
            }
        };
        match step {
            Step::NotLive => match self.inner.store.build(id)? {
                Some(b) => Err(CancelError::AlreadyStopped(Box::new(b))),
                None => Err(CancelError::NotFound),
            },
            Step::StoppedNow(b) => {
                self.inner.stopped.notify_waiters();
                self.inner.store.durable().await?;
                self.prune_later(b.project.clone());
                self.schedule();
                Ok(*b)
            }
            Step::Stopping(mut done_rx) => {
                self.inner.store.durable().await?;
                let limit = self.inner.config.get().server.kill_grace
                    + runner::DRAIN_DEADLINE
                    + Duration::from_secs(2);
                let _ = tokio::time::timeout(limit, done_rx.wait_for(|d| *d)).await;
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
        self.lock().counts()
    }

    /// Queued count and active build of a project.
    pub fn project_status(&self, project: &str) -> (usize, Option<BuildId>) {
        let st = self.lock();
        let queued = st.queued_by_project.get(project).map_or(0, BTreeSet::len);
        (queued, st.active.get(project).copied())
    }

    /// The live log of a build that has not stopped, if its runner has opened one.
    pub fn live_log(&self, id: BuildId) -> Option<LiveLog> {
        self.lock().live.get(&id).and_then(|l| l.log.clone())
    }

    /// Whether a build is still live (not stopped).
    pub fn is_live(&self, id: BuildId) -> bool {
        self.lock().live.contains_key(&id)
    }

    /// A receiver that turns true when the build stops (`None` if it is not live).
    pub fn done_watch(&self, id: BuildId) -> Option<watch::Receiver<bool>> {
        self.lock().live.get(&id).map(|l| l.done_tx.subscribe())
    }

    /// Stops accepting triggers, lets active builds run for up to `grace`, then interrupts
    /// them and waits until they are gone. Queued builds stay queued in the store and resume
    /// at the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.lock().accepting = false;
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.inner.stopped.notified();
            if self.lock().active.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        {
            let st = self.lock();
            for id in st.active.values() {
                if let Some(l) = st.live.get(id) {
                    tracing::warn!(build = %id, "interrupting build for shutdown");
                    l.stop_tx.send_if_modified(|r| {
                        r.is_none() && {
                            *r = Some(StopReason::Shutdown);
                            true
                        }
                    });
                }
            }
        }
        let limit = tokio::time::Instant::now()
            + self.inner.config.get().server.kill_grace
            + runner::DRAIN_DEADLINE
            + Duration::from_secs(5);
        loop {
            let notified = self.inner.stopped.notified();
            if self.lock().active.is_empty() {
                break;
            }
            if tokio::time::timeout_at(limit, notified).await.is_err() {
                tracing::error!(
                    "builds did not stop in time; exiting anyway (their supervisors kill them)"
                );
                break;
            }
        }
    }

    // ---- runner-facing ------------------------------------------------------------------

    /// A fetch is starting: triggers joining from now on are covered by it.
    pub(crate) fn begin_fetch(&self, id: BuildId) {
        if let Some(l) = self.lock().live.get_mut(&id) {
            l.joined_during_fetch = false;
        }
    }

    /// The build's source is resolved. A fetched commit counts only if no trigger joined while
    /// the fetch ran: then this returns false and the runner must fetch again, so that the
    /// trigger's commit is in. A workdir build has nothing to fetch and always resolves.
    pub(crate) fn resolve(&self, id: BuildId, source: Resolution) -> bool {
        let mut st = self.lock();
        let Some(l) = st.live.get_mut(&id) else {
            return true;
        };
        let commit = match source {
            Resolution::Workdir => None,
            Resolution::Fetched(_) if l.joined_during_fetch => {
                l.joined_during_fetch = false;
                return false;
            }
            Resolution::Fetched(sha) => Some(sha),
        };
        l.resolved = true;
        l.build.commit = commit;
        if let Err(e) = self.inner.store.put_build(&l.build) {
            tracing::error!(build = %id, "cannot record the resolved commit: {e}");
        }
        st.unpend(id);
        true
    }

    /// The runner opened the build's log.
    pub(crate) fn set_log(&self, id: BuildId, log: LiveLog) {
        if let Some(l) = self.lock().live.get_mut(&id) {
            l.log = Some(log);
        }
    }

    /// The command is running.
    pub(crate) fn mark_running(&self, id: BuildId) {
        let mut st = self.lock();
        if let Some(l) = st.live.get_mut(&id) {
            l.build.phase = Phase::Running;
            l.build.running_on = Some(Timestamp::now());
            if let Err(e) = self.inner.store.put_build(&l.build) {
                tracing::error!(build = %id, "cannot record a build as running: {e}");
            }
            tracing::info!(build = %id, project = %l.build.project, branch = %l.build.branch, "build running");
        }
    }

    /// The build is over and every process of it is gone.
    pub(crate) fn finish(
        &self,
        id: BuildId,
        outcome: Outcome,
        exit_code: Option<i32>,
        log: buildlog::LogSummary,
    ) {
        let project = {
            let mut st = self.lock();
            let Some(mut l) = st.remove(id) else {
                return;
            };
            l.build.phase = Phase::Stopped(outcome);
            l.build.exit_code = exit_code;
            l.build.stopped_on = Some(Timestamp::now());
            l.build.log_lines = log.lines;
            l.build.log_bytes = log.bytes;
            l.build.log_truncated = log.truncated;
            if let Err(e) = self.inner.store.put_build(&l.build) {
                tracing::error!(build = %id, "cannot record a build's end: {e}");
            }
            tracing::info!(build = %id, project = %l.build.project, branch = %l.build.branch, outcome = %outcome.as_str(), exit_code, "build stopped");
            let ran_for = metrics::ran_for(&l.build);
            self.inner
                .metrics
                .build_stopped(&l.build.project, outcome, ran_for);
            l.done_tx.send_replace(true);
            l.build.project
        };
        self.inner.stopped.notify_waiters();
        self.schedule();
        self.prune_later(project);
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
        let mut n = 0;
        for id in ids.into_iter().skip(keep) {
            if self.is_live(id) {
                continue;
            }
            if self.inner.store.delete_build(id)? {
                let _ = std::fs::remove_file(buildlog::log_path(self.inner.store.state_dir(), id));
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TriggerSource;

    fn queued(seq: u64, project: &str, branch: &str) -> Build {
        Build::new_queued(
            seq,
            project,
            branch,
            Trigger {
                source: TriggerSource::Api,
                hook: None,
            },
            None,
            false,
        )
    }

    #[test]
    fn scheduler_takes_the_oldest_idle_project_within_the_limit() {
        let mut st = State::default();
        let a1 = queued(1, "a", "main");
        let a2 = queued(2, "a", "dev");
        let b1 = queued(3, "b", "main");
        let c1 = queued(4, "c", "main");
        for b in [&a1, &a2, &b1, &c1] {
            st.add(b.clone(), true);
        }
        assert_eq!(st.next_to_start(2), Some(a1.id));
        st.start(a1.id, Timestamp(0));
        // a is busy: its second build waits, b goes next.
        assert_eq!(st.next_to_start(2), Some(b1.id));
        st.start(b1.id, Timestamp(0));
        // Two active: no slot.
        assert_eq!(st.next_to_start(2), None);
        assert_eq!(st.next_to_start(3), Some(c1.id));
        st.remove(a1.id);
        assert_eq!(st.next_to_start(2), Some(a2.id));
        assert_eq!(st.counts(), (2, 1));
    }

    #[test]
    fn pending_until_resolved_then_supersedable() {
        let mut st = State::default();
        let a = queued(1, "a", "main");
        st.add(a.clone(), true);
        assert_eq!(st.pending.get(&("a".into(), "main".into())), Some(&a.id));
        st.start(a.id, Timestamp(0));
        // Initializing, unresolved: still pending, not supersedable.
        assert_eq!(st.pending.get(&("a".into(), "main".into())), Some(&a.id));
        assert_eq!(st.supersede_target("a", "main"), None);
        st.live.get_mut(&a.id).unwrap().resolved = true;
        st.unpend(a.id);
        assert!(!st.pending.contains_key(&("a".into(), "main".into())));
        assert_eq!(st.supersede_target("a", "main"), Some(a.id));
        assert_eq!(st.supersede_target("a", "dev"), None);
        // Once marked cancelled it is not a target again.
        st.live.get_mut(&a.id).unwrap().build.cancel_reason = Some(CancelReason::Superseded);
        assert_eq!(st.supersede_target("a", "main"), None);
    }

    #[test]
    fn removing_a_build_clears_every_index() {
        let mut st = State::default();
        let a = queued(1, "a", "main");
        st.add(a.clone(), true);
        st.start(a.id, Timestamp(0));
        assert!(st.remove(a.id).is_some());
        assert!(
            st.live.is_empty()
                && st.queued.is_empty()
                && st.queued_by_project.is_empty()
                && st.pending.is_empty()
                && st.active.is_empty()
        );
        assert!(st.remove(a.id).is_none());
    }
}
