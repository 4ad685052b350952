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
//! or a `kill -9`, and the process's monotonic clock does not, so the store keeps each event's
//! [`EventTime`]: the machine's `CLOCK_BOOTTIME` (monotonic across process restarts, suspend
//! included) with the boot id it belongs to, and the wall-clock time. At start,
//! [`RateLimiter::restore`] turns each into its age ([`EventTime::age`]) and places it that
//! far in the monotonic past. Within one boot the age is measured on `CLOCK_BOOTTIME`, so a
//! wall clock stepped while the daemon was down (NTP's first sync, an admin's `date -s`)
//! changes nothing. Only after a reboot, when boot times of two boots cannot be compared, is
//! the age taken from the wall clock: then a clock set back makes old events look new (they
//! count for the whole window again: never too permissive), one set forward makes them look
//! expired. Events stored by versions before boot times were kept have only the wall time
//! and are aged by it, like events of another boot.
//!
//! The rules live in [`Windows`], which is pure (no clock reads, no I/O): every method takes
//! `now`, which is how the unit tests below drive it. [`RateLimiter`] is the thin shell the
//! queue holds: those windows plus the origin of [`Mono`], read in one place,
//! [`RateLimiter::now`]. The clocks stored with events are read in one place too,
//! [`EventTime::now`].

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

/// A reading of `CLOCK_BOOTTIME` and the boot it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTime {
    /// `/proc/sys/kernel/random/boot_id`: new at every boot.
    pub boot_id: uuid::Uuid,
    /// Microseconds since that boot.
    pub micros: i64,
}

/// When a rate event happened, on every clock that can tell its age after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTime {
    /// The wall clock (the only clock after a reboot).
    pub wall: Timestamp,
    /// The boot clock, when it could be read (always on Linux; `None` in old records).
    pub boot: Option<BootTime>,
}

/// The clocks, read at one moment.
pub type Clocks = EventTime;

impl EventTime {
    /// Reads the wall clock and the boot clock now.
    pub fn now() -> Clocks {
        EventTime {
            wall: Timestamp::now(),
            boot: boot_time(),
        }
    }

    /// How long before `now` this event happened: on the boot clock when both readings are
    /// of the same boot, else on the wall clock. Never negative (an event "in the future",
    /// after a clock was set back, happened just now).
    pub fn age(&self, now: &Clocks) -> Duration {
        let micros = match (self.boot, now.boot) {
            (Some(then), Some(now)) if then.boot_id == now.boot_id => {
                now.micros.saturating_sub(then.micros)
            }
            _ => now.wall.0.saturating_sub(self.wall.0),
        };
        Duration::from_micros(u64::try_from(micros).unwrap_or(0))
    }
}

/// This boot's id, read once (it cannot change while the process lives).
fn boot_id() -> Option<uuid::Uuid> {
    static ID: std::sync::OnceLock<Option<uuid::Uuid>> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        uuid::Uuid::parse_str(text.trim()).ok()
    })
}

