//! The command line (SPEC §5): clap definitions, and the HTTP client behind the client
//! commands.
//!
//! Client commands talk to the running daemon's admin API at `server.listen` (an unspecified
//! address means loopback), or at `--url` / `$DEPLOYHOOK_URL`, with the token from the
//! `[api] token_file` or `$DEPLOYHOOK_TOKEN`. They print tables, or the API's `result` as JSON
//! with `--json`. Exit status: 0 success, 1 failed operation (one line on stderr), 2 bad usage.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Full};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::config::Config;
use crate::http::envelope::Envelope;
use crate::token::AdminToken;

#[derive(Parser, Debug)]
#[command(
    name = "deployhook",
    version,
    about = "Self-hosted deploy-hook daemon: trigger URLs, Git push webhooks, supervised builds."
)]
struct Cli {
    /// Config file.
    #[arg(
        long,
        global = true,
        env = "DEPLOYHOOK_CONFIG",
        default_value = "/etc/deployhook/deploy.toml"
    )]
    config: PathBuf,
    /// Daemon URL for client commands (default: from server.listen).
    #[arg(long, global = true, env = "DEPLOYHOOK_URL")]
    url: Option<String>,
    /// Print the API result as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon.
    Serve {
        /// Log line format on stderr: auto (text; no colours or timestamps under journald),
        /// text, or json.
        #[arg(
            long,
            value_enum,
            env = "DEPLOYHOOK_LOG_FORMAT",
            default_value_t = crate::daemon::LogFormat::Auto
        )]
        log_format: crate::daemon::LogFormat,
    },
    /// Validate the config and print a summary.
    Check {
        /// Print nothing when the config is valid (errors still go to stderr), e.g. for a
        /// unit's `ExecStartPre=`, which would otherwise put the summary in the journal at
        /// every start.
        #[arg(long)]
        quiet: bool,
    },
    /// Manage deploy hooks.
    #[command(subcommand)]
    Hooks(HooksCmd),
    /// Trigger a build through the API; prints its build_uuid.
    Trigger {
        /// Project name.
        project: String,
        /// Branch (default: the project's first).
        #[arg(long, conflicts_with = "tag")]
        branch: Option<String>,
        /// Tag to build instead of a branch (projects with `tags`).
        #[arg(long)]
        tag: Option<String>,
        /// Build exactly this commit (7 to 40 hex digits; projects with `repo`).
        #[arg(long)]
        commit: Option<String>,
        /// A trigger parameter NAME=VALUE (the project's `params`); repeatable.
        #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
        params: Vec<(String, String)>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Inspect and control builds.
    #[command(subcommand)]
    Builds(BuildsCmd),
    /// (v2) Notifications and commit statuses: recent deliveries, test sends.
    #[command(subcommand)]
    Notifications(notifications::NotificationsCmd),
}

#[derive(Subcommand, Debug)]
enum HooksCmd {
    /// Create a hook; prints its URL (shown only this once).
    Create {
        /// Project name.
        project: String,
        /// Hook name, unique in the project.
        #[arg(long)]
        name: String,
        /// Branch the hook builds (default: the project's first).
        #[arg(long)]
        branch: Option<String>,
        /// Let the hook fire on GET too (for senders that cannot POST; chat link previews
        /// fetch URLs with GET, so keep such a URL out of messages).
        #[arg(long)]
        allow_get: bool,
    },
    /// List hooks (of one project, or of all).
    List {
        /// Project name.
        project: Option<String>,
    },
    /// Delete a hook; its URL stops working at once.
    Delete {
        /// Project name.
        project: String,
        /// Hook id.
        hook_id: String,
    },
    /// Give a hook a new URL; prints it. The old one stops working at once.
    Rotate {
        /// Project name.
        project: String,
        /// Hook id.
        hook_id: String,
    },
}

