//! Git-host push webhooks (SPEC §4.1 `POST /git/{project}`): signature verification and event
//! parsing. Pure: no I/O, no clock; everything here is a function of headers and bytes, so it is
//! unit-tested exhaustively, including with random junk.
//!
//! Authentication comes first and is over the *raw body bytes*: the first signature header
//! present decides the scheme (GitHub `X-Hub-Signature-256: sha256=<hex>`, Gitea
//! `X-Gitea-Signature: <hex>`, Forgejo `X-Forgejo-Signature: <hex>`, Bitbucket Cloud
//! `X-Hub-Signature: sha256=<hex>`, GitLab `X-Gitlab-Token: <secret>`). Hex is accepted in either
//! case; comparison is constant time. A failure never says which part was wrong.

use http::HeaderMap;
use serde_json::Value;

use crate::config::BranchName;
use crate::token::GitSecret;

/// The host whose signature scheme authenticated a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// `X-Hub-Signature-256`.
    GitHub,
    /// `X-Gitea-Signature`.
    Gitea,
    /// `X-Forgejo-Signature`.
    Forgejo,
    /// `X-Hub-Signature` with `sha256=`.
    Bitbucket,
    /// `X-Gitlab-Token`.
    GitLab,
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

/// Decodes hex of either case; `None` unless it is exactly 32 bytes' worth.
fn decode_hex32(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The headers that can carry a signature or token, in the order they are tried.
const SIGNATURE_HEADERS: [&str; 5] = [
    "x-hub-signature-256",
    "x-gitea-signature",
    "x-forgejo-signature",
    "x-hub-signature",
    "x-gitlab-token",
];

/// Whether any signature header is present (a request without one can be refused before
/// its body is read).
pub fn has_signature_header(headers: &HeaderMap) -> bool {
    SIGNATURE_HEADERS.iter().any(|h| headers.contains_key(*h))
}

/// Verifies the request's signature against `secret`. See the module doc for the schemes.
pub fn verify(headers: &HeaderMap, body: &[u8], secret: &GitSecret) -> Result<Host, AuthError> {
    let hmac = |value: &[u8], prefixed: bool| -> bool {
        let hex = if prefixed {
            match value.strip_prefix(b"sha256=") {
                Some(h) => h,
                None => return false,
            }
        } else {
            value
        };
        decode_hex32(hex.trim_ascii()).is_some_and(|mac| secret.verify_hmac(body, &mac))
    };
    let (host, ok) = if let Some(v) = header(headers, "x-hub-signature-256") {
        (Host::GitHub, hmac(v, true))
    } else if let Some(v) = header(headers, "x-gitea-signature") {
        (Host::Gitea, hmac(v, false))
    } else if let Some(v) = header(headers, "x-forgejo-signature") {
        (Host::Forgejo, hmac(v, false))
    } else if let Some(v) = header(headers, "x-hub-signature") {
        (Host::Bitbucket, hmac(v, true))
    } else if let Some(v) = header(headers, "x-gitlab-token") {
        (Host::GitLab, secret.matches(v))
    } else {
        return Err(AuthError::Missing);
    };
    if ok {
        Ok(host)
    } else {
        Err(AuthError::Invalid)
    }
}

/// The event name, from the first event header present.
pub fn event_name(headers: &HeaderMap) -> Option<String> {
    [
        "x-github-event",
        "x-gitea-event",
        "x-forgejo-event",
        "x-gitlab-event",
        "x-event-key",
    ]
    .iter()
    .find_map(|h| headers.get(*h))
    .and_then(|v| v.to_str().ok())
    .map(|s| s.trim().to_owned())
}

/// Longest delivery id kept.
const MAX_DELIVERY_ID: usize = 200;

/// The delivery id, from the first delivery header present, if it is sane (printable ASCII,
/// at most 200 bytes); otherwise `None` (no replay protection for that request).
pub fn delivery_id(headers: &HeaderMap) -> Option<String> {
    [
        "x-github-delivery",
        "x-gitea-delivery",
        "x-forgejo-delivery",
        "x-gitlab-event-uuid",
        "x-request-uuid",
    ]
    .iter()
    .find_map(|h| headers.get(*h))
    .map(|v| v.as_bytes().trim_ascii())
    .filter(|v| {
        !v.is_empty() && v.len() <= MAX_DELIVERY_ID && v.iter().all(|b| b.is_ascii_graphic())
    })
    .and_then(|v| std::str::from_utf8(v).ok())
    .map(str::to_owned)
}

/// What to do with an authenticated event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// GitHub's ping: answer 200, build nothing.
    Ping,
    /// A push of a configured branch to a commit.
    Build {
        /// The branch.
        branch: String,
        /// The pushed commit (full SHA).
        after: String,
    },
    /// Nothing to do; the reason goes into the response's `messages`.
    Ignore(String),
}

