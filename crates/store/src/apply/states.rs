//! The write's state upserts: each address's `enrichd_ip_state` row (scope, fresh PTR state)
//! and its provider results in `enrichd_provider_state`, ending our leases on them, as parts
//! of the write's joined statement.

use chrono::{DateTime, Utc};
use sea_orm::DatabaseTransaction;

use crate::claim::Lease;
use crate::sql::{self, Assign, Joined, OnConflict, Params};
use crate::state::{ProviderState, PtrState, StoredScope};
use crate::{Store, StoreError};

/// An `enrichd_ip_state` row to change: its scope, and the PTR state when a fresh PTR answer
/// is written (which also ends our PTR lease).
pub(super) struct IpWrite {
    pub(super) key: String,
    pub(super) scope: StoredScope,
    pub(super) ptr: Option<PtrState>,
}

/// A provider result a write stores: the next state of the address at `address` (its index
/// in the batch), under the lease it was asked with.
pub(super) struct ProviderWrite {
    pub(super) address: usize,
    pub(super) state: ProviderState,
    pub(super) lease: Lease,
}

/// The assignments of an upsert that end the lease `<prefix>_until`/`<prefix>_owner` of
/// `table` when the owner placeholder `owner` (this process) holds it, and leave another
/// owner's lease alone. Both read the row's old values, so their order does not matter
/// where assignments see the stored row (PostgreSQL, SQLite); where each sees the ones
/// before it (`MySQL`), `_until` goes first and reads `_owner` before it changes.
fn end_our_lease(table: &str, prefix: &str, owner: &str) -> [Assign; 2] {
    let ours = format!("{table}.{prefix}_owner = {owner}");
    [
        Assign::To {
            column: format!("{prefix}_until"),
            value: format!("CASE WHEN {ours} THEN NULL ELSE {table}.{prefix}_until END"),
        },
        Assign::To {
            column: format!("{prefix}_owner"),
            value: format!("CASE WHEN {ours} THEN NULL ELSE {table}.{prefix}_owner END"),
        },
    ]
}

/// `columns` taking the inserted values, then `then`, then `updated_at`: the update of the
/// state upserts.
fn inserted_then(columns: &[&'static str], then: [Assign; 2]) -> Vec<Assign> {
    columns
        .iter()
        .map(|c| Assign::Inserted(c))
        .chain(then)
        .chain([Assign::Inserted("updated_at")])
        .collect()
}

/// Writes the scope and fresh PTR state of each address in `writes`: two statements at most.
pub(super) async fn write_ip_states(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    writes: &[IpWrite],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let dialect = store.dialect;
    let with_ptr: Vec<&IpWrite> = writes.iter().filter(|w| w.ptr.is_some()).collect();
    for chunk in with_ptr.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let owner = p.push(store.owner.to_string());
        let now_p = p.push(dialect.ts(now));
        let rows: Vec<String> = chunk
            .iter()
            .filter_map(|w| {
                let ptr = w.ptr.as_ref()?;
                Some(format!(
                    "({}, {}, {}, {}, {}, {}, {}, {}, {}, {now_p})",
                    p.push(w.key.clone()),
                    p.push(w.scope.as_str()),
                    p.push(ptr.name.clone()),
                    p.push(ptr.outcome.map(|o| o.as_str().to_owned())),
                    p.push(dialect.ts_opt(ptr.resolved_at)),
                    p.push(dialect.ts_opt(ptr.expires_at)),
                    p.push(i64::from(ptr.attempts)),
                    p.push(dialect.ts_opt(ptr.queried_at)),
                    p.push(ptr.forward_confirmed),
                ))
            })
            .collect();
        let set = inserted_then(
            &[
                "scope",
                "ptr_name",
                "ptr_outcome",
                "ptr_forward_confirmed",
                "ptr_resolved_at",
                "ptr_expires_at",
                "ptr_attempts",
                "ptr_queried_at",
            ],
            end_our_lease("enrichd_ip_state", "ptr_lease", &owner),
        );
        let statement = dialect.insert(
            "enrichd_ip_state (ip, scope, ptr_name, ptr_outcome, ptr_resolved_at, \
             ptr_expires_at, ptr_attempts, ptr_queried_at, ptr_forward_confirmed, updated_at)",
            &format!("VALUES {}", rows.join(", ")),
            OnConflict::Update {
                key: "ip",
                set: &set,
                only_if: None,
            },
        );
        joined.add(dialect, txn, statement, p.0).await?;
    }
    let scope_only: Vec<&IpWrite> = writes.iter().filter(|w| w.ptr.is_none()).collect();
    for chunk in scope_only.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let now_p = p.push(dialect.ts(now));
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
        let statement = dialect.insert(
            "enrichd_ip_state (ip, scope, ptr_attempts, updated_at)",
            &format!("VALUES {}", rows.join(", ")),
            OnConflict::Update {
                key: "ip",
                set: &[Assign::Inserted("scope"), Assign::Inserted("updated_at")],
                only_if: None,
            },
        );
        joined.add(dialect, txn, statement, p.0).await?;
    }
    Ok(())
}

