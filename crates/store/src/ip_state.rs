//! The per-IP state rows (`enrichd_ip_state`, `enrichd_provider_state`): creating and
//! locking them in the one order every writer uses, and reading them back as values.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use enrichd_core::{CanonicalIp, ProviderFields, ProviderId, ProviderOutcome, PtrOutcome, Verdict};
use sea_orm::{ConnectionTrait, DatabaseTransaction, QueryResult};

use crate::sql::{self, Dialect, OnConflict, Params, RowsBack};
use crate::state::{ProviderState, PtrState};
use crate::{Store, StoreError};

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
    let dialect = store.dialect;
    let mut created = HashSet::new();
    for keys in keys.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let now_p = p.push(dialect.ts(now));
        let (columns, lease) = match ptr_lease {
            Some(until) => (
                ", ptr_lease_owner, ptr_lease_until",
                format!(
                    ", {}, {}",
                    p.push(store.owner.to_string()),
                    p.push(dialect.ts(until))
                ),
            ),
            None => ("", String::new()),
        };
        let rows: Vec<String> = keys
            .iter()
            .map(|k| format!("({}, 0, {now_p}{lease})", p.push(k.clone())))
            .collect();
        let insert = dialect.insert(
            &format!("enrichd_ip_state (ip, ptr_attempts, updated_at{columns})"),
            &format!("VALUES {}", rows.join(", ")),
            OnConflict::Ignore { key: "ip" },
        );
        // The rows this insert created, and only those: a claim leases them as it creates
        // them and reads none of them back.
        let inserted = match dialect.rows_back() {
            RowsBack::Returning => {
                txn.query_all_raw(dialect.stmt(format!("{insert} RETURNING ip"), p.0))
                    .await?
            }
        };
        for row in &inserted {
            created.insert(row.try_get::<String>("", "ip")?);
        }
    }
    Ok(created)
}

/// Locks the `enrichd_ip_state` rows of `keys` in key order (where rows are locked; a
/// single writer's transaction already excludes every other writer) and returns their
/// `columns`.
pub(crate) async fn lock_ip_rows(
    store: &Store,
    txn: &DatabaseTransaction,
    keys: &[String],
    columns: &str,
) -> Result<Vec<QueryResult>, StoreError> {
    let dialect = store.dialect;
    let mut rows = Vec::with_capacity(keys.len());
    for keys in keys.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let list = p.list(keys.iter().cloned());
        rows.extend(
            txn.query_all_raw(dialect.stmt(
                format!(
                    "SELECT {columns} FROM enrichd_ip_state WHERE ip IN ({list}) ORDER BY {}{}",
                    dialect.byte_order("ip"),
                    dialect.for_update()
                ),
                p.0,
            ))
            .await?,
        );
    }
    Ok(rows)
}

fn count(value: Option<i64>) -> u32 {
    value.and_then(|v| u32::try_from(v).ok()).unwrap_or(0)
}

pub(crate) fn read_ptr(store: &Store, row: &QueryResult) -> Result<PtrState, StoreError> {
    let dialect = store.dialect;
    let outcome: Option<String> = row.try_get("", "ptr_outcome")?;
    let outcome = outcome
        .map(|o| PtrOutcome::from_label(&o).ok_or_else(|| StoreError::malformed("ptr_outcome", o)))
        .transpose()?;
    Ok(PtrState {
        name: row.try_get("", "ptr_name")?,
        outcome,
        resolved_at: dialect.get_ts(row, "ptr_resolved_at")?,
        expires_at: dialect.get_ts(row, "ptr_expires_at")?,
        attempts: count(dialect.get_i64(row, "ptr_attempts")?),
        queried_at: dialect.get_ts(row, "ptr_queried_at")?,
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
    let dialect = store.dialect;
    let mut states: HashMap<String, Vec<ProviderState>> = HashMap::with_capacity(keys.len());
    for keys in keys.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let list = p.list(keys.iter().cloned());
        let rows = db
            .query_all_raw(dialect.stmt(
                format!(
                    "SELECT * FROM enrichd_provider_state WHERE ip IN ({list}) \
                     ORDER BY ip, provider"
                ),
                p.0,
            ))
            .await?;
        for row in &rows {
            if let Some(StateRow { ip, state }) = provider_state_row(dialect, row)? {
                states.entry(ip).or_default().push(state);
            }
        }
    }
    Ok(states)
}

/// An `enrichd_provider_state` row read back: its address and the state it holds.
pub(crate) struct StateRow {
    pub(crate) ip: String,
    pub(crate) state: ProviderState,
}

/// An `enrichd_provider_state` row's address and state; `None` for a provider this binary
/// does not know.
pub(crate) fn provider_state_row(
    dialect: Dialect,
    row: &QueryResult,
) -> Result<Option<StateRow>, StoreError> {
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
    let fields = dialect
        .get_json(row, "fields")?
        .and_then(|f| serde_json::from_value::<ProviderFields>(f).ok());
    let state = ProviderState {
        provider,
        outcome,
        verdict: verdict.as_deref().and_then(Verdict::from_label),
        fields,
        raw: dialect.get_json(row, "raw")?.map(std::sync::Arc::new),
        answered_at: dialect.get_ts(row, "answered_at")?,
        queried_at: dialect.get_ts(row, "queried_at")?,
        next_attempt_at: dialect.get_ts(row, "next_attempt_at")?,
        attempts: count(dialect.get_i64(row, "attempts")?),
        last_error: row.try_get("", "last_error")?,
    };
    Ok(Some(StateRow { ip, state }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
