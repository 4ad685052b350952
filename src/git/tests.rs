//! Unit tests of `crate::git`, on hand-made bodies and on the hosts' own payloads checked
//! into `tests/fixtures/git/` (see the README there for where each comes from).

use std::path::Path;

use http::HeaderValue;
use rand::{Rng as _, SeedableRng as _};

use super::*;
use crate::config::Config;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

/// Project `name` of the config `text`.
fn project_of(text: &str, name: &str) -> ProjectConfig {
    let c = Config::parse(text, Path::new("/tmp/deploy.toml")).unwrap();
    c.project(name).unwrap().as_ref().clone()
}

/// Project `site` of a config whose project table ends with `extra`.
fn project(extra: &str) -> ProjectConfig {
    let text = format!(
        "[projects.site]\ncommand = \"true\"\nrepo = \"https://gitlab.example.com/Mike/diaspora.git\"\n{extra}\n"
    );
    project_of(&text, "site")
}

fn main_and_staging() -> ProjectConfig {
    project("branches = [\"main\", \"staging\"]")
}

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn body(s: &str) -> Bytes {
    Bytes::from(s.to_owned())
}

fn fixture(name: &str) -> Bytes {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/git")
        .join(name);
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn branch(name: &str, commit: &str) -> RefBuild {
    RefBuild {
        git_ref: GitRef::Branch(name.into()),
        commit: commit.into(),
    }
}

fn tag(name: &str, commit: &str) -> RefBuild {
    RefBuild {
        git_ref: GitRef::Tag(name.into()),
        commit: commit.into(),
    }
}

/// The refs a decision builds and its messages, for compact assertions.
fn outcome(d: Result<Decision, ParseError>) -> (Vec<RefBuild>, Vec<String>) {
    match d {
        Ok(Decision::Build {
            builds, ignored, ..
        }) => (builds, ignored),
        Ok(Decision::Ignore(why)) => (Vec::new(), why),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn github_published_vector() {
    let s = GitSecret::new(b"It's a Secret to Everybody".to_vec());
    let h = headers(&[(
        "x-hub-signature-256",
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
    )]);
    assert_eq!(verify(&h, b"Hello, World!", &s), Ok(()));
    let upper = headers(&[(
        "x-hub-signature-256",
        "sha256=757107EA0EB2509FC211221CCE984B8A37570B6D7586C22C46F4379C8B043E17",
    )]);
    assert_eq!(verify(&upper, b"Hello, World!", &s), Ok(()));
    assert_eq!(verify(&h, b"Hello, World?", &s), Err(AuthError::Invalid));
}

/// HMAC-SHA1 of "Hello, World!" keyed with GitHub's example secret, from Python's `hmac`.
#[test]
fn sha1_is_the_last_resort_signature() {
    let s = GitSecret::new(b"It's a Secret to Everybody".to_vec());
    let sig = "sha1=01dc10d0c83e72ed246219cdd91669667fe2ca59";
    let h = headers(&[("x-hub-signature", sig)]);
    assert_eq!(verify(&h, b"Hello, World!", &s), Ok(()));
    assert_eq!(verify(&h, b"Hello, World?", &s), Err(AuthError::Invalid));
    // A stronger header present decides: a valid sha1 does not rescue a bad sha256.
    let both = headers(&[
        ("x-hub-signature", sig),
        ("x-hub-signature-256", &format!("sha256={}", "0".repeat(64))),
    ]);
    assert_eq!(verify(&both, b"Hello, World!", &s), Err(AuthError::Invalid));
}

#[test]
fn each_host_scheme() {
    let s = GitSecret::new(b"topsecret".to_vec());
    let body = br#"{"ref":"refs/heads/main"}"#;
    let mac = hex(&s.hmac_sha256(body));
    let prefixed = format!("sha256={mac}");
    for h in [
        "x-gitea-signature",
        "x-forgejo-signature",
        "x-gogs-signature",
    ] {
        assert_eq!(verify(&headers(&[(h, &mac)]), body, &s), Ok(()), "{h}");
        assert_eq!(
            verify(&headers(&[(h, &mac.replace('a', "b"))]), body, &s),
            Err(AuthError::Invalid),
            "{h}"
        );
    }
    assert_eq!(
        verify(&headers(&[("x-hub-signature", &prefixed)]), body, &s),
        Ok(())
    );
    assert_eq!(
        verify(&headers(&[("x-gitlab-token", "topsecret")]), body, &s),
        Ok(())
    );
    assert_eq!(
        verify(&headers(&[("x-gitlab-token", "topsecreT")]), body, &s),
        Err(AuthError::Invalid)
    );
    assert_eq!(verify(&HeaderMap::new(), body, &s), Err(AuthError::Missing));
}

#[test]
fn bad_signatures_are_invalid() {
    let s = GitSecret::new(b"k".to_vec());
    let body = b"{}";
    let mac = hex(&s.hmac_sha256(body));
    for bad in [
        format!("sha1={mac}"), // a SHA-256 MAC is not a SHA-1 one
        "sha1=0123456789abcdef0123456789abcdef01234567".to_string(),
        mac.clone(), // missing the sha256= prefix
        format!("sha256={}", &mac[..63]),
        format!("sha256={}", &mac[..62]),
        format!("sha256={}zz", &mac[..62]),
        "sha256=".to_string(),
    ] {
        assert_eq!(
            verify(&headers(&[("x-hub-signature-256", &bad)]), body, &s),
            Err(AuthError::Invalid),
            "{bad}"
        );
    }
    // The first header present decides: a valid Gitea one does not rescue a bad GitHub one.
    let h = headers(&[
        ("x-hub-signature-256", "sha256=00"),
        ("x-gitea-signature", &mac),
    ]);
    assert_eq!(verify(&h, body, &s), Err(AuthError::Invalid));
    for bad in ["sha1=abc", "md5=abc", "abc"] {
        assert_eq!(
            verify(&headers(&[("x-hub-signature", bad)]), body, &s),
            Err(AuthError::Invalid),
            "{bad}"
        );
    }
}

/// Gitea, Forgejo and Gogs sign the JSON inside a form's `payload` field, whichever header is
/// checked; GitHub signs the form itself.
#[test]
fn form_encoded_gitea_family_is_verified_on_the_payload_json() {
    let s = GitSecret::new(b"topsecret".to_vec());
    let json = r#"{"ref":"refs/heads/main","after":"x","message":"a b+c&d=é"}"#;
    let form = format!(
        "payload={}",
        percent_encoding::utf8_percent_encode(json, percent_encoding::NON_ALPHANUMERIC)
    )
    .replace("%20", "+");
    let over_json = hex(&s.hmac_sha256(json.as_bytes()));
    let over_form = hex(&s.hmac_sha256(form.as_bytes()));
    let form_type = ("content-type", "application/x-www-form-urlencoded");
    for event in ["x-gitea-event", "x-forgejo-event", "x-gogs-event"] {
        for sig in [
            "x-gitea-signature",
            "x-gogs-signature",
            "x-hub-signature-256",
        ] {
            let value = |mac: &str| {
                if sig == "x-hub-signature-256" {
                    format!("sha256={mac}")
                } else {
                    mac.to_owned()
                }
            };
            let ok = headers(&[form_type, (event, "push"), (sig, &value(&over_json))]);
            assert_eq!(verify(&ok, form.as_bytes(), &s), Ok(()), "{event} {sig}");
            let bad = headers(&[form_type, (event, "push"), (sig, &value(&over_form))]);
            assert_eq!(
                verify(&bad, form.as_bytes(), &s),
                Err(AuthError::Invalid),
                "{event} {sig}"
            );
        }
    }
    let github = headers(&[
        form_type,
        ("x-github-event", "push"),
        ("x-hub-signature-256", &format!("sha256={over_form}")),
    ]);
    assert_eq!(verify(&github, form.as_bytes(), &s), Ok(()));
    // A Gitea form without a payload field cannot be verified.
    let no_payload = headers(&[
        form_type,
        ("x-gitea-event", "push"),
        ("x-gitea-signature", &over_json),
    ]);
    assert_eq!(verify(&no_payload, b"other=1", &s), Err(AuthError::Invalid));
}

#[test]
fn the_event_header_tells_the_host() {
    let gitea = headers(&[("x-github-event", "push"), ("x-gitea-event", "push")]);
    assert_eq!(host(&gitea), Some(Host::GiteaFamily));
    let gogs = headers(&[("x-gogs-event", "push")]);
    assert_eq!(host(&gogs), Some(Host::GiteaFamily));
    assert_eq!(event_name(&gogs).as_deref(), Some("push"));
    let forgejo = headers(&[("x-forgejo-event", "push"), ("x-github-event", "push")]);
    assert_eq!(host(&forgejo), Some(Host::GiteaFamily));
    assert_eq!(
        host(&headers(&[("x-github-event", "push")])),
        Some(Host::GitHub)
    );
    assert_eq!(
        host(&headers(&[("x-gitlab-event", "Push Hook")])),
        Some(Host::GitLab)
    );
    assert_eq!(
        host(&headers(&[("x-event-key", "repo:push")])),
        Some(Host::Bitbucket)
    );
    assert_eq!(host(&HeaderMap::new()), None);
}

#[test]
fn delivery_ids() {
    assert_eq!(
        delivery_id(&headers(&[
            ("x-github-event", "push"),
            ("x-github-delivery", "abc-1")
        ])),
        Some("abc-1".into())
    );
    // GitLab: Idempotency-Key (kept by "Resend Request") before X-Gitlab-Event-UUID.
    let gl = headers(&[
        ("x-gitlab-event", "Push Hook"),
        ("x-gitlab-event-uuid", "event-uuid-2"),
        ("idempotency-key", "idem-1"),
    ]);
    assert_eq!(delivery_id(&gl), Some("idem-1".into()));
    let old_gitlab = headers(&[
        ("x-gitlab-event", "Push Hook"),
        ("x-gitlab-event-uuid", "e"),
    ]);
    assert_eq!(delivery_id(&old_gitlab), Some("e".into()));
    // Gogs sends only its own headers.
    let gogs = headers(&[("x-gogs-event", "push"), ("x-gogs-delivery", "g-1")]);
    assert_eq!(delivery_id(&gogs), Some("g-1".into()));
    // Bitbucket Cloud and Data Center.
    assert_eq!(
        delivery_id(&headers(&[
            ("x-event-key", "repo:push"),
            ("x-request-uuid", "u")
        ])),
        Some("u".into())
    );
    assert_eq!(
        delivery_id(&headers(&[
            ("x-event-key", "repo:refs_changed"),
            ("x-request-id", "r")
        ])),
        Some("r".into())
    );
    // A proxy's X-Request-Id is not a GitHub delivery id.
    assert_eq!(
        delivery_id(&headers(&[
            ("x-github-event", "push"),
            ("x-request-id", "proxy")
        ])),
        None
    );
    assert_eq!(
        delivery_id(&headers(&[
            ("x-gitlab-event", "Push Hook"),
            ("x-gitlab-event-uuid", &"x".repeat(201))
        ])),
        None
    );
    assert_eq!(delivery_id(&HeaderMap::new()), None);
}

#[test]
fn pushes_decide() {
    let p = main_and_staging();
    let h = headers(&[("x-github-event", "push")]);
    let push = |r: &str, after: &str| body(&format!(r#"{{"ref":"{r}","after":"{after}"}}"#));
    assert_eq!(
        outcome(decide(&h, &push("refs/heads/main", SHA), &p)),
        (vec![branch("main", SHA)], vec![])
    );
    let (b, why) = outcome(decide(&h, &push("refs/heads/dev", SHA), &p));
    assert!(
        b.is_empty() && why[0].contains("branch dev is not one of"),
        "{why:?}"
    );
    let (b, why) = outcome(decide(&h, &push("refs/tags/v1", SHA), &p));
    assert!(b.is_empty() && why[0].contains("builds no tags"), "{why:?}");
    let (_, why) = outcome(decide(&h, &push("refs/notes/x", SHA), &p));
    assert!(why[0].contains("neither a branch nor a tag"), "{why:?}");
    let del = body(
        r#"{"ref":"refs/heads/main","after":"0000000000000000000000000000000000000000","deleted":true}"#,
    );
    assert_eq!(
        outcome(decide(&h, &del, &p)).1,
        vec!["branch main was deleted; nothing to build".to_string()]
    );
    // A deleted tag is a deleted tag (issue 13), even for a project without tags.
    let del_tag = body(
        r#"{"ref":"refs/tags/v1.2","after":"0000000000000000000000000000000000000000","deleted":true}"#,
    );
    assert_eq!(
        outcome(decide(&h, &del_tag, &p)).1,
        vec!["tag v1.2 was deleted; nothing to build".to_string()]
    );
    let gl = headers(&[("x-gitlab-event", "Push Hook")]);
    let gitlab_del = push("refs/heads/main", &"0".repeat(40));
    assert!(outcome(decide(&gl, &gitlab_del, &p)).1[0].contains("branch main was deleted"));
    let ping = headers(&[("x-github-event", "ping")]);
    assert_eq!(decide(&ping, &body("{}"), &p), Ok(Decision::Ping));
    let issues = headers(&[("x-github-event", "issues")]);
    assert!(outcome(decide(&issues, &body("{}"), &p)).1[0].contains("not a push"));
    assert!(decide(&h, &push("refs/heads/main", "xyz"), &p).is_err());
    // Hostile branch names never build, whatever the globs.
    let any = project("branches = [\"**\"]");
    for evil in ["main rm -rf", "a..b", "-x", "x.lock", "HEAD"] {
        let (b, why) = outcome(decide(&h, &push(&format!("refs/heads/{evil}"), SHA), &any));
        assert!(b.is_empty(), "{evil}");
        assert!(
            why[0].contains("not a valid branch name"),
            "{evil}: {why:?}"
        );
    }
}

#[test]
fn tags_and_globs() {
    let p = project("branches = [\"main\", \"release/*\", \"hotfix/**\"]\ntags = [\"v*\"]");
    let h = headers(&[("x-github-event", "push")]);
    let push = |r: &str| body(&format!(r#"{{"ref":"{r}","after":"{SHA}"}}"#));
    let builds = |r: &str| outcome(decide(&h, &push(r), &p)).0;
    assert_eq!(builds("refs/tags/v1.2.0"), vec![tag("v1.2.0", SHA)]);
    assert!(builds("refs/tags/1.2.0").is_empty());
    assert_eq!(
        builds("refs/heads/release/1.2"),
        vec![branch("release/1.2", SHA)]
    );
    // `*` stays within one part; `**` crosses them.
    assert!(builds("refs/heads/release/1.2/x").is_empty());
    assert_eq!(
        builds("refs/heads/hotfix/a/b"),
        vec![branch("hotfix/a/b", SHA)]
    );
    // Unicode names are names.
    let u = project("branches = [\"déploiement\"]");
    assert_eq!(
        outcome(decide(&h, &push("refs/heads/déploiement"), &u)).0,
        vec![branch("déploiement", SHA)]
    );
    let (_, why) = outcome(decide(&h, &push("refs/tags/x1"), &p));
    assert!(
        why[0].contains("tag x1 is not one of this project's tags (v*)"),
        "{why:?}"
    );
}

/// The skip markers, without regard to case, on each host's head commit.
#[test]
fn skip_markers() {
    let p = main_and_staging();
    for msg in [
        "Fix typo [skip ci]",
        "[CI SKIP] docs",
        "wip [Skip Deploy]",
        "x\n\n[deploy skip]",
    ] {
        assert!(skip_marker(msg).is_some(), "{msg}");
        // GitHub: head_commit.
        let gh = serde_json::json!({"ref": "refs/heads/main", "after": SHA,
            "commits": [{"id": SHA, "message": "no marker here"}],
            "head_commit": {"id": SHA, "message": msg}});
        let (b, why) = outcome(decide(
            &headers(&[("x-github-event", "push")]),
            &body(&gh.to_string()),
            &p,
        ));
        assert!(
            b.is_empty() && why[0].contains("the head commit of branch main says"),
            "{why:?}"
        );
        // Gitea, GitLab: the commit whose id is the new SHA (not the others).
        let other = "1111111111111111111111111111111111111111";
        for event in [("x-gitea-event", "push"), ("x-gitlab-event", "Push Hook")] {
            let v = serde_json::json!({"ref": "refs/heads/main", "after": SHA,
                "commits": [{"id": other, "message": "[skip ci] old"}, {"id": SHA, "message": msg}]});
            assert!(
                outcome(decide(&headers(&[event]), &body(&v.to_string()), &p))
                    .0
                    .is_empty()
            );
            let v = serde_json::json!({"ref": "refs/heads/main", "after": SHA,
                "commits": [{"id": other, "message": msg}, {"id": SHA, "message": "deploy me"}]});
            assert_eq!(
                outcome(decide(&headers(&[event]), &body(&v.to_string()), &p)).0,
                vec![branch("main", SHA)],
                "a marker on an older commit does not count"
            );
        }
        // Bitbucket Cloud: new.target.message.
        let bb = serde_json::json!({"push": {"changes": [{"new": {"type": "branch", "name": "main",
            "target": {"hash": SHA, "message": msg}}, "old": null}]}});
        assert!(
            outcome(decide(
                &headers(&[("x-event-key", "repo:push")]),
                &body(&bb.to_string()),
                &p
            ))
            .0
            .is_empty()
        );
    }
    assert_eq!(skip_marker("[skip-ci] is not a marker"), None);
    // Tag pushes ignore markers.
    let t = project("branches = [\"main\"]\ntags = [\"v*\"]");
    let v = serde_json::json!({"ref": "refs/tags/v1", "after": SHA, "head_commit": {"id": SHA, "message": "[skip ci]"}});
    assert_eq!(
        outcome(decide(
            &headers(&[("x-github-event", "push")]),
            &body(&v.to_string()),
            &t
        ))
        .0,
        vec![tag("v1", SHA)]
    );
}

/// `paths`: ignored only when the payload lists every commit with its files and none matches.
#[test]
fn path_filters() {
    let p = project("branches = [\"main\"]\npaths = [\"site/**\", \"package.json\"]");
    let gh = headers(&[("x-github-event", "push")]);
    let gl = headers(&[("x-gitlab-event", "Push Hook")]);
    let commit = |files: serde_json::Value| {
        let mut c = serde_json::json!({"id": SHA, "message": "m"});
        if let serde_json::Value::Object(f) = files {
            c.as_object_mut().unwrap().extend(f);
        }
        c
    };
    let files = |added: &[&str], modified: &[&str]| serde_json::json!({"added": added, "modified": modified, "removed": []});
    let push = |commits: Vec<serde_json::Value>, extra: serde_json::Value| {
        let mut v = serde_json::json!({"ref": "refs/heads/main", "after": SHA, "commits": commits});
        if let serde_json::Value::Object(e) = extra {
            v.as_object_mut().unwrap().extend(e);
        }
        body(&v.to_string())
    };
    let none = serde_json::json!({});
    let builds = |h: &HeaderMap, b: Bytes| !outcome(decide(h, &b, &p)).0.is_empty();
    assert!(!builds(
        &gh,
        push(
            vec![commit(files(&["docs/a.md"], &["README"]))],
            none.clone()
        )
    ));
    let (_, why) = outcome(decide(
        &gh,
        &push(vec![commit(files(&["docs/a.md"], &[]))], none.clone()),
        &p,
    ));
    assert!(
        why[0].contains("no file changed on branch main matches this project's paths"),
        "{why:?}"
    );
    assert!(builds(
        &gh,
        push(
            vec![commit(files(&["docs/a.md"], &["site/x/index.html"]))],
            none.clone()
        )
    ));
    assert!(builds(
        &gh,
        push(vec![commit(files(&[], &["package.json"]))], none.clone())
    ));
    // `*`-less top-level name: only the top-level file.
    assert!(!builds(
        &gh,
        push(
            vec![commit(files(&[], &["sub/package.json"]))],
            none.clone()
        )
    ));
    // Never ignored: no commits listed, a commit without file lists, no files at all...
    assert!(builds(&gh, push(vec![], none.clone())));
    assert!(builds(
        &gh,
        push(vec![commit(serde_json::json!({}))], none.clone())
    ));
    assert!(builds(
        &gh,
        push(vec![commit(files(&[], &[]))], none.clone())
    ));
    // ...more commits pushed than listed (GitLab), GitHub's list at its cap.
    assert!(builds(
        &gl,
        push(
            vec![commit(files(&["docs/a.md"], &[]))],
            serde_json::json!({"total_commits_count": 21})
        )
    ));
    assert!(!builds(
        &gl,
        push(
            vec![commit(files(&["docs/a.md"], &[]))],
            serde_json::json!({"total_commits_count": 1})
        )
    ));
    let capped: Vec<_> = (0..2048)
        .map(|_| commit(files(&["docs/a.md"], &[])))
        .collect();
    assert!(builds(&gh, push(capped, none.clone())));
    let under: Vec<_> = (0..2047)
        .map(|_| commit(files(&["docs/a.md"], &[])))
        .collect();
    assert!(!builds(&gh, push(under, none)));
}

#[test]
fn system_hook_paths() {
    for (repo, path, yes) in [
        (
            "https://gitlab.example.com/mike/diaspora.git",
            "mike/diaspora",
            true,
        ),
        (
            "https://gitlab.example.com/Mike/Diaspora",
            "mike/diaspora.git",
            true,
        ),
        (
            "https://gitlab.example.com:8443/group/mike/diaspora.git/",
            "mike/diaspora",
            true,
        ),
        (
            "ssh://git@gitlab.example.com:2222/mike/diaspora.git",
            "mike/diaspora",
            true,
        ),
        (
            "git@gitlab.example.com:mike/diaspora.git",
            "mike/diaspora",
            true,
        ),
        ("/srv/git/mike/diaspora.git", "mike/diaspora", true),
        ("/srv/git/mike/diaspora", "diaspora", true),
        (
            "https://gitlab.example.com/xmike/diaspora.git",
            "mike/diaspora",
            false,
        ),
        (
            "https://gitlab.example.com/mike/diaspora-2.git",
            "mike/diaspora",
            false,
        ),
        (
            "git@gitlab.example.com:diaspora.git",
            "mike/diaspora",
            false,
        ),
        ("https://gitlab.example.com/mike/diaspora.git", "", false),
    ] {
        assert_eq!(system_hook_matches(repo, path), yes, "{repo} vs {path}");
    }
}

/// What `decide` makes of fixture `name` sent with headers `h` to project `p`.
fn decided(h: &HeaderMap, name: &str, p: &ProjectConfig) -> (Vec<RefBuild>, Vec<String>) {
    outcome(decide(h, &fixture(name), p))
}

/// Fixture `name`, sent with headers `h` to project `p`, is ignored for exactly `why`.
#[track_caller]
fn assert_ignored(h: &HeaderMap, name: &str, p: &ProjectConfig, why: &str) {
    assert_eq!(decided(h, name, p).1, vec![why.to_string()], "{name}");
}

/// Each host's own payload, with the event header it sends.
#[test]
fn the_hosts_own_payloads() {
    // octokit/webhooks (GitHub), Gitea (try.gitea.io), Gogs, GitLab docs, Bitbucket Cloud
    // and Data Center, each with the event header it sends.
    let gh = headers(&[("x-github-event", "push")]);
    let gitea = headers(&[("x-gitea-event", "push"), ("x-github-event", "push")]);
    let gogs = headers(&[("x-gogs-event", "push")]);
    let gl = headers(&[("x-gitlab-event", "Push Hook")]);
    let tph = headers(&[("x-gitlab-event", "Tag Push Hook")]);
    let sys = headers(&[("x-gitlab-event", "System Hook")]);
    let bb = headers(&[("x-event-key", "repo:push")]);
    let dc = headers(&[("x-event-key", "repo:refs_changed")]);
    let master = project("branches = [\"master\"]");
    let tags = project("branches = [\"master\"]\ntags = [\"simple-*\"]");
    let d = project("branches = [\"d\"]");
    let nothing_matches = project("branches = [\"master\"]\npaths = [\"nothing/**\"]");
    let v_tags = project("branches = [\"master\"]\ntags = [\"v*\"]");
    // GitLab System Hooks are matched to the project's repo path.
    let diaspora = project("branches = [\"master\"]");
    let example = project_of(
        "[projects.ex]\nbranches = [\"master\"]\ntags = [\"v*\"]\ncommand = \"true\"\nrepo = \"git@gitlab.example.com:jsmith/example.git\"\n",
        "ex",
    );
    let a_tags = project("branches = [\"master\"]\ntags = [\"a\"]");
    let both = project("branches = [\"master\", \"branch*\"]");

    // Fixture, headers, project, and the builds it makes. One row a line.
    #[rustfmt::skip]
    let cases = [
        // octokit/webhooks (GHES 3.5): tag simple-tag created; head_commit.id is its commit.
        ("github-push-tag-created.json", &gh, &tags, vec![tag("simple-tag", "6113728f27ae82c7b1a177c8d03f9e96e0adf246")]),
        // Gitea: five commits to branch `d`, each modifying 1.c.
        ("gitea-push-5-commits.json", &gitea, &d, vec![branch("d", "2ec0c971d04723523aa20f2b378f8b419b47d4ec")]),
        // Gogs: one commit to master.
        ("gogs-push.json", &gogs, &master, vec![branch("master", "0a05129851238652bf806a400af89fa974ade739")]),
        // GitLab: Push Hook listing 2 of 4 commits: never ignored for paths.
        ("gitlab-push-hook.json", &gl, &nothing_matches, vec![branch("master", "da1560886d4f094c3e6c9ef40349f7d38b5d27d7")]),
        ("gitlab-tag-push-hook.json", &tph, &v_tags, vec![tag("v1.0.0", "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7")]),
        ("gitlab-system-hook-push.json", &sys, &diaspora, vec![branch("master", "da1560886d4f094c3e6c9ef40349f7d38b5d27d7")]),
        // An annotated tag: `after` is the tag object, `checkout_sha` its commit.
        ("gitlab-system-hook-tag-push.json", &sys, &example, vec![tag("v1.0.0", "5937ac0a7beb003549fc5fd26fc247adbce4a52e")]),
        // Bitbucket Data Center.
        ("bitbucket-dc-refs-changed.json", &dc, &master, vec![branch("master", "22671f0349857934857983457983475ec39f196b")]),
        ("bitbucket-dc-multi-branch.json", &dc, &both, vec![
            branch("branch1", "3980c2be32a7e23c795741d5dc1a2eecb9b85d6d"),
            branch("master", "fc43d13cff1abb28631196944ba4fc4ad06a2cf2"),
        ]),
    ];
    for (name, h, p, want) in cases {
        assert_eq!(decided(h, name, p).0, want, "{name}");
    }

    // octokit/webhooks: a new branch `master` with one commit adding README.md.
    assert_eq!(
        decided(&gh, "github-push-new-branch.json", &master),
        (
            vec![branch("master", "6113728f27ae82c7b1a177c8d03f9e96e0adf246")],
            vec![]
        )
    );
    let docs_only = project("branches = [\"master\"]\npaths = [\"docs/**\"]");
    assert!(
        decided(&gh, "github-push-new-branch.json", &docs_only)
            .0
            .is_empty()
    );
    let readme = project("branches = [\"master\"]\npaths = [\"README.md\"]");
    assert_eq!(
        decided(&gh, "github-push-new-branch.json", &readme).0.len(),
        1
    );
    // octokit/webhooks: tag simple-tag deleted.
    assert_ignored(
        &gh,
        "github-push-tag-deleted.json",
        &master,
        "tag simple-tag was deleted; nothing to build",
    );
    assert_eq!(
        decide(
            &headers(&[("x-github-event", "ping")]),
            &fixture("github-ping.json"),
            &master
        ),
        Ok(Decision::Ping)
    );
    // Gitea: only 1.c changed.
    let c_only = project("branches = [\"d\"]\npaths = [\"*.c\"]");
    assert_eq!(
        decided(&gitea, "gitea-push-5-commits.json", &c_only)
            .0
            .len(),
        1
    );
    let h_only = project("branches = [\"d\"]\npaths = [\"*.h\"]");
    assert!(
        decided(&gitea, "gitea-push-5-commits.json", &h_only)
            .0
            .is_empty()
    );
    // A System Hook tag push for another repo path.
    let (b, why) = decided(&sys, "gitlab-system-hook-tag-push.json", &diaspora);
    assert!(b.is_empty() && why[0].contains("jsmith/example"), "{why:?}");
    // Bitbucket Cloud: branch master and tag a in one push.
    assert_eq!(
        decided(&bb, "bitbucket-cloud-branch-and-tag.json", &a_tags),
        (
            vec![
                branch("master", "84b96adc644a30fd6465b3d196369d880762afed"),
                tag("a", "450118afff93569d1ce362174e9f1a7f104f9166")
            ],
            vec![]
        )
    );
    let (b, why) = decided(&bb, "bitbucket-cloud-branch-and-tag.json", &master);
    assert_eq!(b.len(), 1);
    assert!(
        why[0].contains("tag a was pushed, but this project builds no tags"),
        "{why:?}"
    );
    // Bitbucket Data Center.
    let (b, why) = decided(&dc, "bitbucket-dc-multi-branch.json", &master);
    assert_eq!(
        b,
        vec![branch("master", "fc43d13cff1abb28631196944ba4fc4ad06a2cf2")]
    );
    assert!(why[0].contains("branch branch1 is not one of"), "{why:?}");
    assert_ignored(
        &dc,
        "bitbucket-dc-tag-deleted.json",
        &a_tags,
        "tag test-tag was deleted; nothing to build",
    );
    assert_eq!(
        decide(
            &headers(&[("x-event-key", "diagnostics:ping")]),
            &fixture("bitbucket-dc-diagnostics-ping.json"),
            &master
        ),
        Ok(Decision::Ping)
    );
}

#[test]
fn a_form_payload_is_passed_on_decoded() {
    let p = main_and_staging();
    let json = format!(r#"{{"ref":"refs/heads/staging","after":"{SHA}","m":"a b+c"}}"#);
    let form = format!(
        "payload={}",
        percent_encoding::utf8_percent_encode(&json, percent_encoding::NON_ALPHANUMERIC)
    )
    .replace("%20", "+");
    let h = headers(&[
        ("x-github-event", "push"),
        ("content-type", "application/x-www-form-urlencoded"),
    ]);
    match decide(&h, &body(&form), &p) {
        Ok(Decision::Build {
            builds, payload, ..
        }) => {
            assert_eq!(builds, vec![branch("staging", SHA)]);
            assert_eq!(payload, json.as_bytes(), "byte for byte");
        }
        other => panic!("{other:?}"),
    }
    assert!(decide(&h, &body("other=1"), &p).is_err());
    assert!(decide(&h, &body("payload=%zz"), &p).is_err());
}

#[test]
fn bitbucket_shapes() {
    let p = main_and_staging();
    let h = headers(&[("x-event-key", "repo:push")]);
    let del = body(r#"{"push":{"changes":[{"new":null,"old":{"type":"branch","name":"main"}}]}}"#);
    assert!(outcome(decide(&h, &del, &p)).1[0].contains("branch main was deleted"));
    let del_tag = body(r#"{"push":{"changes":[{"new":null,"old":{"type":"tag","name":"v1"}}]}}"#);
    assert_eq!(
        outcome(decide(&h, &del_tag, &p)).1,
        vec!["tag v1 was deleted; nothing to build".to_string()]
    );
    assert!(decide(&h, &body(r#"{"push":{}}"#), &p).is_err());
    let dc = headers(&[("x-event-key", "repo:refs_changed")]);
    let two = format!(
        r#"{{"changes":[{{"ref":{{"id":"refs/heads/main"}},"toHash":"{SHA}","type":"UPDATE"}},{{"ref":{{"id":"refs/heads/staging"}},"toHash":"{SHA}","type":"ADD"}},{{"ref":{{"id":"refs/heads/main"}},"toHash":"{SHA}","type":"DELETE"}}]}}"#
    );
    let (b, why) = outcome(decide(&dc, &body(&two), &p));
    assert_eq!(b, vec![branch("main", SHA), branch("staging", SHA)]);
    assert_eq!(
        why,
        vec!["branch main was deleted; nothing to build".to_string()]
    );
    assert!(decide(&dc, &body(r#"{"changes":[{"toHash":"x"}]}"#), &p).is_err());
}

#[test]
fn gitlab_system_hook_events() {
    let p = main_and_staging();
    let sys = headers(&[("x-gitlab-event", "System Hook")]);
    let other = body(
        r#"{"event_name":"repository_update","project":{"path_with_namespace":"mike/diaspora"}}"#,
    );
    assert!(
        outcome(decide(&sys, &other, &p)).1[0]
            .contains("System Hook event \"repository_update\" is not a push")
    );
    let no_path = body(&format!(
        r#"{{"event_name":"push","ref":"refs/heads/main","after":"{SHA}"}}"#
    ));
    assert!(decide(&sys, &no_path, &p).is_err());
    let workdir = project_of(
        "[projects.w]\nbranches = [\"main\"]\ncommand = \"true\"\nworkdir = \"/tmp\"\n",
        "w",
    );
    let push = body(&format!(
        r#"{{"event_name":"push","ref":"refs/heads/main","after":"{SHA}","project":{{"path_with_namespace":"mike/diaspora"}}}}"#
    ));
    assert_eq!(
        outcome(decide(&sys, &push, &p)).0,
        vec![branch("main", SHA)]
    );
    assert!(
        outcome(decide(&sys, &push, &workdir)).0.is_empty(),
        "no repo: never ours"
    );
}

#[test]
fn malformed_bodies_are_parse_errors() {
    let p = main_and_staging();
    let h = headers(&[("x-github-event", "push")]);
    assert!(decide(&h, &Bytes::from_static(b"\xff\xfe"), &p).is_err());
    assert!(decide(&h, &body("{not json"), &p).is_err());
    assert!(decide(&h, &body("[]"), &p).is_err());
    assert!(decide(&h, &body(r#"{"ref":5,"after":"x"}"#), &p).is_err());
}

/// Random headers and bodies never panic the verifier or the parser.
#[test]
fn random_input_never_panics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let s = GitSecret::new(b"secret".to_vec());
    let p = project("branches = [\"**\"]\ntags = [\"*\"]\npaths = [\"a/**\"]");
    let names = [
        "x-hub-signature-256",
        "x-hub-signature",
        "x-gitea-signature",
        "x-gogs-signature",
        "x-gitlab-token",
        "x-github-event",
        "x-gitea-event",
        "x-gogs-event",
        "x-gitlab-event",
        "x-event-key",
        "x-github-delivery",
        "idempotency-key",
        "content-type",
    ];
    let values: [&[u8]; 8] = [
        b"push",
        b"repo:push",
        b"repo:refs_changed",
        b"System Hook",
        b"Tag Push Hook",
        b"application/x-www-form-urlencoded",
        b"sha1=",
        b"sha256=",
    ];
    let fragments: [&[u8]; 16] = [
        b"{",
        b"}",
        b"[",
        b"]",
        b"\"ref\":",
        b"\"refs/heads/main\"",
        b"\"refs/tags/v\"",
        b"\"after\":",
        b",",
        b"payload=",
        b"%",
        b"\xff",
        b"\"push\":{\"changes\":[{\"new\":",
        b"\"changes\":[{\"ref\":{\"id\":",
        b"\"commits\":[{\"id\":",
        b"\"event_name\":\"push\"",
    ];
    for _ in 0..5000 {
        let mut h = HeaderMap::new();
        for _ in 0..rng.random_range(0..5) {
            let name = names[rng.random_range(0..names.len())];
            let len = rng.random_range(0..80);
            let v: Vec<u8> = (0..len).map(|_| rng.random_range(0x20u8..0x7f)).collect();
            let v = if rng.random_bool(0.5) {
                values[rng.random_range(0..values.len())].to_vec()
            } else {
                v
            };
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                h.insert(name, v);
            }
        }
        let mut b = Vec::new();
        for _ in 0..rng.random_range(0..24) {
            if rng.random_bool(0.5) {
                b.extend_from_slice(fragments[rng.random_range(0..fragments.len())]);
            } else {
                b.push(rng.random());
            }
        }
        let b = Bytes::from(b);
        let _ = verify(&h, &b, &s);
        let _ = decide(&h, &b, &p);
        let _ = delivery_id(&h);
    }
}
