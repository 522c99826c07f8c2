//! Cluster-wide rate, quota and park state per provider key ([`ProviderGate`] for [`Store`]).
//!
//! A reservation locks the provider's row in a transaction and decides on the database clock,
//! so any number of replicas together never take more slots than the rate allows. The
//! decision itself is a pure function, unit-tested below. Unmetered providers (no rate, no
//! daily quota) skip the lock: see [`GateCache`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Days, NaiveTime, Utc};
use enrichd_core::ProviderId;
use enrichd_core::ports::{GateEvent, ProviderGate, ProviderLimits, Reservation};
use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult};

use crate::error::retry_busy;
use crate::slots::{self, Block, Slot, Unused};
use crate::{Store, StoreError};

/// A slot further ahead than this is not held for: the caller is told `Busy`.
pub const SLOT_HORIZON: Duration = Duration::from_secs(2);
/// The longest park a provider can impose.
const MAX_PARK: chrono::Duration = chrono::Duration::hours(24);

/// The stored limits row of one provider.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct LimitsRow {
    pub(crate) next_slot_at: Option<DateTime<Utc>>,
    pub(crate) quota_day: Option<String>,
    pub(crate) quota_used: i64,
    pub(crate) quota_remaining: Option<i64>,
    pub(crate) quota_reset_at: Option<DateTime<Utc>>,
    pub(crate) parked_until: Option<DateTime<Utc>>,
    pub(crate) rejected_key_fingerprint: Option<String>,
}

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

