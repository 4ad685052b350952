//! The state machine, driven directly: every row of the table in the module doc, the
//! regressions, and a property test of the SPEC §2 invariants under random event sequences.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::model::TriggerSource;

const LIMITS: Limits = Limits {
    daemon: 1_000_000,
    project: 1_000_000,
};

fn target(project: &str, branch: &str) -> Target {
    Target {
        project: project.into(),
        git_ref: GitRef::Branch(branch.into()),
        params: Default::default(),
    }
}

static API: Trigger = Trigger {
    source: TriggerSource::Api,
    hook: None,
};

static PUSH: Trigger = Trigger {
    source: TriggerSource::GitPush,
    hook: None,
};

/// An API trigger of `target` with nothing else; vary it with struct update syntax.
fn input(target: &Target) -> TriggerInput<'_> {
    TriggerInput {
        target,
        trigger: &API,
        requested_commit: None,
        exact_commit: None,
        redeploy_of: None,
        has_payload: false,
        quiet: Quiet::NONE,
    }
}

fn sha(n: u8) -> String {
    format!("{n:02x}").repeat(20)
}

/// A machine plus a simulated store: every `Put` lands in `stored`, and every record ever
/// written is checked against the SPEC §2 invariants.
struct World {
    m: Machine,
    stored: HashMap<BuildId, Build>,
    logs: Vec<LogLine>,
    stops: Vec<(BuildId, StopReason)>,
    starts: Vec<BuildId>,
    stopped: Vec<BuildId>,
    told: Vec<(BuildId, Tell)>,
    /// The last `not_before` written for each build while it was queued: a start must never
    /// come before it.
    not_before: HashMap<BuildId, Option<Timestamp>>,
    now: i64,
}

impl World {
    fn new() -> Self {
        World {
            m: Machine::new(RateLimiter::default()),
            stored: HashMap::new(),
            logs: Vec::new(),
            stops: Vec::new(),
            starts: Vec::new(),
            stopped: Vec::new(),
            told: Vec::new(),
            not_before: HashMap::new(),
            now: 1_000_000,
        }
    }

    fn now(&mut self) -> Timestamp {
        self.now += 1_000;
        Timestamp(self.now)
    }

    fn apply(&mut self, fx: Vec<Effect>) {
        for e in fx {
            match e {
                Effect::Put(b) => {
                    if let Err(why) = b.check_invariants() {
                        panic!("a written record breaks an invariant: {why}: {b:?}");
                    }
                    if b.phase == Phase::Queued {
                        self.not_before.insert(b.id, b.not_before);
                    }
                    if let Some(old) = self.stored.get(&b.id) {
                        assert!(
                            !old.phase.is_stopped(),
                            "a stopped build was written again: {old:?} -> {b:?}"
                        );
                    }
                    self.stored.insert(b.id, b);
                }
                Effect::Stop(id, r) => self.stops.push((id, r)),
                Effect::Start(b) => {
                    // SPEC §2.2: nothing starts before its quiet period is over.
                    if let Some(Some(t)) = self.not_before.get(&b.id) {
                        assert!(t.0 <= self.now, "started before its not_before: {b:?}");
                    }
                    self.starts.push(b.id);
                }
                Effect::Stopped(b) => self.stopped.push(b.id),
                Effect::CountStopped { .. } => {}
                Effect::Log(l) => self.logs.push(l),
                Effect::Tell(b, t) => self.told.push((b.id, t)),
            }
        }
    }

    /// A trigger as the queue runs it: plan, insert, created, schedule.
    fn trigger_with(&mut self, t: &TriggerInput<'_>, max: usize) -> Result<(Build, bool), Refusal> {
        let now = self.now();
        let mono = self.m.limiter.now();
        let (plan, fx) = self.m.trigger(t, LIMITS, mono, now)?;
        self.apply(fx);
        match plan {
            Plan::Joined { build, .. } => Ok((Arc::unwrap_or_clone(build), true)),
            Plan::Create(b) => {
                let b = *b;
                self.apply(vec![Effect::Put(b.clone())]);
                let fx = self.m.created(b.clone(), true, mono);
                self.apply(fx);
                let now = self.now();
                let fx = self.m.schedule(max, now);
                self.apply(fx);
                Ok((b, false))
            }
        }
    }

    fn trigger(&mut self, t: &Target, commit: Option<&str>) -> (Build, bool) {
        let trig = if commit.is_some() { &PUSH } else { &API };
        let input = TriggerInput {
            trigger: trig,
            requested_commit: commit,
            ..input(t)
        };
        self.trigger_with(&input, 2).expect("accepted")
    }

    fn resolve(&mut self, id: BuildId, sha: Option<&str>) -> bool {
        let r = match sha {
            Some(s) => Resolution::Fetched(s.to_owned()),
            None => Resolution::Workdir,
        };
        let (ok, fx) = self.m.resolve(id, r);
        self.apply(fx);
        ok
    }

