//! Build logs: one capped, append-only NDJSON file per build under `state_dir/logs/`.
//!
//! Each line of the file is exactly the line object the logs API returns,
//! `{"n":0,"ts":"…","stream":"stdout","line":"…"}`, so serving a page is reading lines, not
//! re-encoding them. Logs live in plain files rather than sled: bulk text would inflate sled's
//! space amplification and crowd its page cache, and a file can be read while it grows.
//!
//! Output is cut into lines of at most [`MAX_LINE_BYTES`]: one unterminated 1 GB "line" becomes
//! many 64 KiB lines instead of a 1 GB allocation. Bytes that are not UTF-8 are replaced with
//! U+FFFD. Once the file would pass `max_log_bytes`, one `system` line says so, and everything
//! after is dropped, while the build keeps running and its pipes keep being drained so it never
//! blocks on a full pipe.
//!
//! One writer thread per build owns the file ([`LogWriter`]); readers (the API, followers) open
//! the file themselves and only ever consume complete lines, so a half-written line is never
//! served.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::model::{BuildId, Timestamp};

/// Longest line kept as one; longer output is split.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The command's standard output.
    Stdout,
    /// The command's standard error.
    Stderr,
    /// deployhook itself (checkout, cancel, timeout, truncation).
    System,
}

/// The path of a build's log file.
pub fn log_path(state_dir: &Path, id: BuildId) -> PathBuf {
    state_dir.join("logs").join(format!("{id}.log"))
}

#[derive(Serialize)]
struct LineRecord<'a> {
    n: u64,
    ts: String,
    stream: Stream,
    line: &'a str,
}

/// Counters shared between the writer and readers of a live log.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Lines written.
    pub lines: AtomicU64,
    /// Bytes in the file.
    pub bytes: AtomicU64,
    /// Whether output has been dropped at the cap.
    pub truncated: AtomicBool,
}

/// A message to the writer thread.
#[derive(Debug)]
pub enum LogMsg {
    /// One line of output (already cut to at most [`MAX_LINE_BYTES`]).
    Line(Stream, Vec<u8>),
}

/// The sending side of a build log: cheap to clone, used by the pipe readers and the runner.
#[derive(Clone)]
pub struct LogSender {
    tx: mpsc::Sender<LogMsg>,
    stats: Arc<LogStats>,
}

impl LogSender {
    /// Queues a line; waits while the writer is behind (backpressure bounds memory).
    pub async fn line(&self, stream: Stream, bytes: Vec<u8>) {
        if self.stats.truncated.load(Ordering::Relaxed) && stream != Stream::System {
            // Past the cap: drop here, without even a channel hop.
            return;
        }
        let _ = self.tx.send(LogMsg::Line(stream, bytes)).await;
    }

    /// Queues a `system` line.
    pub async fn system(&self, text: impl Into<String>) {
        self.line(Stream::System, text.into().into_bytes()).await;
    }

    /// Whether output is being dropped.
    pub fn truncated(&self) -> bool {
        self.stats.truncated.load(Ordering::Relaxed)
    }
}

/// Final figures of a finished log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogSummary {
    /// Lines in the file.
    pub lines: u64,
    /// Bytes in the file.
    pub bytes: u64,
    /// Whether output was dropped.
    pub truncated: bool,
}

/// A live log: the writer thread's result plus what followers watch.
pub struct LogWriter {
    /// The writer thread's figures, sent as it ends. Awaited rather than joined: joining
    /// needs a thread of its own, and at the service's task limit there may be none.
    done: Option<tokio::sync::oneshot::Receiver<LogSummary>>,
    /// Number of complete lines in the file; followers wait on changes.
    pub lines: watch::Receiver<u64>,
    /// Shared counters.
    pub stats: Arc<LogStats>,
}

