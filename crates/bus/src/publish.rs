//! Publishing with publisher confirms, and dead-lettering poison.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

use crate::BusError;
use crate::decode::{DeadLetterReason, MAX_BODY_BYTES};

/// AMQP `delivery_mode` for messages that must survive a broker restart.
const PERSISTENT: u8 = 2;

/// Longest wait for a publisher confirm. A loaded broker confirms within milliseconds; one
/// that went away mid-publish may leave lapin's publish or confirm pending forever
/// (amqp-rs/lapin#409), and a relay waiting on it would never notice the session is gone.
pub const CONFIRM_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// A channel in confirm mode: every publish resolves only when the broker has taken it.
#[derive(Debug, Clone)]
pub struct Publisher {
    channel: Channel,
}

/// The broker's answer to one sent message, still to come (see [`Publisher::send`]).
#[derive(Debug)]
#[must_use = "a message counts as published only once its confirm is awaited"]
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    routing_key: String,
}

impl PendingConfirm {
    /// Waits for the broker's confirm.
    ///
    /// # Errors
    /// [`BusError::Amqp`] on a channel failure, [`BusError::Nacked`] on a nack,
    /// [`BusError::ConfirmTimeout`] when the broker answers neither way in time.
    pub async fn confirmed(self) -> Result<(), BusError> {
        let confirmation = tokio::time::timeout(CONFIRM_WITHIN, self.confirm)
            .await
            .map_err(|_| BusError::ConfirmTimeout(CONFIRM_WITHIN))?
            .map_err(BusError::amqp("await confirm"))?;
        match confirmation {
            Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
            Confirmation::Nack(_) => Err(BusError::Nacked {
                routing_key: self.routing_key,
            }),
        }
    }
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Exchange.
    pub exchange: &'a str,
    /// Routing key (the topic).
    pub routing_key: &'a str,
    /// Body.
    pub body: &'a [u8],
    /// AMQP `message_id` (the envelope id, so consumers can dedupe).
    pub message_id: Option<&'a str>,
    /// Persistent (`delivery_mode` 2) or transient.
    pub persistent: bool,
    /// Per-message TTL in milliseconds (health beats expire).
    pub expiration_ms: Option<u64>,
    /// Headers to send.
    pub headers: Option<FieldTable>,
}

impl<'a> Outgoing<'a> {
    /// A persistent message with no id, expiration or headers: an event as a producer sends
    /// it.
    pub fn persistent(exchange: &'a str, routing_key: &'a str, body: &'a [u8]) -> Self {
        Self {
            exchange,
            routing_key,
            body,
            message_id: None,
            persistent: true,
            expiration_ms: None,
            headers: None,
        }
    }
}

impl Publisher {
    /// Opens a confirm-mode channel on `connection`.
    ///
    /// # Errors
    /// [`BusError::Amqp`].
    pub async fn open(connection: &Connection) -> Result<Self, BusError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(BusError::amqp("open publish channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BusError::amqp("enable publisher confirms"))?;
        Ok(Self { channel })
    }

    /// The underlying channel (for declarations on the publishing connection).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes and waits for the broker's confirm.
    ///
    /// # Errors
    /// [`BusError::Amqp`] on a channel failure, [`BusError::Nacked`] on a nack,
    /// [`BusError::ConfirmTimeout`] when the broker answers neither way in time.
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), BusError> {
        self.send(message).await?.confirmed().await
    }

    /// Publishes and returns the broker's confirm without waiting for it. Messages reach the
    /// broker in the order they were sent, whenever their confirms are awaited, so a caller
    /// that must keep an order can send the next message while earlier confirms are pending.
    ///
    /// # Errors
    /// [`BusError::Amqp`] on a channel failure, [`BusError::ConfirmTimeout`] when the
    /// message could not be handed to the connection in time.
    pub async fn send(&self, message: Outgoing<'_>) -> Result<PendingConfirm, BusError> {
        let mut properties =
            BasicProperties::default().with_content_type(ShortString::from("application/json"));
        if message.persistent {
            properties = properties.with_delivery_mode(PERSISTENT);
        }
        if let Some(id) = message.message_id {
            properties = properties.with_message_id(id.into());
        }
        if let Some(ms) = message.expiration_ms {
            properties = properties.with_expiration(ms.to_string().into());
        }
        if let Some(headers) = message.headers {
            properties = properties.with_headers(headers);
        }
        let sent = self.channel.basic_publish(
            message.exchange.into(),
            message.routing_key.into(),
            BasicPublishOptions::default(),
            message.body,
            properties,
        );
        let confirm = tokio::time::timeout(CONFIRM_WITHIN, sent)
            .await
            .map_err(|_| BusError::ConfirmTimeout(CONFIRM_WITHIN))?
            .map_err(BusError::amqp("publish"))?;
        Ok(PendingConfirm {
            confirm,
            routing_key: message.routing_key.to_owned(),
        })
    }

    /// Republishes a poison delivery to the dead-letter exchange, persistent, with its
    /// original headers and `x-enrichd-reason`, and waits for the confirm. The caller acks the
    /// original only after this returns `Ok`, so a poison message is never lost.
    ///
    /// A body over 64 KiB goes as its first 64 KiB, with `x-enrichd-original-size` and
    /// `x-enrichd-truncated: true`: the letter says what it was without its bulk filling the
    /// dead-letter queue. A `TooLarge` reason gives the size of a body the caller already cut
    /// ([`crate::decode::cut_oversized`]).
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    pub async fn dead_letter(
        &self,
        dead_letter_exchange: &str,
        dead_queue: &str,
        delivery: &lapin::message::Delivery,
        reason: &DeadLetterReason,
    ) -> Result<(), BusError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-enrichd-reason".into(),
            AMQPValue::LongString(reason.to_string().into()),
        );
        let body = &delivery.data[..delivery.data.len().min(MAX_BODY_BYTES)];
        let original_size = reason
            .original_size()
            .or_else(|| (delivery.data.len() > MAX_BODY_BYTES).then_some(delivery.data.len()));
        if let Some(size) = original_size {
            headers.insert(
                "x-enrichd-original-size".into(),
                AMQPValue::LongLongInt(i64::try_from(size).unwrap_or(i64::MAX)),
            );
            headers.insert("x-enrichd-truncated".into(), AMQPValue::Boolean(true));
        }
        headers.insert(
            "x-enrichd-original-routing-key".into(),
            AMQPValue::LongString(delivery.routing_key.as_str().into()),
        );
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str);
        self.publish(Outgoing {
            exchange: dead_letter_exchange,
            routing_key: dead_queue,
            body,
            message_id,
            persistent: true,
            expiration_ms: None,
            headers: Some(headers),
        })
        .await
    }
}
