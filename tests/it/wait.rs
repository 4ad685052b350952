//! Waiting for a deploy's outcome, exact commits and redeploys (issue 14, SPEC §4.3, §2.1).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::*;

/// A workdir project whose command depends on the branch: `main` runs `$MAIN_CMD`-like
/// commands chosen per test through the branch name.
fn daemon(command: &str, extra: &str) -> (Daemon, tempfile::TempDir) {
    Daemon::start_workdir("site", command, extra)
}

fn api_trigger_wait(d: &Daemon, branch: &str, wait: &str) -> Resp {
    d.api(
        "POST",
        &format!("/api/projects/site/builds?wait={wait}"),
        Some(json!({"branch": branch})),
    )
}

fn held_waits(d: &Daemon) -> u64 {
    let r = d.api("GET", "/metrics", None);
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix("deployhook_held_waits "))
        .and_then(|v| v.trim().parse().ok())
        .expect("deployhook_held_waits in /metrics")
}

/// A `GET /api/builds/{id}/wait?timeout=120` on another thread, once the daemon holds it
/// (the only wait held); join the thread for the answer.
fn held_wait(d: &Daemon, id: &str) -> std::thread::JoinHandle<Resp> {
    let (addr, path) = (d.addr, format!("/api/builds/{id}/wait?timeout=120"));
    let auth = format!("Bearer {}", d.token);
    let waiter =
        std::thread::spawn(move || request(addr, "GET", &path, &[("Authorization", &auth)], b""));
    eventually(20, "the wait is held", || held_waits(d) == 1);
    waiter
}

#[test]
fn a_wait_answers_each_row_of_the_status_table() {
    let (d, _wd) = daemon(
        "case \"$DEPLOYHOOK_BRANCH\" in main) true;; other) exit 3;; esac",
        "timeout = \"1h\"",
    );
    // success: 200, the build in result, already_exists for a trigger.
    let r = api_trigger_wait(&d, "main", "60");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["success"], true);
    assert_eq!(v["result"]["build_outcome"], "success");
    assert_eq!(v["result"]["already_exists"], false);
    assert_eq!(v["result"]["followed_from"], Value::Null);
    // fail: 422, code 1422, a message with outcome and exit code, the build in result.
    let r = api_trigger_wait(&d, "other", "60");
    r.assert_error(422, 1422, "exit code 3", "a wait for a failing build");
    let v = r.json();
    assert_eq!(v["success"], false);
    let msg = v["errors"][0]["message"].as_str().unwrap();
    assert!(msg.contains("fail"), "{msg}");
    assert_eq!(v["result"]["build_outcome"], "fail");
    let failed = v["result"]["build_uuid"].as_str().unwrap().to_string();
    // The same through GET /wait on a stopped build: at once.
    let r = d.api("GET", &format!("/api/builds/{failed}/wait?timeout=5"), None);
    assert_eq!(r.status, 422);
    assert!(r.json()["result"].get("already_exists").is_none());
    // Bad values: 400.
    for bad in ["0", "3601", "x", "-1", "1.5", ""] {
        let r = api_trigger_wait(&d, "main", bad);
        r.assert_error(400, 1400, "", &format!("wait={bad}"));
        let r = d.api(
            "GET",
            &format!("/api/builds/{failed}/wait?timeout={bad}"),
            None,
        );
        assert_eq!(r.status, 400, "timeout={bad}");
    }
    let r = d.api(
        "GET",
        "/api/builds/00000000-0000-4000-8000-000000000000/wait?timeout=1",
        None,
    );
    assert_eq!(r.status, 404);
}