#[derive(Subcommand, Debug)]
enum BuildsCmd {
    /// List builds, newest first (of one project, or of all).
    List {
        /// Project name.
        project: Option<String>,
        /// Only builds in this status (queued, initializing, running, stopped).
        #[arg(long)]
        status: Option<String>,
        /// How many (1 to 100).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show one build.
    Show {
        /// Build uuid.
        build_uuid: String,
    },
    /// Print a build's log.
    Logs {
        /// Build uuid.
        build_uuid: String,
        /// Keep printing until the build stops.
        #[arg(long)]
        follow: bool,
    },
    /// Cancel a build.
    Cancel {
        /// Build uuid.
        build_uuid: String,
    },
    /// Build the same commit (ref and params) again: roll back to an older build.
    Redeploy {
        /// Build uuid.
        build_uuid: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Wait for a build to stop (following supersedes); exit 0 only if it succeeded.
    Wait {
        /// Build uuid.
        build_uuid: String,
        /// How long to wait, e.g. 90s, 15m (default 1h); exit status 3 when it runs out.
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        timeout: Duration,
    },
}

/// `--wait [--follow] [--timeout D]` of the commands that create a build.
#[derive(clap::Args, Debug)]
struct WaitArgs {
    /// Wait for the build to stop (following supersedes); exit 0 only if it succeeded, 1 for
    /// any other outcome, 3 when the wait times out.
    #[arg(long)]
    wait: bool,
    /// With --wait: stream the build's log to stderr meanwhile.
    #[arg(long, requires = "wait")]
    follow: bool,
    /// With --wait: how long to wait, e.g. 90s, 15m (default 1h).
    #[arg(long, requires = "wait", value_parser = parse_duration, default_value = "1h")]
    timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d >= Duration::from_secs(1) => Ok(d),
        Ok(_) => Err("must be at least 1s".into()),
        Err(e) => Err(format!("{e} (use e.g. 90s, 15m, 1h)")),
    }
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if crate::config::valid_param_name(k) => Ok((k.to_owned(), v.to_owned())),
        Some((k, _)) if !k.is_empty() => Err(format!(
            "{k:?} is not a parameter name (a-z, 0-9 and '_', starting with a letter)"
        )),
        _ => Err("expected NAME=VALUE".into()),
    }
}

/// Why a client command ended early.
#[derive(Debug)]
enum Failure {
    /// The operation failed: one line on stderr, exit status 1.
    Op(String),
    /// A wait ran out before the build stopped: one line on stderr, exit status 3.
    WaitTimedOut(String),
    /// Whoever read stdout went away (`… | head`): stop quietly, exit status 0.
    StdoutClosed,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Op(e.to_string())
    }
}

/// `println!` for client output: a closed stdout ends the command quietly instead of
/// panicking, any other write error fails it.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                Failure::StdoutClosed
            } else {
                Failure::Op(format!("cannot write to stdout: {e}"))
            }
        })
    };
}

/// How long `serve` waits, once the daemon has stopped, for blocking tasks still running
/// (retention pruning, a stuck config read) before the process exits anyway.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the command line; `args` includes the program name.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match cli.cmd {
        Cmd::Check { quiet } => match Config::load(&cli.config) {
            Ok(_) if quiet => ExitCode::SUCCESS,
            Ok(c) => {
                // A closed stdout (`check | head -1`) is not a failure of the check.
                let _ = writeln!(std::io::stdout().lock(), "{}config OK", c.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Cmd::Serve { log_format } => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("deployhook: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            let result = rt.block_on(crate::daemon::run(&cli.config, log_format));
            // `run` has flushed the store. A blocking task may still hang (a SIGHUP reload
            // reading a config on a FIFO or a hung NFS mount); dropping the runtime would wait
            // for it forever, past systemd's `TimeoutStopSec`.
            rt.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
            match result {
                Ok(()) => ExitCode::SUCCESS,
                // Once logging is set up, the log is where the error goes (with its priority
                // under journald); before that (a bad config), stderr is all there is.
                Err(e)
                    if tracing::dispatcher::has_been_set()
                        && tracing::level_filters::LevelFilter::current()
                            >= tracing::level_filters::LevelFilter::ERROR =>
                {
                    tracing::error!("{e}");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("deployhook: {e}");
                    ExitCode::from(1)
                }
            }
        }
        _ => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("deployhook: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(client(cli)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(Failure::Op(m)) => {
                    eprintln!("deployhook: {m}");
                    ExitCode::from(1)
                }
                Err(Failure::WaitTimedOut(m)) => {
                    eprintln!("deployhook: {m}");
                    ExitCode::from(3)
                }
                Err(Failure::StdoutClosed) => ExitCode::SUCCESS,
            }
        }
    }
}

