use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use enrichd_core::ports::IntelProvider;
use enrichd_core::{ProviderError, ProviderFields, ProviderId, ProviderOutcome, Verdict};
use enrichd_intel::{Availability, FeedError, Feodo, FeodoConfig, RefreshOutcome};
use enrichd_testkit::eventually;
use enrichd_testkit::http::{HttpServer, Response};
use serde_json::json;

use crate::{KEY, config, fixture, ip};

const ETAG: &str = "\"feed-v1\"";
const MODIFIED: &str = "Mon, 23 Nov 2026 10:00:00 GMT";

/// What the fake feed serves next (switchable while the test runs).
const FEED: u8 = 0;
const NOT_A_LIST: u8 = 1;
const EMPTY: u8 = 2;
const BROKEN: u8 = 3;

/// A feed server honouring conditional requests; `mode` picks the body.
async fn feed_server(mode: Arc<AtomicU8>) -> HttpServer {
    HttpServer::start(move |req| {
        if req.header("if-none-match") == Some(ETAG) {
            return Response::status(304);
        }
        match mode.load(Ordering::SeqCst) {
            FEED => Response::json(200, fixture("feodo", "ipblocklist.json"))
                .header("etag", ETAG)
                .header("last-modified", MODIFIED),
            NOT_A_LIST => Response::json(200, fixture("feodo", "not_a_list.json")),
            EMPTY => Response::json(200, fixture("feodo", "empty.json")),
            _ => Response::json(503, "{}"),
        }
    })
    .await
}

fn feodo(server: &HttpServer, max_age: Duration) -> Feodo {
    Feodo::new(&FeodoConfig {
        http: config(ProviderId::Feodo, &server.base_url()),
        refresh: Duration::from_secs(3600),
        max_age,
    })
    .unwrap()
}

const DAY: Duration = Duration::from_secs(86_400);

#[tokio::test]
async fn feodo_one_download_serves_a_thousand_lookups() {
    let server = feed_server(Arc::new(AtomicU8::new(FEED))).await;
    let provider = feodo(&server, DAY);
    for i in 0..1000u32 {
        let report = provider
            .lookup(ip(&format!("10.{}.{}.1", i / 250, i % 250)))
            .await;
        assert_eq!(report.unwrap().outcome, ProviderOutcome::NotFound);
    }
    let listed = provider.lookup(ip("45.155.205.233")).await.unwrap();
    assert_eq!(listed.outcome, ProviderOutcome::Ok);
    assert_eq!(listed.verdict, Some(Verdict::Malicious));
    assert_eq!(
        listed.fields,
        Some(ProviderFields::Feodo {
            listed: true,
            malware_family: Some("QakBot".into())
        })
    );
    assert_eq!(listed.raw["ports"], json!([443, 2222]));
    let unlisted = provider.lookup(ip("8.8.8.8")).await.unwrap();
    assert_eq!(unlisted.verdict, None);
    assert_eq!(
        unlisted.fields,
        Some(ProviderFields::Feodo {
            listed: false,
            malware_family: None
        })
    );
    assert_eq!(server.request_count(), 1);
    let req = server.last_request();
    assert_eq!(req.target, "/downloads/ipblocklist.json");
    assert_eq!(req.header("auth-key"), Some(KEY));
}

#[tokio::test]
async fn feodo_304_keeps_the_index_and_sends_validators() {
    let server = feed_server(Arc::new(AtomicU8::new(FEED))).await;
    let provider = feodo(&server, DAY);
    assert_eq!(
        provider.refresh().await,
        Ok(RefreshOutcome::Updated { addresses: 2 })
    );
    let first = server.last_request();
    assert!(
        !first.has_header("if-none-match"),
        "nothing to validate yet"
    );
    assert_eq!(provider.refresh().await, Ok(RefreshOutcome::NotModified));
    let second = server.last_request();
    assert_eq!(second.header("if-none-match"), Some(ETAG));
    assert_eq!(second.header("if-modified-since"), Some(MODIFIED));
    assert_eq!(provider.index().len(), 2);
    assert_eq!(provider.availability(), Availability::Ready);
    let listed = provider.lookup(ip("194.26.29.10")).await.unwrap();
    assert_eq!(listed.outcome, ProviderOutcome::Ok);
}

#[tokio::test]
async fn feodo_empty_feed_is_valid_data() {
    let server = feed_server(Arc::new(AtomicU8::new(EMPTY))).await;
    let provider = feodo(&server, DAY);
    assert_eq!(provider.ensure_fresh().await, Availability::Ready);
    let report = provider.lookup(ip("45.155.205.233")).await.unwrap();
    assert_eq!(report.outcome, ProviderOutcome::NotFound);
}

