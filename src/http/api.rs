//! Admin API (SPEC §4.2). The bearer token is checked before any of these run.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::envelope::{self, ApiError, Body};
use super::follow::{ChannelBody, Wake};
use super::{AppState, query_pairs, read_body};
use crate::blocking;
use crate::buildlog;
use crate::config::{ProjectConfig, ref_name_problem};
use crate::model::{
    Build, BuildId, GitRef, Hook, HookId, StatusFilter, Timestamp, Trigger, TriggerSource,
    validate_hook_name,
};
use crate::queue::TriggerRequest;
use crate::store::{self, HookInsert};
use crate::token::HookToken;

/// Most log lines one page returns.
const LOG_PAGE_LINES: usize = 1000;
/// About the most bytes of log one page returns.
const LOG_PAGE_BYTES: usize = 1024 * 1024;

fn project(state: &AppState, name: &str) -> Result<Arc<ProjectConfig>, ApiError> {
    state.config.get().project(name).cloned().ok_or_else(|| {
        ApiError::NotFound(format!(
            "project {:?} is not configured",
            crate::model::clip(name, 80)
        ))
    })
}

/// Parses a JSON object body that may only have `allowed` fields; an empty body is `{}`.
pub(super) fn json_object(body: &Bytes, allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("body is not valid JSON: {e}")))?;
    let Value::Object(m) = v else {
        return Err(ApiError::BadRequest("body must be a JSON object".into()));
    };
    if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::BadRequest(format!(
            "unknown field {:?} (allowed: {})",
            crate::model::clip(k, 40),
            allowed.join(", ")
        )));
    }
    Ok(m)
}

/// The branch a hook or trigger that names none gets: the first of `branches`, which must
/// then be a concrete name (SPEC §3).
fn default_branch(p: &ProjectConfig) -> Result<String, ApiError> {
    p.default_branch().map(str::to_owned).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "project {}'s first branch {:?} is a glob: name a branch",
            p.name,
            p.branches.first().map(|b| b.as_str()).unwrap_or_default()
        ))
    })
}

/// Why `branch` cannot be the branch of a hook or API trigger of `p`, if it cannot: it must
/// be one concrete branch name that matches `branches` (SPEC §3).
fn branch_refusal(p: &ProjectConfig, branch: &str) -> Option<String> {
    let shown = crate::model::clip(branch, 80);
    if let Some(why) = ref_name_problem(branch) {
        return Some(format!(
            "{shown:?} is not a concrete branch name (it {why})"
        ));
    }
    if p.has_branch(branch) {
        return None;
    }
    let list: Vec<&str> = p.branches.iter().map(|b| b.as_str()).collect();
    Some(format!(
        "{shown:?} is not one of project {}'s branches ({})",
        p.name,
        list.join(", ")
    ))
}

/// The ref an API trigger asks for: `branch` or `tag` (not both), else the default branch.
/// A tag needs a project with `tags` and must match them (SPEC §4.2, v2).
fn trigger_ref(
    p: &ProjectConfig,
    branch: Option<String>,
    tag: Option<String>,
) -> Result<GitRef, ApiError> {
    match (branch, tag) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "give \"branch\" or \"tag\", not both".into(),
        )),
        (None, Some(t)) => {
            let shown = crate::model::clip(&t, 80);
            if p.tags.is_empty() {
                return Err(ApiError::BadRequest(format!(
                    "field \"tag\": project {} builds no tags (its config has no tags key)",
                    p.name
                )));
            }
            if let Some(why) = ref_name_problem(&t) {
                return Err(ApiError::BadRequest(format!(
                    "field \"tag\": {shown:?} is not a concrete tag name (it {why})"
                )));
            }
            if !p.has_tag(&t) {
                let list: Vec<&str> = p.tags.iter().map(|t| t.as_str()).collect();
                return Err(ApiError::BadRequest(format!(
                    "field \"tag\": {shown:?} is not one of project {}'s tags ({})",
                    p.name,
                    list.join(", ")
                )));
            }
            Ok(GitRef::Tag(t))
        }
        (b, None) => {
            let b = match b {
                Some(b) => b,
                None => default_branch(p)?,
            };
            match branch_refusal(p, &b) {
                Some(why) => Err(ApiError::BadRequest(format!("field \"branch\": {why}"))),
                None => Ok(GitRef::Branch(b)),
            }
        }
    }
}

