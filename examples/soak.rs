//! Soak: runs the release daemon under a bounded mixed load and shows whether anything grows
//! beyond retention.
//!
//! Run with
//! ```sh
//! cargo build --release && cargo run --release --example soak -- --duration 60s
//! cargo build --release && cargo run --release --example soak -- --builds 10000   # retention run
//! ```
//! It starts `target/release/deployhook serve` (the binary next to this example's own
//! directory; build it first) on 127.0.0.1:0 with a temp state dir and a config of several
//! workdir projects (no Git): `true`, a script printing a few lines, and a short `sleep` that
//! cancels can catch, plus a project `limited` with `project_builds_per_minute = 3`, so part of
//! its triggers get 429. Everything else has its limits raised far out of reach. Then
//! `--clients` threads run, over loopback with plain HTTP/1.1, a random mix of hook POSTs with
//! small payloads (new builds and deduplicated ones), API triggers, cancels, log reads, build
//! listings and health checks, until `--duration` has passed. With `--builds N` they only
//! trigger, until N new builds exist (`--duration` is then a cap, 30 min by default), and every
//! command is `true`.
//!
//! At the start, every `--report-every` and at the end it prints the daemon's RSS (VmRSS) and
//! open fds, the size of the sled directory (`state/db`, bytes and allocated blocks), the
//! `logs` and `payloads` dirs, the builds each project lists through the API, and the trigger
//! answers so far: new, deduplicated, 429, other.
//!
//! At the end, once every build has stopped, it checks that each project lists exactly its
//! newest `--keep-builds` builds, that every build answered as new and newer than the oldest
//! listed one is listed, that builds outside the listing answer 404, that no workspace or
//! payload file is left, and that no request failed. Then it floods the daemon with
//! `--connections` connections (10 000 by default, half of them half-open request heads) and
//! checks that `/healthz` still answers within 5 s, and that SIGTERM makes the daemon exit 0.
//! Then it opens the stopped daemon's sled database and counts each tree's entries. It exits
//! non-zero if any check failed.

use std::collections::HashSet;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use rand::Rng as _;
use serde_json::{Value, json};

/// Command-line flags.
#[derive(Parser)]
#[command(about = "Soak test of the release deployhook binary")]
struct Args {
    /// How long the load runs (with --builds: the cap, default 30m).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Retention run: only trigger, until this many new builds exist.
    #[arg(long)]
    builds: Option<u64>,
    /// The daemon's `keep_builds`.
    #[arg(long, default_value_t = 100)]
    keep_builds: usize,
    /// Client threads.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Projects with unreachable rate limits (besides `limited`).
    #[arg(long, default_value_t = 3)]
    projects: usize,
    /// Time between progress reports.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    report_every: Duration,
    /// Connections of the flood phase after the load (0: no flood).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
}

/// An HTTP response: status, `Retry-After`, parsed JSON body (Null when not JSON).
struct Resp {
    status: u16,
    retry_after: Option<String>,
    json: Value,
}

/// One request on its own connection (`Connection: close`); `None` when the connection fails.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<Resp> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut retry_after = None;
    let mut chunked = false;
    for (k, v) in lines.filter_map(|l| l.split_once(':')) {
        if k.eq_ignore_ascii_case("retry-after") {
            retry_after = Some(v.trim().to_string());
        }
        chunked |= k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked");
    }
    let mut body = buf[end + 4..].to_vec();
    if chunked {
        body = dechunk(&body);
    }
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Some(Resp {
        status,
        retry_after,
        json,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..i])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || b.len() < i + 2 + size + 2 {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + size]);
        b = &b[i + 2 + size + 2..];
    }
    out
}

/// Counters shared by the client threads.
#[derive(Default)]
struct Stats {
    triggers: AtomicU64,
    created: AtomicU64,
    deduped: AtomicU64,
    limited: AtomicU64,
    /// Trigger answers other than 200 and a well-formed 429.
    other: AtomicU64,
    cancels: AtomicU64,
    log_reads: AtomicU64,
    listings: AtomicU64,
    /// Failed connections and unexpected statuses of non-trigger requests.
    errors: AtomicU64,
}

/// A build answered as new: its project, uuid and `created_on`.
type Created = (String, String, String);

