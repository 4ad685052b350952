//! Hostile round 3 (../shared/HOSTILE.md 14, 19, 21, 24, 25, 28): limits of the machine (no
//! thread left, no memory, no disk, a clock that jumps) and hostile names, each against the
//! real binary. Tests that need root, cgroups, tmpfs or libfaketime say why they skip.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::*;

/// A pids (and, where asked, memory) cgroup made for one test, removed when dropped.
/// cgroup v1 (`/sys/fs/cgroup/pids`, `/sys/fs/cgroup/memory`) or v2 (`/sys/fs/cgroup` with the
/// controllers enabled); `None` when neither is writable here (not root, or no such mounts).
struct Cgroup {
    /// `(directory, limit file)` per controller.
    dirs: Vec<PathBuf>,
    pids_max: PathBuf,
    memory_max: Option<PathBuf>,
}

impl Cgroup {
    fn new(name: &str, memory: bool) -> Option<Cgroup> {
        let unique = format!("deployhook-test-{name}-{}", std::process::id());
        let v1_pids = Path::new("/sys/fs/cgroup/pids");
        if v1_pids.join("cgroup.procs").exists() {
            let pids = v1_pids.join(&unique);
            std::fs::create_dir(&pids).ok()?;
            let mut cg = Cgroup {
                pids_max: pids.join("pids.max"),
                dirs: vec![pids],
                memory_max: None,
            };
            if memory {
                let mem = Path::new("/sys/fs/cgroup/memory").join(&unique);
                std::fs::create_dir(&mem).ok()?;
                cg.memory_max = Some(mem.join("memory.limit_in_bytes"));
                cg.dirs.push(mem);
            }
            return Some(cg);
        }
        let root = Path::new("/sys/fs/cgroup");
        let controllers = std::fs::read_to_string(root.join("cgroup.subtree_control")).ok()?;
        if !controllers.contains("pids") || (memory && !controllers.contains("memory")) {
            return None;
        }
        let dir = root.join(&unique);
        std::fs::create_dir(&dir).ok()?;
        Some(Cgroup {
            pids_max: dir.join("pids.max"),
            memory_max: memory.then(|| dir.join("memory.max")),
            dirs: vec![dir],
        })
    }

    /// Shell commands that move the shell itself in, for [`Daemon::spawn_after`]: the daemon
    /// it then becomes starts inside, and so does every process it ever starts (its warm
    /// supervisors included, which moving the daemon later would leave outside).
    fn enter_first(&self) -> String {
        self.dirs
            .iter()
            .map(|d| format!("echo $$ > {}", d.join("cgroup.procs").display()))
            .collect::<Vec<_>>()
            .join(" && ")
    }

    /// Panics unless `pid` and every descendant of it are inside: the tests here make
    /// builds fork without end, which must never reach the rest of the machine.
    fn assert_holds(&self, pid: u32) {
        let name = self.dirs[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut todo = vec![pid];
        while let Some(p) = todo.pop() {
            // Read per process: one forked after a listing of the cgroup is inside too.
            let Ok(cgroups) = std::fs::read_to_string(format!("/proc/{p}/cgroup")) else {
                continue; // Gone meanwhile.
            };
            assert!(
                cgroups.contains(&name),
                "process {p} is outside the test's cgroup"
            );
            for task in std::fs::read_dir(format!("/proc/{p}/task"))
                .into_iter()
                .flatten()
            {
                let Ok(task) = task else { continue };
                let children = std::fs::read_to_string(task.path().join("children"));
                todo.extend(
                    children
                        .unwrap_or_default()
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }

    /// The processes (not threads) in it.
    fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dirs[0].join("cgroup.procs"))
            .unwrap()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn tasks(&self) -> u64 {
        let current = self.dirs[0].join("pids.current");
        std::fs::read_to_string(current)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn set_pids_max(&self, max: &str) {
        std::fs::write(&self.pids_max, max).unwrap();
    }

    fn set_memory_max(&self, bytes: u64) {
        let f = self.memory_max.as_ref().expect("made with memory");
        std::fs::write(f, bytes.to_string()).unwrap();
    }
}

/// Whether `pid` is a supervisor the daemon started ahead of a build (a warm one, see
/// `deployhook::supervisor`) that has no child: waiting for a job, not a leftover of one.
fn idle_supervisor(pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
    String::from_utf8_lossy(&cmdline).contains("__supervise")
        && children.is_ok_and(|c| c.trim().is_empty())
}

/// Held by the tests that push the machine to a limit: one at a time, so that a fork bomb's
/// spinning does not starve the other's daemon of its start-up deadline.
static AT_A_LIMIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.pids_max, "max");
        // Its processes (the test's daemon, killed by now) may take a moment to leave.
        for d in &self.dirs {
            for _ in 0..100 {
                if std::fs::remove_dir(d).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The datagrams a daemon sends to `$NOTIFY_SOCKET`, as systemd would receive them.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket { sock, path }
    }

    fn env(&self) -> String {
        self.path.display().to_string()
    }

    /// Waits for a message holding `what`; returns every message seen until then.
    fn wait_for(&self, what: &str, secs: u64) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).to_string();
                let hit = m.contains(what);
                seen.push(m);
                if hit {
                    return seen;
                }
            }
        }
        panic!("no {what} from the daemon in {secs}s; got {seen:?}");
    }
}

