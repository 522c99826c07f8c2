//! Two "processes" (two provider actors, each with its own `Store` and lease owner) sharing one
//! PostgreSQL database: together they stay within the provider's rate limit, and a 429 seen by
//! one parks the provider for both, with no request meanwhile.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure is a test failure"
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Addr, Supervisor};
use enrichd_core::job::{JobId, ProviderAnswer, ProviderUnavailable};
use enrichd_core::ports::ProviderLimits;
use enrichd_core::{CanonicalIp, ProviderId, ProviderOutcome};
use enrichd_intel::{GreyNoise, ProviderConfig};
use enrichd_runtime::messages::QueryProvider;
use enrichd_runtime::provider_actor::{ProviderActor, ProviderActorConfig};
use enrichd_store::Store;
use enrichd_testkit::db::TestDb;
use enrichd_testkit::http::{HttpServer, Request, Response};
use enrichd_testkit::services::require_postgres;
use tokio::time::Instant;

type Actor = ProviderActor<GreyNoise, Store>;

async fn replica(db: &TestDb, base_url: &str, rate_per_sec: f64) -> Addr<Actor> {
    let store = Store::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let config = ProviderConfig::defaults(ProviderId::Greynoise).with_base_url(base_url);
    let provider = Arc::new(GreyNoise::new(&config).unwrap());
    let limits = ProviderLimits {
        rate_per_sec,
        daily_quota: 0,
        key_fingerprint: None,
    };
    Supervisor::start(move |_| {
        ProviderActor::new(
            provider,
            Arc::new(store),
            limits,
            ProviderActorConfig {
                concurrency: 8,
                ..Default::default()
            },
        )
    })
}

async fn ask(addr: &Addr<Actor>, ip: &str) -> Result<ProviderAnswer, ProviderUnavailable> {
    let ip = CanonicalIp::parse(ip).unwrap();
    addr.send(QueryProvider {
        job_id: JobId::new(),
        provider: ProviderId::Greynoise,
        ip,
    })
    .await
    .unwrap()
}

/// Asks until the provider answers, as the backfill would (a `Parked`/busy answer means "later").
async fn ask_until_answered(addr: Addr<Actor>, ip: String) {
    loop {
        match ask(&addr, &ip).await {
            Ok(_) => return,
            Err(ProviderUnavailable::Parked(until) | ProviderUnavailable::NoSlotUntil(until)) => {
                let wait = (until - chrono::Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(wait.max(Duration::from_millis(20))).await;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
}

fn answer(request: &Request) -> Response {
    let ip = request.path.trim_start_matches("/v3/community/");
    Response::json(
        200,
        format!(r#"{{"ip":"{ip}","classification":"benign","name":"Scanner"}}"#),
    )
}

#[actix::test]
async fn two_replicas_together_stay_within_the_rate_limit() {
    if !require_postgres() {
        return;
    }
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = Arc::clone(&arrivals);
    let server = HttpServer::start(move |request| {
        seen.lock().unwrap().push(Instant::now());
        answer(request)
    })
    .await;
    let db = TestDb::postgres().await;
    let rate = 10.0;
    let a = replica(&db, &server.base_url(), rate).await;
    let b = replica(&db, &server.base_url(), rate).await;

    let mut tasks = Vec::new();
    for i in 0..20 {
        tasks.push(tokio::spawn(ask_until_answered(
            a.clone(),
            format!("8.8.1.{i}"),
        )));
        tasks.push(tokio::spawn(ask_until_answered(
            b.clone(),
            format!("8.8.2.{i}"),
        )));
    }
    for task in tasks {
        task.await.unwrap();
    }

    let mut times = arrivals.lock().unwrap().clone();
    times.sort();
    assert_eq!(times.len(), 40);
    // Slots are 1/rate apart on the database clock, so any one-second window holds at most
    // rate + 1 requests (both ends of the window), plus one for network jitter on arrival.
    let allowed = 12;
    let worst = times
        .iter()
        .map(|start| {
            times
                .iter()
                .filter(|t| **t >= *start && **t < *start + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(
        worst <= allowed,
        "{worst} requests in one second with a cluster limit of {rate}/s"
    );
    let span = *times.last().unwrap() - times[0];
    assert!(
        span >= Duration::from_millis(3500),
        "40 calls at 10/s cannot take {span:?}"
    );
}

#[actix::test]
async fn a_429_parks_the_provider_for_every_replica_until_retry_after() {
    if !require_postgres() {
        return;
    }
    let first = Arc::new(Mutex::new(true));
    let server = HttpServer::start(move |request| {
        let mut first = first.lock().unwrap();
        if std::mem::replace(&mut *first, false) {
            Response::json(429, r#"{"message":"rate limited"}"#).header("Retry-After", "3")
        } else {
            answer(request)
        }
    })
    .await;
    let db = TestDb::postgres().await;
    let a = replica(&db, &server.base_url(), 0.0).await;
    let b = replica(&db, &server.base_url(), 0.0).await;

    let report = ask(&a, "8.8.3.1").await.unwrap();
    assert_eq!(report.outcome, ProviderOutcome::RateLimited);
    let resume = report.resume_at.expect("park end");
    assert_eq!(server.request_count(), 1);

    // The other replica honours the shared park and sends nothing.
    for i in 0..5 {
        match ask(&b, &format!("8.8.3.{}", i + 2)).await {
            Err(ProviderUnavailable::Parked(until)) => {
                assert!(until >= resume - chrono::Duration::seconds(1));
            }
            other => panic!("expected a park, got {other:?}"),
        }
    }
    assert!(matches!(
        ask(&a, "8.8.3.9").await,
        Err(ProviderUnavailable::Parked(_))
    ));
    assert_eq!(server.request_count(), 1, "no request while parked");

    // After the park, the other replica answers again; asking while parked sent nothing.
    let answered = enrichd_testkit::eventually(Duration::from_secs(10), || {
        let b = b.clone();
        async move { ask(&b, "8.8.3.20").await.is_ok() }
    })
    .await;
    assert!(answered);
    assert!(
        chrono::Utc::now() >= resume - chrono::Duration::milliseconds(50),
        "not before the park ends"
    );
    assert_eq!(server.request_count(), 2);
}
