//! One build, from leaving the queue to stopped: checkout, spawn, logs, timeout, kill.
//!
//! Every child process of a build (each git step and the build command) runs under its own
//! supervisor process (see `crate::supervisor` for why and how); this module is the daemon's
//! side of that: it starts the supervisor with the exact environment of SPEC §2, reads the
//! child's stdout/stderr into the build log, relays stop requests (cancel, supersede,
//! timeout, shutdown) and decides the outcome.
//!
//! Stopping is always: SIGTERM to the process group, SIGKILL to everything after `kill_grace`
//! (done by the supervisor, which owns the group; the protocol, and the escalation when a
//! supervisor stops answering, are [`supervisor::Supervisor`]'s). This module decides *when*
//! to stop: a stop request or the timeout while the main process runs.
//!
//! Output is read until EOF, but never longer than [`DRAIN_DEADLINE`] after the main process
//! exited: a descendant that escaped the supervisor's kill (uninterruptible sleep, say) must not
//! keep the build — and its project — busy.
//!
//! Workspaces: with `repo`, a bare mirror per project lives in `state_dir/mirrors/` (so each
//! fetch is incremental) and each build gets a fresh clone in `state_dir/workspaces/<uuid>`
//! sharing the mirror's objects, removed when the build stops. Git is run as a plain argv, the
//! branch always after `--` or inside a `refs/heads/` refspec, never through a shell.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::blocking;
use crate::buildlog::{self, LineSplitter, LogSender, Stream};
use crate::config::{ProjectConfig, Source};
use crate::machine::{Exit, RunEnd};
use crate::model::{Build, CancelReason};
use crate::queue::{LiveLog, Queue, Resolution, Start, StopReason};
use crate::supervisor::{self, Event, MainStatus, Supervisor, SupervisorPool};

/// How long output is still read after the main process exited.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(2);

/// Settings fixed for the daemon's lifetime.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// The state dir (mirrors, workspaces, payloads, logs).
    pub state_dir: PathBuf,
    /// `PATH`, `HOME`, `USER`, `LANG` as the daemon has them.
    pub base_env: Vec<(String, String)>,
    /// Supervisors, started ahead of need.
    pub pool: Arc<SupervisorPool>,
}

impl RunSettings {
    /// Settings from the daemon's own environment. `PATH` falls back to a standard one when
    /// the daemon has none; the others are passed only when set.
    pub fn from_env(state_dir: &Path) -> Self {
        let mut base_env = Vec::new();
        for key in ["PATH", "HOME", "USER", "LANG"] {
            match std::env::var(key) {
                Ok(v) => base_env.push((key.to_owned(), v)),
                Err(_) if key == "PATH" => {
                    base_env.push((key.into(), "/usr/local/bin:/usr/bin:/bin".into()))
                }
                Err(_) => {}
            }
        }
        let pool = SupervisorPool::of_this_binary();
        Self {
            state_dir: state_dir.to_path_buf(),
            base_env,
            pool,
        }
    }
}

fn workspace_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("workspaces")
}

fn payload_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("payloads")
}

/// Removes workspaces and payload files left by builds of a previous run (none is live at
/// startup).
pub fn clean_leftovers(state_dir: &Path) {
    for dir in [workspace_dir(state_dir), payload_dir(state_dir)] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }
}

/// Hides the user-info of every URL in a line of text (`https://user:token@host` →
/// `https://***@host`), so that credentials in a `repo` URL reach no log: neither our own
/// lines about the fetch nor git's messages that echo the URL.
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&tail[at..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Where a pipe's bytes go.
#[derive(Clone)]
enum Sink {
    /// Into the build log, as lines of this stream.
    Log(LogSender, Stream),
    /// Into memory (first 64 KiB), e.g. `git rev-parse`'s answer.
    Capture(Arc<Mutex<Vec<u8>>>),
}

/// The end of one supervised step.
#[derive(Debug)]
struct StepEnd {
    status: MainStatus,
    /// Set when the step was stopped on request or by the timeout.
    stopped: Option<StopReason>,
}

impl StepEnd {
    fn ok(&self) -> bool {
        self.stopped.is_none() && self.status == MainStatus::Exited(0)
    }
}

/// Everything a step needs besides its argv.
struct Ctx<'a> {
    settings: &'a RunSettings,
    /// Time between SIGTERM and SIGKILL, as configured when the build started.
    kill_grace: Duration,
    log: &'a LogSender,
    stop: &'a mut watch::Receiver<Option<StopReason>>,
    /// Whether the stop channel is still open (closed once the build is no longer live).
    stop_open: bool,
    deadline: Instant,
    timeout: Duration,
    /// A stop reason already acted upon; later steps are not started.
    stopped: Option<StopReason>,
}

