//! The per-build supervisor: `deployhook` re-executed in a hidden mode, one per child process
//! of a build (git steps and the build command alike).
//!
//! # Why a separate process
//! Killing a build must take its whole process tree, and the daemon dying (even by `kill -9`)
//! must take every build with it. `PR_SET_PDEATHSIG` alone cannot promise that: it fires when
//! the *thread* that forked exits (tokio's blocking threads come and go), and it never reaches
//! grandchildren. So between the daemon and each build command sits this small, single-purpose
//! process:
//!
//! ```text
//! deployhook serve ──socketpair──▶ deployhook __supervise ──▶ /bin/sh -c "<command>" (own group)
//!                   ◀─stdout/stderr pipes──────────────────────────┘ (and its descendants)
//! ```
//!
//! * Its stdin is one end of a socketpair whose other end only the daemon holds. When the
//!   daemon dies for any reason, the kernel closes that end; the supervisor reads EOF and
//!   SIGKILLs everything. No thread lifetimes and no signal delivery are involved.
//! * It makes itself a *child subreaper*, so a descendant that double-forks or calls `setsid`
//!   to escape the build's process group is re-parented to it, not to init, and can still be
//!   found (via `/proc/<pid>/task/*/children`) and killed.
//! * It starts the command in a new process group with stdin `/dev/null` and the build's
//!   stdout/stderr pipes, and keeps no copy of those pipes itself: once the command and its
//!   descendants are gone, the daemon's readers see EOF.
//! * It raises its `oom_score_adj` before spawning (inherited by the build), so under memory
//!   pressure the kernel kills the build, not the daemon.
//! * It runs in its own process group (the daemon starts it so): a Ctrl-C in a terminal or a
//!   signal sent to the daemon's group must not kill a supervisor and orphan its build;
//!   stopping is the daemon's decision, sent over the socket. (It does not block signals
//!   instead: a blocked mask is inherited through `exec`, and the build's shell could then
//!   never see the SIGTERM that asks it to stop.)
//!
//! # The pipe-holding grandchild
//! `cmd &` or `setsid nohup sleep 999 &` leaves a process holding the log pipe after the main
//! process exits; a naive reader waits for EOF forever. Here, as soon as the main process has
//! exited and been reaped, the supervisor SIGKILLs the rest of its process group and every
//! remaining descendant, reaps them all, and reports `done`. The daemon additionally stops
//! reading the pipes a short drain deadline after the main process exits, as a backstop for a
//! process the supervisor could not kill (e.g. stuck in uninterruptible sleep).
//!
//! # Protocol
//! The supervisor is started with no arguments besides [`MODE_ARG`] and an empty environment,
//! and waits for its [`Job`]: one line of JSON on the socket (argv, environment, working
//! directory, kill grace). So a supervisor can be started ahead of time and kept warm: the
//! exec of this binary then happens before the trigger, not after it (see
//! `crate::runner::SupervisorPool`). EOF before a job: exit quietly.
//!
//! Daemon → supervisor after the job, one byte each: `T` (SIGTERM the group now, SIGKILL
//! everything after the grace period), `K` (SIGKILL everything now); EOF means the same as `K`.
//! Supervisor → daemon, one line each: `pid N`, then `exit CODE` or `signal N` when the main
//! process ends (or `spawn-error MESSAGE`), then `done` when every descendant is reaped.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

/// The hidden first argument that selects this mode.
pub const MODE_ARG: &str = "__supervise";

/// `oom_score_adj` given to builds (the daemon keeps its own, lower one).
pub const BUILD_OOM_SCORE_ADJ: &str = "500";

/// What a supervisor is asked to run. Sent as one JSON line, so every field must be UTF-8
/// (config values and paths derived from them are).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Time between SIGTERM and SIGKILL after a `T`, in milliseconds.
    pub grace_ms: u64,
    /// Working directory of the command.
    pub workdir: String,
    /// The command's argv (not a shell string).
    pub argv: Vec<String>,
    /// The command's whole environment (nothing else is inherited).
    pub env: Vec<(String, String)>,
}

impl Job {
    /// The job as the line the supervisor reads.
    pub fn to_line(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parses a job line.
    pub fn parse(line: &str) -> Result<Job, String> {
        let job: Job = serde_json::from_str(line).map_err(|e| format!("bad job: {e}"))?;
        if job.argv.is_empty() {
            return Err("bad job: empty argv".into());
        }
        Ok(job)
    }
}

/// Shared between the supervisor's two threads.
struct Shared {
    /// Process group (= pid) of the command; 0 until spawned.
    pgid: AtomicI32,
    /// Set once the main process has been reaped.
    main_done: AtomicBool,
}

impl Shared {
    fn pgid(&self) -> Option<Pid> {
        match self.pgid.load(Ordering::SeqCst) {
            0 => None,
            p => Some(Pid::from_raw(p)),
        }
    }