pub(super) fn string_field(m: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::BadRequest(format!(
            "field {key:?} must be a string"
        ))),
    }
}

/// `GET /api/projects`: the projects the token may reach.
pub fn projects(
    state: &AppState,
    grant: &crate::access::Grant,
) -> Result<Response<Body>, ApiError> {
    let config = state.config.get();
    let mut out = Vec::new();
    for p in config
        .projects
        .values()
        .filter(|p| grant.allows_project(p.name.as_str()))
    {
        let (queued, running) = state.queue.project_status(p.name.as_str());
        let last = state.store.list_builds(p.name.as_str(), None, 1, None)?;
        out.push(json!({
            "name": p.name.as_str(),
            "branches": p.branches.iter().map(|b| b.as_str()).collect::<Vec<_>>(),
            "queued": queued,
            "running_build_uuid": running.map(|id| id.to_string()),
            "last_build": last.builds.first().map(|b| b.to_json()),
        }));
    }
    Ok(envelope::ok(StatusCode::OK, Value::Array(out)))
}

/// `GET /api/projects/{p}/hooks`.
pub fn list_hooks(state: &AppState, p: &str) -> Result<Response<Body>, ApiError> {
    let p = project(state, p)?;
    let hooks = state.store.hooks(Some(p.name.as_str()))?;
    Ok(envelope::ok(
        StatusCode::OK,
        Value::Array(hooks.iter().map(Hook::to_json).collect()),
    ))
}

fn hook_with_url(state: &AppState, hook: &Hook, token: &HookToken) -> Value {
    let mut v = hook.to_json();
    if let Value::Object(m) = &mut v {
        let base = state.public_url();
        m.insert(
            "url".into(),
            Value::String(format!("{base}/hooks/{}", token.expose())),
        );
    }
    v
}

/// `POST /api/projects/{p}/hooks` → 201 with the hook and its URL (shown only here).
pub async fn create_hook(
    state: &AppState,
    p: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let p = project(state, p)?;
    let body = read_body(req, state.config.get().server.max_body_bytes).await?;
    let m = json_object(&body, &["name", "branch", "allow_get"])?;
    let allow_get = match m.get("allow_get") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "field \"allow_get\" must be true or false".into(),
            ));
        }
    };
    let name = string_field(&m, "name")?
        .ok_or_else(|| ApiError::BadRequest("field \"name\" is required".into()))?;
    validate_hook_name(&name).map_err(|e| ApiError::BadRequest(format!("field \"name\": {e}")))?;
    let branch = match string_field(&m, "branch")? {
        Some(b) => b,
        None => default_branch(&p)?,
    };
    if let Some(why) = branch_refusal(&p, &branch) {
        return Err(ApiError::BadRequest(format!("field \"branch\": {why}")));
    }
    let token = HookToken::generate()?;
    let hook = Hook {
        id: HookId::new(),
        project: p.name.as_str().to_owned(),
        name,
        branch,
        token_hash: token.hash().0,
        created_on: Timestamp::now(),
        last_triggered_on: None,
        trigger_count: 0,
        allow_get,
    };
    match state.store.insert_hook(&hook)? {
        HookInsert::Created => {}
        HookInsert::NameTaken => {
            return Err(ApiError::BadRequest(format!(
                "field \"name\": project {} already has a hook named {:?}",
                p.name, hook.name
            )));
        }
    }
    state.store.durable().await?;
    tracing::info!(project = %hook.project, hook = %hook.id, name = %hook.name, allow_get, "hook created");
    Ok(envelope::ok(
        StatusCode::CREATED,
        hook_with_url(state, &hook, &token),
    ))
}

fn hook_id(id: &str) -> Result<HookId, ApiError> {
    HookId::parse(id).ok_or_else(|| ApiError::NotFound("no hook with that id".into()))
}

/// `DELETE /api/projects/{p}/hooks/{id}`.
pub async fn delete_hook(state: &AppState, p: &str, id: &str) -> Result<Response<Body>, ApiError> {
    let p = project(state, p)?;
    let id = hook_id(id)?;
    let hook = state
        .store
        .delete_hook(p.name.as_str(), id)?
        .ok_or_else(|| ApiError::NotFound("no hook with that id in this project".into()))?;
    state.store.durable().await?;
    tracing::info!(project = %hook.project, hook = %hook.id, "hook deleted");
    Ok(envelope::ok(StatusCode::OK, hook.to_json()))
}

