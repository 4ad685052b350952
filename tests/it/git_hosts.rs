//! The Git hosts' own deliveries (`tests/fixtures/git/`, sources in its README) replayed
//! against the daemon with each host's header set and signing, building a real local
//! repository whose commits and branches stand in for the fixtures' (issue 13).

use std::path::{Path, PathBuf};
use std::process::Command;

use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

use crate::util::*;

const SECRET: &str = "fixture-secret";

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/git")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn hmac_hex<M: Mac + KeyInit>(body: &[u8]) -> String {
    mac_hex::<M>(SECRET, body)
}

/// How a delivery is encoded.
#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Json,
    /// `application/x-www-form-urlencoded` with the JSON in `payload` (as Go's
    /// `url.Values.Encode` writes it: spaces as `+`).
    Form,
}

fn form_encode(json: &str) -> String {
    const QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    format!(
        "payload={}",
        percent_encoding::utf8_percent_encode(json, QUERY)
    )
    .replace("%20", "+")
}

/// One host's deliveries to daemon `d`, as JSON with the host's header set `headers_file`.
struct Host<'a> {
    d: &'a Daemon,
    headers_file: &'a str,
}

impl<'a> Host<'a> {
    fn new(d: &'a Daemon, headers_file: &'a str) -> Self {
        Host { d, headers_file }
    }

    /// One delivery of `json` for `event` to `project`, with delivery id `delivery`.
    fn deliver(&self, project: &str, event: &str, json: &str, delivery: &str) -> Resp {
        let Host { d, headers_file } = *self;
        deliver_encoded(
            d,
            project,
            headers_file,
            event,
            json,
            delivery,
            Encoding::Json,
        )
    }
}