/// A body that was signed correctly but cannot be understood (400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

/// Decides what an authenticated request asks for. `branches` are the project's.
pub fn decide(
    headers: &HeaderMap,
    body: &[u8],
    branches: &[BranchName],
) -> Result<Decision, ParseError> {
    let Some(event) = event_name(headers) else {
        return Ok(Decision::Ignore("no event header (X-GitHub-Event, X-Gitea-Event, X-Forgejo-Event, X-Gitlab-Event or X-Event-Key); nothing to do".into()));
    };
    let push = match event.as_str() {
        "ping" => return Ok(Decision::Ping),
        "push" | "Push Hook" | "repo:push" => true,
        _ => false,
    };
    if !push {
        return Ok(Decision::Ignore(format!(
            "event {:?} is not a push; nothing to do",
            crate::model::clip(&event, 60)
        )));
    }
    let json = payload_json(headers, body)?;
    let pushes = if event == "repo:push" {
        bitbucket_pushes(&json)?
    } else {
        vec![ref_push(&json)?]
    };
    let mut reasons = Vec::new();
    for p in pushes {
        match p {
            RefPush::Branch { branch, after } => {
                if is_zero_sha(&after) {
                    reasons.push(format!(
                        "branch {} was deleted; nothing to build",
                        crate::model::clip(&branch, 80)
                    ));
                } else if branches.iter().any(|b| b.as_str() == branch) {
                    if !is_sha(&after) {
                        return Err(ParseError(format!(
                            "pushed commit {:?} is not a full SHA",
                            crate::model::clip(&after, 80)
                        )));
                    }
                    return Ok(Decision::Build { branch, after });
                } else {
                    reasons.push(format!(
                        "branch {} is not one of this project's branches; nothing to build",
                        crate::model::clip(&branch, 80)
                    ));
                }
            }
            RefPush::Other(r) => reasons.push(r),
        }
    }
    if reasons.is_empty() {
        reasons.push("the push changed no branch; nothing to build".into());
    }
    Ok(Decision::Ignore(reasons.join("; ")))
}

enum RefPush {
    Branch { branch: String, after: String },
    Other(String),
}

/// The JSON of the body: raw JSON, or the `payload` field of a form (GitHub's form type).
fn payload_json(headers: &HeaderMap, body: &[u8]) -> Result<Value, ParseError> {
    let form = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    let text = if form {
        let field = body
            .split(|b| *b == b'&')
            .find_map(|kv| kv.strip_prefix(b"payload="))
            .ok_or_else(|| ParseError("form body has no payload field".into()))?;
        percent_decode(field)
            .ok_or_else(|| ParseError("payload field is not valid percent-encoding".into()))?
    } else {
        body.to_vec()
    };
    let text = String::from_utf8(text).map_err(|_| ParseError("body is not valid UTF-8".into()))?;
    serde_json::from_str(&text).map_err(|e| ParseError(format!("body is not valid JSON: {e}")))
}

fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                let hi = (hex[0] as char).to_digit(16)?;
                let lo = (hex[1] as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Some(out)
}

