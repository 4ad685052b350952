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
//! [`SupervisorPool`]). EOF before a job: exit quietly.
//!
//! Daemon → supervisor after the job, one byte each: `T` (SIGTERM the group now, SIGKILL
//! everything after the grace period), `K` (SIGKILL everything now); EOF means the same as `K`.
//! Supervisor → daemon, one line each ([`Report`]): `pid N`, then `exit CODE` or `signal N`
//! when the main process ends (or `spawn-error MESSAGE`), then `done` when every descendant is
//! reaped.
//!
//! # The daemon's side
//! [`Supervisor`] is the one owner of that protocol in the daemon: it hands over the job,
//! sends `T`/`K`, turns report lines into [`Event`]s, escalates on its own when a supervisor
//! stops answering (`K`, then SIGKILL to the supervisor and the build's group), and reaps the
//! supervisor. Dropping it mid-build closes the socket, so the supervisor kills the build's
//! tree and exits, and a background task reaps it: no build and no zombie is left behind.
//! [`SupervisorPool`] keeps one supervisor started ahead of need.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

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

/// One line a supervisor sends the daemon. Written by [`Report::to_line`] in the supervisor and
/// read by [`Report::parse`] in the daemon, so the wire format lives in these two functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// `pid N`: the main process started; N is also its process group.
    Pid(i32),
    /// `exit CODE`: the main process exited.
    Exit(i32),
    /// `signal N`: the main process was killed by signal N.
    Signal(i32),
    /// `spawn-error MESSAGE`: the job could not be started.
    SpawnError(String),
    /// `done`: every process of the job is reaped; nothing more follows.
    Done,
}

impl Report {
    /// The report as one line, newline included. A message's own line breaks become spaces.
    pub fn to_line(&self) -> String {
        match self {
            Report::Pid(p) => format!("pid {p}\n"),
            Report::Exit(c) => format!("exit {c}\n"),
            Report::Signal(s) => format!("signal {s}\n"),
            Report::SpawnError(m) => format!("spawn-error {}\n", m.replace(['\n', '\r'], " ")),
            Report::Done => "done\n".to_owned(),
        }
    }

    /// Parses one line (without its newline); `None` for anything a supervisor never sends.
    pub fn parse(line: &str) -> Option<Report> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        Some(match word {
            "pid" => Report::Pid(rest.parse().ok()?),
            "exit" => Report::Exit(rest.parse().ok()?),
            "signal" => Report::Signal(rest.parse().ok()?),
            "spawn-error" => Report::SpawnError(rest.to_owned()),
            "done" if rest.is_empty() => Report::Done,
            _ => return None,
        })
    }
}

/// How the main process of a job ended, as far as the daemon knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MainStatus {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
    /// It never started, for this reason.
    SpawnError(String),
    /// The supervisor vanished without a report.
    Lost,
}

/// What [`Supervisor::next_event`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The main process ended; the supervisor now kills and reaps whatever it left behind.
    MainEnded(MainStatus),
    /// Nothing of the job runs any more: the supervisor said `done`, or it vanished or stopped
    /// answering and the handle killed it and the job's process group.
    Finished,
}

/// Why a job could not be handed to a supervisor.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The supervisor process could not be started.
    #[error("cannot start the supervisor: {0}")]
    Spawn(std::io::Error),
    /// The supervisor did not take the job.
    #[error("cannot hand the job to the supervisor: {0}")]
    Handover(std::io::Error),
}

/// Extra time a supervisor gets, beyond the kill grace or the output drain, before the handle
/// escalates on its own.
pub const SLACK: Duration = Duration::from_secs(3);

/// How long [`Supervisor::close`] (or a drop) waits for the supervisor to exit after the socket
/// closed before it SIGKILLs it.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// A supervisor process that has been started and waits for its job.
struct Warm {
    child: tokio::process::Child,
    ctl: tokio::net::UnixStream,
}

/// Keeps one supervisor started ahead of need, so that starting a build costs a socket write
/// instead of an exec of this (large) binary: the exec, the dynamic loading and the
/// supervisor's own set-up happen between builds, not between a trigger and its command.
/// A warm supervisor has an empty environment and no job; if the daemon dies it reads EOF and
/// exits, having nothing to kill.
pub struct SupervisorPool {
    exe: PathBuf,
    warm: tokio::sync::Mutex<Option<Warm>>,
}

impl std::fmt::Debug for SupervisorPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorPool")
            .field("exe", &self.exe)
            .finish_non_exhaustive()
    }
}

