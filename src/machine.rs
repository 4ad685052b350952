//! The build state machine: the one owner of every transition of every build that is not yet
//! stopped. Pure: no I/O, no clock reads (callers pass `now`), no channels. Each event is a
//! method that changes the in-memory state and returns the [`Effect`]s the shell
//! (`crate::queue`) must apply: records to write, runners to start or stop, log lines, metric
//! increments. That is what makes "a stored build never contradicts itself" checkable: the
//! property test at the bottom drives random event sequences and checks the SPEC §2 invariants
//! on every record an effect would write.
//!
//! # States
//! ```text
//!            trigger                 schedule              source resolved    command spawned
//!   (none) ─────────▶ queued ─────────────────▶ initializing ─ ─ ─ ─ ─ ─ ─ ─ ─▶ running
//!                       │                           │  (pending until here)          │
//!                       │ cancel                    │ finish (after a cancel,          │ finish (exit, or after a
//!                       ▼                           ▼ supersede*, timeout, shutdown,   ▼ stop request or timeout)
//!                    stopped ◀──────────────────────┴── or a failed checkout) ─────────┘
//!   recovery: queued stays queued; initializing/running → stopped (interrupted)
//! ```
//! (*) supersede only reaches builds whose source is resolved.
//!
//! | event | from | to | effects |
//! |---|---|---|---|
//! | [`Machine::trigger`] (no pending build of the target) | — | (plan) | none: the shell inserts the build, then calls [`Machine::created`] |
//! | [`Machine::created`] | — | queued | log; supersede: stop request to the target's resolved build |
//! | [`Machine::trigger`] (pending build exists) | queued/initializing | same | its requested commits grow or its `not_before` moves (write), first join logged |
//! | [`Machine::schedule`] | queued (eligible) | initializing | write, start a runner, log |
//! | [`Machine::schedule`] | queued (`not_before` passed) | queued (eligible) | write (`not_before` null) |
//! | [`Machine::resolve`] | initializing (pending) | initializing (resolved) | write `commit`, "absorbed N triggers" |
//! | [`Machine::running`] | initializing | running | write, log |
//! | [`Machine::cancel`] | queued | stopped (cancelled) | write, stopped, count, log |
//! | [`Machine::cancel`] | initializing/running | same | stop request (in memory only) |
//! | [`Machine::finish`] | initializing/running | stopped (outcome from what happened) | write, stopped, count, log |
//! | [`Machine::interrupt_active`] | initializing/running | same | stop request (shutdown) |
//! | [`Machine::recover`] | stored queued / in progress | queued / stopped (interrupted) | write, count, log |
//!
//! # Who decides what
//! A cancel or supersede is a *request*, kept in memory until the build actually stops; the
//! stored record never carries `cancel_reason` or `superseded_by` before its outcome is known.
//! [`Machine::finish`] decides the outcome once, from the runner's report of what really
//! happened: a build whose command exited 0 before a late supersede took effect is `success`,
//! with no cancel fields.
//!
//! A *pending* build (SPEC §1) is one in `queued`, or in `initializing` before its commit is
//! resolved. At most one pending build exists per target; a trigger that finds one joins it.
//! A trigger that joins an initializing build while its fetch is under way makes the runner
//! fetch again before it resolves, so the build includes every commit pushed before any
//! trigger it absorbed. Builds that name an exact commit are never pending for anyone: they
//! never join, are never joined and supersede nothing.
//!
//! # Quiet period (SPEC §2.2)
//! A new build of a project with a quiet period gets `not_before = created_on + quiet_period`;
//! each trigger that joins it while it is queued moves that to `now + quiet_period`, never
//! past `created_on + max_quiet_period`. [`Machine::schedule`] passes over builds whose
//! `not_before` is still ahead, and clears it (a write) once it has passed, so a stored
//! `not_before` is either in the future or null. [`Machine::next_wake`] tells the shell when
//! the earliest one passes, so that it can run the scheduler then. Exact-commit builds never
//! wait: nothing joins them, so there is no burst to wait out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::model::{
    Build, BuildId, CancelReason, GitRef, Outcome, Phase, Target, Timestamp, Trigger,
};
use crate::ratelimit::{Limited, Limits, Mono, RateLimiter};

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

