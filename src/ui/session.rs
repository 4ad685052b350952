//! Status-page sessions (SPEC §6): who is signed in, with which scope, until when.
//!
//! A session is opened by `POST /ui/login` with an API token. The cookie carries only a random
//! session id (32 bytes from the OS); the store is in memory and keyed by the id's SHA-256, so
//! neither the token nor a usable id sits anywhere but in the browser. The session keeps the
//! SHA-256 of the token it was opened with, and every request re-checks that hash against the
//! tokens in force ([`TokenCheck`]): a token rotated or removed by a reload ends its sessions
//! at once. Sessions end after [`SESSION_TTL`] whatever happens (the cookie's `Max-Age` says the
//! same to the browser), on logout, and, past [`MAX_SESSIONS`], oldest first.
//!
//! Time comes in as an `Instant` argument so expiry is tested without waiting 12 hours.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rand::TryRngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

pub use crate::access::Scope;

/// How long a session lives on the server (and the cookie's `Max-Age`).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 60 * 60);
/// Most sessions held at once: a token holder signing in in a loop cannot grow memory.
pub const MAX_SESSIONS: usize = 10_000;
/// The cookie's name.
pub const COOKIE: &str = "dh_session";

/// A token's rights: its scope and the projects it covers (`None`: all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// What it may do.
    pub scope: Scope,
    /// Which projects (`None`: every project).
    pub projects: Option<BTreeSet<String>>,
}

impl From<crate::access::Grant> for Access {
    fn from(g: crate::access::Grant) -> Self {
        Access {
            scope: g.scope,
            projects: g.projects,
        }
    }
}

impl Access {
    /// The `[api]` admin token's rights.
    pub fn admin() -> Self {
        Access {
            scope: Scope::Admin,
            projects: None,
        }
    }

    /// Whether pages of `project` may be read.
    pub fn can_read(&self, project: &str) -> bool {
        self.projects.as_ref().is_none_or(|p| p.contains(project))
    }

    /// Whether builds of `project` may be triggered, cancelled and redeployed.
    pub fn can_act(&self, project: &str) -> bool {
        self.scope >= Scope::Trigger && self.can_read(project)
    }
}

/// The SHA-256 of a presented API token (surrounding whitespace trimmed, as the API's
/// `access::bearer` does).
pub fn token_digest(presented: &[u8]) -> [u8; 32] {
    Sha256::digest(presented.trim_ascii()).into()
}

/// Looks up the rights of the API token whose SHA-256 is `digest`, in the config in force.
/// The one seam between sessions and the token configuration.
pub trait TokenCheck {
    /// The token's rights, or `None` when no token in force has that hash.
    fn access(&self, digest: &[u8; 32]) -> Option<Access>;
}

/// An open session.
#[derive(Clone)]
struct Session {
    /// SHA-256 of the token the session was opened with, re-checked on every request.
    token: [u8; 32],
    /// The per-session CSRF token every form carries.
    csrf: String,
    /// When the session ends on the server.
    expires: Instant,
}

/// A session found for a request.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The token's rights as of this request.
    pub access: Access,
    /// The session's CSRF token.
    pub csrf: String,
}

impl Signed {
    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, presented: &str) -> bool {
        self.csrf.len() == presented.len()
            && bool::from(self.csrf.as_bytes().ct_eq(presented.as_bytes()))
    }
}

/// Errors opening a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The OS random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Rng(String),
}

/// The in-memory session store.
#[derive(Default)]
pub struct Sessions {
    /// Keyed by the SHA-256 of the session id.
    map: Mutex<HashMap<[u8; 32], Session>>,
}

fn random_token() -> Result<String, SessionError> {
    let mut buf = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut buf)
        .map_err(|e| SessionError::Rng(e.to_string()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf))
}

