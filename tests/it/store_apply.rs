//! The per-IP write: merging concurrent writers, fencing late results, column rules,
//! `attackers.ptr_record`, non-global rows and the SQLite timestamp text.

use std::time::Duration;

use enrichd_core::ports::PtrReport;
use enrichd_core::{ProviderId, ProviderReport, PtrOutcome};
use enrichd_store::{ClaimMode, Store, StoredScope};
use enrichd_testkit::db::TestDb;

use crate::store_common::{
    abuseipdb, add_attacker, claim, claim_and_apply, claim_one, count, ctx, exec, feodo, greynoise,
    ip, long_ago, migrated, on_both, texts,
};

const LEASE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_for_two_providers_of_one_ip_merge_into_one_row() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = Store::connect(db.url()).await.unwrap();
        let conn = db.connect().await;
        let both = ctx(&[ProviderId::Greynoise, ProviderId::Abuseipdb]);
        for n in 1..=6 {
            let text = format!("45.155.205.{n}");
            add_attacker(
                &conn,
                &format!("00000000-0000-4000-8000-00000000000{n}"),
                &text,
                0,
            )
            .await;
            let target = ip(&text);
            let ca = claim_one(&a, &text, ProviderId::Greynoise, LEASE).await;
            let cb = claim_one(&b, &text, ProviderId::Abuseipdb, LEASE).await;
            let (ra, rb) = tokio::join!(
                a.apply(
                    target,
                    StoredScope::Global,
                    None,
                    vec![(ca.providers[0].1, greynoise("benign"))],
                    &both
                ),
                b.apply(
                    target,
                    StoredScope::Global,
                    None,
                    vec![(cb.providers[0].1, abuseipdb(90))],
                    &both
                ),
            );
            assert_eq!(ra.unwrap().applied, [ProviderId::Greynoise]);
            assert_eq!(rb.unwrap().applied, [ProviderId::Abuseipdb]);
            let row = texts(
                &conn,
                "SELECT greynoise_classification || ' ' || CAST(abuseipdb_score AS TEXT) || ' ' \
                 || aggregate_verdict FROM attacker_intel WHERE attacker_ip = $1",
                vec![text.clone().into()],
            )
            .await;
            assert_eq!(
                row,
                [Some("benign 90 malicious".to_owned())],
                "{} {text}",
                db.label()
            );
            // The newest outbox payload carries both providers too.
            let payload = texts(
                &conn,
                "SELECT payload FROM enrichd_outbox WHERE attacker_uuid = $1",
                vec![format!("00000000-0000-4000-8000-00000000000{n}").into()],
            )
            .await;
            let envelope: serde_json::Value =
                serde_json::from_str(payload[0].as_deref().unwrap()).unwrap();
            assert_eq!(
                envelope["payload"]["providers"],
                serde_json::json!(["greynoise", "abuseipdb"])
            );
            assert_eq!(envelope["payload"]["aggregate_verdict"], "malicious");
        }
    })
    .await;
}

#[tokio::test]
async fn a_late_result_from_a_lapsed_lease_does_not_overwrite_a_newer_one() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = Store::connect(db.url()).await.unwrap();
        let conn = db.connect().await;
        add_attacker(&conn, "00000000-0000-4000-8000-000000000001", "8.8.4.4", 0).await;
        let target = ip("8.8.4.4");
        let only = ctx(&[ProviderId::Greynoise]);
        let late = claim_one(&a, "8.8.4.4", ProviderId::Greynoise, LEASE).await;
        // A's lease lapses (as if A stalled past it); B takes the work over.
        exec(
            &conn,
            "UPDATE enrichd_provider_state SET lease_until = $1",
            vec![long_ago(&db)],
        )
        .await;
        let fresh = claim_one(&b, "8.8.4.4", ProviderId::Greynoise, LEASE).await;
        assert_eq!(fresh.providers.len(), 1, "a lapsed lease is taken over");
        let newer = b
            .apply(
                target,
                StoredScope::Global,
                None,
                vec![(fresh.providers[0].1, greynoise("malicious"))],
                &only,
            )
            .await
            .unwrap();
        assert_eq!(newer.applied, [ProviderId::Greynoise]);
        let stale = a
            .apply(
                target,
                StoredScope::Global,
                None,
                vec![(late.providers[0].1, greynoise("benign"))],
                &only,
            )
            .await
            .unwrap();
        assert_eq!(stale.stale, [ProviderId::Greynoise], "{}", db.label());
        let row = texts(
            &conn,
            "SELECT greynoise_classification FROM attacker_intel",
            vec![],
        )
        .await;
        assert_eq!(row, [Some("malicious".to_owned())]);
        // Applying the same result twice is refused too (redelivery is harmless).
        let again = b
            .apply(
                target,
                StoredScope::Global,
                None,
                vec![(fresh.providers[0].1, greynoise("benign"))],
                &only,
            )
            .await
            .unwrap();
        assert_eq!(again.stale, [ProviderId::Greynoise]);
    })
    .await;
}

