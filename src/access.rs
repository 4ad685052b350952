//! Who may do what (SPEC §3, §4.1, §4.2 (v2)): API token scopes and project lists, and the
//! client address that `allow_from` judges. Pure apart from reading token files.
//!
//! # Tokens
//! The `[api]` token has scope `admin` on every project; each `[api.tokens.NAME]` has its
//! own scope (`read` ⊂ `trigger` ⊂ `admin`) and, optionally, a project list. Only SHA-256
//! digests are held, and a presented token is compared with *every* digest, in constant time
//! and without stopping at the first match, so neither timing nor the number of tokens tells
//! a caller anything. [`ApiTokens::authenticate`] is the one entry point: the admin API
//! (`crate::http`) and the status pages both call it and get a [`Grant`].
//!
//! # Client address
//! [`client_addr`] takes the TCP peer, and, only when that peer is one of
//! `trusted_proxies`, the `X-Forwarded-For` chain: the right-most entry that is not a
//! trusted proxy (all trusted: the left-most). An entry that is not an IP makes the client
//! unknown, which `allow_from` refuses. Without `trusted_proxies` the header is ignored, so a
//! client cannot choose the address it is judged by.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::token::{AdminToken, TokenError};

/// What a token may do (SPEC §4.2). Ordered: each scope includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every `GET` of the API on its projects (waiting included).
    Read,
    /// Read, plus triggering, cancelling and redeploying builds.
    Trigger,
    /// Everything: hooks, `/metrics`, notification tests.
    Admin,
}

impl Scope {
    /// Parses a config word.
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "trigger" => Some(Scope::Trigger),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    /// The config word.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Trigger => "trigger",
            Scope::Admin => "admin",
        }
    }
}

/// What an authenticated token may do: its scope and its projects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's name (`[api.tokens.NAME]`), `None` for the `[api]` admin token. For logs.
    pub name: Option<String>,
    /// Its scope.
    pub scope: Scope,
    /// The projects it may reach; `None`: all of them.
    pub projects: Option<BTreeSet<String>>,
}

/// Why a [`Grant`] does not cover a request (403, code 1403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The scope is too small.
    #[error("this token's scope ({has}) does not allow this; it needs scope {needs}")]
    Scope {
        /// The token's scope.
        has: &'static str,
        /// The scope needed.
        needs: &'static str,
    },
    /// The project is not in the token's list.
    #[error("this token is not allowed on project {0:?}")]
    Project(String),
    /// The request is not about one project, and the token is limited to some.
    #[error("this token is limited to some projects; this request needs an unlimited token")]
    Unlimited,
}

impl Grant {
    /// The `[api]` admin token's grant: everything.
    pub fn admin() -> Grant {
        Grant {
            name: None,
            scope: Scope::Admin,
            projects: None,
        }
    }

    /// Whether the token may reach `project`.
    pub fn allows_project(&self, project: &str) -> bool {
        self.projects.as_ref().is_none_or(|ps| ps.contains(project))
    }

    /// Checks the scope alone (for requests whose answer is filtered to the token's
    /// projects, or whose project is not known yet).
    pub fn require_scope(&self, needs: Scope) -> Result<(), Denied> {
        if self.scope < needs {
            return Err(Denied::Scope {
                has: self.scope.as_str(),
                needs: needs.as_str(),
            });
        }
        Ok(())
    }

    /// Checks that the grant covers `needs` on `project` (`None`: a request about no single
    /// project, such as `/metrics`, which a project-limited token may not make).
    pub fn require(&self, needs: Scope, project: Option<&str>) -> Result<(), Denied> {
        self.require_scope(needs)?;
        match project {
            Some(p) if !self.allows_project(p) => Err(Denied::Project(crate::model::clip(p, 80))),
            None if self.projects.is_some() => Err(Denied::Unlimited),
            _ => Ok(()),
        }
    }
}

/// Every API token in force: the admin token and the `[api.tokens.*]`. Replaced as a whole
/// on reload.
#[derive(Clone)]
pub struct ApiTokens {
    entries: Vec<([u8; 32], Grant)>,
}

