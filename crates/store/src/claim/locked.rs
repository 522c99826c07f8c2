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

/// One claim of the work of addresses whose `enrichd_ip_state` rows a transaction has locked:
/// what it claims, and under which lease.
pub(crate) struct LockedClaim<'a> {
    pub(crate) store: &'a Store,
    pub(crate) txn: &'a DatabaseTransaction,
    /// The addresses (sorted, unique); their rows exist and are locked by `txn`.
    pub(crate) keys: &'a [String],
    /// Those of `keys` this transaction created, already holding the PTR lease.
    pub(crate) created: &'a HashSet<String>,
    /// The providers to claim, each once.
    pub(crate) wanted: &'a [ProviderId],
    /// Whether PTR work is claimed.
    pub(crate) ptr: bool,
    pub(crate) lease: Lease,
    /// The transaction's clock.
    pub(crate) now: DateTime<Utc>,
    pub(crate) mode: ClaimMode,
}

impl LockedClaim<'_> {
    /// Claims the work, each address's claims by address. The claim's first statement carries
    /// `joined`, whose parts must write neither `enrichd_ip_state` nor
    /// `enrichd_provider_state`.
    pub(crate) async fn run(
        &self,
        joined: &mut Joined,
    ) -> Result<HashMap<String, Claims>, StoreError> {
        let leases = if self.ptr && !self.wanted.is_empty() && self.store.dialect.writing_ctes() {
            self.claim_both(joined).await?
        } else {
            let ptr = if self.ptr {
                self.claim_ptr(joined).await?
            } else {
                Vec::new()
            };
            let providers = if self.wanted.is_empty() {
                Vec::new()
            } else {
                self.claim_providers(joined).await?
            };
            Leases { ptr, providers }
        };
        let mut claims: HashMap<String, Claims> = HashMap::with_capacity(self.keys.len());
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
    /// [`crate::ip_state::ensure_ip_rows`], and the due rows among the others are leased by
    /// one update, each fence coming back with the claim (`RETURNING`).
    async fn claim_ptr(&self, joined: &mut Joined) -> Result<Vec<PtrLease>, StoreError> {
        let mut leases = self.created_ptr_leases();
        let known = self.known();
        if known.is_empty() {
            return Ok(leases);
        }
        let dialect = self.store.dialect;
        let rows = match dialect.rows_back() {
            RowsBack::Returning => {
                let Bound { text, values } = self.ptr_statement(&known).returning(PTR_LEASED);
                joined.query_all(dialect, self.txn, text, values).await?
            }
        };
        for row in &rows {
            let ip: String = row.try_get("", "ip")?;
            let fence = dialect.get_ts(row, "ptr_queried_at")?;
            leases.push(PtrLease {
                ip,
                lease: newer_than(self.lease, fence),
            });
        }
        Ok(leases)
    }

    /// The PTR leases of the rows in `created`: created just now, never asked, so due and
    /// with no fence.
    fn created_ptr_leases(&self) -> Vec<PtrLease> {
        self.created
            .iter()
            .map(|ip| PtrLease {
                ip: ip.clone(),
                lease: self.lease,
            })
            .collect()
    }

    /// The rows of `keys` that existed before the claim.
    fn known(&self) -> Vec<&String> {
        self.keys
            .iter()
            .filter(|k| !self.created.contains(*k))
            .collect()
    }

    /// The update leasing the due PTR work of `known` (rows that existed before the claim).
    fn ptr_statement(&self, known: &[&String]) -> Bound {
        let mut p = Params::default();
        let terms = LeaseTerms::push(&mut p, self.store, self.lease, self.now);
        let list = p.list(known.iter().map(|k| (*k).clone()));
        let due = terms.only_due(self.mode, |now| {
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

    /// [`LockedClaim::claim_ptr`] and [`LockedClaim::claim_providers`] with their first
    /// statements as one, where the dialect has data-modifying CTEs (PostgreSQL): the PTR
    /// update and the provider rows' insert touch different tables and read nothing the
    /// other writes, so they go as CTEs of one statement (with whatever `joined` holds) and
    /// their rows come back together, a round trip fewer for every claim. The CTEs'
    /// `RETURNING` is what the outer `SELECT` reads, so this path needs no other way to read
    /// rows back.
    async fn claim_both(&self, joined: &mut Joined) -> Result<Leases, StoreError> {
        let dialect = self.store.dialect;
        let mut ptr_leases = self.created_ptr_leases();
        let known = self.known();
        let mut parts = Vec::with_capacity(2);
        if !known.is_empty() {
            parts.push(self.ptr_statement(&known).returning(PTR_LEASED));
        }
        parts.push(self.provider_insert().returning(CREATED));
        let rows = joined
            .query_parts(dialect, self.txn, parts, |names| {
                let inserted = names.last().map_or("", String::as_str);
                match names {
                    [ptr, _] => format!(
                        "SELECT ip, NULL::varchar AS provider, ptr_queried_at AS fence \
                         FROM {ptr} UNION ALL SELECT ip, provider, NULL::timestamp \
                         FROM {inserted}"
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
                    lease: newer_than(self.lease, fence),
                });
            }
        }
        let provider_leases = self.claim_existing_providers(&inserted).await?;
        Ok(Leases {
            ptr: ptr_leases,
            providers: provider_leases,
        })
    }

    /// Creates the missing provider rows of `keys` already leased, then leases the due ones
    /// among the rows that existed: one statement for each, whatever the number of addresses.
    /// The fence of each lease comes back with the claim (`RETURNING`). A new address's rows
    /// are written once, not inserted and then rewritten by the lease, which halved the
    /// provider-state updates of a backfill of new addresses.
    async fn claim_providers(&self, joined: &mut Joined) -> Result<Vec<ProviderLease>, StoreError> {
        let dialect = self.store.dialect;
        let created = match dialect.rows_back() {
            RowsBack::Returning => {
                let Bound { text, values } = self.provider_insert().returning(CREATED);
                joined.query_all(dialect, self.txn, text, values).await?
            }
        };
        let created: Vec<ProviderKey> =
            created.iter().map(provider_row).collect::<Result<_, _>>()?;
        self.claim_existing_providers(&created).await
    }

    /// The insert creating the missing provider rows of `keys` already leased.
    fn provider_insert(&self) -> Bound {
        let mut p = Params::default();
        let terms = LeaseTerms::push(&mut p, self.store, self.lease, self.now);
        let ip_params: Vec<String> = self.keys.iter().map(|k| p.push(k.clone())).collect();
        let provider_params: Vec<String> = self.wanted.iter().map(|w| p.push(w.as_str())).collect();
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
            text: self.store.dialect.insert(
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

    /// The provider leases of a claim whose insert created the rows in `created`: those, and
    /// the due ones among the rows that existed, leased by one update.
    async fn claim_existing_providers(
        &self,
        created: &[ProviderKey],
    ) -> Result<Vec<ProviderLease>, StoreError> {
        let dialect = self.store.dialect;
        // A new row has never been asked: no fence to stay above.
        let mut leases: Vec<ProviderLease> = created
            .iter()
            .map(|key| ProviderLease {
                ip: key.ip.clone(),
                provider: key.provider,
                lease: self.lease,
            })
            .collect();
        if leases.len() == self.keys.len() * self.wanted.len() {
            return Ok(leases);
        }
        // Borrowed lookup keys (address, provider) of the rows created, not rows of their own.
        let fresh: HashSet<(&str, ProviderId)> = created
            .iter()
            .map(|key| (key.ip.as_str(), key.provider))
            .collect();
        let existing = self.keys.iter().filter(|k| {
            self.wanted
                .iter()
                .any(|w| !fresh.contains(&(k.as_str(), *w)))
        });

        let mut p = Params::default();
        let terms = LeaseTerms::push(&mut p, self.store, self.lease, self.now);
        let ips = p.list(existing.cloned());
        let providers = p.list(self.wanted.iter().map(|w| w.as_str()));
        let due = terms.only_due(self.mode, |now| {
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
                self.txn.query_all_raw(dialect.stmt(text, p.0)).await?
            }
        };
        for row in &claimed {
            let ProviderKey { ip, provider } = provider_row(row)?;
            // An address with both new and old rows re-leases its new ones here: they are
            // ours already and counted once.
            if fresh.contains(&(ip.as_str(), provider)) {
                continue;
            }
            let fence = dialect.get_ts(row, "queried_at")?;
            leases.push(ProviderLease {
                ip,
                provider,
                lease: newer_than(self.lease, fence),
            });
        }
        Ok(leases)
    }
}

/// What the PTR lease update returns of each row it leased: its address and fence.
const PTR_LEASED: &str = "ip, ptr_queried_at";

/// What the provider rows' insert returns of each row it created: its key.
const CREATED: &str = "ip, provider";

/// The key of a row a claim statement returned (`ip`, `provider`).
fn provider_row(row: &QueryResult) -> Result<ProviderKey, StoreError> {
    let ip: String = row.try_get("", "ip")?;
    let label: String = row.try_get("", "provider")?;
    let provider = ProviderId::from_id(&label)
        .ok_or_else(|| StoreError::malformed("enrichd_provider_state.provider", label))?;
    Ok(ProviderKey { ip, provider })
}
