//! Test helpers: a real `deployhook serve` on a temp dir and port 0, a tiny blocking HTTP
//! client that can also send hostile bytes, temp Git repositories, and polling helpers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_deployhook");

/// The hidden variable through which tests shorten the daemon's internal timeouts.
pub const TUNABLES: &str = deployhook::tunables::ENV_VAR;

/// A response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The message of the first error of an error envelope.
    pub fn error_message(&self) -> String {
        self.json()["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Asserts an error envelope: the status, the code of its first error, and a message
    /// containing `needle` (an empty needle is in every message). Each failure names `what`
    /// and shows the whole body.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: u64, needle: &str, what: &str) {
        let body = String::from_utf8_lossy(&self.body);
        assert_eq!(self.status, status, "{what}: status of {body}");
        assert_eq!(
            self.json()["errors"][0]["code"],
            code,
            "{what}: code of {body}"
        );
        assert!(
            self.error_message().contains(needle),
            "{what}: message without {needle:?}: {body}"
        );
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends raw bytes, reads the whole answer (the request should say `Connection: close`).
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(bytes).expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf)
}

/// Reads one response with a `Content-Length` from a connection that stays open (keep-alive).
pub fn read_one_response(s: &mut TcpStream) -> Resp {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let len = parse_response(&buf[..end + 4])
                .header("Content-Length")
                .and_then(|v| v.parse::<usize>().ok())
                .expect("a response with a Content-Length");
            if buf.len() >= end + 4 + len {
                return parse_response(&buf[..end + 4 + len]);
            }
        }
        assert!(buf.len() < 1 << 20, "no end to the response");
        match s.read(&mut chunk) {
            Ok(0) => panic!("closed mid-response: {:?}", String::from_utf8_lossy(&buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("{e}: {:?}", String::from_utf8_lossy(&buf)),
        }
    }
}

pub fn parse_response(buf: &[u8]) -> Resp {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no complete response head in {:?}",
                String::from_utf8_lossy(buf)
            )
        });
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..i]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + size]);
        b = &b[i + 2 + size + 2..];
    }
    out
}

/// The bytes of a well-formed one-shot request.
fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A well-formed request.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    raw(addr, &request_bytes(addr, method, path, headers, body))
}

/// Like `request`, but `None` when the connection fails or the answer is cut off (the daemon
/// was killed), instead of panicking.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Resp> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    s.write_all(&request_bytes(addr, method, path, headers, body))
        .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let r = parse_response(&buf);
    serde_json::from_slice::<Value>(&r.body).ok()?;
    Some(r)
}

/// A running daemon on a temp dir.
pub struct Daemon {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub token: String,
    pub stderr: Arc<Mutex<String>>,
    /// The thread that copies the daemon's stderr into `stderr`; done at EOF.
    pub reader: Option<std::thread::JoinHandle<()>>,
    pub _tmp: Option<tempfile::TempDir>,
}

/// The config lines every test daemon gets, before the test's own.
pub fn base_config(dir: &Path) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nkill_grace = \"1s\"\nshutdown_timeout = \"3s\"\nlog_level = \"debug\"\n",
        dir.join("state").display()
    )
}

