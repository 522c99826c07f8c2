//! The outbox: version bumps, delete-by-version, unchanged payloads, no bus.

use std::time::Duration;

use enrichd_core::ProviderId;
use enrichd_store::StoredScope;
use enrichd_testkit::db::TestDb;

use crate::store_common::{
    abuseipdb, add_attacker, claim_and_apply, claim_one, count, ctx, exec, greynoise, ip, long_ago,
    migrated, on_both,
};

const UUID: &str = "00000000-0000-4000-8000-000000000001";

#[tokio::test]
async fn a_newer_payload_replaces_an_unpublished_one_and_delete_keeps_the_newer_version() {
    on_both(|db: TestDb| async move {
        let store = migrated(&db).await;
        let conn = db.connect().await;
        add_attacker(&conn, UUID, "7.7.7.7", 0).await;
        let target = ip("7.7.7.7");
        let both = ctx(&[ProviderId::Greynoise, ProviderId::Abuseipdb]);
        assert_eq!(
            claim_and_apply(
                &store,
                target,
                ProviderId::Greynoise,
                greynoise("benign"),
                &both
            )
            .await
            .events,
            1
        );
        let first = store
            .claim_outbox(10, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(first.len(), 1, "{}", db.label());
        assert_eq!(first[0].version, 1);

        // Same answer again: the payload is unchanged, nothing new to publish.
        assert_eq!(
            claim_and_apply(
                &store,
                target,
                ProviderId::Greynoise,
                greynoise("benign"),
                &both
            )
            .await
            .events,
            0
        );
        // A new provider answer changes it while v1 is being published.
        assert_eq!(
            claim_and_apply(&store, target, ProviderId::Abuseipdb, abuseipdb(40), &both)
                .await
                .events,
            1
        );
        assert!(
            store
                .claim_outbox(10, Duration::from_secs(60))
                .await
                .unwrap()
                .is_empty(),
            "still claimed"
        );
        assert!(
            !store.delete_outbox(UUID, 1).await.unwrap(),
            "v1 was replaced"
        );
        let second = store
            .claim_outbox(10, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].version, 2);
        let envelope: serde_json::Value = serde_json::from_str(&second[0].payload).unwrap();
        assert_eq!(envelope["topic"], "attacker.intel.enriched");
        assert_eq!(envelope["type"], "intel.enriched");
        assert_eq!(envelope["payload"]["attacker_uuid"], UUID);
        assert_eq!(envelope["payload"]["abuseipdb_score"], 40);
        assert_eq!(envelope["payload"]["aggregate_verdict"], "suspicious");
        assert!(envelope["payload"].get("uuid").is_none());
        let stats = store.outbox_stats().await.unwrap();
        assert_eq!(stats.depth, 1);
        assert!(stats.oldest_age.is_some());
        assert!(store.delete_outbox(UUID, 2).await.unwrap());
        assert_eq!(store.outbox_stats().await.unwrap().depth, 0);
    })
    .await;
}

#[tokio::test]
async fn without_a_bus_nothing_is_written_to_the_outbox() {
    on_both(|db: TestDb| async move {
        let store = migrated(&db).await;
        let conn = db.connect().await;
        add_attacker(&conn, UUID, "7.7.7.8", 0).await;
        let target = ip("7.7.7.8");
        let mut no_bus = ctx(&[ProviderId::Greynoise]);
        no_bus.outbox_enabled = false;
        let claims = claim_one(
            &store,
            "7.7.7.8",
            ProviderId::Greynoise,
            Duration::from_secs(30),
        )
        .await;
        let out = store
            .apply(
                target,
                StoredScope::Global,
                None,
                vec![(claims.providers[0].1, greynoise("benign"))],
                &no_bus,
            )
            .await
            .unwrap();
        assert_eq!((out.intel_rows, out.events), (1, 0));
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM enrichd_outbox", vec![]).await,
            0,
            "{}",
            db.label()
        );
    })
    .await;
}

