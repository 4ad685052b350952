//! Following a build's log until it stops: what the NDJSON follower (`GET
//! /api/v1/builds/{uuid}/log?follow=1`) and the status page's Server-Sent Events share. Each
//! frames the lines its own way; the body that notices a client that went away, and the wait
//! for more lines, are the same.

use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use tokio::sync::{mpsc, watch};

use super::AppState;
use crate::model::BuildId;

/// How long a follower waits before it looks again when nothing woke it: the watches cover
/// new lines and the build's end, this bounds the wait when there was no watch to take (a
/// queued build has no live log yet).
const RECHECK: Duration = Duration::from_millis(500);

/// A response body fed by a channel. Unlike a body that is polled only while it has data,
/// its sender learns (`closed()`) as soon as hyper drops it, so a follower of a quiet build
/// notices a client that went away.
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// What a follower waits on, taken *before* it reads the log, so a line written or a stop
/// made between the read and the wait still wakes it.
pub struct Wake {
    /// Whether the build was live (not stopped) when taken: a follower that then reads to
    /// the end of the log of a build that was not live is done.
    pub live: bool,
    lines: Option<watch::Receiver<u64>>,
    done: Option<watch::Receiver<bool>>,
}

impl Wake {
    /// Takes the build's liveness and its watches from the queue now.
    pub fn take(state: &AppState, id: BuildId) -> Wake {
        Wake {
            live: state.queue.is_live(id),
            lines: state.queue.live_log(id).map(|l| l.lines),
            done: state.queue.done_watch(id),
        }
    }

    /// Waits for more lines, the end of the build, or a periodic re-check. False when the
    /// client hung up (hyper dropped the body): stop following.
    pub async fn wait(self, tx: &mpsc::Sender<Bytes>) -> bool {
        let wait_lines = async {
            match self.lines {
                Some(mut w) => {
                    let _ = w.changed().await;
                }
                None => std::future::pending().await,
            }
        };
        let wait_done = async {
            match self.done {
                Some(mut d) => {
                    let _ = d.wait_for(|d| *d).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = wait_lines => true,
            _ = wait_done => true,
            _ = tx.closed() => false,
            _ = tokio::time::sleep(RECHECK) => true,
        }
    }
}
