//! Per-IP work: leases (claimed on the database clock inside the claiming statement) and the
//! one-transaction write of a pass's results, with the merged `attacker_intel` rows and the
//! outbox.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use enrichd_core::payload::{Envelope, IntelPayload, TOPIC_INTEL_ENRICHED};
use enrichd_core::ports::PtrReport;
use enrichd_core::text::column_text;
use enrichd_core::{
    CanonicalIp, ProviderFields, ProviderId, ProviderOutcome, ProviderReport, PtrOutcome, Verdict,
};
use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult, Value};

use crate::error::retry_busy;
use crate::sql::{self, Joined, Params, Sql};
use crate::state::{self, ApplyContext, IntelColumns, ProviderState, PtrState, StoredScope};
use crate::{OutboxRow, Store, StoreError};

/// Column limit of `enrichd_provider_state.last_error`.
const LAST_ERROR_CHARS: usize = 512;
/// Column limit of `attackers.ptr_record` / `enrichd_ip_state.ptr_name`.
const PTR_CHARS: usize = 256;

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

/// What [`Store::apply`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApplyOutcome {
    /// Provider results written.
    pub applied: Vec<ProviderId>,
    /// Provider results refused by the fence (a newer result was already stored).
    pub stale: Vec<ProviderId>,
    /// Whether the PTR result was written (`None`: there was none).
    pub ptr_applied: Option<bool>,
    /// `attacker_intel` rows upserted.
    pub intel_rows: usize,
    /// Outbox rows inserted or bumped.
    pub events: usize,
    /// Those of [`ApplyOutcome::events`] this write claimed for the process's relay
    /// ([`ApplyContext::relay_claim`]): publish them, then delete them. The others were
    /// claimed by a relay already publishing an older version, which releases them.
    pub handed_off: Vec<OutboxRow>,
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
        let claims = claim_locked(
            self,
            &txn,
            &mut Joined::default(),
            keys,
            &created,
            wanted,
            ptr,
            lease,
            now,
            mode,
        )
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
        let sql = self.sql;
        let txn = self.begin_write().await?;
        txn.execute_raw(sql.stmt(
            "UPDATE enrichd_provider_state SET lease_until = $4 \
             WHERE ip = $1 AND provider = $2 AND lease_owner = $3",
            vec![
                ip.to_string().into(),
                provider.as_str().into(),
                self.owner.to_string().into(),
                sql.ts(sql::micros(until)),
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
        let sql = self.sql;
        let ip_text = ip.to_string();
        let txn = self.begin_write().await?;
        if ptr {
            txn.execute_raw(sql.stmt(
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
            txn.execute_raw(sql.stmt(
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
    // === impl Store: the per-IP write ===

    /// Writes one pass's results for `ip` in one transaction (see the crate docs): fenced
    /// provider and PTR state, every `attacker_intel` row of the IP's attackers recomputed from
    /// the merged stored state, `attackers.ptr_record`, and (with a bus) the outbox.
    ///
    /// Serialization failures and deadlocks are retried; a write the database still refuses
    /// is recorded as an `error` (with backoff) for the given providers, and the refusal is
    /// returned.
    pub async fn apply(
        &self,
        ip: CanonicalIp,
        scope: StoredScope,
        ptr: Option<(Lease, PtrReport)>,
        providers: Vec<(Lease, ProviderReport)>,
        ctx: &ApplyContext,
    ) -> Result<ApplyOutcome, StoreError> {
        let item = ApplyItem {
            ip,
            scope,
            write_rows: true,
            ptr,
            providers,
        };
        self.apply_batch(vec![item], ctx)
            .await
            .pop()
            .unwrap_or_else(|| Err(StoreError::malformed("apply", "no result")))
    }

    /// [`Store::apply`] for many addresses in one transaction, written in ascending key order
    /// (the order every writer locks `enrichd_ip_state` rows in): a dozen statements whatever
    /// the batch size. Results come back in the order of `items`.
    ///
    /// One refused address must not cost the others their paid-for answers, so a batch the
    /// database refuses is written again one address at a time, and only the address at
    /// fault is refused. An address named twice is written in a second transaction after the
    /// first, exactly as two calls would.
    pub async fn apply_batch(
        &self,
        items: Vec<ApplyItem>,
        ctx: &ApplyContext,
    ) -> Vec<Result<ApplyOutcome, StoreError>> {
        let items: Vec<ApplyItem> = items.into_iter().map(ApplyItem::normalised).collect();
        let mut results: Vec<Option<Result<ApplyOutcome, StoreError>>> =
            items.iter().map(|_| None).collect();
        let ips: Vec<CanonicalIp> = items.iter().map(|i| i.ip).collect();
        for round in distinct_rounds(&ips) {
            if let [only] = round[..] {
                results[only] = Some(self.apply_alone(&items[only], ctx).await);
                continue;
            }
            let refs: Vec<&ApplyItem> = round.iter().map(|&i| &items[i]).collect();
            match self.apply_round(&refs, ctx).await {
                Ok(outcomes) => {
                    for (&i, outcome) in round.iter().zip(outcomes) {
                        results[i] = Some(Ok(outcome));
                    }
                }
                Err(e) if e.is_unavailable() => {
                    for &i in &round {
                        results[i] = Some(Err(e.shared()));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %enrichd_core::error::chain(&e), addresses = round.len(), "Batch refused; writing its addresses one by one.");
                    for &i in &round {
                        results[i] = Some(self.apply_alone(&items[i], ctx).await);
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::malformed("apply", "no result"))))
            .collect()
    }

    /// One address on its own; a write the database refuses is recorded as an `error` for
    /// its providers (so the refusal backs off instead of repeating at once).
    async fn apply_alone(
        &self,
        item: &ApplyItem,
        ctx: &ApplyContext,
    ) -> Result<ApplyOutcome, StoreError> {
        let err = match self.apply_round(&[item], ctx).await {
            Ok(mut outcomes) => {
                return outcomes
                    .pop()
                    .ok_or_else(|| StoreError::malformed("apply", "no result"));
            }
            Err(e) => e,
        };
        if matches!(err, StoreError::Rejected(_) | StoreError::Malformed { .. }) {
            let reason = column_text(
                &format!("write rejected: {}", enrichd_core::error::chain(&err)),
                LAST_ERROR_CHARS,
            );
            let as_errors = ApplyItem {
                ip: item.ip,
                scope: item.scope,
                write_rows: false,
                ptr: None,
                providers: item
                    .providers
                    .iter()
                    .map(|(lease, r)| (*lease, ProviderReport::error(r.provider, reason.clone())))
                    .collect(),
            };
            if let Err(e) = self.apply_round(&[&as_errors], ctx).await {
                tracing::warn!(ip = %item.ip, error = %enrichd_core::error::chain(&e), "Recording a rejected write as an error failed.");
            }
        }
        Err(err)
    }

    /// One write transaction over `items` (unique addresses in key order), retried on
    /// serialization failures and deadlocks.
    async fn apply_round(
        &self,
        items: &[&ApplyItem],
        ctx: &ApplyContext,
    ) -> Result<Vec<ApplyOutcome>, StoreError> {
        retry_busy(move || self.apply_once(items, ctx)).await
    }

    /// Locks the `enrichd_ip_state` rows of `keys` (creating missing ones) and returns the
    /// transaction's clock and each row's PTR state and scope.
    async fn lock_for_write(
        &self,
        txn: &DatabaseTransaction,
        clock: Option<DateTime<Utc>>,
        keys: &[String],
    ) -> Result<(DateTime<Utc>, HashMap<String, (PtrState, Option<String>)>), StoreError> {
        // The IPs' rows first, in key order: every writer for these IPs queues here.
        let columns = self
            .clock_item(clock)
            .map_or_else(|| "*".to_owned(), |item| format!("*, {item}"));
        let mut locked = lock_ip_rows(self, txn, keys, &columns).await?;
        let now = self.keyed_clock(txn, clock, locked.first()).await?;
        if locked.len() < keys.len() {
            // An address with no row yet (written without intake: `lookup`, a skipped scope):
            // created and locked after the others. That is out of key order, and a deadlock
            // it may cause is retried like any other.
            let found: HashSet<String> = locked
                .iter()
                .map(|row| row.try_get::<String>("", "ip"))
                .collect::<Result<_, _>>()?;
            let missing: Vec<String> = keys
                .iter()
                .filter(|k| !found.contains(*k))
                .cloned()
                .collect();
            ensure_ip_rows(self, txn, &missing, now, None).await?;
            locked.extend(lock_ip_rows(self, txn, &missing, "*").await?);
        }
        let mut stored: HashMap<String, (PtrState, Option<String>)> = HashMap::new();
        for row in locked {
            let ip: String = row.try_get("", "ip")?;
            let scope: Option<String> = row.try_get("", "scope")?;
            stored.insert(ip, (read_ptr(self, &row)?, scope));
        }
        Ok((now, stored))
    }

    async fn apply_once(
        &self,
        items: &[&ApplyItem],
        ctx: &ApplyContext,
    ) -> Result<Vec<ApplyOutcome>, StoreError> {
        let write_rows = items.iter().any(|i| i.write_rows);
        let keys: Vec<String> = items.iter().map(|i| i.ip.to_string()).collect();
        let (txn, clock) = self.begin_keyed_write().await?;
        let mut outcomes = vec![ApplyOutcome::default(); items.len()];

        let (now, stored) = self.lock_for_write(&txn, clock, &keys).await?;
        let (mut states, attackers) = read_for_write(self, &txn, &keys, now, write_rows).await?;

        let mut ip_writes: Vec<IpWrite> = Vec::new();
        let mut provider_writes: Vec<(usize, ProviderState, Lease)> = Vec::new();
        let mut ptrs: Vec<(PtrState, PtrState)> = Vec::with_capacity(items.len());
        for (index, (item, key)) in items.iter().zip(&keys).enumerate() {
            let (old_ptr, stored_scope) = stored
                .get(key)
                .cloned()
                .ok_or_else(|| StoreError::malformed("enrichd_ip_state", "row vanished"))?;
            let mut new_ptr = old_ptr.clone();
            let mut ptr_lease = None;
            if let Some((lease, report)) = &item.ptr {
                let fresh = old_ptr.queried_at.is_none_or(|q| q < lease.claimed_at);
                outcomes[index].ptr_applied = Some(fresh);
                if fresh {
                    new_ptr = next_ptr_state(&old_ptr, lease, report, now);
                    ptr_lease = Some(*lease);
                }
            }
            if ptr_lease.is_some() || stored_scope.as_deref() != Some(item.scope.as_str()) {
                ip_writes.push(IpWrite {
                    key: key.clone(),
                    scope: item.scope,
                    ptr: ptr_lease.map(|_| new_ptr.clone()),
                });
            }
            let known = states.get(key).map_or(&[][..], Vec::as_slice);
            for (lease, report) in &item.providers {
                let old = known.iter().find(|s| s.provider == report.provider);
                if old
                    .and_then(|s| s.queried_at)
                    .is_some_and(|q| q >= lease.claimed_at)
                {
                    outcomes[index].stale.push(report.provider);
                    continue;
                }
                let next = next_provider_state(old, lease, report, ctx.ttl, now);
                provider_writes.push((index, next, *lease));
            }
            ptrs.push((old_ptr, new_ptr));
        }

        // No statement reads these writes before commit, and none of the attacker rows'
        // writes touches their tables: on PostgreSQL they all go as one statement, the last
        // of the write before `COMMIT`.
        let mut joined = Joined::default();
        write_ip_states(self, &txn, &mut joined, &ip_writes, now).await?;
        write_provider_states(self, &txn, &mut joined, &keys, &provider_writes, now).await?;
        for (index, next, _) in provider_writes {
            outcomes[index].applied.push(next.provider);
            let list = states.entry(keys[index].clone()).or_default();
            list.retain(|s| s.provider != next.provider);
            list.push(next);
        }
        for outcome in &mut outcomes {
            outcome.applied.sort_unstable();
            outcome.stale.sort_unstable();
        }

        if write_rows {
            let settled = Settled {
                items,
                keys: &keys,
                ptrs: &ptrs,
                states: &states,
                attackers: &attackers,
            };
            write_attacker_rows(self, &txn, &mut joined, settled, ctx, now, &mut outcomes).await?;
        }
        joined.finish(self.sql, &txn).await?;
        txn.commit().await?;
        Ok(outcomes)
    }
}

/// Indices into `ips` in rounds of distinct addresses, each round in ascending key order (the
/// order every writer locks in). An address named again goes into the next round, so a batch
/// writes it exactly as a second call after the first would.
pub(crate) fn distinct_rounds(ips: &[CanonicalIp]) -> Vec<Vec<usize>> {
    let mut rounds = Vec::new();
    let mut pending: Vec<usize> = (0..ips.len()).collect();
    while !pending.is_empty() {
        let mut seen = HashSet::new();
        let (mut round, later): (Vec<usize>, Vec<usize>) =
            pending.into_iter().partition(|&i| seen.insert(ips[i]));
        pending = later;
        round.sort_by_cached_key(|&i| ips[i].to_string());
        rounds.push(round);
    }
    rounds
}

/// A claim is always newer than the result it may replace, even within the clock's
/// resolution, so the fence never refuses the legitimate holder.
fn newer_than(lease: Lease, last: Option<DateTime<Utc>>) -> Lease {
    match last.filter(|l| *l >= lease.claimed_at) {
        Some(last) => Lease {
            claimed_at: last + chrono::Duration::microseconds(1),
            ..lease
        },
        None => lease,
    }
}

/// One address's results for [`Store::apply_batch`].
#[derive(Debug, Clone)]
pub struct ApplyItem {
    /// The address.
    pub ip: CanonicalIp,
    /// Its scope under the current policy.
    pub scope: StoredScope,
    /// Whether the address's attacker rows (`attacker_intel`, `ptr_record`, the outbox) are
    /// recomputed from the merged state in this write. `false` for a provider answer written
    /// as it arrives, ahead of its pass's other answers: only its state is made durable.
    pub write_rows: bool,
    /// The PTR answer and the lease it was asked under.
    pub ptr: Option<(Lease, PtrReport)>,
    /// Provider answers and the leases they were asked under.
    pub providers: Vec<(Lease, ProviderReport)>,
}

impl ApplyItem {
    /// Deduplicated by provider (the last report wins) and in ascending provider order.
    fn normalised(self) -> Self {
        let mut by_provider: BTreeMap<ProviderId, (Lease, ProviderReport)> = BTreeMap::new();
        for (lease, report) in self.providers {
            by_provider.insert(report.provider, (lease, report));
        }
        Self {
            providers: by_provider.into_values().collect(),
            ..self
        }
    }
}

/// An `enrichd_ip_state` row to change: its scope, and the PTR state when a fresh PTR answer
/// is written (which also ends our PTR lease).
struct IpWrite {
    key: String,
    scope: StoredScope,
    ptr: Option<PtrState>,
}

/// Rows a batch writes once every address's state is known.
#[derive(Default)]
struct RowWrites<'a> {
    /// `attacker_intel` rows: attacker uuid and the index of its address's columns.
    intel: Vec<(String, usize)>,
    /// Merged columns, one per address in batch order.
    columns: Vec<IntelColumns<'a>>,
    /// `attackers.ptr_record` values to set: attacker uuid and name.
    ptr_names: Vec<(String, String)>,
    /// Addresses whose stored name a negative answer cleared, with that name.
    ptr_cleared: Vec<(String, String)>,
    /// Outbox rows: attacker uuid, payload, its digest and the index of its address.
    outbox: Vec<(String, IntelPayload, String, usize)>,
}

/// A batch's addresses with the state the write settled on, in key order.
struct Settled<'a> {
    items: &'a [&'a ApplyItem],
    keys: &'a [String],
    /// Old and new PTR state of each address.
    ptrs: &'a [(PtrState, PtrState)],
    /// Provider states of each address after the write.
    states: &'a HashMap<String, Vec<ProviderState>>,
    /// Every attacker of each address, as read under the addresses' locks.
    attackers: &'a HashMap<String, Vec<MappedAttacker>>,
}

/// The rows every attacker of the batch's addresses sees: `attacker_intel`, `ptr_record` and
/// (with a bus) the outbox, recomputed from the merged stored state.
async fn write_attacker_rows(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    settled: Settled<'_>,
    ctx: &ApplyContext,
    now: DateTime<Utc>,
    outcomes: &mut [ApplyOutcome],
) -> Result<(), StoreError> {
    let Settled {
        items,
        keys,
        ptrs,
        states,
        attackers,
    } = settled;
    let mut rows = RowWrites::default();
    for (index, (item, key)) in items.iter().zip(keys).enumerate() {
        if !item.write_rows {
            // Keeps `columns` one per address: `intel` points into it by index.
            rows.columns.push(IntelColumns::empty(key, now, now));
            continue;
        }
        let (old_ptr, new_ptr) = &ptrs[index];
        let known = states.get(key).map_or(&[][..], Vec::as_slice);
        let merged = state::merge(key, item.scope, known, new_ptr, ctx, now);
        let of_ip = attackers.get(key).map_or(&[][..], Vec::as_slice);
        match (old_ptr.name.as_deref(), new_ptr.name.as_deref()) {
            (_, Some(name)) => rows
                .ptr_names
                .extend(of_ip.iter().map(|a| (a.uuid.clone(), name.to_owned()))),
            (Some(old), None) => rows.ptr_cleared.push((key.clone(), old.to_owned())),
            (None, None) => {}
        }
        if ctx.outbox_enabled && item.scope.is_global() {
            for attacker in of_ip {
                let mut payload = merged.payload.clone();
                payload.attacker_uuid = Some(attacker.uuid.clone());
                let digest = state::payload_digest(&payload);
                if attacker.digest.as_deref() == Some(digest.as_str()) {
                    continue;
                }
                rows.outbox
                    .push((attacker.uuid.clone(), payload, digest, index));
                outcomes[index].events += 1;
            }
        }
        outcomes[index].intel_rows = of_ip.len();
        rows.intel
            .extend(of_ip.iter().map(|a| (a.uuid.clone(), index)));
        rows.columns.push(merged.columns);
    }
    for (key, old) in &rows.ptr_cleared {
        clear_ptr_record(store, txn, key, old).await?;
    }
    // The rest write distinct rows (`attacker_intel`, `attackers`, the map's digests, the
    // outbox) and nothing reads them before commit: they join the caller's `joined`.
    upsert_intel_rows(store, txn, joined, &rows.intel, &rows.columns).await?;
    set_ptr_records(store, txn, joined, &rows.ptr_names).await?;
    // Attacker order, the order the relay deletes in (no lock cycle between the two).
    rows.outbox.sort_by(|a, b| a.0.cmp(&b.0));
    let claim_until = ctx.relay_claim.map(|claim| {
        now + chrono::Duration::from_std(claim).unwrap_or(chrono::Duration::seconds(30))
    });
    let handed_off = enqueue_rows(store, txn, joined, &rows.outbox, now, claim_until).await?;
    for (index, row) in handed_off {
        outcomes[index].handed_off.push(row);
    }
    Ok(())
}

/// Creates the missing `enrichd_ip_state` rows of `keys` (sorted), a statement per few hundred
/// rows, and returns the addresses it created. With `ptr_lease` (the end of this process's
/// lease) they are created holding the PTR lease, so a claim of a new address writes its row
/// once.
pub(crate) async fn ensure_ip_rows(
    store: &Store,
    txn: &DatabaseTransaction,
    keys: &[String],
    now: DateTime<Utc>,
    ptr_lease: Option<DateTime<Utc>>,
) -> Result<HashSet<String>, StoreError> {
    let mut created = HashSet::new();
    for keys in keys.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let now_p = p.push(store.sql.ts(now));
        let (columns, lease) = match ptr_lease {
            Some(until) => (
                ", ptr_lease_owner, ptr_lease_until",
                format!(
                    ", {}, {}",
                    p.push(store.owner.to_string()),
                    p.push(store.sql.ts(until))
                ),
            ),
            None => ("", String::new()),
        };
        let rows: Vec<String> = keys
            .iter()
            .map(|k| format!("({}, 0, {now_p}{lease})", p.push(k.clone())))
            .collect();
        let inserted = txn
            .query_all_raw(store.sql.stmt(
                format!(
                    "INSERT INTO enrichd_ip_state (ip, ptr_attempts, updated_at{columns}) \
                     VALUES {} ON CONFLICT (ip) DO NOTHING RETURNING ip",
                    rows.join(", ")
                ),
                p.0,
            ))
            .await?;
        for row in &inserted {
            created.insert(row.try_get::<String>("", "ip")?);
        }
    }
    Ok(created)
}

/// Locks the `enrichd_ip_state` rows of `keys` in key order (PostgreSQL; SQLite's write
/// transaction already excludes every other writer) and returns their `columns`.
async fn lock_ip_rows(
    store: &Store,
    txn: &DatabaseTransaction,
    keys: &[String],
    columns: &str,
) -> Result<Vec<QueryResult>, StoreError> {
    let sql = store.sql;
    let mut rows = Vec::with_capacity(keys.len());
    for keys in keys.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let list = p.list(keys.iter().cloned());
        rows.extend(
            txn.query_all_raw(sql.stmt(
                format!(
                    "SELECT {columns} FROM enrichd_ip_state WHERE ip IN ({list}) ORDER BY {}{}",
                    sql.ip_order(),
                    sql.for_update()
                ),
                p.0,
            ))
            .await?,
        );
    }
    Ok(rows)
}

/// The `SET` assignments of an upsert that end the lease `<prefix>_until`/`<prefix>_owner` of
/// `table` when the owner placeholder `owner` (this process) holds it, and leave another
/// owner's lease alone. Both read the row's old values, so their order does not matter.
fn end_our_lease(table: &str, prefix: &str, owner: &str) -> String {
    let ours = format!("{table}.{prefix}_owner = {owner}");
    format!(
        "{prefix}_until = CASE WHEN {ours} THEN NULL ELSE {table}.{prefix}_until END, \
         {prefix}_owner = CASE WHEN {ours} THEN NULL ELSE {table}.{prefix}_owner END"
    )
}

/// The placeholders of a claim (this process, the lease's end, the database clock) and the
/// rule every claim shares: a lease may be taken when it is free, has lapsed, or is ours.
struct LeaseTerms {
    owner: String,
    until: String,
    now: String,
}

impl LeaseTerms {
    fn push(p: &mut Params, store: &Store, lease: Lease, now: DateTime<Utc>) -> Self {
        Self {
            owner: p.push(store.owner.to_string()),
            until: p.push(store.sql.ts(lease.until)),
            now: p.push(store.sql.ts(now)),
        }
    }

    /// The `SET` assignments taking the lease `<prefix>_owner`/`<prefix>_until`.
    fn take(&self, prefix: &str) -> String {
        format!(
            "{prefix}_owner = {}, {prefix}_until = {}",
            self.owner, self.until
        )
    }

    /// The condition under which that lease may be taken.
    fn takeable(&self, prefix: &str) -> String {
        format!(
            "({prefix}_until IS NULL OR {prefix}_until < {now} OR {prefix}_owner = {owner})",
            now = self.now,
            owner = self.owner
        )
    }

    /// ` AND <due>` in [`ClaimMode::Due`] (`due` gets the clock's placeholder); nothing when
    /// refreshing.
    fn only_due(&self, mode: ClaimMode, due: impl FnOnce(&str) -> String) -> String {
        match mode {
            ClaimMode::Due => format!(" AND ({})", due(&self.now)),
            ClaimMode::Refresh => String::new(),
        }
    }
}

/// Writes the scope and fresh PTR state of each address in `writes`: two statements at most.
async fn write_ip_states(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    writes: &[IpWrite],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let sql = store.sql;
    let with_ptr: Vec<(&IpWrite, &PtrState)> = writes
        .iter()
        .filter_map(|w| w.ptr.as_ref().map(|ptr| (w, ptr)))
        .collect();
    for chunk in with_ptr.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let owner = p.push(store.owner.to_string());
        let now_p = p.push(sql.ts(now));
        let rows: Vec<String> = chunk
            .iter()
            .map(|(w, ptr)| {
                format!(
                    "({}, {}, {}, {}, {}, {}, {}, {}, {}, {now_p})",
                    p.push(w.key.clone()),
                    p.push(w.scope.as_str()),
                    p.push(ptr.name.clone()),
                    p.push(ptr.outcome.map(|o| o.as_str().to_owned())),
                    p.push(sql.ts_opt(ptr.resolved_at)),
                    p.push(sql.ts_opt(ptr.expires_at)),
                    p.push(i64::from(ptr.attempts)),
                    p.push(sql.ts_opt(ptr.queried_at)),
                    p.push(ptr.forward_confirmed),
                )
            })
            .collect();
        let end_lease = end_our_lease("enrichd_ip_state", "ptr_lease", &owner);
        let statement = format!(
            "INSERT INTO enrichd_ip_state (ip, scope, ptr_name, ptr_outcome, \
             ptr_resolved_at, ptr_expires_at, ptr_attempts, ptr_queried_at, \
             ptr_forward_confirmed, updated_at) \
             VALUES {} ON CONFLICT (ip) DO UPDATE SET scope = excluded.scope, \
             ptr_name = excluded.ptr_name, ptr_outcome = excluded.ptr_outcome, \
             ptr_forward_confirmed = excluded.ptr_forward_confirmed, \
             ptr_resolved_at = excluded.ptr_resolved_at, \
             ptr_expires_at = excluded.ptr_expires_at, ptr_attempts = excluded.ptr_attempts, \
             ptr_queried_at = excluded.ptr_queried_at, \
             {end_lease}, \
             updated_at = excluded.updated_at",
            rows.join(", ")
        );
        joined.add(sql, txn, statement, p.0).await?;
    }
    let scope_only: Vec<&IpWrite> = writes.iter().filter(|w| w.ptr.is_none()).collect();
    for chunk in scope_only.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let now_p = p.push(sql.ts(now));
        let rows: Vec<String> = chunk
            .iter()
            .map(|w| {
                format!(
                    "({}, {}, 0, {now_p})",
                    p.push(w.key.clone()),
                    p.push(w.scope.as_str())
                )
            })
            .collect();
        let statement = format!(
            "INSERT INTO enrichd_ip_state (ip, scope, ptr_attempts, updated_at) VALUES {} \
             ON CONFLICT (ip) DO UPDATE SET scope = excluded.scope, \
             updated_at = excluded.updated_at",
            rows.join(", ")
        );
        joined.add(sql, txn, statement, p.0).await?;
    }
    Ok(())
}

/// Writes each `(address index, next state, lease)` and ends our lease on each row: added to
/// `joined`.
///
/// Each write is fenced on `queried_at` in SQL too, but the caller has already left out every
/// result whose lease is not newer than the stored `queried_at`, on rows it read under the
/// address's lock, and only a write (holding that lock) sets `queried_at`. So the fence
/// passes for every row, and what was written is known without `RETURNING`: that is what
/// lets these rows go in the same statement as the attacker rows'. Were it ever to refuse
/// one, the next pass recomputes the attacker rows from the stored state.
async fn write_provider_states(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    keys: &[String],
    writes: &[(usize, ProviderState, Lease)],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let sql = store.sql;
    for chunk in writes.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let owner = p.push(store.owner.to_string());
        let now_p = p.push(sql.ts(now));
        let rows: Vec<String> = chunk
            .iter()
            .map(|(index, next, lease)| {
                let fields = next
                    .fields
                    .as_ref()
                    .and_then(|f| serde_json::to_value(f).ok());
                let expires = p.push(sql.ts_opt(next.next_attempt_at));
                format!(
                    "({}, {}, {}, {}, {}, {}, {}, {}, {expires}, {expires}, {}, {}, {now_p})",
                    p.push(keys[*index].clone()),
                    p.push(next.provider.as_str()),
                    p.push(next.outcome.map(|o| o.as_str().to_owned())),
                    p.push(next.verdict.map(|v| v.as_str().to_owned())),
                    p.push_json(sql, fields.as_ref()),
                    p.push_json(sql, next.raw.as_deref()),
                    p.push(sql.ts_opt(next.answered_at)),
                    p.push(sql.ts(lease.claimed_at)),
                    p.push(i64::from(next.attempts)),
                    p.push(next.last_error.clone()),
                )
            })
            .collect();
        let end_lease = end_our_lease("enrichd_provider_state", "lease", &owner);
        let statement = format!(
            "INSERT INTO enrichd_provider_state (ip, provider, outcome, verdict, fields, \
             raw, answered_at, queried_at, expires_at, next_attempt_at, attempts, \
             last_error, updated_at) VALUES {} ON CONFLICT (ip, provider) DO UPDATE SET \
             outcome = excluded.outcome, verdict = excluded.verdict, \
             fields = excluded.fields, raw = excluded.raw, \
             answered_at = excluded.answered_at, queried_at = excluded.queried_at, \
             expires_at = excluded.expires_at, \
             next_attempt_at = excluded.next_attempt_at, attempts = excluded.attempts, \
             last_error = excluded.last_error, \
             {end_lease}, \
             updated_at = excluded.updated_at \
             WHERE enrichd_provider_state.queried_at IS NULL \
             OR enrichd_provider_state.queried_at < excluded.queried_at",
            rows.join(", ")
        );
        joined.add(sql, txn, statement, p.0).await?;
    }
    Ok(())
}

