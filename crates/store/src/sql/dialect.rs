//! [`Dialect`]: every way the store's SQL differs between backends, as methods of one enum.
//!
//! An enum and not a trait: the backends are a closed set chosen at connect time, the value
//! is `Copy` and lives in every [`crate::Store`] without making the store generic or boxed,
//! and each method's `match` keeps every backend's words for one fragment side by side.
//! Above all, no method has a `_` arm: adding a variant (`MySQL` is next) makes the compiler
//! list every fragment the new backend must decide, and [`RowsBack`] does the same for every
//! statement that reads back what it wrote (see the list in the [`crate::sql`] docs).

use chrono::{DateTime, NaiveDateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, QueryResult, Statement, Value};

use super::{micros, parse_ts_text, sqlite_ts_text};
use crate::StoreError;

/// The SQL dialect of the connected backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// PostgreSQL (clustered): row locks, data-modifying CTEs, `timestamp` and `json` types.
    Postgres,
    /// SQLite (embedded): one writer at a time, timestamps and JSON stored as text.
    Sqlite,
}

/// How a statement hands back the rows it wrote. Every statement that needs them matches on
/// this in one place, so a dialect without `RETURNING` (`MySQL`) adds a variant such as
/// `ReadAfter` and the compiler names each statement that must read its rows back instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowsBack {
    /// `… RETURNING columns` on the writing statement itself.
    Returning,
}

/// How replicas migrating at once are serialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MigrationLock {
    /// The write transaction's own lock (SQLite's `BEGIN IMMEDIATE`): each migration's
    /// transaction nests in it as a savepoint.
    WriteTransaction,
    /// A session lock held on a dedicated connection around the migrations: `lock` and
    /// `unlock` take the lock key as `$1`.
    Session {
        lock: &'static str,
        unlock: &'static str,
    },
}

/// What an insert does with a row whose key is already taken.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OnConflict<'a> {
    /// Keeps the stored row and inserts nothing.
    Ignore {
        /// The conflict target: the key's columns, comma-separated.
        key: &'a str,
    },
    /// Updates the stored row with `set`, in order, and only where `only_if` holds of it.
    Update {
        key: &'a str,
        set: &'a [Assign],
        only_if: Option<&'a str>,
    },
}

/// One assignment of an upsert's update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Assign {
    /// The column takes the value the insert proposed.
    Inserted(&'static str),
    /// The column takes `value`, an expression that may name the stored row's columns
    /// (`table.column`) and the proposed ones ([`Dialect::inserted`]).
    To { column: String, value: String },
}

