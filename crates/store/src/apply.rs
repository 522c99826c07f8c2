//! The per-IP write: one transaction that locks the addresses' `enrichd_ip_state` rows in
//! key order, fences each result on the stored `queried_at`, writes the new PTR and provider
//! states, and recomputes every attacker row of the addresses (`attackers`) and the
//! outbox ([`crate::outbox`]) from the merged stored state.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use enrichd_core::ports::PtrReport;
use enrichd_core::text::column_text;
use enrichd_core::{CanonicalIp, ProviderId, ProviderReport};
use sea_orm::{ConnectionTrait, DatabaseTransaction};

use crate::attackers::{
    MappedAttacker, Settled, attackers_with_synced, mapped_attackers_of, synced_cte,
    write_attacker_rows,
};
use crate::claim::Lease;
use crate::error::retry_busy;
use crate::ip_state::{
    StateRow, distinct_rounds, ensure_ip_rows, lock_ip_rows, provider_state_row,
    read_provider_states_of, read_ptr,
};
use crate::sql::{self, Joined, Params};
use crate::state::{ApplyContext, ProviderState, PtrState, StoredScope};
use crate::transition::{LAST_ERROR_CHARS, PtrChange, next_provider_state, next_ptr_state};
use crate::{OutboxRow, Store, StoreError};

mod states;

use states::{IpWrite, ProviderWrite, write_ip_states, write_provider_states};

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

/// An `enrichd_ip_state` row as a write finds it under its lock.
#[derive(Debug, Clone)]
struct LockedIp {
    ptr: PtrState,
    /// The stored scope label, as stored (an unknown label is a change like any other).
    scope: Option<String>,
}

/// The locked rows of a write's addresses, by address, and the transaction's clock.
struct Locked {
    now: DateTime<Utc>,
    ips: HashMap<String, LockedIp>,
}

/// What a write reads once it holds its addresses' locks, by address.
struct WriteReads {
    states: HashMap<String, Vec<ProviderState>>,
    attackers: HashMap<String, Vec<MappedAttacker>>,
}

impl Store {
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
    ) -> Result<Locked, StoreError> {
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
        let mut ips: HashMap<String, LockedIp> = HashMap::new();
        for row in locked {
            let ip: String = row.try_get("", "ip")?;
            let scope: Option<String> = row.try_get("", "scope")?;
            let ptr = read_ptr(self, &row)?;
            ips.insert(ip, LockedIp { ptr, scope });
        }
        Ok(Locked { now, ips })
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

        let Locked { now, ips: stored } = self.lock_for_write(&txn, clock, &keys).await?;
        let WriteReads {
            mut states,
            attackers,
        } = read_for_write(self, &txn, &keys, now, write_rows).await?;

        let mut ip_writes: Vec<IpWrite> = Vec::new();
        let mut provider_writes: Vec<ProviderWrite> = Vec::new();
        let mut ptrs: Vec<PtrChange> = Vec::with_capacity(items.len());
        for (index, (item, key)) in items.iter().zip(&keys).enumerate() {
            let LockedIp {
                ptr: old_ptr,
                scope: stored_scope,
            } = stored
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
                provider_writes.push(ProviderWrite {
                    address: index,
                    state: next,
                    lease: *lease,
                });
            }
            ptrs.push(PtrChange {
                old: old_ptr,
                new: new_ptr,
            });
        }

        // No statement reads these writes before commit, and none of the attacker rows'
        // writes touches their tables: on PostgreSQL they all go as one statement, the last
        // of the write before `COMMIT`.
        let mut joined = Joined::default();
        write_ip_states(self, &txn, &mut joined, &ip_writes, now).await?;
        write_provider_states(self, &txn, &mut joined, &keys, &provider_writes, now).await?;
        for ProviderWrite { address, state, .. } in provider_writes {
            outcomes[address].applied.push(state.provider);
            let list = states.entry(keys[address].clone()).or_default();
            list.retain(|s| s.provider != state.provider);
            list.push(state);
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
        joined.finish(self.dialect, &txn).await?;
        txn.commit().await?;
        Ok(outcomes)
    }
}

/// What a write reads once it holds its addresses' locks: their provider states and, with
/// `attackers`, their attackers (see [`mapped_attackers_of`]).
///
/// Where the dialect has data-modifying CTEs (PostgreSQL; the attacker map's sync is one) one
/// statement returns both, a round trip fewer for every write. It starts
/// after the lock was granted, so its snapshot holds everything committed by whoever held
/// the lock before: the rows come back as two statements would return them.
async fn read_for_write(
    store: &Store,
    txn: &DatabaseTransaction,
    keys: &[String],
    now: DateTime<Utc>,
    attackers: bool,
) -> Result<WriteReads, StoreError> {
    let dialect = store.dialect;
    if !dialect.writing_ctes() || !attackers {
        let states = read_provider_states_of(store, txn, keys).await?;
        let mapped = if attackers {
            mapped_attackers_of(store, txn, keys, now).await?
        } else {
            HashMap::new()
        };
        return Ok(WriteReads {
            states,
            attackers: mapped,
        });
    }
    let mut states: HashMap<String, Vec<ProviderState>> = HashMap::with_capacity(keys.len());
    let mut mapped: HashMap<String, Vec<MappedAttacker>> = HashMap::with_capacity(keys.len());
    for keys in keys.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let now_p = p.push(dialect.ts(now));
        let list = p.list(keys.iter().cloned());
        // An attacker row has no provider, a provider row no attacker: the columns the
        // other kind lacks are typed NULLs.
        let no_state = "NULL::varchar AS provider, NULL::varchar AS outcome, \
                        NULL::varchar AS verdict, NULL::json AS fields, NULL::json AS raw, \
                        NULL::timestamp AS answered_at, NULL::timestamp AS queried_at, \
                        NULL::timestamp AS next_attempt_at, NULL::integer AS attempts, \
                        NULL::varchar AS last_error";
        let rows = txn
            .query_all_raw(dialect.stmt(
                format!(
                    "WITH {synced}, attackers_of AS ({attackers}) \
                     SELECT ip, attacker_uuid, payload_digest, {no_state} FROM attackers_of \
                     UNION ALL SELECT ip, NULL, NULL, provider, outcome, verdict, fields, raw, \
                     answered_at, queried_at, next_attempt_at, attempts, last_error \
                     FROM enrichd_provider_state WHERE ip IN ({list}) \
                     ORDER BY ip, provider, attacker_uuid",
                    synced = synced_cte(dialect, &now_p, &list),
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
                    if let Some(StateRow { ip, state }) = provider_state_row(dialect, row)? {
                        states.entry(ip).or_default().push(state);
                    }
                }
            }
        }
    }
    Ok(WriteReads {
        states,
        attackers: mapped,
    })
}