/// Where and how to reach the daemon.
#[derive(Clone)]
struct Client {
    /// `host:port` to connect to.
    authority: String,
    /// Path prefix of the URL (usually empty).
    prefix: String,
    /// The URL as given, for messages.
    url: String,
    token: String,
}

impl Client {
    fn new(cli: &Cli) -> Result<Client, Failure> {
        let env_token = std::env::var("DEPLOYHOOK_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty());
        let config = if cli.url.is_some() && env_token.is_some() {
            None
        } else {
            Some(Config::load(&cli.config).map_err(|e| {
                Failure::Op(format!(
                    "{e} (client commands read the daemon's address and token from the config; --config, --url and $DEPLOYHOOK_TOKEN set them)"
                ))
            })?)
        };
        let url = match (&cli.url, &config) {
            (Some(u), _) => u.trim_end_matches('/').to_owned(),
            (None, Some(c)) => format!("http://{}", c.client_addr()),
            (None, None) => unreachable!("config is loaded unless --url is given"),
        };
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            Failure::Op(format!(
                "unsupported URL {url:?}: client commands speak plain http:// to the daemon's own listen address"
            ))
        })?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (rest[..i].to_owned(), rest[i..].to_owned()),
            None => (rest.to_owned(), String::new()),
        };
        if authority.is_empty() {
            return Err(Failure::Op(format!("invalid URL {url:?}")));
        }
        let token = match (env_token, &config) {
            (Some(t), _) => t.trim().to_owned(),
            (None, Some(c)) => AdminToken::read(&c.api.token_file).map_err(|e| {
                Failure::Op(format!(
                    "{e} (set $DEPLOYHOOK_TOKEN if this user cannot read it)"
                ))
            })?,
            (None, None) => unreachable!("config is loaded unless $DEPLOYHOOK_TOKEN is set"),
        };
        Ok(Client {
            authority,
            prefix,
            url,
            token,
        })
    }

    async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, Failure> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Failure::Op(format!(
                "cannot reach deployhook at {}: {e} — is `deployhook serve` running?",
                self.url
            ))
        };
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| unreachable(&"connection timed out"))?
        .map_err(|e| {
            let msg = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                "connection refused".to_owned()
            } else {
                e.to_string()
            };
            unreachable(&msg)
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let body_bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.prefix, path))
            .header(http::header::HOST, &self.authority)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(
                http::header::USER_AGENT,
                concat!("deployhook/", env!("CARGO_PKG_VERSION")),
            );
        if !body_bytes.is_empty() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body_bytes))?;
        sender.send_request(req).await.map_err(|e| unreachable(&e))
    }

    /// Sends a request and returns the `result` of its success envelope, or fails with the
    /// API's own error message.
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = tokio::time::timeout(Duration::from_secs(120), resp.into_body().collect())
            .await
            .map_err(|_| Failure::Op("the daemon did not finish its answer in time".into()))??
            .to_bytes();
        let envelope: Envelope<Value> = serde_json::from_slice(&bytes).map_err(|_| {
            Failure::Op(format!(
                "unexpected answer from {} (HTTP {status}): not deployhook?",
                self.url
            ))
        })?;
        if !envelope.success {
            return Err(Failure::Op(format!(
                "{} (HTTP {})",
                first_error(&envelope),
                status.as_u16()
            )));
        }
        Ok(envelope.result)
    }
}

