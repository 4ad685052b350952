//! `POST /git/{project}` with each host's real signatures (issue 4).

use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::util::*;

const SECRET: &str = "s3cret-for-tests";

/// `sha256=<hex>` as GitHub and Bitbucket send it.
fn github_sig(body: &[u8]) -> String {
    format!("sha256={}", hmac_hex(body))
}

fn hmac_hex(body: &[u8]) -> String {
    mac_hex::<hmac::Hmac<Sha256>>(SECRET, body)
}

/// A daemon with project `site` (workdir, `command`) whose Git secret is SECRET.
fn daemon(command: &str) -> (Daemon, tempfile::TempDir) {
    let wd = tempfile::tempdir().unwrap();
    std::fs::write(wd.path().join("site.secret"), format!("{SECRET}\n")).unwrap();
    let cfg = workdir_project(
        "site",
        wd.path(),
        command,
        &format!(
            "git_secret_file = \"{}\"",
            wd.path().join("site.secret").display()
        ),
    );
    (Daemon::start(&cfg), wd)
}

fn push_body(branch_ref: &str, after: &str) -> Vec<u8> {
    json!({"ref": branch_ref, "before": "0".repeat(40), "after": after, "repository": {"name": "site"}})
        .to_string()
        .into_bytes()
}

const SHA: &str = "1111111111111111111111111111111111111111";

fn post(d: &Daemon, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    request(d.addr, "POST", "/git/site", &h, body)
}

#[test]
fn each_host_signature_triggers_a_build() {
    let (d, _wd) = daemon("sleep 5");
    let body = push_body("refs/heads/main", SHA);
    let mac = hmac_hex(&body);
    let prefixed = format!("sha256={mac}");
    let upper = format!("sha256={}", mac.to_uppercase());
    let hosts: Vec<Vec<(&str, &str)>> = vec![
        vec![
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &prefixed),
            ("X-GitHub-Delivery", "gh-1"),
        ],
        vec![
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &upper),
            ("X-GitHub-Delivery", "gh-2"),
        ],
        vec![
            ("X-Gitea-Event", "push"),
            ("X-Gitea-Signature", &mac),
            ("X-Gitea-Delivery", "gt-1"),
        ],
        vec![
            ("X-Forgejo-Event", "push"),
            ("X-Forgejo-Signature", &mac),
            ("X-Forgejo-Delivery", "fj-1"),
        ],
        vec![
            ("X-Gitlab-Event", "Push Hook"),
            ("X-Gitlab-Token", SECRET),
            ("X-Gitlab-Event-UUID", "gl-1"),
        ],
    ];
    let mut first: Option<String> = None;
    for h in hosts {
        let r = post(&d, &h, &body);
        assert_eq!(r.status, 200, "{h:?}: {}", String::from_utf8_lossy(&r.body));
        let b = r.json()["result"].clone();
        assert_eq!(b["build_trigger_source"], "git_push");
        assert_eq!(b["trigger"]["label"], "git push");
        assert_eq!(b["trigger"]["hook_id"], Value::Null);
        assert_eq!(b["branch"], "main");
        match &first {
            None => {
                assert_eq!(b["already_exists"], false);
                assert_eq!(b["requested_commit"], SHA);
                first = Some(b["build_uuid"].as_str().unwrap().to_string());
            }
            // The first build is running; each later push supersedes or joins a pending one.
            Some(_) => assert!(b["requested_commit"].is_string()),
        }
    }
    // Bitbucket: X-Hub-Signature sha256 and its own payload shape.
    let bb = json!({"push": {"changes": [{"new": {"type": "branch", "name": "other", "target": {"hash": SHA}}, "old": null}]}})
        .to_string()
        .into_bytes();
    let sig = github_sig(&bb);
    let r = post(
        &d,
        &[
            ("X-Event-Key", "repo:push"),
            ("X-Hub-Signature", &sig),
            ("X-Request-UUID", "bb-1"),
        ],
        &bb,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["result"]["branch"], "other");
    assert_eq!(r.json()["result"]["requested_commit"], SHA);
}

