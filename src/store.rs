//! The embedded database: the only module that touches sled.
//!
//! # Trees
//! | tree | key | value |
//! |---|---|---|
//! | `hooks` | hook id (16 bytes) | [`Hook`] |
//! | `hook_tokens` | SHA-256 of the token (32) | hook id |
//! | `hook_names` | project `\0` name | hook id (keeps names unique per project) |
//! | `builds` | build id (16) | [`Build`] |
//! | `build_index` | project `\0` seq (u64 BE) build id | empty: newest-first listing |
//! | `payloads` | build id | the request body for `DEPLOYHOOK_PAYLOAD` |
//! | `deliveries` | project `\0` delivery id | seen-at (i64 BE) + build ids (16 bytes each; a nil id: still being handled): Git replay guard |
//! | `rate_events` | created-on (order-preserving u64 BE) build id | [`RATE_EVENT_V2`], boot id (16), `CLOCK_BOOTTIME` µs (i64 BE), project; or (before v2) the project alone: rate-limit windows |
//! | `schedules` | project `\0` branch `\0` zone `\0` cron | i64 BE µs: the time up to which that schedule's runs are handled |
//! | `outbox` | entry id (u64 BE, creation order) | pending [`Entry`] (SPEC §5) |
//! | `outbox_lanes` | commit-status lane (project, SHA, context) | id of its one pending entry |
//! | `outbox_done` | entry id | delivered or failed [`Entry`], the newest [`OUTBOX_HISTORY`] |
//!
//! Outbox entries are written in the same transaction as the build record whose change
//! causes them ([`Store::put_build_with`], [`Store::insert_build_with`]), so a `kill -9` can
//! lose neither without the other. A commit-status entry replaces the pending one of its
//! lane in that same transaction: no earlier state of a SHA can be sent after a later one.
//!
//! Values are bincode (serde, standard config) behind a one-byte format version, so a future
//! format can be told apart from this one instead of being misread.
//!
//! # Durability
//! Writes land in sled's page cache; sled itself only flushes every 500 ms. Whatever must
//! survive a `kill -9` once acknowledged (new builds, hooks, cancels) is followed by
//! [`Store::durable`], which hands the wait to one flusher thread. That thread batches every
//! waiter that arrived during the previous flush into a single `Db::flush`. Nobody else calls
//! `flush`: sled 0.34.7's `flush_async` deadlocks when several run at once (sled #1308, #1241),
//! and one flush per batch is also the fastest way to acknowledge many requests.
//!
//! Status transitions that are not acknowledged to anyone (initializing, running, log counts)
//! are not flushed explicitly; a crash loses at most sled's last 500 ms of them, and startup
//! recovery marks such builds `interrupted` anyway.
//!
//! A hook's `trigger_count` and `last_triggered_on` are counted in memory and written back at
//! most once a second ([`Store::record_hook_fired`]): a sled write per firing cost a quarter of
//! the hot path's CPU (issue 7). Reads through [`Store::hooks`] and [`Store::hook`] write back
//! first, so the API always shows every firing; a crash loses at most the last second of them.
//!
//! # Hooks by token
//! A presented hook token is looked up in memory, not in sled: [`Store::hook_by_token`] reads
//! a map from token hash to what a trigger needs of the hook ([`HookRoute`]), loaded from the
//! `hooks` tree when the store opens and changed by [`Store::insert_hook`],
//! [`Store::delete_hook`] and [`Store::rotate_hook`] right after their transaction commits.
//! Those three are serialized by one mutex held across the transaction and the map update, so
//! two rotations of one hook cannot leave its older token in the map. A sled lookup (two
//! trees, a decode, three `String`s) cost the hot path about a fifth of its CPU and grew with
//! the number of hooks (issue 17); the map costs about 150 bytes per hook (project and branch
//! names are shared between hooks).
//!
//! # Failure
//! sled's I/O errors are sticky (a failed write poisons the database), so every error here is
//! reported as [`StoreError::Db`] and the daemon treats it as fatal: it answers 503 and exits
//! non-zero so that systemd restarts it once the disk has space again.
//!
//! # Hangs
//! sled 0.34.7 guards every tree operation with one process-wide lock: transactions take it
//! exclusively, everything else (inserts, reads, `Db::flush`) shares it, and a transaction
//! that waits for it holds back every later sharer. `Db::flush` keeps its share while it waits
//! for the log to reach the disk, and after a failed write it can wait forever: a log write
//! that fails in the I/O task `Log::exit_reservation` starts records sled's error without
//! waking the waiters (sled's other failure paths do wake them). With a full disk that
//! happened in about 1 run in 20 of the full-disk test beside a CPU hog: our flush waited in
//! `make_stable` with no write in flight, a new build's transaction queued behind it while
//! holding the queue's mutex, every later sled call queued behind the transaction, and both
//! runtime threads stopped, so the daemon never noticed the failure.
//!
//! So no transaction of ours enters sled while our flush is inside it: [`FlushGate`] lets in
//! one flush or any number of transactions. A transaction waiting at the gate gives up as
//! soon as the store has failed (or after [`FLUSH_DEADLINE`]), and plain writes, which the
//! gate does not hold back, meet sled's error and wake the stuck flush with it.
//!
//! # Exclusive use
//! [`Store::open`] takes an exclusive `flock` on `state_dir/lock` before opening sled, so a
//! second daemon on the same state dir fails at once with a clear message instead of waiting
//! or corrupting anything. The lock is released by the kernel when the process dies.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, RwLock, mpsc};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional as _;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::oneshot;

use crate::model::{Build, BuildId, Hook, HookId, StatusFilter, Timestamp};
use crate::outbox::Entry;
use crate::ratelimit::{BootTime, Clocks, EventTime};

/// Delivered and failed outbox entries kept for `GET /api/notifications`.
pub const OUTBOX_HISTORY: usize = 1000;
use crate::token::TokenHash;

/// Format version of every record; bump it when a record's shape changes.
const FORMAT_V1: u8 = 1;

/// Format version of build records since v2 (refs, tags, params, requested commits). Builds
/// written by v1 ([`BuildV1`]) stay readable: they are converted when read.
const BUILD_FORMAT_V2: u8 = 2;

/// Format version of hook records since v2 (`allow_get`). Hooks written by v1 ([`HookV1`])
/// stay readable: they are converted when read, with `allow_get` off.
const HOOK_FORMAT_V2: u8 = 2;

/// sled's page cache. Its default of 1 GiB is far too much for a small VPS, and sled cannot see
/// a cgroup v2 `MemoryMax`, so it is set explicitly and small. sled holds about three times
/// this once the cache has filled: after the bench's bursts (100 000 hooks, thousands of
/// builds) and 60 s of idle the daemon kept 155 MB at 32 MiB and 113 MB at 8 MiB (issue 17;
/// RSS when idle at start: 37 MB). The hot path does not read sled (hooks are looked up in
/// memory), so the smaller cache costs it nothing. Durable new builds/s went from 4 924 (an
/// earlier full bench, 32 MiB) to about 1 000 in later ones at 8 MiB, right after 100 000
/// hooks were created; the cache was not measured apart, and either rate is far above the
/// rate limits.
pub const CACHE_CAPACITY_BYTES: u64 = 8 * 1024 * 1024;

/// Errors from the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the state dir.
    #[error(
        "state dir {0} is in use by another deployhook (stop it first, or point this one at another state_dir)"
    )]
    InUse(PathBuf),
    /// The state dir cannot be created or locked.
    #[error("cannot use state dir {path}: {message}")]
    StateDir {
        /// The state dir.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// sled failed. Fatal: the daemon stops so that systemd can restart it.
    #[error("database error: {0}")]
    Db(String),
    /// A record could not be decoded.
    #[error("database record is corrupt or from a newer deployhook: {0}")]
    Corrupt(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

/// Result of a hook creation attempt.
#[derive(Debug)]
pub enum HookInsert {
    /// Created.
    Created,
    /// The project already has a hook of that name.
    NameTaken,
}

/// What [`Store::reserve_delivery`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliverySeen {
    /// Not seen (within the window): reserved for the caller.
    New,
    /// Seen, and being handled right now by another request.
    InFlight,
    /// Seen, and it triggered these builds (the first is the answer's `result`).
    Built(Vec<BuildId>),
}

/// A page of builds, newest first.
#[derive(Debug)]
pub struct BuildPage {
    /// The builds.
    pub builds: Vec<Build>,
    /// Cursor for the next page, if there may be one.
    pub next_cursor: Option<String>,
}

/// Longest a counted hook firing waits in memory before it is written to the `hooks` tree.
const FIRED_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Hook firings counted in memory and not yet written back (see the module doc).
#[derive(Default)]
struct Fired {
    /// Per hook: firings since the last write-back, and the latest firing's time.
    pending: HashMap<HookId, (u64, Timestamp)>,
    /// When pending firings were last written back.
    written: Option<Instant>,
}

/// What a trigger needs of a hook, found by its token's hash without asking sled (see the
/// module doc). Firing counts are not here: [`Store::hook`] has them.
#[derive(Debug, PartialEq, Eq)]
pub struct HookRoute {
    /// The hook's id.
    pub id: HookId,
    /// Project it triggers (shared with every hook of the project).
    pub project: Arc<str>,
    /// Its name, unique within the project.
    pub name: Box<str>,
    /// Branch it builds (shared with every hook of that branch).
    pub branch: Arc<str>,
    /// Whether it also fires on `GET`.
    pub allow_get: bool,
}

/// Every hook by token hash, in step with the `hooks` tree (see the module doc).
#[derive(Default)]
struct HookIndex {
    by_token: HashMap<[u8; 32], Arc<HookRoute>>,
    /// Project and branch names, so that a million hooks of one project hold one copy.
    names: HashSet<Arc<str>>,
}

impl HookIndex {
    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.names.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.names.insert(a.clone());
        a
    }

    fn insert(&mut self, h: &Hook) {
        let route = HookRoute {
            id: h.id,
            project: self.intern(&h.project),
            name: h.name.as_str().into(),
            branch: self.intern(&h.branch),
            allow_get: h.allow_get,
        };
        self.by_token.insert(h.token_hash, Arc::new(route));
    }
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    hooks: sled::Tree,
    hook_tokens: sled::Tree,
    hook_names: sled::Tree,
    builds: sled::Tree,
    build_index: sled::Tree,
    payloads: sled::Tree,
    deliveries: sled::Tree,
    /// One entry per new build of the last minute, written with the build itself so the
    /// rate-limit windows survive a restart exactly as far as the builds do.
    rate_events: sled::Tree,
    /// Per schedule, the time up to which its runs are handled (see `crate::schedule`).
    schedules: sled::Tree,
    /// Pending outbox entries by id.
    outbox: sled::Tree,
    /// The pending entry of each commit-status lane.
    outbox_lanes: sled::Tree,
    /// Finished entries (history).
    outbox_done: sled::Tree,
    /// Pending entries, kept as a count so the gauge never walks the tree.
    outbox_len: std::sync::atomic::AtomicI64,
    flush_tx: std::sync::Mutex<Option<mpsc::Sender<FlushWaiter>>>,
    /// Hook firings not yet written back; shared with the flush thread, which writes them
    /// back when it has been idle for [`FIRED_WRITE_INTERVAL`].
    fired: Arc<Mutex<Fired>>,
    /// Every hook by token hash: the hot path's lookup (see the module doc).
    hook_index: RwLock<HookIndex>,
    /// Held by whoever changes hooks, across the transaction and the update of `hook_index`.
    hook_writes: Mutex<()>,
    /// Keeps our transactions out of sled while our flush is in it (see `# Hangs`).
    gate: Arc<FlushGate>,
    /// The flush thread, joined on drop so that its handle on the database is gone before the
    /// state dir lock is released.
    flush_thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set after the first sled error: sled's errors are sticky, nothing written after one is
    /// trustworthy. A watch, so that everyone waiting on a flush hears it at once.
    failed: Arc<tokio::sync::watch::Sender<bool>>,
    state_dir: PathBuf,
    /// Held for the life of the store; dropping it releases the state dir.
    _lock: Flock<File>,
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    encode_as(v, FORMAT_V1)
}