/// How the build's last process ended, as the runner saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The command's main process exited with this status.
    Code(i32),
    /// It was killed by a signal nobody here sent on purpose.
    Signal(i32),
    /// Nothing ran to an exit status: a failed checkout, a spawn error, a lost supervisor.
    Failed,
}

/// The runner's report of a build's end: what really happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunEnd {
    /// The stop the runner acted on while a process of the build was running (or before it
    /// started one), if any. A request that arrived after the command had exited is not here.
    pub stopped_by: Option<StopReason>,
    /// How the last process ended.
    pub exit: Exit,
}

impl RunEnd {
    /// The outcome and `exit_code` this end gives (SPEC §2): a stop decides the outcome and
    /// leaves no exit code, even if the command caught SIGTERM and exited by itself.
    pub fn outcome(self) -> (Outcome, Option<i32>) {
        match (self.stopped_by, self.exit) {
            (Some(r), _) => (r.outcome(), None),
            (None, Exit::Code(0)) => (Outcome::Success, Some(0)),
            (None, Exit::Code(c)) => (Outcome::Fail, Some(c)),
            (None, Exit::Signal(_) | Exit::Failed) => (Outcome::Fail, None),
        }
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

/// Log counters of a finished build's log file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogCounts {
    /// Lines written.
    pub lines: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Output was dropped (cap reached, or the log could not take it).
    pub truncated: bool,
}

/// A project's quiet period (SPEC §2.2), as the trigger's config says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quiet {
    /// How long a new build waits for more triggers (zero: it does not wait).
    pub period: Duration,
    /// Longest a build waits in all, counted from its `created_on`.
    pub max: Duration,
}

impl Quiet {
    /// No quiet period.
    pub const NONE: Quiet = Quiet {
        period: Duration::ZERO,
        max: Duration::ZERO,
    };
}

/// `t + d`, saturating (the model's timestamps are microseconds).
fn after(t: Timestamp, d: Duration) -> Timestamp {
    Timestamp(t.0.saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)))
}

/// A trigger as the machine sees it.
#[derive(Debug, Clone)]
pub struct TriggerInput<'a> {
    /// What to build.
    pub target: &'a Target,
    /// Who asks.
    pub trigger: &'a Trigger,
    /// The SHA a push announced, if any.
    pub requested_commit: Option<&'a str>,
    /// An exact commit to build (never joins, never joined, supersedes nothing).
    pub exact_commit: Option<&'a str>,
    /// The build a redeploy repeats (a redeploy stands alone like an exact commit, also for
    /// a workdir project, which has no commit to name).
    pub redeploy_of: Option<BuildId>,
    /// A request body is stored with a new build.
    pub has_payload: bool,
    /// The project's quiet period.
    pub quiet: Quiet,
}

/// What a trigger leads to.
#[derive(Debug, Clone)]
pub enum Plan {
    /// It joined this pending build. `needs_flush`: the answer must wait for a flush, because
    /// the build's creator has not seen its record flushed yet or this join changed the record.
    Joined {
        /// The build as it is now (shared, see [`Live`]).
        build: Arc<Build>,
        /// Wait for durability before answering.
        needs_flush: bool,
    },
    /// A new build: the shell inserts it durably, then reports it with [`Machine::created`].
    Create(Box<Build>),
}

/// Why a trigger was refused by the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The daemon is shutting down.
    ShuttingDown,
    /// Over a rate limit.
    RateLimited(Limited),
}

