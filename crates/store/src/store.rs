//! The [`Store`] handle: connecting, migrating, the schema check and the database clock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use enrichd_migrations::{Migrator, SCHEMA_VERSION, meta};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    QueryResult, SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;

use crate::StoreError;
use crate::sql::{Dialect, MigrationLock};

/// PostgreSQL advisory lock key held while migrating ("enrichd" in ASCII), so replicas
/// starting together never race on the schema.
const MIGRATION_LOCK_KEY: i64 = 0x0065_6e72_6963_6864;

/// The column in which the first statement of a keyed write returns the database clock
/// (see [`Store::begin_keyed_write`]).
const CLOCK_COLUMN: &str = "db_now";

/// Connections in the PostgreSQL pool of one process. The runtime's store batcher opens its
/// own nine besides ([`Store::with_own_pool`]), three of them in use unless it has a backlog
/// (the others are opened then, and closed once idle): sixteen a process at most, so six
/// replicas fit PostgreSQL's default of 100.
const PG_POOL_SIZE: u32 = 7;

/// Prepared statements kept per PostgreSQL connection (see `postgres_options`).
const PG_STATEMENT_CACHE: usize = 250;

/// Read connections on SQLite (the writer is always exactly one).
const SQLITE_READERS: u32 = 4;

/// How the database schema compares with what this binary understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaStatus {
    /// Migrated to exactly this binary's version.
    Current,
    /// Not migrated yet, or to an older version (`None`: no enrichd schema at all).
    Behind {
        /// The version recorded in the database.
        found: Option<i64>,
    },
    /// Migrated by a newer binary: this one must not run against it.
    Ahead {
        /// The version recorded in the database.
        found: i64,
    },
}

/// enrichd's persistence: one handle per process, cheap to clone (the pools are shared).
///
/// Every lease taken through a `Store` (and its clones) carries the same random owner id, so
/// a process recognises its own leases and another process never mistakes them for its own.
#[derive(Clone)]
pub struct Store {
    /// The writer: on SQLite a pool of exactly one connection, every transaction
    /// `BEGIN IMMEDIATE`; on PostgreSQL the shared pool.
    pub(crate) write: DatabaseConnection,
    /// Readers: on SQLite a separate pool (WAL lets them run beside the writer); on
    /// PostgreSQL the same pool as `write`.
    pub(crate) read: DatabaseConnection,
    /// The backend's SQL dialect: every statement asks it for the words that differ.
    pub(crate) dialect: Dialect,
    pub(crate) owner: Arc<str>,
    /// Kept to open the dedicated migration connection; never printed (it may hold a password).
    url: Arc<str>,
    /// Recently read limits rows of unmetered providers (see `gate`).
    pub(crate) gate_cache: crate::gate::GateCache,
    /// Rate slots this replica took ahead and hands out ([`crate::slots`]).
    pub(crate) slot_blocks: crate::slots::SlotBlocks,
    /// Whether enrichd's migration created `attackers` (read once; see `owns_attackers_in`).
    owns_attackers_cache: Arc<std::sync::OnceLock<bool>>,
    /// PostgreSQL sessions opened with the keyed writes' planning settings
    /// ([`Store::with_own_pool`]).
    keyed_sessions: bool,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.dialect.backend())
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

fn sqlite_options(url: &str, max_connections: u32) -> ConnectOptions {
    let mut opt = ConnectOptions::new(url.to_owned());
    opt.max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(40))
        .sqlx_logging(false)
        .map_sqlx_sqlite_opts(|o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30))
                .foreign_keys(true)
        });
    opt
}

