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
//! headers and a bounded header buffer (431 past it), bare-LF request heads refused
//! ([`conn::StrictIo`]), a body size limit checked against `Content-Length` before anything is
//! read and enforced while reading chunked bodies (413), a deadline for the whole body (408),
//! a shared memory budget for bodies read before their request is authenticated (503 past
//! it), and accept errors (EMFILE) that back off instead of spinning.
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

use crate::config::SharedConfig;
use crate::metrics::{Metrics, TriggerResult};
use crate::model::TriggerSource;
use crate::queue::Queue;
use crate::shutdown::ShutdownWatch;
use crate::store::Store;
use crate::token::AdminToken;
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
/// Most headers accepted in one request.
pub const MAX_HEADERS: usize = 100;

/// What every handler can reach. Shared as an `Arc`; no globals.
pub struct AppState {
    /// The config in force.
    pub config: Arc<SharedConfig>,
    /// The database.
    pub store: Store,
    /// The build queue.
    pub queue: Queue,
    /// The admin token (replaced on reload).
    pub admin: RwLock<AdminToken>,
    /// Set at SIGTERM: health and triggers answer 503.
    pub shutting_down: AtomicBool,
    /// Most connections open at once.
    pub max_connections: usize,
    /// The address the listener is bound to.
    pub local_addr: std::net::SocketAddr,
    /// Bytes (in KiB) of request bodies that may be held before their request is
    /// authenticated (Git webhooks), all requests together; see [`read_body_budgeted`].
    pub unauthenticated_body_budget: Arc<tokio::sync::Semaphore>,
    /// The metric registry behind `GET /metrics` (shared with the queue).
    pub metrics: Arc<Metrics>,
    /// The HTTP timeouts in force (the production values except in tests).
    pub tunables: Tunables,
    /// Aggregates refusal lines that clients can cause at request rate.
    pub quiet_log: crate::quietlog::Throttle,
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
}

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
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let mut last_accept_warning: Option<tokio::time::Instant> = None;
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    if !is_per_connection_error(&e) {
                        // EMFILE/ENFILE/ENOMEM: back off instead of spinning on the error,
                        // and say so at most once a minute.
                        if last_accept_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                            tracing::warn!("accept failed: {e}; pausing accepts for 100 ms at a time");
                            last_accept_warning = Some(tokio::time::Instant::now());
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            _ = shutdown.draining() => break,
        };
        // At the cap, the oldest connection that is between requests makes room; if every
        // one is in the middle of a request, the newcomer is turned away.
        if registry.len() >= state.max_connections && !registry.evict_oldest_idle() {
            tracing::debug!(
                "all {} connection slots are busy; refusing a connection",
                state.max_connections
            );
            continue;
        }
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(conn::Activity::default());
        let registered = registry.register(activity.clone());
        let st = state.clone();
        let act = activity.clone();
        let connection = builder.serve_connection(
            TokioIo::new(conn::StrictIo::new(stream, activity)),
            service_fn(move |req| {
                let st = st.clone();
                let act = act.clone();
                async move { Ok::<_, Infallible>(handle(req, st, act).await) }
            }),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                // Dropping the connection closes its socket.
                _ = registered.evict.notified() => {}
            }
            drop(registered);
        });
    }
    // New connections are refused from here on.
    drop(listener);
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
    Healthz,
    Metrics,
    Hook(&'a str),
    Git(&'a str),
    Projects,
    ProjectHooks(&'a str),
    ProjectHook(&'a str, &'a str),
    ProjectHookRotate(&'a str, &'a str),
    ProjectBuilds(&'a str),
    Build(&'a str),
    BuildLogs(&'a str),
    BuildCancel(&'a str),
    BuildRedeploy(&'a str),
    BuildWait(&'a str),
}

impl Route<'_> {
    fn parse(path: &str) -> Option<Route<'_>> {
        let rest = path.strip_prefix('/')?;
        let segs: Vec<&str> = rest.split('/').collect();
        if segs.iter().any(|s| s.is_empty()) {
            return None;
        }
        Some(match segs.as_slice() {
            ["healthz"] => Route::Healthz,
            ["metrics"] => Route::Metrics,
            ["hooks", t] => Route::Hook(t),
            ["git", p] => Route::Git(p),
            ["api", "projects"] => Route::Projects,
            ["api", "projects", p, "hooks"] => Route::ProjectHooks(p),
            ["api", "projects", p, "hooks", id] => Route::ProjectHook(p, id),
            ["api", "projects", p, "hooks", id, "rotate"] => Route::ProjectHookRotate(p, id),
            ["api", "projects", p, "builds"] => Route::ProjectBuilds(p),
            ["api", "builds", id] => Route::Build(id),
            ["api", "builds", id, "logs"] => Route::BuildLogs(id),
            ["api", "builds", id, "cancel"] => Route::BuildCancel(id),
            ["api", "builds", id, "redeploy"] => Route::BuildRedeploy(id),
            ["api", "builds", id, "wait"] => Route::BuildWait(id),
            _ => return None,
        })
    }

    /// The methods the endpoint answers (the `Allow` header of a 405).
    fn allow(&self) -> &'static str {
        match self {
            Route::Healthz
            | Route::Metrics
            | Route::Projects
            | Route::Build(_)
            | Route::BuildLogs(_)
            | Route::BuildWait(_) => "GET",
            Route::Hook(_)
            | Route::Git(_)
            | Route::ProjectHookRotate(..)
            | Route::BuildCancel(_)
            | Route::BuildRedeploy(_) => "POST",
            Route::ProjectHooks(_) | Route::ProjectBuilds(_) => "GET, POST",
            Route::ProjectHook(..) => "DELETE",
        }
    }

    /// Whether the admin token is always required (`/metrics` depends on the config).
    fn is_admin(&self) -> bool {
        !matches!(
            self,
            Route::Healthz | Route::Metrics | Route::Hook(_) | Route::Git(_)
        )
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
            Route::ProjectHooks(_) => "/api/projects/{project}/hooks",
            Route::ProjectHook(..) => "/api/projects/{project}/hooks/{id}",
            Route::ProjectHookRotate(..) => "/api/projects/{project}/hooks/{id}/rotate",
            Route::ProjectBuilds(_) => "/api/projects/{project}/builds",
            Route::Build(_) => "/api/builds/{uuid}",
            Route::BuildLogs(_) => "/api/builds/{uuid}/logs",
            Route::BuildCancel(_) => "/api/builds/{uuid}/cancel",
            Route::BuildRedeploy(_) => "/api/builds/{uuid}/redeploy",
            Route::BuildWait(_) => "/api/builds/{uuid}/wait",
        }
    }

    /// The trigger source of a trigger request (a POST to a trigger endpoint), else `None`.
    fn trigger_source(&self, method: &Method) -> Option<TriggerSource> {
        if method != Method::POST {
            return None;
        }
        match self {
            Route::Hook(_) => Some(TriggerSource::DeployHook),
            Route::Git(_) => Some(TriggerSource::GitPush),
            Route::ProjectBuilds(_) | Route::BuildRedeploy(_) => Some(TriggerSource::Api),
            _ => None,
        }
    }

    /// The project named in the path, if any (unvalidated: for logs only, clipped).
    fn project(&self) -> Option<String> {
        match self {
            Route::Git(p) | Route::ProjectBuilds(p) => Some(crate::model::clip(p, 64)),
            _ => None,
        }
    }
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
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let route = Route::parse(&path);
    let name = route.as_ref().map_or(OTHER_ROUTE, Route::template);
    let trigger = route
        .as_ref()
        .and_then(|r| Some((r.trigger_source(&method)?, r.project())));
    let result = match route {
        // Checked first: such a request is refused whatever it asks for.
        _ if activity.has_ambiguous_framing() => Err(ApiError::BadRequest(
            "a request must not have both Content-Length and Transfer-Encoding".into(),
        )),
        None => Err(ApiError::NotFound("no such endpoint".into())),
        Some(route) => dispatch(route, req, &state).await,
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
    if route.is_admin() || (route == Route::Metrics && !state.config.get().metrics.public) {
        authorize(&req, state).await?;
    }
    let m = req.method().clone();
    let get = m == Method::GET || m == Method::HEAD;
    match (route, m) {
        (Route::Healthz, _) if get => public::healthz(state),
        (Route::Metrics, _) if get => public::metrics(state),
        (Route::Hook(token), Method::POST) => public::fire_hook(state, token, req).await,
        (Route::Git(project), Method::POST) => public::git_push(state, project, req).await,
        (Route::Projects, _) if get => api::projects(state),
        (Route::ProjectHooks(p), Method::POST) => api::create_hook(state, p, req).await,
        (Route::ProjectHooks(p), _) if get => api::list_hooks(state, p),
        (Route::ProjectHook(p, id), Method::DELETE) => api::delete_hook(state, p, id).await,
        (Route::ProjectHookRotate(p, id), Method::POST) => api::rotate_hook(state, p, id).await,
        (Route::ProjectBuilds(p), Method::POST) => api::trigger_build(state, p, req).await,
        (Route::ProjectBuilds(p), _) if get => api::list_builds(state, p, req.uri().query()),
        (Route::Build(id), _) if get => api::get_build(state, id),
        (Route::BuildLogs(id), _) if get => api::build_logs(state, id, req.uri().query()).await,
        (Route::BuildCancel(id), Method::POST) => api::cancel_build(state, id).await,
        (Route::BuildRedeploy(id), Method::POST) => {
            api::redeploy_build(state, id, req.uri().query()).await
        }
        (Route::BuildWait(id), _) if get => api::wait_build(state, id, req.uri().query()).await,
        (route, _) => Err(ApiError::MethodNotAllowed(route.allow())),
    }
}

async fn authorize(req: &Request<Incoming>, state: &AppState) -> Result<(), ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|v| &v[7..])
        .ok_or(ApiError::Unauthorized)?;
    if state.admin.read().await.verify(presented.trim_ascii()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
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
pub async fn read_body_budgeted(
    req: Request<Incoming>,
    max: u64,
    budget: &Arc<tokio::sync::Semaphore>,
) -> Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), ApiError> {
    collect_body(req, max, Some(budget), false).await
}

/// Like [`read_body_budgeted`], except that a body over `max` is read on and discarded, up
/// to `2 × max` bytes in all, before the 413 is answered: Git hosts write the whole body
/// before they read the answer, and would otherwise see a broken connection instead of the
/// 413 (SPEC §4.1). A body longer still (or declared longer) is cut off at once and its
/// connection closed, so an endless body costs at most `2 × max` bytes of reading.
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
    let mut buf = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
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
            if (buf.len() + data.len()) as u64 > max {
                if drain {
                    let read = (buf.len() + data.len()) as u64;
                    // The bytes held so far are not needed any more.
                    drop(std::mem::take(&mut buf));
                    discard_body(&mut body, read, drain_limit, deadline).await;
                }
                return Err(ApiError::PayloadTooLarge(max));
            }
            if declared.is_none() {
                take(data.len() as u64)?;
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok((Bytes::from(buf), permit))
}

/// Parses `a=1&b=2` (no percent-decoding: no value this API takes needs it).
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
    fn routes_parse() {
        assert_eq!(Route::parse("/healthz"), Some(Route::Healthz));
        assert_eq!(Route::parse("/metrics"), Some(Route::Metrics));
        assert_eq!(Route::parse("/hooks/dh_x"), Some(Route::Hook("dh_x")));
        assert_eq!(
            Route::parse("/api/projects/site/hooks/abc/rotate"),
            Some(Route::ProjectHookRotate("site", "abc"))
        );
        assert_eq!(
            Route::parse("/api/builds/u/logs"),
            Some(Route::BuildLogs("u"))
        );
        assert_eq!(Route::parse("/hooks/"), None);
        assert_eq!(Route::parse("/hooks//x"), None);
        assert_eq!(Route::parse("/api/projects/"), None);
        assert_eq!(Route::parse("healthz"), None);
        assert_eq!(Route::parse("/nope"), None);
    }

    #[test]
    fn admin_routes_are_the_api_ones() {
        assert!(!Route::Healthz.is_admin());
        assert!(!Route::Hook("x").is_admin());
        assert!(!Route::Git("x").is_admin());
        assert!(Route::Projects.is_admin());
        assert!(Route::BuildCancel("x").is_admin());
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
        assert_eq!(r.trigger_source(&Method::GET), None);
        let r = Route::parse("/api/projects/site/builds").unwrap();
        assert_eq!(r.template(), "/api/projects/{project}/builds");
        assert_eq!(r.trigger_source(&Method::POST), Some(TriggerSource::Api));
        assert_eq!(Route::Projects.trigger_source(&Method::POST), None);
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
