//! Building statements: parameters, statements joined into one, and (in [`Dialect`]) every
//! fragment that differs between backends.
//!
//! Each statement text is written once, with `$n` placeholders, and asks the [`Dialect`] for
//! the words that differ. Timestamps are `timestamp without time zone` holding UTC on
//! PostgreSQL, and text `YYYY-MM-DD HH:MM:SS.ffffff` on SQLite, because the reference compares
//! them as text; every value we write is truncated to microseconds so fencing comparisons are
//! exact on both.
//!
//! # What a new dialect provides
//! A variant of [`Dialect`] (the compiler then lists every method below: none has a `_`
//! arm), a URL scheme in [`Dialect::of_url`], its pools in `Store::connect`, and:
//! - **Placeholders** ([`Dialect::stmt`]): texts keep `$n`. `MySQL` takes positional `?`, so
//!   its `stmt` rewrites them in order of appearance and binds a value again where a
//!   placeholder repeats (`{now}` in every row of a multi-row insert, a claim's owner in two
//!   conditions, `$1` four times in the backlog).
//! - **Upserts** ([`Dialect::insert`], [`Dialect::inserted`]): `ON CONFLICT (k) DO NOTHING`
//!   becomes `INSERT IGNORE` (or a no-op `ON DUPLICATE KEY UPDATE k = k`, which does not also
//!   swallow data errors), and `ON CONFLICT (k) DO UPDATE SET c = excluded.c` becomes
//!   `ON DUPLICATE KEY UPDATE c = VALUES(c)`. There is no `WHERE` on that update, so the
//!   fenced provider-state upsert (`only_if`) guards each assignment instead
//!   (`c = IF(fence, VALUES(c), c)`); and since `MySQL` evaluates the assignments left to
//!   right against the row as updated so far, the fence column must be assigned last.
//! - **Rows back** ([`Dialect::rows_back`], [`RowsBack`]): `MySQL` has no `RETURNING`. Each
//!   statement that needs its rows matches on [`RowsBack`] in one place: the inserts of a
//!   claim's `enrichd_ip_state` and provider rows (which rows were created), a claim's lease
//!   updates (which rows were leased, with their fences), intake's upsert that returns the
//!   clock on keyed sessions, the outbox insert that hands rows to the relay, and the relay's
//!   claim and delete. The other path reads the rows back after writing, under the locks the
//!   transaction holds.
//! - **Data-modifying CTEs** ([`Dialect::writing_ctes`]): without them [`Joined`] runs each
//!   part on its own, and claims, intake and writes take the paths SQLite takes. The texts
//!   only such a backend runs (`claim_both`, the `synced` CTE, `read_for_write`'s union) are
//!   in PostgreSQL's words (`NULL::varchar`) and need nothing from a new dialect.
//! - **Row locks** ([`Dialect::for_update`], [`Dialect::for_update_skip_locked`]): `MySQL` 8
//!   and `MariaDB` 10.6 have both. `MySQL` refuses `LIMIT` in an `IN (…)` subquery and an
//!   `UPDATE` whose subquery reads its own table, both of which the relay's claim does.
//! - **Single writer** ([`Dialect::single_writer`]) and the **migration lock**
//!   ([`Dialect::migration_lock`]): `MySQL` has many writers; `GET_LOCK` and `RELEASE_LOCK`
//!   on a dedicated connection serialise migrators.
//! - **The clock** ([`Dialect::now_expr`], [`Dialect::clock_expr`]): `UTC_TIMESTAMP(6)` and
//!   `SYSDATE(6)` (in the session's time zone: UTC, set on connect).
//! - **Byte order** ([`Dialect::byte_order`]): a binary collation (`ip COLLATE utf8mb4_bin`).
//! - **Values** ([`Dialect::json_param`], [`Dialect::ts`], [`Dialect::get_ts`],
//!   [`Dialect::get_json`], [`Dialect::get_i64`]): how JSON and timestamps are bound and
//!   read; `DATETIME(6)` keeps the microseconds the fence compares.
//! - **Row lists, `LEAST`, the schema check, write settings** ([`Dialect::row_list`],
//!   [`Dialect::least`], [`Dialect::table_exists`], [`Dialect::write_settings`]).
//! - Outside this module: identifiers that are reserved words there (`enrichd_meta.key`
//!   needs backticks on `MySQL`), the migrations' column types, and the error codes that
//!   `StoreError` classifies as busy, unavailable or refused (`error.rs`).

