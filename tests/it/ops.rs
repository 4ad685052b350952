//! Operations (issue 6): `GET /metrics`.

use crate::util::*;

/// Waits for a build of branch `other`, then releases it when the file `release` appears in
/// the workdir; builds of other branches finish at once.
const BLOCK_OTHER: &str =
    "if [ \"$DEPLOYHOOK_BRANCH\" = other ]; then while [ ! -f release ]; do sleep 0.02; done; fi";

/// `GET /metrics` with the admin token; checks the content type and that it parses.
fn scrape(d: &Daemon) -> String {
    let r = d.api("GET", "/metrics", None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4"),
        "{:?}",
        r.headers
    );
    let text = String::from_utf8(r.body).unwrap();
    if let Err(e) = openmetrics_parser::prometheus::parse_prometheus(&text) {
        panic!("/metrics does not parse: {e:?}\n{text}");
    }
    text
}

/// The value of one series (`name{labels}` exactly as rendered), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

#[test]
fn metrics_count_a_hook_build_and_a_deduplicated_trigger() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&workdir_project("site", wd.path(), BLOCK_OTHER, ""));
    // Occupy the project so that the hook's build stays queued (pending) for the dedupe.
    let blocker = d.trigger_id("site", "other");
    d.wait_status(&blocker, "running", 20);
    let (_, hook) = d.create_hook("site", "cms", "main");
    let first = d.post(&hook, b"{}");
    assert_eq!(first.status, 200);
    assert_eq!(first.json()["result"]["already_exists"], false);
    let second = d.post(&hook, b"{}");
    assert_eq!(second.status, 200);
    assert_eq!(second.json()["result"]["already_exists"], true);
    let unknown = format!("/hooks/dh_{}", "A".repeat(43));
    assert_eq!(d.post(&unknown, b"").status, 404);

    let t = scrape(&d);
    assert_eq!(value(&t, "deployhook_queued_builds"), Some(1.0), "{t}");
    assert_eq!(value(&t, "deployhook_running_builds"), Some(1.0), "{t}");

    std::fs::write(wd.path().join("release"), "").unwrap();
    let id = first.json()["result"]["build_uuid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        d.wait_status(&id, "stopped", 20)["build_outcome"],
        "success"
    );
    assert_eq!(
        d.wait_status(&blocker, "stopped", 20)["build_outcome"],
        "success"
    );

    let t = scrape(&d);
    let v = |s: &str| value(&t, s).unwrap_or_else(|| panic!("no {s} in\n{t}"));
    assert_eq!(
        v(r#"deployhook_builds_total{project="site",outcome="success"}"#),
        2.0
    );
    assert_eq!(
        v(r#"deployhook_builds_total{project="site",outcome="fail"}"#),
        0.0
    );
    assert_eq!(
        v(r#"deployhook_build_duration_seconds_count{project="site"}"#),
        2.0
    );
    assert_eq!(
        v(r#"deployhook_build_duration_seconds_bucket{project="site",le="+Inf"}"#),
        2.0
    );
    let trig = |source: &str, result: &str| {
        v(&format!(
            "deployhook_triggers_total{{source=\"{source}\",result=\"{result}\"}}"
        ))
    };
    assert_eq!(trig("deploy_hook", "created"), 1.0);
    assert_eq!(trig("deploy_hook", "deduplicated"), 1.0);
    assert_eq!(trig("deploy_hook", "rejected"), 1.0);
    assert_eq!(trig("deploy_hook", "rate_limited"), 0.0);
    assert_eq!(trig("api", "created"), 1.0);
    assert_eq!(trig("git_push", "created"), 0.0);
    assert_eq!(
        v(r#"deployhook_http_requests_total{route="/hooks/{token}",code="200"}"#),
        2.0
    );
    assert_eq!(
        v(r#"deployhook_http_requests_total{route="/hooks/{token}",code="404"}"#),
        1.0
    );
    assert!(v(r#"deployhook_http_requests_total{route="/api/builds/{uuid}",code="200"}"#) >= 2.0);
    assert_eq!(v("deployhook_queued_builds"), 0.0);
    assert_eq!(v("deployhook_running_builds"), 0.0);
    assert!(v("process_start_time_seconds") > 1.6e9);
    // Only templates: no raw path (and so no token) ever becomes a label.
    assert!(!t.contains("dh_"), "{t}");
    assert!(!t.contains("other\""), "branch names are not labels: {t}");
}

#[test]
fn metrics_need_the_admin_token_unless_public() {
    let wd = tempfile::tempdir().unwrap();
    let project = workdir_project("site", wd.path(), "true", "");
    let d = Daemon::start(&project);
    let r = request(d.addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["errors"][0]["code"], 1401);
    let r = request(
        d.addr,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer wrong")],
        b"",
    );
    assert_eq!(r.status, 401);
    assert_eq!(
        request(d.addr, "POST", "/metrics", &[], b"").status,
        401,
        "the token is checked before the method"
    );
    scrape(&d);

    // `[metrics] public = true`, applied by a reload.
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, format!("{text}\n[metrics]\npublic = true\n")).unwrap();
    d.signal("HUP");
    eventually(20, "metrics to become public", || {
        request(d.addr, "GET", "/metrics", &[], b"").status == 200
    });
    let r = request(d.addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    assert!(String::from_utf8_lossy(&r.body).contains("deployhook_builds_total{project=\"site\""));
    let r = request(d.addr, "POST", "/metrics", &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    // The admin API itself stays protected.
    assert_eq!(
        request(d.addr, "GET", "/api/projects", &[], b"").status,
        401
    );
}
