//! Git-host push webhooks (SPEC §4.1 `POST /git/{project}`): signature verification and event
//! parsing. Pure: no I/O, no clock; everything here is a function of headers and bytes, so it is
//! unit-tested exhaustively, including with random junk and the hosts' own payloads.
//!
//! # Which host sent it
//! The event header tells (SPEC §4.1, v2): `X-Gitea-Event`, `X-Forgejo-Event` or `X-Gogs-Event`
//! means the Gitea family (which also sends GitHub's headers), else `X-GitHub-Event` GitHub,
//! `X-Gitlab-Event` GitLab, `X-Event-Key` Bitbucket (Cloud's `repo:push`, Data Center's
//! `repo:refs_changed` and `diagnostics:ping`).
//!
//! # Authentication
//! It comes first and is over the bytes the host signed: the first signature header present
//! decides the scheme — `X-Hub-Signature-256: sha256=<hex>` (GitHub), `X-Gitea-Signature`,
//! `X-Forgejo-Signature`, `X-Gogs-Signature: <hex>`, `X-Hub-Signature: sha256=<hex>` (Bitbucket)
//! or `sha1=<hex>` (older GitHub Enterprise), `X-Gitlab-Token: <secret>`. The signed bytes are
//! the raw body, except that the Gitea family signs the JSON inside a form's `payload` field,
//! so a form-encoded Gitea-family delivery is checked against that decoded JSON. Hex is
//! accepted in either case; comparisons are constant time; a failure never says which part
//! was wrong.
//!
//! # What a push asks for
//! [`decide`] turns an authenticated delivery into a [`Decision`]: a ping, or the refs to
//! build (every matching ref of a multi-ref delivery, in payload order) with a reason for each
//! change that builds nothing, in the words of the case ("tag v1 was deleted").

use std::borrow::Cow;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use crate::config::{ProjectConfig, Source, ref_name_problem};
use crate::model::clip;
use crate::token::GitSecret;

pub use crate::model::GitRef;

/// The host a delivery comes from, told by its event header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// `X-GitHub-Event` (and no Gitea-family event header).
    GitHub,
    /// Gitea, Forgejo or Gogs: `X-Gitea-Event`, `X-Forgejo-Event` or `X-Gogs-Event`.
    GiteaFamily,
    /// `X-Gitlab-Event`.
    GitLab,
    /// `X-Event-Key`: Bitbucket Cloud or Data Center.
    Bitbucket,
}

/// The host of a delivery, from its event headers (SPEC §4.1).
pub fn host(headers: &HeaderMap) -> Option<Host> {
    let has = |h: &str| headers.contains_key(h);
    if has("x-gitea-event") || has("x-forgejo-event") || has("x-gogs-event") {
        Some(Host::GiteaFamily)
    } else if has("x-github-event") {
        Some(Host::GitHub)
    } else if has("x-gitlab-event") {
        Some(Host::GitLab)
    } else if has("x-event-key") {
        Some(Host::Bitbucket)
    } else {
        None
    }
}

/// Why a request was not authenticated. Both map to the same 401 with no detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No signature header at all.
    Missing,
    /// A signature header that does not match (or is malformed, or uses another algorithm).
    Invalid,
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    h.get(name).map(|v| v.as_bytes())
}

/// Decodes hex of either case; `None` unless it is exactly `N` bytes' worth.
fn decode_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The headers that can carry a signature or token, in the order they are tried.
const SIGNATURE_HEADERS: [&str; 6] = [
    "x-hub-signature-256",
    "x-gitea-signature",
    "x-forgejo-signature",
    "x-gogs-signature",
    "x-hub-signature",
    "x-gitlab-token",
];

/// Whether any signature header is present (a request without one can be refused before
/// its body is read).
pub fn has_signature_header(headers: &HeaderMap) -> bool {
    SIGNATURE_HEADERS.iter().any(|h| headers.contains_key(*h))
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
}

/// The decoded value of a form body's `payload` field (`+` is a space, then
/// percent-decoding), byte for byte.
fn form_payload(body: &[u8]) -> Option<Vec<u8>> {
    let raw = body
        .split(|b| *b == b'&')
        .find_map(|kv| kv.strip_prefix(b"payload="))?;
    let plus_as_space: Vec<u8> = raw
        .iter()
        .map(|b| if *b == b'+' { b' ' } else { *b })
        .collect();
    Some(percent_encoding::percent_decode(&plus_as_space).collect())
}