/// Claims the work of `keys` (sorted, unique) whose `enrichd_ip_state` rows exist and are
/// locked by `txn`; `created` are those this transaction created already holding the PTR
/// lease. The claim's first statement carries `joined`, whose parts must write neither
/// `enrichd_ip_state` nor `enrichd_provider_state`.
#[expect(
    clippy::too_many_arguments,
    reason = "the claim's parts, passed as they are by its two callers"
)]
pub(crate) async fn claim_locked(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    keys: &[String],
    created: &HashSet<String>,
    wanted: &[ProviderId],
    ptr: bool,
    lease: Lease,
    now: DateTime<Utc>,
    mode: ClaimMode,
) -> Result<HashMap<String, Claims>, StoreError> {
    let (ptr_leases, provider_leases) = if ptr && !wanted.is_empty() && store.sql.is_pg() {
        claim_both(store, txn, joined, keys, created, wanted, lease, now, mode).await?
    } else {
        let ptr_leases = if ptr {
            claim_ptr(store, txn, joined, keys, created, lease, now, mode).await?
        } else {
            Vec::new()
        };
        let provider_leases = if wanted.is_empty() {
            Vec::new()
        } else {
            claim_providers(store, txn, joined, keys, wanted, lease, now, mode).await?
        };
        (ptr_leases, provider_leases)
    };
    let mut claims: HashMap<String, Claims> = HashMap::with_capacity(keys.len());
    for (ip, lease) in ptr_leases {
        claims.entry(ip).or_default().ptr = Some(lease);
    }
    for (ip, provider, lease) in provider_leases {
        claims
            .entry(ip)
            .or_default()
            .providers
            .push((provider, lease));
    }
    for c in claims.values_mut() {
        c.providers.sort_by_key(|(p, _)| *p);
    }
    Ok(claims)
}

