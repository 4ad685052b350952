//! Hooks, admin API, errors, restart, state dir lock, CLI (issue 2).

use serde_json::{Value, json};

use crate::util::*;

fn busy_project(d: &tempfile::TempDir) -> String {
    // A command slow enough that builds are still around while the test looks at them.
    workdir_project("site", d.path(), "sleep 5", "")
}

#[test]
fn hook_fires_a_build_with_trigger_metadata() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&busy_project(&wd));
    let (hook_id, path) = d.create_hook("site", "cms", "main");
    assert!(
        path.starts_with("/hooks/dh_") && path.len() == "/hooks/".len() + 46,
        "{path}"
    );
    let r = d.post(&path, br#"{"entry":"changed"}"#);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["success"], true);
    let b = &v["result"];
    assert_eq!(b["already_exists"], false);
    assert_eq!(b["project"], "site");
    assert_eq!(b["branch"], "main");
    assert_eq!(b["status"], "queued");
    assert_eq!(b["build_outcome"], Value::Null);
    assert_eq!(b["build_trigger_source"], "deploy_hook");
    assert_eq!(
        b["trigger"],
        json!({"hook_id": hook_id, "hook_name": "cms", "label": "deploy hook"})
    );
    let id = b["build_uuid"].as_str().unwrap();
    assert_eq!(id.len(), 36);
    assert_eq!(d.build(id)["build_uuid"], id);
    // The hook counts its firing.
    let hooks = d.api("GET", "/api/projects/site/hooks", None).json();
    assert_eq!(hooks["result"][0]["trigger_count"], 1);
    assert!(hooks["result"][0]["last_triggered_on"].is_string());
    assert!(
        hooks["result"][0].get("url").is_none(),
        "the URL is shown only at creation"
    );
    // Listing finds it, newest first.
    let list = d.api("GET", "/api/projects/site/builds", None).json();
    assert_eq!(list["result"][0]["build_uuid"], id);
    assert_eq!(list["result_info"]["next_cursor"], Value::Null);
}

#[test]
fn rotate_and_delete_stop_the_old_url_at_once() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&busy_project(&wd));
    let (id, old) = d.create_hook("site", "cms", "main");
    let r = d.api(
        "POST",
        &format!("/api/projects/site/hooks/{id}/rotate"),
        None,
    );
    assert_eq!(r.status, 200);
    let new_url = r.json()["result"]["url"].as_str().unwrap().to_string();
    let new = format!("/hooks/{}", new_url.rsplit('/').next().unwrap());
    assert_ne!(new, old);
    assert_eq!(d.post(&old, b"").status, 404);
    assert_eq!(d.post(&new, b"").status, 200);
    let r = d.api("DELETE", &format!("/api/projects/site/hooks/{id}"), None);
    assert_eq!(r.status, 200);
    assert_eq!(d.post(&new, b"").status, 404);
    assert_eq!(
        d.api("DELETE", &format!("/api/projects/site/hooks/{id}"), None)
            .status,
        404
    );
}

#[test]
fn every_unknown_token_gets_the_same_404_body() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&busy_project(&wd));
    let (id, real) = d.create_hook("site", "cms", "main");
    let token = real.trim_start_matches("/hooks/").to_string();
    let prefix_sharing = format!("{}{}", &token[..40], "AAAAAA");
    let cases = [
        "/hooks/dh_unknown".to_string(),
        "/hooks/x".to_string(),
        format!("/hooks/{}", "a".repeat(5000)),
        format!("/hooks/{prefix_sharing}"),
        format!("/hooks/{}", &token[..45]),
        format!("/hooks/{token}x"),
    ];
    let first = d.post(&cases[0], b"");
    first.assert_error(404, 1404, "", &cases[0]);
    for c in &cases[1..] {
        let r = d.post(c, b"");
        assert_eq!(r.status, 404, "{c}");
        assert_eq!(r.body, first.body, "{c}");
    }
    // Deleted and rotated tokens too.
    d.api(
        "POST",
        &format!("/api/projects/site/hooks/{id}/rotate"),
        None,
    );
    assert_eq!(d.post(&real, b"").body, first.body);
    let (id2, real2) = d.create_hook("site", "other", "main");
    d.api("DELETE", &format!("/api/projects/site/hooks/{id2}"), None);
    assert_eq!(d.post(&real2, b"").body, first.body);
    // The token never appears in the daemon's log.
    assert!(!d.logs().contains(&token), "token leaked into the log");
}