/// HOSTILE 28: at the service's task limit (no thread, no process can be created), a reload
/// ends with "the old config stays in force" and `READY=1`, and log requests (a page and a
/// follow) answer 503 code 1503 instead of a dropped connection or an empty 200. Nothing
/// panics; with room again, both work.
#[test]
fn at_the_task_limit_a_reload_ends_ready_and_log_requests_answer_503() {
    let _one = AT_A_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let Some(cg) = Cgroup::new("tasks", false) else {
        eprintln!("SKIP: needs root and a writable pids cgroup (v1 or v2) to reach a task limit");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let notify = NotifySocket::bind(dir);
    write_config(dir, "", &workdir_project("site", dir, "echo built", ""));
    let env = [("NOTIFY_SOCKET", notify.env())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut d = Daemon::spawn_after(dir, &env, Some(&cg.enter_first())).unwrap();
    cg.assert_holds(d.pid());
    notify.wait_for("READY=1", 20);
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "stopped", 30);
    // Not one more task: every thread and process the daemon has is all it gets. A thread
    // still finishing the build's clean-up would leave room for the reload's when it ends (the
    // reload was then taken, 1 run in 10 under a CPU hog), so the limit follows the count down
    // until it has held still for a quarter of a second.
    let mut max = cg.tasks();
    cg.set_pids_max(&max.to_string());
    let (mut still, deadline) = (0, Instant::now() + Duration::from_secs(20));
    while still < 5 {
        assert!(Instant::now() < deadline, "the task count never held still");
        std::thread::sleep(Duration::from_millis(50));
        let now = cg.tasks();
        if now < max {
            max = now;
            cg.set_pids_max(&max.to_string());
            still = 0;
        } else {
            still += 1;
        }
    }

    d.signal("HUP");
    let seen = notify.wait_for("READY=1", 20);
    assert!(
        seen.iter().any(|m| m.contains("RELOADING=1")),
        "no RELOADING=1 before READY=1: {seen:?}"
    );
    eventually(10, "the reload's rejection in the log", || {
        d.logs().contains(
            "config reload rejected, the old config stays in force: cannot start a thread",
        )
    });

    for path in [
        format!("/api/builds/{id}/logs"),
        format!("/api/builds/{id}/logs?follow=true"),
    ] {
        let r = d.api("GET", &path, None);
        r.assert_error(503, 1503, "cannot start a thread", &path);
    }
    assert_eq!(request(d.addr, "GET", "/healthz", &[], b"").status, 200);

    // Room again: the same requests work, and a reload is taken.
    cg.set_pids_max("max");
    assert_eq!(
        d.api("GET", &format!("/api/builds/{id}/logs"), None).status,
        200
    );
    let follow = d.api("GET", &format!("/api/builds/{id}/logs?follow=true"), None);
    assert_eq!(follow.status, 200);
    assert!(String::from_utf8_lossy(&follow.body).contains("built"));
    d.signal("HUP");
    notify.wait_for("READY=1", 20);
    eventually(10, "an accepted reload", || {
        d.logs().contains("config reloaded")
    });
    assert!(!d.logs().contains("panicked"), "{}", d.logs());
    d.kill9();
}

/// HOSTILE 19: a fork bomb and a memory hog, each a build of a daemon held in a pids and
/// memory cgroup (as systemd's `TasksMax=`/`MemoryMax=` hold the service): the daemon answers
/// throughout and afterwards, each build ends `fail` or `timed_out`, and a normal build after
/// them succeeds. The kernel picks the hog, not the daemon, because builds carry a higher
/// `oom_score_adj`.
#[test]
fn a_fork_bomb_and_a_memory_hog_end_their_builds_not_the_daemon() {
    let _one = AT_A_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let Some(cg) = Cgroup::new("bounds", true) else {
        eprintln!("SKIP: needs root and writable pids and memory cgroups (v1 or v2)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let projects = [
        // Forks until the task limit, then keeps trying; only the timeout ends it.
        workdir_project(
            "bomb",
            dir,
            "b() { b | b & }; b; sleep 60",
            "timeout = \"6s\"",
        ),
        // Holds 1 GB in the shell's memory: over the bound, so the OOM killer ends it.
        workdir_project(
            "hog",
            dir,
            "x=$(head -c 1000000000 /dev/zero | tr '\\0' a); echo ${#x}",
            "timeout = \"120s\"",
        ),
        workdir_project("ok", dir, "echo fine", ""),
    ];
    write_config(dir, "", &projects.concat());
    let mut d = Daemon::spawn_after(dir, &[], Some(&cg.enter_first())).unwrap();
    cg.set_pids_max(&(cg.tasks() + 24).to_string());
    cg.set_memory_max(256 << 20);
    // Before any bomb: the daemon and its warm supervisors are all inside.
    cg.assert_holds(d.pid());

    for project in ["bomb", "hog"] {
        let id = d.trigger_id(project, "main");
        let deadline = Instant::now() + Duration::from_secs(150);
        let b = loop {
            let r = request(d.addr, "GET", "/healthz", &[], b"");
            assert_eq!(r.status, 200, "{project}: /healthz failed during the build");
            let b = d.build(&id);
            if b["status"] == "stopped" {
                break b;
            }
            assert!(Instant::now() < deadline, "{project} never stopped: {b}");
            std::thread::sleep(Duration::from_millis(200));
        };
        let outcome = b["build_outcome"].as_str().unwrap_or_default();
        eprintln!("{project}: {outcome}: {}", d.log_text(&id, "system"));
        assert!(
            outcome == "fail" || outcome == "timed_out",
            "{project}: {b}\n{}",
            d.logs()
        );
        // Every process of the build is gone: the cgroup is back to the daemon alone.
        let gone = Instant::now() + Duration::from_secs(30);
        while cg
            .procs()
            .iter()
            .any(|&p| p != d.pid() && !idle_supervisor(p))
        {
            if Instant::now() > gone {
                let ps = std::process::Command::new("ps")
                    .args(["-o", "pid,ppid,pgid,stat,args", "-p"])
                    .arg(
                        cg.procs()
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                    )
                    .output()
                    .unwrap();
                panic!(
                    "{project}: processes of the build left after it stopped:\n{}",
                    String::from_utf8_lossy(&ps.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let id = d.trigger_id("ok", "main");
    let b = d.wait_status(&id, "stopped", 30);
    assert_eq!(b["build_outcome"], "success", "{b}");
    assert!(!d.logs().contains("panicked"), "{}", d.logs());
    d.kill9();
}

/// Runs `deployhook ARGS` with its stderr in a file that `$JOURNAL_STREAM` names, as systemd
/// hands a service its journal stream; returns the exit code and what it wrote.
fn run_as_under_journald(args: &[&str], dir: &Path) -> (i32, String) {
    use std::os::unix::fs::MetadataExt as _;
    let path = dir.join("journal-stream");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let status = std::process::Command::new(BIN)
        .args(args)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .status()
        .unwrap();
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&path).unwrap(),
    )
}

/// Issue 12 item 8: under journald every line carries its syslog priority, so
/// `journalctl -p err` shows "cannot listen"; and it is said once, not twice.
#[test]
fn under_journald_cannot_listen_is_said_once_with_priority_err() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = blocker.local_addr().unwrap().port();
    write_config(dir, "", &workdir_project("site", dir, "true", ""));
    let cfg = dir.join("deploy.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&cfg, text).unwrap();
    let (code, err) = run_as_under_journald(&["serve", "--config", cfg.to_str().unwrap()], dir);
    assert_eq!(code, 1, "{err}");
    let said: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("cannot listen"))
        .collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(said[0].starts_with("<3>"), "{err}");
    // Every line has a priority; none is left at journald's default.
    assert!(err.lines().all(|l| l.starts_with('<')), "{err}");
    drop(blocker);
}

/// `check --quiet` (the unit's `ExecStartPre=`) prints nothing for a valid config, and the
/// one-line error for an invalid one.
#[test]
fn check_quiet_prints_only_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = write_config(dir, "", &workdir_project("site", dir, "true", ""));
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = cli(&["check", "--quiet", "--config", cfg], &[]);
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
    let (code, out, _) = cli(&["check", "--config", cfg], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("config OK"), "{out}");
    std::fs::write(dir.join("deploy.toml"), "[server]\nbogus = 1\n").unwrap();
    let (code, out, err) = cli(&["check", "--quiet", "--config", cfg], &[]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("server.bogus"), "{err}");
}

/// libfaketime's preload library, when installed (Debian `libfaketime`); `None` skips the
/// tests that step the wall clock.
fn libfaketime() -> Option<&'static str> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
}

/// Today's date (UTC) shifted by `days`, as log timestamps print it (`2026-01-31`).
fn utc_date(days: i64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("{days} days"), "+%F"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Issue 12 item 6: a daemon restarted with the wall clock a day ahead (as after an admin's
/// `date -s` or a first NTP sync while it was down) still refuses a trigger over the limit:
/// within one boot the window is measured on `CLOCK_BOOTTIME`, which the step does not move.
#[test]
fn a_restart_with_the_wall_clock_a_day_ahead_keeps_the_rate_window() {
    let Some(lib) = libfaketime() else {
        eprintln!("SKIP: libfaketime not installed (Debian package faketime)");
        return;
    };
    let wd = tempfile::tempdir().unwrap();
    let rest = workdir_project("site", wd.path(), "true", "project_builds_per_minute = 2");
    let d = Daemon::start(&rest);
    for branch in ["main", "other"] {
        d.trigger_id("site", branch);
    }
    let over = |d: &Daemon| {
        d.api(
            "POST",
            "/api/projects/site/builds",
            Some(serde_json::json!({"branch": "main"})),
        )
    };
    eventually(30, "both builds stopped", || {
        d.api("GET", "/api/projects/site/builds?status=stopped", None)
            .json()["result"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
    });
    assert_eq!(over(&d).status, 429);

    let mut d = d;
    let tmp = d._tmp.take();
    d.signal("TERM");
    assert_eq!(d.wait_exit(30), Some(0));
    let env = [
        ("LD_PRELOAD", lib),
        ("FAKETIME", "+1d"),
        // Only the wall clock steps; CLOCK_MONOTONIC and CLOCK_BOOTTIME keep running, as
        // they do when a real clock is set.
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let mut d2 = Daemon::spawn(&d.dir, &env).unwrap();
    d2._tmp = tmp;
    // The step is real for the daemon: its log lines carry tomorrow's date.
    let tomorrow = utc_date(1);
    assert!(
        d2.logs().contains(&tomorrow),
        "no {tomorrow} in:\n{}",
        d2.logs()
    );
    let r = over(&d2);
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    stop_cleanly(d2);
}

/// Stops a daemon run under libfaketime with SIGTERM: libfaketime removes its `/dev/shm`
/// segment only when the process exits, so a `kill -9` would leave it behind.
fn stop_cleanly(mut d: Daemon) {
    d.signal("TERM");
    assert_eq!(d.wait_exit(30), Some(0));
}

/// HOSTILE 24: the wall clock stepped a day forward, then a day back, while a build runs into
/// its timeout and then its kill grace (it ignores SIGTERM) and while a rate window is full:
/// the build is killed on time, `timed_out`, and the window neither opens nor grows. Only the
/// displayed times move.
#[test]
fn a_wall_clock_stepped_a_day_moves_no_timeout_grace_or_rate_window() {
    let Some(lib) = libfaketime() else {
        eprintln!("SKIP: libfaketime not installed (Debian package faketime)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let clock = dir.join("faketime");
    std::fs::write(&clock, "+0").unwrap();
    let stubborn = "trap '' TERM; echo started; sleep 30";
    let projects = [
        workdir_project("slow", dir, stubborn, "timeout = \"2s\""),
        workdir_project("rl", dir, "true", "project_builds_per_minute = 1"),
    ];
    // kill_grace is 1 s (base_config).
    write_config(dir, "", &projects.concat());
    let env = [
        ("LD_PRELOAD", lib),
        ("FAKETIME_TIMESTAMP_FILE", clock.to_str().unwrap()),
        // Read the file at every clock read, so that a write steps the clock at once.
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let d = Daemon::spawn(dir, &env).unwrap();
    let rl = |d: &Daemon| {
        d.api(
            "POST",
            "/api/projects/rl/builds",
            Some(serde_json::json!({"branch": "main"})),
        )
    };
    assert_eq!(rl(&d).status, 200);
    let window_start = Instant::now();

    for (step, date) in [("+1d", utc_date(1)), ("-1d", utc_date(-1))] {
        let id = d.trigger_id("slow", "main");
        eventually(20, "the build started", || {
            d.log_text(&id, "stdout").contains("started")
        });
        let started = Instant::now();
        std::fs::write(&clock, step).unwrap();
        // The window is still full, with the wait it had before the step.
        let r = rl(&d);
        assert_eq!(
            r.status,
            429,
            "after {step}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
        let left = 60 - window_start.elapsed().as_secs().min(60);
        assert!(
            retry <= left + 1 && retry + 10 >= left,
            "after {step}: Retry-After {retry}, expected about {left}"
        );
        // Timeout 2 s, then SIGTERM (ignored), SIGKILL after the 1 s grace.
        let b = d.wait_status(&id, "stopped", 30);
        let took = started.elapsed();
        assert_eq!(b["build_outcome"], "timed_out", "after {step}: {b}");
        // Neither at once (a timeout on the wall clock a day ahead) nor never (a day back).
        assert!(
            took > Duration::from_millis(1000) && took < Duration::from_secs(15),
            "after {step}: stopped after {took:?}"
        );
        let system = d.log_text(&id, "system");
        // SIGTERM was ignored: the grace ran out and SIGKILL ended it.
        assert!(system.contains("killed by signal 9"), "{system}");
        // The step was real for the daemon: its log lines now carry the shifted date.
        assert!(
            d.logs().contains(&date),
            "no {date} after {step}:\n{}",
            d.logs()
        );
        std::fs::write(&clock, "+0").unwrap();
    }
    assert!(
        window_start.elapsed() < Duration::from_secs(55),
        "too slow to test the window"
    );
    stop_cleanly(d);
}

/// A signed GitHub push of `branch` at `after` to `/git/site`.
fn github_push(d: &Daemon, secret: &str, branch: &str, after: &str, delivery: &str) -> Resp {
    let body = serde_json::json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0".repeat(40),
        "after": after,
        "repository": {"name": "site"},
    })
    .to_string();
    let sig = github_signature(secret, body.as_bytes());
    request(
        d.addr,
        "POST",
        "/git/site",
        &[
            ("Content-Type", "application/json"),
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sig),
            ("X-GitHub-Delivery", delivery),
        ],
        body.as_bytes(),
    )
}

/// How many builds project `site` has.
fn site_builds(d: &Daemon) -> usize {
    d.api("GET", "/api/projects/site/builds?limit=100", None)
        .json()["result"]
        .as_array()
        .map_or(0, Vec::len)
}

/// HOSTILE 14: hostile branch names through an API trigger, a hook's creation and a signed
/// GitHub push are refused and build nothing; hostile hook names are refused or kept as
/// plain text; and a branch that git accepts but that looks like an option reaches git as one
/// argv element after `--` (a `git` first on the daemon's PATH records every argv).
#[test]
fn hostile_branch_and_hook_names_never_reach_a_shell_or_an_option() {
    const SECRET: &str = "hostile-names-secret";
    let real_git = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v git"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    assert!(!real_git.is_empty(), "git is needed");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The spy: logs each argv (elements NUL-terminated, invocations ended by a newline),
    // then runs the real git.
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let argv_log = dir.join("git-argv");
    let spy = format!(
        "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done >> '{log}'\necho >> '{log}'\nexec '{real_git}' \"$@\"\n",
        log = argv_log.display()
    );
    std::fs::write(bin.join("git"), spy).unwrap();
    std::process::Command::new("chmod")
        .args(["+x", bin.join("git").to_str().unwrap()])
        .status()
        .unwrap();

    // A branch git accepts, with a component that looks like an option.
    let odd = "rel/-upload-pack+x";
    let repo = Repo::new();
    repo.git(&["branch", odd]);
    let odd_head = repo.git(&["rev-parse", odd]);
    std::fs::write(dir.join("site.secret"), SECRET).unwrap();
    let rest = format!(
        "[projects.site]\nbranches = [\"main\", {}]\nrepo = {}\ncommand = \"git rev-parse HEAD\"\ngit_secret_file = \"site.secret\"\n",
        toml_str(odd),
        toml_str(repo.path().to_str().unwrap())
    );
    write_config(dir, "", &rest);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let d = Daemon::spawn(dir, &[("PATH", &path)]).unwrap();

    let long = format!("main{}", "a".repeat(10 * 1024));
    let hostile = [
        "main;rm -rf /",
        "$(id)",
        "`id`",
        "--upload-pack=x",
        "..",
        "main/../main",
        "main\0x",
        "main\nx",
        "main\r\nX-Injected: 1",
        long.as_str(),
        "-",
        "/main",
        "main.lock",
        "refs/heads/main",
    ];
    for (i, branch) in hostile.iter().enumerate() {
        let shown = &branch[..branch.len().min(20)];
        let r = d.api(
            "POST",
            "/api/projects/site/builds",
            Some(serde_json::json!({ "branch": branch })),
        );
        r.assert_error(400, 1400, "", &format!("API trigger of {shown:?}"));
        let r = d.api(
            "POST",
            "/api/projects/site/hooks",
            Some(serde_json::json!({ "name": format!("h{i}"), "branch": branch })),
        );
        assert_eq!(r.status, 400, "hook for {shown:?}");
        let r = github_push(&d, SECRET, branch, &"1".repeat(40), &format!("d{i}"));
        assert!(
            r.status == 202 || r.status == 400,
            "push of {shown:?}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    assert_eq!(site_builds(&d), 0, "a hostile name built something");
    assert!(!argv_log.exists(), "git ran for a refused name");

    // Hook names: control characters and 10 KB are refused; shell syntax is only text.
    for name in ["a\0b", "a\nb", &"n".repeat(10 * 1024)] {
        let r = d.api(
            "POST",
            "/api/projects/site/hooks",
            Some(serde_json::json!({ "name": name, "branch": "main" })),
        );
        assert_eq!(r.status, 400, "hook name {:?}", &name[..name.len().min(10)]);
    }
    let (_, url) = d.create_hook("site", "$(id);rm -rf /", "main");
    let listed = d.api("GET", "/api/projects/site/hooks", None).json();
    assert_eq!(listed["result"][0]["name"], "$(id);rm -rf /");

    // The odd branch through each door, then what git was given.
    let token = url.rsplit('/').next().unwrap().to_string();
    let (_, odd_hook) = d.create_hook("site", "odd", odd);
    let odd_token = odd_hook.rsplit('/').next().unwrap();
    assert_ne!(odd_token, token);
    let r = request(d.addr, "POST", &format!("/hooks/{odd_token}"), &[], b"");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["result"]["build_uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let b = d.wait_status(&id, "stopped", 60);
    assert_eq!(b["build_outcome"], "success", "{b}");
    assert_eq!(b["commit"], odd_head.as_str());
    assert_eq!(d.log_text(&id, "stdout").trim(), odd_head);

    let log = std::fs::read(&argv_log).unwrap();
    let calls: Vec<Vec<String>> = log
        .split(|&b| b == b'\n')
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .collect();
    let fetch = calls
        .iter()
        .find(|c| c.iter().any(|a| a == "fetch"))
        .unwrap_or_else(|| panic!("no git fetch among {calls:?}"));
    let dashes = fetch.iter().position(|a| a == "--").expect("fetch has --");
    let holding: Vec<usize> = (0..fetch.len())
        .filter(|&i| fetch[i].contains(odd))
        .collect();
    assert!(!holding.is_empty(), "{fetch:?}");
    for i in holding {
        assert!(i > dashes, "the branch before -- in {fetch:?}");
        // One element: the refspec, whole.
        assert!(fetch[i].contains(&format!("refs/heads/{odd}")), "{fetch:?}");
    }
    // Anywhere else git saw the branch, it was inside a ref (never a bare option-like word).
    for call in &calls {
        for a in call.iter().filter(|a| a.contains(odd)) {
            assert!(
                a.contains(&format!("refs/heads/{odd}")) || a.starts_with('+'),
                "{a:?} in {call:?}"
            );
        }
    }
}

/// Whether a build (JSON) is pending: queued, or initializing before its commit resolved.
fn is_pending(b: &serde_json::Value) -> bool {
    b["status"] == "queued" || (b["status"] == "initializing" && b["commit"].is_null())
}

/// HOSTILE 25: 50 signed pushes of 50 real commits while builds run: a watcher that lists the
/// branch's builds all along never sees two pending at once, and the last build has the last
/// commit (and built it).
#[test]
fn fifty_pushes_of_real_commits_keep_one_pending_build_and_build_the_last() {
    const SECRET: &str = "fifty-pushes-secret";
    let repo = Repo::new();
    let wd = tempfile::tempdir().unwrap();
    std::fs::write(wd.path().join("s"), SECRET).unwrap();
    let rest = format!(
        "[projects.site]\nbranches = [\"main\"]\nrepo = {}\ncommand = \"cat README; sleep 0.3\"\ngit_secret_file = {}\nproject_builds_per_minute = 1000\n",
        toml_str(repo.path().to_str().unwrap()),
        toml_str(wd.path().join("s").to_str().unwrap())
    );
    let d = Daemon::start_with_server("builds_per_minute = 1000", &rest);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (addr, token, stop) = (d.addr, d.token.clone(), stop.clone());
        std::thread::spawn(move || {
            let auth = format!("Bearer {token}");
            let (mut polls, mut worst) = (0u32, 0usize);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let r = request(
                    addr,
                    "GET",
                    "/api/projects/site/builds?limit=100",
                    &[("Authorization", &auth)],
                    b"",
                );
                assert_eq!(r.status, 200);
                let v = r.json();
                let pending: Vec<_> = v["result"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|b| is_pending(b))
                    .cloned()
                    .collect();
                assert!(
                    pending.len() <= 1,
                    "two pending builds at once: {pending:?}"
                );
                worst = worst.max(pending.len());
                polls += 1;
            }
            (polls, worst)
        })
    };

    let mut last = String::new();
    let mut pushed = Vec::new();
    for i in 0..50 {
        last = repo.commit("README", &format!("version {i}\n"));
        pushed.push(last.clone());
        let r = github_push(&d, SECRET, "main", &last, &format!("push-{i}"));
        assert_eq!(
            r.status,
            200,
            "push {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    eventually(120, "every build stopped", || {
        let v = d
            .api("GET", "/api/projects/site/builds?limit=100", None)
            .json();
        v["result"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["status"] == "stopped")
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (polls, worst) = watcher.join().expect("the watcher saw two pending builds");
    assert!(polls >= 5, "the watcher looked only {polls} times");
    assert_eq!(worst, 1, "the watcher never saw a pending build");

    let v = d
        .api("GET", "/api/projects/site/builds?limit=100", None)
        .json();
    let builds = v["result"].as_array().unwrap();
    assert!(
        builds.len() < 50,
        "no push was joined: {} builds",
        builds.len()
    );
    let newest = &builds[0];
    assert_eq!(newest["commit"], last.as_str(), "{newest}");
    assert_eq!(newest["build_outcome"], "success", "{newest}");
    // Every pushed commit was asked for by one build or another (joins record theirs).
    assert_eq!(newest["requested_commit"], last.as_str(), "{newest}");
    let requested: Vec<String> = builds
        .iter()
        .flat_map(|b| {
            b["requested_commits"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    for sha in &pushed {
        assert!(requested.contains(sha), "push {sha} recorded by no build");
    }
    let id = newest["build_uuid"].as_str().unwrap();
    assert!(d.log_text(id, "stdout").contains("version 49"));
}

/// A tmpfs of `size` mounted on `dir`, unmounted when dropped; `None` where mounting is not
/// allowed (not root).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system of `dir` with `dir/filler` until it has no byte left.
fn fill_up(dir: &Path) -> PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let _ = f.write_all(&[0u8; 512]);
    let _ = f.write_all(&[0u8; 1]);
    path
}

/// HOSTILE 21: a real full disk (the state dir on a small tmpfs that is then filled) while
/// eight clients keep triggering and cancelling: every answer is 200 or 503 (code 1503; after
/// the daemon exits, connections are refused), the daemon exits non-zero, and after a
/// restart with room every acknowledged build is there.
#[test]
fn a_full_disk_mid_requests_answers_503_and_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Some(_disk) = SmallDisk::mount(&dir.join("state"), "48m") else {
        eprintln!("SKIP: needs root to mount a small tmpfs as the state dir");
        return;
    };
    let branches: Vec<String> = (0..8).map(|i| format!("b{i}")).collect();
    let rest = format!(
        "[projects.site]\nbranches = {}\nworkdir = {}\ncommand = \"sleep 60\"\n",
        serde_json::to_string(&branches).unwrap(),
        toml_str(dir.to_str().unwrap())
    );
    write_config(
        dir,
        "builds_per_minute = 1000000\nproject_builds_per_minute = 1000000\nkeep_builds = 100000\nmax_concurrent_builds = 1",
        &rest,
    );
    let mut d = Daemon::spawn(dir, &[]).unwrap();
    let hooks: Vec<String> = branches
        .iter()
        .map(|b| d.create_hook("site", &format!("h-{b}"), b).1)
        .collect();
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u16, String)>::new()));
    let clients: Vec<_> = hooks
        .into_iter()
        .map(|hook| {
            let (addr, auth) = (d.addr, format!("Bearer {}", d.token));
            let (acknowledged, answers) = (acknowledged.clone(), answers.clone());
            std::thread::spawn(move || {
                let body = vec![b'p'; 16 * 1024];
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    let Some(r) = try_request(addr, "POST", &hook, &[], &body) else {
                        return; // The daemon has exited.
                    };
                    answers.lock().unwrap().push((r.status, r.error_message()));
                    if r.status != 200 {
                        continue;
                    }
                    let id = r.json()["result"]["build_uuid"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    acknowledged.lock().unwrap().push(id.clone());
                    let cancel = format!("/api/builds/{id}/cancel");
                    if let Some(c) =
                        try_request(addr, "POST", &cancel, &[("Authorization", &auth)], b"")
                    {
                        answers.lock().unwrap().push((c.status, c.error_message()));
                    }
                }
            })
        })
        .collect();
    // The disk fills while the clients are at it.
    eventually(60, "builds acknowledged before the disk fills", || {
        acknowledged.lock().unwrap().len() >= 20
    });
    let filler = fill_up(&dir.join("state"));
    let code = d.wait_exit(90);
    for c in clients {
        c.join().unwrap();
    }
    assert!(matches!(code, Some(c) if c != 0), "exit code {code:?}");
    // The daemon noticed the failure and stopped by itself: not the last-resort exit of a stop
    // that stalled (1 run in 10 did, before transactions waited outside sled for a flush).
    let logs = d.logs();
    assert!(logs.contains("the database failed; stopping"), "{logs}");
    assert!(!logs.contains("did not stop within"), "{logs}");
    let answers = answers.lock().unwrap().clone();
    let refused: Vec<_> = answers.iter().filter(|(s, _)| *s == 503).collect();
    assert!(
        !refused.is_empty(),
        "no 503 among {} answers",
        answers.len()
    );
    for (status, message) in &answers {
        // 409: a cancel that lost the race against a cancel of the same build by its own
        // supersede; never a 500 or another error.
        assert!(
            matches!(status, 200 | 409 | 503),
            "answer {status}: {message}"
        );
    }
    assert!(
        refused
            .iter()
            .all(|(_, m)| m.contains("storage") || m.contains("shutting down")),
        "{refused:?}"
    );

    // Room again: every acknowledged build is there.
    std::fs::remove_file(filler).unwrap();
    let d2 = Daemon::spawn(dir, &[]).unwrap();
    let acknowledged = acknowledged.lock().unwrap().clone();
    eprintln!(
        "{} builds acknowledged, {} answers 503",
        acknowledged.len(),
        refused.len()
    );
    for id in &acknowledged {
        let r = d2.api("GET", &format!("/api/builds/{id}"), None);
        assert_eq!(r.status, 200, "acknowledged build {id} lost");
    }
}
