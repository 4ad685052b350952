//! Benchmark: deployhook side by side with the machine's limit and adnanh/webhook (issue 7).
//!
//! ```sh
//! cargo build --release --bins --examples && target/release/examples/bench [--duration 5] [--connections 64]
//! ```
//!
//! It starts `target/release/deployhook serve` (the binary next to this example's directory)
//! on a temp state dir and loopback port, `examples/bare_hyper` (built beside this program) as
//! the baseline, and `webhook` from `PATH` when installed (it installs nothing), and drives
//! each with its own hyper 1.x load client: N keep-alive connections, a fixed duration (after a
//! short warm-up that is not counted), loopback only, every latency kept for exact
//! percentiles. One run measures:
//!
//! * **bare hyper**: the same JSON answer with nothing behind it (the machine's limit);
//! * **webhook**: an unknown hook id (404) and a hook whose trigger rule never matches (no exec);
//! * **(a) hot path**: one hook whose build is pending (held queued behind a sleeping build of
//!   the same project), so every answer is `already_exists: true`;
//! * **(b) unknown-token 404s** (well-formed tokens, so the database is asked);
//! * **(c) new builds**: every request fires a different hook of a different (project, branch),
//!   so none is deduplicated; each answer comes after the build is flushed to disk. The builds
//!   queue behind a sleeping `hold` build per project while this is measured (taking builds is
//!   measured, not running them), then are released and must all run;
//! * **(d) POST→exec latency** of a build, builds one after another, against bare spawns;
//! * **(e) RSS** of the daemon: idle after start, peak (`VmHWM`) and after the load;
//! * **(f) the hot path again** with 100 000 hooks in the store (created through the API; how
//!   long that took is printed), in a daemon restarted on that store, and for reference in the
//!   same process right after the bursts of creating them and of (c).
//!
//! * **wrk** (when on `PATH`): bare hyper, (a), (b) and webhook's unknown hook again, under
//!   `wrk -t2 -c64 -d6s` with a CMS's publish webhook (JSON body and its headers, from a Lua
//!   script written to the temp dir), `--wrk-rounds` interleaved rounds, medians; (f) and (g)
//!   each interleaved with bare hyper again. The targets are judged on these;
//! * **(e) memory that comes back**: after (c), the hook creation and a burst of
//!   `--burst-connections` connections open at once, RSS after `--idle-seconds` of idle;
//! * **(g) 1 000 000 hooks** (`--million-hooks`), written straight into the stopped daemon's
//!   store: start-up time, idle RSS and the hot path.
//!
//! Bare hyper, webhook, (a) and (b) are measured interleaved in `--rounds` slices, so that
//! drift in the machine's other load hits them alike. At the end it checks correctness:
//! every response that announced a new build (`already_exists: false`) names a distinct build
//! that the API lists and that ran to success.
//!
//! Only ratios within one run mean anything: the client and the servers share the cores.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// Command-line options.
#[derive(Parser, Debug)]
#[command(about = "deployhook vs bare hyper vs adnanh/webhook, loopback only")]
struct Args {
    /// Seconds each load phase is measured (after a warm-up of a tenth of it).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Slices each of the five request kinds is measured in, interleaved.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Keep-alive connections of the load client.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Worker threads of the load client's runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Hooks in the store for phase (f).
    #[arg(long, default_value_t = 100_000)]
    hooks: usize,
    /// Distinct (project, branch) pairs for phase (c): at most this many new builds.
    #[arg(long, default_value_t = 20_000)]
    new_build_pairs: usize,
    /// Sequential builds timed in phase (d).
    #[arg(long, default_value_t = 200)]
    latency_builds: usize,
    /// Skip adnanh/webhook even if it is installed.
    #[arg(long)]
    no_webhook: bool,
    /// Skip the measurements with wrk even if it is installed.
    #[arg(long)]
    no_wrk: bool,
    /// Seconds of each wrk run.
    #[arg(long, default_value_t = 6)]
    wrk_seconds: u64,
    /// Interleaved rounds of wrk runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    wrk_rounds: usize,
    /// wrk's threads (`-t`).
    #[arg(long, default_value_t = 2)]
    wrk_threads: usize,
    /// wrk's connections (`-c`).
    #[arg(long, default_value_t = 64)]
    wrk_connections: usize,
    /// Connections opened at once in the connection burst before the idle RSS is measured.
    #[arg(long, default_value_t = 10_000)]
    burst_connections: usize,
    /// Seconds the daemon idles after the bursts before its RSS is read again.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Hooks in the store for the last phase (written straight into the store while the
    /// daemon is stopped; 0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    million_hooks: usize,
    /// The deployhook binary to measure (default: `target/release/deployhook`).
    #[arg(long)]
    deployhook: Option<PathBuf>,
    /// Only the interleaved wrk rounds of bare hyper, the hot path, the 404 path and
    /// webhook's 404 (about a minute): for trying a change, not for the README table.
    #[arg(long)]
    wrk_only: bool,
    /// After the idle period, have gdb call `malloc_trim(0)` in the daemon and read its RSS
    /// again (to compare glibc's malloc with `malloc_trim` against the other allocators).
    #[arg(long)]
    trim_with_gdb: bool,
    /// Only phase (d), POST → exec against bare spawns (a few seconds): for trying a change.
    #[arg(long)]
    latency_only: bool,
}

// ---- the load client -----------------------------------------------------------------------

/// One request the client sends.
#[derive(Clone)]
struct Req {
    method: Method,
    path: String,
    body: Bytes,
}

impl Req {
    fn post(path: impl Into<String>, body: &str) -> Req {
        Req {
            method: Method::POST,
            path: path.into(),
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    fn get(path: impl Into<String>) -> Req {
        Req {
            method: Method::GET,
            path: path.into(),
            body: Bytes::new(),
        }
    }
}

/// What a load phase sends: the same request over and over, or each of a list once.
enum Source {
    Repeat(Req),
    Each(Vec<Req>, AtomicUsize),
}

impl Source {
    fn each(reqs: Vec<Req>) -> Source {
        Source::Each(reqs, AtomicUsize::new(0))
    }

    fn next(&self) -> Option<Req> {
        match self {
            Source::Repeat(r) => Some(r.clone()),
            Source::Each(v, i) => v.get(i.fetch_add(1, Ordering::Relaxed)).cloned(),
        }
    }
}

/// Which response bodies a phase keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Only 200s that announce a new build (`"already_exists":false`).
    NewBuilds,
    /// Every body (with its request's index in send order is not needed: bodies say enough).
    All,
}

/// What one load phase measured.
#[derive(Default)]
struct Load {
    /// Requests answered during the measured window.
    count: usize,
    /// Length of the measured window.
    elapsed: Duration,
    /// Latencies of the measured requests, in microseconds, sorted.
    latencies_us: Vec<u32>,
    /// Answers by status code (measured window only).
    statuses: BTreeMap<u16, usize>,
    /// Connection errors (each followed by a reconnect).
    errors: usize,
    /// Kept bodies (see [`Keep`]), from the whole phase including the warm-up.
    kept: Vec<Bytes>,
}

impl Load {
    /// Adds another slice of the same kind of load.
    fn merge(&mut self, other: Load) {
        self.count += other.count;
        self.elapsed += other.elapsed;
        self.latencies_us.extend(other.latencies_us);
        self.latencies_us.sort_unstable();
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.errors += other.errors;
        self.kept.extend(other.kept);
    }

    fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn pct_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        self.latencies_us[i] as f64 / 1e3
    }

    fn statuses(&self) -> String {
        let mut s: Vec<String> = self
            .statuses
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        if self.errors > 0 {
            s.push(format!("conn-errors:{}", self.errors));
        }
        s.join(" ")
    }
}