impl Ctx<'_> {
    fn pending_stop(&mut self) -> Option<StopReason> {
        if self.stopped.is_none() {
            self.stopped = *self.stop.borrow();
            if self.stopped.is_none() && Instant::now() >= self.deadline {
                self.stopped = Some(StopReason::Timeout);
            }
        }
        self.stopped
    }
}

/// Runs one build to its end and reports it to the queue. Never panics on bad input; every
/// failure becomes outcome `fail` with a `system` line saying why.
pub async fn run(queue: Queue, settings: RunSettings, start: Start) {
    let build = start.build;
    let id = build.id;
    let started = Instant::now();
    let log_path = buildlog::log_path(&settings.state_dir, id);
    let (writer, log) = match buildlog::create_log(&log_path, start.max_log_bytes).await {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(build = %id, "cannot create the build log {}: {e}", log_path.display());
            let summary = buildlog::record_unwritable(&log_path, &e).await;
            queue.finish(id, FAILED, summary);
            return;
        }
    };
    queue.set_log(
        id,
        LiveLog {
            lines: writer.lines.clone(),
            stats: writer.stats.clone(),
        },
    );
    let timeout = start
        .project
        .as_ref()
        .map_or(Duration::from_secs(3600), |p| p.timeout);
    let mut stop = start.stop;
    let mut ctx = Ctx {
        settings: &settings,
        kill_grace: start.kill_grace,
        log: &log,
        stop: &mut stop,
        stop_open: true,
        deadline: started + timeout,
        timeout,
        stopped: None,
    };
    let workspace = workspace_dir(&settings.state_dir).join(id.to_string());
    let payload = payload_dir(&settings.state_dir).join(id.to_string());
    let end = execute(
        &queue,
        &mut ctx,
        &build,
        start.project.as_deref(),
        &workspace,
        &payload,
    )
    .await;
    drop(log);
    let summary = writer.finish().await;
    let ws = workspace.clone();
    let _ = blocking::run("removing a workspace", move || {
        let _ = std::fs::remove_dir_all(&ws);
        let _ = std::fs::remove_file(&payload);
    })
    .await;
    queue.finish(id, end, summary);
}

