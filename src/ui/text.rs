//! Turning what builds print, and times, into what a page shows (pure).
//!
//! A log line is whatever a build wrote: HTML, terminal escape sequences, control bytes. It is
//! split here into [`Segment`]s of plain text with a [`Style`]: ANSI SGR colour sequences
//! become styles (rendered as classes, never as inline style), every other escape sequence is
//! dropped, and control characters are replaced by their visible Unicode "control pictures",
//! so neither raw bytes nor a line break in the middle of an SSE `data:` field can come out.
//! The templates escape the text itself.

use std::time::Duration;

use crate::model::Timestamp;

/// The look of a run of log text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Style {
    /// Foreground colour, 0–15 (the 16 ANSI colours).
    pub fg: Option<u8>,
    /// Background colour, 0–15.
    pub bg: Option<u8>,
    /// Bold.
    pub bold: bool,
    /// Faint.
    pub dim: bool,
    /// Italic.
    pub italic: bool,
    /// Underlined.
    pub underline: bool,
}

impl Style {
    /// The CSS classes of this style (empty for plain text).
    pub fn classes(&self) -> String {
        let mut c = Vec::new();
        if let Some(f) = self.fg {
            c.push(format!("f{f}"));
        }
        if let Some(b) = self.bg {
            c.push(format!("g{b}"));
        }
        for (on, name) in [
            (self.bold, "b"),
            (self.dim, "d"),
            (self.italic, "i"),
            (self.underline, "u"),
        ] {
            if on {
                c.push(name.to_owned());
            }
        }
        c.join(" ")
    }

    fn apply_sgr(&mut self, params: &str) {
        let mut it = params.split([';', ':']).map(|p| {
            if p.is_empty() {
                0
            } else {
                p.parse::<u32>().unwrap_or(u32::MAX)
            }
        });
        // `ESC[m` is a reset.
        if params.is_empty() {
            *self = Style::default();
            return;
        }
        while let Some(p) = it.next() {
            match p {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => (self.bold, self.dim) = (false, false),
                23 => self.italic = false,
                24 => self.underline = false,
                30..=37 => self.fg = Some((p - 30) as u8),
                39 => self.fg = None,
                40..=47 => self.bg = Some((p - 40) as u8),
                49 => self.bg = None,
                90..=97 => self.fg = Some((p - 90 + 8) as u8),
                100..=107 => self.bg = Some((p - 100 + 8) as u8),
                // 256-colour and true-colour forms: the low 16 map, the rest are skipped whole.
                38 | 48 => {
                    let colour = match it.next() {
                        Some(5) => it
                            .next()
                            .and_then(|n| u8::try_from(n).ok())
                            .filter(|n| *n < 16),
                        Some(2) => {
                            let _ = (it.next(), it.next(), it.next());
                            None
                        }
                        _ => None,
                    };
                    if p == 38 {
                        self.fg = colour;
                    } else {
                        self.bg = colour;
                    }
                }
                _ => {}
            }
        }
    }
}

/// A run of text in one style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The text (no control characters).
    pub text: String,
    /// Its style.
    pub style: Style,
}

/// The visible stand-in for a control character (`␛`, `␍`, `␀`, …).
fn picture(c: char) -> char {
    match c as u32 {
        n @ 0..=0x1f => char::from_u32(0x2400 + n).unwrap_or('\u{fffd}'),
        0x7f => '\u{2421}',
        _ => '\u{fffd}',
    }
}

/// Splits a log line into styled segments (see the module doc).
pub fn segments(line: &str) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    let mut style = Style::default();
    let mut text = String::new();
    let mut chars = line.chars().peekable();
    let flush = |text: &mut String, style: Style, out: &mut Vec<Segment>| {
        if !text.is_empty() {
            out.push(Segment {
                text: std::mem::take(text),
                style,
            });
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.peek() {
                // CSI: parameters and intermediates, then one final byte.
                Some('[') => {
                    chars.next();
                    let mut params = String::new();
                    let mut fin = None;
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            fin = Some(c);
                            break;
                        }
                        if params.len() < 64 {
                            params.push(c);
                        }
                    }
                    if fin == Some('m') {
                        flush(&mut text, style, &mut out);
                        style.apply_sgr(&params);
                    }
                }
                // OSC (titles, hyperlinks): up to BEL or ESC \.
                Some(']') => {
                    chars.next();
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                            chars.next();
                            break;
                        }
                    }
                }
                // Any other escape: ESC, its intermediates (`(`, `#`, …), one final character.
                Some(_) => {
                    while chars
                        .next_if(|c| ('\u{20}'..='\u{2f}').contains(c))
                        .is_some()
                    {}
                    chars.next();
                }
                None => text.push(picture(c)),
            },
            '\t' => text.push(c),
            c if c.is_control() => text.push(picture(c)),
            c => text.push(c),
        }
    }
    flush(&mut text, style, &mut out);
    out
}