impl LogWriter {
    /// Creates (or appends to) the log file and starts its writer thread.
    pub fn create(path: &Path, max_bytes: u64) -> std::io::Result<(LogWriter, LogSender)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let existing = file.metadata()?.len();
        let existing_lines = if existing > 0 { count_lines(path)? } else { 0 };
        let stats = Arc::new(LogStats::default());
        stats.lines.store(existing_lines, Ordering::Relaxed);
        stats.bytes.store(existing, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(256);
        let (lines_tx, lines_rx) = watch::channel(existing_lines);
        let thread_stats = stats.clone();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("deployhook-log".into())
            .spawn(move || {
                let summary = write_loop(file, rx, lines_tx, thread_stats, max_bytes);
                let _ = done_tx.send(summary);
            })?;
        Ok((
            LogWriter {
                done: Some(done),
                lines: lines_rx,
                stats: stats.clone(),
            },
            LogSender { tx, stats },
        ))
    }

    /// Waits until every sender is dropped and the file is complete; returns its figures.
    pub async fn finish(mut self) -> LogSummary {
        let Some(done) = self.done.take() else {
            return LogSummary::default();
        };
        done.await.unwrap_or_default()
    }
}

fn write_loop(
    file: File,
    mut rx: mpsc::Receiver<LogMsg>,
    lines_tx: watch::Sender<u64>,
    stats: Arc<LogStats>,
    max_bytes: u64,
) -> LogSummary {
    let mut log = LogFile::new(
        file,
        stats.lines.load(Ordering::Relaxed),
        stats.bytes.load(Ordering::Relaxed),
        max_bytes,
    );
    let publish = |log: &LogFile<File>| {
        stats.lines.store(log.lines, Ordering::Relaxed);
        stats.bytes.store(log.bytes, Ordering::Relaxed);
        if log.output_dropped() {
            // The senders stop sending output: the file cannot take it.
            stats.truncated.store(true, Ordering::Relaxed);
        }
        lines_tx.send_replace(log.lines);
    };
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(LogMsg::Line(stream, raw)) = next.take() {
            log.line(stream, &raw);
            next = rx.try_recv().ok();
        }
        // The channel is empty for now: make what we have visible to readers.
        log.flush();
        publish(&log);
    }
    log.finish();
    let _ = log.file.sync_data();
    publish(&log);
    log.summary()
}

/// Where a log's bytes go: the file, or a fake in tests.
trait Sink {
    /// Appends `buf` at the end.
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()>;
    /// Cuts the file back to `len` bytes (a write that failed half way).
    fn cut(&mut self, len: u64) -> std::io::Result<()>;
    /// Allocates the disk space of bytes `from..from + len` without changing the file's
    /// size, so that writes there cannot fail for want of space; `Unsupported` where the
    /// file system cannot.
    fn reserve(&mut self, from: u64, len: u64) -> std::io::Result<()>;
}

