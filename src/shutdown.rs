//! Signals and the shutdown sequence's shared state.
//!
//! SIGTERM and SIGINT start a graceful shutdown, SIGHUP asks for a config reload. The handlers
//! are installed by [`Signals::install`] before the listener is bound, so a signal that arrives
//! while the daemon starts is never lost to the default action.
//!
//! Shutdown moves through [`Phase`]s, published on a watch channel: `Draining` (stop
//! accepting, answer 503, let builds finish or interrupt them) and then `Closing` (close the
//! remaining HTTP connections).

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

/// Where shutdown is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running,
    /// No new connections; builds draining.
    Draining,
    /// Closing what is left.
    Closing,
}

/// Moves the shutdown forward.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<Phase>);

impl ShutdownTrigger {
    /// Publishes a phase (never moves backwards).
    pub fn set(&self, phase: Phase) {
        self.0.send_if_modified(|p| {
            let advance = phase > *p;
            if advance {
                *p = phase;
            }
            advance
        });
    }
}

/// Observes the shutdown.
#[derive(Debug, Clone)]
pub struct ShutdownWatch(watch::Receiver<Phase>);

impl ShutdownWatch {
    async fn reach(&mut self, phase: Phase) {
        // An error means the trigger is gone: treat that as the phase having come.
        let _ = self.0.wait_for(|p| *p >= phase).await;
    }

    /// Resolves once draining has begun.
    pub async fn draining(&mut self) {
        self.reach(Phase::Draining).await;
    }

    /// Resolves once connections are to be closed.
    pub async fn closing(&mut self) {
        self.reach(Phase::Closing).await;
    }

    /// Whether connections are to be closed.
    pub fn is_closing(&self) -> bool {
        *self.0.borrow() >= Phase::Closing
    }
}

/// A new shutdown channel, in phase `Running`.
pub fn channel() -> (ShutdownTrigger, ShutdownWatch) {
    let (tx, rx) = watch::channel(Phase::Running);
    (ShutdownTrigger(tx), ShutdownWatch(rx))
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// SIGTERM or SIGINT: shut down.
    Stop(&'static str),
    /// SIGHUP: reload the config.
    Reload,
}

/// The daemon's signal handlers.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers (needs a tokio runtime).
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal.
    pub async fn next(&mut self) -> SignalEvent {
        tokio::select! {
            _ = self.term.recv() => SignalEvent::Stop("SIGTERM"),
            _ = self.int.recv() => SignalEvent::Stop("SIGINT"),
            _ = self.hup.recv() => SignalEvent::Reload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_advance() {
        let (tx, mut rx) = channel();
        tx.set(Phase::Closing);
        tx.set(Phase::Draining);
        rx.draining().await;
        rx.closing().await;
        assert_eq!(*rx.0.borrow(), Phase::Closing);
    }
}
