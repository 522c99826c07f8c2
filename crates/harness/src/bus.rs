//! A test's side of RabbitMQ: enrichd's topology declared exactly as enrichd declares it (so
//! events published before a replica consumes are routed), confirmed and unconfirmed
//! publishing, queue depths and consumer counts, and a consumer of
//! `attacker.intel.enriched`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::{Context as _, bail};
use enrichd_bus::Topology;
use enrichd_bus::publish::{Outgoing, Publisher};
use enrichd_core::Secret;
use enrichd_core::payload::{Envelope, TOPIC_INTEL_ENRICHED};
use futures::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

/// Ready messages and consumers of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready for delivery (not those delivered and unacknowledged).
    pub messages: u32,
    /// Consumers.
    pub consumers: u32,
}

/// A connection to the broker with enrichd's topology declared under one test's names.
#[derive(Debug)]
pub struct TestBus {
    /// The exchange and queues the test publishes into and enrichd consumes.
    pub topology: Topology,
    connection: Connection,
    publisher: Publisher,
    /// A plain channel (not in confirm mode), for publishes nobody waits for.
    channel: Channel,
}

impl TestBus {
    /// Connects to `amqp_url` as `name` (on enrichd-bus's own runtime, as enrichd does) and
    /// declares `topology`; a queue the broker holds with other arguments is an error.
    pub async fn declare(amqp_url: &str, name: &str, topology: Topology) -> anyhow::Result<Self> {
        let connection = enrichd_bus::connect(&Secret::new(amqp_url.to_owned()), name)
            .await
            .context("connect to the broker")?;
        let publisher = Publisher::open(&connection)
            .await
            .context("open a publisher")?;
        let mismatches = topology
            .declare(&connection)
            .await
            .context("declare the topology")?;
        if !mismatches.is_empty() {
            bail!("queues with other arguments: {mismatches:?}");
        }
        let channel = connection.create_channel().await?;
        Ok(Self {
            topology,
            connection,
            publisher,
            channel,
        })
    }

    /// The connection, for channels of the caller's own.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The confirm-mode publisher, for messages to other exchanges.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Publishes `body` to the topology's exchange under `routing_key`, persistent, and waits
    /// for the broker's confirm.
    pub async fn publish(&self, routing_key: &str, body: &[u8]) -> anyhow::Result<()> {
        self.publisher
            .publish(Outgoing::persistent(
                &self.topology.exchange,
                routing_key,
                body,
            ))
            .await
            .with_context(|| format!("publish to {routing_key}"))
    }

    /// Publishes `envelope` under its topic, confirmed.
    pub async fn publish_event<P: Serialize>(&self, envelope: &Envelope<P>) -> anyhow::Result<()> {
        self.publish(&envelope.topic, &crate::events::body(envelope)?)
            .await
    }

    /// Publishes every envelope under its topic, persistent, with up to `window` confirms
    /// outstanding at once; returns how many were published.
    pub async fn publish_events<P, I>(&self, envelopes: I, window: usize) -> anyhow::Result<u64>
    where
        P: Serialize,
        I: IntoIterator<Item = Envelope<P>>,
    {
        let mut sends = futures::stream::iter(envelopes)
            .map(|envelope| async move { self.publish_event(&envelope).await })
            .buffer_unordered(window.max(1));
        let mut published = 0;
        while let Some(sent) = sends.next().await {
            sent?;
            published += 1;
        }
        Ok(published)
    }

