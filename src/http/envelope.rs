//! The one place that turns results and errors into HTTP responses: the Cloudflare-style
//! envelope of SPEC §4 ([`Envelope`], also what the CLI decodes) and the mapping from
//! [`ApiError`] to status code and SPEC error code (domain errors reach [`ApiError`] in the
//! sibling `error` module). Handlers return typed errors and never build error JSON
//! themselves; every body is serialized from a type, never spliced from strings.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{Build, BuildId, BuildJson};

/// The response body type of every handler.
pub type Body = BoxBody<Bytes, Infallible>;

/// Message of every unknown-token 404: one constant, so the bodies are byte-identical.
pub const HOOK_NOT_FOUND: &str = "no deploy hook at this URL";

/// The SPEC §4 envelope around every JSON answer. `result_info` only on listings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<R, I = Value> {
    /// Whether the request did what it asked.
    pub success: bool,
    /// Why it did not (one entry), empty on success.
    pub errors: Vec<Notice>,
    /// Notes on a success (e.g. why a Git event was ignored).
    pub messages: Vec<Notice>,
    /// The answer; `null` on failure.
    pub result: R,
    /// Paging of a listing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_info: Option<I>,
}

/// One entry of `errors` or `messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// SPEC error code: 1000 + the HTTP status.
    pub code: u16,
    /// One line for a person.
    pub message: String,
}

impl Envelope<()> {
    /// The answer to a failed request: its one error, `result` null.
    pub fn failure(e: &ApiError) -> Self {
        Envelope {
            success: false,
            errors: vec![Notice {
                code: e.code(),
                message: e.to_string(),
            }],
            messages: Vec::new(),
            result: (),
            result_info: None,
        }
    }
}

impl<R> Envelope<R> {
    /// A success with `result` and nothing else.
    pub fn success(result: R) -> Self {
        Envelope {
            success: true,
            errors: Vec::new(),
            messages: Vec::new(),
            result,
            result_info: None,
        }
    }
}

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
    /// 403, code 1403 (v2): client address outside `allow_from`, token out of scope.
    #[error("{0}")]
    Forbidden(String),
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
    #[error("request body is larger than {0} bytes (max_body_bytes; for /git, max_git_body_bytes)")]
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
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
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

fn json_response<R: Serialize, I: Serialize>(
    status: StatusCode,
    envelope: &Envelope<R, I>,
) -> Response<Body> {
    match try_encode(envelope) {
        Ok(body) => json_body(status, body),
        // Not reachable for the types answered (string keys, no fallible `Serialize`); if it
        // ever is, a 500 is the honest answer, not an empty 200.
        Err(e) => {
            let e = ApiError::Internal(format!("cannot encode the answer: {e}"));
            let body = try_encode(&Envelope::<(), Value>::failure(&e)).unwrap_or_default();
            json_body(e.status(), body)
        }
    }
}

/// The envelope as JSON, with a final newline.
fn try_encode<R: Serialize, I: Serialize>(
    envelope: &Envelope<R, I>,
) -> Result<Bytes, serde_json::Error> {
    let mut body = serde_json::to_vec(envelope)?;
    body.push(b'\n');
    Ok(Bytes::from(body))
}

