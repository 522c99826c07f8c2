//! Leases: claiming work on the database clock inside the claiming statement, deferring and
//! giving it back. Every claim locks the addresses' `enrichd_ip_state` rows in key order
//! first (`ip_state`), so claims and writes of overlapping batches never deadlock.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use enrichd_core::{CanonicalIp, ProviderId};
use sea_orm::ConnectionTrait;

use crate::error::retry_busy;
use crate::ip_state::{ensure_ip_rows, lock_ip_rows};
use crate::sql::{self, Joined};
use crate::{Store, StoreError};

mod locked;

pub(crate) use locked::LockedClaim;

/// A lease on one piece of work, claimed on the database clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// When it was claimed (database clock); becomes the result's `queried_at`, the fence.
    pub claimed_at: DateTime<Utc>,
    /// When it lapses (database clock).
    pub until: DateTime<Utc>,
}

/// Whether to claim only due work or everything (`enrichd lookup --refresh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimMode {
    /// Only work that is due (never answered, or its due time has passed).
    Due,
    /// Everything not leased by another live owner.
    Refresh,
}

/// The work this process now holds for one IP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Claims {
    /// The PTR lease, when PTR work was asked for, due and free.
    pub ptr: Option<Lease>,
    /// Provider leases, in ascending provider order.
    pub providers: Vec<(ProviderId, Lease)>,
}

/// What every claim of a process asks for: the same providers, PTR switch and lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimSettings {
    /// Providers to claim, in contract order.
    pub providers: Vec<ProviderId>,
    /// Whether PTR work is claimed.
    pub ptr: bool,
    /// How long a lease lasts.
    pub lease: Duration,
}

impl Lease {
    /// A lease claimed at `now` (database clock) for `lease_for`.
    pub(crate) fn starting(now: DateTime<Utc>, lease_for: Duration) -> Self {
        let until =
            now + chrono::Duration::from_std(lease_for).unwrap_or(chrono::Duration::seconds(60));
        Self {
            claimed_at: sql::micros(now),
            until: sql::micros(until),
        }
    }
}

impl Claims {
    /// Whether nothing was claimed.
    pub fn is_empty(&self) -> bool {
        self.ptr.is_none() && self.providers.is_empty()
    }
}

// === impl Store: leases ===

impl Store {
    /// Claims the due (or, with [`ClaimMode::Refresh`], all) work for `ip` that no other live
    /// owner holds: PTR when `ptr` is set, and each of `providers`. A lease lasts `lease_for`
    /// on the database clock.
    pub async fn claim_work(
        &self,
        ip: CanonicalIp,
        providers: &[ProviderId],
        ptr: bool,
        lease_for: Duration,
        mode: ClaimMode,
    ) -> Result<Claims, StoreError> {
        let mut claims = self
            .claim_batch(&[ip], providers, ptr, lease_for, mode)
            .await?;
        Ok(claims.pop().unwrap_or_default())
    }

    /// [`Store::claim_work`] for many addresses in one transaction: a handful of statements
    /// whatever the batch size, so claiming costs a fraction of a commit per address. The
    /// claims come back in the order of `ips`; an address named twice gets the same claims.
    pub async fn claim_batch(
        &self,
        ips: &[CanonicalIp],
        providers: &[ProviderId],
        ptr: bool,
        lease_for: Duration,
        mode: ClaimMode,
    ) -> Result<Vec<Claims>, StoreError> {
        let mut keys: Vec<String> = ips.iter().map(ToString::to_string).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut wanted: Vec<ProviderId> = providers.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let mut by_ip: HashMap<String, Claims> = HashMap::with_capacity(keys.len());
        // The provider insert writes a row per address and provider.
        let chunk = (sql::ROWS_PER_STATEMENT / wanted.len().max(1)).max(1);
        for keys in keys.chunks(chunk) {
            let wanted = &wanted;
            let claimed =
                retry_busy(move || self.claim_once(keys, wanted, ptr, lease_for, mode)).await?;
            by_ip.extend(claimed);
        }
        Ok(ips
            .iter()
            .map(|ip| by_ip.get(&ip.to_string()).cloned().unwrap_or_default())
            .collect())
    }

    /// One claim transaction over `keys` (sorted, unique).
    async fn claim_once(
        &self,
        keys: &[String],
        wanted: &[ProviderId],
        ptr: bool,
        lease_for: Duration,
        mode: ClaimMode,
    ) -> Result<HashMap<String, Claims>, StoreError> {
        let (txn, now) = self.begin_write_at().await?;
        let lease = Lease::starting(now, lease_for);
        let created = ensure_ip_rows(self, &txn, keys, now, ptr.then_some(lease.until)).await?;
        // A row this transaction created is its own until commit (another writer of that
        // address waits on the insert), so only the rows that existed are locked: a claim of
        // new addresses, as in every first backfill, saves the round trip.
        let existing: Vec<String> = keys
            .iter()
            .filter(|k| !created.contains(*k))
            .cloned()
            .collect();
        if !existing.is_empty() {
            lock_ip_rows(self, &txn, &existing, "ip").await?;
        }
        let claims = LockedClaim {
            store: self,
            txn: &txn,
            keys,
            created: &created,
            wanted,
            ptr,
            lease,
            now,
            mode,
        }
        .run(&mut Joined::default())
        .await?;
        txn.commit().await?;
        Ok(claims)
    }

    /// Shortens this process's lease on (`ip`, `provider`) to end at `until`: the provider had
    /// no slot for it before then. The item is then left alone by every replica's backlog until
    /// `until` (no spinning on it) and taken again right after, instead of when a full lease
    /// would have lapsed. Due time and backoff are untouched.
    pub async fn defer_work(
        &self,
        ip: CanonicalIp,
        provider: ProviderId,
        until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let dialect = self.dialect;
        let txn = self.begin_write().await?;
        txn.execute_raw(dialect.stmt(
            "UPDATE enrichd_provider_state SET lease_until = $4 \
             WHERE ip = $1 AND provider = $2 AND lease_owner = $3",
            vec![
                ip.to_string().into(),
                provider.as_str().into(),
                self.owner.to_string().into(),
                dialect.ts(sql::micros(until)),
            ],
        ))
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// Gives back this process's leases on `ip` for `providers` (and PTR when `ptr`), for
    /// work it will not do after all (a provider parked or breaker-open): another replica or
    /// the backfill may take it at once. Due times and backoff are untouched.
    pub async fn release_work(
        &self,
        ip: CanonicalIp,
        providers: &[ProviderId],
        ptr: bool,
    ) -> Result<(), StoreError> {
        let dialect = self.dialect;
        let ip_text = ip.to_string();
        let txn = self.begin_write().await?;
        if ptr {
            txn.execute_raw(dialect.stmt(
                "UPDATE enrichd_ip_state SET ptr_lease_owner = NULL, ptr_lease_until = NULL \
                 WHERE ip = $1 AND ptr_lease_owner = $2",
                vec![ip_text.clone().into(), self.owner.to_string().into()],
            ))
            .await?;
        }
        let mut sorted = providers.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        for provider in sorted {
            txn.execute_raw(dialect.stmt(
                "UPDATE enrichd_provider_state SET lease_owner = NULL, lease_until = NULL \
                 WHERE ip = $1 AND provider = $2 AND lease_owner = $3",
                vec![
                    ip_text.clone().into(),
                    provider.as_str().into(),
                    self.owner.to_string().into(),
                ],
            ))
            .await?;
        }
        txn.commit().await?;
        Ok(())
    }
}
