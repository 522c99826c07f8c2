//! Shared setup for the store scenarios: each scenario runs on a fresh SQLite file and, when
//! the server is there, a fresh PostgreSQL database.

#![expect(
    clippy::expect_used,
    reason = "test support: a failed setup is a failed test"
)]

use std::future::Future;
use std::time::Duration;

use enrichd_core::{
    CanonicalIp, ProviderFields, ProviderId, ProviderOutcome, ProviderReport, Verdict,
};
use enrichd_store::{ApplyContext, ApplyOutcome, ClaimMode, Claims, Store, StoredScope};
use enrichd_testkit::db::TestDb;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, Value};

/// Runs `scenario` on SQLite and (unless skipped locally) on PostgreSQL.
pub(crate) async fn on_both<F, Fut>(scenario: F)
where
    F: Fn(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    enrichd_testkit::tracing::init();
    scenario(TestDb::sqlite()).await;
    if enrichd_testkit::services::require_postgres() {
        scenario(TestDb::postgres().await).await;
    }
}

/// A migrated store on `db`.
pub(crate) async fn migrated(db: &TestDb) -> Store {
    let store = Store::connect(db.url()).await.expect("connect");
    store.migrate().await.expect("migrate");
    store
}

/// `store`'s claim of one due provider for one address, without PTR.
pub(crate) async fn claim_one(
    store: &Store,
    target: &str,
    provider: ProviderId,
    lease: Duration,
) -> Claims {
    claim(store, ip(target), &[provider], false, lease, ClaimMode::Due).await
}

/// `store`'s claim of `target`'s `providers` (and its PTR lookup with `ptr`) for `lease`.
pub(crate) async fn claim(
    store: &Store,
    target: CanonicalIp,
    providers: &[ProviderId],
    ptr: bool,
    lease: Duration,
    mode: ClaimMode,
) -> Claims {
    store
        .claim_work(target, providers, ptr, lease, mode)
        .await
        .expect("claim")
}

pub(crate) fn ip(text: &str) -> CanonicalIp {
    CanonicalIp::parse(text).expect("valid test address")
}

pub(crate) fn ctx(providers: &[ProviderId]) -> ApplyContext {
    ApplyContext {
        providers: providers.to_vec(),
        ttl: Duration::from_hours(24),
        outbox_enabled: true,
        ptr_enabled: false,
        relay_claim: None,
    }
}

fn backend(conn: &DatabaseConnection) -> DbBackend {
    conn.get_database_backend()
}

/// Runs raw SQL with `$n` parameters.
pub(crate) async fn exec(conn: &DatabaseConnection, sql: &str, values: Vec<Value>) -> u64 {
    conn.execute_raw(Statement::from_sql_and_values(backend(conn), sql, values))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .rows_affected()
}

/// One column of every row, as text (`CAST(.. AS TEXT)` keeps both backends alike).
pub(crate) async fn texts(
    conn: &DatabaseConnection,
    sql: &str,
    values: Vec<Value>,
) -> Vec<Option<String>> {
    conn.query_all_raw(Statement::from_sql_and_values(backend(conn), sql, values))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| {
            r.try_get_by_index::<Option<String>>(0)
                .expect("text column")
        })
        .collect()
}

/// `SELECT COUNT(*) ...`.
pub(crate) async fn count(conn: &DatabaseConnection, sql: &str, values: Vec<Value>) -> i64 {
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(backend(conn), sql, values))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .expect("a row");
    row.try_get_by_index::<i64>(0).expect("count")
}

/// Inserts an attacker row (enrichd-owned shape) with a given `last_seen` offset in seconds.
pub(crate) async fn add_attacker(
    conn: &DatabaseConnection,
    uuid: &str,
    ip_text: &str,
    age_secs: i64,
) {
    let seen = chrono::Utc::now() - chrono::Duration::seconds(age_secs);
    let seen_value: Value = if backend(conn) == DbBackend::Postgres {
        seen.naive_utc().into()
    } else {
        enrichd_store::sqlite_timestamp_text(seen).into()
    };
    exec(
        conn,
        "INSERT INTO attackers (uuid, ip, first_seen, last_seen, updated_at) VALUES ($1, $2, $3, $3, $3)",
        vec![uuid.into(), ip_text.into(), seen_value],
    )
    .await;
}

pub(crate) fn greynoise(classification: &str) -> ProviderReport {
    ProviderReport::answer(
        ProviderOutcome::Ok,
        Verdict::from_label(classification),
        ProviderFields::Greynoise {
            classification: classification.into(),
            name: Some("Acme Scanner".into()),
            tags: vec!["Mirai".into()],
        },
        serde_json::json!({"classification": classification}),
    )
}

pub(crate) fn abuseipdb(score: i32) -> ProviderReport {
    let verdict = match score {
        75.. => Verdict::Malicious,
        25.. => Verdict::Suspicious,
        _ => Verdict::Benign,
    };
    ProviderReport::answer(
        ProviderOutcome::Ok,
        Some(verdict),
        ProviderFields::Abuseipdb {
            score,
            categories: vec![14, 18],
        },
        serde_json::json!({"abuseConfidenceScore": score}),
    )
}

pub(crate) fn feodo(listed: bool) -> ProviderReport {
    ProviderReport::answer(
        ProviderOutcome::Ok,
        listed.then_some(Verdict::Malicious),
        ProviderFields::Feodo {
            listed,
            malware_family: listed.then(|| "QakBot".to_owned()),
        },
        serde_json::json!({}),
    )
}

/// A timestamp parameter far in the past (2000-01-01), in the backend's representation.
pub(crate) fn long_ago(db: &TestDb) -> Value {
    let when = chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .expect("valid date")
        .and_utc();
    at(db, when)
}

/// `when` as a timestamp parameter in `db`'s representation.
pub(crate) fn at(db: &TestDb, when: chrono::DateTime<chrono::Utc>) -> Value {
    if db.is_postgres() {
        when.naive_utc().into()
    } else {
        when.format("%Y-%m-%d %H:%M:%S%.6f").to_string().into()
    }
}

/// One refreshed pass of `provider` for `target`: claim it, then write `report` under `ctx`.
pub(crate) async fn claim_and_apply(
    store: &Store,
    target: CanonicalIp,
    provider: ProviderId,
    report: ProviderReport,
    ctx: &ApplyContext,
) -> ApplyOutcome {
    let claims = claim(
        store,
        target,
        &[provider],
        false,
        Duration::from_secs(30),
        ClaimMode::Refresh,
    )
    .await;
    store
        .apply(
            target,
            StoredScope::Global,
            None,
            vec![(claims.providers[0].1, report)],
            ctx,
        )
        .await
        .expect("apply")
}
