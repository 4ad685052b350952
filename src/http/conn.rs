//! What the server knows about each open connection, below hyper.
//!
//! [`StrictIo`] wraps a connection's socket and watches the bytes hyper reads:
//! * It refuses bare-LF line endings in request heads (HOSTILE 1). httparse accepts a lone
//!   `\n` as a line end, as RFC 9112 permits, but a proxy in front that does not can be made
//!   to see other headers than we do, which is how requests are smuggled. A head with a lone
//!   `\n` fails the read and the connection closes. To know where heads are, it follows the
//!   framing hyper uses: `Content-Length` bodies are skipped; after a `Transfer-Encoding` body
//!   it stops looking, and the server closes such connections after their response.
//! * It tells the [`Registry`] whether the connection is between requests, so that when all
//!   connection slots are taken, the oldest connection that is not in the middle of a request
//!   is closed to make room (HOSTILE 7: a flood of idle or trickling connections must not lock
//!   out `/healthz` until the header timeout frees a slot).
//! * It reads a connection's first request head itself ([`StrictIo::read_first_head`]), so
//!   that a connection which has not spoken yet costs only the bytes it sent, not hyper's
//!   buffers (issue 12).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Largest head the framing tracker keeps to find `Content-Length` (hyper refuses larger
/// heads with 431 anyway).
const MAX_HEAD: usize = super::MAX_HEADER_BYTES + 1024;

/// Shared between a connection's socket wrapper, its request handlers and the registry.
#[derive(Debug, Default)]
pub struct Activity {
    /// Reading a request head (or waiting for one): nothing of a request is pending.
    in_head: AtomicBool,
    /// A head has been read and its handler has not started yet.
    unserved: AtomicBool,
    /// Handlers (and streaming response bodies) alive for this connection.
    in_flight: AtomicUsize,
    /// Set when a request used `Transfer-Encoding`: its response closes the connection.
    close_after: AtomicBool,
    /// The first read of the connection has been tried: whatever the client had sent by then
    /// was taken. Until then, closing it to make room could drop a request that
    /// is already waiting in the socket (see [`Registry::evict_oldest_idle`]).
    looked: AtomicBool,
    /// Set when a head had both `Transfer-Encoding` and `Content-Length` (HOSTILE 2): hyper
    /// would frame it as chunked and drop the length, but a proxy in front may have used the
    /// length, so the request is refused outright.
    ambiguous_framing: AtomicBool,
}

impl Activity {
    /// Whether closing the connection now would cut no request short.
    pub fn is_between_requests(&self) -> bool {
        self.in_head.load(Ordering::SeqCst)
            && !self.unserved.load(Ordering::SeqCst)
            && self.in_flight.load(Ordering::SeqCst) == 0
    }

    /// Marks a request as being handled until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.unserved.store(false, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Whether the current request's response must close the connection.
    pub fn must_close(&self) -> bool {
        self.close_after.load(Ordering::SeqCst)
    }

    /// Whether the current request's head had both `Content-Length` and
    /// `Transfer-Encoding`. Framing stops being tracked after such a head, so no later head
    /// can set it again: it belongs to the request being handled.
    pub fn has_ambiguous_framing(&self) -> bool {
        self.ambiguous_framing.load(Ordering::SeqCst)
    }
}

/// Keeps a connection counted as busy; move it into a streaming body to cover the stream.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
enum Framing {
    /// Reading a head.
    Head(HeadScan),
    /// Skipping this many body bytes.
    Body(u64),
    /// Chunked body seen: stop tracking (the connection closes after this request).
    Untracked,
}

/// What is known of the head being read, line by line as its bytes arrive.
///
/// Each byte is looked at once, and only a line that is split across reads is copied (into
/// `partial`, whose room is kept from head to head): the hot path reads whole heads in one
/// read, and copying every head to scan it again cost a measurable share of a request
/// (issue 17).
#[derive(Debug, Default)]
struct HeadScan {
    /// The start of a line whose end has not arrived yet (bounded by [`MAX_HEAD`]).
    partial: Vec<u8>,
    /// The byte before the first byte of the next read (to see `\r` before a `\n`).
    prev: u8,
    /// The request line has been seen (an empty line before it is not a head's end).
    started: bool,
    /// The last `Content-Length` value that parsed.
    length: u64,
    /// A `Content-Length` header came (parsable or not).
    has_length: bool,
    /// A `Transfer-Encoding` header came.
    chunked: bool,
}