/// What the client threads share.
struct Shared {
    addr: SocketAddr,
    token: String,
    /// Every project with its hook path.
    hooks: Vec<(String, String)>,
    stats: Stats,
    created: Mutex<Vec<Created>>,
    stop: AtomicBool,
    /// First few unexpected answers, for the report.
    oddities: Mutex<Vec<String>>,
}

impl Shared {
    fn odd(&self, what: String) {
        self.stats.errors.fetch_add(1, Relaxed);
        let mut o = self.oddities.lock().unwrap_or_else(|p| p.into_inner());
        if o.len() < 10 {
            o.push(what);
        }
    }

    fn recent_build(&self, rng: &mut impl rand::Rng) -> Option<String> {
        let c = self.created.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.len();
        (n > 0).then(|| c[n - 1 - rng.random_range(0..n.min(20))].1.clone())
    }

    /// Counts a trigger's answer.
    fn trigger_answer(&self, project: &str, r: Option<Resp>) {
        let s = &self.stats;
        s.triggers.fetch_add(1, Relaxed);
        match r {
            Some(r) if r.status == 200 => {
                let b = &r.json["result"];
                if b["already_exists"] == true {
                    s.deduped.fetch_add(1, Relaxed);
                } else {
                    s.created.fetch_add(1, Relaxed);
                    let field = |k: &str| b[k].as_str().unwrap_or_default().to_string();
                    let mut c = self.created.lock().unwrap_or_else(|p| p.into_inner());
                    c.push((
                        project.to_string(),
                        field("build_uuid"),
                        field("created_on"),
                    ));
                }
            }
            Some(r)
                if r.status == 429
                    && r.json["errors"][0]["code"] == 1429
                    && r.retry_after
                        .as_deref()
                        .and_then(|v| v.parse::<u64>().ok())
                        .is_some_and(|v| (1..=60).contains(&v)) =>
            {
                s.limited.fetch_add(1, Relaxed);
            }
            Some(r) => {
                s.other.fetch_add(1, Relaxed);
                self.odd(format!("trigger {project}: {} {}", r.status, r.json));
            }
            None => {
                s.other.fetch_add(1, Relaxed);
                self.odd(format!("trigger {project}: no answer"));
            }
        }
    }
}

/// One client thread: random requests until told to stop.
fn client(sh: Arc<Shared>, triggers_only: bool) {
    let mut rng = rand::rng();
    let (addr, tok) = (sh.addr, Some(sh.token.as_str()));
    let mut n = 0u64;
    while !sh.stop.load(Relaxed) {
        n += 1;
        let (project, hook) = &sh.hooks[rng.random_range(0..sh.hooks.len())];
        let branch = if rng.random_bool(0.5) {
            "main"
        } else {
            "other"
        };
        let roll = if triggers_only {
            rng.random_range(0..60)
        } else {
            rng.random_range(0..100)
        };
        match roll {
            0..30 => {
                let body = format!("{{\"soak\":{n},\"pad\":\"{}\"}}", "x".repeat(64));
                sh.trigger_answer(project, http(addr, "POST", hook, None, &body));
            }
            30..60 => {
                let body = json!({ "branch": branch }).to_string();
                let path = format!("/api/projects/{project}/builds");
                sh.trigger_answer(project, http(addr, "POST", &path, tok, &body));
            }
            60..70 => {
                let Some(id) = sh.recent_build(&mut rng) else {
                    continue;
                };
                sh.stats.cancels.fetch_add(1, Relaxed);
                match http(addr, "POST", &format!("/api/builds/{id}/cancel"), tok, "") {
                    Some(r) if [200, 404, 409].contains(&r.status) => {}
                    r => sh.odd(format!("cancel: {:?}", r.map(|r| (r.status, r.json)))),
                }
            }
            70..85 => {
                let Some(id) = sh.recent_build(&mut rng) else {
                    continue;
                };
                sh.stats.log_reads.fetch_add(1, Relaxed);
                match http(
                    addr,
                    "GET",
                    &format!("/api/builds/{id}/logs?cursor=0"),
                    tok,
                    "",
                ) {
                    Some(r) if [200, 404].contains(&r.status) => {}
                    r => sh.odd(format!("logs: {:?}", r.map(|r| (r.status, r.json)))),
                }
            }
            85..95 => {
                sh.stats.listings.fetch_add(1, Relaxed);
                let path = format!("/api/projects/{project}/builds?limit=20");
                match http(addr, "GET", &path, tok, "") {
                    Some(r) if r.status == 200 => {}
                    r => sh.odd(format!("list: {:?}", r.map(|r| (r.status, r.json)))),
                }
            }
            _ => match http(addr, "GET", "/healthz", None, "") {
                Some(r) if r.status == 200 => {}
                r => sh.odd(format!("healthz: {:?}", r.map(|r| (r.status, r.json)))),
            },
        }
    }
}

