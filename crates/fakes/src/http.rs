//! The HTTP/1.1 side: keep-alive connections, each request parsed with `httparse`, routed to a
//! provider's fake (with latency and faults) or to the admin endpoints.
//!
//! | route | what |
//! |---|---|
//! | `GET /v3/community/{ip}` | GreyNoise |
//! | `GET /api/v2/check?ipAddress=..` | AbuseIPDB (with `X-RateLimit-*` headers) |
//! | `POST /api/v1/` | ThreatFox `search_ioc` |
//! | `GET /downloads/ipblocklist.json` | the Feodo feed (`If-None-Match` → 304) |
//! | `GET /_stats`, `GET /_log`, `POST /_reset`, `GET /_health` | admin (no latency, no faults) |

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Shared;
use crate::faults::Fault;
use crate::world::{self, Answer, Provider};

/// Largest request head we read.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body we read.
const MAX_BODY: usize = 1024 * 1024;

/// Accepts connections until the listener fails for good.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, Arc::clone(&shared)));
            }
            // Out of file descriptors and the like: back off a little instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One parsed request, owning what routing needs.
#[derive(Debug)]
struct Request {
    method: String,
    target: String,
    if_none_match: Option<String>,
    body: Vec<u8>,
    close: bool,
}

enum Parsed {
    Complete(Request, usize),
    Partial,
    Bad(u16),
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD {
                Parsed::Bad(431)
            } else {
                Parsed::Partial
            };
        }
        Err(_) => return Parsed::Bad(400),
    };
    let mut content_length = 0usize;
    let mut if_none_match = None;
    let mut close = req.version == Some(0);
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            match value.trim().parse::<usize>() {
                Ok(n) if n <= MAX_BODY => content_length = n,
                Ok(_) => return Parsed::Bad(413),
                Err(_) => return Parsed::Bad(400),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Nothing enrichd sends is chunked; refuse rather than misread the stream.
            return Parsed::Bad(501);
        } else if h.name.eq_ignore_ascii_case("if-none-match") {
            if_none_match = Some(value.into_owned());
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let total = head + content_length;
    if buf.len() < total {
        return Parsed::Partial;
    }
    Parsed::Complete(
        Request {
            method: req.method.unwrap_or_default().to_owned(),
            target: req.path.unwrap_or_default().to_owned(),
            if_none_match,
            body: buf[head..total].to_vec(),
            close,
        },
        total,
    )
}

async fn connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    loop {
        match parse(&buf) {
            Parsed::Complete(request, consumed) => {
                buf.drain(..consumed);
                let answer = respond(&request, &shared).await;
                out.clear();
                encode(&answer, request.close, &mut out);
                if stream.write_all(&out).await.is_err() || request.close {
                    return;
                }
            }
            Parsed::Partial => match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            Parsed::Bad(status) => {
                out.clear();
                encode(
                    &Answer::json(status, &json!({"error": "bad request"})),
                    true,
                    &mut out,
                );
                let _ = stream.write_all(&out).await;
                return;
            }
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Status",
    }
}

