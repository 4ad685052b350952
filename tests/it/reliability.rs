//! Reliability and limits (issue 5): rate limits, durable acknowledgement under `kill -9`,
//! reloads, shutdown by SIGINT, store write failures.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::*;

/// A trigger through the API that may be refused.
fn try_trigger(d: &Daemon, project: &str, branch: &str) -> Resp {
    d.api(
        "POST",
        &format!("/api/projects/{project}/builds"),
        Some(json!({"branch": branch})),
    )
}

fn retry_after(r: &Resp) -> u64 {
    r.header("Retry-After")
        .unwrap_or_else(|| panic!("no Retry-After: {:?}", r.headers))
        .parse()
        .unwrap()
}

#[test]
fn project_rate_limit_refuses_with_an_exact_retry_after_and_survives_restarts() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&workdir_project(
        "site",
        wd.path(),
        "sleep 30",
        "cancel_superseded = false\nproject_builds_per_minute = 2",
    ));
    let before_first = Instant::now();
    let first = d.trigger_id("site", "main");
    let after_first = Instant::now();
    d.wait_status(&first, "running", 10);
    // The second new build: queued behind the running one.
    let second = d.trigger_id("site", "other");
    // Deduplicated triggers never count, however many.
    for _ in 0..5 {
        let r = d.trigger("site", "other");
        assert_eq!(r["already_exists"], true);
        assert_eq!(r["build_uuid"], second.as_str());
    }
    // `main` is running, not pending: this would be a third new build.
    let before_req = Instant::now();
    let r = try_trigger(&d, "site", "main");
    let after_req = Instant::now();
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["success"], false);
    assert_eq!(v["errors"][0]["code"], 1429);
    let msg = r.error_message();
    assert!(msg.contains("project_builds_per_minute = 2"), "{msg}");
    // The first build's event expires 60 s after it was created, which happened between
    // `before_first` and `after_first`; the answer was computed between `before_req` and
    // `after_req`. Retry-After is that wait rounded up to whole seconds.
    let secs = retry_after(&r);
    let lo = (Duration::from_secs(60) - (after_req - before_first)).as_secs_f64();
    let hi = (Duration::from_secs(60) - (before_req - after_first)).as_secs_f64();
    assert!(
        secs as f64 >= lo.ceil() && secs as f64 <= hi.ceil(),
        "Retry-After {secs} not in [{lo}, {hi}] rounded up"
    );
    assert!(msg.contains(&format!("retry in {secs} s")), "{msg}");
    // Nothing was written for the refused trigger.
    let list = d.api("GET", "/api/projects/site/builds", None).json();
    assert_eq!(list["result"].as_array().unwrap().len(), 2);

    // The window survives kill -9 and a clean restart.
    let d = d.restart(true);
    let r = try_trigger(&d, "site", "main");
    assert_eq!(r.status, 429, "after kill -9");
    assert!(retry_after(&r) <= secs);
    let d = d.restart(false);
    let r = try_trigger(&d, "site", "main");
    assert_eq!(r.status, 429, "after SIGTERM");
    // Hooks are limited the same way.
    let (_, path) = d.create_hook("site", "cms", "main");
    let r = d.post(&path, b"");
    assert_eq!(r.status, 429);
    assert!(r.header("Retry-After").is_some());
    // A reload that raises the limit applies to the next trigger.
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        text.replace(
            "project_builds_per_minute = 2",
            "project_builds_per_minute = 3",
        ),
    )
    .unwrap();
    d.signal("HUP");
    eventually(10, "reloaded limit applies", || {
        try_trigger(&d, "site", "main").status == 200
    });
    // Both builds before the restarts were interrupted, so that build started at once and is
    // past resolution: one more would be the 4th new build in the window, over the new limit.
    assert_eq!(try_trigger(&d, "site", "main").status, 429);
}

#[test]
fn daemon_rate_limit_counts_every_project() {
    let wd = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}{}",
        workdir_project("a", wd.path(), "true", ""),
        workdir_project("b", wd.path(), "true", ""),
        workdir_project("c", wd.path(), "true", "")
    );
    let d = Daemon::start_with_server("builds_per_minute = 2", &cfg);
    d.trigger_id("a", "main");
    d.trigger_id("b", "main");
    let r = try_trigger(&d, "c", "main");
    assert_eq!(r.status, 429);
    assert!(r.error_message().contains("builds_per_minute = 2"));
    let secs = retry_after(&r);
    assert!((1..=60).contains(&secs), "{secs}");
}