/// One delivery, its body encoded as `encoding` says: `headers_file` is the host's header
/// set, with its placeholders filled in. The Gitea family signs the JSON; every other host
/// signs the body as sent.
fn deliver_encoded(
    d: &Daemon,
    project: &str,
    headers_file: &str,
    event: &str,
    json: &str,
    delivery: &str,
    encoding: Encoding,
) -> Resp {
    let body = match encoding {
        Encoding::Json => json.to_owned(),
        Encoding::Form => form_encode(json),
    };
    let gitea_family = ["gitea", "forgejo", "gogs"]
        .iter()
        .any(|h| headers_file.starts_with(h));
    let signed = if gitea_family { json } else { body.as_str() };
    let content_type = match encoding {
        Encoding::Json => "application/json",
        Encoding::Form => "application/x-www-form-urlencoded",
    };
    let sha256 = hmac_hex::<hmac::Hmac<sha2::Sha256>>(signed.as_bytes());
    let sha1 = hmac_hex::<hmac::Hmac<sha1::Sha1>>(signed.as_bytes());
    let event_uuid = format!("{delivery}-event-{}", rand_suffix());
    let lines: Vec<(String, String)> = fixture(headers_file)
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| {
            let v = v
                .replace("{event}", event)
                .replace("{delivery}", delivery)
                .replace("{event_uuid}", &event_uuid)
                .replace("{secret}", SECRET)
                .replace("{content_type}", content_type)
                .replace("{sha256}", &sha256)
                .replace("{sha1}", &sha1);
            (k.to_owned(), v)
        })
        .collect();
    let h: Vec<(&str, &str)> = lines
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    request(
        d.addr,
        "POST",
        &format!("/git/{project}"),
        &h,
        body.as_bytes(),
    )
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A Git repository at `root/mike/diaspora` (the path GitLab's System Hook examples name),
/// with `root/jsmith/example` a symlink to it.
struct HostRepo {
    _root: tempfile::TempDir,
    path: PathBuf,
    example: PathBuf,
}

impl HostRepo {
    fn new() -> HostRepo {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("mike/diaspora");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::create_dir_all(root.path().join("jsmith")).unwrap();
        let example = root.path().join("jsmith/example");
        std::os::unix::fs::symlink(&path, &example).unwrap();
        let r = HostRepo {
            _root: root,
            path,
            example,
        };
        r.git(&["init", "--quiet", "--initial-branch=master"]);
        r.git(&["config", "user.email", "test@example.com"]);
        r.git(&["config", "user.name", "Test"]);
        r
    }

    fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(&self.path)
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

    /// Commits `file` on the current branch; returns the new HEAD.
    fn commit(&self, file: &str, content: &str) -> String {
        let p = self.path.join(file);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(p, content).unwrap();
        self.git(&["add", "."]);
        self.git(&["commit", "--quiet", "-m", &format!("update {file}")]);
        self.git(&["rev-parse", "HEAD"])
    }
}

/// The `branches` and `tags` of `site` and `example` (`mono` has no tags).
const ALL_REFS: &str =
    "branches = [\"master\", \"d\", \"branch*\"]\ntags = [\"simple-tag\", \"a\", \"v*\"]";

/// A daemon with three projects on `repo`: `site` (every fixture's refs), `mono` (with
/// `paths`) and `example` (the repo by its other path, for GitLab's System Hook example).
/// Builds copy their payload to `out/<uuid>.payload` and print their DEPLOYHOOK_ variables.
fn daemon(repo: &HostRepo, out: &Path) -> Daemon {
    let secret = out.join("git.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let command = format!(
        "if [ -n \"$DEPLOYHOOK_PAYLOAD\" ]; then cp \"$DEPLOYHOOK_PAYLOAD\" {}/$DEPLOYHOOK_BUILD_UUID.payload; fi; env | grep ^DEPLOYHOOK_ | sort",
        out.display()
    );
    let project = |name: &str, repo: &Path, extra: &str| {
        format!(
            "[projects.{name}]\nrepo = {}\ncommand = {}\ngit_secret_file = {}\ncancel_superseded = false\nproject_builds_per_minute = 1000\n{extra}\n",
            toml_str(&repo.display().to_string()),
            toml_str(&command),
            toml_str(&secret.display().to_string()),
        )
    };
    let cfg = format!(
        "{}{}{}",
        project("site", &repo.path, ALL_REFS),
        project(
            "mono",
            &repo.path,
            "branches = [\"master\", \"d\"]\npaths = [\"web/**\"]"
        ),
        project("example", &repo.example, ALL_REFS),
    );
    Daemon::start_with_server("builds_per_minute = 1000", &cfg)
}

/// The build of a 200 answer (its `result`), after it stopped successfully.
fn built(d: &Daemon, r: &Resp) -> Value {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert!(v["result"]["more_builds"].is_array(), "{v}");
    let id = v["result"]["build_uuid"].as_str().unwrap().to_string();
    let b = d.wait_status(&id, "stopped", 60);
    assert_eq!(
        b["build_outcome"],
        "success",
        "{b}\n{}",
        d.log_text(&id, "system")
    );
    b
}

/// The builds of a 200 answer to a two-ref delivery: its first build (see [`built`]), the one
/// entry of its `more_builds`, and that entry's build once stopped.
fn built_two(d: &Daemon, r: &Resp) -> (Value, Value, Value) {
    let first = built(d, r);
    let more = r.json()["result"]["more_builds"].clone();
    assert_eq!(more.as_array().unwrap().len(), 1, "{more}");
    let second = d.wait_status(more[0]["build_uuid"].as_str().unwrap(), "stopped", 60);
    (first, more[0].clone(), second)
}

/// A 200 answer that made one build only: its body and its first message.
fn one_build(r: &Resp) -> (Value, String) {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["result"]["more_builds"], json!([]), "{v}");
    let message = v["messages"][0]["message"].as_str().unwrap_or_default();
    (v.clone(), message.to_owned())
}

fn ignored(r: &Resp) -> Vec<String> {
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["result"], Value::Null);
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap().to_string())
        .collect()
}

