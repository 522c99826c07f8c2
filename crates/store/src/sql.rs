//! Backend differences in one place: how timestamps and JSON are bound and read, and the
//! database clock.
//!
//! Statements are written once with `$n` placeholders (sqlx's SQLite driver accepts them).
//! Timestamps are `timestamp without time zone` holding UTC on PostgreSQL, and text
//! `YYYY-MM-DD HH:MM:SS.ffffff` on SQLite, because the reference compares them as text; every
//! value we write is truncated to microseconds so fencing comparisons are exact on both.

use std::fmt::Write as _;

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};
use sea_orm::{ConnectionTrait, DbBackend, QueryResult, Statement, Value};

use crate::StoreError;

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
    /// straight from the borrowed value, with a cast on PostgreSQL (the column is `json`; on
    /// SQLite it is text). Binding `sea_query::Value::Json` needs an owned deep copy first:
    /// raw provider bodies were copied once more per parameter, and those copies were the
    /// largest part of the write path's allocation work.
    pub(crate) fn push_json(&mut self, sql: Sql, value: Option<&serde_json::Value>) -> String {
        self.push_json_text(sql, value.map(json_text))
    }

    /// [`Params::push_json`] for a `NOT NULL` column whose empty value is `{}`.
    pub(crate) fn push_json_object(
        &mut self,
        sql: Sql,
        value: Option<&serde_json::Value>,
    ) -> String {
        let text = value.map_or_else(|| "{}".to_owned(), json_text);
        self.push_json_text(sql, Some(text))
    }

    fn push_json_text(&mut self, sql: Sql, text: Option<String>) -> String {
        let placeholder = self.push(Value::String(text));
        if sql.is_pg() {
            format!("CAST({placeholder} AS json)")
        } else {
            placeholder
        }
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
/// sent together. On PostgreSQL the earlier ones become data-modifying CTEs of the last: one
/// round trip for all, where each round trip is a wait for the backend and then for this
/// process to be scheduled again, and under load those waits were most of a write's time.
/// SQLite has no data-modifying CTEs and runs them in turn (in-process, no round trips).
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
        sql: Sql,
        db: &C,
        statement: String,
        values: Vec<Value>,
    ) -> Result<(), StoreError> {
        if !sql.is_pg() {
            db.execute_raw(sql.stmt(statement, values)).await?;
            return Ok(());
        }
        if self.params + values.len() > JOINED_PARAMS {
            self.finish(sql, db).await?;
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
        sql: Sql,
        db: &C,
        statement: String,
        values: Vec<Value>,
    ) -> Result<Vec<QueryResult>, StoreError> {
        let Bound { text, values } = self.join(statement, values);
        Ok(db.query_all_raw(sql.stmt(text, values)).await?)
    }

    /// Runs the parts gathered so far and `parts` (PostgreSQL only) as CTEs of the statement
    /// `main` builds from the names `parts` get, and returns its rows: the way to read what
    /// several parts return in one round trip. Parts gathered before go first, as one
    /// statement, when `parts` would take the joined text past its parameter budget.
    pub(crate) async fn query_parts<C: ConnectionTrait>(
        &mut self,
        sql: Sql,
        db: &C,
        parts: Vec<Bound>,
        main: impl FnOnce(&[String]) -> String,
    ) -> Result<Vec<QueryResult>, StoreError> {
        let added: usize = parts.iter().map(|part| part.values.len()).sum();
        if self.params + added > JOINED_PARAMS {
            self.finish(sql, db).await?;
        }
        let first = self.parts.len();
        let names: Vec<String> = (first..first + parts.len())
            .map(|n| format!("joined_{n}"))
            .collect();
        self.params += added;
        self.parts.extend(parts);
        self.query_all(sql, db, main(&names), Vec::new()).await
    }

    /// Runs the parts gathered so far, if any.
    pub(crate) async fn finish<C: ConnectionTrait>(
        &mut self,
        sql: Sql,
        db: &C,
    ) -> Result<(), StoreError> {
        let Some(last) = self.parts.pop() else {
            return Ok(());
        };
        let Bound { text, values } = self.join(last.text, last.values);
        db.execute_raw(sql.stmt(text, values)).await?;
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

/// Binding and decoding for one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sql(pub(crate) DbBackend);

impl Sql {
    pub(crate) fn is_pg(self) -> bool {
        self.0 == DbBackend::Postgres
    }

    /// A timestamp parameter.
    pub(crate) fn ts(self, value: DateTime<Utc>) -> Value {
        let value = micros(value);
        if self.is_pg() {
            Value::ChronoDateTime(Some(value.naive_utc()))
        } else {
            Value::String(Some(sqlite_ts_text(value)))
        }
    }

    /// An optional timestamp parameter.
    pub(crate) fn ts_opt(self, value: Option<DateTime<Utc>>) -> Value {
        match value {
            Some(v) => self.ts(v),
            None if self.is_pg() => Value::ChronoDateTime(None),
            None => Value::String(None),
        }
    }

    /// Reads a nullable timestamp column.
    pub(crate) fn get_ts(
        self,
        row: &QueryResult,
        column: &'static str,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        if self.is_pg() {
            let value: Option<NaiveDateTime> = row.try_get("", column)?;
            Ok(value.map(|v| v.and_utc()))
        } else {
            let text: Option<String> = row.try_get("", column)?;
            text.map(|t| {
                parse_ts_text(&t).ok_or_else(|| StoreError::malformed(column, "not a timestamp"))
            })
            .transpose()
        }
    }

    /// Reads a nullable JSON column.
    pub(crate) fn get_json(
        self,
        row: &QueryResult,
        column: &'static str,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        if self.is_pg() {
            Ok(row.try_get("", column)?)
        } else {
            let text: Option<String> = row.try_get("", column)?;
            text.map(|t| {
                serde_json::from_str(&t).map_err(|e| StoreError::malformed(column, e.to_string()))
            })
            .transpose()
        }
    }

    /// Reads a nullable integer column of either width.
    pub(crate) fn get_i64(
        self,
        row: &QueryResult,
        column: &'static str,
    ) -> Result<Option<i64>, StoreError> {
        if self.is_pg() {
            // INTEGER is int4 on PostgreSQL; BIGINT columns are read with `try_get::<i64>`.
            let v: Option<i32> = row.try_get("", column)?;
            Ok(v.map(i64::from))
        } else {
            Ok(row.try_get("", column)?)
        }
    }

    /// The expression for the database's current UTC time, in the column representation.
    pub(crate) fn now_expr(self) -> &'static str {
        if self.is_pg() {
            "(now() AT TIME ZONE 'UTC')"
        } else {
            // SQLite's clock has millisecond resolution; pad to the six digits we store.
            "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"
        }
    }

    /// The database's wall clock at the moment the statement runs (not the transaction's
    /// start, which `now()` is on PostgreSQL): for a decision made after waiting on a lock.
    pub(crate) fn clock_expr(self) -> &'static str {
        if self.is_pg() {
            "(clock_timestamp() AT TIME ZONE 'UTC')"
        } else {
            // `'now'` is read per statement on SQLite, and its write lock is taken at BEGIN.
            self.now_expr()
        }
    }

    /// Reads the database clock.
    pub(crate) async fn now<C: ConnectionTrait>(self, db: &C) -> Result<DateTime<Utc>, StoreError> {
        let sql = format!("SELECT {} AS now", self.now_expr());
        let row = db
            .query_one_raw(Statement::from_string(self.0, sql))
            .await?
            .ok_or_else(|| StoreError::malformed("now", "no row"))?;
        self.get_ts(&row, "now")?
            .ok_or_else(|| StoreError::malformed("now", "null"))
    }

    /// A statement with parameters.
    pub(crate) fn stmt(self, sql: impl Into<String>, values: Vec<Value>) -> Statement {
        Statement::from_sql_and_values(self.0, sql.into(), values)
    }

    /// The order in which every writer locks a set of `enrichd_ip_state` rows: byte order of
    /// the canonical text, the same order as Rust's `String` sort, so batches that overlap
    /// never wait on each other in a cycle.
    pub(crate) fn ip_order(self) -> &'static str {
        if self.is_pg() {
            "ip COLLATE \"C\""
        } else {
            "ip"
        }
    }

    /// `FOR UPDATE` where it exists; on SQLite the `BEGIN IMMEDIATE` write lock already
    /// serialises writers.
    pub(crate) fn for_update(self) -> &'static str {
        if self.is_pg() { " FOR UPDATE" } else { "" }
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