#[test]
fn admin_api_needs_the_token() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&busy_project(&wd));
    for (method, path) in [
        ("GET", "/api/projects"),
        ("GET", "/api/projects/site/hooks"),
        ("POST", "/api/projects/site/builds"),
        ("GET", "/api/builds/00000000-0000-4000-8000-000000000000"),
    ] {
        let r = request(d.addr, method, path, &[], b"");
        r.assert_error(401, 1401, "", &format!("{method} {path}"));
        let r = request(
            d.addr,
            method,
            path,
            &[("Authorization", "Bearer wrong")],
            b"",
        );
        assert_eq!(r.status, 401, "{method} {path}");
        let r = request(d.addr, method, path, &[("Authorization", &d.token)], b"");
        assert_eq!(r.status, 401, "{method} {path} without Bearer");
    }
    // The scheme is case-insensitive.
    let lower = format!("bearer {}", d.token);
    assert_eq!(
        request(
            d.addr,
            "GET",
            "/api/projects",
            &[("Authorization", &lower)],
            b""
        )
        .status,
        200
    );
    let r = d.api("GET", "/api/projects", None);
    assert_eq!(r.status, 200);
    let p = &r.json()["result"][0];
    assert_eq!(p["name"], "site");
    assert_eq!(p["branches"], json!(["main", "other"]));
    assert_eq!(p["queued"], 0);
    assert_eq!(p["running_build_uuid"], Value::Null);
    assert_eq!(p["last_build"], Value::Null);
}

#[test]
fn wrong_methods_get_405_with_allow() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&busy_project(&wd));
    let r = request(d.addr, "GET", "/hooks/dh_x", &[], b"");
    r.assert_error(405, 1405, "", "GET of a hook");
    assert_eq!(r.header("allow"), Some("POST"));
    let r = request(d.addr, "POST", "/healthz", &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    let r = d.api("PUT", "/api/projects/site/builds", None);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST"));
    let r = d.api("GET", "/api/projects/site/hooks/x", None);
    assert_eq!(r.header("allow"), Some("DELETE"));
}

#[test]
fn oversized_bodies_get_413() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_server("max_body_bytes = 1000", &busy_project(&wd));
    let (_, path) = d.create_hook("site", "cms", "main");
    let r = d.post(&path, &vec![b'x'; 1001]);
    r.assert_error(413, 1413, "", "a body over max_body_bytes");
    // A huge Content-Length is refused before any body is sent.
    let r = raw(
        d.addr,
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert_eq!(r.status, 413);
    // A chunked body that grows past the limit.
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..3 {
        req.extend_from_slice(format!("{:x}\r\n{}\r\n", 600, "y".repeat(600)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw(d.addr, &req).status, 413);
    // Exactly the limit passes.
    assert_eq!(d.post(&path, &vec![b'x'; 1000]).status, 200);
}

#[test]
fn bad_json_names_the_field() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&busy_project(&wd));
    let auth = format!("Bearer {}", d.token);
    let h = [("Authorization", auth.as_str())];
    let r = request(d.addr, "POST", "/api/projects/site/hooks", &h, b"{not json");
    r.assert_error(400, 1400, "", "a body that is not JSON");
    let r = d.api("POST", "/api/projects/site/hooks", Some(json!({"name": 5})));
    assert_eq!(r.status, 400);
    assert!(r.error_message().contains("\"name\""));
    let r = d.api(
        "POST",
        "/api/projects/site/hooks",
        Some(json!({"branch": "main"})),
    );
    assert!(r.error_message().contains("\"name\""));
    let r = d.api(
        "POST",
        "/api/projects/site/hooks",
        Some(json!({"name": "x", "branch": "nope"})),
    );
    assert_eq!(r.status, 400);
    assert!(r.error_message().contains("branch"));
    let r = d.api(
        "POST",
        "/api/projects/site/hooks",
        Some(json!({"name": "x", "brnch": "main"})),
    );
    assert_eq!(r.status, 400);
    assert!(r.error_message().contains("brnch"));
    let r = d.api(
        "POST",
        "/api/projects/site/builds",
        Some(json!({"branch": ["main"]})),
    );
    assert_eq!(r.status, 400);
    assert!(r.error_message().contains("\"branch\""));
    // Duplicate hook names in a project.
    d.create_hook("site", "cms", "main");
    let r = d.api(
        "POST",
        "/api/projects/site/hooks",
        Some(json!({"name": "cms", "branch": "main"})),
    );
    assert_eq!(r.status, 400);
    // Unknown project.
    assert_eq!(d.api("GET", "/api/projects/nope/hooks", None).status, 404);
    assert_eq!(d.api("GET", "/api/builds/not-a-uuid", None).status, 404);
    // Bad listing parameters.
    assert_eq!(
        d.api("GET", "/api/projects/site/builds?limit=0", None)
            .status,
        400
    );
    assert_eq!(
        d.api("GET", "/api/projects/site/builds?limit=101", None)
            .status,
        400
    );
    assert_eq!(
        d.api("GET", "/api/projects/site/builds?status=done", None)
            .status,
        400
    );
    assert_eq!(
        d.api("GET", "/api/projects/site/builds?cursor=zzz", None)
            .status,
        400
    );
}