/// Writes `dir/deploy.toml`: `base_config`, then `server_extra` (more `[server]` lines, which
/// replace the base lines of the same keys), the `[api]` table, then `rest` (projects).
/// Returns its path.
pub fn write_config(dir: &Path, server_extra: &str, rest: &str) -> PathBuf {
    let path = dir.join("deploy.toml");
    let key = |line: &str| {
        line.split('=')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let overridden: Vec<String> = server_extra.lines().map(key).collect();
    let base: String = base_config(dir)
        .lines()
        .filter(|l| !overridden.contains(&key(l)))
        .map(|l| format!("{l}\n"))
        .collect();
    let text = format!("{base}{server_extra}\n[api]\ntoken_file = \"admin.token\"\n{rest}");
    std::fs::write(&path, text).unwrap();
    path
}

/// A simple workdir project named `p` running `command`.
pub fn workdir_project(name: &str, dir: &Path, command: &str, extra: &str) -> String {
    format!(
        "[projects.{name}]\nbranches = [\"main\", \"other\"]\nworkdir = \"{}\"\ncommand = {}\n{extra}\n",
        dir.display(),
        toml_str(command)
    )
}

/// A config dir and a work dir: `deploy.toml` (`write_config` with `server_extra`) holds one
/// project `site` (`workdir_project` with `command`) working in the work dir.
pub fn site_dirs(server_extra: &str, command: &str) -> (tempfile::TempDir, tempfile::TempDir) {
    let (tmp, wd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let project = workdir_project("site", wd.path(), command, "");
    write_config(tmp.path(), server_extra, &project);
    (tmp, wd)
}

pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

impl Daemon {
    /// Starts a daemon whose config is `base_config` + `rest` (`[server]` keys can't be in rest;
    /// use `start_with_server` for those).
    pub fn start(rest: &str) -> Daemon {
        Self::start_with_server("", rest)
    }

    /// Starts a daemon whose one project is a `workdir_project` named `name` running
    /// `command` (with the project lines `extra`) in a fresh work dir, returned with it.
    pub fn start_workdir(name: &str, command: &str, extra: &str) -> (Daemon, tempfile::TempDir) {
        let wd = tempfile::tempdir().unwrap();
        let d = Self::start(&workdir_project(name, wd.path(), command, extra));
        (d, wd)
    }

    /// Like `start`, with extra `[server]` lines.
    pub fn start_with_server(server_extra: &str, rest: &str) -> Daemon {
        Self::start_tuned("", server_extra, rest)
    }

    /// Like `start_with_server`, with the daemon's internal timeouts shortened by `tunables`
    /// (`key=duration,…`, see `deployhook::tunables`), so that a test of a timeout waits
    /// for a short one instead of the production value.
    pub fn start_tuned(tunables: &str, server_extra: &str, rest: &str) -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        write_config(&dir, server_extra, rest);
        let env = [(TUNABLES, tunables)];
        let env: &[(&str, &str)] = if tunables.is_empty() { &[] } else { &env };
        let mut d = Self::spawn(&dir, env).unwrap_or_else(|e| panic!("{e}"));
        d._tmp = Some(tmp);
        d
    }

    /// Starts (or restarts) a daemon on an existing dir holding `deploy.toml`.
    pub fn spawn(dir: &Path, env: &[(&str, &str)]) -> Result<Daemon, String> {
        Self::spawn_limited(dir, env, None)
    }

    /// Like `spawn`, with the open-file limit (soft and hard) lowered to `nofile`, which
    /// lowers the daemon's connection cap (`http::connection_cap`).
    pub fn spawn_limited(
        dir: &Path,
        env: &[(&str, &str)],
        nofile: Option<u32>,
    ) -> Result<Daemon, String> {
        let prefix = nofile.map(|n| format!("ulimit -n {n}"));
        Self::spawn_after(dir, env, prefix.as_deref())
    }

    /// Like `spawn`, with the daemon exec'd by `/bin/sh` after the shell commands `prefix`
    /// (resource limits, ignored signals: both survive the exec).
    pub fn spawn_after(
        dir: &Path,
        env: &[(&str, &str)],
        prefix: Option<&str>,
    ) -> Result<Daemon, String> {
        let config = dir.join("deploy.toml");
        let mut cmd = match prefix {
            None => Command::new(BIN),
            Some(p) => {
                let mut c = Command::new("/bin/sh");
                c.args(["-c", &format!("{p} && exec \"$0\" \"$@\""), BIN]);
                c
            }
        };
        cmd.args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        let reader = std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Text or JSON lines: the address ends at a space or a quote.
                if let Some(rest) = line.split("listening on ").nth(1)
                    && let Some(tx) = tx.take()
                {
                    let addr = rest.split(['"', ' ']).next().unwrap_or_default();
                    let _ = tx.send(addr.trim().to_string());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().map_err(|e| format!("bad address {a}: {e}"))?,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                // The pipe is closed now: the reader has the whole log once it ends.
                let _ = reader.join();
                return Err(format!(
                    "daemon did not start ({status:?}):\n{}",
                    log.lock().unwrap()
                ));
            }
        };
        let token = std::fs::read_to_string(dir.join("admin.token"))
            .map_err(|e| e.to_string())?
            .trim()
            .to_string();
        Ok(Daemon {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
            config,
            token,
            stderr: log,
            reader: Some(reader),
            _tmp: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The daemon's log so far (lines arrive through a pipe: a line the daemon wrote just now
    /// may not be here yet; see `wait_log`, and `wait_exit`, after which the log is whole).
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the log holds `needle`; panics with the log after `secs`.
    pub fn wait_log(&self, needle: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.logs().contains(needle) {
            if Instant::now() > deadline {
                panic!("no {needle:?} in the log after {secs}s:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An admin API call with the token and a JSON body.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let auth = format!("Bearer {}", self.token);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut h = vec![("Authorization", auth.as_str())];
        if !body.is_empty() {
            h.push(("Content-Type", "application/json"));
        }
        request(self.addr, method, path, &h, body.as_bytes())
    }

    pub fn post(&self, path: &str, body: &[u8]) -> Resp {
        request(self.addr, "POST", path, &[], body)
    }

    /// Creates a hook and returns (id, path of its URL).
    pub fn create_hook(&self, project: &str, name: &str, branch: &str) -> (String, String) {
        let r = self.api(
            "POST",
            &format!("/api/projects/{project}/hooks"),
            Some(serde_json::json!({"name": name, "branch": branch})),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        let url = v["result"]["url"].as_str().unwrap().to_string();
        let path = url
            .split_once("/hooks/")
            .map(|(_, t)| format!("/hooks/{t}"))
            .unwrap();
        (v["result"]["id"].as_str().unwrap().to_string(), path)
    }

    /// Triggers through the API; returns the result object.
    pub fn trigger(&self, project: &str, branch: &str) -> Value {
        let r = self.api(
            "POST",
            &format!("/api/projects/{project}/builds"),
            Some(serde_json::json!({"branch": branch})),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["result"].clone()
    }

    /// Triggers through the API; returns the build's uuid.
    pub fn trigger_id(&self, project: &str, branch: &str) -> String {
        self.trigger(project, branch)["build_uuid"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Stops this daemon (SIGKILL with `kill9`, else SIGTERM and a clean exit) and starts a new
    /// one on the same state dir and config.
    pub fn restart(mut self, kill9: bool) -> Daemon {
        let dir = self.dir.clone();
        let tmp = self._tmp.take();
        if kill9 {
            self.kill9();
        } else {
            self.signal("TERM");
            assert_eq!(self.wait_exit(30), Some(0));
        }
        let mut d = Daemon::spawn(&dir, &[]).unwrap_or_else(|e| panic!("{e}"));
        d._tmp = tmp;
        d
    }

    pub fn build(&self, id: &str) -> Value {
        let r = self.api("GET", &format!("/api/builds/{id}"), None);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["result"].clone()
    }

    /// Polls until the build's status is `status`; panics after `secs`.
    pub fn wait_status(&self, id: &str, status: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let b = self.build(id);
            if b["status"] == status {
                return b;
            }
            if Instant::now() > deadline {
                panic!(
                    "build {id} not {status} after {secs}s: {b}\n--- daemon log ---\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// All log lines of a build (paging through; a log of more than 1000 pages, or a
    /// cursor that never ends, fails the test).
    pub fn log_lines(&self, id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = 0;
        for page in 0.. {
            assert!(page < 1000, "build {id}: more than 1000 log pages");
            let r = self.api(
                "GET",
                &format!("/api/builds/{id}/logs?cursor={cursor}"),
                None,
            );
            assert_eq!(r.status, 200);
            let v = r.json();
            let lines = v["result"]["lines"].as_array().unwrap().clone();
            cursor = v["result"]["next_cursor"].as_u64().unwrap();
            let done = v["result"]["done"].as_bool().unwrap();
            let empty = lines.is_empty();
            out.extend(lines);
            if done || empty {
                break;
            }
        }
        out
    }

    pub fn log_text(&self, id: &str, stream: &str) -> String {
        self.log_lines(id)
            .iter()
            .filter(|l| l["stream"] == stream)
            .map(|l| l["line"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the daemon to exit; returns its exit code.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                // Its last lines may still be in the pipe: the log is whole once the reader
                // reaches EOF (soon, as nothing of the daemon's outlives it).
                while self.reader.as_ref().is_some_and(|r| !r.is_finished()) {
                    if Instant::now() > deadline {
                        panic!("the daemon's stderr is still open {secs}s after it exited");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                return st.code();
            }
            if Instant::now() > deadline {
                panic!("daemon did not exit in {secs}s\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.wait_state_dir_unlocked();
        }
    }

    /// Waits until the state dir's lock is free. A killed daemon's lock can outlive it for a
    /// moment: a process it was starting (a supervisor) shares its descriptors until its exec,
    /// and a daemon started meanwhile would refuse the dir as in use (seen 1 run in 5).
    fn wait_state_dir_unlocked(&self) {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.dir.join("state").join("lock");
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(&path) else {
            return;
        };
        let mut file = Some(file);
        eventually(10, "the killed daemon's state dir lock released", || {
            let f = file.take().expect("the lock file");
            match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(_released_on_drop) => true,
                Err((f, _)) => {
                    file = Some(f);
                    false
                }
            }
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Polls until `f` holds; panics with `what` after `secs`.
pub fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits until the daemon has begun its shutdown: it closes its listener once it answers
/// health checks and triggers with 503, so a refused connection proves both.
pub fn wait_listener_closed(d: &Daemon) {
    eventually(10, "the listener closed by the shutdown", || {
        TcpStream::connect(d.addr).is_err()
    });
}

/// Reads pids written one per line into a file.
pub fn pids_in(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// A temp Git repository with one commit on `main`.
pub struct Repo {
    pub dir: tempfile::TempDir,
}

impl Repo {
    pub fn new() -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let r = Repo { dir };
        r.git(&["init", "--quiet", "--initial-branch=main"]);
        r.git(&["config", "user.email", "test@example.com"]);
        r.git(&["config", "user.name", "Test"]);
        r.commit("README", "first\n");
        r
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(self.dir.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Writes a file, commits it, returns the new HEAD SHA.
    pub fn commit(&self, file: &str, content: &str) -> String {
        std::fs::write(self.dir.path().join(file), content).unwrap();
        self.git(&["add", "."]);
        self.git(&["commit", "--quiet", "-m", &format!("update {file}")]);
        self.git(&["rev-parse", "HEAD"])
    }
}

/// Runs the CLI; returns (exit code, stdout, stderr).
pub fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("DEPLOYHOOK_URL")
        .env_remove("DEPLOYHOOK_TOKEN")
        .env_remove("DEPLOYHOOK_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Lowercase hex of the MAC `M` (an `hmac::Hmac<…>`) of `body` under `secret`: how Git hosts
/// sign their webhooks.
pub fn mac_hex<M: hmac::Mac + hmac::KeyInit>(secret: &str, body: &[u8]) -> String {
    let mut m = <M as hmac::KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(body);
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `sha256=<hex HMAC-SHA256>`, as GitHub's `X-Hub-Signature-256` carries it.
pub fn github_signature(secret: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        mac_hex::<hmac::Hmac<sha2::Sha256>>(secret, body)
    )
}