#[test]
fn the_payload_reaches_the_build() {
    let (d, _wd) = daemon("cat \"$DEPLOYHOOK_PAYLOAD\"; echo; echo trigger=$DEPLOYHOOK_TRIGGER");
    let body = push_body("refs/heads/main", SHA);
    let sig = github_sig(&body);
    let r = post(
        &d,
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
        &body,
    );
    let id = r.json()["result"]["build_uuid"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_status(&id, "stopped", 20);
    let out = d.log_text(&id, "stdout");
    assert!(
        out.contains("\"after\":\"1111111111111111111111111111111111111111\"")
            && out.contains("trigger=git_push"),
        "{out}"
    );
}

#[test]
fn bad_signatures_are_refused_before_parsing() {
    let (d, _wd) = daemon("true");
    let body = push_body("refs/heads/main", SHA);
    let good = github_sig(&body);
    let mut wrong_key = hmac::Hmac::<Sha256>::new_from_slice(b"not the secret").unwrap();
    wrong_key.update(&body);
    let wrong: String = wrong_key
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let wrong = format!("sha256={wrong}");
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    // Re-serialised JSON with the same meaning is a different body.
    let reserialised =
        serde_json::to_vec_pretty(&serde_json::from_slice::<Value>(&body).unwrap()).unwrap();
    let sha1 = "sha1=0123456789abcdef0123456789abcdef01234567".to_string();
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a [u8]);
    let cases: Vec<Case> = vec![
        (vec![("X-GitHub-Event", "push")], &body),
        (
            vec![("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &wrong)],
            &body,
        ),
        (
            vec![("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &good)],
            &tampered,
        ),
        (
            vec![("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &good)],
            &reserialised,
        ),
        (
            vec![
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", &good[..20]),
            ],
            &body,
        ),
        (
            vec![
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", "sha256=zzzz"),
            ],
            &body,
        ),
        (
            vec![("X-GitHub-Event", "push"), ("X-Hub-Signature", &sha1)],
            &body,
        ),
        (
            vec![("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", "wrong")],
            &body,
        ),
        // Broken JSON without a valid signature is a 401, not a 400: auth comes first.
        (
            vec![("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &wrong)],
            b"{broken",
        ),
    ];
    let mut bodies = Vec::new();
    for (h, b) in cases {
        let r = post(&d, &h, b);
        r.assert_error(401, 1401, "", &format!("{h:?}"));
        bodies.push(r.body);
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "401 bodies must not hint which part failed"
    );
    let builds = d.api("GET", "/api/projects/site/builds", None).json();
    assert_eq!(
        builds["result"],
        json!([]),
        "no build from a refused request"
    );
    assert!(!d.logs().contains(SECRET), "the secret leaked into the log");
}

#[test]
fn events_that_build_nothing() {
    let (d, _wd) = daemon("true");
    let send = |event: (&str, &str), body: Vec<u8>| {
        let sig = github_sig(&body);
        post(&d, &[event, ("X-Hub-Signature-256", &sig)], &body)
    };
    let r = send(
        ("X-GitHub-Event", "ping"),
        br#"{"zen":"hi","hook_id":1}"#.to_vec(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["result"], json!({"event": "ping"}));
    for (event, body, why) in [
        (
            ("X-GitHub-Event", "push"),
            push_body("refs/tags/v1.0", SHA),
            "tag",
        ),
        (
            ("X-GitHub-Event", "push"),
            push_body("refs/heads/main", &"0".repeat(40)),
            "deleted",
        ),
        (
            ("X-GitHub-Event", "push"),
            push_body("refs/heads/feature", SHA),
            "not one of",
        ),
        (
            ("X-GitHub-Event", "issues"),
            br#"{"action":"opened"}"#.to_vec(),
            "not a push",
        ),
    ] {
        let r = send(event, body);
        assert_eq!(r.status, 202, "{why}");
        let v = r.json();
        assert_eq!(v["result"], Value::Null);
        assert!(
            v["messages"][0]["message"].as_str().unwrap().contains(why),
            "{v}"
        );
    }
    // Signed but malformed: 400.
    let r = send(("X-GitHub-Event", "push"), b"{broken".to_vec());
    assert_eq!(r.status, 400);
    let r = send(("X-GitHub-Event", "push"), b"\xff\xfe\x00".to_vec());
    assert_eq!(r.status, 400);
    let builds = d.api("GET", "/api/projects/site/builds", None).json();
    assert_eq!(builds["result"], json!([]));
}

#[test]
fn form_encoded_github_payload() {
    let (d, _wd) = daemon("sleep 2");
    let json = String::from_utf8(push_body("refs/heads/main", SHA)).unwrap();
    let mut body = String::from("payload=");
    for b in json.bytes() {
        if b.is_ascii_alphanumeric() {
            body.push(b as char);
        } else {
            body.push_str(&format!("%{b:02X}"));
        }
    }
    let sig = github_sig(body.as_bytes());
    let r = request(
        d.addr,
        "POST",
        "/git/site",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sig),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["result"]["requested_commit"], SHA);
}

#[test]
fn a_replayed_delivery_never_builds_again() {
    let (d, _wd) = daemon("true");
    let body = push_body("refs/heads/main", SHA);
    let sig = github_sig(&body);
    let h = [
        ("X-GitHub-Event", "push"),
        ("X-Hub-Signature-256", sig.as_str()),
        ("X-GitHub-Delivery", "delivery-42"),
    ];
    let first = post(&d, &h, &body).json()["result"].clone();
    let id = first["build_uuid"].as_str().unwrap().to_string();
    d.wait_status(&id, "stopped", 20);
    // The build has stopped, so a new trigger would create a new build: the replay must not.
    for _ in 0..3 {
        let r = post(&d, &h, &body);
        assert_eq!(r.status, 200);
        let b = r.json()["result"].clone();
        assert_eq!(b["build_uuid"], id.as_str());
        assert_eq!(b["already_exists"], true);
    }
    // Concurrent replays of a fresh delivery: one build.
    let h2 = [
        ("X-GitHub-Event", "push"),
        ("X-Hub-Signature-256", sig.as_str()),
        ("X-GitHub-Delivery", "delivery-43"),
    ];
    let ids: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..10)
            .map(|_| {
                s.spawn(|| {
                    post(&d, &h2, &body).json()["result"]["build_uuid"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    let all = d
        .api("GET", "/api/projects/site/builds?limit=100", None)
        .json();
    assert_eq!(all["result"].as_array().unwrap().len(), 2);
}

#[test]
fn unknown_project_or_no_secret_is_404_and_size_is_capped() {
    let wd = tempfile::tempdir().unwrap();
    std::fs::write(wd.path().join("s"), SECRET).unwrap();
    let cfg = format!(
        "{}{}",
        workdir_project(
            "site",
            wd.path(),
            "true",
            &format!("git_secret_file = \"{}\"", wd.path().join("s").display())
        ),
        workdir_project("nosecret", wd.path(), "true", "")
    );
    let d = Daemon::start_with_server("max_git_body_bytes = 2000", &cfg);
    let body = push_body("refs/heads/main", SHA);
    let sig = github_sig(&body);
    let h = [
        ("X-GitHub-Event", "push"),
        ("X-Hub-Signature-256", sig.as_str()),
    ];
    assert_eq!(request(d.addr, "POST", "/git/nope", &h, &body).status, 404);
    assert_eq!(
        request(d.addr, "POST", "/git/nosecret", &h, &body).status,
        404
    );
    let big = vec![b' '; 2001];
    let r = request(d.addr, "POST", "/git/site", &h, &big);
    assert_eq!(r.status, 413);
    assert_eq!(request(d.addr, "GET", "/git/site", &[], b"").status, 405);
}

#[test]
fn a_push_during_a_running_build_of_the_branch_supersedes_it() {
    let (d, _wd) = daemon("sleep 30");
    let body = push_body("refs/heads/main", SHA);
    let sig = github_sig(&body);
    let first = post(
        &d,
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sig),
            ("X-GitHub-Delivery", "a"),
        ],
        &body,
    )
    .json()["result"]
        .clone();
    let old = first["build_uuid"].as_str().unwrap().to_string();
    d.wait_status(&old, "running", 10);
    let sha2 = "2222222222222222222222222222222222222222";
    let body2 = push_body("refs/heads/main", sha2);
    let sig2 = github_sig(&body2);
    let second = post(
        &d,
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sig2),
            ("X-GitHub-Delivery", "b"),
        ],
        &body2,
    )
    .json()["result"]
        .clone();
    assert_eq!(second["already_exists"], false);
    assert_eq!(second["requested_commit"], sha2);
    let b = d.wait_status(&old, "stopped", 10);
    assert_eq!(b["build_outcome"], "cancelled");
    assert_eq!(b["cancel_reason"], "superseded");
    assert_eq!(b["superseded_by"], second["build_uuid"]);
}

#[test]
fn pushes_build_the_branch_head_from_a_real_repo() {
    let repo = Repo::new();
    let wd = tempfile::tempdir().unwrap();
    std::fs::write(wd.path().join("s"), SECRET).unwrap();
    let cfg = format!(
        "[projects.site]\nbranches = [\"main\"]\nrepo = \"{}\"\ncommand = \"cat README\"\ngit_secret_file = \"{}\"\n",
        repo.path().display(),
        wd.path().join("s").display()
    );
    let d = Daemon::start(&cfg);
    let mut last = String::new();
    for i in 0..5 {
        last = repo.commit("README", &format!("version {i}\n"));
        let body = push_body("refs/heads/main", &last);
        let sig = github_sig(&body);
        let r = post(
            &d,
            &[
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", &sig),
                ("X-GitHub-Delivery", &format!("p{i}")),
            ],
            &body,
        );
        assert_eq!(r.status, 200);
    }
    eventually(60, "the newest commit is built", || {
        let v = d
            .api("GET", "/api/projects/site/builds?limit=100", None)
            .json();
        v["result"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["commit"] == last.as_str() && b["build_outcome"] == "success")
    });
    let v = d
        .api("GET", "/api/projects/site/builds?limit=100", None)
        .json();
    let ok = v["result"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["commit"] == last.as_str())
        .unwrap()
        .clone();
    assert!(
        d.log_text(ok["build_uuid"].as_str().unwrap(), "stdout")
            .contains("version 4")
    );
}

#[test]
fn sighup_reloads_secrets_and_rejects_a_bad_config() {
    let (d, wd) = daemon("true");
    let body = push_body("refs/heads/other", SHA);
    let sig = github_sig(&body);
    let h = [
        ("X-GitHub-Event", "push"),
        ("X-Hub-Signature-256", sig.as_str()),
    ];
    assert_eq!(post(&d, &h, &body).status, 200);
    // New secret on disk + SIGHUP: the old signature stops working.
    std::fs::write(wd.path().join("site.secret"), "rotated-secret\n").unwrap();
    d.signal("HUP");
    eventually(10, "config reloaded", || {
        d.logs().contains("config reloaded")
    });
    assert_eq!(post(&d, &h, &body).status, 401);
    let mut m = hmac::Hmac::<Sha256>::new_from_slice(b"rotated-secret").unwrap();
    m.update(&body);
    let new_sig: String = m
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let new_sig = format!("sha256={new_sig}");
    assert_eq!(
        post(
            &d,
            &[
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", &new_sig)
            ],
            &body
        )
        .status,
        200
    );
    // An invalid config is rejected with a logged error; the old one stays in force.
    let good = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, format!("{good}\nnot valid toml [[[")).unwrap();
    d.signal("HUP");
    eventually(10, "reload rejected", || {
        d.logs().contains("config reload rejected")
    });
    assert_eq!(
        post(
            &d,
            &[
                ("X-GitHub-Event", "push"),
                ("X-Hub-Signature-256", &new_sig)
            ],
            &body
        )
        .status,
        200
    );
    assert_eq!(request(d.addr, "GET", "/healthz", &[], b"").status, 200);
}
