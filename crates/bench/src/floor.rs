//! The latency floor: the least work per new address that any enricher keeping SPEC's
//! guarantees does, run in the bench process on the same broker and database as enrichd, at
//! the same rate. It answers what the latency target asks of this machine, apart from enrichd.
//!
//! Per delivery it does what cannot be left out:
//! - decode the event (enrichd's own decoder);
//! - commit a claim before the lookups: one provider call per address cluster-wide needs the
//!   claim durable before the call (SPEC §5), and the commit is also the durable point of the
//!   delivery;
//! - wait the provider latency (a timer: no HTTP client, no fake server, so the floor is a
//!   lower bound);
//! - commit the result, then publish `attacker.intel.enriched` with a confirm (results land in
//!   the database before they go out);
//! - ack the delivery.
//!
//! Both commits are group commits: whatever has queued while a slot was busy goes in one
//! single-statement transaction (at most [`MAX_BATCH`] rows, [`SLOTS`] transactions at once),
//! as enrichd's batcher gathers its requests. Nothing else is stored and nothing is read
//! back: no provider state, no attacker rows, no outbox.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use enrichd_bus::Topology;
use enrichd_bus::publish::{Outgoing, Publisher};
use enrichd_core::payload::TOPIC_INTEL_ENRICHED;
use futures::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, Statement, Value};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use enrichd_harness::bus::TestBus;

use crate::db::Target;

/// Rows per group commit, as enrichd's batcher.
const MAX_BATCH: usize = 64;
/// Transactions of each kind at once, as enrichd's batcher on PostgreSQL.
const SLOTS: usize = 3;

/// A running floor relay; [`Relay::stop`] ends it.
pub(crate) struct Relay {
    consumer: JoinHandle<anyhow::Result<()>>,
    bus: TestBus,
    db: DatabaseConnection,
    counts: Arc<Counts>,
}

/// What the relay did.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// Deliveries published on and acked.
    pub relayed: AtomicU64,
    /// Group commits of both kinds.
    pub commits: AtomicU64,
}

