//! The initial schema: the compatible tables (only when absent) and enrichd's own state.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

use crate::meta;

/// Column types that differ between the backends.
struct Types {
    ts: &'static str,
    json: &'static str,
}

fn types(backend: DbBackend) -> Types {
    match backend {
        DbBackend::Postgres => Types {
            ts: "TIMESTAMP WITHOUT TIME ZONE",
            json: "JSON",
        },
        // SQLite: the reference compares timestamps as text, so they are stored as
        // `YYYY-MM-DD HH:MM:SS.ffffff` text; JSON is stored as text.
        _ => Types {
            ts: "DATETIME",
            json: "TEXT",
        },
    }
}

fn attackers_ddl(t: &Types) -> Vec<String> {
    let ts = t.ts;
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS attackers (
                uuid VARCHAR(36) NOT NULL PRIMARY KEY,
                ip VARCHAR NOT NULL,
                first_seen {ts} NOT NULL,
                last_seen {ts} NOT NULL,
                updated_at {ts} NOT NULL,
                ptr_record VARCHAR(256) NULL
            )"
        ),
        "CREATE INDEX IF NOT EXISTS ix_attackers_ip ON attackers (ip)".to_owned(),
        "CREATE INDEX IF NOT EXISTS ix_attackers_last_seen ON attackers (last_seen)".to_owned(),
    ]
}

fn attacker_intel_ddl(t: &Types) -> Vec<String> {
    let Types { ts, json } = t;
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS attacker_intel (
                uuid VARCHAR NOT NULL PRIMARY KEY,
                attacker_uuid VARCHAR NOT NULL UNIQUE REFERENCES attackers (uuid),
                attacker_ip VARCHAR NOT NULL,
                schema_version INTEGER NOT NULL DEFAULT 1,
                greynoise_classification VARCHAR(32) NULL,
                greynoise_name VARCHAR(128) NULL,
                greynoise_tags {json} NOT NULL DEFAULT '[]',
                greynoise_raw {json} NOT NULL DEFAULT '{{}}',
                greynoise_queried_at {ts} NULL,
                abuseipdb_score INTEGER NULL,
                abuseipdb_categories {json} NOT NULL DEFAULT '[]',
                abuseipdb_raw {json} NOT NULL DEFAULT '{{}}',
                abuseipdb_queried_at {ts} NULL,
                feodo_listed BOOLEAN NULL,
                feodo_malware_family VARCHAR(64) NULL,
                feodo_raw {json} NOT NULL DEFAULT '{{}}',
                feodo_queried_at {ts} NULL,
                threatfox_listed BOOLEAN NULL,
                threatfox_threat_types {json} NOT NULL DEFAULT '[]',
                threatfox_ioc_types {json} NOT NULL DEFAULT '[]',
                threatfox_malware_families {json} NOT NULL DEFAULT '[]',
                threatfox_raw {json} NOT NULL DEFAULT '{{}}',
                threatfox_queried_at {ts} NULL,
                aggregate_verdict VARCHAR(32) NULL,
                cached_at {ts} NOT NULL,
                expires_at {ts} NOT NULL
            )"
        ),
        "CREATE INDEX IF NOT EXISTS ix_attacker_intel_attacker_ip ON attacker_intel (attacker_ip)"
            .to_owned(),
        "CREATE INDEX IF NOT EXISTS ix_attacker_intel_aggregate_verdict ON attacker_intel (aggregate_verdict)"
            .to_owned(),
        "CREATE INDEX IF NOT EXISTS ix_attacker_intel_cached_at ON attacker_intel (cached_at)"
            .to_owned(),
        "CREATE INDEX IF NOT EXISTS ix_attacker_intel_expires_at ON attacker_intel (expires_at)"
            .to_owned(),
    ]
}

