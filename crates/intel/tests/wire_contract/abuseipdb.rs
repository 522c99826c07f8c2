use chrono::{TimeDelta, Utc};
use enrichd_core::ports::IntelProvider;
use enrichd_core::{ProviderError, ProviderFields, ProviderId, ProviderOutcome, Verdict};
use enrichd_intel::abuseipdb::METERED_ERROR_BACKOFF;
use enrichd_intel::{AbuseIpdb, BuildError, Disabled, ProviderHooks};
use enrichd_testkit::http::{HttpServer, Response};

use crate::{KEY, config, fixture, ip};

/// Serves `response` for every request, with quota headers.
async fn serving(response: Response) -> (HttpServer, i64) {
    let reset = Utc::now().timestamp() + 3600;
    let server = HttpServer::start(move |_| {
        response
            .clone()
            .header("x-ratelimit-limit", "1000")
            .header("x-ratelimit-remaining", "998")
            .header("x-ratelimit-reset", &reset.to_string())
    })
    .await;
    (server, reset)
}

fn provider(server: &HttpServer) -> AbuseIpdb {
    AbuseIpdb::new(&config(ProviderId::Abuseipdb, &server.base_url())).unwrap()
}

#[tokio::test]
async fn abuseipdb_request_has_the_exact_shape() {
    let (server, _) = serving(Response::json(
        200,
        fixture("abuseipdb", "ok_suspicious.json"),
    ))
    .await;
    provider(&server)
        .lookup(ip("45.155.205.233"))
        .await
        .unwrap();
    let req = server.last_request();
    assert_eq!(req.method, "GET");
    assert_eq!(
        req.target,
        "/api/v2/check?ipAddress=45.155.205.233&maxAgeInDays=30&verbose"
    );
    assert_eq!(req.header("key"), Some(KEY));
    assert_eq!(req.header("accept"), Some("application/json"));
    assert_eq!(req.header("user-agent"), Some("curl/7.88.1"));
}

#[tokio::test]
async fn abuseipdb_verbose_answer_and_quota_headers() {
    let (server, reset) = serving(Response::json(
        200,
        fixture("abuseipdb", "ok_verbose_malicious.json"),
    ))
    .await;
    let observed = provider(&server)
        .lookup_observed(ip("45.155.205.233"))
        .await;
    let report = observed.result.unwrap();
    assert_eq!(report.verdict, Some(Verdict::Malicious));
    assert_eq!(
        report.fields,
        Some(ProviderFields::Abuseipdb {
            score: 100,
            categories: vec![14, 18, 22]
        })
    );
    let quota = observed.quota.unwrap();
    assert_eq!(quota.remaining, 998);
    assert_eq!(quota.reset_at.unwrap().timestamp(), reset);
}

#[tokio::test]
async fn abuseipdb_never_reported_address_has_no_verdict() {
    let (server, _) = serving(Response::json(
        200,
        fixture("abuseipdb", "ok_never_reported.json"),
    ))
    .await;
    let report = provider(&server).lookup(ip("8.8.4.4")).await.unwrap();
    assert_eq!(report.outcome, ProviderOutcome::Ok);
    assert_eq!(report.verdict, None);
}

#[tokio::test]
async fn abuseipdb_bad_score_type_is_an_error_that_backs_off_a_day() {
    let (server, _) = serving(Response::json(
        200,
        fixture("abuseipdb", "bad_score_type.json"),
    ))
    .await;
    let observed = provider(&server)
        .lookup_observed(ip("45.155.205.233"))
        .await;
    let report = observed.result.unwrap();
    assert_eq!(report.outcome, ProviderOutcome::Error);
    assert_eq!(report.fields, None, "never a score of 0");
    assert_eq!(report.min_backoff, Some(METERED_ERROR_BACKOFF));
    assert!(observed.quota.is_some(), "quota is read on every response");
}

#[tokio::test]
async fn abuseipdb_429_parks_until_the_reset_header() {
    let (server, reset) = serving(Response::json(
        429,
        fixture("abuseipdb", "daily_limit_429.json"),
    ))
    .await;
    let observed = provider(&server)
        .lookup_observed(ip("45.155.205.233"))
        .await;
    let Err(ProviderError::RateLimited { resume_at }) = observed.result else {
        panic!("expected a rate limit: {:?}", observed.result);
    };
    assert_eq!(resume_at.timestamp(), reset);
    assert_eq!(observed.quota.unwrap().remaining, 998);

    let (server, _) = serving(
        Response::json(429, fixture("abuseipdb", "daily_limit_429.json"))
            .header("retry-after", "60"),
    )
    .await;
    let before = Utc::now();
    let Err(ProviderError::RateLimited { resume_at }) =
        provider(&server).lookup(ip("45.155.205.233")).await
    else {
        panic!("expected a rate limit");
    };
    assert!(resume_at >= before + TimeDelta::seconds(60));
    assert!(
        resume_at < before + TimeDelta::seconds(120),
        "Retry-After wins"
    );
}

#[tokio::test]
async fn abuseipdb_401_rejects_the_key_and_422_is_an_error() {
    let (server, _) = serving(Response::json(
        401,
        fixture("abuseipdb", "unauthorized_401.json"),
    ))
    .await;
    assert_eq!(
        provider(&server).lookup(ip("45.155.205.233")).await,
        Err(ProviderError::KeyRejected)
    );
    let (server, _) = serving(Response::json(
        422,
        fixture("abuseipdb", "invalid_ip_422.json"),
    ))
    .await;
    let err = provider(&server)
        .lookup(ip("45.155.205.233"))
        .await
        .unwrap_err();
    assert_eq!(err, ProviderError::Unexpected("http status 422".into()));
    assert_eq!(
        err.fate(),
        enrichd_core::provider::ProviderFate::RecordError {
            trips_breaker: false
        }
    );
}

#[test]
fn abuseipdb_without_a_key_is_disabled() {
    let config = config(ProviderId::Abuseipdb, "http://127.0.0.1:1").with_api_key(None);
    let err = AbuseIpdb::new(&config).unwrap_err();
    assert!(matches!(
        err,
        BuildError::Disabled(Disabled::MissingKey(ProviderId::Abuseipdb))
    ));
}