impl Sink for File {
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        // Opened in append mode: every write goes to the end, even after a cut.
        self.write_all(buf)
    }

    fn cut(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)
    }

    fn reserve(&mut self, from: u64, len: u64) -> std::io::Result<()> {
        use nix::fcntl::{FallocateFlags, fallocate};
        let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) else {
            return Err(std::io::ErrorKind::InvalidInput.into());
        };
        match fallocate(&*self, FallocateFlags::FALLOC_FL_KEEP_SIZE, from, len) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => Err(std::io::ErrorKind::Unsupported.into()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Disk space kept allocated past the last batch for the `system` line that says output was
/// lost (which is at most a few hundred bytes): without it, a disk that filled up exactly at
/// a block boundary had no room left for that line, and the log looked complete (issue 12;
/// 1 run in 10 of the full-disk test).
const LOSS_NOTE_ROOM: u64 = 1024;

/// The writer's state: lines are numbered and buffered, and written in batches.
///
/// Only whole lines ever stay in the file: when a write fails (disk full, file size limit),
/// the file is cut back to its last complete line, the output from there on is dropped
/// (counted, and `truncated` is set, so the record says output was lost), and a `system` line
/// says so as soon as the file takes one: at once if it can, else before the next `system`
/// line or at the end of the build (issue 12).
struct LogFile<W> {
    file: W,
    /// Lines in the file, written or buffered.
    lines: u64,
    /// Bytes in the file, written or buffered.
    bytes: u64,
    /// Lines and bytes known to be on file.
    written: (u64, u64),
    /// Encoded lines not written yet.
    pending: Vec<u8>,
    max_bytes: u64,
    /// Output dropped at `max_bytes`.
    truncated: bool,
    /// Why the file could not be written, once it could not.
    failure: Option<String>,
    /// Lines dropped because the file could not take them.
    lost: u64,
    /// Whether a `system` line has said that output is lost.
    loss_told: bool,
    /// Scratch space for encoding one line.
    buf: Vec<u8>,
    /// Whether the file system takes [`Sink::reserve`] (until it says it does not).
    can_reserve: bool,
}

/// Batches are written once they hold this much, or when the channel is empty.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

impl<W: Sink> LogFile<W> {
    fn new(file: W, lines: u64, bytes: u64, max_bytes: u64) -> Self {
        Self {
            file,
            lines,
            bytes,
            written: (lines, bytes),
            pending: Vec::with_capacity(WRITE_BATCH_BYTES),
            max_bytes,
            truncated: false,
            failure: None,
            lost: 0,
            loss_told: false,
            buf: Vec::with_capacity(MAX_LINE_BYTES + 256),
            can_reserve: true,
        }
    }

    /// Whether output (not `system` lines) is being dropped now.
    fn output_dropped(&self) -> bool {
        self.truncated || self.failure.is_some()
    }

    fn line(&mut self, stream: Stream, raw: &[u8]) {
        if stream != Stream::System && self.failure.is_some() {
            self.lost += 1;
            return;
        }
        if stream != Stream::System && self.truncated {
            return;
        }
        if stream == Stream::System {
            self.tell_loss();
        }
        let text = String::from_utf8_lossy(raw);
        self.buf.clear();
        encode_line(&mut self.buf, self.lines, stream, &text);
        let room = self.max_bytes.saturating_sub(self.bytes);
        if stream != Stream::System
            && !self.truncated
            && self.buf.len() as u64 + TRUNCATION_RESERVE > room
        {
            self.truncated = true;
            self.buf.clear();
            let note = format!(
                "log truncated: it reached max_log_bytes ({} bytes); further output is discarded while the build runs",
                self.max_bytes
            );
            encode_line(&mut self.buf, self.lines, Stream::System, &note);
        }
        self.pending.extend_from_slice(&self.buf);
        self.lines += 1;
        self.bytes += self.buf.len() as u64;
        if self.pending.len() >= WRITE_BATCH_BYTES || stream == Stream::System {
            self.flush();
        }
    }

    /// Writes the batch; on failure, cuts the file back to whole lines and drops the batch.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // Without room nothing is written (and nothing is cut: that would give back the room
        // kept for the note).
        let r = match self.reserve_room() {
            Ok(()) => self.file.append(&self.pending).map_err(|e| (e, true)),
            Err(e) => Err((e, false)),
        };
        match r {
            Ok(()) => self.written = (self.lines, self.bytes),
            Err((e, written)) => {
                let (lines, bytes) = self.written;
                self.lost += self.lines - lines;
                (self.lines, self.bytes) = (lines, bytes);
                // Part of the batch may have landed; a partial line must never be served.
                if written {
                    let _ = self.file.cut(bytes);
                }
                if self.failure.is_none() {
                    self.failure = Some(e.to_string());
                }
            }
        }
        self.pending.clear();
        self.tell_loss();
    }

    /// Allocates room for the batch and, past it, for the loss note ([`LOSS_NOTE_ROOM`]). When
    /// that fails the batch is dropped unwritten (with up to that much output that might still
    /// have fitted), and the note goes into the room kept by the previous batch.
    fn reserve_room(&mut self) -> std::io::Result<()> {
        // Once output is lost the note needs no more room than it has: `system` lines after
        // it are written if they fit.
        if !self.can_reserve || self.failure.is_some() {
            return Ok(());
        }
        let (_, on_file) = self.written;
        match self
            .file
            .reserve(on_file, self.pending.len() as u64 + LOSS_NOTE_ROOM)
        {
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                // Then a note may find no room (see `tell_loss`): the record still says so.
                self.can_reserve = false;
                Ok(())
            }
            r => r,
        }
    }

    /// Writes the `system` line saying that output was lost, if it is due and the file takes it.
    fn tell_loss(&mut self) {
        let Some(why) = &self.failure else { return };
        // Nothing is buffered once the file has failed (output is dropped, `system` lines are
        // written at once), so the note lands in its place.
        if self.loss_told || !self.pending.is_empty() {
            return;
        }
        let note = format!(
            "log output lost: the log file could not be written ({why}); {} lines were dropped and further output is discarded",
            self.lost
        );
        let mut buf = Vec::new();
        encode_line(&mut buf, self.lines, Stream::System, &note);
        if self.file.append(&buf).is_ok() {
            self.lines += 1;
            self.bytes += buf.len() as u64;
            self.written = (self.lines, self.bytes);
            self.loss_told = true;
        } else {
            let _ = self.file.cut(self.bytes);
        }
    }

    /// The build is over: the last batch, and the loss note if it is still owed.
    fn finish(&mut self) {
        self.flush();
        self.tell_loss();
        if self.can_reserve {
            // Gives back the room kept past the end.
            let _ = self.file.cut(self.written.1);
        }
    }

    fn summary(&self) -> LogSummary {
        LogSummary {
            lines: self.lines,
            bytes: self.bytes,
            truncated: self.output_dropped(),
        }
    }
}

