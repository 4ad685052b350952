//! Hostile HTTP clients (../shared/HOSTILE.md, HTTP items).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::util::*;

fn daemon() -> (Daemon, tempfile::TempDir) {
    Daemon::start_workdir("site", "true", "")
}

fn healthy(d: &Daemon) {
    assert_eq!(request(d.addr, "GET", "/healthz", &[], b"").status, 200);
}

/// Waits for the `100 Continue` of a request sent with `Expect: 100-continue`: hyper sends
/// it when the handler starts reading the body, so from then on the request is under way on
/// the daemon's side (its connection busy, its body budget taken).
fn await_continue(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut interim = Vec::new();
    let mut byte = [0u8; 1];
    while !interim.ends_with(b"\r\n\r\n") {
        assert!(interim.len() < 1024, "no end to the interim response");
        match s.read(&mut byte) {
            Ok(1) => interim.push(byte[0]),
            other => panic!(
                "no 100 Continue ({other:?}): {:?}",
                String::from_utf8_lossy(&interim)
            ),
        }
    }
    assert!(
        interim.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
}

/// Reads until EOF or error; returns what arrived and how long it took.
fn read_all(mut s: TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    s.set_read_timeout(Some(limit)).unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    (buf, start.elapsed())
}

/// The header read timeout shortened from 10 s to 1 s: the tests of it wait 1 s, and a
/// connection still open after 8 s proves the timer is not there (or not the one set).
const SHORT_HEADER_TIMEOUT: &str = "header_read_timeout=1s";

#[test]
fn slowloris_and_silent_connections_are_closed_at_the_header_timeout() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start_tuned(
        SHORT_HEADER_TIMEOUT,
        "",
        &workdir_project("site", wd.path(), "true", ""),
    );
    // hyper ignores header_read_timeout without a timer: this proves the timer is there.
    let mut trickle = TcpStream::connect(d.addr).unwrap();
    trickle
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let silent = TcpStream::connect(d.addr).unwrap();
    let (_, waited) = read_all(silent, Duration::from_secs(30));
    assert!(
        waited < Duration::from_secs(8),
        "silent connection kept open {waited:?}"
    );
    // Keep trickling a header line every 100 ms: still cut off, as the whole head is bounded.
    let start = Instant::now();
    let mut closed = false;
    while start.elapsed() < Duration::from_secs(8) {
        if trickle.write_all(b"X-Slow: 1\r\n").is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(closed, "trickled headers kept the connection open");
    healthy(&d);
}

#[test]
fn garbage_and_smuggling_attempts_get_400_or_a_closed_connection() {
    let (d, _wd) = daemon();
    let cases: [&[u8]; 7] = [
        // Bare LF line ends (a smuggling primitive behind a proxy that reads them otherwise).
        b"GET /healthz HTTP/1.1\nHost: x\nConnection: close\n\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\nFoo: bar\nContent-Length: 5\r\n\r\nhelloGET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-tls-hello\r\n\r\n",
        b"POST /hooks/dh_x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /hooks/dh_x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  continued\r\n\r\n",
        b"GET /he\x00althz HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for c in cases {
        let mut s = TcpStream::connect(d.addr).unwrap();
        s.write_all(c).unwrap();
        let (buf, _) = read_all(s, Duration::from_secs(15));
        if !buf.is_empty() {
            let text = String::from_utf8_lossy(&buf);
            // Never a second response: the trailing GET must not be served.
            assert_eq!(
                text.matches("HTTP/1.1 ").count(),
                1,
                "two responses: request smuggled: {text}"
            );
            assert!(
                text.starts_with("HTTP/1.1 400"),
                "{:?} → {text}",
                String::from_utf8_lossy(c)
            );
            if c.windows(18)
                .any(|w| w.eq_ignore_ascii_case(b"Transfer-Encoding:"))
            {
                // Content-Length + Transfer-Encoding: refused, and the connection closed
                // after the answer, so the trailing bytes are never read as a request.
                assert!(
                    text.to_ascii_lowercase().contains("connection: close"),
                    "{text}"
                );
                assert!(
                    text.contains("both Content-Length and Transfer-Encoding"),
                    "{text}"
                );
            }
        }
    }
    healthy(&d);
}

#[test]
fn too_many_or_too_large_headers_are_refused() {
    let (d, _wd) = daemon();
    let mut req = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 0..150 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let r = raw(d.addr, req.as_bytes());
    assert!(r.status == 431 || r.status == 400, "{}", r.status);
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(200_000)
    );
    let mut s = TcpStream::connect(d.addr).unwrap();
    let _ = s.write_all(big.as_bytes());
    let (buf, _) = read_all(s, Duration::from_secs(15));
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    healthy(&d);
}

