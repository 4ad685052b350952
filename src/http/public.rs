//! Public endpoints (SPEC §4.1): deploy hooks, Git push webhooks, health, metrics (which
//! needs the admin token unless `[metrics] public`).
//!
//! Neither hooks nor Git webhooks carry the admin token: a hook's token is its URL, a Git
//! webhook is authenticated by its signature. Every unknown, malformed, deleted or rotated
//! hook token gets the same 404 body ([`ApiError::HookNotFound`]), so probing reveals nothing.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::json;

use super::envelope::{self, ApiError, Body};
use super::error;
use super::{AppState, ClientPeer, TriggerAnswer, read_body, read_body_budgeted_draining};
use crate::config::ProjectConfig;
use crate::git::{self, Decision};
use crate::model::{Build, BuildId, Target, Timestamp, Trigger, TriggerSource};
use crate::queue::{TriggerRequest, Triggered};
use crate::store::DeliverySeen;
use crate::token::{HookToken, TokenHash};

/// How long Git delivery ids are remembered (SPEC §4.1).
pub const DELIVERY_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// A delivery claimed this long ago and still without a build was abandoned (the daemon
/// crashed while handling it): a redelivery takes it over.
const STALE_CLAIM: Duration = Duration::from_secs(60);

/// `GET /metrics` (the admin token was checked, unless `[metrics] public`).
pub fn metrics(state: &AppState) -> Result<Response<Body>, ApiError> {
    let config = state.config.get();
    let (queued, running) = state.queue.counts();
    let mut text =
        state
            .metrics
            .render(config.projects.keys().map(|n| n.as_str()), queued, running);
    text.push_str(
        &state.metrics.render_outbox(
            config.sinks.keys().map(String::as_str),
            config
                .projects
                .values()
                .filter(|p| p.status.is_some())
                .map(|p| p.name.as_str()),
            state.store.outbox_pending(),
        ),
    );
    let mut r = Response::new(http_body_util::BodyExt::boxed(http_body_util::Full::new(
        bytes::Bytes::from(text),
    )));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// `GET /healthz`.
pub fn healthz(state: &AppState) -> Result<Response<Body>, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    if state.store.has_failed() {
        return Err(ApiError::Storage(
            "the database failed; deployhook is restarting".into(),
        ));
    }
    let (queued, running) = state.queue.counts();
    Ok(envelope::ok(
        StatusCode::OK,
        json!({"status": "ok", "queued": queued, "running": running}),
    ))
}

/// 403 (code 1403) unless the request's client address is in the project's `allow_from`
/// (SPEC §4.1 (v2)). Called before the body is read. The address is the TCP peer, or, from a
/// `trusted_proxies` peer, the one `X-Forwarded-For` names (see [`crate::access::client_addr`]).
pub fn check_allow_from(
    state: &AppState,
    req: &Request<Incoming>,
    project: &ProjectConfig,
) -> Result<(), ApiError> {
    let Some(nets) = project.access.allow_from.as_deref() else {
        return Ok(());
    };
    let config = state.config.get();
    let client = req.extensions().get::<ClientPeer>().and_then(|peer| {
        crate::access::client_addr(
            peer.0.ip(),
            req.headers()
                .get_all("x-forwarded-for")
                .iter()
                .map(|v| v.as_bytes()),
            &config.server.trusted_proxies,
        )
    });
    if crate::access::allowed_from(Some(nets), client) {
        return Ok(());
    }
    Err(ApiError::Forbidden(match client {
        Some(ip) => format!(
            "requests from {ip} may not trigger project {}: it is not in its allow_from",
            project.name
        ),
        None => format!(
            "the client address is unknown (X-Forwarded-For holds an entry that is not an IP), and project {} has allow_from",
            project.name
        ),
    }))
}

/// The 405 of a hook URL asked with a method it does not answer: `Allow: GET, POST` for a
/// hook created with `allow_get`, else `Allow: POST` (unknown tokens included, so a 405
/// tells nothing about a token the caller does not hold).
pub fn hook_methods(state: &AppState, token: &str) -> ApiError {
    let allow_get = HookToken::is_well_formed(token)
        && matches!(state.store.hook_by_token(&TokenHash::of(token)), Some(h) if h.allow_get);
    ApiError::MethodNotAllowed(if allow_get { "GET, POST" } else { "POST" })
}

