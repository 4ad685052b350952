//! The outbox (SPEC §5): notifications and commit statuses leave the daemon through local
//! receivers on 127.0.0.1 that record every request and answer as each test says.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

/// How a receiver answers one request.
#[derive(Debug, Clone, Copy)]
enum Ans {
    Status(u16),
    /// Reads the request and never answers.
    Hang,
    /// 200, then an endless body (counts what it could write in `sent`).
    Huge,
    /// A status line, then one byte a second, forever.
    Trickle,
}

/// One recorded request.
#[derive(Debug, Clone)]
struct Req {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    at: Instant,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A tiny HTTP/1.1 receiver: one thread per connection, answers from a script, then the
/// default.
struct Receiver {
    addr: SocketAddr,
    /// Body bytes written by `Huge` answers.
    sent: Arc<std::sync::atomic::AtomicU64>,
    reqs: Arc<Mutex<Vec<Req>>>,
    script: Arc<Mutex<VecDeque<Ans>>>,
    default: Arc<Mutex<Ans>>,
}

/// A request as read: path, headers, body.
type Raw = (String, Vec<(String, String)>, Vec<u8>);

fn read_request(s: &mut impl Read) -> Option<Raw> {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((path, headers, body))
}

impl Receiver {
    fn start(default: Ans) -> Receiver {
        Self::start_with(default, |s| Box::new(s) as Box<dyn ReadWrite>)
    }

    fn start_with(
        default: Ans,
        wrap: impl Fn(TcpStream) -> Box<dyn ReadWrite> + Send + Sync + 'static,
    ) -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let rcv = Receiver {
            addr: l.local_addr().unwrap(),
            sent: Default::default(),
            reqs: Default::default(),
            script: Default::default(),
            default: Arc::new(Mutex::new(default)),
        };
        let (reqs, script, def) = (rcv.reqs.clone(), rcv.script.clone(), rcv.default.clone());
        let sent = rcv.sent.clone();
        let wrap = Arc::new(wrap);
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (reqs, script, def, wrap) =
                    (reqs.clone(), script.clone(), def.clone(), wrap.clone());
                let sent = sent.clone();
                std::thread::spawn(move || {
                    let mut s = wrap(s);
                    let Some((path, headers, body)) = read_request(&mut s) else {
                        return;
                    };
                    let ans = script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or(*def.lock().unwrap());
                    reqs.lock().unwrap().push(Req {
                        path,
                        headers,
                        body,
                        at: Instant::now(),
                    });
                    match ans {
                        Ans::Status(code) => {
                            let extra = if (300..400).contains(&code) {
                                "Location: http://127.0.0.1:9/elsewhere\r\n"
                            } else {
                                ""
                            };
                            let _ = write!(
                                s,
                                "HTTP/1.1 {code} X\r\n{extra}Content-Length: 2\r\nConnection: close\r\n\r\nok"
                            );
                            let _ = s.flush();
                        }
                        Ans::Hang => std::thread::sleep(Duration::from_secs(600)),
                        Ans::Huge => {
                            let _ =
                                write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n");
                            let chunk = vec![b'x'; 64 * 1024];
                            while s.write_all(&chunk).is_ok() {
                                sent.fetch_add(
                                    chunk.len() as u64,
                                    std::sync::atomic::Ordering::Relaxed,
                                );
                            }
                        }
                        Ans::Trickle => {
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n");
                            for _ in 0..600 {
                                if s.write_all(b"X").and_then(|_| s.flush()).is_err() {
                                    break;
                                }
                                std::thread::sleep(Duration::from_secs(1));
                            }
                        }
                    }
                });
            }
        });
        rcv
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    fn requests(&self) -> Vec<Req> {
        self.reqs.lock().unwrap().clone()
    }

    fn wait_for(&self, n: usize, secs: u64) -> Vec<Req> {
        eventually(secs, &format!("{n} requests at the receiver"), || {
            self.requests().len() >= n
        });
        self.requests()
    }
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

/// A daemon in a temp dir with `rest` as config, started with test-only `env`.
fn daemon_env(dir: &tempfile::TempDir, rest: &str, env: &[(&str, &str)]) -> Daemon {
    write_config(dir.path(), "", rest);
    Daemon::spawn(dir.path(), env).unwrap_or_else(|e| panic!("{e}"))
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A daemon whose project `site` fails (exit 3) and whose sink `ops` tells `rcv` of failed
/// builds, its retry schedule divided by `scale`; one build of main, whose id is returned, has
/// failed.
fn a_failed_build_told_to(rcv: &Receiver, scale: &str) -> (Daemon, tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    let rest = format!(
        "{}{}",
        json_sink("ops", &rcv.url("http"), "[\"failed\"]", tmp.path()),
        workdir_project("site", tmp.path(), "exit 3", "")
    );
    let d = daemon_env(&tmp, &rest, &[("DEPLOYHOOK_TEST_OUTBOX_SCALE", scale)]);
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "stopped", 30);
    (d, tmp, id)
}

