//! Intake and the backlog: attacker-row creation only when owned (once per IP, even under
//! concurrent intake), mapping, ordering, exclusion of fresh, leased and parked work.

use std::time::Duration;

use enrichd_core::ProviderId;
use enrichd_core::ports::{GateEvent, ProviderGate};
use enrichd_store::{ClaimMode, Store, StoredScope};
use enrichd_testkit::db::TestDb;

use crate::store_common::{
    add_attacker, claim, claim_one, count, ctx, exec, greynoise, ip, long_ago, migrated, on_both,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_intake_of_one_ip_creates_exactly_one_attacker_row() {
    on_both(|db: TestDb| async move {
        let first = migrated(&db).await;
        let mut stores = vec![first];
        for _ in 0..2 {
            stores.push(Store::connect(db.url()).await.unwrap());
        }
        let mut tasks = Vec::new();
        for i in 0..9 {
            let store = stores[i % stores.len()].clone();
            tasks.push(tokio::spawn(async move {
                store
                    .note_event(ip("203.0.114.7"), StoredScope::Global, None, None)
                    .await
                    .unwrap()
            }));
        }
        let mut created = 0;
        let mut seen = std::collections::BTreeSet::new();
        for task in tasks {
            let intake = task.await.unwrap();
            created += usize::from(intake.created.is_some());
            assert_eq!(intake.attacker_uuids.len(), 1);
            seen.insert(intake.attacker_uuids[0].clone());
        }
        assert_eq!(created, 1, "{}", db.label());
        assert_eq!(seen.len(), 1);
        let conn = db.connect().await;
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM attackers", vec![]).await,
            1
        );
        let uuid = seen.into_iter().next().unwrap();
        assert!(
            uuid::Uuid::parse_str(&uuid).is_ok() && uuid.len() == 36,
            "{uuid}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_event_with_a_uuid_maps_that_row_and_lookup_without_a_row_has_no_uuid() {
    on_both(|db: TestDb| async move {
        let store = migrated(&db).await;
        let conn = db.connect().await;
        let uuid = "22222222-2222-4222-8222-222222222222";
        add_attacker(&conn, uuid, "::ffff:2.2.2.2", 0).await;
        let intake = store
            .note_event(ip("2.2.2.2"), StoredScope::Global, Some(uuid), None)
            .await
            .unwrap();
        assert_eq!(intake.attacker_uuids, [uuid], "{}", db.label());
        assert_eq!(intake.created, None);
        let view = store.lookup_view(ip("2.2.2.2"), &ctx(&[])).await.unwrap();
        assert_eq!(view.len(), 1);
        assert_eq!(view[0].attacker_uuid.as_deref(), Some(uuid));
        let none = store.lookup_view(ip("3.3.3.3"), &ctx(&[])).await.unwrap();
        assert_eq!(none.len(), 1);
        assert_eq!(none[0].attacker_uuid, None);
        assert_eq!(none[0].attacker_ip, "3.3.3.3");
    })
    .await;
}

#[tokio::test]
async fn backlog_is_newest_first_deduplicated_and_skips_fresh_leased_and_parked_work() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = Store::connect(db.url()).await.unwrap();
        let conn = db.connect().await;
        add_attacker(
            &conn,
            "00000000-0000-4000-8000-000000000001",
            "1.0.0.1",
            300,
        )
        .await;
        add_attacker(
            &conn,
            "00000000-0000-4000-8000-000000000002",
            "1.0.0.2",
            100,
        )
        .await;
        add_attacker(
            &conn,
            "00000000-0000-4000-8000-000000000003",
            "1.0.0.3",
            200,
        )
        .await;
        add_attacker(
            &conn,
            "00000000-0000-4000-8000-000000000004",
            "::ffff:1.0.0.1",
            10,
        )
        .await;
        add_attacker(&conn, "00000000-0000-4000-8000-000000000005", "garbage", 1).await;
        let c = ctx(&[ProviderId::Greynoise]);
        let names = |ips: Vec<enrichd_core::CanonicalIp>| {
            ips.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        assert_eq!(
            names(a.backlog(10, &c).await.unwrap()),
            ["1.0.0.1", "1.0.0.2", "1.0.0.3"],
            "{}",
            db.label()
        );
        assert_eq!(names(a.backlog(1, &c).await.unwrap()), ["1.0.0.1"]);

        // Fresh work leaves the backlog.
        let target = ip("1.0.0.2");
        let claims = claim_one(
            &a,
            "1.0.0.2",
            ProviderId::Greynoise,
            Duration::from_secs(30),
        )
        .await;
        a.apply(
            target,
            StoredScope::Global,
            None,
            vec![(claims.providers[0].1, greynoise("benign"))],
            &c,
        )
        .await
        .unwrap();
        assert_eq!(
            names(a.backlog(10, &c).await.unwrap()),
            ["1.0.0.1", "1.0.0.3"]
        );

        // Leased by a live owner: in nobody's backlog, the holder's included (its own job is
        // running, or the lease holds back work whose provider was unavailable).
        claim(
            &b,
            ip("1.0.0.3"),
            &[ProviderId::Greynoise],
            false,
            Duration::from_secs(60),
            ClaimMode::Due,
        )
        .await;
        assert_eq!(names(a.backlog(10, &c).await.unwrap()), ["1.0.0.1"]);
        assert_eq!(names(b.backlog(10, &c).await.unwrap()), ["1.0.0.1"]);

        // Due again, but its only provider is parked: skipped until the park ends.
        exec(
            &conn,
            "UPDATE enrichd_provider_state SET next_attempt_at = $1 WHERE ip = '1.0.0.2'",
            vec![long_ago(&db)],
        )
        .await;
        assert_eq!(
            names(a.backlog(10, &c).await.unwrap()),
            ["1.0.0.1", "1.0.0.2"]
        );
        let until = a.db_now().await.unwrap() + chrono::Duration::hours(1);
        a.record(ProviderId::Greynoise, GateEvent::Park { until })
            .await
            .unwrap();
        assert_eq!(names(a.backlog(10, &c).await.unwrap()), ["1.0.0.1"]);
    })
    .await;
}