/// What a cancel did.
#[derive(Debug, Clone)]
pub enum CancelStep {
    /// Not a live build (stopped long ago, or unknown).
    NotLive,
    /// It was queued and is now stopped.
    StoppedNow(Box<Build>),
    /// Its runner was asked to stop (or already had been); wait for it.
    Stopping,
}

/// A log line's meaning; the shell formats it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogWhat {
    /// A new build was queued, by a trigger of this source.
    Queued(crate::model::TriggerSource),
    /// The first trigger joined a pending build; later joins are only counted.
    FirstJoin,
    /// The build left `pending` having absorbed this many triggers.
    Absorbed(u64),
    /// It left the queue.
    Initializing,
    /// Its command started.
    Running,
    /// Its runner was asked to stop.
    StopRequested(StopReason),
    /// It stopped.
    Stopped(Outcome, Option<i32>),
}

/// One log line about a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The build.
    pub build: BuildId,
    /// Its project.
    pub project: String,
    /// Its ref.
    pub git_ref: GitRef,
    /// What happened.
    pub what: LogWhat,
}

/// A change of a build that people and systems outside may be told about (SPEC §5): the
/// outbox turns each into notifications and commit statuses, written in the same store
/// transaction as the record of the change (the [`Effect::Put`] just before it, or the
/// insert of a new build for [`Tell::Queued`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tell {
    /// A new build was queued (its `requested_commits` are pending).
    Queued,
    /// A trigger joined the pending build and added this SHA.
    Joined(String),
    /// It left the queue.
    Initializing,
    /// Its command started.
    Running,
    /// A newer build of its target superseded it: its SHAs stay pending and take that
    /// build's final state (the newer build lists them in `superseded_commits`).
    SupersededBy(BuildId),
    /// It stopped (the record says how).
    Stopped,
}

/// What the shell must do after an event, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Write this build record (overwriting the stored one).
    Put(Build),
    /// Ask the build's runner to stop.
    Stop(BuildId, StopReason),
    /// Start a runner for this build (it just entered `initializing`).
    Start(Build),
    /// The build stopped: wake whoever waits on it and prune its project's old builds.
    Stopped(Build),
    /// Count a stopped build in the metrics.
    CountStopped {
        /// Project.
        project: String,
        /// Outcome.
        outcome: Outcome,
        /// From `initializing_on` to `stopped_on`, when it left the queue.
        ran_for: Option<Duration>,
    },
    /// Log a line.
    Log(LogLine),
    /// Tell the outbox about a change (see [`Tell`]); the build as it is after the change.
    Tell(Build, Tell),
}

/// A build that is not stopped.
#[derive(Debug, Clone)]
struct Live {
    /// The authoritative copy of its record; every change is also a [`Effect::Put`]. Shared
    /// with the answers of triggers that joined it (no copy per join); changed through
    /// `Arc::make_mut`, so a copy handed out never changes under its holder, and one still held
    /// elsewhere tells by its address that the build has changed since.
    build: Arc<Build>,
    /// Past source resolution: no longer pending, eligible for supersede.
    resolved: bool,
    /// A trigger joined while a fetch was under way: fetch again before resolving.
    joined_during_fetch: bool,
    /// A stop asked for and not yet acted on by [`Machine::finish`] (first reason wins).
    stop: Option<StopReason>,
    /// The build that superseded it, with `stop == Some(Cancel(Superseded))`.
    superseded_by: Option<BuildId>,
    /// Its record is known to be flushed; until then a join waits for a flush too.
    on_disk: bool,
    /// Triggers that joined it (logged once when it leaves pending).
    joins: u64,
}