impl SupervisorPool {
    /// A pool of supervisors run from `exe` (a `deployhook` binary of this very version).
    pub fn new(exe: PathBuf) -> Arc<SupervisorPool> {
        Arc::new(SupervisorPool {
            exe,
            warm: tokio::sync::Mutex::new(None),
        })
    }

    /// A pool of supervisors run from the running daemon's own image. `/proc/self/exe` is that
    /// image even if the file on disk was replaced by an upgrade, so supervisor and daemon
    /// always speak the same protocol.
    pub fn of_this_binary() -> Arc<SupervisorPool> {
        let exe = if Path::new("/proc/self/exe").exists() {
            PathBuf::from("/proc/self/exe")
        } else {
            std::env::current_exe().unwrap_or_else(|_| PathBuf::from("deployhook"))
        };
        SupervisorPool::new(exe)
    }

    fn spawn(&self) -> std::io::Result<Warm> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg(MODE_ARG)
            .env_clear()
            .current_dir("/")
            // Its own process group: a Ctrl-C or a signal sent to the daemon's group must not
            // kill a supervisor and orphan a build; stopping is the daemon's decision.
            .process_group(0)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // No kill_on_drop: should a handle ever be dropped mid-build, the socket closes and
        // the supervisor kills the build's whole tree itself (SIGKILLing the supervisor
        // instead could orphan the tree). `Supervisor`'s `Drop` reaps it.
        let child = cmd.spawn()?;
        // Dropping the command drops our copy of the supervisor's end of the socket.
        drop(cmd);
        ours.set_nonblocking(true)?;
        Ok(Warm {
            child,
            ctl: tokio::net::UnixStream::from_std(ours)?,
        })
    }

    /// A supervisor waiting for its job: the warm one if it is still alive, else a new one.
    async fn take(&self) -> std::io::Result<Warm> {
        if let Some(mut w) = self.warm.lock().await.take()
            && matches!(w.child.try_wait(), Ok(None))
        {
            return Ok(w);
        }
        self.spawn()
    }

    /// Starts a warm supervisor in the background if there is none.
    pub fn refill(self: &Arc<Self>) {
        self.refill_after(Duration::ZERO);
    }

    /// Like [`refill`](Self::refill), after `delay`.
    fn refill_after(self: &Arc<Self>, delay: Duration) {
        let pool = self.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut slot = pool.warm.lock().await;
            if slot.is_none() {
                match pool.spawn() {
                    Ok(w) => *slot = Some(w),
                    Err(e) => tracing::warn!("cannot start a spare supervisor: {e}"),
                }
            }
        });
    }
}

/// When the next spare supervisor is started after a job was handed over: when the job's
/// main process ends, or after this long, whichever comes first. Started at once, its exec
/// and start-up (about 2 ms of a CPU, during which the worker that spawns it waits in
/// `vfork`) ran beside the job's own start: on 2 cores, POST → exec of `exec date` took
/// about 1.9 × a bare `sh -c` spawn (issue 17). A job that follows within this time (a
/// queued build, the next git step) starts its own supervisor, as the first one does.
const SPARE_AFTER: Duration = Duration::from_secs(1);

/// The next step of the handle's own escalation, when the supervisor does not finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escalation {
    /// At this instant, send `K`.
    Kill(Instant),
    /// At this instant, SIGKILL the supervisor and the job's process group and give up.
    GiveUp(Instant),
}

impl Escalation {
    fn at(self) -> Instant {
        match self {
            Escalation::Kill(t) | Escalation::GiveUp(t) => t,
        }
    }
}

/// The daemon's handle on one supervisor running one job (see the module doc).
pub struct Supervisor {
    /// `None` once reaped or handed to the reaping task.
    child: Option<tokio::process::Child>,
    /// Our end of the control socket, for `T`/`K`; closing it makes the supervisor kill
    /// everything.
    ctl: Option<OwnedWriteHalf>,
    reports: tokio::io::Lines<tokio::io::BufReader<OwnedReadHalf>>,
    /// The job's process group, once reported.
    group: Option<nix::unistd::Pid>,
    /// The job's kill grace.
    grace: Duration,
    /// How long output may still be read after the main process ended; `done` is awaited that
    /// long plus the slack.
    linger: Duration,
    /// Extra time before the handle escalates on its own: [`SLACK`] (tests shorten it, see
    /// [`Supervisor::with_slack`]).
    slack: Duration,
    escalation: Option<Escalation>,
    /// Set once `Finished` was returned.
    finished: bool,
    /// The pool to start the next spare for when the job's main process ends (see
    /// [`SPARE_AFTER`]); `None` once done.
    pool: Option<Arc<SupervisorPool>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("pid", &self.pid())
            .field("group", &self.group)
            .field("escalation", &self.escalation)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// Takes a supervisor from `pool` (starting a spare for the next job) and hands it `job`.
    /// `linger` is how long the caller still reads output after the main process ended.
    pub async fn start(
        pool: &Arc<SupervisorPool>,
        job: &Job,
        linger: Duration,
    ) -> Result<Supervisor, StartError> {
        let Warm { mut child, ctl } = pool.take().await.map_err(StartError::Spawn)?;
        pool.refill_after(SPARE_AFTER);
        let (rd, mut wr) = ctl.into_split();
        if let Err(e) = wr.write_all(&job.to_line()).await {
            let _ = child.kill().await;
            return Err(StartError::Handover(e));
        }
        Ok(Supervisor {
            child: Some(child),
            ctl: Some(wr),
            reports: tokio::io::BufReader::new(rd).lines(),
            group: None,
            grace: Duration::from_millis(job.grace_ms),
            linger,
            slack: SLACK,
            escalation: None,
            finished: false,
            pool: Some(pool.clone()),
        })
    }

