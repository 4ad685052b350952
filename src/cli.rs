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
use serde_json::{Value, json};

use crate::config::Config;
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
    Check,
    /// Manage deploy hooks.
    #[command(subcommand)]
    Hooks(HooksCmd),
    /// Trigger a build through the API; prints its build_uuid.
    Trigger {
        /// Project name.
        project: String,
        /// Branch (default: the project's first).
        #[arg(long)]
        branch: Option<String>,
    },
    /// Inspect and control builds.
    #[command(subcommand)]
    Builds(BuildsCmd),
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
}

/// Why a client command ended early.
#[derive(Debug)]
enum Failure {
    /// The operation failed: one line on stderr, exit status 1.
    Op(String),
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
        Cmd::Check => match Config::load(&cli.config) {
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
            let tunables = match crate::tunables::Tunables::from_env() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("deployhook: {e}");
                    return ExitCode::from(1);
                }
            };
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
            let result = rt.block_on(crate::daemon::run(&cli.config, log_format, tunables));
            // `run` has flushed the store. A blocking task may still hang (a SIGHUP reload
            // reading a config on a FIFO or a hung NFS mount); dropping the runtime would wait
            // for it forever, past systemd's `TimeoutStopSec`: it gets
            // `runtime_shutdown_timeout` (retention pruning, a stuck config read).
            rt.shutdown_timeout(tunables.runtime_shutdown_timeout);
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
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
                Err(Failure::StdoutClosed) => ExitCode::SUCCESS,
            }
        }
    }
}

/// Where and how to reach the daemon.
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

    /// Sends a request and returns the envelope, failing with the API's error message.
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
        let v: Value = serde_json::from_slice(&bytes).map_err(|_| {
            Failure::Op(format!(
                "unexpected answer from {} (HTTP {status}): not deployhook?",
                self.url
            ))
        })?;
        if v["success"] != Value::Bool(true) {
            let msg = v["errors"][0]["message"]
                .as_str()
                .unwrap_or("request failed");
            return Err(Failure::Op(format!("{msg} (HTTP {})", status.as_u16())));
        }
        Ok(v)
    }
}

