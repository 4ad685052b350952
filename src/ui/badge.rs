//! The badge of SPEC §4.1 (v2): `GET /badge/{project}.svg?branch=B`.

use http::{Request, Response, header};
use hyper::body::Incoming;

use super::{full, pages, percent_decode};
use crate::http::{ApiError, AppState, Body, query_pairs};
use crate::model::{Phase, StatusFilter};
use crate::store;

/// `GET /badge/{project}.svg?branch=B` (SPEC §4.1): the latest stopped build's outcome of
/// that branch. Without a token only when `[ui] public`; else any API token whose projects
/// include this one.
pub async fn badge(
    state: &AppState,
    project: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let config = state.config.get();
    if !config.ui.public {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| crate::access::bearer(v.as_bytes()))
            .ok_or(ApiError::Unauthorized)?;
        let grant = state
            .authenticate(presented)
            .await
            .ok_or(ApiError::Unauthorized)?;
        if !grant.allows_project(project) {
            return Err(ApiError::Forbidden(format!(
                "this token is not allowed on project {:?}",
                crate::model::clip(project, 80)
            )));
        }
    }
    let p = config.project(project).ok_or_else(|| {
        ApiError::NotFound(format!(
            "project {:?} is not configured",
            crate::model::clip(project, 80)
        ))
    })?;
    let branch = match query_pairs(req.uri().query())
        .into_iter()
        .find(|(k, _)| *k == "branch")
    {
        Some((_, v)) if !v.is_empty() => percent_decode(v.as_bytes())
            .ok_or_else(|| ApiError::BadRequest("branch is not validly percent-encoded".into()))?,
        _ if p.branches[0].is_glob() => {
            return Err(ApiError::BadRequest(format!(
                "project {}'s first branch is a glob ({}): name a branch with ?branch=",
                p.name,
                p.branches[0].as_str()
            )));
        }
        _ => p.branches[0].as_str().to_owned(),
    };
    if !p.has_branch(&branch) {
        return Err(ApiError::NotFound(format!(
            "{:?} is not one of project {}'s branches",
            crate::model::clip(&branch, 80),
            p.name
        )));
    }
    let phase = last_stopped(state, p.name.as_str(), &branch)?;
    let label = format!("{} {}", p.name, branch);
    let svg = pages::badge(&label, phase).into_string();
    let mut r = Response::new(full(svg));
    super::set_headers(
        r.headers_mut(),
        [
            (header::CONTENT_TYPE, "image/svg+xml; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
        ],
    );
    Ok(r)
}

/// The phase of the newest stopped build of `branch`, paging through the project's stopped
/// builds (bounded by `keep_builds`).
fn last_stopped(state: &AppState, project: &str, branch: &str) -> Result<Option<Phase>, ApiError> {
    let mut cursor = None;
    loop {
        let page = state
            .store
            .list_builds(project, Some(StatusFilter::Stopped), 100, cursor)?;
        if let Some(b) = page
            .builds
            .iter()
            .find(|b| b.git_ref.branch() == Some(branch))
        {
            return Ok(Some(b.phase));
        }
        match page.next_cursor.as_deref().and_then(store::decode_cursor) {
            Some(c) => cursor = Some(c),
            None => return Ok(None),
        }
    }
}