/// `CLOCK_BOOTTIME` now, with the boot id; `None` where either cannot be read.
fn boot_time() -> Option<BootTime> {
    let boot_id = boot_id()?;
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let micros = t
        .tv_sec()
        .checked_mul(1_000_000)?
        .checked_add(t.tv_nsec() / 1000)?;
    Some(BootTime { boot_id, micros })
}

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
        events: impl IntoIterator<Item = (&'a str, EventTime)>,
        clocks: &Clocks,
        now: Mono,
    ) {
        self.windows.restore(events, clocks, now)
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

    /// Re-creates the windows from stored events `(project, when)`, given the clocks and the
    /// monotonic clock read at the same moment.
    pub fn restore<'a>(
        &mut self,
        events: impl IntoIterator<Item = (&'a str, EventTime)>,
        clocks: &Clocks,
        now: Mono,
    ) {
        for (project, at) in events {
            let age = at.age(clocks);
            if age >= WINDOW {
                continue;
            }
            let age = i64::try_from(age.as_micros()).unwrap_or(i64::MAX);
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

    /// An event of an old record: the wall clock only.
    fn wall_only(micros: i64) -> EventTime {
        EventTime {
            wall: Timestamp(micros),
            boot: None,
        }
    }

    fn on_boot(boot: u128, boot_micros: i64, wall: i64) -> EventTime {
        EventTime {
            wall: Timestamp(wall),
            boot: Some(BootTime {
                boot_id: uuid::Uuid::from_u128(boot),
                micros: boot_micros,
            }),
        }
    }

    #[test]
    fn restored_events_keep_their_age() {
        let wall = 1_800_000_000 * S;
        let mut rl = Windows::default();
        let events = [
            ("a", wall_only(wall - 50 * S)),
            ("a", wall_only(wall - 20 * S)),
            // Out of the window: ignored.
            ("a", wall_only(wall - 61 * S)),
            // In the future (clock set back since): counts from now.
            ("b", wall_only(wall + 3600 * S)),
        ];
        let now = Mono(5 * S);
        rl.restore(events, &wall_only(wall), now);
        let e = rl.check("a", limits(100, 2), now).unwrap_err();
        assert_eq!(e.wait, Duration::from_secs(10));
        let e = rl.check("b", limits(100, 1), now).unwrap_err();
        assert_eq!(e.wait, Duration::from_secs(60));
        let e = rl.check("c", limits(3, 10), now).unwrap_err();
        assert_eq!(e.wait, Duration::from_secs(10));
    }

    #[test]
    fn within_one_boot_a_wall_clock_step_changes_no_age() {
        // Two events 50 s and 20 s before a restart; meanwhile the wall clock was set a day
        // forward (or back). The boot clock still says 50 s and 20 s.
        let (wall, day) = (1_800_000_000 * S, 86_400 * S);
        for step in [day, -day] {
            let events = [
                ("a", on_boot(7, 1000 * S, wall - 50 * S)),
                ("a", on_boot(7, 1030 * S, wall - 20 * S)),
            ];
            let now = on_boot(7, 1050 * S, wall + step);
            let mut rl = Windows::default();
            rl.restore(events, &now, Mono(0));
            let e = rl.check("a", limits(100, 2), Mono(0)).unwrap_err();
            assert_eq!(e.wait, Duration::from_secs(10), "step {step}");
        }
    }

    #[test]
    fn after_a_reboot_the_wall_clock_tells_the_age() {
        let wall = 1_800_000_000 * S;
        // Boot 7's clock read 1000 s; boot 8 has just started (its clock is at 5 s).
        let events = [("a", on_boot(7, 1000 * S, wall - 30 * S))];
        let now = on_boot(8, 5 * S, wall);
        assert_eq!(events[0].1.age(&now), Duration::from_secs(30));
        let mut rl = Windows::default();
        rl.restore(events, &now, Mono(0));
        let e = rl.check("a", limits(100, 1), Mono(0)).unwrap_err();
        assert_eq!(e.wait, Duration::from_secs(30));
        // An old record (wall time only) is aged by the wall clock too.
        assert_eq!(wall_only(wall - 40 * S).age(&now), Duration::from_secs(40));
        // A boot clock that went backwards within one boot cannot happen; if a record says
        // so, the event counts as just now (never too permissive).
        assert_eq!(on_boot(8, 9 * S, wall).age(&now), Duration::ZERO);
    }

    #[test]
    fn the_clocks_read_now_are_of_this_boot_and_move_forward() {
        let a = EventTime::now();
        std::thread::sleep(Duration::from_millis(5));
        let b = EventTime::now();
        let (ba, bb) = (a.boot.expect("Linux has a boot clock"), b.boot.unwrap());
        assert_eq!(ba.boot_id, bb.boot_id);
        assert!(bb.micros > ba.micros);
        assert!(a.age(&b) >= Duration::from_millis(5));
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
