//! Aggregation of log lines that a client can cause at request rate.
//!
//! A line written once per request is a denial of service: a leaked hook URL hammered at
//! 50 000 requests a second wrote 540 MB of identical lines in a minute, and under systemd
//! journald's rate limit then suppresses every other message of the service. Such lines go
//! through a [`Throttle`]: the first of a kind is written, the rest within [`WINDOW`] are
//! counted, and the next one written after the window says how many were left out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long repeats of one kind of line are counted instead of written.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Most distinct kinds tracked; past it, new kinds share one slot (bounded memory whatever
/// the keys).
const MAX_KINDS: usize = 1024;

#[derive(Debug)]
struct Slot {
    /// When the last line of this kind was written.
    written_at: Instant,
    /// Lines of this kind left out since.
    suppressed: u64,
}

/// Decides which lines of each kind to write; see the module doc.
#[derive(Debug, Default)]
pub struct Throttle {
    slots: Mutex<HashMap<String, Slot>>,
}

impl Throttle {
    /// Whether to write a line of `kind` at `now`: `Some(n)` with the number of lines of that
    /// kind left out since the last one written, `None` to leave this one out.
    pub fn admit(&self, kind: &str, now: Instant) -> Option<u64> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let key = if slots.len() >= MAX_KINDS && !slots.contains_key(kind) {
            "(other)"
        } else {
            kind
        };
        match slots.get_mut(key) {
            Some(s) if now.saturating_duration_since(s.written_at) < WINDOW => {
                s.suppressed += 1;
                None
            }
            Some(s) => {
                let n = s.suppressed;
                s.written_at = now;
                s.suppressed = 0;
                Some(n)
            }
            None => {
                slots.insert(
                    key.to_owned(),
                    Slot {
                        written_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_of_a_kind_is_written_then_repeats_are_counted_per_window() {
        let t = Throttle::default();
        let t0 = Instant::now();
        assert_eq!(t.admit("429 site", t0), Some(0));
        for i in 1..=10_000u64 {
            assert_eq!(t.admit("429 site", t0 + Duration::from_micros(i)), None);
        }
        // Another kind is independent.
        assert_eq!(t.admit("401 site", t0), Some(0));
        // Just inside the window: still counted.
        assert_eq!(
            t.admit("429 site", t0 + WINDOW - Duration::from_millis(1)),
            None
        );
        // After the window: written, with the count of what was left out.
        assert_eq!(t.admit("429 site", t0 + WINDOW), Some(10_001));
        assert_eq!(
            t.admit("429 site", t0 + WINDOW + Duration::from_secs(1)),
            None
        );
    }

    #[test]
    fn kinds_are_bounded() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for i in 0..MAX_KINDS * 3 {
            let _ = t.admit(&format!("k{i}"), t0);
        }
        assert!(t.slots.lock().unwrap().len() <= MAX_KINDS + 1);
    }
}
