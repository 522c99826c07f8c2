//! The bus topology (SPEC §4), identical on every replica: RabbitMQ answers
//! `PRECONDITION_FAILED` to a redeclaration with other arguments.
//!
//! A new version may declare a queue with new arguments (the dead-letter queue's byte bound
//! came in schema 2's release). On a deployment whose queues predate it, the broker refuses
//! the redeclaration; [`Topology::declare`] then keeps the queue as it is, binds it, and
//! reports the difference ([`ArgumentMismatch`]) with how to migrate, instead of failing the
//! session and crash-looping the replica.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};

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
    /// The dead-letter queue's bound in bytes (`x-max-length-bytes`,
    /// `ENRICHD_DLQ_MAX_BYTES`): a flood of large poison drops its oldest letters instead of
    /// filling the broker's disk.
    pub dead_max_bytes: u64,
}

/// The dead-letter queue's default byte bound: 256 MiB.
pub const DEFAULT_DEAD_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// The dead-letter queue's bound in letters.
const DEAD_MAX_LENGTH: i32 = 100_000;

/// A queue that exists with other arguments than this version declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgumentMismatch {
    /// The queue.
    pub queue: String,
    /// What the broker said differs (its `PRECONDITION_FAILED` text).
    pub broker_says: String,
    /// How to bring the queue to this version's arguments.
    pub migrate: String,
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
            dead_max_bytes: DEFAULT_DEAD_MAX_BYTES,
        }
    }

    /// With the dead-letter queue bounded at `bytes`.
    #[must_use]
    pub fn with_dead_max_bytes(mut self, bytes: u64) -> Self {
        self.dead_max_bytes = bytes;
        self
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

    /// Declares the exchanges, the quorum work and dead-letter queues and their bindings, on
    /// channels of its own from `connection`. A queue that exists with other arguments is
    /// kept as it is and bound, and its difference is returned for the caller to report
    /// (one log line, [`ArgumentMismatch`]); any other refusal is an error.
    ///
    /// # Errors
    /// [`BusError::Amqp`].
    pub async fn declare(
        &self,
        connection: &Connection,
    ) -> Result<Vec<ArgumentMismatch>, BusError> {
        let open = || async {
            connection
                .create_channel()
                .await
                .map_err(BusError::amqp("open channel"))
        };
        let mut channel = open().await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for (exchange, kind) in [
            (&self.exchange, ExchangeKind::Topic),
            (&self.dead_letter_exchange, ExchangeKind::Direct),
        ] {
            channel
                .exchange_declare(name(exchange), kind, durable, FieldTable::default())
                .await
                .map_err(BusError::amqp("declare exchange"))?;
        }
        let mut mismatches = Vec::new();
        let queues = [
            (
                &self.queue,
                self.work_queue_arguments(),
                &self.exchange,
                vec![TOPIC_OBSERVED, TOPIC_SCORED],
            ),
            (
                &self.dead_queue,
                self.dead_queue_arguments(),
                &self.dead_letter_exchange,
                vec![self.dead_queue.as_str()],
            ),
        ];
        for (queue, arguments, exchange, keys) in queues {
            let declared = channel
                .queue_declare(
                    name(queue),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    arguments,
                )
                .await;
            match declared {
                Ok(_) => {}
                Err(e) if precondition_failed(&e).is_some() => {
                    // The refusal closed the channel; the queue itself is there and usable.
                    let broker_says = precondition_failed(&e).unwrap_or_default();
                    mismatches.push(ArgumentMismatch {
                        migrate: self.migration_advice(queue),
                        queue: queue.clone(),
                        broker_says,
                    });
                    channel = open().await?;
                }
                Err(e) => return Err(BusError::amqp("declare queue")(e)),
            }
            for key in keys {
                channel
                    .queue_bind(
                        name(queue),
                        name(exchange),
                        name(key),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(BusError::amqp("bind queue"))?;
            }
        }
        // The caller's later declarations need a channel that is still open.
        let _ = channel.close(200, "declared".into()).await;
        Ok(mismatches)
    }

    /// How an operator brings `queue` to this version's arguments without losing letters.
    fn migration_advice(&self, queue: &str) -> String {
        let pattern = format!("^{}$", queue.replace('.', "\\."));
        if queue == self.dead_queue {
            format!(
                "rabbitmqctl set_policy enrichd-dead '{pattern}' \
                 '{{\"max-length-bytes\":{},\"max-length\":{DEAD_MAX_LENGTH},\"overflow\":\"drop-head\"}}' \
                 --apply-to queues (or delete {queue} while it is empty and restart one replica)",
                self.dead_max_bytes
            )
        } else {
            format!(
                "stop every replica, let {queue} drain or move its messages with a shovel, \
                 delete it, and start one replica to declare it again"
            )
        }
    }

    fn dead_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(name("x-queue-type"), text("quorum"));
        args.insert(name("x-max-length"), AMQPValue::LongInt(DEAD_MAX_LENGTH));
        args.insert(
            name("x-max-length-bytes"),
            AMQPValue::LongLongInt(i64::try_from(self.dead_max_bytes).unwrap_or(i64::MAX)),
        );
        args.insert(name("x-overflow"), text("drop-head"));
        args
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

/// The broker's text when `error` is a `PRECONDITION_FAILED` refusal.
fn precondition_failed(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) =>
        {
            Some(amqp.get_message().to_string())
        }
        _ => None,
    }
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

    #[test]
    fn the_dead_letter_queue_is_bounded_in_letters_and_bytes() {
        let default = Topology::new("decnet", "enrich.attackers").dead_queue_arguments();
        let inner = default.inner();
        assert_eq!(
            inner.get("x-max-length-bytes"),
            Some(&AMQPValue::LongLongInt(256 * 1024 * 1024))
        );
        assert_eq!(
            inner.get("x-max-length"),
            Some(&AMQPValue::LongInt(100_000))
        );
        assert_eq!(inner.get("x-overflow"), Some(&text("drop-head")));
        let small = Topology::new("decnet", "enrich.attackers")
            .with_dead_max_bytes(1 << 20)
            .dead_queue_arguments();
        assert_eq!(
            small.inner().get("x-max-length-bytes"),
            Some(&AMQPValue::LongLongInt(1 << 20))
        );
    }
}