/// A feed server without validators: every refresh downloads what `mode` selects.
async fn plain_server(mode: Arc<AtomicU8>) -> HttpServer {
    HttpServer::start(move |_| match mode.load(Ordering::SeqCst) {
        FEED => Response::json(200, fixture("feodo", "ipblocklist.json")),
        NOT_A_LIST => Response::json(200, fixture("feodo", "not_a_list.json")),
        EMPTY => Response::json(200, fixture("feodo", "empty.json")),
        _ => Response::text(200, "text/html", "<html>down for maintenance</html>"),
    })
    .await
}

#[tokio::test]
async fn feodo_not_a_list_keeps_the_old_index_and_is_not_retried_per_lookup() {
    let mode = Arc::new(AtomicU8::new(FEED));
    let server = plain_server(Arc::clone(&mode)).await;
    let provider = feodo(&server, DAY);
    assert_eq!(provider.ensure_fresh().await, Availability::Ready);

    mode.store(NOT_A_LIST, Ordering::SeqCst);
    assert_eq!(
        provider.refresh().await,
        Err(FeedError::NotAList("an object"))
    );
    mode.store(BROKEN, Ordering::SeqCst);
    assert!(matches!(
        provider.refresh().await,
        Err(FeedError::Decode(_))
    ));
    assert_eq!(provider.index().len(), 2, "old index kept");
    assert_eq!(provider.availability(), Availability::Ready);

    let requests = server.request_count();
    for _ in 0..100 {
        let report = provider.lookup(ip("45.155.205.233")).await.unwrap();
        assert_eq!(report.outcome, ProviderOutcome::Ok);
    }
    assert_eq!(server.request_count(), requests, "no retry per lookup");
}

#[tokio::test]
async fn feodo_first_load_failing_is_stale_and_backs_off() {
    let mode = Arc::new(AtomicU8::new(NOT_A_LIST));
    let server = plain_server(Arc::clone(&mode)).await;
    let provider = feodo(&server, DAY);
    for _ in 0..100 {
        assert_eq!(provider.ensure_fresh().await, Availability::Stale);
    }
    assert_eq!(
        server.request_count(),
        1,
        "a failed refresh backs off, never per lookup"
    );
    let err = provider.lookup(ip("45.155.205.233")).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unexpected(_)));

    let broken = feed_server(Arc::new(AtomicU8::new(BROKEN))).await;
    let provider = feodo(&broken, DAY);
    assert_eq!(provider.refresh().await, Err(FeedError::Status(503)));
}

#[tokio::test]
async fn feodo_stale_data_makes_the_provider_unavailable() {
    let mode = Arc::new(AtomicU8::new(FEED));
    let server = feed_server(Arc::clone(&mode)).await;
    let provider = feodo(&server, Duration::from_millis(300));
    assert_eq!(provider.ensure_fresh().await, Availability::Ready);
    mode.store(BROKEN, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(5), || async {
            provider.ensure_fresh().await == Availability::Stale
        })
        .await
    );
    let err = provider.lookup(ip("45.155.205.233")).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unexpected(_)));
    assert_eq!(
        server.request_count(),
        1,
        "staleness does not trigger downloads"
    );
}

#[tokio::test]
async fn feodo_hostile_feed_answers_keep_the_last_good_index() {
    let next = Arc::new(std::sync::Mutex::new(Response::json(
        200,
        fixture("feodo", "ipblocklist.json"),
    )));
    let serving = Arc::clone(&next);
    let server = HttpServer::start(move |_| serving.lock().unwrap().clone()).await;
    let provider = Feodo::new(&FeodoConfig {
        http: config(ProviderId::Feodo, &server.base_url())
            .with_timeout(Duration::from_millis(400))
            .with_body_limit(8 * 1024),
        refresh: Duration::from_secs(3600),
        max_age: DAY,
    })
    .unwrap();
    provider.refresh().await.unwrap();

    let hostile = [
        Response::huge(200, 64 * 1024),
        Response::huge_unannounced(200, 64 * 1024),
        Response::json(200, fixture("feodo", "ipblocklist.json"))
            .trickle(16, Duration::from_millis(50)),
        Response::close_without_response(),
        Response::json(200, "[{\"ip_address\": \"45.155"),
    ];
    for response in hostile {
        *next.lock().unwrap() = response;
        let err = provider.refresh().await.unwrap_err();
        assert!(
            matches!(err, FeedError::Http(_) | FeedError::Decode(_)),
            "{err:?}"
        );
        assert_eq!(
            provider.index().len(),
            2,
            "last good index kept after {err}"
        );
        assert_eq!(provider.availability(), Availability::Ready);
    }
}