#[test]
fn listing_pages_with_a_cursor() {
    let (d, _wd) = Daemon::start_workdir("site", "true", "");
    let mut ids = Vec::new();
    for _ in 0..5 {
        let b = d.trigger("site", "main");
        let id = b["build_uuid"].as_str().unwrap().to_string();
        d.wait_status(&id, "stopped", 20);
        ids.push(id);
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut cursor = String::new();
    // Five builds at two a page: three pages; a cursor that never ends fails the test.
    for page in 0.. {
        assert!(page < 3, "more than three pages: {seen:?}");
        let q = if cursor.is_empty() {
            "limit=2".to_string()
        } else {
            format!("limit=2&cursor={cursor}")
        };
        let v = d
            .api("GET", &format!("/api/projects/site/builds?{q}"), None)
            .json();
        for b in v["result"].as_array().unwrap() {
            seen.push(b["build_uuid"].as_str().unwrap().to_string());
        }
        match v["result_info"]["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    let v = d
        .api("GET", "/api/projects/site/builds?status=queued", None)
        .json();
    assert_eq!(v["result"], json!([]));
}

#[test]
fn hooks_and_builds_survive_a_restart() {
    let (d, _wd) = Daemon::start_workdir("site", "true", "");
    let (hook_id, path) = d.create_hook("site", "cms", "main");
    let b = d.post(&path, b"payload").json()["result"].clone();
    let id = b["build_uuid"].as_str().unwrap().to_string();
    d.wait_status(&id, "stopped", 20);
    let d2 = d.restart(false);
    let hooks = d2.api("GET", "/api/projects/site/hooks", None).json();
    assert_eq!(hooks["result"][0]["id"], hook_id);
    assert_eq!(d2.build(&id)["build_outcome"], "success");
    // The URL still works.
    assert_eq!(d2.post(&path, b"").status, 200);
}

#[test]
fn acknowledged_builds_survive_kill_9() {
    // Busy project: the acknowledged builds stay queued behind a long one.
    let (d, _wd) = Daemon::start_workdir("site", "sleep 30", "");
    let first = d.trigger_id("site", "other");
    let queued = d.trigger_id("site", "main");
    let d2 = d.restart(true);
    let b = d2.build(&first);
    assert_eq!(b["status"], "stopped");
    assert_eq!(b["build_outcome"], "interrupted");
    // The queued one resumes.
    let q = d2.wait_status(&queued, "running", 20);
    assert_eq!(q["build_outcome"], Value::Null);
}

#[test]
fn a_second_daemon_on_the_same_state_dir_fails_cleanly() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&busy_project(&wd));
    let (code, _, err) = cli(&["serve", "--config", d.config.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("is in use by another deployhook"), "{err}");
    // The first is unaffected.
    assert_eq!(request(d.addr, "GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn healthz_reports_counts() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&busy_project(&wd));
    let v = request(d.addr, "GET", "/healthz", &[], b"").json();
    assert_eq!(
        v["result"],
        json!({"status": "ok", "queued": 0, "running": 0})
    );
    d.trigger("site", "main");
    d.trigger("site", "other");
    let v = request(d.addr, "GET", "/healthz", &[], b"").json();
    assert_eq!(v["result"]["running"], 1);
    assert_eq!(v["result"]["queued"], 1);
}

#[test]
fn check_validates_and_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("deploy.toml");
    std::fs::write(&cfg, "[server]\nlisten = \"127.0.0.1:9999\"\n[projects.site]\nbranches = [\"main\"]\ncommand = \"true\"\nworkdir = \".\"\n").unwrap();
    let (code, out, _) = cli(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("127.0.0.1:9999") && out.contains("site") && out.contains("main"),
        "{out}"
    );
    std::fs::write(&cfg, "[server]\nlisten = \"127.0.0.1:9999\"\nbogus = 1\n").unwrap();
    let (code, out, err) = cli(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(
        err.starts_with(&format!("{}:3:1: server.bogus:", cfg.display())),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // The shipped example is valid.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy.toml.example");
    let (code, _, err) = cli(&["check", "--config", example], &[]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn cli_client_commands() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&busy_project(&wd));
    let url = format!("http://{}", d.addr);
    let cfg = d.config.to_str().unwrap().to_string();
    let env = [("DEPLOYHOOK_URL", url.as_str())];
    let run = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--config", &cfg]);
        cli(&a, &env)
    };
    let (code, out, err) = run(&[
        "hooks", "create", "site", "--name", "cms", "--branch", "main",
    ]);
    assert_eq!(code, 0, "{err}");
    let hook_url = out.trim().to_string();
    // public_url defaults to the address actually bound (port 0 here).
    assert!(
        hook_url.starts_with(&format!("http://{}/hooks/dh_", d.addr)),
        "{hook_url}"
    );
    let (code, out, _) = run(&["hooks", "list", "site", "--json"]);
    assert_eq!(code, 0);
    let hooks: Value = serde_json::from_str(&out).unwrap();
    let hook_id = hooks[0]["id"].as_str().unwrap().to_string();
    let (code, out, _) = run(&["hooks", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("cms") && out.contains(&hook_id), "{out}");
    let (code, out, _) = run(&["hooks", "rotate", "site", &hook_id]);
    assert_eq!(code, 0);
    assert!(out.trim().starts_with("http://") && out.trim() != hook_url);
    let (code, out, err) = run(&["trigger", "site", "--branch", "main"]);
    assert_eq!(code, 0, "{err}");
    let build = out.trim().to_string();
    assert_eq!(build.len(), 36);
    let (code, out, _) = run(&["builds", "show", &build]);
    assert_eq!(code, 0);
    assert!(out.contains(&build) && out.contains("api"), "{out}");
    let (code, out, _) = run(&["builds", "list", "site", "--limit", "5"]);
    assert_eq!(code, 0);
    assert!(out.contains(&build));
    let (code, out, _) = run(&["builds", "cancel", &build, "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["build_outcome"], "cancelled");
    let (code, _, err) = run(&["builds", "cancel", &build]);
    assert_eq!(code, 1);
    assert!(err.contains("409"), "{err}");
    let (code, _, _) = run(&["hooks", "delete", "site", &hook_id]);
    assert_eq!(code, 0);
    let (code, _, err) = run(&["hooks", "delete", "site", &hook_id]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1);
    // Usage errors exit 2.
    let (code, _, _) = run(&["hooks", "create", "site"]);
    assert_eq!(code, 2);
    let (code, _, _) = run(&["frobnicate"]);
    assert_eq!(code, 2);
    // $DEPLOYHOOK_TOKEN overrides the token file.
    let (code, _, err) = cli(
        &["hooks", "list", "site", "--config", &cfg],
        &[("DEPLOYHOOK_URL", &url), ("DEPLOYHOOK_TOKEN", "wrong")],
    );
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
}

#[test]
fn cli_says_when_the_daemon_is_not_running() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let url = format!("http://127.0.0.1:{port}");
    let (code, _, err) = cli(
        &["builds", "list", "site"],
        &[("DEPLOYHOOK_URL", &url), ("DEPLOYHOOK_TOKEN", "t")],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach deployhook")
            && err.contains("connection refused")
            && err.contains("deployhook serve"),
        "{err}"
    );
}

#[test]
fn a_client_whose_stdout_is_closed_stops_quietly() {
    // Regression: `deployhook builds list --json | head -c 300` panicked with "failed
    // printing to stdout: Broken pipe".
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&busy_project(&wd));
    for _ in 0..3 {
        d.trigger_id("site", "other");
    }
    let url = format!("http://{}", d.addr);
    let mut child = std::process::Command::new(BIN)
        .args(["builds", "list", "--json", "--config"])
        .arg(&d.config)
        .env("DEPLOYHOOK_URL", &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before the command has its answer.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// The test-only tunables are refused when they do not parse: a typo must not leave a test
/// waiting out the production timeout it meant to shorten.
#[test]
fn serve_refuses_tunables_that_do_not_parse() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), "", "");
    let config = config.to_str().unwrap();
    let (code, _, err) = cli(
        &["serve", "--config", config],
        &[(TUNABLES, "header_timeout=1s")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unknown key \"header_timeout\""), "{err}");
    // Nothing was started: no state dir, no admin token.
    assert!(!tmp.path().join("state").exists());
    assert!(!tmp.path().join("admin.token").exists());
}