fn env_of(d: &Daemon, b: &Value) -> String {
    d.log_text(b["build_uuid"].as_str().unwrap(), "stdout")
}

#[test]
fn github_deliveries_replayed() {
    let repo = HostRepo::new();
    let head = repo.commit("README.md", "hello\n");
    let out = tempfile::tempdir().unwrap();
    let d = daemon(&repo, out.path());
    let gh = Host::new(&d, "github.headers");
    let ghe = Host::new(&d, "github-enterprise-sha1.headers");

    let r = gh.deliver("site", "ping", &fixture("github-ping.json"), "gh-ping");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["result"], json!({"event": "ping"}));

    // A new branch with one commit: built at exactly that commit.
    let push = fixture("github-push-new-branch.json")
        .replace("6113728f27ae82c7b1a177c8d03f9e96e0adf246", &head);
    let r = gh.deliver("site", "push", &push, "gh-1");
    let b = built(&d, &r);
    assert_eq!(b["commit"], head.as_str());
    assert_eq!(b["requested_commit"], head.as_str());
    assert_eq!(b["branch"], "master");
    assert_eq!(r.json()["result"]["more_builds"], json!([]));
    let payload = std::fs::read(
        out.path()
            .join(format!("{}.payload", b["build_uuid"].as_str().unwrap())),
    )
    .unwrap();
    assert_eq!(payload, push.as_bytes());

    // Older GitHub Enterprise: only X-Hub-Signature: sha1=.
    let r = ghe.deliver("site", "push", &push, "ghe-1");
    assert_eq!(built(&d, &r)["commit"], head.as_str());

    // The README only: ignored by `mono` (paths = ["web/**"]) in the words of the case.
    let r = gh.deliver("mono", "push", &push, "gh-mono");
    assert_eq!(
        ignored(&r),
        vec!["no file changed on branch master matches this project's paths; nothing to build"]
    );

    // A skip marker in the head commit's message, in any case.
    let skip = push.replace("\"Initial commit\"", "\"Initial commit [Skip CI]\"");
    assert_ne!(skip, push);
    let r = gh.deliver("site", "push", &skip, "gh-skip");
    assert!(ignored(&r)[0].contains("the head commit of branch master says [skip ci]"));

    // A tag push (GitHub Enterprise's example) of an annotated tag: `after` is the tag
    // object, `head_commit.id` its commit, which is what is built, not master's head.
    repo.git(&["tag", "-a", "simple-tag", "-m", "release", &head]);
    let tag_object = repo.git(&["rev-parse", "simple-tag"]);
    assert_ne!(tag_object, head);
    let later = repo.commit("later.txt", "master moved on\n");
    let tag_push = fixture("github-push-tag-created.json")
        .replace(
            "\"after\": \"6113728f27ae82c7b1a177c8d03f9e96e0adf246\"",
            &format!("\"after\": \"{tag_object}\""),
        )
        .replace("6113728f27ae82c7b1a177c8d03f9e96e0adf246", &head);
    let r = gh.deliver("site", "push", &tag_push, "gh-tag");
    let b = built(&d, &r);
    assert_eq!(b["ref"], "refs/tags/simple-tag");
    assert_eq!(b["tag"], "simple-tag");
    assert_eq!(b["branch"], Value::Null);
    assert_eq!(b["commit"], head.as_str());
    assert_eq!(b["requested_commit"], head.as_str());
    assert_eq!(b["requested_commits"], json!([head]));
    assert_ne!(b["commit"], later.as_str());
    let env = env_of(&d, &b);
    for line in [
        "DEPLOYHOOK_REF=refs/tags/simple-tag",
        "DEPLOYHOOK_TAG=simple-tag",
        &format!("DEPLOYHOOK_COMMIT={head}"),
    ] {
        assert!(env.lines().any(|l| l == line), "{line} not in\n{env}");
    }
    assert!(env.lines().any(|l| l == "DEPLOYHOOK_BRANCH="), "{env}");

    // A deleted tag is a deleted tag.
    let r = gh.deliver(
        "site",
        "push",
        &fixture("github-push-tag-deleted.json"),
        "gh-del",
    );
    assert_eq!(
        ignored(&r),
        vec!["tag simple-tag was deleted; nothing to build"]
    );
}