#[test]
fn odd_paths_get_4xx() {
    let (d, _wd) = daemon();
    for path in [
        "/hooks/../api/projects".to_string(),
        "/api/projects/..%2f..%2fetc/hooks".to_string(),
        "/hooks/%2e%2e%2fx".to_string(),
        format!("/hooks/{}", "x".repeat(5000)),
        format!("/api/projects/{}/builds", "p".repeat(5000)),
        "/api/builds/../../etc/passwd".to_string(),
    ] {
        let auth = format!("Bearer {}", d.token);
        let r = request(d.addr, "GET", &path, &[("Authorization", &auth)], b"");
        assert!((400..500).contains(&r.status), "{path}: {}", r.status);
    }
    healthy(&d);
}

#[test]
fn a_trickled_body_times_out_and_frees_the_connection() {
    // The body timeout shortened from 30 s to 1 s.
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start_tuned(
        "body_read_timeout=1s",
        "",
        &workdir_project("site", wd.path(), "true", ""),
    );
    let (_, path) = d.create_hook("site", "cms", "main");
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc").as_bytes(),
    )
    .unwrap();
    let (buf, waited) = read_all(s, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert!(waited < Duration::from_secs(8), "{waited:?}");
    healthy(&d);
}

#[test]
fn a_flood_of_idle_connections_does_not_lock_out_healthz() {
    let (tmp, _wd) = site_dirs("", "true");
    // nofile 400 → a cap of a few hundred connections (what is free minus a reserve).
    let d = Daemon::spawn_limited(tmp.path(), &[], Some(400)).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("400")),
        "{limits}"
    );
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(d.addr).unwrap();
        if i % 2 == 0 {
            // Half trickle a partial head, half send nothing.
            s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
        }
        idle.push(s);
    }
    // Idle connections are closed to make room: /healthz answers long before the 10 s
    // header timeout would have freed a slot.
    let start = Instant::now();
    let r = request(d.addr, "GET", "/healthz", &[], b"");
    assert_eq!(r.status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    // A connection in the middle of a request is never the one evicted.
    let (_, path) = d.create_hook("site", "cms", "main");
    let mut busy = TcpStream::connect(d.addr).unwrap();
    busy.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    await_continue(&mut busy);
    for _ in 0..200 {
        idle.push(TcpStream::connect(d.addr).unwrap());
    }
    assert_eq!(request(d.addr, "GET", "/healthz", &[], b"").status, 200);
    busy.write_all(b"abcd").unwrap();
    let (buf, _) = read_all(busy, Duration::from_secs(10));
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
}

#[test]
fn unauthenticated_git_bodies_are_bounded_in_memory() {
    let wd = tempfile::tempdir().unwrap();
    std::fs::write(wd.path().join("s"), "secret").unwrap();
    let project = workdir_project(
        "site",
        wd.path(),
        "true",
        &format!("git_secret_file = \"{}\"", wd.path().join("s").display()),
    );
    // 16 MiB Git bodies: the budget for bodies read before authentication is 4 × 16 MiB.
    let d = Daemon::start_with_server("max_git_body_bytes = 16777216", &project);
    // No signature header: refused before a byte of the body is read.
    let s = TcpStream::connect(d.addr).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(b"POST /git/site HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nX-GitHub-Event: push\r\n\r\n").unwrap();
    let (buf, _) = read_all(s, Duration::from_secs(10));
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    // Four slow 16 MiB uploads with a (bogus) signature hold the whole budget...
    let head = "POST /git/site HTTP/1.1\r\nHost: x\r\nContent-Length: 16777216\r\nX-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\n";
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(d.addr).unwrap();
        s.write_all(format!("{head}Expect: 100-continue\r\n\r\n").as_bytes())
            .unwrap();
        // Its body is being read: its 16 MiB are counted.
        await_continue(&mut s);
        s.write_all(&[b'x'; 1000]).unwrap();
        slow.push(s);
    }
    // ...so a fifth is turned away at once instead of growing the daemon's memory.
    let s = TcpStream::connect(d.addr).unwrap();
    let mut w = s.try_clone().unwrap();
    w.write_all(format!("{head}\r\n").as_bytes()).unwrap();
    let (buf, _) = read_all(s, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&buf).to_string();
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("1503"), "{text}");
    // Once they go, there is room again (and the bogus signature gets its 401), as soon as
    // the daemon has seen them close.
    drop(slow);
    eventually(10, "the body budget freed", || {
        let r = request(
            d.addr,
            "POST",
            "/git/site",
            &[
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", "sha256=00"),
            ],
            b"{}",
        );
        assert!(r.status == 401 || r.status == 503, "{}", r.status);
        r.status == 401
    });
}