    /// Publishes `body` under `routing_key`, persistent, without waiting for a confirm: a
    /// paced run measures delivery at the far end instead, and tracks nothing per message.
    pub async fn publish_unconfirmed(&self, routing_key: &str, body: &[u8]) -> anyhow::Result<()> {
        let _confirm = self
            .channel
            .basic_publish(
                self.topology.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .with_context(|| format!("publish to {routing_key}"))?;
        Ok(())
    }

    /// Ready messages and consumers of `queue`, by a passive declare on a channel of its own
    /// (a failed passive declare closes its channel, and the others must survive it).
    pub async fn queue_counts(&self, queue: &str) -> anyhow::Result<QueueCounts> {
        let channel = self.connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(200, "counted".into()).await;
        let declared = declared.with_context(|| format!("count {queue}"))?;
        Ok(QueueCounts {
            messages: declared.message_count(),
            consumers: declared.consumer_count(),
        })
    }

    /// Receives every `attacker.intel.enriched` published to the topology's exchange, from now
    /// on, on an exclusive server-named queue (auto-ack); see [`Enriched`].
    pub async fn consume_enriched(&self) -> anyhow::Result<Enriched> {
        let channel = self.connection.create_channel().await?;
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
        channel
            .queue_bind(
                queue.name().clone(),
                self.topology.exchange.as_str().into(),
                TOPIC_INTEL_ENRICHED.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "enrichd-harness-enriched".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("consume attacker.intel.enriched")?;
        let enriched = Enriched::default();
        let sink = enriched.clone();
        tokio::spawn(async move {
            // The channel lives as long as this task, which ends with the connection.
            let _channel = channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                let at = Instant::now();
                let message_id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().to_owned());
                let envelope = serde_json::from_slice(&delivery.data).unwrap_or_default();
                sink.push(Received {
                    message_id,
                    envelope,
                    at,
                });
            }
        });
        Ok(enriched)
    }

    /// Deletes the topology's queues and exchanges, then closes the connection. Quorum queues
    /// stay on the shared broker until deleted, each a Raft member with its own timers and
    /// files, so a run leaves none behind. Call it once the replicas are gone: a consumer
    /// that sees its queue deleted reconnects and declares it again.
    pub async fn teardown(self) -> anyhow::Result<()> {
        let failed = self.delete().await;
        self.close().await;
        if !failed.is_empty() {
            bail!("teardown: {failed:?}");
        }
        Ok(())
    }

    /// Deletes the topology's queues and exchanges; returns what could not be deleted.
    pub async fn delete(&self) -> Vec<String> {
        self.topology.delete(&self.connection).await
    }

    /// Closes the connection (the topology stays).
    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// One `attacker.intel.enriched` received.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The AMQP `message_id` (the envelope's id, for consumers that dedupe).
    pub message_id: Option<String>,
    /// The body (`Null` when it is not JSON).
    pub envelope: Value,
    /// When it arrived.
    pub at: Instant,
}

/// The `attacker.intel.enriched` events received so far; cheap to clone, shared with the
/// consuming task.
#[derive(Debug, Clone, Default)]
pub struct Enriched {
    inner: Arc<Mutex<Log>>,
}

#[derive(Debug, Default)]
struct Log {
    messages: Vec<Received>,
    /// The first arrival per `payload.attacker_ip`.
    first: HashMap<String, Instant>,
}

impl Enriched {
    fn lock(&self) -> MutexGuard<'_, Log> {
        // A panicking reader cannot leave the log half-written; keep recording.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, received: Received) {
        let mut log = self.lock();
        if let Some(ip) = received.envelope["payload"]["attacker_ip"].as_str() {
            log.first.entry(ip.to_owned()).or_insert(received.at);
        }
        log.messages.push(received);
    }

    /// Events received.
    pub fn count(&self) -> usize {
        self.lock().messages.len()
    }

    /// Every event received, in arrival order.
    pub fn messages(&self) -> Vec<Received> {
        self.lock().messages.clone()
    }

    /// Distinct addresses an event has named.
    pub fn addresses(&self) -> usize {
        self.lock().first.len()
    }

    /// When the first event naming each address arrived.
    pub fn first_arrivals(&self) -> HashMap<String, Instant> {
        self.lock().first.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_arrival_per_address_is_kept() {
        let enriched = Enriched::default();
        let at = Instant::now();
        let later = at + std::time::Duration::from_secs(1);
        for (ip, when) in [("45.1.1.1", at), ("45.1.1.1", later), ("45.1.1.2", later)] {
            enriched.push(Received {
                message_id: None,
                envelope: serde_json::json!({"payload": {"attacker_ip": ip}}),
                at: when,
            });
        }
        enriched.push(Received {
            message_id: None,
            envelope: Value::Null,
            at: later,
        });
        assert_eq!(enriched.count(), 4);
        assert_eq!(enriched.addresses(), 2);
        assert_eq!(enriched.first_arrivals()["45.1.1.1"], at);
    }
}