/// Fires `n` triggers for distinct branches from `n` threads; returns the build uuids of the
/// ones answered 200 (the others were cut off by a kill).
fn fire(d: &Daemon, project: &str, branches: &[String]) -> Vec<String> {
    std::thread::scope(|s| {
        let hs: Vec<_> = branches
            .iter()
            .map(|b| {
                s.spawn(move || {
                    let body = json!({"branch": b}).to_string();
                    let auth = format!("Bearer {}", d.token);
                    try_request(
                        d.addr,
                        "POST",
                        &format!("/api/projects/{project}/builds"),
                        &[
                            ("Authorization", auth.as_str()),
                            ("Content-Type", "application/json"),
                        ],
                        body.as_bytes(),
                    )
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().unwrap())
            .filter(|r| r.status == 200)
            .map(|r| {
                r.json()["result"]["build_uuid"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    })
}

#[test]
fn every_acknowledged_build_survives_kill_9_right_after_its_200() {
    let wd = tempfile::tempdir().unwrap();
    let branches: Vec<String> = (0..16).map(|i| format!("b{i}")).collect();
    let list = branches
        .iter()
        .map(|b| format!("{b:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let cfg = format!(
        "[projects.site]\nbranches = [{list}]\nworkdir = {}\ncommand = \"sleep 30\"\n",
        toml_str(&wd.path().display().to_string())
    );
    let mut d = Daemon::start_with_server(
        "builds_per_minute = 1000000\nproject_builds_per_minute = 1000000",
        &cfg,
    );
    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..6 {
        // Concurrent creations (one group commit), then kill -9 the moment they are answered.
        let ids = fire(&d, "site", &branches);
        assert!(!ids.is_empty() || round > 0, "no trigger answered");
        let dir = d.dir.clone();
        let tmp = d._tmp.take();
        d.kill9();
        acknowledged.extend(ids);
        d = Daemon::spawn(&dir, &[]).unwrap_or_else(|e| panic!("{e}"));
        d._tmp = tmp;
        for id in &acknowledged {
            let r = d.api("GET", &format!("/api/builds/{id}"), None);
            assert_eq!(
                r.status, 200,
                "acknowledged build {id} lost in round {round}"
            );
        }
    }
    // A kill in the middle of a burst: whatever was answered is there.
    let dir = d.dir.clone();
    let tmp = d._tmp.take();
    let ids = std::thread::scope(|s| {
        let h = s.spawn(|| fire(&d, "site", &branches));
        std::thread::sleep(Duration::from_millis(5));
        let pid = d.pid();
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        h.join().unwrap()
    });
    d.kill9();
    let d = Daemon::spawn(&dir, &[]).unwrap_or_else(|e| panic!("{e}"));
    let _tmp = tmp;
    for id in ids.iter().chain(&acknowledged) {
        let r = d.api("GET", &format!("/api/builds/{id}"), None);
        assert_eq!(r.status, 200, "acknowledged build {id} lost");
    }
}

#[test]
fn sigint_shuts_down_like_sigterm_and_queued_builds_wait_for_the_next_start() {
    let wd = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&workdir_project("site", wd.path(), "sleep 30", ""));
    let running = d.trigger_id("site", "main");
    d.wait_status(&running, "running", 10);
    let queued = d.trigger_id("site", "other");
    d.signal("INT");
    assert_eq!(d.wait_exit(30), Some(0));
    assert!(d.logs().contains("SIGINT"), "{}", d.logs());
    let dir = d.dir.clone();
    let _tmp = d._tmp.take();
    let d2 = Daemon::spawn(&dir, &[]).unwrap();
    let b = d2.build(&running);
    assert_eq!(b["build_outcome"], "interrupted");
    assert_eq!(b["exit_code"], Value::Null);
    // The queued build was not touched by the shutdown and runs now.
    let q = d2.wait_status(&queued, "running", 20);
    assert_eq!(q["build_outcome"], Value::Null);
}