impl HeadScan {
    /// Takes one complete line (without its `\r\n`); `true` when it ends the head.
    fn line(&mut self, line: &[u8]) -> bool {
        if line.is_empty() {
            // Empty lines before the request line (allowed by RFC 9112 §2.2) are not a head
            // at all; a head ends at its first empty line.
            return self.started;
        }
        if !self.started {
            // The request line: no header here.
            self.started = true;
            return false;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return false;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.chunked = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            self.has_length = true;
            if let Some(n) = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                self.length = n;
            }
        }
        false
    }

    /// How the body after the finished head is framed, as hyper will frame it:
    /// `Transfer-Encoding` wins over `Content-Length`; an unparsable length is left to hyper
    /// to refuse (it closes then).
    fn next(&self) -> Next {
        if self.chunked {
            Next::Chunked {
                with_length: self.has_length,
            }
        } else {
            Next::Length(self.length)
        }
    }

    /// Ready for the next head, keeping the room of `partial`.
    fn reset(&mut self) {
        let mut partial = std::mem::take(&mut self.partial);
        partial.clear();
        *self = HeadScan {
            partial,
            ..HeadScan::default()
        };
    }
}

/// A socket that refuses bare-LF heads and reports request boundaries (see the module doc).
pub struct StrictIo<T> {
    inner: T,
    framing: Framing,
    /// Kept while a body is skipped, so that its buffer's room serves the next head.
    spare: HeadScan,
    activity: Arc<Activity>,
    /// Bytes read by [`StrictIo::read_first_head`], handed to hyper before the socket's.
    early: Vec<u8>,
    /// How much of `early` hyper has taken.
    early_taken: usize,
}