/// (file count, bytes, allocated bytes) of everything under `dir`.
fn dir_size(dir: &Path) -> (u64, u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    let mut total = (0, 0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return total;
    };
    for e in entries.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            let (n, b, a) = dir_size(&e.path());
            total = (total.0 + n, total.1 + b, total.2 + a);
        } else {
            total = (total.0 + 1, total.1 + m.len(), total.2 + m.blocks() * 512);
        }
    }
    total
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

/// VmRSS in KiB and the number of open fds of a process.
fn proc_usage(pid: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

/// Every build a project lists through the API (all pages): (uuid, created_on).
fn list_all(sh: &Shared, project: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let path = format!("/api/projects/{project}/builds?limit=100{cursor}");
        let r = http(sh.addr, "GET", &path, Some(&sh.token), "")?;
        for b in r.json["result"].as_array()? {
            let f = |k: &str| b[k].as_str().unwrap_or_default().to_string();
            out.push((f("build_uuid"), f("created_on")));
        }
        match r.json["result_info"]["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return Some(out),
        }
    }
}

/// Prints one progress line; returns the largest number of builds a project listed.
fn report(label: &str, sh: &Shared, pid: u32, state: &Path) -> usize {
    let (rss, fds) = proc_usage(pid);
    let (db_n, db_b, db_a) = dir_size(&state.join("db"));
    let (log_n, log_b, _) = dir_size(&state.join("logs"));
    let (pay_n, _, _) = dir_size(&state.join("payloads"));
    let listed: Vec<usize> = sh
        .hooks
        .iter()
        .map(|(p, _)| list_all(sh, p).map_or(usize::MAX, |l| l.len()))
        .collect();
    let s = &sh.stats;
    println!(
        "[{label:>7}] rss {} fds {fds} | db {} ({} alloc, {db_n} files) | logs {log_n} files {} | payload files {pay_n} | listed {listed:?}",
        mib(rss * 1024),
        mib(db_b),
        mib(db_a),
        mib(log_b),
    );
    println!(
        "          triggers {} = new {} + dedup {} + 429 {} + other {} | cancels {} log reads {} listings {} errors {}",
        s.triggers.load(Relaxed),
        s.created.load(Relaxed),
        s.deduped.load(Relaxed),
        s.limited.load(Relaxed),
        s.other.load(Relaxed),
        s.cancels.load(Relaxed),
        s.log_reads.load(Relaxed),
        s.listings.load(Relaxed),
        s.errors.load(Relaxed),
    );
    listed.into_iter().max().unwrap_or(0)
}

/// The last lines the daemon wrote to stderr.
type StderrTail = Arc<Mutex<Vec<String>>>;

/// Starts the daemon; returns it, its address, and the tail of its stderr.
fn start_daemon(bin: &Path, config: &Path) -> Result<(Child, SocketAddr, StderrTail), String> {
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let tail = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let tail2 = tail.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on ").nth(1)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(rest.trim().to_string());
            }
            let mut t = tail2.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() == 50 {
                t.remove(0);
            }
            t.push(line);
        }
    });
    match rx
        .recv_timeout(Duration::from_secs(20))
        .ok()
        .and_then(|a| a.parse().ok())
    {
        Some(addr) => Ok((child, addr, tail)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let t = tail.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
            Err(format!("the daemon did not start:\n{t}"))
        }
    }
}

