//! Database side of the benchmark: a fresh PostgreSQL database (or SQLite file) per scenario,
//! attacker rows inserted directly, the batched-upsert and per-address-transaction ceilings,
//! and PostgreSQL's own counters for "where did the time go".

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context as _;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
    TransactionTrait,
};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Rows per multi-row statement.
const BATCH_ROWS: usize = 500;

/// Where the scenario's data lives.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A database on the shared PostgreSQL server.
    Postgres {
        /// `postgres://user@127.0.0.1:5432` (no database, no query).
        server: String,
        /// Database name.
        name: String,
    },
    /// A SQLite file.
    Sqlite {
        /// Its path.
        path: std::path::PathBuf,
    },
}

impl Target {
    /// The URL enrichd and the bench connect with (`sslmode=disable` on loopback: G7).
    pub(crate) fn url(&self) -> String {
        match self {
            Self::Postgres { server, name } => format!("{server}/{name}?sslmode=disable"),
            Self::Sqlite { path } => format!("sqlite://{}?mode=rwc", path.display()),
        }
    }

    fn backend(&self) -> DbBackend {
        match self {
            Self::Postgres { .. } => DbBackend::Postgres,
            Self::Sqlite { .. } => DbBackend::Sqlite,
        }
    }

    /// Creates it empty: `CREATE DATABASE`, or a fresh file path.
    pub(crate) async fn create(&self) -> anyhow::Result<()> {
        match self {
            Self::Postgres { server, name } => {
                let admin = admin(server).await?;
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .with_context(|| format!("create database {name}"))?;
                let _ = admin.close().await;
            }
            Self::Sqlite { path } => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                for suffix in ["", "-wal", "-shm", ".lock"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
        }
        Ok(())
    }

    /// Drops it (best effort).
    pub(crate) async fn drop_it(&self) {
        match self {
            Self::Postgres { server, name } => {
                if let Ok(admin) = admin(server).await {
                    let _ = admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                    let _ = admin.close().await;
                }
            }
            Self::Sqlite { path } => {
                for suffix in ["", "-wal", "-shm", ".lock"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
        }
    }

    /// A small pool for the bench's own statements.
    pub(crate) async fn connect(&self, pool: u32) -> anyhow::Result<DatabaseConnection> {
        let mut opt = ConnectOptions::new(self.url());
        opt.max_connections(pool)
            .min_connections(0)
            .sqlx_logging(false)
            .acquire_timeout(Duration::from_secs(30));
        Database::connect(opt)
            .await
            .with_context(|| format!("connect to the {:?} database", self.backend()))
    }

    /// A timestamp `secs_ago` seconds before now, as the backend stores enrichd's timestamps.
    fn ts_expr(&self, secs_ago: u64) -> String {
        match self {
            Self::Postgres { .. } => {
                format!("(now() AT TIME ZONE 'UTC') - interval '{secs_ago} seconds'")
            }
            Self::Sqlite { .. } => {
                let at = chrono::Utc::now()
                    - chrono::Duration::seconds(i64::try_from(secs_ago).unwrap_or(0));
                format!("'{}'", at.format("%Y-%m-%d %H:%M:%S%.6f"))
            }
        }
    }
}

async fn admin(server: &str) -> anyhow::Result<DatabaseConnection> {
    let mut opt = ConnectOptions::new(format!("{server}/postgres?sslmode=disable"));
    opt.max_connections(1).sqlx_logging(false);
    Database::connect(opt)
        .await
        .context("connect to PostgreSQL as the admin user")
}

/// Makes PostgreSQL log every statement on `target` slower than `ms` (with its duration) to
/// the server log; the setting applies to that database's new sessions only.
pub(crate) async fn log_slow_statements(target: &Target, ms: u64) -> anyhow::Result<()> {
    if let Target::Postgres { server, name } = target {
        let admin = admin(server).await?;
        admin
            .execute_unprepared(&format!(
                "ALTER DATABASE {name} SET log_min_duration_statement = {ms}"
            ))
            .await?;
        let _ = admin.close().await;
    }
    Ok(())
}

/// One value from a one-row, one-column query.
pub(crate) async fn scalar_i64(db: &DatabaseConnection, sql: &str) -> anyhow::Result<i64> {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?
        .context("no row")?;
    Ok(row.try_get_by_index::<i64>(0)?)
}

/// Creates `attackers` as the reference's own models do (its many NOT NULL columns), before
/// enrichd's migration: enrichd then records it does not own the table, and never inserts
/// into it. The drop-in case (SPEC §5).
pub(crate) async fn create_reference_attackers(target: &Target) -> anyhow::Result<()> {
    let ts = match target {
        Target::Postgres { .. } => "TIMESTAMP WITHOUT TIME ZONE",
        Target::Sqlite { .. } => "DATETIME",
    };
    let db = target.connect(1).await?;
    db.execute_unprepared(&format!(
        "CREATE TABLE attackers (
            uuid VARCHAR(36) NOT NULL PRIMARY KEY,
            ip VARCHAR NOT NULL,
            first_seen {ts} NOT NULL,
            last_seen {ts} NOT NULL,
            event_count INTEGER NOT NULL DEFAULT 0,
            service_count INTEGER NOT NULL DEFAULT 0,
            decky_count INTEGER NOT NULL DEFAULT 0,
            credential_count INTEGER NOT NULL DEFAULT 0,
            bounty_count INTEGER NOT NULL DEFAULT 0,
            services TEXT NOT NULL DEFAULT '[]',
            deckies TEXT NOT NULL DEFAULT '[]',
            traversal_path TEXT NULL,
            is_traversal BOOLEAN NOT NULL DEFAULT FALSE,
            commands TEXT NOT NULL DEFAULT '[]',
            fingerprints TEXT NOT NULL DEFAULT '[]',
            updated_at {ts} NOT NULL,
            ptr_record VARCHAR(256) NULL
        )"
    ))
    .await
    .context("create the reference's attackers table")?;
    db.execute_unprepared("CREATE INDEX ix_attackers_ip ON attackers (ip)")
        .await?;
    let _ = db.close().await;
    Ok(())
}

/// Inserts one attacker row per address into the compatible `attackers` table (uuid4 text,
/// every NOT NULL column it has without a default), newest `last_seen` first.
pub(crate) async fn insert_attackers(target: &Target, ips: &[Ipv4Addr]) -> anyhow::Result<()> {
    let db = target.connect(1).await?;
    for (chunk_no, chunk) in ips.chunks(BATCH_ROWS).enumerate() {
        let mut sql = String::from(
            "INSERT INTO attackers (uuid, ip, first_seen, last_seen, updated_at) VALUES ",
        );
        for (i, ip) in chunk.iter().enumerate() {
            let age = (chunk_no * BATCH_ROWS + i) as u64;
            let seen = target.ts_expr(age);
            if i > 0 {
                sql.push(',');
            }
            let _ = write!(
                sql,
                "('{}', '{ip}', {seen}, {seen}, {seen})",
                uuid::Uuid::new_v4()
            );
        }
        db.execute_unprepared(&sql)
            .await
            .context("insert attackers")?;
    }
    let _ = db.close().await;
    Ok(())
}

/// Batched upserts (500-row `INSERT … ON CONFLICT DO UPDATE`, autocommit, one connection)
/// into a table shaped like `attacker_intel`: `rows` inserts, then the same keys again as
/// updates. Returns (insert rows/s, upsert rows/s).
pub(crate) async fn upsert_ceiling(target: &Target, rows: usize) -> anyhow::Result<(f64, f64)> {
    let db = target.connect(1).await?;
    let (json_type, ts_type) = match target {
        Target::Postgres { .. } => ("JSON", "TIMESTAMP WITHOUT TIME ZONE"),
        Target::Sqlite { .. } => ("TEXT", "DATETIME"),
    };
    if matches!(target, Target::Sqlite { .. }) {
        // enrichd's own SQLite settings (SPEC §2).
        db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
        db.execute_unprepared("PRAGMA synchronous=NORMAL").await?;
    }
    db.execute_unprepared(&format!(
        "CREATE TABLE bench_upsert (
            uuid VARCHAR NOT NULL PRIMARY KEY,
            attacker_ip VARCHAR NOT NULL,
            aggregate_verdict VARCHAR(32) NULL,
            abuseipdb_score INTEGER NULL,
            greynoise_tags {json_type} NOT NULL,
            greynoise_raw {json_type} NOT NULL,
            cached_at {ts_type} NOT NULL
        )"
    ))
    .await?;
    let now = target.ts_expr(0);
    let mut rates = [0.0f64; 2];
    for (pass, rate) in rates.iter_mut().enumerate() {
        let started = Instant::now();
        for chunk_start in (0..rows).step_by(BATCH_ROWS) {
            let mut sql = String::from(
                "INSERT INTO bench_upsert (uuid, attacker_ip, aggregate_verdict, abuseipdb_score, \
                 greynoise_tags, greynoise_raw, cached_at) VALUES ",
            );
            for i in chunk_start..(chunk_start + BATCH_ROWS).min(rows) {
                if i > chunk_start {
                    sql.push(',');
                }
                let _ = write!(
                    sql,
                    "('{i:032x}', '45.{}.{}.{}', 'malicious', {}, '[\"scanner\",\"ssh\"]', \
                     '{{\"ip\":\"45.0.0.1\",\"classification\":\"malicious\",\"pass\":{pass},\
                     \"name\":\"unknown\",\"noise\":true,\"riot\":false}}', {now})",
                    (i >> 16) & 255,
                    (i >> 8) & 255,
                    i & 255,
                    (i + pass) % 101
                );
            }
            sql.push_str(
                " ON CONFLICT (uuid) DO UPDATE SET attacker_ip = excluded.attacker_ip, \
                 aggregate_verdict = excluded.aggregate_verdict, \
                 abuseipdb_score = excluded.abuseipdb_score, greynoise_tags = excluded.greynoise_tags, \
                 greynoise_raw = excluded.greynoise_raw, cached_at = excluded.cached_at",
            );
            db.execute_unprepared(&sql)
                .await
                .context("batched upsert")?;
        }
        {
            *rate = rows as f64 / started.elapsed().as_secs_f64();
        }
    }
    let _ = db.execute_unprepared("DROP TABLE bench_upsert").await;
    let _ = db.close().await;
    Ok((rates[0], rates[1]))
}

/// Small per-address transactions (`BEGIN; SELECT … FOR UPDATE; UPDATE; COMMIT`) from
/// `connections` concurrent connections, the shape of enrichd's per-IP write without its
/// content. Returns transactions per second.
pub(crate) async fn transaction_ceiling(
    target: &Target,
    transactions: usize,
    connections: u32,
) -> anyhow::Result<f64> {
    let db = target.connect(connections).await?;
    let lock = match target {
        Target::Postgres { .. } => " FOR UPDATE",
        Target::Sqlite { .. } => "",
    };
    db.execute_unprepared(
        "CREATE TABLE bench_tx (ip VARCHAR(64) NOT NULL PRIMARY KEY, n INTEGER NOT NULL)",
    )
    .await?;
    let mut sql = String::from("INSERT INTO bench_tx (ip, n) VALUES ");
    for i in 0..transactions {
        if i > 0 {
            sql.push(',');
        }
        let _ = write!(sql, "('ip{i}', 0)");
    }
    db.execute_unprepared(&sql).await?;
    let started = Instant::now();
    let per_task = transactions.div_ceil(connections as usize);
    let tasks = (0..connections as usize).map(|t| {
        let db = db.clone();
        async move {
            for i in (t * per_task)..((t + 1) * per_task).min(transactions) {
                let txn = db.begin().await?;
                txn.execute_unprepared(&format!("SELECT n FROM bench_tx WHERE ip = 'ip{i}'{lock}"))
                    .await?;
                txn.execute_unprepared(&format!(
                    "UPDATE bench_tx SET n = n + 1 WHERE ip = 'ip{i}'"
                ))
                .await?;
                txn.commit().await?;
            }
            Ok::<(), sea_orm::DbErr>(())
        }
    });
    for result in futures::future::join_all(tasks).await {
        result.context("per-address transaction")?;
    }
    let rate = transactions as f64 / started.elapsed().as_secs_f64();
    let _ = db.execute_unprepared("DROP TABLE bench_tx").await;
    let _ = db.close().await;
    Ok(rate)
}

/// PostgreSQL's counters for one database (`pg_stat_database`) and its tables
/// (`pg_stat_user_tables`). Taken after enrichd exited, so its backends flushed their stats.
pub(crate) async fn pg_counters(target: &Target) -> Value {
    let Target::Postgres { server, name } = target else {
        return Value::Null;
    };
    let Ok(admin) = admin(server).await else {
        return Value::Null;
    };
    // Backends flush statistics at most once a second; give the last ones time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let db_sql = format!(
        "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, \
         tup_updated, tup_deleted, blks_read, blks_hit, deadlocks \
         FROM pg_stat_database WHERE datname = '{name}'"
    );
    let mut out = json!({});
    if let Ok(Some(row)) = admin
        .query_one_raw(Statement::from_string(DbBackend::Postgres, db_sql))
        .await
    {
        for (i, col) in [
            "xact_commit",
            "xact_rollback",
            "tup_returned",
            "tup_fetched",
            "tup_inserted",
            "tup_updated",
            "tup_deleted",
            "blks_read",
            "blks_hit",
            "deadlocks",
        ]
        .iter()
        .enumerate()
        {
            out[*col] = json!(row.try_get_by_index::<i64>(i).ok());
        }
    }
    let _ = admin.close().await;
    // Per-table counters live in the database itself.
    let url = target.url();
    let mut opt = ConnectOptions::new(url);
    opt.max_connections(1).sqlx_logging(false);
    if let Ok(db) = Database::connect(opt).await {
        let sql = "SELECT relname, seq_scan, COALESCE(idx_scan, 0), n_tup_ins, n_tup_upd, \
                   n_tup_del, n_live_tup, n_tup_hot_upd FROM pg_stat_user_tables ORDER BY relname";
        if let Ok(rows) = db
            .query_all_raw(Statement::from_string(DbBackend::Postgres, sql))
            .await
        {
            let mut tables = serde_json::Map::new();
            for row in rows {
                let Ok(table) = row.try_get_by_index::<String>(0) else {
                    continue;
                };
                let n = |i| row.try_get_by_index::<i64>(i).ok();
                tables.insert(
                    table,
                    json!({"seq_scan": n(1), "idx_scan": n(2), "ins": n(3), "upd": n(4),
                           "del": n(5), "live": n(6), "hot_upd": n(7)}),
                );
            }
            out["tables"] = Value::Object(tables);
        }
        let _ = db.close().await;
    }
    out
}

