//! Internal timing knobs of `deployhook serve`: the HTTP timeouts and the daemon's own
//! intervals, gathered in one value so that the integration tests can shorten them instead of
//! sleeping the production values out.
//!
//! **Internal, not configuration.** None of this is in SPEC.md, the README or the config
//! file, and an operator has no reason to touch it: the production values are the
//! [`Default`]. The only way to change them is the hidden environment variable
//! [`ENV_VAR`], read once when `serve` starts, as a comma-separated list of `key=duration`
//! pairs (`header_read_timeout=300ms,body_read_timeout=500ms`). A key or duration that does
//! not parse stops the start with an error: a typo in a test must not silently leave the
//! production value in force (and the test waiting it out).
//!
//! Builds never see the variable (their environment is rebuilt, see `runner`), and the
//! supervisors start with an empty environment.

use std::time::Duration;

/// The hidden environment variable that overrides the defaults (tests only).
pub const ENV_VAR: &str = "DEPLOYHOOK_INTERNAL_TUNABLES";

/// Timeouts and intervals of a running daemon (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunables {
    /// How long a client may take to send its request head; also how long a kept-alive
    /// connection may stay idle between requests (hyper uses the one timer for both).
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request body, from the end of its head.
    pub body_read_timeout: Duration,
    /// How long open connections get to finish once the server closes.
    pub close_deadline: Duration,
    /// How long the process waits, once the daemon has stopped, for blocking tasks that
    /// still run (a config read stuck on a FIFO) before it exits anyway.
    pub runtime_shutdown_timeout: Duration,
}

impl Default for Tunables {
    fn default() -> Self {
        Tunables {
            header_read_timeout: crate::http::HEADER_READ_TIMEOUT,
            body_read_timeout: crate::http::BODY_READ_TIMEOUT,
            close_deadline: crate::http::CLOSE_DEADLINE,
            runtime_shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// Why [`ENV_VAR`] was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TunablesError {
    /// An item is not `key=duration`.
    #[error("{ENV_VAR}: {0:?} is not key=duration")]
    NotAPair(String),
    /// A key names no tunable.
    #[error("{ENV_VAR}: unknown key {0:?}")]
    UnknownKey(String),
    /// A duration does not parse, or is zero (which would make every timer fire at once).
    #[error("{ENV_VAR}: {key}: {message}")]
    BadDuration {
        /// The key.
        key: String,
        /// What is wrong with its value.
        message: String,
    },
}

impl Tunables {
    /// The defaults, overridden by [`ENV_VAR`] when it is set.
    pub fn from_env() -> Result<Tunables, TunablesError> {
        match std::env::var(ENV_VAR) {
            Ok(v) => Tunables::parse(&v),
            Err(_) => Ok(Tunables::default()),
        }
    }

    /// The defaults, overridden by the `key=duration` pairs of `spec` (comma-separated;
    /// empty items are skipped).
    pub fn parse(spec: &str) -> Result<Tunables, TunablesError> {
        let mut t = Tunables::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| TunablesError::NotAPair(item.to_owned()))?;
            let key = key.trim();
            let slot = match key {
                "header_read_timeout" => &mut t.header_read_timeout,
                "body_read_timeout" => &mut t.body_read_timeout,
                "close_deadline" => &mut t.close_deadline,
                "runtime_shutdown_timeout" => &mut t.runtime_shutdown_timeout,
                _ => return Err(TunablesError::UnknownKey(key.to_owned())),
            };
            let bad = |message: String| TunablesError::BadDuration {
                key: key.to_owned(),
                message,
            };
            let d = humantime::parse_duration(value.trim()).map_err(|e| bad(e.to_string()))?;
            if d.is_zero() {
                return Err(bad("must be more than zero".into()));
            }
            *slot = d;
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_production_values() {
        let t = Tunables::default();
        assert_eq!(t.header_read_timeout, Duration::from_secs(10));
        assert_eq!(t.body_read_timeout, Duration::from_secs(30));
        assert_eq!(t.close_deadline, Duration::from_secs(5));
        assert_eq!(t.runtime_shutdown_timeout, Duration::from_secs(5));
        assert_eq!(Tunables::parse(""), Ok(t));
    }

    #[test]
    fn pairs_override_only_their_key() {
        let t =
            Tunables::parse(" header_read_timeout = 300ms, ,body_read_timeout=1s500ms ").unwrap();
        assert_eq!(t.header_read_timeout, Duration::from_millis(300));
        assert_eq!(t.body_read_timeout, Duration::from_millis(1500));
        assert_eq!(t.close_deadline, Tunables::default().close_deadline);
    }

    #[test]
    fn mistakes_are_refused_not_ignored() {
        assert_eq!(
            Tunables::parse("header_read_timeout"),
            Err(TunablesError::NotAPair("header_read_timeout".into()))
        );
        assert_eq!(
            Tunables::parse("header_timeout=1s"),
            Err(TunablesError::UnknownKey("header_timeout".into()))
        );
        assert!(matches!(
            Tunables::parse("close_deadline=soon"),
            Err(TunablesError::BadDuration { key, .. }) if key == "close_deadline"
        ));
        assert!(matches!(
            Tunables::parse("close_deadline=0s"),
            Err(TunablesError::BadDuration { message, .. }) if message.contains("more than zero")
        ));
    }
}