async fn execute(
    queue: &Queue,
    ctx: &mut Ctx<'_>,
    build: &Build,
    project: Option<&ProjectConfig>,
    workspace: &Path,
    payload_path: &Path,
) -> RunEnd {
    let id = build.id;
    let Some(project) = project else {
        ctx.log
            .system(format!(
                "project {} is no longer in the config; nothing was run",
                build.project
            ))
            .await;
        return FAILED;
    };
    if !project.allows(&build.git_ref) {
        ctx.log
            .system(format!(
                "{} is no longer one the config of project {} builds; nothing was run",
                build.git_ref, build.project
            ))
            .await;
        return FAILED;
    }
    let mut env = ctx.settings.base_env.clone();
    env.push(("GIT_TERMINAL_PROMPT".into(), "0".into()));
    let git_env = env;

    let (workdir, commit) = match &project.source {
        Source::Workdir(dir) => {
            queue.resolve(id, Resolution::Workdir);
            (dir.clone(), None)
        }
        Source::Repo(url) => {
            match checkout(queue, ctx, build, project, url, &git_env, workspace).await {
                Ok(sha) => (workspace.to_path_buf(), Some(sha)),
                Err(end) => return end,
            }
        }
    };

    let payload_env = if build.has_payload {
        match write_payload(queue, build, payload_path).await {
            Ok(()) => payload_path.to_string_lossy().into_owned(),
            Err(e) => {
                ctx.log
                    .system(format!("cannot write the payload file: {e}"))
                    .await;
                return FAILED;
            }
        }
    } else {
        String::new()
    };

    let mut env = ctx.settings.base_env.clone();
    env.extend(project.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let hook_name = build
        .trigger
        .hook
        .as_ref()
        .map(|(_, n)| n.clone())
        .unwrap_or_default();
    env.extend([
        ("DEPLOYHOOK_BUILD_UUID".to_owned(), id.to_string()),
        ("DEPLOYHOOK_PROJECT".to_owned(), build.project.clone()),
        (
            "DEPLOYHOOK_BRANCH".to_owned(),
            build.git_ref.branch().unwrap_or_default().to_owned(),
        ),
        ("DEPLOYHOOK_REF".to_owned(), build.git_ref.full()),
        (
            "DEPLOYHOOK_TAG".to_owned(),
            build.git_ref.tag().unwrap_or_default().to_owned(),
        ),
        (
            "DEPLOYHOOK_COMMIT".to_owned(),
            commit.clone().unwrap_or_default(),
        ),
        (
            "DEPLOYHOOK_TRIGGER".to_owned(),
            build.trigger.source.as_str().to_owned(),
        ),
        ("DEPLOYHOOK_HOOK_NAME".to_owned(), hook_name),
        ("DEPLOYHOOK_PAYLOAD".to_owned(), payload_env),
    ]);
    // SPEC §2.3: each accepted parameter as its own variable; names are validated
    // (`^[a-z][a-z0-9_]*$`) and values carry no NUL, CR or LF, and nothing goes through a shell.
    env.extend(build.params.iter().map(|(k, v)| {
        (
            format!("DEPLOYHOOK_PARAM_{}", k.to_ascii_uppercase()),
            v.clone(),
        )
    }));

    if let Some(r) = ctx.pending_stop() {
        note_stop(ctx, r).await;
        return RunEnd {
            stopped_by: Some(r),
            exit: Exit::Failed,
        };
    }
    queue.mark_running(id);
    let argv: Vec<String> = vec!["/bin/sh".into(), "-c".into(), project.command.clone()];
    let out = Sink::Log(ctx.log.clone(), Stream::Stdout);
    let err = Sink::Log(ctx.log.clone(), Stream::Stderr);
    let end = step(ctx, argv, &workdir, &env, out, err).await;
    let run_end = RunEnd {
        stopped_by: end.stopped,
        exit: match &end.status {
            MainStatus::Exited(c) => Exit::Code(*c),
            MainStatus::Signaled(s) => Exit::Signal(*s),
            MainStatus::SpawnError(_) | MainStatus::Lost => Exit::Failed,
        },
    };
    let summary = match &end.status {
        MainStatus::Exited(c) => format!("the command exited with code {c}"),
        MainStatus::Signaled(s) => format!("the command was killed by signal {s}"),
        MainStatus::SpawnError(m) => format!("the command could not start: {m}"),
        MainStatus::Lost => "the build's supervisor vanished; its processes were killed".to_owned(),
    };
    ctx.log
        .system(format!(
            "{summary}; outcome {}",
            run_end.outcome().0.as_str()
        ))
        .await;
    run_end
}

/// A build that failed before any command could run to an exit status.
const FAILED: RunEnd = RunEnd {
    stopped_by: None,
    exit: Exit::Failed,
};

/// Fetches the branch into the project's mirror, resolves its head (again if a trigger
/// joined meanwhile), and checks it out into a fresh workspace. Returns the full SHA.
async fn checkout(
    queue: &Queue,
    ctx: &mut Ctx<'_>,
    build: &Build,
    project: &ProjectConfig,
    url: &str,
    env: &[(String, String)],
    workspace: &Path,
) -> Result<String, RunEnd> {
    let mirrors = ctx.settings.state_dir.join("mirrors");
    let mirror = mirrors.join(format!("{}.git", build.project));
    let sys = |log: &LogSender| Sink::Log(log.clone(), Stream::System);
    let m = mirrors.clone();
    if let Err(e) = fs_op(move || std::fs::create_dir_all(&m)).await {
        ctx.log
            .system(format!("cannot create {}: {e}", mirrors.display()))
            .await;
        return Err(FAILED);
    }
    if !mirror.join("HEAD").exists() {
        let argv = git_argv(&["init", "--quiet", "--bare", "--"], &[mirror.as_path()]);
        let end = step(ctx, argv, &mirrors, env, sys(ctx.log), sys(ctx.log)).await;
        if !end.ok() {
            return Err(step_failed(ctx, "git init", &end).await);
        }
    }
    // A fetch killed by a cancel, a timeout or the daemon's death can leave `*.lock` files in
    // the mirror, and git then refuses every later fetch. Only this build uses the mirror now
    // (one build per project at a time), so any lock in it is stale.
    let m = mirror.clone();
    let removed = blocking::run("removing stale git locks", move || remove_stale_locks(&m))
        .await
        .unwrap_or_default();
    for path in removed {
        ctx.log
            .system(format!(
                "removed a stale git lock left by an interrupted fetch: {}",
                path.display()
            ))
            .await;
    }
    let git_dir = format!("--git-dir={}", mirror.display());
    let full_ref = build.git_ref.full();
    let refspec = format!("+{full_ref}:{full_ref}");
    let m = Mirror {
        url,
        env,
        dir: &mirrors,
        git_dir: &git_dir,
    };
    let sha = if let Some(wanted) = &build.exact_commit {
        let sha = fetch_exact(ctx, &m, build, project, wanted).await?;
        queue.resolve(build.id, Resolution::Fetched(sha.clone()));
        sha
    } else {
        loop {
            queue.begin_fetch(build.id);
            ctx.log
                .system(format!(
                    "fetching {} from {}",
                    build.git_ref,
                    redact_credentials(url)
                ))
                .await;
            fetch(ctx, &m, &[&refspec]).await?;
            let rev = format!("{full_ref}^{{commit}}");
            let sha = git_output(ctx, &m, &["rev-parse", "--verify", "--quiet", &rev]).await?;
            if !is_full_sha(&sha) {
                ctx.log
                    .system(format!(
                        "git rev-parse gave no commit for {}",
                        build.git_ref
                    ))
                    .await;
                return Err(FAILED);
            }
            if queue.resolve(build.id, Resolution::Fetched(sha.clone())) {
                break sha;
            }
            ctx.log
                .system(
                    "another trigger arrived during the fetch; fetching again so that it is included",
                )
                .await;
        }
    };
    ctx.log.system(format!("checking out {sha}")).await;
    let ws = workspace.to_path_buf();
    let _ = fs_op(move || std::fs::remove_dir_all(&ws)).await;
    if let Some(parent) = workspace.parent().map(Path::to_path_buf)
        && let Err(e) = fs_op({
            let p = parent.clone();
            move || std::fs::create_dir_all(&p)
        })
        .await
    {
        ctx.log
            .system(format!("cannot create {}: {e}", parent.display()))
            .await;
        return Err(FAILED);
    }
    let argv = git_argv(
        &["clone", "--quiet", "--shared", "--no-checkout", "--"],
        &[mirror.as_path(), workspace],
    );
    let end = step(ctx, argv, &mirrors, env, sys(ctx.log), sys(ctx.log)).await;
    if !end.ok() {
        return Err(step_failed(ctx, "git clone", &end).await);
    }
    let argv = git_argv(
        &[
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "--quiet",
            "--detach",
        ],
        &[Path::new(&sha)],
    );
    let end = step(ctx, argv, workspace, env, sys(ctx.log), sys(ctx.log)).await;
    if !end.ok() {
        return Err(step_failed(ctx, "git checkout", &end).await);
    }
    Ok(sha)
}

/// A project's bare mirror and how to reach its remote: what every git step of a checkout
/// needs.
struct Mirror<'a> {
    /// The remote's URL or path (`repo`).
    url: &'a str,
    /// Environment of git steps.
    env: &'a [(String, String)],
    /// `state_dir/mirrors`, where git steps run.
    dir: &'a Path,
    /// `--git-dir=<the mirror>`.
    git_dir: &'a str,
}