impl GateCache {
    fn get(&self, provider: ProviderId) -> Option<(DateTime<Utc>, LimitsRow)> {
        let cache = self.rows.lock().ok()?;
        let entry = cache.get(&provider)?;
        let age = entry.fetched.elapsed();
        (age < UNMETERED_RECHECK).then(|| {
            (
                entry.db_now + chrono::Duration::from_std(age).unwrap_or_default(),
                entry.row.clone(),
            )
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

/// Whether `limits` carries a key other than the rejected one, which lifts the rejection.
fn clears_rejection(row: &LimitsRow, limits: &ProviderLimits) -> bool {
    row.rejected_key_fingerprint.is_some()
        && row.rejected_key_fingerprint.as_deref() != limits.key_fingerprint.as_deref()
}

/// The reservation of an unmetered provider: parks, key rejection and header quota only.
fn decide_unmetered(row: &LimitsRow, limits: &ProviderLimits, now: DateTime<Utc>) -> Reservation {
    if let Some(until) = row.parked_until.filter(|u| *u > now) {
        return Reservation::Parked { until };
    }
    if row.rejected_key_fingerprint.is_some()
        && row.rejected_key_fingerprint.as_deref() == limits.key_fingerprint.as_deref()
    {
        return Reservation::KeyRejected;
    }
    let reset_passed = row.quota_reset_at.is_some_and(|reset| now >= reset);
    match row.quota_remaining {
        Some(left) if left <= 0 && !reset_passed => Reservation::QuotaExhausted {
            reset_at: quota_reset(row, now),
        },
        left => Reservation::Granted {
            wait: Duration::ZERO,
            quota_remaining: left
                .filter(|_| !reset_passed)
                .map(|l| u32::try_from(l).unwrap_or(0)),
        },
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

fn next_utc_midnight(now: DateTime<Utc>) -> DateTime<Utc> {
    now.date_naive()
        .checked_add_days(Days::new(1))
        .map_or(now + chrono::Duration::days(1), |d| {
            d.and_time(NaiveTime::MIN).and_utc()
        })
}

/// Starts a new quota period when the provider's reset time (or, without one, the UTC day)
/// has passed.
fn roll_quota(row: &mut LimitsRow, now: DateTime<Utc>) {
    let today = now.date_naive().to_string();
    let rolled = match row.quota_reset_at {
        Some(reset) => now >= reset,
        None => row.quota_day.as_deref() != Some(today.as_str()),
    };
    if rolled {
        row.quota_used = 0;
        row.quota_remaining = None;
        row.quota_reset_at = None;
        row.quota_day = Some(today);
    }
}

/// Calls left: the lower of what our own daily quota leaves and the newest header (less what
/// was reserved since); `None` when neither applies.
fn quota_left(row: &LimitsRow, limits: &ProviderLimits) -> Option<i64> {
    let ours = (limits.daily_quota > 0).then(|| i64::from(limits.daily_quota) - row.quota_used);
    match (ours, row.quota_remaining) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn quota_reset(row: &LimitsRow, now: DateTime<Utc>) -> DateTime<Utc> {
    row.quota_reset_at.unwrap_or_else(|| next_utc_midnight(now))
}

/// Decides one reservation at `now` and updates `row` accordingly.
pub(crate) fn decide(
    row: &mut LimitsRow,
    limits: &ProviderLimits,
    now: DateTime<Utc>,
) -> Reservation {
    if let Some(until) = row.parked_until.filter(|u| *u > now) {
        return Reservation::Parked { until };
    }
    if let Some(rejected) = row.rejected_key_fingerprint.as_deref() {
        if limits.key_fingerprint.as_deref() == Some(rejected) {
            return Reservation::KeyRejected;
        }
        // A different key is configured: the rejection was about the old one.
        row.rejected_key_fingerprint = None;
    }
    roll_quota(row, now);
    let left = quota_left(row, limits);
    if left.is_some_and(|l| l <= 0) {
        return Reservation::QuotaExhausted {
            reset_at: quota_reset(row, now),
        };
    }
    let mut wait = Duration::ZERO;
    if limits.rate_per_sec.is_finite() && limits.rate_per_sec > 0.0 {
        let slot = row.next_slot_at.map_or(now, |s| s.max(now));
        let ahead = (slot - now).to_std().unwrap_or(Duration::ZERO);
        if ahead > SLOT_HORIZON {
            let horizon = chrono::Duration::from_std(SLOT_HORIZON).unwrap_or_default();
            return Reservation::Busy {
                retry_at: slot - horizon,
            };
        }
        let interval = Duration::from_secs_f64((1.0 / limits.rate_per_sec).min(86_400.0));
        let interval = chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::days(1));
        row.next_slot_at = Some(crate::sql::micros(slot + interval));
        wait = ahead;
    }
    row.quota_used += 1;
    row.quota_remaining = row.quota_remaining.map(|r| r - 1);
    Reservation::Granted {
        wait,
        quota_remaining: left.map(|l| u32::try_from(l - 1).unwrap_or(0)),
    }
}

/// Returns slots reserved and not used to `row`: their quota units (while the quota period
/// they were taken in lasts), and the rate cursor when nobody reserved after them.
fn give_back(row: &mut LimitsRow, unused: &[Unused], now: DateTime<Utc>) {
    roll_quota(row, now);
    for block in unused.iter().filter(|u| u.count > 0) {
        if block.quota_day.is_some() && block.quota_day == row.quota_day {
            row.quota_used = (row.quota_used - i64::from(block.count)).max(0);
            row.quota_remaining = row.quota_remaining.map(|r| r + i64::from(block.count));
        }
        if let Some(first) = block.first_ahead
            && block.cursor_after.is_some()
            && row.next_slot_at == block.cursor_after
        {
            row.next_slot_at = Some(crate::sql::micros(first.max(now)));
        }
    }
}

/// Applies a provider's statement about its limits to `row`.
pub(crate) fn observe(row: &mut LimitsRow, event: &GateEvent, now: DateTime<Utc>) {
    match event {
        GateEvent::QuotaObserved {
            remaining,
            reset_at,
        } => {
            roll_quota(row, now);
            row.quota_remaining = Some(i64::from(*remaining));
            if let Some(reset) = reset_at.filter(|r| *r > now) {
                row.quota_reset_at = Some(crate::sql::micros(reset));
            }
        }
        GateEvent::Park { until } => {
            let until = crate::sql::micros((*until).min(now + MAX_PARK));
            row.parked_until = Some(row.parked_until.filter(|p| *p > until).unwrap_or(until));
        }
        GateEvent::KeyRejected { key_fingerprint } => {
            row.rejected_key_fingerprint = Some(key_fingerprint.clone());
        }
    }
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
    ) -> Result<(DateTime<Utc>, LimitsRow), StoreError> {
        let sql = self.sql;
        txn.execute_raw(sql.stmt(
            "INSERT INTO enrichd_provider_limits (provider, quota_used, updated_at) \
             VALUES ($1, 0, $2) ON CONFLICT (provider) DO NOTHING",
            vec![provider.as_str().into(), sql.ts(now)],
        ))
        .await?;
        let row = txn
            .query_one_raw(sql.stmt(
                format!(
                    "SELECT *, {} AS locked_at FROM enrichd_provider_limits \
                     WHERE provider = $1{}",
                    sql.clock_expr(),
                    sql.for_update()
                ),
                vec![provider.as_str().into()],
            ))
            .await?
            .ok_or_else(|| StoreError::malformed("enrichd_provider_limits", "row vanished"))?;
        let locked_at = sql
            .get_ts(&row, "locked_at")?
            .map_or(now, crate::sql::micros)
            .max(now);
        Ok((locked_at, self.limits_from(&row)?))
    }

    /// The database clock and `provider`'s limits row (the default when it has none), in one
    /// statement.
    async fn limits_at(
        &self,
        provider: ProviderId,
    ) -> Result<(DateTime<Utc>, LimitsRow), StoreError> {
        let sql = self.sql;
        let row = self
            .read
            .query_one_raw(sql.stmt(
                format!(
                    "SELECT {} AS db_now, l.* FROM (SELECT 1 AS one) AS clock \
                     LEFT JOIN enrichd_provider_limits l ON l.provider = $1",
                    sql.now_expr()
                ),
                vec![provider.as_str().into()],
            ))
            .await?
            .ok_or_else(|| StoreError::malformed("enrichd_provider_limits", "no clock row"))?;
        let now = sql
            .get_ts(&row, "db_now")?
            .ok_or_else(|| StoreError::malformed("now", "null"))?;
        Ok((now, self.limits_from(&row)?))
    }

    fn limits_from(&self, row: &QueryResult) -> Result<LimitsRow, StoreError> {
        let sql = self.sql;
        Ok(LimitsRow {
            next_slot_at: sql.get_ts(row, "next_slot_at")?,
            quota_day: row.try_get("", "quota_day")?,
            quota_used: sql.get_i64(row, "quota_used")?.unwrap_or(0),
            quota_remaining: sql.get_i64(row, "quota_remaining")?,
            quota_reset_at: sql.get_ts(row, "quota_reset_at")?,
            parked_until: sql.get_ts(row, "parked_until")?,
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
        let sql = self.sql;
        let clamp = |v: i64| i32::try_from(v).unwrap_or(if v < 0 { i32::MIN } else { i32::MAX });
        txn.execute_raw(sql.stmt(
            "UPDATE enrichd_provider_limits SET next_slot_at = $2, quota_day = $3, \
             quota_used = $4, quota_remaining = $5, quota_reset_at = $6, parked_until = $7, \
             rejected_key_fingerprint = $8, updated_at = $9 WHERE provider = $1",
            vec![
                provider.as_str().into(),
                sql.ts_opt(row.next_slot_at),
                row.quota_day.clone().into(),
                clamp(row.quota_used).into(),
                row.quota_remaining.map(clamp).into(),
                sql.ts_opt(row.quota_reset_at),
                sql.ts_opt(row.parked_until),
                row.rejected_key_fingerprint.clone().into(),
                sql.ts(now),
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
        let (first, block) =
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
    ) -> Result<(Reservation, Option<Block>), StoreError> {
        let (txn, begun) = self.begin_write_at().await?;
        let (now, mut row) = self.lock_limits(&txn, provider, begun).await?;
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
        Ok((first, block))
    }

    async fn reserve_once(
        &self,
        provider: ProviderId,
        limits: &ProviderLimits,
    ) -> Result<Reservation, StoreError> {
        let (txn, begun) = self.begin_write_at().await?;
        let (now, mut row) = self.lock_limits(&txn, provider, begun).await?;
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
                .filter(|(_, row)| !clears_rejection(row, limits))
                .map(|(now, row)| decide_unmetered(&row, limits, now))
        };
        if let Some(decision) = cached() {
            return Ok(decision);
        }
        let turn = self.gate_cache.refresh_turn(provider);
        let _turn = turn.lock().await;
        if let Some(decision) = cached() {
            return Ok(decision);
        }
        let (now, row) = self.limits_at(provider).await?;
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
                let (now, mut row) = self.lock_limits(&txn, provider, begun).await?;
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
        let (now, mut row) = self.lock_limits(&txn, provider, begun).await?;
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
        let (now, mut row) = self.limits_at(provider).await?;
        roll_quota(&mut row, now);
        let left = quota_left(&row, limits);
        Ok(ProviderStatus {
            parked_until: row.parked_until.filter(|p| *p > now),
            key_rejected: row.rejected_key_fingerprint.is_some()
                && row.rejected_key_fingerprint == limits.key_fingerprint,
            quota_remaining: left.map(|l| u32::try_from(l.max(0)).unwrap_or(0)),
            quota_reset_at: left.map(|_| quota_reset(&row, now)),
        })
    }

    /// Providers parked at `now`.
    pub(crate) async fn parked_providers(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<ProviderId>, StoreError> {
        let rows = self
            .read
            .query_all_raw(self.sql.stmt(
                "SELECT provider FROM enrichd_provider_limits WHERE parked_until > $1",
                vec![self.sql.ts(now)],
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

    /// From a read at most [`UNMETERED_RECHECK`] old: every call that waited for its slot
    /// asks, and a read each made the check the busiest statement at a high rate. A park
    /// recorded here is seen at once (recording forgets the cached row).
    async fn parked_until(
        &self,
        provider: ProviderId,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let (now, row) = if let Some(cached) = self.gate_cache.get(provider) {
            cached
        } else {
            let (now, row) = self.limits_at(provider).await?;
            self.gate_cache.put(provider, now, row.clone());
            (now, row)
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn unmetered_reservations_honour_parks_rejections_and_header_quota() {
        let now = now();
        let limits = limits(0.0, 0);
        let granted = Reservation::Granted {
            wait: Duration::ZERO,
            quota_remaining: None,
        };
        assert_eq!(
            decide_unmetered(&LimitsRow::default(), &limits, now),
            granted
        );
        let parked = LimitsRow {
            parked_until: Some(now + chrono::Duration::seconds(5)),
            ..Default::default()
        };
        assert!(matches!(
            decide_unmetered(&parked, &limits, now),
            Reservation::Parked { .. }
        ));
        let lapsed = LimitsRow {
            parked_until: Some(now - chrono::Duration::seconds(5)),
            ..Default::default()
        };
        assert_eq!(decide_unmetered(&lapsed, &limits, now), granted);
        let spent = LimitsRow {
            quota_remaining: Some(0),
            quota_reset_at: Some(now + chrono::Duration::hours(1)),
            ..Default::default()
        };
        assert!(matches!(
            decide_unmetered(&spent, &limits, now),
            Reservation::QuotaExhausted { .. }
        ));
        let reset = LimitsRow {
            quota_reset_at: Some(now - chrono::Duration::seconds(1)),
            ..spent
        };
        assert_eq!(decide_unmetered(&reset, &limits, now), granted);
        let keyed = ProviderLimits {
            key_fingerprint: Some("abc".into()),
            ..limits.clone()
        };
        let rejected = LimitsRow {
            rejected_key_fingerprint: Some("abc".into()),
            ..Default::default()
        };
        assert_eq!(
            decide_unmetered(&rejected, &keyed, now),
            Reservation::KeyRejected
        );
        let other = ProviderLimits {
            key_fingerprint: Some("new".into()),
            ..limits
        };
        assert_eq!(decide_unmetered(&rejected, &other, now), granted);
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
    }

    fn limits(rate: f64, quota: u32) -> ProviderLimits {
        ProviderLimits {
            rate_per_sec: rate,
            daily_quota: quota,
            key_fingerprint: Some("aaaa".into()),
        }
    }

    #[test]
    fn slots_are_spaced_by_the_rate_and_busy_beyond_the_horizon() {
        let mut row = LimitsRow::default();
        let l = limits(2.0, 0);
        let waits: Vec<Reservation> = (0..6).map(|_| decide(&mut row, &l, now())).collect();
        let ms = |r: &Reservation| match r {
            Reservation::Granted { wait, .. } => Some(wait.as_millis()),
            _ => None,
        };
        assert_eq!(
            waits.iter().map(ms).collect::<Vec<_>>(),
            [Some(0), Some(500), Some(1000), Some(1500), Some(2000), None]
        );
        assert_eq!(
            waits[5],
            Reservation::Busy {
                retry_at: now() + chrono::Duration::milliseconds(500)
            }
        );
    }

    #[test]
    fn quota_exhausts_and_resets_at_utc_midnight() {
        let mut row = LimitsRow::default();
        let l = limits(0.0, 2);
        assert!(matches!(
            decide(&mut row, &l, now()),
            Reservation::Granted {
                quota_remaining: Some(1),
                ..
            }
        ));
        assert!(matches!(
            decide(&mut row, &l, now()),
            Reservation::Granted {
                quota_remaining: Some(0),
                ..
            }
        ));
        let midnight = Utc.with_ymd_and_hms(2026, 11, 24, 0, 0, 0).unwrap();
        assert_eq!(
            decide(&mut row, &l, now()),
            Reservation::QuotaExhausted { reset_at: midnight }
        );
        assert!(matches!(
            decide(&mut row, &l, midnight),
            Reservation::Granted { .. }
        ));
    }

    #[test]
    fn the_lower_of_reserved_and_header_quota_applies() {
        let mut row = LimitsRow::default();
        let l = limits(0.0, 1000);
        let reset = now() + chrono::Duration::hours(5);
        observe(
            &mut row,
            &GateEvent::QuotaObserved {
                remaining: 1,
                reset_at: Some(reset),
            },
            now(),
        );
        assert!(matches!(
            decide(&mut row, &l, now()),
            Reservation::Granted {
                quota_remaining: Some(0),
                ..
            }
        ));
        assert_eq!(
            decide(&mut row, &l, now()),
            Reservation::QuotaExhausted { reset_at: reset }
        );
        assert!(matches!(
            decide(&mut row, &l, reset),
            Reservation::Granted { .. }
        ));
    }

    #[test]
    fn parks_hold_until_their_end_and_key_rejection_until_the_key_changes() {
        let mut row = LimitsRow::default();
        let l = limits(0.0, 0);
        let until = now() + chrono::Duration::minutes(10);
        observe(&mut row, &GateEvent::Park { until }, now());
        assert_eq!(decide(&mut row, &l, now()), Reservation::Parked { until });
        assert!(matches!(
            decide(&mut row, &l, until),
            Reservation::Granted { .. }
        ));
        observe(
            &mut row,
            &GateEvent::Park {
                until: now() + chrono::Duration::days(9),
            },
            now(),
        );
        assert_eq!(row.parked_until, Some(now() + chrono::Duration::hours(24)));

        let mut row = LimitsRow::default();
        observe(
            &mut row,
            &GateEvent::KeyRejected {
                key_fingerprint: "aaaa".into(),
            },
            now(),
        );
        assert_eq!(decide(&mut row, &l, now()), Reservation::KeyRejected);
        let new_key = ProviderLimits {
            key_fingerprint: Some("bbbb".into()),
            ..l
        };
        assert!(matches!(
            decide(&mut row, &new_key, now()),
            Reservation::Granted { .. }
        ));
        assert_eq!(row.rejected_key_fingerprint, None);
    }
}