fn config_text(args: &Args, dir: &Path) -> (String, Vec<String>) {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\nlog_level = \"warn,deployhook::daemon=info\"\n\
         keep_builds = {}\nmax_concurrent_builds = 4\nbuilds_per_minute = 1000000\n\
         project_builds_per_minute = 1000000\nkill_grace = \"2s\"\nshutdown_timeout = \"10s\"\n\
         [api]\ntoken_file = \"admin.token\"\n",
        args.keep_builds
    );
    let commands = [
        "true",
        "echo \"build $DEPLOYHOOK_BUILD_UUID\"; for i in 1 2 3 4 5 6 7 8; do echo line $i; done; cat \"$DEPLOYHOOK_PAYLOAD\" 2>/dev/null",
        "echo start; sleep 0.3; echo end",
    ];
    let mut names = Vec::new();
    for i in 0..args.projects {
        let command = if args.builds.is_some() {
            "true"
        } else {
            commands[i % commands.len()]
        };
        names.push(format!("soak-{i}"));
        text.push_str(&format!(
            "[projects.soak-{i}]\nbranches = [\"main\", \"other\"]\nworkdir = {:?}\ncommand = {:?}\n",
            dir.display().to_string(),
            command
        ));
    }
    names.push("limited".into());
    text.push_str(&format!(
        "[projects.limited]\nbranches = [\"main\", \"other\"]\nworkdir = {:?}\ncommand = \"true\"\nproject_builds_per_minute = 3\n",
        dir.display().to_string()
    ));
    (text, names)
}

fn main() {
    let args = Args::parse();
    let failures = match run(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    if failures.is_empty() {
        println!("all checks passed");
    } else {
        for f in &failures {
            println!("CHECK FAILED: {f}");
        }
        std::process::exit(1);
    }
}

/// The whole soak; returns the failed checks.
fn run(args: &Args) -> Result<Vec<String>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("deployhook"))
        .ok_or("cannot locate the target dir")?;
    if !bin.is_file() {
        return Err(format!(
            "{} is missing: run `cargo build --release` first (same CARGO_TARGET_DIR)",
            bin.display()
        ));
    }
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = tmp.path().to_path_buf();
    let state = dir.join("state");
    let (text, names) = config_text(args, &dir);
    let config = dir.join("deploy.toml");
    std::fs::write(&config, text).map_err(|e| e.to_string())?;
    let (mut child, addr, tail) = start_daemon(&bin, &config)?;
    let pid = child.id();
    let result = soak(args, addr, &dir, &state, &names, pid, &mut child);
    if result.is_err() || child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Ok(f) = &result
        && !f.is_empty()
    {
        println!("--- daemon stderr (tail) ---");
        for l in tail.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            println!("{l}");
        }
    }
    result
}

/// The connection flood: `n` connections held open at once, half of them half open (a
/// request head that never ends), then `/healthz` must answer within 5 s, and again once
/// they are closed. The integration suite checks the same with a few hundred connections
/// against a lowered cap; this is the full-size run against the production cap. Returns the
/// failed checks.
fn flood(addr: SocketAddr, n: usize, pid: u32) -> Vec<String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let mut failures = Vec::new();
    // This process holds one end of every connection.
    let n = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((_, hard)) => {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            n.min(hard.saturating_sub(200) as usize)
        }
        Err(_) => n.min(800),
    };
    let opening = Instant::now();
    let mut open = Vec::with_capacity(n);
    for i in 0..n {
        let Ok(mut s) = TcpStream::connect(addr) else {
            break;
        };
        if i % 2 == 0 {
            let _ = s.write_all(b"POST /hooks/dh_x HTTP/1.1\r\nHost: x\r\n");
        }
        open.push(s);
    }
    let opened = open.len();
    let (_, fds) = proc_usage(pid);
    println!(
        "flood: {opened} connections opened in {:.1}s; the daemon holds {fds} fds",
        opening.elapsed().as_secs_f64()
    );
    if opened < n / 2 {
        failures.push(format!("flood: only {opened} of {n} connections opened"));
    }
    let t = Instant::now();
    let r = http(addr, "GET", "/healthz", None, "");
    let took = t.elapsed();
    println!(
        "flood: /healthz answered {:?} in {:.3}s beside {opened} connections",
        r.as_ref().map(|r| r.status),
        took.as_secs_f64()
    );
    if r.as_ref().is_none_or(|r| r.status != 200) || took > Duration::from_secs(5) {
        failures.push(format!(
            "flood: /healthz answered {:?} after {took:?} beside {opened} connections",
            r.map(|r| r.status)
        ));
    }
    let t = Instant::now();
    drop(open);
    match http(addr, "GET", "/healthz", None, "") {
        Some(r) if r.status == 200 => println!(
            "flood: closed; /healthz answered in {:.3}s",
            t.elapsed().as_secs_f64()
        ),
        r => failures.push(format!(
            "flood: /healthz answered {:?} after the flood",
            r.map(|r| r.status)
        )),
    }
    failures
}