fn is_full_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `git fetch` of `refspecs` from the remote into the project's mirror.
async fn fetch(ctx: &mut Ctx<'_>, m: &Mirror<'_>, refspecs: &[&str]) -> Result<(), RunEnd> {
    let mut argv = git_argv(
        &[
            // No background gc/maintenance: a detached gc would be killed with the build's
            // tree as soon as fetch exits, leaving locks behind.
            "-c",
            "gc.auto=0",
            "-c",
            "maintenance.auto=false",
            m.git_dir,
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--",
        ],
        &[Path::new(m.url)],
    );
    argv.extend(refspecs.iter().map(|r| (*r).to_owned()));
    let sys = Sink::Log(ctx.log.clone(), Stream::System);
    let end = step(ctx, argv, m.dir, m.env, sys.clone(), sys).await;
    if !end.ok() {
        return Err(step_failed(ctx, "git fetch", &end).await);
    }
    Ok(())
}

/// Runs `git --git-dir=<mirror> ARGS`; returns its trimmed standard output (at most 64 KiB
/// are kept).
async fn git_output(ctx: &mut Ctx<'_>, m: &Mirror<'_>, args: &[&str]) -> Result<String, RunEnd> {
    let captured = Arc::new(Mutex::new(Vec::new()));
    let mut argv = git_argv(&[m.git_dir], &[]);
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let what = format!("git {}", args.first().unwrap_or(&""));
    let err = Sink::Log(ctx.log.clone(), Stream::System);
    let out = Sink::Capture(captured.clone());
    let end = step(ctx, argv, m.dir, m.env, out, err).await;
    if !end.ok() {
        return Err(step_failed(ctx, &what, &end).await);
    }
    Ok(captured
        .lock()
        .map(|v| String::from_utf8_lossy(&v).trim().to_owned())
        .unwrap_or_default())
}