/// "3 min ago", "in 5 s", "just now": how long before `now` `t` was, in words.
pub fn relative(t: Timestamp, now: Timestamp) -> String {
    let micros = now.0.saturating_sub(t.0);
    let secs = (micros / 1_000_000).unsigned_abs();
    let words = if secs < 5 {
        return "just now".to_owned();
    } else if secs < 60 {
        format!("{secs} s")
    } else if secs < 3600 {
        format!("{} min", secs / 60)
    } else if secs < 86_400 {
        format!("{} h", secs / 3600)
    } else {
        format!("{} d", secs / 86_400)
    };
    if micros >= 0 {
        format!("{words} ago")
    } else {
        format!("in {words}")
    }
}

/// `1h 2m 5s`, zero parts left out, whole seconds (SPEC §5.2's form): the very function the
/// notifications and commit statuses use, so a page and a message say a duration alike.
pub use crate::statuses::human_duration as duration;

/// The time between two timestamps (zero if they are out of order).
pub fn between(from: Timestamp, to: Timestamp) -> Duration {
    Duration::from_micros(u64::try_from(to.0.saturating_sub(from.0)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(s: &str) -> String {
        segments(s).into_iter().map(|s| s.text).collect()
    }

    #[test]
    fn colours_become_styles_and_resets_end_them() {
        let s = segments("\u{1b}[1;31merror\u{1b}[0m: \u{1b}[92mok\u{1b}[m done");
        assert_eq!(s.len(), 4, "{s:?}");
        assert_eq!(s[0].text, "error");
        assert_eq!(s[0].style.classes(), "f1 b");
        assert_eq!(s[1].text, ": ");
        assert_eq!(s[1].style, Style::default());
        assert_eq!(s[2].style.fg, Some(10));
        assert_eq!(s[3].style, Style::default());
    }

    #[test]
    fn other_escapes_are_dropped_and_controls_are_made_visible() {
        assert_eq!(plain("a\u{1b}[2Kb\u{1b}]0;title\u{7}c\u{1b}(Bd"), "abcd");
        assert_eq!(plain("a\rb\u{0}c\u{7f}"), "a\u{240d}b\u{2400}c\u{2421}");
        assert_eq!(plain("tab\there"), "tab\there");
        // A dangling ESC at the end of a line is shown, not swallowed.
        assert_eq!(plain("x\u{1b}"), "x\u{241b}");
        // 256-colour and true-colour forms do not leak their numbers into the text.
        let s = segments("\u{1b}[38;5;196mred\u{1b}[38;2;1;2;3mrgb\u{1b}[38;5;4mblue");
        assert_eq!(plain("\u{1b}[38;5;196mred\u{1b}[38;2;1;2;3mrgb"), "redrgb");
        assert_eq!(s[2].style.fg, Some(4));
    }

    #[test]
    fn no_output_holds_a_line_break_or_escape() {
        let nasty = "<script>alert(1)</script>\u{1b}[31m\r\n\u{85}\u{2028}\u{1b}";
        for seg in segments(nasty) {
            assert!(
                !seg.text.contains(['\r', '\n', '\u{1b}', '\u{85}']),
                "{seg:?}"
            );
        }
        // The text itself is kept (the template escapes it).
        assert!(plain(nasty).starts_with("<script>alert(1)</script>"));
    }

    #[test]
    fn relative_times_and_durations() {
        let now = Timestamp(1_000_000_000_000);
        let ago = |s: i64| relative(Timestamp(now.0 - s * 1_000_000), now);
        assert_eq!(ago(2), "just now");
        assert_eq!(ago(30), "30 s ago");
        assert_eq!(ago(150), "2 min ago");
        assert_eq!(ago(7200), "2 h ago");
        assert_eq!(ago(3 * 86_400), "3 d ago");
        assert_eq!(ago(-120), "in 2 min");
        assert_eq!(duration(Duration::from_secs(3725)), "1h 2m 5s");
        assert_eq!(duration(Duration::from_secs(65)), "1m 5s");
        assert_eq!(duration(Duration::from_secs(3600)), "1h");
        assert_eq!(duration(Duration::from_millis(300)), "0s");
    }
}