#[tokio::test]
async fn an_error_keeps_the_earlier_answer_and_a_negative_answer_replaces_it() {
    on_both(|db: TestDb| async move {
        let store = migrated(&db).await;
        let conn = db.connect().await;
        add_attacker(&conn, "00000000-0000-4000-8000-000000000001", "5.6.7.8", 0).await;
        let target = ip("5.6.7.8");
        let only = ctx(&[ProviderId::Feodo]);
        let pass = |report| claim_and_apply(&store, target, ProviderId::Feodo, report, &only);
        pass(feodo(true)).await;
        pass(ProviderReport::error(ProviderId::Feodo, "server error 503")).await;
        let sql = "SELECT CAST(feodo_listed AS TEXT) || ' ' || COALESCE(feodo_malware_family, '-') \
                   || ' ' || COALESCE(aggregate_verdict, '-') FROM attacker_intel";
        let listed = if db.is_postgres() { "true" } else { "1" };
        let unlisted = if db.is_postgres() { "false" } else { "0" };
        assert_eq!(
            texts(&conn, sql, vec![]).await,
            [Some(format!("{listed} QakBot malicious"))]
        );
        let states = store.provider_states(target).await.unwrap();
        assert_eq!(states[0].attempts, 1);
        assert_eq!(states[0].last_error.as_deref(), Some("server error 503"));
        pass(feodo(false)).await;
        assert_eq!(
            texts(&conn, sql, vec![]).await,
            [Some(format!("{unlisted} - -"))]
        );
        assert_eq!(store.provider_states(target).await.unwrap()[0].attempts, 0);
    })
    .await;
}

#[tokio::test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
async fn every_attacker_row_of_an_ip_gets_the_row_and_the_ptr_name_is_restored() {
    on_both(|db: TestDb| async move {
        let store = migrated(&db).await;
        let conn = db.connect().await;
        add_attacker(&conn, "00000000-0000-4000-8000-000000000001", "8.8.8.8", 0).await;
        add_attacker(
            &conn,
            "00000000-0000-4000-8000-000000000002",
            "::ffff:8.8.8.8",
            0,
        )
        .await;
        add_attacker(
            &conn,
            "00000000-0000-4000-8000-000000000003",
            "not-an-ip",
            0,
        )
        .await;
        assert_eq!(store.sync_attacker_map(10).await.unwrap(), 3);
        let target = ip("8.8.8.8");
        let mut c = ctx(&[ProviderId::Greynoise]);
        c.ptr_enabled = true;
        let claims = claim(
            &store,
            target,
            &[ProviderId::Greynoise],
            true,
            LEASE,
            ClaimMode::Due,
        )
        .await;
        let ptr = PtrReport {
            outcome: PtrOutcome::Ok,
            name: Some("dns.google".into()),
            record_ttl: Some(Duration::from_secs(7200)),
            forward_confirmed: None,
        };
        let out = store
            .apply(
                target,
                StoredScope::Global,
                Some((claims.ptr.unwrap(), ptr)),
                vec![(claims.providers[0].1, greynoise("benign"))],
                &c,
            )
            .await
            .unwrap();
        assert_eq!(out.intel_rows, 2, "{}", db.label());
        assert_eq!(out.events, 2);
        let names = texts(
            &conn,
            "SELECT ptr_record FROM attackers ORDER BY uuid",
            vec![],
        )
        .await;
        assert_eq!(
            names,
            [
                Some("dns.google".to_owned()),
                Some("dns.google".to_owned()),
                None
            ]
        );

        // Something else nulls it; the next pass (a PTR failure) restores the good name.
        exec(&conn, "UPDATE attackers SET ptr_record = NULL", vec![]).await;
        let claims = claim(&store, target, &[], true, LEASE, ClaimMode::Refresh).await;
        let out = store
            .apply(
                target,
                StoredScope::Global,
                Some((
                    claims.ptr.unwrap(),
                    PtrReport::without_name(PtrOutcome::Timeout),
                )),
                vec![],
                &c,
            )
            .await
            .unwrap();
        assert_eq!(out.ptr_applied, Some(true));
        let names = texts(
            &conn,
            "SELECT ptr_record FROM attackers WHERE ip <> 'not-an-ip' ORDER BY uuid",
            vec![],
        )
        .await;
        assert_eq!(
            names,
            [Some("dns.google".to_owned()), Some("dns.google".to_owned())]
        );
        let ptr = store.ptr_state(target).await.unwrap().unwrap();
        assert_eq!(ptr.outcome, Some(PtrOutcome::Timeout));
        assert_eq!(ptr.attempts, 1);
        // The payload changed (ptr_outcome), so each attacker's outbox row was bumped.
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM enrichd_outbox WHERE version = 2",
                vec![]
            )
            .await,
            2
        );
    })
    .await;
}