/// `POST /hooks/{token}`, and `GET` for hooks created with `allow_get`.
pub async fn fire_hook(
    state: &Arc<AppState>,
    token: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    // A GET fires only a hook created with `allow_get`; to every other token, known or
    // not, a GET is the same 405 `Allow: POST` it has always been, so it tells nothing.
    let get = req.method() == http::Method::GET;
    let unknown = || {
        if get {
            ApiError::MethodNotAllowed("POST")
        } else {
            ApiError::HookNotFound
        }
    };
    if !HookToken::is_well_formed(token) {
        return Err(unknown());
    }
    let hook = state
        .store
        .hook_by_token(&TokenHash::of(token))
        .ok_or_else(unknown)?;
    if get && !hook.allow_get {
        return Err(ApiError::MethodNotAllowed("POST"));
    }
    let config = state.config.get();
    // Borrowed, not cloned: the hot path must not copy a project's config per request.
    let project = config.project(&hook.project);
    if let Some(p) = project {
        check_allow_from(state, &req, p)?;
    }
    let no_params = std::collections::BTreeSet::new();
    let allowed = project.map_or(&no_params, |p| &p.access.params);
    let wait = super::api::wait_param(req.uri().query())?;
    let query = crate::params::from_query(allowed, req.uri().query())?;
    let body = read_body(req, config.server.max_body_bytes).await?;
    let params = crate::params::merge(crate::params::from_hook_body(allowed, &body)?, query);
    let mut request = TriggerRequest {
        payload: (!body.is_empty()).then_some(body),
        ..TriggerRequest::branch(
            &hook.project,
            &hook.branch,
            Trigger {
                source: TriggerSource::DeployHook,
                hook: Some((hook.id, hook.name.to_string())),
            },
        )
    };
    request.target.params = params;
    let t = state
        .queue
        .trigger(request)
        .await
        .map_err(error::hook_trigger)?;
    state.store.record_hook_fired(hook.id, Timestamp::now())?;
    super::api::answer_trigger(state, t, wait).await
}

/// `POST /git/{project}`: see `crate::git` for signatures and event rules.
pub async fn git_push(
    state: &Arc<AppState>,
    project: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let config = state.config.get();
    let not_found = || {
        ApiError::NotFound(format!(
            "no Git webhook for project {:?}",
            crate::model::clip(project, 80)
        ))
    };
    let p = config.project(project).cloned().ok_or_else(not_found)?;
    let secret = p.git_secret.clone().ok_or_else(not_found)?;
    check_allow_from(state, &req, &p)?;
    // SPEC §2.3: a trigger's query string may carry the project's params (one webhook URL
    // per target, `/git/site?env=staging`).
    let params = crate::params::from_query(&p.access.params, req.uri().query())?;
    let headers = req.headers().clone();
    // No signature header at all: refuse before reading (and holding) any body.
    if !git::has_signature_header(&headers) {
        return Err(ApiError::BadSignature);
    }
    let (body, _budget) = read_body_budgeted_draining(
        req,
        config.server.max_git_body_bytes,
        &state.unauthenticated_body_budget,
    )
    .await?;
    git::verify(&headers, &body, &secret)?;
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let decision = git::decide(&headers, &body, &p)?;
    let (builds, ignored, payload) = match decision {
        Decision::Ping => {
            tracing::debug!(project, "Git ping answered");
            return Ok(envelope::ok(StatusCode::OK, json!({"event": "ping"})));
        }
        Decision::Ignore(why) => {
            tracing::info!(project, "Git event ignored: {}", why.join("; "));
            return Ok(envelope::ok_with_messages(
                StatusCode::ACCEPTED,
                serde_json::Value::Null,
                &why,
            ));
        }
        Decision::Build {
            builds,
            ignored,
            payload,
        } => (builds, ignored, payload),
    };
    let requests = builds
        .into_iter()
        .map(|b| push_request(project, b, &params, payload.clone()))
        .collect();
    // Claim, trigger and record run in their own task: if the Git host hangs up meanwhile
    // (hyper then drops this handler), the delivery is still completed or released, never
    // left claimed-but-unhandled.
    let task = tokio::spawn(handle_push(
        state.clone(),
        project.to_owned(),
        git::delivery_id(&headers),
        requests,
        ignored,
    ));
    task.await?
}

/// The trigger of one ref a push asks to build.
fn push_request(
    project: &str,
    build: git::RefBuild,
    params: &crate::model::Params,
    payload: bytes::Bytes,
) -> TriggerRequest {
    TriggerRequest {
        target: Target {
            project: project.to_owned(),
            git_ref: build.git_ref,
            params: params.clone(),
        },
        trigger: Trigger {
            source: TriggerSource::GitPush,
            hook: None,
        },
        requested_commit: Some(build.commit),
        commit: None,
        redeploy_of: None,
        payload: Some(payload),
    }
}