/// The in-memory state of every live build, and the rules that move them.
#[derive(Debug)]
pub struct Machine {
    next_seq: u64,
    accepting: bool,
    live: HashMap<BuildId, Live>,
    /// Queued builds by creation sequence.
    queued: BTreeMap<u64, BuildId>,
    /// The same builds by project, so that finding the oldest queued build of an idle
    /// project looks at one entry per project instead of every queued build.
    queued_by_project: HashMap<String, BTreeSet<u64>>,
    /// The pending build of each target.
    pending: HashMap<Target, BuildId>,
    /// The build initializing or running in each project.
    active: HashMap<String, BuildId>,
    /// Queued builds whose `not_before` is set, by that time (the same value as in their
    /// record): what [`Machine::schedule`] passes over and [`Machine::next_wake`] reports.
    waiting: BTreeSet<(Timestamp, BuildId)>,
    /// Rolling windows of new builds, checked and recorded with the state so that concurrent
    /// triggers cannot both take the last slot.
    pub(crate) limiter: RateLimiter,
}

fn log(b: &Build, what: LogWhat) -> Effect {
    Effect::Log(LogLine {
        build: b.id,
        project: b.project.clone(),
        git_ref: b.git_ref.clone(),
        what,
    })
}

impl Machine {
    /// An empty machine that accepts triggers; `next_seq` continues the stored sequence.
    pub fn new(limiter: RateLimiter) -> Self {
        Machine {
            next_seq: 0,
            accepting: true,
            live: HashMap::new(),
            queued: BTreeMap::new(),
            queued_by_project: HashMap::new(),
            pending: HashMap::new(),
            active: HashMap::new(),
            waiting: BTreeSet::new(),
            limiter,
        }
    }

    // ---- queries ------------------------------------------------------------------------

    /// A live build as it is now.
    pub fn build(&self, id: BuildId) -> Option<&Build> {
        self.live.get(&id).map(|l| &*l.build)
    }

    /// Every live build's id.
    pub fn live_ids(&self) -> Vec<BuildId> {
        self.live.keys().copied().collect()
    }

    /// Whether a build is live (not stopped).
    pub fn is_live(&self, id: BuildId) -> bool {
        self.live.contains_key(&id)
    }

    /// `(queued, initializing or running)` counts.
    pub fn counts(&self) -> (usize, usize) {
        (self.queued.len(), self.active.len())
    }

    /// Queued count and active build of a project.
    pub fn project_status(&self, project: &str) -> (usize, Option<BuildId>) {
        let queued = self.queued_by_project.get(project).map_or(0, BTreeSet::len);
        (queued, self.active.get(project).copied())
    }

    /// Whether no build is initializing or running.
    pub fn idle(&self) -> bool {
        self.active.is_empty()
    }

    /// The stop requested for a live build and not yet acted on, if any.
    pub fn stop_request(&self, id: BuildId) -> Option<StopReason> {
        self.live.get(&id).and_then(|l| l.stop)
    }

    /// Whether triggers are accepted.
    pub fn accepting(&self) -> bool {
        self.accepting
    }

    /// When the earliest `not_before` of a queued build passes: the shell runs
    /// [`Machine::schedule`] then. `None` while no build waits out a quiet period.
    pub fn next_wake(&self) -> Option<Timestamp> {
        self.waiting.first().map(|(t, _)| *t)
    }

    /// Of `ids` (a project's builds, newest first), those retention deletes: beyond the newest
    /// `keep`, and not live.
    pub fn prune_plan(&self, ids: &[BuildId], keep: usize) -> Vec<BuildId> {
        ids.iter()
            .skip(keep)
            .filter(|id| !self.is_live(**id))
            .copied()
            .collect()
    }

    // ---- index upkeep -------------------------------------------------------------------

    fn add(&mut self, build: Build, on_disk: bool) {
        if build.phase == Phase::Queued {
            self.queued.insert(build.seq, build.id);
            self.queued_by_project
                .entry(build.project.clone())
                .or_default()
                .insert(build.seq);
            if !build.stands_alone() {
                self.pending.insert(build.target(), build.id);
            }
            if let Some(t) = build.not_before {
                self.waiting.insert((t, build.id));
            }
        }
        self.next_seq = self.next_seq.max(build.seq + 1);
        self.live.insert(
            build.id,
            Live {
                build: Arc::new(build),
                resolved: false,
                joined_during_fetch: false,
                stop: None,
                superseded_by: None,
                on_disk,
                joins: 0,
            },
        );
    }

