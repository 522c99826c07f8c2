use chrono::{TimeDelta, Utc};
use enrichd_core::ports::IntelProvider;
use enrichd_core::{ProviderError, ProviderFields, ProviderId, ProviderOutcome, Verdict};
use enrichd_intel::GreyNoise;
use enrichd_testkit::http::{HttpServer, Response};

use crate::{KEY, config, fixture, ip};

async fn server() -> HttpServer {
    HttpServer::start(|req| {
        let body = |name| fixture("greynoise", name);
        match req.path.as_str() {
            "/v3/community/167.94.138.35" => Response::json(200, body("ok_benign.json")),
            "/v3/community/45.155.205.233" => Response::json(200, body("ok_malicious.json")),
            "/v3/community/185.220.101.4" => Response::json(200, body("ok_with_tags.json")),
            "/v3/community/198.51.100.4" => {
                Response::json(429, body("rate_limited_429.json")).header("retry-after", "900")
            }
            "/v3/community/198.51.100.5" => Response::json(400, body("bad_request_400.json")),
            "/v3/community/198.51.100.6" => Response::json(401, "{}"),
            "/v3/community/198.51.100.7" => Response::json(403, "{}"),
            "/v3/community/198.51.100.8" => Response::json(500, "{}"),
            "/v3/community/198.51.100.9" => {
                Response::status(302).header("location", "http://127.0.0.1:1/elsewhere")
            }
            _ => Response::json(404, body("not_found_404.json")),
        }
    })
    .await
}

#[tokio::test]
async fn greynoise_answers_carry_classification_name_and_tags() {
    let server = server().await;
    let provider = GreyNoise::new(&config(ProviderId::Greynoise, &server.base_url())).unwrap();

    let benign = provider.lookup(ip("167.94.138.35")).await.unwrap();
    assert_eq!(benign.outcome, ProviderOutcome::Ok);
    assert_eq!(benign.verdict, Some(Verdict::Benign));
    assert_eq!(benign.raw["name"], "Censys");

    let malicious = provider.lookup(ip("45.155.205.233")).await.unwrap();
    assert_eq!(malicious.verdict, Some(Verdict::Malicious));

    let tagged = provider.lookup(ip("185.220.101.4")).await.unwrap();
    assert_eq!(
        tagged.fields,
        Some(ProviderFields::Greynoise {
            classification: "malicious".into(),
            name: Some("Tor".into()),
            tags: vec!["tor_exit_node".into(), "ssh_bruteforcer".into()],
        })
    );

    let req = server.last_request();
    assert_eq!(req.method, "GET");
    assert_eq!(req.target, "/v3/community/185.220.101.4");
    assert_eq!(req.header("key"), Some(KEY));
    assert_eq!(req.header("user-agent"), Some("curl/7.88.1"));
    assert_eq!(
        server.connection_count(),
        1,
        "the pooled client reuses its connection"
    );
}

#[tokio::test]
async fn greynoise_404_is_not_found_and_unknown() {
    let server = server().await;
    let provider = GreyNoise::new(&config(ProviderId::Greynoise, &server.base_url())).unwrap();
    let report = provider.lookup(ip("8.8.4.4")).await.unwrap();
    assert_eq!(report.outcome, ProviderOutcome::NotFound);
    assert_eq!(report.verdict, Some(Verdict::Unknown));
    assert_eq!(
        report.fields,
        Some(ProviderFields::Greynoise {
            classification: "unknown".into(),
            name: None,
            tags: vec![],
        })
    );
}

#[tokio::test]
async fn greynoise_429_parks_until_retry_after() {
    let server = server().await;
    let provider = GreyNoise::new(&config(ProviderId::Greynoise, &server.base_url())).unwrap();
    let before = Utc::now();
    let err = provider.lookup(ip("198.51.100.4")).await.unwrap_err();
    let ProviderError::RateLimited { resume_at } = err else {
        panic!("expected a rate limit, got {err:?}");
    };
    assert!(resume_at >= before + TimeDelta::seconds(900));
    assert!(resume_at <= Utc::now() + TimeDelta::seconds(900));
}

#[tokio::test]
async fn greynoise_status_mapping() {
    let server = server().await;
    let provider = GreyNoise::new(&config(ProviderId::Greynoise, &server.base_url())).unwrap();
    let skipped = provider.lookup(ip("198.51.100.5")).await.unwrap();
    assert_eq!(skipped.outcome, ProviderOutcome::SkippedUnsupported);
    assert_eq!(skipped.fields, None);
    for rejected in ["198.51.100.6", "198.51.100.7"] {
        assert_eq!(
            provider.lookup(ip(rejected)).await,
            Err(ProviderError::KeyRejected),
            "{rejected}"
        );
    }
    assert_eq!(
        provider.lookup(ip("198.51.100.8")).await,
        Err(ProviderError::Server { status: 500 })
    );
    // Redirects are never followed: the 302 is the answer.
    assert_eq!(
        provider.lookup(ip("198.51.100.9")).await,
        Err(ProviderError::Unexpected("http status 302".into()))
    );
    assert_eq!(server.request_count(), 5);
}

#[tokio::test]
async fn greynoise_ipv6_is_skipped_without_a_request() {
    let server = server().await;
    let provider = GreyNoise::new(&config(ProviderId::Greynoise, &server.base_url())).unwrap();
    let report = provider.lookup(ip("2001:db8::1")).await.unwrap();
    assert_eq!(report.outcome, ProviderOutcome::SkippedUnsupported);
    assert_eq!(server.request_count(), 0);
}

#[tokio::test]
async fn greynoise_sends_the_key_header_only_when_a_key_is_set() {
    let server = server().await;
    let keyless = config(ProviderId::Greynoise, &server.base_url()).with_api_key(None);
    let provider = GreyNoise::new(&keyless).unwrap();
    provider.lookup(ip("167.94.138.35")).await.unwrap();
    assert!(!server.last_request().has_header("key"));
}