/// `v` in bincode after a one-byte format `version`.
fn encode_as<T: Serialize>(v: &T, version: u8) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![version];
    let body = bincode::serde::encode_to_vec(v, bincode::config::standard())
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    decode_as::<T, T>(bytes, FORMAT_V1, "record")
}

/// A record written by [`encode_as`] with `version`, or one of format v1 written as `Old`
/// (converted). `what` names the kind of record in the error.
fn decode_as<T: DeserializeOwned, Old: DeserializeOwned + Into<T>>(
    bytes: &[u8],
    version: u8,
    what: &str,
) -> Result<T, StoreError> {
    fn body<T: DeserializeOwned>(rest: &[u8]) -> Result<T, StoreError> {
        bincode::serde::decode_from_slice(rest, bincode::config::standard())
            .map(|(v, _)| v)
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }
    match bytes.split_first() {
        Some((&v, rest)) if v == version => body(rest),
        Some((&FORMAT_V1, rest)) => body::<Old>(rest).map(Into::into),
        Some((v, _)) => Err(StoreError::Corrupt(format!(
            "unknown {what} format version {v}"
        ))),
        None => Err(StoreError::Corrupt("empty record".into())),
    }
}

fn encode_build(b: &Build) -> Result<Vec<u8>, StoreError> {
    encode_as(b, BUILD_FORMAT_V2)
}

fn decode_build(bytes: &[u8]) -> Result<Build, StoreError> {
    decode_as::<Build, BuildV1>(bytes, BUILD_FORMAT_V2, "build record")
}

fn encode_hook(h: &Hook) -> Result<Vec<u8>, StoreError> {
    encode_as(h, HOOK_FORMAT_V2)
}

fn decode_hook(bytes: &[u8]) -> Result<Hook, StoreError> {
    decode_as::<Hook, HookV1>(bytes, HOOK_FORMAT_V2, "hook record")
}

/// A hook as v1 stored it: read only, to upgrade a state dir in place (tests write it).
#[derive(serde::Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct HookV1 {
    id: HookId,
    project: String,
    name: String,
    branch: String,
    token_hash: [u8; 32],
    created_on: Timestamp,
    last_triggered_on: Option<Timestamp>,
    trigger_count: u64,
}

impl From<HookV1> for Hook {
    fn from(v: HookV1) -> Hook {
        Hook {
            id: v.id,
            project: v.project,
            name: v.name,
            branch: v.branch,
            token_hash: v.token_hash,
            created_on: v.created_on,
            last_triggered_on: v.last_triggered_on,
            trigger_count: v.trigger_count,
            allow_get: false,
        }
    }
}

/// A build as v1 stored it: read only, to upgrade a state dir in place (tests write it).
#[derive(serde::Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct BuildV1 {
    id: BuildId,
    seq: u64,
    project: String,
    branch: String,
    commit: Option<String>,
    requested_commit: Option<String>,
    phase: crate::model::Phase,
    exit_code: Option<i32>,
    trigger: crate::model::Trigger,
    created_on: Timestamp,
    initializing_on: Option<Timestamp>,
    running_on: Option<Timestamp>,
    stopped_on: Option<Timestamp>,
    cancel_reason: Option<crate::model::CancelReason>,
    superseded_by: Option<BuildId>,
    has_payload: bool,
    log_lines: u64,
    log_bytes: u64,
    log_truncated: bool,
}

impl From<BuildV1> for Build {
    fn from(v: BuildV1) -> Build {
        Build {
            id: v.id,
            seq: v.seq,
            project: v.project,
            git_ref: crate::model::GitRef::Branch(v.branch),
            params: Default::default(),
            commit: v.commit,
            requested_commits: v.requested_commit.iter().cloned().collect(),
            requested_commit: v.requested_commit,
            exact_commit: None,
            not_before: None,
            redeploy_of: None,
            superseded_commits: Vec::new(),
            phase: v.phase,
            exit_code: v.exit_code,
            trigger: v.trigger,
            created_on: v.created_on,
            initializing_on: v.initializing_on,
            running_on: v.running_on,
            stopped_on: v.stopped_on,
            cancel_reason: v.cancel_reason,
            superseded_by: v.superseded_by,
            has_payload: v.has_payload,
            log_lines: v.log_lines,
            log_bytes: v.log_bytes,
            log_truncated: v.log_truncated,
        }
    }
}

fn index_prefix(project: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(project.len() + 1 + 24);
    k.extend_from_slice(project.as_bytes());
    k.push(0);
    k
}

fn index_key(b: &Build) -> Vec<u8> {
    let mut k = index_prefix(&b.project);
    k.extend_from_slice(&b.seq.to_be_bytes());
    k.extend_from_slice(b.id.as_bytes());
    k
}

fn name_key(project: &str, name: &str) -> Vec<u8> {
    let mut k = index_prefix(project);
    k.extend_from_slice(name.as_bytes());
    k
}

/// Encodes the position after which a listing continues: seq and id, as hex.
fn encode_cursor(b: &Build) -> String {
    format!("{:016x}{}", b.seq, crate::token::hex(b.id.as_bytes()))
}

/// Decodes a cursor made by `encode_cursor`; `None` when it is not one.
pub fn decode_cursor(s: &str) -> Option<[u8; 24]> {
    if s.len() != 48
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let mut out = [0u8; 24];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

/// Someone waiting for the next flush.
type FlushWaiter = oneshot::Sender<Result<(), StoreError>>;

type TxResult<T> = Result<T, TransactionError<StoreError>>;

/// Flipping the sign bit makes big-endian bytes of an `i64` sort like the numbers.
const SIGN_BIT: u64 = 1 << 63;

/// A stored rate event: its project and when it happened.
type RateEvent = (String, EventTime);

/// First byte of a rate event's value that carries the boot clock (see `ratelimit`'s
/// `# Clocks`). Values written before it hold only the project name, whose first byte is
/// `[a-z0-9]`, so the two formats cannot be confused; those older events are aged by the
/// wall clock, as they always were.
pub const RATE_EVENT_V2: u8 = 0x02;

fn rate_value(project: &str, boot: Option<BootTime>) -> Vec<u8> {
    let Some(boot) = boot else {
        return project.as_bytes().to_vec();
    };
    let mut v = Vec::with_capacity(25 + project.len());
    v.push(RATE_EVENT_V2);
    v.extend_from_slice(boot.boot_id.as_bytes());
    v.extend_from_slice(&boot.micros.to_be_bytes());
    v.extend_from_slice(project.as_bytes());
    v
}

/// `(project, boot clock)` of a stored rate event's value, either format.
fn parse_rate_value(v: &[u8]) -> (String, Option<BootTime>) {
    if let [RATE_EVENT_V2, rest @ ..] = v
        && let (Some(id), Some(micros)) = (rest.get(..16), rest.get(16..24))
        && let (Ok(id), Ok(micros)) = (<[u8; 16]>::try_from(id), <[u8; 8]>::try_from(micros))
    {
        let boot = BootTime {
            boot_id: uuid::Uuid::from_bytes(id),
            micros: i64::from_be_bytes(micros),
        };
        return (
            String::from_utf8_lossy(&rest[24..]).into_owned(),
            Some(boot),
        );
    }
    (String::from_utf8_lossy(v).into_owned(), None)
}

fn rate_key(at: Timestamp, id: BuildId) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&((at.0 as u64) ^ SIGN_BIT).to_be_bytes());
    k[8..].copy_from_slice(id.as_bytes());
    k
}

/// An outbox entry ready to write.
struct Staged {
    key: [u8; 8],
    lane: Option<Vec<u8>>,
    value: Vec<u8>,
}

fn key_id(k: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes)
}

/// Writes staged entries inside a transaction; a commit-status entry drops the pending entry
/// of its lane. Returns the change in the number of pending entries.
fn write_entries(
    outbox: &sled::transaction::TransactionalTree,
    lanes: &sled::transaction::TransactionalTree,
    staged: &[Staged],
) -> Result<i64, ConflictableTransactionError<StoreError>> {
    let mut delta = 0;
    for s in staged {
        if let Some(lane) = &s.lane
            && let Some(old) = lanes.insert(lane.as_slice(), s.key.as_slice())?
            && outbox.remove(old)?.is_some()
        {
            delta -= 1;
        }
        outbox.insert(s.key.as_slice(), s.value.as_slice())?;
        delta += 1;
    }
    Ok(delta)
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    }
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

