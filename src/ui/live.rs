//! Live log following: `GET /ui/builds/{uuid}/events`, Server-Sent Events.
//!
//! Each log line is one `line` event whose `id:` is its line number (from 1) and whose data is
//! the line already rendered by the page template, so the script only appends it and the
//! escaping lives in one place. A reconnecting `EventSource` sends `Last-Event-ID`, and the
//! stream resumes after that line. When the build's status changes, a `status` event carries
//! the page's `#summary` again; when the build has stopped and every line is sent, an `end`
//! event closes the stream (after the final status, which comes after the last line).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use super::pages::{self, BuildActions};
use super::{PageResult, Viewer, parse_lines, readable_build, redeployable};
use crate::buildlog;
use crate::http::follow::{ChannelBody, Wake};
use crate::http::{AppState, query_pairs};
use crate::model::{Build, Phase, Timestamp};

/// One Server-Sent Event; multi-line data is split into `data:` lines as the format asks.
fn sse_event(event: &str, id: Option<u64>, data: &str) -> String {
    let mut out = String::with_capacity(data.len() + 32);
    if let Some(id) = id {
        out.push_str(&format!("id: {id}\n"));
    }
    out.push_str("event: ");
    out.push_str(event);
    out.push('\n');
    for line in data.split(['\n', '\r']) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}

/// `GET /ui/builds/{uuid}/events?cursor=N&status=S`: the log from line N (or after
/// `Last-Event-ID`)
/// as Server-Sent Events, `status` events when the build changes, and `end` when it has
/// stopped and every line is sent.
pub(super) fn events(
    state: &Arc<AppState>,
    viewer: &Viewer,
    id: &str,
    req: &Request<Incoming>,
) -> PageResult {
    let b = readable_build(state, viewer, id)?;
    // After a reconnect the browser says which line it got last: resume after it.
    let resume = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let query = query_pairs(req.uri().query());
    let param = |name: &str| query.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let cursor = match resume {
        Some(n) => n,
        None => param("cursor").and_then(|v| v.parse().ok()).unwrap_or(0),
    };
    // The status the page shows: a status event is sent only when the build differs from
    // it, so the page's buttons are not replaced under the user's pointer for nothing.
    let shown = match param("status") {
        Some("queued") => Some(Phase::Queued),
        Some("initializing") => Some(Phase::Initializing),
        Some("running") => Some(Phase::Running),
        _ => None,
    };
    let csrf = viewer.act_csrf(&b.project).map(str::to_owned);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    let state = state.clone();
    tokio::spawn(follow(state, b, cursor, shown, csrf, tx));
    let mut r = Response::new(ChannelBody(rx).boxed());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

async fn follow(
    state: Arc<AppState>,
    first: Build,
    cursor: u64,
    mut shown: Option<Phase>,
    csrf: Option<String>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    let id = first.id;
    let path = buildlog::log_path(state.store.state_dir(), id);
    let p = path.clone();
    // Never `spawn_blocking` on a request path: it panics when no thread can start (systemd
    // TasksMax); `blocking::run` says so instead (HOSTILE 28).
    let mut offset = crate::blocking::run("reading a build log", move || {
        buildlog::offset_of_line(&p, cursor)
    })
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or(0);
    let send_status = |b: &Build| {
        let actions = BuildActions {
            csrf: csrf.as_deref(),
            redeploy: redeployable(&state, b),
        };
        Bytes::from(sse_event(
            "status",
            None,
            &pages::summary(b, &actions, Timestamp::now()).into_string(),
        ))
    };
    loop {
        let wake = Wake::take(&state, id);
        let live = wake.live;
        // The status, when it changed since the page (or the last event) showed it.
        let now_build = state.store.build(id).ok().flatten();
        if let Some(b) = &now_build
            && shown != Some(b.phase)
            && (live || b.phase.is_stopped())
        {
            // Lines first: a stopped status must come after the build's last lines.
            if !b.phase.is_stopped() {
                shown = Some(b.phase);
                if tx.send(send_status(b)).await.is_err() {
                    return;
                }
            }
        }
        let p = path.clone();
        let read = crate::blocking::run("reading a build log", move || {
            buildlog::read_from_offset(&p, offset, 64 * 1024)
        })
        .await;
        let (lines, next) = match read {
            Ok(Ok(x)) => x,
            // No file yet (queued build), or no thread to read it right now: nothing to send
            // this time; the next wake-up tries again.
            _ => (Vec::new(), offset),
        };
        offset = next;
        if !lines.is_empty() {
            let mut chunk = String::new();
            for l in parse_lines(&lines) {
                chunk.push_str(&sse_event(
                    "line",
                    Some(l.n + 1),
                    &pages::log_line(&l).into_string(),
                ));
            }
            if tx.send(Bytes::from(chunk)).await.is_err() {
                return; // The browser went away.
            }
            continue;
        }
        if !live {
            // Stopped and read to the end: the final status, then the end.
            if let Some(b) = state.store.build(id).ok().flatten()
                && shown != Some(b.phase)
                && tx.send(send_status(&b)).await.is_err()
            {
                return;
            }
            let _ = tx.send(Bytes::from(sse_event("end", None, ""))).await;
            return;
        }
        if !wake.wait(&tx).await {
            return; // The browser went away.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_frame_their_data() {
        assert_eq!(
            sse_event("line", Some(3), "<div>x</div>"),
            "id: 3\nevent: line\ndata: <div>x</div>\n\n"
        );
        assert_eq!(
            sse_event("end", None, "a\nb\rc"),
            "event: end\ndata: a\ndata: b\ndata: c\n\n"
        );
    }
}
