//! Rolling-window rate limits on new builds (SPEC §2 "Rate limits").
//!
//! Every new build (never a deduplicated trigger) is an *event* for its project and for the
//! daemon. A trigger passes when fewer than `limit` events of each scope fall in the last
//! [`WINDOW`]; otherwise it is refused with the exact wait until enough of the oldest events
//! leave the window.
//!
//! # Clocks
//! Decisions use monotonic time ([`Mono`], microseconds since this limiter was created), so a
//! wall-clock step while the daemon runs changes no window. Events must also survive a restart
//! or a `kill -9`, and no monotonic clock does, so the store keeps each event's *wall-clock*
//! time; at start, [`RateLimiter::restore`] turns each into its age and places it that far in
//! the monotonic past. Only across a restart can a wall-clock step matter: a clock set back
//! makes old events look new (they count for the whole window again: never too permissive),
//! one set forward makes them look expired.
//!
//! The rules live in [`Windows`], which is pure (no clock reads, no I/O): every method takes
//! `now`, which is how the unit tests below drive it. [`RateLimiter`] is the thin shell the
//! queue holds: those windows plus the origin of [`Mono`], read in one place,
//! [`RateLimiter::now`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::model::Timestamp;

/// Length of the rolling window.
pub const WINDOW: Duration = Duration::from_secs(60);

const WINDOW_MICROS: i64 = 60_000_000;

/// A monotonic instant: microseconds since the limiter's origin (negative for events restored
/// from before this process started).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mono(pub i64);

/// The limits in force for one trigger (read from the config at that moment, so a reload
/// applies to the next trigger).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `builds_per_minute`: the whole daemon.
    pub daemon: u32,
    /// The project's `project_builds_per_minute`.
    pub project: u32,
}

/// Which limit refused a trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The project's limit.
    Project {
        /// The project.
        name: String,
        /// Its `project_builds_per_minute`.
        limit: u32,
    },
    /// The daemon's `builds_per_minute`.
    Daemon {
        /// The limit.
        limit: u32,
    },
}

/// A refused trigger: which limit, and how long until the trigger would pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}; retry in {} s", describe(scope), self.retry_after_secs())]
pub struct Limited {
    /// The limit that needs the longest wait.
    pub scope: Scope,
    /// Exact wait until the trigger would pass.
    pub wait: Duration,
}

fn describe(scope: &Scope) -> String {
    match scope {
        Scope::Project { name, limit } => format!(
            "project {name} has started {limit} builds in the last 60 s \
             (project_builds_per_minute = {limit})"
        ),
        Scope::Daemon { limit } => {
            format!("{limit} builds started in the last 60 s (builds_per_minute = {limit})")
        }
    }
}

impl Limited {
    /// `Retry-After` in whole seconds: rounded up (at that moment the trigger passes), and at
    /// least 1 as SPEC asks.
    pub fn retry_after_secs(&self) -> u64 {
        let micros = self.wait.as_micros();
        let secs = micros.div_ceil(1_000_000);
        u64::try_from(secs).unwrap_or(u64::MAX).max(1)
    }
}

/// The events of one scope still inside the window, oldest first.
#[derive(Debug, Default)]
struct Window {
    events: VecDeque<Mono>,
}

impl Window {
    fn expire(&mut self, now: Mono) {
        while let Some(&t) = self.events.front() {
            if t.0.saturating_add(WINDOW_MICROS) <= now.0 {
                self.events.pop_front();
            } else {
                break;
            }
        }
    }

    /// How long until one more event fits under `limit` (zero: it fits now). Expects
    /// `expire(now)` to have run.
    fn wait(&self, limit: u32, now: Mono) -> Duration {
        let n = self.events.len();
        let limit = limit as usize;
        if n < limit {
            return Duration::ZERO;
        }
        // n - limit + 1 events must leave; the last of them is at index n - limit.
        let t = self.events[n - limit];
        let left = t.0.saturating_add(WINDOW_MICROS).saturating_sub(now.0);
        Duration::from_micros(u64::try_from(left).unwrap_or(0))
    }

    fn insert(&mut self, at: Mono) {
        // Restored events may arrive out of order; keep the deque sorted.
        let pos = self.events.partition_point(|&t| t <= at);
        self.events.insert(pos, at);
    }
}

/// The limiter the queue holds: the pure [`Windows`] and the clock that gives them `now`.
#[derive(Debug)]
pub struct RateLimiter {
    /// Zero of [`Mono`].
    origin: Instant,
    windows: Windows,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(Instant::now())
    }
}

