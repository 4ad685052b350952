//! Baseline for `examples/bench.rs`: the machine's limit for an HTTP/1.1 JSON endpoint.
//!
//! A bare hyper 1.x server with the same runtime set-up as deployhook (tokio multi-thread,
//! `http1::Builder` with keep-alive, `TCP_NODELAY`) that reads each request's body and answers
//! every request with the same ~150-byte JSON object, doing nothing else. Whatever deployhook
//! does per request beyond this is its own cost.
//!
//! Run with `cargo run --release --example bare_hyper [ADDR]` (default `127.0.0.1:0`). It
//! prints `listening on ADDR` on stdout once bound, and serves until killed.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// The answer: the size of a small deploy-trigger response envelope.
const ANSWER: &str = concat!(
    r#"{"success":true,"errors":[],"messages":[],"result":{"id":"6f1c2a4e-8d0b-4c1e-9a57-"#,
    r#"3f2e1d0c9b8a","status":"queued","already_exists":true,"project":"site"}}"#
);

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body as a real endpoint would; a broken one still gets the answer.
    let _ = req.into_body().collect().await;
    let mut res = Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        None => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let mut out = std::io::stdout();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
        let mut builder = http1::Builder::new();
        builder.keep_alive(true);
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service_fn(answer));
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    })
}
