//! Operations (issue 6): `GET /metrics`, log formats, no secret in logs, sd_notify.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

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
    let (d, wd) = Daemon::start_workdir("site", BLOCK_OTHER, "");
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
    r.assert_error(401, 1401, "", "/metrics without a token");
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

fn recv(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 1024];
    let n = socket
        .recv(&mut buf)
        .expect("no sd_notify message (timed out)");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn first_line(msg: &str) -> &str {
    msg.lines().next().unwrap_or_default()
}

#[test]
fn sd_notify_ready_reloading_ready_stopping_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let wd = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&sock_path).unwrap();
    // Only a guard against hanging forever; the daemon answers in milliseconds.
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write_config(
        tmp.path(),
        "",
        &workdir_project("site", wd.path(), "true", ""),
    );
    let mut d = Daemon::spawn(
        tmp.path(),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let ready = recv(&socket);
    assert_eq!(first_line(&ready), "READY=1", "{ready}");
    assert!(
        ready.contains(&format!("STATUS=listening on {}", d.addr)),
        "{ready}"
    );

    d.signal("HUP");
    let reloading = recv(&socket);
    assert_eq!(first_line(&reloading), "RELOADING=1", "{reloading}");
    assert!(
        reloading.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "{reloading}"
    );
    let ready = recv(&socket);
    assert_eq!(first_line(&ready), "READY=1", "{ready}");

    // A rejected reload still ends with READY=1: the old config serves.
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, format!("{text}\nbogus = 1\n")).unwrap();
    d.signal("HUP");
    assert_eq!(first_line(&recv(&socket)), "RELOADING=1");
    let ready = recv(&socket);
    assert_eq!(first_line(&ready), "READY=1", "{ready}");
    assert!(ready.contains("rejected"), "{ready}");

    d.signal("TERM");
    let stopping = recv(&socket);
    assert_eq!(first_line(&stopping), "STOPPING=1", "{stopping}");
    assert_eq!(d.wait_exit(30), Some(0));
}

/// Regression: a reload that was under way when SIGTERM arrived used to finish with
/// `READY=1` after `STOPPING=1`, telling systemd the stopping daemon was ready again.
#[test]
fn no_ready_after_stopping_even_when_a_reload_finishes_during_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let wd = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&sock_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // A long shutdown_timeout: the drain lasts until the test releases the build.
    let text = format!(
        "{}\n[api]\ntoken_file = \"admin.token\"\n{}",
        base_config(tmp.path()).replace("shutdown_timeout = \"3s\"", "shutdown_timeout = \"60s\""),
        workdir_project("site", wd.path(), BLOCK_OTHER, "")
    );
    let config = tmp.path().join("deploy.toml");
    std::fs::write(&config, &text).unwrap();
    let mut d = Daemon::spawn(
        tmp.path(),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first_line(&recv(&socket)), "READY=1");
    let id = d.trigger_id("site", "other");
    d.wait_status(&id, "running", 10);

    // The config becomes a FIFO, so the reload blocks reading it until the test writes.
    std::fs::remove_file(&config).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(&config)
            .status()
            .unwrap()
            .success()
    );
    d.signal("HUP");
    assert_eq!(first_line(&recv(&socket)), "RELOADING=1");
    d.signal("TERM");
    assert_eq!(first_line(&recv(&socket)), "STOPPING=1");
    // Opening the FIFO for writing waits for the reload's read: it is blocked there.
    std::fs::write(&config, &text).unwrap();
    eventually(20, "the reload finishes", || {
        d.logs().contains("config reloaded")
    });
    std::fs::write(wd.path().join("release"), "").unwrap();
    assert_eq!(d.wait_exit(60), Some(0));
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1024];
    match socket.recv(&mut buf) {
        Ok(n) => panic!(
            "a message after STOPPING=1: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
    }
}

const GIT_SECRET: &str = "git-secret-that-must-never-be-logged";