impl RateLimiter {
    /// An empty limiter whose [`Mono`] zero is `origin`.
    pub fn new(origin: Instant) -> RateLimiter {
        RateLimiter {
            origin,
            windows: Windows::default(),
        }
    }

    /// The monotonic now: the one clock read of rate limiting.
    pub fn now(&self) -> Mono {
        Mono(i64::try_from(self.origin.elapsed().as_micros()).unwrap_or(i64::MAX))
    }

    /// See [`Windows::check`].
    pub fn check(&mut self, project: &str, limits: Limits, now: Mono) -> Result<(), Limited> {
        self.windows.check(project, limits, now)
    }

    /// See [`Windows::record`].
    pub fn record(&mut self, project: &str, now: Mono) {
        self.windows.record(project, now)
    }

    /// See [`Windows::restore`].
    pub fn restore<'a>(
        &mut self,
        events: impl IntoIterator<Item = (&'a str, Timestamp)>,
        wall_now: Timestamp,
        now: Mono,
    ) {
        self.windows.restore(events, wall_now, now)
    }
}

/// Rolling windows for the daemon and for each project: the pure rules, `now` always passed in.
#[derive(Debug, Default)]
pub struct Windows {
    daemon: Window,
    projects: HashMap<String, Window>,
}

impl Windows {
    /// Whether one more build of `project` passes now, without recording it.
    pub fn check(&mut self, project: &str, limits: Limits, now: Mono) -> Result<(), Limited> {
        self.daemon.expire(now);
        let daemon_wait = self.daemon.wait(limits.daemon, now);
        let project_wait = match self.projects.get_mut(project) {
            Some(w) => {
                w.expire(now);
                w.wait(limits.project, now)
            }
            None => Duration::ZERO,
        };
        // Both must pass, so the longer wait is the one to report.
        if project_wait.is_zero() && daemon_wait.is_zero() {
            Ok(())
        } else if project_wait >= daemon_wait {
            Err(Limited {
                scope: Scope::Project {
                    name: project.to_owned(),
                    limit: limits.project,
                },
                wait: project_wait,
            })
        } else {
            Err(Limited {
                scope: Scope::Daemon {
                    limit: limits.daemon,
                },
                wait: daemon_wait,
            })
        }
    }

    /// Counts a new build of `project` at `now`.
    pub fn record(&mut self, project: &str, now: Mono) {
        self.daemon.insert(now);
        self.projects
            .entry(project.to_owned())
            .or_default()
            .insert(now);
        // Windows of projects with nothing recent are dropped, so removed or idle projects
        // cost nothing.
        self.projects.retain(|_, w| {
            w.expire(now);
            !w.events.is_empty()
        });
    }