    fn dequeue(&mut self, project: &str, seq: u64) {
        self.queued.remove(&seq);
        if let Some(seqs) = self.queued_by_project.get_mut(project) {
            seqs.remove(&seq);
            if seqs.is_empty() {
                self.queued_by_project.remove(project);
            }
        }
    }

    /// Takes a build out of `pending`; logs what it absorbed if anything joined it.
    fn unpend(&mut self, id: BuildId, fx: &mut Vec<Effect>) {
        let Some(l) = self.live.get_mut(&id) else {
            return;
        };
        let key = l.build.target();
        if self.pending.get(&key) == Some(&id) {
            self.pending.remove(&key);
        }
        if l.joins > 0 {
            fx.push(log(&l.build, LogWhat::Absorbed(l.joins)));
            l.joins = 0;
        }
    }

    fn remove(&mut self, id: BuildId, fx: &mut Vec<Effect>) -> Option<Live> {
        self.unpend(id, fx);
        let l = self.live.remove(&id)?;
        if let Some(t) = l.build.not_before {
            self.waiting.remove(&(t, id));
        }
        self.dequeue(&l.build.project, l.build.seq);
        if self.active.get(&l.build.project) == Some(&id) {
            self.active.remove(&l.build.project);
        }
        Some(l)
    }

    /// Marks a removed build stopped; pushes the effects of that and returns the record.
    fn stopped(
        mut b: Build,
        outcome: Outcome,
        exit_code: Option<i32>,
        now: Timestamp,
        fx: &mut Vec<Effect>,
    ) -> Build {
        b.phase = Phase::Stopped(outcome);
        b.exit_code = exit_code;
        b.stopped_on = Some(now);
        b.not_before = None;
        let ran_for = crate::metrics::ran_for(&b);
        fx.push(Effect::Put(b.clone()));
        fx.push(Effect::Tell(b.clone(), Tell::Stopped));
        fx.push(log(&b, LogWhat::Stopped(outcome, exit_code)));
        fx.push(Effect::CountStopped {
            project: b.project.clone(),
            outcome,
            ran_for,
        });
        fx.push(Effect::Stopped(b.clone()));
        b
    }

    /// Records a stop request unless one is already there; true if it is new.
    fn request_stop(&mut self, id: BuildId, reason: StopReason, fx: &mut Vec<Effect>) -> bool {
        let Some(l) = self.live.get_mut(&id) else {
            return false;
        };
        if l.stop.is_some() {
            return false;
        }
        l.stop = Some(reason);
        fx.push(Effect::Stop(id, reason));
        fx.push(log(&l.build, LogWhat::StopRequested(reason)));
        true
    }

    // ---- events -------------------------------------------------------------------------

