//! Migrations: every table on both backends, idempotence, a reference-owned `attackers`.

use enrichd_store::{SchemaStatus, StoreError, StoredScope};
use enrichd_testkit::db::TestDb;

use crate::store_common::{count, exec, ip, migrated, on_both, texts};

const TABLES: [&str; 8] = [
    "attackers",
    "attacker_intel",
    "enrichd_meta",
    "enrichd_attacker_map",
    "enrichd_ip_state",
    "enrichd_provider_state",
    "enrichd_provider_limits",
    "enrichd_outbox",
];

#[tokio::test]
async fn migrations_create_every_table_and_a_rerun_is_a_no_op() {
    on_both(|db: TestDb| async move {
        let store = enrichd_store::Store::connect(db.url()).await.unwrap();
        assert_eq!(
            store.schema_status().await.unwrap(),
            SchemaStatus::Behind { found: None },
            "{}",
            db.label()
        );
        store.migrate().await.unwrap();
        store.migrate().await.unwrap();
        assert_eq!(store.schema_status().await.unwrap(), SchemaStatus::Current);
        assert!(store.owns_attackers().await.unwrap());

        let conn = db.connect().await;
        for table in TABLES {
            count(&conn, &format!("SELECT COUNT(*) FROM {table}"), vec![]).await;
        }
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM enrichd_migrations", vec![]).await, 2);

        if db.is_postgres() {
            let types = texts(
                &conn,
                "SELECT column_name || ':' || data_type || ':' || is_nullable \
                 FROM information_schema.columns WHERE table_name = 'attacker_intel' \
                 AND column_name IN ('cached_at', 'greynoise_tags', 'feodo_listed', 'abuseipdb_score', 'greynoise_queried_at') \
                 ORDER BY column_name",
                vec![],
            )
            .await;
            let types: Vec<String> = types.into_iter().flatten().collect();
            assert_eq!(
                types,
                [
                    "abuseipdb_score:integer:YES",
                    "cached_at:timestamp without time zone:NO",
                    "feodo_listed:boolean:YES",
                    "greynoise_queried_at:timestamp without time zone:YES",
                    "greynoise_tags:json:NO",
                ]
            );
        }

        // Defaults are the reference's: `[]`, `{}`, schema_version 1.
        crate::store_common::add_attacker(&conn, "0b7c4a36-6f53-4c44-a9f1-2a3b5e1f0c11", "1.2.3.4", 0).await;
        exec(
            &conn,
            "INSERT INTO attacker_intel (uuid, attacker_uuid, attacker_ip, cached_at, expires_at) \
             SELECT 'abc', uuid, ip, last_seen, last_seen FROM attackers",
            vec![],
        )
        .await;
        let defaults = texts(
            &conn,
            "SELECT CAST(greynoise_tags AS TEXT) || ' ' || CAST(threatfox_raw AS TEXT) || ' ' \
             || CAST(schema_version AS TEXT) FROM attacker_intel",
            vec![],
        )
        .await;
        assert_eq!(defaults, [Some("[] {} 1".to_owned())], "{}", db.label());
    })
    .await;
}

#[tokio::test]
async fn a_schema_1_database_gains_forward_confirmation_and_keeps_its_rows() {
    use enrichd_migrations::Migrator;
    use sea_orm_migration::MigratorTrait;
    on_both(|db: TestDb| async move {
        let conn = db.connect().await;
        Migrator::up(&conn, Some(1)).await.unwrap();
        let store = enrichd_store::Store::connect(db.url()).await.unwrap();
        assert_eq!(
            store.schema_status().await.unwrap(),
            SchemaStatus::Behind { found: Some(1) },
            "{}",
            db.label()
        );
        exec(
            &conn,
            "INSERT INTO enrichd_ip_state (ip, ptr_name, ptr_outcome, ptr_attempts, updated_at) \
             VALUES ('8.8.8.8', 'dns.google', 'ok', 0, '2026-11-23 10:00:00')",
            vec![],
        )
        .await;
        store.migrate().await.unwrap();
        assert_eq!(store.schema_status().await.unwrap(), SchemaStatus::Current);
        let ptr = store.ptr_state(ip("8.8.8.8")).await.unwrap().unwrap();
        assert_eq!(ptr.name.as_deref(), Some("dns.google"), "{}", db.label());
        assert_eq!(ptr.forward_confirmed, None, "not checked yet");
    })
    .await;
}