#[test]
fn timed_out_cancelled_interrupted_and_time_up() {
    let (d, _wd) = daemon(
        "case \"$DEPLOYHOOK_BRANCH\" in main) sleep 30;; other) sleep 60;; esac",
        "timeout = \"1s\"",
    );
    // timed_out: 422.
    let r = api_trigger_wait(&d, "main", "60");
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["result"]["build_outcome"], "timed_out");
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("timed_out")
    );
    // The rest with the default timeout.
    drop(d);
    let (d, _wd2) = daemon("sleep 60", "");
    // Time up: 202 with the build as it is now.
    let id = d.trigger_id("site", "main");
    let r = d.api("GET", &format!("/api/builds/{id}/wait?timeout=1"), None);
    assert_eq!(r.status, 202);
    let v = r.json();
    assert_eq!(v["success"], true);
    assert_ne!(v["result"]["status"], "stopped");
    // cancelled by the API: 409, code 1409.
    let waiter = held_wait(&d, &id);
    assert_eq!(
        d.api("POST", &format!("/api/builds/{id}/cancel"), None)
            .status,
        200
    );
    let r = waiter.join().unwrap();
    r.assert_error(409, 1409, "", "a wait for a cancelled build");
    assert_eq!(r.json()["result"]["cancel_reason"], "api");
    // interrupted: 503 with the build, for a build a crash interrupted.
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "running", 30);
    let d = d.restart(true);
    let r = d.api("GET", &format!("/api/builds/{id}/wait?timeout=5"), None);
    r.assert_error(503, 1503, "", "a wait for an interrupted build");
    assert_eq!(r.json()["result"]["build_outcome"], "interrupted");
}

/// SPEC §4.3: a wait follows `superseded_by` to the newest build and answers with it,
/// `followed_from` naming the first.
#[test]
fn a_wait_follows_supersedes_to_the_build_that_ships_the_code() {
    let (d, _wd) = daemon("sleep 2", "");
    let first = d.trigger_id("site", "main");
    d.wait_status(&first, "running", 30);
    let waiter = held_wait(&d, &first);
    let second = d.trigger_id("site", "main");
    let r = waiter.join().unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["result"]["build_uuid"], second.as_str());
    assert_eq!(v["result"]["followed_from"], first.as_str());
    assert_eq!(v["result"]["build_outcome"], "success");
    assert_eq!(d.build(&first)["cancel_reason"], "superseded");
}

/// HOSTILE 31: a client that hangs up frees its wait at once; many held waits leave the
/// daemon answering.
#[test]
fn clients_that_hang_up_free_their_waits() {
    let (d, _wd) = daemon("sleep 60", "");
    let id = d.trigger_id("site", "main");
    let req = format!(
        "GET /api/builds/{id}/wait?timeout=3600 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        d.token
    );
    let conns: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(d.addr).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            s
        })
        .collect();
    eventually(30, "100 held waits", || held_waits(&d) == 100);
    assert_eq!(d.api("GET", "/healthz", None).status, 200);
    drop(conns);
    eventually(30, "every wait freed", || held_waits(&d) == 0);
    assert_eq!(d.build(&id)["status"], "running", "builds are unaffected");
}

/// SPEC §4.3: a daemon shutting down answers held waits at once with the build as it is.
#[test]
fn shutdown_answers_held_waits_at_once() {
    // The build ignores TERM for a while, so a wait that held on would see it stopped. The
    // drain is short: the build is interrupted (and stops a kill grace later) before the
    // server closes, whatever the drain's length.
    let (tmp, _wd) = site_dirs("shutdown_timeout = \"500ms\"", "trap '' TERM; sleep 30");
    let mut d = Daemon::spawn(tmp.path(), &[]).unwrap_or_else(|e| panic!("{e}"));
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "running", 30);
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /api/builds/{id}/wait?timeout=3600 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        d.token
    )
    .unwrap();
    eventually(20, "the wait is held", || held_waits(&d) == 1);
    d.signal("TERM");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let r = parse_response(&buf);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    assert_ne!(r.json()["result"]["status"], "stopped");
    assert_eq!(d.wait_exit(60), Some(0));
}