impl Store {
    /// Opens (creating if needed) the database under `state_dir`, locking the dir first.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let dir_err = |message: String| StoreError::StateDir {
            path: state_dir.to_path_buf(),
            message,
        };
        std::fs::create_dir_all(state_dir).map_err(|e| dir_err(e.to_string()))?;
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(state_dir.join("lock"))
            .map_err(|e| dir_err(format!("cannot open the lock file: {e}")))?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(StoreError::InUse(state_dir.to_path_buf()));
            }
            Err((_, e)) => return Err(dir_err(format!("cannot lock: {e}"))),
        };
        let db = sled::Config::new()
            .path(state_dir.join("db"))
            .cache_capacity(CACHE_CAPACITY_BYTES)
            .open()?;
        let tree = |name: &str| db.open_tree(name);
        let hooks = tree("hooks")?;
        let mut index = HookIndex::default();
        for item in hooks.iter() {
            let (_, v) = item?;
            index.insert(&decode_hook(&v)?);
        }
        index.by_token.shrink_to_fit();
        let inner = Inner {
            hooks,
            hook_tokens: tree("hook_tokens")?,
            hook_names: tree("hook_names")?,
            builds: tree("builds")?,
            build_index: tree("build_index")?,
            payloads: tree("payloads")?,
            deliveries: tree("deliveries")?,
            rate_events: tree("rate_events")?,
            schedules: tree("schedules")?,
            outbox: tree("outbox")?,
            outbox_lanes: tree("outbox_lanes")?,
            outbox_done: tree("outbox_done")?,
            outbox_len: std::sync::atomic::AtomicI64::new(0),
            flush_tx: std::sync::Mutex::new(None),
            flush_thread: std::sync::Mutex::new(None),
            fired: Arc::default(),
            hook_index: RwLock::new(index),
            hook_writes: Mutex::new(()),
            gate: Arc::default(),
            failed: Arc::new(tokio::sync::watch::Sender::new(false)),
            state_dir: state_dir.to_path_buf(),
            db: db.clone(),
            _lock: lock,
        };
        inner
            .outbox_len
            .store(inner.outbox.len() as i64, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel::<FlushWaiter>();
        let (hooks, fired) = (inner.hooks.clone(), inner.fired.clone());
        let (failed, gate) = (inner.failed.clone(), inner.gate.clone());
        let handle = std::thread::Builder::new()
            .name("deployhook-flush".into())
            .spawn(move || flusher(db, rx, hooks, fired, failed, gate))
            .map_err(|e| dir_err(format!("cannot start the flush thread: {e}")))?;
        if let Ok(mut slot) = inner.flush_tx.lock() {
            *slot = Some(tx);
        }
        if let Ok(mut slot) = inner.flush_thread.lock() {
            *slot = Some(handle);
        }
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// The state dir this store lives in.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// Whether a database error has happened (the daemon must stop).
    pub fn has_failed(&self) -> bool {
        *self.inner.failed.borrow()
    }

    /// Becomes `true` when a database error happens (see [`Store::has_failed`]); holds no
    /// handle on the database itself.
    pub fn failure_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.failed.subscribe()
    }

    fn check<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Db(_)) = &r {
            fail(&self.inner.failed, &self.inner.gate);
        }
        r
    }

    /// Runs `tx`, a sled transaction, once no flush of ours is inside sled (see `# Hangs`).
    fn transact<T>(&self, tx: impl FnOnce() -> TxResult<T>) -> Result<T, StoreError> {
        let _pass = self.check(self.inner.gate.enter_transaction(&self.inner.failed))?;
        self.check(tx().map_err(tx_err))
    }

    /// Waits until everything written so far is on disk. See the module doc.
    ///
    /// Fails as soon as the store fails, whoever sees it first (this flush, another write,
    /// another flush), and when the flush thread has not answered within 30 s:
    /// no caller may wait on a flush that hangs (issue 12).
    pub async fn durable(&self) -> Result<(), StoreError> {
        let mut failed = self.inner.failed.subscribe();
        if *failed.borrow_and_update() {
            return Err(failed_earlier());
        }
        let (tx, rx) = oneshot::channel();
        let sent = match self.inner.flush_tx.lock() {
            Ok(slot) => slot.as_ref().is_some_and(|s| s.send(tx).is_ok()),
            Err(_) => false,
        };
        if !sent {
            return Err(StoreError::Db("the flush thread has stopped".into()));
        }
        let r = tokio::select! {
            r = tokio::time::timeout(FLUSH_DEADLINE, rx) => match r {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(StoreError::Db("the flush thread has stopped".into())),
                Err(_) => Err(StoreError::Db(format!(
                    "the disk has not confirmed a write within {} s",
                    FLUSH_DEADLINE.as_secs()
                ))),
            },
            // Someone else saw the store fail: this flush cannot be trusted either.
            _ = failed.wait_for(|f| *f) => Err(failed_earlier()),
        };
        self.check(r)
    }

    /// Flushes synchronously (shutdown), hook firings counted in memory included.
    /// A failed store is not flushed: nothing written after sled's error can be trusted, and
    /// the flush could wait forever (see `# Hangs`).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        if self.has_failed() {
            return Err(failed_earlier());
        }
        self.write_fired()?;
        let i = &self.inner;
        flush_through_the_gate(&i.db, &i.gate, &i.failed)
    }

    /// Stops the flush thread (after a final flush). Later `durable` calls fail.
    pub fn close(&self) {
        if let Ok(mut slot) = self.inner.flush_tx.lock() {
            slot.take();
        }
    }

    // ---- hooks --------------------------------------------------------------------------

    /// Inserts a new hook, unless its name is taken in its project.
    pub fn insert_hook(&self, hook: &Hook) -> Result<HookInsert, StoreError> {
        let value = encode_hook(hook)?;
        let nkey = name_key(&hook.project, &hook.name);
        let i = &self.inner;
        let _writing = lock(&i.hook_writes);
        let r = self.transact(|| {
            (&i.hooks, &i.hook_tokens, &i.hook_names).transaction(|(hooks, tokens, names)| {
                if names.get(&nkey)?.is_some() {
                    return Ok(HookInsert::NameTaken);
                }
                names.insert(nkey.as_slice(), hook.id.as_bytes())?;
                tokens.insert(&hook.token_hash[..], hook.id.as_bytes())?;
                hooks.insert(hook.id.as_bytes(), value.as_slice())?;
                Ok(HookInsert::Created)
            })
        })?;
        if let HookInsert::Created = r {
            write_lock(&i.hook_index).insert(hook);
        }
        Ok(r)
    }

    /// One hook by id, with every firing counted so far.
    pub fn hook(&self, id: HookId) -> Result<Option<Hook>, StoreError> {
        self.write_fired()?;
        self.hook_record(id)
    }

    /// One hook as stored (firings of the last second may still be pending).
    fn hook_record(&self, id: HookId) -> Result<Option<Hook>, StoreError> {
        let r = match self.inner.hooks.get(id.as_bytes()) {
            Ok(Some(v)) => decode_hook(&v).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e.into()),
        };
        self.check(r)
    }

    /// The hook a presented token belongs to, looked up by the token's hash in memory (the
    /// hot path: no sled, no allocation).
    pub fn hook_by_token(&self, hash: &TokenHash) -> Option<Arc<HookRoute>> {
        read_lock(&self.inner.hook_index)
            .by_token
            .get(&hash.0)
            .cloned()
    }

    /// How many hooks there are (the in-memory index's count).
    pub fn hook_count(&self) -> usize {
        read_lock(&self.inner.hook_index).by_token.len()
    }

    /// Every hook of a project (or of all projects), oldest first, with every firing counted.
    pub fn hooks(&self, project: Option<&str>) -> Result<Vec<Hook>, StoreError> {
        self.write_fired()?;
        let mut out = Vec::new();
        for item in self.inner.hooks.iter() {
            let (_, v) = self.check(item.map_err(StoreError::from))?;
            let h: Hook = decode_hook(&v)?;
            if project.is_none_or(|p| h.project == p) {
                out.push(h);
            }
        }
        out.sort_by_key(|h| (h.created_on, h.id));
        Ok(out)
    }

    /// Deletes a hook of a project. Returns it, or `None` if there was none.
    pub fn delete_hook(&self, project: &str, id: HookId) -> Result<Option<Hook>, StoreError> {
        let i = &self.inner;
        let _writing = lock(&i.hook_writes);
        let r = self.transact(|| {
            (&i.hooks, &i.hook_tokens, &i.hook_names).transaction(|(hooks, tokens, names)| {
                let Some(v) = hooks.get(id.as_bytes())? else {
                    return Ok(None);
                };
                let h: Hook = decode_hook(&v).map_err(abort)?;
                if h.project != project {
                    return Ok(None);
                }
                hooks.remove(id.as_bytes())?;
                tokens.remove(&h.token_hash[..])?;
                names.remove(name_key(&h.project, &h.name))?;
                Ok(Some(h))
            })
        })?;
        if let Some(h) = &r {
            write_lock(&i.hook_index).by_token.remove(&h.token_hash);
        }
        Ok(r)
    }

    /// Replaces a hook's token hash; the old token stops matching in the same transaction.
    pub fn rotate_hook(
        &self,
        project: &str,
        id: HookId,
        new_hash: &TokenHash,
    ) -> Result<Option<Hook>, StoreError> {
        let i = &self.inner;
        let _writing = lock(&i.hook_writes);
        let r = self.transact(|| {
            (&i.hooks, &i.hook_tokens).transaction(|(hooks, tokens)| {
                let Some(v) = hooks.get(id.as_bytes())? else {
                    return Ok(None);
                };
                let mut h: Hook = decode_hook(&v).map_err(abort)?;
                if h.project != project {
                    return Ok(None);
                }
                let old = h.token_hash;
                tokens.remove(&h.token_hash[..])?;
                h.token_hash = new_hash.0;
                tokens.insert(&h.token_hash[..], id.as_bytes())?;
                hooks.insert(id.as_bytes(), encode_hook(&h).map_err(abort)?)?;
                Ok(Some((h, old)))
            })
        })?;
        Ok(r.map(|(h, old)| {
            let mut index = write_lock(&i.hook_index);
            index.by_token.remove(&old);
            index.insert(&h);
            h
        }))
    }

    /// Counts a firing of a hook: in memory, written back when the last write-back is a
    /// second old (`FIRED_WRITE_INTERVAL`) (else by the next read or the idle flush thread). A hook
    /// deleted meanwhile is left deleted.
    pub fn record_hook_fired(&self, id: HookId, at: Timestamp) -> Result<(), StoreError> {
        let due = {
            let mut f = lock(&self.inner.fired);
            let e = f.pending.entry(id).or_insert((0, at));
            e.0 += 1;
            e.1 = e.1.max(at);
            f.written
                .is_none_or(|t| t.elapsed() >= FIRED_WRITE_INTERVAL)
        };
        if due { self.write_fired() } else { Ok(()) }
    }

    /// Writes every pending hook firing back to the `hooks` tree.
    fn write_fired(&self) -> Result<(), StoreError> {
        let r = write_fired(&self.inner.hooks, &self.inner.fired);
        self.check(r)
    }

    // ---- schedules ----------------------------------------------------------------------

    /// The time up to which the runs of the schedule `key` are handled, if it was ever
    /// recorded (see `crate::schedule`).
    pub fn schedule_checked(&self, key: &str) -> Result<Option<Timestamp>, StoreError> {
        let r = match self.inner.schedules.get(key.as_bytes()) {
            Ok(Some(v)) => <[u8; 8]>::try_from(v.as_ref())
                .map(|b| Some(Timestamp(i64::from_be_bytes(b))))
                .map_err(|_| StoreError::Corrupt("schedule state entry".into())),
            Ok(None) => Ok(None),
            Err(e) => Err(e.into()),
        };
        self.check(r)
    }

    /// Records that the runs of schedule `key` are handled up to `at`. Not flushed: a crash
    /// that loses it makes a missed run fire once more at start, nothing worse.
    pub fn set_schedule_checked(&self, key: &str, at: Timestamp) -> Result<(), StoreError> {
        let r = self
            .inner
            .schedules
            .insert(key.as_bytes(), &at.0.to_be_bytes())
            .map(|_| ())
            .map_err(StoreError::from);
        self.check(r)
    }

    // ---- builds -------------------------------------------------------------------------

    /// Inserts a new build, its index entry, its payload and its rate-limit event in one
    /// transaction. The event is timed by the boot clock read now, beside `created_on`.
    pub fn insert_build(&self, build: &Build, payload: Option<&[u8]>) -> Result<(), StoreError> {
        self.insert_build_with(build, payload, &[])
    }

    /// [`Store::insert_build`] with the outbox entries the new build causes, in the same
    /// transaction.
    pub fn insert_build_with(
        &self,
        build: &Build,
        payload: Option<&[u8]>,
        entries: &[Entry],
    ) -> Result<(), StoreError> {
        let value = encode_build(build)?;
        let ikey = index_key(build);
        let rkey = rate_key(build.created_on, build.id);
        let rvalue = rate_value(&build.project, EventTime::now().boot);
        let staged = self.stage_entries(entries)?;
        let i = &self.inner;
        let added = self.transact(|| {
            (
                &i.builds,
                &i.build_index,
                &i.payloads,
                &i.rate_events,
                &i.outbox,
                &i.outbox_lanes,
            )
                .transaction(|(builds, index, payloads, rate, outbox, lanes)| {
                    builds.insert(build.id.as_bytes(), value.as_slice())?;
                    index.insert(ikey.as_slice(), &[] as &[u8])?;
                    if let Some(p) = payload {
                        payloads.insert(build.id.as_bytes(), p)?;
                    }
                    rate.insert(rkey.as_slice(), rvalue.as_slice())?;
                    write_entries(outbox, lanes, &staged)
                })
        })?;
        self.inner.outbox_len.fetch_add(added, Ordering::SeqCst);
        Ok(())
    }

    // ---- rate-limit events --------------------------------------------------------------

    /// The stored rate-limit events `(project, when)`, oldest (by wall clock) first.
    pub fn rate_events(&self) -> Result<Vec<(String, EventTime)>, StoreError> {
        let entries = self.rate_event_entries()?;
        Ok(entries.into_iter().map(|(_, e)| e).collect())
    }

    /// Forgets rate-limit events at least `window` old at `now` (by the boot clock within a
    /// boot, see `ratelimit`). A whole scan, not a range of keys: the keys are wall times,
    /// which a clock step makes lie, and the tree holds little more than one window's events.
    /// Returns how many were removed.
    pub fn prune_rate_events(&self, now: &Clocks, window: Duration) -> Result<usize, StoreError> {
        let mut n = 0;
        for (k, (_, at)) in self.rate_event_entries()? {
            if at.age(now) >= window {
                self.check(self.inner.rate_events.remove(k).map_err(StoreError::from))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every rate event with its key, for pruning.
    fn rate_event_entries(&self) -> Result<Vec<(sled::IVec, RateEvent)>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.rate_events.iter() {
            let (k, v) = self.check(item.map_err(StoreError::from))?;
            let Some(at) = k.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                continue;
            };
            let wall = Timestamp((u64::from_be_bytes(at) ^ SIGN_BIT) as i64);
            let (project, boot) = parse_rate_value(&v);
            out.push((k, (project, EventTime { wall, boot })));
        }
        Ok(out)
    }

    /// Overwrites an existing build record.
    pub fn put_build(&self, build: &Build) -> Result<(), StoreError> {
        let value = encode_build(build)?;
        let r = self.inner.builds.insert(build.id.as_bytes(), value);
        self.check(r.map(|_| ()).map_err(StoreError::from))
    }

    /// Overwrites a build record and adds the outbox entries its change causes, in one
    /// transaction (a plain write when there are none: the common case stays cheap).
    pub fn put_build_with(&self, build: &Build, entries: &[Entry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return self.put_build(build);
        }
        let value = encode_build(build)?;
        let staged = self.stage_entries(entries)?;
        let i = &self.inner;
        let added = self.transact(|| {
            (&i.builds, &i.outbox, &i.outbox_lanes).transaction(|(builds, outbox, lanes)| {
                builds.insert(build.id.as_bytes(), value.as_slice())?;
                write_entries(outbox, lanes, &staged)
            })
        })?;
        self.inner.outbox_len.fetch_add(added, Ordering::SeqCst);
        Ok(())
    }

    /// Adds outbox entries that come with no build change.
    pub fn add_entries(&self, entries: &[Entry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let staged = self.stage_entries(entries)?;
        let i = &self.inner;
        let added = self.transact(|| {
            (&i.outbox, &i.outbox_lanes)
                .transaction(|(outbox, lanes)| write_entries(outbox, lanes, &staged))
        })?;
        self.inner.outbox_len.fetch_add(added, Ordering::SeqCst);
        Ok(())
    }

    /// Gives each entry its id (creation order) and encodes it.
    fn stage_entries(&self, entries: &[Entry]) -> Result<Vec<Staged>, StoreError> {
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let id = self.check(self.inner.db.generate_id().map_err(StoreError::from))?;
            out.push(Staged {
                key: id.to_be_bytes(),
                lane: e.status_lane(),
                value: encode(e)?,
            });
        }
        Ok(out)
    }

    // ---- outbox -------------------------------------------------------------------------

    /// Pending outbox entries after `after` (exclusive), oldest first, at most `limit`: the
    /// worker pages through them instead of loading them all.
    pub fn outbox_page(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Entry)>, StoreError> {
        let start = after.map_or(0, |a| a.saturating_add(1)).to_be_bytes();
        let mut out = Vec::new();
        if after == Some(u64::MAX) {
            return Ok(out);
        }
        for item in self.inner.outbox.range(start.as_slice()..) {
            let (k, v) = self.check(item.map_err(StoreError::from))?;
            let Some(id) = key_id(&k) else { continue };
            match decode::<Entry>(&v) {
                Ok(e) => out.push((id, e)),
                // An entry this version cannot read is left alone, not delivered garbled.
                Err(e) => tracing::error!(entry = id, "cannot read an outbox entry: {e}"),
            }
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// Records a failed attempt of a pending entry (unless it was dropped meanwhile, for a
    /// newer state of its commit-status lane).
    pub fn outbox_update(&self, id: u64, e: &Entry) -> Result<(), StoreError> {
        let value = encode(e)?;
        let r = self
            .inner
            .outbox
            .fetch_and_update(id.to_be_bytes(), |old| old.map(|_| value.clone()));
        self.check(r.map(|_| ()).map_err(StoreError::from))
    }

    /// Moves an entry that was delivered or failed to the history (keeping the newest
    /// [`OUTBOX_HISTORY`]).
    pub fn outbox_finish(&self, id: u64, e: &Entry) -> Result<(), StoreError> {
        let key = id.to_be_bytes();
        let value = encode(e)?;
        let lane = e.status_lane();
        let i = &self.inner;
        let delta = self.transact(|| {
            (&i.outbox, &i.outbox_lanes, &i.outbox_done).transaction(|(outbox, lanes, done)| {
                let removed = outbox.remove(key.as_slice())?.is_some();
                if let Some(lane) = &lane
                    && lanes.get(lane.as_slice())?.as_deref() == Some(key.as_slice())
                {
                    lanes.remove(lane.as_slice())?;
                }
                done.insert(key.as_slice(), value.as_slice())?;
                Ok(if removed { -1 } else { 0 })
            })
        })?;
        self.inner.outbox_len.fetch_add(delta, Ordering::SeqCst);
        while self.inner.outbox_done.len() > OUTBOX_HISTORY {
            match self.check(self.inner.outbox_done.pop_min().map_err(StoreError::from))? {
                Some(_) => {}
                None => break,
            }
        }
        Ok(())
    }

    /// Number of pending outbox entries.
    pub fn outbox_pending(&self) -> u64 {
        self.inner.outbox_len.load(Ordering::SeqCst).max(0) as u64
    }

    /// The newest `limit` entries that `keep` accepts, pending and finished, newest first.
    pub fn outbox_recent(
        &self,
        limit: usize,
        keep: impl Fn(&Entry) -> bool,
    ) -> Result<Vec<(u64, Entry)>, StoreError> {
        let mut pending = self.inner.outbox.iter().rev().peekable();
        let mut done = self.inner.outbox_done.iter().rev().peekable();
        let mut out = Vec::new();
        let key_of = |item: Option<&Result<(sled::IVec, sled::IVec), sled::Error>>| {
            item.and_then(|r| r.as_ref().ok())
                .and_then(|(k, _)| key_id(k))
        };
        while out.len() < limit {
            let (p, d) = (key_of(pending.peek()), key_of(done.peek()));
            let next = match (p, d) {
                (None, None) => break,
                (Some(p), Some(d)) if p >= d => pending.next(),
                (Some(_), None) => pending.next(),
                _ => done.next(),
            };
            let Some(item) = next else { break };
            let (k, v) = self.check(item.map_err(StoreError::from))?;
            if let (Some(id), Ok(e)) = (key_id(&k), decode::<Entry>(&v))
                && keep(&e)
            {
                out.push((id, e));
            }
        }
        Ok(out)
    }

    /// One build.
    pub fn build(&self, id: BuildId) -> Result<Option<Build>, StoreError> {
        let r = match self.inner.builds.get(id.as_bytes()) {
            Ok(Some(v)) => decode_build(&v).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e.into()),
        };
        self.check(r)
    }

    /// The stored request body of a build.
    pub fn payload(&self, id: BuildId) -> Result<Option<Vec<u8>>, StoreError> {
        let r = self
            .inner
            .payloads
            .get(id.as_bytes())
            .map(|v| v.map(|v| v.to_vec()));
        self.check(r.map_err(StoreError::from))
    }

    /// Every build (startup recovery).
    pub fn all_builds(&self) -> Result<Vec<Build>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.builds.iter() {
            let (_, v) = self.check(item.map_err(StoreError::from))?;
            out.push(decode_build(&v)?);
        }
        Ok(out)
    }

    /// A page of a project's builds, newest first, optionally filtered by status, continuing
    /// after `cursor` (from a previous page).
    pub fn list_builds(
        &self,
        project: &str,
        filter: Option<StatusFilter>,
        limit: usize,
        cursor: Option<[u8; 24]>,
    ) -> Result<BuildPage, StoreError> {
        let prefix = index_prefix(project);
        let mut end = prefix.clone();
        match cursor {
            Some(c) => end.extend_from_slice(&c),
            None => {
                // Just past every key of the project: the byte after the separator.
                end.pop();
                end.push(1);
            }
        }
        let mut builds = Vec::new();
        let mut last: Option<Build> = None;
        let mut more = false;
        for item in self
            .inner
            .build_index
            .range(prefix.as_slice()..end.as_slice())
            .rev()
        {
            let (k, _) = self.check(item.map_err(StoreError::from))?;
            let Some(id_bytes) = k
                .get(k.len().saturating_sub(16)..)
                .and_then(|s| <[u8; 16]>::try_from(s).ok())
            else {
                continue;
            };
            let Some(b) = self.build(BuildId(uuid::Uuid::from_bytes(id_bytes)))? else {
                continue;
            };
            if builds.len() == limit {
                more = true;
                break;
            }
            last = Some(b.clone());
            if filter.is_none_or(|f| f.matches(b.phase)) {
                builds.push(b);
            }
        }
        let next_cursor = if more {
            last.as_ref().map(encode_cursor)
        } else {
            None
        };
        Ok(BuildPage {
            builds,
            next_cursor,
        })
    }

    /// Ids of a project's builds, newest first.
    pub fn project_build_ids(&self, project: &str) -> Result<Vec<BuildId>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .inner
            .build_index
            .scan_prefix(index_prefix(project))
            .rev()
        {
            let (k, _) = self.check(item.map_err(StoreError::from))?;
            if let Some(id) = k
                .get(k.len().saturating_sub(16)..)
                .and_then(|s| <[u8; 16]>::try_from(s).ok())
            {
                out.push(BuildId(uuid::Uuid::from_bytes(id)));
            }
        }
        Ok(out)
    }

    /// Deletes a build, its index entry and its payload. Returns whether it existed.
    pub fn delete_build(&self, id: BuildId) -> Result<bool, StoreError> {
        let Some(b) = self.build(id)? else {
            return Ok(false);
        };
        let ikey = index_key(&b);
        let i = &self.inner;
        self.transact(|| {
            (&i.builds, &i.build_index, &i.payloads).transaction(|(builds, index, payloads)| {
                builds.remove(id.as_bytes())?;
                index.remove(ikey.as_slice())?;
                payloads.remove(id.as_bytes())?;
                Ok(())
            })
        })?;
        Ok(true)
    }

    // ---- Git deliveries -----------------------------------------------------------------

    /// Claims a Git delivery id for this project before it is acted on, so that a replay —
    /// even one racing the original — never builds twice. A record older than `window_start`
    /// does not count (SPEC keeps deliveries 7 days) and is taken over, as is a claim still
    /// in flight since before `stale_before` (its request died: a crash, say).
    pub fn reserve_delivery(
        &self,
        project: &str,
        delivery: &str,
        now: Timestamp,
        window_start: Timestamp,
        stale_before: Timestamp,
    ) -> Result<DeliverySeen, StoreError> {
        let key = name_key(project, delivery);
        let mut fresh = now.0.to_be_bytes().to_vec();
        fresh.extend_from_slice(&[0u8; 16]);
        for _ in 0..16 {
            let current = self.check(self.inner.deliveries.get(&key).map_err(StoreError::from))?;
            if let Some(v) = &current {
                let at = delivery_time(v).unwrap_or(Timestamp(i64::MIN));
                match delivery_builds(v) {
                    Some(ids) if at >= window_start => {
                        return Ok(DeliverySeen::Built(ids));
                    }
                    None if delivery_in_flight(v) && at >= stale_before => {
                        return Ok(DeliverySeen::InFlight);
                    }
                    _ => {} // expired or stale: take it over
                }
            }
            let r = self
                .inner
                .deliveries
                .compare_and_swap(&key, current, Some(fresh.clone()));
            if self.check(r.map_err(StoreError::from))?.is_ok() {
                return Ok(DeliverySeen::New);
            }
        }
        Ok(DeliverySeen::InFlight)
    }

    /// Records the builds a reserved delivery created or joined, in answer order (at least
    /// one: a delivery that triggered nothing is released instead, so that it is judged
    /// again when it comes back).
    pub fn complete_delivery(
        &self,
        project: &str,
        delivery: &str,
        builds: &[BuildId],
        at: Timestamp,
    ) -> Result<(), StoreError> {
        let mut value = at.0.to_be_bytes().to_vec();
        for b in builds {
            value.extend_from_slice(b.as_bytes());
        }
        let r = self
            .inner
            .deliveries
            .insert(name_key(project, delivery), value);
        self.check(r.map(|_| ()).map_err(StoreError::from))
    }

    /// Drops a reservation whose delivery built nothing (refused or ignored), so a redelivery
    /// is handled afresh.
    pub fn release_delivery(&self, project: &str, delivery: &str) -> Result<(), StoreError> {
        let r = self.inner.deliveries.remove(name_key(project, delivery));
        self.check(r.map(|_| ()).map_err(StoreError::from))
    }

    /// The builds a delivery is recorded with (`None` when unknown or still in flight).
    pub fn delivery_builds(
        &self,
        project: &str,
        delivery: &str,
    ) -> Result<Option<Vec<BuildId>>, StoreError> {
        let r = self.inner.deliveries.get(name_key(project, delivery));
        let v = self.check(r.map_err(StoreError::from))?;
        Ok(v.and_then(|v| delivery_builds(&v)))
    }

    /// Forgets deliveries seen before `before`. Returns how many were removed.
    pub fn prune_deliveries(&self, before: Timestamp) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.inner.deliveries.iter() {
            let (k, v) = self.check(item.map_err(StoreError::from))?;
            if delivery_time(&v).is_none_or(|t| t < before) {
                self.check(self.inner.deliveries.remove(k).map_err(StoreError::from))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.flush_tx.lock() {
            slot.take();
        }
        if let Some(h) = self.flush_thread.lock().ok().and_then(|mut s| s.take()) {
            // After a failure its flush may be stuck in sled for good (see `# Hangs`): the
            // daemon is exiting then, and must not wait for it.
            if !*self.failed.borrow() || h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

fn delivery_time(v: &[u8]) -> Option<Timestamp> {
    Some(Timestamp(i64::from_be_bytes(v.get(..8)?.try_into().ok()?)))
}

/// The builds of a completed delivery record: every 16-byte id after the time (records
/// written before multi-ref deliveries hold exactly one). `None` for a claim still in flight
/// (one nil id) or a malformed record.
fn delivery_builds(v: &[u8]) -> Option<Vec<BuildId>> {
    let ids = v.get(8..)?;
    if ids.is_empty() || ids.len() % 16 != 0 {
        return None;
    }
    let ids: Vec<BuildId> = ids
        .chunks_exact(16)
        .filter_map(|c| Some(BuildId(uuid::Uuid::from_bytes(c.try_into().ok()?))))
        .collect();
    if ids.iter().any(|id| id.0.is_nil()) {
        None
    } else {
        Some(ids)
    }
}

/// Whether a delivery record is a claim whose request is still being handled.
fn delivery_in_flight(v: &[u8]) -> bool {
    v.get(8..)
        .is_some_and(|ids| ids.len() == 16 && ids.iter().all(|b| *b == 0))
}

/// A poisoned lock is still used: every mutation under it is a few assignments.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_lock<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write_lock<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

/// Applies pending hook firings to the `hooks` tree. A hook deleted meanwhile stays deleted.
/// Concurrent callers take disjoint sets of firings, and each update is atomic, so none is
/// lost or counted twice.
fn write_fired(hooks: &sled::Tree, fired: &Mutex<Fired>) -> Result<(), StoreError> {
    let pending = {
        let mut f = lock(fired);
        if f.pending.is_empty() {
            // Nothing waits: the next firing may be written at once.
            return Ok(());
        }
        f.written = Some(Instant::now());
        std::mem::take(&mut f.pending)
    };
    for (id, (n, at)) in pending {
        // Returning None would delete the record: only a hook deleted meanwhile (None in)
        // stays deleted; a record that cannot be decoded or encoded is kept as it is.
        hooks.update_and_fetch(id.as_bytes(), |old| {
            let old = old?;
            let Ok(mut h) = decode_hook(old) else {
                return Some(old.to_vec());
            };
            h.last_triggered_on = Some(h.last_triggered_on.map_or(at, |t| t.max(at)));
            h.trigger_count += n;
            Some(encode_hook(&h).unwrap_or_else(|_| old.to_vec()))
        })?;
    }
    Ok(())
}

/// Flushes `db` once no transaction of ours is inside sled (see `# Hangs`); a failure marks
/// the store failed. The flush thread and the stop's last flush both go through here.
fn flush_through_the_gate(
    db: &sled::Db,
    gate: &FlushGate,
    failed: &tokio::sync::watch::Sender<bool>,
) -> Result<(), StoreError> {
    let r = gate
        .flush(|| db.flush())
        .map(|_| ())
        .map_err(StoreError::from);
    if r.is_err() {
        fail(failed, gate);
    }
    r
}

/// Marks the store failed, and turns away the transactions waiting at the gate.
fn fail(failed: &tokio::sync::watch::Sender<bool>, gate: &FlushGate) {
    failed.send_replace(true);
    gate.wake();
}

/// The gate between our flushes and our sled transactions (see the module doc's `# Hangs`):
/// a flush goes in alone, transactions go in together. It is fair both ways: transactions
/// that come while a flush waits go in after it, and those that waited for a flush go in
/// before the next one.
#[derive(Default)]
struct FlushGate {
    state: Mutex<GateState>,
    /// Signalled when someone leaves the gate or the store fails.
    changed: Condvar,
    /// Runs inside the next flush, before sled's: a flush that hangs, for tests.
    #[cfg(test)]
    stall: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

#[derive(Default)]
struct GateState {
    /// A flush is inside sled.
    flushing: bool,
    /// Flushes waiting to go in.
    flushes_waiting: usize,
    /// Transactions inside sled.
    transactions: usize,
    /// Transactions waiting to go in.
    transactions_waiting: usize,
    /// Transactions to let in before the next flush: as many as waited for the last one.
    admit: usize,
}

/// A transaction's way through the gate; it leaves when dropped.
struct TransactionPass<'a>(&'a FlushGate);

impl Drop for TransactionPass<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.transactions -= 1;
        if st.transactions == 0 {
            self.0.changed.notify_all();
        }
    }
}

/// A flush's way through the gate; it leaves when dropped (a panic in sled included).
struct FlushPass<'a>(&'a FlushGate);