/// `POST /api/projects/{p}/hooks/{id}/rotate`.
pub async fn rotate_hook(state: &AppState, p: &str, id: &str) -> Result<Response<Body>, ApiError> {
    let p = project(state, p)?;
    let id = hook_id(id)?;
    let token = HookToken::generate()?;
    let hook = state
        .store
        .rotate_hook(p.name.as_str(), id, &token.hash())?
        .ok_or_else(|| ApiError::NotFound("no hook with that id in this project".into()))?;
    state.store.durable().await?;
    tracing::info!(project = %hook.project, hook = %hook.id, "hook token rotated");
    Ok(envelope::ok(
        StatusCode::OK,
        hook_with_url(state, &hook, &token),
    ))
}

/// `POST /api/projects/{p}/builds`: a trigger with source `api`. The branch defaults to the
/// project's first one.
pub async fn trigger_build(
    state: &AppState,
    p: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let wait = wait_param(req.uri().query())?;
    let p = project(state, p)?;
    let query = crate::params::from_query(&p.access.params, req.uri().query())?;
    let body = read_body(req, state.config.get().server.max_body_bytes).await?;
    let m = json_object(&body, &["branch", "tag", "commit", "params"])?;
    let git_ref = trigger_ref(&p, string_field(&m, "branch")?, string_field(&m, "tag")?)?;
    let commit = match string_field(&m, "commit")? {
        None => None,
        Some(_) if p.repo().is_none() => {
            return Err(ApiError::BadRequest(format!(
                "project {} has no repo: there is no commit to build; trigger the branch instead",
                p.name.as_str()
            )));
        }
        Some(c) if (7..=40).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(c.to_ascii_lowercase())
        }
        Some(_) => {
            return Err(ApiError::BadRequest(
                "commit must be 7 to 40 hexadecimal digits of a commit SHA".into(),
            ));
        }
    };
    let params = crate::params::merge(
        crate::params::from_api(&p.access.params, m.get("params"))?,
        query,
    );
    let mut request = TriggerRequest {
        commit,
        ..TriggerRequest::branch(
            p.name.as_str(),
            "",
            Trigger {
                source: TriggerSource::Api,
                hook: None,
            },
        )
    };
    request.target.git_ref = git_ref;
    request.target.params = params;
    let t = state.queue.trigger(request).await?;
    answer_trigger(state, t, wait).await
}

/// `?wait=SECONDS` (SPEC §4.3): 1 to 3600 whole seconds; absent is no wait.
pub(super) fn wait_param(query: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let Some((_, v)) = query_pairs(query).into_iter().find(|(k, _)| *k == "wait") else {
        return Ok(None);
    };
    match v.parse::<u64>() {
        Ok(n @ 1..=3600) if v.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(Some(Duration::from_secs(n)))
        }
        _ => Err(ApiError::BadRequest(
            "wait must be a whole number of seconds from 1 to 3600".into(),
        )),
    }
}

/// The answer to a trigger: at once, or (with `?wait=`) once its build stopped or the time
/// ran out, as SPEC §4.3's table says.
pub(super) async fn answer_trigger(
    state: &AppState,
    t: crate::queue::Triggered,
    wait: Option<Duration>,
) -> Result<Response<Body>, ApiError> {
    let Some(wait) = wait else {
        return Ok(if t.already_exists {
            envelope::joined(&state.join_answers, &t.build)
        } else {
            envelope::triggered(&t.build, false)
        });
    };
    let w = state
        .queue
        .wait(t.build.id, wait)
        .await?
        .unwrap_or(crate::queue::Waited {
            build: Build::clone(&t.build),
            followed_from: None,
        });
    let mut r = envelope::waited(&w, Some(t.already_exists));
    r.extensions_mut().insert(envelope::TriggerAnswer {
        build: t.build.id,
        created: (!t.already_exists)
            .then(|| (t.build.project.clone(), t.build.git_ref.name().to_owned())),
        already_exists: t.already_exists,
    });
    Ok(r)
}