    /// Re-creates the windows from stored events `(project, wall-clock time)`, given the wall
    /// and monotonic clocks read at the same moment.
    pub fn restore<'a>(
        &mut self,
        events: impl IntoIterator<Item = (&'a str, Timestamp)>,
        wall_now: Timestamp,
        now: Mono,
    ) {
        for (project, at) in events {
            // A time in the future (the clock was set back) counts as "just now".
            let age = wall_now.0.saturating_sub(at.0).max(0);
            if age >= WINDOW_MICROS {
                continue;
            }
            let at = Mono(now.0.saturating_sub(age));
            self.daemon.insert(at);
            self.projects
                .entry(project.to_owned())
                .or_default()
                .insert(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn limits(daemon: u32, project: u32) -> Limits {
        Limits { daemon, project }
    }

    fn fill(rl: &mut Windows, project: &str, times: &[i64]) {
        for &t in times {
            rl.record(project, Mono(t));
        }
    }

    #[test]
    fn under_the_limit_passes() {
        let mut rl = Windows::default();
        fill(&mut rl, "a", &[0, S, 2 * S]);
        assert_eq!(rl.check("a", limits(100, 4), Mono(3 * S)), Ok(()));
    }

    #[test]
    fn at_the_limit_waits_for_the_oldest_event() {
        let mut rl = Windows::default();
        fill(&mut rl, "a", &[0, 10 * S, 20 * S]);
        let e = rl.check("a", limits(100, 3), Mono(30 * S)).unwrap_err();
        assert_eq!(e.wait, Duration::from_secs(30));
        assert_eq!(e.retry_after_secs(), 30);
        assert!(matches!(e.scope, Scope::Project { ref name, limit: 3 } if name == "a"));
        // One microsecond before the oldest event leaves: still refused, 1 s.
        let e = rl.check("a", limits(100, 3), Mono(60 * S - 1)).unwrap_err();
        assert_eq!(e.wait, Duration::from_micros(1));
        assert_eq!(e.retry_after_secs(), 1);
        // Exactly when it leaves: passes.
        assert_eq!(rl.check("a", limits(100, 3), Mono(60 * S)), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up_to_the_moment_it_passes() {
        let mut rl = Windows::default();
        fill(&mut rl, "a", &[0]);
        let now = Mono(S / 2);
        let e = rl.check("a", limits(100, 1), now).unwrap_err();
        assert_eq!(e.wait, Duration::from_micros(59_500_000));
        let secs = e.retry_after_secs() as i64;
        assert_eq!(secs, 60);
        // One second less than Retry-After is not enough; exactly Retry-After is (checked in
        // this order because a check forgets events that have left the window).
        let early = Mono(now.0 + (secs - 1) * S);
        assert!(rl.check("a", limits(100, 1), early).is_err());
        let on_time = Mono(now.0 + secs * S);
        assert_eq!(rl.check("a", limits(100, 1), on_time), Ok(()));
    }

    #[test]
    fn a_lowered_limit_waits_for_enough_events_to_leave() {
        let mut rl = Windows::default();
        fill(&mut rl, "a", &[0, S, 2 * S, 3 * S, 4 * S]);
        // Limit 2 with 5 events: 4 must leave, the 4th oldest is at 3 s.
        let e = rl.check("a", limits(100, 2), Mono(10 * S)).unwrap_err();
        assert_eq!(e.wait, Duration::from_secs(53));
    }

    #[test]
    fn projects_are_independent_and_the_daemon_counts_all() {
        let mut rl = Windows::default();
        fill(&mut rl, "a", &[0, S]);
        fill(&mut rl, "b", &[2 * S]);
        assert_eq!(rl.check("b", limits(100, 2), Mono(3 * S)), Ok(()));
        assert!(rl.check("a", limits(100, 2), Mono(3 * S)).is_err());
        let e = rl.check("c", limits(3, 10), Mono(3 * S)).unwrap_err();
        assert_eq!(e.scope, Scope::Daemon { limit: 3 });
        assert_eq!(e.wait, Duration::from_secs(57));
    }

    #[test]
    fn the_longer_wait_wins_when_both_limits_refuse() {
        let mut rl = Windows::default();
        fill(&mut rl, "a", &[0]);
        fill(&mut rl, "b", &[10 * S]);
        fill(&mut rl, "a", &[20 * S]);
        // Project a (limit 2): oldest at 0 → 40 s. Daemon (limit 2): 3 events, 2 must
        // leave, the second at 10 s → 50 s.
        let e = rl.check("a", limits(2, 2), Mono(20 * S)).unwrap_err();
        assert_eq!(e.scope, Scope::Daemon { limit: 2 });
        assert_eq!(e.wait, Duration::from_secs(50));
    }

    #[test]
    fn idle_projects_are_forgotten() {
        let mut rl = Windows::default();
        fill(&mut rl, "a", &[0]);
        fill(&mut rl, "b", &[61 * S]);
        assert_eq!(rl.projects.len(), 1);
        assert!(rl.projects.contains_key("b"));
    }

    #[test]
    fn restored_events_keep_their_age() {
        let wall = Timestamp(1_800_000_000 * S);
        let mut rl = Windows::default();
        let events = [
            ("a", Timestamp(wall.0 - 50 * S)),
            ("a", Timestamp(wall.0 - 20 * S)),
            // Out of the window: ignored.
            ("a", Timestamp(wall.0 - 61 * S)),
            // In the future (clock set back since): counts from now.
            ("b", Timestamp(wall.0 + 3600 * S)),
        ];
        let now = Mono(5 * S);
        rl.restore(events, wall, now);
        let e = rl.check("a", limits(100, 2), now).unwrap_err();
        assert_eq!(e.wait, Duration::from_secs(10));
        let e = rl.check("b", limits(100, 1), now).unwrap_err();
        assert_eq!(e.wait, Duration::from_secs(60));
        let e = rl.check("c", limits(3, 10), now).unwrap_err();
        assert_eq!(e.wait, Duration::from_secs(10));
    }

    #[test]
    fn message_names_the_limit_and_the_wait() {
        let e = Limited {
            scope: Scope::Project {
                name: "site".into(),
                limit: 10,
            },
            wait: Duration::from_millis(41_200),
        };
        let m = e.to_string();
        assert!(m.contains("project_builds_per_minute = 10"), "{m}");
        assert!(m.ends_with("retry in 42 s"), "{m}");
    }
}