/// The message of an error envelope.
fn first_error<R>(envelope: &Envelope<R>) -> &str {
    envelope
        .errors
        .first()
        .map_or("request failed", |e| e.message.as_str())
}

/// A typed view of (part of) a `result`, for the fields a table or a line prints. The `result`
/// itself stays a `Value` so that `--json` prints it whole, in the API's field order.
fn view<T: DeserializeOwned>(v: &Value) -> Result<T, Failure> {
    T::deserialize(v).map_err(|e| Failure::Op(format!("unexpected answer from deployhook: {e}")))
}

/// `-` for a missing or null field, as the tables print it.
fn dash<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), T::to_string)
}

/// A hook as `hooks list` prints it.
#[derive(Deserialize)]
struct HookRow {
    id: Option<String>,
    name: Option<String>,
    branch: Option<String>,
    trigger_count: Option<u64>,
    last_triggered_on: Option<String>,
}

/// The answer to creating or rotating a hook: its URL, shown only then.
#[derive(Deserialize)]
struct HookUrl {
    url: Option<String>,
}

/// A build as `builds list` prints it.
#[derive(Deserialize)]
struct BuildRow {
    build_uuid: Option<String>,
    project: Option<String>,
    branch: Option<String>,
    status: Option<String>,
    build_outcome: Option<String>,
    build_trigger_source: Option<String>,
    created_on: Option<String>,
}

impl BuildRow {
    /// The outcome of a stopped build, else its status.
    fn state(&self) -> String {
        dash(&self.build_outcome.clone().or_else(|| self.status.clone()))
    }
}

/// A build as `builds show` and `builds cancel` print it.
#[derive(Deserialize)]
struct BuildView {
    build_uuid: Option<String>,
    project: Option<String>,
    branch: Option<String>,
    status: Option<String>,
    build_outcome: Option<String>,
    exit_code: Option<i64>,
    commit: Option<String>,
    requested_commit: Option<String>,
    build_trigger_source: Option<String>,
    created_on: Option<String>,
    initializing_on: Option<String>,
    running_on: Option<String>,
    stopped_on: Option<String>,
    cancel_reason: Option<String>,
    superseded_by: Option<String>,
    trigger: Option<TriggerView>,
}

#[derive(Deserialize)]
struct TriggerView {
    hook_name: Option<String>,
}

/// The answer to a trigger, as `trigger` prints it.
#[derive(Deserialize)]
struct TriggeredView {
    build_uuid: Option<String>,
    #[serde(default)]
    already_exists: bool,
}

/// A project, for the commands that go over all of them.
#[derive(Deserialize)]
struct ProjectName {
    name: String,
}

/// One page of `GET /api/builds/{uuid}/logs`.
#[derive(Deserialize)]
struct LogPage {
    #[serde(default)]
    lines: Vec<Value>,
    next_cursor: Option<u64>,
    #[serde(default)]
    done: bool,
}

/// One log line, for the text output.
#[derive(Deserialize)]
struct LogLine {
    stream: Option<String>,
    line: Option<String>,
}

fn print_json(v: &Value) -> Result<(), Failure> {
    outln!("{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

/// Prints rows as aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> Result<(), Failure> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        outln!("{}", out.trim_end())
    };
    line(header.iter().map(|h| h.to_string()).collect())?;
    for r in rows {
        line(r.clone())?;
    }
    Ok(())
}