/// For a build of an exact commit (API `commit`, redeploy): fetches every branch and tag,
/// resolves the commit to its full SHA, and checks that it is reachable from one of the
/// project's branches or tags (SPEC §2), so that a rollback never deploys code the project
/// does not build.
async fn fetch_exact(
    ctx: &mut Ctx<'_>,
    m: &Mirror<'_>,
    build: &Build,
    project: &ProjectConfig,
    wanted: &str,
) -> Result<String, RunEnd> {
    ctx.log
        .system(format!(
            "fetching every branch and tag from {} to find commit {wanted}",
            redact_credentials(m.url)
        ))
        .await;
    let all = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];
    fetch(ctx, m, &all).await?;
    // `wanted` is 7–40 hex digits (checked by the API), so it cannot be read as an option.
    let rev = format!("{wanted}^{{commit}}");
    let sha = match git_output(ctx, m, &["rev-parse", "--verify", "--quiet", &rev]).await {
        Ok(sha) if is_full_sha(&sha) => sha,
        _ => {
            ctx.log
                .system(format!(
                    "commit {wanted} is not in the repository after the fetch; the build fails"
                ))
                .await;
            return Err(FAILED);
        }
    };
    let contains = format!("--contains={sha}");
    let args = [
        "for-each-ref",
        "--format=%(refname)",
        &contains,
        "refs/heads",
        "refs/tags",
    ];
    let refs = git_output(ctx, m, &args).await?;
    let reachable = refs.lines().any(|r| {
        let git_ref = if let Some(b) = r.strip_prefix("refs/heads/") {
            crate::model::GitRef::Branch(b.to_owned())
        } else if let Some(t) = r.strip_prefix("refs/tags/") {
            crate::model::GitRef::Tag(t.to_owned())
        } else {
            return false;
        };
        project.allows(&git_ref)
    });
    if !reachable {
        ctx.log
            .system(format!(
                "commit {sha} is not reachable from any of project {}'s branches or tags; the build fails",
                build.project
            ))
            .await;
        return Err(FAILED);
    }
    Ok(sha)
}

/// Removes `*.lock` files under a bare mirror (objects excepted: git never locks there).
fn remove_stale_locks(mirror: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let mut todo = vec![mirror.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                if path.file_name().is_some_and(|n| n != "objects") {
                    todo.push(path);
                }
            } else if path.extension().is_some_and(|x| x == "lock")
                && std::fs::remove_file(&path).is_ok()
            {
                removed.push(path);
            }
        }
    }
    removed
}

fn git_argv(args: &[&str], more: &[&Path]) -> Vec<String> {
    let mut v: Vec<String> = vec!["git".into()];
    v.extend(args.iter().map(|s| (*s).to_owned()));
    // Paths here are state_dir paths or the config's repo: UTF-8, as TOML strings are.
    v.extend(more.iter().map(|p| p.to_string_lossy().into_owned()));
    v
}

async fn step_failed(ctx: &mut Ctx<'_>, what: &str, end: &StepEnd) -> RunEnd {
    if let Some(r) = end.stopped {
        return RunEnd {
            stopped_by: Some(r),
            exit: Exit::Failed,
        };
    }
    let why = match &end.status {
        MainStatus::Exited(c) => format!("exited with code {c}"),
        MainStatus::Signaled(s) => format!("was killed by signal {s}"),
        MainStatus::SpawnError(m) => format!("could not start: {m}"),
        MainStatus::Lost => "lost its supervisor".to_owned(),
    };
    ctx.log
        .system(format!("{what} {why}; the build fails"))
        .await;
    FAILED
}