/// Connections far beyond the cap, half of them half open, do not stop `/healthz`. The cap
/// is lowered (open-file limit 200: about a hundred connections, as the daemon logs) so that
/// a few hundred connections exceed it several times over; `examples/soak.rs` runs the same flood with
/// 10 000 connections against the production cap.
#[test]
fn half_open_connections_far_beyond_the_cap_do_not_stop_healthz() {
    const FLOOD: usize = 500;
    let (_dirs, d, cap) = capped_daemon("true");
    assert!(3 * cap <= FLOOD, "a cap of {cap} is not far below {FLOOD}");
    let mut flood = Vec::with_capacity(FLOOD);
    let opening = Instant::now();
    // Connects that waited for a SYN retransmission: the kernel dropped the first SYN
    // because the listen backlog was full (it was 128 once; see `http::bind`).
    let mut retried = vec![];
    for i in 0..FLOOD {
        let connecting = Instant::now();
        let mut s = TcpStream::connect(d.addr).expect("connect");
        if connecting.elapsed() >= Duration::from_millis(900) {
            retried.push(i);
        }
        if i % 2 == 0 {
            // Half open: a request head that never ends.
            let _ = s.write_all(b"POST /hooks/dh_x HTTP/1.1\r\nHost: x\r\n");
        }
        flood.push(s);
    }
    eprintln!("opened {FLOOD} connections in {:?}", opening.elapsed());
    // Not a timing target: a second is what a dropped SYN costs, so a connect that took
    // that long was dropped, whatever the machine's load.
    assert!(
        retried.is_empty(),
        "connects dropped by a full backlog: {retried:?}"
    );
    let start = Instant::now();
    let r = request(d.addr, "GET", "/healthz", &[], b"");
    let took = start.elapsed();
    eprintln!("/healthz answered in {took:?} beside {FLOOD} connections");
    assert_eq!(r.status, 200);
    // HOSTILE 7: within a second (the answer did not wait for a slot to time out).
    assert!(took < Duration::from_secs(1), "{took:?}");
    // The flood did exceed the cap: the daemon closed the connections it evicted.
    let mut open: Vec<TcpStream> = flood;
    for s in &open {
        s.set_nonblocking(true).unwrap();
    }
    // Sooner than the header timeout (10 s) would have closed them.
    eventually(6, "evicted connections closed", || {
        open.retain_mut(|s| {
            let mut b = [0u8; 64];
            match s.read(&mut b) {
                Ok(0) => false,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                Err(_) => false,
                Ok(_) => true,
            }
        });
        open.len() <= cap
    });
    let flood = open;
    drop(flood);
    healthy(&d);
}

/// Connections that wait in the listen backlog when a stop begins (the server was at its
/// connection cap with every connection in a request) are answered, 503 "shutting down",
/// not reset by the closing listener. The full-disk stop met this: two triggers of 137 got
/// no answer at all.
#[test]
fn connections_waiting_in_the_backlog_at_a_stop_are_answered() {
    const WAITING: usize = 12;
    let (_dirs, d, cap) = capped_daemon("sleep 60");
    // A running build keeps the stop draining (shutdown_timeout, 3 s in tests).
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "running", 10);
    let busy = every_slot_busy(&d, cap);
    let mut waiting = requests_in_the_backlog(&d, WAITING);
    d.signal("TERM");
    for (i, s) in waiting.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = read_one_response(s);
        assert_eq!(r.status, 503, "waiting connection {i}: {:?}", r);
    }
    drop(busy);
}

