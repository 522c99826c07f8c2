//! RabbitMQ side of the benchmark: enrichd's own topology under unique names, confirmed
//! publishing of `attacker.scored` envelopes, the bare-consumer ceiling, queue depth, and a
//! subscriber timing `attacker.intel.enriched`.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use enrichd_bus::Topology;
use enrichd_bus::publish::{Outgoing, Publisher};
use enrichd_core::Secret;
use enrichd_core::payload::{TOPIC_INTEL_ENRICHED, TOPIC_SCORED};
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::time::Instant;

/// Unacknowledged publishes in flight while loading a queue.
const PUBLISH_WINDOW: usize = 1000;

/// A connection plus a confirm-mode publisher and a plain channel for declarations.
pub(crate) struct Bus {
    pub conn: Connection,
    pub publisher: Publisher,
    pub channel: Channel,
}

impl Bus {
    /// Connects (on enrichd-bus's dedicated runtime, as enrichd does).
    pub(crate) async fn connect(url: &str, name: &str) -> anyhow::Result<Self> {
        let conn = enrichd_bus::connect(&Secret::new(url.to_owned()), name)
            .await
            .map_err(|e| anyhow::anyhow!(enrichd_core::error::chain(&e)))?;
        let publisher = Publisher::open(&conn)
            .await
            .map_err(|e| anyhow::anyhow!(enrichd_core::error::chain(&e)))?;
        let channel = conn.create_channel().await?;
        Ok(Self {
            conn,
            publisher,
            channel,
        })
    }

    /// Declares enrichd's topology (quorum work queue, dead-letter queue) under `topology`'s
    /// names, with exactly enrichd's arguments so enrichd's own declaration matches.
    pub(crate) async fn declare(&self, topology: &Topology) -> anyhow::Result<()> {
        let mismatches = topology
            .declare(&self.conn)
            .await
            .map_err(|e| anyhow::anyhow!(enrichd_core::error::chain(&e)))?;
        anyhow::ensure!(
            mismatches.is_empty(),
            "queues with other arguments: {mismatches:?}"
        );
        Ok(())
    }

    /// Ready messages and consumers of `queue` (a passive declare, on a channel of its own:
    /// a failed passive declare closes its channel, and the others must survive it).
    pub(crate) async fn depth(&self, queue: &str) -> anyhow::Result<(u32, u32)> {
        let channel = self.conn.create_channel().await?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "depth read".into()).await;
        let q = q?;
        Ok((q.message_count(), q.consumer_count()))
    }

    /// Publishes `bodies` to `exchange` as persistent `attacker.scored` messages with
    /// confirms, `PUBLISH_WINDOW` in flight; returns the publish rate per second.
    pub(crate) async fn publish_all(
        &self,
        exchange: &str,
        bodies: impl Iterator<Item = Vec<u8>>,
    ) -> anyhow::Result<f64> {
        let started = Instant::now();
        let mut n = 0u64;
        let mut results = futures::stream::iter(bodies)
            .map(|body| {
                let publisher = self.publisher.clone();
                async move {
                    publisher
                        .publish(Outgoing::persistent(exchange, TOPIC_SCORED, &body))
                        .await
                }
            })
            .buffer_unordered(PUBLISH_WINDOW);
        while let Some(result) = results.next().await {
            result.map_err(|e| anyhow::anyhow!(enrichd_core::error::chain(&e)))?;
            n += 1;
        }
        Ok(n as f64 / started.elapsed().as_secs_f64())
    }

    /// Publishes one body without publisher confirms (the latency run paces itself).
    pub(crate) async fn publish_unconfirmed(
        &self,
        exchange: &str,
        body: &[u8],
    ) -> anyhow::Result<()> {
        // The declaration channel is not in confirm mode: nothing is tracked per message, and
        // the run measures delivery at the far end instead.
        let _confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                TOPIC_SCORED.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        Ok(())
    }

    /// Deletes the topology's queues and exchanges; returns what could not be deleted.
    pub(crate) async fn delete(&self, topology: &Topology) -> Vec<String> {
        topology.delete(&self.conn).await
    }

    /// Closes the connection.
    pub(crate) async fn close(self) {
        let _ = self.conn.close(200, "bench done".into()).await;
    }
}

/// An `attacker.scored` envelope for `ip`, as the reference's profiler sends it.
pub(crate) fn scored_envelope(ip: Ipv4Addr, tick: u64) -> Vec<u8> {
    let now = chrono::Utc::now();
    let ts = now.timestamp_millis() as f64 / 1000.0;
    let body = serde_json::json!({
        "v": 1,
        "id": uuid::Uuid::new_v4().simple().to_string(),
        "topic": TOPIC_SCORED,
        "type": "scored",
        "ts": ts,
        "payload": {
            "attacker_ip": ip.to_string(),
            "event_count": 10 + tick,
            "service_count": 2,
            "decky_count": 1,
            "bounty_count": 0,
            "credential_count": tick % 3,
            "is_traversal": false,
        }
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The bare consumer: prefetch `prefetch`, decode each body the way enrichd does, ack each
/// message on its own. Returns (messages, seconds from first delivery to last ack).
pub(crate) async fn bare_consume(
    bus: &Bus,
    queue: &str,
    prefetch: u16,
    expected: u64,
    deadline: Duration,
) -> anyhow::Result<(u64, f64)> {
    let channel = bus.conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "enrichd-bench-bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let give_up = Instant::now() + deadline;
    let mut first = None;
    let mut n = 0u64;
    let mut decode_failures = 0u64;
    while n < expected {
        let next = tokio::time::timeout_at(give_up, consumer.next()).await;
        let delivery = match next {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => bail!("bare consumer: {e}"),
            Ok(None) => bail!("bare consumer cancelled"),
            Err(_) => break,
        };
        first.get_or_insert_with(Instant::now);
        if enrichd_bus::decode(&delivery.data, delivery.routing_key.as_str()).is_err() {
            decode_failures += 1;
        }
        delivery.ack(BasicAckOptions::default()).await?;
        n += 1;
    }
    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    let _ = channel.close(200, "bare consumer done".into()).await;
    if decode_failures > 0 {
        bail!("{decode_failures} bench messages did not decode");
    }
    Ok((n, secs))
}

/// Arrival time of the first `attacker.intel.enriched` per address.
pub(crate) type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// Subscribes to `attacker.intel.enriched` on `exchange` with a server-named exclusive queue
/// (auto-ack) and records when each address's first event arrives.
pub(crate) async fn watch_enriched(bus: &Bus, exchange: &str) -> anyhow::Result<Arrivals> {
    let channel = bus.conn.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let name = queue.name().to_string();
    channel
        .queue_bind(
            name.as_str().into(),
            exchange.into(),
            TOPIC_INTEL_ENRICHED.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            name.as_str().into(),
            "enrichd-bench-enriched".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("consume attacker.intel.enriched")?;
    let arrivals: Arrivals = Arc::default();
    let sink = Arc::clone(&arrivals);
    tokio::spawn(async move {
        // The channel lives as long as this task.
        let _channel = channel;
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = Instant::now();
            let ip = serde_json::from_slice::<serde_json::Value>(&delivery.data)
                .ok()
                .and_then(|v| v["payload"]["attacker_ip"].as_str().map(str::to_owned));
            if let (Some(ip), Ok(mut map)) = (ip, sink.lock()) {
                map.entry(ip).or_insert(at);
            }
        }
    });
    Ok(arrivals)
}