impl Drop for FlushPass<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.flushing = false;
        st.admit = st.transactions_waiting;
        self.0.changed.notify_all();
    }
}

impl FlushGate {
    /// Runs `flush` alone: once the transactions inside have left, and before any that come
    /// later. It waits without a deadline: it runs on a thread of its own (or at the end of a
    /// stop, which the daemon's failed-store watch bounds).
    fn flush<T>(&self, flush: impl FnOnce() -> T) -> T {
        let mut st = lock(&self.state);
        st.flushes_waiting += 1;
        while st.flushing || st.transactions > 0 || st.admit > 0 {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.flushes_waiting -= 1;
        st.flushing = true;
        drop(st);
        let _pass = FlushPass(self);
        #[cfg(test)]
        if let Some(stall) = lock(&self.stall).take() {
            stall();
        }
        flush()
    }

    /// Lets a transaction in when no flush is inside or waiting its turn. Refuses at once when
    /// the store has failed (the flush inside may never come out), and after
    /// [`FLUSH_DEADLINE`] (it has not come out: the disk is stuck).
    fn enter_transaction(
        &self,
        failed: &tokio::sync::watch::Sender<bool>,
    ) -> Result<TransactionPass<'_>, StoreError> {
        let deadline = Instant::now() + FLUSH_DEADLINE;
        let mut st = lock(&self.state);
        st.transactions_waiting += 1;
        let r = loop {
            // Read under the state lock, as `wake` signals under it: no failure is missed.
            if *failed.borrow() {
                break Err(failed_earlier());
            }
            if !st.flushing && (st.flushes_waiting == 0 || st.admit > 0) {
                st.admit = st.admit.saturating_sub(1);
                st.transactions += 1;
                break Ok(TransactionPass(self));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(StoreError::Db(format!(
                    "the disk has not confirmed a write within {} s",
                    FLUSH_DEADLINE.as_secs()
                )));
            }
            st = match self.changed.wait_timeout(st, left) {
                Ok((st, _)) => st,
                Err(p) => p.into_inner().0,
            };
        };
        st.transactions_waiting -= 1;
        if r.is_err() && st.admit > st.transactions_waiting {
            // Fewer wait now than the flush that left let in: the next flush need not wait
            // for this one.
            st.admit = st.transactions_waiting;
            self.changed.notify_all();
        }
        r
    }

