//! Who may trigger what, and when (issue 15, SPEC §2.2, §2.3, §3, §4.1, §4.2 (v2)): quiet
//! periods, params, schedules, GET hooks, `allow_from` behind trusted proxies, scoped tokens.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::*;

fn ts(v: &Value) -> jiff::Timestamp {
    v.as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {v}"))
        .parse()
        .unwrap()
}

fn builds_of(d: &Daemon, project: &str) -> Vec<Value> {
    let r = d.api(
        "GET",
        &format!("/api/projects/{project}/builds?limit=100"),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["result"].as_array().unwrap().clone()
}

fn api_as(d: &Daemon, token: &str, method: &str, path: &str, body: Option<Value>) -> Resp {
    let auth = format!("Bearer {token}");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    request(
        d.addr,
        method,
        path,
        &[("Authorization", auth.as_str())],
        body.as_bytes(),
    )
}

// ---- quiet period (SPEC §2.2) -----------------------------------------------------------

#[test]
fn a_burst_of_twenty_triggers_with_a_quiet_period_yields_one_build_that_starts_after_it() {
    let (d, _work) = Daemon::start_workdir("cms", "true", "quiet_period = \"1s\"\n");
    let mut ids = Vec::new();
    let mut last = None;
    for _ in 0..20 {
        let b = d.trigger("cms", "main");
        ids.push(b["build_uuid"].as_str().unwrap().to_string());
        assert_eq!(b["status"], "queued", "{b}");
        last = Some(b);
        std::thread::sleep(Duration::from_millis(50));
    }
    let burst_end = jiff::Timestamp::now();
    ids.dedup();
    assert_eq!(ids.len(), 1, "the burst must make exactly one build");
    let last = last.unwrap();
    assert_eq!(last["already_exists"], true);
    // Each join moved not_before to (join + quiet_period).
    let not_before = ts(&last["not_before"]);
    assert!(not_before > ts(&last["created_on"]) + Duration::from_millis(1500));
    let b = d.wait_status(&ids[0], "stopped", 30);
    assert_eq!(b["build_outcome"], "success", "{b}");
    assert_eq!(b["not_before"], Value::Null);
    let started = ts(&b["initializing_on"]);
    assert!(
        started >= not_before,
        "started {started} before its not_before {not_before}"
    );
    assert!(started >= burst_end, "started {started} during the burst");
    assert_eq!(builds_of(&d, "cms").len(), 1);
}

#[test]
fn max_quiet_period_caps_a_never_ending_burst() {
    let (d, _work) = Daemon::start_workdir(
        "cms",
        "true",
        "quiet_period = \"1s\"\nmax_quiet_period = \"2s\"\n",
    );
    let first = d.trigger("cms", "main");
    let id = first["build_uuid"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Keep triggering every 200 ms until the build leaves the queue.
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let b = d.build(&id);
        if b["status"] != "queued" {
            break;
        }
        let j = d.trigger("cms", "main");
        assert!(Instant::now() < deadline, "the build never started: {j}");
    }
    let b = d.wait_status(&id, "stopped", 30);
    let waited = ts(&b["initializing_on"]).duration_since(ts(&b["created_on"]));
    assert!(
        waited >= jiff::SignedDuration::from_millis(1900),
        "started after {waited:?}, before max_quiet_period"
    );
    assert!(
        waited <= jiff::SignedDuration::from_millis(4000),
        "started after {waited:?}: max_quiet_period did not cap the burst"
    );
}

// ---- params (SPEC §2.3) -----------------------------------------------------------------

const PARAM_COMMAND: &str = "if [ \"$DEPLOYHOOK_PARAM_ENV\" = block ]; then sleep 3; fi; \
     printf 'env=[%s] msg=[%s]\\n' \"$DEPLOYHOOK_PARAM_ENV\" \"$DEPLOYHOOK_PARAM_MSG\"; \
     env | grep '^DEPLOYHOOK_PARAM_' | sort";

#[test]
fn params_reach_the_build_environment_exactly() {
    let (d, _work) = Daemon::start_workdir("site", PARAM_COMMAND, "params = [\"env\", \"msg\"]\n");
    let (_, hook) = d.create_hook("site", "cms", "main");
    // From the query (percent-decoded, `+` a space), a JSON body member the query does not
    // override, and names not listed ignored. `$(id)` must arrive as text, never run.
    let r = request(
        d.addr,
        "POST",
        &format!("{hook}?env=prod&msg=a+b%24%28id%29%3B%22&other=1"),
        &[("Content-Type", "application/json")],
        br#"{"env": "from-body", "n": 1}"#,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json()["result"].clone();
    assert_eq!(v["params"], json!({"env": "prod", "msg": "a b$(id);\""}));
    let id = v["build_uuid"].as_str().unwrap();
    let b = d.wait_status(id, "stopped", 30);
    assert_eq!(b["build_outcome"], "success");
    let out = d.log_text(id, "stdout");
    assert_eq!(
        out,
        "env=[prod] msg=[a b$(id);\"]\nDEPLOYHOOK_PARAM_ENV=prod\nDEPLOYHOOK_PARAM_MSG=a b$(id);\""
    );

    // A JSON body alone, with a number.
    let r = request(
        d.addr,
        "POST",
        &hook,
        &[("Content-Type", "application/json")],
        br#"{"env": 3, "msg": true}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["result"]["params"],
        json!({"env": "3", "msg": "true"})
    );

    // API params, the query string winning.
    let r = d.api(
        "POST",
        "/api/projects/site/builds?msg=q",
        Some(json!({"branch": "main", "params": {"env": "api", "msg": "body", "zz": "x"}})),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["result"]["params"],
        json!({"env": "api", "msg": "q"})
    );

    // The CLI's --param, repeatable; a malformed one is a usage error.
    let url = format!("http://{}", d.addr);
    let cfg = d.config.to_str().unwrap();
    let (code, out, err) = cli(
        &[
            "trigger", "site", "--param", "env=cli", "--param", "msg=x=y", "--json", "--config",
            cfg, "--url", &url,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["params"], json!({"env": "cli", "msg": "x=y"}));
    let (code, _, err) = cli(
        &[
            "trigger", "site", "--param", "Env", "--config", cfg, "--url", &url,
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_param_value_with_a_newline_or_too_long_gets_400() {
    let (d, _work) = Daemon::start_workdir("site", "true", "params = [\"env\"]\n");
    let (_, hook) = d.create_hook("site", "cms", "main");
    for bad in [
        "env=a%0Ab",
        "env=a%0Db",
        "env=%00",
        &format!("env={}", "x".repeat(257)),
    ] {
        let r = d.post(&format!("{hook}?{bad}"), b"");
        r.assert_error(400, 1400, "", bad);
    }
    let r = d.post(&hook, br#"{"env": "a\nb"}"#);
    assert_eq!(r.status, 400);
    let r = d.api(
        "POST",
        "/api/projects/site/builds",
        Some(json!({"params": {"env": "line\r\n"}})),
    );
    assert_eq!(r.status, 400);
    assert!(r.error_message().contains("env"), "{}", r.error_message());
    let r = d.api(
        "POST",
        "/api/projects/site/builds",
        Some(json!({"params": "env=prod"})),
    );
    assert_eq!(r.status, 400);
    assert!(builds_of(&d, "site").is_empty(), "a refused trigger built");
    // 256 bytes is fine.
    let r = d.post(&format!("{hook}?env={}", "x".repeat(256)), b"");
    assert_eq!(r.status, 200);
}

#[test]
fn different_params_are_different_targets() {
    let (d, _work) = Daemon::start_workdir("site", PARAM_COMMAND, "params = [\"env\"]\n");
    let trigger = |env: &str| {
        let r = d.api(
            "POST",
            "/api/projects/site/builds",
            Some(json!({"params": {"env": env}})),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["result"].clone()
    };
    let block = trigger("block");
    let block_id = block["build_uuid"].as_str().unwrap().to_string();
    d.wait_status(&block_id, "running", 20);
    let prod = trigger("prod");
    let staging = trigger("staging");
    assert_eq!(prod["already_exists"], false);
    assert_eq!(staging["already_exists"], false);
    assert_ne!(prod["build_uuid"], staging["build_uuid"]);
    // Same params: joins.
    let again = trigger("prod");
    assert_eq!(again["already_exists"], true);
    assert_eq!(again["build_uuid"], prod["build_uuid"]);
    // Neither superseded the running build of other params.
    let b = d.wait_status(&block_id, "stopped", 30);
    assert_eq!(b["build_outcome"], "success", "{b}");
    assert_eq!(b["cancel_reason"], Value::Null);
    for v in [&prod, &staging] {
        let id = v["build_uuid"].as_str().unwrap();
        assert_eq!(d.wait_status(id, "stopped", 30)["build_outcome"], "success");
    }
    let staging_out = d.log_text(staging["build_uuid"].as_str().unwrap(), "stdout");
    assert!(
        staging_out.contains("DEPLOYHOOK_PARAM_ENV=staging"),
        "{staging_out}"
    );
}

#[test]
fn a_git_push_takes_params_from_its_webhook_url() {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("git.secret"), "s3cret\n").unwrap();
    let d = Daemon::start(&workdir_project(
        "site",
        work.path(),
        PARAM_COMMAND,
        &format!(
            "params = [\"env\"]\ngit_secret_file = \"{}\"\n",
            work.path().join("git.secret").display()
        ),
    ));
    let body = json!({"ref": "refs/heads/main", "before": "0".repeat(40), "after": "1".repeat(40)})
        .to_string();
    let sig = github_signature("s3cret", body.as_bytes());
    let headers = [
        ("Content-Type", "application/json"),
        ("X-GitHub-Event", "push"),
        ("X-Hub-Signature-256", sig.as_str()),
    ];
    let r = request(
        d.addr,
        "POST",
        "/git/site?env=staging",
        &headers,
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["result"]["params"], json!({"env": "staging"}));
    let r = request(
        d.addr,
        "POST",
        "/git/site?env=a%0Ab",
        &headers,
        body.as_bytes(),
    );
    assert_eq!(r.status, 400);
}

// ---- GET hooks (SPEC §4.1) --------------------------------------------------------------

#[test]
fn get_fires_only_a_hook_created_with_allow_get() {
    let (d, _work) = Daemon::start_workdir("site", "true", "");
    let (_, post_only) = d.create_hook("site", "cms", "main");
    let r = request(d.addr, "GET", &post_only, &[], b"");
    r.assert_error(405, 1405, "", "GET of a hook without allow_get");
    assert_eq!(r.header("allow"), Some("POST"));
    assert!(builds_of(&d, "site").is_empty());
    // An unknown token answers a GET exactly like a hook without allow_get.
    let unknown = request(
        d.addr,
        "GET",
        &format!("/hooks/dh_{}", "A".repeat(43)),
        &[],
        b"",
    );
    assert_eq!(unknown.status, 405);
    assert_eq!(unknown.body, r.body);

    // Created through the CLI with --allow-get.
    let url = format!("http://{}", d.addr);
    let (code, out, err) = cli(
        &[
            "hooks",
            "create",
            "site",
            "--name",
            "ha",
            "--branch",
            "main",
            "--allow-get",
            "--config",
            d.config.to_str().unwrap(),
            "--url",
            &url,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let get_hook = out
        .trim()
        .split_once("/hooks/")
        .map(|(_, t)| format!("/hooks/{t}"))
        .unwrap();
    let r = request(d.addr, "GET", &get_hook, &[], b"");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json()["result"].clone();
    assert_eq!(v["build_trigger_source"], "deploy_hook");
    assert_eq!(v["trigger"]["hook_name"], "ha");
    let r = request(d.addr, "PUT", &get_hook, &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST"));
    // POST still works, and the hook list says which hook allows GET.
    assert_eq!(d.post(&get_hook, b"").status, 200);
    let hooks = d.api("GET", "/api/projects/site/hooks", None).json()["result"].clone();
    let by_name = |n: &str| {
        hooks
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by_name("ha")["allow_get"], true);
    assert_eq!(by_name("cms")["allow_get"], false);
    // The API takes it too, and refuses a non-boolean.
    let r = d.api(
        "POST",
        "/api/projects/site/hooks",
        Some(json!({"name": "x", "allow_get": "yes"})),
    );
    assert_eq!(r.status, 400);
    let r = d.api(
        "POST",
        "/api/projects/site/hooks",
        Some(json!({"name": "x", "allow_get": true})),
    );
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["result"]["allow_get"], true);
}

// ---- allow_from and trusted_proxies (SPEC §3, §4.1) -------------------------------------

/// Sends headers announcing a body that never comes: a 403 must still arrive (it is decided
/// before the body is read); a server that waited for the body would time out instead.
fn refused_before_the_body(addr: std::net::SocketAddr, path: &str, extra: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf).status
}

fn allow_from_config(dir: &Path, work: &Path) -> String {
    std::fs::write(dir.join("git.secret"), "s3cret\n").unwrap();
    format!(
        "{}{}",
        workdir_project(
            "site",
            work,
            "true",
            "allow_from = [\"192.0.2.0/24\"]\ngit_secret_file = \"git.secret\"\n"
        ),
        workdir_project("local", work, "true", "allow_from = [\"127.0.0.0/8\"]\n"),
    )
}

#[test]
fn allow_from_refuses_other_addresses_and_ignores_forwarded_headers_without_a_trusted_proxy() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    write_config(tmp.path(), "", &allow_from_config(tmp.path(), work.path()));
    let d = Daemon::spawn(tmp.path(), &[]).unwrap();
    let (_, site_hook) = d.create_hook("site", "cms", "main");
    let (_, local_hook) = d.create_hook("local", "cms", "main");

    let r = d.post(&site_hook, b"");
    r.assert_error(403, 1403, "127.0.0.1", "site's hook from 127.0.0.1");
    // A spoofed X-Forwarded-For from an untrusted peer changes nothing.
    let r = request(
        d.addr,
        "POST",
        &site_hook,
        &[("X-Forwarded-For", "192.0.2.7")],
        b"",
    );
    assert_eq!(r.status, 403);
    // Refused before the body is read, on hooks and on Git deliveries.
    assert_eq!(refused_before_the_body(d.addr, &site_hook, ""), 403);
    assert_eq!(
        refused_before_the_body(
            d.addr,
            "/git/site",
            "X-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=00\r\n"
        ),
        403
    );
    // An allowed address passes; and unknown tokens still get their 404 first.
    assert_eq!(d.post(&local_hook, b"").status, 200);
    let r = request(
        d.addr,
        "POST",
        &local_hook,
        &[("X-Forwarded-For", "198.51.100.1")],
        b"",
    );
    assert_eq!(r.status, 200, "the header of an untrusted peer is ignored");
    assert_eq!(
        d.post(&format!("/hooks/dh_{}", "A".repeat(43)), b"").status,
        404
    );
    assert!(builds_of(&d, "site").is_empty());

    // A reload applies a new allowlist to the next request.
    std::fs::write(
        &d.config,
        std::fs::read_to_string(&d.config).unwrap().replace(
            "allow_from = [\"192.0.2.0/24\"]",
            "allow_from = [\"192.0.2.0/24\", \"127.0.0.1\"]",
        ),
    )
    .unwrap();
    d.signal("HUP");
    eventually(20, "the reloaded allowlist", || {
        d.post(&site_hook, b"").status == 200
    });
}

#[test]
fn behind_a_trusted_proxy_the_forwarded_client_is_judged() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    write_config(
        tmp.path(),
        "trusted_proxies = [\"127.0.0.1/32\"]",
        &allow_from_config(tmp.path(), work.path()),
    );
    let d = Daemon::spawn(tmp.path(), &[]).unwrap();
    let (_, hook) = d.create_hook("site", "cms", "main");
    let post = |xff: Option<&str>| {
        let h: Vec<(&str, &str)> = xff.map(|x| ("X-Forwarded-For", x)).into_iter().collect();
        request(d.addr, "POST", &hook, &h, b"").status
    };
    // The proxy itself (127.0.0.1) is not in allow_from.
    assert_eq!(post(None), 403);
    assert_eq!(post(Some("192.0.2.7")), 200);
    // The right-most untrusted entry counts, not a left-most one a client wrote.
    assert_eq!(post(Some("192.0.2.7, 198.51.100.1")), 403);
    assert_eq!(post(Some("198.51.100.1, 192.0.2.7")), 200);
    // Trusted entries are skipped from the right.
    assert_eq!(post(Some("192.0.2.7, 127.0.0.1")), 200);
    // An entry that is not an IP makes the client unknown: refused.
    assert_eq!(post(Some("192.0.2.7, unknown")), 403);
}

// ---- scoped tokens (SPEC §4.2) ----------------------------------------------------------

fn token(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn each_scope_is_allowed_and_refused_on_every_endpoint_class() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let tokens = "[api.tokens.reader]\ntoken_file = \"reader.token\"\n\
         [api.tokens.ci]\ntoken_file = \"ci.token\"\nscope = \"trigger\"\nprojects = [\"a\"]\n\
         [api.tokens.ops]\ntoken_file = \"ops.token\"\nscope = \"admin\"\nprojects = [\"a\"]\n\
         [api.tokens.root]\ntoken_file = \"root.token\"\nscope = \"admin\"\n";
    let projects = format!(
        "{tokens}{}{}",
        workdir_project("a", work.path(), "sleep 30", ""),
        workdir_project("b", work.path(), "sleep 30", "")
    );
    write_config(tmp.path(), "", &projects);
    let d = Daemon::spawn(tmp.path(), &[]).unwrap();
    // Generated like the admin token, mode 0600.
    use std::os::unix::fs::PermissionsExt as _;
    for f in ["reader.token", "ci.token", "ops.token", "root.token"] {
        let mode = std::fs::metadata(tmp.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let names = ["reader", "ci", "ops", "root"];
    let secrets: Vec<String> = names
        .iter()
        .map(|n| token(tmp.path(), &format!("{n}.token")))
        .collect();

    // Fixtures made with the admin token: a hook and a build in each project.
    let mut hook_ids = std::collections::HashMap::new();
    let mut build_ids = std::collections::HashMap::new();
    for p in ["a", "b"] {
        hook_ids.insert(p, d.create_hook(p, "fixture", "main").0);
        build_ids.insert(p, d.trigger_id(p, "main"));
    }

    // (class, method, path with project p, hook h and build b, the least of reader, ci, ops,
    // root that may do it on project a; on b, the unlimited ones from there may).
    const READER: usize = 0;
    const CI: usize = 1;
    const OPS: usize = 2;
    let classes = [
        ("list hooks", "GET", "/api/projects/{p}/hooks", READER),
        ("list builds", "GET", "/api/projects/{p}/builds", READER),
        ("get build", "GET", "/api/builds/{b}", READER),
        ("build logs", "GET", "/api/builds/{b}/logs", READER),
        ("wait", "GET", "/api/builds/{b}/wait?timeout=1", READER),
        ("redeploy", "POST", "/api/builds/{b}/redeploy", CI),
        ("trigger", "POST", "/api/projects/{p}/builds", CI),
        ("create hook", "POST", "/api/projects/{p}/hooks", OPS),
        ("rotate", "POST", "/api/projects/{p}/hooks/{h}/rotate", OPS),
    ];
    for (class, method, path, least) in classes {
        for p in ["a", "b"] {
            for (i, name) in names.iter().enumerate() {
                let allowed = if p == "a" {
                    i >= least
                } else {
                    // Only unlimited tokens reach b: reader (read) and root (admin).
                    i >= least && (*name == "reader" || *name == "root")
                };
                let body = match class {
                    "trigger" => Some(json!({"branch": "other"})),
                    // Hook names must differ.
                    "create hook" => Some(json!({"name": format!("by-{name}-{p}")})),
                    _ => None,
                };
                let path = path
                    .replace("{p}", p)
                    .replace("{h}", &hook_ids[p])
                    .replace("{b}", &build_ids[p]);
                let r = api_as(&d, &secrets[i], method, &path, body);
                if allowed {
                    assert!(
                        r.status < 400,
                        "{class} on {p} with {name}: {} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    );
                } else {
                    r.assert_error(403, 1403, "", &format!("{class} on {p} with {name}"));
                }
            }
        }
    }
    // /metrics: only an unlimited admin token.
    for (i, name) in names.iter().enumerate() {
        let r = api_as(&d, &secrets[i], "GET", "/metrics", None);
        let want = if *name == "root" { 200 } else { 403 };
        assert_eq!(r.status, want, "/metrics with {name}");
    }
    // Cancel and delete: trigger scope and admin scope, on a's builds and hooks.
    let cancel = |tok: &str, p: &str| {
        let id = d.trigger_id(p, "main");
        api_as(&d, tok, "POST", &format!("/api/builds/{id}/cancel"), None).status
    };
    assert_eq!(cancel(&secrets[0], "a"), 403, "reader may not cancel");
    assert_eq!(cancel(&secrets[1], "a"), 200, "ci may cancel on a");
    assert_eq!(cancel(&secrets[1], "b"), 403, "ci may not cancel on b");
    let delete = |tok: &str, p: &str, n: &str| {
        let (id, _) = d.create_hook(p, n, "main");
        api_as(
            &d,
            tok,
            "DELETE",
            &format!("/api/projects/{p}/hooks/{id}"),
            None,
        )
        .status
    };
    assert_eq!(
        delete(&secrets[1], "a", "d1"),
        403,
        "ci may not delete hooks"
    );
    assert_eq!(delete(&secrets[2], "a", "d2"), 200, "ops may on a");
    assert_eq!(delete(&secrets[2], "b", "d3"), 403, "ops may not on b");
    assert_eq!(delete(&secrets[3], "b", "d4"), 200, "root may on b");

    // A project-limited token sees only its projects.
    let list = |tok: &str| -> Vec<String> {
        let r = api_as(&d, tok, "GET", "/api/projects", None);
        assert_eq!(r.status, 200);
        r.json()["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(list(&secrets[1]), ["a"]);
    assert_eq!(list(&secrets[2]), ["a"]);
    assert_eq!(list(&secrets[0]), ["a", "b"]);
    // Wrong and missing tokens are 401, not 403.
    assert_eq!(api_as(&d, "nope", "GET", "/api/projects", None).status, 401);
    assert_eq!(
        request(d.addr, "GET", "/api/projects", &[], b"").status,
        401
    );
    // Tokens never reach the log.
    let logs = d.logs();
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "a token was logged");
    }
}

#[test]
fn a_reload_applies_new_and_removed_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let project = workdir_project("a", work.path(), "true", "");
    let old = format!("[api.tokens.old]\ntoken_file = \"old.token\"\n{project}");
    write_config(tmp.path(), "", &old);
    let d = Daemon::spawn(tmp.path(), &[]).unwrap();
    let old_secret = token(tmp.path(), "old.token");
    assert_eq!(
        api_as(&d, &old_secret, "GET", "/api/projects", None).status,
        200
    );
    let new =
        format!("[api.tokens.new]\ntoken_file = \"new.token\"\nscope = \"trigger\"\n{project}");
    write_config(tmp.path(), "", &new);
    d.signal("HUP");
    eventually(20, "the new token file is generated", || {
        tmp.path().join("new.token").exists()
    });
    let new_secret = token(tmp.path(), "new.token");
    eventually(20, "the new token works", || {
        api_as(&d, &new_secret, "POST", "/api/projects/a/builds", None).status == 200
    });
    assert_eq!(
        api_as(&d, &old_secret, "GET", "/api/projects", None).status,
        401,
        "a removed token must stop working"
    );
}

// ---- schedules (SPEC §3) ----------------------------------------------------------------

fn set_clock(path: &Path, t: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, t).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn schedule_builds(d: &Daemon, project: &str) -> Vec<Value> {
    builds_of(d, project)
        .into_iter()
        .filter(|b| b["build_trigger_source"] == "schedule")
        .collect()
}

#[test]
fn a_schedule_fires_on_the_test_clock_and_a_missed_run_fires_once_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let clock = tmp.path().join("clock");
    set_clock(&clock, "2026-01-01T00:00:30Z");
    let project = workdir_project(
        "site",
        work.path(),
        "true",
        "[[projects.site.schedule]]\ncron = \"* * * * *\"\n",
    );
    write_config(tmp.path(), "", &project);
    let clock_env = [("DEPLOYHOOK_TEST_CLOCK_FILE", clock.to_str().unwrap())];
    let mut d = Daemon::spawn(tmp.path(), &clock_env).unwrap();
    eventually(20, "the scheduler has looked at its schedules", || {
        d.logs().contains("scheduler: schedules checked")
    });
    // A fresh state dir: nothing missed, nothing fired.
    assert!(schedule_builds(&d, "site").is_empty());

    set_clock(&clock, "2026-01-01T00:01:05Z");
    eventually(20, "the every-minute schedule fires", || {
        schedule_builds(&d, "site").len() == 1
    });
    let b = &schedule_builds(&d, "site")[0];
    assert_eq!(b["trigger"]["label"], "schedule");
    assert_eq!(b["branch"], "main");

    // Down across four runs; at start, the missed ones fire once in all.
    d.signal("TERM");
    assert_eq!(d.wait_exit(30), Some(0));
    set_clock(&clock, "2026-01-01T00:05:10Z");
    let d = Daemon::spawn(tmp.path(), &clock_env).unwrap();
    eventually(20, "the missed run fires at start", || {
        schedule_builds(&d, "site").len() == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(schedule_builds(&d, "site").len(), 2, "fired more than once");
    // Counted as triggers of their own source.
    let metrics = String::from_utf8(d.api("GET", "/metrics", None).body).unwrap();
    assert!(
        metrics.contains("deployhook_triggers_total{source=\"schedule\",result=\"created\"} 1"),
        "{metrics}"
    );

    // A reload applies a new schedule.
    let with_other = project.replace(
        "cron = \"* * * * *\"\n",
        "cron = \"* * * * *\"\n[[projects.site.schedule]]\ncron = \"10 0 * * *\"\nbranch = \"other\"\n",
    );
    write_config(tmp.path(), "", &with_other);
    d.signal("HUP");
    eventually(20, "the reload", || d.logs().contains("config reloaded"));
    set_clock(&clock, "2026-01-01T00:10:05Z");
    eventually(20, "the new schedule fires", || {
        schedule_builds(&d, "site")
            .iter()
            .any(|b| b["branch"] == "other")
    });
}

#[test]
fn check_prints_each_schedules_next_run_and_names_bad_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let project = workdir_project(
        "site",
        work.path(),
        "true",
        "quiet_period = \"30s\"\nparams = [\"env\"]\n[[projects.site.schedule]]\ncron = \"0 3 * * *\"\ntimezone = \"Europe/Berlin\"\n",
    );
    let cfg = write_config(tmp.path(), "", &project);
    let (code, out, err) = cli(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("schedule \"0 3 * * *\" Europe/Berlin branch main: next run "),
        "{out}"
    );
    assert!(out.contains("03:00 CE"), "{out}");
    assert!(out.contains("quiet period 30s"), "{out}");
    let bad = project.replace("0 3 * * *", "0 3 * * * *");
    let cfg = write_config(tmp.path(), "", &bad);
    let (code, _, err) = cli(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("projects.site.schedule.cron: cron \"0 3 * * * *\" must have 5 fields"),
        "{err}"
    );
    let line = err.split(':').nth(1).unwrap_or("");
    assert!(line.parse::<usize>().is_ok(), "no line number: {err}");
}