fn json_sink(name: &str, url: &str, events: &str, dir: &Path) -> String {
    std::fs::write(dir.join(format!("{name}.whsec")), format!("{SECRET}\n")).unwrap();
    format!(
        "[notify.{name}]\nurl = {}\nsecret_file = \"{name}.whsec\"\nevents = {events}\n",
        toml_str(url)
    )
}

/// Verifies a request with the independent `standardwebhooks` crate.
fn verify(r: &Req) {
    verify_with(SECRET, r)
}

fn verify_with(secret: &str, r: &Req) {
    let wh = standardwebhooks::Webhook::new(secret).unwrap();
    let mut h = http::HeaderMap::new();
    for (k, v) in &r.headers {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    wh.verify(&r.body, &h)
        .unwrap_or_else(|e| panic!("signature does not verify: {e:?} {:?}", r.headers));
}

fn notifications(d: &Daemon) -> Vec<Value> {
    d.api("GET", "/api/notifications?limit=100", None).json()["result"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn json_notifications_are_signed_and_say_started_failed_and_recovered() {
    let rcv = Receiver::start(Ans::Status(200));
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let rest = format!(
        "{}{}",
        json_sink(
            "ops",
            &rcv.url("http"),
            "[\"started\", \"succeeded\", \"failed\", \"recovered\"]",
            tmp.path()
        ),
        workdir_project(
            "site",
            &work,
            "echo line-one; echo boom >&2; test -f ok",
            ""
        )
    );
    // Tokens limited to a project see only its deliveries; test sends are for unlimited admins.
    let rest = format!(
        "{rest}{}[api.tokens.ro]\ntoken_file = \"ro.token\"\nscope = \"read\"\nprojects = [\"blog\"]\n[api.tokens.siteadmin]\ntoken_file = \"sa.token\"\nscope = \"admin\"\nprojects = [\"site\"]\n",
        workdir_project("blog", &work, "true", "")
    );
    let d = daemon_env(&tmp, &rest, &[]);
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "stopped", 30);
    let reqs = rcv.wait_for(2, 30);
    for r in &reqs {
        verify(r);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r.header("user-agent").unwrap().starts_with("deployhook/"));
    }
    let types: Vec<String> = reqs
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, ["build.started", "build.failed"]);
    let failed = reqs[1].json();
    assert_eq!(failed["data"]["build"]["build_uuid"], id.as_str());
    assert_eq!(failed["data"]["build"]["build_outcome"], "fail");
    let tail: Vec<&str> = failed["data"]["log_tail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    assert!(
        tail.contains(&"boom") && tail.contains(&"line-one"),
        "{tail:?}"
    );
    assert!(
        failed["data"]["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/ui/builds/{id}"))
    );
    // The next success of the same target is a recovery (sent instead of `succeeded`).
    std::fs::write(work.join("ok"), "").unwrap();
    let id2 = d.trigger_id("site", "main");
    d.wait_status(&id2, "stopped", 30);
    let reqs = rcv.wait_for(4, 30);
    assert_eq!(reqs[3].json()["type"], "build.recovered");
    verify(&reqs[3]);
    // And the one after that is a plain success.
    let id3 = d.trigger_id("site", "main");
    d.wait_status(&id3, "stopped", 30);
    let reqs = rcv.wait_for(6, 30);
    assert_eq!(reqs[5].json()["type"], "build.succeeded");
    // The listing shows them delivered, newest first.
    let list = notifications(&d);
    assert_eq!(list.len(), 6);
    assert!(
        list.iter().all(|e| e["status"] == "delivered"
            && e["kind"] == "notification"
            && e["sink"] == "ops")
    );
    assert_eq!(list[0]["event"], "succeeded");
    assert_eq!(list[0]["build_uuid"], id3.as_str());
    let with = |file: &str, method: &str, path: &str, body: &[u8]| {
        let t = std::fs::read_to_string(tmp.path().join(file)).unwrap();
        let auth = format!("Bearer {}", t.trim());
        request(
            d.addr,
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    };
    let r = with("ro.token", "GET", "/api/notifications", b"");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["result"],
        serde_json::json!([]),
        "blog's token sees none of site's"
    );
    let r = with("sa.token", "GET", "/api/notifications?limit=100", b"");
    assert_eq!(r.json()["result"].as_array().unwrap().len(), 6);
    let r = with(
        "sa.token",
        "POST",
        "/api/notifications/test",
        br#"{"sink": "ops"}"#,
    );
    r.assert_error(
        403,
        1403,
        "",
        "an admin token limited to projects cannot send tests",
    );
    let r = with(
        "ro.token",
        "POST",
        "/api/notifications/test",
        br#"{"sink": "ops"}"#,
    );
    assert_eq!(r.status, 403);
}