    /// The same handle with `slack` instead of [`SLACK`], so that a test of the escalation
    /// waits a fraction of a second instead of twice 3 s.
    pub fn with_slack(mut self, slack: Duration) -> Supervisor {
        self.slack = slack;
        self
    }

    /// The supervisor's process id (while it has not been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// The job's stdout and stderr pipes; `None` after the first call.
    pub fn take_output(
        &mut self,
    ) -> (
        Option<tokio::process::ChildStdout>,
        Option<tokio::process::ChildStderr>,
    ) {
        match self.child.as_mut() {
            Some(c) => (c.stdout.take(), c.stderr.take()),
            None => (None, None),
        }
    }

    /// Asks for a graceful stop: SIGTERM to the job's group now, SIGKILL to everything after
    /// the kill grace. Should the supervisor not finish within the grace and the slack
    /// ([`SLACK`]), the handle sends `K`, and after another slack kills it and the group itself.
    pub async fn terminate(&mut self) {
        self.send(b'T').await;
        self.escalate_by(Escalation::Kill(Instant::now() + self.grace + self.slack));
    }

    /// SIGKILLs everything of the job now.
    pub async fn kill(&mut self) {
        self.send(b'K').await;
    }

    async fn send(&mut self, byte: u8) {
        if let Some(ctl) = self.ctl.as_mut() {
            // A supervisor that is gone cannot be told anything; `next_event` sees it.
            let _ = ctl.write_all(&[byte]).await;
        }
    }

    /// Keeps the earlier of the pending escalation and `e`.
    fn escalate_by(&mut self, e: Escalation) {
        if self.escalation.is_none_or(|cur| cur.at() > e.at()) {
            self.escalation = Some(e);
        }
    }

    /// SIGKILLs the job's process group (the supervisor may be gone and cannot do it).
    fn kill_group(&self) {
        if let Some(g) = self.group {
            let _ = nix::sys::signal::killpg(g, Signal::SIGKILL);
        }
    }

    /// Waits for the next report that matters, escalating on the way if a stop or the end of
    /// the main process is not followed by `done` in time. After [`Event::Finished`] it
    /// returns `Finished` again at once. Cancel-safe: state changes only after an await.
    pub async fn next_event(&mut self) -> Event {
        loop {
            if self.finished {
                return Event::Finished;
            }
            let far = Instant::now() + Duration::from_secs(10 * 365 * 24 * 3600);
            let escalate_at = self.escalation.map_or(far, Escalation::at);
            tokio::select! {
                line = self.reports.next_line() => {
                    match line.ok().flatten().as_deref().and_then(Report::parse) {
                        Some(Report::Pid(p)) => self.group = Some(nix::unistd::Pid::from_raw(p)),
                        Some(Report::Exit(c)) => return self.main_ended(MainStatus::Exited(c)),
                        Some(Report::Signal(s)) => return self.main_ended(MainStatus::Signaled(s)),
                        Some(Report::SpawnError(m)) => {
                            return self.main_ended(MainStatus::SpawnError(m));
                        }
                        Some(Report::Done) => return self.finish(),
                        None => {
                            // EOF or garbage: the supervisor is gone. Make sure its group is too.
                            self.kill_group();
                            return self.finish();
                        }
                    }
                }
                _ = tokio::time::sleep_until(escalate_at), if self.escalation.is_some() => {
                    match self.escalation {
                        Some(Escalation::Kill(_)) => {
                            tracing::warn!("a supervisor did not finish within the kill grace; sending it K");
                            self.kill().await;
                            self.escalation =
                                Some(Escalation::GiveUp(Instant::now() + self.slack));
                        }
                        _ => {
                            tracing::error!("a supervisor does not answer; killing it and its build's process group");
                            if let Some(c) = self.child.as_mut() {
                                let _ = c.start_kill();
                            }
                            self.kill_group();
                            return self.finish();
                        }
                    }
                }
            }
        }
    }

