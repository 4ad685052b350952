//! Benchmark: POST → exec latency of a build, against the floor of a bare process spawn.
//!
//! Run with `cargo run --release --example trigger_latency [BUILDS]` (default 200).
//!
//! It starts the real server in-process on 127.0.0.1:0 with a temp state dir and one workdir
//! project whose command is `exec date +%s%N > stamps/$DEPLOYHOOK_BUILD_UUID`: `date` writes the
//! wall-clock time at which the build's process ran its first instructions. For each build the
//! latency is that stamp minus the time just before the trigger request was written to the
//! socket. Builds run one after another (each waits for the previous to stop).
//!
//! The floors are measured in the same run, alternating with the builds:
//! * `spawn /bin/true`: a bare `tokio::process::Command` spawn of `/bin/true` until `wait`
//!   returns (fork, exec, exit, reap);
//! * `spawn sh -c`: a bare `tokio::process::Command` spawn of exactly what a build runs,
//!   `/bin/sh -c "exec date +%s%N > FILE"`, its stamp minus the time just before `spawn`. A
//!   build must run `/bin/sh -c <command>` (SPEC §2), so any command costs two execs (the
//!   shell, then the program); this floor pays them too, which makes the ratio against it
//!   deployhook's own overhead;
//! * `spawn date`: a bare spawn of `date +%s%N` alone (one exec), for reference.
//!
//! It prints p50/p99 of each and the ratio of the build latency to each floor.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deployhook::config::{Config, SharedConfig};
use deployhook::http::{AppState, serve};
use deployhook::queue::Queue;
use deployhook::runner::RunSettings;
use deployhook::store::Store;
use deployhook::token::AdminToken;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
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

fn post(addr: SocketAddr, path: &str, token: &str, body: &str) -> (u128, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).ok();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let t0 = now_ns();
    s.write_all(req.as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    (t0, out)
}