fn enc(s: &str) -> String {
    // Path segments we send are project names, ids and uuids; anything else is escaped so it
    // cannot change the path.
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Runs a client command (everything but `serve` and `check`).
async fn client(cli: Cli) -> Result<(), Failure> {
    let c = Client::new(&cli)?;
    let json = cli.json;
    match cli.cmd {
        Cmd::Serve { .. } | Cmd::Check { .. } => unreachable!("handled in main"),
        Cmd::Hooks(cmd) => hooks(&c, cmd, json).await,
        Cmd::Trigger {
            project,
            branch,
            tag,
            commit,
            params,
            wait,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(b) = branch {
                body.insert("branch".into(), b.into());
            }
            if let Some(t) = tag {
                body.insert("tag".into(), t.into());
            }
            if let Some(c) = commit {
                body.insert("commit".into(), c.into());
            }
            if !params.is_empty() {
                let params: serde_json::Map<String, Value> = params
                    .into_iter()
                    .map(|(k, v)| (k, Value::from(v)))
                    .collect();
                body.insert("params".into(), params.into());
            }
            let path = format!("/api/projects/{}/builds", enc(&project));
            trigger(&c, &path, Some(Value::Object(body)), &wait, json).await
        }
        Cmd::Builds(cmd) => builds(&c, cmd, json).await,
        Cmd::Notifications(cmd) => notifications::run(&c, cmd, json).await,
    }
}

/// `deployhook hooks …`.
async fn hooks(c: &Client, cmd: HooksCmd, json: bool) -> Result<(), Failure> {
    use http::Method;
    match cmd {
        HooksCmd::Create {
            project,
            name,
            branch,
            allow_get,
        } => {
            let mut body = json!({"name": name});
            if let Some(b) = branch {
                body["branch"] = Value::String(b);
            }
            if allow_get {
                body["allow_get"] = Value::Bool(true);
            }
            let path = format!("/api/projects/{}/hooks", enc(&project));
            let r = c.call(Method::POST, &path, Some(body)).await?;
            print_hook_url(&r, json)
        }
        HooksCmd::Rotate { project, hook_id } => {
            let path = format!(
                "/api/projects/{}/hooks/{}/rotate",
                enc(&project),
                enc(&hook_id)
            );
            let r = c.call(Method::POST, &path, None).await?;
            print_hook_url(&r, json)
        }
        HooksCmd::Delete { project, hook_id } => {
            let path = format!("/api/projects/{}/hooks/{}", enc(&project), enc(&hook_id));
            let r = c.call(Method::DELETE, &path, None).await?;
            if json {
                return print_json(&r);
            }
            let h: HookRow = view(&r)?;
            outln!("deleted hook {} ({})", dash(&h.id), dash(&h.name))
        }
        HooksCmd::List { project } => list_hooks(c, project, json).await,
    }
}

fn print_hook_url(r: &Value, json: bool) -> Result<(), Failure> {
    if json {
        return print_json(r);
    }
    let h: HookUrl = view(r)?;
    outln!("{}", dash(&h.url))
}

async fn list_hooks(c: &Client, project: Option<String>, json: bool) -> Result<(), Failure> {
    let projects = match project {
        Some(p) => vec![p],
        None => project_names(c).await?,
    };
    let mut all = Vec::new();
    let mut rows = Vec::new();
    for p in &projects {
        let path = format!("/api/projects/{}/hooks", enc(p));
        let hooks: Vec<Value> = view(&c.call(http::Method::GET, &path, None).await?)?;
        for mut h in hooks {
            let row: HookRow = view(&h)?;
            rows.push(vec![
                p.clone(),
                dash(&row.id),
                dash(&row.name),
                dash(&row.branch),
                dash(&row.trigger_count),
                dash(&row.last_triggered_on),
            ]);
            h["project"] = Value::String(p.clone());
            all.push(h);
        }
    }
    if json {
        return print_json(&Value::Array(all));
    }
    table(
        &[
            "PROJECT",
            "ID",
            "NAME",
            "BRANCH",
            "TRIGGERS",
            "LAST TRIGGERED",
        ],
        &rows,
    )
}

/// `deployhook trigger` and `builds redeploy`: creates (or joins) a build, prints its uuid at
/// once, and with `--wait` waits for its outcome.
async fn trigger(
    c: &Client,
    path: &str,
    body: Option<Value>,
    wait: &WaitArgs,
    json: bool,
) -> Result<(), Failure> {
    let r = c.call(http::Method::POST, path, body).await?;
    if json {
        print_json(&r)?;
    }
    let t: TriggeredView = view(&r)?;
    let id = t
        .build_uuid
        .ok_or_else(|| Failure::Op("the daemon's answer names no build".into()))?;
    if !json {
        outln!("{id}")?;
    }
    if t.already_exists {
        eprintln!("(joined a build that was already pending)");
    }
    if wait.wait {
        wait_for(c, &id, wait.timeout, wait.follow, false).await?;
    }
    Ok(())
}

/// One `GET /api/builds/{id}/wait`: the HTTP status and the envelope (whose `result` is the
/// build in every row of SPEC §4.3's table).
async fn wait_once(c: &Client, id: &str, secs: u64) -> Result<(u16, Envelope<Value>), Failure> {
    let path = format!("/api/builds/{}/wait?timeout={secs}", enc(id));
    let resp = c.send(http::Method::GET, &path, None).await?;
    let status = resp.status().as_u16();
    let bytes = tokio::time::timeout(Duration::from_secs(secs + 60), resp.into_body().collect())
        .await
        .map_err(|_| Failure::Op("the daemon did not finish its answer in time".into()))??
        .to_bytes();
    let envelope: Envelope<Value> = serde_json::from_slice(&bytes)
        .map_err(|_| Failure::Op(format!("unexpected answer from {} (HTTP {status})", c.url)))?;
    Ok((status, envelope))
}

/// Waits for build `id` (following supersedes) for up to `timeout`, streaming its log to
/// stderr with `follow`; with `print_json` the final build goes to stdout as JSON. Ok only
/// when the (followed) build succeeded.
async fn wait_for(
    c: &Client,
    id: &str,
    timeout: Duration,
    follow: bool,
    print_json_result: bool,
) -> Result<(), Failure> {
    let logs = follow.then(|| {
        let (c, id) = (c.clone(), id.to_owned());
        tokio::spawn(async move { stream_log_to_stderr(&c, &id).await })
    });
    let deadline = tokio::time::Instant::now() + timeout;
    let mut current = id.to_owned();
    let (status, envelope) = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let secs = left.as_secs().clamp(1, 3600);
        let (status, envelope) = wait_once(c, &current, secs).await?;
        let b: BuildView = view(&envelope.result)?;
        if status != 202 || tokio::time::Instant::now() >= deadline {
            break (status, envelope);
        }
        if let Some(next) = b.build_uuid {
            current = next;
        }
    };
    let b: BuildView = view(&envelope.result)?;
    let final_id = b.build_uuid.clone().unwrap_or_else(|| current.clone());
    if let Some(task) = logs {
        if status == 202 {
            task.abort();
        } else {
            let _ = task.await;
            if final_id != id {
                // The wait followed a supersede: show the build that shipped the code.
                eprintln!("[deployhook] build {id} was superseded by build {final_id}:");
                stream_log_to_stderr(c, &final_id).await;
            }
        }
    }
    if final_id != id && !follow {
        eprintln!("build {id} was superseded; followed it to build {final_id}");
    }
    if print_json_result {
        print_json(&envelope.result)?;
    }
    match status {
        200 => {
            eprintln!("build {final_id}: outcome success");
            Ok(())
        }
        202 => Err(Failure::WaitTimedOut(format!(
            "build {final_id} is still {} after {}",
            b.status.as_deref().unwrap_or("running"),
            humantime::format_duration(timeout)
        ))),
        422 | 409 | 503 if envelope.result.is_object() => {
            Err(Failure::Op(first_error(&envelope).to_owned()))
        }
        _ => Err(Failure::Op(format!(
            "{} (HTTP {status})",
            first_error(&envelope)
        ))),
    }
}