/// How one phase of load is shaped.
struct Shape {
    connections: usize,
    warmup: Duration,
    duration: Duration,
    keep: Keep,
    auth: Option<String>,
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Per-connection results, merged into a [`Load`] at the end.
#[derive(Default)]
struct ConnResult {
    latencies_us: Vec<u32>,
    statuses: BTreeMap<u16, usize>,
    errors: usize,
    kept: Vec<Bytes>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> std::io::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn one_connection(
    addr: SocketAddr,
    source: Arc<Source>,
    shape: Arc<Shape>,
    measure_from: Instant,
    end: Instant,
) -> ConnResult {
    let mut out = ConnResult::default();
    let mut sender: Option<Sender> = None;
    let host = addr.to_string();
    while Instant::now() < end {
        let s = match &mut sender {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => sender.insert(s),
                Err(_) => {
                    out.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if s.ready().await.is_err() {
            out.errors += 1;
            sender = None;
            continue;
        }
        let Some(r) = source.next() else { break };
        let mut b = Request::builder()
            .method(r.method)
            .uri(r.path)
            .header(header::HOST, &host);
        if !r.body.is_empty() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(t) = &shape.auth {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let Ok(req) = b.body(Full::new(r.body)) else {
            out.errors += 1;
            break;
        };
        let t0 = Instant::now();
        let res = match s.send_request(req).await {
            Ok(res) => res,
            Err(_) => {
                out.errors += 1;
                sender = None;
                continue;
            }
        };
        let status = res.status();
        let body = match res.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                out.errors += 1;
                sender = None;
                continue;
            }
        };
        let done = Instant::now();
        if t0 >= measure_from && done <= end {
            out.latencies_us
                .push(u32::try_from((done - t0).as_micros()).unwrap_or(u32::MAX));
            *out.statuses.entry(status.as_u16()).or_default() += 1;
        }
        let keep = match shape.keep {
            Keep::All => true,
            Keep::NewBuilds => {
                status == StatusCode::OK && contains(&body, b"\"already_exists\":false")
            }
        };
        if keep {
            out.kept.push(body);
        }
    }
    out
}

/// Runs one phase of load against `addr` and merges what every connection saw.
fn load(rt: &tokio::runtime::Runtime, addr: SocketAddr, source: Source, shape: Shape) -> Load {
    let shape = Arc::new(shape);
    let source = Arc::new(source);
    let start = Instant::now();
    let measure_from = start + shape.warmup;
    let end = measure_from + shape.duration;
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..shape.connections)
            .map(|_| {
                tokio::spawn(one_connection(
                    addr,
                    source.clone(),
                    shape.clone(),
                    measure_from,
                    end,
                ))
            })
            .collect();
        let mut v = Vec::new();
        for t in tasks {
            if let Ok(r) = t.await {
                v.push(r);
            }
        }
        v
    });
    // A list that ran out early ends the window when the last answer arrived.
    let finished = Instant::now().min(end);
    let mut l = Load {
        elapsed: finished.saturating_duration_since(measure_from),
        ..Load::default()
    };
    for r in results {
        l.latencies_us.extend(r.latencies_us);
        for (k, v) in r.statuses {
            *l.statuses.entry(k).or_default() += v;
        }
        l.errors += r.errors;
        l.kept.extend(r.kept);
    }
    l.count = l.latencies_us.len();
    l.latencies_us.sort_unstable();
    l
}

// ---- processes under test ------------------------------------------------------------------

/// A server process, killed and reaped when dropped.
struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the process to exit (SIGKILL after 30 s).
    fn stop(&mut self) -> Result<(), String> {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!("{} did not stop on SIGTERM", self.name));
                }
            }
        }
    }

    /// Waits until the port accepts connections (or the process died).
    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if StdStream::connect(self.addr).is_ok() {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("{} exited at start: {st}", self.name));
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not listen on {}", self.name, self.addr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<SocketAddr, String> {
    let l = StdListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    l.local_addr().map_err(|e| format!("local_addr: {e}"))
}

/// `(VmRSS, VmHWM)` of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// `target/release/examples` (where this program and `bare_hyper` live) and `target/release`.
fn build_dirs() -> Result<(PathBuf, PathBuf), String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let examples = exe
        .parent()
        .ok_or("the bench executable has no directory")?
        .to_path_buf();
    let profile = examples
        .parent()
        .ok_or("the examples directory has no parent")?
        .to_path_buf();
    Ok((examples, profile))
}

fn require(path: &Path, what: &str) -> Result<(), String> {
    if path.is_file() {
        return Ok(());
    }
    Err(format!(
        "{what} not found at {}: build everything first with\n    cargo build --release --bins --examples\nthen run target/release/examples/bench",
        path.display()
    ))
}

fn start_bare_hyper(examples: &Path) -> Result<Server, String> {
    let exe = examples.join("bare_hyper");
    require(&exe, "the bare_hyper example")?;
    let addr = free_port()?;
    let child = Command::new(&exe)
        .arg(addr.to_string())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let mut s = Server {
        name: "bare_hyper",
        child,
        addr,
    };
    s.wait_listening()?;
    Ok(s)
}

/// adnanh/webhook with one hook, `deploy`, whose rule needs a header nobody sends.
fn start_webhook(exe: &Path, dir: &Path) -> Result<Server, String> {
    let hooks = dir.join("webhook-hooks.json");
    let def = serde_json::json!([{
        "id": "deploy",
        "execute-command": "/bin/true",
        "command-working-directory": dir,
        "trigger-rule": {"match": {
            "type": "value",
            "value": "never-sent",
            "parameter": {"source": "header", "name": "X-Deploy-Secret"},
        }},
    }]);
    std::fs::write(&hooks, def.to_string()).map_err(|e| format!("write hooks: {e}"))?;
    let addr = free_port()?;
    let child = Command::new(exe)
        .args([
            "-ip",
            "127.0.0.1",
            "-port",
            &addr.port().to_string(),
            "-hooks",
        ])
        .arg(&hooks)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let mut s = Server {
        name: "webhook",
        child,
        addr,
    };
    s.wait_listening()?;
    Ok(s)
}

/// Project names of phase (c), and the branches each has.
const NB_BRANCHES: usize = 200;

/// How many projects phase (c) spreads its pairs over.
fn nb_projects(pairs: usize) -> usize {
    pairs.div_ceil(NB_BRANCHES)
}

fn nb_project(i: usize) -> String {
    format!("nb{:03}", i / NB_BRANCHES)
}

fn nb_branch(i: usize) -> String {
    format!("b{:03}", i % NB_BRANCHES)
}

fn deployhook_config(dir: &Path, addr: SocketAddr, pairs: usize) -> String {
    let d = dir.display();
    let slots = 16 + nb_projects(pairs);
    let mut c = format!(
        r#"[server]
listen = "{addr}"
state_dir = "state"
log_level = "warn"
# One slot is held by the sleeping blocker build, one per project of (c) by its `hold`
# build while (c) is measured; builds of (c) and (d) use the others (many, so the thousands
# of builds of (c) drain quickly once released).
max_concurrent_builds = {slots}
builds_per_minute = 1000000
project_builds_per_minute = 1000000
keep_builds = 1000000
# (f) restarts the daemon: do not wait long for the sleeping blocker.
shutdown_timeout = "2s"
kill_grace = "1s"

[api]
token_file = "admin.token"

# (a)/(f): the build of `main` stays queued behind `blocker`, which sleeps until cancelled.
[projects.hot]
branches = ["main", "blocker"]
workdir = "{d}"
command = 'if [ "$DEPLOYHOOK_BRANCH" = blocker ]; then exec sleep 3600; fi'

# (d): the command stamps the time it started running.
[projects.lat]
branches = ["main"]
workdir = "{d}"
command = "exec date +%s%N > stamps/$DEPLOYHOOK_BUILD_UUID"

# (f): where the bulk of the 100 000 hooks live.
[projects.many]
branches = ["main"]
workdir = "{d}"
command = "true"
"#
    );
    let mut branches: Vec<String> = (0..NB_BRANCHES.min(pairs.max(1)))
        .map(|i| format!("\"{}\"", nb_branch(i)))
        .collect();
    branches.push("\"hold\"".into());
    for p in 0..pairs.div_ceil(NB_BRANCHES) {
        c.push_str(&format!(
            "\n[projects.{}]\nbranches = [{}]\nworkdir = \"{d}\"\n\
             command = 'if [ \"$DEPLOYHOOK_BRANCH\" = hold ]; then exec sleep 3600; fi'\n",
            nb_project(p * NB_BRANCHES),
            branches.join(", ")
        ));
    }
    c
}

