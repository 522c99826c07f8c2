//! RabbitMQ side of the benchmark: the profiler's events as the bench sends them, confirmed
//! publishing at a measured rate, and the bare-consumer ceiling. The connection, topology,
//! queue counts and the `attacker.intel.enriched` subscriber are the harness's.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::bail;
use enrichd_core::payload::Envelope;
use enrichd_harness::bus::TestBus;
use enrichd_harness::events::{self, Scored};
use futures::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::time::Instant;

/// Unacknowledged publishes in flight while loading a queue.
const PUBLISH_WINDOW: usize = 1000;

/// Publishes every envelope, persistent, with confirms, `PUBLISH_WINDOW` in flight; returns
/// the publish rate per second.
pub(crate) async fn publish_all(
    bus: &TestBus,
    envelopes: impl IntoIterator<Item = Envelope<Scored>>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let n = bus.publish_events(envelopes, PUBLISH_WINDOW).await?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// An `attacker.scored` envelope for `ip`, as the reference's profiler sends it, stamped now;
/// its credential count cycles with the tick.
pub(crate) fn scored(ip: Ipv4Addr, tick: u64) -> Envelope<Scored> {
    Scored {
        credential_count: tick % 3,
        ..Scored::tick(ip.to_string(), tick)
    }
    .envelope(events::epoch_secs())
}

/// The bare consumer: prefetch `prefetch`, decode each body the way enrichd does, ack each
/// message on its own. Returns (messages, seconds from first delivery to last ack).
pub(crate) async fn bare_consume(
    bus: &TestBus,
    queue: &str,
    prefetch: u16,
    expected: u64,
    deadline: Duration,
) -> anyhow::Result<(u64, f64)> {
    let channel = bus.connection().create_channel().await?;
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
