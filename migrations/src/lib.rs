//! enrichd schema migrations, one library linked into the binary (`enrichd migrate` and
//! auto-migration run them).
//!
//! The compatible tables (`attackers`, `attacker_intel`) keep the reference's names and types
//! and are created only when absent, because the reference may own them; whether this
//! migration created `attackers` is recorded in `enrichd_meta` (`owns_attackers`), and decides
//! whether enrichd may ever insert attacker rows. enrichd's own state lives in `enrichd_*`
//! tables. The DDL is written per backend rather than through the schema builder so that
//! types are exactly the contract's: `timestamp without time zone` and `json` on PostgreSQL,
//! `DATETIME` holding `YYYY-MM-DD HH:MM:SS.ffffff` text and `TEXT` holding JSON on SQLite.
//!
//! # Layout
//! - [`Migrator`]: the ordered migration list.
//! - [`SCHEMA_VERSION`]: the schema this binary understands, recorded in `enrichd_meta`.
//! - [`meta`]: key names of `enrichd_meta`.

mod m0001_initial;
mod m0002_ptr_forward_confirmed;

use sea_orm_migration::prelude::*;

/// The schema version this binary writes and understands. Every migration that changes the
/// schema bumps it and records it in `enrichd_meta`, so an older binary can see it is behind.
pub const SCHEMA_VERSION: i64 = 2;

/// Key names of the `enrichd_meta` table.
pub mod meta {
    /// Name of the key/value table.
    pub const TABLE: &str = "enrichd_meta";
    /// `"true"` only when enrichd's own migration created `attackers`.
    pub const OWNS_ATTACKERS: &str = "owns_attackers";
    /// The schema version last migrated to (decimal text).
    pub const SCHEMA_VERSION: &str = "schema_version";
}

/// Every enrichd migration, in order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m0001_initial::Migration),
            Box::new(m0002_ptr_forward_confirmed::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        // A prefixed name keeps the reference's own migration bookkeeping (if any) separate.
        Alias::new("enrichd_migrations").into_iden()
    }
}