/// What a push's delivery id says should happen.
enum Claim {
    /// Not seen: build, then record the builds under the id.
    New(String),
    /// No id: build, remember nothing.
    Anonymous,
}

/// Triggers every ref of a push, in payload order, under the delivery's replay guard.
async fn handle_push(
    state: Arc<AppState>,
    project: String,
    delivery: Option<String>,
    requests: Vec<TriggerRequest>,
    mut messages: Vec<String>,
) -> Result<Response<Body>, ApiError> {
    let claim = match delivery {
        None => Claim::Anonymous,
        Some(d) => {
            let now = Timestamp::now();
            let window_start = now.before(DELIVERY_WINDOW);
            let stale_before = now.before(STALE_CLAIM);
            match state
                .store
                .reserve_delivery(&project, &d, now, window_start, stale_before)?
            {
                DeliverySeen::New => Claim::New(d),
                DeliverySeen::Built(ids) => return replayed(&state, &ids),
                DeliverySeen::InFlight => {
                    // The original is being handled right now: wait for its builds.
                    for _ in 0..50 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if let Some(ids) = state.store.delivery_builds(&project, &d)? {
                            return replayed(&state, &ids);
                        }
                    }
                    return Err(ApiError::Conflict(
                        "this delivery is already being processed".into(),
                    ));
                }
            }
        }
    };
    let mut triggered: Vec<Triggered> = Vec::new();
    let mut first_error = None;
    for request in requests {
        let git_ref = request.target.git_ref.clone();
        match state.queue.trigger(request).await {
            Ok(t) => triggered.push(t),
            Err(e) => {
                // Refs already triggered stay triggered: the answer lists this one's failure.
                messages.push(format!(
                    "{} was not built: {e}",
                    crate::model::clip(&git_ref.to_string(), 100)
                ));
                first_error.get_or_insert(e);
            }
        }
    }
    if triggered.is_empty() {
        if let Claim::New(d) = &claim {
            state.store.release_delivery(&project, d)?;
        }
        return Err(first_error
            .map(ApiError::from)
            .unwrap_or_else(|| ApiError::Internal("a push with nothing to trigger".into())));
    }
    if let Claim::New(d) = &claim {
        let ids: Vec<BuildId> = triggered.iter().map(|t| t.build.id).collect();
        state
            .store
            .complete_delivery(&project, d, &ids, Timestamp::now())?;
        state.store.durable().await?;
    }
    let answers: Vec<(Build, bool)> = triggered
        .into_iter()
        .map(|t| (std::sync::Arc::unwrap_or_clone(t.build), t.already_exists))
        .collect();
    Ok(push_answer(&answers, &messages))
}

/// The 200 answer to a push: the first build (+ `already_exists`) as `result`, carrying
/// `more_builds` (always present) with the others, and why other changes built nothing in
/// `messages`.
fn push_answer(builds: &[(Build, bool)], messages: &[String]) -> Response<Body> {
    let Some(((first, first_exists), rest)) = builds.split_first() else {
        return envelope::ok_with_messages(StatusCode::OK, serde_json::Value::Null, messages);
    };
    let mut result = first.to_trigger_json(*first_exists);
    let more: Vec<serde_json::Value> = rest
        .iter()
        .map(|(b, exists)| b.to_trigger_json(*exists))
        .collect();
    if let Some(obj) = result.as_object_mut() {
        obj.insert("more_builds".into(), serde_json::Value::Array(more));
    }
    let answer = |b: &Build, exists: bool| TriggerAnswer {
        build: b.id,
        created: (!exists).then(|| (b.project.clone(), b.git_ref.name().to_owned())),
        already_exists: exists,
    };
    let mut r = envelope::ok_with_messages(StatusCode::OK, result, messages);
    r.extensions_mut().insert(answer(first, *first_exists));
    r.extensions_mut().insert(envelope::MoreTriggerAnswers(
        rest.iter().map(|(b, exists)| answer(b, *exists)).collect(),
    ));
    r
}

/// The answer to a redelivery: the builds it triggered the first time, `already_exists`.
fn replayed(state: &AppState, ids: &[BuildId]) -> Result<Response<Body>, ApiError> {
    let mut builds = Vec::new();
    let mut pruned = Vec::new();
    for id in ids {
        match state.store.build(*id)? {
            Some(b) => builds.push((b, true)),
            None => pruned.push(*id),
        }
    }
    // Pruned since: the delivery was handled; say so without building again.
    let messages: Vec<String> = pruned
        .iter()
        .map(|id| format!("delivery already handled by build {id}, which has since been pruned"))
        .collect();
    Ok(push_answer(&builds, &messages))
}