    /// A trigger (SPEC §2.1): joins the target's pending build, or plans a new one (rate
    /// limits checked here, after dedupe, so a deduplicated trigger never counts).
    pub fn trigger(
        &mut self,
        t: &TriggerInput<'_>,
        limits: Limits,
        mono: Mono,
        now: Timestamp,
    ) -> Result<(Plan, Vec<Effect>), Refusal> {
        if !self.accepting {
            return Err(Refusal::ShuttingDown);
        }
        let mut fx = Vec::new();
        if t.exact_commit.is_none()
            && t.redeploy_of.is_none()
            && let Some(id) = self.pending.get(t.target).copied()
            && let Some(l) = self.live.get_mut(&id)
        {
            if l.build.phase == Phase::Initializing {
                l.joined_during_fetch = true;
            }
            l.joins += 1;
            if l.joins == 1 {
                fx.push(log(&l.build, LogWhat::FirstJoin));
            }
            // SPEC §2.1: the pushed SHA is appended (no repeats) and becomes
            // `requested_commit`. A SHA asked for again (a force-push back) moves to the end,
            // so the list stays ordered by when each SHA was last asked for.
            let changed = match t.requested_commit {
                Some(sha) if l.build.requested_commit.as_deref() != Some(sha) => {
                    let b = Arc::make_mut(&mut l.build);
                    b.requested_commits.retain(|c| c != sha);
                    b.requested_commits.push(sha.to_owned());
                    b.requested_commit = Some(sha.to_owned());
                    true
                }
                _ => false,
            };
            // SPEC §2.2: a join restarts the quiet period of a queued build (one that is
            // already eligible waits again), within `max_quiet_period` of its creation.
            let mut moved = false;
            if l.build.phase == Phase::Queued && !t.quiet.period.is_zero() {
                let cap = after(l.build.created_on, t.quiet.max);
                let until = after(now, t.quiet.period).min(cap);
                if until > now && l.build.not_before != Some(until) {
                    if let Some(old) = l.build.not_before {
                        self.waiting.remove(&(old, id));
                    }
                    self.waiting.insert((until, id));
                    Arc::make_mut(&mut l.build).not_before = Some(until);
                    moved = true;
                }
            }
            if changed && let Some(sha) = t.requested_commit {
                fx.push(Effect::Put(Build::clone(&l.build)));
                fx.push(Effect::Tell(
                    Build::clone(&l.build),
                    Tell::Joined(sha.to_owned()),
                ));
            } else if moved {
                // Written, not flushed: losing a moved `not_before` in a crash only lets the
                // build start a little earlier, and nothing the trigger asked for is lost.
                fx.push(Effect::Put(Build::clone(&l.build)));
            }
            let plan = Plan::Joined {
                build: Arc::clone(&l.build),
                needs_flush: changed || !l.on_disk,
            };
            return Ok((plan, fx));
        }
        self.limiter
            .check(&t.target.project, limits, mono)
            .map_err(Refusal::RateLimited)?;
        let mut b = Build::new_queued(
            self.next_seq,
            t.target,
            t.trigger.clone(),
            t.requested_commit.map(str::to_owned),
            t.has_payload,
            now,
        );
        b.exact_commit = t.exact_commit.map(str::to_owned);
        b.redeploy_of = t.redeploy_of;
        if t.exact_commit.is_none() && !t.quiet.period.is_zero() {
            b.not_before = Some(after(now, t.quiet.period).min(after(now, t.quiet.max)));
        }
        Ok((Plan::Create(Box::new(b)), fx))
    }

    /// A planned build is in the store: it joins the queue, counts against the rate limits,
    /// and (for a head build with `cancel_superseded`) supersedes its target's resolved build.
    pub fn created(
        &mut self,
        mut build: Build,
        cancel_superseded: bool,
        mono: Mono,
    ) -> Vec<Effect> {
        let mut fx = vec![
            Effect::Tell(build.clone(), Tell::Queued),
            log(&build, LogWhat::Queued(build.trigger.source)),
        ];
        self.limiter.record(&build.project, mono);
        if cancel_superseded && !build.stands_alone() {
            let target = self.active.get(&build.project).copied().filter(|old| {
                self.live.get(old).is_some_and(|l| {
                    l.resolved && l.stop.is_none() && l.build.is_of(&build.target())
                })
            });
            if let Some(old) = target
                && self.request_stop(old, StopReason::Cancel(CancelReason::Superseded), &mut fx)
                && let Some(l) = self.live.get_mut(&old)
            {
                l.superseded_by = Some(build.id);
                // The old build's SHAs take this build's final state (SPEC §5.2).
                let old_commits = l
                    .build
                    .superseded_commits
                    .iter()
                    .chain(&l.build.requested_commits)
                    .chain(&l.build.commit);
                for sha in old_commits {
                    if !build.superseded_commits.contains(sha) {
                        build.superseded_commits.push(sha.clone());
                    }
                }
                fx.push(Effect::Put(build.clone()));
                fx.push(Effect::Tell(
                    Build::clone(&l.build),
                    Tell::SupersededBy(build.id),
                ));
            }
        }
        self.add(build, false);
        fx
    }