fn start_deployhook(exe: &Path, dir: &Path, pairs: usize) -> Result<Server, String> {
    let addr = free_port()?;
    let config = dir.join("deploy.toml");
    std::fs::write(&config, deployhook_config(dir, addr, pairs))
        .map_err(|e| format!("write config: {e}"))?;
    std::fs::create_dir_all(dir.join("stamps")).map_err(|e| format!("mkdir: {e}"))?;
    let child = Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let mut s = Server {
        name: "deployhook",
        child,
        addr,
    };
    s.wait_listening()?;
    Ok(s)
}

// ---- small blocking HTTP for set-up and checks ------------------------------------------------

/// One request on its own connection; returns (status, parsed JSON body).
fn call(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    token: Option<&str>,
    req: Req,
) -> Result<(u16, Value), String> {
    rt.block_on(async {
        let mut s = connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let mut b = Request::builder()
            .method(req.method)
            .uri(req.path)
            .header(header::HOST, addr.to_string())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let r = b.body(Full::new(req.body)).map_err(|e| e.to_string())?;
        let res = s.send_request(r).await.map_err(|e| e.to_string())?;
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, v))
    })
}

fn result_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get("result")?.get(key)?.as_str()
}

/// The token at the end of a hook URL.
fn token_of(url: &str) -> Option<String> {
    url.rsplit('/').next().map(str::to_owned)
}

/// Creates hooks `(project, name, branch)` through the API with `connections` connections;
/// returns their tokens in order of the input, or an error naming the first failure.
fn create_hooks(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    admin: &str,
    specs: &[(String, String, String)],
    connections: usize,
) -> Result<Vec<(String, String)>, String> {
    let reqs = specs
        .iter()
        .map(|(p, name, branch)| {
            Req::post(
                format!("/api/projects/{p}/hooks"),
                &serde_json::json!({"name": name, "branch": branch}).to_string(),
            )
        })
        .collect();
    let l = load(
        rt,
        addr,
        Source::each(reqs),
        Shape {
            connections,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(3600),
            keep: Keep::All,
            auth: Some(admin.to_owned()),
        },
    );
    let mut out = Vec::with_capacity(specs.len());
    for b in &l.kept {
        let v: Value = serde_json::from_slice(b).map_err(|e| format!("hook answer: {e}"))?;
        let url = result_str(&v, "url").ok_or_else(|| format!("hook not created: {v}"))?;
        let name = result_str(&v, "name").unwrap_or_default().to_owned();
        out.push((name, token_of(url).unwrap_or_default()));
    }
    if out.len() != specs.len() {
        return Err(format!(
            "created {} of {} hooks ({})",
            out.len(),
            specs.len(),
            l.statuses()
        ));
    }
    Ok(out)
}

/// Triggers a build through the API; its uuid.
fn api_trigger(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    admin: &str,
    project: &str,
    branch: &str,
) -> Result<String, String> {
    let (st, v) = call(
        rt,
        addr,
        Some(admin),
        Req::post(
            format!("/api/projects/{project}/builds"),
            &json!({"branch": branch}).to_string(),
        ),
    )?;
    result_str(&v, "build_uuid")
        .map(str::to_owned)
        .ok_or_else(|| format!("trigger of {project}/{branch} answered {st}: {v}"))
}

