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
    // The clean restart interrupts the running build after a short drain.
    let d = Daemon::start_with_server(
        "shutdown_timeout = \"500ms\"",
        &workdir_project(
            "site",
            wd.path(),
            "sleep 30",
            "cancel_superseded = false\nproject_builds_per_minute = 2",
        ),
    );
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
    r.assert_error(
        429,
        1429,
        "project_builds_per_minute = 2",
        "a third new build",
    );
    assert_eq!(r.json()["success"], false);
    let msg = r.error_message();
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
    let mut third = String::new();
    eventually(10, "reloaded limit applies", || {
        let r = try_trigger(&d, "site", "main");
        if r.status == 200 {
            third = r.json()["result"]["build_uuid"]
                .as_str()
                .unwrap()
                .to_string();
        }
        r.status == 200
    });
    d.wait_status(&third, "running", 10);
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

/// Fires one trigger per item of `branches`, each from its own thread; returns the build
/// uuids of the ones answered 200 (the others were cut off by a kill). `on_200` is called
/// as each 200 arrives.
fn fire(d: &Daemon, project: &str, branches: &[String], on_200: &(dyn Fn() + Sync)) -> Vec<String> {
    std::thread::scope(|s| {
        let hs: Vec<_> = branches
            .iter()
            .map(|b| {
                s.spawn(move || {
                    let body = json!({"branch": b}).to_string();
                    let auth = format!("Bearer {}", d.token);
                    let r = try_request(
                        d.addr,
                        "POST",
                        &format!("/api/projects/{project}/builds"),
                        &[
                            ("Authorization", auth.as_str()),
                            ("Content-Type", "application/json"),
                        ],
                        body.as_bytes(),
                    );
                    if r.as_ref().is_some_and(|r| r.status == 200) {
                        on_200();
                    }
                    r
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
    const ROUNDS: usize = 6;
    const PER_ROUND: usize = 16;
    let wd = tempfile::tempdir().unwrap();
    // A fresh set of branches per round, so that every round creates builds (a branch whose
    // build is still queued from an earlier round would only be joined).
    let branches: Vec<String> = (0..(ROUNDS + 1) * PER_ROUND)
        .map(|i| format!("b{i}"))
        .collect();
    let list = branches
        .iter()
        .map(|b| format!("{b:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let cfg = format!(
        "[projects.site]\nbranches = [{list}]\nworkdir = {}\ncommand = \"sleep 30\"\n",
        toml_str(&wd.path().display().to_string())
    );
    // Room for every build the test creates: retention would otherwise prune the oldest
    // (interrupted at each restart) and the test would find them gone for the wrong reason.
    let mut d = Daemon::start_with_server(
        &format!(
            "builds_per_minute = 1000000\nproject_builds_per_minute = 1000000\nkeep_builds = {}",
            branches.len()
        ),
        &cfg,
    );
    let mut acknowledged: Vec<String> = Vec::new();
    for (round, set) in branches.chunks(PER_ROUND).take(ROUNDS).enumerate() {
        // Concurrent creations (one group commit), then kill -9 the moment they are answered.
        let ids = fire(&d, "site", set, &|| {});
        assert_eq!(ids.len(), PER_ROUND, "round {round}: not all answered");
        let dir = d.dir.clone();
        let tmp = d._tmp.take();
        d.kill9();
        d = Daemon::spawn(&dir, &[]).unwrap_or_else(|e| panic!("{e}"));
        d._tmp = tmp;
        // This round's builds now; the earlier rounds' are all checked again at the end (a
        // build lost by any later restart stays lost).
        for id in &ids {
            let r = d.api("GET", &format!("/api/builds/{id}"), None);
            assert_eq!(
                r.status, 200,
                "acknowledged build {id} lost in round {round}"
            );
        }
        acknowledged.extend(ids);
    }
    // A kill in the middle of a burst in which every branch is triggered three times at once,
    // right after its first answer: whatever was answered is there, a build that a trigger
    // joined (`already_exists: true`) included.
    let last: Vec<String> = branches[ROUNDS * PER_ROUND..]
        .iter()
        .flat_map(|b| [b.clone(), b.clone(), b.clone()])
        .collect();
    let dir = d.dir.clone();
    let tmp = d._tmp.take();
    let (answered, first_answer) = std::sync::mpsc::channel::<()>();
    let answered = std::sync::Mutex::new(answered);
    let ids = std::thread::scope(|s| {
        let h = s.spawn(|| {
            fire(&d, "site", &last, &|| {
                let _ = answered.lock().unwrap().send(());
            })
        });
        first_answer
            .recv_timeout(Duration::from_secs(30))
            .expect("no trigger of the burst was answered in 30 s");
        // At once (no `kill` process to start): the other triggers are still under way.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.pid() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        h.join().unwrap()
    });
    d.kill9();
    assert!(!ids.is_empty(), "no trigger of the burst was answered");
    eprintln!(
        "{} of {} triggers answered before the kill",
        ids.len(),
        last.len()
    );
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
    // The running build is interrupted after a short drain.
    let mut d = Daemon::start_with_server(
        "shutdown_timeout = \"500ms\"",
        &workdir_project("site", wd.path(), "sleep 30", ""),
    );
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

#[test]
fn a_store_write_failure_answers_503_exits_non_zero_and_loses_nothing() {
    // Filling a disk needs privileges a test does not have; a file-size limit makes sled's
    // writes fail the same way (a sticky I/O error, here EFBIG instead of ENOSPC). SIGXFSZ
    // is ignored so that the write fails instead of killing the daemon. /bin/sh counts
    // `ulimit -f` in 512- or 1024-byte blocks: either way the database outgrows it soon.
    let (tmp, _wd) = site_dirs(
        "builds_per_minute = 1000000\nproject_builds_per_minute = 1000000\nkeep_builds = 100000\n\
         shutdown_timeout = \"500ms\"",
        "sleep 60",
    );
    let mut d = Daemon::spawn_after(tmp.path(), &[], Some("trap '' XFSZ; ulimit -f 1200"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, path) = d.create_hook("site", "cms", "main");
    let auth = format!("Bearer {}", d.token);
    // Large payloads fill the file-size limit in a dozen builds.
    let body = vec![b'x'; 16 * 1024];
    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for _ in 0..5000 {
        let Some(r) = try_request(d.addr, "POST", &path, &[], &body) else {
            break;
        };
        if r.status != 200 {
            refusal = Some(r);
            break;
        }
        let id = r.json()["result"]["build_uuid"]
            .as_str()
            .unwrap()
            .to_string();
        acknowledged.push(id.clone());
        // Cancel it so that the next trigger is a new build (another write).
        let cancel = try_request(
            d.addr,
            "POST",
            &format!("/api/builds/{id}/cancel"),
            &[("Authorization", auth.as_str())],
            b"",
        );
        if let Some(c) = cancel
            && c.status != 200
        {
            refusal = Some(c);
            break;
        }
    }
    let r = refusal.expect("the store never failed");
    r.assert_error(
        503,
        1503,
        "storage is failing",
        "a request while the store fails",
    );
    // sled's errors are sticky: the daemon exits non-zero for systemd to restart it.
    let code = d.wait_exit(30);
    assert!(matches!(code, Some(c) if c != 0), "exit code {code:?}");
    assert!(d.logs().contains("the database failed"), "{}", d.logs());
    // With room again, every acknowledged build is there.
    let dir = d.dir.clone();
    let d2 = Daemon::spawn(&dir, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(!acknowledged.is_empty());
    eprintln!(
        "{} builds acknowledged before the failure",
        acknowledged.len()
    );
    for id in &acknowledged {
        let r = d2.api("GET", &format!("/api/builds/{id}"), None);
        assert_eq!(r.status, 200, "acknowledged build {id} lost");
    }
}

#[test]
fn sighup_applies_to_new_builds_only_and_a_removed_project_keeps_its_history() {
    let wd = tempfile::tempdir().unwrap();
    let marker = wd.path().join("marker");
    // The build in flight runs until the test creates `release` in the workdir.
    let v1 = format!(
        "while [ ! -f release ]; do sleep 0.02; done; echo v1 > {}",
        marker.display()
    );
    let d = Daemon::start(&workdir_project("site", wd.path(), &v1, ""));
    let (_, path) = d.create_hook("site", "cms", "main");
    let in_flight = d.post(&path, b"").json()["result"]["build_uuid"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_status(&in_flight, "running", 10);
    // New command and a new project; the build in flight keeps its own.
    let base = std::fs::read_to_string(&d.config).unwrap();
    let v2 = base.replace(&toml_str(&v1), &toml_str("echo v2"))
        + &workdir_project("blog", wd.path(), "echo blog", "");
    std::fs::write(&d.config, &v2).unwrap();
    d.signal("HUP");
    eventually(10, "config reloaded", || {
        d.logs().contains("config reloaded")
    });
    std::fs::write(wd.path().join("release"), "").unwrap();
    let b = d.wait_status(&in_flight, "stopped", 20);
    assert_eq!(
        b["build_outcome"], "success",
        "a reload never disturbs a build"
    );
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "v1");
    let next = d.post(&path, b"").json()["result"]["build_uuid"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_status(&next, "stopped", 20);
    assert_eq!(d.log_text(&next, "stdout"), "v2");
    let blog = d.trigger_id("blog", "main");
    assert_eq!(
        d.wait_status(&blog, "stopped", 20)["build_outcome"],
        "success"
    );

    // Remove `site`: its hook answers 404, its builds stay readable.
    let without = v2.replace(&workdir_project("site", wd.path(), "echo v2", ""), "");
    assert_ne!(without, v2);
    std::fs::write(&d.config, &without).unwrap();
    d.signal("HUP");
    eventually(10, "site removed", || d.post(&path, b"").status == 404);
    assert_eq!(d.build(&in_flight)["build_outcome"], "success");
    assert_eq!(d.log_text(&next, "stdout"), "v2");
    // Back again: the same hook works.
    std::fs::write(&d.config, &v2).unwrap();
    d.signal("HUP");
    eventually(10, "site back", || d.post(&path, b"").status == 200);
}

#[test]
fn kill_9_mid_build_interrupts_it_removes_its_workspace_kills_escapees_and_resumes_the_queue_in_order()
 {
    let repo = Repo::new();
    let wd = tempfile::tempdir().unwrap();
    let pids = wd.path().join("pids");
    // The main process, a background child, and a grandchild that left the group and the
    // session (setsid) and was orphaned by its parent's exit.
    let cmd = format!(
        "echo $$ >> {p}; sleep 300 & echo $! >> {p}; \
         sh -c 'setsid sh -c \"echo \\$\\$ >> {p}; exec sleep 300\" & exit 0'; \
         pwd > {w}; wait",
        p = pids.display(),
        w = wd.path().join("workspace").display()
    );
    let cfg = format!(
        "[projects.site]\nbranches = [\"main\"]\nrepo = {}\ncommand = {}\n{}{}",
        toml_str(&repo.path().display().to_string()),
        toml_str(&cmd),
        workdir_project("a", wd.path(), "true", ""),
        workdir_project("b", wd.path(), "true", "")
    );
    let mut d = Daemon::start_with_server("max_concurrent_builds = 1", &cfg);
    let running = d.trigger_id("site", "main");
    eventually(20, "three build processes started", || {
        pids_in(&pids).len() == 3
    });
    eventually(10, "workspace recorded", || {
        wd.path().join("workspace").exists()
    });
    let workspace = std::fs::read_to_string(wd.path().join("workspace")).unwrap();
    let workspace = std::path::PathBuf::from(workspace.trim());
    assert!(workspace.exists());
    // Queued behind it, in this order.
    let first = d.trigger_id("b", "main");
    let second = d.trigger_id("a", "main");
    let dir = d.dir.clone();
    let _tmp = d._tmp.take();
    d.kill9();
    for pid in pids_in(&pids) {
        eventually(10, "no build process survives kill -9", || !alive(pid));
    }
    let d = Daemon::spawn(&dir, &[]).unwrap_or_else(|e| panic!("{e}"));
    let b = d.build(&running);
    assert_eq!(b["status"], "stopped");
    assert_eq!(b["build_outcome"], "interrupted");
    assert!(d.log_text(&running, "system").contains("interrupted"));
    assert!(!workspace.exists(), "workspace left behind");
    let f = d.wait_status(&first, "stopped", 20);
    let s = d.wait_status(&second, "stopped", 20);
    assert_eq!(f["build_outcome"], "success");
    assert!(
        f["initializing_on"].as_str().unwrap() < s["initializing_on"].as_str().unwrap(),
        "queued builds resume oldest first: {f} {s}"
    );
}

#[test]
fn an_idle_keep_alive_connection_is_closed() {
    use std::io::{Read, Write};
    // The idle limit (the header read timeout) shortened from 10 s to 1 s.
    let d = Daemon::start_tuned("header_read_timeout=1s", "", "");
    let mut s = std::net::TcpStream::connect(d.addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // The answer, then (the connection kept alive and idle) EOF at the idle timeout.
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("not closed after {:?}: {e}", started.elapsed()),
        }
    }
    let idle = started.elapsed();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    // Closed by the idle limit in force, not the 10 s default.
    assert!(idle < Duration::from_secs(8), "closed after {idle:?}");
}

#[test]
fn fifty_concurrent_triggers_for_distinct_branches_create_exactly_the_project_limit() {
    let wd = tempfile::tempdir().unwrap();
    let branches: Vec<String> = (0..50).map(|i| format!("b{i}")).collect();
    let list = branches
        .iter()
        .map(|b| format!("{b:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let cfg = format!(
        "[projects.site]\nbranches = [{list}]\nworkdir = {}\ncommand = \"sleep 30\"\n\
         project_builds_per_minute = 5\n",
        toml_str(&wd.path().display().to_string())
    );
    let d = Daemon::start(&cfg);
    let answers: Vec<(String, Resp)> = std::thread::scope(|s| {
        let hs: Vec<_> = branches
            .iter()
            .map(|b| s.spawn(|| (b.clone(), try_trigger(&d, "site", b))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused_branch = answers
        .iter()
        .find(|(_, r)| r.status == 429)
        .map(|(b, _)| b.clone());
    let answers: Vec<Resp> = answers.into_iter().map(|(_, r)| r).collect();
    let created: Vec<&Resp> = answers.iter().filter(|r| r.status == 200).collect();
    let limited: Vec<&Resp> = answers.iter().filter(|r| r.status == 429).collect();
    assert_eq!(
        created.len(),
        5,
        "{:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(limited.len(), 45);
    for r in &created {
        assert_eq!(r.json()["result"]["already_exists"], false);
    }
    for r in &limited {
        r.assert_error(429, 1429, "", "a trigger over the limit");
        assert!((1..=60).contains(&retry_after(r)));
    }
    // Exactly the answered builds exist: a refused trigger left nothing behind.
    let list = d
        .api("GET", "/api/projects/site/builds?limit=100", None)
        .json();
    assert_eq!(list["result"].as_array().unwrap().len(), 5);
    // And the window is still full after a kill -9 (a refused branch has no pending build
    // to join).
    let d = d.restart(true);
    let branch = refused_branch.unwrap();
    assert_eq!(try_trigger(&d, "site", &branch).status, 429);
}

/// Regression: a reload stuck reading the config (a FIFO, a hung NFS mount) kept the daemon
/// from exiting after SIGTERM: the runtime waited for the blocked read forever after
/// "stopped", so systemd had to SIGKILL it at `TimeoutStopSec`.
#[test]
fn sigterm_exits_even_while_a_reload_is_stuck_reading_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let wd = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 1024];
        let n = socket.recv(&mut buf).expect("no sd_notify message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    write_config(
        tmp.path(),
        "",
        &workdir_project("site", wd.path(), "true", ""),
    );
    // The stuck read is given up after `runtime_shutdown_timeout`: 500 ms instead of 5 s.
    let mut d = Daemon::spawn(
        tmp.path(),
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            (TUNABLES, "runtime_shutdown_timeout=500ms"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(recv().starts_with("READY=1"));
    std::fs::remove_file(&d.config).unwrap();
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&d.config)
            .status()
            .unwrap()
            .success()
    );
    // Nobody ever writes to the FIFO: the reload's read blocks for good.
    d.signal("HUP");
    assert!(recv().starts_with("RELOADING=1"));
    let stopping = Instant::now();
    d.signal("TERM");
    assert_eq!(d.wait_exit(60), Some(0), "{}", d.logs());
    // It waited for the blocked read as long as the shortened timeout, not the default 5 s.
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(4), "exited after {took:?}");
}