    /// The supervisor now kills and reaps what is left and says `done`; if that does not come
    /// (a descendant stuck in uninterruptible sleep keeps `waitpid` waiting), the handle gives
    /// up on it after the caller's output linger and some slack.
    fn main_ended(&mut self, status: MainStatus) -> Event {
        self.start_the_next_spare();
        self.escalate_by(Escalation::GiveUp(
            Instant::now() + self.linger + self.slack,
        ));
        Event::MainEnded(status)
    }

    fn start_the_next_spare(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.refill();
        }
    }

    fn finish(&mut self) -> Event {
        self.start_the_next_spare();
        self.finished = true;
        self.escalation = None;
        Event::Finished
    }

    /// Closes the control socket (the supervisor kills whatever is left and exits) and reaps
    /// the supervisor, SIGKILLing it if it has not exited after a short wait.
    pub async fn close(mut self) {
        self.ctl = None;
        if let Some(child) = self.child.take() {
            reap(child).await;
        }
    }
}

impl Drop for Supervisor {
    /// A handle dropped mid-job (its build task was aborted): the socket closes with it, so the
    /// supervisor kills the job's tree and exits; a task reaps it. Without a runtime (only at
    /// process exit) tokio's own orphan reaping is the fallback.
    fn drop(&mut self) {
        self.ctl = None;
        if let Some(child) = self.child.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(reap(child));
        }
    }
}

/// Waits for a supervisor whose socket is closed to exit; SIGKILLs it after [`EXIT_WAIT`].
async fn reap(mut child: tokio::process::Child) {
    if tokio::time::timeout(EXIT_WAIT, child.wait()).await.is_err() {
        let _ = child.kill().await;
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
    let mut say = |r: Report| {
        let _ = report.write_all(r.to_line().as_bytes());
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
            say(Report::SpawnError(e));
            say(Report::Done);
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
            say(Report::SpawnError(format!(
                "cannot start {}: {e}",
                job.argv[0]
            )));
            say(Report::Done);
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
    say(Report::Pid(main_pid.as_raw()));

    let ctl_shared = shared.clone();
    let grace = Duration::from_millis(job.grace_ms);
    let control = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || control_loop(ctl, ctl_shared, grace));
    if control.is_err() {
        // No thread (the service at its TasksMax=): nothing could stop this build or notice
        // the daemon's death, so it must not run. It ends by SIGKILL; the build fails.
        shared.kill_everything();
    }

    loop {
        match waitpid(None, None) {
            Ok(status) => {
                let pid = status.pid();
                if pid == Some(main_pid) {
                    match status {
                        WaitStatus::Exited(_, code) => say(Report::Exit(code)),
                        WaitStatus::Signaled(_, sig, _) => say(Report::Signal(sig as i32)),
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
    say(Report::Done);
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
    fn reports_parse() {
        assert_eq!(Report::parse("pid 42"), Some(Report::Pid(42)));
        assert_eq!(Report::parse("exit 3"), Some(Report::Exit(3)));
        assert_eq!(Report::parse("exit -1"), Some(Report::Exit(-1)));
        assert_eq!(Report::parse("signal 9"), Some(Report::Signal(9)));
        assert_eq!(
            Report::parse("spawn-error no such file"),
            Some(Report::SpawnError("no such file".into()))
        );
        assert_eq!(Report::parse("done"), Some(Report::Done));
        for garbage in [
            "exit x", "exit", "pid ", "bogus", "", "done now", "EXIT 1", "pid 1 2",
        ] {
            assert_eq!(Report::parse(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn reports_round_trip_as_one_line_each() {
        for r in [
            Report::Pid(7),
            Report::Exit(0),
            Report::Exit(255),
            Report::Signal(15),
            Report::SpawnError("cannot start x: No such file".into()),
            Report::Done,
        ] {
            let line = r.to_line();
            assert_eq!(line.matches('\n').count(), 1, "{line:?}");
            assert_eq!(Report::parse(line.trim_end_matches('\n')), Some(r));
        }
        // A message with line breaks must not split into a second (forged) report.
        let line = Report::SpawnError("bad\ndone".into()).to_line();
        assert_eq!(line, "spawn-error bad done\n");
    }

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
