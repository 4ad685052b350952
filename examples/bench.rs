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

/// Fires the `lat` hook `n` times, one build after another, alternating with bare spawns.
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
        let t = spawn_true();
        let s = spawn_sh(i);
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
    let deployhook_exe = profile.join("deployhook");
    require(&deployhook_exe, "the deployhook release binary")?;
    require(&examples.join("bare_hyper"), "the bare_hyper example")?;
    let webhook_exe = if args.no_webhook {
        None
    } else {
        find_on_path("webhook")
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
        "bench: {} connections, {:.1} s per phase, client threads {}, {} cores",
        args.connections,
        duration.as_secs_f64(),
        args.client_threads,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

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
    for _ in 0..rounds {
        for ((to, req), total) in kinds.iter().zip(measured.iter_mut()) {
            let slice = Shape {
                warmup: duration / rounds as u32 / 10,
                duration: duration / rounds as u32,
                ..shape(Keep::NewBuilds, None)
            };
            total.merge(load(&rt, *to, Source::Repeat(req.clone()), slice));
        }
    }
    drop(bare_server);
    drop(webhook_server);
    let mut measured = measured.into_iter();
    let mut next = || measured.next().unwrap_or_default();
    let (bare, hot_a, nf) = (next(), next(), next());
    let webhook = webhook_exe.as_ref().map(|_| (next(), next()));
    announced.extend(new_build_ids(&hot_a.kept));

    let lat_runs = exec_latency(
        &rt,
        addr,
        &admin,
        &lat,
        &dir.join("stamps"),
        args.latency_builds,
    )?;
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
    drop(dh);

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
    let ms = |(a, b): (f64, f64)| format!("p50 {a:.3} ms  p99 {b:.3} ms");
    println!("(d) POST -> exec of a build       {}", ms(lat_runs.build));
    println!(
        "    bare spawn+wait /bin/true      {}",
        ms(lat_runs.spawn_true)
    );
    println!(
        "    bare spawn sh -c 'exec date'   {}",
        ms(lat_runs.spawn_sh)
    );
    println!(
        "(e) RSS: idle {:.1} MB, peak {:.1} MB, after {:.1} MB",
        rss_idle as f64 / 1024.0,
        rss_peak as f64 / 1024.0,
        rss_after as f64 / 1024.0
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
    let hot_bare = ratio(hot_a.rate(), bare_rate);
    let nf_bare = ratio(nf.rate(), bare_rate);
    let p99_hot = ratio(hot_a.pct_ms(0.99), bare_p99);
    let p99_nf = ratio(nf.pct_ms(0.99), bare_p99);
    let exec = ratio(lat_runs.build.0, lat_runs.spawn_true.0);
    let f_change = ratio(hot_f.rate(), hot_a.rate()) - 1.0;
    println!("targets:");
    println!(
        "  hot path / bare hyper req/s     {hot_bare:>6.2}  (>= 0.75)  {}",
        verdict(hot_bare >= 0.75)
    );
    if let Some((u, r)) = &webhook {
        let hot_wh = ratio(hot_a.rate(), u.rate());
        println!(
            "  hot path / webhook unknown      {hot_wh:>6.2}  (>= 1.8)   {}",
            verdict(hot_wh >= 1.8)
        );
        println!(
            "  hot path / webhook rule-reject  {:>6.2}  (info)",
            ratio(hot_a.rate(), r.rate())
        );
        println!(
            "  404 / webhook unknown           {:>6.2}  (info)",
            ratio(nf.rate(), u.rate())
        );
    }
    println!(
        "  404 path / bare hyper req/s     {nf_bare:>6.2}  (>= 0.85)  {}",
        verdict(nf_bare >= 0.85)
    );
    println!(
        "  p99 hot / bare hyper p99        {p99_hot:>6.2}  (<= 1.5)   {}",
        verdict(p99_hot <= 1.5)
    );
    println!(
        "  p99 404 / bare hyper p99        {p99_nf:>6.2}  (<= 1.5)   {}",
        verdict(p99_nf <= 1.5)
    );
    println!(
        "  durable new builds/s            {:>6.0}  (>= 3000)  {}",
        new_builds.rate(),
        verdict(new_builds.rate() >= 3000.0)
    );
    println!(
        "  POST->exec p50 / spawn p50      {exec:>6.2}  (<= 2)     {}",
        verdict(exec <= 2.0)
    );
    println!(
        "  idle RSS MB                     {:>6.1}  (<= 15)    {}",
        rss_idle as f64 / 1024.0,
        verdict(rss_idle <= 15 * 1024)
    );
    println!(
        "  hot path change with {total} hooks {:>+5.1}%  (< 10%)    {}",
        f_change * 100.0,
        verdict(f_change.abs() < 0.10)
    );
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
