//! The HTTP server: hyper 1.x directly, one listener for everything (SPEC §4).
//!
//! [`serve`] takes an already-bound listener (tests bind port 0) and a [`ShutdownWatch`]. The
//! accept loop and shutdown meet in one `select!`; each connection is watched by hyper-util's
//! `GracefulShutdown`, and by a [`conn::Registry`]: at the connection cap, the oldest
//! connection that is between requests is closed to make room, so a flood of idle or
//! trickling connections cannot lock `/healthz` out.
//!
//! Hardening that lives here: a header read timeout that really fires (hyper ignores
//! `header_read_timeout` without a timer, so the builder gets `TokioTimer`), at most 100
//! headers and an exact 64 KiB head limit (431 past it), bare-LF request heads refused
//! ([`conn::StrictIo`]), `Host` checked as RFC 9112 §3.2 says (400), a body size limit
//! checked against `Content-Length` before anything is read and enforced while reading
//! chunked bodies (413), a deadline for the whole body (408), a shared memory budget for
//! bodies read before their request is authenticated (503 past it), a connection cap below
//! the free file descriptors ([`connection_cap`]), connections that reach hyper (and its
//! buffers) only with their first complete head, and accept errors (EMFILE) that close an
//! idle connection or back off instead of spinning.
//!
//! Shutdown has two steps: on SIGTERM the listener closes (new connections are refused) while
//! open connections keep being served — `/healthz` and triggers answer 503 — until the builds
//! have drained; then connections are closed gracefully with a deadline.
//!
//! `handle` is also where requests are counted for `/metrics` (by route template, never the
//! raw path) and where each trigger request is classified (created, deduplicated,
//! rate_limited, rejected) and logged once.

pub mod api;
pub mod conn;
pub mod envelope;
pub mod error;
pub mod follow;
pub mod outbox_api;
pub mod public;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::RwLock;

use crate::access::{self, ApiTokens, Grant, Scope};
use crate::config::SharedConfig;
use crate::metrics::{Metrics, TriggerResult};
use crate::model::TriggerSource;
use crate::queue::Queue;
use crate::shutdown::ShutdownWatch;
use crate::store::Store;
use crate::tunables::Tunables;
pub use envelope::{ApiError, Body, TriggerAnswer};

/// How long a client may take to send its request headers (also the idle keep-alive limit).
/// The production value of [`Tunables::header_read_timeout`], as are the next two.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long open connections get to finish when the server closes.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(5);
/// Largest header block (plus request line) accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How many times in a row the accept loop yields to let connections just accepted be read
/// (so that they may be closed to make room) before it pauses.
const MAX_UNREAD_YIELDS: u32 = 64;
/// At a stop, how long a connection that has not sent its first head yet is kept open for it
/// (see `serve`).
const STOP_HEAD_GRACE: Duration = Duration::from_millis(500);
/// Most headers accepted in one request.
pub const MAX_HEADERS: usize = 100;
/// Most connections the server keeps open at once, however many descriptors there are.
pub const MAX_CONNECTIONS: usize = 16384;
/// Descriptors kept free of connections whatever the builds: sled's snapshot files, log
/// reads by API requests, outbox sockets, config reloads, the systemd notify socket.
const FD_RESERVE_FIXED: u64 = 32;
/// Descriptors kept free per concurrent build: what one of its steps may take while it starts.
const FD_RESERVE_PER_BUILD: u64 = crate::descriptors::STEP;

/// The connection cap for a process that may open `nofile` descriptors, has `open` open
/// now (listener and database included) and runs up to `builds` builds at once.
///
/// Every connection is a descriptor, so the cap must stay below what is really free, or
/// accept fails with EMFILE before the cap is reached and no idle connection is ever
/// closed to make room (issue 12). Room is kept for builds and the daemon's own files; when
/// descriptors are too few for that, half of what is free goes to connections.
pub fn connection_cap(nofile: u64, open: u64, builds: usize) -> usize {
    let free = nofile.saturating_sub(open);
    let reserve = FD_RESERVE_FIXED + FD_RESERVE_PER_BUILD * builds as u64;
    let cap = if free >= 2 * reserve {
        free - reserve
    } else {
        free / 2
    };
    usize::try_from(cap)
        .unwrap_or(usize::MAX)
        .clamp(1, MAX_CONNECTIONS)
}

/// What every handler can reach. Shared as an `Arc`; no globals.
pub struct AppState {
    /// The config in force.
    pub config: Arc<SharedConfig>,
    /// The database.
    pub store: Store,
    /// The build queue.
    pub queue: Queue,
    /// Every API token with its scope and projects (replaced on reload).
    pub tokens: RwLock<ApiTokens>,
    /// Set at SIGTERM: health and triggers answer 503.
    pub shutting_down: AtomicBool,
    /// Most connections open at once.
    pub max_connections: usize,
    /// The address the listener is bound to.
    pub local_addr: std::net::SocketAddr,
    /// Bytes (in KiB) of request bodies that may be held before their request is
    /// authenticated (Git webhooks), all requests together; see [`read_body_budgeted_draining`].
    pub unauthenticated_body_budget: Arc<tokio::sync::Semaphore>,
    /// The metric registry behind `GET /metrics` (shared with the queue).
    pub metrics: Arc<Metrics>,
    /// The HTTP timeouts in force (the production values except in tests).
    pub tunables: Tunables,
    /// Aggregates refusal lines that clients can cause at request rate.
    pub quiet_log: crate::quietlog::Throttle,
    /// (v2) The outbox worker (`None` in harnesses that run no daemon), for test sends.
    pub outbox: Option<crate::outbox::Outbox>,
    /// The status pages' sessions and assets.
    pub ui: crate::ui::Ui,
    /// Answers of joins, made once per change of the build (see [`envelope::JoinAnswers`]).
    pub join_answers: envelope::JoinAnswers,
}

impl AppState {
    /// The body budget for a daemon whose `max_git_body_bytes` is `max_body` (only Git
    /// webhooks are read before they are authenticated): room for at least
    /// four maximal bodies, and 64 MiB at least.
    pub fn body_budget(max_body: u64) -> Arc<tokio::sync::Semaphore> {
        Arc::new(tokio::sync::Semaphore::new(
            kib(max_body.saturating_mul(4).max(64 * 1024 * 1024)) as usize,
        ))
    }