#[test]
fn gitea_forgejo_and_gogs_deliveries_replayed() {
    let repo = HostRepo::new();
    repo.commit("README.md", "hello\n");
    repo.git(&["checkout", "--quiet", "-b", "d"]);
    let d_head = repo.commit("1.c", "int main(void) { return 0; }\n");
    repo.git(&["checkout", "--quiet", "master"]);
    let master = repo.commit("cm.yaml", "a: 1\n");
    let out = tempfile::tempdir().unwrap();
    let d = daemon(&repo, out.path());

    let gitea = fixture("gitea-push-5-commits.json")
        .replace("2ec0c971d04723523aa20f2b378f8b419b47d4ec", &d_head);
    let gogs =
        fixture("gogs-push.json").replace("0a05129851238652bf806a400af89fa974ade739", &master);
    let mut n = 0;
    for (headers, json, branch, head) in [
        ("gitea.headers", &gitea, "d", &d_head),
        ("forgejo.headers", &gitea, "d", &d_head),
        ("gogs.headers", &gogs, "master", &master),
    ] {
        for encoding in [Encoding::Json, Encoding::Form] {
            n += 1;
            let r = deliver_encoded(
                &d,
                "site",
                headers,
                "push",
                json,
                &format!("gt-{n}"),
                encoding,
            );
            let b = built(&d, &r);
            assert_eq!(b["branch"], branch, "{headers}");
            assert_eq!(b["commit"], head.as_str(), "{headers}");
            // The payload is the JSON, byte for byte, also when it came form-encoded.
            let payload = std::fs::read(
                out.path()
                    .join(format!("{}.payload", b["build_uuid"].as_str().unwrap())),
            )
            .unwrap();
            assert_eq!(payload, json.as_bytes(), "{headers}");
            assert!(env_of(&d, &b).contains(&format!("DEPLOYHOOK_BRANCH={branch}")));
        }
    }
    // Every commit modified 1.c only: `mono` (paths = ["web/**"]) ignores the push.
    let r = deliver_encoded(
        &d,
        "mono",
        "gitea.headers",
        "push",
        &gitea,
        "gt-mono",
        Encoding::Form,
    );
    assert!(ignored(&r)[0].contains("no file changed on branch d matches"));
}