use std::fmt::Write as _;

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};
use sea_orm::{ConnectionTrait, QueryResult, Value};

use crate::StoreError;

mod dialect;

pub(crate) use dialect::{Assign, Dialect, MigrationLock, OnConflict, RowsBack};

/// The SQLite timestamp text format (`%.6f` keeps exactly six fraction digits).
pub(crate) const SQLITE_TS_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.6f";

/// `value` as SQLite timestamp text.
pub(crate) fn sqlite_ts_text(value: DateTime<Utc>) -> String {
    value.naive_utc().format(SQLITE_TS_FORMAT).to_string()
}

/// Truncates to the microsecond precision both backends store.
pub(crate) fn micros(value: DateTime<Utc>) -> DateTime<Utc> {
    value.trunc_subsecs(6)
}

/// Parses timestamp text written by us or by the reference (`T` or space, any fraction).
pub(crate) fn parse_ts_text(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    let text = text.strip_suffix('Z').unwrap_or(text);
    let text = text.strip_suffix("+00:00").unwrap_or(text);
    ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
        .map(|n| n.and_utc())
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// A statement's text with its placeholders (`$1…`), and the values bound to them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Bound {
    pub(crate) text: String,
    pub(crate) values: Vec<Value>,
}

impl Bound {
    /// The statement handing back `columns` of each row it wrote: for a dialect whose
    /// [`RowsBack`] is `Returning`, or a part of a statement joined as data-modifying CTEs.
    pub(crate) fn returning(mut self, columns: &str) -> Self {
        self.text.push_str(" RETURNING ");
        self.text.push_str(columns);
        self
    }
}

/// Parameters of one statement under construction: each value pushed hands back its
/// placeholder, so multi-row statements never count positions by hand.
#[derive(Debug, Default)]
pub(crate) struct Params(pub(crate) Vec<Value>);

impl Params {
    /// Adds `value` and returns its placeholder (`$n`).
    pub(crate) fn push(&mut self, value: impl Into<Value>) -> String {
        self.0.push(value.into());
        format!("${}", self.0.len())
    }

    /// Adds a JSON value and returns its placeholder. The value goes as text, serialised
    /// straight from the borrowed value, with the dialect's cast where the column is typed
    /// JSON (PostgreSQL's `json`; on SQLite it is text). Binding `sea_query::Value::Json` needs an owned deep copy first:
    /// raw provider bodies were copied once more per parameter, and those copies were the
    /// largest part of the write path's allocation work.
    pub(crate) fn push_json(
        &mut self,
        dialect: Dialect,
        value: Option<&serde_json::Value>,
    ) -> String {
        self.push_json_text(dialect, value.map(json_text))
    }

    /// [`Params::push_json`] for a `NOT NULL` column whose empty value is `{}`.
    pub(crate) fn push_json_object(
        &mut self,
        dialect: Dialect,
        value: Option<&serde_json::Value>,
    ) -> String {
        let text = value.map_or_else(|| "{}".to_owned(), json_text);
        self.push_json_text(dialect, Some(text))
    }

    fn push_json_text(&mut self, dialect: Dialect, text: Option<String>) -> String {
        let placeholder = self.push(Value::String(text));
        dialect.json_param(&placeholder)
    }