    /// The build's record was flushed: joins of it no longer wait.
    pub fn flushed(&mut self, id: BuildId) {
        if let Some(l) = self.live.get_mut(&id) {
            l.on_disk = true;
        }
    }

    /// Starts queued builds while slots are free: the oldest whose project is idle, at most
    /// `max_concurrent` active in all. Nothing starts while shutting down.
    pub fn schedule(&mut self, max_concurrent: usize, now: Timestamp) -> Vec<Effect> {
        let mut fx = Vec::new();
        if !self.accepting {
            return fx;
        }
        // Quiet periods that have passed: those builds are eligible now (SPEC §2.2).
        while let Some(&(t, id)) = self.waiting.first()
            && t <= now
        {
            self.waiting.pop_first();
            if let Some(l) = self.live.get_mut(&id) {
                Arc::make_mut(&mut l.build).not_before = None;
                fx.push(Effect::Put(Build::clone(&l.build)));
            }
        }
        while self.active.len() < max_concurrent {
            let waiting = |seq: &u64| {
                self.queued.get(seq).is_some_and(|id| {
                    self.live
                        .get(id)
                        .is_some_and(|l| l.build.not_before.is_some())
                })
            };
            let Some(seq) = self
                .queued_by_project
                .iter()
                .filter(|(project, _)| !self.active.contains_key(*project))
                .filter_map(|(_, seqs)| seqs.iter().find(|s| !waiting(s)))
                .min()
                .copied()
            else {
                break;
            };
            let Some(id) = self.queued.get(&seq).copied() else {
                break;
            };
            let Some(l) = self.live.get_mut(&id) else {
                break;
            };
            let project = l.build.project.clone();
            let b = Arc::make_mut(&mut l.build);
            b.phase = Phase::Initializing;
            b.initializing_on = Some(now);
            b.not_before = None;
            let b = b.clone();
            self.dequeue(&project, seq);
            self.active.insert(project, id);
            fx.push(Effect::Put(b.clone()));
            fx.push(Effect::Tell(b.clone(), Tell::Initializing));
            fx.push(log(&b, LogWhat::Initializing));
            fx.push(Effect::Start(b));
        }
        fx
    }

    /// A fetch is starting: triggers joining from now on are covered by it.
    pub fn begin_fetch(&mut self, id: BuildId) {
        if let Some(l) = self.live.get_mut(&id) {
            l.joined_during_fetch = false;
        }
    }

    /// The build's source is resolved. A fetched commit counts only if no trigger joined while
    /// the fetch ran: then this returns false and the runner must fetch again. A workdir
    /// build has nothing to fetch and always resolves.
    pub fn resolve(&mut self, id: BuildId, source: Resolution) -> (bool, Vec<Effect>) {
        let mut fx = Vec::new();
        let Some(l) = self.live.get_mut(&id) else {
            return (true, fx);
        };
        let commit = match source {
            Resolution::Workdir => None,
            Resolution::Fetched(_) if l.joined_during_fetch => {
                l.joined_during_fetch = false;
                return (false, fx);
            }
            Resolution::Fetched(sha) => Some(sha),
        };
        l.resolved = true;
        Arc::make_mut(&mut l.build).commit = commit;
        fx.push(Effect::Put(Build::clone(&l.build)));
        self.unpend(id, &mut fx);
        (true, fx)
    }

    /// The command is running.
    pub fn running(&mut self, id: BuildId, now: Timestamp) -> Vec<Effect> {
        let Some(l) = self.live.get_mut(&id) else {
            return Vec::new();
        };
        if l.build.phase != Phase::Initializing {
            return Vec::new();
        }
        let b = Arc::make_mut(&mut l.build);
        b.phase = Phase::Running;
        b.running_on = Some(now);
        vec![
            Effect::Put(Build::clone(&l.build)),
            Effect::Tell(Build::clone(&l.build), Tell::Running),
            log(&l.build, LogWhat::Running),
        ]
    }

