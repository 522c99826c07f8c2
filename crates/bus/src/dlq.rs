//! Dead-letter maintenance for `enrichd dlq replay` and `enrichd dlq purge`.

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;

use crate::publish::{Outgoing, Publisher};
use crate::{BusError, Topology};

/// Drops every dead letter; returns how many there were.
///
/// # Errors
/// [`BusError::Amqp`].
pub async fn purge(channel: &Channel, topology: &Topology) -> Result<u32, BusError> {
    channel
        .queue_purge(
            topology.dead_queue.as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await
        .map_err(BusError::amqp("purge dead-letter queue"))
}

/// Moves dead letters back to the work queue, at most `limit` (and never more than were there
/// when it started, so a letter that dead-letters again is not replayed in a loop). Each one is
/// republished persistent through the default exchange straight to the work queue, confirmed,
/// and only then acked on the dead-letter queue: a crash in between duplicates, never loses.
///
/// # Errors
/// [`BusError::Amqp`] / [`BusError::Nacked`]; what was moved before the error stays moved.
pub async fn replay(
    publisher: &Publisher,
    channel: &Channel,
    topology: &Topology,
    limit: Option<u64>,
) -> Result<u64, BusError> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let waiting = channel
        .queue_declare(
            topology.dead_queue.as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await
        .map_err(BusError::amqp("inspect dead-letter queue"))?
        .message_count();
    let budget = limit.map_or(u64::from(waiting), |l| l.min(u64::from(waiting)));
    let mut moved = 0;
    while moved < budget {
        let Some(message) = channel
            .basic_get(
                topology.dead_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .map_err(BusError::amqp("get dead letter"))?
        else {
            break;
        };
        let delivery = message.delivery;
        // The reason described the last failure; a replayed letter earns a fresh one if any.
        let mut headers = FieldTable::default();
        if let Some(original) = delivery.properties.headers() {
            for (key, value) in original.inner() {
                if key.as_str() != "x-enrichd-reason" {
                    headers.insert(key.clone(), value.clone());
                }
            }
        }
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        publisher
            .publish(Outgoing {
                exchange: "",
                routing_key: &topology.queue,
                body: &delivery.data,
                message_id: message_id.as_deref(),
                persistent: true,
                expiration_ms: None,
                headers: Some(headers),
            })
            .await?;
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(BusError::amqp("ack dead letter"))?;
        moved += 1;
    }
    Ok(moved)
}