/// Writes each of `writes` and ends our lease on each row: added to `joined`.
///
/// Each write is fenced on `queried_at` in SQL too, but the caller has already left out every
/// result whose lease is not newer than the stored `queried_at`, on rows it read under the
/// address's lock, and only a write (holding that lock) sets `queried_at`. So the fence
/// passes for every row, and what was written is known without `RETURNING`: that is what
/// lets these rows go in the same statement as the attacker rows'. Were it ever to refuse
/// one, the next pass recomputes the attacker rows from the stored state.
pub(super) async fn write_provider_states(
    store: &Store,
    txn: &DatabaseTransaction,
    joined: &mut Joined,
    keys: &[String],
    writes: &[ProviderWrite],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let dialect = store.dialect;
    for chunk in writes.chunks(sql::ROWS_PER_STATEMENT) {
        let mut p = Params::default();
        let owner = p.push(store.owner.to_string());
        let now_p = p.push(dialect.ts(now));
        let rows: Vec<String> = chunk
            .iter()
            .map(
                |ProviderWrite {
                     address,
                     state: next,
                     lease,
                 }| {
                    let fields = next
                        .fields
                        .as_ref()
                        .and_then(|f| serde_json::to_value(f).ok());
                    let expires = p.push(dialect.ts_opt(next.next_attempt_at));
                    format!(
                        "({}, {}, {}, {}, {}, {}, {}, {}, {expires}, {expires}, {}, {}, {now_p})",
                        p.push(keys[*address].clone()),
                        p.push(next.provider.as_str()),
                        p.push(next.outcome.map(|o| o.as_str().to_owned())),
                        p.push(next.verdict.map(|v| v.as_str().to_owned())),
                        p.push_json(dialect, fields.as_ref()),
                        p.push_json(dialect, next.raw.as_deref()),
                        p.push(dialect.ts_opt(next.answered_at)),
                        p.push(dialect.ts(lease.claimed_at)),
                        p.push(i64::from(next.attempts)),
                        p.push(next.last_error.clone()),
                    )
                },
            )
            .collect();
        let set = inserted_then(
            &[
                "outcome",
                "verdict",
                "fields",
                "raw",
                "answered_at",
                "queried_at",
                "expires_at",
                "next_attempt_at",
                "attempts",
                "last_error",
            ],
            end_our_lease("enrichd_provider_state", "lease", &owner),
        );
        let fence = format!(
            "enrichd_provider_state.queried_at IS NULL \
             OR enrichd_provider_state.queried_at < {}",
            dialect.inserted("queried_at")
        );
        let statement = dialect.insert(
            "enrichd_provider_state (ip, provider, outcome, verdict, fields, raw, answered_at, \
             queried_at, expires_at, next_attempt_at, attempts, last_error, updated_at)",
            &format!("VALUES {}", rows.join(", ")),
            OnConflict::Update {
                key: "ip, provider",
                set: &set,
                only_if: Some(&fence),
            },
        );
        joined.add(dialect, txn, statement, p.0).await?;
    }
    Ok(())
}
