//! The HTTP side: what each request gets. The server is testkit's (`HttpServer`, keep-alive,
//! no recording); this module routes a request to a provider's fake (with latency and faults)
//! or to the admin endpoints.
//!
//! | route | what |
//! |---|---|
//! | `GET /v3/community/{ip}` | GreyNoise |
//! | `GET /api/v2/check?ipAddress=..` | AbuseIPDB (with `X-RateLimit-*` headers) |
//! | `POST /api/v1/` | ThreatFox `search_ioc` |
//! | `GET /downloads/ipblocklist.json` | the Feodo feed (`If-None-Match` → 304) |
//! | `GET /_stats`, `GET /_log`, `POST /_reset`, `GET /_health` | admin (no latency, no faults) |

use std::sync::Arc;

use enrichd_core::ProviderId;
use enrichd_testkit::http::{Request, Response, percent_decode};
use serde::Serialize;
use serde_json::{Value, json};

use crate::Shared;
use crate::faults::Fault;
use crate::world::{self, Answer};

/// Which provider a request is for, and the key it is counted under; `Err` is the status of
/// a provider route asked with the wrong method.
fn provider_route(request: &Request) -> Option<Result<(ProviderId, String), u16>> {
    let method = |expected: &str| {
        if request.method == expected {
            Ok(())
        } else {
            Err(405)
        }
    };
    if let Some(ip) = request.path.strip_prefix("/v3/community/") {
        return Some(method("GET").map(|()| (ProviderId::Greynoise, percent_decode(ip))));
    }
    match request.path.as_str() {
        "/api/v2/check" => Some(method("GET").map(|()| {
            (
                ProviderId::Abuseipdb,
                request.query_param("ipAddress").unwrap_or_default(),
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
            (ProviderId::Threatfox, term)
        })),
        "/downloads/ipblocklist.json" => {
            Some(method("GET").map(|()| (ProviderId::Feodo, "feed".to_owned())))
        }
        _ => None,
    }
}

fn next_utc_midnight_secs() -> u64 {
    let now = crate::stats::epoch_ms() / 1000;
    now - now % 86_400 + 86_400
}

fn normal_answer(provider: ProviderId, key: &str, request: &Request, shared: &Shared) -> Answer {
    match provider {
        ProviderId::Greynoise => world::greynoise(key),
        ProviderId::Abuseipdb => {
            let limit = shared.config.abuseipdb_quota;
            let used = shared.counters.requests(ProviderId::Abuseipdb);
            world::abuseipdb(
                key,
                limit,
                limit.saturating_sub(used),
                next_utc_midnight_secs(),
            )
        }
        ProviderId::Threatfox => {
            let body = serde_json::from_slice::<Value>(&request.body).unwrap_or(Value::Null);
            world::threatfox(
                body.get("query").and_then(Value::as_str),
                body.get("search_term").and_then(Value::as_str),
            )
        }
        ProviderId::Feodo => world::feodo(request.header("if-none-match")),
    }
}

fn fault_answer(provider: ProviderId, fault: Fault) -> Answer {
    match fault {
        Fault::ServerError => Answer::json(500, &json!({"error": "internal server error"})),
        Fault::RateLimited => {
            let body = match provider {
                ProviderId::Greynoise => json!({
                    "plan": "unauthenticated",
                    "rate-limit": "100-lookups/day",
                    "message": "You have hit your rate limit.",
                }),
                ProviderId::Abuseipdb => json!({"errors": [{
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

/// The answer to one request. A provider's answer is counted as sent after its latency, so a
/// 429's time in `/_stats` is when it left, as before the server was shared.
pub(crate) async fn respond(request: Request, shared: Arc<Shared>) -> Response {
    let (provider, key) = match provider_route(&request) {
        Some(Ok(route)) => route,
        Some(Err(status)) => {
            return into_response(&Answer::json(
                status,
                &json!({"error": "method not allowed"}),
            ));
        }
        None => return into_response(&admin(&request, &shared)),
    };
    let arrival = shared.counters.arrive(provider, &key);
    let answer = match shared.config.faults.decide(provider, &key, arrival.attempt) {
        Some(fault) => fault_answer(provider, fault),
        None => normal_answer(provider, &key, &request, &shared),
    };
    if !shared.config.latency.is_zero() {
        tokio::time::sleep(shared.config.latency).await;
    }
    shared.counters.answered(provider, arrival, answer.status);
    into_response(&answer)
}

fn admin(request: &Request, shared: &Shared) -> Answer {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/_health") => Answer::json(200, &json!({"ok": true})),
        ("GET", "/_stats") => document(&shared.counters.snapshot()),
        ("GET", "/_log") => document(&shared.counters.request_log()),
        ("POST", "/_reset") => {
            shared.counters.reset();
            Answer::json(200, &json!({"reset": true}))
        }
        _ => Answer::json(404, &json!({"error": "no such route"})),
    }
}

/// A counters document as a 200, or a 500 saying it could not be written.
fn document(doc: &impl Serialize) -> Answer {
    match serde_json::to_value(doc) {
        Ok(value) => Answer::json(200, &value),
        Err(e) => Answer::json(500, &json!({"error": e.to_string()})),
    }
}

/// The server's response for a world answer: JSON unless it is a 304, which has no content.
fn into_response(answer: &Answer) -> Response {
    let mut response = Response::status(answer.status);
    if answer.status != 304 {
        response = response.header("content-type", "application/json");
    }
    for (name, value) in &answer.headers {
        response = response.header(name, value);
    }
    response.body(answer.body.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use enrichd_testkit::http::Body;

    fn request(method: &str, target: &str, body: &[u8]) -> Request {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (target.to_owned(), None),
        };
        Request {
            method: method.to_owned(),
            target: target.to_owned(),
            path,
            query,
            headers: Vec::new(),
            body: body.to_vec(),
        }
    }

    #[test]
    fn every_provider_route_names_its_key() {
        let route = |method: &str, target: &str, body: &[u8]| {
            provider_route(&request(method, target, body))
        };
        assert_eq!(
            route("GET", "/v3/community/45.1.2.3", b""),
            Some(Ok((ProviderId::Greynoise, "45.1.2.3".to_owned())))
        );
        assert_eq!(
            route(
                "GET",
                "/api/v2/check?ipAddress=2001%3Adb8%3A%3A1&verbose",
                b""
            ),
            Some(Ok((ProviderId::Abuseipdb, "2001:db8::1".to_owned())))
        );
        assert_eq!(
            route(
                "POST",
                "/api/v1/",
                br#"{"query":"search_ioc","search_term":"45.1.2.4"}"#
            ),
            Some(Ok((ProviderId::Threatfox, "45.1.2.4".to_owned())))
        );
        assert_eq!(
            route("GET", "/downloads/ipblocklist.json", b""),
            Some(Ok((ProviderId::Feodo, "feed".to_owned())))
        );
        assert_eq!(route("POST", "/v3/community/45.1.2.3", b""), Some(Err(405)));
        assert_eq!(route("GET", "/_stats", b""), None);
    }

    #[test]
    fn a_not_modified_feed_is_sent_without_content() {
        let response = into_response(&world::feodo(Some(world::FEODO_ETAG)));
        assert_eq!(response.status, 304);
        assert!(
            !response
                .headers
                .iter()
                .any(|(name, _)| name == "content-type")
        );
        assert!(matches!(&response.body, Body::Bytes(b) if b.is_empty()));
        let full = into_response(&world::feodo(None));
        assert!(
            full.headers
                .contains(&("content-type".to_owned(), "application/json".to_owned()))
        );
    }
}