    /// Base of hook URLs: `public_url`, or when that is left out, the address bound.
    pub fn public_url(&self) -> String {
        let config = self.config.get();
        if config.server.public_url_is_default {
            let mut a = self.local_addr;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{a}")
        } else {
            config.server.public_url.clone()
        }
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// The scope and projects of a presented API token (the bare token, without `Bearer`),
    /// or `None` if it is not one in force. Every token is compared in constant time (see
    /// [`ApiTokens::authenticate`]). The admin API and the status pages both use this.
    pub async fn authenticate(&self, presented: &[u8]) -> Option<Grant> {
        self.tokens.read().await.authenticate(presented)
    }
}

/// The TCP peer of a request, put in its extensions by the accept loop: what `allow_from`
/// judges (through `trusted_proxies`, see [`crate::access::client_addr`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientPeer(pub std::net::SocketAddr);

/// Serves HTTP on `listener` until `shutdown` says to close (see the module doc).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    mut shutdown: ShutdownWatch,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let registry = Arc::new(conn::Registry::default());
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.tunables.header_read_timeout)
        .max_headers(MAX_HEADERS)
        // Exact: hyper compares the parsed head with it. `max_buf_size` alone lets a head
        // through when it completes in the read that passes the limit (up to twice it).
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let connection_shutdown = shutdown.clone();
    let connections = Connections {
        builder: &builder,
        graceful: &graceful,
        state: &state,
        registry: &registry,
        shutdown: &connection_shutdown,
    };
    let mut last_accept_warning: Option<tokio::time::Instant> = None;
    // Yields in a row while out of descriptors, waiting for new connections to be read.
    let mut unread_yields = 0;
    'accept: loop {
        // At the cap, the oldest idle connection makes room (see `make_room`), and the next
        // accept waits until its socket is really closed (see `conn::Registry`). If every
        // connection is in the middle of a request, newcomers wait in the backlog until one
        // finishes (checked again on every close, and every 100 ms).
        while registry.open() >= state.max_connections {
            let mut pause = ACCEPT_PAUSE;
            if !registry.is_closing() {
                let room = make_room(&registry, &mut unread_yields);
                match room {
                    Room::Yield => {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    Room::None => tracing::debug!(
                        "all {} connection slots are busy; new connections wait",
                        state.max_connections
                    ),
                    Room::Made | Room::Wait(_) => {}
                }
                pause = room.pause();
            }
            tokio::select! {
                _ = registry.wait_closed() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.draining() => break 'accept,
            }
        }
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    if !is_per_connection_error(&e) {
                        // EMFILE/ENFILE/ENOMEM. Out of descriptors (builds took more than
                        // their reserve): an idle connection makes room, as at the cap, so
                        // that `/healthz` still gets in. With none to close, back off
                        // instead of spinning.
                        if last_accept_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                            tracing::warn!("accept failed: {e}; closing idle connections, else pausing accepts for 100 ms at a time");
                            last_accept_warning = Some(tokio::time::Instant::now());
                        }
                        let room = make_room(&registry, &mut unread_yields);
                        if let Room::Yield = room {
                            tokio::task::yield_now().await;
                            continue;
                        }
                        let evicted = matches!(room, Room::Made);
                        // Until the evicted socket is really closed: a wake-up left by an
                        // earlier close must not send the loop back to a failing accept.
                        let open = registry.open();
                        let closed = async {
                            while registry.open() >= open {
                                registry.wait_closed().await;
                            }
                        };
                        tokio::select! {
                            _ = closed, if evicted => {}
                            _ = tokio::time::sleep(room.pause()) => {}
                        }
                    }
                    continue;
                }
            },
            _ = shutdown.draining() => break,
        };
        connections.serve(stream, peer);
    }
    // Connections the kernel completed before the stop wait in the listen backlog: they are
    // answered (a trigger gets 503 "shutting down"), not reset by closing the listener under
    // them. Those that arrive from here on are refused.
    for (stream, peer) in accept_backlog(listener) {
        connections.serve(stream, peer);
    }
    shutdown.closing().await;
    let close_deadline = state.tunables.close_deadline;
    if tokio::time::timeout(close_deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "some HTTP connections did not close within {close_deadline:?}; dropping them"
        );
    }
    Ok(())
}

/// The listen backlog asked for; the kernel caps it at `net.core.somaxconn` (4096 by default
/// since Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the HTTP listener with a deep backlog. `TcpListener::bind` asks for 128, as std
/// does: while the server is at its connection cap it accepts only as connections close,
/// and a flood of a few hundred connections then filled the queue, so the kernel dropped
/// the SYN of the next client — a `/healthz` probe too — which retried only after a second
/// (HOSTILE 7; seen as a 1.04 s `/healthz` in the test suite).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restart can bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What [`make_room`] did.
enum Room {
    /// Asked the oldest idle connection to close.
    Made,
    /// Found none to close, but a connection just accepted has not been read yet: yield so
    /// that its task reads it, then try again.
    Yield,
    /// Found none to close yet: an idle connection may be closed after this long.
    Wait(Duration),
    /// Found none to close.
    None,
}

impl Room {
    /// How long the accept loop may wait before it looks again (it wakes sooner when a
    /// connection closes).
    fn pause(&self) -> Duration {
        match self {
            Room::Wait(d) => (*d).min(ACCEPT_PAUSE),
            Room::Made | Room::Yield | Room::None => ACCEPT_PAUSE,
        }
    }
}

