//! Hostile answers: every HTTP provider must end in an `error` outcome with a short reason,
//! never a panic and never a verdict.

use std::time::Duration;

use enrichd_core::ports::IntelProvider;
use enrichd_core::provider::ProviderFate;
use enrichd_core::{CanonicalIp, ProviderError, ProviderId, ProviderOutcome, ProviderReport};
use enrichd_intel::abuseipdb::METERED_ERROR_BACKOFF;
use enrichd_intel::{AbuseIpdb, GreyNoise, ThreatFox};
use enrichd_testkit::http::{HttpServer, Response, refused_url};

use crate::{config, ip};

const DEADLINE: Duration = Duration::from_millis(400);
const CAP: u64 = 64 * 1024;

/// One answer a provider must survive, and whether it arrives after a 2xx status line.
struct Case {
    name: &'static str,
    response: Option<Response>,
    after_2xx: bool,
}

fn cases() -> Vec<Case> {
    let padded_json = format!("{{\"pad\":\"{}\"}}", " ".repeat(2000));
    let case = |name, response, after_2xx| Case {
        name,
        response: Some(response),
        after_2xx,
    };
    vec![
        case(
            "html",
            Response::text(
                200,
                "text/html",
                "<html><body>Cloudflare says no</body></html>",
            ),
            true,
        ),
        case(
            "truncated json",
            Response::json(200, r#"{"data": {"abuseConfidenceScore": 1, "classif"#),
            true,
        ),
        case("json array", Response::json(200, "[1, 2, 3]"), true),
        case(
            "wrong types",
            Response::json(
                200,
                r#"{"classification": ["x"], "data": 5, "query_status": 7}"#,
            ),
            true,
        ),
        case(
            "announced body over the cap",
            Response::huge(200, 4 * CAP),
            true,
        ),
        case(
            "chunked body over the cap",
            Response::huge_unannounced(200, 4 * CAP),
            true,
        ),
        case(
            "body trickling past the deadline",
            Response::json(200, padded_json).trickle(16, Duration::from_millis(50)),
            true,
        ),
        case(
            "headers after the deadline",
            Response::json(200, "{}").delay(Duration::from_secs(3)),
            false,
        ),
        case(
            "closed without response",
            Response::close_without_response(),
            false,
        ),
        Case {
            name: "connection refused",
            response: None,
            after_2xx: false,
        },
    ]
}

async fn lookup(
    provider: ProviderId,
    base: &str,
    ip: CanonicalIp,
) -> Result<ProviderReport, ProviderError> {
    let config = config(provider, base)
        .with_timeout(DEADLINE)
        .with_body_limit(CAP);
    match provider {
        ProviderId::Greynoise => GreyNoise::new(&config).unwrap().lookup(ip).await,
        ProviderId::Abuseipdb => AbuseIpdb::new(&config).unwrap().lookup(ip).await,
        ProviderId::Threatfox => ThreatFox::new(&config).unwrap().lookup(ip).await,
        ProviderId::Feodo => unreachable!("feodo is not asked over http per address"),
    }
}

#[tokio::test]
async fn hostile_answers_end_in_a_short_error_never_a_verdict() {
    for provider in [
        ProviderId::Greynoise,
        ProviderId::Abuseipdb,
        ProviderId::Threatfox,
    ] {
        for case in cases() {
            let label = format!("{provider} / {}", case.name);
            let (server, base) = match case.response.clone() {
                Some(response) => {
                    let server = HttpServer::start(move |_| response.clone()).await;
                    let base = server.base_url();
                    (Some(server), base)
                }
                None => (None, refused_url().await),
            };
            let started = tokio::time::Instant::now();
            let result = lookup(provider, &base, ip("45.155.205.233")).await;
            assert!(
                started.elapsed() < DEADLINE + Duration::from_millis(1500),
                "{label}: the deadline covers the whole call"
            );
            let report = match result {
                Ok(report) => {
                    // Only AbuseIPDB turns a failure into a report: after a metered 2xx.
                    assert_eq!(provider, ProviderId::Abuseipdb, "{label}: {report:?}");
                    assert!(case.after_2xx, "{label}");
                    assert_eq!(report.min_backoff, Some(METERED_ERROR_BACKOFF), "{label}");
                    report
                }
                Err(err) => {
                    assert!(
                        !(provider == ProviderId::Abuseipdb && case.after_2xx),
                        "{label}: a metered failure must back off a day: {err:?}"
                    );
                    assert_eq!(
                        err.fate(),
                        ProviderFate::RecordError {
                            trips_breaker: true
                        },
                        "{label}: {err:?}"
                    );
                    ProviderReport::error(provider, err.to_string())
                }
            };
            assert_eq!(report.outcome, ProviderOutcome::Error, "{label}");
            assert_eq!(report.verdict, None, "{label}");
            assert_eq!(report.fields, None, "{label}");
            let reason = report.error.unwrap();
            eprintln!("{label}: {reason}");
            assert!(
                !reason.is_empty() && reason.chars().count() <= 200,
                "{label}: {reason}"
            );
            assert!(
                !reason.contains("Cloudflare"),
                "{label}: no body in the reason"
            );
            assert!(!reason.contains("xxxx"), "{label}: no body in the reason");
            assert!(
                !reason.contains(crate::KEY),
                "{label}: no key in the reason"
            );
            drop(server);
        }
    }
}

#[tokio::test]
async fn over_the_cap_and_timeouts_have_typed_reasons() {
    let server = HttpServer::start(|_| Response::huge_unannounced(200, 4 * CAP)).await;
    assert_eq!(
        lookup(
            ProviderId::Greynoise,
            &server.base_url(),
            ip("198.51.100.1")
        )
        .await,
        Err(ProviderError::TooLarge { limit_bytes: CAP })
    );
    let server = HttpServer::start(|_| {
        Response::json(200, format!("{{\"pad\":\"{}\"}}", " ".repeat(2000)))
            .trickle(8, Duration::from_millis(50))
    })
    .await;
    assert_eq!(
        lookup(
            ProviderId::Threatfox,
            &server.base_url(),
            ip("198.51.100.1")
        )
        .await,
        Err(ProviderError::Timeout(DEADLINE))
    );
    let refused = refused_url().await;
    assert_eq!(
        lookup(ProviderId::Greynoise, &refused, ip("198.51.100.1")).await,
        Err(ProviderError::Transport("connection refused".into()))
    );
}
