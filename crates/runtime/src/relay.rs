//! The outbox relay: publishes `attacker.intel.enriched` envelopes from the outbox with
//! publisher confirms and deletes exactly the version the broker confirmed. A crash between
//! confirm and delete publishes once more (at-least-once; consumers dedupe on the envelope id).
//!
//! Rows reach it two ways. This process's writes claim the rows they write and hand them over
//! ([`OutboxHandoff`]); they are published at once, with no claim transaction on the way. Rows
//! nobody handed over (written by `lookup`, by a replica without a bus, left by a relay that
//! died, or released after a newer version replaced one in flight) are claimed from the table
//! (`FOR UPDATE SKIP LOCKED`). Handed rows are sent while earlier rows' confirms are still
//! pending, in the order they were written; confirmed versions are deleted by a task of their
//! own, so the next publish waits neither for earlier confirms nor for a delete's commit.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use enrichd_bus::publish::{Outgoing, PendingConfirm, Publisher};
use enrichd_core::payload::TOPIC_INTEL_ENRICHED;
use enrichd_store::{OutboxRow, Store};
use futures::FutureExt;
use futures::future::join_all;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

/// Rows per claim. Their publishes are pipelined: confirms are awaited together.
const BATCH: u32 = 200;
/// How long a claim hides rows from other relays, whether the relay claimed them or a write
/// claimed them for it; far above one batch's publish time.
pub const CLAIM_FOR: Duration = Duration::from_secs(30);
/// A handed-over row older than this is left to its claim's lapse instead of published:
/// another relay may take it after the lapse and publish a newer version first, and an old
/// version published after a newer one would overwrite it downstream.
const HANDOFF_FRESH: Duration = Duration::from_secs(15);
/// Handed-over rows kept while the bus is down; the oldest go first (their claims lapse and
/// any relay takes them from the table), so a long outage cannot grow memory.
const HANDOFF_MAX: usize = 10_000;
/// How long confirmed versions gather before they are deleted together; far below
/// [`CLAIM_FOR`], so no other relay takes a confirmed row meanwhile.
const DELETE_LINGER: Duration = Duration::from_millis(50);
/// Poll when nobody wakes us: rows written by another replica without a bus, or left by a
/// relay that died.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Between this process's writes and its relay: rows written already claimed for the relay,
/// and a wake-up for rows only a claim finds.
#[derive(Debug, Default)]
pub struct OutboxHandoff {
    rows: Mutex<VecDeque<(Instant, OutboxRow)>>,
    handed: Notify,
    claimable: Notify,
}

impl OutboxHandoff {
    /// An empty hand-off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows a write claimed for this process's relay, to publish at once.
    pub fn hand_off(&self, rows: Vec<OutboxRow>) {
        if rows.is_empty() {
            return;
        }
        let now = Instant::now();
        {
            let mut queued = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
            queued.extend(rows.into_iter().map(|row| (now, row)));
            let over = queued.len().saturating_sub(HANDOFF_MAX);
            queued.drain(..over);
        }
        self.handed.notify_one();
    }

    /// Rows were written that the relay must claim from the table.
    pub fn wake_claim(&self) {
        self.claimable.notify_one();
    }

    /// Handed-over rows still fresh enough to publish, oldest first.
    fn take_fresh(&self) -> Vec<OutboxRow> {
        let queued = std::mem::take(&mut *self.rows.lock().unwrap_or_else(PoisonError::into_inner));
        let now = Instant::now();
        queued
            .into_iter()
            .filter(|(at, _)| now.duration_since(*at) < HANDOFF_FRESH)
            .map(|(_, row)| row)
            .collect()
    }
}

/// Why the relay stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Asked to stop.
    Stopped,
    /// The publishing connection failed; reconnect and start again.
    BusFailed,
}

/// Publishes until `stop` or a bus failure, then returns once every confirmed version is
/// deleted (or its delete failed).
pub async fn run_relay(
    store: Store,
    publisher: Publisher,
    exchange: String,
    outbox: Arc<OutboxHandoff>,
    stop: watch::Receiver<bool>,
) -> RelayEnd {
    let (confirmed_tx, confirmed_rx) = mpsc::unbounded_channel();
    let relay = Relay {
        store: &store,
        publisher: &publisher,
        exchange: &exchange,
        outbox: &outbox,
        confirmed: confirmed_tx,
    };
    let (end, ()) = futures::future::join(
        relay.publish_loop(stop),
        delete_confirmed(&store, &outbox, confirmed_rx),
    )
    .await;
    end
}

