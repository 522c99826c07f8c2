//! Supervision across actors: a faulting provider is restarted behind the same address while
//! another keeps answering, a repository writer whose pools broke is restarted with new ones,
//! and a spent restart budget makes the Coordinator exit 1.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure is a test failure"
)]

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Supervisor};
use enrichd_core::job::JobId;
use enrichd_core::ports::{GateEvent, IntelProvider, ProviderGate, ProviderLimits, Reservation};
use enrichd_core::{
    AddressPolicy, CanonicalIp, ProviderError, ProviderFields, ProviderId, ProviderOutcome,
    ProviderReport, Verdict,
};
use enrichd_intel::ProviderHooks;
use enrichd_runtime::aggregator::{Aggregator, AggregatorStats};
use enrichd_runtime::coordinator::Coordinator;
use enrichd_runtime::job::JobDeps;
use enrichd_runtime::messages::{GetProviderStatus, InjectFault, QueryProvider};
use enrichd_runtime::provider_actor::{ProviderActor, ProviderActorConfig};
use enrichd_runtime::supervision::{RestartBudget, RestartPolicy};
use enrichd_store::{ApplyContext, Store};
use enrichd_testkit::db::TestDb;
use enrichd_testkit::eventually;
use tokio::sync::{oneshot, watch};

struct Answers(ProviderId);

impl IntelProvider for Answers {
    fn id(&self) -> ProviderId {
        self.0
    }

    async fn lookup(&self, _ip: CanonicalIp) -> Result<ProviderReport, ProviderError> {
        Ok(ProviderReport::answer(
            ProviderOutcome::Ok,
            Some(Verdict::Benign),
            ProviderFields::Feodo {
                listed: false,
                malware_family: None,
            },
            serde_json::json!({}),
        ))
    }
}

impl ProviderHooks for Answers {
    fn metered(&self) -> bool {
        false
    }
}

struct OpenGate;

impl ProviderGate for OpenGate {
    type Error = std::io::Error;

    async fn reserve(
        &self,
        _provider: ProviderId,
        _limits: &ProviderLimits,
    ) -> Result<Reservation, Self::Error> {
        Ok(Reservation::Granted {
            wait: Duration::ZERO,
            quota_remaining: None,
        })
    }