    fn running(&mut self, id: BuildId) {
        let now = self.now();
        let fx = self.m.running(id, now);
        self.apply(fx);
    }

    fn finish(&mut self, id: BuildId, end: RunEnd) {
        let now = self.now();
        let fx = self.m.finish(id, end, LogCounts::default(), now);
        self.apply(fx);
        let now = self.now();
        let fx = self.m.schedule(2, now);
        self.apply(fx);
    }

    fn cancel(&mut self, id: BuildId) -> CancelStep {
        let now = self.now();
        let (step, fx) = self.m.cancel(id, now);
        self.apply(fx);
        step
    }

    fn stored(&self, id: BuildId) -> &Build {
        &self.stored[&id]
    }
}

/// Asserts that the only stop requested so far is the supersede of `id`.
fn assert_only_superseded(w: &World, id: BuildId) {
    assert_eq!(
        w.stops,
        vec![(id, StopReason::Cancel(CancelReason::Superseded))]
    );
}

fn exited(code: i32) -> RunEnd {
    RunEnd {
        stopped_by: None,
        exit: Exit::Code(code),
    }
}

fn stopped_by(r: StopReason) -> RunEnd {
    RunEnd {
        stopped_by: Some(r),
        exit: Exit::Signal(15),
    }
}

#[test]
fn a_trigger_creates_a_build_and_the_next_one_joins_it() {
    let mut w = World::new();
    // Fill the project's slot so the next builds stay queued.
    let (running, _) = w.trigger(&target("a", "dev"), None);
    let t = target("a", "main");
    let (b, joined) = w.trigger(&t, None);
    assert!(!joined);
    assert_eq!(w.stored(b.id).phase, Phase::Queued);
    let now = w.now();
    let mono = w.m.limiter.now();
    let input = TriggerInput {
        has_payload: true,
        ..input(&t)
    };
    // Not yet known to be flushed: a join must wait for a flush too.
    match w.m.trigger(&input, LIMITS, mono, now).unwrap().0 {
        Plan::Joined { build, needs_flush } => {
            assert_eq!(build.id, b.id);
            assert!(needs_flush);
        }
        other => panic!("expected a join, got {other:?}"),
    }
    w.m.flushed(b.id);
    match w.m.trigger(&input, LIMITS, mono, now).unwrap().0 {
        Plan::Joined { needs_flush, .. } => assert!(!needs_flush, "a plain join is I/O-free"),
        other => panic!("expected a join, got {other:?}"),
    }
    assert!(w.m.is_live(running.id));
}

#[test]
fn a_join_appends_the_pushed_sha_and_makes_it_the_requested_commit() {
    let mut w = World::new();
    w.trigger(&target("a", "dev"), None); // occupies project a
    let t = target("a", "main");
    let (b, _) = w.trigger(&t, Some(&sha(1)));
    assert_eq!(b.requested_commits, vec![sha(1)]);
    w.m.flushed(b.id);
    let (j, joined) = w.trigger(&t, Some(&sha(2)));
    assert!(joined);
    assert_eq!(j.requested_commit.as_deref(), Some(sha(2).as_str()));
    assert_eq!(j.requested_commits, vec![sha(1), sha(2)]);
    // Written, so the answer can wait for it to be durable.
    assert_eq!(w.stored(b.id).requested_commits, vec![sha(1), sha(2)]);
    // The same SHA again: nothing changes, nothing is written, no flush is needed.
    let mono = w.m.limiter.now();
    let s2 = sha(2);
    let input = TriggerInput {
        trigger: &PUSH,
        requested_commit: Some(&s2),
        ..input(&t)
    };
    let (plan, fx) = w.m.trigger(&input, LIMITS, mono, Timestamp(0)).unwrap();
    assert!(!fx.iter().any(|e| matches!(e, Effect::Put(_))));
    assert!(matches!(
        plan,
        Plan::Joined {
            needs_flush: false,
            ..
        }
    ));
    // A hook trigger (no SHA) leaves the commits alone.
    let (j, _) = w.trigger(&t, None);
    assert_eq!(j.requested_commits, vec![sha(1), sha(2)]);
    // An older SHA pushed again (force-push back) is the newest ask: it moves to the end.
    let (j, _) = w.trigger(&t, Some(&sha(1)));
    assert_eq!(j.requested_commits, vec![sha(2), sha(1)]);
    assert_eq!(j.requested_commit.as_deref(), Some(sha(1).as_str()));
}