#[tokio::test]
async fn non_global_addresses_get_an_empty_row_a_century_out_and_no_event() {
    on_both(|db: TestDb| async move {
        let store = migrated(&db).await;
        let conn = db.connect().await;
        add_attacker(&conn, "00000000-0000-4000-8000-000000000001", "10.1.2.3", 0).await;
        let target = ip("10.1.2.3");
        let out = store
            .apply(target, StoredScope::NonGlobal, None, vec![], &ctx(&[ProviderId::Greynoise]))
            .await
            .unwrap();
        assert_eq!((out.intel_rows, out.events), (1, 0));
        let sql = if db.is_postgres() {
            "SELECT COUNT(*) FROM attacker_intel WHERE aggregate_verdict IS NULL \
             AND greynoise_classification IS NULL AND expires_at > cached_at + INTERVAL '36000 days'"
        } else {
            "SELECT COUNT(*) FROM attacker_intel WHERE aggregate_verdict IS NULL \
             AND greynoise_classification IS NULL AND expires_at > datetime(cached_at, '+36000 days')"
        };
        assert_eq!(count(&conn, sql, vec![]).await, 1, "{}", db.label());
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM enrichd_outbox", vec![]).await, 0);
        let backlog = store.backlog(10, &ctx(&[ProviderId::Greynoise])).await.unwrap();
        assert!(backlog.is_empty(), "a non-global row is never due: {backlog:?}");
    })
    .await;
}

fn is_fixed_width_timestamp(text: &str) -> bool {
    // ^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$
    let pattern = "dddd-dd-dd dd:dd:dd.dddddd";
    text.len() == pattern.len()
        && text.chars().zip(pattern.chars()).all(|(c, p)| match p {
            'd' => c.is_ascii_digit(),
            other => c == other,
        })
}

#[tokio::test]
async fn sqlite_timestamps_are_stored_as_fixed_width_text() {
    enrichd_testkit::tracing::init();
    let db = TestDb::sqlite();
    let store = migrated(&db).await;
    let conn = db.connect().await;
    let target = ip("1.1.1.1");
    let intake = store
        .note_event(target, StoredScope::Global, None, None)
        .await
        .unwrap();
    assert!(intake.created.is_some(), "enrichd owns attackers here");
    claim_and_apply(
        &store,
        target,
        ProviderId::Greynoise,
        greynoise("benign"),
        &ctx(&[ProviderId::Greynoise]),
    )
    .await;
    let stored = texts(
        &conn,
        "SELECT cached_at FROM attacker_intel UNION ALL SELECT expires_at FROM attacker_intel \
         UNION ALL SELECT greynoise_queried_at FROM attacker_intel \
         UNION ALL SELECT first_seen FROM attackers UNION ALL SELECT last_seen FROM attackers \
         UNION ALL SELECT updated_at FROM attackers \
         UNION ALL SELECT queried_at FROM enrichd_provider_state \
         UNION ALL SELECT next_attempt_at FROM enrichd_provider_state",
        vec![],
    )
    .await;
    assert_eq!(stored.len(), 8);
    for text in stored {
        let text = text.expect("not null");
        assert!(is_fixed_width_timestamp(&text), "{text:?}");
    }
    let kinds = texts(
        &conn,
        "SELECT DISTINCT typeof(cached_at) FROM attacker_intel",
        vec![],
    )
    .await;
    assert_eq!(kinds, [Some("text".to_owned())]);
    assert!(is_fixed_width_timestamp(
        &enrichd_store::sqlite_timestamp_text(chrono::Utc::now())
    ));
    assert!(!is_fixed_width_timestamp("2026-11-23T09:05:07.123456"));
}
