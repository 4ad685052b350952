//! The status pages (SPEC §6) and the badge (SPEC §4.1): routes, sessions, templates.
//!
//! Plain server-rendered HTML, in the spirit of sourcehut's build pages: every page works
//! without JavaScript, and the one script only follows a running build's log, over
//! Server-Sent Events whose `id:` is the line number, so a reconnecting browser resumes
//! after the last line it got (`Last-Event-ID`). The stylesheet and the script are compiled
//! in, served under content-hashed paths with a year of `immutable` caching.
//!
//! Who may do what: a session ([`session`]) has the scope and projects of the API token it was
//! opened with, re-checked against the tokens in force on every request. Without a session,
//! pages redirect to `/ui/login`, unless `[ui] public` makes them readable; actions always need
//! a session and its CSRF token (403 otherwise), and are POSTs that answer with a redirect to
//! the build they created, joined or changed. Every response carries the security headers of
//! [`secure`]: a CSP without inline scripts, `frame-ancestors 'none'`, `nosniff`,
//! `no-referrer`.
//!
//! Builds started here have trigger source `api` (SPEC §2.1).
//!
//! This file routes and gathers data; [`pages`] renders (maud templates, pure), [`text`] turns
//! log lines and times into what pages show (pure), [`session`] keeps sessions, `live` streams
//! a build's log, `badge` draws the badge.

mod badge;
mod live;
pub mod pages;
pub mod session;
pub mod text;

pub use badge::badge;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use maud::Markup;
use sha2::{Digest as _, Sha256};

use crate::access::ApiTokens;
use crate::buildlog;
use crate::http::{ApiError, AppState, Body, query_pairs, read_body};
use crate::metrics::TriggerResult;
use crate::model::{Build, BuildId, Timestamp, Trigger, TriggerSource};
use crate::queue::{CancelError, TriggerRequest};
use crate::store;
use pages::{BuildActions, Chrome, LogLine};
use session::{Access, Sessions, Signed, TokenCheck};

/// The security headers of every page (SPEC §6).
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

const STYLE: &str = include_str!("assets/style.css");
const SCRIPT: &str = include_str!("assets/app.js");
/// Builds shown per page of a project.
const BUILDS_PER_PAGE: usize = 25;
/// Most log lines one build page shows (more are a link away).
const LOG_PAGE_LINES: usize = 5000;
/// About the most log bytes one build page shows.
const LOG_PAGE_BYTES: usize = 2 * 1024 * 1024;
/// Largest form body accepted (a token, a CSRF token, a branch name).
const MAX_FORM_BYTES: u64 = 16 * 1024;

/// The state of the pages: sessions and the asset paths.
pub struct Ui {
    /// Open sessions.
    pub sessions: Sessions,
    /// `/ui/assets/style.<hash>.css`.
    css_path: String,
    /// `/ui/assets/app.<hash>.js`.
    js_path: String,
}

/// The first 16 hex digits of the SHA-256 of `content`: changes whenever the asset does.
fn content_hash(content: &str) -> String {
    crate::token::hex(&Sha256::digest(content.as_bytes())[..8])
}

impl Default for Ui {
    fn default() -> Self {
        Ui {
            sessions: Sessions::default(),
            css_path: format!("/ui/assets/style.{}.css", content_hash(STYLE)),
            js_path: format!("/ui/assets/app.{}.js", content_hash(SCRIPT)),
        }
    }
}

/// The API tokens in force (`[api]` and `[api.tokens.*]`), as the sessions see them.
struct TokensInForce(ApiTokens);

impl TokenCheck for TokensInForce {
    fn access(&self, digest: &[u8; 32]) -> Option<Access> {
        self.0.grant_of_digest(digest).map(Access::from)
    }
}

/// Snapshot of the tokens in force (taken on every request, so a reload applies at once).
async fn tokens(state: &AppState) -> TokensInForce {
    TokensInForce(state.tokens.read().await.clone())
}

/// An error shown as a page.
#[derive(Debug)]
struct PageError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl PageError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        PageError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "There is no such page.")
    }

    fn forbidden(message: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        let retry_after = match &e {
            ApiError::RateLimited {
                retry_after_secs, ..
            } => Some((*retry_after_secs).max(1)),
            _ => None,
        };
        PageError {
            status: e.status(),
            message: e.to_string(),
            retry_after,
        }
    }
}