    /// Wakes everyone waiting at the gate to look again (the store has failed).
    fn wake(&self) {
        let _st = lock(&self.state);
        self.changed.notify_all();
    }
}

/// The error of a store that failed before.
fn failed_earlier() -> StoreError {
    StoreError::Db("the database failed earlier; restart deployhook".into())
}

/// How long [`Store::durable`] waits for the flush thread. A flush of sled's buffers takes
/// milliseconds on a working disk; one that takes this long is stuck (sled's flush can hang
/// after an I/O error), and the store is treated as failed.
const FLUSH_DEADLINE: Duration = Duration::from_secs(30);

/// The flush thread: batches every waiter that arrived during the previous flush. When idle
/// for [`FIRED_WRITE_INTERVAL`] it writes back pending hook firings, so that none waits in
/// memory longer than that (its errors are sled's sticky ones and surface at the next write).
/// A failed flush marks the store failed, which answers every other waiter at once.
fn flusher(
    db: sled::Db,
    rx: mpsc::Receiver<FlushWaiter>,
    hooks: sled::Tree,
    fired: Arc<Mutex<Fired>>,
    failed: Arc<tokio::sync::watch::Sender<bool>>,
    gate: Arc<FlushGate>,
) {
    loop {
        let first = match rx.recv_timeout(FIRED_WRITE_INTERVAL) {
            Ok(w) => w,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = write_fired(&hooks, &fired);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let r = flush_through_the_gate(&db, &gate, &failed);
        for w in waiters {
            let _ = w.send(r.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Phase, Trigger, TriggerSource};

    /// Opens the store in `dir`. Reopened right after a drop, sled's own I/O threads may
    /// still hold the previous handle's file lock for a moment (seen 2 runs in 15 with 8
    /// tests at a time): that is waited out, with a deadline.
    fn open(dir: &Path) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Store::open(dir) {
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => return r,
            }
        }
    }

    fn build(project: &str, seq: u64) -> Build {
        Build::new_queued(
            seq,
            &crate::model::Target {
                project: project.into(),
                git_ref: crate::model::GitRef::Branch("main".into()),
                params: Default::default(),
            },
            Trigger {
                source: TriggerSource::Api,
                hook: None,
            },
            None,
            false,
            Timestamp::now(),
        )
    }

    fn hook(project: &str, name: &str, token: &str) -> Hook {
        Hook {
            id: HookId::new(),
            project: project.into(),
            name: name.into(),
            branch: "main".into(),
            token_hash: TokenHash::of(token).0,
            created_on: Timestamp::now(),
            last_triggered_on: None,
            trigger_count: 0,
            allow_get: false,
        }
    }

    #[test]
    fn v1_hook_records_are_read_with_allow_get_off_and_v2_keep_it() {
        let h = hook("site", "cms", "dh_x");
        let v1 = HookV1 {
            id: h.id,
            project: h.project.clone(),
            name: h.name.clone(),
            branch: h.branch.clone(),
            token_hash: h.token_hash,
            created_on: h.created_on,
            last_triggered_on: Some(h.created_on),
            trigger_count: 3,
        };
        let bytes = encode(&v1).unwrap();
        assert_eq!(bytes[0], FORMAT_V1);
        let read = decode_hook(&bytes).unwrap();
        assert!(!read.allow_get);
        assert_eq!(read.trigger_count, 3);
        assert_eq!(read.name, "cms");
        let mut g = h.clone();
        g.allow_get = true;
        let bytes = encode_hook(&g).unwrap();
        assert_eq!(bytes[0], HOOK_FORMAT_V2);
        assert_eq!(decode_hook(&bytes).unwrap(), g);
        // A v1 record in the tree is readable through the store, and a write-back of a
        // firing upgrades it.
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path()).unwrap();
        s.inner
            .hooks
            .insert(h.id.as_bytes(), encode(&v1).unwrap())
            .unwrap();
        assert_eq!(s.hook(h.id).unwrap().unwrap().trigger_count, 3);
        s.record_hook_fired(h.id, Timestamp::now()).unwrap();
        let got = s.hook(h.id).unwrap().unwrap();
        assert_eq!(got.trigger_count, 4);
        assert_eq!(
            s.inner.hooks.get(h.id.as_bytes()).unwrap().unwrap()[0],
            HOOK_FORMAT_V2
        );
    }

    #[test]
    fn schedule_state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path()).unwrap();
            assert_eq!(
                s.schedule_checked("site\0main\0UTC\0* * * * *").unwrap(),
                None
            );
            s.set_schedule_checked("site\0main\0UTC\0* * * * *", Timestamp(42))
                .unwrap();
            s.flush_blocking().unwrap();
        }
        let s = open(dir.path()).unwrap();
        assert_eq!(
            s.schedule_checked("site\0main\0UTC\0* * * * *").unwrap(),
            Some(Timestamp(42))
        );
    }

    #[test]
    fn a_second_open_of_the_same_state_dir_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path()).unwrap();
        match open(dir.path()) {
            Err(StoreError::InUse(p)) => assert_eq!(p, dir.path()),
            other => panic!("expected InUse, got {:?}", other.err()),
        }
    }

    // The lock is held across awaits on purpose: it stalls the flush thread.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_waiter_gets_the_error_as_soon_as_the_store_fails_even_if_the_flush_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path()).unwrap();
        s.durable().await.unwrap();
        // Stall the flush thread: when idle for FIRED_WRITE_INTERVAL it takes this lock to
        // write hook firings back.
        let stall = lock(&s.inner.fired);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "the flush thread never stalled");
            tokio::time::sleep(FIRED_WRITE_INTERVAL + Duration::from_millis(200)).await;
            if tokio::time::timeout(Duration::from_millis(300), s.durable())
                .await
                .is_err()
            {
                break;
            }
        }
        // A waiter queued behind the stuck flush...
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.durable().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        // ...hears at once that another write failed.
        let _ = s.check::<()>(Err(StoreError::Db("disk full".into())));
        let r = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("the waiter hung on a failed store")
            .unwrap();
        assert!(matches!(r, Err(StoreError::Db(_))), "{r:?}");
        assert!(s.durable().await.is_err(), "later waiters fail at once");
        drop(stall);
    }

    /// Makes the store's next flush hang inside sled while holding sled's process-wide lock,
    /// as `Db::flush` did after a failed write (see `# Hangs`): a merge operator that blocks
    /// runs under that lock. Returns a receiver that hears when the flush hangs, and the handle
    /// that lets it go on (at the latest when dropped).
    fn hang_the_next_flush(s: &Store) -> (mpsc::Receiver<()>, LetGo) {
        let tree = s.inner.db.open_tree("hang").unwrap();
        let let_go = LetGo(Arc::default());
        let (hung_tx, hung_rx) = mpsc::channel();
        tree.set_merge_operator({
            let gate = let_go.0.clone();
            move |_: &[u8], _: Option<&[u8]>, new: &[u8]| {
                let _ = hung_tx.send(());
                let (open, opened) = &*gate;
                let mut open = lock(open);
                while !*open {
                    open = opened.wait(open).unwrap_or_else(|p| p.into_inner());
                }
                Some(new.to_vec())
            }
        });
        *lock(&s.inner.gate.stall) = Some(Box::new(move || {
            let _ = tree.merge(b"k", b"v");
        }));
        (hung_rx, let_go)
    }

    /// Lets a flush hung by [`hang_the_next_flush`] go on.
    struct LetGo(Arc<(Mutex<bool>, Condvar)>);

    impl LetGo {
        fn now(&self) {
            *lock(&self.0.0) = true;
            self.0.1.notify_all();
        }
    }

    impl Drop for LetGo {
        fn drop(&mut self) {
            self.now();
        }
    }

    /// Hands the flush thread a waiter, as [`Store::durable`] does, without a runtime.
    fn flush_in_background(s: &Store) -> oneshot::Receiver<Result<(), StoreError>> {
        let (tx, rx) = oneshot::channel();
        lock(&s.inner.flush_tx).as_ref().unwrap().send(tx).unwrap();
        rx
    }

    /// A store whose flush (started in the background, its answer in the receiver) hangs
    /// inside sled until `LetGo::now`.
    fn a_store_whose_flush_hangs() -> (
        tempfile::TempDir,
        Store,
        LetGo,
        oneshot::Receiver<Result<(), StoreError>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path()).unwrap();
        let (hung, let_go) = hang_the_next_flush(&s);
        let flushed = flush_in_background(&s);
        hung.recv_timeout(Duration::from_secs(10))
            .expect("the flush never started");
        (dir, s, let_go, flushed)
    }

    /// `s.insert_build` of a new build, on a thread of its own; the receiver hears its result.
    fn insert_in_background(s: &Store, seq: u64) -> mpsc::Receiver<Result<(), StoreError>> {
        let (tx, rx) = mpsc::channel();
        let s = s.clone();
        std::thread::spawn(move || {
            let _ = tx.send(s.insert_build(&build("p", seq), None));
        });
        rx
    }

    /// A full disk hung the daemon (1 test run in 10): our flush waited forever inside sled
    /// after a failed write, a new build's transaction queued in sled behind it while holding
    /// the queue's mutex, and the runtime stopped. A transaction must wait outside sled and
    /// give up as soon as the store fails, whether it came before the failure or after.
    #[test]
    fn a_transaction_behind_a_flush_that_hangs_fails_with_the_store_instead_of_hanging() {
        let (_dir, s, let_go, flushed) = a_store_whose_flush_hangs();
        let before = insert_in_background(&s, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&s.inner.gate.state).transactions_waiting == 0 {
            assert!(
                Instant::now() < deadline,
                "the transaction never came to the gate"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Another write saw the disk full.
        let _ = s.check::<()>(Err(StoreError::Db("disk full".into())));
        let after = insert_in_background(&s, 2);
        let answers = [before, after].map(|rx| rx.recv_timeout(Duration::from_secs(5)));
        let_go.now();
        for r in answers {
            let r = r.expect("a transaction hung behind the stuck flush");
            assert!(matches!(r, Err(StoreError::Db(_))), "{r:?}");
        }
        let _ = flushed.blocking_recv();
        assert!(s.flush_blocking().is_err(), "a failed store is not flushed");
    }

    /// A slow flush on a working disk: the transaction waits for it, then goes in.
    #[test]
    fn a_transaction_waits_for_a_slow_flush_then_goes_in() {
        let (_dir, s, let_go, flushed) = a_store_whose_flush_hangs();
        let inserted = insert_in_background(&s, 1);
        assert!(
            inserted.recv_timeout(Duration::from_millis(300)).is_err(),
            "the transaction went into sled beside the flush"
        );
        let_go.now();
        inserted
            .recv_timeout(Duration::from_secs(10))
            .expect("the transaction never went in")
            .unwrap();
        flushed.blocking_recv().unwrap().unwrap();
        assert_eq!(s.all_builds().unwrap().len(), 1);
    }

    /// Transactions that waited for a flush go in before the next flush, and a flush that
    /// waits goes in before transactions that come after it: neither side starves.
    #[test]
    fn the_gate_lets_one_flush_in_alone_and_takes_turns() {
        let gate = Arc::new(FlushGate::default());
        let failed = Arc::new(tokio::sync::watch::Sender::new(false));
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiting = |what: fn(&GateState) -> usize| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while what(&lock(&gate.state)) == 0 {
                assert!(Instant::now() < deadline, "nobody came to the gate");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let (inside_tx, inside_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let first_flush = std::thread::spawn({
            let (gate, order) = (gate.clone(), order.clone());
            move || {
                gate.flush(|| {
                    let _ = inside_tx.send(());
                    let _ = go_rx.recv();
                    lock(&order).push("flush 1");
                })
            }
        });
        inside_rx.recv().unwrap();
        let transaction = |name: &'static str| {
            let (gate, order, failed) = (gate.clone(), order.clone(), failed.clone());
            std::thread::spawn(move || {
                let _pass = gate.enter_transaction(&failed).unwrap();
                lock(&order).push(name);
            })
        };
        let waited = transaction("transaction that waited");
        waiting(|st| st.transactions_waiting);
        let second_flush = std::thread::spawn({
            let (gate, order) = (gate.clone(), order.clone());
            move || gate.flush(|| lock(&order).push("flush 2"))
        });
        waiting(|st| st.flushes_waiting);
        go_tx.send(()).unwrap();
        first_flush.join().unwrap();
        waited.join().unwrap();
        second_flush.join().unwrap();
        transaction("later transaction").join().unwrap();
        assert_eq!(
            *lock(&order),
            [
                "flush 1",
                "transaction that waited",
                "flush 2",
                "later transaction"
            ]
        );
    }

    #[test]
    fn records_round_trip_with_a_version_byte() {
        let b = build("site", 7);
        let bytes = encode_build(&b).unwrap();
        assert_eq!(bytes[0], BUILD_FORMAT_V2);
        assert_eq!(decode_build(&bytes).unwrap(), b);
        let mut future = bytes.clone();
        future[0] = 9;
        assert!(matches!(decode_build(&future), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode_build(&[]), Err(StoreError::Corrupt(_))));
        let h = hook("site", "cms", "dh_x");
        let bytes = encode_hook(&h).unwrap();
        assert_eq!(bytes[0], HOOK_FORMAT_V2);
        assert_eq!(decode_hook(&bytes).unwrap(), h);
    }

    /// A state dir written by v1 keeps working after the upgrade: its builds read as branch
    /// builds with no params and their one requested commit.
    #[test]
    fn v1_build_records_are_read_and_upgraded() {
        let id = BuildId::new();
        let sha = "ab".repeat(20);
        let v1 = BuildV1 {
            id,
            seq: 3,
            project: "site".into(),
            branch: "staging".into(),
            commit: Some(sha.clone()),
            requested_commit: Some(sha.clone()),
            phase: Phase::Stopped(crate::model::Outcome::Success),
            exit_code: Some(0),
            trigger: Trigger {
                source: TriggerSource::GitPush,
                hook: None,
            },
            created_on: Timestamp(1),
            initializing_on: Some(Timestamp(2)),
            running_on: Some(Timestamp(3)),
            stopped_on: Some(Timestamp(4)),
            cancel_reason: None,
            superseded_by: None,
            has_payload: true,
            log_lines: 5,
            log_bytes: 6,
            log_truncated: false,
        };
        let b = decode_build(&encode(&v1).unwrap()).unwrap();
        assert_eq!(b.id, id);
        assert_eq!(b.git_ref, crate::model::GitRef::Branch("staging".into()));
        assert_eq!(b.requested_commits, vec![sha.clone()]);
        assert_eq!(b.requested_commit.as_deref(), Some(sha.as_str()));
        assert!(b.params.is_empty() && b.exact_commit.is_none() && b.not_before.is_none());
        assert_eq!(b.phase, Phase::Stopped(crate::model::Outcome::Success));
        assert_eq!((b.log_lines, b.log_bytes, b.has_payload), (5, 6, true));
        b.check_invariants().unwrap();
    }

    /// The in-memory token map is rebuilt from the `hooks` tree when the store opens: after a
    /// restart every live token (rotated ones by their new token) finds its hook, deleted and
    /// replaced tokens find nothing.
    #[tokio::test]
    async fn hooks_by_token_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, rotated, deleted) = {
            let s = open(dir.path()).unwrap();
            assert_eq!(s.hook_count(), 0);
            assert!(s.hook_by_token(&TokenHash::of("dh_a")).is_none());
            let kept = hook("site", "cms", "dh_a");
            let rotated = hook("site", "ci", "dh_b");
            let deleted = hook("other", "cms", "dh_c");
            for h in [&kept, &rotated, &deleted] {
                assert!(matches!(s.insert_hook(h).unwrap(), HookInsert::Created));
            }
            s.rotate_hook("site", rotated.id, &TokenHash::of("dh_b2"))
                .unwrap()
                .unwrap();
            s.delete_hook("other", deleted.id).unwrap().unwrap();
            s.durable().await.unwrap();
            (kept, rotated, deleted)
        };
        let s = open(dir.path()).unwrap();
        assert_eq!(s.hook_count(), 2);
        let k = s.hook_by_token(&TokenHash::of("dh_a")).unwrap();
        assert_eq!(
            (k.id, &*k.project, &*k.name, &*k.branch),
            (kept.id, "site", "cms", "main")
        );
        assert_eq!(
            s.hook_by_token(&TokenHash::of("dh_b2")).unwrap().id,
            rotated.id
        );
        assert!(s.hook_by_token(&TokenHash::of("dh_b")).is_none());
        assert!(s.hook_by_token(&TokenHash::of("dh_c")).is_none());
        assert!(s.hook(deleted.id).unwrap().is_none());
    }

    /// Many hooks: each token finds its own hook, before and after a restart, and the
    /// project and branch names are shared, not copied per hook.
    #[tokio::test]
    async fn many_hooks_each_find_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let n = 2_000;
        let hooks: Vec<Hook> = (0..n)
            .map(|i| {
                hook(
                    ["site", "blog"][i % 2],
                    &format!("h{i}"),
                    &format!("dh_{i}"),
                )
            })
            .collect();
        let check = |s: &Store| {
            assert_eq!(s.hook_count(), n);
            for (i, h) in hooks.iter().enumerate() {
                let r = s.hook_by_token(&TokenHash::of(&format!("dh_{i}"))).unwrap();
                assert_eq!((r.id, &*r.project, &*r.name), (h.id, &*h.project, &*h.name));
            }
            let a = s.hook_by_token(&TokenHash::of("dh_0")).unwrap();
            let b = s.hook_by_token(&TokenHash::of("dh_2")).unwrap();
            assert!(Arc::ptr_eq(&a.project, &b.project) && Arc::ptr_eq(&a.branch, &b.branch));
        };
        {
            let s = open(dir.path()).unwrap();
            for h in &hooks {
                assert!(matches!(s.insert_hook(h).unwrap(), HookInsert::Created));
            }
            check(&s);
            s.durable().await.unwrap();
        }
        check(&open(dir.path()).unwrap());
    }

    /// Rotations of one hook racing each other leave exactly one token working: the one the
    /// stored record has (the map is changed under the same lock as the transaction).
    #[test]
    fn racing_rotations_leave_one_token() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path()).unwrap();
        let h = hook("site", "cms", "dh_start");
        s.insert_hook(&h).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        s.rotate_hook("site", h.id, &TokenHash::of(&format!("dh_{t}_{i}")))
                            .unwrap()
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.hook_count(), 1);
        let stored = s.hook(h.id).unwrap().unwrap().token_hash;
        let live: Vec<String> = (0..4)
            .flat_map(|t| (0..50).map(move |i| format!("dh_{t}_{i}")))
            .chain(["dh_start".to_owned()])
            .filter(|tok| s.hook_by_token(&TokenHash::of(tok)).is_some())
            .collect();
        assert_eq!(live.len(), 1, "{live:?}");
        assert_eq!(TokenHash::of(&live[0]).0, stored);
    }

    #[tokio::test]
    async fn hooks_by_token_rotate_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path()).unwrap();
        let h = hook("site", "cms", "dh_a");
        assert!(matches!(s.insert_hook(&h).unwrap(), HookInsert::Created));
        assert!(matches!(
            s.insert_hook(&hook("site", "cms", "dh_b")).unwrap(),
            HookInsert::NameTaken
        ));
        assert!(matches!(
            s.insert_hook(&hook("other", "cms", "dh_c")).unwrap(),
            HookInsert::Created
        ));
        assert_eq!(s.hook_by_token(&TokenHash::of("dh_a")).unwrap().id, h.id);
        assert!(s.hook_by_token(&TokenHash::of("dh_b")).is_none());
        assert!(
            s.rotate_hook("other", h.id, &TokenHash::of("dh_x"))
                .unwrap()
                .is_none()
        );
        s.rotate_hook("site", h.id, &TokenHash::of("dh_new"))
            .unwrap()
            .unwrap();
        assert!(s.hook_by_token(&TokenHash::of("dh_a")).is_none());
        assert_eq!(s.hook_by_token(&TokenHash::of("dh_new")).unwrap().id, h.id);
        s.record_hook_fired(h.id, Timestamp(5)).unwrap();
        let fired = s.hook(h.id).unwrap().unwrap();
        assert_eq!(
            (fired.trigger_count, fired.last_triggered_on),
            (1, Some(Timestamp(5)))
        );
        assert_eq!(s.hooks(Some("site")).unwrap().len(), 1);
        assert_eq!(s.hooks(None).unwrap().len(), 2);
        assert!(s.delete_hook("site", h.id).unwrap().is_some());
        assert!(s.hook_by_token(&TokenHash::of("dh_new")).is_none());
        // The name is free again.
        assert!(matches!(
            s.insert_hook(&hook("site", "cms", "dh_d")).unwrap(),
            HookInsert::Created
        ));
        s.durable().await.unwrap();
    }

    #[test]
    fn builds_list_newest_first_with_cursor_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path()).unwrap();
        let mut ids = Vec::new();
        for seq in 1..=5 {
            let mut b = build("site", seq);
            if seq % 2 == 0 {
                b.phase = Phase::Stopped(crate::model::Outcome::Success);
            }
            s.insert_build(&b, None).unwrap();
            ids.push(b.id);
        }
        s.insert_build(&build("site-2", 6), None).unwrap();
        let p1 = s.list_builds("site", None, 2, None).unwrap();
        assert_eq!(
            p1.builds.iter().map(|b| b.id).collect::<Vec<_>>(),
            vec![ids[4], ids[3]]
        );
        let c = decode_cursor(p1.next_cursor.as_deref().unwrap()).unwrap();
        let p2 = s.list_builds("site", None, 2, Some(c)).unwrap();
        assert_eq!(
            p2.builds.iter().map(|b| b.id).collect::<Vec<_>>(),
            vec![ids[2], ids[1]]
        );
        let c = decode_cursor(p2.next_cursor.as_deref().unwrap()).unwrap();
        let p3 = s.list_builds("site", None, 2, Some(c)).unwrap();
        assert_eq!(
            p3.builds.iter().map(|b| b.id).collect::<Vec<_>>(),
            vec![ids[0]]
        );
        assert!(p3.next_cursor.is_none());
        let stopped = s
            .list_builds("site", Some(StatusFilter::Stopped), 10, None)
            .unwrap();
        assert_eq!(stopped.builds.len(), 2);
        assert_eq!(s.project_build_ids("site").unwrap().len(), 5);
        assert!(s.delete_build(ids[0]).unwrap());
        assert_eq!(s.project_build_ids("site").unwrap().len(), 4);
        assert!(decode_cursor("zz").is_none());
    }

    /// What reserving `project`/`delivery` at `now` finds, with the window reaching back to
    /// time 0 and no claim stale.
    fn reserve(s: &Store, project: &str, delivery: &str, now: Timestamp) -> DeliverySeen {
        s.reserve_delivery(project, delivery, now, Timestamp(0), Timestamp(0))
            .unwrap()
    }

    #[test]
    fn deliveries_are_remembered_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path()).unwrap();
        let a = BuildId::new();
        let t = Timestamp(1_000);
        assert_eq!(reserve(&s, "site", "d1", t), DeliverySeen::New);
        assert_eq!(reserve(&s, "site", "d1", t), DeliverySeen::InFlight);
        s.complete_delivery("site", "d1", &[a], t).unwrap();
        assert_eq!(reserve(&s, "site", "d1", t), DeliverySeen::Built(vec![a]));
        assert_eq!(s.delivery_builds("site", "d1").unwrap(), Some(vec![a]));
        // Another project's delivery ids are its own.
        assert_eq!(reserve(&s, "other", "d1", t), DeliverySeen::New);
        s.release_delivery("other", "d1").unwrap();
        assert_eq!(reserve(&s, "other", "d1", t), DeliverySeen::New);
        // A claim in flight for too long is stale and taken over.
        assert_eq!(reserve(&s, "stale", "d", Timestamp(10)), DeliverySeen::New);
        assert_eq!(
            s.reserve_delivery("stale", "d", Timestamp(20), Timestamp(0), Timestamp(15))
                .unwrap(),
            DeliverySeen::New
        );
        // Outside the window it counts as new.
        assert_eq!(
            s.reserve_delivery(
                "site",
                "d1",
                Timestamp(9_000),
                Timestamp(2_000),
                Timestamp(0)
            )
            .unwrap(),
            DeliverySeen::New
        );
        assert_eq!(
            s.prune_deliveries(Timestamp(5_000)).unwrap(),
            2,
            "other/d1 and stale/d"
        );
        assert_eq!(s.delivery_builds("other", "d1").unwrap(), None);
    }

    /// A multi-ref delivery remembers every build it triggered, in order, and a record
    /// written before multi-ref deliveries (time + one id) still reads as that one build.
    #[test]
    fn deliveries_remember_every_build_and_read_old_records() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path()).unwrap();
        let (a, b) = (BuildId::new(), BuildId::new());
        let t = Timestamp(1_000);
        assert_eq!(reserve(&s, "site", "multi", t), DeliverySeen::New);
        assert_eq!(
            s.delivery_builds("site", "multi").unwrap(),
            None,
            "in flight"
        );
        s.complete_delivery("site", "multi", &[a, b], t).unwrap();
        assert_eq!(
            reserve(&s, "site", "multi", t),
            DeliverySeen::Built(vec![a, b])
        );
        // The v1 layout, written by hand: seen-at, then exactly one build id.
        let mut old = 500i64.to_be_bytes().to_vec();
        old.extend_from_slice(a.as_bytes());
        s.inner
            .deliveries
            .insert(name_key("site", "old"), old)
            .unwrap();
        assert_eq!(reserve(&s, "site", "old", t), DeliverySeen::Built(vec![a]));
        assert_eq!(s.delivery_builds("site", "old").unwrap(), Some(vec![a]));
    }

    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let b = build("site", 1);
        {
            let s = open(dir.path()).unwrap();
            s.insert_build(&b, Some(b"payload")).unwrap();
            s.flush_blocking().unwrap();
            s.close();
        }
        let s = open(dir.path()).unwrap();
        assert_eq!(s.build(b.id).unwrap().unwrap(), b);
        assert_eq!(s.payload(b.id).unwrap().unwrap(), b"payload");
    }

    #[test]
    fn hook_firings_counted_in_memory_are_all_shown_and_survive_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let h = hook("site", "cms", "dh_a");
        let gone = hook("site", "old", "dh_b");
        {
            let s = open(dir.path()).unwrap();
            s.insert_hook(&h).unwrap();
            s.insert_hook(&gone).unwrap();
            // Far more firings than one write-back interval takes: most stay in memory.
            for i in 0..1000 {
                s.record_hook_fired(h.id, Timestamp(1_000 + i)).unwrap();
            }
            s.record_hook_fired(gone.id, Timestamp(5)).unwrap();
            s.record_hook_fired(gone.id, Timestamp(6)).unwrap();
            s.delete_hook("site", gone.id).unwrap();
            let shown = s.hooks(Some("site")).unwrap();
            assert_eq!(shown.len(), 1, "a deleted hook is not brought back");
            assert_eq!(shown[0].trigger_count, 1000);
            assert_eq!(shown[0].last_triggered_on, Some(Timestamp(1_999)));
            s.record_hook_fired(h.id, Timestamp(3_000)).unwrap();
            assert_eq!(s.hook(h.id).unwrap().unwrap().trigger_count, 1001);
            s.record_hook_fired(h.id, Timestamp(3_001)).unwrap();
            s.flush_blocking().unwrap();
            s.close();
        }
        let s = open(dir.path()).unwrap();
        let back = s.hook(h.id).unwrap().unwrap();
        assert_eq!(back.trigger_count, 1002);
        assert_eq!(back.last_triggered_on, Some(Timestamp(3_001)));
        assert!(s.hook(gone.id).unwrap().is_none());
    }

    #[test]
    fn rate_events_keep_the_boot_clock_and_old_records_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let b = build("site", 1);
        store.insert_build(&b, None).unwrap();
        // A record of the format before boot times: the project name alone.
        let old_at = Timestamp(b.created_on.0 - 10_000_000);
        let old_id = BuildId(uuid::Uuid::new_v4());
        store
            .inner
            .rate_events
            .insert(rate_key(old_at, old_id), b"legacy".as_slice())
            .unwrap();
        let events = store.rate_events().unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].0, "legacy");
        assert_eq!(
            events[0].1,
            EventTime {
                wall: old_at,
                boot: None
            }
        );
        assert_eq!(events[1].0, "site");
        assert_eq!(events[1].1.wall, b.created_on);
        let now = EventTime::now();
        let boot = events[1].1.boot.expect("the boot clock is kept");
        assert_eq!(Some(boot.boot_id), now.boot.map(|n| n.boot_id));

        // Pruning ages events by the boot clock: the wall clock a day ahead expires only the
        // old record (wall time only), not the event of this boot.
        let day_ahead = EventTime {
            wall: Timestamp(now.wall.0 + 86_400_000_000),
            boot: now.boot,
        };
        assert_eq!(
            store
                .prune_rate_events(&day_ahead, crate::ratelimit::WINDOW)
                .unwrap(),
            1
        );
        let left = store.rate_events().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].0, "site");
    }
}