/// The bytes the host signed: the body, or for a form-encoded Gitea-family delivery the JSON
/// of its `payload` field (`None` when that field is missing).
fn signed_bytes<'a>(headers: &HeaderMap, body: &'a [u8]) -> Option<Cow<'a, [u8]>> {
    if host(headers) == Some(Host::GiteaFamily) && is_form(headers) {
        form_payload(body).map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(body))
    }
}

/// Verifies the request's signature against `secret`. See the module doc for the schemes.
pub fn verify(headers: &HeaderMap, body: &[u8], secret: &GitSecret) -> Result<(), AuthError> {
    let Some(name) = SIGNATURE_HEADERS.iter().find(|h| headers.contains_key(**h)) else {
        return Err(AuthError::Missing);
    };
    let value = header(headers, name).unwrap_or_default().trim_ascii();
    let Some(signed) = signed_bytes(headers, body) else {
        return Err(AuthError::Invalid);
    };
    let sha256 =
        |hex: &[u8]| decode_hex::<32>(hex).is_some_and(|mac| secret.verify_hmac(&signed, &mac));
    let ok = match *name {
        "x-hub-signature-256" => value.strip_prefix(b"sha256=").is_some_and(sha256),
        "x-gitea-signature" | "x-forgejo-signature" | "x-gogs-signature" => sha256(value),
        "x-hub-signature" => {
            if let Some(hex) = value.strip_prefix(b"sha256=") {
                sha256(hex)
            } else if let Some(hex) = value.strip_prefix(b"sha1=") {
                decode_hex::<20>(hex).is_some_and(|mac| secret.verify_hmac_sha1(&signed, &mac))
            } else {
                false
            }
        }
        _ => secret.matches(value),
    };
    if ok { Ok(()) } else { Err(AuthError::Invalid) }
}

/// The event name, from the host's event header.
pub fn event_name(headers: &HeaderMap) -> Option<String> {
    let names: &[&str] = match host(headers)? {
        Host::GiteaFamily => &["x-gitea-event", "x-forgejo-event", "x-gogs-event"],
        Host::GitHub => &["x-github-event"],
        Host::GitLab => &["x-gitlab-event"],
        Host::Bitbucket => &["x-event-key"],
    };
    names
        .iter()
        .find_map(|h| headers.get(*h))
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
}

/// Longest delivery id kept.
const MAX_DELIVERY_ID: usize = 200;

/// The delivery id, from the host's delivery headers in order (GitLab: `Idempotency-Key`,
/// which a "Resend Request" keeps, before `X-Gitlab-Event-UUID`, which it does not), if it is
/// sane (printable ASCII, at most 200 bytes); otherwise `None` (no replay protection).
pub fn delivery_id(headers: &HeaderMap) -> Option<String> {
    let names: &[&str] = match host(headers)? {
        Host::GiteaFamily => &[
            "x-gitea-delivery",
            "x-forgejo-delivery",
            "x-gogs-delivery",
            "x-github-delivery",
        ],
        Host::GitHub => &["x-github-delivery"],
        Host::GitLab => &["idempotency-key", "x-gitlab-event-uuid"],
        Host::Bitbucket => &["x-request-uuid", "x-request-id"],
    };
    names
        .iter()
        .find_map(|h| headers.get(*h))
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|v| {
            !v.is_empty() && v.len() <= MAX_DELIVERY_ID && v.iter().all(|b| b.is_ascii_graphic())
        })
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

/// One ref a delivery asks to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefBuild {
    /// The branch or tag.
    pub git_ref: GitRef,
    /// The commit the push names: the new SHA, or for an annotated tag the tagged commit
    /// where the payload says it (SPEC §4.1).
    pub commit: String,
}