enum RelayError {
    Bus,
    Store(String),
}

/// Confirmed versions, on their way to the deleting task.
type Confirmed = Vec<(String, i64)>;

struct Relay<'a> {
    store: &'a Store,
    publisher: &'a Publisher,
    exchange: &'a str,
    outbox: &'a OutboxHandoff,
    /// Dropped when the loop ends, which lets the deleting task finish.
    confirmed: mpsc::UnboundedSender<Confirmed>,
}

/// One sent batch's confirms: the versions the broker confirmed, and whether any failed.
type BatchConfirms = Pin<Box<dyn Future<Output = (Confirmed, bool)> + Send>>;

impl Relay<'_> {
    async fn publish_loop(self, mut stop: watch::Receiver<bool>) -> RelayEnd {
        // Rows left by a relay that died, by `lookup`, or while the bus was down.
        let mut claim_due = true;
        // Handed rows are sent as soon as they come, while earlier batches' confirms are
        // still on their way: waiting for those first held each write's rows back by a
        // confirm's round trip whenever the previous write's were in flight.
        let mut confirming: FuturesUnordered<BatchConfirms> = FuturesUnordered::new();
        loop {
            let stopping = *stop.borrow();
            let handed = self.outbox.take_fresh();
            let any_handed = !handed.is_empty();
            if any_handed {
                match self.send_rows(&handed).await {
                    Ok(confirms) => confirming.push(confirms),
                    Err(()) => return RelayEnd::BusFailed,
                }
            }
            while let Some(Some(batch)) = confirming.next().now_or_never() {
                if self.settle(batch).is_err() {
                    return RelayEnd::BusFailed;
                }
            }
            if claim_due || stopping {
                match self.claim_round().await {
                    Ok(n) => claim_due = n >= BATCH as usize,
                    Err(RelayError::Bus) => return RelayEnd::BusFailed,
                    Err(RelayError::Store(e)) => {
                        warn!(error = %e, "Outbox claim failed; retrying.");
                        claim_due = false;
                    }
                }
            }
            if stopping {
                // The drained jobs' last rows went out in this final round (what did not stays
                // in the outbox for the next relay, of any replica); their confirms decide
                // what is deleted.
                while let Some(batch) = confirming.next().await {
                    if self.settle(batch).is_err() {
                        return RelayEnd::BusFailed;
                    }
                }
                return RelayEnd::Stopped;
            }
            if any_handed || claim_due {
                continue;
            }
            tokio::select! {
                () = self.outbox.handed.notified() => {}
                () = self.outbox.claimable.notified() => claim_due = true,
                Some(batch) = confirming.next(), if !confirming.is_empty() => {
                    if self.settle(batch).is_err() {
                        return RelayEnd::BusFailed;
                    }
                }
                () = tokio::time::sleep(IDLE_POLL) => claim_due = true,
                _ = stop.changed() => {}
            }
        }
    }

    /// Claims one batch from the table and publishes it; returns how many rows it claimed.
    async fn claim_round(&self) -> Result<usize, RelayError> {
        let rows = self
            .store
            .claim_outbox(BATCH, CLAIM_FOR)
            .await
            .map_err(|e| RelayError::Store(enrichd_core::error::chain(&e)))?;
        let confirms = self.send_rows(&rows).await.map_err(|()| RelayError::Bus)?;
        self.settle(confirms.await).map_err(|()| RelayError::Bus)?;
        Ok(rows.len())
    }

    /// Sends `rows` in order, pipelined, and returns their confirms to await. A row that was
    /// not sent or not confirmed keeps its claim until it lapses, and is published again then.
    async fn send_rows(&self, rows: &[OutboxRow]) -> Result<BatchConfirms, ()> {
        // `join_all` polls the sends in order, and each queues its frames on its first poll:
        // the rows reach the broker in the order of `rows`.
        let sent = join_all(
            rows.iter()
                .map(|row| send(self.publisher, self.exchange, row)),
        )
        .await;
        let mut pending = Vec::with_capacity(rows.len());
        let mut failed = false;
        for (row, sent) in rows.iter().zip(sent) {
            match sent {
                Some(confirm) => pending.push(((row.attacker_uuid.clone(), row.version), confirm)),
                None => failed = true,
            }
        }
        if failed && pending.is_empty() {
            return Err(());
        }
        Ok(Box::pin(async move {
            let (keys, confirms): (Vec<_>, Vec<_>) = pending.into_iter().unzip();
            let answers = join_all(confirms.into_iter().map(PendingConfirm::confirmed)).await;
            let mut delivered = Vec::with_capacity(keys.len());
            for (key, answer) in keys.into_iter().zip(answers) {
                match answer {
                    Ok(()) => delivered.push(key),
                    Err(e) => {
                        debug!(error = %enrichd_core::error::chain(&e), "Outbox publish not confirmed.");
                        failed = true;
                    }
                }
            }
            (delivered, failed)
        }))
    }

    /// Passes a batch's confirmed versions on to be deleted; `Err` when any of its rows
    /// failed, which means the publishing session is gone.
    fn settle(&self, (delivered, failed): (Confirmed, bool)) -> Result<(), ()> {
        if !delivered.is_empty() {
            // The deleting task outlives this loop (it ends when this sender is dropped).
            let _ = self.confirmed.send(delivered);
        }
        if failed { Err(()) } else { Ok(()) }
    }
}