impl fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiTokens({} tokens, [redacted])", self.entries.len())
    }
}

impl ApiTokens {
    /// Only the admin token (whose secret text is `admin`).
    pub fn admin_only(admin: &str) -> ApiTokens {
        ApiTokens {
            entries: vec![(Sha256::digest(admin.as_bytes()).into(), Grant::admin())],
        }
    }

    /// Adds a token with its grant.
    pub fn with(mut self, secret: &str, grant: Grant) -> ApiTokens {
        self.entries
            .push((Sha256::digest(secret.as_bytes()).into(), grant));
        self
    }

    /// Reads every token of `config` (the admin token with [`AdminToken::read`], the others
    /// generated into their files when missing, as the admin token is at start). Returns the
    /// set and the files it created (to log).
    pub fn load(
        config: &crate::config::Config,
        create_admin: bool,
    ) -> Result<(ApiTokens, Vec<std::path::PathBuf>), TokenError> {
        let mut created = Vec::new();
        let admin = read_or_create(&config.api.token_file, create_admin, &mut created)?;
        let mut tokens = ApiTokens::admin_only(&admin);
        for (name, t) in &config.api.tokens {
            let secret = read_or_create(&t.token_file, true, &mut created)?;
            tokens = tokens.with(
                &secret,
                Grant {
                    name: Some(name.clone()),
                    scope: t.scope,
                    projects: t.projects.clone(),
                },
            );
        }
        Ok((tokens, created))
    }

    /// The grant of the presented bearer token, if it is one of ours. Every digest is
    /// compared (constant time each, no early exit); if two tokens have the same text, the
    /// first one configured (the admin token first) wins.
    pub fn authenticate(&self, presented: &[u8]) -> Option<Grant> {
        self.grant_of_digest(&Sha256::digest(presented).into())
    }

    /// The grant of the token whose SHA-256 is `d`, compared as [`Self::authenticate`]
    /// does: a status-page session keeps only this hash, and re-checks it on every request.
    pub fn grant_of_digest(&self, d: &[u8; 32]) -> Option<Grant> {
        let mut found: Option<&Grant> = None;
        for (digest, grant) in &self.entries {
            let hit = bool::from(d.ct_eq(digest));
            if hit && found.is_none() {
                found = Some(grant);
            }
        }
        found.cloned()
    }
}

fn read_or_create(
    path: &Path,
    create: bool,
    created: &mut Vec<std::path::PathBuf>,
) -> Result<String, TokenError> {
    if create {
        let (_, made) = AdminToken::load_or_create(path)?;
        if made {
            created.push(path.to_path_buf());
        }
    }
    AdminToken::read(path)
}

/// The `Bearer` token of an `Authorization` header value, if it has that form.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    // The scheme is case-insensitive (RFC 9110 §11.1).
    (value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer "))
        .then(|| value[7..].trim_ascii())
}

// ---- client address ----------------------------------------------------------------------

/// The address a request is judged by for `allow_from`; `None`: unknown (refused).
///
/// `forwarded` are the `X-Forwarded-For` header values in the order received. They count
/// only when `peer` is a trusted proxy (see the module doc).
pub fn client_addr<'a>(
    peer: IpAddr,
    forwarded: impl IntoIterator<Item = &'a [u8]>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let mut chain = Vec::new();
    for v in forwarded {
        for entry in v.split(|b| *b == b',') {
            let entry = entry.trim_ascii();
            if !entry.is_empty() {
                chain.push(entry);
            }
        }
    }
    if chain.is_empty() {
        return Some(peer);
    }
    let mut leftmost = None;
    for entry in chain.iter().rev() {
        let ip = parse_entry(entry)?;
        if !is_trusted(&ip) {
            return Some(ip);
        }
        leftmost = Some(ip);
    }
    leftmost
}

/// One `X-Forwarded-For` entry: an IP, or an IP with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(entry).ok()?;
    let ip = s
        .parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))?;
    Some(ip.to_canonical())
}