/// `text` on one line, its whitespace runs collapsed, cut to `chars` characters. Done here,
/// not in the sampling query: the sampler runs a hundred times a second on the PostgreSQL
/// whose CPU the run measures, so its work there is kept to reading the view.
fn one_line(text: &str, chars: usize) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(chars)
        .collect()
}

/// Samples `pg_stat_activity` for one database every 10 ms while enrichd runs: a sampling
/// profile of where its database time goes (which statement is active or waiting, and how
/// often a backend sits `idle in transaction` waiting for enrichd itself). Runs on the admin
/// database, so it does not count in the target's own statistics.
pub(crate) struct ActivitySampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(u64, std::collections::HashMap<String, u64>)>,
}

impl ActivitySampler {
    /// Starts sampling `target` (PostgreSQL only; `None` for SQLite).
    pub(crate) fn start(target: &Target) -> Option<Self> {
        let Target::Postgres { server, name } = target else {
            return None;
        };
        let (server, name) = (server.clone(), name.clone());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut counts = std::collections::HashMap::new();
            let mut samples = 0u64;
            let Ok(admin) = admin(&server).await else {
                return (samples, counts);
            };
            let sql = format!(
                "SELECT state, COALESCE(wait_event_type, '') || ':' || COALESCE(wait_event, ''), \
                 left(query, 400) FROM pg_stat_activity \
                 WHERE datname = '{name}' AND state IS NOT NULL AND state <> 'idle' \
                 AND pid <> pg_backend_pid()"
            );
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(rows) = admin
                    .query_all_raw(Statement::from_string(DbBackend::Postgres, sql.clone()))
                    .await
                {
                    samples += 1;
                    for row in rows {
                        let state = row.try_get_by_index::<String>(0).unwrap_or_default();
                        let wait = row.try_get_by_index::<String>(1).unwrap_or_default();
                        let query =
                            one_line(&row.try_get_by_index::<String>(2).unwrap_or_default(), 160);
                        *counts
                            .entry(format!("{state} | {wait} | {query}"))
                            .or_default() += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = admin.close().await;
            (samples, counts)
        });
        Some(Self { stop, task })
    }

    /// Stops and returns the top entries: `{samples, busy_backends_avg, top: [{share, what}]}`.
    pub(crate) async fn finish(self) -> Value {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let Ok((samples, counts)) = self.task.await else {
            return Value::Null;
        };
        let busy: u64 = counts.values().sum();
        let mut top: Vec<(String, u64)> = counts.into_iter().collect();
        top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        let per_sample = |n: u64| {
            if samples == 0 {
                0.0
            } else {
                crate::procs::round3(n as f64 / samples as f64)
            }
        };
        json!({
            "samples": samples,
            "busy_backends_avg": per_sample(busy),
            "top": top.iter().take(20).map(|(what, n)| json!({
                "backends_avg": per_sample(*n),
                "what": what,
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_statement_is_sampled_on_one_line_and_cut() {
        assert_eq!(
            one_line("SELECT a,\n\t  b   FROM t", 100),
            "SELECT a, b FROM t"
        );
        assert_eq!(one_line("SELECT   1", 8), "SELECT 1");
        assert_eq!(one_line("ünïcode  ünïcode", 9), "ünïcode ü");
    }
}