/// GitHub, Gitea, Forgejo, GitLab: top-level `ref` and `after`.
fn ref_push(v: &Value) -> Result<RefPush, ParseError> {
    let r = v
        .get("ref")
        .and_then(Value::as_str)
        .ok_or_else(|| ParseError("push body has no string field \"ref\"".into()))?;
    let after = v
        .get("after")
        .and_then(Value::as_str)
        .ok_or_else(|| ParseError("push body has no string field \"after\"".into()))?;
    if v.get("deleted").and_then(Value::as_bool) == Some(true) {
        return Ok(RefPush::Branch {
            branch: r.strip_prefix("refs/heads/").unwrap_or(r).to_owned(),
            after: "0".repeat(40),
        });
    }
    Ok(match r.strip_prefix("refs/heads/") {
        Some(b) => RefPush::Branch {
            branch: b.to_owned(),
            after: after.to_owned(),
        },
        None if r.starts_with("refs/tags/") => RefPush::Other(format!(
            "{} is a tag; only branch pushes build",
            crate::model::clip(r, 80)
        )),
        None => RefPush::Other(format!(
            "{} is not a branch; nothing to build",
            crate::model::clip(r, 80)
        )),
    })
}

/// Bitbucket Cloud: `push.changes[].new` (`{"type": "branch", "name", "target": {"hash"}}`,
/// or null when the branch was deleted).
fn bitbucket_pushes(v: &Value) -> Result<Vec<RefPush>, ParseError> {
    let changes = v
        .get("push")
        .and_then(|p| p.get("changes"))
        .and_then(Value::as_array)
        .ok_or_else(|| ParseError("repo:push body has no array push.changes".into()))?;
    let mut out = Vec::new();
    for c in changes {
        match c.get("new") {
            None | Some(Value::Null) => {
                let name = c
                    .get("old")
                    .and_then(|o| o.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or("?");
                out.push(RefPush::Branch {
                    branch: name.to_owned(),
                    after: "0".repeat(40),
                });
            }
            Some(n) => {
                let kind = n.get("type").and_then(Value::as_str).unwrap_or("");
                let name = n.get("name").and_then(Value::as_str).ok_or_else(|| {
                    ParseError("push.changes[].new has no string field \"name\"".into())
                })?;
                if kind != "branch" && kind != "named_branch" {
                    out.push(RefPush::Other(format!(
                        "{kind} {} is not a branch; nothing to build",
                        crate::model::clip(name, 80)
                    )));
                    continue;
                }
                let hash = n
                    .get("target")
                    .and_then(|t| t.get("hash"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ParseError("push.changes[].new has no string field \"target.hash\"".into())
                    })?;
                out.push(RefPush::Branch {
                    branch: name.to_owned(),
                    after: hash.to_owned(),
                });
            }
        }
    }
    Ok(out)
}

fn is_zero_sha(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b == b'0')
}