/// Room kept below the cap for the truncation notice itself and a few system lines after it
/// (cancel, timeout), so they are never lost to the cap.
const TRUNCATION_RESERVE: u64 = 2048;

fn encode_line(buf: &mut Vec<u8>, n: u64, stream: Stream, line: &str) {
    let rec = LineRecord {
        n,
        ts: Timestamp::now().rfc3339(),
        stream,
        line,
    };
    // Serializing a struct of strings and numbers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, &rec);
    buf.push(b'\n');
}

/// How long [`create_log`] keeps trying while the process is out of descriptors.
const CREATE_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// [`LogWriter::create`], tried again for a few seconds while the process is out of file
/// descriptors (EMFILE, ENFILE): under a connection flood the server closes idle connections
/// to make room, and a build should not fail for a descriptor that comes back moments later.
pub async fn create_log(path: &Path, max_bytes: u64) -> std::io::Result<(LogWriter, LogSender)> {
    let deadline = tokio::time::Instant::now() + CREATE_RETRY_FOR;
    let mut pause = std::time::Duration::from_millis(20);
    loop {
        match LogWriter::create(path, max_bytes) {
            Err(e) if out_of_descriptors(&e) && tokio::time::Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(c) if c == nix::errno::Errno::EMFILE as i32 || c == nix::errno::Errno::ENFILE as i32
    )
}

/// For a build that cannot run because its log could not be created (`error`): writes a
/// `system` line saying so into the log, trying for a few seconds as [`create_log`] does.
/// If even that cannot be written, the figures say `truncated`, so the build never shows an
/// empty log that looks clean (issue 12).
pub async fn record_unwritable(path: &Path, error: &std::io::Error) -> LogSummary {
    let note = format!("cannot write the build log ({error}); the build did not run");
    let deadline = tokio::time::Instant::now() + CREATE_RETRY_FOR;
    let mut pause = std::time::Duration::from_millis(20);
    loop {
        match append_system_line(path, &note) {
            Ok(summary) => return summary,
            Err(_) if tokio::time::Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
            Err(_) => {
                return LogSummary {
                    truncated: true,
                    ..LogSummary::default()
                };
            }
        }
    }
}

/// Appends one `system` line to a log that no writer owns (startup recovery). Returns the
/// file's new figures.
pub fn append_system_line(path: &Path, text: &str) -> std::io::Result<LogSummary> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let n = if path.exists() { count_lines(path)? } else { 0 };
    let mut buf = Vec::new();
    encode_line(&mut buf, n, Stream::System, text);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&buf)?;
    f.sync_data()?;
    Ok(LogSummary {
        lines: n + 1,
        bytes: f.metadata()?.len(),
        truncated: false,
    })
}

