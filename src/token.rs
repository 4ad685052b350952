//! Secrets: hook tokens, the admin token, Git webhook secrets.
//!
//! Every secret is a newtype whose `Debug` prints `[redacted]`, so a stray `{:?}` in a log line
//! cannot leak one. Hook tokens are never stored: only their SHA-256 ([`TokenHash`]) is, and a
//! presented token is looked up by its hash, so comparing it is a keyed map lookup, not a
//! byte-by-byte compare. The admin token and Git secrets are compared in constant time.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use hmac::{KeyInit as _, Mac as _};
use rand::TryRngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// Errors from reading or creating secrets.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The OS random number generator failed; nothing secret can be made without it.
    #[error("the operating system's random number generator failed: {0}")]
    Rng(String),
    /// An API token file (`[api]` or `[api.tokens.*]`) exists but cannot be read.
    #[error("cannot read the API token file {path}: {source}")]
    Read {
        /// The token file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An API token file could not be created.
    #[error("cannot create the API token file {path}: {source}")]
    Create {
        /// The token file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An API token file is empty.
    #[error(
        "the API token file {0} is empty: put a token in it, or delete it to have one generated"
    )]
    Empty(PathBuf),
}

fn random_bytes<const N: usize>() -> Result<[u8; N], TokenError> {
    let mut buf = [0u8; N];
    rand::rngs::OsRng
        .try_fill_bytes(&mut buf)
        .map_err(|e| TokenError::Rng(e.to_string()))?;
    Ok(buf)
}

/// SHA-256 of a hook token: what the store keeps and looks tokens up by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Hashes whatever string was presented as a token (valid or not).
    pub fn of(presented: &str) -> Self {
        Self(Sha256::digest(presented.as_bytes()).into())
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A hash is not the secret, but there is no reason to print it either.
        f.write_str("TokenHash([redacted])")
    }
}

/// A hook token: `dh_` + 43 base64url characters encoding 32 bytes from the OS RNG (SPEC §4).
#[derive(Clone, PartialEq, Eq)]
pub struct HookToken(String);

impl HookToken {
    /// The prefix every hook token starts with.
    pub const PREFIX: &'static str = "dh_";
    /// Length of a well-formed token.
    pub const LEN: usize = 3 + 43;

    /// A fresh random token.
    pub fn generate() -> Result<Self, TokenError> {
        let bytes = random_bytes::<32>()?;
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        Ok(Self(format!("{}{body}", Self::PREFIX)))
    }

    /// Whether `s` has the shape of a hook token. Lookups do not need this (an unknown hash
    /// is simply not found); it lets the HTTP layer skip a database read for junk.
    pub fn is_well_formed(s: &str) -> bool {
        s.len() == Self::LEN
            && s.starts_with(Self::PREFIX)
            && s[Self::PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    /// The token's hash, as stored.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }

    /// The token itself, for building the one URL that shows it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for HookToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HookToken([redacted])")
    }
}

/// The admin bearer token. Only its SHA-256 is held, so comparisons are over fixed-length
/// digests (no length leak) and in constant time.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken([redacted])")
    }
}

impl AdminToken {
    /// An admin token from its text.
    pub fn from_secret(secret: &str) -> Self {
        Self {
            digest: Sha256::digest(secret.as_bytes()).into(),
        }
    }

    /// Whether `presented` is the admin token (constant time).
    pub fn verify(&self, presented: &[u8]) -> bool {
        let d: [u8; 32] = Sha256::digest(presented).into();
        bool::from(d.ct_eq(&self.digest))
    }

    /// Reads the token file (surrounding whitespace trimmed).
    pub fn read(path: &Path) -> Result<String, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let t = text.trim();
        if t.is_empty() {
            return Err(TokenError::Empty(path.to_path_buf()));
        }
        Ok(t.to_owned())
    }

    /// Loads the token from `path`, or, when the file does not exist, generates one into it
    /// with mode 0600. Returns whether it was created (so the caller can log the path).
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), TokenError> {
        match Self::read(path) {
            Ok(t) => return Ok((Self::from_secret(&t), false)),
            Err(TokenError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let bytes = random_bytes::<32>()?;
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let create = |source| TokenError::Create {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(create)?;
        // Written whole beside its place, then moved there without replacing anything: a
        // reader (a deploy script picking the token up) never sees an empty or half-written
        // file, and a crash never leaves one behind that the next start would refuse.
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            path.file_name()
                .map_or("token".into(), |n| n.to_string_lossy()),
            hex(&random_bytes::<8>()?)
        ));
        let placed = write_new(&tmp, format!("{secret}\n").as_bytes())
            .and_then(|()| place_without_replacing(&tmp, path));
        let _ = std::fs::remove_file(&tmp);
        placed.map_err(create)?;
        // The new name is durable once its directory is.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok((Self::from_secret(&secret), true))
    }
}

/// Creates `path` (mode 0600, never an existing file) holding `bytes`, synced.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Moves `from` to `to` unless `to` exists (then `AlreadyExists`): `renameat2` with
/// `RENAME_NOREPLACE`, or a hard link where the file system does not support that flag.
fn place_without_replacing(from: &Path, to: &Path) -> std::io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => std::fs::hard_link(from, to),
        Err(e) => Err(std::io::Error::from(e)),
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A Git webhook secret (`git_secret_file`).
#[derive(Clone)]
pub struct GitSecret(Vec<u8>);