fn is_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use rand::{Rng as _, SeedableRng as _};

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

    fn branches() -> Vec<BranchName> {
        vec![
            BranchName::parse("main").unwrap(),
            BranchName::parse("staging").unwrap(),
        ]
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn github_published_vector() {
        let s = GitSecret::new(b"It's a Secret to Everybody".to_vec());
        let h = headers(&[(
            "x-hub-signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        )]);
        assert_eq!(verify(&h, b"Hello, World!", &s), Ok(Host::GitHub));
        let upper = headers(&[(
            "x-hub-signature-256",
            "sha256=757107EA0EB2509FC211221CCE984B8A37570B6D7586C22C46F4379C8B043E17",
        )]);
        assert_eq!(verify(&upper, b"Hello, World!", &s), Ok(Host::GitHub));
        assert_eq!(verify(&h, b"Hello, World?", &s), Err(AuthError::Invalid));
    }

    #[test]
    fn each_host_scheme() {
        let s = GitSecret::new(b"topsecret".to_vec());
        let body = br#"{"ref":"refs/heads/main"}"#;
        let mac = hex(&s.hmac_sha256(body));
        let prefixed = format!("sha256={mac}");
        assert_eq!(
            verify(&headers(&[("x-gitea-signature", &mac)]), body, &s),
            Ok(Host::Gitea)
        );
        assert_eq!(
            verify(&headers(&[("x-forgejo-signature", &mac)]), body, &s),
            Ok(Host::Forgejo)
        );
        assert_eq!(
            verify(&headers(&[("x-hub-signature", &prefixed)]), body, &s),
            Ok(Host::Bitbucket)
        );
        assert_eq!(
            verify(&headers(&[("x-gitlab-token", "topsecret")]), body, &s),
            Ok(Host::GitLab)
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
            format!("sha1={mac}"),
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
        // Bitbucket with only sha1 is wrong.
        assert_eq!(
            verify(&headers(&[("x-hub-signature", "sha1=abc")]), body, &s),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn pushes_decide() {
        let h = headers(&[("x-github-event", "push")]);
        let body = format!(r#"{{"ref":"refs/heads/main","after":"{SHA}"}}"#);
        assert_eq!(
            decide(&h, body.as_bytes(), &branches()),
            Ok(Decision::Build {
                branch: "main".into(),
                after: SHA.into()
            })
        );
        let other = format!(r#"{{"ref":"refs/heads/dev","after":"{SHA}"}}"#);
        assert!(
            matches!(decide(&h, other.as_bytes(), &branches()), Ok(Decision::Ignore(m)) if m.contains("not one of"))
        );
        let tag = format!(r#"{{"ref":"refs/tags/v1","after":"{SHA}"}}"#);
        assert!(
            matches!(decide(&h, tag.as_bytes(), &branches()), Ok(Decision::Ignore(m)) if m.contains("tag"))
        );
        let del = r#"{"ref":"refs/heads/main","after":"0000000000000000000000000000000000000000","deleted":true}"#;
        assert!(
            matches!(decide(&h, del.as_bytes(), &branches()), Ok(Decision::Ignore(m)) if m.contains("deleted"))
        );
        let gitlab_del =
            r#"{"ref":"refs/heads/main","after":"0000000000000000000000000000000000000000"}"#;
        let gl = headers(&[("x-gitlab-event", "Push Hook")]);
        assert!(
            matches!(decide(&gl, gitlab_del.as_bytes(), &branches()), Ok(Decision::Ignore(m)) if m.contains("deleted"))
        );
        let ping = headers(&[("x-github-event", "ping")]);
        assert_eq!(decide(&ping, b"{}", &branches()), Ok(Decision::Ping));
        let issues = headers(&[("x-github-event", "issues")]);
        assert!(
            matches!(decide(&issues, b"{}", &branches()), Ok(Decision::Ignore(m)) if m.contains("not a push"))
        );
        let bad_sha = r#"{"ref":"refs/heads/main","after":"xyz"}"#;
        assert!(decide(&h, bad_sha.as_bytes(), &branches()).is_err());
        // Hostile branch names are simply not configured branches.
        let evil = format!(r#"{{"ref":"refs/heads/main;rm -rf /","after":"{SHA}"}}"#);
        assert!(matches!(
            decide(&h, evil.as_bytes(), &branches()),
            Ok(Decision::Ignore(_))
        ));
    }

    #[test]
    fn form_encoded_payload() {
        let json = format!(r#"{{"ref":"refs/heads/staging","after":"{SHA}"}}"#);
        let mut enc = String::from("payload=");
        for b in json.bytes() {
            if b.is_ascii_alphanumeric() {
                enc.push(b as char);
            } else {
                enc.push_str(&format!("%{b:02X}"));
            }
        }
        let h = headers(&[
            ("x-github-event", "push"),
            ("content-type", "application/x-www-form-urlencoded"),
        ]);
        assert_eq!(
            decide(&h, enc.as_bytes(), &branches()),
            Ok(Decision::Build {
                branch: "staging".into(),
                after: SHA.into()
            })
        );
        assert!(decide(&h, b"other=1", &branches()).is_err());
        assert!(decide(&h, b"payload=%zz", &branches()).is_err());
    }

    #[test]
    fn bitbucket_shape() {
        let h = headers(&[("x-event-key", "repo:push")]);
        let body = format!(
            r#"{{"push":{{"changes":[{{"new":{{"type":"tag","name":"v1","target":{{"hash":"{SHA}"}}}}}},{{"new":{{"type":"branch","name":"main","target":{{"hash":"{SHA}"}}}},"old":null}}]}}}}"#
        );
        assert_eq!(
            decide(&h, body.as_bytes(), &branches()),
            Ok(Decision::Build {
                branch: "main".into(),
                after: SHA.into()
            })
        );
        let del = r#"{"push":{"changes":[{"new":null,"old":{"type":"branch","name":"main"}}]}}"#;
        assert!(
            matches!(decide(&h, del.as_bytes(), &branches()), Ok(Decision::Ignore(m)) if m.contains("deleted"))
        );
        assert!(decide(&h, br#"{"push":{}}"#, &branches()).is_err());
    }

    #[test]
    fn malformed_bodies_are_parse_errors() {
        let h = headers(&[("x-github-event", "push")]);
        assert!(decide(&h, b"\xff\xfe", &branches()).is_err());
        assert!(decide(&h, b"{not json", &branches()).is_err());
        assert!(decide(&h, b"[]", &branches()).is_err());
        assert!(decide(&h, br#"{"ref":5,"after":"x"}"#, &branches()).is_err());
    }

    #[test]
    fn delivery_ids() {
        assert_eq!(
            delivery_id(&headers(&[("x-github-delivery", "abc-1")])),
            Some("abc-1".into())
        );
        assert_eq!(
            delivery_id(&headers(&[("x-request-uuid", "u")])),
            Some("u".into())
        );
        assert_eq!(
            delivery_id(&headers(&[("x-gitlab-event-uuid", &"x".repeat(201))])),
            None
        );
        assert_eq!(delivery_id(&HeaderMap::new()), None);
    }

    /// Random headers and bodies never panic the verifier or the parser.
    #[test]
    fn random_input_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let s = GitSecret::new(b"secret".to_vec());
        let names = [
            "x-hub-signature-256",
            "x-hub-signature",
            "x-gitea-signature",
            "x-forgejo-signature",
            "x-gitlab-token",
            "x-github-event",
            "x-gitlab-event",
            "x-event-key",
            "x-github-delivery",
            "content-type",
        ];
        let fragments: [&[u8]; 12] = [
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"ref\":",
            b"\"refs/heads/main\"",
            b"\"after\":",
            b",",
            b"payload=",
            b"%",
            b"\xff",
            b"\"push\":{\"changes\":[{\"new\":",
        ];
        for _ in 0..5000 {
            let mut h = HeaderMap::new();
            for _ in 0..rng.random_range(0..4) {
                let name = names[rng.random_range(0..names.len())];
                let len = rng.random_range(0..80);
                let v: Vec<u8> = (0..len).map(|_| rng.random_range(0x20u8..0x7f)).collect();
                let v = match rng.random_range(0..4) {
                    0 => b"push".to_vec(),
                    1 => b"repo:push".to_vec(),
                    2 => [b"sha256=".as_slice(), &v].concat(),
                    _ => v,
                };
                if let Ok(v) = HeaderValue::from_bytes(&v) {
                    h.insert(name, v);
                }
            }
            let mut body = Vec::new();
            for _ in 0..rng.random_range(0..20) {
                if rng.random_bool(0.5) {
                    body.extend_from_slice(fragments[rng.random_range(0..fragments.len())]);
                } else {
                    body.push(rng.random());
                }
            }
            let _ = verify(&h, &body, &s);
            let _ = decide(&h, &body, &branches());
            let _ = delivery_id(&h);
        }
    }
}