fn count_lines(path: &Path) -> std::io::Result<u64> {
    let mut r = BufReader::new(File::open(path)?);
    let mut n = 0;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(n);
        }
        n += buf.iter().filter(|b| **b == b'\n').count() as u64;
        let len = buf.len();
        r.consume(len);
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE_BYTES`], without ever holding more
/// than that plus one read.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes; calls `emit` for each complete (or over-long) line, without its newline.
    pub fn feed(&mut self, mut data: &[u8], mut emit: impl FnMut(Vec<u8>)) {
        while !data.is_empty() {
            let room = MAX_LINE_BYTES - self.pending.len();
            let window = &data[..data.len().min(room + 1)];
            if let Some(i) = window.iter().position(|b| *b == b'\n') {
                self.pending.extend_from_slice(&data[..i]);
                let mut line = std::mem::take(&mut self.pending);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                emit(line);
                data = &data[i + 1..];
            } else if data.len() < room {
                self.pending.extend_from_slice(data);
                return;
            } else {
                // No newline within the limit: cut at a UTF-8 boundary near it.
                self.pending.extend_from_slice(&data[..room]);
                data = &data[room..];
                let cut = utf8_cut(&self.pending);
                let rest = self.pending.split_off(cut);
                emit(std::mem::replace(&mut self.pending, rest));
            }
        }
    }

    /// Emits whatever is left at end of stream.
    pub fn finish(&mut self, mut emit: impl FnMut(Vec<u8>)) {
        if !self.pending.is_empty() {
            emit(std::mem::take(&mut self.pending));
        }
    }
}

/// Where to cut `buf` so that a multi-byte UTF-8 character is not split (at most 3 bytes
/// earlier than its end; the end itself when the tail is not UTF-8 anyway).
fn utf8_cut(buf: &[u8]) -> usize {
    let len = buf.len();
    // The start of the last character: at most three continuation bytes back.
    let Some(start) = (len.saturating_sub(4)..len)
        .rev()
        .find(|&i| buf[i] & 0xC0 != 0x80)
    else {
        return len;
    };
    let need = match buf[start] {
        b if b < 0x80 => 1,
        b if b & 0xE0 == 0xC0 => 2,
        b if b & 0xF0 == 0xE0 => 3,
        b if b & 0xF8 == 0xF0 => 4,
        _ => return len,
    };
    if len - start >= need || start == 0 {
        len
    } else {
        start
    }
}

/// A page of log lines read from a file.
#[derive(Debug, Default)]
pub struct LogPage {
    /// Raw NDJSON lines (each a JSON object, without the newline).
    pub lines: Vec<String>,
    /// Line number to continue from.
    pub next_cursor: u64,
    /// Whether the page reached the end of the complete lines in the file.
    pub at_end: bool,
}

/// Reads up to `max_lines` complete lines starting at line `cursor`, and at most about
/// `max_bytes` of them (at least one line is returned if there is one).
pub fn read_page(
    path: &Path,
    cursor: u64,
    max_lines: usize,
    max_bytes: usize,
) -> std::io::Result<LogPage> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(LogPage {
                lines: Vec::new(),
                next_cursor: cursor,
                at_end: true,
            });
        }
        Err(e) => return Err(e),
    };
    let mut r = BufReader::with_capacity(64 * 1024, file);
    let mut n = 0u64;
    // Skip `cursor` lines.
    while n < cursor {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(LogPage {
                lines: Vec::new(),
                next_cursor: n,
                at_end: true,
            });
        }
        let mut consumed = buf.len();
        for (i, b) in buf.iter().enumerate() {
            if *b == b'\n' {
                n += 1;
                if n == cursor {
                    consumed = i + 1;
                    break;
                }
            }
        }
        r.consume(consumed);
    }
    let mut lines = Vec::new();
    let mut total = 0usize;
    let mut line = Vec::new();
    let mut at_end = false;
    while lines.len() < max_lines && (total < max_bytes || lines.is_empty()) {
        line.clear();
        let got = r.read_until(b'\n', &mut line)?;
        if got == 0 || line.last() != Some(&b'\n') {
            // End of file, or a line still being written: stop before it.
            at_end = true;
            break;
        }
        line.pop();
        total += line.len();
        lines.push(String::from_utf8_lossy(&line).into_owned());
        n += 1;
    }
    if !at_end && r.fill_buf()?.is_empty() {
        at_end = true;
    }
    Ok(LogPage {
        lines,
        next_cursor: n,
        at_end,
    })
}

/// Byte offset just past line `cursor - 1` (used by followers to avoid rescanning).
pub fn offset_of_line(path: &Path, cursor: u64) -> std::io::Result<u64> {
    let mut r = BufReader::new(File::open(path)?);
    let mut n = 0;
    let mut off = 0u64;
    while n < cursor {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let mut consumed = buf.len();
        for (i, b) in buf.iter().enumerate() {
            if *b == b'\n' {
                n += 1;
                if n == cursor {
                    consumed = i + 1;
                    break;
                }
            }
        }
        off += consumed as u64;
        r.consume(consumed);
    }
    Ok(off)
}

/// Reads complete lines from byte `offset`; returns them and the new offset.
pub fn read_from_offset(
    path: &Path,
    offset: u64,
    max_bytes: usize,
) -> std::io::Result<(Vec<String>, u64)> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut r = BufReader::with_capacity(64 * 1024, f);
    let mut lines = Vec::new();
    let mut off = offset;
    let mut total = 0usize;
    let mut line = Vec::new();
    while total < max_bytes {
        line.clear();
        let got = r.read_until(b'\n', &mut line)?;
        if got == 0 || line.last() != Some(&b'\n') {
            break;
        }
        off += got as u64;
        line.pop();
        total += line.len();
        lines.push(String::from_utf8_lossy(&line).into_owned());
    }
    Ok((lines, off))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |l| out.push(l));
        }
        s.finish(|l| out.push(l));
        out
    }

    #[test]
    fn splits_on_newlines_across_reads() {
        let out = split_all(&[b"ab", b"c\nde", b"f\r\n\ng"]);
        assert_eq!(
            out,
            vec![
                b"abc".to_vec(),
                b"def".to_vec(),
                b"".to_vec(),
                b"g".to_vec()
            ]
        );
    }

    #[test]
    fn long_lines_are_cut_at_64k() {
        let big = vec![b'x'; MAX_LINE_BYTES * 2 + 10];
        let out = split_all(&[&big, b"\n"]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].len(), MAX_LINE_BYTES);
        assert_eq!(out[1].len(), MAX_LINE_BYTES);
        assert_eq!(out[2].len(), 10);
    }

    #[test]
    fn cuts_do_not_split_utf8_characters() {
        let mut data = vec![b'x'; MAX_LINE_BYTES - 1];
        data.extend_from_slice("é".as_bytes()); // 2 bytes straddling the limit
        data.extend_from_slice(b"yz");
        let out = split_all(&[&data]);
        assert_eq!(out[0].len(), MAX_LINE_BYTES - 1);
        assert_eq!(out[1], "éyz".as_bytes());
        for l in &out {
            assert!(std::str::from_utf8(l).is_ok());
        }
    }

    #[test]
    fn line_exactly_at_the_limit_with_newline_is_one_line() {
        let mut data = vec![b'x'; MAX_LINE_BYTES];
        data.push(b'\n');
        let out = split_all(&[&data]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_LINE_BYTES);
    }

    #[tokio::test]
    async fn writer_numbers_lines_and_caps_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/x.log");
        let (w, s) = LogWriter::create(&path, 4096).unwrap();
        s.line(Stream::Stdout, b"hello".to_vec()).await;
        s.line(Stream::Stderr, vec![0xff, b'a']).await;
        for _ in 0..100 {
            s.line(Stream::Stdout, vec![b'y'; 100]).await;
        }
        s.system("cancelled").await;
        drop(s);
        let sum = w.finish().await;
        assert!(sum.truncated);
        assert!(sum.bytes <= 4096, "{}", sum.bytes);
        let page = read_page(&path, 0, 1000, 1 << 20).unwrap();
        assert_eq!(page.lines.len() as u64, sum.lines);
        let first: serde_json::Value = serde_json::from_str(&page.lines[0]).unwrap();
        assert_eq!(first["n"], 0);
        assert_eq!(first["stream"], "stdout");
        assert_eq!(first["line"], "hello");
        let second: serde_json::Value = serde_json::from_str(&page.lines[1]).unwrap();
        assert_eq!(second["line"], "\u{fffd}a");
        let notes: Vec<serde_json::Value> = page
            .lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v["stream"] == "system")
            .collect();
        assert_eq!(notes.len(), 2);
        assert!(
            notes[0]["line"]
                .as_str()
                .unwrap()
                .starts_with("log truncated")
        );
        assert_eq!(notes[1]["line"], "cancelled");
        // Numbers are contiguous.
        for (i, l) in page.lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["n"], i as u64);
        }
        // Paging.
        let p2 = read_page(&path, 2, 3, 1 << 20).unwrap();
        assert_eq!(p2.lines.len(), 3);
        assert_eq!(p2.next_cursor, 5);
        let off = offset_of_line(&path, 2).unwrap();
        let (lines, _) = read_from_offset(&path, off, 1 << 20).unwrap();
        assert_eq!(lines[0], page.lines[2]);
    }

    /// A disk with room for `cap` bytes: a write that does not fit lands in part and fails,
    /// as a real one does at ENOSPC.
    /// Space reserved with [`Sink::reserve`] stays usable when the disk is full; where
    /// `reserves` is false the file system does not support reserving.
    struct SmallDisk {
        data: Vec<u8>,
        cap: usize,
        reserved: usize,
        reserves: bool,
    }

    fn disk(cap: usize, reserves: bool) -> SmallDisk {
        SmallDisk {
            data: Vec::new(),
            cap,
            reserved: 0,
            reserves,
        }
    }

    impl Sink for SmallDisk {
        fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
            let room = self.cap.max(self.reserved).saturating_sub(self.data.len());
            self.data.extend_from_slice(&buf[..buf.len().min(room)]);
            if buf.len() > room {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            Ok(())
        }

        fn cut(&mut self, len: u64) -> std::io::Result<()> {
            self.data.truncate(len as usize);
            self.reserved = self.reserved.min(len as usize);
            Ok(())
        }

        fn reserve(&mut self, from: u64, len: u64) -> std::io::Result<()> {
            if !self.reserves {
                return Err(std::io::ErrorKind::Unsupported.into());
            }
            let end = (from + len) as usize;
            if end > self.reserved {
                if end > self.cap {
                    return Err(std::io::Error::from_raw_os_error(28));
                }
                self.reserved = end;
            }
            Ok(())
        }
    }

    fn parsed(data: &[u8]) -> Vec<serde_json::Value> {
        assert!(
            data.is_empty() || data.ends_with(b"\n"),
            "a partial line was left"
        );
        data.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("every line is whole JSON"))
            .collect()
    }

    #[test]
    fn output_lost_to_a_full_disk_is_said_as_soon_as_there_is_room() {
        // A file system without `fallocate`: cutting the half-written batch made room.
        let mut log = LogFile::new(disk(1000, false), 0, 0, 1 << 20);
        for i in 0..50 {
            log.line(Stream::Stdout, format!("line {i}").as_bytes());
            if i % 7 == 0 {
                log.flush();
            }
        }
        log.flush();
        // Full: only whole lines stayed, output is dropped and the summary says so. Cutting
        // the half-written batch made room for the note at once.
        let all = parsed(&log.file.data);
        let kept = all.iter().filter(|v| v["stream"] == "stdout").count();
        assert!(kept > 0 && kept < 50, "{kept}");
        assert_eq!(log.lines, all.len() as u64);
        assert!(log.summary().truncated, "lost output must not look clean");
        let note = all.last().unwrap();
        assert_eq!(note["stream"], "system");
        let text = note["line"].as_str().unwrap();
        assert!(text.starts_with("log output lost"), "{text}");
        // Counted when the note was written: the batch that failed.
        assert!(text.contains(" lines were dropped"), "{text}");
    }

    /// A log that wrote one line, then lost two: someone else took every free byte.
    fn filled_after_one_line(reserves: bool) -> LogFile<SmallDisk> {
        let mut log = LogFile::new(disk(1 << 20, reserves), 0, 0, 1 << 20);
        log.line(Stream::Stdout, b"before");
        log.flush();
        log.file.cap = log.file.data.len();
        log.line(Stream::Stdout, b"lost 1");
        log.line(Stream::Stdout, b"lost 2");
        log.flush();
        log
    }

    /// Ends the build of `log` (one line written, then `dropped` lost) and checks the log:
    /// the line, the loss note, the exit line.
    fn note_then_exit(log: &mut LogFile<SmallDisk>, dropped: u64) -> Vec<serde_json::Value> {
        log.line(Stream::System, b"exited with code 0; outcome success");
        log.finish();
        let all = parsed(&log.file.data);
        assert_eq!(all.len(), 3, "{all:?}");
        let text = all[1]["line"].as_str().unwrap();
        assert!(text.starts_with("log output lost"), "{text}");
        assert!(
            text.contains(&format!("{dropped} lines were dropped")),
            "{text}"
        );
        assert_eq!(all[2]["line"], "exited with code 0; outcome success");
        all
    }

    /// The full-disk integration test found no note 1 run in 10: the disk had filled at a
    /// block boundary, so cutting the failed batch freed nothing. Room kept past each batch
    /// takes the note whatever else fills the disk.
    #[test]
    fn the_loss_note_has_room_when_the_disk_fills_between_batches() {
        let mut log = filled_after_one_line(true);
        assert!(log.loss_told, "the note is written at once");
        // The rest of the room takes the last line too.
        note_then_exit(&mut log, 2);
        assert!(log.summary().truncated);
        assert_eq!(
            log.file.reserved,
            log.file.data.len(),
            "the rest is given back"
        );
    }

    #[test]
    fn the_loss_note_waits_for_room_and_comes_before_the_next_system_line() {
        // A file system without `fallocate`: no room is kept.
        let mut log = filled_after_one_line(false);
        log.line(Stream::Stdout, b"lost 3");
        assert!(!log.loss_told, "no room for the note yet");
        assert_eq!(parsed(&log.file.data).len(), 1);
        log.file.cap = 1 << 20;
        let all = note_then_exit(&mut log, 3);
        for (i, v) in all.iter().enumerate() {
            assert_eq!(v["n"], i as u64, "numbers stay contiguous");
        }
        let sum = log.summary();
        assert!(sum.truncated);
        assert_eq!(sum.lines, 3);
        assert_eq!(sum.bytes, log.file.data.len() as u64);
    }

    #[test]
    fn a_log_that_never_takes_a_byte_is_truncated_not_empty_and_clean() {
        for reserves in [true, false] {
            let mut log = LogFile::new(disk(0, reserves), 0, 0, 1 << 20);
            log.line(Stream::Stdout, b"hello");
            log.line(Stream::System, b"outcome success");
            log.finish();
            assert!(log.file.data.is_empty());
            let sum = log.summary();
            assert_eq!((sum.lines, sum.bytes, sum.truncated), (0, 0, true));
        }
    }

    // Paused time: the retries' pauses pass at once.
    #[tokio::test(start_paused = true)]
    async fn a_build_whose_log_cannot_be_created_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/x.log");
        let e = std::io::Error::from_raw_os_error(24);
        let sum = record_unwritable(&path, &e).await;
        let page = read_page(&path, 0, 10, 1 << 20).unwrap();
        assert_eq!(sum.lines, 1);
        let v: serde_json::Value = serde_json::from_str(&page.lines[0]).unwrap();
        assert_eq!(v["stream"], "system");
        assert!(
            v["line"]
                .as_str()
                .unwrap()
                .contains("cannot write the build log")
        );
        // Where nothing can be written at all (here: the log's directory is a file), the
        // figures say output was lost (after trying for a few seconds).
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, "").unwrap();
        let sum = record_unwritable(&blocked.join("x.log"), &e).await;
        assert!(sum.truncated);
        assert_eq!(sum.lines, 0);
    }

    #[test]
    fn partial_last_line_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.log");
        std::fs::write(&path, "{\"n\":0}\n{\"n\":1").unwrap();
        let page = read_page(&path, 0, 10, 1 << 20).unwrap();
        assert_eq!(page.lines, vec!["{\"n\":0}".to_string()]);
        assert_eq!(page.next_cursor, 1);
    }
}