    fn kill_everything(&self) {
        if let Some(pgid) = self.pgid() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        kill_descendants();
    }
}

/// Entry point of the hidden mode; returns the process exit code.
pub fn main(args: &[OsString]) -> i32 {
    if !args.is_empty() {
        eprintln!("deployhook supervisor: takes no arguments; the job comes over stdin");
        return 2;
    }
    // fd 0 is the control socket; 1 and 2 are the build's output pipes. Take them over and
    // point our own 0/1/2 at /dev/null so this process holds no copy of the pipes.
    let ctl = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(_) => return 2,
    };
    let out = std::io::stdout().as_fd().try_clone_to_owned();
    let err = std::io::stderr().as_fd().try_clone_to_owned();
    let (Ok(out), Ok(err)) = (out, err) else {
        return 2;
    };
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
    let mut report = match ctl.try_clone() {
        Ok(s) => s,
        Err(_) => return 2,
    };
    let mut say = |line: &str| {
        let _ = report.write_all(format!("{line}\n").as_bytes());
    };
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let _ = std::fs::write("/proc/self/oom_score_adj", BUILD_OOM_SCORE_ADJ);

    // Everything above ran before the job is known (possibly long before: a warm supervisor).
    let mut ctl = BufReader::new(ctl);
    let mut line = String::new();
    match ctl.read_line(&mut line) {
        Ok(0) | Err(_) => return 0, // The daemon went away or no longer needs us.
        Ok(_) => {}
    }
    let job = match Job::parse(line.trim_end()) {
        Ok(j) => j,
        Err(e) => {
            say(&format!("spawn-error {e}"));
            say("done");
            return 0;
        }
    };

    let mut cmd = Command::new(&job.argv[0]);
    cmd.args(&job.argv[1..])
        .env_clear()
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&job.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            say(&format!("spawn-error cannot start {}: {e}", job.argv[0]));
            say("done");
            return 0;
        }
    };
    // Drop our copies of the pipes now that the child has its own.
    drop(cmd);
    let main_pid = Pid::from_raw(child.id() as i32);
    // We reap with waitpid(-1) below; std's handle must not try to.
    std::mem::forget(child);
    let shared = Arc::new(Shared {
        pgid: AtomicI32::new(main_pid.as_raw()),
        main_done: AtomicBool::new(false),
    });
    say(&format!("pid {main_pid}"));

    let ctl_shared = shared.clone();
    let grace = Duration::from_millis(job.grace_ms);
    let _ = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || control_loop(ctl, ctl_shared, grace));

    loop {
        match waitpid(None, None) {
            Ok(status) => {
                let pid = status.pid();
                if pid == Some(main_pid) {
                    match status {
                        WaitStatus::Exited(_, code) => say(&format!("exit {code}")),
                        WaitStatus::Signaled(_, sig, _) => say(&format!("signal {}", sig as i32)),
                        _ => continue,
                    }
                    shared.main_done.store(true, Ordering::SeqCst);
                    // Whatever the main process left behind goes now (see module doc).
                    shared.kill_everything();
                }
            }
            Err(Errno::EINTR) => continue,
            Err(_) => break, // ECHILD: nothing left to reap.
        }
    }
    say("done");
    0
}

fn control_loop(mut ctl: BufReader<UnixStream>, shared: Arc<Shared>, grace: Duration) {
    let mut buf = [0u8; 64];
    loop {
        match ctl.read(&mut buf) {
            Ok(0) | Err(_) => {
                // The daemon is gone (or closed the socket): nothing may outlive it.
                shared.kill_everything();
                return;
            }
            Ok(n) => {
                for &b in &buf[..n] {
                    match b {
                        b'T' => {
                            if let Some(pgid) = shared.pgid() {
                                let _ = killpg(pgid, Signal::SIGTERM);
                            }
                            let s = shared.clone();
                            let _ =
                                std::thread::Builder::new()
                                    .name("grace".into())
                                    .spawn(move || {
                                        std::thread::sleep(grace);
                                        if !s.main_done.load(Ordering::SeqCst) {
                                            s.kill_everything();
                                        }
                                    });
                        }
                        b'K' => shared.kill_everything(),
                        _ => {}
                    }
                }
            }
        }
    }
}

/// SIGKILLs every descendant of this process, including ones that left the build's process
/// group. Repeats until none is left or a bound is hit (a process could fork between the
/// listing and the kill).
fn kill_descendants() {
    for _ in 0..50 {
        let pids = descendants();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = kill(pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Live descendants of this process (zombies excluded), via `/proc/*/task/*/children`.
fn descendants() -> Vec<Pid> {
    let mut out = Vec::new();
    let mut todo = children_of("self");
    while let Some(pid) = todo.pop() {
        if is_zombie(pid) {
            continue;
        }
        todo.extend(children_of(&pid.to_string()));
        out.push(Pid::from_raw(pid));
        if out.len() > 100_000 {
            break;
        }
    }
    out
}

fn children_of(pid: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|s| s.parse::<i32>().ok()),
            );
        }
    }
    out
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_round_trip() {
        let j = Job {
            grace_ms: 1500,
            workdir: "/srv/x".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "echo \"-- hi\"\nnext".into()],
            env: vec![("A".into(), "b=c".into())],
        };
        let line = j.to_line();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line");
        assert_eq!(
            Job::parse(std::str::from_utf8(&line).unwrap().trim_end()).unwrap(),
            j
        );
        assert!(Job::parse("{}").is_err());
        assert!(Job::parse(r#"{"grace_ms":1,"workdir":"/","argv":[],"env":[]}"#).is_err());
    }
}