/// The accept loop's longest pause while it cannot accept (at the cap, or out of
/// descriptors).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Makes room for a new connection (at the cap, or out of descriptors) by closing the oldest
/// idle connection (see [`conn::Registry::evict_oldest_idle`]). A connection just accepted
/// usually has its request in the socket already, and its task usually runs next on this
/// worker, so the accept loop yields (up to [`MAX_UNREAD_YIELDS`] times in a row) instead
/// of pausing: with builds holding all but one descriptor, pausing let only ~3 queued
/// connections through a second.
fn make_room(registry: &conn::Registry, unread_yields: &mut u32) -> Room {
    let room = match registry.evict_oldest_idle(std::time::Instant::now()) {
        conn::Eviction::Evicted => Room::Made,
        conn::Eviction::NotYet { unread: true, .. } if *unread_yields < MAX_UNREAD_YIELDS => {
            *unread_yields += 1;
            return Room::Yield;
        }
        conn::Eviction::NotYet { after, .. } => Room::Wait(after),
        conn::Eviction::Nothing => Room::None,
    };
    *unread_yields = 0;
    room
}

/// What the task of each accepted connection needs.
struct Connections<'a> {
    builder: &'a http1::Builder,
    graceful: &'a GracefulShutdown,
    state: &'a Arc<AppState>,
    registry: &'a Arc<conn::Registry>,
    shutdown: &'a ShutdownWatch,
}

impl Connections<'_> {
    /// Serves `stream` on a task of its own until it closes, is evicted or the stop closes it.
    fn serve(&self, stream: tokio::net::TcpStream, peer: std::net::SocketAddr) {
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(conn::Activity::default());
        let registered = self.registry.register(activity.clone());
        let mut io = conn::StrictIo::new(stream, activity.clone());
        let (builder, watcher, st) = (
            self.builder.clone(),
            self.graceful.watcher(),
            self.state.clone(),
        );
        let mut closing = self.shutdown.clone();
        let header_timeout = self.state.tunables.header_read_timeout;
        tokio::spawn(async move {
            // Until its first request head is complete, a connection costs only the bytes
            // it sent: see `StrictIo::read_first_head`. The same header timeout applies.
            let spoke = tokio::select! {
                // A head already in the socket wins: a connection taken from the backlog at
                // the stop is answered, not closed unread.
                biased;
                r = tokio::time::timeout(header_timeout, io.read_first_head()) => {
                    matches!(r, Ok(Ok(())))
                }
                _ = registered.evict.notified() => false,
                // A client that connected just before the stop may not have sent its request
                // yet (on a busy machine its write comes late): it gets `STOP_HEAD_GRACE` to,
                // so that the request is answered instead of meeting a closed connection.
                // The stop's graceful close waits for it, as this task holds a watcher.
                _ = async {
                    closing.closing().await;
                    tokio::time::sleep(STOP_HEAD_GRACE).await;
                } => false,
            };
            if spoke {
                let service = service_fn(move |mut req: Request<Incoming>| {
                    let st = st.clone();
                    let act = activity.clone();
                    req.extensions_mut().insert(ClientPeer(peer));
                    async move { Ok::<_, Infallible>(handle(req, st, act).await) }
                });
                // Boxed: a connection waiting for its first head keeps a small task, and
                // only one that spoke carries hyper's (large) connection state.
                let connection: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
                    if closing.is_closing() {
                        // Spoke during the stop's grace. The graceful close has been signalled,
                        // and hyper closes a watched connection that has not begun a request
                        // unread; so it is served unwatched, for one request, while the
                        // watcher held here keeps the close waiting for it.
                        let mut one = builder.clone();
                        one.keep_alive(false);
                        let connection = one.serve_connection(TokioIo::new(io), service);
                        Box::pin(async move {
                            let r = connection.await;
                            drop(watcher);
                            r
                        })
                    } else {
                        Box::pin(watcher.watch(builder.serve_connection(TokioIo::new(io), service)))
                    };
                tokio::select! {
                    _ = connection => {}
                    // Dropping the connection closes its socket.
                    _ = registered.evict.notified() => {}
                }
            }
            drop(registered);
        });
    }
}

/// Takes every connection waiting in `listener`'s backlog (at most [`LISTEN_BACKLOG`], its
/// depth) and closes the listener.
fn accept_backlog(listener: TcpListener) -> Vec<(tokio::net::TcpStream, std::net::SocketAddr)> {
    let mut taken = Vec::new();
    // Non-blocking, as tokio leaves it: `accept` says `WouldBlock` once the backlog is empty.
    let Ok(listener) = listener.into_std() else {
        return taken;
    };
    while taken.len() < LISTEN_BACKLOG as usize {
        let Ok((stream, peer)) = listener.accept() else {
            // Empty, or out of descriptors: what is left is reset with the listener.
            break;
        };
        if stream.set_nonblocking(true).is_ok()
            && let Ok(stream) = tokio::net::TcpStream::from_std(stream)
        {
            taken.push((stream, peer));
        }
    }
    taken
}
fn is_per_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Which endpoint a request path names (before the method is checked).
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    /// `/healthz`.
    Healthz,
    /// `/metrics`.
    Metrics,
    /// `/hooks/{token}`.
    Hook(&'a str),
    /// `/git/{project}`.
    Git(&'a str),
    /// `/api/projects`.
    Projects,
    /// `/api/projects/{project}/…`.
    Project(&'a str, ProjectPart<'a>),
    /// `/api/builds/{uuid}…`.
    Build(&'a str, BuildPart),
    /// (v2) `GET /api/notifications`.
    Notifications,
    /// (v2) `POST /api/notifications/test`.
    NotificationsTest,
    /// Anything under `/ui` (the status pages route inside `ui`).
    Ui,
    /// (v2) `/badge/{project}.svg`.
    Badge(&'a str),
}

/// What under `/api/projects/{project}` a path names.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum ProjectPart<'a> {
    /// `…/hooks`: list (GET) or create (POST).
    Hooks,
    /// `…/hooks/{id}`: delete.
    Hook(&'a str),
    /// `…/hooks/{id}/rotate`.
    HookRotate(&'a str),
    /// `…/builds`: list (GET) or trigger (POST).
    Builds,
}

/// What under `/api/builds/{uuid}` a path names.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum BuildPart {
    /// The build itself.
    Show,
    /// `…/logs`.
    Logs,
    /// `…/cancel`.
    Cancel,
    /// (v2) `…/redeploy`.
    Redeploy,
    /// (v2) `…/wait`.
    Wait,
}

impl ProjectPart<'_> {
    /// The scope a token needs for `method` here: changing hooks is `admin`, a trigger
    /// `trigger`, anything else `read`.
    fn scope(self, method: &Method) -> Scope {
        match self {
            ProjectPart::Hooks | ProjectPart::HookRotate(_) if method == Method::POST => {
                Scope::Admin
            }
            ProjectPart::Hook(_) if method == Method::DELETE => Scope::Admin,
            ProjectPart::Builds if method == Method::POST => Scope::Trigger,
            _ => Scope::Read,
        }
    }

    fn allow(self) -> &'static str {
        match self {
            ProjectPart::Hooks | ProjectPart::Builds => "GET, POST",
            ProjectPart::Hook(_) => "DELETE",
            ProjectPart::HookRotate(_) => "POST",
        }
    }

    fn template(self) -> &'static str {
        match self {
            ProjectPart::Hooks => "/api/projects/{project}/hooks",
            ProjectPart::Hook(_) => "/api/projects/{project}/hooks/{id}",
            ProjectPart::HookRotate(_) => "/api/projects/{project}/hooks/{id}/rotate",
            ProjectPart::Builds => "/api/projects/{project}/builds",
        }
    }
}

