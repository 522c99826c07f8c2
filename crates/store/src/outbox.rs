//! The outbox: one row per attacker holding the newest unpublished `attacker.intel.enriched`
//! envelope. Writes enqueue rows (a newer payload bumps the version of an unpublished one);
//! the relay claims rows (`FOR UPDATE SKIP LOCKED` on PostgreSQL), publishes with confirms
//! and deletes exactly the version it published.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use enrichd_core::payload::{Envelope, IntelPayload, TOPIC_INTEL_ENRICHED};
use sea_orm::{ConnectionTrait, DatabaseTransaction};

use crate::error::retry_busy;
use crate::sql::{self, Assign, Bound, Dialect, Joined, OnConflict, Params, RowsBack};
use crate::{Store, StoreError};

/// One claimed outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The attacker row the event is about (the outbox key).
    pub attacker_uuid: String,
    /// Bumped each time a newer payload replaced an unpublished one.
    pub version: i64,
    /// The envelope, JSON text, ready to publish (its `id` is the AMQP `message_id`).
    pub payload: String,
}

/// Outbox depth and age, for metrics and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    /// Rows waiting to be published.
    pub depth: u64,
    /// Age of the oldest waiting row (database clock).
    pub oldest_age: Option<Duration>,
}

/// A row the relay claimed, and when it was enqueued: the order it is published in.
struct Claimed {
    created_at: Option<DateTime<Utc>>,
    row: OutboxRow,
}

impl Store {
    /// Claims up to `limit` unclaimed (or lapsed) rows for `claim_for`, oldest first.
    pub async fn claim_outbox(
        &self,
        limit: u32,
        claim_for: Duration,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        retry_busy(move || self.claim_outbox_once(limit, claim_for)).await
    }

    async fn claim_outbox_once(
        &self,
        limit: u32,
        claim_for: Duration,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let dialect = self.dialect;
        let (txn, now) = self.begin_write_at().await?;
        let until =
            now + chrono::Duration::from_std(claim_for).unwrap_or(chrono::Duration::seconds(30));
        let update = format!(
            "UPDATE enrichd_outbox SET claimed_until = $1 WHERE attacker_uuid IN \
             (SELECT attacker_uuid FROM enrichd_outbox \
              WHERE claimed_until IS NULL OR claimed_until < $2 \
              ORDER BY created_at, attacker_uuid LIMIT $3{})",
            dialect.for_update_skip_locked()
        );
        let values = vec![dialect.ts(until), dialect.ts(now), i64::from(limit).into()];
        // The rows claimed.
        let rows = match dialect.rows_back() {
            RowsBack::Returning => {
                let text =
                    format!("{update} RETURNING attacker_uuid, version, payload, created_at");
                txn.query_all_raw(dialect.stmt(text, values)).await?
            }
        };
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            claimed.push(Claimed {
                created_at: dialect.get_ts(&row, "created_at")?,
                row: OutboxRow {
                    attacker_uuid: row.try_get("", "attacker_uuid")?,
                    version: row.try_get("", "version")?,
                    payload: row.try_get("", "payload")?,
                },
            });
        }
        txn.commit().await?;
        claimed.sort_by(|a, b| {
            (a.created_at, &a.row.attacker_uuid).cmp(&(b.created_at, &b.row.attacker_uuid))
        });
        Ok(claimed.into_iter().map(|c| c.row).collect())
    }

    /// Deletes the row of `attacker_uuid` only if it still holds `version` (the one published);
    /// returns whether it did. A newer version stays, and its claim is released so it is
    /// published next.
    pub async fn delete_outbox(
        &self,
        attacker_uuid: &str,
        version: i64,
    ) -> Result<bool, StoreError> {
        let deleted = self
            .delete_outbox_batch(&[(attacker_uuid.to_owned(), version)])
            .await?;
        Ok(deleted == 1)
    }

    /// [`Store::delete_outbox`] for a whole published batch: the relay confirms a batch at
    /// once, and a commit per row would cost more than the publishing. Returns how many rows
    /// were deleted.
    ///
    /// Each statement commits on its own, without `BEGIN`, the settings and `COMMIT` around
    /// it: one round trip instead of four for a typical batch. Nothing here needs the
    /// statements together: a release that is lost with a crash is a claim that lapses.
    pub async fn delete_outbox_batch(&self, rows: &[(String, i64)]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let dialect = self.dialect;
        let mut sorted: Vec<&(String, i64)> = rows.iter().collect();
        // One lock order for every writer (G4 / deadlocks): the write batches enqueue in
        // attacker order too.
        sorted.sort();
        let mut deleted_total = 0;
        for chunk in sorted.chunks(sql::ROWS_PER_STATEMENT) {
            let mut p = Params::default();
            let pairs: Vec<String> = chunk
                .iter()
                .map(|(uuid, version)| format!("({}, {})", p.push(uuid.clone()), p.push(*version)))
                .collect();
            let delete = format!(
                "DELETE FROM enrichd_outbox WHERE (attacker_uuid, version) IN {}",
                dialect.row_list(&pairs)
            );
            // The rows deleted: those still at the version published.
            let deleted = match dialect.rows_back() {
                RowsBack::Returning => {
                    let text = format!("{delete} RETURNING attacker_uuid");
                    self.write.query_all_raw(dialect.stmt(text, p.0)).await?
                }
            };
            let gone: HashSet<String> = deleted
                .iter()
                .map(|row| row.try_get::<String>("", "attacker_uuid"))
                .collect::<Result<_, _>>()?;
            deleted_total += gone.len() as u64;
            // A newer version replaced these while they were out: release it now.
            let replaced: Vec<String> = chunk
                .iter()
                .map(|(uuid, _)| uuid.clone())
                .filter(|uuid| !gone.contains(uuid))
                .collect();
            if !replaced.is_empty() {
                let mut p = Params::default();
                let list = p.list(replaced);
                self.write
                    .execute_raw(dialect.stmt(
                        format!(
                            "UPDATE enrichd_outbox SET claimed_until = NULL \
                             WHERE attacker_uuid IN ({list})"
                        ),
                        p.0,
                    ))
                    .await?;
            }
        }
        Ok(deleted_total)
    }

    /// Depth and oldest age of the outbox.
    pub async fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let dialect = self.dialect;
        let now = self.db_now().await?;
        let row = self
            .read
            .query_one_raw(dialect.stmt(
                "SELECT COUNT(*) AS depth, MIN(created_at) AS oldest FROM enrichd_outbox",
                vec![],
            ))
            .await?;
        let Some(row) = row else {
            return Ok(OutboxStats::default());
        };
        let depth: i64 = row.try_get("", "depth")?;
        let oldest = dialect.get_ts(&row, "oldest")?;
        Ok(OutboxStats {
            depth: u64::try_from(depth).unwrap_or(0),
            oldest_age: oldest.map(|o| (now - o).to_std().unwrap_or(Duration::ZERO)),
        })
    }
}