impl fmt::Debug for GitSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GitSecret([redacted])")
    }
}

impl GitSecret {
    /// Wraps the secret's bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Whether `presented` equals the secret (constant time over SHA-256 digests, so the
    /// secret's length is not leaked either). Used for GitLab's plain `X-Gitlab-Token`.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let a: [u8; 32] = Sha256::digest(&self.0).into();
        let b: [u8; 32] = Sha256::digest(presented).into();
        bool::from(a.ct_eq(&b))
    }

    /// HMAC-SHA256 of `body` keyed with the secret.
    pub fn hmac_sha256(&self, body: &[u8]) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// Whether `expected` (raw bytes) is the HMAC-SHA1 of `body`, in constant time: the
    /// `X-Hub-Signature: sha1=` of older GitHub Enterprise, accepted only as a last resort.
    pub fn verify_hmac_sha1(&self, body: &[u8], expected: &[u8]) -> bool {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(body);
        mac.verify_slice(expected).is_ok()
    }

    /// Whether `expected` (raw bytes) is the HMAC-SHA256 of `body`, in constant time.
    pub fn verify_hmac(&self, body: &[u8], expected: &[u8]) -> bool {
        let mac = self.hmac_sha256(body);
        expected.len() == mac.len() && bool::from(mac.ct_eq(expected))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_tokens_have_the_spec_shape() {
        let t = HookToken::generate().unwrap();
        assert_eq!(t.expose().len(), 46);
        assert!(t.expose().starts_with("dh_"));
        assert!(HookToken::is_well_formed(t.expose()));
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&t.expose()[3..])
            .unwrap();
        assert_eq!(decoded.len(), 32);
        assert_ne!(t, HookToken::generate().unwrap());
    }

    #[test]
    fn malformed_tokens_are_recognised() {
        assert!(!HookToken::is_well_formed("dh_short"));
        assert!(!HookToken::is_well_formed(&format!(
            "xx_{}",
            "a".repeat(43)
        )));
        assert!(!HookToken::is_well_formed(&format!(
            "dh_{}",
            "+".repeat(43)
        )));
        assert!(HookToken::is_well_formed(&format!("dh_{}", "a".repeat(43))));
    }

    #[test]
    fn hashing_is_sha256_of_the_token_text() {
        let t = HookToken::generate().unwrap();
        assert_eq!(t.hash(), TokenHash::of(t.expose()));
        let expected: [u8; 32] = Sha256::digest(t.expose().as_bytes()).into();
        assert_eq!(t.hash().0, expected);
        assert_ne!(t.hash(), TokenHash::of(&t.expose()[..45]));
    }

    #[test]
    fn debug_output_is_redacted() {
        let t = HookToken::generate().unwrap();
        assert!(!format!("{t:?}").contains(&t.expose()[3..]));
        let a = AdminToken::from_secret("hunter2");
        assert!(!format!("{a:?}").contains("hunter2"));
        let g = GitSecret::new(b"hunter2".to_vec());
        assert!(!format!("{g:?}").contains("hunter2"));
    }

    #[test]
    fn admin_token_verifies() {
        let a = AdminToken::from_secret("s3cret");
        assert!(a.verify(b"s3cret"));
        assert!(!a.verify(b"s3cre"));
        assert!(!a.verify(b""));
    }

    #[test]
    fn admin_token_file_is_created_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin.token");
        let (tok, created) = AdminToken::load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(tok.verify(text.trim().as_bytes()));
        let (again, created) = AdminToken::load_or_create(&path).unwrap();
        assert!(!created);
        assert!(again.verify(text.trim().as_bytes()));
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(
            AdminToken::load_or_create(&path),
            Err(TokenError::Empty(_))
        ));
    }

    /// A reader watching for the file (a deploy script, the reload test that flaked 2 runs in
    /// 10) saw it empty: it was created, then written.
    #[test]
    fn a_token_file_appears_whole_and_nothing_else_is_left() {
        for _ in 0..50 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("new.token");
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let reader = {
                let (path, stop) = (path.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        if let Ok(t) = std::fs::read_to_string(&path) {
                            seen.push(t);
                        }
                    }
                    seen
                })
            };
            let (tok, created) = AdminToken::load_or_create(&path).unwrap();
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            assert!(created);
            for t in reader.join().unwrap() {
                assert!(tok.verify(t.trim().as_bytes()), "a reader saw {t:?}");
            }
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["new.token"]);
        }
    }

    #[test]
    fn a_token_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&from, "new").unwrap();
        std::fs::write(&to, "theirs").unwrap();
        let e = place_without_replacing(&from, &to).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "theirs");
    }

    #[test]
    fn github_published_hmac_vector() {
        let s = GitSecret::new(b"It's a Secret to Everybody".to_vec());
        let mac = s.hmac_sha256(b"Hello, World!");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
        assert!(s.verify_hmac(b"Hello, World!", &mac));
        assert!(!s.verify_hmac(b"Hello, World?", &mac));
        assert!(!s.verify_hmac(b"Hello, World!", &mac[..31]));
        assert!(s.matches(b"It's a Secret to Everybody"));
        assert!(!s.matches(b"It's a Secret to Everybod"));
    }
}