fn json_body(status: StatusCode, body: Bytes) -> Response<Body> {
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
pub fn ok(status: StatusCode, result: impl Serialize) -> Response<Body> {
    json_response(status, &Envelope::success(result))
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

/// The other builds a multi-ref Git delivery created or joined (its `more_builds`), each
/// counted and logged like the answer's own [`TriggerAnswer`].
#[derive(Debug, Clone, Default)]
pub struct MoreTriggerAnswers(pub Vec<TriggerAnswer>);

/// The answer to a trigger: 200, the build object plus `already_exists` (SPEC §4).
pub fn triggered(build: &Build, already_exists: bool) -> Response<Body> {
    // Serialized straight from the build, no `Value` in between (empty `Vec`s do not
    // allocate).
    let r = ok(StatusCode::OK, BuildJson::new(build, Some(already_exists)));
    with_trigger_answer(r, build, already_exists)
}

/// The answer to a trigger that joined `build`, from `answers` when the build has not
/// changed since one was made (see [`JoinAnswers`]).
pub fn joined(answers: &JoinAnswers, build: &std::sync::Arc<Build>) -> Response<Body> {
    let body = match answers.get(build) {
        Some(body) => body,
        None => {
            let envelope = Envelope::<_, Value>::success(BuildJson::new(build, Some(true)));
            let Ok(body) = try_encode(&envelope) else {
                // Not reachable (see `json_response`), which answers it properly.
                return triggered(build, true);
            };
            answers.put(build, body.clone());
            body
        }
    };
    with_trigger_answer(json_body(StatusCode::OK, body), build, true)
}

/// The answers of joins, by build. A pending build that is hammered (a leaked hook URL, a
/// CMS that fires on every keystroke) is answered with the same bytes until it changes:
/// encoding its JSON was the largest cost of ours on the hot path (issue 17). An answer is
/// kept with the `Arc` of the build it was made from; the queue changes a build through
/// `Arc::make_mut`, which copies a build shared like this, so a changed build is a different
/// `Arc` and never meets an answer made before the change.
#[derive(Default)]
pub struct JoinAnswers(
    std::sync::Mutex<std::collections::HashMap<BuildId, (std::sync::Arc<Build>, Bytes)>>,
);

impl JoinAnswers {
    /// Answers kept at most (pending builds: one per target); past it they are all dropped.
    const MAX: usize = 256;

    fn get(&self, build: &std::sync::Arc<Build>) -> Option<Bytes> {
        let m = self.0.lock().ok()?;
        let (made_from, body) = m.get(&build.id)?;
        std::sync::Arc::ptr_eq(made_from, build).then(|| body.clone())
    }

    fn put(&self, build: &std::sync::Arc<Build>, body: Bytes) {
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= Self::MAX {
                m.clear();
            }
            m.insert(build.id, (build.clone(), body));
        }
    }
}

fn with_trigger_answer(
    mut r: Response<Body>,
    build: &Build,
    already_exists: bool,
) -> Response<Body> {
    r.extensions_mut().insert(TriggerAnswer {
        build: build.id,
        created: (!already_exists)
            .then(|| (build.project.clone(), build.git_ref.name().to_owned())),
        already_exists,
    });
    r
}

/// A success envelope with `messages` (e.g. why a Git event was ignored).
pub fn ok_with_messages(
    status: StatusCode,
    result: impl Serialize,
    messages: &[String],
) -> Response<Body> {
    let mut envelope = Envelope::success(result);
    envelope.messages = messages
        .iter()
        .map(|m| Notice {
            code: 1000 + status.as_u16(),
            message: m.clone(),
        })
        .collect();
    json_response(status, &envelope)
}

/// The answer to a wait (SPEC §4.3): its status by the (followed) build's state, the build
/// in `result` in every case so that `curl --fail` fails on a failed deploy and the body says
/// why; `already_exists` for triggers that waited.
pub fn waited(w: &crate::queue::Waited, already_exists: Option<bool>) -> Response<Body> {
    use crate::model::{Outcome, Phase};
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
            .map(|message| Notice {
                code: 1000 + status.as_u16(),
                message,
            })
            .collect(),
        ..Envelope::success(BuildJson::new(b, already_exists).followed_from(w.followed_from))
    };
    json_response(status, &envelope)
}

/// A success envelope with `result_info` (listings).
pub fn ok_with_info(result: impl Serialize, info: impl Serialize) -> Response<Body> {
    let envelope = Envelope {
        success: true,
        errors: Vec::new(),
        messages: Vec::new(),
        result,
        result_info: Some(info),
    };
    json_response(StatusCode::OK, &envelope)
}

