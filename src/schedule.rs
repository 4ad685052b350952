//! Scheduled builds (`[[projects.P.schedule]]`, SPEC §3 (v2)): 5-field cron in an IANA time
//! zone, fired as triggers of source `schedule`.
//!
//! Cron parsing and evaluation are `croner`'s, time zones `jiff`'s (the system tz database);
//! nothing here interprets a cron field. Daylight-saving changes follow croner's documented
//! rules (OCPS, as Vixie cron): a fixed time that falls into a gap (spring forward) runs at
//! the first valid time after it, the same day; a fixed time that happens twice (fall back)
//! runs once, the first time; wildcard and step fields run at every matching wall-clock time
//! that exists, so they skip the gap and run in both passes of a repeated hour.
//!
//! # Missed runs
//! For each schedule the store keeps the time up to which its runs are handled
//! ([`crate::store::Store::schedule_checked`]). At start, a schedule with such a record whose
//! last run since then (and within the last 24 h) was missed fires once, like systemd's
//! `Persistent=true`; a schedule without one (a fresh state dir, a new schedule) fires
//! nothing missed. While the daemon runs, a due schedule fires once however many of its
//! times passed (a clock that jumped ahead does not cause a burst).
//!
//! # Clock
//! The scheduler reads the wall clock through [`Clock`]. Tests replace it with a file
//! holding an RFC 3339 time (`DEPLOYHOOK_TEST_CLOCK_FILE`, read only by this module and
//! meant for tests only: it is not a setting), so a test sees an every-minute schedule fire
//! without waiting a minute.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use crate::config::SharedConfig;
use crate::metrics::{Metrics, TriggerResult};
use crate::model::{Timestamp, Trigger, TriggerSource};
use crate::queue::{Queue, TriggerError, TriggerRequest};
use crate::store::Store;

/// How far back a missed run still fires at start.
pub const MISSED_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The environment variable naming a test clock file. Test-only: see the module doc.
pub const TEST_CLOCK_ENV: &str = "DEPLOYHOOK_TEST_CLOCK_FILE";

/// One validated schedule.
#[derive(Clone)]
pub struct Schedule {
    /// The cron expression as written.
    pub cron_text: String,
    cron: Cron,
    /// The branch it builds.
    pub branch: String,
    /// The IANA zone name as written (`UTC` by default).
    pub timezone: String,
    tz: jiff::tz::TimeZone,
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Schedule({:?} {} {})",
            self.cron_text, self.timezone, self.branch
        )
    }
}

impl Schedule {
    /// Validates a schedule: exactly five cron fields, a time zone the system knows.
    pub fn new(cron: &str, timezone: &str, branch: &str) -> Result<Schedule, String> {
        let text = cron.trim();
        if text.split_whitespace().count() != 5 {
            return Err(format!(
                "cron {text:?} must have 5 fields: minute hour day-of-month month day-of-week"
            ));
        }
        let parsed = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(text)
            .map_err(|e| format!("invalid cron {text:?}: {e}"))?;
        let tz = jiff::tz::TimeZone::get(timezone).map_err(|e| {
            format!(
                "unknown time zone {timezone:?} (use an IANA name such as \"Europe/Berlin\"): {e}"
            )
        })?;
        Ok(Schedule {
            cron_text: text.to_owned(),
            cron: parsed,
            branch: branch.to_owned(),
            timezone: timezone.to_owned(),
            tz,
        })
    }