impl BuildPart {
    /// A cancel or a redeploy is a `trigger`; reading is `read`.
    fn scope(self, method: &Method) -> Scope {
        match self {
            BuildPart::Cancel | BuildPart::Redeploy if method == Method::POST => Scope::Trigger,
            _ => Scope::Read,
        }
    }

    fn allow(self) -> &'static str {
        match self {
            BuildPart::Show | BuildPart::Logs | BuildPart::Wait => "GET",
            BuildPart::Cancel | BuildPart::Redeploy => "POST",
        }
    }

    fn template(self) -> &'static str {
        match self {
            BuildPart::Show => "/api/builds/{uuid}",
            BuildPart::Logs => "/api/builds/{uuid}/logs",
            BuildPart::Cancel => "/api/builds/{uuid}/cancel",
            BuildPart::Redeploy => "/api/builds/{uuid}/redeploy",
            BuildPart::Wait => "/api/builds/{uuid}/wait",
        }
    }
}

impl Route<'_> {
    fn parse(path: &str) -> Option<Route<'_>> {
        if path == "/ui" || path.starts_with("/ui/") {
            return Some(Route::Ui);
        }
        let rest = path.strip_prefix('/')?;
        // No route has more than six segments: split into a fixed array, not a `Vec`
        // (this runs for every request).
        let mut buf = [""; 7];
        let mut n = 0;
        for seg in rest.split('/') {
            if seg.is_empty() || n == buf.len() {
                return None;
            }
            buf[n] = seg;
            n += 1;
        }
        Some(match &buf[..n] {
            ["healthz"] => Route::Healthz,
            ["metrics"] => Route::Metrics,
            ["hooks", t] => Route::Hook(t),
            ["git", p] => Route::Git(p),
            ["api", "projects"] => Route::Projects,
            ["api", "projects", p, rest @ ..] => Route::Project(
                p,
                match rest {
                    ["hooks"] => ProjectPart::Hooks,
                    ["hooks", id] => ProjectPart::Hook(id),
                    ["hooks", id, "rotate"] => ProjectPart::HookRotate(id),
                    ["builds"] => ProjectPart::Builds,
                    _ => return None,
                },
            ),
            ["api", "builds", id, rest @ ..] => Route::Build(
                id,
                match rest {
                    [] => BuildPart::Show,
                    ["logs"] => BuildPart::Logs,
                    ["cancel"] => BuildPart::Cancel,
                    ["redeploy"] => BuildPart::Redeploy,
                    ["wait"] => BuildPart::Wait,
                    _ => return None,
                },
            ),
            ["api", "notifications"] => Route::Notifications,
            ["api", "notifications", "test"] => Route::NotificationsTest,
            ["badge", file] => Route::Badge(file.strip_suffix(".svg")?),
            _ => return None,
        })
    }

    /// The methods the endpoint answers (the `Allow` header of a 405).
    fn allow(&self) -> &'static str {
        match self {
            Route::Healthz
            | Route::Metrics
            | Route::Projects
            | Route::Notifications
            | Route::Badge(_) => "GET",
            Route::Hook(_) | Route::Git(_) | Route::NotificationsTest => "POST",
            Route::Ui => "GET, POST",
            Route::Project(_, part) => part.allow(),
            Route::Build(_, part) => part.allow(),
        }
    }

    /// Whether an API token is always required (`/metrics` depends on the config).
    fn is_admin(&self) -> bool {
        !matches!(
            self,
            Route::Healthz
                | Route::Metrics
                | Route::Hook(_)
                | Route::Git(_)
                | Route::Ui
                | Route::Badge(_)
        )
    }

    /// The scope a token needs for this request (SPEC §4.2 (v2)), and what it is about.
    /// `GET`s are `read`; triggers and cancels `trigger`; hook management and `/metrics`
    /// `admin`. A method the route does not answer needs only `read`, so that any valid
    /// token learns the 405.
    fn needs(&self, method: &Method) -> (Scope, About<'_>) {
        match self {
            Route::Metrics => (Scope::Admin, About::Everything),
            Route::Projects => (Scope::Read, About::Filtered),
            Route::Project(p, part) => (part.scope(method), About::Project(p)),
            Route::Build(id, part) => (part.scope(method), About::Build(id)),
            // (v2) Test sends are admin-only and about no one project: a token limited to
            // projects is refused (SPEC §4.2). The listing shows the token's projects only.
            Route::NotificationsTest if method == Method::POST => (Scope::Admin, About::Everything),
            Route::Notifications | Route::NotificationsTest => (Scope::Read, About::Filtered),
            // Not token-checked (see `is_admin`; the pages check their sessions and the badge
            // its token itself); listed for completeness.
            Route::Healthz | Route::Hook(_) | Route::Git(_) | Route::Ui | Route::Badge(_) => {
                (Scope::Read, About::Filtered)
            }
        }
    }

    /// The route's template, for logs and the `route` label of metrics: never the path
    /// itself, which may hold a hook token and would make the label set unbounded.
    fn template(&self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Metrics => "/metrics",
            Route::Hook(_) => "/hooks/{token}",
            Route::Git(_) => "/git/{project}",
            Route::Projects => "/api/projects",
            Route::Project(_, part) => part.template(),
            Route::Build(_, part) => part.template(),
            Route::Notifications => "/api/notifications",
            Route::NotificationsTest => "/api/notifications/test",
            Route::Ui => "/ui",
            Route::Badge(_) => "/badge/{project}.svg",
        }
    }

    /// The trigger source of a trigger request (a POST to a trigger endpoint, or a GET of a
    /// hook), else `None`.
    fn trigger_source(&self, method: &Method) -> Option<TriggerSource> {
        if let Route::Hook(_) = self
            && method == Method::GET
        {
            return Some(TriggerSource::DeployHook);
        }
        if method != Method::POST {
            return None;
        }
        match self {
            Route::Hook(_) => Some(TriggerSource::DeployHook),
            Route::Git(_) => Some(TriggerSource::GitPush),
            Route::Project(_, ProjectPart::Builds) | Route::Build(_, BuildPart::Redeploy) => {
                Some(TriggerSource::Api)
            }
            _ => None,
        }
    }

    /// The project named in the path, if any (unvalidated: for logs only, clipped).
    fn project(&self) -> Option<String> {
        match self {
            Route::Git(p) | Route::Project(p, ProjectPart::Builds) => {
                Some(crate::model::clip(p, 64))
            }
            _ => None,
        }
    }
}

