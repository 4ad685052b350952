//! File descriptors shared between HTTP connections and builds.
//!
//! Every connection is a descriptor, and so is every pipe, socket and log file of a build.
//! The HTTP side caps its connections below what is free at start ([`crate::http::connection_cap`])
//! and closes idle ones when accept fails with EMFILE. Connections can be closed to make
//! room; a build's descriptors cannot. So builds leave a floor to the connections: a build
//! step (git, or the command) does not start while fewer than [`STEP`] + [`CONNECTION_FLOOR`]
//! descriptors are free, and fails saying so. Without the floor, twelve builds at
//! `ulimit -n 64` left one descriptor to HTTP, and `/healthz` waited behind every queued
//! connection for seconds (issue 11; HOSTILE 7 wants it within one).

use nix::sys::resource::{Resource, getrlimit};

/// Descriptors a build step may take while it starts: its supervisor's control socket (and
/// the warm spare's), the output pipes, `/dev/null`, the exec-error pipe and a pidfd.
pub const STEP: u64 = 12;

/// Descriptors kept for HTTP connections whatever the builds: enough that a new connection is
/// never the only one that could be closed to make room.
pub const CONNECTION_FLOOR: u64 = 8;

/// Serializes the check and the start of build steps, so that two steps starting at once do
/// not both count the same free descriptors.
static GATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How many descriptors this process has open (`/proc/self/fd`), if that can be read.
pub fn open() -> Option<u64> {
    // The directory handle itself is one of the entries.
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

/// The soft open-file limit (`ulimit -n`), if it can be read.
pub fn limit() -> Option<u64> {
    getrlimit(Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Why a step may not start with `open` of `limit` descriptors taken, or `None` if it may.
pub fn shortage(open: u64, limit: u64) -> Option<String> {
    let free = limit.saturating_sub(open);
    (free < STEP + CONNECTION_FLOOR).then(|| {
        format!(
            "only {free} file descriptors are free (open-file limit {limit}); a build step needs up \
             to {STEP} and {CONNECTION_FLOOR} are kept for HTTP connections. Raise the limit \
             (LimitNOFILE=) or lower max_concurrent_builds"
        )
    })
}

/// Held while a build step checks for room and starts; see [`shortage`].
pub async fn gate() -> tokio::sync::MutexGuard<'static, ()> {
    GATE.lock().await
}

/// [`shortage`] for this process now (`None` when the figures cannot be read).
pub fn shortage_now() -> Option<String> {
    shortage(open()?, limit()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_leaves_the_floor_to_connections() {
        assert_eq!(shortage(20, 1024), None);
        assert_eq!(shortage(64 - STEP - CONNECTION_FLOOR, 64), None);
        let why = shortage(64 - STEP - CONNECTION_FLOOR + 1, 64).unwrap();
        assert!(
            why.contains("only 19 file descriptors are free (open-file limit 64)"),
            "{why}"
        );
        assert!(shortage(80, 64).is_some(), "more open than the limit");
    }
}
