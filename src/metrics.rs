//! Prometheus metrics (SPEC §4.1 `GET /metrics`): counters kept while the daemon runs, and
//! their rendering in the text exposition format 0.0.4.
//!
//! The registry is one [`Metrics`] value shared as an `Arc` (no globals). It is written on the
//! hot path (every request, every trigger), so it stays lock-light: trigger counters are
//! atomics, HTTP and build counters sit behind mutexes held only for a map update. Queue
//! gauges are not kept here at all: they are read from the queue at scrape time.
//!
//! Label values are bounded, so a client cannot grow the registry: `route` is one of the
//! endpoint templates (never the raw path, which holds hook tokens), `project` only ever names
//! a project whose build stopped (projects of stored builds) or one in the config, `source`,
//! `result` and `outcome` are fixed words, `code` is a status code the server sent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::model::{Build, Outcome, TriggerSource};

/// The `Content-Type` of `GET /metrics` (SPEC §4.1).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Upper bounds (seconds) of the build duration histogram: builds take from a second (a
/// `git pull`) to an hour (the default `timeout`).
pub const DURATION_BUCKETS: [f64; 12] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 2700.0, 3600.0,
];

/// Every trigger source, in label order.
const SOURCES: [TriggerSource; 4] = [
    TriggerSource::DeployHook,
    TriggerSource::GitPush,
    TriggerSource::Api,
    TriggerSource::Schedule,
];

/// What became of a trigger request, for `deployhook_triggers_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerResult {
    /// A new build was queued.
    Created,
    /// A pending build was joined (`already_exists: true`).
    Deduplicated,
    /// Refused with 429.
    RateLimited,
    /// Refused with any other error (bad token or signature, branch, body, shutdown…).
    Rejected,
}

impl TriggerResult {
    /// Every result, in label order.
    pub const ALL: [TriggerResult; 4] = [
        TriggerResult::Created,
        TriggerResult::Deduplicated,
        TriggerResult::RateLimited,
        TriggerResult::Rejected,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerResult::Created => "created",
            TriggerResult::Deduplicated => "deduplicated",
            TriggerResult::RateLimited => "rate_limited",
            TriggerResult::Rejected => "rejected",
        }
    }
}

fn source_index(s: TriggerSource) -> usize {
    match s {
        TriggerSource::DeployHook => 0,
        TriggerSource::GitPush => 1,
        TriggerSource::Api => 2,
        TriggerSource::Schedule => 3,
    }
}

fn result_index(r: TriggerResult) -> usize {
    match r {
        TriggerResult::Created => 0,
        TriggerResult::Deduplicated => 1,
        TriggerResult::RateLimited => 2,
        TriggerResult::Rejected => 3,
    }
}

fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Success => 0,
        Outcome::Fail => 1,
        Outcome::Cancelled => 2,
        Outcome::TimedOut => 3,
        Outcome::Interrupted => 4,
    }
}

/// One project's build counters.
#[derive(Default)]
struct ProjectBuilds {
    /// Stopped builds by outcome, indexed like [`Outcome::ALL`].
    outcomes: [u64; 5],
    /// Non-cumulative histogram counts, one per bucket of [`DURATION_BUCKETS`] plus `+Inf`.
    buckets: [u64; DURATION_BUCKETS.len() + 1],
    /// Observations.
    count: u64,
    /// Sum of the observed durations, seconds.
    sum: f64,
}

/// The daemon's metric registry.
pub struct Metrics {
    /// `process_start_time_seconds`: when this process started (Unix seconds).
    start_time: f64,
    /// `deployhook_triggers_total`, indexed `source * 4 + result`.
    triggers: [AtomicU64; 16],
    /// `deployhook_http_requests_total` by (route template, status code).
    http: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// `deployhook_builds_total` and `deployhook_build_duration_seconds` by project.
    builds: Mutex<BTreeMap<String, ProjectBuilds>>,
    /// (v2) `deployhook_notifications_total` by (sink, result); sinks come from the config.
    notifications: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// (v2) `deployhook_commit_statuses_total` by (project, result).
    commit_statuses: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// `deployhook_held_waits`: requests waiting for a build's outcome right now.
    held_waits: AtomicU64,
}

/// Counts one held wait (SPEC §4.3) for as long as it lives: a client that hangs up drops
/// the wait's future, and with it this guard.
pub struct HeldWait<'a>(&'a Metrics);

