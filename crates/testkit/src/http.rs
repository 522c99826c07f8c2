//! A scriptable HTTP/1.1 server on a loopback port, for provider wire-contract tests, the
//! `enrichd-fakes` process and benchmarks.
//!
//! Hand-rolled on tokio's `TcpListener` because tests need what no well-behaved server does:
//! answer late, trickle a body past a deadline, send a body far over a size cap, or close the
//! connection without answering. A handler closure picks the [`Response`] for each
//! [`Request`]; every request is recorded for assertions (a long-running server turns that
//! off: [`HttpServerBuilder::without_recording`]). A handler may also be async
//! ([`HttpServerBuilder::serve_async`]), for a server that must do something after its own
//! delay, as `enrichd-fakes` counts each answer when it is sent. Connections are kept alive
//! (HTTP/1.1 default) so a pooled client reuses them, as it would against the real API, and
//! benchmarks are not dominated by connection set-up.
//!
//! ```no_run
//! # async fn demo() {
//! use enrichd_testkit::http::{HttpServer, Response};
//! let server = HttpServer::start(|req| {
//!     if req.path == "/v3/community/192.0.2.1" {
//!         Response::json(200, r#"{"classification":"benign"}"#)
//!     } else {
//!         Response::json(404, "{}")
//!     }
//! })
//! .await;
//! let base = server.base_url(); // http://127.0.0.1:<port>
//! # let _ = base;
//! assert_eq!(server.request_count(), 0);
//! # }
//! ```

use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Largest request head we accept; a client sending more is not one of ours.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body we buffer.
const MAX_REQUEST_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Filler bodies are written in pieces of this size, never allocated whole.
const FILLER_PIECE: usize = 64 * 1024;

/// One request as the server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (`GET`, `POST`).
    pub method: String,
    /// The request target: path plus query, as sent (`/api/v2/check?ipAddress=..`).
    pub target: String,
    /// The path part of the target.
    pub path: String,
    /// The query part of the target (after `?`), if any.
    pub query: Option<String>,
    /// Headers in arrival order; names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bodies only).
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the request carries a header of that name.
    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }

    /// The body parsed as JSON.
    ///
    /// # Panics
    /// When the body is not JSON (a test failure).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }

    /// The first value of a query parameter, percent-decoded (`+` is a space); a parameter
    /// given without `=` has the empty value.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then(|| percent_decode(value))
        })
    }
}

/// Decodes `%XX` escapes and `+` (a space, as in a form-encoded query); a `%` not followed by
/// two hex digits stays as it is.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What to send back for one request.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Extra headers (`Content-Length` / `Transfer-Encoding` are added by the server).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body,
    /// Wait this long before sending anything.
    pub delay: Duration,
    /// Send the body slowly instead of at once.
    pub trickle: Option<Trickle>,
    /// Read the request, then close the connection without a byte of response.
    pub close_without_response: bool,
}

/// A response body.
#[derive(Debug, Clone)]
pub enum Body {
    /// These bytes.
    Bytes(Vec<u8>),
    /// `len` filler bytes, generated while sending (for bodies over a size cap).
    Filler {
        /// Number of bytes.
        len: u64,
        /// Whether `Content-Length` announces the size; otherwise the body is chunked, so
        /// only a client that counts while streaming notices it is too large.
        announce_length: bool,
    },
}

/// How to send a body slowly.
#[derive(Debug, Clone, Copy)]
pub struct Trickle {
    /// Bytes per piece.
    pub piece: usize,
    /// Pause before each piece.
    pub every: Duration,
}