#[test]
fn gitlab_deliveries_replayed() {
    let repo = HostRepo::new();
    let first = repo.commit("CHANGELOG", "one\n");
    let head = repo.commit("app/controller/application.rb", "two\n");
    let out = tempfile::tempdir().unwrap();
    let d = daemon(&repo, out.path());
    let gl = Host::new(&d, "gitlab.headers");

    let push = fixture("gitlab-push-hook.json")
        .replace("b6568db1bc1dcd7f8b4d5a946b0b91f9dacd7327", &first)
        .replace("da1560886d4f094c3e6c9ef40349f7d38b5d27d7", &head);
    let r = gl.deliver("site", "Push Hook", &push, "idem-1");
    let b = built(&d, &r);
    assert_eq!(b["commit"], head.as_str());
    // "Resend Request": a new X-Gitlab-Event-UUID, the same Idempotency-Key: no new build.
    let r = gl.deliver("site", "Push Hook", &push, "idem-1");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["result"]["build_uuid"], b["build_uuid"]);
    assert_eq!(r.json()["result"]["already_exists"], true);
    // 2 of 4 commits listed: never ignored for paths.
    let r = gl.deliver("mono", "Push Hook", &push, "idem-mono");
    built(&d, &r);

    // Tags: a Tag Push Hook builds the tag's commit; a System Hook's annotated tag (`after` is
    // the tag object) builds its `checkout_sha`.
    repo.git(&["tag", "-a", "v1.0.0", "-m", "release 1.0.0", &first]);
    let tag_object = repo.git(&["rev-parse", "v1.0.0"]);
    let tag_push = fixture("gitlab-tag-push-hook.json")
        .replace("82b3d5ae55f7080f1e6022629cdb57bfae7cccc7", &first);
    let r = gl.deliver("site", "Tag Push Hook", &tag_push, "tag-1");
    let b = built(&d, &r);
    assert_eq!(b["ref"], "refs/tags/v1.0.0");
    assert_eq!(b["commit"], first.as_str());
    let sys_tag = fixture("gitlab-system-hook-tag-push.json")
        .replace("82b3d5ae55f7080f1e6022629cdb57bfae7cccc7", &tag_object)
        .replace("5937ac0a7beb003549fc5fd26fc247adbce4a52e", &first);
    let r = gl.deliver("example", "System Hook", &sys_tag, "sys-tag");
    let b = built(&d, &r);
    assert_eq!(b["project"], "example");
    assert_eq!(b["tag"], "v1.0.0");
    assert_eq!(b["requested_commit"], first.as_str());
    assert_eq!(b["commit"], first.as_str());
    // A deleted tag (a Tag Push Hook to the zero SHA).
    let deleted = tag_push.replace(
        &format!("\"after\": \"{first}\""),
        "\"after\": \"0000000000000000000000000000000000000000\"",
    );
    let r = gl.deliver("site", "Tag Push Hook", &deleted, "tag-2");
    assert_eq!(
        ignored(&r),
        vec!["tag v1.0.0 was deleted; nothing to build"]
    );

    // System Hooks build only the project whose repo path ends with path_with_namespace.
    let sys = fixture("gitlab-system-hook-push.json")
        .replace("da1560886d4f094c3e6c9ef40349f7d38b5d27d7", &head);
    let r = gl.deliver("site", "System Hook", &sys, "sys-1");
    assert_eq!(built(&d, &r)["commit"], head.as_str());
    let r = gl.deliver("example", "System Hook", &sys, "sys-2");
    assert!(
        ignored(&r)[0].contains("GitLab project mike/diaspora, which is not this project's repo")
    );
}

