//! Where each domain error lands in HTTP: the conversions from the store's, the queue's, the Git
//! parser's and the runtime's errors to [`ApiError`], whose status, SPEC error code, headers
//! and envelope are `envelope`'s. Handlers use `?` (or one of the named mappings below when the
//! same domain error means something else on their route) and never pick a status themselves.

use crate::git;
use crate::queue::{CancelError, TriggerError};
use crate::store::StoreError;
use crate::token::TokenError;

pub use super::envelope::ApiError;

impl From<StoreError> for ApiError {
    /// A corrupt record is this request's problem (500); anything else means the database is
    /// failing and the daemon is about to restart (503: retry later).
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt(m) => ApiError::Internal(m),
            other => ApiError::Storage(other.to_string()),
        }
    }
}

impl From<TriggerError> for ApiError {
    fn from(e: TriggerError) -> Self {
        match e {
            e @ TriggerError::UnknownProject(_) => ApiError::NotFound(e.to_string()),
            e @ TriggerError::BranchNotAllowed { .. } => ApiError::BadRequest(e.to_string()),
            TriggerError::RateLimited(l) => ApiError::RateLimited {
                retry_after_secs: l.retry_after_secs(),
                message: l.to_string(),
            },
            TriggerError::ShuttingDown => ApiError::ShuttingDown,
            TriggerError::Store(e) => e.into(),
        }
    }
}

/// A trigger through a deploy hook: the caller named neither the project nor the branch (the
/// hook did), so a project or branch that left the config since the hook was made is not a
/// bad request but a hook that no longer fits the config (404 / 409), said in the hook's terms.
pub fn hook_trigger(e: TriggerError) -> ApiError {
    match e {
        TriggerError::UnknownProject(p) => ApiError::NotFound(format!(
            "this hook's project {p:?} is no longer in the config"
        )),
        TriggerError::BranchNotAllowed {
            branch, project, ..
        } => ApiError::Conflict(format!(
            "this hook's branch {branch:?} is no longer one of project {project}'s branches"
        )),
        other => other.into(),
    }
}

impl From<crate::params::ParamError> for ApiError {
    /// A trigger parameter that breaks the SPEC §2.3 rules (length, NUL/CR/LF, type).
    fn from(e: crate::params::ParamError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<CancelError> for ApiError {
    fn from(e: CancelError) -> Self {
        match e {
            e @ CancelError::NotFound => ApiError::NotFound(e.to_string()),
            e @ CancelError::AlreadyStopped(_) => ApiError::Conflict(e.to_string()),
            CancelError::Store(e) => e.into(),
        }
    }
}

impl From<git::ParseError> for ApiError {
    /// The body was signed correctly but is not a push event we understand.
    fn from(e: git::ParseError) -> Self {
        ApiError::BadRequest(e.0)
    }
}

impl From<git::AuthError> for ApiError {
    /// Missing and wrong signatures get the same answer: no hint which part failed.
    fn from(_: git::AuthError) -> Self {
        ApiError::BadSignature
    }
}

impl From<TokenError> for ApiError {
    /// Only token generation happens on a request (the OS RNG failed): nothing to retry with.
    fn from(e: TokenError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<tokio::task::JoinError> for ApiError {
    /// A request's blocking or spawned part panicked or was cancelled.
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::Internal(format!("a request task failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::{Limited, Scope};

    fn code(e: impl Into<ApiError>) -> (u16, String) {
        let e = e.into();
        (e.code(), e.to_string())
    }

    #[test]
    fn store_errors_are_503_unless_a_record_is_corrupt() {
        assert_eq!(code(StoreError::Db("io".into())).0, 1503);
        assert_eq!(code(StoreError::Corrupt("build x".into())).0, 1500);
    }

    #[test]
    fn trigger_errors_map_to_spec_codes() {
        let not_allowed = || TriggerError::BranchNotAllowed {
            project: "site".into(),
            branch: "dev".into(),
            allowed: "main".into(),
        };
        assert_eq!(
            code(TriggerError::UnknownProject("x".into())),
            (1404, "project \"x\" is not configured".into())
        );
        assert_eq!(code(not_allowed()).0, 1400);
        assert_eq!(code(TriggerError::ShuttingDown).0, 1503);
        assert_eq!(
            code(TriggerError::Store(StoreError::Db("x".into()))).0,
            1503
        );
        let limited = Limited {
            scope: Scope::Daemon { limit: 1 },
            wait: std::time::Duration::from_millis(1500),
        };
        match ApiError::from(TriggerError::RateLimited(limited)) {
            e @ ApiError::RateLimited {
                retry_after_secs: 2,
                ..
            } => assert_eq!(e.code(), 1429),
            other => panic!("{other:?}"),
        }
        // Through a hook, the same errors speak of the hook.
        let (c, m) = code(hook_trigger(TriggerError::UnknownProject("x".into())));
        assert_eq!((c, m.contains("this hook's project")), (1404, true));
        let (c, m) = code(hook_trigger(not_allowed()));
        assert_eq!((c, m.contains("this hook's branch")), (1409, true));
        assert_eq!(code(hook_trigger(TriggerError::ShuttingDown)).0, 1503);
    }

    #[test]
    fn cancel_errors_map_to_spec_codes() {
        let mut b = super::super::envelope::tests::api_build();
        b.phase = crate::model::Phase::Stopped(crate::model::Outcome::Success);
        assert_eq!(code(CancelError::NotFound).0, 1404);
        let (c, m) = code(CancelError::AlreadyStopped(Box::new(b)));
        assert_eq!(
            (c, m.contains("already stopped (success)")),
            (1409, true),
            "{m}"
        );
        assert_eq!(code(CancelError::Store(StoreError::Db("x".into()))).0, 1503);
    }

    #[test]
    fn git_errors_map_to_400_and_an_undetailed_401() {
        assert_eq!(
            code(git::ParseError("not a push".into())),
            (1400, "not a push".into())
        );
        assert_eq!(
            code(git::AuthError::Missing),
            code(git::AuthError::Invalid),
            "no hint which part failed"
        );
        assert_eq!(code(git::AuthError::Invalid).0, 1401);
    }
}