fn print_json(v: &Value) -> Result<(), Failure> {
    outln!("{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
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

fn outcome(b: &Value) -> String {
    match b["build_outcome"].as_str() {
        Some(o) => o.to_owned(),
        None => s(&b["status"]),
    }
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

async fn client(cli: Cli) -> Result<(), Failure> {
    let c = Client::new(&cli)?;
    let json = cli.json;
    use http::Method;
    match cli.cmd {
        Cmd::Serve { .. } | Cmd::Check => unreachable!("handled in main"),
        Cmd::Hooks(HooksCmd::Create {
            project,
            name,
            branch,
        }) => {
            let mut body = json!({"name": name});
            if let Some(b) = branch {
                body["branch"] = Value::String(b);
            }
            let v = c
                .call(
                    Method::POST,
                    &format!("/api/projects/{}/hooks", enc(&project)),
                    Some(body),
                )
                .await?;
            if json {
                print_json(&v["result"])?;
            } else {
                outln!("{}", s(&v["result"]["url"]))?;
            }
        }
        Cmd::Hooks(HooksCmd::Rotate { project, hook_id }) => {
            let v = c
                .call(
                    Method::POST,
                    &format!(
                        "/api/projects/{}/hooks/{}/rotate",
                        enc(&project),
                        enc(&hook_id)
                    ),
                    None,
                )
                .await?;
            if json {
                print_json(&v["result"])?;
            } else {
                outln!("{}", s(&v["result"]["url"]))?;
            }
        }
        Cmd::Hooks(HooksCmd::Delete { project, hook_id }) => {
            let v = c
                .call(
                    Method::DELETE,
                    &format!("/api/projects/{}/hooks/{}", enc(&project), enc(&hook_id)),
                    None,
                )
                .await?;
            if json {
                print_json(&v["result"])?;
            } else {
                outln!(
                    "deleted hook {} ({})",
                    s(&v["result"]["id"]),
                    s(&v["result"]["name"])
                )?;
            }
        }
        Cmd::Hooks(HooksCmd::List { project }) => {
            let projects = match project {
                Some(p) => vec![p],
                None => project_names(&c).await?,
            };
            let mut all = Vec::new();
            for p in &projects {
                let v = c
                    .call(
                        Method::GET,
                        &format!("/api/projects/{}/hooks", enc(p)),
                        None,
                    )
                    .await?;
                for h in v["result"].as_array().cloned().unwrap_or_default() {
                    let mut h = h;
                    h["project"] = Value::String(p.clone());
                    all.push(h);
                }
            }
            if json {
                print_json(&Value::Array(all))?;
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|h| {
                        vec![
                            s(&h["project"]),
                            s(&h["id"]),
                            s(&h["name"]),
                            s(&h["branch"]),
                            s(&h["trigger_count"]),
                            s(&h["last_triggered_on"]),
                        ]
                    })
                    .collect();
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
                )?;
            }
        }
        Cmd::Trigger { project, branch } => {
            let body = branch.map(|b| json!({"branch": b}));
            let v = c
                .call(
                    Method::POST,
                    &format!("/api/projects/{}/builds", enc(&project)),
                    body,
                )
                .await?;
            if json {
                print_json(&v["result"])?;
            } else {
                outln!("{}", s(&v["result"]["build_uuid"]))?;
                if v["result"]["already_exists"] == Value::Bool(true) {
                    eprintln!("(joined a build that was already pending)");
                }
            }
        }
        Cmd::Builds(BuildsCmd::List {
            project,
            status,
            limit,
        }) => {
            let projects = match project {
                Some(p) => vec![p],
                None => project_names(&c).await?,
            };
            let mut q = format!("limit={limit}");
            if let Some(st) = &status {
                q.push_str(&format!("&status={}", enc(st)));
            }
            let mut all = Vec::new();
            for p in &projects {
                let v = c
                    .call(
                        Method::GET,
                        &format!("/api/projects/{}/builds?{q}", enc(p)),
                        None,
                    )
                    .await?;
                all.extend(v["result"].as_array().cloned().unwrap_or_default());
            }
            all.sort_by(|a, b| s(&b["created_on"]).cmp(&s(&a["created_on"])));
            all.truncate(limit as usize);
            if json {
                print_json(&Value::Array(all))?;
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|b| {
                        vec![
                            s(&b["build_uuid"]),
                            s(&b["project"]),
                            s(&b["branch"]),
                            outcome(b),
                            s(&b["build_trigger_source"]),
                            s(&b["created_on"]),
                        ]
                    })
                    .collect();
                table(
                    &["BUILD", "PROJECT", "BRANCH", "STATUS", "TRIGGER", "CREATED"],
                    &rows,
                )?;
            }
        }
        Cmd::Builds(BuildsCmd::Show { build_uuid }) => {
            let v = c
                .call(
                    Method::GET,
                    &format!("/api/builds/{}", enc(&build_uuid)),
                    None,
                )
                .await?;
            show_build(&v["result"], json)?;
        }
        Cmd::Builds(BuildsCmd::Cancel { build_uuid }) => {
            let v = c
                .call(
                    Method::POST,
                    &format!("/api/builds/{}/cancel", enc(&build_uuid)),
                    None,
                )
                .await?;
            show_build(&v["result"], json)?;
        }
        Cmd::Builds(BuildsCmd::Logs { build_uuid, follow }) => {
            if follow {
                follow_logs(&c, &build_uuid, json).await?;
            } else {
                let mut cursor = 0u64;
                loop {
                    let v = c
                        .call(
                            Method::GET,
                            &format!("/api/builds/{}/logs?cursor={cursor}", enc(&build_uuid)),
                            None,
                        )
                        .await?;
                    let r = &v["result"];
                    let lines = r["lines"].as_array().cloned().unwrap_or_default();
                    for l in &lines {
                        print_log_line(l, json)?;
                    }
                    cursor = r["next_cursor"].as_u64().unwrap_or(cursor);
                    if lines.is_empty() || r["done"] == Value::Bool(true) {
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}

async fn project_names(c: &Client) -> Result<Vec<String>, Failure> {
    let v = c.call(http::Method::GET, "/api/projects", None).await?;
    Ok(v["result"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

fn show_build(b: &Value, json: bool) -> Result<(), Failure> {
    if json {
        return print_json(b);
    }
    for key in [
        "build_uuid",
        "project",
        "branch",
        "status",
        "build_outcome",
        "exit_code",
        "commit",
        "requested_commit",
        "build_trigger_source",
        "created_on",
        "initializing_on",
        "running_on",
        "stopped_on",
        "cancel_reason",
        "superseded_by",
    ] {
        outln!("{key:<22}{}", s(&b[key]))?;
    }
    if let Some(name) = b["trigger"]["hook_name"].as_str() {
        outln!("{:<22}{name}", "hook")?;
    }
    Ok(())
}

fn print_log_line(l: &Value, json: bool) -> Result<(), Failure> {
    if json {
        outln!("{l}")
    } else if l["stream"] == "system" {
        outln!("[deployhook] {}", s(&l["line"]))
    } else {
        outln!("{}", s(&l["line"]))
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
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let msg = v["errors"][0]["message"]
            .as_str()
            .unwrap_or("request failed");
        return Err(Failure::Op(msg.to_owned()));
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