fn postgres_options(url: &str, max_connections: u32, sessions: Sessions) -> ConnectOptions {
    let mut opt = ConnectOptions::new(url.to_owned());
    opt.max_connections(max_connections)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(10))
        // sqlx keeps retrying a refused connect until this deadline; an outage should
        // surface as `Unavailable` soon enough for intake to pause.
        .acquire_timeout(Duration::from_secs(10))
        .sqlx_logging(false)
        // Batches give each statement shape one text per batch size (`IN` lists, multi-row
        // `VALUES`; the runtime's batcher keeps to twelve sizes), over a hundred
        // texts in all; sqlx's default cache of 100 prepared statements per connection
        // evicted and re-planned them all the time.
        //
        // JIT compilation is off for our sessions: it pays only for long analytical queries,
        // and its thresholds are plan costs. With `enable_seqscan` off (see `begin_write_at`)
        // a statement that can only scan a table costs over 10^10, so LLVM compiled, inlined
        // and optimised it on every execution: releasing the leases at shutdown (no index on
        // the owner) took 117 and 33 ms that way, and 1.7 and 0.2 ms without.
        .map_sqlx_postgres_opts(move |o| {
            let o = o
                .statement_cache_capacity(PG_STATEMENT_CACHE)
                .options([("jit", "off")]);
            match sessions {
                Sessions::Shared => o,
                // What `begin_write_at` sets per transaction (see there), set once per session.
                Sessions::Keyed => o.options([
                    ("enable_seqscan", "off"),
                    ("enable_mergejoin", "off"),
                    ("enable_hashjoin", "off"),
                    ("plan_cache_mode", "force_generic_plan"),
                ]),
            }
        });
    opt
}

/// What a pool's PostgreSQL sessions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sessions {
    /// Anything, scans included: the transactions that need index-only planning say so
    /// themselves (`begin_write_at`).
    Shared,
    /// Only writes keyed by address, attacker or provider, so the planning settings are the
    /// sessions' own and a transaction need not set them (see [`Store::begin_keyed_write`]).
    Keyed,
}