#[test]
fn exact_commit_builds_never_join_are_never_joined_and_supersede_nothing() {
    let mut w = World::new();
    let t = target("a", "main");
    let (head, _) = w.trigger(&t, None);
    assert!(w.starts.contains(&head.id));
    assert!(w.resolve(head.id, Some(&sha(1))));
    w.running(head.id);
    let c = sha(9);
    let input = TriggerInput {
        exact_commit: Some(&c),
        redeploy_of: Some(head.id),
        ..input(&t)
    };
    let (r1, j1) = w.trigger_with(&input, 2).unwrap();
    let (r2, j2) = w.trigger_with(&input, 2).unwrap();
    assert!(!j1 && !j2 && r1.id != r2.id, "never joins");
    assert_eq!(r1.exact_commit.as_deref(), Some(c.as_str()));
    assert_eq!(r1.redeploy_of, Some(head.id));
    assert!(
        w.stops.is_empty(),
        "a rollback supersedes nothing: {:?}",
        w.stops
    );
    // A head trigger is not joined into the rollback: it is a new build, and it supersedes
    // the running head build.
    let (h2, joined) = w.trigger(&t, None);
    assert!(!joined && h2.id != r1.id && h2.id != r2.id);
    assert_only_superseded(&w, head.id);
}

#[test]
fn rate_limits_count_new_builds_only_and_refusals_leave_nothing() {
    let mut w = World::new();
    let limits = Limits {
        daemon: 100,
        project: 1,
    };
    let t = target("a", "main");
    let mono = w.m.limiter.now();
    let input = input(&t);
    let (plan, _) = w.m.trigger(&input, limits, mono, Timestamp(1)).unwrap();
    let Plan::Create(b) = plan else {
        panic!("expected a new build")
    };
    w.m.created(*b, true, mono);
    // Joins never count.
    for _ in 0..5 {
        assert!(matches!(
            w.m.trigger(&input, limits, mono, Timestamp(1)).unwrap().0,
            Plan::Joined { .. }
        ));
    }
    let other = target("a", "dev");
    let input = TriggerInput {
        target: &other,
        ..input
    };
    assert!(matches!(
        w.m.trigger(&input, limits, mono, Timestamp(1)),
        Err(Refusal::RateLimited(_))
    ));
    assert_eq!(w.m.counts(), (1, 0));
}

#[test]
fn shutting_down_refuses_triggers_and_starts_nothing() {
    let mut w = World::new();
    let (b, _) = w.trigger(&target("a", "main"), None);
    let (q, _) = w.trigger(&target("a", "dev"), None);
    w.m.stop_accepting();
    let t = target("b", "main");
    let input = input(&t);
    assert!(matches!(
        w.m.trigger(&input, LIMITS, Mono(0), Timestamp(0)),
        Err(Refusal::ShuttingDown)
    ));
    let fx = w.m.interrupt_active();
    assert_eq!(fx[0], Effect::Stop(b.id, StopReason::Shutdown));
    w.apply(fx);
    w.finish(b.id, stopped_by(StopReason::Shutdown));
    assert_eq!(w.stored(b.id).phase, Phase::Stopped(Outcome::Interrupted));
    assert_eq!(
        w.stored(q.id).phase,
        Phase::Queued,
        "stays queued for the next start"
    );
    assert!(!w.starts.contains(&q.id));
}

#[test]
fn the_scheduler_takes_the_oldest_idle_project_within_the_limit() {
    let mut w = World::new();
    let mut ids = Vec::new();
    for (p, b) in [("a", "main"), ("a", "dev"), ("b", "main"), ("c", "main")] {
        let now = w.now();
        let t = target(p, b);
        let input = input(&t);
        let Plan::Create(build) = w.m.trigger(&input, LIMITS, Mono(0), now).unwrap().0 else {
            panic!()
        };
        ids.push(build.id);
        let fx = w.m.created(*build, true, Mono(0));
        w.apply(fx);
    }
    let fx = w.m.schedule(2, Timestamp(5));
    w.apply(fx);
    // a's first build and b's: a is busy, so its second waits; two slots in all.
    assert_eq!(w.starts, vec![ids[0], ids[2]]);
    assert_eq!(w.stored(ids[0]).phase, Phase::Initializing);
    assert_eq!(w.stored(ids[0]).initializing_on, Some(Timestamp(5)));
    assert_eq!(w.m.counts(), (2, 2));
    let fx = w.m.schedule(3, Timestamp(6));
    w.apply(fx);
    assert_eq!(w.starts, vec![ids[0], ids[2], ids[3]]);
    w.finish(ids[0], exited(0));
    // finish schedules with 2 slots: a's second build waits for a slot (b and c run).
    assert_eq!(w.m.counts(), (1, 2));
    w.finish(ids[2], exited(0));
    assert_eq!(w.starts.last(), Some(&ids[1]));
}

