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
use super::{AppState, read_body, read_body_budgeted};
use crate::git::{self, Decision};
use crate::model::{BuildId, Timestamp, Trigger, TriggerSource};
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
    let text = state
        .metrics
        .render(config.projects.keys().map(|n| n.as_str()), queued, running);
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

fn triggered(t: &Triggered) -> Response<Body> {
    envelope::triggered(&t.build, t.already_exists)
}

/// `POST /hooks/{token}`.
pub async fn fire_hook(
    state: &Arc<AppState>,
    token: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    if !HookToken::is_well_formed(token) {
        return Err(ApiError::HookNotFound);
    }
    let hook = state
        .store
        .hook_by_token(&TokenHash::of(token))
        .ok_or(ApiError::HookNotFound)?;
    let wait = super::api::wait_param(req.uri().query())?;
    let max = state.config.get().server.max_body_bytes;
    let body = read_body(req, max).await?;
    let t = state
        .queue
        .trigger(TriggerRequest {
            payload: (!body.is_empty()).then_some(body),
            ..TriggerRequest::branch(
                &hook.project,
                &hook.branch,
                Trigger {
                    source: TriggerSource::DeployHook,
                    hook: Some((hook.id, hook.name.to_string())),
                },
            )
        })
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
    let headers = req.headers().clone();
    // No signature header at all: refuse before reading (and holding) any body.
    if !git::has_signature_header(&headers) {
        return Err(ApiError::BadSignature);
    }
    let (body, _budget) = read_body_budgeted(
        req,
        config.server.max_body_bytes,
        &state.unauthenticated_body_budget,
    )
    .await?;
    git::verify(&headers, &body, &secret)?;
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let decision = git::decide(&headers, &body, &p.branches)?;
    let (branch, after) = match decision {
        Decision::Ping => {
            tracing::debug!(project, "Git ping answered");
            return Ok(envelope::ok(StatusCode::OK, json!({"event": "ping"})));
        }
        Decision::Ignore(why) => {
            tracing::info!(project, "Git event ignored: {why}");
            return Ok(envelope::ok_with_messages(
                StatusCode::ACCEPTED,
                serde_json::Value::Null,
                &[why],
            ));
        }
        Decision::Build { branch, after } => (branch, after),
    };
    let request = TriggerRequest {
        requested_commit: Some(after),
        payload: Some(body),
        ..TriggerRequest::branch(
            project,
            &branch,
            Trigger {
                source: TriggerSource::GitPush,
                hook: None,
            },
        )
    };
    // Claim, trigger and record run in their own task: if the Git host hangs up meanwhile
    // (hyper then drops this handler), the delivery is still completed or released, never
    // left claimed-but-unhandled.
    let task = tokio::spawn(handle_push(
        state.clone(),
        git::delivery_id(&headers),
        request,
    ));
    task.await?
}

/// What a push's delivery id says should happen.
enum Claim {
    /// Not seen: build, then record the build under the id.
    New(String),
    /// No id: build, remember nothing.
    Anonymous,
}

async fn handle_push(
    state: Arc<AppState>,
    delivery: Option<String>,
    request: TriggerRequest,
) -> Result<Response<Body>, ApiError> {
    let project = request.target.project.clone();
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
                DeliverySeen::Built(id) => return replayed(&state, id),
                DeliverySeen::InFlight => {
                    // The original is being handled right now: wait for its build.
                    for _ in 0..50 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if let Some(id) = state.store.delivery_build(&project, &d)? {
                            return replayed(&state, id);
                        }
                    }
                    return Err(ApiError::Conflict(
                        "this delivery is already being processed".into(),
                    ));
                }
            }
        }
    };
    let result = state.queue.trigger(request).await;
    match (result, claim) {
        (Ok(t), Claim::New(d)) => {
            state
                .store
                .complete_delivery(&project, &d, t.build.id, Timestamp::now())?;
            state.store.durable().await?;
            Ok(triggered(&t))
        }
        (Ok(t), Claim::Anonymous) => Ok(triggered(&t)),
        (Err(e), claim) => {
            if let Claim::New(d) = claim {
                state.store.release_delivery(&project, &d)?;
            }
            Err(e.into())
        }
    }
}

fn replayed(state: &AppState, id: BuildId) -> Result<Response<Body>, ApiError> {
    match state.store.build(id)? {
        Some(b) => Ok(envelope::triggered(&b, true)),
        // Pruned since: the delivery was handled; say so without building again.
        None => Ok(envelope::ok_with_messages(
            StatusCode::OK,
            serde_json::Value::Null,
            &[format!(
                "delivery already handled by build {id}, which has since been pruned"
            )],
        )),
    }
}
