//! The one place that turns results and errors into HTTP responses: the Cloudflare-style
//! envelope of SPEC §4 and the mapping from [`ApiError`] to status code and SPEC error code.
//! Handlers return typed errors and never build error JSON themselves.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};

use crate::model::{Build, BuildId, BuildJson};

/// The response body type of every handler.
pub type Body = BoxBody<Bytes, Infallible>;

/// Message of every unknown-token 404: one constant, so the bodies are byte-identical.
pub const HOOK_NOT_FOUND: &str = "no deploy hook at this URL";

/// Everything a request can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400, code 1400.
    #[error("{0}")]
    BadRequest(String),
    /// 401, code 1401.
    #[error(
        "missing or wrong admin token: send Authorization: Bearer <token from the [api] token_file>"
    )]
    Unauthorized,
    /// 401, code 1401, for Git webhooks (no hint which part failed).
    #[error("missing or invalid webhook signature")]
    BadSignature,
    /// 404, code 1404.
    #[error("{0}")]
    NotFound(String),
    /// 404, code 1404, with the one body shared by every unknown hook token.
    #[error("{}", HOOK_NOT_FOUND)]
    HookNotFound,
    /// 405, code 1405; carries the `Allow` header value.
    #[error("method not allowed; allowed: {0}")]
    MethodNotAllowed(&'static str),
    /// 408, code 1408.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// 409, code 1409.
    #[error("{0}")]
    Conflict(String),
    /// 413, code 1413; carries the limit.
    #[error("request body is larger than max_body_bytes ({0} bytes)")]
    PayloadTooLarge(u64),
    /// 429, code 1429; carries the seconds for `Retry-After`.
    #[error("rate limited: {message}")]
    RateLimited {
        /// Whole seconds until the trigger would pass.
        retry_after_secs: u64,
        /// Which limit, and the wait.
        message: String,
    },
    /// 503, code 1503.
    #[error("deployhook is shutting down")]
    ShuttingDown,
    /// 503, code 1503: too much load of one kind right now; retry.
    #[error("{0}")]
    Busy(String),
    /// 503, code 1503: storage failed (the daemon is about to exit and be restarted).
    #[error("storage is failing ({0}); nothing was accepted")]
    Storage(String),
    /// 500, code 1500.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::BadSignature => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) | ApiError::HookNotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ShuttingDown | ApiError::Storage(_) | ApiError::Busy(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// SPEC error code: 1000 + the HTTP status.
    pub fn code(&self) -> u16 {
        1000 + self.status().as_u16()
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    raw_json(status, Bytes::from(body))
}

/// A response whose body is already-serialized JSON.
pub fn raw_json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A success envelope.
pub fn ok(status: StatusCode, result: Value) -> Response<Body> {
    json_response(
        status,
        &json!({"success": true, "errors": [], "messages": [], "result": result}),
    )
}

/// What a trigger request was answered with, attached to its response's extensions so that
/// the HTTP layer can count and log the trigger in one place (see `http::note_trigger`).
#[derive(Debug, Clone)]
pub struct TriggerAnswer {
    /// The build created or joined.
    pub build: BuildId,
    /// Project and ref name of a new build (`None` for joins, which the queue logs itself,
    /// once per build: the hot path clones nothing for its log).
    pub created: Option<(String, String)>,
    /// Whether the trigger joined a pending build.
    pub already_exists: bool,
}

/// The answer to a trigger: 200, the build object plus `already_exists` (SPEC §4).
pub fn triggered(build: &Build, already_exists: bool) -> Response<Body> {
    // The hot path: serialized straight from the build, no `Value` in between.
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        success: bool,
        errors: [(); 0],
        messages: [(); 0],
        result: BuildJson<'a>,
    }
    let envelope = Envelope {
        success: true,
        errors: [],
        messages: [],
        result: BuildJson::new(build, Some(already_exists)),
    };
    let mut r = match serde_json::to_vec(&envelope) {
        Ok(mut body) => {
            body.push(b'\n');
            raw_json(StatusCode::OK, Bytes::from(body))
        }
        // Not reachable for a plain struct; the slow path says the same thing.
        Err(_) => ok(StatusCode::OK, build.to_trigger_json(already_exists)),
    };
    r.extensions_mut().insert(TriggerAnswer {
        build: build.id,
        created: (!already_exists)
            .then(|| (build.project.clone(), build.git_ref.name().to_owned())),
        already_exists,
    });
    r
}

/// A success envelope with `messages` (e.g. why a Git event was ignored).
pub fn ok_with_messages(status: StatusCode, result: Value, messages: &[String]) -> Response<Body> {
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| json!({"code": 1000 + status.as_u16(), "message": m}))
        .collect();
    json_response(
        status,
        &json!({"success": true, "errors": [], "messages": messages, "result": result}),
    )
}