    /// The first run strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let z = jiff::Timestamp::from_microsecond(t.0)
            .ok()?
            .to_zoned(self.tz.clone());
        let next = self.cron.find_next_occurrence(&z, false).ok()?;
        Some(Timestamp(next.timestamp().as_microsecond()))
    }

    /// The latest run in `(after, until]`, if any.
    pub fn last_in(&self, after: Timestamp, until: Timestamp) -> Option<Timestamp> {
        let z = jiff::Timestamp::from_microsecond(until.0)
            .ok()?
            .to_zoned(self.tz.clone());
        let prev = self.cron.find_previous_occurrence(&z, true).ok()?;
        let prev = Timestamp(prev.timestamp().as_microsecond());
        (prev > after).then_some(prev)
    }

    /// The store key of this schedule's state: a schedule changed in any part is a new one.
    pub fn key(&self, project: &str) -> String {
        format!(
            "{project}\0{}\0{}\0{}",
            self.branch, self.timezone, self.cron_text
        )
    }

    /// `next run 2026-01-22T03:00:00+01:00[Europe/Berlin]`-style text for `deployhook check`.
    pub fn describe_next(&self, now: Timestamp) -> String {
        match self
            .next_after(now)
            .and_then(|t| jiff::Timestamp::from_microsecond(t.0).ok())
        {
            Some(t) => format!(
                "{} (UTC {})",
                t.to_zoned(self.tz.clone()).strftime("%Y-%m-%d %H:%M %Z"),
                t.strftime("%Y-%m-%dT%H:%M:%SZ")
            ),
            None => "never".to_owned(),
        }
    }
}

/// The scheduler's wall clock.
#[derive(Debug, Clone)]
pub enum Clock {
    /// The system clock.
    System,
    /// A file holding an RFC 3339 time (tests only, see the module doc).
    File(PathBuf),
}

impl Clock {
    /// The system clock, or the test clock file when [`TEST_CLOCK_ENV`] names one.
    pub fn from_env() -> Clock {
        match std::env::var_os(TEST_CLOCK_ENV) {
            Some(p) if !p.is_empty() => Clock::File(p.into()),
            _ => Clock::System,
        }
    }