/// `POST /api/builds/{uuid}/redeploy`: the same project, ref and params again, at the same
/// commit (SPEC §4.2); a build that stands alone, never joined.
pub async fn redeploy_build(
    state: &AppState,
    id: &str,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let wait = wait_param(query)?;
    let id = build_id(id)?;
    let old = state
        .store
        .build(id)?
        .ok_or_else(|| ApiError::NotFound("no build with that id".into()))?;
    let p = project(state, &old.project)?;
    let request = redeploy_request(&old, &p).ok_or_else(|| {
        ApiError::Conflict(format!(
            "build {id} never resolved a commit (status {}), so there is nothing to redeploy",
            old.phase.status()
        ))
    })?;
    let t = state.queue.trigger(request).await?;
    answer_trigger(state, t, wait).await
}

/// The trigger that redeploys `old` (SPEC §4.2): the same target and, when the project
/// builds from a repository, the same commit. `None` when the project has a repository but
/// `old` never resolved a commit: there is nothing to redeploy. The API and the status pages
/// both redeploy through this one request, so a redeploy means the same from either.
pub fn redeploy_request(old: &Build, project: &ProjectConfig) -> Option<TriggerRequest> {
    let commit = match (project.repo(), &old.commit) {
        (None, _) => None,
        (Some(_), Some(c)) => Some(c.clone()),
        (Some(_), None) => return None,
    };
    Some(TriggerRequest {
        target: old.target(),
        trigger: Trigger {
            source: TriggerSource::Api,
            hook: None,
        },
        requested_commit: None,
        commit,
        redeploy_of: Some(old.id),
        payload: None,
    })
}

/// `GET /api/builds/{uuid}/wait?timeout=SECONDS` (SPEC §4.3).
pub async fn wait_build(
    state: &AppState,
    id: &str,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let timeout = match query_pairs(query)
        .into_iter()
        .find(|(k, _)| *k == "timeout")
    {
        None => Duration::from_secs(3600),
        Some((_, v)) => match v.parse::<u64>() {
            Ok(n @ 1..=3600) if v.bytes().all(|b| b.is_ascii_digit()) => Duration::from_secs(n),
            _ => {
                return Err(ApiError::BadRequest(
                    "timeout must be a whole number of seconds from 1 to 3600".into(),
                ));
            }
        },
    };
    let id = build_id(id)?;
    match state.queue.wait(id, timeout).await? {
        Some(w) => Ok(envelope::waited(&w, None)),
        None => Err(ApiError::NotFound("no build with that id".into())),
    }
}

/// `GET /api/projects/{p}/builds?status=&limit=&cursor=`.
pub fn list_builds(
    state: &AppState,
    p: &str,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let p = project(state, p)?;
    let mut filter = None;
    let mut limit = 20usize;
    let mut cursor = None;
    for (k, v) in query_pairs(query) {
        match k {
            "status" if !v.is_empty() => {
                filter = Some(StatusFilter::parse(v).ok_or_else(|| {
                    ApiError::BadRequest(
                        "status must be queued, initializing, running or stopped".into(),
                    )
                })?);
            }
            "limit" if !v.is_empty() => limit = limit_param(v)?,
            "cursor" if !v.is_empty() => {
                cursor = Some(store::decode_cursor(v).ok_or_else(|| {
                    ApiError::BadRequest("cursor is not one this API returned".into())
                })?);
            }
            _ => {}
        }
    }
    let page = state
        .store
        .list_builds(p.name.as_str(), filter, limit, cursor)?;
    Ok(envelope::ok_with_info(
        Value::Array(page.builds.iter().map(|b| b.to_json()).collect()),
        json!({"next_cursor": page.next_cursor}),
    ))
}

/// A list's `limit=` value: a number from 1 to 100 (the lists of builds and of deliveries
/// page alike).
pub fn limit_param(v: &str) -> Result<usize, ApiError> {
    v.parse::<usize>()
        .ok()
        .filter(|n| (1..=100).contains(n))
        .ok_or_else(|| ApiError::BadRequest("limit must be a number from 1 to 100".into()))
}

fn build_id(id: &str) -> Result<BuildId, ApiError> {
    BuildId::parse(id).ok_or_else(|| ApiError::NotFound("no build with that id".into()))
}

/// `GET /api/builds/{uuid}`.
pub fn get_build(state: &AppState, id: &str) -> Result<Response<Body>, ApiError> {
    let id = build_id(id)?;
    let b = state
        .store
        .build(id)?
        .ok_or_else(|| ApiError::NotFound("no build with that id".into()))?;
    Ok(envelope::ok(StatusCode::OK, b.to_json()))
}