/// Leases the PTR of `keys`: the rows in `created` were created holding the lease by
/// [`ensure_ip_rows`], and the due rows among the others are leased by one update, each fence
/// coming back with the claim (`RETURNING`).
#[expect(
    clippy::too_many_arguments,
    reason = "the claim's parts, passed as they are by `claim_locked`"
)]
async fn claim_ptr(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    keys: &[String],
    created: &HashSet<String>,
    lease: Lease,
    now: DateTime<Utc>,
    mode: ClaimMode,
) -> Result<Vec<(String, Lease)>, StoreError> {
    // A row created just now has never been asked: it is due and has no fence.
    let mut leases: Vec<(String, Lease)> = created.iter().map(|ip| (ip.clone(), lease)).collect();
    let known: Vec<&String> = keys.iter().filter(|k| !created.contains(*k)).collect();
    if known.is_empty() {
        return Ok(leases);
    }
    let sql = store.sql;
    let (statement, values) = ptr_claim_statement(store, &known, lease, now, mode);
    let rows = joined.query_all(sql, txn, statement, values).await?;
    for row in &rows {
        let ip: String = row.try_get("", "ip")?;
        let fence = sql.get_ts(row, "ptr_queried_at")?;
        leases.push((ip, newer_than(lease, fence)));
    }
    Ok(leases)
}

