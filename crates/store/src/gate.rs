//! Cluster-wide rate, quota and park state per provider key ([`ProviderGate`] for [`Store`]).
//!
//! A reservation locks the provider's row in a transaction and decides on the database clock,
//! so any number of replicas together never take more slots than the rate allows. The
//! decisions themselves are pure functions of the row (`rules`, table-tested there).
//! Unmetered providers (no rate, no daily quota) skip the lock: see `GateCache`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use enrichd_core::ProviderId;
use enrichd_core::ports::{GateEvent, ProviderGate, ProviderLimits, Reservation};
use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult};

use crate::error::retry_busy;
use crate::slots::{self, Block, Slot, Unused};
use crate::sql::OnConflict;
use crate::{Store, StoreError};

mod rules;

pub use rules::SLOT_HORIZON;
use rules::{LimitsRow, clears_rejection, decide, decide_unmetered, give_back, observe, status};

/// How long an unmetered provider's limits row is reused before it is read again. A park or
/// key rejection recorded by another replica reaches this one within this time; one recorded
/// here invalidates it at once.
const UNMETERED_RECHECK: Duration = Duration::from_millis(250);

/// Limits rows of unmetered providers (no rate, no daily quota), read at most every
/// [`UNMETERED_RECHECK`]: their reservation only checks parks, key rejection and the quota a
/// provider's headers reported, so it needs no write and no lock, and the cluster-wide limits
/// row stops being the one row every call serialises on.
///
/// One read per provider is in flight at a time. When the row went stale, every call of the
/// provider's full concurrency found it so at once and read it itself: in a backfill those
/// reads and their clock reads were a fifth of all statements.
#[derive(Clone, Default)]
pub(crate) struct GateCache {
    rows: Arc<Mutex<HashMap<ProviderId, CachedLimits>>>,
    refreshing: Arc<Mutex<HashMap<ProviderId, Arc<tokio::sync::Mutex<()>>>>>,
}

#[derive(Clone)]
struct CachedLimits {
    fetched: tokio::time::Instant,
    db_now: DateTime<Utc>,
    row: LimitsRow,
}

/// A provider's limits row and the database clock it was read (or locked) at.
struct LimitsAt {
    now: DateTime<Utc>,
    row: LimitsRow,
}

/// What one reservation transaction took: the answer, and the slots after it to hand out.
struct Reserved {
    first: Reservation,
    block: Option<Block>,
}

impl GateCache {
    /// The cached row of `provider`, with the database clock moved on by the cache entry's
    /// age; `None` once it is [`UNMETERED_RECHECK`] old.
    fn get(&self, provider: ProviderId) -> Option<LimitsAt> {
        let cache = self.rows.lock().ok()?;
        let entry = cache.get(&provider)?;
        let age = entry.fetched.elapsed();
        (age < UNMETERED_RECHECK).then(|| LimitsAt {
            now: entry.db_now + chrono::Duration::from_std(age).unwrap_or_default(),
            row: entry.row.clone(),
        })
    }

    fn put(&self, provider: ProviderId, db_now: DateTime<Utc>, row: LimitsRow) {
        if let Ok(mut cache) = self.rows.lock() {
            cache.insert(
                provider,
                CachedLimits {
                    fetched: tokio::time::Instant::now(),
                    db_now,
                    row,
                },
            );
        }
    }

    fn forget(&self, provider: ProviderId) {
        if let Ok(mut cache) = self.rows.lock() {
            cache.remove(&provider);
        }
    }

    /// The lock a refresh of `provider`'s row holds while it reads.
    fn refresh_turn(&self, provider: ProviderId) -> Arc<tokio::sync::Mutex<()>> {
        self.refreshing.lock().map_or_else(
            |_| Arc::default(),
            |mut turns| Arc::clone(turns.entry(provider).or_default()),
        )
    }
}

