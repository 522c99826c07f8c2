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
//! - [`work`]: leases ([`Store::claim_work`], [`Store::claim_batch`]) and the per-IP write
//!   ([`Store::apply`], [`Store::apply_batch`]).
//! - [`intake`]: [`Store::note_event`], attacker mapping, [`Store::backlog`], read-only views.
//! - [`gate`]: cluster-wide rate, quota and park state ([`ProviderGate`] for [`Store`]).
//! - [`outbox`]: claim, delete-by-version, stats.
//! - [`waiting`]: work owed but not takeable yet, for `enrichd backfill`'s end.
//! - [`state`]: stored state as values and the pure merge into `attacker_intel` columns.
//! - [`error`]: [`StoreError`] and its fate.
//!
//! [`ProviderGate`]: enrichd_core::ports::ProviderGate

pub mod error;
pub mod gate;
pub mod intake;
pub mod outbox;
mod slots;
mod sql;
pub mod state;
pub mod store;
pub mod waiting;
pub mod work;

pub use error::{StoreError, StoreFate};
pub use gate::ProviderStatus;
pub use intake::{EventNote, Intake};
pub use outbox::{OutboxRow, OutboxStats};
pub use state::{ApplyContext, ProviderState, PtrState, StoredScope};
pub use store::{SchemaStatus, Store};
pub use waiting::{WaitReason, WaitingWork};
pub use work::{ApplyItem, ApplyOutcome, ClaimMode, ClaimSettings, Claims, Lease};

/// SQLite timestamp text as enrichd writes it (`YYYY-MM-DD HH:MM:SS.ffffff`), for tests and
/// tools that compare stored text.
pub fn sqlite_timestamp_text(value: chrono::DateTime<chrono::Utc>) -> String {
    sql::sqlite_ts_text(sql::micros(value))
}