/// The update leasing the due PTR work of `known` (rows that existed before the claim),
/// returning each leased row's address and fence.
fn ptr_claim_statement(
    store: &Store,
    known: &[&String],
    lease: Lease,
    now: DateTime<Utc>,
    mode: ClaimMode,
) -> (String, Vec<Value>) {
    let mut p = Params::default();
    let terms = LeaseTerms::push(&mut p, store, lease, now);
    let list = p.list(known.iter().map(|k| (*k).clone()));
    let due = terms.only_due(mode, |now| {
        format!("ptr_outcome IS NULL OR ptr_expires_at <= {now}")
    });
    (
        format!(
            "UPDATE enrichd_ip_state SET {} WHERE ip IN ({list}) AND {}{due} \
             RETURNING ip, ptr_queried_at",
            terms.take("ptr_lease"),
            terms.takeable("ptr_lease")
        ),
        p.0,
    )
}

/// [`claim_ptr`] and [`claim_providers`] on PostgreSQL with their first statements as one:
/// the PTR update and the provider rows' insert touch different tables and read nothing the
/// other writes, so they go as data-modifying CTEs of one statement (with whatever `joined`
/// holds) and their rows come back together, a round trip fewer for every claim.
#[expect(
    clippy::too_many_arguments,
    reason = "the claim's parts, passed as they are by `claim_locked`"
)]
async fn claim_both(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    keys: &[String],
    created: &HashSet<String>,
    wanted: &[ProviderId],
    lease: Lease,
    now: DateTime<Utc>,
    mode: ClaimMode,
) -> Result<(Vec<(String, Lease)>, Vec<(String, ProviderId, Lease)>), StoreError> {
    let sql = store.sql;
    // A row created just now has never been asked: it is due and has no fence.
    let mut ptr_leases: Vec<(String, Lease)> =
        created.iter().map(|ip| (ip.clone(), lease)).collect();
    let known: Vec<&String> = keys.iter().filter(|k| !created.contains(*k)).collect();
    let mut parts = Vec::with_capacity(2);
    if !known.is_empty() {
        parts.push(ptr_claim_statement(store, &known, lease, now, mode));
    }
    parts.push(provider_insert_statement(store, keys, wanted, lease, now));
    let rows = joined
        .query_parts(sql, txn, parts, |names| {
            let inserted = names.last().map_or("", String::as_str);
            match names {
                [ptr, _] => format!(
                    "SELECT ip, NULL::varchar AS provider, ptr_queried_at AS fence FROM {ptr} \
                     UNION ALL SELECT ip, provider, NULL::timestamp FROM {inserted}"
                ),
                _ => format!("SELECT ip, provider, NULL::timestamp AS fence FROM {inserted}"),
            }
        })
        .await?;
    let mut inserted: Vec<(String, ProviderId)> = Vec::new();
    for row in &rows {
        let provider: Option<String> = row.try_get("", "provider")?;
        if provider.is_some() {
            inserted.push(provider_row(row)?);
        } else {
            let ip: String = row.try_get("", "ip")?;
            let fence = sql.get_ts(row, "fence")?;
            ptr_leases.push((ip, newer_than(lease, fence)));
        }
    }
    let provider_leases =
        claim_existing_providers(store, txn, keys, wanted, &inserted, lease, now, mode).await?;
    Ok((ptr_leases, provider_leases))
}