/// What to do with an authenticated delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A ping (GitHub `ping`, Bitbucket Data Center `diagnostics:ping`): answer 200.
    Ping,
    /// A push with at least one ref to build.
    Build {
        /// The refs to build, in payload order.
        builds: Vec<RefBuild>,
        /// Why each other change of the delivery builds nothing.
        ignored: Vec<String>,
        /// The JSON the host sent (the body, or a form's decoded `payload`), for
        /// `DEPLOYHOOK_PAYLOAD`.
        payload: Bytes,
    },
    /// Nothing to build; why (one entry per change for multi-ref deliveries).
    Ignore(Vec<String>),
}

/// A body that was signed correctly but cannot be understood (400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

/// Decides what an authenticated delivery asks of `project`.
pub fn decide(
    headers: &HeaderMap,
    body: &Bytes,
    project: &ProjectConfig,
) -> Result<Decision, ParseError> {
    let ignore = |m: String| Ok(Decision::Ignore(vec![m]));
    let (Some(host), Some(event)) = (host(headers), event_name(headers)) else {
        return ignore("no event header (X-GitHub-Event, X-Gitea-Event, X-Forgejo-Event, X-Gogs-Event, X-Gitlab-Event or X-Event-Key); nothing to do".into());
    };
    let not_a_push = |event: &str| {
        Ok(Decision::Ignore(vec![format!(
            "event {:?} is not a push; nothing to do",
            clip(event, 60)
        )]))
    };
    enum Shape {
        TopLevel,
        SystemHook,
        BitbucketCloud,
        BitbucketDataCenter,
    }
    let shape = match (host, event.as_str()) {
        (Host::GitHub, "ping") | (Host::Bitbucket, "diagnostics:ping") => {
            return Ok(Decision::Ping);
        }
        (Host::GitHub | Host::GiteaFamily, "push") => Shape::TopLevel,
        (Host::GitLab, "Push Hook" | "Tag Push Hook") => Shape::TopLevel,
        (Host::GitLab, "System Hook") => Shape::SystemHook,
        (Host::Bitbucket, "repo:push") => Shape::BitbucketCloud,
        (Host::Bitbucket, "repo:refs_changed") => Shape::BitbucketDataCenter,
        _ => return not_a_push(&event),
    };
    let payload = payload_bytes(headers, body)?;
    let json = parse_json(&payload)?;
    let changes = match shape {
        Shape::TopLevel => vec![top_level(&json, host)?],
        Shape::SystemHook => {
            let name = json.get("event_name").and_then(Value::as_str).unwrap_or("");
            if name != "push" && name != "tag_push" {
                return ignore(format!(
                    "GitLab System Hook event {:?} is not a push; nothing to do",
                    clip(name, 60)
                ));
            }
            let path = json
                .get("project")
                .and_then(|p| p.get("path_with_namespace"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ParseError("System Hook push has no string project.path_with_namespace".into())
                })?;
            let ours = match &project.source {
                Source::Repo(url) => system_hook_matches(url, path),
                Source::Workdir(_) => false,
            };
            if !ours {
                return ignore(format!(
                    "this System Hook push is for GitLab project {}, which is not this project's repo; nothing to do",
                    clip(path, 120)
                ));
            }
            vec![top_level(&json, Host::GitLab)?]
        }
        Shape::BitbucketCloud => bitbucket_cloud(&json)?,
        Shape::BitbucketDataCenter => bitbucket_data_center(&json)?,
    };
    let mut builds = Vec::new();
    let mut ignored = Vec::new();
    for change in &changes {
        match judge(change, project) {
            Ok(b) => builds.push(b),
            Err(why) => ignored.push(why),
        }
    }
    if builds.is_empty() {
        if ignored.is_empty() {
            ignored.push("the push changed no branch or tag; nothing to build".into());
        }
        return Ok(Decision::Ignore(ignored));
    }
    Ok(Decision::Build {
        builds,
        ignored,
        payload,
    })
}

/// The JSON of the body: raw, or the decoded `payload` field of a form.
fn payload_bytes(headers: &HeaderMap, body: &Bytes) -> Result<Bytes, ParseError> {
    if is_form(headers) {
        form_payload(body)
            .map(Bytes::from)
            .ok_or_else(|| ParseError("form body has no payload field".into()))
    } else {
        Ok(body.clone())
    }
}