/// Requests that wait in the listen backlog while the server is at its connection cap are
/// all answered once slots free up. Making room at the cap closed the oldest connection
/// "between requests", and one just accepted whose request had not been read yet counted as
/// one: it was closed with its request unread (a reset), which a burst of real requests met
/// in about one burst in three. Here every request is in its socket before the server
/// accepts it, so no timing of the client's matters.
#[test]
fn requests_waiting_beyond_the_connection_cap_are_all_answered() {
    let (_dirs, d, cap) = capped_daemon("true");
    let busy = every_slot_busy(&d, cap);
    let mut waiting = requests_in_the_backlog(&d, 2 * cap);
    // The busy requests end (their clients go away): the server accepts the waiting ones.
    drop(busy);
    for (i, s) in waiting.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let read = s.read_to_end(&mut buf);
        assert!(
            !buf.is_empty(),
            "request {i} of {} (cap {cap}) got no answer: {read:?}",
            2 * cap
        );
        assert_eq!(parse_response(&buf).status, 200, "request {i}");
    }
}

/// A client that connected before a stop but whose request comes a moment later (a busy
/// machine delays its write) is answered, not met with a closed connection: the full-disk
/// test lost 1 trigger in about 10 suite runs beside a CPU hog that way.
#[test]
fn a_request_written_just_after_the_stop_began_is_answered() {
    let (tmp, _wd) = site_dirs("", "true");
    let mut d = Daemon::spawn(tmp.path(), &[]).unwrap();
    let mut late = TcpStream::connect(d.addr).expect("connect");
    // Accepted and waiting for its head before the stop begins.
    assert_eq!(request(d.addr, "GET", "/healthz", &[], b"").status, 200);
    d.signal("TERM");
    d.wait_log("shutting down", 10);
    // The write comes late (the scenario itself, not a wait for readiness): well after a stop
    // without builds has begun closing, well within the grace.
    std::thread::sleep(Duration::from_millis(300));
    late.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    late.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = read_one_response(&mut late);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert_eq!(d.wait_exit(20), Some(0));
}

/// A daemon of one project running `command` at open-file limit 200, and the connection
/// cap it logged at start (about a hundred). The directories come first, so that a test
/// binding all three drops the daemon before them.
fn capped_daemon(command: &str) -> ((tempfile::TempDir, tempfile::TempDir), Daemon, usize) {
    let (tmp, wd) = site_dirs("", command);
    let d = Daemon::spawn_limited(tmp.path(), &[], Some(200)).unwrap();
    let cap = d
        .logs()
        .lines()
        .find(|l| l.contains("connections (open-file limit"))
        .and_then(|l| l.split("at most ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no connection cap in the log:\n{}", d.logs()));
    ((tmp, wd), d, cap)
}

/// Fills every connection slot of `d` (its cap is `cap`) with a request whose body has not
/// all arrived: the server accepts no more connections until these end. Each is confirmed
/// busy by the `100 Continue` the server sends when the handler starts reading the body; one
/// whose head came too late (a loaded machine delays the test thread between connect and
/// write) may have been closed as idle first, and is replaced.
fn every_slot_busy(d: &Daemon, cap: usize) -> Vec<TcpStream> {
    let busy_head = format!(
        "POST /api/projects/site/builds HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n",
        d.token
    );
    let mut busy = Vec::with_capacity(cap);
    let mut replaced = 0;
    while busy.len() < cap {
        assert!(
            replaced < cap,
            "{replaced} connections were closed before their head was read"
        );
        let mut s = TcpStream::connect(d.addr).expect("connect");
        s.write_all(busy_head.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 25];
        match s.read_exact(&mut b) {
            Ok(()) if b.starts_with(b"HTTP/1.1 100 Continue") => busy.push(s),
            Ok(()) => panic!("not a 100 Continue: {:?}", String::from_utf8_lossy(&b)),
            Err(_) => replaced += 1,
        }
    }
    busy
}

/// Opens `n` connections that each send a whole `GET /healthz` while every slot is busy (see
/// [`every_slot_busy`]): they wait in the listen backlog with their request in the socket.
fn requests_in_the_backlog(d: &Daemon, n: usize) -> Vec<TcpStream> {
    let mut waiting: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(d.addr).expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    let last = &mut waiting[n - 1];
    last.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 64];
    let early = last.read(&mut b);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the last connection was answered while every slot was busy (was a busy one closed to make room?): {early:?} {:?}",
        String::from_utf8_lossy(&b[..early.as_ref().map_or(0, |n| *n)])
    );
    waiting
}