#[tokio::test]
async fn a_write_for_the_relay_hands_over_the_rows_no_live_claim_holds() {
    on_both(|db: TestDb| async move {
        let store = migrated(&db).await;
        let conn = db.connect().await;
        add_attacker(&conn, UUID, "7.7.7.9", 0).await;
        let target = ip("7.7.7.9");
        let mut relayed = ctx(&[ProviderId::Greynoise, ProviderId::Abuseipdb]);
        relayed.relay_claim = Some(Duration::from_secs(30));

        let first = claim_and_apply(
            &store,
            target,
            ProviderId::Greynoise,
            greynoise("benign"),
            &relayed,
        )
        .await;
        assert_eq!(first.events, 1, "{}", db.label());
        assert_eq!(first.handed_off.len(), 1, "a new row is handed over");
        assert_eq!(
            (
                first.handed_off[0].attacker_uuid.as_str(),
                first.handed_off[0].version
            ),
            (UUID, 1)
        );
        let envelope: serde_json::Value =
            serde_json::from_str(&first.handed_off[0].payload).unwrap();
        assert_eq!(envelope["payload"]["greynoise_classification"], "benign");
        assert!(
            store
                .claim_outbox(10, Duration::from_secs(60))
                .await
                .unwrap()
                .is_empty(),
            "a handed-over row is claimed: no other relay takes it"
        );

        // v1 is still out (claimed): v2 is not handed over, and waits for v1's delete.
        let second = claim_and_apply(
            &store,
            target,
            ProviderId::Abuseipdb,
            abuseipdb(40),
            &relayed,
        )
        .await;
        assert_eq!((second.events, second.handed_off.len()), (1, 0));
        assert!(!store.delete_outbox(UUID, 1).await.unwrap());
        let released = store
            .claim_outbox(10, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].version, 2);
        assert!(store.delete_outbox(UUID, 2).await.unwrap());

        // With nothing in flight, the next change is handed over again.
        let third = claim_and_apply(
            &store,
            target,
            ProviderId::Abuseipdb,
            abuseipdb(90),
            &relayed,
        )
        .await;
        assert_eq!(third.handed_off.len(), 1);
        assert_eq!(third.handed_off[0].version, 1);
    })
    .await;
}

#[tokio::test]
async fn a_write_takes_over_an_unpublished_row_whose_claim_lapsed() {
    on_both(|db: TestDb| async move {
        let store = migrated(&db).await;
        let conn = db.connect().await;
        add_attacker(&conn, UUID, "7.7.7.10", 0).await;
        let target = ip("7.7.7.10");
        let plain = ctx(&[ProviderId::Greynoise, ProviderId::Abuseipdb]);
        let mut relayed = plain.clone();
        relayed.relay_claim = Some(Duration::from_secs(30));
        // Written for some other relay (as `lookup` does), claimed by one that then died.
        let left = claim_and_apply(
            &store,
            target,
            ProviderId::Greynoise,
            greynoise("benign"),
            &plain,
        )
        .await;
        assert!(left.handed_off.is_empty(), "{}", db.label());
        assert_eq!(
            store
                .claim_outbox(10, Duration::from_secs(60))
                .await
                .unwrap()
                .len(),
            1
        );
        exec(
            &conn,
            "UPDATE enrichd_outbox SET claimed_until = $1",
            vec![long_ago(&db)],
        )
        .await;

        let taken = claim_and_apply(
            &store,
            target,
            ProviderId::Abuseipdb,
            abuseipdb(40),
            &relayed,
        )
        .await;
        assert_eq!(taken.handed_off.len(), 1, "a lapsed claim is taken over");
        assert_eq!(taken.handed_off[0].version, 2);
        assert!(
            store
                .claim_outbox(10, Duration::from_secs(60))
                .await
                .unwrap()
                .is_empty()
        );
    })
    .await;
}