/// `POST /api/builds/{uuid}/cancel`.
pub async fn cancel_build(state: &AppState, id: &str) -> Result<Response<Body>, ApiError> {
    let id = build_id(id)?;
    let b = state.queue.cancel(id).await?;
    Ok(envelope::ok(StatusCode::OK, b.to_json()))
}

/// `GET /api/builds/{uuid}/logs?cursor=N[&follow=true]`.
pub async fn build_logs(
    state: &Arc<AppState>,
    id: &str,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let id = build_id(id)?;
    let mut cursor = 0u64;
    let mut follow = false;
    for (k, v) in query_pairs(query) {
        match k {
            "cursor" if !v.is_empty() => {
                cursor = v
                    .parse()
                    .map_err(|_| ApiError::BadRequest("cursor must be a line number".into()))?;
            }
            "follow" => {
                follow = match v {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(ApiError::BadRequest("follow must be true or false".into())),
                }
            }
            _ => {}
        }
    }
    // Checked before reading: a build that is not live has a complete log file.
    let live = state.queue.is_live(id);
    let build = state
        .store
        .build(id)?
        .ok_or_else(|| ApiError::NotFound("no build with that id".into()))?;
    let path = buildlog::log_path(state.store.state_dir(), id);
    if follow {
        // Found before the answer starts: without a thread to read with (the service at its
        // task limit) the client gets 503, not a 200 with an empty stream.
        let p = path.clone();
        let offset = blocking::run("reading a build log", move || {
            buildlog::offset_of_line(&p, cursor)
        })
        .await
        .map_err(|e| ApiError::Busy(e.to_string()))?
        .unwrap_or(0);
        return Ok(follow_response(state.clone(), id, path, offset));
    }
    let p = path.clone();
    let page = blocking::run("reading a build log", move || {
        buildlog::read_page(&p, cursor, LOG_PAGE_LINES, LOG_PAGE_BYTES)
    })
    .await
    .map_err(|e| ApiError::Busy(e.to_string()))?
    .map_err(|e| ApiError::Internal(format!("cannot read the build log: {e}")))?;
    let truncated = match state.queue.live_log(id) {
        Some(l) => l.stats.truncated.load(std::sync::atomic::Ordering::Relaxed),
        None => build.log_truncated,
    };
    /// `result` of a log page. The lines are stored as JSON objects already: they are passed
    /// through as they are (checked, not re-encoded).
    #[derive(serde::Serialize)]
    struct LogPage<'a> {
        lines: Vec<&'a RawValue>,
        next_cursor: u64,
        done: bool,
        truncated: bool,
    }
    let lines = page
        .lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<&RawValue>(l).map_err(|e| {
                ApiError::Internal(format!(
                    "the build log is damaged at line {}: {e}",
                    cursor + i as u64
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(envelope::ok(
        StatusCode::OK,
        LogPage {
            lines,
            next_cursor: page.next_cursor,
            done: !live && page.at_end,
            truncated,
        },
    ))
}

/// Streams NDJSON lines from byte `offset` on until the build stops and its log is read to
/// the end.
fn follow_response(
    state: Arc<AppState>,
    id: BuildId,
    path: std::path::PathBuf,
    mut offset: u64,
) -> Response<Body> {
    // Little buffered per follower (two 64 KiB chunks): a client that stops reading holds
    // back its stream, not the daemon's memory.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    let body = ChannelBody(rx);
    tokio::spawn(async move {
        loop {
            let wake = Wake::take(&state, id);
            let p = path.clone();
            let read = blocking::run("reading a build log", move || {
                buildlog::read_from_offset(&p, offset, 64 * 1024)
            })
            .await;
            let (lines, next) = match read {
                Ok(Ok(x)) => x,
                // No file yet (queued build): nothing to send.
                Ok(Err(_)) => (Vec::new(), offset),
                // No thread right now (task limit): try again shortly rather than end the
                // stream early, which would look like a complete log.
                Err(_) => {
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            offset = next;
            if !lines.is_empty() {
                let mut chunk = lines.join("\n");
                chunk.push('\n');
                if tx.send(Bytes::from(chunk)).await.is_err() {
                    return; // The client went away.
                }
                continue;
            }
            if !wake.live {
                return; // Stopped and read to the end.
            }
            if !wake.wait(&tx).await {
                return; // The client hung up.
            }
        }
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