/// Creates the missing provider rows of `keys` already leased, then leases the due ones among
/// the rows that existed: one statement for each, whatever the number of addresses. The fence
/// of each lease comes back with the claim (`RETURNING`). A new address's rows are written
/// once, not inserted and then rewritten by the lease, which halved the provider-state updates
/// of a backfill of new addresses.
#[expect(
    clippy::too_many_arguments,
    reason = "the claim's parts, passed as they are by `claim_locked`"
)]
async fn claim_providers(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    keys: &[String],
    wanted: &[ProviderId],
    lease: Lease,
    now: DateTime<Utc>,
    mode: ClaimMode,
) -> Result<Vec<(String, ProviderId, Lease)>, StoreError> {
    let (statement, values) = provider_insert_statement(store, keys, wanted, lease, now);
    let created = joined.query_all(store.sql, txn, statement, values).await?;
    let created: Vec<(String, ProviderId)> =
        created.iter().map(provider_row).collect::<Result<_, _>>()?;
    claim_existing_providers(store, txn, keys, wanted, &created, lease, now, mode).await
}

/// The insert creating the missing provider rows of `keys` already leased, returning each
/// row it created.
fn provider_insert_statement(
    store: &Store,
    keys: &[String],
    wanted: &[ProviderId],
    lease: Lease,
    now: DateTime<Utc>,
) -> (String, Vec<Value>) {
    let mut p = Params::default();
    let terms = LeaseTerms::push(&mut p, store, lease, now);
    let ip_params: Vec<String> = keys.iter().map(|k| p.push(k.clone())).collect();
    let provider_params: Vec<String> = wanted.iter().map(|w| p.push(w.as_str())).collect();
    let rows: Vec<String> = ip_params
        .iter()
        .flat_map(|ip| {
            let LeaseTerms { owner, until, now } = &terms;
            provider_params
                .iter()
                .map(move |provider| format!("({ip}, {provider}, 0, {now}, {owner}, {until})"))
        })
        .collect();
    (
        format!(
            "INSERT INTO enrichd_provider_state (ip, provider, attempts, updated_at, \
             lease_owner, lease_until) VALUES {} ON CONFLICT (ip, provider) DO NOTHING \
             RETURNING ip, provider",
            rows.join(", ")
        ),
        p.0,
    )
}

/// The provider leases of a claim whose insert created the rows in `created`: those, and the
/// due ones among the rows that existed, leased by one update.
#[expect(
    clippy::too_many_arguments,
    reason = "the claim's parts, passed as they are by its two callers"
)]
async fn claim_existing_providers(
    store: &Store,
    txn: &DatabaseTransaction,
    keys: &[String],
    wanted: &[ProviderId],
    created: &[(String, ProviderId)],
    lease: Lease,
    now: DateTime<Utc>,
    mode: ClaimMode,
) -> Result<Vec<(String, ProviderId, Lease)>, StoreError> {
    let sql = store.sql;
    // A new row has never been asked: no fence to stay above.
    let mut leases: Vec<(String, ProviderId, Lease)> = created
        .iter()
        .map(|(ip, provider)| (ip.clone(), *provider, lease))
        .collect();
    if leases.len() == keys.len() * wanted.len() {
        return Ok(leases);
    }
    let fresh: HashSet<(&str, ProviderId)> =
        created.iter().map(|(ip, p)| (ip.as_str(), *p)).collect();
    let existing = keys
        .iter()
        .filter(|k| wanted.iter().any(|w| !fresh.contains(&(k.as_str(), *w))));

    let mut p = Params::default();
    let terms = LeaseTerms::push(&mut p, store, lease, now);
    let ips = p.list(existing.cloned());
    let providers = p.list(wanted.iter().map(|w| w.as_str()));
    let due = terms.only_due(mode, |now| {
        format!("outcome IS NULL OR next_attempt_at <= {now}")
    });
    let claimed = txn
        .query_all_raw(sql.stmt(
            format!(
                "UPDATE enrichd_provider_state SET {} WHERE ip IN ({ips}) \
                 AND provider IN ({providers}) AND {}{due} RETURNING ip, provider, queried_at",
                terms.take("lease"),
                terms.takeable("lease")
            ),
            p.0,
        ))
        .await?;
    for row in &claimed {
        let (ip, provider) = provider_row(row)?;
        // An address with both new and old rows re-leases its new ones here: they are ours
        // already and counted once.
        if fresh.contains(&(ip.as_str(), provider)) {
            continue;
        }
        let fence = sql.get_ts(row, "queried_at")?;
        leases.push((ip, provider, newer_than(lease, fence)));
    }
    Ok(leases)
}

fn provider_row(row: &QueryResult) -> Result<(String, ProviderId), StoreError> {
    let ip: String = row.try_get("", "ip")?;
    let label: String = row.try_get("", "provider")?;
    let provider = ProviderId::from_id(&label)
        .ok_or_else(|| StoreError::malformed("enrichd_provider_state.provider", label))?;
    Ok((ip, provider))
}

fn count(value: Option<i64>) -> u32 {
    value.and_then(|v| u32::try_from(v).ok()).unwrap_or(0)
}

pub(crate) fn read_ptr(store: &Store, row: &QueryResult) -> Result<PtrState, StoreError> {
    let sql = store.sql;
    let outcome: Option<String> = row.try_get("", "ptr_outcome")?;
    let outcome = outcome
        .map(|o| PtrOutcome::from_label(&o).ok_or_else(|| StoreError::malformed("ptr_outcome", o)))
        .transpose()?;
    Ok(PtrState {
        name: row.try_get("", "ptr_name")?,
        outcome,
        resolved_at: sql.get_ts(row, "ptr_resolved_at")?,
        expires_at: sql.get_ts(row, "ptr_expires_at")?,
        attempts: count(sql.get_i64(row, "ptr_attempts")?),
        queried_at: sql.get_ts(row, "ptr_queried_at")?,
        forward_confirmed: row.try_get("", "ptr_forward_confirmed")?,
    })
}

pub(crate) async fn read_provider_states<C: ConnectionTrait>(
    store: &Store,
    db: &C,
    ip: &str,
) -> Result<Vec<ProviderState>, StoreError> {
    let mut by_ip = read_provider_states_of(store, db, &[ip.to_owned()]).await?;
    Ok(by_ip.remove(ip).unwrap_or_default())
}

/// The provider states of each of `keys`, ascending by provider.
pub(crate) async fn read_provider_states_of<C: ConnectionTrait>(
    store: &Store,
    db: &C,
    keys: &[String],
) -> Result<HashMap<String, Vec<ProviderState>>, StoreError> {
    let sql = store.sql;
    let mut states: HashMap<String, Vec<ProviderState>> = HashMap::with_capacity(keys.len());
    for keys in keys.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let list = p.list(keys.iter().cloned());
        let rows = db
            .query_all_raw(sql.stmt(
                format!(
                    "SELECT * FROM enrichd_provider_state WHERE ip IN ({list}) \
                     ORDER BY ip, provider"
                ),
                p.0,
            ))
            .await?;
        for row in &rows {
            if let Some((ip, state)) = provider_state_row(sql, row)? {
                states.entry(ip).or_default().push(state);
            }
        }
    }
    Ok(states)
}