fn id_key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // A panic elsewhere while holding the lock leaves a map that is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session for the token whose hash is `token`; returns the new session id (the
    /// cookie's value).
    pub fn open(&self, token: [u8; 32], now: Instant) -> Result<String, SessionError> {
        let id = random_token()?;
        let session = Session {
            token,
            csrf: random_token()?,
            expires: now + SESSION_TTL,
        };
        let mut map = self.lock();
        map.retain(|_, s| s.expires > now);
        while map.len() >= MAX_SESSIONS {
            let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k) else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(id_key(&id), session);
        Ok(id)
    }

    /// The session `id` names, if it is open, unexpired, and its token still in force
    /// (else it is ended here).
    pub fn find(&self, id: &str, now: Instant, tokens: &dyn TokenCheck) -> Option<Signed> {
        let key = id_key(id);
        let mut map = self.lock();
        let s = map.get(&key)?;
        let access = (s.expires > now).then(|| tokens.access(&s.token)).flatten();
        match access {
            Some(access) => Some(Signed {
                access,
                csrf: s.csrf.clone(),
            }),
            None => {
                map.remove(&key);
                None
            }
        }
    }

    /// Ends the session `id` (logout).
    pub fn end(&self, id: &str) {
        self.lock().remove(&id_key(id));
    }

    /// Sessions held (for tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The value of cookie `name` in a `Cookie` header, if present.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The `Set-Cookie` value of a new session (SPEC §6).
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/ui; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token configuration holding exactly the tokens listed.
    struct Tokens(Vec<([u8; 32], Access)>);

    impl TokenCheck for Tokens {
        fn access(&self, digest: &[u8; 32]) -> Option<Access> {
            self.0
                .iter()
                .find(|(d, _)| d == digest)
                .map(|(_, a)| a.clone())
        }
    }

    /// Admin rights for the token whose digest is `t`, and no other token.
    fn admin(t: [u8; 32]) -> Tokens {
        Tokens(vec![(t, Access::admin())])
    }

    /// An empty store, the digest of token `secret`, and the time to open sessions at.
    fn fresh(secret: &[u8]) -> (Sessions, [u8; 32], Instant) {
        (Sessions::default(), token_digest(secret), Instant::now())
    }

    #[test]
    fn a_session_lasts_twelve_hours() {
        let (s, t, now) = fresh(b"secret");
        let tokens = admin(t);
        let id = s.open(t, now).unwrap();
        assert!(
            s.find(&id, now + SESSION_TTL - Duration::from_secs(1), &tokens)
                .is_some()
        );
        assert!(s.find(&id, now + SESSION_TTL, &tokens).is_none());
        // Expired sessions are removed, not just refused.
        assert!(s.is_empty());
    }

    #[test]
    fn a_rotated_token_ends_its_sessions() {
        let (s, old, now) = fresh(b"old");
        let id = s.open(old, now).unwrap();
        assert!(s.find(&id, now, &admin(old)).is_some());
        let rotated = admin(token_digest(b"new"));
        assert!(s.find(&id, now, &rotated).is_none());
        // Even if the old token came back, the session is gone.
        assert!(s.find(&id, now, &admin(old)).is_none());
    }

    #[test]
    fn a_session_has_the_token_rights_in_force_now() {
        let (s, t, now) = fresh(b"ci");
        let id = s.open(t, now).unwrap();
        let read = Access {
            scope: Scope::Read,
            projects: Some(["site".to_owned()].into()),
        };
        let found = s.find(&id, now, &Tokens(vec![(t, read)])).unwrap();
        assert!(found.access.can_read("site"));
        assert!(!found.access.can_read("blog"));
        assert!(!found.access.can_act("site"));
        let found = s.find(&id, now, &admin(t)).unwrap();
        assert!(found.access.can_act("blog"));
    }

    #[test]
    fn logout_ends_the_session_and_ids_are_unguessable() {
        let (s, t, now) = fresh(b"x");
        let tokens = admin(t);
        let a = s.open(t, now).unwrap();
        let b = s.open(t, now).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        let (sa, sb) = (
            s.find(&a, now, &tokens).unwrap(),
            s.find(&b, now, &tokens).unwrap(),
        );
        assert_ne!(sa.csrf, sb.csrf);
        assert!(sa.csrf_ok(&sa.csrf.clone()));
        assert!(!sa.csrf_ok(&sb.csrf));
        assert!(!sa.csrf_ok(""));
        s.end(&a);
        assert!(s.find(&a, now, &tokens).is_none());
        assert!(s.find(&b, now, &tokens).is_some());
        assert!(s.find("", now, &tokens).is_none());
    }

    #[test]
    fn the_store_is_bounded() {
        let (s, t, now) = fresh(b"x");
        for i in 0..MAX_SESSIONS + 5 {
            s.open(t, now + Duration::from_millis(i as u64)).unwrap();
        }
        assert_eq!(s.len(), MAX_SESSIONS);
    }

    #[test]
    fn cookies() {
        assert_eq!(
            set_cookie("abc", false),
            "dh_session=abc; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=43200"
        );
        assert!(set_cookie("abc", true).ends_with("; Secure"));
        assert_eq!(
            cookie_value("a=1; dh_session=xyz; b=2", COOKIE),
            Some("xyz")
        );
        assert_eq!(cookie_value("xdh_session=1", COOKIE), None);
        assert_eq!(cookie_value("", COOKIE), None);
    }
}