/// Deletes confirmed versions, everything that queued up during the previous delete and the
/// linger after it in one transaction. A version a newer payload replaced meanwhile is released instead, and the
/// relay is woken to claim it.
async fn delete_confirmed(
    store: &Store,
    outbox: &OutboxHandoff,
    mut confirmed: mpsc::UnboundedReceiver<Confirmed>,
) {
    while let Some(mut batch) = confirmed.recv().await {
        // Nothing waits for a delete (the rows stay claimed by this relay meanwhile), so one
        // statement a linger serves every write's rows: a delete per confirmed batch was more
        // deletes than there were writes, each a commit of its own.
        tokio::time::sleep(DELETE_LINGER).await;
        while let Ok(more) = confirmed.try_recv() {
            batch.extend(more);
        }
        match store.delete_outbox_batch(&batch).await {
            Ok(deleted) if deleted < batch.len() as u64 => outbox.wake_claim(),
            Ok(_) => {}
            // Published but not deleted: published again after the claim lapses (consumers
            // dedupe on the envelope id).
            Err(e) => {
                warn!(error = %enrichd_core::error::chain(&e), "Outbox delete failed; events may repeat.");
            }
        }
    }
}

/// The one field of an envelope the relay needs. Reading only it, borrowed, skips building
/// the whole payload as a `serde_json::Value` for every row published.
#[derive(serde::Deserialize)]
struct EnvelopeId<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
}

async fn send(publisher: &Publisher, exchange: &str, row: &OutboxRow) -> Option<PendingConfirm> {
    let message_id = serde_json::from_str::<EnvelopeId<'_>>(&row.payload)
        .ok()
        .and_then(|envelope| envelope.id);
    let result = publisher
        .send(Outgoing {
            message_id: message_id.as_deref(),
            ..Outgoing::persistent(exchange, TOPIC_INTEL_ENRICHED, row.payload.as_bytes())
        })
        .await;
    match result {
        Ok(confirm) => Some(confirm),
        Err(e) => {
            debug!(error = %enrichd_core::error::chain(&e), "Outbox publish failed.");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uuid: &str, version: i64) -> OutboxRow {
        OutboxRow {
            attacker_uuid: uuid.to_owned(),
            version,
            payload: "{}".to_owned(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn handed_rows_come_out_once_in_order() {
        let outbox = OutboxHandoff::new();
        outbox.hand_off(vec![row("a", 1), row("b", 1)]);
        outbox.hand_off(vec![row("a", 2)]);
        assert_eq!(outbox.take_fresh(), [row("a", 1), row("b", 1), row("a", 2)]);
        assert!(outbox.take_fresh().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_handed_row_past_its_freshness_is_left_to_its_lapse() {
        let outbox = OutboxHandoff::new();
        outbox.hand_off(vec![row("old", 1)]);
        tokio::time::advance(HANDOFF_FRESH).await;
        outbox.hand_off(vec![row("new", 1)]);
        assert_eq!(outbox.take_fresh(), [row("new", 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_hand_off_keeps_only_the_newest_rows() {
        let outbox = OutboxHandoff::new();
        let rows: Vec<OutboxRow> = (0..HANDOFF_MAX + 5)
            .map(|n| row(&n.to_string(), 1))
            .collect();
        outbox.hand_off(rows);
        let fresh = outbox.take_fresh();
        assert_eq!(fresh.len(), HANDOFF_MAX);
        assert_eq!(fresh[0].attacker_uuid, "5");
    }
}