/// Streams a build's log (NDJSON follow) to stderr until it stops; errors end it quietly
/// (the log is a convenience beside the wait, which decides the exit status).
async fn stream_log_to_stderr(c: &Client, id: &str) {
    let path = format!("/api/builds/{}/logs?follow=true", enc(id));
    let Ok(resp) = c.send(http::Method::GET, &path, None).await else {
        return;
    };
    if !resp.status().is_success() {
        return;
    }
    let mut body = resp.into_body();
    let mut pending = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            pending.extend_from_slice(&data);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                if let Ok(l) = serde_json::from_slice::<LogLine>(&line) {
                    let prefix = if l.stream.as_deref() == Some("system") {
                        "[deployhook] "
                    } else {
                        ""
                    };
                    eprintln!("{prefix}{}", dash(&l.line));
                }
            }
        }
    }
}

/// `deployhook builds …`.
async fn builds(c: &Client, cmd: BuildsCmd, json: bool) -> Result<(), Failure> {
    use http::Method;
    match cmd {
        BuildsCmd::List {
            project,
            status,
            limit,
        } => list_builds(c, project, status, limit, json).await,
        BuildsCmd::Show { build_uuid } => {
            let path = format!("/api/builds/{}", enc(&build_uuid));
            show_build(&c.call(Method::GET, &path, None).await?, json)
        }
        BuildsCmd::Cancel { build_uuid } => {
            let path = format!("/api/builds/{}/cancel", enc(&build_uuid));
            show_build(&c.call(Method::POST, &path, None).await?, json)
        }
        BuildsCmd::Redeploy { build_uuid, wait } => {
            let path = format!("/api/builds/{}/redeploy", enc(&build_uuid));
            trigger(c, &path, None, &wait, json).await
        }
        BuildsCmd::Wait {
            build_uuid,
            timeout,
        } => wait_for(c, &build_uuid, timeout, false, json).await,
        BuildsCmd::Logs {
            build_uuid,
            follow: true,
        } => follow_logs(c, &build_uuid, json).await,
        BuildsCmd::Logs {
            build_uuid,
            follow: false,
        } => print_logs(c, &build_uuid, json).await,
    }
}