/// What a request is about, for a token's project list.
#[derive(Debug, PartialEq, Eq)]
enum About<'a> {
    /// This project (named in the path).
    Project(&'a str),
    /// The project of this build (looked up when the token is limited).
    Build(&'a str),
    /// Not one project: a limited token is refused.
    Everything,
    /// Any token may ask; the answer shows only its projects.
    Filtered,
}

/// Template of requests whose path names no endpoint.
const OTHER_ROUTE: &str = "other";

async fn handle(
    mut req: Request<Incoming>,
    state: Arc<AppState>,
    activity: Arc<conn::Activity>,
) -> Response<Body> {
    // Counts the connection as busy until the response body is dropped (streams included).
    let in_flight = activity.begin();
    req.extensions_mut().insert(BodyDeadline(
        tokio::time::Instant::now() + state.tunables.body_read_timeout,
    ));
    // A clone of the URI shares its bytes (no copy of the path per request).
    let uri = req.uri().clone();
    let method = req.method().clone();
    let route = Route::parse(uri.path());
    let name = route.as_ref().map_or(OTHER_ROUTE, Route::template);
    let trigger = route
        .as_ref()
        .and_then(|r| Some((r.trigger_source(&method)?, r.project())));
    // Framing and Host are checked first: such a request is refused whatever it asks for.
    let result = if activity.has_ambiguous_framing() {
        Err(ApiError::BadRequest(
            "a request must not have both Content-Length and Transfer-Encoding".into(),
        ))
    } else if let Some(problem) = host_problem(&req) {
        Err(ApiError::BadRequest(problem.into()))
    } else {
        match route {
            None => Err(ApiError::NotFound("no such endpoint".into())),
            Some(route) => dispatch(route, req, &state).await,
        }
    };
    if let Some((source, project)) = &trigger {
        note_trigger(&state, *source, project.as_deref(), &result);
    }
    let mut response = match result {
        Ok(r) => r,
        Err(e) => {
            let status = e.status();
            if status.is_server_error() {
                tracing::error!(route = name, method = %method, status = status.as_u16(), "request failed: {e}");
            } else if trigger.is_none() {
                tracing::debug!(route = name, method = %method, status = status.as_u16(), "request refused: {e}");
            }
            envelope::error(&e)
        }
    };
    state
        .metrics
        .count_request(name, response.status().as_u16());
    if activity.must_close() {
        // After a chunked body the connection is not tracked any more (see `conn`).
        response
            .headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    response.map(|body| {
        GuardedBody {
            body,
            _in_flight: in_flight,
        }
        .boxed()
    })
}

/// What is wrong with a request's `Host` header, if anything: RFC 9112 §3.2 wants 400 for an
/// HTTP/1.1 request without one, and for any request with two or with an invalid value.
/// HTTP/1.0 predates `Host`, so its absence is fine there.
fn host_problem<B>(req: &Request<B>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return (req.version() >= http::Version::HTTP_11)
            .then_some("an HTTP/1.1 request must have a Host header");
    };
    if hosts.next().is_some() {
        return Some("a request must not have more than one Host header");
    }
    // Empty is allowed (a target without an authority); anything else must be host[:port].
    let valid = host.is_empty()
        || http::uri::Authority::try_from(host.as_bytes()).is_ok_and(|a| !a.as_str().contains('@'));
    (!valid).then_some("the Host header is not a valid host[:port]")
}

/// Counts a trigger request and logs its one line: what became of it, and for an answered
/// trigger the build it created or joined. Git events that trigger nothing (ping, ignored
/// pushes: no [`TriggerAnswer`]) are not triggers and are not counted.
fn note_trigger(
    state: &AppState,
    source: TriggerSource,
    project: Option<&str>,
    result: &Result<Response<Body>, ApiError>,
) {
    match result {
        Ok(r) => {
            // Joins are logged by the queue, once per build (the first, then a count when the
            // build leaves the queue), so a hammered hook cannot flood the journal.
            let more = r
                .extensions()
                .get::<envelope::MoreTriggerAnswers>()
                .map_or(&[][..], |m| m.0.as_slice());
            for a in r
                .extensions()
                .get::<TriggerAnswer>()
                .into_iter()
                .chain(more)
            {
                let outcome = if a.already_exists {
                    TriggerResult::Deduplicated
                } else {
                    TriggerResult::Created
                };
                state.metrics.count_trigger(source, outcome);
                // New builds are bounded by the rate limits, so each gets its line.
                if let Some((project, branch)) = &a.created {
                    tracing::info!(
                        source = %source.as_str(),
                        result = %outcome.as_str(),
                        project = %project,
                        branch = %branch,
                        build = %a.build,
                        already_exists = false,
                        "trigger"
                    );
                }
            }
        }
        // A GET of a hook that does not fire on GET (a link preview, a scanner) was never a
        // trigger: neither counted nor logged here.
        Err(ApiError::MethodNotAllowed(_)) => {}
        Err(e) => {
            // By status: whatever the limit that refused it, a 429 is rate_limited.
            let outcome = if e.status() == http::StatusCode::TOO_MANY_REQUESTS {
                TriggerResult::RateLimited
            } else {
                TriggerResult::Rejected
            };
            state.metrics.count_trigger(source, outcome);
            // Unknown tokens and projects, and API calls without the admin token, are what
            // scanners produce: counted, but logged only at debug. Every other refusal (a bad
            // Git signature on a configured project, a limit, a wrong branch) is something an
            // operator may need to see, but a client can repeat it at request rate: the first
            // of each kind per minute is written, the rest are counted into the next one.
            let status = e.status().as_u16();
            if e.status() == http::StatusCode::NOT_FOUND || matches!(e, ApiError::Unauthorized) {
                tracing::debug!(
                    source = %source.as_str(),
                    result = %outcome.as_str(),
                    project,
                    status,
                    "trigger refused: {e}"
                );
            } else {
                let kind = format!("{} {status} {}", source.as_str(), project.unwrap_or("-"));
                if let Some(left_out) = state.quiet_log.admit(&kind, std::time::Instant::now()) {
                    tracing::info!(
                        source = %source.as_str(),
                        result = %outcome.as_str(),
                        project,
                        status,
                        left_out,
                        "trigger refused: {e}{}",
                        if left_out > 0 {
                            format!(" (and {left_out} more like it in the last minute)")
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
    }
}

/// A response body that keeps its connection counted as busy until it is dropped.
struct GuardedBody {
    body: Body,
    _in_flight: conn::InFlight,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

async fn dispatch(
    route: Route<'_>,
    req: Request<Incoming>,
    state: &Arc<AppState>,
) -> Result<Response<Body>, ApiError> {
    let mut grant = Grant::admin();
    if route.is_admin() || (route == Route::Metrics && !state.config.get().metrics.public) {
        grant = authorize(&req, state).await?;
        check_scope(state, &route, req.method(), &grant)?;
    }
    let m = req.method().clone();
    let get = m == Method::GET || m == Method::HEAD;
    use {BuildPart as B, ProjectPart as P};
    match (route, m) {
        (Route::Healthz, _) if get => public::healthz(state),
        (Route::Metrics, _) if get => public::metrics(state),
        (Route::Hook(token), Method::POST) => public::fire_hook(state, token, req).await,
        (Route::Hook(token), Method::GET) => public::fire_hook(state, token, req).await,
        (Route::Hook(token), _) => Err(public::hook_methods(state, token)),
        (Route::Git(project), Method::POST) => public::git_push(state, project, req).await,
        (Route::Projects, _) if get => api::projects(state, &grant),
        (Route::Project(p, P::Hooks), Method::POST) => api::create_hook(state, p, req).await,
        (Route::Project(p, P::Hooks), _) if get => api::list_hooks(state, p),
        (Route::Project(p, P::Hook(id)), Method::DELETE) => api::delete_hook(state, p, id).await,
        (Route::Project(p, P::HookRotate(id)), Method::POST) => {
            api::rotate_hook(state, p, id).await
        }
        (Route::Project(p, P::Builds), Method::POST) => api::trigger_build(state, p, req).await,
        (Route::Project(p, P::Builds), _) if get => api::list_builds(state, p, req.uri().query()),
        (Route::Build(id, B::Show), _) if get => api::get_build(state, id),
        (Route::Build(id, B::Logs), _) if get => {
            api::build_logs(state, id, req.uri().query()).await
        }
        (Route::Build(id, B::Cancel), Method::POST) => api::cancel_build(state, id).await,
        (Route::Build(id, B::Redeploy), Method::POST) => {
            api::redeploy_build(state, id, req.uri().query()).await
        }
        (Route::Build(id, B::Wait), _) if get => {
            api::wait_build(state, id, req.uri().query()).await
        }
        (Route::Notifications, _) if get => outbox_api::list(state, &grant, req.uri().query()),
        (Route::NotificationsTest, Method::POST) => outbox_api::test(state, req).await,
        (Route::Ui, _) => Ok(crate::ui::handle(state, req).await),
        (Route::Badge(p), _) if get => crate::ui::badge(state, p, &req).await,
        (route, _) => Err(ApiError::MethodNotAllowed(route.allow())),
    }
}

/// The grant of the request's bearer token; 401 without one in force.
async fn authorize(req: &Request<Incoming>, state: &AppState) -> Result<Grant, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| access::bearer(v.as_bytes()))
        .ok_or(ApiError::Unauthorized)?;
    state
        .authenticate(presented)
        .await
        .ok_or(ApiError::Unauthorized)
}

/// 403 (code 1403) unless `grant` covers the request (SPEC §4.2 (v2)). A build's project is
/// looked up only for a project-limited token; an unknown build is left to the handler's 404.
fn check_scope(
    state: &AppState,
    route: &Route<'_>,
    method: &Method,
    grant: &Grant,
) -> Result<(), ApiError> {
    let (needs, about) = route.needs(method);
    let denied = |d: access::Denied| ApiError::Forbidden(d.to_string());
    match about {
        About::Project(p) => grant.require(needs, Some(p)).map_err(denied),
        About::Everything => grant.require(needs, None).map_err(denied),
        About::Filtered => grant.require_scope(needs).map_err(denied),
        About::Build(id) => {
            let project = match (&grant.projects, crate::model::BuildId::parse(id)) {
                (Some(_), Some(id)) => state.store.build(id)?.map(|b| b.project),
                _ => None,
            };
            match project {
                Some(p) => grant.require(needs, Some(&p)).map_err(denied),
                // Unlimited token, or no such build: the scope alone decides here.
                None => grant.require_scope(needs).map_err(denied),
            }
        }
    }
}

/// When the body of a request must have arrived: set by `handle` as the head arrives, from
/// [`Tunables::body_read_timeout`] (a request extension, so that handlers need not pass it).
#[derive(Debug, Clone, Copy)]
struct BodyDeadline(tokio::time::Instant);

/// Reads a request body of at most `max` bytes: refused from `Content-Length` before reading
/// when it says more, cut off while reading otherwise, and bounded in time (by the request's
/// [`BodyDeadline`], else [`BODY_READ_TIMEOUT`] from now).
pub async fn read_body(req: Request<Incoming>, max: u64) -> Result<Bytes, ApiError> {
    collect_body(req, max, None, false).await.map(|(b, _)| b)
}

/// Like [`read_body`], for bodies read before the request is authenticated (Git webhooks
/// must hash the body to check its signature): every byte held counts against `budget`,
/// shared by all such requests, and a request that would exceed it gets 503 instead of
/// memory. The returned permit keeps the bytes counted until it is dropped.
///
/// A body over `max` is read on and discarded, up to `2 × max` bytes in all, before the 413
/// is answered: Git hosts write the whole body before they read the answer, and would
/// otherwise see a broken connection instead of the 413 (SPEC §4.1). A body longer still (or
/// declared longer) is cut off at once and its connection closed, so an endless body costs
/// at most `2 × max` bytes of reading.
pub async fn read_body_budgeted_draining(
    req: Request<Incoming>,
    max: u64,
    budget: &Arc<tokio::sync::Semaphore>,
) -> Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), ApiError> {
    collect_body(req, max, Some(budget), true).await
}

/// Reads and discards the rest of `body` until it ends or `read` (bytes so far) passes
/// `limit`, within the body deadline; whatever happens, the caller answers 413.
async fn discard_body(
    body: &mut Incoming,
    mut read: u64,
    limit: u64,
    deadline: tokio::time::Instant,
) {
    while read <= limit {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Ok(data) = f.into_data() {
                    read = read.saturating_add(data.len() as u64);
                }
            }
            // The end, a broken body, or the deadline: nothing more to read.
            _ => return,
        }
    }
}

/// Budget units are KiB (rounded up), so a permit count never overflows.
fn kib(n: u64) -> u32 {
    u32::try_from(n.div_ceil(1024)).unwrap_or(u32::MAX)
}

async fn collect_body(
    req: Request<Incoming>,
    max: u64,
    budget: Option<&Arc<tokio::sync::Semaphore>>,
    drain: bool,
) -> Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), ApiError> {
    let drain_limit = if drain { max.saturating_mul(2) } else { 0 };
    let declared = match req.headers().get(header::CONTENT_LENGTH) {
        None => None,
        Some(len) => Some(
            len.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::BadRequest("invalid Content-Length".into()))?,
        ),
    };
    if let Some(len) = declared.filter(|len| *len > max) {
        if len <= drain_limit {
            let mut body = req.into_body();
            let deadline = tokio::time::Instant::now() + BODY_READ_TIMEOUT;
            discard_body(&mut body, 0, drain_limit, deadline).await;
        }
        return Err(ApiError::PayloadTooLarge(max));
    }
    let mut permit: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut take = |bytes: u64| -> Result<(), ApiError> {
        let Some(budget) = budget else { return Ok(()) };
        let p = budget
            .clone()
            .try_acquire_many_owned(kib(bytes))
            .map_err(|_| {
                ApiError::Busy(
                    "too many large request bodies are arriving at once; retry shortly".into(),
                )
            })?;
        match &mut permit {
            Some(held) => held.merge(p),
            None => permit = Some(p),
        }
        Ok(())
    };
    if let Some(len) = declared {
        take(len)?;
    }
    let deadline = req
        .extensions()
        .get::<BodyDeadline>()
        .map_or_else(|| tokio::time::Instant::now() + BODY_READ_TIMEOUT, |d| d.0);
    let mut body = req.into_body();
    // A body that came in one frame is returned as it is (no copy); more are joined in `buf`.
    let mut first: Option<Bytes> = None;
    let mut buf = Vec::new();
    loop {
        // What has already arrived (usually the whole body, with its head) is taken without
        // arming a timer; only a body still on its way waits under the deadline.
        let ready = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(http_body::Body::poll_frame(
                std::pin::Pin::new(&mut body),
                cx,
            ))
        })
        .await;
        let next = match ready {
            std::task::Poll::Ready(next) => Ok(next),
            std::task::Poll::Pending => tokio::time::timeout_at(deadline, body.frame()).await,
        };
        let frame = match next {
            Err(_) => return Err(ApiError::RequestTimeout),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::BadRequest(format!(
                    "cannot read the request body: {e}"
                )));
            }
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            if let Some(f) = first.take() {
                buf.extend_from_slice(&f);
            }
            let held = buf.len();
            if (held + data.len()) as u64 > max {
                if drain {
                    let read = (held + data.len()) as u64;
                    // The bytes held so far are not needed any more.
                    drop(std::mem::take(&mut buf));
                    discard_body(&mut body, read, drain_limit, deadline).await;
                }
                return Err(ApiError::PayloadTooLarge(max));
            }
            if declared.is_none() {
                take(data.len() as u64)?;
            }
            if held == 0 {
                first = Some(data);
            } else {
                buf.extend_from_slice(&data);
            }
        }
    }
    let body = first.unwrap_or_else(|| Bytes::from(buf));
    Ok((body, permit))
}

