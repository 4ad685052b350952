//! systemd's readiness protocol (`sd_notify(3)`), for `Type=notify` and `Type=notify-reload`
//! units: a few datagrams to the Unix socket named by `$NOTIFY_SOCKET`.
//!
//! - `READY=1` once the listener accepts connections, and again after each reload (also after
//!   a rejected one: the old config is in force, the daemon is ready);
//! - `RELOADING=1` with `MONOTONIC_USEC` when a SIGHUP reload begins (systemd ≥ 253 wants the
//!   timestamp with `RELOADING=1`; older versions ignore it);
//! - `STOPPING=1` when shutdown begins; nothing is sent after it (a reload that was under way
//!   when SIGTERM arrived must not end with a `READY=1` that contradicts it).
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd) every call does nothing. A failed send is
//! logged at debug level and otherwise ignored: readiness reporting must never stop the
//! daemon. Builds never see the variable (their environment is cleared, see `runner`).
//! No crate: the protocol is one `sendto` per message.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Mutex;
use std::time::Duration;

/// How long a send may wait for room in the receiver's queue before it is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends state changes to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    /// An unbound datagram socket and the manager's address; `None` when not under systemd.
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Whether `STOPPING=1` was sent. Held while sending, so that a message checked against
    /// it cannot be overtaken by `STOPPING=1` between the check and the send.
    stopped: Mutex<bool>,
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET`.
    pub fn from_env() -> Notifier {
        Notifier::new(std::env::var_os("NOTIFY_SOCKET").as_deref())
    }

    /// A notifier for `socket`: a path, or `@name` for an abstract socket; `None` or an
    /// unusable value gives a notifier that sends nothing.
    pub fn new(socket: Option<&OsStr>) -> Notifier {
        let target = socket.and_then(|s| match connect(s) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::debug!("NOTIFY_SOCKET {s:?} is not usable, not notifying: {e}");
                None
            }
        });
        Notifier {
            target,
            stopped: Mutex::new(false),
        }
    }

    /// Whether messages go anywhere.
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1`: the daemon serves; `status` is shown by `systemctl status`.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)), false);
    }

    /// `RELOADING=1`: a config reload has begun.
    pub fn reloading(&self) {
        self.send(
            &format!(
                "RELOADING=1\nSTATUS=reloading the config\nMONOTONIC_USEC={}",
                monotonic_usec()
            ),
            false,
        );
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=shutting down", true);
    }

    /// Sends `message` unless `STOPPING=1` went before it; `stopping` marks that message.
    fn send(&self, message: &str, stopping: bool) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        if *stopped {
            return;
        }
        *stopped = stopping;
        if let Some((socket, addr)) = &self.target
            && let Err(e) = socket.send_to_addr(message.as_bytes(), addr)
        {
            tracing::debug!("cannot notify the service manager: {e}");
        }
    }
}

/// Parses `$NOTIFY_SOCKET` and opens the socket to send from.
fn connect(value: &OsStr) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let bytes = value.as_bytes();
    let addr = match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(value))?,
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(&bytes[1..])?
        }
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor an @abstract name",
            ));
        }
    };
    let socket = UnixDatagram::unbound()?;
    // A stalled manager must not stall the daemon for long.
    socket.set_write_timeout(Some(SEND_TIMEOUT))?;
    Ok((socket, addr))
}

/// A status text must not end the message's line early.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` against.
fn monotonic_usec() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64)
            .saturating_mul(1_000_000)
            .saturating_add(t.tv_nsec() as u64 / 1000),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(Some(path.as_os_str()));
        assert!(n.is_active());
        n.ready("listening on 127.0.0.1:1\nsecond line");
        n.reloading();
        n.stopping();
        assert_eq!(
            recv(&listener),
            "READY=1\nSTATUS=listening on 127.0.0.1:1 second line"
        );
        let reloading = recv(&listener);
        assert!(reloading.starts_with("RELOADING=1\n"), "{reloading}");
        let usec: u64 = reloading
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(usec > 0 && usec <= monotonic_usec());
        assert!(recv(&listener).starts_with("STOPPING=1\n"));
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!(
            "deployhook-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::new(Some(OsStr::new(&format!("@{name}"))));
        n.stopping();
        assert!(recv(&listener).starts_with("STOPPING=1"));
    }

    #[test]
    fn nothing_is_sent_after_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(Some(path.as_os_str()));
        n.reloading();
        n.stopping();
        n.ready("late");
        n.reloading();
        n.stopping();
        assert!(recv(&listener).starts_with("RELOADING=1\n"));
        assert!(recv(&listener).starts_with("STOPPING=1\n"));
        listener.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        let r = listener
            .recv(&mut buf)
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
        assert_eq!(r.map_err(|e| e.kind()), Err(std::io::ErrorKind::WouldBlock));
    }

    #[test]
    fn no_or_bad_socket_sends_nothing() {
        assert!(!Notifier::new(None).is_active());
        assert!(!Notifier::new(Some(OsStr::new("relative/path"))).is_active());
        assert!(!Notifier::new(Some(OsStr::new(""))).is_active());
    }

    #[test]
    fn a_failed_send_is_dropped_and_later_ones_still_go_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let n = Notifier::new(Some(path.as_os_str()));
        assert!(n.is_active());
        // Nobody listens yet: the send fails, is logged, and is not kept for later.
        n.ready("nobody hears this");
        let listener = UnixDatagram::bind(&path).unwrap();
        n.stopping();
        assert!(recv(&listener).starts_with("STOPPING=1\n"));
        listener.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        assert_eq!(
            listener.recv(&mut buf).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::WouldBlock)
        );
    }
}