fn own_ddl(t: &Types) -> Vec<String> {
    let Types { ts, json } = t;
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                key VARCHAR(64) NOT NULL PRIMARY KEY,
                value VARCHAR(256) NOT NULL
            )",
            table = meta::TABLE
        ),
        // One row per attacker: its canonical IP, or NULL plus the reason it is not an IP
        // (recorded once, never selected again). `payload_digest` is the digest of the last
        // payload put in the outbox, so an unchanged payload publishes nothing.
        format!(
            "CREATE TABLE IF NOT EXISTS enrichd_attacker_map (
                attacker_uuid VARCHAR(36) NOT NULL PRIMARY KEY,
                ip VARCHAR(64) NULL,
                reason VARCHAR(128) NULL,
                payload_digest VARCHAR(64) NULL,
                mapped_at {ts} NOT NULL
            )"
        ),
        "CREATE INDEX IF NOT EXISTS ix_enrichd_attacker_map_ip ON enrichd_attacker_map (ip)"
            .to_owned(),
        // One row per canonical IP; every per-IP transaction locks it first.
        format!(
            "CREATE TABLE IF NOT EXISTS enrichd_ip_state (
                ip VARCHAR(64) NOT NULL PRIMARY KEY,
                scope VARCHAR(16) NULL,
                ptr_name VARCHAR(256) NULL,
                ptr_outcome VARCHAR(32) NULL,
                ptr_resolved_at {ts} NULL,
                ptr_expires_at {ts} NULL,
                ptr_attempts INTEGER NOT NULL DEFAULT 0,
                ptr_queried_at {ts} NULL,
                ptr_lease_owner VARCHAR(64) NULL,
                ptr_lease_until {ts} NULL,
                first_event_at {ts} NULL,
                last_event_at {ts} NULL,
                updated_at {ts} NOT NULL
            )"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS enrichd_provider_state (
                ip VARCHAR(64) NOT NULL,
                provider VARCHAR(32) NOT NULL,
                outcome VARCHAR(32) NULL,
                verdict VARCHAR(32) NULL,
                fields {json} NULL,
                raw {json} NULL,
                answered_at {ts} NULL,
                queried_at {ts} NULL,
                expires_at {ts} NULL,
                next_attempt_at {ts} NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error VARCHAR(512) NULL,
                lease_owner VARCHAR(64) NULL,
                lease_until {ts} NULL,
                updated_at {ts} NOT NULL,
                PRIMARY KEY (ip, provider)
            )"
        ),
        "CREATE INDEX IF NOT EXISTS ix_enrichd_provider_state_due ON enrichd_provider_state (provider, next_attempt_at)"
            .to_owned(),
        format!(
            "CREATE TABLE IF NOT EXISTS enrichd_provider_limits (
                provider VARCHAR(32) NOT NULL PRIMARY KEY,
                next_slot_at {ts} NULL,
                quota_day VARCHAR(10) NULL,
                quota_used INTEGER NOT NULL DEFAULT 0,
                quota_remaining INTEGER NULL,
                quota_reset_at {ts} NULL,
                parked_until {ts} NULL,
                rejected_key_fingerprint VARCHAR(64) NULL,
                updated_at {ts} NOT NULL
            )"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS enrichd_outbox (
                attacker_uuid VARCHAR(36) NOT NULL PRIMARY KEY,
                version BIGINT NOT NULL,
                payload TEXT NOT NULL,
                created_at {ts} NOT NULL,
                updated_at {ts} NOT NULL,
                claimed_until {ts} NULL
            )"
        ),
        "CREATE INDEX IF NOT EXISTS ix_enrichd_outbox_claim ON enrichd_outbox (claimed_until, created_at)"
            .to_owned(),
    ]
}

pub(crate) async fn run_all(
    manager: &SchemaManager<'_>,
    statements: Vec<String>,
) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for sql in statements {
        db.execute_unprepared(&sql).await?;
    }
    Ok(())
}

/// Records `key = value` in `enrichd_meta`: `overwrite` replaces an existing value, otherwise
/// the first value recorded stays.
pub(crate) async fn put_meta(
    manager: &SchemaManager<'_>,
    key: &str,
    value: &str,
    overwrite: bool,
) -> Result<(), DbErr> {
    let backend = manager.get_database_backend();
    let action = if overwrite {
        "DO UPDATE SET value = excluded.value"
    } else {
        "DO NOTHING"
    };
    let sql = format!(
        "INSERT INTO {table} (key, value) VALUES ($1, $2) ON CONFLICT (key) {action}",
        table = meta::TABLE
    );
    manager
        .get_connection()
        .execute_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [key.into(), value.into()],
        ))
        .await?;
    Ok(())
}

/// The initial schema.
pub(crate) struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &'static str {
        "m0001_initial"
    }
}

#[async_trait::async_trait]
#[allow(
    elided_lifetimes_in_paths,
    reason = "the signature must match the trait's, which elides the lifetime"
)]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let t = types(manager.get_database_backend());
        run_all(manager, own_ddl(&t)).await?;

        // The reference may own the compatible tables (with more NOT NULL columns and rows):
        // then they, and their indexes, are left exactly as they are.
        let had_attackers = manager.has_table("attackers").await?;
        if !had_attackers {
            run_all(manager, attackers_ddl(&t)).await?;
        }
        if !manager.has_table("attacker_intel").await? {
            run_all(manager, attacker_intel_ddl(&t)).await?;
        }
        let owns = if had_attackers { "false" } else { "true" };
        put_meta(manager, meta::OWNS_ATTACKERS, owns, false).await?;
        put_meta(manager, meta::SCHEMA_VERSION, "1", true).await
    }

    fn use_transaction(&self) -> Option<bool> {
        // All or nothing on SQLite too: a half-created schema would record the wrong owner.
        Some(true)
    }
}