#[tokio::test]
async fn a_reference_attackers_table_is_left_untouched_and_recorded_as_not_owned() {
    on_both(|db: TestDb| async move {
        let conn = db.connect().await;
        let ts = if db.is_postgres() { "TIMESTAMP" } else { "DATETIME" };
        exec(
            &conn,
            &format!(
                "CREATE TABLE attackers (uuid VARCHAR(36) PRIMARY KEY, ip VARCHAR NOT NULL, \
                 first_seen {ts} NOT NULL, last_seen {ts} NOT NULL, updated_at {ts} NOT NULL, \
                 ptr_record VARCHAR(256) NULL, event_count INTEGER NOT NULL, \
                 services TEXT NOT NULL)"
            ),
            vec![],
        )
        .await;
        exec(
            &conn,
            "INSERT INTO attackers VALUES ('11111111-1111-4111-8111-111111111111', '::ffff:8.8.8.8', \
             '2026-01-01 00:00:00', '2026-01-02 00:00:00', '2026-01-02 00:00:00', NULL, 7, 'ssh')",
            vec![],
        )
        .await;

        let store = migrated(&db).await;
        assert!(!store.owns_attackers().await.unwrap(), "{}", db.label());
        let row = texts(
            &conn,
            "SELECT ip || ' ' || CAST(event_count AS TEXT) || ' ' || services FROM attackers",
            vec![],
        )
        .await;
        assert_eq!(row, [Some("::ffff:8.8.8.8 7 ssh".to_owned())]);
        let index_sql = if db.is_postgres() {
            "SELECT COUNT(*) FROM pg_indexes WHERE tablename = 'attackers' AND indexname LIKE 'ix_%'"
        } else {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'attackers' AND name LIKE 'ix_%'"
        };
        assert_eq!(count(&conn, index_sql, vec![]).await, 0, "no index added to their table");

        // Intake on their table never inserts; the non-canonical stored address still maps.
        let intake = store
            .note_event(ip("9.9.9.9"), StoredScope::Global, None, None)
            .await
            .unwrap();
        assert_eq!(intake.created, None);
        assert!(intake.attacker_uuids.is_empty());
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM attackers", vec![]).await, 1);
        assert_eq!(store.sync_attacker_map(100).await.unwrap(), 1);
        let intake = store
            .note_event(ip("8.8.8.8"), StoredScope::Global, None, None)
            .await
            .unwrap();
        assert_eq!(intake.attacker_uuids, ["11111111-1111-4111-8111-111111111111"]);
    })
    .await;
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused() {
    on_both(|db: TestDb| async move {
        let store = migrated(&db).await;
        let conn = db.connect().await;
        exec(
            &conn,
            "UPDATE enrichd_meta SET value = '99' WHERE key = 'schema_version'",
            vec![],
        )
        .await;
        assert_eq!(
            store.schema_status().await.unwrap(),
            SchemaStatus::Ahead { found: 99 }
        );
        assert!(matches!(
            store.migrate().await,
            Err(StoreError::SchemaAhead { found: 99, .. })
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_migrating_at_once_serialise_on_the_advisory_lock() {
    on_both(|db: TestDb| async move {
        let mut stores = Vec::new();
        for _ in 0..3 {
            stores.push(enrichd_store::Store::connect(db.url()).await.unwrap());
        }
        let runs: Vec<_> = stores
            .iter()
            .map(|s| {
                let s = s.clone();
                tokio::spawn(async move { s.migrate().await })
            })
            .collect();
        for run in runs {
            run.await
                .unwrap()
                .unwrap_or_else(|e| panic!("{}: {}", db.label(), enrichd_core::error::chain(&e)));
        }
        assert_eq!(
            stores[0].schema_status().await.unwrap(),
            SchemaStatus::Current
        );
        let conn = db.connect().await;
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM enrichd_migrations", vec![]).await,
            2,
            "each migration applied once"
        );
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable_not_rejected() {
    let err = enrichd_store::Store::connect("postgres://postgres@127.0.0.1:1/none?sslmode=disable")
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(matches!(
        enrichd_store::Store::connect("mysql://x").await,
        Err(StoreError::UnsupportedUrl)
    ));
}