/// An `enrichd_provider_state` row's address and state; `None` for a provider this binary
/// does not know.
fn provider_state_row(
    sql: Sql,
    row: &QueryResult,
) -> Result<Option<(String, ProviderState)>, StoreError> {
    let ip: String = row.try_get("", "ip")?;
    let provider: String = row.try_get("", "provider")?;
    let Some(provider) = ProviderId::from_id(&provider) else {
        return Ok(None);
    };
    let outcome: Option<String> = row.try_get("", "outcome")?;
    let outcome = outcome
        .map(|o| ProviderOutcome::from_label(&o).ok_or_else(|| StoreError::malformed("outcome", o)))
        .transpose()?;
    let verdict: Option<String> = row.try_get("", "verdict")?;
    let fields = sql
        .get_json(row, "fields")?
        .and_then(|f| serde_json::from_value::<ProviderFields>(f).ok());
    let state = ProviderState {
        provider,
        outcome,
        verdict: verdict.as_deref().and_then(Verdict::from_label),
        fields,
        raw: sql.get_json(row, "raw")?.map(std::sync::Arc::new),
        answered_at: sql.get_ts(row, "answered_at")?,
        queried_at: sql.get_ts(row, "queried_at")?,
        next_attempt_at: sql.get_ts(row, "next_attempt_at")?,
        attempts: count(sql.get_i64(row, "attempts")?),
        last_error: row.try_get("", "last_error")?,
    };
    Ok(Some((ip, state)))
}

/// What a write reads once it holds its addresses' locks: their provider states and, with
/// `attackers`, their attackers (see [`mapped_attackers_of`]).
///
/// On PostgreSQL one statement returns both, a round trip fewer for every write. It starts
/// after the lock was granted, so its snapshot holds everything committed by whoever held
/// the lock before: the rows come back as two statements would return them.
async fn read_for_write(
    store: &Store,
    txn: &DatabaseTransaction,
    keys: &[String],
    now: DateTime<Utc>,
    attackers: bool,
) -> Result<
    (
        HashMap<String, Vec<ProviderState>>,
        HashMap<String, Vec<MappedAttacker>>,
    ),
    StoreError,
> {
    let sql = store.sql;
    if !sql.is_pg() || !attackers {
        let states = read_provider_states_of(store, txn, keys).await?;
        let mapped = if attackers {
            mapped_attackers_of(store, txn, keys, now).await?
        } else {
            HashMap::new()
        };
        return Ok((states, mapped));
    }
    let mut states: HashMap<String, Vec<ProviderState>> = HashMap::with_capacity(keys.len());
    let mut mapped: HashMap<String, Vec<MappedAttacker>> = HashMap::with_capacity(keys.len());
    for keys in keys.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let now_p = p.push(sql.ts(now));
        let list = p.list(keys.iter().cloned());
        // An attacker row has no provider, a provider row no attacker: the columns the
        // other kind lacks are typed NULLs.
        let no_state = "NULL::varchar AS provider, NULL::varchar AS outcome, \
                        NULL::varchar AS verdict, NULL::json AS fields, NULL::json AS raw, \
                        NULL::timestamp AS answered_at, NULL::timestamp AS queried_at, \
                        NULL::timestamp AS next_attempt_at, NULL::integer AS attempts, \
                        NULL::varchar AS last_error";
        let rows = txn
            .query_all_raw(sql.stmt(
                format!(
                    "WITH {synced}, attackers_of AS ({attackers}) \
                     SELECT ip, attacker_uuid, payload_digest, {no_state} FROM attackers_of \
                     UNION ALL SELECT ip, NULL, NULL, provider, outcome, verdict, fields, raw, \
                     answered_at, queried_at, next_attempt_at, attempts, last_error \
                     FROM enrichd_provider_state WHERE ip IN ({list}) \
                     ORDER BY ip, provider, attacker_uuid",
                    synced = synced_cte(&now_p, &list),
                    attackers = attackers_with_synced(&list),
                ),
                p.0,
            ))
            .await?;
        for row in &rows {
            let uuid: Option<String> = row.try_get("", "attacker_uuid")?;
            match uuid {
                Some(uuid) => {
                    let ip: String = row.try_get("", "ip")?;
                    mapped.entry(ip).or_default().push(MappedAttacker {
                        uuid,
                        digest: row.try_get("", "payload_digest")?,
                    });
                }
                None => {
                    if let Some((ip, state)) = provider_state_row(sql, row)? {
                        states.entry(ip).or_default().push(state);
                    }
                }
            }
        }
    }
    Ok((states, mapped))
}

/// The PTR state after applying `report` (claimed at `lease.claimed_at`) to `old`.
pub(crate) fn next_ptr_state(
    old: &PtrState,
    lease: &Lease,
    report: &PtrReport,
    now: DateTime<Utc>,
) -> PtrState {
    let outcome = report.outcome;
    let attempts = if outcome.is_failure() {
        old.attempts.saturating_add(1)
    } else {
        0
    };
    let expires_at = outcome.due(attempts, report.record_ttl).at(now);
    let good_name = report
        .name
        .as_deref()
        .map(|n| column_text(n, PTR_CHARS))
        .filter(|n| outcome == PtrOutcome::Ok && !n.is_empty());
    let (name, resolved_at, forward_confirmed) = match (outcome, good_name) {
        (PtrOutcome::Ok, Some(name)) => {
            (Some(name), Some(lease.claimed_at), report.forward_confirmed)
        }
        // A failure, or switching PTR off, never erases a good stored name.
        (PtrOutcome::Servfail | PtrOutcome::Timeout | PtrOutcome::Disabled, _)
        | (PtrOutcome::Ok, None) => (old.name.clone(), old.resolved_at, old.forward_confirmed),
        // A negative answer replaces it.
        (PtrOutcome::Nxdomain | PtrOutcome::InvalidName | PtrOutcome::SkippedNonGlobal, _) => {
            (None, None, None)
        }
    };
    PtrState {
        name,
        outcome: Some(outcome),
        resolved_at,
        expires_at,
        attempts,
        queried_at: Some(lease.claimed_at),
        forward_confirmed,
    }
}

/// The provider state after applying `report` (claimed at `lease.claimed_at`) to `old`.
pub(crate) fn next_provider_state(
    old: Option<&ProviderState>,
    lease: &Lease,
    report: &ProviderReport,
    ttl: Duration,
    now: DateTime<Utc>,
) -> ProviderState {
    let outcome = report.outcome;
    let old_attempts = old.map_or(0, |s| s.attempts);
    let attempts = if outcome.is_failure() {
        old_attempts.saturating_add(1)
    } else if outcome.is_answer() {
        0
    } else {
        // Rate limits, quota and skips do not advance per-IP backoff.
        old_attempts
    };
    let next_attempt_at = outcome
        .due(attempts, ttl, report.resume_at, report.min_backoff)
        .at(now);
    if outcome.is_answer() {
        ProviderState {
            provider: report.provider,
            outcome: Some(outcome),
            verdict: report.verdict,
            fields: report.fields.clone(),
            raw: Some(report.raw.clone()),
            answered_at: Some(lease.claimed_at),
            queried_at: Some(lease.claimed_at),
            next_attempt_at,
            attempts,
            last_error: None,
        }
    } else {
        // No answer: the earlier answer's columns, verdict and raw body stay.
        let mut next = old.cloned().unwrap_or(ProviderState {
            provider: report.provider,
            outcome: None,
            verdict: None,
            fields: None,
            raw: None,
            answered_at: None,
            queried_at: None,
            next_attempt_at: None,
            attempts: 0,
            last_error: None,
        });
        next.outcome = Some(outcome);
        next.queried_at = Some(lease.claimed_at);
        next.next_attempt_at = next_attempt_at;
        next.attempts = attempts;
        next.last_error = report
            .error
            .as_deref()
            .map(|e| column_text(e, LAST_ERROR_CHARS));
        next
    }
}

#[derive(Debug, Clone)]
pub(crate) struct MappedAttacker {
    pub(crate) uuid: String,
    pub(crate) digest: Option<String>,
}