#[test]
fn a_join_during_the_fetch_makes_the_runner_fetch_again_and_leaving_pending_logs_the_count() {
    let mut w = World::new();
    let t = target("a", "main");
    let (b, _) = w.trigger(&t, Some(&sha(1)));
    w.m.begin_fetch(b.id);
    let (_, joined) = w.trigger(&t, Some(&sha(2)));
    assert!(joined, "still pending while initializing and unresolved");
    assert!(!w.resolve(b.id, Some(&sha(1))), "fetch again");
    w.m.begin_fetch(b.id);
    assert!(w.resolve(b.id, Some(&sha(2))));
    assert_eq!(w.stored(b.id).commit.as_deref(), Some(sha(2).as_str()));
    assert!(
        w.logs
            .iter()
            .any(|l| l.build == b.id && l.what == LogWhat::Absorbed(1))
    );
    // Resolved: no longer pending, a new trigger makes a new build and supersedes it.
    let (n, joined) = w.trigger(&t, None);
    assert!(!joined && n.id != b.id);
    assert_only_superseded(&w, b.id);
}

#[test]
fn supersede_reaches_only_the_resolved_build_of_the_same_target_and_the_first_reason_wins() {
    let mut w = World::new();
    let t = target("a", "main");
    let (b, _) = w.trigger(&t, None);
    // Initializing but unresolved: a trigger joins instead of superseding.
    assert!(w.trigger(&t, None).1);
    assert!(w.stops.is_empty());
    w.resolve(b.id, None);
    w.running(b.id);
    // Another branch of the same project: no supersede.
    w.trigger(&target("a", "dev"), None);
    // Other params are another target: no supersede either.
    let mut with_params = t.clone();
    with_params.params.insert("env".into(), "prod".into());
    w.trigger(&with_params, None);
    assert!(w.stops.is_empty());
    let (n, _) = w.trigger(&t, None);
    assert_only_superseded(&w, b.id);
    // The stored record says nothing of it until the build stops.
    assert_eq!(w.stored(b.id).cancel_reason, None);
    assert_eq!(w.stored(b.id).superseded_by, None);
    // A later API cancel does not replace the first reason.
    assert!(matches!(w.cancel(b.id), CancelStep::Stopping));
    assert_eq!(w.stops.len(), 1);
    w.finish(
        b.id,
        stopped_by(StopReason::Cancel(CancelReason::Superseded)),
    );
    let s = w.stored(b.id);
    assert_eq!(s.phase, Phase::Stopped(Outcome::Cancelled));
    assert_eq!(s.cancel_reason, Some(CancelReason::Superseded));
    assert_eq!(s.superseded_by, Some(n.id));
    assert_eq!(s.exit_code, None);
}

/// Regression (outside review, 3 of 3): a trigger arriving while a finished build's workspace
/// was being cleaned up stored `success`, exit 0 *and* `cancel_reason: superseded`.
#[test]
fn a_build_that_exited_0_before_a_late_supersede_is_success_without_cancel_fields() {
    let mut w = World::new();
    let t = target("a", "main");
    let (b, _) = w.trigger(&t, None);
    w.resolve(b.id, Some(&sha(1)));
    w.running(b.id);
    // The command exits 0; before the runner reports, a new trigger supersedes the build.
    w.trigger(&t, None);
    assert_eq!(w.stops.len(), 1);
    // The runner did not act on the request: its command had already exited.
    w.finish(b.id, exited(0));
    let s = w.stored(b.id);
    assert_eq!(s.phase, Phase::Stopped(Outcome::Success));
    assert_eq!(s.exit_code, Some(0));
    assert_eq!(s.cancel_reason, None);
    assert_eq!(s.superseded_by, None);
}

#[test]
fn changes_are_told_to_the_outbox_and_superseded_shas_pass_to_the_newer_build() {
    let mut w = World::new();
    let t = target("a", "main");
    let (a, _) = w.trigger(&t, Some(&sha(1)));
    w.resolve(a.id, Some(&sha(1)));
    w.running(a.id);
    let (b, _) = w.trigger(&t, Some(&sha(2)));
    w.m.flushed(b.id);
    // b is queued behind a (same project); a push joins it.
    w.trigger(&t, Some(&sha(3)));
    assert_eq!(
        w.told,
        vec![
            (a.id, Tell::Queued),
            (a.id, Tell::Initializing),
            (a.id, Tell::Running),
            (b.id, Tell::Queued),
            (a.id, Tell::SupersededBy(b.id)),
            (b.id, Tell::Joined(sha(3))),
        ]
    );
    assert_eq!(w.stored(b.id).superseded_commits, vec![sha(1)]);
    // Chains pass on: c supersedes b, and inherits a's SHA and b's own.
    w.finish(
        a.id,
        stopped_by(StopReason::Cancel(CancelReason::Superseded)),
    );
    assert!(w.told.contains(&(a.id, Tell::Stopped)));
    w.resolve(b.id, Some(&sha(3)));
    let (c, _) = w.trigger(&t, Some(&sha(4)));
    assert_eq!(
        w.stored(c.id).superseded_commits,
        vec![sha(1), sha(2), sha(3)]
    );
}