/// Whether `client` may reach a project with this `allow_from` (`None`: anyone).
pub fn allowed_from(allow_from: Option<&[IpNet]>, client: Option<IpAddr>) -> bool {
    match (allow_from, client) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(nets), Some(ip)) => nets.iter().any(|n| n.contains(&ip)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_forwarded_header_counts_only_from_a_trusted_proxy() {
        let none: [&[u8]; 0] = [];
        // Untrusted peer: the header is ignored, whatever it says.
        assert_eq!(
            client_addr(ip("203.0.113.9"), [&b"192.0.2.1"[..]], &[]),
            Some(ip("203.0.113.9"))
        );
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_addr(ip("203.0.113.9"), [&b"192.0.2.1"[..]], &trusted),
            Some(ip("203.0.113.9"))
        );
        // Trusted peer without the header: the peer.
        assert_eq!(
            client_addr(ip("10.0.0.1"), none, &trusted),
            Some(ip("10.0.0.1"))
        );
        // Right-most untrusted entry, across header lines and commas.
        assert_eq!(
            client_addr(
                ip("10.0.0.1"),
                [&b"198.51.100.7, 192.0.2.1"[..], &b"10.0.0.5"[..]],
                &trusted
            ),
            Some(ip("192.0.2.1"))
        );
        // All trusted: the left-most.
        assert_eq!(
            client_addr(ip("10.0.0.1"), [&b"10.1.1.1, 10.2.2.2"[..]], &trusted),
            Some(ip("10.1.1.1"))
        );
        // A non-IP entry reached before an untrusted one: unknown.
        assert_eq!(
            client_addr(ip("10.0.0.1"), [&b"192.0.2.1, unknown"[..]], &trusted),
            None
        );
        // Ports and IPv4-mapped IPv6 addresses are understood.
        assert_eq!(
            client_addr(ip("10.0.0.1"), [&b"192.0.2.1:4711"[..]], &trusted),
            Some(ip("192.0.2.1"))
        );
        assert_eq!(
            client_addr(ip("::ffff:10.0.0.1"), [&b"[2001:db8::1]:80"[..]], &trusted),
            Some(ip("2001:db8::1"))
        );
    }

    #[test]
    fn allow_from_refuses_the_unknown_and_the_unlisted() {
        let allow = nets(&["192.0.2.0/24", "2001:db8::/32"]);
        assert!(allowed_from(None, None));
        assert!(allowed_from(Some(&allow), Some(ip("192.0.2.200"))));
        assert!(allowed_from(Some(&allow), Some(ip("2001:db8::5"))));
        assert!(!allowed_from(Some(&allow), Some(ip("192.0.3.1"))));
        assert!(!allowed_from(Some(&allow), None));
        assert!(!allowed_from(Some(&[]), Some(ip("192.0.2.1"))));
    }

    #[test]
    fn tokens_authenticate_to_their_grant() {
        let ci = Grant {
            name: Some("ci".into()),
            scope: Scope::Trigger,
            projects: Some(["site".to_owned()].into()),
        };
        let t = ApiTokens::admin_only("adm").with("citoken", ci.clone());
        assert_eq!(t.authenticate(b"adm"), Some(Grant::admin()));
        assert_eq!(t.authenticate(b"citoken"), Some(ci.clone()));
        assert_eq!(t.authenticate(b"citoke"), None);
        assert_eq!(t.authenticate(b""), None);
        assert!(!format!("{t:?}").contains("citoken"));

        assert_eq!(ci.require(Scope::Read, Some("site")), Ok(()));
        assert_eq!(ci.require(Scope::Trigger, Some("site")), Ok(()));
        assert!(matches!(
            ci.require(Scope::Admin, Some("site")),
            Err(Denied::Scope { .. })
        ));
        assert!(matches!(
            ci.require(Scope::Read, Some("blog")),
            Err(Denied::Project(_))
        ));
        assert_eq!(ci.require(Scope::Read, None), Err(Denied::Unlimited));
        assert_eq!(Grant::admin().require(Scope::Admin, None), Ok(()));
    }

    #[test]
    fn bearer_takes_the_token_of_any_case_of_the_scheme() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bEaReR  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
    }
}