/// Payloads up to this size are written on the runtime's thread: a thread of their own cost
/// more than the write (a start and two wake-ups before the build's command could start).
const PAYLOAD_WRITTEN_INLINE: usize = 64 * 1024;

async fn write_payload(queue: &Queue, build: &Build, path: &Path) -> std::io::Result<()> {
    let body = queue
        .store()
        .payload(build.id)
        .map_err(std::io::Error::other)?
        .unwrap_or_default();
    let path = path.to_path_buf();
    if body.len() <= PAYLOAD_WRITTEN_INLINE {
        return write_private_file(&path, &body);
    }
    fs_op(move || write_private_file(&path, &body)).await
}

/// Writes `body` to `path` (mode 0600), creating its directory.
fn write_private_file(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(body)
}

/// File-system work off the runtime's threads; no thread to run it on (the service at its
/// task limit) is an I/O error like any other, so the build fails with a log line instead of
/// its task panicking (`tokio::fs` would) and the build staying `running` for ever.
async fn fs_op<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    blocking::run("file-system work", work)
        .await
        .map_err(std::io::Error::other)?
}

async fn note_stop(ctx: &mut Ctx<'_>, r: StopReason) {
    let text = match r {
        StopReason::Cancel(CancelReason::Api) => {
            "cancelled through the API; stopping the build".to_owned()
        }
        StopReason::Cancel(CancelReason::Superseded) => {
            "superseded by a newer build of this branch; stopping the build".to_owned()
        }
        StopReason::Timeout => format!(
            "timed out after {}; stopping the build",
            humantime::format_duration(ctx.timeout)
        ),
        StopReason::Shutdown => {
            "interrupted: deployhook is shutting down; stopping the build".to_owned()
        }
    };
    ctx.log.system(text).await;
}

/// Runs one argv under a supervisor to its end, relaying stops and the timeout.
async fn step(
    ctx: &mut Ctx<'_>,
    argv: Vec<String>,
    workdir: &Path,
    env: &[(String, String)],
    out: Sink,
    err: Sink,
) -> StepEnd {
    if let Some(r) = ctx.pending_stop() {
        note_stop(ctx, r).await;
        return StepEnd {
            status: MainStatus::SpawnError("not started: the build is stopping".into()),
            stopped: Some(r),
        };
    }
    let job = supervisor::Job {
        grace_ms: u64::try_from(ctx.kill_grace.as_millis()).unwrap_or(u64::MAX),
        workdir: workdir.to_string_lossy().into_owned(),
        argv,
        env: env.to_vec(),
    };
    // Builds leave a floor of descriptors to HTTP connections (see `crate::descriptors`).
    let gate = crate::descriptors::gate().await;
    if let Some(why) = crate::descriptors::shortage_now() {
        return StepEnd {
            status: MainStatus::SpawnError(why),
            stopped: None,
        };
    }
    let started = Supervisor::start(&ctx.settings.pool, &job, DRAIN_DEADLINE).await;
    drop(gate);
    let mut sup = match started {
        Ok(s) => s,
        Err(e) => {
            return StepEnd {
                status: MainStatus::SpawnError(e.to_string()),
                stopped: None,
            };
        }
    };
    let (stdout, stderr) = sup.take_output();
    let readers = [
        stdout.map(|p| tokio::spawn(read_pipe(p, out))),
        stderr.map(|p| tokio::spawn(read_pipe(p, err))),
    ];

    let mut status: Option<MainStatus> = None;
    let mut exited_at: Option<Instant> = None;
    let mut stopped: Option<StopReason> = None;
    loop {
        tokio::select! {
            event = sup.next_event() => match event {
                Event::MainEnded(st) => {
                    status = Some(st);
                    exited_at = Some(Instant::now());
                }
                Event::Finished => break,
            },
            // Stops and the timeout act only while the main process runs: one that arrives
            // after it ended on its own did not stop anything, and the outcome stays its own.
            changed = ctx.stop.changed(), if ctx.stop_open && stopped.is_none() && status.is_none() => {
                if changed.is_err() {
                    ctx.stop_open = false;
                } else {
                    stopped = *ctx.stop.borrow_and_update();
                }
                if let Some(r) = stopped {
                    note_stop(ctx, r).await;
                    sup.terminate().await;
                }
            }
            _ = tokio::time::sleep_until(ctx.deadline), if stopped.is_none() && status.is_none() => {
                stopped = Some(StopReason::Timeout);
                note_stop(ctx, StopReason::Timeout).await;
                sup.terminate().await;
            }
        }
    }
    if let Some(r) = stopped {
        ctx.stopped = Some(r);
    }
    // Read what is left of the output, but not forever (see the module doc).
    let drain_until = exited_at.unwrap_or_else(Instant::now) + DRAIN_DEADLINE;
    let mut cut = false;
    for r in readers.into_iter().flatten() {
        let abort = r.abort_handle();
        if tokio::time::timeout_at(drain_until, r).await.is_err() {
            abort.abort();
            cut = true;
        }
    }
    if cut {
        ctx.log
            .system(
                "stopped reading output: a background process still holds the build's output pipe",
            )
            .await;
    }
    sup.close().await;
    StepEnd {
        status: status.unwrap_or(MainStatus::Lost),
        stopped,
    }
}