#[test]
fn cancel_stops_a_queued_build_at_once_and_asks_an_active_one_to_stop() {
    let mut w = World::new();
    let (active, _) = w.trigger(&target("a", "main"), None);
    let (queued, _) = w.trigger(&target("a", "dev"), None);
    match w.cancel(queued.id) {
        CancelStep::StoppedNow(b) => {
            assert_eq!(b.phase, Phase::Stopped(Outcome::Cancelled));
            assert_eq!(b.cancel_reason, Some(CancelReason::Api));
            assert_eq!(&*b, w.stored(queued.id));
        }
        other => panic!("expected StoppedNow, got {other:?}"),
    }
    assert!(w.stopped.contains(&queued.id));
    assert!(matches!(w.cancel(queued.id), CancelStep::NotLive));
    assert!(matches!(w.cancel(active.id), CancelStep::Stopping));
    assert_eq!(
        w.stops,
        vec![(active.id, StopReason::Cancel(CancelReason::Api))]
    );
    // Cancelled, it no longer absorbs triggers.
    assert!(!w.trigger(&target("a", "main"), None).1);
    w.finish(active.id, stopped_by(StopReason::Cancel(CancelReason::Api)));
    let s = w.stored(active.id);
    assert_eq!(
        (s.phase, s.cancel_reason, s.superseded_by),
        (
            Phase::Stopped(Outcome::Cancelled),
            Some(CancelReason::Api),
            None
        )
    );
}

#[test]
fn finish_decides_every_outcome_from_what_happened() {
    for (end, outcome, code) in [
        (exited(0), Outcome::Success, Some(0)),
        (exited(2), Outcome::Fail, Some(2)),
        (
            RunEnd {
                stopped_by: None,
                exit: Exit::Signal(9),
            },
            Outcome::Fail,
            None,
        ),
        (
            RunEnd {
                stopped_by: None,
                exit: Exit::Failed,
            },
            Outcome::Fail,
            None,
        ),
        (stopped_by(StopReason::Timeout), Outcome::TimedOut, None),
        (stopped_by(StopReason::Shutdown), Outcome::Interrupted, None),
        (
            RunEnd {
                stopped_by: Some(StopReason::Timeout),
                exit: Exit::Code(0),
            },
            Outcome::TimedOut,
            None,
        ),
    ] {
        let mut w = World::new();
        let (b, _) = w.trigger(&target("a", "main"), None);
        w.resolve(b.id, None);
        w.running(b.id);
        w.finish(b.id, end);
        let s = w.stored(b.id);
        assert_eq!(
            (s.phase, s.exit_code),
            (Phase::Stopped(outcome), code),
            "{end:?}"
        );
        assert!(s.stopped_on.is_some() && s.running_on.is_some());
        assert!(!w.m.is_live(b.id));
        // A second report of the same end changes nothing.
        let fx = w.m.finish(b.id, end, LogCounts::default(), Timestamp(0));
        assert!(fx.is_empty());
    }
}

#[test]
fn recovery_requeues_queued_builds_and_interrupts_those_in_progress() {
    let mut w = World::new();
    let (a, _) = w.trigger(&target("a", "main"), None);
    w.resolve(a.id, None);
    w.running(a.id);
    let (q1, _) = w.trigger(&target("a", "dev"), None);
    let (q2, _) = w.trigger(&target("a", "x"), None);
    let stored: Vec<Build> = w.stored.values().cloned().collect();
    let mut r = World::new();
    let fx = r.m.recover(stored, Timestamp(9));
    r.apply(fx);
    let s = r.stored(a.id);
    assert_eq!(s.phase, Phase::Stopped(Outcome::Interrupted));
    assert_eq!(s.stopped_on, Some(Timestamp(9)));
    assert!(r.m.is_live(q1.id) && r.m.is_live(q2.id));
    let fx = r.m.schedule(2, Timestamp(10));
    r.apply(fx);
    assert_eq!(r.starts, vec![q1.id], "oldest first, one per project");
    // Sequence numbers continue after the stored ones.
    let (n, _) = r.trigger(&target("b", "main"), None);
    assert!(n.seq > q2.seq);
    // The recovered queued build is still the pending one of its target.
    assert!(r.trigger(&target("a", "x"), None).1);
}

#[test]
fn prune_plan_keeps_the_newest_and_every_live_build() {
    let mut w = World::new();
    let (live, _) = w.trigger(&target("a", "main"), None);
    let old: Vec<BuildId> = (0..3).map(|_| BuildId::new()).collect();
    let mut ids = vec![BuildId::new(), BuildId::new()];
    ids.push(live.id);
    ids.extend(old.iter().copied());
    assert_eq!(w.m.prune_plan(&ids, 2), old);
}