/// Maps attacker rows whose stored `ip` is one of these canonical texts (the common case;
/// other spellings are mapped by `sync_attacker_map`), then lists every attacker of each IP:
/// one statement on PostgreSQL, two on SQLite.
pub(crate) async fn mapped_attackers_of<C: ConnectionTrait>(
    store: &Store,
    db: &C,
    keys: &[String],
    now: DateTime<Utc>,
) -> Result<HashMap<String, Vec<MappedAttacker>>, StoreError> {
    let sql = store.sql;
    let mut by_ip: HashMap<String, Vec<MappedAttacker>> = HashMap::with_capacity(keys.len());
    for keys in keys.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let now_p = p.push(sql.ts(now));
        let list = p.list(keys.iter().cloned());
        let rows = if sql.is_pg() {
            db.query_all_raw(sql.stmt(
                format!(
                    "WITH {} {} ORDER BY ip, attacker_uuid",
                    synced_cte(&now_p, &list),
                    attackers_with_synced(&list)
                ),
                p.0,
            ))
            .await?
        } else {
            db.execute_raw(sql.stmt(sync_statement(&now_p, &list), p.0))
                .await?;
            let mut p = Params::default();
            let list = p.list(keys.iter().cloned());
            db.query_all_raw(sql.stmt(
                format!("{} ORDER BY m.ip, m.attacker_uuid", mapped_select(&list)),
                p.0,
            ))
            .await?
        };
        for row in &rows {
            let ip: String = row.try_get("", "ip")?;
            by_ip.entry(ip).or_default().push(MappedAttacker {
                uuid: row.try_get("", "attacker_uuid")?,
                digest: row.try_get("", "payload_digest")?,
            });
        }
    }
    Ok(by_ip)
}

/// Maps the attacker rows not mapped yet whose stored `ip` is one of the addresses in the
/// placeholder `list`, at the placeholder `now`.
fn sync_statement(now: &str, list: &str) -> String {
    format!(
        "INSERT INTO enrichd_attacker_map (attacker_uuid, ip, mapped_at) \
         SELECT a.uuid, a.ip, {now} FROM attackers a WHERE a.ip IN ({list}) \
         AND NOT EXISTS (SELECT 1 FROM enrichd_attacker_map m \
         WHERE m.attacker_uuid = a.uuid) ON CONFLICT (attacker_uuid) DO NOTHING"
    )
}

/// On PostgreSQL, [`sync_statement`] as the CTE `synced`, returning the rows it maps.
fn synced_cte(now: &str, list: &str) -> String {
    format!(
        "synced AS ({} RETURNING ip, attacker_uuid, payload_digest)",
        sync_statement(now, list)
    )
}

/// Every attacker of the addresses in the placeholder `list` (`ip`, `attacker_uuid`,
/// `payload_digest`), beside a [`synced_cte`]: one round trip maps and lists them. The rows
/// the sync maps come back from it, since the outer query's snapshot does not see them (so
/// none is listed twice).
fn attackers_with_synced(list: &str) -> String {
    format!(
        "{} UNION ALL SELECT ip, attacker_uuid, payload_digest FROM synced",
        mapped_select(list)
    )
}

/// The attackers mapped to the addresses in the placeholder `list`.
fn mapped_select(list: &str) -> String {
    format!(
        "SELECT m.ip AS ip, m.attacker_uuid AS attacker_uuid, m.payload_digest AS payload_digest \
         FROM enrichd_attacker_map m JOIN attackers a ON a.uuid = m.attacker_uuid \
         WHERE m.ip IN ({list})"
    )
}

/// Every `attacker_intel` row in `intel` (attacker uuid, index into `columns`) upserted,
/// a few hundred rows per statement.
async fn upsert_intel_rows(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    intel: &[(String, usize)],
    columns: &[IntelColumns<'_>],
) -> Result<(), StoreError> {
    const COLUMNS: [&str; 23] = [
        "attacker_ip",
        "greynoise_classification",
        "greynoise_name",
        "greynoise_tags",
        "greynoise_raw",
        "greynoise_queried_at",
        "abuseipdb_score",
        "abuseipdb_categories",
        "abuseipdb_raw",
        "abuseipdb_queried_at",
        "feodo_listed",
        "feodo_malware_family",
        "feodo_raw",
        "feodo_queried_at",
        "threatfox_listed",
        "threatfox_threat_types",
        "threatfox_ioc_types",
        "threatfox_malware_families",
        "threatfox_raw",
        "threatfox_queried_at",
        "aggregate_verdict",
        "cached_at",
        "expires_at",
    ];
    let sql = store.sql;
    let updates: Vec<String> = COLUMNS
        .iter()
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    for chunk in intel.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let version = p.push(1_i32);
        let rows: Vec<String> = chunk
            .iter()
            .filter_map(|(attacker_uuid, index)| {
                let c = columns.get(*index)?;
                let placeholders = [
                    p.push(uuid::Uuid::new_v4().simple().to_string()),
                    p.push(attacker_uuid.clone()),
                    p.push(c.attacker_ip.clone()),
                    p.push(c.greynoise_classification.clone()),
                    p.push(c.greynoise_name.clone()),
                    p.push_json(sql, Some(&c.greynoise_tags)),
                    p.push_json_object(sql, c.greynoise_raw),
                    p.push(sql.ts_opt(c.greynoise_queried_at)),
                    p.push(c.abuseipdb_score),
                    p.push_json(sql, Some(&c.abuseipdb_categories)),
                    p.push_json_object(sql, c.abuseipdb_raw),
                    p.push(sql.ts_opt(c.abuseipdb_queried_at)),
                    p.push(c.feodo_listed),
                    p.push(c.feodo_malware_family.clone()),
                    p.push_json_object(sql, c.feodo_raw),
                    p.push(sql.ts_opt(c.feodo_queried_at)),
                    p.push(c.threatfox_listed),
                    p.push_json(sql, Some(&c.threatfox_threat_types)),
                    p.push_json(sql, Some(&c.threatfox_ioc_types)),
                    p.push_json(sql, Some(&c.threatfox_malware_families)),
                    p.push_json_object(sql, c.threatfox_raw),
                    p.push(sql.ts_opt(c.threatfox_queried_at)),
                    p.push(c.aggregate_verdict.clone()),
                    p.push(sql.ts(c.cached_at)),
                    p.push(sql.ts(c.expires_at)),
                ];
                Some(format!("({}, {version})", placeholders.join(", ")))
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let statement = format!(
            "INSERT INTO attacker_intel (uuid, attacker_uuid, {cols}, schema_version) \
             VALUES {rows} ON CONFLICT (attacker_uuid) DO UPDATE SET {updates}",
            cols = COLUMNS.join(", "),
            rows = rows.join(", "),
            updates = updates.join(", "),
        );
        joined.add(sql, txn, statement, p.0).await?;
    }
    Ok(())
}

/// Keeps `attackers.ptr_record` in step with the stored name: each (attacker uuid, name) is
/// written where it differs, which also restores a name something else nulled.
async fn set_ptr_records(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    names: &[(String, String)],
) -> Result<(), StoreError> {
    let sql = store.sql;
    for chunk in names.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let arms: Vec<String> = chunk
            .iter()
            .map(|(uuid, name)| {
                format!(
                    "WHEN {} THEN {}",
                    p.push(uuid.clone()),
                    p.push(name.clone())
                )
            })
            .collect();
        let name_of = format!("CASE uuid {} END", arms.join(" "));
        let uuids = p.list(chunk.iter().map(|(uuid, _)| uuid.clone()));
        let statement = format!(
            "UPDATE attackers SET ptr_record = {name_of} WHERE uuid IN ({uuids}) \
             AND (ptr_record IS NULL OR ptr_record <> {name_of})"
        );
        joined.add(sql, txn, statement, p.0).await?;
    }
    Ok(())
}

/// A negative PTR answer cleared the stored name `old` of `ip`: remove it from the IP's
/// attacker rows (only where it is still that name).
async fn clear_ptr_record(
    store: &Store,
    txn: &DatabaseTransaction,
    ip: &str,
    old: &str,
) -> Result<(), StoreError> {
    txn.execute_raw(store.sql.stmt(
        "UPDATE attackers SET ptr_record = NULL WHERE uuid IN \
         (SELECT attacker_uuid FROM enrichd_attacker_map WHERE ip = $1) AND ptr_record = $2",
        vec![ip.into(), old.into()],
    ))
    .await?;
    Ok(())
}

/// Puts each payload in the outbox for its attacker: a new row at version 1, or a newer
/// payload replacing an unpublished one with the version bumped. A claim in progress is kept,
/// so the relay deleting the old version releases the new one (see `delete_outbox`).
///
/// With `claim_until` (a relay runs in this process), a row no live claim holds is claimed
/// until then as it is written, and comes back with its address's index to be handed to that
/// relay: it is published without waiting for a claim transaction, and if this process dies
/// first the claim lapses and any relay takes the row.
async fn enqueue_rows(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    rows: &[(String, IntelPayload, String, usize)],
    now: DateTime<Utc>,
    claim_until: Option<DateTime<Utc>>,
) -> Result<Vec<(usize, OutboxRow)>, StoreError> {
    let sql = store.sql;
    #[expect(
        clippy::cast_precision_loss,
        reason = "epoch milliseconds fit an f64 exactly until year 287396"
    )]
    let ts = now.timestamp_micros() as f64 / 1e6;
    let mut handed_off = Vec::new();
    for chunk in rows.chunks(sql::ROWS_PER_STATEMENT) {
        let (digests, digest_values) = digest_statement(chunk);
        joined.add(sql, txn, digests, digest_values).await?;
        let mut p = Params::default();
        let now_p = p.push(sql.ts(now));
        let claim_p = claim_until.map(|until| p.push(sql.ts(until)));
        let mut values = Vec::with_capacity(chunk.len());
        let mut texts: HashMap<&str, (usize, String)> = HashMap::with_capacity(chunk.len());
        for (attacker_uuid, payload, _, index) in chunk {
            let envelope = Envelope::new(TOPIC_INTEL_ENRICHED, "intel.enriched", ts, payload);
            let text = serde_json::to_string(&envelope)
                .map_err(|e| StoreError::malformed("enrichd_outbox.payload", e.to_string()))?;
            let uuid_p = p.push(attacker_uuid.clone());
            values.push(match &claim_p {
                Some(claim_p) => {
                    let text_p = p.push(text.clone());
                    texts.insert(attacker_uuid.as_str(), (*index, text));
                    format!("({uuid_p}, 1, {text_p}, {now_p}, {now_p}, {claim_p})")
                }
                None => format!("({uuid_p}, 1, {}, {now_p}, {now_p})", p.push(text)),
            });
        }
        let values = values.join(", ");
        let replace = "ON CONFLICT (attacker_uuid) DO UPDATE SET \
                       version = enrichd_outbox.version + 1, payload = excluded.payload, \
                       updated_at = excluded.updated_at";
        if let Some(claim_p) = &claim_p {
            let statement = format!(
                "INSERT INTO enrichd_outbox (attacker_uuid, version, payload, created_at, \
                 updated_at, claimed_until) VALUES {values} {replace}, \
                 claimed_until = CASE WHEN enrichd_outbox.claimed_until IS NULL \
                 OR enrichd_outbox.claimed_until < {now_p} \
                 THEN excluded.claimed_until ELSE enrichd_outbox.claimed_until END \
                 RETURNING attacker_uuid, version, claimed_until = {claim_p} AS ours"
            );
            let claimed = joined.query_all(sql, txn, statement, p.0).await?;
            for row in claimed {
                let ours: bool = row.try_get("", "ours")?;
                if !ours {
                    continue;
                }
                let uuid: String = row.try_get("", "attacker_uuid")?;
                if let Some((index, payload)) = texts.remove(uuid.as_str()) {
                    handed_off.push((
                        index,
                        OutboxRow {
                            attacker_uuid: uuid,
                            version: row.try_get("", "version")?,
                            payload,
                        },
                    ));
                }
            }
        } else {
            let statement = format!(
                "INSERT INTO enrichd_outbox (attacker_uuid, version, payload, created_at, \
                 updated_at) VALUES {values} {replace}"
            );
            joined.add(sql, txn, statement, p.0).await?;
        }
    }
    Ok(handed_off)
}