impl Response {
    /// An empty response with this status.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Body::Bytes(Vec::new()),
            delay: Duration::ZERO,
            trickle: None,
            close_without_response: false,
        }
    }

    /// A JSON body with this status.
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self::status(status)
            .header("content-type", "application/json")
            .body(body.into().into_bytes())
    }

    /// A body with the given content type.
    pub fn text(status: u16, content_type: &str, body: impl Into<String>) -> Self {
        Self::status(status)
            .header("content-type", content_type)
            .body(body.into().into_bytes())
    }

    /// A body of `len` filler bytes whose `Content-Length` announces the size.
    pub fn huge(status: u16, len: u64) -> Self {
        Self {
            body: Body::Filler {
                len,
                announce_length: true,
            },
            ..Self::status(status)
        }
    }

    /// A chunked body of `len` filler bytes with no `Content-Length`.
    pub fn huge_unannounced(status: u16, len: u64) -> Self {
        Self {
            body: Body::Filler {
                len,
                announce_length: false,
            },
            ..Self::status(status)
        }
    }

    /// Reads the request and closes the connection without answering.
    pub fn close_without_response() -> Self {
        Self {
            close_without_response: true,
            ..Self::status(500)
        }
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Replaces the body.
    #[must_use]
    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.body = Body::Bytes(body);
        self
    }

    /// Waits this long before answering.
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Sends the body in pieces of `piece` bytes, pausing `every` before each.
    #[must_use]
    pub fn trickle(mut self, piece: usize, every: Duration) -> Self {
        self.trickle = Some(Trickle {
            piece: piece.max(1),
            every,
        });
        self
    }
}

/// The future an async handler returns.
type ResponseFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

/// How a server picks its answers.
enum Handler {
    /// Decides at once from the borrowed request.
    Now(Box<dyn Fn(&Request) -> Response + Send + Sync>),
    /// Owns the request and may await before answering.
    Later(Box<dyn Fn(Request) -> ResponseFuture + Send + Sync>),
}

struct Shared {
    handler: Handler,
    /// Whether `requests` keeps every request (counted either way).
    record: bool,
    requests: Mutex<Vec<Request>>,
    count: AtomicUsize,
    connections: AtomicUsize,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    fn note(&self, request: Request) {
        if self.record {
            lock(&self.requests).push(request);
        }
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    async fn answer(&self, request: Request) -> Response {
        match &self.handler {
            Handler::Now(handler) => {
                let response = handler(&request);
                self.note(request);
                response
            }
            Handler::Later(handler) => {
                let future = if self.record {
                    let answer = handler(request.clone());
                    self.note(request);
                    answer
                } else {
                    self.count.fetch_add(1, Ordering::SeqCst);
                    handler(request)
                };
                future.await
            }
        }
    }
}

/// Where a server listens and whether it records requests; see [`HttpServer::builder`].
#[derive(Debug, Clone, Copy)]
#[must_use = "a builder does nothing until serve or serve_async"]
pub struct HttpServerBuilder {
    addr: SocketAddr,
    record: bool,
}

impl HttpServerBuilder {
    /// Listens on `addr` instead of `127.0.0.1:0`.
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Counts requests without keeping them: a server that answers millions of requests (a
    /// benchmark's fake providers) must not hold every one in memory.
    pub fn without_recording(mut self) -> Self {
        self.record = false;
        self
    }

    /// Binds and serves every request with `handler`. Must run inside a tokio runtime (the
    /// accept loop is spawned on it).
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn serve(
        self,
        handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
    ) -> io::Result<HttpServer> {
        self.bind(Handler::Now(Box::new(handler))).await
    }

    /// Binds and serves every request with an async `handler`, which owns the request.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn serve_async<F, Fut>(self, handler: F) -> io::Result<HttpServer>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        let boxed = move |request: Request| -> ResponseFuture { Box::pin(handler(request)) };
        self.bind(Handler::Later(Box::new(boxed))).await
    }

    async fn bind(self, handler: Handler) -> io::Result<HttpServer> {
        let listener = TcpListener::bind(self.addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            handler,
            record: self.record,
            requests: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            tasks: Mutex::new(Vec::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of file descriptors and the like: back off a little, never give up.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                accept_shared.connections.fetch_add(1, Ordering::SeqCst);
                let conn_shared = Arc::clone(&accept_shared);
                let task = tokio::spawn(async move {
                    let _ = serve_connection(stream, &conn_shared).await;
                });
                let mut tasks = lock(&accept_shared.tasks);
                tasks.retain(|t| !t.is_finished());
                tasks.push(task.abort_handle());
            }
        })
        .abort_handle();
        Ok(HttpServer {
            addr,
            shared,
            accept,
        })
    }
}