fn parse_json(bytes: &[u8]) -> Result<Value, ParseError> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| ParseError("body is not valid UTF-8".into()))?;
    let v: Value = serde_json::from_str(text)
        .map_err(|e| ParseError(format!("body is not valid JSON: {e}")))?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(ParseError("body is not a JSON object".into()))
    }
}

/// What a change names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Branch(String),
    Tag(String),
    /// Anything else (`refs/notes/…`, a Mercurial bookmark): said as it is.
    Other(String),
}

impl Target {
    fn of_ref(r: &str) -> Target {
        if let Some(b) = r.strip_prefix("refs/heads/") {
            Target::Branch(b.to_owned())
        } else if let Some(t) = r.strip_prefix("refs/tags/") {
            Target::Tag(t.to_owned())
        } else {
            Target::Other(format!("ref {}", clip(r, 80)))
        }
    }
}

/// The files a push's payload says it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Files {
    /// The payload does not list them all (or any): never ignored for `paths`.
    Unknown,
    /// Every changed file of every pushed commit (at least one).
    Listed(Vec<String>),
}

/// One ref change of a delivery, host-independent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RefChange {
    target: Target,
    /// The new SHA; `None` when the ref was deleted.
    new: Option<String>,
    /// The commit to record when it differs from `new` (an annotated tag's commit).
    commit: Option<String>,
    /// The head commit's message, where the payload carries it (branches only).
    head_message: Option<String>,
    files: Files,
}

/// The skip markers of SPEC §4.1, lower-cased: matched without regard to case.
pub const SKIP_MARKERS: [&str; 4] = ["[skip ci]", "[ci skip]", "[skip deploy]", "[deploy skip]"];

/// The skip marker `message` carries, if any (case-insensitive).
pub fn skip_marker(message: &str) -> Option<&'static str> {
    let lower = message.to_lowercase();
    SKIP_MARKERS.into_iter().find(|m| lower.contains(m))
}