impl<T> StrictIo<T> {
    /// Wraps a socket.
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        let mut io = Self {
            inner,
            framing: Framing::Untracked,
            spare: HeadScan::default(),
            activity,
            early: Vec::new(),
            early_taken: 0,
        };
        io.start_head();
        io
    }

    /// The next bytes are a request head (or nothing yet): the connection is between requests.
    fn start_head(&mut self) {
        let mut scan = std::mem::take(&mut self.spare);
        scan.reset();
        self.framing = Framing::Head(scan);
        self.activity.in_head.store(true, Ordering::SeqCst);
    }

    /// Follows the framing over newly read bytes; an error for a bare LF in a head.
    fn observe(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match &mut self.framing {
                Framing::Untracked => return Ok(()),
                Framing::Body(left) => {
                    let n = (*left).min(data.len() as u64) as usize;
                    *left -= n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        self.start_head();
                    }
                }
                Framing::Head(scan) => {
                    // Only the bytes at a `\n` matter: a head can only start over or end
                    // there, and each must follow a `\r`.
                    let mut end = None;
                    let mut i = 0;
                    while i < data.len() {
                        let rest = &data[i..];
                        let Some(k) = memchr::memchr(b'\n', rest) else {
                            push_bounded(&mut scan.partial, rest);
                            scan.prev = rest[rest.len() - 1];
                            break;
                        };
                        let before_lf = if k > 0 { rest[k - 1] } else { scan.prev };
                        if before_lf != b'\r' {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "bare LF in a request head",
                            ));
                        }
                        scan.prev = b'\n';
                        i += k + 1;
                        let ends = if scan.partial.is_empty() {
                            // The `\r` checked above is the line's last byte.
                            scan.line(rest[..k].strip_suffix(b"\r").unwrap_or(&rest[..k]))
                        } else {
                            let mut line = std::mem::take(&mut scan.partial);
                            push_bounded(&mut line, &rest[..k]);
                            // The `\r` is there: it was checked above.
                            line.pop();
                            let ends = scan.line(&line);
                            line.clear();
                            scan.partial = line;
                            ends
                        };
                        if ends {
                            end = Some(i);
                            break;
                        }
                    }
                    let Some(end) = end else {
                        return Ok(());
                    };
                    let next = scan.next();
                    self.spare = std::mem::take(scan);
                    data = &data[end..];
                    self.activity.unserved.store(true, Ordering::SeqCst);
                    self.activity.in_head.store(false, Ordering::SeqCst);
                    match next {
                        Next::Length(0) => self.start_head(),
                        Next::Length(n) => self.framing = Framing::Body(n),
                        Next::Chunked { with_length } => {
                            self.activity
                                .ambiguous_framing
                                .store(with_length, Ordering::SeqCst);
                            self.activity.close_after.store(true, Ordering::SeqCst);
                            self.framing = Framing::Untracked;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> StrictIo<T> {
    /// Reads until the first request head is complete (or past the head limit, or the end of
    /// the stream), into a buffer only as large as what arrived.
    ///
    /// hyper allocates 16 KiB of buffers for every connection it is given: a flood of
    /// connections that send nothing or trickle a head cost that much each, and the memory did
    /// not come back after they closed (issue 12). Handed over only once its first head is
    /// here, a connection costs what it sent until then. hyper then reads these bytes first.
    pub async fn read_first_head(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 2048];
        while !self.activity.unserved.load(Ordering::SeqCst) && self.early.len() <= MAX_HEAD {
            let (inner, activity) = (&mut self.inner, &self.activity);
            let n = std::future::poll_fn(|cx| {
                let mut buf = ReadBuf::new(&mut chunk);
                match Pin::new(&mut *inner).poll_read(cx, &mut buf) {
                    Poll::Ready(r) => Poll::Ready(r.map(|()| buf.filled().len())),
                    Poll::Pending => {
                        // Nothing (more) has arrived: the client has not sent its head yet.
                        activity.looked.store(true, Ordering::SeqCst);
                        Poll::Pending
                    }
                }
            })
            .await?;
            if n == 0 {
                break;
            }
            // Observed first: a complete head marks the connection busy before it counts as
            // looked at.
            let observed = self.observe(&chunk[..n]);
            self.activity.looked.store(true, Ordering::SeqCst);
            observed?;
            self.early.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }
}

/// Appends to a head, keeping at most [`MAX_HEAD`] bytes.
fn push_bounded(head: &mut Vec<u8>, bytes: &[u8]) {
    let room = MAX_HEAD.saturating_sub(head.len());
    head.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

enum Next {
    Length(u64),
    /// Chunked; `with_length` when a `Content-Length` header came too.
    Chunked {
        with_length: bool,
    },
}

impl<T: AsyncRead + Unpin> AsyncRead for StrictIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.early_taken < this.early.len() {
            // Already observed when it was read.
            let n = buf.remaining().min(this.early.len() - this.early_taken);
            buf.put_slice(&this.early[this.early_taken..this.early_taken + n]);
            this.early_taken += n;
            if this.early_taken == this.early.len() {
                (this.early, this.early_taken) = (Vec::new(), 0);
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && let Err(e) = this.observe(&buf.filled()[before..])
        {
            return Poll::Ready(Err(e));
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StrictIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

struct Entry {
    opened: Instant,
    activity: Arc<Activity>,
    evict: Arc<Notify>,
}

/// The open connections, so that one can be closed to make room.
///
/// A connection asked to close leaves the map at once but keeps its descriptor until its task
/// has dropped the socket, so the sockets still open are counted apart ([`Registry::open`]):
/// the accept loop waits for them, else a burst of accepts outruns the closes and the
/// process runs out of descriptors (EMFILE) below the cap.
#[derive(Default)]
pub struct Registry {
    conns: Mutex<HashMap<u64, Entry>>,
    next: std::sync::atomic::AtomicU64,
    /// Sockets not yet dropped, evicted ones included.
    open: AtomicUsize,
    /// Notified whenever a socket is dropped.
    closed: Notify,
}

/// A connection's place in the registry; removes it on drop.
pub struct Registered {
    registry: Arc<Registry>,
    id: u64,
    /// Notified when the connection should close to make room.
    pub evict: Arc<Notify>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.conns.lock() {
            m.remove(&self.id);
        }
        self.registry.open.fetch_sub(1, Ordering::SeqCst);
        self.registry.closed.notify_one();
    }
}

impl Registry {
    /// Number of open connections (not asked to close).
    pub fn len(&self) -> usize {
        self.conns.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sockets still open, those asked to close included.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Whether a connection asked to close still holds its socket.
    pub fn is_closing(&self) -> bool {
        self.open() > self.len()
    }

    /// Waits until a socket is dropped (returns at once if one was since the last wait).
    pub async fn wait_closed(&self) {
        self.closed.notified().await;
    }

    /// Adds a connection.
    pub fn register(self: &Arc<Self>, activity: Arc<Activity>) -> Registered {
        self.open.fetch_add(1, Ordering::SeqCst);
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let evict = Arc::new(Notify::new());
        if let Ok(mut m) = self.conns.lock() {
            m.insert(
                id,
                Entry {
                    opened: Instant::now(),
                    activity,
                    evict: evict.clone(),
                },
            );
        }
        Registered {
            registry: self.clone(),
            id,
            evict,
        }
    }

    /// Asks the oldest idle connection to close: one that is between requests and has been
    /// open [`MIN_IDLE_AGE`] once its first read was tried, or [`FIRST_READ_GRACE`] if that
    /// read has not been tried yet. A client that just connected has usually written its
    /// request already, or is about to: closing it then turned a slow moment into a failed
    /// request (a burst at the cap, EMFILE while builds started; issue 11). But a grace in
    /// time alone, before the first read, let a few hundred queued connections through at
    /// only a few dozen per grace period, so `/healthz` behind them waited seconds (issue 11:
    /// 6.8 s at nofile 64 with twelve builds holding their descriptors).
    pub fn evict_oldest_idle(&self, now: Instant) -> Eviction {
        let Ok(mut m) = self.conns.lock() else {
            return Eviction::Nothing;
        };
        let mut victim: Option<(u64, Instant)> = None;
        let mut soonest: Option<Duration> = None;
        let mut unread = false;
        for (id, e) in m.iter() {
            if !e.activity.is_between_requests() {
                continue;
            }
            let needed = if e.activity.looked.load(Ordering::SeqCst) {
                MIN_IDLE_AGE
            } else {
                unread = true;
                FIRST_READ_GRACE
            };
            let age = now.saturating_duration_since(e.opened);
            if age >= needed {
                if victim.is_none_or(|(_, opened)| e.opened < opened) {
                    victim = Some((*id, e.opened));
                }
            } else {
                soonest = Some(soonest.map_or(needed - age, |s| s.min(needed - age)));
            }
        }
        match victim.and_then(|(id, _)| m.remove(&id)) {
            Some(e) => {
                // notify_one stores a permit, so the connection sees it even if it is not
                // waiting at this instant.
                e.evict.notify_one();
                Eviction::Evicted
            }
            None => soonest.map_or(Eviction::Nothing, |after| Eviction::NotYet {
                after,
                unread,
            }),
        }
    }
}

/// What [`Registry::evict_oldest_idle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// A connection was asked to close.
    Evicted,
    /// None is idle long enough yet.
    NotYet {
        /// When the first will be.
        after: Duration,
        /// Whether one of them waits for its first read (after which, if it sent no
        /// complete head, it may be closed sooner).
        unread: bool,
    },
    /// None is idle.
    Nothing,
}

/// How long a connection must have been open, once its first read was tried and found no
/// complete head, before it may be closed to make room: a client that has connected but not
/// yet written its request (microseconds, more on a loaded machine) is not idle.
pub const MIN_IDLE_AGE: Duration = Duration::from_millis(50);
/// How long a connection may wait for its first read before it may be closed to make room.
pub const FIRST_READ_GRACE: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> StrictIo<()> {
        StrictIo::new((), Arc::new(Activity::default()))
    }

    #[test]
    fn crlf_heads_pass_and_bare_lf_fails() {
        let mut s = io();
        assert!(s.observe(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_ok());
        assert!(
            s.observe(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_ok(),
            "keep-alive second request"
        );
        let mut s = io();
        assert!(s.observe(b"GET / HTTP/1.1\nHost: x\n\n").is_err());
        let mut s = io();
        assert!(
            s.observe(b"GET / HTTP/1.1\r\nHost: x\nFoo: y\r\n\r\n")
                .is_err()
        );
    }

    #[test]
    fn bare_lf_split_across_reads_is_caught() {
        let mut s = io();
        assert!(s.observe(b"GET / HTTP/1.1\r").is_ok());
        assert!(s.observe(b"\nHost: x").is_ok());
        assert!(s.observe(b"\n").is_err());
    }

    #[test]
    fn content_length_bodies_are_skipped() {
        let mut s = io();
        // The body holds bare LFs: it is not a head.
        assert!(
            s.observe(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\na\nb\nc")
                .is_ok()
        );
        assert!(s.activity.in_head.load(Ordering::SeqCst));
        // The next head is checked again.
        assert!(s.observe(b"GET / HTTP/1.1\nHost: x\n\n").is_err());
    }

    #[test]
    fn chunked_bodies_stop_tracking_and_mark_the_connection() {
        let mut s = io();
        assert!(
            s.observe(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\na\nb\nc\r\n0\r\n\r\n"
            )
            .is_ok()
        );
        assert!(s.activity.must_close());
    }

    #[test]
    fn heads_are_followed_whatever_the_read_sizes() {
        let two = b"\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\n\r\na\nbGET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for size in 1..two.len() {
            let mut s = io();
            for chunk in two.chunks(size) {
                assert!(s.observe(chunk).is_ok(), "reads of {size} bytes");
            }
            assert!(s.activity.in_head.load(Ordering::SeqCst), "reads of {size}");
            assert!(
                matches!(&s.framing, Framing::Head(h) if h.partial.is_empty() && !h.started),
                "both heads ended, reads of {size} bytes"
            );
            let mut s = io();
            let bad = b"GET / HTTP/1.1\r\nHost: x\r\nA: b\n\r\n";
            let failed = bad.chunks(size).any(|c| s.observe(c).is_err());
            assert!(failed, "bare LF caught with reads of {size} bytes");
        }
    }

    #[test]
    fn leading_empty_lines_are_not_heads() {
        let mut s = io();
        assert!(
            s.observe(b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .is_ok()
        );
    }

    #[test]
    fn between_requests_means_no_head_pending_and_no_handler() {
        let a = Arc::new(Activity::default());
        let mut s = StrictIo::new((), a.clone());
        assert!(a.is_between_requests(), "a fresh connection is idle");
        s.observe(b"GET / HTT").unwrap();
        assert!(
            a.is_between_requests(),
            "a head in progress can be dropped (slowloris)"
        );
        s.observe(b"P/1.1\r\n\r\n").unwrap();
        assert!(
            !a.is_between_requests(),
            "a complete head waits for its handler"
        );
        let g = a.begin();
        assert!(!a.is_between_requests());
        drop(g);
        assert!(a.is_between_requests());
        s.observe(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\na")
            .unwrap();
        let g = a.begin();
        drop(g);
        assert!(!a.is_between_requests(), "mid-body");
    }

    #[test]
    fn the_oldest_idle_connection_is_evicted() {
        let r = Arc::new(Registry::default());
        let busy = Arc::new(Activity::default());
        let _guard = busy.begin();
        let b = r.register(busy);
        let o = r.register(idle());
        let n = r.register(idle());
        assert_eq!(r.len(), 3);
        assert!(evicts(&r, any_age()));
        assert_eq!(r.len(), 2);
        // The old idle one was told; the busy one and the newer one were not.
        assert!(futures_ready(&o.evict));
        assert!(!futures_ready(&b.evict));
        assert!(!futures_ready(&n.evict));
        assert!(evicts(&r, any_age()));
        assert!(!evicts(&r, any_age()), "only the busy one is left");
    }

    /// Regression: at nofile 64, EMFILE while builds started closed the one connection just
    /// accepted (a trigger whose request was already in the socket) without an answer.
    #[test]
    fn a_connection_just_opened_is_not_evicted_under_descriptor_pressure() {
        let r = Arc::new(Registry::default());
        let n = r.register(idle());
        let now = Instant::now();
        assert!(matches!(
            r.evict_oldest_idle(now),
            Eviction::NotYet { after, unread: true } if after <= FIRST_READ_GRACE
        ));
        assert!(!futures_ready(&n.evict));
        assert!(evicts(&r, now + FIRST_READ_GRACE));
    }

    /// A new connection may be closed once its first read found no complete head and it has
    /// been open `MIN_IDLE_AGE`; one whose head was there is never closed.
    #[tokio::test]
    async fn under_pressure_a_connection_can_be_closed_once_it_was_read() {
        use tokio::io::AsyncWriteExt as _;
        let r = Arc::new(Registry::default());
        let now = Instant::now();
        // Silent: evictable after its first (pending) read, once it is old enough.
        let (_client, server) = tokio::io::duplex(1024);
        let silent = Arc::new(Activity::default());
        let _reg = r.register(silent.clone());
        let mut io = StrictIo::new(server, silent.clone());
        assert!(
            matches!(
                r.evict_oldest_idle(now + MIN_IDLE_AGE),
                Eviction::NotYet { unread: true, .. }
            ),
            "unread"
        );
        let read = tokio::time::timeout(std::time::Duration::from_millis(50), io.read_first_head());
        assert!(read.await.is_err(), "nothing to read");
        assert!(
            matches!(
                r.evict_oldest_idle(now),
                Eviction::NotYet { unread: false, .. }
            ),
            "read, silent, young"
        );
        assert!(evicts(&r, Instant::now() + MIN_IDLE_AGE), "read, silent");
        // Its request already waiting: read whole, and busy, never evictable.
        let (mut client, server) = tokio::io::duplex(1024);
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let spoke = Arc::new(Activity::default());
        let _reg = r.register(spoke.clone());
        let mut io = StrictIo::new(server, spoke.clone());
        io.read_first_head().await.unwrap();
        assert!(spoke.looked.load(Ordering::SeqCst));
        assert!(!evicts(&r, any_age()), "busy");
    }

    #[tokio::test]
    async fn the_first_head_is_read_outside_hyper_and_handed_back_whole() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let activity = Arc::new(Activity::default());
        let mut io = StrictIo::new(server, activity.clone());
        let sent = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n";
        client.write_all(&sent[..10]).await.unwrap();
        let reader = tokio::spawn(async move {
            io.read_first_head().await.unwrap();
            io
        });
        tokio::task::yield_now().await;
        client.write_all(&sent[10..]).await.unwrap();
        let mut io = reader.await.unwrap();
        assert!(
            !activity.is_between_requests(),
            "a head is waiting for hyper"
        );
        assert!(
            io.early.len() < 1024,
            "read in small pieces, not hyper's 8 KiB"
        );
        drop(client);
        let mut back = Vec::new();
        io.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, sent, "hyper sees every byte, once, in order");
        // A bare LF is refused before hyper ever sees the connection.
        let (mut client, server) = tokio::io::duplex(1024);
        let mut io = StrictIo::new(server, Arc::new(Activity::default()));
        client
            .write_all(b"GET / HTTP/1.1\nHost: x\n\n")
            .await
            .unwrap();
        assert!(io.read_first_head().await.is_err());
    }

    #[test]
    fn an_evicted_connection_counts_as_open_until_its_socket_is_dropped() {
        let r = Arc::new(Registry::default());
        let a = r.register(idle());
        let _b = r.register(Arc::new(Activity::default()));
        assert_eq!((r.len(), r.open()), (2, 2));
        assert!(!r.is_closing());
        assert!(evicts(&r, any_age()));
        assert_eq!((r.len(), r.open()), (1, 2), "asked to close, still open");
        assert!(r.is_closing());
        drop(a);
        assert_eq!((r.len(), r.open()), (1, 1));
        assert!(!r.is_closing());
        assert!(futures_ready(&r.closed), "the close was announced");
    }

    /// The activity of a connection idle between requests, waiting for a head.
    /// An instant long after every connection of the test was opened: any idle one may be
    /// evicted.
    fn any_age() -> Instant {
        Instant::now() + std::time::Duration::from_secs(1)
    }

    fn evicts(r: &Registry, now: Instant) -> bool {
        r.evict_oldest_idle(now) == Eviction::Evicted
    }

    fn idle() -> Arc<Activity> {
        let a = Arc::new(Activity::default());
        a.in_head.store(true, Ordering::SeqCst);
        a
    }

    fn futures_ready(n: &Notify) -> bool {
        use std::future::Future as _;
        let f = n.notified();
        tokio::pin!(f);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        f.as_mut().poll(&mut cx).is_ready()
    }
}