/// Output on the `system` stream comes from git: hide credentials in URLs it prints. The
/// build's own output is its business and is kept as it is.
fn scrub(stream: Stream, line: Vec<u8>) -> Vec<u8> {
    if stream == Stream::System && line.windows(3).any(|w| w == b"://") {
        redact_credentials(&String::from_utf8_lossy(&line)).into_bytes()
    } else {
        line
    }
}

async fn read_pipe(mut pipe: impl AsyncRead + Unpin, sink: Sink) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut splitter = LineSplitter::default();
    let mut lines = Vec::new();
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match &sink {
            Sink::Log(log, stream) => {
                if log.truncated() {
                    // Past the cap: keep draining so the build never blocks, keep nothing.
                    continue;
                }
                splitter.feed(&buf[..n], |l| lines.push(l));
                for l in lines.drain(..) {
                    log.line(*stream, scrub(*stream, l)).await;
                }
            }
            Sink::Capture(v) => {
                if let Ok(mut v) = v.lock() {
                    let room = (64 * 1024usize).saturating_sub(v.len());
                    v.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
    }
    if let Sink::Log(log, stream) = &sink {
        splitter.finish(|l| lines.push(l));
        for l in lines.drain(..) {
            log.line(*stream, scrub(*stream, l)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_locks_are_removed_outside_objects() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path();
        std::fs::create_dir_all(m.join("refs/heads/feature")).unwrap();
        std::fs::create_dir_all(m.join("objects/pack")).unwrap();
        for f in [
            "packed-refs.lock",
            "refs/heads/main.lock",
            "refs/heads/feature/x.lock",
            "objects/pack/keep.lock",
            "HEAD",
        ] {
            std::fs::write(m.join(f), "").unwrap();
        }
        let mut removed: Vec<String> = remove_stale_locks(m)
            .iter()
            .map(|p| p.strip_prefix(m).unwrap().display().to_string())
            .collect();
        removed.sort();
        assert_eq!(
            removed,
            vec![
                "packed-refs.lock",
                "refs/heads/feature/x.lock",
                "refs/heads/main.lock"
            ]
        );
        assert!(m.join("objects/pack/keep.lock").exists() && m.join("HEAD").exists());
    }

    #[test]
    fn credentials_in_git_messages_are_redacted() {
        assert_eq!(
            redact_credentials(
                "fatal: unable to access 'https://bot:s3cr3t@git.example.com/a.git/': 403"
            ),
            "fatal: unable to access 'https://***@git.example.com/a.git/': 403"
        );
        assert_eq!(
            redact_credentials("from https://github.com/a/b and ssh://git@h:22/x"),
            "from https://github.com/a/b and ssh://***@h:22/x"
        );
        assert_eq!(redact_credentials("no url here"), "no url here");
        assert_eq!(redact_credentials("trailing ://"), "trailing ://");
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact_credentials("https://user:tok@github.com/a/b.git"),
            "https://***@github.com/a/b.git"
        );
        assert_eq!(
            redact_credentials("https://github.com/a/b.git"),
            "https://github.com/a/b.git"
        );
        assert_eq!(
            redact_credentials("git@github.com:a/b.git"),
            "git@github.com:a/b.git"
        );
        assert_eq!(redact_credentials("/srv/repo.git"), "/srv/repo.git");
    }
}