/// Whether `change` builds for `project`, or why not (in the words of the case).
fn judge(change: &RefChange, project: &ProjectConfig) -> Result<RefBuild, String> {
    let git_ref = match &change.target {
        Target::Other(what) => {
            return Err(format!(
                "{what} is neither a branch nor a tag; nothing to build"
            ));
        }
        Target::Branch(b) => GitRef::Branch(b.clone()),
        Target::Tag(t) => GitRef::Tag(t.clone()),
    };
    let kind = if git_ref.tag().is_some() {
        "tag"
    } else {
        "branch"
    };
    let shown = clip(git_ref.name(), 80);
    let Some(new) = &change.new else {
        return Err(format!("{kind} {shown} was deleted; nothing to build"));
    };
    if let Some(why) = ref_name_problem(git_ref.name()) {
        return Err(format!(
            "{kind} {shown:?} is not a valid {kind} name (it {why}); nothing to build"
        ));
    }
    let listed = |patterns: &[crate::config::RefPattern]| {
        let list: Vec<&str> = patterns.iter().map(|p| p.as_str()).collect();
        clip(&list.join(", "), 120)
    };
    let commit = match &git_ref {
        GitRef::Branch(b) => {
            if !project.has_branch(b) {
                return Err(format!(
                    "branch {shown} is not one of this project's branches ({}); nothing to build",
                    listed(&project.branches)
                ));
            }
            if let Some(marker) = change.head_message.as_deref().and_then(skip_marker) {
                return Err(format!(
                    "the head commit of branch {shown} says {marker}; nothing to build"
                ));
            }
            if let (Some(paths), Files::Listed(files)) = (&project.paths, &change.files)
                && !files.iter().any(|f| paths.matches(f))
            {
                return Err(format!(
                    "no file changed on branch {shown} matches this project's paths; nothing to build"
                ));
            }
            new.clone()
        }
        GitRef::Tag(t) => {
            if project.tags.is_empty() {
                return Err(format!(
                    "tag {shown} was pushed, but this project builds no tags (it has no tags key); nothing to build"
                ));
            }
            if !project.has_tag(t) {
                return Err(format!(
                    "tag {shown} is not one of this project's tags ({}); nothing to build",
                    listed(&project.tags)
                ));
            }
            // An annotated tag's commit where the payload names it, else the pushed SHA.
            change.commit.clone().unwrap_or_else(|| new.clone())
        }
    };
    Ok(RefBuild { git_ref, commit })
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// A non-zero SHA, or `None` for the all-zero one (a deletion); an error for anything else.
fn new_sha(s: &str, what: &str) -> Result<Option<String>, ParseError> {
    if is_zero_sha(s) {
        Ok(None)
    } else if is_sha(s) {
        Ok(Some(s.to_ascii_lowercase()))
    } else {
        Err(ParseError(format!(
            "{what} {:?} is not a full commit SHA",
            clip(s, 80)
        )))
    }
}

/// GitHub's cap on the commits listed in a push payload.
const GITHUB_MAX_COMMITS: usize = 2048;

/// GitHub, the Gitea family and GitLab (Push Hook, Tag Push Hook, System Hook): one change,
/// described by top-level `ref`, `after`, `commits` and friends.
fn top_level(v: &Value, host: Host) -> Result<RefChange, ParseError> {
    let r = str_at(v, "ref")
        .ok_or_else(|| ParseError("push body has no string field \"ref\"".into()))?;
    let after = str_at(v, "after")
        .ok_or_else(|| ParseError("push body has no string field \"after\"".into()))?;
    let target = Target::of_ref(r);
    let new = if v.get("deleted").and_then(Value::as_bool) == Some(true) {
        None
    } else {
        new_sha(after, "pushed commit")?
    };
    let commits = v.get("commits").and_then(Value::as_array);
    let head_commit = v.get("head_commit").filter(|h| h.is_object());
    let commit = match (&target, host) {
        (Target::Tag(_), Host::GitLab) => str_at(v, "checkout_sha").filter(|s| is_sha(s)),
        (Target::Tag(_), Host::GitHub) => head_commit
            .and_then(|h| str_at(h, "id"))
            .filter(|s| is_sha(s)),
        _ => None,
    }
    .map(str::to_ascii_lowercase);
    let head_message = match (&target, &new) {
        (Target::Branch(_), Some(new)) => match host {
            Host::GitHub => head_commit.and_then(|h| str_at(h, "message")),
            _ => commits.and_then(|cs| {
                cs.iter()
                    .find(|c| str_at(c, "id").is_some_and(|id| id.eq_ignore_ascii_case(new)))
                    .and_then(|c| str_at(c, "message"))
            }),
        }
        .map(str::to_owned),
        _ => None,
    };
    let total = ["total_commits_count", "total_commits"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_u64));
    let files = match commits {
        None => Files::Unknown,
        Some(cs) if cs.is_empty() => Files::Unknown,
        Some(cs) if total.is_some_and(|t| t > cs.len() as u64) => Files::Unknown,
        Some(cs) if host == Host::GitHub && cs.len() >= GITHUB_MAX_COMMITS => Files::Unknown,
        Some(cs) => listed_files(cs),
    };
    Ok(RefChange {
        target,
        new,
        commit,
        head_message,
        files,
    })
}

/// The `added`, `modified` and `removed` files of every commit; `Unknown` unless every
/// commit lists them and at least one file is named.
fn listed_files(commits: &[Value]) -> Files {
    let mut files = Vec::new();
    for c in commits {
        let lists: Vec<&Vec<Value>> = ["added", "modified", "removed"]
            .iter()
            .filter_map(|k| c.get(*k).and_then(Value::as_array))
            .collect();
        if lists.is_empty() {
            return Files::Unknown;
        }
        for f in lists.into_iter().flatten() {
            match f.as_str() {
                Some(s) => files.push(s.to_owned()),
                None => return Files::Unknown,
            }
        }
    }
    if files.is_empty() {
        Files::Unknown
    } else {
        Files::Listed(files)
    }
}

