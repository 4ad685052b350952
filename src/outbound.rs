//! Outbound HTTP for the outbox (SPEC §5): one hyper client over rustls, with the limits a
//! hostile or broken receiver needs (HOSTILE 29).
//!
//! - TLS is rustls with the `ring` provider (no C toolchain beyond what `ring` needs; the
//!   `aws-lc-rs` default wants cmake), certificates checked against the system's trust store
//!   (`rustls-native-certs` reads the same bundle OpenSSL and curl use on Linux). Plain HTTP
//!   only where the URL says `http://`.
//! - 10 s to connect, 30 s for the whole exchange (connect, request, status, the prefix of
//!   the body): a receiver that never answers or trickles its answer costs one delivery slot
//!   for at most 30 s.
//! - Redirects are never followed (hyper's client does not): a 3xx is an answer like any other.
//! - At most [`MAX_ANSWER_BYTES`] of an answer's body is read; the rest is dropped with the
//!   connection, so a gigabyte answer costs a kilobyte.
//! - Every request says `User-Agent: deployhook/<version>`.
//!
//! Errors name the URL only as `scheme://host` (the caller passes a redacted form): Slack and
//! Discord URLs carry their credential in the path.
//!
//! Test-only settings (never user config): `DEPLOYHOOK_TEST_EXTRA_CA` names a PEM file whose
//! certificates are trusted in addition to the system's (the HTTPS integration test's
//! self-signed CA), and `DEPLOYHOOK_TEST_OUTBOUND_TIMEOUTS=CONNECT_MS,TOTAL_MS` shortens the
//! timeouts so the timeout test takes seconds.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt as _, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;

/// Most bytes of an answer's body that are read (and shown by `notifications test`).
pub const MAX_ANSWER_BYTES: usize = 1024;

/// Time to establish a connection (TCP and TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time for the whole exchange.
pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(30);

/// The `User-Agent` of every outbound request.
pub const USER_AGENT: &str = concat!("deployhook/", env!("CARGO_PKG_VERSION"));

/// Test-only: a PEM file of extra trusted CA certificates.
const EXTRA_CA_ENV: &str = "DEPLOYHOOK_TEST_EXTRA_CA";
/// Test-only: `CONNECT_MS,TOTAL_MS`.
const TIMEOUTS_ENV: &str = "DEPLOYHOOK_TEST_OUTBOUND_TIMEOUTS";

/// What a receiver answered.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// At most [`MAX_ANSWER_BYTES`] of the body.
    pub body: Bytes,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The URL or a header could not be used.
    #[error("bad request to {0}: {1}")]
    Bad(String, String),
    /// Connecting, TLS, or the exchange failed.
    #[error("cannot reach {0}: {1}")]
    Connect(String, String),
    /// No complete answer within the total timeout.
    #[error("{0} did not answer within {1}s")]
    Timeout(String, u64),
}

/// The shared client; cheap to clone.
#[derive(Clone)]
pub struct Outbound {
    client: Client<HttpsConnector<HttpConnector<Resolver>>, Full<Bytes>>,
    total: Duration,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up outbound TLS: {0}")]
pub struct SetupError(String);

fn test_timeouts() -> Option<(Duration, Duration)> {
    let v = std::env::var(TIMEOUTS_ENV).ok()?;
    let (c, t) = v.split_once(',')?;
    Some((
        Duration::from_millis(c.trim().parse().ok()?),
        Duration::from_millis(t.trim().parse().ok()?),
    ))
}

impl Outbound {
    /// Builds the client: system roots (plus the test-only extra CA), ring, HTTP/1.1.
    pub fn new() -> Result<Outbound, SetupError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!("reading the system trust store: {e}");
        }
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            tracing::warn!(
                "no trusted CA certificates found on this system: HTTPS notifications and commit statuses will fail (install ca-certificates)"
            );
        }
        if let Ok(path) = std::env::var(EXTRA_CA_ENV) {
            use rustls_pki_types::pem::PemObject as _;
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(&path)
                .map_err(|e| SetupError(format!("{path}: {e}")))?;
            for c in certs {
                let c = c.map_err(|e| SetupError(format!("{path}: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| SetupError(format!("{path}: {e}")))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SetupError(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (connect, total) = test_timeouts().unwrap_or((CONNECT_TIMEOUT, TOTAL_TIMEOUT));
        let mut http = HttpConnector::new_with_resolver(Resolver);
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(2)
            .build(https);
        Ok(Outbound { client, total })
    }

    /// POSTs `body` to `url` with `headers` (plus `User-Agent`); `shown` is how the URL may
    /// appear in errors. Reads at most [`MAX_ANSWER_BYTES`] of the answer, all within the
    /// total timeout.
    pub async fn post(
        &self,
        url: &str,
        shown: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<Answer, SendError> {
        let mut req = Request::post(url)
            .header(http::header::USER_AGENT, USER_AGENT)
            .body(Full::new(body))
            .map_err(|e| SendError::Bad(shown.to_owned(), e.to_string()))?;
        for (k, v) in headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| SendError::Connect(shown.to_owned(), error_chain(&e)))?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let mut prefix = Vec::new();
            while prefix.len() < MAX_ANSWER_BYTES {
                match body.frame().await {
                    Some(Ok(f)) => {
                        if let Ok(data) = f.into_data() {
                            let room = MAX_ANSWER_BYTES - prefix.len();
                            prefix.extend_from_slice(&data[..data.len().min(room)]);
                        }
                    }
                    // A broken body after the status: the status is the answer.
                    Some(Err(_)) | None => break,
                }
            }
            // Dropping `body` here closes the connection if the receiver sends more.
            Ok(Answer {
                status,
                body: Bytes::from(prefix),
            })
        };
        match tokio::time::timeout(self.total, exchange).await {
            Ok(r) => r,
            Err(_) => Err(SendError::Timeout(shown.to_owned(), self.total.as_secs())),
        }
    }
}

/// The error and its sources on one line (hyper's top error alone says "client error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Host-name resolution on a thread of its own ([`crate::blocking`]). hyper-util's default
/// resolver uses `tokio::task::spawn_blocking`, which panics when no thread can start (the
/// service at its `TasksMax=`); this one fails the attempt with an error instead, which the
/// outbox retries like any connection error.
#[derive(Debug, Clone, Copy, Default)]
pub struct Resolver;

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<std::net::SocketAddr>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            crate::blocking::run("resolving a host name", move || {
                use std::net::ToSocketAddrs as _;
                (host.as_str(), 0)
                    .to_socket_addrs()
                    .map(|a| a.collect::<Vec<_>>().into_iter())
            })
            .await
            .map_err(std::io::Error::other)?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_resolver_finds_localhost_on_a_thread_of_its_own() {
        use std::str::FromStr as _;
        use tower_service::Service as _;
        let name = Name::from_str("localhost").unwrap();
        let addrs: Vec<_> = Resolver.call(name).await.unwrap().collect();
        assert!(addrs.iter().any(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
