//! (v2) The outbox's admin endpoints (SPEC §4.2): `GET /api/notifications` lists recent
//! deliveries, `POST /api/notifications/test` sends a test event to one sink.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::api::{json_object, string_field};
use super::envelope::{self, ApiError, Body};
use super::{AppState, query_pairs, read_body};

/// `GET /api/notifications?limit=` (default 20, at most 100), newest first, of the
/// projects the token may see.
pub fn list(
    state: &AppState,
    grant: &crate::access::Grant,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let mut limit = 20usize;
    for (k, v) in query_pairs(query) {
        if k == "limit" && !v.is_empty() {
            limit = v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| {
                    ApiError::BadRequest("limit must be a number from 1 to 100".into())
                })?;
        }
    }
    let entries = state
        .store
        .outbox_recent(limit, |e| grant.allows_project(e.project()))?;
    Ok(envelope::ok(
        StatusCode::OK,
        Value::Array(entries.iter().map(|(id, e)| e.to_json(*id)).collect()),
    ))
}

/// `POST /api/notifications/test` with `{"sink": NAME}`.
pub async fn test(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body = read_body(req, state.config.get().server.max_body_bytes).await?;
    let m = json_object(&body, &["sink"])?;
    let sink = string_field(&m, "sink")?
        .ok_or_else(|| ApiError::BadRequest("field \"sink\" is required".into()))?;
    let Some(outbox) = &state.outbox else {
        return Err(ApiError::Internal("the outbox is not running".into()));
    };
    match outbox.test(&sink).await {
        Ok(a) => Ok(envelope::ok(
            StatusCode::OK,
            json!({
                "sink": sink,
                "status": a.status,
                "body": String::from_utf8_lossy(&a.body),
            }),
        )),
        Err(crate::outbox::TestError::UnknownSink(_)) => Err(ApiError::NotFound(format!(
            "no sink [notify.{}] is configured",
            crate::model::clip(&sink, 64)
        ))),
        // The receiver did not answer: that is the test's result, not a daemon error, so it
        // is a 200 whose `status` is null and whose `error` says why (never the URL's path).
        Err(crate::outbox::TestError::Send(e)) => Ok(envelope::ok(
            StatusCode::OK,
            json!({"sink": sink, "status": null, "body": "", "error": e.to_string()}),
        )),
    }
}