#[test]
fn failures_are_retried_on_the_schedule_then_delivered_or_failed() {
    let rcv = Receiver::start(Ans::Status(200));
    rcv.script.lock().unwrap().extend([
        Ans::Status(500),
        Ans::Status(429),
        Ans::Status(408),
        Ans::Status(200),
    ]);
    // Test-only: the schedule divided by 100 (50 ms, 300 ms, 1.2 s, ...).
    let (d, _tmp, id) = a_failed_build_told_to(&rcv, "100");
    // A second failure while the first is being retried waits behind it (order per sink).
    rcv.wait_for(1, 30);
    let id2 = d.trigger_id("site", "main");
    d.wait_status(&id2, "stopped", 30);
    let all = rcv.wait_for(5, 60);
    let builds: Vec<String> = all
        .iter()
        .map(|r| {
            r.json()["data"]["build"]["build_uuid"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        builds,
        [id.clone(), id.clone(), id.clone(), id.clone(), id2.clone()],
        "in creation order per sink"
    );
    let reqs: Vec<Req> = all[..4].to_vec();
    // One entry: the same webhook-id and timestamp every time, signature per attempt.
    let ids: Vec<&str> = reqs
        .iter()
        .map(|r| r.header("webhook-id").unwrap())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert!(
        reqs.iter()
            .all(|r| r.json()["timestamp"] == reqs[0].json()["timestamp"])
    );
    reqs.iter().for_each(verify);
    let gaps: Vec<Duration> = reqs.windows(2).map(|w| w[1].at - w[0].at).collect();
    // 5 s, 30 s, 2 min scaled by 1/100.
    assert!(gaps[0] >= Duration::from_millis(45), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(290), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(1190), "{gaps:?}");
    eventually(10, "delivered", || {
        notifications(&d).iter().all(|e| e["status"] == "delivered")
    });
    let list = notifications(&d);
    assert_eq!(list[1]["build_uuid"], id.as_str());
    assert_eq!(list[1]["attempts"], 4);
    assert_eq!(list[0]["attempts"], 1);
    let m = String::from_utf8(d.api("GET", "/metrics", None).body).unwrap();
    assert!(
        m.contains("deployhook_notifications_total{sink=\"ops\",result=\"retried\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("deployhook_notifications_total{sink=\"ops\",result=\"delivered\"} 2"),
        "{m}"
    );
    assert!(m.contains("deployhook_outbox_pending 0"), "{m}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rcv.requests().len(), 5, "nothing after the delivery");

    // A 4xx (not 408/429) and a 3xx fail at once, logged once, never retried.
    for code in [400u16, 301] {
        let before = rcv.requests().len();
        rcv.script.lock().unwrap().push_back(Ans::Status(code));
        let id = d.trigger_id("site", "main");
        d.wait_status(&id, "stopped", 30);
        eventually(10, "failed", || notifications(&d)[0]["status"] == "failed");
        let e = &notifications(&d)[0];
        assert_eq!(e["attempts"], 1, "{e}");
        assert!(
            e["last_error"]
                .as_str()
                .unwrap()
                .contains(&code.to_string()),
            "{e}"
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            rcv.requests().len(),
            before + 1,
            "HTTP {code} is not retried"
        );
    }
    eventually(5, "failures logged", || {
        d.logs().matches("notification failed").count() == 2
    });
}

#[test]
fn a_receiver_failing_for_24h_is_given_up() {
    let rcv = Receiver::start(Ans::Status(503));
    // Divided by 20 000: 24 h is 4.32 s; hourly retries every 180 ms after the first five.
    let (d, _tmp, _) = a_failed_build_told_to(&rcv, "20000");
    eventually(30, "failed", || notifications(&d)[0]["status"] == "failed");
    let n = rcv.requests().len();
    // Tries at 0, 5 s, 35 s, 2 m 35 s, 12 m 35 s, 42 m 35 s, then hourly while under 24 h:
    // 29 in all (fewer only if the loaded machine stretched the scaled waits).
    assert!((20..=29).contains(&n), "{n} attempts");
    let e = &notifications(&d)[0];
    assert!(
        e["last_error"].as_str().unwrap().contains("HTTP 503"),
        "{e}"
    );
    // Logged once (the line reaches the test through a pipe: wait for it, then make sure no
    // second one follows).
    eventually(10, "the failure logged", || {
        d.logs().contains("notification failed")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.logs().matches("notification failed").count(), 1);
}

/// The build's stored outcome and the notifications a receiver got agree across `kill -9`:
/// whichever state the store kept, its notification is delivered after the restart.
#[test]
fn kill9_between_the_change_and_its_delivery_loses_no_entry() {
    let rcv = Receiver::start(Ans::Hang);
    let tmp = tempfile::tempdir().unwrap();
    let rest = format!(
        "{}{}",
        json_sink(
            "ops",
            &rcv.url("http"),
            "[\"failed\", \"interrupted\"]",
            tmp.path()
        ),
        workdir_project("site", tmp.path(), "exit 4", "")
    );
    let d = daemon_env(&tmp, &rest, &[]);
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "stopped", 30);
    // The receiver holds the first attempt: the entry is written and not delivered.
    rcv.wait_for(1, 30);
    let mut d = d;
    d.kill9();
    *rcv.default.lock().unwrap() = Ans::Status(200);
    let d = Daemon::spawn(tmp.path(), &[]).unwrap();
    let b = d.build(&id);
    let want = match b["build_outcome"].as_str().unwrap() {
        "fail" => "build.failed",
        _ => "build.interrupted",
    };
    eventually(30, "redelivered", || {
        rcv.requests()
            .iter()
            .skip(1)
            .any(|r| r.json()["type"] == want)
    });
    let again = rcv
        .requests()
        .into_iter()
        .skip(1)
        .find(|r| r.json()["type"] == want)
        .unwrap();
    verify(&again);
    assert_eq!(again.json()["data"]["build"]["build_uuid"], id.as_str());
    eventually(10, "delivered", || {
        notifications(&d).iter().any(|e| e["status"] == "delivered")
    });
}

fn status_project(
    name: &str,
    repo: &Path,
    provider: &str,
    api: &str,
    dir: &Path,
    command: &str,
) -> String {
    std::fs::write(dir.join("status.token"), "s3cret-token\n").unwrap();
    format!(
        "[projects.{name}]\nbranches = [\"main\"]\nrepo = \"{}\"\ncommand = {}\n\n[projects.{name}.status]\nprovider = \"{provider}\"\nrepo = \"acme/site\"\ntoken_file = \"status.token\"\napi_url = {}\n",
        repo.display(),
        toml_str(command),
        toml_str(api)
    )
}

/// Statuses per SHA, in the order they arrived: (state, description, target_url).
fn statuses_of(rcv: &Receiver, sha: &str) -> Vec<(String, String, String)> {
    rcv.requests()
        .iter()
        .filter(|r| r.path.contains(sha))
        .map(|r| {
            let j = r.json();
            let s = |k: &str| j[k].as_str().unwrap_or_default().to_string();
            (
                s("state"),
                s("description"),
                if j.get("target_url").is_some() {
                    s("target_url")
                } else {
                    s("url")
                },
            )
        })
        .collect()
}

#[test]
fn a_superseded_sha_stays_pending_then_takes_the_newer_builds_state_github() {
    let rcv = Receiver::start(Ans::Status(201));
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new();
    let c1 = repo.git(&["rev-parse", "HEAD"]);
    let gate = tmp.path().join("gate");
    // The first build waits for the gate file; the second runs straight through.
    let cmd = format!(
        "if [ ! -f {0} ]; then touch {0}; sleep 30; fi; true",
        gate.display()
    );
    let rest = status_project(
        "site",
        repo.path(),
        "github",
        &rcv.url("http"),
        tmp.path(),
        &cmd,
    );
    let d = daemon_env(&tmp, &rest, &[]);
    let a = d.trigger_id("site", "main");
    d.wait_status(&a, "running", 30);
    eventually(30, "running status of c1", || {
        statuses_of(&rcv, &c1).iter().any(|s| s.1 == "running")
    });
    let c2 = repo.commit("two", "2\n");
    let b = d.trigger_id("site", "main");
    d.wait_status(&b, "stopped", 60);
    assert_eq!(d.build(&b)["build_outcome"], "success");
    assert_eq!(d.build(&a)["cancel_reason"], "superseded");
    eventually(30, "final statuses", || {
        statuses_of(&rcv, &c1)
            .last()
            .is_some_and(|s| s.0 == "success")
            && statuses_of(&rcv, &c2)
                .last()
                .is_some_and(|s| s.0 == "success")
    });
    let link_a = format!("/ui/builds/{a}");
    let link_b = format!("/ui/builds/{b}");
    let s1 = statuses_of(&rcv, &c1);
    assert_eq!(s1.len(), 3, "{s1:?}");
    assert_eq!((s1[0].0.as_str(), s1[0].1.as_str()), ("pending", "running"));
    assert!(s1[0].2.ends_with(&link_a));
    assert_eq!(s1[1].0, "pending");
    assert_eq!(s1[1].1, format!("superseded by build {}", &b[..8]));
    assert_eq!(s1[2].0, "success");
    assert!(s1[2].1.starts_with("succeeded in "), "{s1:?}");
    assert!(
        s1[2].2.ends_with(&link_b),
        "a superseded SHA links the build that shipped it"
    );
    let s2 = statuses_of(&rcv, &c2);
    assert_eq!(
        s2.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        ["pending", "success"]
    );
    // The request shape of GitHub.
    let r = rcv
        .requests()
        .into_iter()
        .find(|r| r.path.contains(&c2))
        .unwrap();
    assert_eq!(r.path, format!("/repos/acme/site/statuses/{c2}"));
    assert_eq!(r.header("authorization"), Some("Bearer s3cret-token"));
    let j = r.json();
    let mut keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["context", "description", "state", "target_url"]);
    assert_eq!(j["context"], "deployhook");
    // Each request the receiver answered is counted once the daemon has read the answer.
    eventually(10, "statuses counted", || {
        let m = String::from_utf8(d.api("GET", "/metrics", None).body).unwrap();
        let delivered = m
            .lines()
            .find_map(|l| {
                l.strip_prefix(
                    "deployhook_commit_statuses_total{project=\"site\",result=\"delivered\"} ",
                )
            })
            .and_then(|n| n.parse::<u64>().ok());
        delivered == Some(rcv.requests().len() as u64)
    });
    // Listed with the provider as sink and the state sent as event; the token never shows.
    let list = notifications(&d);
    assert!(
        list.iter()
            .all(|e| e["kind"] == "commit_status" && e["sink"] == "github")
    );
    assert!(!d.logs().contains("s3cret-token"));
    assert!(
        !d.api("GET", "/api/notifications?limit=100", None)
            .json()
            .to_string()
            .contains("s3cret")
    );
}

#[test]
fn each_provider_gets_its_request_shape_and_state_words() {
    let rcv = Receiver::start(Ans::Status(200));
    let repo = Repo::new();
    let sha = repo.git(&["rev-parse", "HEAD"]);
    for (provider, path, auth_header, auth, keys, final_word) in [
        (
            "gitea",
            format!("/api/v1/repos/acme/site/statuses/{sha}"),
            "authorization",
            "token s3cret-token",
            vec!["context", "description", "state", "target_url"],
            "failure",
        ),
        (
            "forgejo",
            format!("/api/v1/repos/acme/site/statuses/{sha}"),
            "authorization",
            "token s3cret-token",
            vec!["context", "description", "state", "target_url"],
            "failure",
        ),
        (
            "gitlab",
            format!("/api/v4/projects/acme%2Fsite/statuses/{sha}"),
            "private-token",
            "s3cret-token",
            vec!["description", "name", "state", "target_url"],
            "failed",
        ),
        (
            "bitbucket",
            format!("/2.0/repositories/acme/site/commit/{sha}/statuses/build"),
            "authorization",
            "Bearer s3cret-token",
            vec!["description", "key", "state", "url"],
            "FAILED",
        ),
        (
            "bitbucket-server",
            format!("/rest/build-status/1.0/commits/{sha}"),
            "authorization",
            "Bearer s3cret-token",
            vec!["description", "key", "state", "url"],
            "FAILED",
        ),
    ] {
        rcv.reqs.lock().unwrap().clear();
        let tmp = tempfile::tempdir().unwrap();
        let rest = status_project(
            "site",
            repo.path(),
            provider,
            &rcv.url("http"),
            tmp.path(),
            "echo x; exit 1",
        );
        let mut d = daemon_env(&tmp, &rest, &[]);
        let id = d.trigger_id("site", "main");
        d.wait_status(&id, "stopped", 30);
        eventually(30, "final status", || {
            rcv.requests()
                .iter()
                .any(|r| r.json()["state"] == final_word)
        });
        let reqs = rcv.requests();
        for r in &reqs {
            assert_eq!(r.path, path, "{provider}");
            assert_eq!(r.header(auth_header), Some(auth), "{provider}");
            let j = r.json();
            let mut k: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
            k.sort();
            assert_eq!(k, keys, "{provider}");
        }
        let last = reqs.last().unwrap().json();
        assert_eq!(last["state"], final_word, "{provider}");
        assert!(
            last["description"]
                .as_str()
                .unwrap()
                .starts_with("failed with exit code 1 after "),
            "{last}"
        );
        d.signal("TERM");
        d.wait_exit(30);
    }
}

/// A receiver that never answers costs builds nothing: the same builds take as long with it
/// as without any sink.
#[test]
fn a_receiver_that_never_answers_does_not_delay_builds() {
    const N: usize = 15;
    let run = |with_sink: bool| -> Duration {
        let rcv = Receiver::start(Ans::Hang);
        let tmp = tempfile::tempdir().unwrap();
        let mut rest = String::new();
        if with_sink {
            rest.push_str(&json_sink(
                "dead",
                &rcv.url("http"),
                "[\"started\", \"succeeded\", \"failed\"]",
                tmp.path(),
            ));
        }
        rest.push_str(&workdir_project(
            "site",
            tmp.path(),
            "true",
            "project_builds_per_minute = 1000",
        ));
        let mut d = daemon_env(&tmp, &rest, &[]);
        let t = Instant::now();
        for _ in 0..N {
            let id = d.trigger_id("site", "main");
            d.wait_status(&id, "stopped", 60);
        }
        let took = t.elapsed();
        if with_sink {
            assert!(!rcv.requests().is_empty(), "the sink was tried");
        }
        d.signal("TERM");
        assert_eq!(
            d.wait_exit(30),
            Some(0),
            "shutdown is not held up by the dead receiver"
        );
        took
    };
    let without = run(false);
    let with = run(true);
    eprintln!(
        "{N} builds one after another: without a sink {without:?}, with a receiver that never answers {with:?}"
    );
    assert!(
        with < without * 2 + Duration::from_secs(2),
        "with {with:?} vs without {without:?}"
    );
}

#[test]
fn https_receivers_are_checked_against_the_trusted_cas() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let server_cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap(),
    );
    let rcv = Receiver::start_with(Ans::Status(200), move |s| {
        let conn = rustls::ServerConnection::new(server_cfg.clone()).unwrap();
        Box::new(rustls::StreamOwned::new(conn, s))
    });
    let tmp = tempfile::tempdir().unwrap();
    let ca_file = tmp.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let rest = format!(
        "{}{}",
        json_sink("tls", &rcv.url("https"), "[\"failed\"]", tmp.path()),
        workdir_project("site", tmp.path(), "exit 1", "")
    );
    // Without the CA the certificate is refused: retried, never delivered.
    let mut d = daemon_env(&tmp, &rest, &[]);
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "stopped", 30);
    eventually(30, "a certificate error", || {
        notifications(&d).first().is_some_and(|e| {
            e["attempts"].as_u64() >= Some(1)
                && e["last_error"]
                    .as_str()
                    .is_some_and(|m| m.contains("certificate") || m.contains("Certificate"))
        })
    });
    assert!(rcv.requests().is_empty());
    d.signal("TERM");
    d.wait_exit(30);
    // Test-only: the CA given through the internal setting; the pending entry goes out.
    let d = Daemon::spawn(
        tmp.path(),
        &[("DEPLOYHOOK_TEST_EXTRA_CA", ca_file.to_str().unwrap())],
    )
    .unwrap();
    let reqs = rcv.wait_for(1, 30);
    verify(&reqs[0]);
    assert_eq!(reqs[0].json()["type"], "build.failed");
    eventually(10, "delivered", || {
        notifications(&d)[0]["status"] == "delivered"
    });
}