/// HOSTILE 27: a leaked hook URL hammered while its build is pending writes a handful of log
/// lines, not one per request.
#[test]
fn ten_thousand_joins_write_two_log_lines() {
    let mut w = World::new();
    let t = target("a", "main");
    let (b, _) = w.trigger(&t, None);
    w.m.flushed(b.id);
    let before = w.logs.len();
    for _ in 0..10_000 {
        assert!(w.trigger(&t, None).1);
    }
    w.resolve(b.id, None);
    let lines: Vec<&LogLine> = w.logs[before..].iter().collect();
    assert_eq!(
        lines.iter().map(|l| &l.what).collect::<Vec<_>>(),
        vec![&LogWhat::FirstJoin, &LogWhat::Absorbed(10_000)],
    );
}

// ---- quiet period (SPEC §2.2) -----------------------------------------------------------

const QUIET: Quiet = Quiet {
    period: Duration::from_secs(10),
    max: Duration::from_secs(25),
};

const SEC: i64 = 1_000_000;

/// A trigger with [`QUIET`] at the world's current time (not advancing it); returns the
/// build, whether it joined, and the trigger's own effects.
fn quiet_trigger(w: &mut World, t: &Target, exact: Option<&str>) -> (Build, bool, Vec<Effect>) {
    let input = TriggerInput {
        exact_commit: exact,
        quiet: QUIET,
        ..input(t)
    };
    let now = Timestamp(w.now);
    let mono = w.m.limiter.now();
    let (plan, fx) = w.m.trigger(&input, LIMITS, mono, now).expect("accepted");
    let effects = fx.clone();
    w.apply(fx);
    match plan {
        Plan::Joined { build, .. } => (Arc::unwrap_or_clone(build), true, effects),
        Plan::Create(b) => {
            let b = *b;
            w.apply(vec![Effect::Put(b.clone())]);
            let fx = w.m.created(b.clone(), true, mono);
            w.apply(fx);
            let fx = w.m.schedule(2, now);
            w.apply(fx);
            (b, false, effects)
        }
    }
}

/// A new world in which a quiet trigger of `a`/`main` has just created a build: the world,
/// the target, when the build was created, and the build.
fn one_quiet_build() -> (World, Target, i64, Build) {
    let mut w = World::new();
    let t = target("a", "main");
    let created = w.now;
    let (b, joined, _) = quiet_trigger(&mut w, &t, None);
    assert!(!joined, "the first trigger creates its build");
    (w, t, created, b)
}

#[test]
fn a_quiet_build_waits_until_no_trigger_joined_it_for_the_quiet_period() {
    let (mut w, t, created, b) = one_quiet_build();
    assert_eq!(b.not_before, Some(Timestamp(created + 10 * SEC)));
    assert!(
        w.starts.is_empty(),
        "it must not start during its quiet period"
    );
    assert_eq!(w.m.next_wake(), Some(Timestamp(created + 10 * SEC)));

    // A join 4 s later pushes it to join + 10 s, and the move is written.
    w.now = created + 4 * SEC;
    let (j, joined, fx) = quiet_trigger(&mut w, &t, None);
    assert!(joined);
    assert_eq!(j.id, b.id);
    assert_eq!(j.not_before, Some(Timestamp(created + 14 * SEC)));
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Put(p) if p.not_before == j.not_before))
    );
    assert_eq!(
        w.stored(b.id).not_before,
        Some(Timestamp(created + 14 * SEC))
    );
    assert_eq!(w.m.next_wake(), Some(Timestamp(created + 14 * SEC)));

    // The scheduler passes over it before then...
    w.now = created + 13 * SEC;
    let fx = w.m.schedule(2, Timestamp(w.now));
    assert!(fx.is_empty(), "{fx:?}");
    // ...and starts it once the time has come, with not_before cleared.
    w.now = created + 14 * SEC;
    let fx = w.m.schedule(2, Timestamp(w.now));
    w.apply(fx);
    assert_eq!(w.starts, vec![b.id]);
    assert_eq!(w.stored(b.id).phase, Phase::Initializing);
    assert_eq!(w.stored(b.id).not_before, None);
    assert_eq!(w.m.next_wake(), None);
}

#[test]
fn joins_never_push_a_quiet_build_past_its_max_quiet_period() {
    let (mut w, t, created, b) = one_quiet_build();
    // A never-ending burst: a join every 2 s for a minute.
    for i in 1..30 {
        w.now = created + i * 2 * SEC;
        let fx = w.m.schedule(2, Timestamp(w.now));
        w.apply(fx);
        if !w.starts.is_empty() {
            break;
        }
        let (j, _, _) = quiet_trigger(&mut w, &t, None);
        assert!(j.not_before.unwrap().0 <= created + 25 * SEC, "{j:?}");
    }
    assert_eq!(
        w.starts,
        vec![b.id],
        "the cap must let it start during the burst"
    );
    let started = w.stored(b.id).initializing_on.unwrap().0;
    assert!(
        (created + 25 * SEC..=created + 26 * SEC).contains(&started),
        "{started}"
    );
}