/// The error envelope for `e`, with the headers its status calls for.
pub fn error(e: &ApiError) -> Response<Body> {
    let mut r = match e {
        // What a scanner or a deleted hook's sender gets at request rate: the same bytes
        // every time, encoded once.
        ApiError::HookNotFound => {
            static BODY: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
            let body = BODY
                .get_or_init(|| try_encode(&Envelope::<(), Value>::failure(e)).unwrap_or_default());
            json_body(e.status(), body.clone())
        }
        _ => json_response(e.status(), &Envelope::failure(e)),
    };
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
pub(super) mod tests {
    use super::*;
    use serde_json::json;

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

    /// A queued build of `site`/`main` triggered through the API.
    pub(in crate::http) fn api_build() -> Build {
        Build::new_queued(
            1,
            &crate::model::Target::branch("site", "main"),
            crate::model::Trigger {
                source: crate::model::TriggerSource::Api,
                hook: None,
            },
            None,
            false,
            crate::model::Timestamp::now(),
        )
    }

    /// A join is answered from the bytes made for the build until the queue changes it
    /// (through `Arc::make_mut`, as the machine does): then it is encoded again.
    #[tokio::test]
    async fn a_join_answer_is_reused_until_the_build_changes() {
        let answers = JoinAnswers::default();
        let mut live = std::sync::Arc::new(api_build());
        let first = body_json(joined(&answers, &live)).await;
        assert_eq!(first["result"]["already_exists"], true);
        assert_eq!(
            first,
            body_json(triggered(&live, true)).await,
            "the same answer as an encoded one"
        );
        assert!(answers.get(&live).is_some(), "kept");
        let sha = "a".repeat(40);
        std::sync::Arc::make_mut(&mut live).requested_commit = Some(sha.clone());
        assert!(
            answers.get(&live).is_none(),
            "a changed build is not answered from before"
        );
        let second = body_json(joined(&answers, &live)).await;
        assert_eq!(second["result"]["requested_commit"], sha.as_str());
        let r = joined(&answers, &live);
        let a = r.extensions().get::<TriggerAnswer>().unwrap();
        assert!(a.already_exists && a.created.is_none());
    }

    #[tokio::test]
    async fn a_trigger_answer_is_the_success_envelope_of_the_build_object() {
        let b = api_build();
        for already in [false, true] {
            let fast = triggered(&b, already).into_body().collect().await;
            let slow = ok(StatusCode::OK, b.to_trigger_json(already))
                .into_body()
                .collect()
                .await;
            assert_eq!(fast.unwrap().to_bytes(), slow.unwrap().to_bytes());
        }
    }

    async fn body_bytes(r: Response<Body>) -> Bytes {
        r.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn envelopes_have_the_spec_field_order_and_decode_as_envelope() {
        let b = body_bytes(ok(StatusCode::OK, json!({"a": 1}))).await;
        assert_eq!(
            &b[..],
            b"{\"success\":true,\"errors\":[],\"messages\":[],\"result\":{\"a\":1}}\n"
        );
        let b = body_bytes(ok_with_info(json!([]), json!({"next_cursor": null}))).await;
        assert_eq!(
            &b[..],
            &b"{\"success\":true,\"errors\":[],\"messages\":[],\"result\":[],\"result_info\":{\"next_cursor\":null}}\n"[..]
        );
        let b = body_bytes(ok_with_messages(StatusCode::ACCEPTED, (), &["why".into()])).await;
        assert_eq!(
            &b[..],
            &b"{\"success\":true,\"errors\":[],\"messages\":[{\"code\":1202,\"message\":\"why\"}],\"result\":null}\n"[..]
        );
        // What the CLI reads back.
        let b = body_bytes(error(&ApiError::Conflict("busy".into()))).await;
        let e: Envelope<Value> = serde_json::from_slice(&b).unwrap();
        assert!(!e.success && e.result.is_null() && e.result_info.is_none());
        assert_eq!(
            e.errors,
            vec![Notice {
                code: 1409,
                message: "busy".into()
            }]
        );
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