/// Rate and quota state of one provider, for health beats and `enrichd check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderStatus {
    /// End of a rate-limit park still in force.
    pub parked_until: Option<DateTime<Utc>>,
    /// Whether the configured key is the one a provider rejected.
    pub key_rejected: bool,
    /// Calls left today, when a quota (ours or the provider's header) applies.
    pub quota_remaining: Option<u32>,
    /// When the quota resets, when a quota applies.
    pub quota_reset_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Locks `provider`'s limits row (creating it) and returns it with the database clock at
    /// the moment the lock was granted. Slots are placed from that moment: from the
    /// transaction's start instead, a reservation that queued behind another replica's for
    /// the row would place its slots in the past of the replica taking them, which then uses
    /// them late, on top of the next block's.
    async fn lock_limits(
        &self,
        txn: &DatabaseTransaction,
        provider: ProviderId,
        now: DateTime<Utc>,
    ) -> Result<LimitsAt, StoreError> {
        let dialect = self.dialect;
        txn.execute_raw(dialect.stmt(
            dialect.insert(
                "enrichd_provider_limits (provider, quota_used, updated_at)",
                "VALUES ($1, 0, $2)",
                OnConflict::Ignore { key: "provider" },
            ),
            vec![provider.as_str().into(), dialect.ts(now)],
        ))
        .await?;
        let row = txn
            .query_one_raw(dialect.stmt(
                format!(
                    "SELECT *, {} AS locked_at FROM enrichd_provider_limits \
                     WHERE provider = $1{}",
                    dialect.clock_expr(),
                    dialect.for_update()
                ),
                vec![provider.as_str().into()],
            ))
            .await?
            .ok_or_else(|| StoreError::malformed("enrichd_provider_limits", "row vanished"))?;
        let locked_at = dialect
            .get_ts(&row, "locked_at")?
            .map_or(now, crate::sql::micros)
            .max(now);
        Ok(LimitsAt {
            now: locked_at,
            row: self.limits_from(&row)?,
        })
    }

    /// The database clock and `provider`'s limits row (the default when it has none), in one
    /// statement.
    async fn limits_at(&self, provider: ProviderId) -> Result<LimitsAt, StoreError> {
        let dialect = self.dialect;
        let row = self
            .read
            .query_one_raw(dialect.stmt(
                format!(
                    "SELECT {} AS db_now, l.* FROM (SELECT 1 AS one) AS clock \
                     LEFT JOIN enrichd_provider_limits l ON l.provider = $1",
                    dialect.now_expr()
                ),
                vec![provider.as_str().into()],
            ))
            .await?
            .ok_or_else(|| StoreError::malformed("enrichd_provider_limits", "no clock row"))?;
        let now = dialect
            .get_ts(&row, "db_now")?
            .ok_or_else(|| StoreError::malformed("now", "null"))?;
        Ok(LimitsAt {
            now,
            row: self.limits_from(&row)?,
        })
    }

    fn limits_from(&self, row: &QueryResult) -> Result<LimitsRow, StoreError> {
        let dialect = self.dialect;
        Ok(LimitsRow {
            next_slot_at: dialect.get_ts(row, "next_slot_at")?,
            quota_day: row.try_get("", "quota_day")?,
            quota_used: dialect.get_i64(row, "quota_used")?.unwrap_or(0),
            quota_remaining: dialect.get_i64(row, "quota_remaining")?,
            quota_reset_at: dialect.get_ts(row, "quota_reset_at")?,
            parked_until: dialect.get_ts(row, "parked_until")?,
            rejected_key_fingerprint: row.try_get("", "rejected_key_fingerprint")?,
        })
    }

    async fn store_limits(
        &self,
        txn: &DatabaseTransaction,
        provider: ProviderId,
        row: &LimitsRow,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let dialect = self.dialect;
        let clamp = |v: i64| i32::try_from(v).unwrap_or(if v < 0 { i32::MIN } else { i32::MAX });
        txn.execute_raw(dialect.stmt(
            "UPDATE enrichd_provider_limits SET next_slot_at = $2, quota_day = $3, \
             quota_used = $4, quota_remaining = $5, quota_reset_at = $6, parked_until = $7, \
             rejected_key_fingerprint = $8, updated_at = $9 WHERE provider = $1",
            vec![
                provider.as_str().into(),
                dialect.ts_opt(row.next_slot_at),
                row.quota_day.clone().into(),
                clamp(row.quota_used).into(),
                row.quota_remaining.map(clamp).into(),
                dialect.ts_opt(row.quota_reset_at),
                dialect.ts_opt(row.parked_until),
                row.rejected_key_fingerprint.clone().into(),
                dialect.ts(now),
            ],
        ))
        .await?;
        Ok(())
    }

    /// A metered reservation: the next slot of this replica's block, or a new block taken
    /// from the shared row ([`crate::slots`]).
    async fn reserve_metered(
        &self,
        provider: ProviderId,
        limits: &ProviderLimits,
    ) -> Result<Reservation, StoreError> {
        if let Some(granted) = self.slot_blocks.take(provider) {
            return Ok(granted);
        }
        let turn = self.slot_blocks.turn(provider);
        let _turn = turn.lock().await;
        if let Some(granted) = self.slot_blocks.take(provider) {
            return Ok(granted);
        }
        let unused = self.slot_blocks.end(provider);
        let want = slots::block_size(limits.rate_per_sec);
        let unused = &unused;
        let Reserved { first, block } =
            retry_busy(move || self.reserve_block_once(provider, limits, want, unused)).await?;
        if let Some(block) = block {
            self.slot_blocks.start(provider, block);
        }
        Ok(first)
    }

    /// One transaction on the limits row: gives back `unused` slots, then reserves up to
    /// `want`; the first is the answer, the rest a block to hand out.
    async fn reserve_block_once(
        &self,
        provider: ProviderId,
        limits: &ProviderLimits,
        want: u32,
        unused: &[Unused],
    ) -> Result<Reserved, StoreError> {
        let (txn, begun) = self.begin_write_at().await?;
        let LimitsAt { now, mut row } = self.lock_limits(&txn, provider, begun).await?;
        let before = row.clone();
        give_back(&mut row, unused, now);
        let first = decide(&mut row, limits, now);
        let mut rest = Vec::new();
        if matches!(first, Reservation::Granted { .. }) {
            for _ in 1..want {
                let Reservation::Granted {
                    wait,
                    quota_remaining,
                } = decide(&mut row, limits, now)
                else {
                    break;
                };
                let at = now + chrono::Duration::from_std(wait).unwrap_or_default();
                rest.push(Slot {
                    at,
                    quota_remaining,
                });
            }
        }
        if row != before {
            self.store_limits(&txn, provider, &row, now).await?;
        }
        txn.commit().await?;
        let block = (!rest.is_empty())
            .then(|| Block::new(rest, now, row.next_slot_at, row.quota_day.clone()));
        Ok(Reserved { first, block })
    }

    async fn reserve_once(
        &self,
        provider: ProviderId,
        limits: &ProviderLimits,
    ) -> Result<Reservation, StoreError> {
        let (txn, begun) = self.begin_write_at().await?;
        let LimitsAt { now, mut row } = self.lock_limits(&txn, provider, begun).await?;
        let before = row.clone();
        let decision = decide(&mut row, limits, now);
        if row != before {
            self.store_limits(&txn, provider, &row, now).await?;
        }
        txn.commit().await?;
        Ok(decision)
    }

    /// See [`GateCache`]: a plain read of the limits row at most every 250 ms, nothing written.
    async fn reserve_unmetered(
        &self,
        provider: ProviderId,
        limits: &ProviderLimits,
    ) -> Result<Reservation, StoreError> {
        let cached = || {
            self.gate_cache
                .get(provider)
                .filter(|cached| !clears_rejection(&cached.row, limits))
                .map(|cached| decide_unmetered(&cached.row, limits, cached.now))
        };
        if let Some(decision) = cached() {
            return Ok(decision);
        }
        let turn = self.gate_cache.refresh_turn(provider);
        let _turn = turn.lock().await;
        if let Some(decision) = cached() {
            return Ok(decision);
        }
        let LimitsAt { now, row } = self.limits_at(provider).await?;
        if clears_rejection(&row, limits) {
            // A new key replaces a rejected one: record that once, under the lock.
            self.gate_cache.forget(provider);
            return self.reserve_once(provider, limits).await;
        }
        self.gate_cache.put(provider, now, row.clone());
        Ok(decide_unmetered(&row, limits, now))
    }

    /// Gives back the rate slots and quota units this process reserved ahead and did not use
    /// (on shutdown, beside [`Store::release_leases`]); returns how many.
    pub async fn release_slots(&self) -> Result<u64, StoreError> {
        let mut released = 0;
        for (provider, unused) in self.slot_blocks.end_all() {
            let unused = &unused;
            retry_busy(move || async move {
                let (txn, begun) = self.begin_write_at().await?;
                let LimitsAt { now, mut row } = self.lock_limits(&txn, provider, begun).await?;
                give_back(&mut row, unused, now);
                self.store_limits(&txn, provider, &row, now).await?;
                txn.commit().await?;
                Ok(())
            })
            .await?;
            released += unused.iter().map(|u| u64::from(u.count)).sum::<u64>();
        }
        Ok(released)
    }

    async fn record_once(&self, provider: ProviderId, event: &GateEvent) -> Result<(), StoreError> {
        let (txn, begun) = self.begin_write_at().await?;
        let LimitsAt { now, mut row } = self.lock_limits(&txn, provider, begun).await?;
        observe(&mut row, event, now);
        self.store_limits(&txn, provider, &row, now).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Rate and quota state of `provider` under `limits` (nothing is reserved).
    pub async fn provider_status(
        &self,
        provider: ProviderId,
        limits: &ProviderLimits,
    ) -> Result<ProviderStatus, StoreError> {
        let LimitsAt { now, row } = self.limits_at(provider).await?;
        Ok(status(row, limits, now))
    }

    /// Providers parked at `now`.
    pub(crate) async fn parked_providers(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<ProviderId>, StoreError> {
        let rows = self
            .read
            .query_all_raw(self.dialect.stmt(
                "SELECT provider FROM enrichd_provider_limits WHERE parked_until > $1",
                vec![self.dialect.ts(now)],
            ))
            .await?;
        let mut parked = Vec::new();
        for row in rows {
            let id: String = row.try_get("", "provider")?;
            parked.extend(ProviderId::from_id(&id));
        }
        Ok(parked)
    }
}

impl ProviderGate for Store {
    type Error = StoreError;

    async fn reserve(
        &self,
        provider: ProviderId,
        limits: &ProviderLimits,
    ) -> Result<Reservation, StoreError> {
        let rate_limited = limits.rate_per_sec.is_finite() && limits.rate_per_sec > 0.0;
        if !rate_limited && limits.daily_quota == 0 {
            return self.reserve_unmetered(provider, limits).await;
        }
        self.reserve_metered(provider, limits).await
    }

    /// From a read at most `UNMETERED_RECHECK` (250 ms) old: every call that waited for its slot
    /// asks, and a read each made the check the busiest statement at a high rate. A park
    /// recorded here is seen at once (recording forgets the cached row).
    async fn parked_until(
        &self,
        provider: ProviderId,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let LimitsAt { now, row } = if let Some(cached) = self.gate_cache.get(provider) {
            cached
        } else {
            let read = self.limits_at(provider).await?;
            self.gate_cache.put(provider, read.now, read.row.clone());
            read
        };
        Ok(row.parked_until.filter(|until| *until > now))
    }

    async fn record(&self, provider: ProviderId, event: GateEvent) -> Result<(), StoreError> {
        self.gate_cache.forget(provider);
        if matches!(
            event,
            GateEvent::Park { .. } | GateEvent::KeyRejected { .. }
        ) {
            self.slot_blocks.drop_block(provider);
        }
        let event = &event;
        retry_busy(move || self.record_once(provider, event)).await
    }
}
