//! Blocking work (file reads, config loads, pruning) off the async threads, without panics.
//!
//! `tokio::task::spawn_blocking` (and `tokio::fs`, which uses it) panics with "OS can't spawn
//! worker thread" when its pool has no idle thread and the OS refuses a new one. That is what
//! systemd's `TasksMax=` does once builds hold every task of the service: a reload then never
//! sent `READY=1` (systemd waited forever), and a log request lost its connection. A request or
//! a reload must degrade with an error instead, so every job here gets a thread of its own from
//! `std::thread::Builder::spawn`, which reports the refusal as an error ([`BlockingError`]).
//! Starting a thread costs tens of microseconds, nothing beside the file work it does.

use std::io;

/// Why blocking work did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum BlockingError {
    /// The OS refused a thread (`TasksMax=`, `RLIMIT_NPROC`, no memory for its stack).
    #[error("cannot start a thread for {what} ({source}); the service may be at its task limit")]
    NoThread {
        /// What the thread was for.
        what: &'static str,
        /// The OS's answer.
        source: io::Error,
    },
    /// The work panicked (a bug); its thread is gone.
    #[error("{what} failed unexpectedly")]
    Panicked {
        /// What the thread was for.
        what: &'static str,
    },
}

/// Runs `work` on a new thread and waits for its result without blocking the runtime.
/// `what` names the work in errors ("reading the config").
pub async fn run<T, F>(what: &'static str, work: F) -> Result<T, BlockingError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    spawn(what, move || {
        let _ = tx.send(work());
    })?;
    // A panic drops `tx` without a send.
    rx.await.map_err(|_| BlockingError::Panicked { what })
}

/// Starts `work` on a new thread without waiting for it.
pub fn spawn<F>(what: &'static str, work: F) -> Result<(), BlockingError>
where
    F: FnOnce() + Send + 'static,
{
    std::thread::Builder::new()
        .name("deployhook-blocking".into())
        .spawn(work)
        .map(drop)
        .map_err(|source| BlockingError::NoThread { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_the_work_and_returns_its_result() {
        let id = run("a test", || {
            std::thread::current().name().map(str::to_owned)
        })
        .await
        .unwrap();
        assert_eq!(id.as_deref(), Some("deployhook-blocking"));
    }

    #[tokio::test]
    async fn a_panic_in_the_work_is_an_error_not_a_panic() {
        let r = run("a test", || -> u8 { panic!("boom") }).await;
        assert!(matches!(r, Err(BlockingError::Panicked { what: "a test" })));
    }

    #[test]
    fn the_refusal_of_a_thread_names_the_work_and_the_limit() {
        let e = BlockingError::NoThread {
            what: "reading the config",
            source: io::Error::from_raw_os_error(11),
        };
        let text = e.to_string();
        assert!(text.starts_with("cannot start a thread for reading the config"));
        assert!(text.contains("task limit"), "{text}");
    }
}