/// Waits until at most `queued_ok` builds are queued and `running_ok` running; returns how long.
fn wait_idle(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    queued_ok: u64,
    running_ok: u64,
) -> Duration {
    let t0 = Instant::now();
    loop {
        if let Ok((200, v)) = call(rt, addr, None, Req::get("/healthz")) {
            let n = |k| v["result"][k].as_u64().unwrap_or(u64::MAX);
            if n("queued") <= queued_ok && n("running") <= running_ok {
                return t0.elapsed();
            }
        }
        if t0.elapsed() > Duration::from_secs(600) {
            eprintln!("warning: the queue did not drain within 10 minutes");
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- (d): POST → exec ------------------------------------------------------------------------

/// A (p50, p99) pair of milliseconds, as printed.
fn ms((p50, p99): (f64, f64)) -> String {
    format!("p50 {p50:.3} ms  p99 {p99:.3} ms")
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn read_stamp(path: &Path, deadline: Duration) -> Option<u128> {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(v) = s.trim().parse::<u128>()
        {
            return Some(v);
        }
        if start.elapsed() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// What phase (d) measured, in milliseconds: (p50, p99) of each.
struct ExecLatency {
    build: (f64, f64),
    spawn_true: (f64, f64),
    spawn_sh: (f64, f64),
    new_builds: Vec<String>,
}

/// The pause before each build and each bare spawn of phase (d): the daemon starts its next
/// spare supervisor in the background when a build ends, and a spawn timed beside that
/// would measure the machine's contention, not the spawn (it flattered the ratio). Triggers
/// from a CMS or cron come seconds apart.
const SETTLE: Duration = Duration::from_millis(30);

/// Fires the `lat` hook `n` times, one build after another, alternating with bare spawns,
/// each after a pause ([`SETTLE`]).
fn exec_latency(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    admin: &str,
    hook: &str,
    stamps: &Path,
    n: usize,
) -> Result<ExecLatency, String> {
    let spawn_true = || -> f64 {
        rt.block_on(async {
            let t0 = Instant::now();
            if let Ok(mut c) = tokio::process::Command::new("/bin/true").spawn() {
                let _ = c.wait().await;
            }
            t0.elapsed().as_secs_f64() * 1e3
        })
    };
    let spawn_sh = |i: usize| -> f64 {
        let path = stamps.join(format!("floor-sh-{i}"));
        let t0 = now_ns();
        let child = rt.block_on(async {
            tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("exec date +%s%N > {}", path.display()))
                .spawn()
        });
        let stamp = read_stamp(&path, Duration::from_secs(5)).unwrap_or(t0);
        if let Ok(mut c) = child {
            let _ = rt.block_on(c.wait());
        }
        stamp.saturating_sub(t0) as f64 / 1e6
    };
    let (mut builds, mut trues, mut shs, mut new_builds) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let warm = 5;
    for i in 0..n + warm {
        // A fresh connection per trigger, as a CMS or cron job would use.
        let t0 = now_ns();
        let (status, v) = call(rt, addr, None, Req::post(format!("/hooks/{hook}"), "{}"))?;
        let id = result_str(&v, "build_uuid")
            .ok_or_else(|| format!("latency trigger answered {status}: {v}"))?
            .to_owned();
        if v["result"]["already_exists"] == Value::Bool(false) {
            new_builds.push(id.clone());
        }
        let stamp = read_stamp(&stamps.join(&id), Duration::from_secs(10))
            .ok_or_else(|| format!("build {id} never ran"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, b) = call(rt, addr, Some(admin), Req::get(format!("/api/builds/{id}")))?;
            if result_str(&b, "status") == Some("stopped") {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("build {id} did not stop"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(SETTLE);
        let t = spawn_true();
        std::thread::sleep(SETTLE);
        let s = spawn_sh(i);
        std::thread::sleep(SETTLE);
        if i >= warm {
            builds.push(stamp.saturating_sub(t0) as f64 / 1e6);
            trues.push(t);
            shs.push(s);
        }
    }
    let p = |v: &mut Vec<f64>| (percentile(v, 0.5), percentile(v, 0.99));
    Ok(ExecLatency {
        build: p(&mut builds),
        spawn_true: p(&mut trues),
        spawn_sh: p(&mut shs),
        new_builds,
    })
}

// ---- wrk: a standard C load generator ------------------------------------------------------

/// A request as a real sender makes it: method POST, its headers and a JSON body.
struct RealReq {
    headers: Vec<(&'static str, &'static str)>,
    body: &'static str,
}

/// A headless CMS's publish webhook, modelled on Contentful's: its content type and
/// `X-Contentful-*` headers, and the published entry (about 700 bytes).
fn cms_request() -> RealReq {
    RealReq {
        headers: vec![
            (
                "Content-Type",
                "application/vnd.contentful.management.v1+json",
            ),
            ("User-Agent", "Contentful-Webhooks"),
            ("Accept", "*/*"),
            ("Accept-Encoding", "gzip, deflate"),
            ("X-Contentful-Topic", "ContentManagement.Entry.publish"),
            ("X-Contentful-Webhook-Name", "Deploy site"),
            (
                "X-Contentful-Crn",
                "crn:contentful:::content:spaces/yadj1kx9rmg0/entries/5KsDBWseXY6QegucYAoacS",
            ),
        ],
        body: concat!(
            r#"{"metadata":{"tags":[]},"sys":{"type":"Entry","id":"5KsDBWseXY6QegucYAoacS","#,
            r#""space":{"sys":{"type":"Link","linkType":"Space","id":"yadj1kx9rmg0"}},"#,
            r#""environment":{"sys":{"id":"master","type":"Link","linkType":"Environment"}},"#,
            r#""contentType":{"sys":{"type":"Link","linkType":"ContentType","id":"blogPost"}},"#,
            r#""createdBy":{"sys":{"type":"Link","linkType":"User","id":"4FLrUHftHW3v2BLi9fzfjU"}},"#,
            r#""updatedBy":{"sys":{"type":"Link","linkType":"User","id":"4FLrUHftHW3v2BLi9fzfjU"}},"#,
            r#""revision":7,"createdAt":"2026-11-20T09:12:44.512Z","updatedAt":"2026-11-29T14:02:10.118Z"},"#,
            r#""fields":{"title":{"en-US":"Release notes for November"},"#,
            r#""slug":{"en-US":"release-notes-november"},"#,
            r#""author":{"en-US":{"sys":{"type":"Link","linkType":"Entry","id":"15jwOBqpxqSAOy2eOO4S0m"}}},"#,
            r#""publishDate":{"en-US":"2026-11-29T14:00+00:00"}}}"#
        ),
    }
}

/// What one wrk run measured.
#[derive(Clone, Copy, Default, Debug)]
struct WrkRun {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    /// Answers that were not 2xx/3xx (expected for the 404 kinds).
    non_2xx: u64,
    /// Connect, read, write errors and timeouts.
    socket_errors: u64,
}

/// How wrk is run: its executable and shape, and the directory its Lua scripts go to.
struct Wrk {
    exe: PathBuf,
    dir: PathBuf,
    threads: usize,
    connections: usize,
    seconds: u64,
}

/// A Lua long string holding `s` (the level is chosen so that `s` cannot close it).
fn lua_string(s: &str) -> String {
    let mut level = 0;
    while s.contains(&format!("]{}]", "=".repeat(level))) {
        level += 1;
    }
    let eq = "=".repeat(level);
    format!("[{eq}[{s}]{eq}]")
}

impl Wrk {
    /// Writes the Lua script for `req` (method, headers, body, and a `done` hook that prints
    /// one machine-readable line) and returns its path.
    fn script(&self, name: &str, req: &RealReq) -> Result<PathBuf, String> {
        let mut lua = String::from("wrk.method = \"POST\"\n");
        lua.push_str(&format!("wrk.body = {}\n", lua_string(req.body)));
        for (k, v) in &req.headers {
            // Header names are tokens (no quotes or backslashes); a long string after `[`
            // would open another long string.
            lua.push_str(&format!("wrk.headers[\"{k}\"] = {}\n", lua_string(v)));
        }
        lua.push_str(concat!(
            "done = function(summary, latency, requests)\n",
            "  local e = summary.errors\n",
            "  io.write(string.format(\"WRK %d %d %d %d %d %d\\n\", summary.requests,\n",
            "    summary.duration, latency:percentile(50), latency:percentile(99),\n",
            "    e.status, e.connect + e.read + e.write + e.timeout))\n",
            "end\n",
        ));
        let path = self.dir.join(format!("wrk-{name}.lua"));
        std::fs::write(&path, lua).map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(path)
    }

    /// One run of wrk against `addr` + `path` with the request of `script`.
    fn run(&self, script: &Path, addr: SocketAddr, path: &str) -> Result<WrkRun, String> {
        let out = Command::new(&self.exe)
            .arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{}s", self.seconds))
            .args(["--timeout", "5s", "-s"])
            .arg(script)
            .arg(format!("http://{addr}{path}"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run wrk: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("WRK "))
            .ok_or_else(|| {
                format!(
                    "wrk printed no result ({}): {stdout}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let n: Vec<u64> = line
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let [
            requests,
            duration_us,
            p50_us,
            p99_us,
            non_2xx,
            socket_errors,
        ] = n[..]
        else {
            return Err(format!("cannot parse wrk's line {line:?}"));
        };
        Ok(WrkRun {
            rate: requests as f64 / (duration_us as f64 / 1e6).max(1e-9),
            p50_ms: p50_us as f64 / 1e3,
            p99_ms: p99_us as f64 / 1e3,
            requests,
            non_2xx,
            socket_errors,
        })
    }

    /// Runs every kind `rounds` times, interleaved (kind 1, 2, …, then again), after one
    /// short unmeasured pass; returns the runs of each kind.
    fn interleaved(
        &self,
        kinds: &[(SocketAddr, String, PathBuf)],
        rounds: usize,
    ) -> Result<Vec<Vec<WrkRun>>, String> {
        let warm = Wrk {
            exe: self.exe.clone(),
            dir: self.dir.clone(),
            seconds: 1,
            ..*self
        };
        for (addr, path, script) in kinds {
            warm.run(script, *addr, path)?;
        }
        let mut out = vec![Vec::new(); kinds.len()];
        for _ in 0..rounds {
            for ((addr, path, script), runs) in kinds.iter().zip(out.iter_mut()) {
                runs.push(self.run(script, *addr, path)?);
            }
        }
        Ok(out)
    }
}

/// The median of `v` by `f`.
fn median(runs: &[WrkRun], f: impl Fn(&WrkRun) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    percentile(&mut v, 0.5)
}

/// One row of the wrk table: medians, and every round's rate.
fn wrk_row(name: &str, runs: &[WrkRun]) {
    let rates: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.rate)).collect();
    let non_2xx: u64 = runs.iter().map(|r| r.non_2xx).sum();
    let requests: u64 = runs.iter().map(|r| r.requests).sum();
    let errors: u64 = runs.iter().map(|r| r.socket_errors).sum();
    println!(
        "| {name:<38} | {:>9.0} | {:>7.2} | {:>7.2} | {} | non-2xx {non_2xx}/{requests}{} |",
        median(runs, |r| r.rate),
        median(runs, |r| r.p50_ms),
        median(runs, |r| r.p99_ms),
        rates.join(" / "),
        if errors > 0 {
            format!(", socket errors {errors}")
        } else {
            String::new()
        }
    );
}

// ---- the run ---------------------------------------------------------------------------------

fn row(name: &str, l: &Load) {
    println!(
        "| {name:<38} | {:>9.0} | {:>7.2} | {:>7.2} | {} |",
        l.rate(),
        l.pct_ms(0.5),
        l.pct_ms(0.99),
        l.statuses()
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Build ids announced as new in kept 200 bodies.
fn new_build_ids(kept: &[Bytes]) -> Vec<String> {
    kept.iter()
        .filter_map(|b| serde_json::from_slice::<Value>(b).ok())
        .filter(|v| v["result"]["already_exists"] == Value::Bool(false))
        .filter_map(|v| result_str(&v, "build_uuid").map(str::to_owned))
        .collect()
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let (examples, profile) = build_dirs()?;
    let deployhook_exe = args
        .deployhook
        .clone()
        .unwrap_or_else(|| profile.join("deployhook"));
    require(&deployhook_exe, "the deployhook release binary")?;
    require(&examples.join("bare_hyper"), "the bare_hyper example")?;
    let webhook_exe = if args.no_webhook {
        None
    } else {
        find_on_path("webhook")
    };
    let wrk_exe = if args.no_wrk {
        None
    } else {
        find_on_path("wrk")
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let dir = tmp.path();
    let duration = Duration::from_secs_f64(args.duration.max(0.1));
    let shape = |keep, auth: Option<&str>| Shape {
        connections: args.connections.max(1),
        warmup: duration / 10,
        duration,
        keep,
        auth: auth.map(str::to_owned),
    };
    let hook_body = r#"{"entry":"changed","model":"post","id":42}"#;

    println!(
        "bench: {} connections, {:.1} s per phase, client threads {}, {} cores; {}",
        args.connections,
        duration.as_secs_f64(),
        args.client_threads,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        deployhook_exe.display()
    );
    println!("load at start: {}", load_average());
    let wrk = match wrk_exe {
        None => {
            println!(
                "wrk: not on PATH, its measurements are skipped (Debian: apt-get install wrk)"
            );
            None
        }
        Some(exe) => Some(Wrk {
            exe,
            dir: dir.to_path_buf(),
            threads: args.wrk_threads.max(1),
            connections: args.wrk_connections.max(1),
            seconds: args.wrk_seconds.max(1),
        }),
    };

    // Every server is started first; the five request kinds are then measured interleaved,
    // in `--rounds` slices each, so that drift in the machine's other load (other processes
    // come and go) hits all of them alike.
    let bare_server = start_bare_hyper(&examples)?;
    let webhook_server = match &webhook_exe {
        None => {
            println!("webhook: not on PATH, comparison skipped (Debian: apt-get install webhook)");
            None
        }
        Some(exe) => Some(start_webhook(exe, dir)?),
    };

    // deployhook.
    let pairs = args.new_build_pairs.max(1);
    let mut dh = start_deployhook(&deployhook_exe, dir, pairs)?;
    let addr = dh.addr;
    std::thread::sleep(Duration::from_secs(1));
    let (rss_idle, _) = rss_kib(dh.pid());
    let admin = std::fs::read_to_string(dir.join("admin.token"))
        .map_err(|e| format!("admin token: {e}"))?
        .trim()
        .to_owned();
    let mut announced: Vec<String> = Vec::new();

    let fixed: Vec<(String, String, String)> = vec![
        ("hot".into(), "cms".into(), "main".into()),
        ("lat".into(), "cms".into(), "main".into()),
    ];
    let tokens = create_hooks(&rt, addr, &admin, &fixed, 1)?;
    let (hot, lat) = (tokens[0].1.clone(), tokens[1].1.clone());
    // The blocker holds project `hot`, so the build of `main` stays pending.
    let blocker = api_trigger(&rt, addr, &admin, "hot", "blocker")?;
    announced.push(blocker.clone());
    let (_, v) = call(
        &rt,
        addr,
        None,
        Req::post(format!("/hooks/{hot}"), hook_body),
    )?;
    announced.extend(result_str(&v, "build_uuid").map(str::to_owned));
    // Well-formed (so it is looked up) but unknown.
    let unknown_token = format!("dh_{}", "x".repeat(hot.len().saturating_sub(3)));

    let exec_latency = || {
        exec_latency(
            &rt,
            addr,
            &admin,
            &lat,
            &dir.join("stamps"),
            args.latency_builds,
        )
    };
    if args.latency_only {
        let l = exec_latency()?;
        println!("(d) POST -> exec of a build       {}", ms(l.build));
        println!("    bare spawn sh -c 'exec date'   {}", ms(l.spawn_sh));
        println!("    bare spawn + wait /bin/true    {}", ms(l.spawn_true));
        println!(
            "POST->exec p50 / sh -c spawn p50  {:.2}  (<= 1.5)\nload at end: {}",
            l.build.0 / l.spawn_sh.0,
            load_average()
        );
        return Ok(());
    }
    let post = |to: &str| Req::post(to, hook_body);
    let mut kinds: Vec<(SocketAddr, Req)> = vec![
        (bare_server.addr, post("/hooks/anything")),
        (addr, post(&format!("/hooks/{hot}"))),
        (addr, post(&format!("/hooks/{unknown_token}"))),
    ];
    if let Some(w) = &webhook_server {
        kinds.push((w.addr, post("/hooks/no-such-hook")));
        kinds.push((w.addr, post("/hooks/deploy")));
    }
    let rounds = args.rounds.max(1);
    let mut measured: Vec<Load> = kinds.iter().map(|_| Load::default()).collect();
    for _ in 0..if args.wrk_only { 0 } else { rounds } {
        for ((to, req), total) in kinds.iter().zip(measured.iter_mut()) {
            let slice = Shape {
                warmup: duration / rounds as u32 / 10,
                duration: duration / rounds as u32,
                ..shape(Keep::NewBuilds, None)
            };
            total.merge(load(&rt, *to, Source::Repeat(req.clone()), slice));
        }
    }
    // The same kinds under wrk, with the request a CMS sends.
    let cms = cms_request();
    let wrk_main = match &wrk {
        None => None,
        Some(w) => {
            let script = w.script("cms", &cms)?;
            let mut kinds = vec![
                (
                    bare_server.addr,
                    "/hooks/anything".to_owned(),
                    script.clone(),
                ),
                (addr, format!("/hooks/{hot}"), script.clone()),
                (addr, format!("/hooks/{unknown_token}"), script.clone()),
            ];
            if let Some(wh) = &webhook_server {
                kinds.push((wh.addr, "/hooks/no-such-hook".to_owned(), script.clone()));
            }
            Some(w.interleaved(&kinds, args.wrk_rounds.max(1))?)
        }
    };
    drop(webhook_server);
    if args.wrk_only {
        let Some(runs) = &wrk_main else {
            return Err("--wrk-only needs wrk on PATH".into());
        };
        let rate = |r: &[WrkRun]| median(r, |x| x.rate);
        let p99 = |r: &[WrkRun]| median(r, |x| x.p99_ms);
        let ratio = |a: f64, b: f64| a / b;
        wrk_row("bare hyper", &runs[0]);
        wrk_row("deployhook hot path, pending build", &runs[1]);
        wrk_row("deployhook unknown token 404", &runs[2]);
        if let Some(u) = runs.get(3) {
            wrk_row("webhook 2.8: unknown hook 404", u);
        }
        print!(
            "hot/bare {:.2}  404/bare {:.2}  p99 hot/bare {:.2}  p99 404/bare {:.2}",
            ratio(rate(&runs[1]), rate(&runs[0])),
            ratio(rate(&runs[2]), rate(&runs[0])),
            ratio(p99(&runs[1]), p99(&runs[0])),
            ratio(p99(&runs[2]), p99(&runs[0]))
        );
        if let Some(u) = runs.get(3) {
            print!("  hot/webhook {:.2}", ratio(rate(&runs[1]), rate(u)));
        }
        println!("\nload at end: {}", load_average());
        return Ok(());
    }
    let mut measured = measured.into_iter();
    let mut next = || measured.next().unwrap_or_default();
    let (bare, hot_a, nf) = (next(), next(), next());
    let webhook = webhook_exe.as_ref().map(|_| (next(), next()));
    announced.extend(new_build_ids(&hot_a.kept));

    let lat_runs = exec_latency()?;
    announced.extend(lat_runs.new_builds.iter().cloned());

    // Hooks: one per (project, branch) of (c), then the rest in `many` up to `--hooks`.
    // Names are unique across projects, so answers (which arrive out of order) map back.
    let mut specs: Vec<(String, String, String)> = (0..pairs)
        .map(|i| (nb_project(i), format!("c{i}"), nb_branch(i)))
        .collect();
    let total = args.hooks.max(pairs + fixed.len());
    specs.extend(
        (0..total - pairs - fixed.len()).map(|i| ("many".into(), format!("m{i}"), "main".into())),
    );
    let t0 = Instant::now();
    let created = create_hooks(&rt, addr, &admin, &specs, args.connections.max(1))?;
    let hooks_time = t0.elapsed();
    let mut by_name: HashMap<String, String> = created.into_iter().collect();
    let nb_reqs: Vec<Req> = (0..pairs)
        .filter_map(|i| by_name.remove(&format!("c{i}")))
        .map(|t| Req::post(format!("/hooks/{t}"), hook_body))
        .collect();
    drop(by_name);

    // (c) measures taking new builds, not running them: each project of (c) is held by a
    // sleeping `hold` build meanwhile (one build per project runs at a time), so the builds
    // queue, and thousands of `/bin/sh` runs do not compete for the cores with the answers.
    let mut holds: Vec<String> = Vec::new();
    for p in 0..nb_projects(pairs) {
        holds.push(api_trigger(
            &rt,
            addr,
            &admin,
            &nb_project(p * NB_BRANCHES),
            "hold",
        )?);
    }
    announced.extend(holds.iter().cloned());
    // Every hold running: only the pending hot build is queued.
    wait_idle(&rt, addr, 1, u64::MAX);
    // (c): every request a new build; no warm-up, each hook fires once.
    let new_builds = load(
        &rt,
        addr,
        Source::each(nb_reqs),
        Shape {
            warmup: Duration::ZERO,
            ..shape(Keep::NewBuilds, None)
        },
    );
    announced.extend(new_build_ids(&new_builds.kept));
    // Release the holds; the pending hot build stays queued and the blocker running.
    let released = Instant::now();
    for id in &holds {
        let _ = call(
            &rt,
            addr,
            Some(&admin),
            Req::post(format!("/api/builds/{id}/cancel"), ""),
        )?;
    }
    wait_idle(&rt, addr, 1, 1);
    let drain = released.elapsed();
    let executed = new_builds.kept.len();

    // (e) the connection burst, then idle: does the memory come back?
    let burst = connection_burst(&rt, addr, args.burst_connections);
    let (rss_busy, _) = rss_kib(dh.pid());
    let idle_from = Instant::now();
    let mut rss_idle_min = rss_busy;
    while idle_from.elapsed() < Duration::from_secs(args.idle_seconds) {
        std::thread::sleep(Duration::from_millis(500));
        rss_idle_min = rss_idle_min.min(rss_kib(dh.pid()).0);
    }
    let (rss_after_idle, _) = rss_kib(dh.pid());
    // What glibc's malloc would give back if asked: the daemon cannot call `malloc_trim`
    // itself (`#![forbid(unsafe_code)]`), so gdb calls it in the stopped process. Only for
    // comparing allocators (a glibc build); jemalloc and mimalloc do not hold their free
    // memory in glibc's arenas.
    let rss_trimmed = args.trim_with_gdb.then(|| {
        let _ = Command::new("gdb")
            .args([
                "-p",
                &dh.pid().to_string(),
                "-batch",
                "-ex",
                "call (int) malloc_trim(0)",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_secs(1));
        rss_kib(dh.pid()).0
    });

    // The hot path again in the same process, right after the bursts of (c) and of creating
    // the hooks: shows what those bursts left behind (allocator state), not the store's size.
    let hot_burst = load(
        &rt,
        addr,
        Source::Repeat(Req::post(format!("/hooks/{hot}"), hook_body)),
        shape(Keep::NewBuilds, None),
    );
    announced.extend(new_build_ids(&hot_burst.kept));
    let (rss_after, rss_peak) = rss_kib(dh.pid());

    // (f): a daemon started on the store that now holds every hook, as after any restart.
    // The restart interrupts the blocker and the pending build runs: set both up again.
    dh.stop()?;
    drop(dh);
    let mut dh = start_deployhook(&deployhook_exe, dir, pairs)?;
    let addr = dh.addr;
    wait_idle(&rt, addr, 0, 0);
    let blocker2 = api_trigger(&rt, addr, &admin, "hot", "blocker")?;
    announced.push(blocker2.clone());
    let (_, v) = call(
        &rt,
        addr,
        None,
        Req::post(format!("/hooks/{hot}"), hook_body),
    )?;
    if v["result"]["already_exists"] == Value::Bool(false) {
        announced.extend(result_str(&v, "build_uuid").map(str::to_owned));
    }
    let hot_f = load(
        &rt,
        addr,
        Source::Repeat(Req::post(format!("/hooks/{hot}"), hook_body)),
        shape(Keep::NewBuilds, None),
    );
    announced.extend(new_build_ids(&hot_f.kept));
    let wrk_f = match &wrk {
        None => None,
        Some(w) => {
            let script = w.script("cms", &cms)?;
            Some(w.interleaved(
                &[
                    (
                        bare_server.addr,
                        "/hooks/anything".to_owned(),
                        script.clone(),
                    ),
                    (addr, format!("/hooks/{hot}"), script),
                ],
                args.wrk_rounds.max(1),
            )?)
        }
    };

    // Correctness: release the blocker so the pending hot build runs too, then check.
    let _ = call(
        &rt,
        addr,
        Some(&admin),
        Req::post(format!("/api/builds/{blocker2}/cancel"), ""),
    )?;
    wait_idle(&rt, addr, 0, 0);
    let mut blockers = vec![blocker.as_str(), blocker2.as_str()];
    blockers.extend(holds.iter().map(String::as_str));
    let check = check_builds(&rt, &args, addr, &admin, &announced, &blockers, pairs)?;
    if let Ok(Some(st)) = dh.child.try_wait() {
        return Err(format!("deployhook exited during the run: {st}"));
    }
    dh.stop()?;
    drop(dh);

    // (g): a store with `--million-hooks` hooks, written straight into it while no daemon
    // runs (the API would take minutes); then start-up time, RSS and the hot path.
    let million = if args.million_hooks > total {
        Some(million_hooks(
            &rt,
            &deployhook_exe,
            dir,
            pairs,
            &hot,
            args.million_hooks - total,
            wrk.as_ref().map(|w| (w, &bare_server, &cms)),
            args.wrk_rounds.max(1),
        )?)
    } else {
        None
    };
    drop(bare_server);

    // ---- report ----
    println!();
    println!(
        "| {:<38} | {:>9} | {:>7} | {:>7} | statuses |",
        "", "req/s", "p50 ms", "p99 ms"
    );
    println!("|{:-<40}|{:->11}|{:->9}|{:->9}|----------|", "", "", "", "");
    row("bare hyper (machine limit)", &bare);
    if let Some((u, r)) = &webhook {
        row("webhook 2.8: unknown hook", u);
        row("webhook 2.8: rule rejects (no exec)", r);
    }
    row("deployhook (a) hot path, pending build", &hot_a);
    row("deployhook (b) unknown token 404", &nf);
    row("deployhook (c) new builds, durable", &new_builds);
    row(&format!("deployhook (f) hot path, {total} hooks"), &hot_f);
    row("  (f) before that restart, after bursts", &hot_burst);
    println!();
    println!("(d) POST -> exec of a build       {}", ms(lat_runs.build));
    println!(
        "    bare spawn+wait /bin/true      {}",
        ms(lat_runs.spawn_true)
    );
    println!(
        "    bare spawn sh -c 'exec date'   {}",
        ms(lat_runs.spawn_sh)
    );
    let mb = |k: u64| k as f64 / 1024.0;
    println!(
        "(e) RSS: idle {:.1} MB, peak {:.1} MB; after the bursts {:.1} MB, after {} s idle {:.1} MB \
         (lowest {:.1} MB), after the hot path again {:.1} MB",
        mb(rss_idle),
        mb(rss_peak),
        mb(rss_busy),
        args.idle_seconds,
        mb(rss_after_idle),
        mb(rss_idle_min),
        mb(rss_after)
    );
    if let Some(t) = rss_trimmed {
        println!("    after malloc_trim(0) (gdb): {:.1} MB", mb(t));
    }
    println!(
        "    connection burst: {} of {} connections open at once, each answered",
        burst, args.burst_connections
    );
    println!(
        "    {} hooks created through the API in {:.1} s ({:.0}/s, {} connections)",
        specs.len() + fixed.len(),
        hooks_time.as_secs_f64(),
        specs.len() as f64 / hooks_time.as_secs_f64().max(1e-9),
        args.connections
    );
    println!(
        "    {executed} new builds of (c) ran to the end {:.1} s after they were released",
        drain.as_secs_f64()
    );
    println!();

    let ratio = |a: f64, b: f64| a / b;
    let (bare_rate, bare_p99) = (bare.rate(), bare.pct_ms(0.99));
    let f_change = ratio(hot_f.rate(), hot_a.rate()) - 1.0;
    println!("built-in client (its ratios are compressed toward 1: see the README):");
    println!(
        "  hot / bare {:.2}, 404 / bare {:.2}, p99 hot / bare {:.2}, p99 404 / bare {:.2}, \
         {total} hooks change the hot path {:+.1}%",
        ratio(hot_a.rate(), bare_rate),
        ratio(nf.rate(), bare_rate),
        ratio(hot_a.pct_ms(0.99), bare_p99),
        ratio(nf.pct_ms(0.99), bare_p99),
        f_change * 100.0
    );
    if let Some((u, _)) = &webhook {
        println!(
            "  hot / webhook unknown {:.2}, 404 / webhook unknown {:.2}",
            ratio(hot_a.rate(), u.rate()),
            ratio(nf.rate(), u.rate())
        );
    }
    println!();
    let exec = ratio(lat_runs.build.0, lat_runs.spawn_sh.0);
    let after_idle = ratio(rss_after_idle as f64, rss_idle as f64);
    if let Some(runs) = &wrk_main {
        println!(
            "wrk -t{} -c{} -d{}s, a CMS's publish webhook ({} bytes of JSON, {} headers), \
             {} interleaved rounds, medians:",
            args.wrk_threads,
            args.wrk_connections,
            args.wrk_seconds,
            cms.body.len(),
            cms.headers.len(),
            args.wrk_rounds
        );
        println!(
            "| {:<38} | {:>9} | {:>7} | {:>7} | rounds req/s | |",
            "", "req/s", "p50 ms", "p99 ms"
        );
        println!("|{:-<40}|{:->11}|{:->9}|{:->9}|---|---|", "", "", "", "");
        wrk_row("bare hyper", &runs[0]);
        wrk_row("deployhook hot path, pending build", &runs[1]);
        wrk_row("deployhook unknown token 404", &runs[2]);
        if let Some(u) = runs.get(3) {
            wrk_row("webhook 2.8: unknown hook 404", u);
        }
        if let Some(f) = &wrk_f {
            wrk_row("  (f) bare hyper", &f[0]);
            wrk_row(&format!("  (f) hot path, {total} hooks"), &f[1]);
        }
        if let Some(m) = &million
            && let Some(r) = &m.wrk
        {
            wrk_row("  (g) bare hyper", &r[0]);
            wrk_row(&format!("  (g) hot path, {} hooks", m.hooks), &r[1]);
        }
        println!();
        let rate = |r: &[WrkRun]| median(r, |x| x.rate);
        let p99 = |r: &[WrkRun]| median(r, |x| x.p99_ms);
        let hot_bare = ratio(rate(&runs[1]), rate(&runs[0]));
        let nf_bare = ratio(rate(&runs[2]), rate(&runs[0]));
        let p99_hot = ratio(p99(&runs[1]), p99(&runs[0]));
        let p99_nf = ratio(p99(&runs[2]), p99(&runs[0]));
        println!("targets (wrk):");
        println!(
            "  hot path / bare hyper req/s       {hot_bare:>6.2}  (>= 0.75)  {}",
            verdict(hot_bare >= 0.75)
        );
        if let Some(u) = runs.get(3) {
            let hot_wh = ratio(rate(&runs[1]), rate(u));
            println!(
                "  hot path / webhook unknown 404    {hot_wh:>6.2}  (>= 1.8)   {}",
                verdict(hot_wh >= 1.8)
            );
        }
        println!(
            "  404 path / bare hyper req/s       {nf_bare:>6.2}  (>= 0.9)   {}",
            verdict(nf_bare >= 0.9)
        );
        println!(
            "  p99 hot / bare hyper p99          {p99_hot:>6.2}  (<= 1.5)   {}",
            verdict(p99_hot <= 1.5)
        );
        println!(
            "  p99 404 / bare hyper p99          {p99_nf:>6.2}  (<= 1.5)   {}",
            verdict(p99_nf <= 1.5)
        );
        // Each against bare hyper measured interleaved with it, so drift between phases
        // cancels out.
        let per_bare = |r: &Vec<Vec<WrkRun>>| ratio(rate(&r[1]), rate(&r[0])) / hot_bare - 1.0;
        if let Some(f) = &wrk_f {
            let c = per_bare(f);
            println!(
                "  hot path change, {total} hooks     {:>+5.1}%  (< 10%)    {}",
                c * 100.0,
                verdict(c.abs() < 0.10)
            );
        }
        if let Some(m) = &million
            && let Some(r) = &m.wrk
        {
            let c = per_bare(r);
            println!(
                "  hot path change, {} hooks   {:>+5.1}%  (< 10%)    {}",
                m.hooks,
                c * 100.0,
                verdict(c.abs() < 0.10)
            );
        }
    }
    println!(
        "  POST->exec p50 / sh -c spawn p50  {exec:>6.2}  (<= 1.5)   {}",
        verdict(exec <= 1.5)
    );
    println!(
        "  RSS after {} s idle / idle RSS    {after_idle:>6.2}  (<= 3)     {}",
        args.idle_seconds,
        verdict(after_idle <= 3.0)
    );
    println!(
        "  durable new builds/s              {:>6.0}  (info)",
        new_builds.rate()
    );
    if let Some(m) = &million {
        println!(
            "  (g) {} hooks: written in {:.1} s; daemon start to answering {:.2} s; RSS idle {:.1} MB",
            m.hooks,
            m.write_secs,
            m.start_secs,
            mb(m.rss_kib)
        );
    }
    println!("load at end: {}", load_average());
    println!();
    println!("{check}");
    Ok(())
}

/// Every build announced as new exists, is listed, and ran: the blockers end `interrupted`
/// (by the restart) or `cancelled`, every other build `success`.
fn check_builds(
    rt: &tokio::runtime::Runtime,
    args: &Args,
    addr: SocketAddr,
    admin: &str,
    announced: &[String],
    blockers: &[&str],
    pairs: usize,
) -> Result<String, String> {
    let distinct: HashSet<&String> = announced.iter().collect();
    let reqs = announced
        .iter()
        .map(|id| Req::get(format!("/api/builds/{id}")))
        .collect();
    let l = load(
        rt,
        addr,
        Source::each(reqs),
        Shape {
            connections: args.connections.max(1),
            warmup: Duration::ZERO,
            duration: Duration::from_secs(3600),
            keep: Keep::All,
            auth: Some(admin.to_owned()),
        },
    );
    let (mut ok, mut bad) = (0usize, Vec::new());
    for b in &l.kept {
        let v: Value = serde_json::from_slice(b).unwrap_or(Value::Null);
        let id = result_str(&v, "build_uuid").unwrap_or("?");
        let outcome = result_str(&v, "build_outcome").unwrap_or("");
        let good = if blockers.contains(&id) {
            outcome == "interrupted" || outcome == "cancelled"
        } else {
            outcome == "success"
        };
        if result_str(&v, "status") == Some("stopped") && good {
            ok += 1;
        } else if bad.len() < 5 {
            bad.push(v.to_string());
        }
    }
    // Count every build by listing each project's builds page by page.
    let mut projects = vec!["hot".to_owned(), "lat".to_owned(), "many".to_owned()];
    projects.extend((0..nb_projects(pairs)).map(|p| nb_project(p * NB_BRANCHES)));
    let mut listed = 0usize;
    for p in &projects {
        let mut cursor = String::new();
        loop {
            let path = format!("/api/projects/{p}/builds?limit=100{cursor}");
            let (st, v) = call(rt, addr, Some(admin), Req::get(path))?;
            if st != 200 {
                return Err(format!("listing builds of {p} answered {st}: {v}"));
            }
            listed += v["result"].as_array().map_or(0, Vec::len);
            match v["result_info"]["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => break,
            }
        }
    }
    let all_good = ok == announced.len() && distinct.len() == announced.len() && listed == ok;
    let mut s = format!(
        "correctness: {} answers announced a new build ({} distinct); {ok} exist and ran \
         (stopped, success; the blockers interrupted/cancelled); the API lists {listed} builds in all: {}",
        announced.len(),
        distinct.len(),
        if all_good { "OK" } else { "FAILED" }
    );
    for b in bad {
        s.push_str(&format!("\n  bad: {b}"));
    }
    Ok(s)
}

/// `/proc/loadavg`'s three load averages (how busy the shared machine was).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Opens `n` connections at once, each asking `/healthz` and then held open until every one
/// has its answer (or a minute has passed); returns how many were open and answered at once.
fn connection_burst(rt: &tokio::runtime::Runtime, addr: SocketAddr, n: usize) -> usize {
    rt.block_on(async {
        let (release, held) = tokio::sync::watch::channel(false);
        let answered = Arc::new(AtomicUsize::new(0));
        let host = addr.to_string();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let mut held = held.clone();
                let answered = answered.clone();
                let host = host.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = connect(addr).await else {
                        return;
                    };
                    let Ok(req) = Request::get("/healthz")
                        .header(header::HOST, host)
                        .body(Full::new(Bytes::new()))
                    else {
                        return;
                    };
                    if let Ok(r) = s.send_request(req).await
                        && r.status() == StatusCode::OK
                        && r.into_body().collect().await.is_ok()
                    {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = held.wait_for(|v| *v).await;
                    drop(s);
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while answered.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let open = answered.load(Ordering::Relaxed);
        let _ = release.send(true);
        for t in tasks {
            let _ = t.await;
        }
        open
    })
}

/// What phase (g) measured.
struct Million {
    hooks: usize,
    write_secs: f64,
    start_secs: f64,
    rss_kib: u64,
    wrk: Option<Vec<Vec<WrkRun>>>,
}

/// Phase (g): adds `extra` hooks straight into the stopped daemon's store (two threads of
/// `Store::insert_hook`), starts the daemon on it, and measures how long it takes to answer,
/// its RSS, and the hot path (pending build) against bare hyper under wrk.
#[allow(clippy::too_many_arguments)]
fn million_hooks(
    rt: &tokio::runtime::Runtime,
    exe: &Path,
    dir: &Path,
    pairs: usize,
    hot: &str,
    extra: usize,
    wrk: Option<(&Wrk, &Server, &RealReq)>,
    rounds: usize,
) -> Result<Million, String> {
    use deployhook::model::{Hook, HookId, Timestamp};
    use deployhook::store::{HookInsert, Store};
    use deployhook::token::TokenHash;
    let t0 = Instant::now();
    {
        let store = Store::open(&dir.join("state")).map_err(|e| format!("open store: {e}"))?;
        let workers = 2;
        let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let store = store.clone();
                    scope.spawn(move || {
                        for i in (w..extra).step_by(workers) {
                            let h = Hook {
                                id: HookId::new(),
                                project: "many".into(),
                                name: format!("g{i}"),
                                branch: "main".into(),
                                token_hash: TokenHash::of(&format!("dh_g{i}")).0,
                                created_on: Timestamp::now(),
                                last_triggered_on: None,
                                trigger_count: 0,
                                allow_get: false,
                            };
                            match store.insert_hook(&h) {
                                Ok(HookInsert::Created) => {}
                                Ok(HookInsert::NameTaken) => return Err(format!("g{i} exists")),
                                Err(e) => return Err(format!("insert hook: {e}")),
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("a writer panicked".into())))
                .collect()
        });
        results.into_iter().collect::<Result<Vec<()>, String>>()?;
        store
            .flush_blocking()
            .map_err(|e| format!("flush store: {e}"))?;
        store.close();
    }
    let write_secs = t0.elapsed().as_secs_f64();
    let hooks = store_hook_count(dir)?;
    let t1 = Instant::now();
    let mut dh = start_deployhook(exe, dir, pairs)?;
    let addr = dh.addr;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !matches!(call(rt, addr, None, Req::get("/healthz")), Ok((200, _))) {
        if Instant::now() > deadline {
            return Err("the daemon did not answer within 2 minutes of its start".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let start_secs = t1.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let (rss_kib, _) = rss_kib(dh.pid());
    let admin = std::fs::read_to_string(dir.join("admin.token"))
        .map_err(|e| format!("admin token: {e}"))?
        .trim()
        .to_owned();
    let blocker = api_trigger(rt, addr, &admin, "hot", "blocker")?;
    let (st, v) = call(
        rt,
        addr,
        None,
        Req::post(format!("/hooks/{hot}"), r#"{"entry":"changed"}"#),
    )?;
    if st != 200 {
        return Err(format!("the hot hook answered {st} after the restart: {v}"));
    }
    let wrk = match wrk {
        None => None,
        Some((w, bare, req)) => {
            let script = w.script("cms", req)?;
            Some(w.interleaved(
                &[
                    (bare.addr, "/hooks/anything".to_owned(), script.clone()),
                    (addr, format!("/hooks/{hot}"), script),
                ],
                rounds,
            )?)
        }
    };
    let _ = call(
        rt,
        addr,
        Some(&admin),
        Req::post(format!("/api/builds/{blocker}/cancel"), ""),
    )?;
    dh.stop()?;
    Ok(Million {
        hooks,
        write_secs,
        start_secs,
        rss_kib,
        wrk,
    })
}

/// How many hooks the (stopped) daemon's store holds.
fn store_hook_count(dir: &Path) -> Result<usize, String> {
    let store = deployhook::store::Store::open(&dir.join("state"))
        .map_err(|e| format!("open store: {e}"))?;
    let n = store.hook_count();
    store.close();
    Ok(n)
}