    /// Now, by this clock (a test clock file that cannot be read counts as the epoch, so
    /// nothing fires).
    pub fn now(&self) -> Timestamp {
        match self {
            Clock::System => Timestamp::now(),
            Clock::File(p) => std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse::<jiff::Timestamp>().ok())
                .map_or(Timestamp(0), |t| Timestamp(t.as_microsecond())),
        }
    }

    /// Sleeps until `t` by this clock, or at most a minute (the wall clock may be stepped;
    /// the caller looks again). The test clock is polled.
    async fn sleep_until(&self, t: Option<Timestamp>) {
        match self {
            Clock::System => {
                let now = Timestamp::now();
                let wait = t.map_or(Duration::from_secs(60), |t| {
                    Duration::from_micros(t.0.saturating_sub(now.0).max(0) as u64)
                });
                tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
            }
            Clock::File(_) => {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while tokio::time::Instant::now() < deadline {
                    if t.is_some_and(|t| self.now() >= t) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }
    }
}

/// What the scheduler must do for one schedule at `now`, given the time up to which its runs
/// are handled: fire (once) when a run lies in `(checked, now]`. Pure.
pub fn due(s: &Schedule, checked: Timestamp, now: Timestamp) -> Option<Timestamp> {
    s.last_in(checked, now)
}

/// Where handling of a schedule starts at daemon start: its stored record, but no further
/// back than [`MISSED_WINDOW`]; without a record (never run with this schedule), `now`.
pub fn start_point(stored: Option<Timestamp>, now: Timestamp) -> Timestamp {
    match stored {
        Some(t) => t.max(now.before(MISSED_WINDOW)).min(now),
        None => now,
    }
}

/// Runs the schedules of the config in force until the task is dropped. `reload` is notified
/// after each config reload, so that new schedules apply at once.
pub async fn run(
    queue: Queue,
    store: Store,
    config: Arc<SharedConfig>,
    metrics: Arc<Metrics>,
    clock: Clock,
    reload: Arc<tokio::sync::Notify>,
) {
    // Schedule key -> the time up to which its runs are handled.
    let mut checked: HashMap<String, Timestamp> = HashMap::new();
    loop {
        let notified = reload.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let cfg = config.get();
        let now = clock.now();
        let mut next: Option<Timestamp> = None;
        for p in cfg.projects.values() {
            for s in &p.access.schedules {
                let key = s.key(p.name.as_str());
                let from = match checked.get(&key) {
                    Some(t) => *t,
                    None => {
                        let stored = match store.schedule_checked(&key) {
                            Ok(t) => t,
                            Err(e) => {
                                tracing::error!("cannot read schedule state: {e}");
                                None
                            }
                        };
                        let from = start_point(stored, now);
                        if stored.is_none() {
                            let _ = store.set_schedule_checked(&key, now);
                        }
                        from
                    }
                };
                let mut handled = from;
                if let Some(at) = due(s, from, now) {
                    // More than a minute late: a run missed while the daemon was down.
                    let missed = at < now.before(Duration::from_secs(60));
                    fire(&queue, &metrics, p.name.as_str(), s, at, missed).await;
                    handled = now;
                    if let Err(e) = store.set_schedule_checked(&key, now) {
                        tracing::error!("cannot record a schedule's run: {e}");
                    }
                }
                checked.insert(key, handled);
                if let Some(n) = s.next_after(handled.max(now)) {
                    next = Some(next.map_or(n, |m: Timestamp| m.min(n)));
                }
            }
        }
        tracing::debug!(
            next = %next.map_or_else(|| "none".to_owned(), Timestamp::rfc3339),
            "scheduler: schedules checked"
        );
        tokio::select! {
            _ = clock.sleep_until(next) => {}
            _ = &mut notified => {}
        }
    }
}

async fn fire(
    queue: &Queue,
    metrics: &Metrics,
    project: &str,
    s: &Schedule,
    at: Timestamp,
    missed: bool,
) {
    let req = TriggerRequest::branch(
        project,
        &s.branch,
        Trigger {
            source: TriggerSource::Schedule,
            hook: None,
        },
    );
    let when = at.rfc3339();
    let result = queue.trigger(req).await;
    let counted = match &result {
        Ok(t) if t.already_exists => TriggerResult::Deduplicated,
        Ok(_) => TriggerResult::Created,
        Err(TriggerError::RateLimited(_)) => TriggerResult::RateLimited,
        Err(_) => TriggerResult::Rejected,
    };
    metrics.count_trigger(TriggerSource::Schedule, counted);
    match result {
        Ok(t) => tracing::info!(
            project,
            branch = %s.branch,
            cron = %s.cron_text,
            scheduled_for = %when,
            missed,
            build = %t.build.id,
            already_exists = t.already_exists,
            "scheduled build triggered"
        ),
        Err(e) => tracing::warn!(
            project,
            branch = %s.branch,
            cron = %s.cron_text,
            scheduled_for = %when,
            "scheduled trigger refused: {e}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        Timestamp(s.parse::<jiff::Timestamp>().unwrap().as_microsecond())
    }

    #[test]
    fn only_five_field_crons_and_known_zones() {
        assert!(Schedule::new("0 3 * * *", "Europe/Berlin", "main").is_ok());
        assert!(Schedule::new("*/15 * * * 1-5", "UTC", "main").is_ok());
        let e = Schedule::new("0 0 3 * * *", "UTC", "main").unwrap_err();
        assert!(e.contains("5 fields"), "{e}");
        let e = Schedule::new("0 3 * *", "UTC", "main").unwrap_err();
        assert!(e.contains("5 fields"), "{e}");
        let e = Schedule::new("61 3 * * *", "UTC", "main").unwrap_err();
        assert!(e.contains("invalid cron"), "{e}");
        let e = Schedule::new("0 3 * * *", "Mars/Olympus", "main").unwrap_err();
        assert!(e.contains("unknown time zone"), "{e}");
    }

    #[test]
    fn next_runs_follow_the_zone() {
        let s = Schedule::new("0 3 * * *", "Europe/Berlin", "main").unwrap();
        // Winter: 03:00 CET is 02:00 UTC.
        assert_eq!(
            s.next_after(ts("2026-01-21T12:00:00Z")),
            Some(ts("2026-01-22T02:00:00Z"))
        );
        // Summer: 03:00 CEST is 01:00 UTC.
        assert_eq!(
            s.next_after(ts("2026-07-01T12:00:00Z")),
            Some(ts("2026-07-02T01:00:00Z"))
        );
        assert!(
            s.describe_next(ts("2026-01-21T12:00:00Z"))
                .contains("2026-01-22 03:00")
        );
    }

    /// The first `n` runs of `cron` in Berlin after `from`, each found from the one before.
    fn berlin_runs(cron: &str, from: &str, n: usize) -> Vec<Timestamp> {
        let s = Schedule::new(cron, "Europe/Berlin", "main").unwrap();
        let mut t = ts(from);
        (0..n)
            .map(|_| {
                t = s
                    .next_after(t)
                    .unwrap_or_else(|| panic!("{cron}: no run after {t:?}"));
                t
            })
            .collect()
    }

    #[test]
    fn a_fixed_time_in_the_spring_gap_runs_once_right_after_it() {
        // Berlin skips 02:00-03:00 on 2026-03-29: 02:30 does not exist that day. croner runs
        // a fixed-time job at the first valid time after the gap, 03:00 CEST (01:00 UTC).
        // Once that day, and back to 02:30 CEST the next.
        assert_eq!(
            berlin_runs("30 2 * * *", "2026-03-28T12:00:00Z", 2),
            vec![ts("2026-03-29T01:00:00Z"), ts("2026-03-30T00:30:00Z")]
        );
    }

    #[test]
    fn a_fixed_time_in_the_autumn_repeat_runs_once_and_wildcards_run_in_both_passes() {
        // Berlin repeats 02:00-03:00 on 2026-10-25 (first CEST = 00:xx UTC, then CET =
        // 01:xx UTC). A fixed 02:30 runs once, the first time.
        assert_eq!(
            berlin_runs("30 2 * * *", "2026-10-24T12:00:00Z", 2),
            vec![ts("2026-10-25T00:30:00Z"), ts("2026-10-26T01:30:00Z")]
        );
        // An every-30-minutes job runs at each wall-clock :00 and :30 of both passes.
        assert_eq!(
            berlin_runs("*/30 2 * * *", "2026-10-24T23:59:00Z", 4),
            vec![
                ts("2026-10-25T00:00:00Z"),
                ts("2026-10-25T00:30:00Z"),
                ts("2026-10-25T01:00:00Z"),
                ts("2026-10-25T01:30:00Z"),
            ]
        );
    }

    #[test]
    fn a_missed_run_fires_once_within_a_day_and_only_with_a_record() {
        let s = Schedule::new("0 3 * * *", "UTC", "main").unwrap();
        let now = ts("2026-01-22T10:00:00Z");
        // Down from yesterday 20:00 to now: today's 03:00 was missed, once.
        let from = start_point(Some(ts("2026-01-21T20:00:00Z")), now);
        assert_eq!(due(&s, from, now), Some(ts("2026-01-22T03:00:00Z")));
        // Down for a week: only the last day counts, and it is still one run.
        let from = start_point(Some(ts("2026-01-15T20:00:00Z")), now);
        assert_eq!(from, ts("2026-01-21T10:00:00Z"));
        assert_eq!(due(&s, from, now), Some(ts("2026-01-22T03:00:00Z")));
        // Down from 04:00 to 10:00: nothing to catch up.
        let from = start_point(Some(ts("2026-01-22T04:00:00Z")), now);
        assert_eq!(due(&s, from, now), None);
        // Never run with this schedule: nothing missed.
        assert_eq!(due(&s, start_point(None, now), now), None);
        // A run at exactly `now` is due; one at `checked` is not again.
        assert_eq!(
            due(&s, ts("2026-01-22T02:00:00Z"), ts("2026-01-22T03:00:00Z")),
            Some(ts("2026-01-22T03:00:00Z"))
        );
        assert_eq!(
            due(&s, ts("2026-01-22T03:00:00Z"), ts("2026-01-22T03:00:30Z")),
            None
        );
    }
}