/// A payload a write puts in the outbox for one attacker.
pub(crate) struct OutboxEntry {
    pub(crate) attacker_uuid: String,
    pub(crate) payload: IntelPayload,
    /// The payload's digest, recorded on the attacker's map row so an unchanged payload is
    /// not queued again.
    pub(crate) digest: String,
    /// The index in the write's batch of the address the attacker was written for.
    pub(crate) address: usize,
}

/// An outbox row a write claimed for this process's relay, and the address it was written
/// for (its index in the batch).
pub(crate) struct HandedOff {
    pub(crate) address: usize,
    pub(crate) row: OutboxRow,
}

/// A row enqueued for this process's relay, until the statement says whether the claim on it
/// is ours.
struct Unconfirmed {
    address: usize,
    envelope: String,
}

/// Puts each payload in the outbox for its attacker: a new row at version 1, or a newer
/// payload replacing an unpublished one with the version bumped. A claim in progress is kept,
/// so the relay deleting the old version releases the new one (see `delete_outbox`).
///
/// With `claim_until` (a relay runs in this process), a row no live claim holds is claimed
/// until then as it is written, and comes back with its address's index to be handed to that
/// relay: it is published without waiting for a claim transaction, and if this process dies
/// first the claim lapses and any relay takes the row.
pub(crate) async fn enqueue_rows(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    rows: &[OutboxEntry],
    now: DateTime<Utc>,
    claim_until: Option<DateTime<Utc>>,
) -> Result<Vec<HandedOff>, StoreError> {
    let dialect = store.dialect;
    #[expect(
        clippy::cast_precision_loss,
        reason = "epoch milliseconds fit an f64 exactly until year 287396"
    )]
    let ts = now.timestamp_micros() as f64 / 1e6;
    let mut handed_off = Vec::new();
    for chunk in rows.chunks(sql::ROWS_PER_STATEMENT) {
        let digests = digest_statement(chunk);
        joined
            .add(dialect, txn, digests.text, digests.values)
            .await?;
        let mut p = Params::default();
        let now_p = p.push(dialect.ts(now));
        let claim_p = claim_until.map(|until| p.push(dialect.ts(until)));
        let mut values = Vec::with_capacity(chunk.len());
        let mut texts: HashMap<&str, Unconfirmed> = HashMap::with_capacity(chunk.len());
        for entry in chunk {
            let envelope =
                Envelope::new(TOPIC_INTEL_ENRICHED, "intel.enriched", ts, &entry.payload);
            let text = serde_json::to_string(&envelope)
                .map_err(|e| StoreError::malformed("enrichd_outbox.payload", e.to_string()))?;
            let uuid_p = p.push(entry.attacker_uuid.clone());
            values.push(match &claim_p {
                Some(claim_p) => {
                    let text_p = p.push(text.clone());
                    let unconfirmed = Unconfirmed {
                        address: entry.address,
                        envelope: text,
                    };
                    texts.insert(entry.attacker_uuid.as_str(), unconfirmed);
                    format!("({uuid_p}, 1, {text_p}, {now_p}, {now_p}, {claim_p})")
                }
                None => format!("({uuid_p}, 1, {}, {now_p}, {now_p})", p.push(text)),
            });
        }
        let values = format!("VALUES {}", values.join(", "));
        let insert = outbox_upsert(dialect, &values, claim_p.as_ref().map(|_| now_p.as_str()));
        if let Some(claim_p) = &claim_p {
            // Which rows the claim was written to, and their versions.
            let claimed = match dialect.rows_back() {
                RowsBack::Returning => {
                    let statement = format!(
                        "{insert} RETURNING attacker_uuid, version, claimed_until = {claim_p} \
                         AS ours"
                    );
                    joined.query_all(dialect, txn, statement, p.0).await?
                }
            };
            for row in claimed {
                let ours: bool = row.try_get("", "ours")?;
                if !ours {
                    continue;
                }
                let uuid: String = row.try_get("", "attacker_uuid")?;
                if let Some(Unconfirmed { address, envelope }) = texts.remove(uuid.as_str()) {
                    let row = OutboxRow {
                        attacker_uuid: uuid,
                        version: row.try_get("", "version")?,
                        payload: envelope,
                    };
                    handed_off.push(HandedOff { address, row });
                }
            }
        } else {
            joined.add(dialect, txn, insert, p.0).await?;
        }
    }
    Ok(handed_off)
}