/// A running server. Dropping it stops the listener and every open connection.
pub struct HttpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HttpServer {
    /// A server on `127.0.0.1:0` that records every request, to be configured further.
    pub fn builder() -> HttpServerBuilder {
        HttpServerBuilder {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            record: true,
        }
    }

    /// Binds `127.0.0.1:0` and serves every request with `handler`. Must run inside a tokio
    /// runtime (the accept loop is spawned on it).
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(handler: impl Fn(&Request) -> Response + Send + Sync + 'static) -> Self {
        Self::builder()
            .serve(handler)
            .await
            .expect("bind a loopback port")
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, to use as a provider base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order (none without recording).
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.requests).clone()
    }

    /// The most recent request.
    ///
    /// # Panics
    /// When no request arrived (a test failure).
    pub fn last_request(&self) -> Request {
        lock(&self.shared.requests)
            .last()
            .cloned()
            .expect("at least one request")
    }

    /// How many requests arrived.
    pub fn request_count(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// How many TCP connections were accepted (keep-alive reuse keeps this low).
    pub fn connection_count(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Forgets the recorded requests (the count too).
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
        self.shared.count.store(0, Ordering::SeqCst);
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.accept.abort();
        for task in lock(&self.shared.tasks).drain(..) {
            task.abort();
        }
    }
}

/// A loopback URL on which nothing listens: connecting is refused.
///
/// # Panics
/// When no loopback port can be bound.
pub async fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound address");
    drop(listener);
    format!("http://{addr}")
}

/// Locks a mutex, ignoring poisoning: a panicking test thread must not hide the recording.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// === connection handling ===

async fn serve_connection(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let mut buf = Vec::with_capacity(8192);
    loop {
        let head_end = match read_head(&stream, &mut buf).await? {
            Head::Complete(end) => end,
            Head::Closed => return Ok(()), // the client closed between requests
            Head::TooLarge => return refuse(&stream, 431).await,
        };
        let (mut request, content_length, keep_alive) = match parse_head(&buf[..head_end]) {
            Ok(parsed) => parsed,
            Err(status) => return refuse(&stream, status).await,
        };
        buf.drain(..head_end);
        if content_length > MAX_REQUEST_BODY_BYTES {
            return refuse(&stream, 413).await;
        }
        while buf.len() < content_length {
            if read_more(&stream, &mut buf).await? == 0 {
                return Ok(());
            }
        }
        request.body = buf.drain(..content_length).collect();

        let response = shared.answer(request).await;
        if !response.delay.is_zero() {
            tokio::time::sleep(response.delay).await;
        }
        if response.close_without_response {
            return Ok(());
        }
        send_response(&stream, &response, keep_alive).await?;
        if !keep_alive {
            return Ok(());
        }
    }
}

/// Answers a request the server cannot read with `status` and closes the connection: what
/// follows on the stream cannot be framed.
async fn refuse(stream: &TcpStream, status: u16) -> io::Result<()> {
    let answer = format!(
        "HTTP/1.1 {status} {}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        reason(status)
    );
    write_all(stream, answer.as_bytes()).await
}

/// What reading a request head found.
enum Head {
    /// A complete head ends just before this index.
    Complete(usize),
    /// The peer closed cleanly before sending anything.
    Closed,
    /// Over [`MAX_HEAD_BYTES`] without an end.
    TooLarge,
}

/// Reads until `buf` holds a complete request head.
async fn read_head(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<Head> {
    loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            return Ok(Head::Complete(pos + 4));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Ok(Head::TooLarge);
        }
        if read_more(stream, buf).await? == 0 {
            return Ok(Head::Closed);
        }
    }
}