    /// An API cancel (SPEC §4.2): a queued build stops at once; an active one gets a stop
    /// request (unless it has one: the first reason wins) and stops absorbing triggers.
    pub fn cancel(&mut self, id: BuildId, now: Timestamp) -> (CancelStep, Vec<Effect>) {
        let mut fx = Vec::new();
        let Some(phase) = self.live.get(&id).map(|l| l.build.phase) else {
            return (CancelStep::NotLive, fx);
        };
        if phase == Phase::Queued {
            let Some(l) = self.remove(id, &mut fx) else {
                return (CancelStep::NotLive, fx);
            };
            let mut b = Arc::unwrap_or_clone(l.build);
            b.cancel_reason = Some(CancelReason::Api);
            let b = Self::stopped(b, Outcome::Cancelled, None, now, &mut fx);
            return (CancelStep::StoppedNow(Box::new(b)), fx);
        }
        self.request_stop(id, StopReason::Cancel(CancelReason::Api), &mut fx);
        // A cancelled build no longer absorbs triggers: the next one queues anew.
        self.unpend(id, &mut fx);
        (CancelStep::Stopping, fx)
    }

    /// The build is over and every process of it is gone: its outcome is decided here, once,
    /// from what really happened.
    pub fn finish(
        &mut self,
        id: BuildId,
        end: RunEnd,
        log: LogCounts,
        now: Timestamp,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        let Some(l) = self.remove(id, &mut fx) else {
            return fx;
        };
        let (outcome, exit_code) = end.outcome();
        let mut b = Arc::unwrap_or_clone(l.build);
        b.log_lines = log.lines;
        b.log_bytes = log.bytes;
        b.log_truncated = log.truncated;
        match end.stopped_by {
            Some(StopReason::Cancel(reason)) => {
                b.cancel_reason = Some(reason);
                b.superseded_by = match reason {
                    CancelReason::Superseded => l.superseded_by,
                    CancelReason::Api => None,
                };
            }
            _ => {
                b.cancel_reason = None;
                b.superseded_by = None;
            }
        }
        Self::stopped(b, outcome, exit_code, now, &mut fx);
        fx
    }

    /// Stops accepting triggers and starting builds (shutdown's first step). Queued builds
    /// stay queued in the store and resume at the next start.
    pub fn stop_accepting(&mut self) {
        self.accepting = false;
    }

    /// Asks every active build to stop for shutdown (those with no stop request yet).
    pub fn interrupt_active(&mut self) -> Vec<Effect> {
        let mut fx = Vec::new();
        let ids: Vec<BuildId> = self.active.values().copied().collect();
        for id in ids {
            self.request_stop(id, StopReason::Shutdown, &mut fx);
        }
        fx
    }

    /// Startup recovery: queued builds go back in the queue (oldest first); builds a crash
    /// left initializing or running are `interrupted`. `builds` is every stored build.
    pub fn recover(&mut self, mut builds: Vec<Build>, now: Timestamp) -> Vec<Effect> {
        builds.sort_by_key(|b| b.seq);
        let mut fx = Vec::new();
        for b in builds {
            self.next_seq = self.next_seq.max(b.seq + 1);
            match b.phase {
                Phase::Stopped(_) => {}
                // Two queued builds of one target cannot normally exist; if they do, the
                // newer one is the pending one and both still run.
                Phase::Queued => self.add(b, true),
                Phase::Initializing | Phase::Running => {
                    let mut b = b;
                    // A stop request never reached the record; nothing to clear but be sure.
                    b.cancel_reason = None;
                    b.superseded_by = None;
                    Self::stopped(b, Outcome::Interrupted, None, now, &mut fx);
                }
            }
        }
        fx
    }
}

#[cfg(test)]
mod tests;