/// The answer to a wait (SPEC §4.3): its status by the (followed) build's state, the build
/// in `result` in every case so that `curl --fail` fails on a failed deploy and the body says
/// why; `already_exists` for triggers that waited.
pub fn waited(w: &crate::queue::Waited, already_exists: Option<bool>) -> Response<Body> {
    use crate::model::{Outcome, Phase};
    #[derive(serde::Serialize)]
    struct Error {
        code: u16,
        message: String,
    }
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        success: bool,
        errors: Vec<Error>,
        messages: [(); 0],
        result: BuildJson<'a>,
    }
    let b = &w.build;
    let exit = b
        .exit_code
        .map_or(String::new(), |c| format!(" with exit code {c}"));
    let (status, message) = match b.phase {
        Phase::Stopped(Outcome::Success) => (StatusCode::OK, None),
        Phase::Stopped(o @ (Outcome::Fail | Outcome::TimedOut)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some(format!(
                "build {} ended with outcome {}{exit}",
                b.id,
                o.as_str()
            )),
        ),
        Phase::Stopped(Outcome::Cancelled) => (
            StatusCode::CONFLICT,
            Some(format!("build {} was cancelled", b.id)),
        ),
        Phase::Stopped(Outcome::Interrupted) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(format!(
                "build {} was interrupted: deployhook stopped while it ran",
                b.id
            )),
        ),
        // Not stopped when the time ran out (or the daemon is shutting down).
        _ => (StatusCode::ACCEPTED, None),
    };
    let envelope = Envelope {
        success: message.is_none(),
        errors: message
            .into_iter()
            .map(|message| Error {
                code: 1000 + status.as_u16(),
                message,
            })
            .collect(),
        messages: [],
        result: BuildJson::new(b, already_exists).followed_from(w.followed_from),
    };
    match serde_json::to_vec(&envelope) {
        Ok(mut body) => {
            body.push(b'\n');
            raw_json(status, Bytes::from(body))
        }
        Err(e) => error(&ApiError::Internal(e.to_string())),
    }
}

/// A success envelope with `result_info` (listings).
pub fn ok_with_info(result: Value, info: Value) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({"success": true, "errors": [], "messages": [], "result": result, "result_info": info}),
    )
}

/// The error envelope for `e`, with the headers its status calls for.
pub fn error(e: &ApiError) -> Response<Body> {
    let mut r = json_response(
        e.status(),
        &json!({
            "success": false,
            "errors": [{"code": e.code(), "message": e.to_string()}],
            "messages": [],
            "result": null,
        }),
    );
    let h = r.headers_mut();
    match e {
        ApiError::MethodNotAllowed(allow) => {
            h.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        ApiError::RateLimited {
            retry_after_secs, ..
        } => {
            if let Ok(v) = HeaderValue::from_str(&(*retry_after_secs).max(1).to_string()) {
                h.insert(header::RETRY_AFTER, v);
            }
        }
        ApiError::Unauthorized => {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // The body may not have been read: do not try to reuse the connection.
        ApiError::PayloadTooLarge(_) | ApiError::RequestTimeout => {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        _ => {}
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(r: Response<Body>) -> Value {
        let b = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&b).unwrap()
    }

    #[tokio::test]
    async fn errors_map_to_status_and_code() {
        let cases = [
            (ApiError::BadRequest("x".into()), 400, 1400),
            (ApiError::Unauthorized, 401, 1401),
            (ApiError::BadSignature, 401, 1401),
            (ApiError::HookNotFound, 404, 1404),
            (ApiError::MethodNotAllowed("POST"), 405, 1405),
            (ApiError::Conflict("x".into()), 409, 1409),
            (ApiError::PayloadTooLarge(10), 413, 1413),
            (
                ApiError::RateLimited {
                    retry_after_secs: 3,
                    message: "x".into(),
                },
                429,
                1429,
            ),
            (ApiError::ShuttingDown, 503, 1503),
            (ApiError::Storage("disk full".into()), 503, 1503),
        ];
        for (e, status, code) in cases {
            let r = error(&e);
            assert_eq!(r.status().as_u16(), status, "{e:?}");
            let v = body_json(r).await;
            assert_eq!(v["success"], false);
            assert_eq!(v["result"], Value::Null);
            assert_eq!(v["errors"][0]["code"], code, "{e:?}");
            assert!(
                v["errors"][0]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty() && !m.contains('\n'))
            );
            assert_eq!(v["messages"], json!([]));
        }
    }

    #[tokio::test]
    async fn headers_for_405_429_401() {
        let r = error(&ApiError::MethodNotAllowed("GET, POST"));
        assert_eq!(r.headers()[header::ALLOW], "GET, POST");
        let r = error(&ApiError::RateLimited {
            retry_after_secs: 0,
            message: "x".into(),
        });
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = error(&ApiError::Unauthorized);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }

    #[tokio::test]
    async fn a_trigger_answer_is_the_success_envelope_of_the_build_object() {
        let b = Build::new_queued(
            1,
            &crate::model::Target::branch("site", "main"),
            crate::model::Trigger {
                source: crate::model::TriggerSource::Api,
                hook: None,
            },
            None,
            false,
            crate::model::Timestamp::now(),
        );
        for already in [false, true] {
            let fast = triggered(&b, already).into_body().collect().await;
            let slow = ok(StatusCode::OK, b.to_trigger_json(already))
                .into_body()
                .collect()
                .await;
            assert_eq!(fast.unwrap().to_bytes(), slow.unwrap().to_bytes());
        }
    }

    #[tokio::test]
    async fn success_envelope() {
        let v = body_json(ok(StatusCode::CREATED, json!({"a": 1}))).await;
        assert_eq!(
            v,
            json!({"success": true, "errors": [], "messages": [], "result": {"a": 1}})
        );
        let v = body_json(ok_with_info(json!([]), json!({"next_cursor": null}))).await;
        assert_eq!(v["result_info"]["next_cursor"], Value::Null);
    }

    #[tokio::test]
    async fn the_hook_404_body_is_the_fixed_spec_envelope() {
        // SPEC §4: a body identical for every unknown token, so it can carry nothing but the
        // code and the fixed message (no token, no hint of why the token is unknown).
        let r = error(&ApiError::HookNotFound);
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            json!({
                "success": false,
                "errors": [{"code": 1404, "message": "no deploy hook at this URL"}],
                "messages": [],
                "result": null,
            })
        );
    }
}