impl Drop for HeldWait<'_> {
    fn drop(&mut self) {
        self.0.held_waits.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Results of an outbox delivery attempt, in label order.
pub const DELIVERY_RESULTS: [&str; 3] = ["delivered", "retried", "failed"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counters stay meaningful even if a panic interrupted an update.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// An empty registry whose start time is now.
    pub fn new() -> Self {
        let start_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Metrics {
            start_time,
            triggers: Default::default(),
            http: Mutex::new(BTreeMap::new()),
            builds: Mutex::new(BTreeMap::new()),
            notifications: Mutex::new(BTreeMap::new()),
            commit_statuses: Mutex::new(BTreeMap::new()),
            held_waits: AtomicU64::new(0),
        }
    }

    /// Counts a wait that starts now, until the returned guard is dropped.
    pub fn hold_wait(&self) -> HeldWait<'_> {
        self.held_waits.fetch_add(1, Ordering::Relaxed);
        HeldWait(self)
    }

    /// Counts an answered request. `route` must be a template, never a raw path.
    pub fn count_request(&self, route: &'static str, code: u16) {
        *lock(&self.http).entry((route, code)).or_insert(0) += 1;
    }

    /// Counts a trigger request by source and what became of it.
    pub fn count_trigger(&self, source: TriggerSource, result: TriggerResult) {
        self.triggers[source_index(source) * 4 + result_index(result)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a build that stopped; `ran_for` (see [`ran_for`]) feeds the duration histogram.
    pub fn build_stopped(&self, project: &str, outcome: Outcome, ran_for: Option<Duration>) {
        let mut builds = lock(&self.builds);
        // Looked up by &str first: the name is copied only for a project's first build.
        if !builds.contains_key(project) {
            builds.insert(project.to_owned(), ProjectBuilds::default());
        }
        let Some(p) = builds.get_mut(project) else {
            return;
        };
        p.outcomes[outcome_index(outcome)] += 1;
        if let Some(d) = ran_for {
            let secs = d.as_secs_f64();
            let bucket = DURATION_BUCKETS
                .iter()
                .position(|b| secs <= *b)
                .unwrap_or(DURATION_BUCKETS.len());
            p.buckets[bucket] += 1;
            p.count += 1;
            p.sum += secs;
        }
    }

    /// Counts a notification attempt (`result`: one of [`DELIVERY_RESULTS`]).
    pub fn count_notification(&self, sink: &str, result: &'static str) {
        *lock(&self.notifications)
            .entry((sink.to_owned(), result))
            .or_insert(0) += 1;
    }

    /// Counts a commit-status attempt (`result`: one of [`DELIVERY_RESULTS`]).
    pub fn count_commit_status(&self, project: &str, result: &'static str) {
        *lock(&self.commit_statuses)
            .entry((project.to_owned(), result))
            .or_insert(0) += 1;
    }

    /// (v2) The outbox families: `sinks` and `projects` (with a status) are shown with zeros
    /// before their first attempt; `pending` is the outbox's size now.
    pub fn render_outbox<'a>(
        &self,
        sinks: impl IntoIterator<Item = &'a str>,
        status_projects: impl IntoIterator<Item = &'a str>,
        pending: u64,
    ) -> String {
        let mut out = String::new();
        for (name, label, help, map, keys) in [
            (
                "deployhook_notifications_total",
                "sink",
                "Notification delivery attempts by sink and result (delivered, retried, failed).",
                &self.notifications,
                owned_set(sinks),
            ),
            (
                "deployhook_commit_statuses_total",
                "project",
                "Commit-status delivery attempts by project and result (delivered, retried, failed).",
                &self.commit_statuses,
                owned_set(status_projects),
            ),
        ] {
            family(&mut out, name, "counter", help);
            let counts = lock(map);
            let keys: BTreeSet<String> = keys
                .into_iter()
                .chain(counts.keys().map(|(k, _)| k.clone()))
                .collect();
            for k in &keys {
                for r in DELIVERY_RESULTS {
                    let n = counts.get(&(k.clone(), r)).copied().unwrap_or(0);
                    let _ = writeln!(
                        out,
                        "{name}{{{label}=\"{}\",result=\"{r}\"}} {n}",
                        escape(k)
                    );
                }
            }
        }
        family(
            &mut out,
            "deployhook_outbox_pending",
            "gauge",
            "Notifications and commit statuses waiting for delivery.",
        );
        let _ = writeln!(out, "deployhook_outbox_pending {pending}");
        out
    }

    /// The exposition text. `projects` are the configured projects (shown with zeros before
    /// their first build); `queued` and `running` are the queue's counts now.
    pub fn render<'a>(
        &self,
        projects: impl IntoIterator<Item = &'a str>,
        queued: usize,
        running: usize,
    ) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail: the results of write! are ignored below.
        family(
            &mut out,
            "deployhook_builds_total",
            "counter",
            "Builds that stopped, by project and outcome.",
        );
        let builds = lock(&self.builds);
        let names: BTreeSet<String> = projects
            .into_iter()
            .map(str::to_owned)
            .chain(builds.keys().cloned())
            .collect();
        let empty = ProjectBuilds::default();
        for name in &names {
            let p = builds.get(name).unwrap_or(&empty);
            for o in Outcome::ALL {
                let _ = writeln!(
                    out,
                    "deployhook_builds_total{{project=\"{}\",outcome=\"{}\"}} {}",
                    escape(name),
                    o.as_str(),
                    p.outcomes[outcome_index(o)]
                );
            }
        }
        family(
            &mut out,
            "deployhook_build_duration_seconds",
            "histogram",
            "Time from a build's start (initializing) to its stop, by project.",
        );
        for name in &names {
            let p = builds.get(name).unwrap_or(&empty);
            let project = escape(name);
            let mut cumulative = 0;
            for (i, le) in DURATION_BUCKETS.iter().enumerate() {
                cumulative += p.buckets[i];
                let _ = writeln!(
                    out,
                    "deployhook_build_duration_seconds_bucket{{project=\"{project}\",le=\"{le:?}\"}} {cumulative}"
                );
            }
            cumulative += p.buckets[DURATION_BUCKETS.len()];
            let _ = writeln!(
                out,
                "deployhook_build_duration_seconds_bucket{{project=\"{project}\",le=\"+Inf\"}} {cumulative}"
            );
            let _ = writeln!(
                out,
                "deployhook_build_duration_seconds_sum{{project=\"{project}\"}} {:?}",
                p.sum
            );
            let _ = writeln!(
                out,
                "deployhook_build_duration_seconds_count{{project=\"{project}\"}} {}",
                p.count
            );
        }
        drop(builds);

        family(
            &mut out,
            "deployhook_triggers_total",
            "counter",
            "Trigger requests by source and result (created, deduplicated, rate_limited, rejected).",
        );
        for s in SOURCES {
            for r in TriggerResult::ALL {
                let n =
                    self.triggers[source_index(s) * 4 + result_index(r)].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "deployhook_triggers_total{{source=\"{}\",result=\"{}\"}} {n}",
                    s.as_str(),
                    r.as_str()
                );
            }
        }

        family(
            &mut out,
            "deployhook_queued_builds",
            "gauge",
            "Builds waiting for a slot.",
        );
        let _ = writeln!(out, "deployhook_queued_builds {queued}");
        family(
            &mut out,
            "deployhook_running_builds",
            "gauge",
            "Builds initializing or running.",
        );
        let _ = writeln!(out, "deployhook_running_builds {running}");
        family(
            &mut out,
            "deployhook_held_waits",
            "gauge",
            "Requests waiting for a build's outcome (?wait=, /wait).",
        );
        let _ = writeln!(
            out,
            "deployhook_held_waits {}",
            self.held_waits.load(Ordering::Relaxed)
        );

        family(
            &mut out,
            "deployhook_http_requests_total",
            "counter",
            "HTTP requests answered, by route template and status code.",
        );
        for ((route, code), n) in lock(&self.http).iter() {
            let _ = writeln!(
                out,
                "deployhook_http_requests_total{{route=\"{}\",code=\"{code}\"}} {n}",
                escape(route)
            );
        }

        family(
            &mut out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
        );
        let _ = writeln!(out, "process_start_time_seconds {:?}", self.start_time);
        out
    }
}