/// Parses `a=1&b=2` without percent-decoding (no value these parameters take needs it;
/// trigger parameters are decoded properly by [`crate::params`]).
pub fn query_pairs(q: Option<&str>) -> Vec<(&str, &str)> {
    q.unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_paths_name_no_route() {
        for path in [
            "/hooks/",
            "/hooks//x",
            "/api/projects/",
            "healthz",
            "/nope",
            "/ui2",
        ] {
            assert_eq!(Route::parse(path), None, "{path}");
        }
    }

    #[test]
    fn every_template_parses_back_to_its_route() {
        let table = [
            ("/healthz", Route::Healthz),
            ("/metrics", Route::Metrics),
            ("/hooks/t", Route::Hook("t")),
            ("/git/p", Route::Git("p")),
            ("/api/projects", Route::Projects),
            (
                "/api/projects/p/hooks",
                Route::Project("p", ProjectPart::Hooks),
            ),
            (
                "/api/projects/p/hooks/i",
                Route::Project("p", ProjectPart::Hook("i")),
            ),
            (
                "/api/projects/p/hooks/i/rotate",
                Route::Project("p", ProjectPart::HookRotate("i")),
            ),
            (
                "/api/projects/p/builds",
                Route::Project("p", ProjectPart::Builds),
            ),
            ("/api/builds/u", Route::Build("u", BuildPart::Show)),
            ("/api/builds/u/logs", Route::Build("u", BuildPart::Logs)),
            ("/api/builds/u/cancel", Route::Build("u", BuildPart::Cancel)),
            (
                "/api/builds/u/redeploy",
                Route::Build("u", BuildPart::Redeploy),
            ),
            ("/api/builds/u/wait", Route::Build("u", BuildPart::Wait)),
            ("/api/notifications", Route::Notifications),
            ("/api/notifications/test", Route::NotificationsTest),
            ("/ui", Route::Ui),
            ("/badge/p.svg", Route::Badge("p")),
        ];
        for (path, route) in table {
            let template = route.template();
            assert_eq!(Route::parse(path), Some(route), "{path}");
            // The template is the path with its names in braces.
            let filled = template
                .replace("{token}", "t")
                .replace("{project}", "p")
                .replace("{id}", "i")
                .replace("{uuid}", "u");
            assert_eq!(filled, path, "{template}");
        }
        for path in [
            "/api/projects/p",
            "/api/projects/p/nope",
            "/api/projects/p/hooks/i/nope",
            "/api/builds/u/nope",
            "/api/builds/u/logs/x",
            "/badge/p.png",
        ] {
            assert_eq!(Route::parse(path), None, "{path}");
        }
    }

    #[test]
    fn admin_routes_are_the_api_ones() {
        assert!(!Route::Healthz.is_admin());
        assert!(!Route::Hook("x").is_admin());
        assert!(!Route::Git("x").is_admin());
        assert!(Route::Projects.is_admin());
        assert!(Route::Build("x", BuildPart::Cancel).is_admin());
        assert!(!Route::Metrics.is_admin());
    }

    #[test]
    fn route_templates_never_hold_the_path() {
        let r = Route::parse("/hooks/dh_secret").unwrap();
        assert_eq!(r.template(), "/hooks/{token}");
        assert_eq!(
            r.trigger_source(&Method::POST),
            Some(TriggerSource::DeployHook)
        );
        // A GET of a hook is a trigger too (hooks created with allow_get).
        assert_eq!(
            r.trigger_source(&Method::GET),
            Some(TriggerSource::DeployHook)
        );
        assert_eq!(r.trigger_source(&Method::PUT), None);
        let r = Route::parse("/api/projects/site/builds").unwrap();
        assert_eq!(r.template(), "/api/projects/{project}/builds");
        assert_eq!(r.trigger_source(&Method::POST), Some(TriggerSource::Api));
        assert_eq!(Route::Projects.trigger_source(&Method::POST), None);
    }

    #[test]
    fn every_api_route_needs_its_scope() {
        use Method as M;
        let table = [
            ("/api/projects", M::GET, Scope::Read),
            ("/api/projects/p/hooks", M::GET, Scope::Read),
            ("/api/projects/p/hooks", M::POST, Scope::Admin),
            ("/api/projects/p/hooks/i", M::DELETE, Scope::Admin),
            ("/api/projects/p/hooks/i/rotate", M::POST, Scope::Admin),
            ("/api/projects/p/builds", M::GET, Scope::Read),
            ("/api/projects/p/builds", M::POST, Scope::Trigger),
            ("/api/builds/u", M::GET, Scope::Read),
            ("/api/builds/u/logs", M::GET, Scope::Read),
            ("/api/builds/u/cancel", M::POST, Scope::Trigger),
            ("/api/builds/u/redeploy", M::POST, Scope::Trigger),
            ("/api/builds/u/wait", M::GET, Scope::Read),
            ("/api/notifications", M::GET, Scope::Read),
            ("/api/notifications/test", M::POST, Scope::Admin),
            ("/metrics", M::GET, Scope::Admin),
            // A method the route does not answer needs only `read` (to learn the 405).
            ("/api/projects/p/hooks/i", M::PUT, Scope::Read),
        ];
        for (path, method, scope) in table {
            let route = Route::parse(path).unwrap();
            assert_eq!(route.needs(&method).0, scope, "{method} {path}");
        }
        let about = |path| Route::parse(path).map(|r| format!("{:?}", r.needs(&M::POST).1));
        assert_eq!(about("/metrics").as_deref(), Some("Everything"));
        assert_eq!(
            about("/api/projects/p/builds").as_deref(),
            Some("Project(\"p\")")
        );
        assert_eq!(
            about("/api/builds/u/cancel").as_deref(),
            Some("Build(\"u\")")
        );
        assert_eq!(
            about("/api/notifications/test").as_deref(),
            Some("Everything")
        );
    }

    #[test]
    fn the_connection_cap_stays_below_the_free_descriptors() {
        // issue 12: max(nofile - 256, 64) was 64 at nofile 64, above the ~44 free.
        for nofile in [64, 100, 256, 400, 1024, 4096, 65536, 1 << 20] {
            for open in [10, 20, 40] {
                for builds in [1, 2, 8, 64] {
                    let cap = connection_cap(nofile, open, builds) as u64;
                    let free = nofile - open;
                    assert!(cap >= 1);
                    assert!(
                        cap <= free / 2 || cap + 32 + 12 * builds as u64 <= free,
                        "nofile {nofile}, open {open}, builds {builds}: cap {cap}"
                    );
                }
            }
        }
        assert_eq!(connection_cap(64, 20, 2), 22);
        assert_eq!(connection_cap(1024, 20, 2), 1024 - 20 - 56);
        assert_eq!(connection_cap(1 << 20, 20, 2), MAX_CONNECTIONS);
        assert_eq!(connection_cap(10, 20, 2), 1, "never zero");
    }

    #[test]
    fn queries_split() {
        assert_eq!(
            query_pairs(Some("a=1&b=&c")),
            vec![("a", "1"), ("b", ""), ("c", "")]
        );
        assert!(query_pairs(None).is_empty());
    }
}