    /// Adds every value and returns their placeholders joined by commas (for `IN (…)`).
    pub(crate) fn list<V: Into<Value>>(&mut self, values: impl IntoIterator<Item = V>) -> String {
        values
            .into_iter()
            .map(|v| self.push(v))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `value` as JSON text. `serde_json::to_string` writes bytes; `Value`'s `Display` goes
/// through `fmt` one escaped piece at a time, and serialising the raw bodies that way was a
/// tenth of the store thread's CPU at 1,000 new addresses/s.
fn json_text(value: &serde_json::Value) -> String {
    // A `Value` always serialises: its map keys are strings.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

/// `statement` with every placeholder `$n` renumbered `$(n + by)`, so that it can follow a
/// statement with `by` parameters inside one text (a data-modifying CTE and its outer
/// statement). Our statement texts hold no `$` except in placeholders: every value is bound.
pub(crate) fn shift_placeholders(statement: &str, by: usize) -> String {
    let mut out = String::with_capacity(statement.len() + 16);
    let mut rest = statement;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        match rest[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

/// Rows per multi-row statement: well inside both backends' parameter limits (SQLite 32,766,
/// PostgreSQL 65,535) at the widest row we write (26 columns).
pub(crate) const ROWS_PER_STATEMENT: usize = 400;

/// Parameters one joined statement may carry before the parts gathered so far go on their
/// own: a full chunk of the widest rows (26 × 400) fits with room to spare, and PostgreSQL
/// refuses a statement past 65,535.
const JOINED_PARAMS: usize = 30_000;

/// Statements of one transaction whose effects no statement reads before the last of them,
/// sent together. Where the dialect has data-modifying CTEs (PostgreSQL) the earlier ones
/// become CTEs of the last: one round trip for all, where each round trip is a wait for the
/// backend and then for this process to be scheduled again, and under load those waits were
/// most of a write's time. SQLite has no data-modifying CTEs and runs them in turn
/// (in-process, no round trips).
///
/// Only for parts that touch different rows: PostgreSQL runs a statement's CTEs on one
/// snapshot, so none sees another's effect, and a row modified twice in one statement keeps
/// only one of the changes.
#[derive(Debug, Default)]
pub(crate) struct Joined {
    /// Statements with their own placeholders (`$1…`).
    parts: Vec<Bound>,
    params: usize,
}

impl Joined {
    /// Adds a statement whose result nobody reads. Parts gathered so far go first, as one
    /// statement, when this one would take the joined text past its parameter budget.
    pub(crate) async fn add<C: ConnectionTrait>(
        &mut self,
        dialect: Dialect,
        db: &C,
        statement: String,
        values: Vec<Value>,
    ) -> Result<(), StoreError> {
        if !dialect.writing_ctes() {
            db.execute_raw(dialect.stmt(statement, values)).await?;
            return Ok(());
        }
        if self.params + values.len() > JOINED_PARAMS {
            self.finish(dialect, db).await?;
        }
        self.params += values.len();
        self.parts.push(Bound {
            text: statement,
            values,
        });
        Ok(())
    }

    /// Runs the parts gathered so far with `statement` last, and returns its rows.
    pub(crate) async fn query_all<C: ConnectionTrait>(
        &mut self,
        dialect: Dialect,
        db: &C,
        statement: String,
        values: Vec<Value>,
    ) -> Result<Vec<QueryResult>, StoreError> {
        let Bound { text, values } = self.join(statement, values);
        Ok(db.query_all_raw(dialect.stmt(text, values)).await?)
    }

    /// Runs the parts gathered so far and `parts` (PostgreSQL only) as CTEs of the statement
    /// `main` builds from the names `parts` get, and returns its rows: the way to read what
    /// several parts return in one round trip. Parts gathered before go first, as one
    /// statement, when `parts` would take the joined text past its parameter budget.
    pub(crate) async fn query_parts<C: ConnectionTrait>(
        &mut self,
        dialect: Dialect,
        db: &C,
        parts: Vec<Bound>,
        main: impl FnOnce(&[String]) -> String,
    ) -> Result<Vec<QueryResult>, StoreError> {
        let added: usize = parts.iter().map(|part| part.values.len()).sum();
        if self.params + added > JOINED_PARAMS {
            self.finish(dialect, db).await?;
        }
        let first = self.parts.len();
        let names: Vec<String> = (first..first + parts.len())
            .map(|n| format!("joined_{n}"))
            .collect();
        self.params += added;
        self.parts.extend(parts);
        self.query_all(dialect, db, main(&names), Vec::new()).await
    }

    /// Runs the parts gathered so far, if any.
    pub(crate) async fn finish<C: ConnectionTrait>(
        &mut self,
        dialect: Dialect,
        db: &C,
    ) -> Result<(), StoreError> {
        let Some(last) = self.parts.pop() else {
            return Ok(());
        };
        let Bound { text, values } = self.join(last.text, last.values);
        db.execute_raw(dialect.stmt(text, values)).await?;
        Ok(())
    }

    /// The gathered parts as CTEs of `main` (placeholders renumbered), and every value in
    /// order; empties `self`.
    fn join(&mut self, main: String, main_values: Vec<Value>) -> Bound {
        if self.parts.is_empty() {
            return Bound {
                text: main,
                values: main_values,
            };
        }
        let mut values = Vec::with_capacity(self.params + main_values.len());
        let mut text = String::from("WITH ");
        for (n, part) in std::mem::take(&mut self.parts).into_iter().enumerate() {
            if n > 0 {
                text.push_str(", ");
            }
            let _ = write!(text, "joined_{n} AS (");
            text.push_str(&shift_placeholders(&part.text, values.len()));
            text.push(')');
            values.extend(part.values);
        }
        text.push(' ');
        text.push_str(&shift_placeholders(&main, values.len()));
        values.extend(main_values);
        self.params = 0;
        Bound { text, values }
    }
}

#[cfg(test)]
mod pinned;

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn json_text_is_compact_and_escaped_as_before() {
        let body = serde_json::json!({
            "b": [1, 2.5, null, true],
            "a": "quote \" backslash \\ newline \n tab \t nul \u{0} é 🛰",
        });
        assert_eq!(json_text(&body), body.to_string());
        let back: serde_json::Value = serde_json::from_str(&json_text(&body)).unwrap();
        assert_eq!(back, body);
    }

    #[test]
    fn sqlite_text_has_six_fraction_digits_and_a_space() {
        let t = Utc.with_ymd_and_hms(2026, 11, 23, 9, 5, 7).unwrap();
        assert_eq!(sqlite_ts_text(t), "2026-11-23 09:05:07.000000");
        let t = t + chrono::Duration::nanoseconds(123_456_789);
        assert_eq!(sqlite_ts_text(micros(t)), "2026-11-23 09:05:07.123456");
    }

    #[test]
    fn placeholders_shift_and_nothing_else_changes() {
        assert_eq!(
            shift_placeholders("INSERT INTO t VALUES ($1, $2), ($10, $2) RETURNING a", 3),
            "INSERT INTO t VALUES ($4, $5), ($13, $5) RETURNING a"
        );
        assert_eq!(shift_placeholders("SELECT 1", 7), "SELECT 1");
        assert_eq!(shift_placeholders("a$ b$1", 1), "a$ b$2");
    }

    #[test]
    fn joined_parts_become_ctes_of_the_last_with_their_values_in_order() {
        let mut joined = Joined::default();
        joined.parts.push(Bound {
            text: "UPDATE a SET x = $1".to_owned(),
            values: vec![1_i32.into()],
        });
        joined.parts.push(Bound {
            text: "UPDATE b SET y = $2 WHERE k = $1".to_owned(),
            values: vec![2_i32.into(), 3_i32.into()],
        });
        joined.params = 3;
        let Bound { text, values } = joined.join(
            "INSERT INTO c VALUES ($1) RETURNING k".to_owned(),
            vec![4_i32.into()],
        );
        assert_eq!(
            text,
            "WITH joined_0 AS (UPDATE a SET x = $1), joined_1 AS (UPDATE b SET y = $3 WHERE k = \
             $2) INSERT INTO c VALUES ($4) RETURNING k"
        );
        assert_eq!(
            values,
            [1_i32, 2, 3, 4].map(Value::from).to_vec(),
            "each part's values follow the ones before it"
        );
        assert!(joined.parts.is_empty() && joined.params == 0);
        let Bound {
            text: alone,
            values: alone_values,
        } = joined.join("DELETE FROM d".to_owned(), Vec::new());
        assert_eq!(
            alone, "DELETE FROM d",
            "nothing gathered: the statement as it is"
        );
        assert!(alone_values.is_empty());
    }

    #[test]
    fn parses_our_text_and_the_reference_forms() {
        let t = Utc.with_ymd_and_hms(2026, 11, 23, 9, 5, 7).unwrap();
        assert_eq!(parse_ts_text("2026-11-23 09:05:07.000000"), Some(t));
        assert_eq!(parse_ts_text("2026-11-23 09:05:07"), Some(t));
        assert_eq!(parse_ts_text("2026-11-23T09:05:07.000Z"), Some(t));
        assert_eq!(parse_ts_text("2026-11-23T09:05:07+00:00"), Some(t));
        assert_eq!(parse_ts_text("yesterday"), None);
    }
}