impl Relay {
    /// Creates its two tables in `target` (PostgreSQL) and starts consuming `topology`'s work
    /// queue with `prefetch`, holding each address `provider_latency` between its commits.
    pub(crate) async fn start(
        amqp_url: &str,
        target: &Target,
        topology: &Topology,
        prefetch: u16,
        provider_latency: Duration,
    ) -> anyhow::Result<Self> {
        let db = target
            .connect(u32::try_from(2 * SLOTS).unwrap_or(6))
            .await?;
        db.execute_unprepared(
            "CREATE TABLE floor_claims (ip VARCHAR(64) NOT NULL PRIMARY KEY, \
             leased_until TIMESTAMP NOT NULL); \
             CREATE TABLE floor_results (ip VARCHAR(64) NOT NULL PRIMARY KEY, \
             payload TEXT NOT NULL, written_at TIMESTAMP NOT NULL)",
        )
        .await
        .context("create the floor's tables")?;
        let counts = Arc::new(Counts::default());
        let claims = Committer::start(
            db.clone(),
            Arc::clone(&counts),
            "INSERT INTO floor_claims (ip, leased_until) VALUES {rows} ON CONFLICT (ip) DO \
             UPDATE SET leased_until = excluded.leased_until",
            "(now() AT TIME ZONE 'UTC') + interval '30 seconds'",
        );
        let results = Committer::start(
            db.clone(),
            Arc::clone(&counts),
            "INSERT INTO floor_results (ip, payload, written_at) VALUES {rows} ON CONFLICT (ip) \
             DO UPDATE SET payload = excluded.payload, written_at = excluded.written_at",
            "now() AT TIME ZONE 'UTC'",
        );
        // A connection of its own, as enrichd's consumer is apart from the bench's publisher.
        let bus = TestBus::declare(amqp_url, "enrichd-bench floor relay", topology.clone()).await?;
        let channel = bus.connection().create_channel().await?;
        let publisher = bus.publisher().clone();
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut deliveries = channel
            .basic_consume(
                topology.queue.as_str().into(),
                "enrichd-bench-floor".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("consume the floor's work queue")?;
        let exchange: Arc<str> = Arc::from(topology.exchange.as_str());
        let relay_counts = Arc::clone(&counts);
        let consumer = tokio::spawn(async move {
            // The channel lives as long as this task.
            let _channel = channel;
            while let Some(delivery) = deliveries.next().await {
                let delivery = delivery.context("floor consumer")?;
                let pass = Pass {
                    claims: claims.clone(),
                    results: results.clone(),
                    publisher: publisher.clone(),
                    exchange: Arc::clone(&exchange),
                    provider_latency,
                    counts: Arc::clone(&relay_counts),
                };
                tokio::spawn(async move {
                    if let Err(e) = pass.run(delivery).await {
                        eprintln!("enrichd-bench: floor relay: {e:#}");
                    }
                });
            }
            Ok(())
        });
        Ok(Self {
            consumer,
            bus,
            db,
            counts,
        })
    }

    /// Fails when the consumer has stopped before [`Relay::stop`].
    pub(crate) fn alive(&self) -> anyhow::Result<()> {
        if self.consumer.is_finished() {
            bail!("the floor relay's consumer stopped");
        }
        Ok(())
    }

    /// Stops consuming, closes the connections and returns what was done.
    pub(crate) async fn stop(self) -> Arc<Counts> {
        self.consumer.abort();
        self.bus.close().await;
        let _ = self.db.close().await;
        self.counts
    }
}

/// One delivery's way through the floor.
struct Pass {
    claims: Committer,
    results: Committer,
    publisher: Publisher,
    exchange: Arc<str>,
    provider_latency: Duration,
    counts: Arc<Counts>,
}

impl Pass {
    async fn run(self, delivery: lapin::message::Delivery) -> anyhow::Result<()> {
        let event = enrichd_bus::decode(&delivery.data, delivery.routing_key.as_str())
            .map_err(|poison| anyhow::anyhow!("a bench event did not decode: {poison}"))?;
        let ip = event.ip.to_string();
        self.claims.commit(ip.clone(), None).await?;
        tokio::time::sleep(self.provider_latency).await;
        let body = enriched_body(&ip);
        self.results
            .commit(ip, Some(String::from_utf8_lossy(&body).into_owned()))
            .await?;
        self.publisher
            .publish(Outgoing::persistent(
                &self.exchange,
                TOPIC_INTEL_ENRICHED,
                &body,
            ))
            .await
            .map_err(|e| anyhow::anyhow!(enrichd_core::error::chain(&e)))?;
        delivery.ack(BasicAckOptions::default()).await?;
        self.counts.relayed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// An `attacker.intel.enriched` envelope of about the size enrichd publishes for a new
/// address with every provider answering.
fn enriched_body(ip: &str) -> Vec<u8> {
    let body = json!({
        "v": 1,
        "id": uuid::Uuid::new_v4().simple().to_string(),
        "topic": TOPIC_INTEL_ENRICHED,
        "ts": chrono::Utc::now().timestamp_millis() as f64 / 1000.0,
        "payload": {
            "attacker_ip": ip,
            "attacker_uuid": uuid::Uuid::new_v4().hyphenated().to_string(),
            "ptr_record": format!("host-{}.example.net", ip.replace('.', "-")),
            "aggregate_verdict": "malicious",
            "greynoise": {"classification": "malicious", "noise": true, "riot": false},
            "abuseipdb": {"abuse_confidence_score": 100, "total_reports": 42},
            "threatfox": {"listed": false, "malware": []},
            "feodo": {"listed": false},
            "raw": "x".repeat(1024),
        }
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// One row to commit and who waits for it.
struct Row {
    ip: String,
    payload: Option<String>,
    done: oneshot::Sender<anyhow::Result<()>>,
}

/// A group-commit queue: rows that queue while its slots are busy share one transaction.
#[derive(Clone)]
struct Committer {
    rows: mpsc::UnboundedSender<Row>,
}

impl Committer {
    /// `statement` has `{rows}` where the `VALUES` rows go; `stamp` is the SQL of the last
    /// column of each row.
    fn start(
        db: DatabaseConnection,
        counts: Arc<Counts>,
        statement: &'static str,
        stamp: &'static str,
    ) -> Self {
        let (rows, mut queue) = mpsc::unbounded_channel::<Row>();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(SLOTS));
            while let Some(first) = queue.recv().await {
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    break;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH
                    && let Ok(next) = queue.try_recv()
                {
                    batch.push(next);
                }
                let db = db.clone();
                let counts = Arc::clone(&counts);
                tokio::spawn(async move {
                    let result = write(&db, statement, stamp, &batch).await;
                    counts.commits.fetch_add(1, Ordering::Relaxed);
                    for row in batch {
                        let _ = row.done.send(
                            result
                                .as_ref()
                                .copied()
                                .map_err(|e| anyhow::anyhow!("{e:#}")),
                        );
                    }
                    drop(permit);
                });
            }
        });
        Self { rows }
    }

    /// Waits until `ip` (and `payload`, for a result) is committed.
    async fn commit(&self, ip: String, payload: Option<String>) -> anyhow::Result<()> {
        let (done, committed) = oneshot::channel();
        self.rows
            .send(Row { ip, payload, done })
            .map_err(|_| anyhow::anyhow!("the floor's committer stopped"))?;
        committed
            .await
            .map_err(|_| anyhow::anyhow!("the floor's committer dropped a row"))?
    }
}

/// One autocommit statement over `batch`, keys in order so concurrent batches never deadlock.
async fn write(
    db: &DatabaseConnection,
    statement: &str,
    stamp: &str,
    batch: &[Row],
) -> anyhow::Result<()> {
    let mut order: Vec<&Row> = batch.iter().collect();
    order.sort_by(|a, b| a.ip.cmp(&b.ip));
    order.dedup_by(|a, b| a.ip == b.ip);
    let mut values: Vec<Value> = Vec::with_capacity(order.len() * 2);
    let mut rows = Vec::with_capacity(order.len());
    for row in order {
        values.push(row.ip.clone().into());
        let ip = values.len();
        match &row.payload {
            Some(payload) => {
                values.push(payload.clone().into());
                rows.push(format!("(${ip}, ${}, {stamp})", values.len()));
            }
            None => rows.push(format!("(${ip}, {stamp})")),
        }
    }
    let sql = statement.replace("{rows}", &rows.join(", "));
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        values,
    ))
    .await
    .context("a floor group commit")?;
    Ok(())
}