/// Records each outbox row's payload digest on its attacker's map row, so an unchanged
/// payload is not queued again.
fn digest_statement(chunk: &[(String, IntelPayload, String, usize)]) -> (String, Vec<Value>) {
    let mut p = Params::default();
    let arms: Vec<String> = chunk
        .iter()
        .map(|(uuid, _, digest, _)| {
            format!(
                "WHEN {} THEN {}",
                p.push(uuid.clone()),
                p.push(digest.clone())
            )
        })
        .collect();
    let uuids = p.list(chunk.iter().map(|(uuid, _, _, _)| uuid.clone()));
    (
        format!(
            "UPDATE enrichd_attacker_map SET payload_digest = CASE attacker_uuid {} END \
             WHERE attacker_uuid IN ({uuids})",
            arms.join(" ")
        ),
        p.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use enrichd_core::ProviderFields;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
    }

    fn lease() -> Lease {
        Lease {
            claimed_at: t0(),
            until: t0() + chrono::Duration::seconds(30),
        }
    }

    const TTL: Duration = Duration::from_hours(24);

    fn good() -> ProviderReport {
        ProviderReport::answer(
            ProviderOutcome::Ok,
            Some(Verdict::Malicious),
            ProviderFields::Feodo {
                listed: true,
                malware_family: Some("QakBot".into()),
            },
            serde_json::json!({"ip_address": "1.2.3.4"}),
        )
    }

    #[test]
    fn repeated_addresses_wait_for_the_next_round_and_rounds_go_in_key_order() {
        let ip = |t: &str| CanonicalIp::parse(t).unwrap();
        let ips = [
            ip("9.9.9.9"),
            ip("1.1.1.1"),
            ip("9.9.9.9"),
            ip("8.8.8.8"),
            ip("9.9.9.9"),
        ];
        assert_eq!(distinct_rounds(&ips), vec![vec![1, 3, 0], vec![2], vec![4]]);
        assert!(distinct_rounds(&[]).is_empty());
    }

    #[test]
    fn errors_keep_the_answer_and_back_off_by_consecutive_failures() {
        let ok = next_provider_state(None, &lease(), &good(), TTL, t0());
        assert_eq!(ok.attempts, 0);
        assert_eq!(ok.next_attempt_at, Some(t0() + chrono::Duration::hours(24)));
        let err = ProviderReport::error(ProviderId::Feodo, "server error 503");
        let e1 = next_provider_state(Some(&ok), &lease(), &err, TTL, t0());
        assert_eq!(e1.attempts, 1);
        assert_eq!(e1.fields, ok.fields);
        assert_eq!(e1.verdict, Some(Verdict::Malicious));
        assert_eq!(
            e1.next_attempt_at,
            Some(t0() + chrono::Duration::minutes(5))
        );
        let e2 = next_provider_state(Some(&e1), &lease(), &err, TTL, t0());
        assert_eq!(e2.attempts, 2);
        assert_eq!(
            e2.next_attempt_at,
            Some(t0() + chrono::Duration::minutes(10))
        );
        let parked = ProviderReport {
            resume_at: Some(t0() + chrono::Duration::hours(3)),
            ..ProviderReport::bare(ProviderId::Feodo, ProviderOutcome::RateLimited)
        };
        let rl = next_provider_state(Some(&e2), &lease(), &parked, TTL, t0());
        assert_eq!(rl.attempts, 2, "rate limits do not advance backoff");
        assert_eq!(rl.next_attempt_at, Some(t0() + chrono::Duration::hours(3)));
        let negative = ProviderReport::answer(
            ProviderOutcome::Ok,
            None,
            ProviderFields::Feodo {
                listed: false,
                malware_family: None,
            },
            serde_json::json!({}),
        );
        let cleared = next_provider_state(Some(&rl), &lease(), &negative, TTL, t0());
        assert_eq!(cleared.verdict, None);
        assert_eq!(cleared.attempts, 0);
        assert!(matches!(
            cleared.fields,
            Some(ProviderFields::Feodo { listed: false, .. })
        ));
    }

    #[test]
    fn ptr_failures_keep_a_good_name_and_negative_answers_clear_it() {
        let named = PtrReport {
            outcome: PtrOutcome::Ok,
            name: Some("dns.google".into()),
            record_ttl: Some(Duration::from_secs(7200)),
            forward_confirmed: None,
        };
        let good = next_ptr_state(&PtrState::default(), &lease(), &named, t0());
        assert_eq!(good.name.as_deref(), Some("dns.google"));
        assert_eq!(good.expires_at, Some(t0() + chrono::Duration::hours(2)));
        let failed = next_ptr_state(
            &good,
            &lease(),
            &PtrReport::without_name(PtrOutcome::Timeout),
            t0(),
        );
        assert_eq!(failed.name.as_deref(), Some("dns.google"));
        assert_eq!(failed.attempts, 1);
        assert_eq!(
            failed.expires_at,
            Some(t0() + chrono::Duration::minutes(15))
        );
        let gone = next_ptr_state(
            &failed,
            &lease(),
            &PtrReport::without_name(PtrOutcome::Nxdomain),
            t0(),
        );
        assert_eq!(gone.name, None);
        assert_eq!(gone.attempts, 0);
    }
}