/// Bitbucket Cloud `repo:push`: `push.changes[]`, each with `new` (`{"type", "name",
/// "target": {"hash", "message"}}`, null when the ref was deleted) and `old`.
fn bitbucket_cloud(v: &Value) -> Result<Vec<RefChange>, ParseError> {
    let changes = v
        .get("push")
        .and_then(|p| p.get("changes"))
        .and_then(Value::as_array)
        .ok_or_else(|| ParseError("repo:push body has no array push.changes".into()))?;
    let target_of = |side: &Value| -> Result<Target, ParseError> {
        let kind = str_at(side, "type").unwrap_or("");
        let name = str_at(side, "name").ok_or_else(|| {
            ParseError("push.changes[] has a ref without a string field \"name\"".into())
        })?;
        Ok(match kind {
            "branch" | "named_branch" => Target::Branch(name.to_owned()),
            "tag" => Target::Tag(name.to_owned()),
            other => Target::Other(format!("{} {}", clip(other, 20), clip(name, 80))),
        })
    };
    let mut out = Vec::new();
    for c in changes {
        match c.get("new").filter(|n| !n.is_null()) {
            None => {
                let old = c.get("old").filter(|o| !o.is_null()).ok_or_else(|| {
                    ParseError("push.changes[] has neither \"new\" nor \"old\"".into())
                })?;
                out.push(RefChange {
                    target: target_of(old)?,
                    new: None,
                    commit: None,
                    head_message: None,
                    files: Files::Unknown,
                });
            }
            Some(n) => {
                let target = target_of(n)?;
                let t = n.get("target");
                let hash = t.and_then(|t| str_at(t, "hash")).ok_or_else(|| {
                    ParseError("push.changes[].new has no string field \"target.hash\"".into())
                })?;
                let new = new_sha(hash, "push.changes[].new.target.hash")?;
                let head_message = match target {
                    Target::Branch(_) => t.and_then(|t| str_at(t, "message")).map(str::to_owned),
                    _ => None,
                };
                out.push(RefChange {
                    target,
                    new,
                    commit: None,
                    head_message,
                    files: Files::Unknown,
                });
            }
        }
    }
    Ok(out)
}

/// Bitbucket Data Center `repo:refs_changed`: `changes[]`, each with `ref.id`, `toHash` and
/// `type` (`UPDATE`, `ADD` or `DELETE`). No messages, no files.
fn bitbucket_data_center(v: &Value) -> Result<Vec<RefChange>, ParseError> {
    let changes = v
        .get("changes")
        .and_then(Value::as_array)
        .ok_or_else(|| ParseError("repo:refs_changed body has no array changes".into()))?;
    let mut out = Vec::new();
    for c in changes {
        let id = c
            .get("ref")
            .and_then(|r| str_at(r, "id"))
            .or_else(|| str_at(c, "refId"))
            .ok_or_else(|| ParseError("changes[] has no string field \"ref.id\"".into()))?;
        let to = str_at(c, "toHash")
            .ok_or_else(|| ParseError("changes[] has no string field \"toHash\"".into()))?;
        let new = if str_at(c, "type") == Some("DELETE") {
            None
        } else {
            new_sha(to, "changes[].toHash")?
        };
        out.push(RefChange {
            target: Target::of_ref(id),
            new,
            commit: None,
            head_message: None,
            files: Files::Unknown,
        });
    }
    Ok(out)
}

/// The `/`-separated parts of a repository path, lower-cased, without a trailing `.git`.
fn path_parts(path: &str) -> Vec<String> {
    let lower = path.trim().trim_end_matches('/').to_lowercase();
    let trimmed = lower.strip_suffix(".git").unwrap_or(&lower);
    trimmed
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether a GitLab System Hook's `project.path_with_namespace` names the repository at `repo`
/// (SPEC §4.1): the repo's path (of a URL; the part after `:` of `user@host:path`; or the
/// filesystem path) ends with it on whole `/`-separated parts, ignoring case and `.git`.
pub fn system_hook_matches(repo: &str, path_with_namespace: &str) -> bool {
    let path = if let Some((_, rest)) = repo.split_once("://") {
        // scheme://authority/path (the authority may hold a port after ':').
        rest.split_once('/').map_or("", |(_, p)| p)
    } else if let Some((before, after)) = repo.split_once(':')
        && !before.contains('/')
    {
        after
    } else {
        repo
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    let ours = path_parts(path);
    let theirs = path_parts(path_with_namespace);
    !theirs.is_empty() && ours.ends_with(&theirs)
}

fn is_zero_sha(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b == b'0')
}

fn is_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests;
