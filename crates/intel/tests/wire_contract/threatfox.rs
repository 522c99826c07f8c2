use chrono::{TimeDelta, Utc};
use enrichd_core::ports::IntelProvider;
use enrichd_core::{ProviderError, ProviderFields, ProviderId, ProviderOutcome, Verdict};
use enrichd_intel::{BuildError, ThreatFox};
use enrichd_testkit::http::{HttpServer, Response};
use serde_json::json;

use crate::{KEY, config, fixture, ip};

async fn lookup_with(
    response: Response,
) -> (
    HttpServer,
    Result<enrichd_core::ProviderReport, ProviderError>,
) {
    let server = HttpServer::start(move |_| response.clone()).await;
    let provider = ThreatFox::new(&config(ProviderId::Threatfox, &server.base_url())).unwrap();
    let result = provider.lookup(ip("45.155.205.233")).await;
    (server, result)
}

#[tokio::test]
async fn threatfox_posts_the_search_with_the_auth_key() {
    let (server, _) =
        lookup_with(Response::json(200, fixture("threatfox", "no_result.json"))).await;
    let req = server.last_request();
    assert_eq!(req.method, "POST");
    assert_eq!(req.target, "/api/v1/");
    assert_eq!(req.header("auth-key"), Some(KEY));
    assert_eq!(req.header("user-agent"), Some("curl/7.88.1"));
    assert_eq!(
        req.json(),
        json!({"query": "search_ioc", "search_term": "45.155.205.233"})
    );
}

#[tokio::test]
async fn threatfox_mixed_matches_exclude_substring_hits() {
    let (_server, result) = lookup_with(Response::json(
        200,
        fixture("threatfox", "ok_mixed_matches.json"),
    ))
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, ProviderOutcome::Ok);
    assert_eq!(report.verdict, Some(Verdict::Malicious));
    let Some(ProviderFields::Threatfox {
        listed, ioc_types, ..
    }) = &report.fields
    else {
        panic!("threatfox fields");
    };
    assert!(listed);
    assert_eq!(ioc_types, &vec!["ip:port".to_owned(), "url".to_owned()]);
    let ids: Vec<_> = report
        .raw
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("1290001"), json!("1290002")]);
}

#[tokio::test]
async fn threatfox_no_result_is_not_listed() {
    let (_server, result) =
        lookup_with(Response::json(200, fixture("threatfox", "no_result.json"))).await;
    let report = result.unwrap();
    assert_eq!(report.outcome, ProviderOutcome::NotFound);
    assert_eq!(report.verdict, None);
    assert!(matches!(
        report.fields,
        Some(ProviderFields::Threatfox { listed: false, .. })
    ));
}

#[tokio::test]
async fn threatfox_rate_limits_in_the_body_and_in_the_status() {
    for response in [
        Response::json(200, fixture("threatfox", "ratelimited_402.json")),
        Response::json(402, fixture("threatfox", "ratelimited_402.json")),
        Response::json(429, "{}").header("retry-after", "120"),
    ] {
        let before = Utc::now();
        let (_server, result) = lookup_with(response.clone()).await;
        let Err(ProviderError::RateLimited { resume_at }) = result else {
            panic!("expected a rate limit: {result:?}");
        };
        assert!(resume_at > before, "{}", response.status);
        assert!(resume_at <= Utc::now() + TimeDelta::hours(1));
    }
}

#[tokio::test]
async fn threatfox_rejected_key_and_unknown_status() {
    for response in [
        Response::json(200, fixture("threatfox", "unknown_auth_key.json")),
        Response::json(401, "{}"),
    ] {
        assert_eq!(
            lookup_with(response).await.1,
            Err(ProviderError::KeyRejected)
        );
    }
    let (_server, result) = lookup_with(Response::json(
        200,
        fixture("threatfox", "illegal_search.json"),
    ))
    .await;
    let err = result.unwrap_err();
    assert_eq!(
        err,
        ProviderError::Unexpected("query_status illegal_search".into())
    );
    assert!(
        err.to_string().contains("illegal_search"),
        "the error carries the value"
    );
}

#[test]
fn threatfox_without_a_key_is_disabled() {
    let config = config(ProviderId::Threatfox, "http://127.0.0.1:1").with_api_key(None);
    assert!(ThreatFox::new(&config).unwrap_err().is_disabled());
    let bad = config
        .with_base_url("not a url")
        .with_api_key(Some(enrichd_core::Secret::new("k")));
    assert!(matches!(
        ThreatFox::new(&bad),
        Err(BuildError::BaseUrl { .. })
    ));
}