/// A repo project with branches main and hold (hold sleeps so that main's builds queue).
fn repo_daemon(repo: &Repo) -> Daemon {
    Daemon::start(&format!(
        "[projects.site]\nbranches = [\"main\", \"hold\"]\nrepo = {}\n\
         command = 'if [ \"$DEPLOYHOOK_BRANCH\" = hold ]; then sleep 60; fi; git rev-parse HEAD > built'\n",
        toml_str(&repo.path().to_string_lossy()),
    ))
}

#[test]
fn redeploy_builds_the_same_commit_again_and_never_joins() {
    let repo = Repo::new();
    repo.git(&["branch", "hold"]);
    let sha1 = repo.git(&["rev-parse", "HEAD"]);
    let d = repo_daemon(&repo);
    let first = d.trigger_id("site", "main");
    assert_eq!(
        d.wait_status(&first, "stopped", 60)["commit"],
        sha1.as_str()
    );
    let sha2 = repo.commit("b", "2\n");
    let second = d.trigger_id("site", "main");
    assert_eq!(
        d.wait_status(&second, "stopped", 60)["commit"],
        sha2.as_str()
    );
    // Roll back: redeploy the first build, waiting for it.
    let r = d.api(
        "POST",
        &format!("/api/builds/{first}/redeploy?wait=60"),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json()["result"].clone();
    assert_eq!(v["already_exists"], false);
    assert_eq!(v["redeploy_of"], first.as_str());
    assert_eq!(v["commit"], sha1.as_str());
    assert_eq!(v["branch"], "main");
    assert_eq!(v["build_outcome"], "success");
    // Queued behind a running build, two redeploys never join each other, and a rollback
    // supersedes nothing: it lands after the build in flight.
    let hold = d.trigger_id("site", "hold");
    d.wait_status(&hold, "running", 30);
    let a = d
        .api("POST", &format!("/api/builds/{first}/redeploy"), None)
        .json()["result"]
        .clone();
    let b = d
        .api("POST", &format!("/api/builds/{first}/redeploy"), None)
        .json()["result"]
        .clone();
    assert_ne!(a["build_uuid"], b["build_uuid"]);
    assert_eq!(
        (a["already_exists"].clone(), b["already_exists"].clone()),
        (json!(false), json!(false))
    );
    // A head trigger does not join a redeploy either.
    let head = d.trigger("site", "main");
    assert_eq!(head["already_exists"], false);
    assert_eq!(
        d.build(&hold)["status"],
        "running",
        "nothing was superseded"
    );
    // Unknown build: 404; a repo build that never resolved a commit: 409.
    let r = d.api(
        "POST",
        "/api/builds/00000000-0000-4000-8000-000000000000/redeploy",
        None,
    );
    assert_eq!(r.status, 404);
    let queued = a["build_uuid"].as_str().unwrap();
    assert_eq!(
        d.api("POST", &format!("/api/builds/{queued}/cancel"), None)
            .status,
        200
    );
    let r = d.api("POST", &format!("/api/builds/{queued}/redeploy"), None);
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn an_exact_commit_must_be_reachable_from_a_configured_branch() {
    let repo = Repo::new();
    repo.git(&["branch", "hold"]);
    let sha1 = repo.git(&["rev-parse", "HEAD"]);
    repo.commit("b", "2\n");
    // A commit only on a branch the project does not build.
    repo.git(&["checkout", "--quiet", "-b", "secret"]);
    let stray = repo.commit("c", "3\n");
    repo.git(&["checkout", "--quiet", "main"]);
    let d = repo_daemon(&repo);
    let short = &sha1[..10];
    let r = d.api(
        "POST",
        "/api/projects/site/builds?wait=60",
        Some(json!({"branch": "main", "commit": short})),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["result"]["commit"],
        sha1.as_str(),
        "resolved to the full SHA"
    );
    let r = d.api(
        "POST",
        "/api/projects/site/builds?wait=60",
        Some(json!({"branch": "main", "commit": stray})),
    );
    assert_eq!(r.status, 422);
    let id = r.json()["result"]["build_uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let sys = d.log_text(&id, "system");
    assert!(
        sys.contains("is not reachable from any of project site's branches or tags"),
        "{sys}"
    );
    for bad in ["xyz", "abc", &"a".repeat(41), "g123456"] {
        let r = d.api(
            "POST",
            "/api/projects/site/builds",
            Some(json!({"branch": "main", "commit": bad})),
        );
        assert_eq!(r.status, 400, "{bad}");
    }
    // A project without repo has no commit to name.
    let wd = tempfile::tempdir().unwrap();
    let w = Daemon::start(&workdir_project("site", wd.path(), "true", ""));
    let r = w.api(
        "POST",
        "/api/projects/site/builds",
        Some(json!({"branch": "main", "commit": sha1})),
    );
    assert_eq!(r.status, 400);
    // Its builds redeploy as the same ref again.
    let id = w.trigger_id("site", "main");
    w.wait_status(&id, "stopped", 30);
    let r = w.api("POST", &format!("/api/builds/{id}/redeploy?wait=30"), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["result"]["redeploy_of"], id.as_str());
}

#[test]
fn a_hook_can_wait_too() {
    let (d, _wd) = daemon("exit 1", "");
    let (_, hook) = d.create_hook("site", "ci", "main");
    let r = request(d.addr, "POST", &format!("{hook}?wait=60"), &[], b"{}");
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["result"]["already_exists"], false);
    let r = request(d.addr, "POST", &format!("{hook}?wait=0"), &[], b"{}");
    assert_eq!(r.status, 400);
}

/// SPEC §7: `trigger --wait [--follow]`, `builds wait`, `builds redeploy`, exit codes 0/1/3.
#[test]
fn the_cli_waits_and_exits_with_the_outcome() {
    let (d, _wd) = daemon(
        "case \"$DEPLOYHOOK_BRANCH\" in main) echo built-it;; other) echo broke-it; exit 4;; esac",
        "",
    );
    let url = format!("http://{}", d.addr);
    let env = [
        ("DEPLOYHOOK_URL", url.as_str()),
        ("DEPLOYHOOK_TOKEN", d.token.as_str()),
    ];
    let (code, out, err) = cli(
        &["trigger", "site", "--branch", "main", "--wait", "--follow"],
        &env,
    );
    assert_eq!(code, 0, "{out}{err}");
    let id = out.trim().to_string();
    assert_eq!(d.build(&id)["build_outcome"], "success");
    assert!(err.contains("built-it"), "the log streams to stderr: {err}");
    let (code, out, err) = cli(&["trigger", "site", "--branch", "other", "--wait"], &env);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("exit code 4"), "{err}");
    let failed = out.trim().to_string();
    let (code, _, err) = cli(&["builds", "wait", &failed], &env);
    assert_eq!(code, 1, "{err}");
    let (code, out, err) = cli(&["builds", "wait", &id, "--json"], &env);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["build_uuid"], id.as_str());
    let (code, out, err) = cli(&["builds", "redeploy", &id, "--wait"], &env);
    assert_eq!(code, 0, "{out}{err}");
    let again = out.trim().to_string();
    assert_ne!(again, id);
    assert_eq!(d.build(&again)["redeploy_of"], id.as_str());
    // --follow needs --wait: usage error.
    let (code, _, _) = cli(&["trigger", "site", "--follow"], &env);
    assert_eq!(code, 2);
    let (code, _, _) = cli(&["builds", "wait", &id, "--timeout", "soon"], &env);
    assert_eq!(code, 2);
}

#[test]
fn the_cli_exits_3_when_the_wait_times_out() {
    let (d, _wd) = daemon("sleep 30", "");
    let url = format!("http://{}", d.addr);
    let env = [
        ("DEPLOYHOOK_URL", url.as_str()),
        ("DEPLOYHOOK_TOKEN", d.token.as_str()),
    ];
    let (code, out, err) = cli(&["trigger", "site", "--wait", "--timeout", "1s"], &env);
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("still"), "{err}");
    assert!(!out.trim().is_empty(), "the uuid is printed at once");
}