#[test]
fn notification_test_endpoint_and_cli() {
    let rcv = Receiver::start(Ans::Status(202));
    let tmp = tempfile::tempdir().unwrap();
    let rest = format!(
        "{}[notify.chat]\nurl = {}\nformat = \"slack\"\n{}",
        json_sink("ops", &rcv.url("http"), "[\"failed\"]", tmp.path()),
        toml_str(&format!("{}/services/T0/B0/SECRETPART", rcv.url("http"))),
        workdir_project("site", tmp.path(), "true", "")
    );
    let d = daemon_env(&tmp, &rest, &[]);
    let r = d.api(
        "POST",
        "/api/notifications/test",
        Some(serde_json::json!({"sink": "ops"})),
    );
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["result"]["sink"], "ops");
    assert_eq!(j["result"]["status"], 202);
    assert_eq!(j["result"]["body"], "ok");
    let got = rcv.wait_for(1, 10);
    verify(&got[0]);
    assert_eq!(got[0].json()["type"], "test");
    let r = d.api(
        "POST",
        "/api/notifications/test",
        Some(serde_json::json!({"sink": "nope"})),
    );
    r.assert_error(404, 1404, "", "a test of an unknown sink");
    // Slack: a body with text and blocks; the URL's secret path never reaches the log.
    let r = d.api(
        "POST",
        "/api/notifications/test",
        Some(serde_json::json!({"sink": "chat"})),
    );
    assert_eq!(r.json()["result"]["status"], 202);
    let got = rcv.wait_for(2, 10);
    assert!(got[1].json()["text"].is_string() && got[1].json()["blocks"].is_array());
    assert_eq!(got[1].path, "/services/T0/B0/SECRETPART");
    assert!(!d.logs().contains("SECRETPART"));
    let env = [
        ("DEPLOYHOOK_TOKEN", d.token.as_str()),
        ("DEPLOYHOOK_URL", &format!("http://{}", d.addr)),
    ];
    let cfg = d.config.to_str().unwrap().to_string();
    let (code, out, err) = cli(&["notifications", "test", "ops", "--config", &cfg], &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("202"), "{out}");
    let (code, out, err) = cli(
        &[
            "notifications",
            "list",
            "--limit",
            "5",
            "--json",
            "--config",
            &cfg,
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    let _: Value = serde_json::from_str(&out).unwrap();
    let (code, _, err) = cli(&["notifications", "test", "nope", "--config", &cfg], &env);
    assert_eq!(code, 1);
    assert!(err.contains("nope"), "{err}");
    // SIGHUP re-reads the signing secret: the next request is signed with the new one.
    let new_secret = "whsec_bmV3LXNlY3JldC1mb3ItdGhlLXJlbG9hZC10ZXN0";
    std::fs::write(tmp.path().join("ops.whsec"), format!("{new_secret}\n")).unwrap();
    d.signal("HUP");
    eventually(20, "reloaded", || d.logs().contains("config reloaded"));
    let r = d.api(
        "POST",
        "/api/notifications/test",
        Some(serde_json::json!({"sink": "ops"})),
    );
    assert_eq!(r.json()["result"]["status"], 202);
    let got = rcv.requests();
    let last = got.last().unwrap();
    verify_with(new_secret, last);
    assert!(
        standardwebhooks::Webhook::new(SECRET)
            .unwrap()
            .verify(&last.body, &{
                let mut h = http::HeaderMap::new();
                for (k, v) in &last.headers {
                    h.insert(
                        http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                        http::HeaderValue::from_str(v).unwrap(),
                    );
                }
                h
            })
            .is_err()
    );
    // `check` lists the sinks, with the URL as scheme://host only.
    let (code, out, err) = cli(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("chat") && out.contains("slack to http://127.0.0.1"),
        "{out}"
    );
    assert!(!out.contains("SECRETPART"), "{out}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// HOSTILE 29: a gigabyte answer costs a kilobyte, a trickled answer a timeout, and both
/// leave builds alone.
#[test]
fn gigabyte_and_trickled_answers_are_bounded() {
    let rcv = Receiver::start(Ans::Huge);
    let tmp = tempfile::tempdir().unwrap();
    let rest = format!(
        "{}{}",
        json_sink("ops", &rcv.url("http"), "[\"failed\"]", tmp.path()),
        workdir_project(
            "site",
            tmp.path(),
            "exit 1",
            "project_builds_per_minute = 1000"
        )
    );
    // Test-only: 1 s to connect, 3 s in all, so the trickle test takes seconds.
    let d = daemon_env(
        &tmp,
        &rest,
        &[("DEPLOYHOOK_TEST_OUTBOUND_TIMEOUTS", "1000,3000")],
    );
    let before = rss_kib(d.pid());
    for _ in 0..3 {
        let id = d.trigger_id("site", "main");
        d.wait_status(&id, "stopped", 30);
    }
    eventually(30, "three delivered", || {
        notifications(&d)
            .iter()
            .filter(|e| e["status"] == "delivered")
            .count()
            == 3
    });
    let sent = rcv.sent.load(std::sync::atomic::Ordering::Relaxed);
    let after = rss_kib(d.pid());
    eprintln!(
        "gigabyte answers: the receiver managed to write {sent} bytes in all; daemon RSS {before} KiB -> {after} KiB"
    );
    // The socket buffers take a few MiB at most; the daemon read 1 KiB of each.
    assert!(
        sent < 64 << 20,
        "{sent} bytes were written: the answer was read on"
    );
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );

    *rcv.default.lock().unwrap() = Ans::Trickle;
    let id = d.trigger_id("site", "main");
    let t = Instant::now();
    d.wait_status(&id, "stopped", 30);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the build was not held up"
    );
    eventually(30, "a timeout", || {
        notifications(&d)[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("did not answer within"))
    });
    assert_eq!(
        notifications(&d)[0]["status"],
        "pending",
        "a timeout is retried"
    );
}

/// Every SHA a build absorbs gets its statuses, in order: queued (at the push or the join),
/// building, running, then the final state (GitLab's words).
#[test]
fn pushed_and_joined_shas_each_get_pending_then_the_final_state_gitlab() {
    let rcv = Receiver::start(Ans::Status(201));
    let tmp = tempfile::tempdir().unwrap();
    let gate = tmp.path().join("gate");
    std::fs::write(tmp.path().join("git.secret"), "gitsecret\n").unwrap();
    std::fs::write(tmp.path().join("status.token"), "glpat-secret\n").unwrap();
    let cmd = format!("while [ ! -f {} ]; do sleep 0.1; done", gate.display());
    let rest = format!(
        "{}\n[projects.site.status]\nprovider = \"gitlab\"\nrepo = \"group/site\"\ntoken_file = \"status.token\"\napi_url = {}\n",
        workdir_project(
            "site",
            tmp.path(),
            &cmd,
            "cancel_superseded = false\ngit_secret_file = \"git.secret\""
        ),
        toml_str(&rcv.url("http"))
    );
    let d = daemon_env(&tmp, &rest, &[]);
    let first = d.trigger_id("site", "main");
    d.wait_status(&first, "running", 30);
    let push = |sha: &str| {
        let body = serde_json::json!({"ref": "refs/heads/main", "before": "0".repeat(40), "after": sha, "repository": {"name": "site"}}).to_string();
        let sig = github_signature("gitsecret", body.as_bytes());
        let r = request(
            d.addr,
            "POST",
            "/git/site",
            &[
                ("Content-Type", "application/json"),
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", &sig),
            ],
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["result"].clone()
    };
    let x = "1".repeat(40);
    let y = "2".repeat(40);
    let q = push(&x);
    assert_eq!(q["already_exists"], false);
    eventually(30, "x queued", || {
        statuses_of(&rcv, &x).iter().any(|s| s.1 == "queued")
    });
    let j = push(&y);
    assert_eq!(j["already_exists"], true);
    assert_eq!(j["build_uuid"], q["build_uuid"]);
    eventually(30, "y queued", || {
        statuses_of(&rcv, &y).iter().any(|s| s.1 == "queued")
    });
    std::fs::write(&gate, "").unwrap();
    let qid = q["build_uuid"].as_str().unwrap().to_string();
    d.wait_status(&qid, "stopped", 30);
    eventually(30, "final states", || {
        [&x, &y].iter().all(|sha| {
            statuses_of(&rcv, sha)
                .last()
                .is_some_and(|s| s.0 == "success")
        })
    });
    for sha in [&x, &y] {
        let got = statuses_of(&rcv, sha);
        let words: Vec<(&str, &str)> = got.iter().map(|s| (s.0.as_str(), s.1.as_str())).collect();
        // A newer state may replace one not yet sent, never the other way round.
        let order = ["queued", "building", "running", "succeeded"];
        let pos: Vec<usize> = words
            .iter()
            .map(|(_, d)| order.iter().position(|o| d.starts_with(o)).unwrap())
            .collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{words:?}");
        assert_eq!(words[0], ("pending", "queued"), "{words:?}");
        assert!(
            words
                .iter()
                .all(|(w, d)| (*w == "running") == (*d == "running")),
            "{words:?}"
        );
        assert!(
            got.iter()
                .all(|s| s.2.ends_with(&format!("/ui/builds/{qid}")))
        );
    }
    let r = &rcv.requests()[0];
    assert_eq!(
        r.path,
        format!("/api/v4/projects/group%2Fsite/statuses/{x}")
    );
    assert_eq!(r.header("private-token"), Some("glpat-secret"));
    assert_eq!(r.json()["name"], "deployhook");
    // The first build had no SHA (an API trigger of a workdir project): no status for it.
    assert!(
        rcv.requests()
            .iter()
            .all(|r| r.path.contains(&x) || r.path.contains(&y))
    );
    assert!(!d.logs().contains("glpat-secret"));
}
