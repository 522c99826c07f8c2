//! The bus topology (SPEC §4), identical on every replica: RabbitMQ answers
//! `PRECONDITION_FAILED` to a redeclaration with other arguments.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::BusError;
use enrichd_core::payload::{TOPIC_CONTROL, TOPIC_OBSERVED, TOPIC_SCORED};

/// Names of everything we declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Topic exchange events arrive on and results leave by (`decnet`).
    pub exchange: String,
    /// Dead-letter exchange (`<exchange>.dlx`, so `decnet.dlx`).
    pub dead_letter_exchange: String,
    /// Shared work queue (`enrich.attackers`).
    pub queue: String,
    /// Dead-letter queue and its routing key (`<queue>.dead`, so `enrich.attackers.dead`).
    pub dead_queue: String,
}

impl Topology {
    /// The topology for an exchange and work queue; the dead-letter names derive from them so
    /// tests and side-by-side deployments never share a dead-letter queue by accident.
    pub fn new(exchange: &str, queue: &str) -> Self {
        Self {
            exchange: exchange.to_owned(),
            dead_letter_exchange: format!("{exchange}.dlx"),
            queue: queue.to_owned(),
            dead_queue: format!("{queue}.dead"),
        }
    }

    /// Deletes the queues and exchanges [`Topology::declare`] creates, each on a channel of its
    /// own so that one refusal (which closes its channel) does not stop the rest, and returns
    /// what could not be deleted. For tests and the benchmark: they declare throwaway
    /// topologies on a shared broker, where quorum queues stay until deleted.
    pub async fn delete(&self, connection: &Connection) -> Vec<String> {
        let mut failed = Vec::new();
        for queue in [&self.queue, &self.dead_queue] {
            let result = match connection.create_channel().await {
                Ok(channel) => channel
                    .queue_delete(name(queue), QueueDeleteOptions::default())
                    .await
                    .map(drop),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                failed.push(format!("queue {queue}: {e}"));
            }
        }
        for exchange in [&self.exchange, &self.dead_letter_exchange] {
            let result = match connection.create_channel().await {
                Ok(channel) => {
                    channel
                        .exchange_delete(name(exchange), ExchangeDeleteOptions::default())
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                failed.push(format!("exchange {exchange}: {e}"));
            }
        }
        failed
    }

    /// Declares the exchanges, the quorum work and dead-letter queues and their bindings.
    ///
    /// # Errors
    /// [`BusError::Amqp`], e.g. when an existing queue has other arguments.
    pub async fn declare(&self, channel: &Channel) -> Result<(), BusError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                name(&self.exchange),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(BusError::amqp("declare exchange"))?;
        channel
            .exchange_declare(
                name(&self.dead_letter_exchange),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(BusError::amqp("declare dead-letter exchange"))?;

        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(
                name(&self.queue),
                durable_queue,
                self.work_queue_arguments(),
            )
            .await
            .map_err(BusError::amqp("declare work queue"))?;
        for topic in [TOPIC_OBSERVED, TOPIC_SCORED] {
            channel
                .queue_bind(
                    name(&self.queue),
                    name(&self.exchange),
                    name(topic),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(BusError::amqp("bind work queue"))?;
        }

        channel
            .queue_declare(
                name(&self.dead_queue),
                durable_queue,
                dead_queue_arguments(),
            )
            .await
            .map_err(BusError::amqp("declare dead-letter queue"))?;
        channel
            .queue_bind(
                name(&self.dead_queue),
                name(&self.dead_letter_exchange),
                name(&self.dead_queue),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BusError::amqp("bind dead-letter queue"))?;
        Ok(())
    }

    /// Declares this replica's server-named, exclusive, auto-delete control queue bound to
    /// `system.enrich.control`, and returns its name. Call again after every reconnect: the
    /// queue dies with the connection.
    ///
    /// # Errors
    /// [`BusError::Amqp`].
    pub async fn declare_control_queue(&self, channel: &Channel) -> Result<String, BusError> {
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let queue = channel
            .queue_declare(name(""), options, FieldTable::default())
            .await
            .map_err(BusError::amqp("declare control queue"))?;
        let queue_name = queue.name().to_string();
        channel
            .queue_bind(
                name(&queue_name),
                name(&self.exchange),
                name(TOPIC_CONTROL),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BusError::amqp("bind control queue"))?;
        Ok(queue_name)
    }

    fn work_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(name("x-queue-type"), text("quorum"));
        args.insert(
            name("x-dead-letter-exchange"),
            text(&self.dead_letter_exchange),
        );
        args.insert(name("x-dead-letter-routing-key"), text(&self.dead_queue));
        args.insert(name("x-delivery-limit"), AMQPValue::LongInt(10));
        args
    }
}

fn dead_queue_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(name("x-queue-type"), text("quorum"));
    args.insert(name("x-max-length"), AMQPValue::LongInt(100_000));
    args.insert(name("x-overflow"), text("drop-head"));
    args
}

fn name(text: &str) -> ShortString {
    text.into()
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_names_derive_from_the_configured_ones() {
        let t = Topology::new("decnet", "enrich.attackers");
        assert_eq!(t.dead_letter_exchange, "decnet.dlx");
        assert_eq!(t.dead_queue, "enrich.attackers.dead");
        let args = t.work_queue_arguments();
        let inner = args.inner();
        assert_eq!(inner.get("x-delivery-limit"), Some(&AMQPValue::LongInt(10)));
        assert_eq!(
            inner.get("x-dead-letter-exchange"),
            Some(&text("decnet.dlx"))
        );
        assert_eq!(
            inner.get("x-dead-letter-routing-key"),
            Some(&text("enrich.attackers.dead"))
        );
    }
}
