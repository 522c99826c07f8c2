//! enrichd persistence over sea-orm, on PostgreSQL (clustered) and SQLite (embedded).
//!
//! The `RepositoryWriter` actor, `enrichd lookup`/`backfill` and the provider actors' rate
//! gate all go through one [`Store`]. The database is the source of truth: work is keyed by
//! canonical IP, leases and rate slots are taken on the database clock, and each IP's results
//! are written in one transaction that locks the IP's state row first, so any number of
//! replicas cooperate without a coordinator of their own.
//!
//! # Layout
//! - [`store`]: connecting, migrating (under a PostgreSQL advisory lock), the schema check,
//!   the database clock, releasing leases.
//! - [`claim`]: leases ([`Store::claim_work`], [`Store::claim_batch`]), deferring and giving
//!   them back.
//! - [`apply`]: the per-IP write ([`Store::apply`], [`Store::apply_batch`]).
//! - `transition`: the pure state transitions the write applies, and the claim's fence.
//! - `attackers`: attacker rows mapped to canonical IPs, created, and the rows each attacker
//!   of a written address sees (`attacker_intel`, `ptr_record`).
//! - `ip_state`: the per-IP state rows, created, locked in key order and read back.
//! - [`intake`]: [`Store::note_event`], attacker discovery, [`Store::backlog`].
//! - `views`: read-only views of stored state ([`Store::lookup_view`]).
//! - [`gate`]: cluster-wide rate, quota and park state ([`ProviderGate`] for [`Store`]).
//! - [`outbox`]: rows enqueued by writes; claim, delete-by-version, stats.
//! - [`waiting`]: work owed but not takeable yet, for `enrichd backfill`'s end.
//! - [`state`]: stored state as values and the pure merge into `attacker_intel` columns.
//! - `sql`: binding, decoding and the statement fragments that differ by backend.
//! - [`error`]: [`StoreError`] and its fate.
//!
//! [`ProviderGate`]: enrichd_core::ports::ProviderGate

pub mod apply;
mod attackers;
pub mod claim;
pub mod error;
pub mod gate;
pub mod intake;
mod ip_state;
pub mod outbox;
mod slots;
mod sql;
pub mod state;
pub mod store;
mod transition;
mod views;
pub mod waiting;

pub use apply::{ApplyItem, ApplyOutcome};
pub use claim::{ClaimMode, ClaimSettings, Claims, Lease};
pub use error::{StoreError, StoreFate};
pub use gate::ProviderStatus;
pub use intake::{EventNote, Intake};
pub use outbox::{OutboxRow, OutboxStats};
pub use state::{ApplyContext, ProviderState, PtrState, StoredScope};
pub use store::{SchemaStatus, Store};
pub use waiting::{WaitReason, WaitingWork};

/// SQLite timestamp text as enrichd writes it (`YYYY-MM-DD HH:MM:SS.ffffff`), for tests and
/// tools that compare stored text.
pub fn sqlite_timestamp_text(value: chrono::DateTime<chrono::Utc>) -> String {
    sql::sqlite_ts_text(sql::micros(value))
}