#[test]
fn a_join_that_changes_nothing_writes_nothing_and_exact_commit_builds_never_wait() {
    let (mut w, t, _, b) = one_quiet_build();
    // A join a second later moves not_before (a write); a second join at the very same
    // instant moves nothing and has no effect at all.
    w.now += SEC;
    let (_, _, fx) = quiet_trigger(&mut w, &t, None);
    assert!(fx.iter().any(|e| matches!(e, Effect::Put(_))), "{fx:?}");
    let (_, joined, fx) = quiet_trigger(&mut w, &t, None);
    assert!(joined);
    assert!(fx.is_empty(), "{fx:?}");
    // An exact-commit build of the same target does not wait: it starts at once, passing
    // the waiting build over.
    let pinned = sha(9);
    let (e, joined, _) = quiet_trigger(&mut w, &t, Some(&pinned));
    assert!(!joined);
    assert_eq!(e.not_before, None);
    assert_eq!(w.starts, vec![e.id]);
    assert_eq!(w.stored(b.id).phase, Phase::Queued);
}

#[test]
fn cancelling_a_waiting_build_forgets_its_wake_and_recovery_keeps_waiting() {
    let mut w = World::new();
    let (a, _, _) = quiet_trigger(&mut w, &target("a", "main"), None);
    w.now += SEC;
    let (b, _, _) = quiet_trigger(&mut w, &target("b", "main"), None);
    assert!(matches!(w.cancel(a.id), CancelStep::StoppedNow(_)));
    assert_eq!(w.stored(a.id).not_before, None);
    assert_eq!(w.m.next_wake(), b.not_before);
    // After a restart the stored not_before still holds, and passes as before.
    let stored: Vec<Build> = w.stored.values().cloned().collect();
    let mut r = World::new();
    r.now = w.now;
    let fx = r.m.recover(stored, Timestamp(r.now));
    r.apply(fx);
    assert_eq!(r.m.next_wake(), b.not_before);
    let fx = r.m.schedule(2, Timestamp(r.now));
    assert!(fx.is_empty(), "{fx:?}");
    r.now = b.not_before.unwrap().0;
    let fx = r.m.schedule(2, Timestamp(r.now));
    r.apply(fx);
    assert_eq!(r.starts, vec![b.id]);
}

// ---- property test -------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Trigger {
        target: usize,
        commit: Option<u8>,
        exact: bool,
        /// With the proptest's quiet period ([`PROP_QUIET`]).
        quiet: bool,
    },
    Schedule,
    /// Let this many milliseconds pass.
    Advance(u8),
    BeginFetch(usize),
    Resolve(usize, bool),
    Running(usize),
    /// Finish a live build; `acts`: the runner acted on its stop request (if it had one);
    /// `exit`: the command's status otherwise.
    Finish {
        pick: usize,
        acts: bool,
        timeout: bool,
        exit: i32,
    },
    Cancel(usize),
    Interrupt,
    Flushed(usize),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize, proptest::option::of(0..4u8), proptest::bool::weighted(0.15), any::<bool>())
            .prop_map(|(target, commit, exact, quiet)| Op::Trigger { target, commit, exact, quiet }),
        1 => (0..8u8).prop_map(Op::Advance),
        1 => Just(Op::Schedule),
        1 => any::<usize>().prop_map(Op::BeginFetch),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(p, w)| Op::Resolve(p, w)),
        2 => any::<usize>().prop_map(Op::Running),
        3 => (any::<usize>(), any::<bool>(), proptest::bool::weighted(0.1), 0..3i32)
            .prop_map(|(pick, acts, timeout, exit)| Op::Finish { pick, acts, timeout, exit }),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => proptest::bool::weighted(0.05).prop_map(|_| Op::Interrupt),
        1 => any::<usize>().prop_map(Op::Flushed),
        1 => proptest::bool::weighted(0.05).prop_map(|_| Op::Restart),
    ]
}

/// The quiet period of the proptest's quiet triggers: a few of its 1 ms steps.
const PROP_QUIET: Quiet = Quiet {
    period: Duration::from_millis(3),
    max: Duration::from_millis(8),
};

const TARGETS: [(&str, &str); 4] = [("a", "main"), ("a", "dev"), ("b", "main"), ("a", "main")];

fn pick(w: &World, n: usize) -> Option<BuildId> {
    let mut ids = w.m.live_ids();
    ids.sort();
    (!ids.is_empty()).then(|| ids[n % ids.len()])
}