fn encode(answer: &Answer, close: bool, out: &mut Vec<u8>) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        answer.status,
        reason(answer.status)
    );
    if answer.status != 304 {
        let _ = write!(
            out,
            "content-type: application/json\r\ncontent-length: {}\r\n",
            answer.body.len()
        );
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    for (name, value) in &answer.headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&answer.body);
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
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

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// Which provider a request is for, and the key it is counted under.
fn provider_route(request: &Request) -> Option<Result<(Provider, String), u16>> {
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((request.target.as_str(), ""));
    let method = |expected: &str| {
        if request.method == expected {
            Ok(())
        } else {
            Err(405)
        }
    };
    if let Some(ip) = path.strip_prefix("/v3/community/") {
        return Some(method("GET").map(|()| (Provider::Greynoise, percent_decode(ip))));
    }
    match path {
        "/api/v2/check" => Some(method("GET").map(|()| {
            (
                Provider::Abuseipdb,
                query_param(query, "ipAddress").unwrap_or_default(),
            )
        })),
        "/api/v1/" | "/api/v1" => Some(method("POST").map(|()| {
            let term = serde_json::from_slice::<Value>(&request.body)
                .ok()
                .and_then(|v| {
                    v.get("search_term")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            (Provider::Threatfox, term)
        })),
        "/downloads/ipblocklist.json" => {
            Some(method("GET").map(|()| (Provider::Feodo, "feed".to_owned())))
        }
        _ => None,
    }
}

fn next_utc_midnight_secs() -> u64 {
    let now = crate::stats::epoch_ms() / 1000;
    now - now % 86_400 + 86_400
}

fn normal_answer(provider: Provider, key: &str, request: &Request, shared: &Shared) -> Answer {
    match provider {
        Provider::Greynoise => world::greynoise(key),
        Provider::Abuseipdb => {
            let limit = shared.config.abuseipdb_quota;
            let used = shared.stats.requests(Provider::Abuseipdb);
            world::abuseipdb(
                key,
                limit,
                limit.saturating_sub(used),
                next_utc_midnight_secs(),
            )
        }
        Provider::Threatfox => {
            let body = serde_json::from_slice::<Value>(&request.body).unwrap_or(Value::Null);
            world::threatfox(
                body.get("query").and_then(Value::as_str),
                body.get("search_term").and_then(Value::as_str),
            )
        }
        Provider::Feodo => world::feodo(request.if_none_match.as_deref()),
    }
}

fn fault_answer(provider: Provider, fault: Fault) -> Answer {
    match fault {
        Fault::ServerError => Answer::json(500, &json!({"error": "internal server error"})),
        Fault::RateLimited => {
            let body = match provider {
                Provider::Greynoise => json!({
                    "plan": "unauthenticated",
                    "rate-limit": "100-lookups/day",
                    "message": "You have hit your rate limit.",
                }),
                Provider::Abuseipdb => json!({"errors": [{
                    "detail": "Too many requests for this endpoint.",
                    "status": 429,
                }]}),
                _ => {
                    json!({"query_status": "ratelimited", "msg": "Your request has been rate-limited."})
                }
            };
            Answer::json(429, &body).header("retry-after", "2")
        }
    }
}

async fn respond(request: &Request, shared: &Shared) -> Answer {
    let (provider, key) = match provider_route(request) {
        Some(Ok(route)) => route,
        Some(Err(status)) => return Answer::json(status, &json!({"error": "method not allowed"})),
        None => return admin(request, shared),
    };
    let arrival = shared.stats.arrive(provider, &key);
    let answer = match shared.config.faults.decide(provider, &key, arrival.attempt) {
        Some(fault) => fault_answer(provider, fault),
        None => normal_answer(provider, &key, request, shared),
    };
    if !shared.config.latency.is_zero() {
        tokio::time::sleep(shared.config.latency).await;
    }
    shared.stats.answered(provider, arrival, answer.status);
    answer
}

fn admin(request: &Request, shared: &Shared) -> Answer {
    let path = request.target.split('?').next().unwrap_or_default();
    match (request.method.as_str(), path) {
        ("GET", "/_health") => Answer::json(200, &json!({"ok": true})),
        ("GET", "/_stats") => Answer::json(200, &shared.stats.to_json()),
        ("GET", "/_log") => Answer::json(200, &shared.stats.log_json()),
        ("POST", "/_reset") => {
            shared.stats.reset();
            Answer::json(200, &json!({"reset": true}))
        }
        _ => Answer::json(404, &json!({"error": "no such route"})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_bodies_and_keep_alive() {
        let raw = b"POST /api/v1/ HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhelloGET /_health HTTP/1.1\r\n\r\n";
        let Parsed::Complete(first, used) = parse(raw) else {
            panic!("first request")
        };
        assert_eq!(first.method, "POST");
        assert_eq!(first.body, b"hello");
        assert!(!first.close);
        let Parsed::Complete(second, _) = parse(&raw[used..]) else {
            panic!("second request")
        };
        assert_eq!(second.target, "/_health");
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nhost"), Parsed::Partial));
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\ncontent-length: 9\r\n\r\nabc"),
            Parsed::Partial
        ));
        assert!(matches!(
            parse(b"\x01\x02 nonsense\r\n\r\n"),
            Parsed::Bad(400)
        ));
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            query_param(
                "ipAddress=2001%3Adb8%3A%3A1&maxAgeInDays=30&verbose",
                "ipAddress"
            ),
            Some("2001:db8::1".to_owned())
        );
        assert_eq!(query_param("verbose", "verbose"), Some(String::new()));
        assert_eq!(percent_decode("50%"), "50%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