/// How long a stopped build ran: from `initializing_on` to `stopped_on` (`None` for a build
/// cancelled while queued, which never ran).
pub fn ran_for(build: &Build) -> Option<Duration> {
    let (start, stop) = (build.initializing_on?, build.stopped_on?);
    Some(Duration::from_micros(
        u64::try_from(stop.0.saturating_sub(start.0)).unwrap_or(0),
    ))
}

/// The names, owned and in order, without repeats.
fn owned_set<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    names.into_iter().map(str::to_owned).collect()
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value as the exposition format asks: `\`, `"` and newline.
pub fn escape(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_eq!(escape("/hooks/{token}"), "/hooks/{token}");
    }

    #[test]
    fn durations_land_in_cumulative_buckets() {
        let m = Metrics::new();
        m.build_stopped("site", Outcome::Success, Some(Duration::from_millis(500)));
        m.build_stopped("site", Outcome::Fail, Some(Duration::from_secs(45)));
        m.build_stopped("site", Outcome::TimedOut, Some(Duration::from_secs(7200)));
        m.build_stopped("site", Outcome::Cancelled, None);
        let t = m.render(["site", "other"], 1, 2);
        let b = |le: &str| {
            sample(
                &t,
                &format!(
                    "deployhook_build_duration_seconds_bucket{{project=\"site\",le=\"{le}\"}}"
                ),
            )
        };
        assert_eq!(b("1.0"), Some("1"));
        assert_eq!(b("30.0"), Some("1"));
        assert_eq!(b("60.0"), Some("2"));
        assert_eq!(b("3600.0"), Some("2"));
        assert_eq!(b("+Inf"), Some("3"));
        assert_eq!(
            sample(
                &t,
                "deployhook_build_duration_seconds_count{project=\"site\"}"
            ),
            Some("3")
        );
        assert_eq!(
            sample(
                &t,
                "deployhook_build_duration_seconds_sum{project=\"site\"}"
            ),
            Some("7245.5")
        );
        assert_eq!(
            sample(
                &t,
                "deployhook_builds_total{project=\"site\",outcome=\"cancelled\"}"
            ),
            Some("1")
        );
        // A configured project without builds shows zeros.
        assert_eq!(
            sample(
                &t,
                "deployhook_builds_total{project=\"other\",outcome=\"success\"}"
            ),
            Some("0")
        );
        assert_eq!(sample(&t, "deployhook_queued_builds"), Some("1"));
        assert_eq!(sample(&t, "deployhook_running_builds"), Some("2"));
    }

    #[test]
    fn triggers_and_requests_are_counted_by_label() {
        let m = Metrics::new();
        m.count_trigger(TriggerSource::GitPush, TriggerResult::Deduplicated);
        m.count_trigger(TriggerSource::GitPush, TriggerResult::Deduplicated);
        m.count_trigger(TriggerSource::Api, TriggerResult::RateLimited);
        m.count_request("/hooks/{token}", 404);
        let t = m.render([], 0, 0);
        assert_eq!(
            sample(
                &t,
                "deployhook_triggers_total{source=\"git_push\",result=\"deduplicated\"}"
            ),
            Some("2")
        );
        assert_eq!(
            sample(
                &t,
                "deployhook_triggers_total{source=\"api\",result=\"rate_limited\"}"
            ),
            Some("1")
        );
        assert_eq!(
            sample(
                &t,
                "deployhook_triggers_total{source=\"deploy_hook\",result=\"created\"}"
            ),
            Some("0")
        );
        assert_eq!(
            sample(
                &t,
                "deployhook_http_requests_total{route=\"/hooks/{token}\",code=\"404\"}"
            ),
            Some("1")
        );
        assert!(t.contains("# TYPE deployhook_build_duration_seconds histogram\n"));
    }

    #[test]
    fn the_output_parses_as_prometheus_text() {
        let m = Metrics::new();
        m.build_stopped(
            "we\"ird\\name",
            Outcome::Success,
            Some(Duration::from_secs(3)),
        );
        m.count_request("/api/builds/{uuid}", 200);
        m.count_trigger(TriggerSource::DeployHook, TriggerResult::Created);
        let t = m.render(["site"], 0, 0);
        let parse = openmetrics_parser::prometheus::parse_prometheus;
        // The parser is strict (a grammar, not line regexes that skip what they don't match).
        assert!(parse("x{a=\"b\"c\"} 1\n").is_err());
        assert!(parse("# TYPE x counter\nx{a=\"b\"} one\n").is_err());
        let parsed = parse(&t).unwrap_or_else(|e| panic!("{e:?}\n{t}"));
        for name in [
            "deployhook_builds_total",
            "deployhook_build_duration_seconds",
            "deployhook_triggers_total",
            "deployhook_queued_builds",
            "deployhook_running_builds",
            "deployhook_http_requests_total",
            "process_start_time_seconds",
        ] {
            assert!(parsed.families.contains_key(name), "{name} missing");
        }
    }

    #[test]
    fn ran_for_spans_initializing_to_stopped() {
        use crate::model::{Timestamp, Trigger};
        let mut b = Build::new_queued(
            1,
            &crate::model::Target::branch("p", "main"),
            Trigger {
                source: TriggerSource::Api,
                hook: None,
            },
            None,
            false,
            crate::model::Timestamp::now(),
        );
        b.stopped_on = Some(Timestamp(5_000_000));
        assert_eq!(ran_for(&b), None);
        b.initializing_on = Some(Timestamp(2_000_000));
        assert_eq!(ran_for(&b), Some(Duration::from_secs(3)));
        // A wall clock that stepped back gives zero, not a panic.
        b.initializing_on = Some(Timestamp(9_000_000));
        assert_eq!(ran_for(&b), Some(Duration::ZERO));
    }
}