#[test]
fn bitbucket_deliveries_replayed() {
    let repo = HostRepo::new();
    let first = repo.commit("README.md", "hello\n");
    repo.git(&["branch", "branch1"]);
    let master = repo.commit("a.txt", "a\n");
    let out = tempfile::tempdir().unwrap();
    let d = daemon(&repo, out.path());
    let bb = Host::new(&d, "bitbucket-cloud.headers");
    let dc = Host::new(&d, "bitbucket-dc.headers");

    // Cloud: branch master and tag a in one push: two builds, in payload order.
    repo.git(&["tag", "a", &first]);
    let cloud = fixture("bitbucket-cloud-branch-and-tag.json")
        .replace("84b96adc644a30fd6465b3d196369d880762afed", &master)
        .replace("450118afff93569d1ce362174e9f1a7f104f9166", &first);
    let r = bb.deliver("site", "repo:push", &cloud, "{cloud-1}");
    let (b, more, t) = built_two(&d, &r);
    assert_eq!(b["branch"], "master");
    assert_eq!(b["commit"], master.as_str());
    assert_eq!(more["tag"], "a", "{more}");
    assert_eq!(more["already_exists"], false);
    assert_eq!(t["build_outcome"], "success", "{t}");
    assert_eq!(t["commit"], first.as_str());
    // `mono` builds no tags: master builds, the tag is listed in messages.
    let r = bb.deliver("mono", "repo:push", &cloud, "{cloud-2}");
    let (v, message) = one_build(&r);
    assert!(
        message.contains("tag a was pushed, but this project builds no tags"),
        "{v}"
    );

    // Data Center: one branch; then two branches in one push.
    let one = fixture("bitbucket-dc-refs-changed.json")
        .replace("22671f0349857934857983457983475ec39f196b", &master);
    let r = dc.deliver("site", "repo:refs_changed", &one, "dc-1");
    assert_eq!(built(&d, &r)["commit"], master.as_str());
    let two = fixture("bitbucket-dc-multi-branch.json")
        .replace("3980c2be32a7e23c795741d5dc1a2eecb9b85d6d", &first)
        .replace("fc43d13cff1abb28631196944ba4fc4ad06a2cf2", &master);
    let r = dc.deliver("site", "repo:refs_changed", &two, "dc-2");
    let (b1, more, b2) = built_two(&d, &r);
    assert_eq!(b1["branch"], "branch1");
    assert_eq!(b1["commit"], first.as_str());
    assert_eq!(more["branch"], "master", "{more}");
    assert_eq!(more["requested_commit"], master.as_str());
    assert_eq!(b2["commit"], master.as_str());
    // Redelivered: both builds again, already_exists, nothing new.
    let r = dc.deliver("site", "repo:refs_changed", &two, "dc-2");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["result"]["build_uuid"], b1["build_uuid"]);
    assert_eq!(v["result"]["already_exists"], true);
    assert_eq!(
        v["result"]["more_builds"][0]["build_uuid"],
        b2["build_uuid"]
    );
    assert_eq!(v["result"]["more_builds"][0]["already_exists"], true);
    let all = d
        .api("GET", "/api/projects/site/builds?limit=100", None)
        .json();
    assert_eq!(all["result"].as_array().unwrap().len(), 5);
    // A project without `branch*`: master builds, branch1 is listed in messages.
    let r = dc.deliver("mono", "repo:refs_changed", &two, "dc-3");
    let (v, message) = one_build(&r);
    assert_eq!(v["result"]["branch"], "master", "{v}");
    assert!(
        message.starts_with("branch branch1 is not one of this project's branches"),
        "{v}"
    );

    let r = dc.deliver(
        "site",
        "repo:refs_changed",
        &fixture("bitbucket-dc-tag-deleted.json"),
        "dc-4",
    );
    assert_eq!(
        ignored(&r),
        vec!["tag test-tag was deleted; nothing to build"]
    );
    let r = dc.deliver(
        "site",
        "diagnostics:ping",
        &fixture("bitbucket-dc-diagnostics-ping.json"),
        "dc-5",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["result"], json!({"event": "ping"}));
    // Every build of a multi-ref delivery is counted: one `created` per build made, one
    // `deduplicated` per build a redelivery answered with.
    let metrics = String::from_utf8(d.api("GET", "/metrics", None).body).unwrap();
    let count = |result: &str| -> u64 {
        let key = format!("deployhook_triggers_total{{source=\"git_push\",result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    let builds = |p: &str| {
        d.api("GET", &format!("/api/projects/{p}/builds?limit=100"), None)
            .json()["result"]
            .as_array()
            .unwrap()
            .len() as u64
    };
    assert_eq!(
        count("created"),
        builds("site") + builds("mono"),
        "{metrics}"
    );
    assert_eq!(count("deduplicated"), 2, "{metrics}");
}

