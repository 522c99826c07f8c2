//! RabbitMQ: a fresh vhost per scenario (`rabbitmqctl`), the topology declared exactly as the
//! replicas declare it (so events published before they consume are routed), confirmed
//! publishing of `attacker.scored` envelopes, and queue and consumer counts for the checks.

use std::time::Duration;

use anyhow::{Context as _, Result};
use enrichd_bus::Topology;
use enrichd_bus::publish::{Outgoing, Publisher};
use enrichd_core::Secret;
use futures::StreamExt;

use crate::services::run;

/// Exchange and queue names: the defaults, isolated by the vhost.
pub(crate) const EXCHANGE: &str = "decnet";
/// The shared work queue.
pub(crate) const QUEUE: &str = "enrich.attackers";

const CTL: Duration = Duration::from_secs(60);

/// A vhost that exists for one scenario.
#[derive(Debug)]
pub(crate) struct Vhost {
    /// Its name.
    pub(crate) name: String,
}

impl Vhost {
    /// Creates `name` and gives guest every permission on it.
    pub(crate) async fn create(name: &str) -> Result<Self> {
        run("rabbitmqctl", &["add_vhost", name], CTL).await?;
        run(
            "rabbitmqctl",
            &["set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
            CTL,
        )
        .await?;
        Ok(Self {
            name: name.to_owned(),
        })
    }

    /// The AMQP URL of this vhost.
    pub(crate) fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }

    /// Deletes the vhost and everything in it.
    pub(crate) async fn delete(&self) -> Result<()> {
        run("rabbitmqctl", &["delete_vhost", &self.name], CTL).await?;
        Ok(())
    }

    /// Messages (ready plus unacknowledged) in the work queue and in its dead-letter queue.
    pub(crate) async fn queue_depths(&self) -> Result<(u64, u64)> {
        let out = run(
            "rabbitmqctl",
            &[
                "list_queues",
                "-p",
                &self.name,
                "name",
                "messages",
                "--no-table-headers",
                "-q",
            ],
            CTL,
        )
        .await?;
        let depth = |queue: &str| {
            out.lines()
                .filter_map(|l| l.split_once('\t'))
                .find(|(name, _)| name.trim() == queue)
                .and_then(|(_, n)| n.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((depth(QUEUE), depth(&format!("{QUEUE}.dead"))))
    }

    /// Consumer tags on the work queue.
    pub(crate) async fn work_consumers(&self) -> Result<Vec<String>> {
        let out = run(
            "rabbitmqctl",
            &[
                "list_consumers",
                "-p",
                &self.name,
                "queue_name",
                "consumer_tag",
                "--no-table-headers",
                "-q",
            ],
            CTL,
        )
        .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(queue, _)| queue.trim() == QUEUE)
            .map(|(_, tag)| tag.trim().to_owned())
            .collect())
    }

    /// Declares the topology and publishes every body as `attacker.scored`, persistent, with
    /// publisher confirms (many in flight at once).
    pub(crate) async fn publish_scored(&self, bodies: Vec<String>) -> Result<()> {
        let url = Secret::new(self.url());
        let connection = enrichd_bus::connect(&url, "enrichd-faults publisher")
            .await
            .context("connect the publisher")?;
        let publisher = Publisher::open(&connection).await?;
        Topology::new(EXCHANGE, QUEUE)
            .declare(&connection)
            .await
            .context("declare the topology")?;
        let mut sends = futures::stream::iter(bodies)
            .map(|body| {
                let publisher = publisher.clone();
                async move {
                    publisher
                        .publish(Outgoing::persistent(
                            EXCHANGE,
                            "attacker.scored",
                            body.as_bytes(),
                        ))
                        .await
                }
            })
            .buffer_unordered(512);
        while let Some(sent) = sends.next().await {
            sent.context("publish an event")?;
        }
        let _ = connection.close(200, "done".into()).await;
        Ok(())
    }
}

/// An `attacker.scored` envelope for `ip` (SPEC §4), as the reference's profiler sends it.
pub(crate) fn scored_envelope(ip: &str, tick: u64) -> String {
    serde_json::json!({
        "v": 1,
        "id": uuid::Uuid::new_v4().simple().to_string(),
        "topic": "attacker.scored",
        "type": "scored",
        "ts": 1_795_000_000.0 + f64::from(u32::try_from(tick % 100_000).unwrap_or(0)),
        "payload": {
            "attacker_ip": ip,
            "event_count": 10 + tick,
            "service_count": 2,
            "decky_count": 1,
            "bounty_count": 0,
            "credential_count": 3,
            "is_traversal": false,
        }
    })
    .to_string()
}
