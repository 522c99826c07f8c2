//! PostgreSQL through `psql`: a fresh database per scenario and the queries the checks read.
//! A subprocess keeps the suite free of a database driver and survives server restarts by
//! construction (every query is a new connection).

use std::time::Duration;

use anyhow::{Context as _, Result};

/// `postgres://` URL of `db` on loopback (TLS off: G7 in DEPENDENCIES.md).
pub(crate) fn url(db: &str) -> String {
    format!("postgres://postgres@127.0.0.1:5432/{db}?sslmode=disable")
}

/// Rows of `sql` in `db`, each a vector of text fields (NULL is the empty string).
pub(crate) async fn psql(db: &str, sql: &str) -> Result<Vec<Vec<String>>> {
    let out = crate::services::run(
        "psql",
        &[
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            db,
            "-X",
            "-q",
            "-A",
            "-t",
            "-F",
            "\t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
        Duration::from_secs(30),
    )
    .await?;
    Ok(out
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect())
}

/// One row of integers.
pub(crate) async fn numbers(db: &str, sql: &str) -> Result<Vec<i64>> {
    let rows = psql(db, sql).await?;
    let row = rows.first().context("the query returned no row")?;
    row.iter()
        .map(|v| {
            v.parse::<i64>()
                .with_context(|| format!("{v:?} is not a number"))
        })
        .collect()
}

/// Creates database `name`.
pub(crate) async fn create(name: &str) -> Result<()> {
    psql("postgres", &format!("CREATE DATABASE \"{name}\"")).await?;
    Ok(())
}

/// Drops database `name`, disconnecting whoever is still there.
pub(crate) async fn drop(name: &str) -> Result<()> {
    psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
    )
    .await?;
    Ok(())
}