async fn list_builds(
    c: &Client,
    project: Option<String>,
    status: Option<String>,
    limit: u32,
    json: bool,
) -> Result<(), Failure> {
    let projects = match project {
        Some(p) => vec![p],
        None => project_names(c).await?,
    };
    let mut q = format!("limit={limit}");
    if let Some(st) = &status {
        q.push_str(&format!("&status={}", enc(st)));
    }
    let mut all: Vec<(BuildRow, Value)> = Vec::new();
    for p in &projects {
        let path = format!("/api/projects/{}/builds?{q}", enc(p));
        let builds: Vec<Value> = view(&c.call(http::Method::GET, &path, None).await?)?;
        for b in builds {
            all.push((view(&b)?, b));
        }
    }
    // Newest first across projects (RFC 3339 UTC strings sort by time).
    all.sort_by_key(|(b, _)| std::cmp::Reverse(dash(&b.created_on)));
    all.truncate(limit as usize);
    if json {
        return print_json(&Value::Array(all.into_iter().map(|(_, v)| v).collect()));
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|(b, _)| {
            vec![
                dash(&b.build_uuid),
                dash(&b.project),
                dash(&b.branch),
                b.state(),
                dash(&b.build_trigger_source),
                dash(&b.created_on),
            ]
        })
        .collect();
    table(
        &["BUILD", "PROJECT", "BRANCH", "STATUS", "TRIGGER", "CREATED"],
        &rows,
    )
}

async fn project_names(c: &Client) -> Result<Vec<String>, Failure> {
    let projects: Vec<ProjectName> =
        view(&c.call(http::Method::GET, "/api/projects", None).await?)?;
    Ok(projects.into_iter().map(|p| p.name).collect())
}