    async fn record(&self, _provider: ProviderId, _event: GateEvent) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn parked_until(
        &self,
        _provider: ProviderId,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, Self::Error> {
        Ok(None)
    }
}

fn limits() -> ProviderLimits {
    ProviderLimits {
        rate_per_sec: 0.0,
        daily_quota: 0,
        key_fingerprint: None,
    }
}

fn start_provider(
    id: ProviderId,
    policy: Option<RestartPolicy>,
) -> Addr<ProviderActor<Answers, OpenGate>> {
    Supervisor::start(move |_| {
        let actor = ProviderActor::new(
            Arc::new(Answers(id)),
            Arc::new(OpenGate),
            limits(),
            ProviderActorConfig::default(),
        );
        match policy {
            Some(p) => actor.with_restart_policy(p),
            None => actor,
        }
    })
}

async fn ask<A>(addr: &Addr<A>, provider: ProviderId) -> Result<ProviderReport, String>
where
    A: actix::Handler<QueryProvider>,
    A::Context: actix::dev::ToEnvelope<A, QueryProvider>,
{
    let ip = CanonicalIp::parse("8.8.8.8").unwrap();
    addr.send(QueryProvider {
        job_id: JobId::new(),
        provider,
        ip,
    })
    .await
    .map_err(|e| e.to_string())?
    .map(|answer| answer.report)
    .map_err(|e| e.to_string())
}

async fn sqlite_store(db: &TestDb) -> Store {
    let store = Store::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    store
}

#[actix::test]
async fn a_faulting_provider_restarts_behind_the_same_address_and_the_others_keep_working() {
    let (gave_up_tx, _gave_up_rx) = oneshot::channel::<u8>();
    let db = TestDb::sqlite();
    let store = sqlite_store(&db).await;
    let coordinator = coordinator(&store, gave_up_tx);
    let faulty = start_provider(
        ProviderId::Greynoise,
        Some(RestartPolicy::new(
            "ProviderActor",
            RestartBudget::new(5, Duration::from_secs(60)),
            coordinator.recipient(),
        )),
    );
    let healthy = start_provider(ProviderId::Feodo, None);

    for round in 1..=3u32 {
        faulty.send(InjectFault).await.unwrap();
        let restarted = eventually(Duration::from_secs(10), || {
            let faulty = faulty.clone();
            async move { faulty.send(GetProviderStatus).await.unwrap().restarts == round }
        })
        .await;
        assert!(restarted, "restart {round}");
        assert!(
            ask(&healthy, ProviderId::Feodo).await.is_ok(),
            "the other provider answers"
        );
    }
    // Same address, still answering after three restarts.
    let report = ask(&faulty, ProviderId::Greynoise).await.unwrap();
    assert_eq!(report.outcome, ProviderOutcome::Ok);
    assert_eq!(faulty.send(GetProviderStatus).await.unwrap().restarts, 3);
}

#[actix::test]
async fn a_spent_restart_budget_makes_the_coordinator_exit_1() {
    let (exit_tx, exit_rx) = oneshot::channel::<u8>();
    let db = TestDb::sqlite();
    let store = sqlite_store(&db).await;
    let coordinator = coordinator(&store, exit_tx);
    let faulty = start_provider(
        ProviderId::Greynoise,
        Some(RestartPolicy::new(
            "ProviderActor",
            RestartBudget::new(2, Duration::from_secs(60)),
            coordinator.recipient(),
        )),
    );
    for _ in 0..3 {
        // Each fault stops the actor; the third restart exceeds a budget of two.
        let _ = faulty.send(InjectFault).await;
    }
    let code = tokio::time::timeout(Duration::from_secs(20), exit_rx)
        .await
        .expect("exit in time");
    assert_eq!(code.unwrap(), 1);
}

fn coordinator(store: &Store, exit: oneshot::Sender<u8>) -> Addr<Coordinator> {
    let deps = JobDeps {
        store: store.clone(),
        policy: AddressPolicy::default(),
        ctx: ApplyContext::default(),
        providers: Vec::new(),
        ptr: None,
        provider_lease: Duration::from_secs(30),
        ptr_lease: Duration::from_secs(22),
        outbox: None,
        backfill_wake: None,
        ack_deadline: Duration::from_secs(30),
        patience: None,
    };
    let writer = deps.repository_writer().start();
    let aggregator = Aggregator::new(deps, writer, Arc::new(AggregatorStats::default())).start();
    let (backfill_stop, _) = watch::channel(false);
    Coordinator::new(
        None,
        aggregator,
        backfill_stop,
        store.clone(),
        Duration::from_secs(5),
        exit,
    )
    .start()
}

#[actix::test]
async fn a_repeated_event_for_an_address_just_finished_is_answered_from_memory() {
    use enrichd_core::job::{DeliveryTag, Origin};
    use enrichd_runtime::messages::EnrichIp;
    let db = TestDb::sqlite();
    let store = sqlite_store(&db).await;
    let deps = JobDeps {
        store: store.clone(),
        policy: AddressPolicy::default(),
        ctx: ApplyContext {
            providers: Vec::new(),
            ptr_enabled: false,
            ..ApplyContext::default()
        },
        providers: Vec::new(),
        ptr: None,
        provider_lease: Duration::from_secs(30),
        ptr_lease: Duration::from_secs(22),
        outbox: None,
        backfill_wake: None,
        ack_deadline: Duration::from_secs(30),
        patience: None,
    };
    let stats = Arc::new(AggregatorStats::default());
    let writer = deps.repository_writer().start();
    let aggregator = Aggregator::new(deps, writer, Arc::clone(&stats)).start();
    let event = || EnrichIp {
        job_id: JobId::new(),
        ip: CanonicalIp::parse("8.8.8.8").unwrap(),
        attacker_uuid: None,
        first_seen: None,
        origin: Origin::Bus(DeliveryTag(1)),
    };
    let hits = || {
        enrichd_metrics::global()
            .cache_hits
            .get_or_create(&enrichd_metrics::ProviderLabel { provider: "event" })
            .get()
    };
    aggregator.send(event()).await.unwrap().unwrap();
    let finished = eventually(Duration::from_secs(10), || {
        let stats = Arc::clone(&stats);
        async move {
            stats
                .processed_total
                .load(std::sync::atomic::Ordering::Relaxed)
                == 1
                && stats.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0
        }
    })
    .await;
    assert!(finished);
    let before = hits();
    aggregator.send(event()).await.unwrap().unwrap();
    assert_eq!(hits(), before + 1, "answered from memory");
    assert_eq!(
        stats
            .processed_total
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "no second job"
    );
    // An event naming an attacker row not mapped to the address goes to the database.
    let mut named = event();
    named.attacker_uuid = Some("0b7c4a36-6f53-4c44-a9f1-2a3b5e1f0c11".into());
    aggregator.send(named).await.unwrap().unwrap();
    assert_eq!(hits(), before + 1);
}

#[actix::test]
async fn a_broken_writer_pool_restarts_the_writer_and_its_budget_counts() {
    use enrichd_runtime::messages::BreakPools;
    use enrichd_store::ClaimMode;
    let db = TestDb::postgres().await;
    let store = Store::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let (exit_tx, exit_rx) = oneshot::channel::<u8>();
    let sqlite = TestDb::sqlite();
    let coordinator = coordinator(&sqlite_store(&sqlite).await, exit_tx);
    let deps = JobDeps {
        store: store.clone(),
        policy: AddressPolicy::default(),
        ctx: ApplyContext::default(),
        providers: Vec::new(),
        ptr: None,
        provider_lease: Duration::from_secs(30),
        ptr_lease: Duration::from_secs(22),
        outbox: None,
        backfill_wake: None,
        ack_deadline: Duration::from_secs(30),
        patience: None,
    };
    let writer = deps
        .repository_writer()
        .with_restart_policy(RestartPolicy::new(
            "RepositoryWriter",
            RestartBudget::new(2, Duration::from_secs(60)),
            coordinator.recipient(),
        ))
        .start();
    let ip = |n: u8| CanonicalIp::parse(&format!("8.8.{n}.8")).unwrap();
    assert!(writer.claim(ip(0), ClaimMode::Due).await.is_ok());

    for round in 1..=2u32 {
        writer.addr().send(BreakPools).await.unwrap();
        // The next batch meets the closed pools: nothing is written, and the writer restarts.
        let refused = writer.claim(ip(1), ClaimMode::Due).await.unwrap_err();
        assert!(refused.is_unavailable(), "{refused}");
        assert!(
            eventually(Duration::from_secs(10), || async {
                writer.restarts() == round
            })
            .await,
            "restart {round}"
        );
        // Behind the same address, with new pools.
        assert!(
            eventually(Duration::from_secs(10), || async {
                writer.claim(ip(2), ClaimMode::Due).await.is_ok()
            })
            .await,
            "claims again after restart {round}"
        );
    }
    // A third within the minute spends the budget of two: the Coordinator exits 1.
    writer.addr().send(BreakPools).await.unwrap();
    let _ = writer.claim(ip(3), ClaimMode::Due).await;
    let code = tokio::time::timeout(Duration::from_secs(20), exit_rx)
        .await
        .expect("exit in time");
    assert_eq!(code.unwrap(), 1);
}