fn soak(
    args: &Args,
    addr: SocketAddr,
    dir: &Path,
    state: &Path,
    names: &[String],
    pid: u32,
    child: &mut Child,
) -> Result<Vec<String>, String> {
    let token = std::fs::read_to_string(dir.join("admin.token"))
        .map_err(|e| format!("cannot read the admin token: {e}"))?
        .trim()
        .to_string();
    let mut hooks = Vec::new();
    for p in names {
        let body = json!({"name": "soak", "branch": "main"}).to_string();
        let r = http(
            addr,
            "POST",
            &format!("/api/projects/{p}/hooks"),
            Some(&token),
            &body,
        )
        .filter(|r| r.status == 201)
        .ok_or(format!("cannot create a hook for {p}"))?;
        let url = r.json["result"]["url"].as_str().unwrap_or_default();
        let path = url
            .find("/hooks/")
            .map(|i| url[i..].to_string())
            .ok_or("no hook URL")?;
        hooks.push((p.clone(), path));
    }
    let sh = Arc::new(Shared {
        addr,
        token,
        hooks,
        stats: Stats::default(),
        created: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        oddities: Mutex::new(Vec::new()),
    });
    let mode = match args.builds {
        Some(n) => format!("until {n} new builds"),
        None => "mixed load".to_string(),
    };
    let cap = args.duration.unwrap_or(if args.builds.is_some() {
        Duration::from_secs(1800)
    } else {
        Duration::from_secs(60)
    });
    println!(
        "deployhook pid {pid} on {addr}; {} projects + limited, keep_builds {}, {} clients, {mode}, for at most {}",
        args.projects,
        args.keep_builds,
        args.clients,
        humantime::format_duration(cap)
    );
    let mut failures = Vec::new();
    report("start", &sh, pid, state);

    let started = Instant::now();
    let threads: Vec<_> = (0..args.clients)
        .map(|_| {
            let sh = sh.clone();
            let only = args.builds.is_some();
            std::thread::spawn(move || client(sh, only))
        })
        .collect();
    let mut next_report = started + args.report_every;
    let mut max_listed = 0;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let done = started.elapsed() >= cap
            || args
                .builds
                .is_some_and(|n| sh.stats.created.load(Relaxed) >= n);
        if done {
            break;
        }
        if Instant::now() >= next_report {
            next_report += args.report_every;
            let label = format!("{:.0}s", started.elapsed().as_secs_f64());
            max_listed = max_listed.max(report(&label, &sh, pid, state));
        }
    }
    sh.stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let load_time = started.elapsed();
    println!("load stopped after {:.1}s", load_time.as_secs_f64());
    if max_listed > args.keep_builds + 10 {
        failures.push(format!(
            "a project listed {max_listed} builds during the load (keep_builds {})",
            args.keep_builds
        ));
    }

    // Let every build stop and the last prunes run.
    let quiet = Instant::now() + Duration::from_secs(60);
    loop {
        let h = http(addr, "GET", "/healthz", None, "");
        let idle = h
            .as_ref()
            .is_some_and(|h| h.json["result"]["queued"] == 0 && h.json["result"]["running"] == 0);
        if idle {
            break;
        }
        if Instant::now() > quiet {
            failures.push("builds still queued or running 60 s after the load".into());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let pruned_by = Instant::now() + Duration::from_secs(20);
    while Instant::now() < pruned_by
        && names
            .iter()
            .any(|p| list_all(&sh, p).is_none_or(|l| l.len() > args.keep_builds))
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("idle after {:.1}s", started.elapsed().as_secs_f64());
    report("end", &sh, pid, state);

    // Checks: each project lists its newest keep_builds, the rest is gone.
    let created = std::mem::take(&mut *sh.created.lock().unwrap_or_else(|p| p.into_inner()));
    let mut listed_total = 0;
    let mut gone_checked = 0;
    for p in names {
        let Some(listed) = list_all(&sh, p) else {
            failures.push(format!("cannot list {p}"));
            continue;
        };
        listed_total += listed.len();
        let mine: Vec<&Created> = created.iter().filter(|c| &c.0 == p).collect();
        let want = mine.len().min(args.keep_builds);
        if listed.len() != want {
            failures.push(format!(
                "{p}: lists {} builds, expected {want}",
                listed.len()
            ));
        }
        let ids: HashSet<&str> = listed.iter().map(|l| l.0.as_str()).collect();
        let oldest = listed.iter().map(|l| l.1.as_str()).min().unwrap_or("");
        for c in &mine {
            if !ids.contains(c.1.as_str()) && c.2.as_str() > oldest {
                failures.push(format!("{p}: build {} (created {}) is missing", c.1, c.2));
            }
        }
        let unknown = ids
            .iter()
            .filter(|id| !mine.iter().any(|c| c.1 == **id))
            .count();
        if unknown > 0 {
            failures.push(format!("{p}: lists {unknown} builds nobody was told about"));
        }
        // Pruned builds answer 404 (a sample, to stay bounded).
        for c in mine.iter().filter(|c| !ids.contains(c.1.as_str())).take(50) {
            gone_checked += 1;
            match http(
                sh.addr,
                "GET",
                &format!("/api/builds/{}", c.1),
                Some(&sh.token),
                "",
            ) {
                Some(r) if r.status == 404 => {}
                r => failures.push(format!(
                    "pruned build {} answers {:?}",
                    c.1,
                    r.map(|r| r.status)
                )),
            }
        }
    }
    println!(
        "checked: {} builds created, {listed_total} listed, {gone_checked} pruned ones answer 404",
        created.len()
    );
    let (logs, _, _) = dir_size(&state.join("logs"));
    if logs as usize > listed_total {
        failures.push(format!("{logs} log files for {listed_total} builds"));
    }
    for leftover in ["workspaces", "payloads"] {
        let (n, _, _) = dir_size(&state.join(leftover));
        if n > 0 {
            failures.push(format!("{n} files left in state/{leftover}"));
        }
    }
    let s = &sh.stats;
    if s.other.load(Relaxed) > 0 || s.errors.load(Relaxed) > 0 {
        failures.push(format!(
            "{} odd trigger answers, {} failed requests: {:?}",
            s.other.load(Relaxed),
            s.errors.load(Relaxed),
            sh.oddities.lock().unwrap_or_else(|p| p.into_inner())
        ));
    }
    if s.limited.load(Relaxed) == 0 {
        failures.push("no trigger was rate limited".into());
    }

    if args.connections > 0 {
        failures.extend(flood(addr, args.connections, pid));
    }

    // SIGTERM: a clean exit 0.
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|e| format!("cannot signal the daemon: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st.code(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => break None,
        }
    };
    println!(
        "SIGTERM: exit {code:?} after {:.2}s",
        t.elapsed().as_secs_f64()
    );
    if code != Some(0) {
        failures.push(format!("the daemon exited {code:?} on SIGTERM"));
    }

    // What the stopped daemon left in sled.
    let (db_n, db_b, db_a) = dir_size(&state.join("db"));
    println!(
        "db after exit: {} ({} alloc, {db_n} files)",
        mib(db_b),
        mib(db_a)
    );
    match sled::Config::new().path(state.join("db")).open() {
        Ok(db) => {
            let mut counts = Vec::new();
            for name in [
                "builds",
                "build_index",
                "payloads",
                "rate_events",
                "deliveries",
                "hooks",
            ] {
                counts.push(format!(
                    "{name} {}",
                    db.open_tree(name).map_or(0, |t| t.len())
                ));
            }
            println!("sled entries: {}", counts.join(", "));
            let n = db.open_tree("builds").map_or(0, |t| t.len());
            let idx = db.open_tree("build_index").map_or(0, |t| t.len());
            if n != listed_total || idx != listed_total {
                failures.push(format!(
                    "sled holds {n} builds, {idx} index entries for {listed_total} listed"
                ));
            }
        }
        Err(e) => failures.push(format!("cannot open the stopped daemon's database: {e}")),
    }
    Ok(failures)
}