/// The request, its body's length and whether the connection stays open; or the status
/// that refuses it (400 malformed, 501 a chunked body, which no client we serve sends).
fn parse_head(head: &[u8]) -> Result<(Request, usize, bool), u16> {
    let text = std::str::from_utf8(head).map_err(|_| 400_u16)?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next().ok_or(400_u16)?.split(' ');
    let (Some(method), Some(target), Some(version)) = (first.next(), first.next(), first.next())
    else {
        return Err(400);
    };
    let (method, target) = (method.to_owned(), target.to_owned());
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or(400_u16)?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let header = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    if header("transfer-encoding").is_some() {
        return Err(501);
    }
    let content_length = match header("content-length") {
        Some(v) => v.parse().map_err(|_| 400_u16)?,
        None => 0,
    };
    let connection = header("connection").map(str::to_ascii_lowercase);
    let keep_alive = match connection.as_deref() {
        Some("close") => false,
        Some("keep-alive") => true,
        _ => version == "HTTP/1.1",
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.clone(), None),
    };
    Ok((
        Request {
            method,
            target,
            path,
            query,
            headers,
            body: Vec::new(),
        },
        content_length,
        keep_alive,
    ))
}

async fn send_response(
    stream: &TcpStream,
    response: &Response,
    keep_alive: bool,
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason(response.status)
    );
    for (name, value) in &response.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    let chunked = match &response.body {
        // RFC 9110 §8.6: these statuses carry no content, so no length either.
        Body::Bytes(_) if has_no_content(response.status) => false,
        Body::Bytes(bytes) => {
            let _ = write!(head, "content-length: {}\r\n", bytes.len());
            false
        }
        Body::Filler {
            len,
            announce_length: true,
        } => {
            let _ = write!(head, "content-length: {len}\r\n");
            false
        }
        Body::Filler {
            announce_length: false,
            ..
        } => {
            head.push_str("transfer-encoding: chunked\r\n");
            true
        }
    };
    if !keep_alive {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    if let (Body::Bytes(bytes), None) = (&response.body, response.trickle) {
        // One write for head and body: one segment on the wire for a small answer.
        let mut whole = head.into_bytes();
        if !has_no_content(response.status) {
            whole.extend_from_slice(bytes);
        }
        return write_all(stream, &whole).await;
    }
    write_all(stream, head.as_bytes()).await?;

    match &response.body {
        Body::Bytes(_) if has_no_content(response.status) => Ok(()),
        Body::Bytes(bytes) => write_body(stream, bytes, response.trickle).await,
        Body::Filler { len, .. } => {
            let piece = vec![b'x'; FILLER_PIECE];
            let mut left = *len;
            while left > 0 {
                let n = usize::try_from(left.min(FILLER_PIECE as u64)).unwrap_or(FILLER_PIECE);
                if chunked {
                    write_all(stream, format!("{n:x}\r\n").as_bytes()).await?;
                }
                write_body(stream, &piece[..n], response.trickle).await?;
                if chunked {
                    write_all(stream, b"\r\n").await?;
                }
                left -= n as u64;
            }
            if chunked {
                write_all(stream, b"0\r\n\r\n").await?;
            }
            Ok(())
        }
    }
}

async fn write_body(stream: &TcpStream, bytes: &[u8], trickle: Option<Trickle>) -> io::Result<()> {
    match trickle {
        None => write_all(stream, bytes).await,
        Some(t) => {
            for piece in bytes.chunks(t.piece) {
                tokio::time::sleep(t.every).await;
                write_all(stream, piece).await?;
            }
            Ok(())
        }
    }
}