/// The machine's own view stays consistent: one pending build per target, one active build
/// per project, no more active builds than slots, and every live record keeps the invariants.
fn check_machine(w: &World, max: usize) {
    let m = &w.m;
    assert!(m.active.len() <= max || !m.accepting);
    let mut pending_targets = HashMap::new();
    for (target, id) in &m.pending {
        let l = &m.live[id];
        assert!(l.build.is_of(target));
        assert!(!l.resolved && !l.build.stands_alone());
        assert!(pending_targets.insert(target.clone(), *id).is_none());
    }
    for (project, id) in &m.active {
        let l = &m.live[id];
        assert_eq!(&l.build.project, project);
        assert!(matches!(
            l.build.phase,
            Phase::Initializing | Phase::Running
        ));
    }
    for (id, l) in &m.live {
        l.build.check_invariants().unwrap();
        assert!(!l.build.phase.is_stopped());
        if l.build.phase == Phase::Queued {
            assert_eq!(m.queued.get(&l.build.seq), Some(id));
        }
        if l.superseded_by.is_some() {
            assert_eq!(l.stop, Some(StopReason::Cancel(CancelReason::Superseded)));
        }
        // The stored copy agrees with the live one.
        assert_eq!(w.stored.get(id).map(|b| b.phase), Some(l.build.phase));
    }
    assert_eq!(
        m.queued.len(),
        m.queued_by_project.values().map(|s| s.len()).sum::<usize>()
    );
    // The quiet-period index is exactly the queued builds that still wait, each never past
    // its cap, and every move of `not_before` was written.
    let waiting: std::collections::BTreeSet<(Timestamp, BuildId)> = m
        .live
        .values()
        .filter_map(|l| l.build.not_before.map(|t| (t, l.build.id)))
        .collect();
    assert_eq!(waiting, m.waiting);
    for l in m.live.values() {
        if let Some(t) = l.build.not_before {
            assert_eq!(l.build.phase, Phase::Queued);
            assert!(l.build.exact_commit.is_none());
            assert!(
                t <= after(l.build.created_on, PROP_QUIET.max),
                "{:?}",
                l.build
            );
        }
        assert_eq!(
            w.stored.get(&l.build.id).map(|b| b.not_before),
            Some(l.build.not_before),
            "a not_before change was not written"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn stored_builds_never_contradict_themselves(ops in proptest::collection::vec(op(), 1..120)) {
        let max = 2;
        let mut w = World::new();
        for op in ops {
            match op {
                Op::Trigger { target, commit, exact, quiet } => {
                    let (p, b) = TARGETS[target];
                    let t = crate::machine::tests::target(p, b);
                    let c = commit.map(sha);
                    let pinned = exact.then(|| sha(200));
                    let trig = &PUSH;
                    let input = TriggerInput {
                        trigger: trig,
                        requested_commit: c.as_deref(),
                        exact_commit: pinned.as_deref(),
                        quiet: if quiet { PROP_QUIET } else { Quiet::NONE },
                        ..input(&t)
                    };
                    let _ = w.trigger_with(&input, max);
                }
                Op::Advance(ms) => w.now += i64::from(ms) * 1_000,
                Op::Schedule => {
                    let now = w.now();
                    let fx = w.m.schedule(max, now);
                    w.apply(fx);
                }
                Op::BeginFetch(n) => {
                    if let Some(id) = pick(&w, n) {
                        w.m.begin_fetch(id);
                    }
                }
                Op::Resolve(n, with_commit) => {
                    if let Some(id) = pick(&w, n)
                        && w.m.build(id).is_some_and(|b| b.phase == Phase::Initializing)
                    {
                        let s = sha(50);
                        w.resolve(id, with_commit.then_some(s.as_str()));
                    }
                }
                Op::Running(n) => {
                    if let Some(id) = pick(&w, n) {
                        w.running(id);
                    }
                }
                Op::Finish { pick: n, acts, timeout, exit } => {
                    if let Some(id) = pick(&w, n)
                        && w.m.build(id).is_some_and(|b| b.phase != Phase::Queued)
                    {
                        let stopped_by = if timeout {
                            Some(StopReason::Timeout)
                        } else if acts {
                            w.m.stop_request(id)
                        } else {
                            None
                        };
                        w.finish(id, RunEnd { stopped_by, exit: Exit::Code(exit) });
                    }
                }
                Op::Cancel(n) => {
                    if let Some(id) = pick(&w, n) {
                        w.cancel(id);
                    }
                }
                Op::Interrupt => {
                    w.m.stop_accepting();
                    let fx = w.m.interrupt_active();
                    w.apply(fx);
                }
                Op::Flushed(n) => {
                    if let Some(id) = pick(&w, n) {
                        w.m.flushed(id);
                    }
                }
                Op::Restart => {
                    let stored: Vec<Build> = w.stored.values().cloned().collect();
                    let mut r = World::new();
                    r.stored = w.stored.clone();
                    r.not_before = w.not_before.clone();
                    r.now = w.now;
                    let fx = r.m.recover(stored, Timestamp(r.now));
                    r.apply(fx);
                    w = r;
                }
            }
            check_machine(&w, max);
        }
        for b in w.stored.values() {
            prop_assert!(b.check_invariants().is_ok(), "{:?}", b);
        }
    }
}