impl Dialect {
    /// The dialect of a database URL, `None` for a scheme we do not support.
    pub(crate) fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else {
            None
        }
    }

    /// sea-orm's name for the backend.
    pub(crate) fn backend(self) -> DbBackend {
        match self {
            Self::Postgres => DbBackend::Postgres,
            Self::Sqlite => DbBackend::Sqlite,
        }
    }

    // === Capabilities ===

    /// Whether the database takes one write transaction at a time (and `BEGIN IMMEDIATE`
    /// takes its lock up front). Such a backend needs no row locks, has one writer
    /// connection, and a separate pool of readers.
    pub(crate) fn single_writer(self) -> bool {
        match self {
            Self::Postgres => false,
            Self::Sqlite => true,
        }
    }

    /// Whether a statement may carry data-modifying CTEs (`WITH x AS (INSERT …) …`), so that
    /// statements no other statement reads before the last can go as one ([`super::Joined`]).
    /// Without them each goes on its own, and every caller has that path already.
    pub(crate) fn writing_ctes(self) -> bool {
        match self {
            Self::Postgres => true,
            Self::Sqlite => false,
        }
    }

    /// How statements that need the rows they wrote get them.
    pub(crate) fn rows_back(self) -> RowsBack {
        match self {
            Self::Postgres | Self::Sqlite => RowsBack::Returning,
        }
    }

    /// How migrating replicas are serialised.
    pub(crate) fn migration_lock(self) -> MigrationLock {
        match self {
            Self::Postgres => MigrationLock::Session {
                lock: "SELECT pg_advisory_lock($1)",
                unlock: "SELECT pg_advisory_unlock($1)",
            },
            Self::Sqlite => MigrationLock::WriteTransaction,
        }
    }

    // === Statement fragments ===

    /// A statement with its parameters. Every text is written with `$n` placeholders, which
    /// both backends take as they are; a backend with positional `?` placeholders rewrites
    /// them here, in order of appearance, binding a value again where a placeholder repeats.
    pub(crate) fn stmt(self, sql: impl Into<String>, values: Vec<Value>) -> Statement {
        match self {
            Self::Postgres | Self::Sqlite => {
                Statement::from_sql_and_values(self.backend(), sql.into(), values)
            }
        }
    }

    /// `INSERT INTO {into} {source}` meeting a taken key as `on_conflict` says. `into` is the
    /// table and its column list, `source` a `VALUES …` list or a `SELECT`.
    pub(crate) fn insert(self, into: &str, source: &str, on_conflict: OnConflict<'_>) -> String {
        match self {
            Self::Postgres | Self::Sqlite => match on_conflict {
                OnConflict::Ignore { key } => {
                    format!("INSERT INTO {into} {source} ON CONFLICT ({key}) DO NOTHING")
                }
                OnConflict::Update { key, set, only_if } => {
                    let set: Vec<String> = set.iter().map(|a| self.assignment(a)).collect();
                    let only_if = only_if.map(|c| format!(" WHERE {c}")).unwrap_or_default();
                    format!(
                        "INSERT INTO {into} {source} ON CONFLICT ({key}) DO UPDATE SET {}{only_if}",
                        set.join(", ")
                    )
                }
            },
        }
    }

    fn assignment(self, assign: &Assign) -> String {
        match assign {
            Assign::Inserted(column) => format!("{column} = {}", self.inserted(column)),
            Assign::To { column, value } => format!("{column} = {value}"),
        }
    }

    /// The value an upsert proposed for `column`, inside its update.
    pub(crate) fn inserted(self, column: &str) -> String {
        match self {
            Self::Postgres | Self::Sqlite => format!("excluded.{column}"),
        }
    }

    /// A JSON parameter: the placeholder of its text, cast where the column is typed JSON.
    pub(crate) fn json_param(self, placeholder: &str) -> String {
        match self {
            Self::Postgres => format!("CAST({placeholder} AS json)"),
            Self::Sqlite => placeholder.to_owned(),
        }
    }

    /// `column` for `ORDER BY` and comparisons in byte order of its text: the order every
    /// writer locks `enrichd_ip_state` rows in, and Rust's `String` order, so batches that
    /// overlap never wait on each other in a cycle.
    pub(crate) fn byte_order(self, column: &str) -> String {
        match self {
            Self::Postgres => format!("{column} COLLATE \"C\""),
            // SQLite's default collation (BINARY) is byte order already.
            Self::Sqlite => column.to_owned(),
        }
    }

    /// What locks the rows a `SELECT` reads until commit, where rows are locked; on a
    /// single-writer backend the transaction's write lock already excludes other writers.
    pub(crate) fn for_update(self) -> &'static str {
        match self {
            Self::Postgres => " FOR UPDATE",
            Self::Sqlite => "",
        }
    }

    /// [`Dialect::for_update`] that passes over rows another transaction holds, so relays
    /// claiming at once take different rows instead of queueing.
    pub(crate) fn for_update_skip_locked(self) -> &'static str {
        match self {
            Self::Postgres => " FOR UPDATE SKIP LOCKED",
            Self::Sqlite => "",
        }
    }

    /// `rows` (parenthesised row values) as a list to match a row value against with `IN`.
    pub(crate) fn row_list(self, rows: &[String]) -> String {
        match self {
            Self::Postgres | Self::Sqlite => format!("(VALUES {})", rows.join(", ")),
        }
    }

    /// The smaller of two expressions.
    pub(crate) fn least(self, a: &str, b: &str) -> String {
        match self {
            Self::Postgres => format!("LEAST({a}, {b})"),
            Self::Sqlite => format!("MIN({a}, {b})"),
        }
    }

    /// The statement counting tables named `table` in the connected schema (as `n`).
    pub(crate) fn table_exists(self, table: &str) -> String {
        match self {
            Self::Postgres => format!(
                "SELECT COUNT(*) AS n FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_name = '{table}'"
            ),
            Self::Sqlite => format!(
                "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = '{table}'"
            ),
        }
    }

    /// Items a write transaction selects before its first statement, beside the clock,
    /// to set its own planner settings; `None` where there are none to set. See
    /// `Store::begin_write_at` for why PostgreSQL's are what they are.
    pub(crate) fn write_settings(self) -> Option<&'static str> {
        match self {
            Self::Postgres => Some(
                "set_config('enable_seqscan', 'off', true) AS seqscan, \
                 set_config('plan_cache_mode', 'force_generic_plan', true) AS plans",
            ),
            Self::Sqlite => None,
        }
    }

    // === The clock ===

    /// The expression for the database's current UTC time, in the column representation.
    pub(crate) fn now_expr(self) -> &'static str {
        match self {
            // The transaction's start.
            Self::Postgres => "(now() AT TIME ZONE 'UTC')",
            // SQLite's clock has millisecond resolution; pad to the six digits we store.
            Self::Sqlite => "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')",
        }
    }

    /// The database's wall clock at the moment the statement runs (not the transaction's
    /// start, which `now()` is on PostgreSQL): for a decision made after waiting on a lock.
    pub(crate) fn clock_expr(self) -> &'static str {
        match self {
            Self::Postgres => "(clock_timestamp() AT TIME ZONE 'UTC')",
            // `'now'` is read per statement on SQLite, and its write lock is taken at BEGIN.
            Self::Sqlite => self.now_expr(),
        }
    }

    /// `SELECT`'s items reading the clock as `now`, after the write settings when given.
    pub(crate) fn clock_select(self, settings: Option<&str>) -> String {
        match settings {
            Some(settings) => format!("SELECT {settings}, {} AS now", self.now_expr()),
            None => format!("SELECT {} AS now", self.now_expr()),
        }
    }

    /// Reads the database clock.
    pub(crate) async fn now<C: ConnectionTrait>(self, db: &C) -> Result<DateTime<Utc>, StoreError> {
        let row = db
            .query_one_raw(self.stmt(self.clock_select(None), Vec::new()))
            .await?
            .ok_or_else(|| StoreError::malformed("now", "no row"))?;
        self.get_ts(&row, "now")?
            .ok_or_else(|| StoreError::malformed("now", "null"))
    }

    // === Binding and decoding ===

    /// A timestamp parameter, truncated to the microseconds both backends store.
    pub(crate) fn ts(self, value: DateTime<Utc>) -> Value {
        let value = micros(value);
        match self {
            // `timestamp without time zone` holding UTC.
            Self::Postgres => Value::ChronoDateTime(Some(value.naive_utc())),
            // Text the reference compares as text.
            Self::Sqlite => Value::String(Some(sqlite_ts_text(value))),
        }
    }

    /// An optional timestamp parameter.
    pub(crate) fn ts_opt(self, value: Option<DateTime<Utc>>) -> Value {
        match (value, self) {
            (Some(v), _) => self.ts(v),
            (None, Self::Postgres) => Value::ChronoDateTime(None),
            (None, Self::Sqlite) => Value::String(None),
        }
    }

    /// Reads a nullable timestamp column.
    pub(crate) fn get_ts(
        self,
        row: &QueryResult,
        column: &'static str,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        match self {
            Self::Postgres => {
                let value: Option<NaiveDateTime> = row.try_get("", column)?;
                Ok(value.map(|v| v.and_utc()))
            }
            Self::Sqlite => {
                let text: Option<String> = row.try_get("", column)?;
                text.map(|t| {
                    parse_ts_text(&t)
                        .ok_or_else(|| StoreError::malformed(column, "not a timestamp"))
                })
                .transpose()
            }
        }
    }

    /// Reads a nullable JSON column.
    pub(crate) fn get_json(
        self,
        row: &QueryResult,
        column: &'static str,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        match self {
            Self::Postgres => Ok(row.try_get("", column)?),
            Self::Sqlite => {
                let text: Option<String> = row.try_get("", column)?;
                text.map(|t| {
                    serde_json::from_str(&t)
                        .map_err(|e| StoreError::malformed(column, e.to_string()))
                })
                .transpose()
            }
        }
    }

    /// Reads a nullable `INTEGER` column (BIGINT columns are read with `try_get::<i64>`).
    pub(crate) fn get_i64(
        self,
        row: &QueryResult,
        column: &'static str,
    ) -> Result<Option<i64>, StoreError> {
        match self {
            // INTEGER is int4 on PostgreSQL.
            Self::Postgres => {
                let v: Option<i32> = row.try_get("", column)?;
                Ok(v.map(i64::from))
            }
            Self::Sqlite => Ok(row.try_get("", column)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: [Dialect; 2] = [Dialect::Postgres, Dialect::Sqlite];

    #[test]
    fn upserts_read_the_same_on_both_backends_we_have() {
        let set = [
            Assign::Inserted("scope"),
            Assign::To {
                column: "n".into(),
                value: "t.n + 1".into(),
            },
        ];
        for dialect in BOTH {
            assert_eq!(
                dialect.insert(
                    "t (k, scope, n)",
                    "VALUES ($1, $2, 0)",
                    OnConflict::Ignore { key: "k" }
                ),
                "INSERT INTO t (k, scope, n) VALUES ($1, $2, 0) ON CONFLICT (k) DO NOTHING"
            );
            assert_eq!(
                dialect.insert(
                    "t (k, scope, n)",
                    "VALUES ($1, $2, 0)",
                    OnConflict::Update {
                        key: "k",
                        set: &set,
                        only_if: Some("t.n < 9"),
                    }
                ),
                "INSERT INTO t (k, scope, n) VALUES ($1, $2, 0) ON CONFLICT (k) DO UPDATE SET \
                 scope = excluded.scope, n = t.n + 1 WHERE t.n < 9"
            );
        }
    }

    /// One fragment and each backend's words for it.
    struct Fragment {
        of: fn(Dialect) -> String,
        postgres: &'static str,
        sqlite: &'static str,
    }

    #[test]
    fn backend_fragments_differ_only_where_the_backends_do() {
        let cases = [
            Fragment {
                of: |d| d.json_param("$3"),
                postgres: "CAST($3 AS json)",
                sqlite: "$3",
            },
            Fragment {
                of: |d| d.byte_order("ip"),
                postgres: "ip COLLATE \"C\"",
                sqlite: "ip",
            },
            Fragment {
                of: |d| d.for_update().to_owned(),
                postgres: " FOR UPDATE",
                sqlite: "",
            },
            Fragment {
                of: |d| d.for_update_skip_locked().to_owned(),
                postgres: " FOR UPDATE SKIP LOCKED",
                sqlite: "",
            },
            Fragment {
                of: |d| d.least("$1", "now"),
                postgres: "LEAST($1, now)",
                sqlite: "MIN($1, now)",
            },
            Fragment {
                of: |d| d.row_list(&["($1, $2)".into(), "($3, $4)".into()]),
                postgres: "(VALUES ($1, $2), ($3, $4))",
                sqlite: "(VALUES ($1, $2), ($3, $4))",
            },
            Fragment {
                of: |d| d.clock_select(None),
                postgres: "SELECT (now() AT TIME ZONE 'UTC') AS now",
                sqlite: "SELECT (strftime('%Y-%m-%d %H:%M:%f', 'now') || '000') AS now",
            },
            Fragment {
                of: |d| d.inserted("payload"),
                postgres: "excluded.payload",
                sqlite: "excluded.payload",
            },
        ];
        for case in cases {
            assert_eq!((case.of)(Dialect::Postgres), case.postgres);
            assert_eq!((case.of)(Dialect::Sqlite), case.sqlite);
        }
    }

    #[test]
    fn capabilities_and_urls() {
        assert_eq!(Dialect::of_url("postgres://h/db"), Some(Dialect::Postgres));
        assert_eq!(
            Dialect::of_url("postgresql://h/db"),
            Some(Dialect::Postgres)
        );
        assert_eq!(
            Dialect::of_url("sqlite://x.db?mode=rwc"),
            Some(Dialect::Sqlite)
        );
        assert_eq!(Dialect::of_url("sqlite::memory:"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::of_url("mysql://h/db"), None);
        assert!(Dialect::Postgres.writing_ctes() && !Dialect::Sqlite.writing_ctes());
        assert!(Dialect::Sqlite.single_writer() && !Dialect::Postgres.single_writer());
        assert_eq!(
            Dialect::Sqlite.migration_lock(),
            MigrationLock::WriteTransaction
        );
        assert!(matches!(
            Dialect::Postgres.migration_lock(),
            MigrationLock::Session { .. }
        ));
    }
}
