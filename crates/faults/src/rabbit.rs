//! RabbitMQ through `rabbitmqctl`: a fresh vhost per scenario, and queue and consumer counts
//! for the checks. A subprocess per call survives broker restarts by construction, and counts
//! what a client cannot see (unacknowledged messages, consumer tags).

use std::time::Duration;

use anyhow::Result;
use enrichd_bus::Topology;

use crate::services::run;

/// Exchange and queue names: the defaults, isolated by the vhost.
pub(crate) const EXCHANGE: &str = "decnet";
/// The shared work queue.
pub(crate) const QUEUE: &str = "enrich.attackers";

/// The replicas' topology: the default names, isolated by the vhost.
pub(crate) fn topology() -> Topology {
    Topology::new(EXCHANGE, QUEUE)
}

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
}