/// A body over `max_git_body_bytes`, written in full before the answer is read, still gets
/// its 413; an endless one is cut off after twice the limit.
#[test]
fn oversized_git_bodies_get_a_readable_413() {
    use std::io::{Read, Write};
    let wd = tempfile::tempdir().unwrap();
    std::fs::write(wd.path().join("s"), SECRET).unwrap();
    let cfg = workdir_project(
        "site",
        wd.path(),
        "true",
        &format!("git_secret_file = \"{}\"", wd.path().join("s").display()),
    );
    let d = Daemon::start_with_server("max_git_body_bytes = 4000000", &cfg);
    // 7.5 MB, declared: more than the socket buffers hold, so a daemon that answered
    // without reading on would break the sender's write. The sender writes all, then reads.
    let body = vec![b' '; 7_500_000];
    let r = request(
        d.addr,
        "POST",
        "/git/site",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", "sha256=00"),
        ],
        &body,
    );
    r.assert_error(413, 1413, "4000000", "a Git body over its limit");
    // Under the limit, the same endpoint reads the body (and refuses the bad signature).
    let r = request(
        d.addr,
        "POST",
        "/git/site",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", "sha256=00"),
        ],
        &vec![b' '; 3_900_000],
    );
    assert_eq!(r.status, 401);
    // Declared above twice the limit: 413 at once.
    let r = raw(
        d.addr,
        b"POST /git/site HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\nX-Hub-Signature-256: sha256=00\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 413);
    // An endless chunked body: answered 413 and cut off after about 8 MB, not read forever.
    let mut s = std::net::TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    s.write_all(b"POST /git/site HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Hub-Signature-256: sha256=00\r\n\r\n")
        .unwrap();
    let mut reader = s.try_clone().unwrap();
    let answer = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = reader.read_to_end(&mut buf);
        buf
    });
    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
    let mut written = 0usize;
    while written < 64_000_000 {
        if s.write_all(chunk.as_bytes()).is_err() {
            break;
        }
        written += 64 * 1024;
    }
    assert!(
        written < 20_000_000,
        "the daemon kept reading an endless body"
    );
    let buf = answer.join().unwrap();
    assert_eq!(parse_response(&buf).status, 413);
}

/// A delivery that triggered nothing is not remembered: sent again after the config
/// changed, it is judged again.
#[test]
fn an_ignored_delivery_is_judged_again() {
    let repo = HostRepo::new();
    let head = repo.commit("README.md", "hello\n");
    repo.git(&["branch", "later"]);
    let out = tempfile::tempdir().unwrap();
    let d = daemon(&repo, out.path());
    let gh = Host::new(&d, "github.headers");
    let push = fixture("github-push-new-branch.json")
        .replace("6113728f27ae82c7b1a177c8d03f9e96e0adf246", &head)
        .replace("refs/heads/master", "refs/heads/later");
    let r = gh.deliver("site", "push", &push, "again-1");
    assert!(ignored(&r)[0].contains("branch later is not one of"));
    let cfg = std::fs::read_to_string(&d.config).unwrap().replace(
        "branches = [\"master\", \"d\", \"branch*\"]",
        "branches = [\"master\", \"later\"]",
    );
    std::fs::write(&d.config, cfg).unwrap();
    d.signal("HUP");
    eventually(10, "config reloaded", || {
        d.logs().contains("config reloaded")
    });
    let r = gh.deliver("site", "push", &push, "again-1");
    let b = built(&d, &r);
    assert_eq!(b["branch"], "later");
    assert_eq!(r.json()["result"]["already_exists"], false);
}