impl Store {
    /// Connects to `url` (`postgres://…` or `sqlite://…`). Nothing is migrated.
    ///
    /// SQLite gets WAL, `synchronous=NORMAL`, `busy_timeout=30000`, foreign keys on, one
    /// writer connection and a few readers; PostgreSQL a pool of seven.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let dialect = Dialect::of_url(url).ok_or(StoreError::UnsupportedUrl)?;
        let (write, read) = match dialect {
            Dialect::Postgres => {
                let options = postgres_options(url, PG_POOL_SIZE, Sessions::Shared);
                let pool = Database::connect(options)
                    .await
                    .map_err(StoreError::from_db)?;
                (pool.clone(), pool)
            }
            Dialect::Sqlite => {
                // The writer connects first so that it creates the file (`mode=rwc`) and
                // switches it to WAL before any reader opens it.
                let write = Database::connect(sqlite_options(url, 1))
                    .await
                    .map_err(StoreError::from_db)?;
                let in_memory = url.contains(":memory:") || url.contains("mode=memory");
                let read = if in_memory {
                    // Each connection to an in-memory database is a separate database.
                    write.clone()
                } else {
                    Database::connect(sqlite_options(url, SQLITE_READERS))
                        .await
                        .map_err(StoreError::from_db)?
                };
                (write, read)
            }
        };
        Ok(Self {
            write,
            read,
            dialect,
            owner: uuid::Uuid::new_v4().simple().to_string().into(),
            url: url.into(),
            gate_cache: crate::gate::GateCache::default(),
            slot_blocks: crate::slots::SlotBlocks::default(),
            owns_attackers_cache: Arc::default(),
            keyed_sessions: false,
        })
    }

    /// This handle with a PostgreSQL pool of its own, of `max_connections`, opened lazily:
    /// the same owner (its leases are this process's) and the same caches. Its sessions plan
    /// for keyed writes only (index scans), so it is for [`Store::note_events`],
    /// [`Store::claim_batch`] and [`Store::apply_batch`], which then save a round trip per
    /// transaction (see `Store::begin_keyed_write`).
    ///
    /// Why: a connection's socket belongs to the runtime that opened it, and only that
    /// runtime's thread notices it became readable. A component that runs on a thread of its
    /// own (the runtime's store batcher) calls this on that thread, so its statements neither
    /// wait for nor load the thread the rest of the process shares. On SQLite the handle is
    /// shared as it is: one writer connection is the rule there, and sqlx runs every SQLite
    /// connection on a thread of its own anyway.
    ///
    /// # Errors
    /// `Unavailable` when the pool cannot be set up (nothing is connected yet).
    pub async fn with_own_pool(&self, max_connections: u32) -> Result<Self, StoreError> {
        let mut options = match self.dialect {
            Dialect::Postgres => postgres_options(&self.url, max_connections, Sessions::Keyed),
            Dialect::Sqlite => return Ok(self.clone()),
        };
        options.connect_lazy(true);
        let pool = Database::connect(options)
            .await
            .map_err(StoreError::from_db)?;
        Ok(Self {
            write: pool.clone(),
            read: pool,
            keyed_sessions: true,
            ..self.clone()
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> DbBackend {
        self.dialect.backend()
    }

    /// Whether the database takes one writer at a time (SQLite): running several write
    /// transactions at once then only queues them.
    pub fn single_writer(&self) -> bool {
        self.dialect.single_writer()
    }

    /// This process's lease owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Runs the migrations, serialised with other replicas migrating at once (on PostgreSQL
    /// under an advisory lock held on one dedicated connection). Refuses a schema newer than
    /// this binary.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let dialect = self.dialect;
        let (lock, unlock) = match dialect.migration_lock() {
            MigrationLock::WriteTransaction => {
                self.refuse_newer_schema().await?;
                // The write lock up front serialises migrating processes on one file; each
                // migration's own transaction nests as a savepoint.
                let txn = self.begin_write().await?;
                Migrator::up(&txn, None)
                    .await
                    .map_err(StoreError::Migration)?;
                txn.commit().await?;
                return Ok(());
            }
            MigrationLock::Session { lock, unlock } => (lock, unlock),
        };
        let options = match dialect {
            Dialect::Postgres => postgres_options(&self.url, 1, Sessions::Shared),
            Dialect::Sqlite => sqlite_options(&self.url, 1),
        };
        let conn = Database::connect(options)
            .await
            .map_err(StoreError::from_db)?;
        let result = async {
            conn.execute_raw(dialect.stmt(lock, vec![MIGRATION_LOCK_KEY.into()]))
                .await?;
            self.refuse_newer_schema().await?;
            Migrator::up(&conn, None)
                .await
                .map_err(StoreError::Migration)?;
            conn.execute_raw(dialect.stmt(unlock, vec![MIGRATION_LOCK_KEY.into()]))
                .await?;
            Ok(())
        }
        .await;
        // Closing the connection also releases the lock if a step above failed.
        let _ = conn.close().await;
        result
    }

    async fn refuse_newer_schema(&self) -> Result<(), StoreError> {
        match self.schema_status().await? {
            SchemaStatus::Ahead { found } => Err(StoreError::SchemaAhead {
                found,
                supported: SCHEMA_VERSION,
            }),
            SchemaStatus::Current | SchemaStatus::Behind { .. } => Ok(()),
        }
    }

    /// How the database schema compares with this binary's.
    pub async fn schema_status(&self) -> Result<SchemaStatus, StoreError> {
        let exists = self.dialect.table_exists(meta::TABLE);
        let row = self
            .read
            .query_one_raw(self.dialect.stmt(exists, vec![]))
            .await?;
        let exists = row
            .map(|r| r.try_get::<i64>("", "n"))
            .transpose()?
            .unwrap_or(0)
            > 0;
        if !exists {
            return Ok(SchemaStatus::Behind { found: None });
        }
        let found = self
            .meta_value(&self.read, meta::SCHEMA_VERSION)
            .await?
            .and_then(|v| v.parse::<i64>().ok());
        Ok(match found {
            Some(v) if v == SCHEMA_VERSION => SchemaStatus::Current,
            Some(v) if v > SCHEMA_VERSION => SchemaStatus::Ahead { found: v },
            other => SchemaStatus::Behind { found: other },
        })
    }

    pub(crate) async fn meta_value<C: ConnectionTrait>(
        &self,
        db: &C,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        let select = format!("SELECT value FROM {} WHERE key = $1", meta::TABLE);
        let row = db
            .query_one_raw(self.dialect.stmt(select, vec![key.into()]))
            .await?;
        Ok(row.map(|r| r.try_get::<String>("", "value")).transpose()?)
    }

    /// Whether enrichd's own migration created `attackers` (only then may it insert rows).
    pub async fn owns_attackers(&self) -> Result<bool, StoreError> {
        self.owns_attackers_in(&self.read).await
    }

    pub(crate) async fn owns_attackers_in<C: ConnectionTrait>(
        &self,
        db: &C,
    ) -> Result<bool, StoreError> {
        // Decided once, by the migration that created (or found) `attackers`; never changes
        // after, so one read per process is enough.
        if let Some(owned) = self.owns_attackers_cache.get() {
            return Ok(*owned);
        }
        let Some(value) = self.meta_value(db, meta::OWNS_ATTACKERS).await? else {
            // Not migrated yet: decide nothing for good.
            return Ok(false);
        };
        let owned = value == "true";
        let _ = self.owns_attackers_cache.set(owned);
        Ok(owned)
    }

    /// The database's current UTC time: every lease, slot and due time is on this clock.
    pub async fn db_now(&self) -> Result<DateTime<Utc>, StoreError> {
        self.dialect.now(&self.read).await
    }

    /// Starts a write transaction: `BEGIN IMMEDIATE` on SQLite (the write lock up front, so a
    /// transaction never fails to upgrade), `BEGIN` with the write settings on PostgreSQL
    /// ([`Store::begin_write_at`], whose clock is not needed here).
    pub(crate) async fn begin_write(&self) -> Result<DatabaseTransaction, StoreError> {
        Ok(self.begin_write_at().await?.0)
    }

    /// What the first statement of a transaction from [`Store::begin_keyed_write`] selects
    /// or returns beside its own columns, so that [`Store::keyed_clock`] finds the clock in
    /// its rows; nothing when `clock` was read already.
    pub(crate) fn clock_item(&self, clock: Option<DateTime<Utc>>) -> Option<String> {
        clock
            .is_none()
            .then(|| format!("{} AS {CLOCK_COLUMN}", self.dialect.now_expr()))
    }

    /// The clock of a transaction from [`Store::begin_keyed_write`]: `clock` when it was
    /// read, else the [`CLOCK_COLUMN`] of `first` (a row of the transaction's first
    /// statement), else read now because that statement returned no row.
    pub(crate) async fn keyed_clock(
        &self,
        txn: &DatabaseTransaction,
        clock: Option<DateTime<Utc>>,
        first: Option<&QueryResult>,
    ) -> Result<DateTime<Utc>, StoreError> {
        if let Some(now) = clock {
            return Ok(now);
        }
        match first {
            Some(row) => self
                .dialect
                .get_ts(row, CLOCK_COLUMN)?
                .ok_or_else(|| StoreError::malformed(CLOCK_COLUMN, "null")),
            None => self.dialect.now(txn).await,
        }
    }

    /// `BEGIN IMMEDIATE` on SQLite, `BEGIN` on PostgreSQL, and nothing else.
    async fn begin_bare(&self) -> Result<DatabaseTransaction, StoreError> {
        let options = TransactionOptions {
            sqlite_transaction_mode: self
                .dialect
                .single_writer()
                .then_some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        };
        Ok(self.write.begin_with_options(options).await?)
    }

    /// [`Store::begin_write`] for a write keyed by address, attacker or provider, and the
    /// database clock at its start when it was read. `None` on sessions that carry the
    /// planning settings already ([`Store::with_own_pool`]): the transaction's first
    /// statement returns the clock instead (`now()` is the transaction's start on
    /// PostgreSQL, whichever statement reads it). Under load every round trip of a write
    /// waits for a CPU on both sides, and this saves one per transaction.
    pub(crate) async fn begin_keyed_write(
        &self,
    ) -> Result<(DatabaseTransaction, Option<DateTime<Utc>>), StoreError> {
        // Only a PostgreSQL pool of its own has keyed sessions (`with_own_pool`).
        if self.keyed_sessions {
            Ok((self.begin_bare().await?, None))
        } else {
            let (txn, now) = self.begin_write_at().await?;
            Ok((txn, Some(now)))
        }
    }

    /// [`Store::begin_write`] and the database clock at its start. On PostgreSQL the clock
    /// comes back with the transaction's settings, in one round trip instead of two: sampled
    /// under load, backends spent more time idle in transaction after `SET` and `now()` than
    /// running any one of the statements that do the work. (On SQLite, reading the clock is
    /// an in-process statement, so callers that do not need it pay next to nothing.)
    pub(crate) async fn begin_write_at(
        &self,
    ) -> Result<(DatabaseTransaction, DateTime<Utc>), StoreError> {
        let dialect = self.dialect;
        let txn = self.begin_bare().await?;
        let Some(settings) = dialect.write_settings() else {
            let now = dialect.now(&txn).await?;
            return Ok((txn, now));
        };
        // Every write is keyed by address, attacker or provider, and the batches name
        // dozens of keys in `IN (…)` lists. Until autovacuum has analyzed a fast-growing
        // table, PostgreSQL assumes each key matches 0.5 % of its rows, so a 64-key list
        // "matches" a third of the table and it plans a sequential scan: hundreds of full
        // scans a second on a busy worker. Index scans are always right for these, so a
        // generic plan is as good as a custom one: planning each prepared statement once
        // instead of on each of its first five runs saves PostgreSQL 5-8 % of its CPU.
        let row = txn
            .query_one_raw(dialect.stmt(dialect.clock_select(Some(settings)), Vec::new()))
            .await?
            .ok_or_else(|| StoreError::malformed("now", "no row"))?;
        let now = dialect
            .get_ts(&row, "now")?
            .ok_or_else(|| StoreError::malformed("now", "null"))?;
        Ok((txn, now))
    }

    /// Releases every lease this process holds (on shutdown), so other replicas need not wait
    /// for them to lapse.
    pub async fn release_leases(&self) -> Result<u64, StoreError> {
        let txn = self.begin_write().await?;
        let providers = txn
            .execute_raw(self.dialect.stmt(
                "UPDATE enrichd_provider_state SET lease_owner = NULL, lease_until = NULL \
                 WHERE lease_owner = $1",
                vec![self.owner.to_string().into()],
            ))
            .await?
            .rows_affected();
        let ptr = txn
            .execute_raw(self.dialect.stmt(
                "UPDATE enrichd_ip_state SET ptr_lease_owner = NULL, ptr_lease_until = NULL \
                 WHERE ptr_lease_owner = $1",
                vec![self.owner.to_string().into()],
            ))
            .await?
            .rows_affected();
        txn.commit().await?;
        Ok(providers + ptr)
    }

    /// Whether this handle's pool was closed. A closed pool never reopens: whoever owns it
    /// opens another ([`Store::with_own_pool`]).
    pub fn is_closed(&self) -> bool {
        match self.dialect {
            Dialect::Postgres => self.write.get_postgres_connection_pool().is_closed(),
            Dialect::Sqlite => self.write.get_sqlite_connection_pool().is_closed(),
        }
    }

    /// Closes the pool of a handle made by [`Store::with_own_pool`] on PostgreSQL, for fault
    /// drills and supervision tests; every later statement on it fails as unavailable. A
    /// handle sharing the process's pools is left alone.
    pub fn close_own_pool(&self) {
        if self.dialect == Dialect::Postgres && self.keyed_sessions {
            // Marks the pool closed at once; connections go as their holders let them go.
            drop(self.write.get_postgres_connection_pool().close());
        }
    }

    /// Closes the pools.
    pub async fn close(self) -> Result<(), StoreError> {
        self.write.close().await?;
        // A single writer has its readers in a pool of their own (see `connect`).
        if self.dialect.single_writer() {
            self.read.close().await?;
        }
        Ok(())
    }
}
