//! The HTTP server: hyper 1.x directly, one listener for everything (SPEC §4).
//!
//! [`serve`] takes an already-bound listener (tests bind port 0) and a [`ShutdownWatch`]. The
//! accept loop and shutdown meet in one `select!`; a semaphore bounds open connections; each
//! connection is watched by hyper-util's `GracefulShutdown`.
//!
//! Hardening that lives here: a header read timeout that really fires (hyper ignores
//! `header_read_timeout` without a timer, so the builder gets `TokioTimer`), at most 100
//! headers and a bounded header buffer (431 past it), a body size limit checked against
//! `Content-Length` before anything is read and enforced while reading chunked bodies (413),
//! a deadline for the whole body (408), and accept errors (EMFILE) that back off instead of
//! spinning.
//!
//! Shutdown has two steps: on SIGTERM the listener closes (new connections are refused) while
//! open connections keep being served — `/healthz` and triggers answer 503 — until the builds
//! have drained; then connections are closed gracefully with a deadline.

pub mod api;
pub mod envelope;
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
use tokio::sync::{RwLock, Semaphore};

use crate::config::SharedConfig;
use crate::queue::Queue;
use crate::shutdown::ShutdownWatch;
use crate::store::{Store, StoreError};
use crate::token::AdminToken;
pub use envelope::{ApiError, Body};

/// How long a client may take to send its request headers (also the idle keep-alive limit).
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
}

impl AppState {
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

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt(m) => ApiError::Internal(m),
            other => ApiError::Storage(other.to_string()),
        }
    }
}

/// Serves HTTP on `listener` until `shutdown` says to close (see the module doc).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    mut shutdown: ShutdownWatch,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(state.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.draining() => break,
        };
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    if !is_per_connection_error(&e) {
                        // EMFILE/ENFILE/ENOMEM: back off instead of spinning on the error.
                        tracing::warn!("accept failed: {e}; pausing accepts for 100 ms");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            _ = shutdown.draining() => break,
        };
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(handle(req, st).await) }
            }),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    // New connections are refused from here on.
    drop(listener);
    shutdown.closing().await;
    if tokio::time::timeout(CLOSE_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "some HTTP connections did not close within {CLOSE_DEADLINE:?}; dropping them"
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
            _ => return None,
        })
    }

    /// The methods the endpoint answers (the `Allow` header of a 405).
    fn allow(&self) -> &'static str {
        match self {
            Route::Healthz | Route::Projects | Route::Build(_) | Route::BuildLogs(_) => "GET",
            Route::Hook(_)
            | Route::Git(_)
            | Route::ProjectHookRotate(..)
            | Route::BuildCancel(_) => "POST",
            Route::ProjectHooks(_) | Route::ProjectBuilds(_) => "GET, POST",
            Route::ProjectHook(..) => "DELETE",
        }
    }

    fn is_admin(&self) -> bool {
        !matches!(self, Route::Healthz | Route::Hook(_) | Route::Git(_))
    }

    /// A name for logs: never the path itself, which may hold a hook token.
    fn name(&self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Hook(_) => "hook",
            Route::Git(_) => "git",
            Route::Projects => "projects",
            Route::ProjectHooks(_) => "project_hooks",
            Route::ProjectHook(..) => "project_hook",
            Route::ProjectHookRotate(..) => "project_hook_rotate",
            Route::ProjectBuilds(_) => "project_builds",
            Route::Build(_) => "build",
            Route::BuildLogs(_) => "build_logs",
            Route::BuildCancel(_) => "build_cancel",
        }
    }
}

async fn handle(req: Request<Incoming>, state: Arc<AppState>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let route = Route::parse(&path);
    let name = route.as_ref().map_or("unknown", Route::name);
    let result = match route {
        None => Err(ApiError::NotFound("no such endpoint".into())),
        Some(route) => dispatch(route, req, &state).await,
    };
    match result {
        Ok(r) => r,
        Err(e) => {
            let status = e.status();
            if status.is_server_error() {
                tracing::error!(route = name, method = %method, status = status.as_u16(), "request failed: {e}");
            } else {
                tracing::debug!(route = name, method = %method, status = status.as_u16(), "request refused: {e}");
            }
            envelope::error(&e)
        }
    }
}

async fn dispatch(
    route: Route<'_>,
    req: Request<Incoming>,
    state: &Arc<AppState>,
) -> Result<Response<Body>, ApiError> {
    if route.is_admin() {
        authorize(&req, state).await?;
    }
    let m = req.method().clone();
    let get = m == Method::GET || m == Method::HEAD;
    match (route, m) {
        (Route::Healthz, _) if get => public::healthz(state),
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
        (route, _) => Err(ApiError::MethodNotAllowed(route.allow())),
    }
}

async fn authorize(req: &Request<Incoming>, state: &AppState) -> Result<(), ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    if state.admin.read().await.verify(presented.trim_ascii()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Reads a request body of at most `max` bytes: refused from `Content-Length` before reading
/// when it says more, cut off while reading otherwise, and bounded in time.
pub async fn read_body(req: Request<Incoming>, max: u64) -> Result<Bytes, ApiError> {
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH) {
        let len = len
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| ApiError::BadRequest("invalid Content-Length".into()))?;
        if len > max {
            return Err(ApiError::PayloadTooLarge(max));
        }
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let body = http_body_util::Limited::new(req.into_body(), limit);
    match tokio::time::timeout(BODY_READ_TIMEOUT, body.collect()).await {
        Err(_) => Err(ApiError::RequestTimeout),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(ApiError::PayloadTooLarge(max))
            } else {
                Err(ApiError::BadRequest(format!(
                    "cannot read the request body: {e}"
                )))
            }
        }
    }
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