#[test]
fn no_token_or_secret_reaches_the_log_even_at_trace_level() {
    let tmp = tempfile::tempdir().unwrap();
    let wd = tempfile::tempdir().unwrap();
    std::fs::write(wd.path().join("site.secret"), format!("{GIT_SECRET}\n")).unwrap();
    write_config(
        tmp.path(),
        "",
        &workdir_project(
            "site",
            wd.path(),
            "echo building",
            &format!(
                "git_secret_file = \"{}\"",
                wd.path().join("site.secret").display()
            ),
        ),
    );
    let mut d =
        Daemon::spawn(tmp.path(), &[("RUST_LOG", "trace")]).unwrap_or_else(|e| panic!("{e}"));

    let (hook_id, hook) = d.create_hook("site", "cms", "main");
    let r = d.post(&hook, b"payload");
    assert_eq!(r.status, 200);
    let id = r.json()["result"]["build_uuid"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_status(&id, "stopped", 20);

    // Git pushes: GitLab sends the secret itself in a header; GitHub an HMAC of it.
    let body = json!({"ref": "refs/heads/main", "after": "1".repeat(40)}).to_string();
    let r = request(
        d.addr,
        "POST",
        "/git/site",
        &[
            ("X-Gitlab-Event", "Push Hook"),
            ("X-Gitlab-Token", GIT_SECRET),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let sig = github_signature(GIT_SECRET, body.as_bytes());
    let r = request(
        d.addr,
        "POST",
        "/git/site",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // A wrong GitLab token, which a careless log might echo.
    let r = request(
        d.addr,
        "POST",
        "/git/site",
        &[
            ("X-Gitlab-Event", "Push Hook"),
            ("X-Gitlab-Token", "wrong-secret-also-not-logged"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 401);

    // Rotate: the new URL works, the old one is refused.
    let r = d.api(
        "POST",
        &format!("/api/projects/site/hooks/{hook_id}/rotate"),
        None,
    );
    assert_eq!(r.status, 200);
    let url = r.json()["result"]["url"].as_str().unwrap().to_string();
    let new_hook = format!("/hooks/{}", url.split_once("/hooks/").unwrap().1);
    assert_eq!(d.post(&hook, b"").status, 404);
    let r = d.post(&new_hook, b"");
    assert_eq!(r.status, 200);
    let id = r.json()["result"]["build_uuid"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_status(&id, "stopped", 20);
    scrape(&d);

    d.signal("TERM");
    assert_eq!(d.wait_exit(30), Some(0));
    let logs = d.logs();
    // The log really was written at trace level and tells about the triggers.
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"), "{logs}");
    assert!(
        logs.contains("result=\"created\"") || logs.contains("result=created"),
        "{logs}"
    );
    let secrets = [
        ("admin token", d.token.clone()),
        ("hook token", hook.trim_start_matches("/hooks/").to_string()),
        (
            "rotated hook token",
            new_hook.trim_start_matches("/hooks/").to_string(),
        ),
        ("git secret", GIT_SECRET.to_string()),
        (
            "wrong git secret",
            "wrong-secret-also-not-logged".to_string(),
        ),
    ];
    for (what, secret) in secrets {
        assert!(secret.len() >= 20, "{what}: {secret}");
        // The whole secret, and its random part without the `dh_` prefix.
        let tail = &secret[secret.len() - 20..];
        assert!(!logs.contains(tail), "the {what} is in the daemon's log");
    }
}

#[test]
fn json_log_lines_carry_trigger_and_build_fields() {
    let (tmp, _wd) = site_dirs("", "true");
    let mut d = Daemon::spawn(tmp.path(), &[("DEPLOYHOOK_LOG_FORMAT", "json")])
        .unwrap_or_else(|e| panic!("{e}"));
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "stopped", 20);
    d.signal("TERM");
    assert_eq!(d.wait_exit(30), Some(0));
    let lines: Vec<Value> = d
        .logs()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let find = |message: &str| {
        lines
            .iter()
            .find(|l| l["message"] == message && l["build"] == id)
            .unwrap_or_else(|| panic!("no {message:?} line for {id} in {lines:#?}"))
            .clone()
    };
    let t = find("trigger");
    assert_eq!(t["level"], "INFO");
    assert!(t["timestamp"].is_string());
    assert_eq!(t["source"], "api");
    assert_eq!(t["result"], "created");
    assert_eq!(t["project"], "site");
    assert_eq!(t["branch"], "main");
    assert_eq!(t["already_exists"], false);
    for m in ["build queued", "build initializing", "build running"] {
        let l = find(m);
        assert_eq!(
            (l["project"].as_str(), l["branch"].as_str()),
            (Some("site"), Some("main"))
        );
    }
    assert_eq!(find("build stopped")["outcome"], "success");
}

/// Runs `serve` with `args` and stderr in a file; returns the file's text after a clean stop.
fn stderr_of_a_run(args: &[&str], journal_stream: impl Fn(&std::fs::File) -> String) -> String {
    let tmp = tempfile::tempdir().unwrap();
    write_config(
        tmp.path(),
        "",
        &workdir_project("site", tmp.path(), "true", ""),
    );
    let log_path = tmp.path().join("stderr");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(tmp.path().join("deploy.toml"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("JOURNAL_STREAM", journal_stream(&log))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    eventually(20, "the daemon to listen", || {
        std::fs::read_to_string(&log_path).is_ok_and(|t| t.contains("listening on"))
    });
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(&log_path).unwrap()
}

#[test]
fn under_journald_lines_have_no_timestamp_and_no_colour() {
    use std::os::unix::fs::MetadataExt as _;
    let journal_stream = |f: &std::fs::File| {
        let m = f.metadata().unwrap();
        format!("{}:{}", m.dev(), m.ino())
    };
    let journal = stderr_of_a_run(&[], journal_stream);
    assert!(journal.contains("listening on"), "{journal}");
    for line in journal.lines() {
        assert!(!line.contains('\x1b'), "colour under journald: {line:?}");
        // The syslog priority journald reads (and strips), then the level.
        let rest = line
            .strip_prefix("<6>")
            .map(|r| (r, "INFO"))
            .or_else(|| line.strip_prefix("<4>").map(|r| (r, "WARN")));
        assert!(
            rest.is_some_and(|(r, level)| r.trim_start().starts_with(level)),
            "a line under journald should start with its priority and level: {line:?}"
        );
    }
    // A JOURNAL_STREAM inherited by a process whose stderr goes elsewhere does not count.
    let elsewhere = stderr_of_a_run(&[], |_| "1:1".to_string());
    // `--log-format text` keeps timestamps even under journald (after the priority).
    let text = stderr_of_a_run(&["--log-format", "text"], journal_stream);
    for (out, prefix) in [(elsewhere, ""), (text, "<6>")] {
        let first = out.lines().next().unwrap_or_default();
        assert!(
            first
                .strip_prefix(prefix)
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit())),
            "expected {prefix:?} and a timestamp: {first:?}"
        );
        assert!(!out.contains('\x1b'), "colour in a file: {out:?}");
    }
}
#[test]
fn metrics_count_rate_limited_triggers() {
    let (d, _wd) = Daemon::start_workdir("site", "true", "project_builds_per_minute = 1");
    let (_, hook) = d.create_hook("site", "cms", "main");
    assert_eq!(d.post(&hook, b"").status, 200);
    let r = d.api(
        "POST",
        "/api/projects/site/builds",
        Some(serde_json::json!({"branch": "other"})),
    );
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    let t = scrape(&d);
    assert_eq!(
        value(
            &t,
            r#"deployhook_triggers_total{source="api",result="rate_limited"}"#
        ),
        Some(1.0),
        "{t}"
    );
    assert_eq!(
        value(
            &t,
            r#"deployhook_triggers_total{source="deploy_hook",result="created"}"#
        ),
        Some(1.0),
        "{t}"
    );
    d.wait_log("result=rate_limited", 10);
}
