//! The metrics and probe listener: hyper's HTTP/1.1 server on a tokio listener of our own.
//!
//! One request per connection (`Connection: close`): Prometheus and the kubelet open a
//! connection per scrape or probe anyway. Every step is bounded: head size
//! ([`MAX_HEAD_BYTES`]), time to send the head, time a probe may take, time to take the
//! response, and connections served at once. hyper answers a malformed head with `400` and an
//! oversized one with `431`; the two answers it does not give, `408` for a head that takes too
//! long and `400` for one the client cut off, are written here, and the listener carries on.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::prometheus_text;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tracing::{debug, error, info, warn};

use crate::Metrics;

/// Largest request head (request line and headers) the listener reads; a longer one gets `431`.
/// Also the smallest read buffer hyper accepts.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Longest readiness reason sent back in a `503` body, in characters.
const MAX_REASON_CHARS: usize = 256;

/// After answering, how long and how much to read from the client before closing, so a client
/// still sending (a body, pipelined garbage) gets the answer instead of a reset.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 64 * 1024;

/// Pause after a failed `accept` (out of file descriptors, say) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const TEXT: &str = "text/plain; charset=utf-8";

/// A boxed future returned by [`Probes`] methods.
pub type ProbeFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What `/healthz` and `/readyz` ask. Object safe, so the worker hands the listener an
/// `Arc<dyn Probes>` over its actor addresses and database handle.
pub trait Probes: Send + Sync {
    /// Liveness: the actor system answers. `false` makes `/healthz` answer `503`.
    fn healthy(&self) -> ProbeFuture<'_, bool>;
    /// Readiness: the database is reachable and the schema current. `Err(reason)` makes
    /// `/readyz` answer `503` with the reason (shortened to one line) as the body.
    fn ready(&self) -> ProbeFuture<'_, Result<(), String>>;
}

/// Limits of the listener. The defaults suit production; tests shorten the timeouts.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Time a client has from connecting to finishing its request head; then `408`.
    pub read_timeout: Duration,
    /// Time a client has to take the whole response; then the connection is dropped. Counted
    /// together with the other two: a connection lives at most the sum of the three timeouts.
    pub write_timeout: Duration,
    /// Time a probe may take; a slower one counts as failed. Below the Kubernetes readiness
    /// probe's 3 s `timeoutSeconds`, so the kubelet sees our `503`, not its own timeout.
    pub probe_timeout: Duration,
    /// Connections served at once; further ones are closed as soon as they are accepted.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(2),
            max_connections: 64,
        }
    }
}

/// Serve the [global metrics](crate::global) and `probes` on `addr` with default
/// [`ServerOptions`].
///
/// Returns the bound address (port 0 picks a free port) and the listener task; aborting the
/// task closes the listener and every open connection. Must be called inside a tokio runtime.
///
/// # Errors
/// The bind failed (address in use, no permission).
pub async fn serve(
    addr: SocketAddr,
    probes: Arc<dyn Probes>,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    serve_with(addr, crate::global_arc(), probes, ServerOptions::default()).await
}

/// Serve `metrics` and `probes` on `addr` with explicit limits. See [`serve`].
///
/// # Errors
/// The bind failed (address in use, no permission).
pub async fn serve_with(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    probes: Arc<dyn Probes>,
    options: ServerOptions,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(addr = %bound, "Metrics listener started.");
    let state = Arc::new(State {
        metrics,
        probes,
        options,
    });
    Ok((bound, tokio::spawn(accept_loop(listener, state))))
}

struct State {
    metrics: Arc<Metrics>,
    probes: Arc<dyn Probes>,
    options: ServerOptions,
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    // Owned here so aborting the listener task also aborts every connection it serves.
    let mut connections = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                while let Some(done) = connections.try_join_next() {
                    if let Err(e) = done
                        && e.is_panic()
                    {
                        error!(error = %e, "Metrics connection handler panicked.");
                    }
                }
                if connections.len() >= state.options.max_connections {
                    debug!(%peer, "Metrics listener at its connection limit; closing.");
                    drop(stream);
                    continue;
                }
                connections.spawn(connection(stream, Arc::clone(&state)));
            }
            Err(e) => {
                warn!(error = %e, "Metrics listener accept failed; retrying.");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn connection(mut stream: TcpStream, state: Arc<State>) {
    let options = &state.options;
    // Whether hyper got as far as handing us a request, and so wrote (or is writing) an answer.
    let asked = AtomicBool::new(false);
    let service = service_fn(|request: Request<Incoming>| {
        asked.store(true, Ordering::Relaxed);
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(respond(&request, &state).await) }
    });
    // hyper borrows the stream, so it is still ours for the answers hyper does not give.
    let serving = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(options.read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(false)
        .serve_connection(TokioIo::new(&mut stream), service);
    let lifetime = options.read_timeout + options.probe_timeout + options.write_timeout;
    let refusal = match timeout(lifetime, serving).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) if !asked.load(Ordering::Relaxed) && e.is_timeout() => {
            Some((StatusCode::REQUEST_TIMEOUT, "request timeout\n"))
        }
        // The client left halfway through the head.
        Ok(Err(e)) if !asked.load(Ordering::Relaxed) && e.is_incomplete_message() => {
            Some((StatusCode::BAD_REQUEST, "bad request\n"))
        }
        Ok(Err(e)) => {
            // hyper has answered a malformed head (400, 431) itself, or the client went away.
            debug!(error = %e, "Metrics connection ended with an error.");
            None
        }
        Err(_) => {
            debug!("Metrics connection outlived its timeouts; dropped.");
            return;
        }
    };
    if let Some((status, body)) = refusal {
        debug!(
            status = status.as_u16(),
            "Metrics listener refused a request."
        );
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {TEXT}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or_default(),
            body.len(),
        );
        if !matches!(
            timeout(options.write_timeout, stream.write_all(head.as_bytes())).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
    linger(&mut stream).await;
}

/// Close our side, then read (and drop) what the client still sends for a while: closing with
/// unread bytes makes the kernel reset the connection, and the client may lose the answer.
async fn linger(stream: &mut TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    let _ = timeout(LINGER, async {
        while drained < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

async fn respond(request: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    // hyper sends the headers of a HEAD answer without its body.
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let probe_timeout = state.options.probe_timeout;
    match request.uri().path() {
        "/metrics" => answer(
            StatusCode::OK,
            prometheus_text::CONTENT_TYPE,
            state.metrics.render(),
        ),
        "/healthz" => match timeout(probe_timeout, state.probes.healthy()).await {
            Ok(true) => text(StatusCode::OK, "ok\n"),
            Ok(false) => text(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n"),
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "unhealthy: probe timed out\n",
            ),
        },
        "/readyz" => match timeout(probe_timeout, state.probes.ready()).await {
            Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
            Ok(Err(reason)) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", one_line(&reason)),
            ),
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: probe timed out\n",
            ),
        },
        // hyper takes an authority-form target (`GET host:80`, meant for CONNECT) as a URI
        // without a path; it names no resource here.
        path if !path.starts_with('/') && path != "*" => {
            text(StatusCode::BAD_REQUEST, "bad request\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    answer(status, TEXT, body.into())
}

fn answer(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Control characters (a newline in a database error) become spaces; long reasons are cut.
fn one_line(reason: &str) -> String {
    reason
        .chars()
        .take(MAX_REASON_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reason_is_one_short_line() {
        let reason = format!("db down\r\nsecond line{}", "x".repeat(1000));
        let line = one_line(&reason);
        assert!(!line.contains('\n') && !line.contains('\r'));
        assert_eq!(line.chars().count(), MAX_REASON_CHARS);
    }
}
