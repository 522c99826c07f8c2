//! The store's one error type and its fate.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sea_orm::{DbErr, RuntimeErr};

/// What the caller should do about a [`StoreError`]; decided only by [`StoreError::fate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFate {
    /// The store is unreachable or busy: pause intake and retry later; the work is not lost.
    Unavailable,
    /// The write itself is impossible (constraint, malformed data): retrying will not help.
    Rejected,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (connect, pool, I/O, TLS).
    #[error("database unreachable")]
    Unavailable(#[source] DbErr),
    /// A lock wait, serialization failure or deadlock that outlived our retries.
    #[error("database busy")]
    Busy(#[source] DbErr),
    /// A constraint or data error: the write is refused.
    #[error("write rejected")]
    Rejected(#[source] DbErr),
    /// Any other database error.
    #[error("database query failed")]
    Query(#[source] DbErr),
    /// A stored value does not decode (a label, a timestamp, JSON).
    #[error("malformed stored value in {column}: {detail}")]
    Malformed {
        /// The column.
        column: &'static str,
        /// What was wrong (never a secret: stored values are provider data, not keys).
        detail: String,
    },
    /// The database schema is newer than this binary understands.
    #[error("database schema version {found} is newer than this binary's {supported}")]
    SchemaAhead {
        /// Version recorded in the database.
        found: i64,
        /// Version this binary writes.
        supported: i64,
    },
    /// Running the migrations failed.
    #[error("schema migration failed")]
    Migration(#[source] DbErr),
    /// The database URL names a backend we do not support.
    #[error("unsupported database url scheme (use postgres:// or sqlite://)")]
    UnsupportedUrl,
}

impl StoreError {
    /// Classifies a database error.
    pub fn from_db(err: DbErr) -> Self {
        match classify(&err) {
            Class::Unavailable => Self::Unavailable(err),
            Class::Retryable => Self::Busy(err),
            Class::Constraint => Self::Rejected(err),
            Class::Other => Self::Query(err),
        }
    }

    /// What the caller should do.
    pub fn fate(&self) -> StoreFate {
        match self {
            Self::Unavailable(_) | Self::Busy(_) | Self::Query(_) | Self::Migration(_) => {
                StoreFate::Unavailable
            }
            Self::Rejected(_)
            | Self::Malformed { .. }
            | Self::SchemaAhead { .. }
            | Self::UnsupportedUrl => StoreFate::Rejected,
        }
    }

    /// Whether the store is unreachable or busy (pause intake, retry), rather than refusing.
    pub fn is_unavailable(&self) -> bool {
        self.fate() == StoreFate::Unavailable
    }

    /// Whether running the same transaction again may succeed at once (serialization
    /// failure, deadlock, SQLite busy).
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(self, Self::Busy(_))
    }

    /// An unavailable store, for a failure outside the driver (`detail` names it).
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::Unavailable(DbErr::Custom(detail.into()))
    }

    /// The same failure, with the same fate, for each caller of a batch that failed as a
    /// whole (the driver's error itself cannot be copied).
    #[must_use]
    pub fn shared(&self) -> Self {
        let copy = |e: &DbErr| DbErr::Custom(e.to_string());
        match self {
            Self::Unavailable(e) => Self::Unavailable(copy(e)),
            Self::Busy(e) => Self::Busy(copy(e)),
            Self::Rejected(e) => Self::Rejected(copy(e)),
            Self::Query(e) => Self::Query(copy(e)),
            Self::Migration(e) => Self::Migration(copy(e)),
            Self::Malformed { column, detail } => Self::Malformed {
                column,
                detail: detail.clone(),
            },
            Self::SchemaAhead { found, supported } => Self::SchemaAhead {
                found: *found,
                supported: *supported,
            },
            Self::UnsupportedUrl => Self::UnsupportedUrl,
        }
    }

    pub(crate) fn malformed(column: &'static str, detail: impl Into<String>) -> Self {
        Self::Malformed {
            column,
            detail: detail.into(),
        }
    }
}

/// Retries of a transaction that hit a serialization failure, deadlock or busy database.
const TX_RETRIES: usize = 3;

/// Runs the transaction `attempt` makes, and again (up to [`TX_RETRIES`] more times) while it
/// fails with a serialization failure, deadlock or busy database. The pause before a retry
/// (15 ms, doubling, jittered) paces it behind the writer that won: that one has just
/// committed or is about to.
pub(crate) async fn retry_busy<T, F, Fut>(attempt: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let policy = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(15))
        .with_max_delay(Duration::from_millis(200))
        .with_jitter()
        .with_max_times(TX_RETRIES);
    attempt.retry(policy).when(StoreError::is_retryable).await
}

impl From<StoreError> for enrichd_core::job::PersistError {
    fn from(err: StoreError) -> Self {
        let text = enrichd_core::error::chain(&err);
        match err.fate() {
            StoreFate::Unavailable => Self::Unavailable(text),
            StoreFate::Rejected => Self::Rejected(text),
        }
    }
}

impl From<DbErr> for StoreError {
    fn from(err: DbErr) -> Self {
        Self::from_db(err)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Unavailable,
    Retryable,
    Constraint,
    Other,
}

fn classify(err: &DbErr) -> Class {
    use sea_orm::sqlx::Error as E;

    let runtime = match err {
        DbErr::ConnectionAcquire(_) => return Class::Unavailable,
        DbErr::Conn(rt) | DbErr::Exec(rt) | DbErr::Query(rt) => rt,
        _ => return Class::Other,
    };
    let RuntimeErr::SqlxError(sqlx_err) = runtime else {
        return Class::Other;
    };
    match &**sqlx_err {
        E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
            Class::Unavailable
        }
        E::Database(db) => classify_code(db.code().as_deref().unwrap_or("")),
        _ => Class::Other,
    }
}

/// Maps a PostgreSQL SQLSTATE or a SQLite (extended) result code to a class.
fn classify_code(code: &str) -> Class {
    match code {
        // PostgreSQL: serialization failure, deadlock, lock not available.
        "40001" | "40P01" | "55P03"
        // SQLite: BUSY, LOCKED and their extended codes (BUSY_RECOVERY, BUSY_SNAPSHOT,
        // BUSY_TIMEOUT, LOCKED_SHAREDCACHE).
        | "5" | "6" | "261" | "517" | "773" | "262" => Class::Retryable,
        // PostgreSQL: admin shutdown, crash shutdown, cannot connect now, too many connections.
        "57P01" | "57P02" | "57P03" | "53300" => Class::Unavailable,
        c if c.starts_with("23") && c.len() == 5 => Class::Constraint,
        // SQLite: CONSTRAINT and its extended codes (FK 787, NOTNULL 1299, PK 1555, UNIQUE 2067).
        "19" | "275" | "531" | "787" | "1043" | "1299" | "1555" | "1811" | "2067" | "2323" => {
            Class::Constraint
        }
        _ => Class::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_codes_of_both_backends() {
        let cases = [
            ("40001", Class::Retryable),
            ("40P01", Class::Retryable),
            ("5", Class::Retryable),
            ("517", Class::Retryable),
            ("23505", Class::Constraint),
            ("23503", Class::Constraint),
            ("2067", Class::Constraint),
            ("787", Class::Constraint),
            ("57P01", Class::Unavailable),
            ("42P01", Class::Other),
            ("", Class::Other),
        ];
        for (code, class) in cases {
            assert_eq!(classify_code(code), class, "{code}");
        }
    }

    #[test]
    fn pool_timeouts_mean_unavailable() {
        let err = DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout);
        let err = StoreError::from_db(err);
        assert!(err.is_unavailable());
        assert_eq!(err.to_string(), "database unreachable");
        let rejected = StoreError::malformed("outcome", "bogus");
        assert_eq!(rejected.fate(), StoreFate::Rejected);
        let persist = enrichd_core::job::PersistError::from(rejected);
        assert!(matches!(
            persist,
            enrichd_core::job::PersistError::Rejected(_)
        ));
    }
}