fn show_build(b: &Value, json: bool) -> Result<(), Failure> {
    if json {
        return print_json(b);
    }
    let v: BuildView = view(b)?;
    for (key, value) in [
        ("build_uuid", dash(&v.build_uuid)),
        ("project", dash(&v.project)),
        ("branch", dash(&v.branch)),
        ("status", dash(&v.status)),
        ("build_outcome", dash(&v.build_outcome)),
        ("exit_code", dash(&v.exit_code)),
        ("commit", dash(&v.commit)),
        ("requested_commit", dash(&v.requested_commit)),
        ("build_trigger_source", dash(&v.build_trigger_source)),
        ("created_on", dash(&v.created_on)),
        ("initializing_on", dash(&v.initializing_on)),
        ("running_on", dash(&v.running_on)),
        ("stopped_on", dash(&v.stopped_on)),
        ("cancel_reason", dash(&v.cancel_reason)),
        ("superseded_by", dash(&v.superseded_by)),
    ] {
        outln!("{key:<22}{value}")?;
    }
    if let Some(name) = v.trigger.and_then(|t| t.hook_name) {
        outln!("{:<22}{name}", "hook")?;
    }
    Ok(())
}

fn print_log_line(l: &Value, json: bool) -> Result<(), Failure> {
    if json {
        return outln!("{l}");
    }
    let l: LogLine = view(l)?;
    if l.stream.as_deref() == Some("system") {
        outln!("[deployhook] {}", dash(&l.line))
    } else {
        outln!("{}", dash(&l.line))
    }
}

/// `builds logs` without `--follow`: every page from the start, until the end of the log.
async fn print_logs(c: &Client, id: &str, json: bool) -> Result<(), Failure> {
    let mut cursor = 0u64;
    loop {
        let path = format!("/api/builds/{}/logs?cursor={cursor}", enc(id));
        let page: LogPage = view(&c.call(http::Method::GET, &path, None).await?)?;
        for l in &page.lines {
            print_log_line(l, json)?;
        }
        cursor = page.next_cursor.unwrap_or(cursor);
        if page.lines.is_empty() || page.done {
            return Ok(());
        }
    }
}

async fn follow_logs(c: &Client, id: &str, json: bool) -> Result<(), Failure> {
    let resp = c
        .send(
            http::Method::GET,
            &format!("/api/builds/{}/logs?follow=true", enc(id)),
            None,
        )
        .await?;
    if !resp.status().is_success() {
        let bytes = resp.into_body().collect().await?.to_bytes();
        let msg = serde_json::from_slice::<Envelope<Value>>(&bytes)
            .map(|e| first_error(&e).to_owned())
            .unwrap_or_else(|_| "request failed".to_owned());
        return Err(Failure::Op(msg));
    }
    let mut body = resp.into_body();
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            pending.extend_from_slice(&data);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                    print_log_line(&v, json)?;
                }
            }
        }
    }
    Ok(())
}

mod notifications;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelopes_give_their_first_message() {
        let e: Envelope<Value> = serde_json::from_str(
            r#"{"success":false,"errors":[{"code":1409,"message":"busy"}],"messages":[],"result":null}"#,
        )
        .unwrap();
        assert_eq!(first_error(&e), "busy");
        let e: Envelope<Value> =
            serde_json::from_str(r#"{"success":false,"errors":[],"messages":[],"result":null}"#)
                .unwrap();
        assert_eq!(first_error(&e), "request failed");
        // Not an envelope at all (another server on that port).
        assert!(serde_json::from_str::<Envelope<Value>>(r#"{"status":"ok"}"#).is_err());
    }

    #[test]
    fn rows_print_dashes_for_null_and_the_outcome_over_the_status() {
        let b: BuildRow = view(&json!({
            "build_uuid": "u", "project": "p", "branch": "main", "status": "stopped",
            "build_outcome": "success", "build_trigger_source": "api", "created_on": null
        }))
        .unwrap();
        assert_eq!(b.state(), "success");
        assert_eq!(dash(&b.created_on), "-");
        let b: BuildRow = view(&json!({"status": "queued", "build_outcome": null})).unwrap();
        assert_eq!(b.state(), "queued");
        let h: HookRow = view(&json!({"id": "h", "trigger_count": 3})).unwrap();
        assert_eq!(
            (dash(&h.trigger_count), dash(&h.last_triggered_on)),
            ("3".into(), "-".into())
        );
        assert!(view::<HookRow>(&json!({"trigger_count": "three"})).is_err());
    }
}