fn get(addr: SocketAddr, path: &str, token: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn main() {
    // The server re-executes this binary as the per-build supervisor.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .is_some_and(|a| a == deployhook::supervisor::MODE_ARG)
    {
        std::process::exit(deployhook::supervisor::main(&args[2..]));
    }
    let n: usize = args
        .get(1)
        .and_then(|a| a.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let dir = tempfile::tempdir().expect("tempdir");
    let stamps = dir.path().join("stamps");
    std::fs::create_dir_all(&stamps).expect("mkdir");
    let config_text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\nlog_level = \"warn\"\nkeep_builds = 1000\n\
         [api]\ntoken_file = \"admin.token\"\n\
         [projects.bench]\nbranches = [\"main\"]\nworkdir = \"{}\"\ncommand = \"exec date +%s%N > stamps/$DEPLOYHOOK_BUILD_UUID\"\n",
        dir.path().display()
    );
    let config_path = dir.path().join("deploy.toml");
    std::fs::write(&config_path, &config_text).expect("write config");
    let config = Config::load(&config_path).expect("config");

    let (addr, token) = rt.block_on(async {
        let store = Store::open(&config.server.state_dir).expect("store");
        let (admin, _) = deployhook::access::ApiTokens::load(&config, true).expect("token");
        let token = AdminToken::read(&config.api.token_file).expect("token text");
        let settings = RunSettings::from_env(&config.server.state_dir);
        let body_budget = AppState::body_budget(config.server.max_body_bytes);
        let shared = Arc::new(SharedConfig::new(config));
        let metrics = Arc::new(deployhook::metrics::Metrics::new());
        let queue =
            Queue::start(store.clone(), shared.clone(), settings, metrics.clone()).expect("queue");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(AppState {
            config: shared,
            store,
            queue,
            tokens: tokio::sync::RwLock::new(admin),
            shutting_down: AtomicBool::new(false),
            max_connections: 1024,
            local_addr: addr,
            unauthenticated_body_budget: body_budget,
            metrics,
            tunables: deployhook::tunables::Tunables::default(),
            quiet_log: Default::default(),
            outbox: None,
            ui: Default::default(),
            join_answers: Default::default(),
        });
        let (_trigger, watch) = deployhook::shutdown::channel();
        tokio::spawn(serve(listener, state, watch));
        // Keep the trigger alive for the whole run.
        std::mem::forget(_trigger);
        (addr, token)
    });

    let floor_date = |i: usize| -> f64 {
        let path = stamps.join(format!("floor-{i}"));
        let file = std::fs::File::create(&path).expect("create");
        let t0 = now_ns();
        let mut child = rt.block_on(async {
            tokio::process::Command::new("date")
                .arg("+%s%N")
                .stdout(std::process::Stdio::from(file))
                .spawn()
                .expect("spawn date")
        });
        let stamp = read_stamp(&path, Duration::from_secs(5)).expect("floor stamp");
        let _ = rt.block_on(child.wait());
        (stamp.saturating_sub(t0)) as f64 / 1e6
    };
    let floor_sh = |i: usize| -> f64 {
        let path = stamps.join(format!("floor-sh-{i}"));
        let t0 = now_ns();
        let mut child = rt.block_on(async {
            tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("exec date +%s%N > {}", path.display()))
                .spawn()
                .expect("spawn sh")
        });
        let stamp = read_stamp(&path, Duration::from_secs(5)).expect("floor stamp");
        let _ = rt.block_on(child.wait());
        (stamp.saturating_sub(t0)) as f64 / 1e6
    };
    let floor_true = || -> f64 {
        rt.block_on(async {
            let t0 = Instant::now();
            let mut c = tokio::process::Command::new("/bin/true")
                .spawn()
                .expect("spawn true");
            let _ = c.wait().await;
            t0.elapsed().as_secs_f64() * 1e3
        })
    };

    // Warm up (page cache, first sled writes, first supervisor exec).
    for i in 0..5 {
        let _ = floor_date(10_000 + i);
        let _ = floor_sh(10_000 + i);
        let _ = floor_true();
    }
    let mut builds = Vec::with_capacity(n);
    let mut shs = Vec::with_capacity(n);
    let mut dates = Vec::with_capacity(n);
    let mut trues = Vec::with_capacity(n);
    for i in 0..n + 5 {
        let (t0, resp) = post(
            addr,
            "/api/projects/bench/builds",
            &token,
            "{\"branch\":\"main\"}",
        );
        let id = resp
            .split("\"build_uuid\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("no build in {resp}"))
            .to_string();
        let stamp = read_stamp(&stamps.join(&id), Duration::from_secs(10)).expect("build stamp");
        // Wait for the build to stop so the next trigger creates a new one.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !get(addr, &format!("/api/builds/{id}"), &token).contains("\"status\":\"stopped\"") {
            assert!(Instant::now() < deadline, "build {id} did not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
        if i >= 5 {
            builds.push(stamp.saturating_sub(t0) as f64 / 1e6);
            dates.push(floor_date(i));
            shs.push(floor_sh(i));
            trues.push(floor_true());
        }
    }
    let (b50, b99) = (percentile(&mut builds, 0.5), percentile(&mut builds, 0.99));
    let (d50, d99) = (percentile(&mut dates, 0.5), percentile(&mut dates, 0.99));
    let (s50, s99) = (percentile(&mut shs, 0.5), percentile(&mut shs, 0.99));
    let (t50, t99) = (percentile(&mut trues, 0.5), percentile(&mut trues, 0.99));
    println!(
        "{n} builds, sequential, release build, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("POST -> exec (build)            p50 {b50:7.3} ms   p99 {b99:7.3} ms");
    println!(
        "floor: spawn+wait /bin/true      p50 {t50:7.3} ms   p99 {t99:7.3} ms   ratio p50 {:.2}  p99 {:.2}",
        b50 / t50,
        b99 / t99
    );
    println!(
        "floor: spawn sh -c (same cmd)    p50 {s50:7.3} ms   p99 {s99:7.3} ms   ratio p50 {:.2}  p99 {:.2}",
        b50 / s50,
        b99 / s99
    );
    println!(
        "ref:   spawn date (one exec)     p50 {d50:7.3} ms   p99 {d99:7.3} ms   ratio p50 {:.2}  p99 {:.2}",
        b50 / d50,
        b99 / d99
    );
}
