//! The metrics and probe listener: a deliberately tiny HTTP/1.1 server on tokio.
//!
//! One request per connection (`Connection: close`): Prometheus and the kubelet open a
//! connection per scrape or probe anyway, and it keeps the parser to the request head. Every
//! step is bounded: head size ([`MAX_HEAD_BYTES`]), time to send the head, time to take the
//! response, time a probe may take, and connections served at once. Anything that is not a
//! well-formed request head gets `400` and the listener carries on.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{debug, error, info, warn};

use crate::Metrics;

/// Largest request head (request line and headers) the listener reads; a longer one gets `431`.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Longest readiness reason sent back in a `503` body, in characters.
const MAX_REASON_CHARS: usize = 256;

/// After answering, how long and how much to read from the client before closing, so a client
/// still sending (a body, pipelined garbage) gets the answer instead of a reset.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 64 * 1024;

/// Pause after a failed `accept` (out of file descriptors, say) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
    /// Time a client has to take the whole response; then the connection is dropped.
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
    let deadline = Instant::now() + state.options.read_timeout;
    let response = match read_head(&mut stream, deadline).await {
        Ok(head) => match parse_head(&head) {
            Ok(request) => respond(&request, &state).await,
            Err(()) => Response::text(400, "bad request\n"),
        },
        Err(HeadError::Closed) => return,
        Err(HeadError::Io(e)) => {
            debug!(error = %e, "Metrics connection failed while reading.");
            return;
        }
        Err(HeadError::TimedOut) => Response::text(408, "request timeout\n"),
        Err(HeadError::TooLarge) => Response::text(431, "request head too large\n"),
        Err(HeadError::Incomplete) => Response::text(400, "bad request\n"),
    };
    if response.status >= 400 {
        debug!(
            status = response.status,
            "Metrics listener refused a request."
        );
    }
    let bytes = response.into_bytes();
    let written = timeout(state.options.write_timeout, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
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

enum HeadError {
    /// The client left before sending anything: a TCP health check, nothing to answer.
    Closed,
    /// The client left halfway through the head.
    Incomplete,
    TimedOut,
    TooLarge,
    Io(io::Error),
}

/// Read up to the blank line ending the head; the bytes after it (a body) are not needed.
async fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err(HeadError::TimedOut),
            Ok(Err(e)) => return Err(HeadError::Io(e)),
            Ok(Ok(0)) if head.is_empty() => return Err(HeadError::Closed),
            Ok(Ok(0)) => return Err(HeadError::Incomplete),
            Ok(Ok(n)) => n,
        };
        // Look again only where the new bytes could complete a terminator.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head[from..]) {
            head.truncate(from + end);
            if head.len() > MAX_HEAD_BYTES {
                return Err(HeadError::TooLarge);
            }
            return Ok(head);
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Index just past the first blank line (`\r\n\r\n`, or bare `\n\n` which RFC 9112 lets a
/// server accept).
fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).enumerate().find_map(|(i, w)| match w {
        b"\n\n" => Some(i + 2),
        b"\n\r" if bytes.get(i + 2) == Some(&b'\n') => Some(i + 3),
        _ => None,
    })
}

#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    /// Path without the query string.
    path: String,
}

/// Validate the whole head, keep what routing needs. `Err` means `400`.
fn parse_head(head: &[u8]) -> Result<Request, ()> {
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        // RFC 9112 §2.2: ignore empty lines before the request line.
        .skip_while(|line| line.is_empty());
    let request_line = std::str::from_utf8(lines.next().ok_or(())?).map_err(|_| ())?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(());
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(());
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(());
    }
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(());
    }
    let path = if target.starts_with('/') || target == "*" {
        target
    } else if let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        // Absolute form (a proxy's request): the path starts after the authority.
        rest.find('/').map_or("/", |i| &rest[i..])
    } else {
        return Err(());
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    for line in lines {
        if line.is_empty() {
            break;
        }
        let colon = line.iter().position(|b| *b == b':').ok_or(())?;
        let name = &line[..colon];
        // An empty name, or whitespace before the colon or at the start (obs-fold): reject.
        if name.is_empty() || !name.iter().copied().all(is_tchar) {
            return Err(());
        }
    }
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
    })
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

async fn respond(request: &Request, state: &State) -> Response {
    let head_only = match request.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => return Response::text(405, "method not allowed\n").allow_get(),
    };
    let response = match request.path.as_str() {
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: state.metrics.render().into_bytes(),
            allow: false,
            head_only: false,
        },
        "/healthz" => match timeout(state.options.probe_timeout, state.probes.healthy()).await {
            Ok(true) => Response::text(200, "ok\n"),
            Ok(false) => Response::text(503, "unhealthy\n"),
            Err(_) => Response::text(503, "unhealthy: probe timed out\n"),
        },
        "/readyz" => match timeout(state.options.probe_timeout, state.probes.ready()).await {
            Ok(Ok(())) => Response::text(200, "ready\n"),
            Ok(Err(reason)) => Response::text(503, format!("not ready: {}\n", one_line(&reason))),
            Err(_) => Response::text(503, "not ready: probe timed out\n"),
        },
        _ => Response::text(404, "not found\n"),
    };
    if head_only {
        response.without_body()
    } else {
        response
    }
}

/// Control characters (a newline in a database error) become spaces; long reasons are cut.
fn one_line(reason: &str) -> String {
    reason
        .chars()
        .take(MAX_REASON_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// Send `Allow: GET, HEAD` (with `405`).
    allow: bool,
    head_only: bool,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
            allow: false,
            head_only: false,
        }
    }

    fn allow_get(mut self) -> Self {
        self.allow = true;
        self
    }

    /// For `HEAD`: the headers still give the length the body would have.
    fn without_body(mut self) -> Self {
        self.head_only = true;
        self
    }

    fn head(&self, content_length: usize) -> String {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Unknown",
        };
        let allow = if self.allow {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {content_length}\r\n\
             Cache-Control: no-store\r\n{allow}Connection: close\r\n\r\n",
            self.status, self.content_type
        )
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut bytes = self.head(self.body.len()).into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Result<Request, ()> {
        parse_head(head.as_bytes())
    }

    #[test]
    fn finds_the_end_of_the_head_with_crlf_or_bare_lf() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\nbody"), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn parses_origin_and_absolute_targets_without_the_query() {
        let r = parse("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/metrics"));
        let r = parse("\r\nGET http://host:9464/readyz HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(r.path, "/readyz");
        assert_eq!(parse("GET http://host HTTP/1.1\r\n\r\n").unwrap().path, "/");
    }

    #[test]
    fn rejects_malformed_heads() {
        for bad in [
            "",
            "GET /metrics\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/2.0\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "G(T /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "\u{1}\u{2}\u{3}",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse_head(b"GET /\xff HTTP/1.1\r\n\r\n").is_err());
    }

    #[test]
    fn readiness_reason_is_one_short_line() {
        let reason = format!("db down\r\nsecond line{}", "x".repeat(1000));
        let line = one_line(&reason);
        assert!(!line.contains('\n') && !line.contains('\r'));
        assert_eq!(line.chars().count(), MAX_REASON_CHARS);
    }
}
