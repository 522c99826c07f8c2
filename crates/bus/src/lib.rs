//! enrichd's RabbitMQ adapter, plain async code over lapin (no actix), so it is testable on
//! its own and the `BusListener` actor stays a thin shell.
//!
//! lapin runs on a dedicated tokio runtime owned by this crate (DEPENDENCIES.md G1): on the
//! actix thread a busy handler would starve AMQP heartbeats and lose the connection.
//!
//! # Layout
//! - [`decode`](mod@decode): delivery body → [`decode::EventRequest`] or [`decode::Poison`].
//! - [`topology`]: exchanges, quorum queues, bindings, the per-replica control queue.
//! - [`connection`]: connecting on the dedicated runtime.
//! - [`publish`]: confirmed publishing, dead-lettering.
//! - [`dlq`]: replaying and purging dead letters.

pub mod connection;
pub mod decode;
pub mod dlq;
pub mod publish;
pub mod topology;

pub use connection::connect;
pub use decode::{DeadLetterReason, EventRequest, Poison, decode};
pub use topology::Topology;

/// A bus failure. Every variant means "the broker or connection is not usable now": the
/// listener reconnects with backoff; nothing is dead-lettered because of it.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The AMQP client failed (connect, channel, declare, publish).
    #[error("amqp {operation} failed")]
    Amqp {
        /// What we were doing.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker refused a publish (a nack).
    #[error("broker nacked the publish to {routing_key}")]
    Nacked {
        /// Where it was going.
        routing_key: String,
    },
    /// The broker neither confirmed nor refused a publish in time: the connection is gone
    /// without lapin having noticed, so the caller treats it as failed.
    #[error("no confirm from the broker within {0:?}")]
    ConfirmTimeout(std::time::Duration),
    /// The dedicated runtime could not be created.
    #[error("cannot start the amqp runtime")]
    Runtime(#[source] std::io::Error),
    /// A message body could not be encoded.
    #[error("cannot encode the message body")]
    Encode(#[source] serde_json::Error),
}

impl BusError {
    pub(crate) fn amqp(operation: &'static str) -> impl FnOnce(lapin::Error) -> Self {
        move |source| Self::Amqp { operation, source }
    }
}