/// Statuses whose answers have no content (RFC 9110 §6.4.1).
fn has_no_content(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// Reads and writes use readiness + try_* on a shared `&TcpStream`, so a connection needs no
// split halves.

/// Reads what is available into `buf`'s spare capacity; 0 when the peer has closed. Nothing is
/// zeroed first (a 16 KiB fill per read was most of a keep-alive request's cost in a debug
/// build), and a stack array would bloat every future above.
async fn read_more(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.reserve(16 * 1024);
    loop {
        stream.readable().await?;
        match stream.try_read_buf(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
        let stream = TcpStream::connect(addr).await.unwrap();
        write_all(&stream, request).await.unwrap();
        let mut out = Vec::new();
        while read_more(&stream, &mut out).await.unwrap() > 0 {}
        out
    }

    #[tokio::test]
    async fn records_requests_and_answers_from_the_handler() {
        let server = HttpServer::start(|req| {
            Response::json(201, format!("{{\"path\":\"{}\"}}", req.path)).header("x-test", "1")
        })
        .await;
        let out = raw_exchange(
            server.addr(),
            b"POST /a/b?x=1 HTTP/1.1\r\nHost: h\r\nAuth-Key: k\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        .await;
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 201 "), "{text}");
        assert!(text.contains("x-test: 1\r\n"));
        assert!(text.ends_with("{\"path\":\"/a/b\"}"));
        let req = server.last_request();
        assert_eq!(req.method, "POST");
        assert_eq!(req.target, "/a/b?x=1");
        assert_eq!(req.query.as_deref(), Some("x=1"));
        assert_eq!(req.header("AUTH-KEY"), Some("k"));
        assert_eq!(req.body, b"{}");
        assert_eq!(server.request_count(), 1);
    }

    #[tokio::test]
    async fn keeps_connections_alive_between_requests() {
        let server = HttpServer::start(|_| Response::json(200, "{}")).await;
        let out = raw_exchange(
            server.addr(),
            b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
        assert_eq!(server.request_count(), 2);
        assert_eq!(server.connection_count(), 1);
    }

    #[tokio::test]
    async fn sends_unannounced_filler_chunked() {
        let server = HttpServer::start(|_| Response::huge_unannounced(200, 100_000)).await;
        let out = raw_exchange(
            server.addr(),
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("transfer-encoding: chunked"));
        assert!(!text.contains("content-length"));
        assert!(text.ends_with("0\r\n\r\n"));
        assert!(text.matches('x').count() >= 100_000);
    }

    #[tokio::test]
    async fn an_async_handler_answers_after_its_own_wait_and_may_skip_recording() {
        let server = HttpServer::builder()
            .without_recording()
            .serve_async(|req: Request| async move {
                tokio::task::yield_now().await;
                Response::json(200, format!("{{\"path\":\"{}\"}}", req.path))
            })
            .await
            .unwrap();
        let out = raw_exchange(
            server.addr(),
            b"GET /x HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("{\"path\":\"/x\"}"), "{text}");
        assert!(text.ends_with("{\"path\":\"/y\"}"), "{text}");
        assert_eq!(server.request_count(), 2);
        assert!(
            server.requests().is_empty(),
            "nothing kept without recording"
        );
    }

    #[tokio::test]
    async fn unreadable_requests_are_refused_with_the_reason() {
        let server = HttpServer::start(|_| Response::json(200, "{}")).await;
        for (request, status) in [
            (&b"\x01\x02 nonsense\r\n\r\n"[..], "400 Bad Request"),
            (
                &b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"[..],
                "501 Not Implemented",
            ),
            (
                &b"POST / HTTP/1.1\r\ncontent-length: many\r\n\r\n"[..],
                "400 Bad Request",
            ),
        ] {
            let text = String::from_utf8(raw_exchange(server.addr(), request).await).unwrap();
            assert!(
                text.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{text}"
            );
            assert!(text.contains("connection: close"), "{text}");
        }
        assert_eq!(server.request_count(), 0);
    }

    #[tokio::test]
    async fn not_modified_carries_no_length_and_no_body() {
        let server = HttpServer::start(|_| Response::status(304).header("etag", "\"1\"")).await;
        let out = raw_exchange(
            server.addr(),
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 304 Not Modified\r\netag: \"1\"\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let request = parse_head(
            b"GET /api/v2/check?ipAddress=2001%3Adb8%3A%3A1&maxAgeInDays=30&verbose HTTP/1.1\r\n\r\n",
        )
        .unwrap()
        .0;
        assert_eq!(
            request.query_param("ipAddress"),
            Some("2001:db8::1".to_owned())
        );
        assert_eq!(request.query_param("verbose"), Some(String::new()));
        assert_eq!(request.query_param("absent"), None);
        assert_eq!(percent_decode("50%"), "50%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("a+b"), "a b");
    }

    #[tokio::test]
    async fn can_close_without_answering() {
        let server = HttpServer::start(|_| Response::close_without_response()).await;
        let out = raw_exchange(server.addr(), b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(out.is_empty());
        assert_eq!(server.request_count(), 1);
    }
}