/// The API builds a tag with `"tag"`; hooks and triggers name one concrete branch.
#[test]
fn api_triggers_a_tag_and_names_concrete_branches() {
    let repo = HostRepo::new();
    let tagged = repo.commit("README.md", "v2\n");
    repo.git(&["tag", "-a", "v2.0.0", "-m", "two", &tagged]);
    let head = repo.commit("README.md", "after v2\n");
    let out = tempfile::tempdir().unwrap();
    let d = daemon(&repo, out.path());
    let trigger = |project: &str, body: Value| {
        d.api(
            "POST",
            &format!("/api/projects/{project}/builds"),
            Some(body),
        )
    };
    let r = trigger("site", json!({"tag": "v2.0.0"}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["result"]["build_uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let b = d.wait_status(&id, "stopped", 60);
    assert_eq!(b["build_outcome"], "success", "{b}");
    assert_eq!(b["ref"], "refs/tags/v2.0.0");
    assert_eq!(b["tag"], "v2.0.0");
    assert_eq!(b["branch"], Value::Null);
    assert_eq!(b["commit"], tagged.as_str(), "the tag's commit, not {head}");
    assert!(env_of(&d, &b).contains("DEPLOYHOOK_TAG=v2.0.0"));
    for (project, body, why) in [
        (
            "site",
            json!({"tag": "nightly-1"}),
            "is not one of project site's tags (simple-tag, a, v*)",
        ),
        ("site", json!({"tag": "v*"}), "is not a concrete tag name"),
        (
            "mono",
            json!({"tag": "v2.0.0"}),
            "project mono builds no tags",
        ),
        (
            "site",
            json!({"branch": "master", "tag": "v2.0.0"}),
            "not both",
        ),
        (
            "site",
            json!({"branch": "branch*"}),
            "is not a concrete branch name",
        ),
        (
            "site",
            json!({"branch": "feature"}),
            "is not one of project site's branches",
        ),
    ] {
        let r = trigger(project, body.clone());
        r.assert_error(400, 1400, why, &body.to_string());
    }
    // A branch matching a glob is a branch of the project.
    repo.git(&["branch", "branch7"]);
    let r = trigger("site", json!({"branch": "branch7"}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Hooks name a concrete branch too.
    let hook = |branch: &str| {
        d.api(
            "POST",
            "/api/projects/site/hooks",
            Some(json!({"name": format!("h-{}", rand_suffix()), "branch": branch})),
        )
    };
    assert_eq!(hook("branch7").status, 201);
    let r = hook("branch*");
    assert_eq!(r.status, 400);
    assert!(
        r.error_message().contains("not a concrete branch name"),
        "{}",
        r.error_message()
    );
}

/// `deployhook check` accepts Unicode branch names and globs, and rejects what git would
/// reject, naming file, line, column and key.
#[test]
fn check_validates_ref_names_globs_and_paths() {
    let dir = tempfile::tempdir().unwrap();
    let write = |project: &str| {
        let path = write_config(dir.path(), "", project);
        path.display().to_string()
    };
    let good = write(
        "[projects.site]\nbranches = [\"déploiement\", \"release/*\", \"team/**\"]\ntags = [\"v*\"]\npaths = [\"web/**\"]\ncommand = \"true\"\nworkdir = \"/tmp\"\n",
    );
    let (code, out, err) = cli(&["check", "--config", &good], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("déploiement, release/*, team/**"), "{out}");
    assert!(
        out.contains("tags [v*]") && out.contains("paths [web/**]"),
        "{out}"
    );
    for (project, needle, key) in [
        (
            "branches = [\"main\", \"a..b\"]",
            "\"a..b\"",
            "projects.site.branches",
        ),
        (
            "branches = [\"main\"]\ntags = [\"v 1\"]",
            "\"v 1\"",
            "projects.site.tags",
        ),
        (
            "branches = [\"[z-a]\"]",
            "\"[z-a]\"",
            "projects.site.branches",
        ),
        (
            "branches = [\"main\"]\npaths = [\"{a\"]",
            "\"{a\"",
            "projects.site.paths",
        ),
    ] {
        let path = write(&format!(
            "[projects.site]\n{project}\ncommand = \"true\"\nworkdir = \"/tmp\"\n"
        ));
        // The error points at the offending entry itself.
        let text = std::fs::read_to_string(&path).unwrap();
        let (line, col) = text
            .lines()
            .enumerate()
            .find_map(|(i, l)| l.find(needle).map(|c| (i + 1, c + 1)))
            .unwrap();
        let (code, _, err) = cli(&["check", "--config", &path], &[]);
        assert_eq!(code, 1, "{project}: {err}");
        assert!(
            err.contains(&format!("{path}:{line}:{col}: {key}: invalid")),
            "{project}: {err}"
        );
    }
}
