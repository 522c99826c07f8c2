//! The claim of rows a transaction has locked: the lease terms every claim shares, the PTR
//! lease update, the provider rows' insert and lease update, and (where the dialect joins
//! statements) the first two as one statement.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use enrichd_core::ProviderId;
use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult};

use super::{ClaimMode, Claims, Lease};
use crate::sql::{Bound, Joined, OnConflict, Params, RowsBack};
use crate::transition::newer_than;
use crate::{Store, StoreError};

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
            until: p.push(store.dialect.ts(lease.until)),
            now: p.push(store.dialect.ts(now)),
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

/// A PTR lease a claim took: the address, and the lease with its fence.
struct PtrLease {
    ip: String,
    lease: Lease,
}

/// A provider lease a claim took.
struct ProviderLease {
    ip: String,
    provider: ProviderId,
    lease: Lease,
}

/// An `enrichd_provider_state` row's key, as a claim's statements return it.
struct ProviderKey {
    ip: String,
    provider: ProviderId,
}

/// Every lease one claim took.
#[derive(Default)]
struct Leases {
    ptr: Vec<PtrLease>,
    providers: Vec<ProviderLease>,
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
    let leases = if ptr && !wanted.is_empty() && store.dialect.writing_ctes() {
        claim_both(store, txn, joined, keys, created, wanted, lease, now, mode).await?
    } else {
        let ptr = if ptr {
            claim_ptr(store, txn, joined, keys, created, lease, now, mode).await?
        } else {
            Vec::new()
        };
        let providers = if wanted.is_empty() {
            Vec::new()
        } else {
            claim_providers(store, txn, joined, keys, wanted, lease, now, mode).await?
        };
        Leases { ptr, providers }
    };
    let mut claims: HashMap<String, Claims> = HashMap::with_capacity(keys.len());
    for PtrLease { ip, lease } in leases.ptr {
        claims.entry(ip).or_default().ptr = Some(lease);
    }
    for ProviderLease {
        ip,
        provider,
        lease,
    } in leases.providers
    {
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
/// [`crate::ip_state::ensure_ip_rows`], and the due rows among the others are leased by one
/// update, each fence coming back with the claim (`RETURNING`).
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
) -> Result<Vec<PtrLease>, StoreError> {
    let mut leases = created_ptr_leases(created, lease);
    let known: Vec<&String> = keys.iter().filter(|k| !created.contains(*k)).collect();
    if known.is_empty() {
        return Ok(leases);
    }
    let dialect = store.dialect;
    let rows = match dialect.rows_back() {
        RowsBack::Returning => {
            let Bound { text, values } =
                ptr_claim_statement(store, &known, lease, now, mode).returning(PTR_LEASED);
            joined.query_all(dialect, txn, text, values).await?
        }
    };
    for row in &rows {
        let ip: String = row.try_get("", "ip")?;
        let fence = dialect.get_ts(row, "ptr_queried_at")?;
        leases.push(PtrLease {
            ip,
            lease: newer_than(lease, fence),
        });
    }
    Ok(leases)
}

/// The PTR leases of the rows in `created`: created just now, never asked, so due and with
/// no fence.
fn created_ptr_leases(created: &HashSet<String>, lease: Lease) -> Vec<PtrLease> {
    created
        .iter()
        .map(|ip| PtrLease {
            ip: ip.clone(),
            lease,
        })
        .collect()
}

/// What the PTR lease update returns of each row it leased: its address and fence.
const PTR_LEASED: &str = "ip, ptr_queried_at";

/// The update leasing the due PTR work of `known` (rows that existed before the claim).
fn ptr_claim_statement(
    store: &Store,
    known: &[&String],
    lease: Lease,
    now: DateTime<Utc>,
    mode: ClaimMode,
) -> Bound {
    let mut p = Params::default();
    let terms = LeaseTerms::push(&mut p, store, lease, now);
    let list = p.list(known.iter().map(|k| (*k).clone()));
    let due = terms.only_due(mode, |now| {
        format!("ptr_outcome IS NULL OR ptr_expires_at <= {now}")
    });
    Bound {
        text: format!(
            "UPDATE enrichd_ip_state SET {} WHERE ip IN ({list}) AND {}{due}",
            terms.take("ptr_lease"),
            terms.takeable("ptr_lease")
        ),
        values: p.0,
    }
}

/// [`claim_ptr`] and [`claim_providers`] with their first statements as one, where the
/// dialect has data-modifying CTEs (PostgreSQL): the PTR update and the provider rows' insert
/// touch different tables and read nothing the other writes, so they go as CTEs of one
/// statement (with whatever `joined` holds) and their rows come back together, a round trip
/// fewer for every claim. The CTEs' `RETURNING` is what the outer `SELECT` reads, so this
/// path needs no other way to read rows back.
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
) -> Result<Leases, StoreError> {
    let dialect = store.dialect;
    let mut ptr_leases = created_ptr_leases(created, lease);
    let known: Vec<&String> = keys.iter().filter(|k| !created.contains(*k)).collect();
    let mut parts = Vec::with_capacity(2);
    if !known.is_empty() {
        parts.push(ptr_claim_statement(store, &known, lease, now, mode).returning(PTR_LEASED));
    }
    parts.push(provider_insert_statement(store, keys, wanted, lease, now).returning(CREATED));
    let rows = joined
        .query_parts(dialect, txn, parts, |names| {
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
    let mut inserted: Vec<ProviderKey> = Vec::new();
    for row in &rows {
        let provider: Option<String> = row.try_get("", "provider")?;
        if provider.is_some() {
            inserted.push(provider_row(row)?);
        } else {
            let ip: String = row.try_get("", "ip")?;
            let fence = dialect.get_ts(row, "fence")?;
            ptr_leases.push(PtrLease {
                ip,
                lease: newer_than(lease, fence),
            });
        }
    }
    let provider_leases =
        claim_existing_providers(store, txn, keys, wanted, &inserted, lease, now, mode).await?;
    Ok(Leases {
        ptr: ptr_leases,
        providers: provider_leases,
    })
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
) -> Result<Vec<ProviderLease>, StoreError> {
    let dialect = store.dialect;
    let created = match dialect.rows_back() {
        RowsBack::Returning => {
            let Bound { text, values } =
                provider_insert_statement(store, keys, wanted, lease, now).returning(CREATED);
            joined.query_all(dialect, txn, text, values).await?
        }
    };
    let created: Vec<ProviderKey> = created.iter().map(provider_row).collect::<Result<_, _>>()?;
    claim_existing_providers(store, txn, keys, wanted, &created, lease, now, mode).await
}

/// What the provider rows' insert returns of each row it created: its key.
const CREATED: &str = "ip, provider";

/// The insert creating the missing provider rows of `keys` already leased.
fn provider_insert_statement(
    store: &Store,
    keys: &[String],
    wanted: &[ProviderId],
    lease: Lease,
    now: DateTime<Utc>,
) -> Bound {
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
    Bound {
        text: store.dialect.insert(
            "enrichd_provider_state (ip, provider, attempts, updated_at, lease_owner, \
             lease_until)",
            &format!("VALUES {}", rows.join(", ")),
            OnConflict::Ignore {
                key: "ip, provider",
            },
        ),
        values: p.0,
    }
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
    created: &[ProviderKey],
    lease: Lease,
    now: DateTime<Utc>,
    mode: ClaimMode,
) -> Result<Vec<ProviderLease>, StoreError> {
    let dialect = store.dialect;
    // A new row has never been asked: no fence to stay above.
    let mut leases: Vec<ProviderLease> = created
        .iter()
        .map(|key| ProviderLease {
            ip: key.ip.clone(),
            provider: key.provider,
            lease,
        })
        .collect();
    if leases.len() == keys.len() * wanted.len() {
        return Ok(leases);
    }
    // Borrowed lookup keys (address, provider) of the rows created, not rows of their own.
    let fresh: HashSet<(&str, ProviderId)> = created
        .iter()
        .map(|key| (key.ip.as_str(), key.provider))
        .collect();
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
    let update = format!(
        "UPDATE enrichd_provider_state SET {} WHERE ip IN ({ips}) \
         AND provider IN ({providers}) AND {}{due}",
        terms.take("lease"),
        terms.takeable("lease")
    );
    // The rows leased, with their fences.
    let claimed = match dialect.rows_back() {
        RowsBack::Returning => {
            let text = format!("{update} RETURNING ip, provider, queried_at");
            txn.query_all_raw(dialect.stmt(text, p.0)).await?
        }
    };
    for row in &claimed {
        let ProviderKey { ip, provider } = provider_row(row)?;
        // An address with both new and old rows re-leases its new ones here: they are ours
        // already and counted once.
        if fresh.contains(&(ip.as_str(), provider)) {
            continue;
        }
        let fence = dialect.get_ts(row, "queried_at")?;
        leases.push(ProviderLease {
            ip,
            provider,
            lease: newer_than(lease, fence),
        });
    }
    Ok(leases)
}

/// The key of a row a claim statement returned (`ip`, `provider`).
fn provider_row(row: &QueryResult) -> Result<ProviderKey, StoreError> {
    let ip: String = row.try_get("", "ip")?;
    let label: String = row.try_get("", "provider")?;
    let provider = ProviderId::from_id(&label)
        .ok_or_else(|| StoreError::malformed("enrichd_provider_state.provider", label))?;
    Ok(ProviderKey { ip, provider })
}