impl From<store::StoreError> for PageError {
    fn from(e: store::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

type PageResult = Result<Response<Body>, PageError>;

/// Who is asking.
struct Viewer {
    /// The session and its id, if signed in.
    signed: Option<(String, Signed)>,
    /// `[ui] public`.
    public: bool,
}

impl Viewer {
    fn can_read(&self, project: &str) -> bool {
        match &self.signed {
            Some((_, s)) => s.access.can_read(project),
            None => self.public,
        }
    }

    /// Whether anything at all may be read (else: to the login page).
    fn may_look(&self) -> bool {
        self.signed.is_some() || self.public
    }

    /// The CSRF token to put in forms acting on `project`, if the viewer may act on it.
    fn act_csrf(&self, project: &str) -> Option<&str> {
        let (_, s) = self.signed.as_ref()?;
        s.access.can_act(project).then_some(s.csrf.as_str())
    }
}

fn chrome<'a>(ui: &'a Ui, viewer: &'a Viewer) -> Chrome<'a> {
    Chrome {
        css: &ui.css_path,
        js: &ui.js_path,
        signed: viewer
            .signed
            .as_ref()
            .map(|(_, s)| (s.access.scope.as_str(), s.csrf.as_str())),
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn html(status: StatusCode, markup: Markup) -> Response<Body> {
    let mut r = Response::new(full(markup.into_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Pages hold CSRF tokens and change with every build: never cached.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn redirect(to: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Adds the headers every response under `/ui` carries.
pub fn secure(mut r: Response<Body>) -> Response<Body> {
    set_headers(
        r.headers_mut(),
        [
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
    );
    r
}

/// Sets each header to its fixed value.
pub fn set_headers<const N: usize>(
    h: &mut http::HeaderMap,
    headers: [(header::HeaderName, &'static str); N],
) {
    for (name, value) in headers {
        h.insert(name, HeaderValue::from_static(value));
    }
}

fn secure_cookie(state: &AppState) -> bool {
    state.public_url().starts_with("https://")
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space); `None` for a
/// broken escape or bytes that are not UTF-8.
fn percent_decode(s: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(s.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Decodes an `application/x-www-form-urlencoded` body.
fn form(body: &[u8]) -> Result<Vec<(String, String)>, PageError> {
    body.split(|b| *b == b'&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let mut it = kv.splitn(2, |b| *b == b'=');
            let k = percent_decode(it.next().unwrap_or_default());
            let v = percent_decode(it.next().unwrap_or_default());
            k.zip(v).ok_or_else(|| {
                PageError::new(StatusCode::BAD_REQUEST, "The form is not validly encoded.")
            })
        })
        .collect()
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Entry point for every path under `/ui`.
pub async fn handle(state: &Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    let config = state.config.get();
    if !config.ui.enabled {
        let mut r = Response::new(full(
            "The status pages are disabled ([ui] enabled = false).\n",
        ));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return secure(r);
    }
    let ui = &state.ui;
    let tokens = tokens(state).await;
    let session_id = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| session::cookie_value(c, session::COOKIE))
        .map(str::to_owned);
    let signed = session_id.and_then(|id| {
        let s = ui.sessions.find(&id, Instant::now(), &tokens)?;
        Some((id, s))
    });
    let viewer = Viewer {
        signed,
        public: config.ui.public,
    };
    let result = route(state, &viewer, &tokens, req).await;
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            let mut r = html(
                e.status,
                pages::error(&chrome(ui, &viewer), e.status.as_u16(), &e.message),
            );
            if let Some(s) = e.retry_after
                && let Ok(v) = HeaderValue::from_str(&s.to_string())
            {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            if e.status == StatusCode::METHOD_NOT_ALLOWED {
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
            }
            r
        }
    };
    secure(r)
}

async fn route(
    state: &Arc<AppState>,
    viewer: &Viewer,
    tokens: &TokensInForce,
    req: Request<Incoming>,
) -> PageResult {
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix("/ui").unwrap_or(&path);
    let segs: Vec<&str> = rest.split('/').skip(1).collect();
    let method = req.method().clone();
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    match segs.as_slice() {
        [] => Ok(redirect("/ui/")),
        ["assets", name] if get => asset(&state.ui, name),
        ["login"] if get => Ok(login_page(state, viewer, StatusCode::OK, None)),
        ["login"] if post => login(state, viewer, tokens, req).await,
        ["logout"] if post => logout(state, viewer, req).await,
        _ if post => action(state, viewer, &segs, req).await,
        _ if !get => Err(PageError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "This page answers GET and POST only.",
        )),
        _ if !viewer.may_look() => Ok(redirect("/ui/login")),
        [""] => index(state, viewer),
        ["projects", p] => project(state, viewer, p, req.uri().query()),
        ["builds", id] => build_page(state, viewer, id, req.uri().query()),
        ["builds", id, "events"] => live::events(state, viewer, id, &req),
        _ => Err(PageError::not_found()),
    }
}

fn asset(ui: &Ui, name: &str) -> PageResult {
    let (body, content_type) = if format!("/ui/assets/{name}") == ui.css_path {
        (STYLE, "text/css; charset=utf-8")
    } else if format!("/ui/assets/{name}") == ui.js_path {
        (SCRIPT, "text/javascript; charset=utf-8")
    } else {
        return Err(PageError::not_found());
    };
    let mut r = Response::new(full(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    Ok(r)
}

fn login_page(
    state: &AppState,
    viewer: &Viewer,
    status: StatusCode,
    error: Option<&str>,
) -> Response<Body> {
    html(status, pages::login(&chrome(&state.ui, viewer), error))
}

/// Refuses a POST that another site's page sent (browsers say so in `Sec-Fetch-Site`). The
/// cookie is `SameSite=Strict` and forms need the CSRF token anyway; this also covers the
/// login form, which has no session to tie a token to.
fn same_origin(req: &Request<Incoming>) -> Result<(), PageError> {
    match req.headers().get("sec-fetch-site").map(|v| v.as_bytes()) {
        Some(b"cross-site" | b"same-site") => Err(PageError::forbidden(
            "This form was sent from another site.",
        )),
        _ => Ok(()),
    }
}

async fn login(
    state: &AppState,
    viewer: &Viewer,
    tokens: &TokensInForce,
    req: Request<Incoming>,
) -> PageResult {
    same_origin(&req)?;
    let body = read_body(req, MAX_FORM_BYTES).await?;
    let form = form(&body)?;
    let token = field(&form, "token").unwrap_or("").trim();
    let digest = session::token_digest(token.as_bytes());
    if token.is_empty() || tokens.access(&digest).is_none() {
        // Not logged: anyone can post here at request rate, and a wrong token says nothing.
        return Ok(login_page(
            state,
            viewer,
            StatusCode::UNAUTHORIZED,
            Some("That is not an API token in force."),
        ));
    }
    let id = state
        .ui
        .sessions
        .open(digest, Instant::now())
        .map_err(|e| PageError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut r = redirect("/ui/");
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&id, secure_cookie(state))) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// Checks the CSRF token of a POST from a signed-in viewer.
fn check_csrf<'v>(viewer: &'v Viewer, form: &[(String, String)]) -> Result<&'v Signed, PageError> {
    let Some((_, s)) = &viewer.signed else {
        return Err(PageError::forbidden(
            "Sign in first: actions need a session.",
        ));
    };
    if !s.csrf_ok(field(form, "csrf").unwrap_or("")) {
        return Err(PageError::forbidden(
            "The form's CSRF token is missing or wrong; reload the page and try again.",
        ));
    }
    Ok(s)
}

async fn logout(state: &AppState, viewer: &Viewer, req: Request<Incoming>) -> PageResult {
    same_origin(&req)?;
    let body = read_body(req, MAX_FORM_BYTES).await?;
    let form = form(&body)?;
    check_csrf(viewer, &form)?;
    if let Some((id, _)) = &viewer.signed {
        state.ui.sessions.end(id);
    }
    let mut r = redirect("/ui/login");
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie(secure_cookie(state))) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// The POST actions: trigger, cancel, redeploy.
async fn action(
    state: &Arc<AppState>,
    viewer: &Viewer,
    segs: &[&str],
    req: Request<Incoming>,
) -> PageResult {
    // Which project the action is about decides whether the session may do it.
    enum Act {
        Trigger(String),
        Cancel(Build),
        Redeploy(Build),
    }
    let act = match segs {
        ["projects", p, "trigger"] => {
            state
                .config
                .get()
                .project(p)
                .ok_or_else(PageError::not_found)?;
            Act::Trigger((*p).to_owned())
        }
        ["builds", id, "cancel"] => Act::Cancel(load_build(state, id)?),
        ["builds", id, "redeploy"] => Act::Redeploy(load_build(state, id)?),
        _ => return Err(PageError::not_found()),
    };
    same_origin(&req)?;
    let body = read_body(req, MAX_FORM_BYTES).await?;
    let form = form(&body)?;
    let s = check_csrf(viewer, &form)?;
    let project = match &act {
        Act::Trigger(p) => p.as_str(),
        Act::Cancel(b) | Act::Redeploy(b) => b.project.as_str(),
    };
    if !s.access.can_act(project) {
        return Err(PageError::forbidden(
            "Your token may not trigger, cancel or redeploy builds of this project.",
        ));
    }
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown.into());
    }
    match act {
        Act::Trigger(p) => {
            let branch = field(&form, "branch").unwrap_or("");
            let t = state
                .queue
                .trigger(TriggerRequest::branch(
                    &p,
                    branch,
                    Trigger {
                        source: TriggerSource::Api,
                        hook: None,
                    },
                ))
                .await;
            let t = count_trigger(state, t)?;
            if !t.already_exists {
                tracing::info!(project = %p, branch = %branch, build = %t.build.id, "build triggered from the status pages");
            }
            let note = if t.already_exists { "joined" } else { "queued" };
            Ok(redirect(&format!("/ui/builds/{}?done={note}", t.build.id)))
        }
        Act::Cancel(b) => match state.queue.cancel(b.id).await {
            Ok(b) => Ok(redirect(&format!("/ui/builds/{}?done=cancelled", b.id))),
            Err(CancelError::NotFound) => Err(PageError::not_found()),
            Err(e @ CancelError::AlreadyStopped(_)) => {
                Err(PageError::new(StatusCode::CONFLICT, e.to_string()))
            }
            Err(CancelError::Store(e)) => Err(e.into()),
        },
        // As `POST /api/builds/{uuid}/redeploy` does: same target, same commit.
        Act::Redeploy(old) => {
            let request = redeploy_request(state, &old)?;
            let t = state.queue.trigger(request).await;
            let t = count_trigger(state, t)?;
            tracing::info!(project = %old.project, build = %t.build.id, redeploy_of = %old.id, "redeploy from the status pages");
            Ok(redirect(&format!(
                "/ui/builds/{}?done=redeployed",
                t.build.id
            )))
        }
    }
}

/// The trigger a redeploy of `old` sends, as the API's (its resolved commit for a `repo`
/// project, none for a workdir project): 404 when its project is gone, 409 when it never
/// resolved a commit.
fn redeploy_request(state: &AppState, old: &Build) -> Result<TriggerRequest, PageError> {
    let config = state.config.get();
    let p = config.project(&old.project).ok_or_else(|| {
        PageError::new(
            StatusCode::NOT_FOUND,
            "This build's project is not configured any more.",
        )
    })?;
    crate::http::api::redeploy_request(old, p).ok_or_else(|| {
        PageError::new(
            StatusCode::CONFLICT,
            "This build never resolved a commit, so there is nothing to redeploy.",
        )
    })
}

/// Counts a trigger from the pages in `deployhook_triggers_total` as the API's (source
/// `api`), and turns a refusal into its page.
fn count_trigger(
    state: &AppState,
    t: Result<crate::queue::Triggered, crate::queue::TriggerError>,
) -> Result<crate::queue::Triggered, PageError> {
    let (result, answer) = match t {
        Ok(t) if t.already_exists => (TriggerResult::Deduplicated, Ok(t)),
        Ok(t) => (TriggerResult::Created, Ok(t)),
        Err(e) => {
            let e = ApiError::from(e);
            let result = if e.status() == StatusCode::TOO_MANY_REQUESTS {
                TriggerResult::RateLimited
            } else {
                TriggerResult::Rejected
            };
            (result, Err(PageError::from(e)))
        }
    };
    state.metrics.count_trigger(TriggerSource::Api, result);
    answer
}

fn load_build(state: &AppState, id: &str) -> Result<Build, PageError> {
    let id = BuildId::parse(id).ok_or_else(PageError::not_found)?;
    state.store.build(id)?.ok_or_else(|| {
        PageError::new(
            StatusCode::NOT_FOUND,
            "There is no build with that id (builds beyond keep_builds are pruned).",
        )
    })
}

fn index(state: &AppState, viewer: &Viewer) -> PageResult {
    let config = state.config.get();
    let mut rows = Vec::new();
    for p in config.projects.values() {
        if !viewer.can_read(p.name.as_str()) {
            continue;
        }
        let (queued, running) = state.queue.project_status(p.name.as_str());
        let last = state.store.list_builds(p.name.as_str(), None, 1, None)?;
        rows.push(pages::ProjectRow {
            name: p.name.as_str(),
            branches: p.branches.iter().map(|b| b.as_str()).collect(),
            queued,
            running,
            last: last.builds.into_iter().next(),
        });
    }
    Ok(html(
        StatusCode::OK,
        pages::index(&chrome(&state.ui, viewer), &rows, Timestamp::now()),
    ))
}

fn project(state: &AppState, viewer: &Viewer, name: &str, query: Option<&str>) -> PageResult {
    let config = state.config.get();
    let p = config.project(name).ok_or_else(PageError::not_found)?;
    if !viewer.can_read(name) {
        return Err(PageError::forbidden(
            "Your token does not cover this project.",
        ));
    }
    let cursor = match query_pairs(query).into_iter().find(|(k, _)| *k == "cursor") {
        Some((_, v)) if !v.is_empty() => Some(store::decode_cursor(v).ok_or_else(|| {
            PageError::new(
                StatusCode::BAD_REQUEST,
                "That page cursor is not one this site made.",
            )
        })?),
        _ => None,
    };
    let page = state
        .store
        .list_builds(name, None, BUILDS_PER_PAGE, cursor)?;
    let page = pages::ProjectPage {
        name: p.name.as_str(),
        branches: p
            .branches
            .iter()
            .map(|b| (b.as_str(), b.is_glob()))
            .collect(),
        hooks: state.store.hooks(Some(name))?,
        builds: page.builds,
        next_cursor: page.next_cursor,
        act_csrf: viewer.act_csrf(name),
        anonymous: viewer.signed.is_none(),
    };
    Ok(html(
        StatusCode::OK,
        pages::project(&chrome(&state.ui, viewer), &page, Timestamp::now()),
    ))
}

fn readable_build(state: &AppState, viewer: &Viewer, id: &str) -> Result<Build, PageError> {
    let b = load_build(state, id)?;
    if !viewer.can_read(&b.project) {
        return Err(PageError::forbidden(
            "Your token does not cover this build's project.",
        ));
    }
    Ok(b)
}

fn actions<'a>(state: &AppState, viewer: &'a Viewer, b: &Build) -> BuildActions<'a> {
    BuildActions {
        csrf: viewer.act_csrf(&b.project),
        redeploy: redeployable(state, b),
    }
}

/// Whether the redeploy button is offered: for a stopped build that can be redeployed.
fn redeployable(state: &AppState, b: &Build) -> bool {
    b.phase.is_stopped() && redeploy_request(state, b).is_ok()
}

fn parse_lines(raw: &[String]) -> Vec<LogLine> {
    raw.iter()
        .filter_map(|l| serde_json::from_str::<LogLine>(l).ok())
        .collect()
}

fn build_page(state: &AppState, viewer: &Viewer, id: &str, query: Option<&str>) -> PageResult {
    let live = BuildId::parse(id).is_some_and(|i| state.queue.is_live(i));
    let b = readable_build(state, viewer, id)?;
    let mut from = 0u64;
    let mut notice = None;
    for (k, v) in query_pairs(query) {
        match k {
            "log" => from = v.parse().unwrap_or(0),
            "done" => {
                notice = match v {
                    "queued" => Some("Build queued."),
                    "joined" => {
                        Some("A build of this branch was already pending: your trigger joined it.")
                    }
                    "cancelled" => Some("Cancel requested."),
                    "redeployed" => Some("Redeploy queued."),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    let path = buildlog::log_path(state.store.state_dir(), b.id);
    let page = buildlog::read_page(&path, from, LOG_PAGE_LINES, LOG_PAGE_BYTES).map_err(|e| {
        PageError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the build log: {e}"),
        )
    })?;
    let log_more = (!page.at_end).then_some(page.next_cursor);
    // Follow only when this page reaches the end of what is written and more can come.
    let follow = (live && page.at_end).then(|| {
        format!(
            "/ui/builds/{}/events?cursor={}&status={}",
            b.id,
            page.next_cursor,
            b.phase.status()
        )
    });
    let now = Timestamp::now();
    let p = pages::BuildPage {
        build: &b,
        actions: actions(state, viewer, &b),
        lines: parse_lines(&page.lines),
        log_from: from,
        log_more,
        follow,
        notice,
    };
    Ok(html(
        StatusCode::OK,
        pages::build(&chrome(&state.ui, viewer), &p, now),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode() {
        let f = form(b"token=a%2Bb+c&branch=feature%2Fx&csrf=").unwrap();
        assert_eq!(field(&f, "token"), Some("a+b c"));
        assert_eq!(field(&f, "branch"), Some("feature/x"));
        assert_eq!(field(&f, "csrf"), Some(""));
        assert!(form(b"a=%zz").is_err());
        assert!(form(b"a=%ff").is_err());
        assert!(form(b"a=%2").is_err());
    }

    #[test]
    fn asset_paths_carry_their_hash() {
        let ui = Ui::default();
        assert!(ui.css_path.starts_with("/ui/assets/style.") && ui.css_path.ends_with(".css"));
        assert_eq!(ui.js_path.len(), "/ui/assets/app.".len() + 16 + ".js".len());
        assert_ne!(content_hash("a"), content_hash("b"));
    }
}