/// The insert of outbox rows `values`: a new row at version 1, or the newer payload in the
/// row its attacker has, with the version bumped. With `claimed_at` (the placeholder of the
/// write's clock) the rows carry a claim for this process's relay, which replaces a stored
/// claim only when that one is free or lapsed before then: a newer version never overtakes
/// an older one that is still out.
fn outbox_upsert(dialect: Dialect, values: &str, claimed_at: Option<&str>) -> String {
    let mut replace = vec![
        Assign::To {
            column: "version".into(),
            value: "enrichd_outbox.version + 1".into(),
        },
        Assign::Inserted("payload"),
        Assign::Inserted("updated_at"),
    ];
    let mut columns = "attacker_uuid, version, payload, created_at, updated_at".to_owned();
    if let Some(now) = claimed_at {
        columns.push_str(", claimed_until");
        replace.push(Assign::To {
            column: "claimed_until".into(),
            value: format!(
                "CASE WHEN enrichd_outbox.claimed_until IS NULL \
                 OR enrichd_outbox.claimed_until < {now} \
                 THEN {} ELSE enrichd_outbox.claimed_until END",
                dialect.inserted("claimed_until")
            ),
        });
    }
    dialect.insert(
        &format!("enrichd_outbox ({columns})"),
        values,
        OnConflict::Update {
            key: "attacker_uuid",
            set: &replace,
            only_if: None,
        },
    )
}

/// Records each outbox row's payload digest on its attacker's map row, so an unchanged
/// payload is not queued again.
fn digest_statement(chunk: &[OutboxEntry]) -> Bound {
    let mut p = Params::default();
    let arms: Vec<String> = chunk
        .iter()
        .map(|entry| {
            format!(
                "WHEN {} THEN {}",
                p.push(entry.attacker_uuid.clone()),
                p.push(entry.digest.clone())
            )
        })
        .collect();
    let uuids = p.list(chunk.iter().map(|entry| entry.attacker_uuid.clone()));
    Bound {
        text: format!(
            "UPDATE enrichd_attacker_map SET payload_digest = CASE attacker_uuid {} END \
             WHERE attacker_uuid IN ({uuids})",
            arms.join(" ")
        ),
        values: p.0,
    }
}
