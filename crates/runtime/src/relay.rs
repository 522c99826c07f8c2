//! The outbox relay: publishes `attacker.intel.enriched` envelopes from the outbox with
//! publisher confirms and deletes exactly the version the broker confirmed. A crash between
//! confirm and delete publishes once more (at-least-once; consumers dedupe on the envelope id).

use std::sync::Arc;
use std::time::Duration;

use enrichd_bus::publish::{Outgoing, Publisher};
use enrichd_core::payload::TOPIC_INTEL_ENRICHED;
use enrichd_store::{OutboxRow, Store};
use futures::future::join_all;
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

/// Rows per claim. Their publishes are pipelined: confirms are awaited together.
const BATCH: u32 = 200;
/// How long a claim hides rows from other relays; far above one batch's publish time.
const CLAIM_FOR: Duration = Duration::from_secs(30);
/// Poll when nobody wakes us: rows written by another replica without a bus, or left by a
/// relay that died.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Why the relay stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Asked to stop.
    Stopped,
    /// The publishing connection failed; reconnect and start again.
    BusFailed,
}

/// Publishes until `stop` or a bus failure. `wake` is notified when new rows are written.
pub async fn run_relay(
    store: Store,
    publisher: Publisher,
    exchange: String,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) -> RelayEnd {
    loop {
        let stopping = *stop.borrow();
        let round = relay_once(&store, &publisher, &exchange).await;
        if stopping {
            // The drained jobs' last rows went out in this final round (what did not stays in
            // the outbox for the next relay, of any replica).
            return match round {
                Err(RelayError::Bus) => RelayEnd::BusFailed,
                _ => RelayEnd::Stopped,
            };
        }
        match round {
            Ok(n) if n >= BATCH as usize => continue,
            Ok(_) => {}
            Err(RelayError::Bus) => return RelayEnd::BusFailed,
            Err(RelayError::Store(e)) => warn!(error = %e, "Outbox claim failed; retrying."),
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(IDLE_POLL) => {}
            _ = stop.changed() => {}
        }
    }
}

enum RelayError {
    Bus,
    Store(String),
}

/// Publishes one claimed batch; returns how many rows it claimed.
async fn relay_once(
    store: &Store,
    publisher: &Publisher,
    exchange: &str,
) -> Result<usize, RelayError> {
    let rows = store
        .claim_outbox(BATCH, CLAIM_FOR)
        .await
        .map_err(|e| RelayError::Store(enrichd_core::error::chain(&e)))?;
    let n = rows.len();
    let confirmed = join_all(rows.iter().map(|row| publish(publisher, exchange, row))).await;
    let mut bus_failed = false;
    let mut delivered = Vec::with_capacity(rows.len());
    for (row, ok) in rows.iter().zip(confirmed) {
        if ok {
            delivered.push((row.attacker_uuid.clone(), row.version));
        } else {
            bus_failed = true;
        }
    }
    if let Err(e) = store.delete_outbox_batch(&delivered).await {
        // Published but not deleted: published again after the claim lapses (consumers dedupe
        // on the envelope id).
        warn!(error = %enrichd_core::error::chain(&e), "Outbox delete failed; events may repeat.");
    }
    if bus_failed {
        Err(RelayError::Bus)
    } else {
        Ok(n)
    }
}

/// The one field of an envelope the relay needs. Reading only it, borrowed, skips building
/// the whole payload as a `serde_json::Value` for every row published.
#[derive(serde::Deserialize)]
struct EnvelopeId<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
}

async fn publish(publisher: &Publisher, exchange: &str, row: &OutboxRow) -> bool {
    let message_id = serde_json::from_str::<EnvelopeId<'_>>(&row.payload)
        .ok()
        .and_then(|envelope| envelope.id);
    let result = publisher
        .publish(Outgoing {
            message_id: message_id.as_deref(),
            ..Outgoing::persistent(exchange, TOPIC_INTEL_ENRICHED, row.payload.as_bytes())
        })
        .await;
    match result {
        Ok(()) => true,
        Err(e) => {
            debug!(error = %enrichd_core::error::chain(&e), "Outbox publish failed.");
            false
        }
    }
}
