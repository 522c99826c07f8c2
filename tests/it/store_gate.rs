//! Cluster-wide rate, quota, parks and key rejection through the store.

use std::time::Duration;

use enrichd_core::ProviderId;
use enrichd_core::Secret;
use enrichd_core::ports::{GateEvent, ProviderGate, ProviderLimits, Reservation};
use enrichd_intel::key_fingerprint;
use enrichd_store::Store;
use enrichd_testkit::db::TestDb;

use crate::store_common::{migrated, on_both};

fn limits(rate: f64, quota: u32, key: &str) -> ProviderLimits {
    ProviderLimits {
        rate_per_sec: rate,
        daily_quota: quota,
        key_fingerprint: Some(key_fingerprint(&Secret::new(key))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    reason = "small, positive counts and durations"
)]
async fn two_stores_never_grant_more_slots_than_the_rate_allows() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = Store::connect(db.url()).await.unwrap();
        let rate = 5.0;
        let l = limits(rate, 0, "k");
        let started = tokio::time::Instant::now();
        let burst = |store: Store, l: ProviderLimits| async move {
            let mut granted = Vec::new();
            for _ in 0..20 {
                if let Reservation::Granted { wait, .. } =
                    store.reserve(ProviderId::Abuseipdb, &l).await.unwrap()
                {
                    granted.push(wait);
                }
            }
            granted
        };
        let (ga, gb) = tokio::join!(burst(a.clone(), l.clone()), burst(b.clone(), l.clone()));
        let elapsed = started.elapsed().as_secs_f64();
        let mut waits: Vec<Duration> = ga.into_iter().chain(gb).collect();
        waits.sort();
        // Slots inside the 2 s horizon, plus those that freed up while the burst ran.
        let bound = 1 + (rate * (2.0 + elapsed)).ceil() as usize;
        assert!(
            waits.len() >= 5,
            "{}: only {} grants",
            db.label(),
            waits.len()
        );
        assert!(
            waits.len() <= bound,
            "{}: {} grants > {bound}",
            db.label(),
            waits.len()
        );
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(2)));
        // Granted slots are spaced by the rate: the latest is at least (n-1)/rate - elapsed out.
        let last = waits.last().unwrap().as_secs_f64();
        assert!(
            last + elapsed >= (waits.len() - 1) as f64 / rate - 0.05,
            "{}: {} grants within {last:.3}s + {elapsed:.3}s",
            db.label(),
            waits.len()
        );
    })
    .await;
}

#[tokio::test]
async fn parks_and_key_rejection_are_shared_and_a_new_key_lifts_a_rejection() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = Store::connect(db.url()).await.unwrap();
        let until = a.db_now().await.unwrap() + chrono::Duration::hours(1);
        a.record(ProviderId::Greynoise, GateEvent::Park { until }).await.unwrap();
        let parked = b.reserve(ProviderId::Greynoise, &limits(1.0, 0, "k")).await.unwrap();
        assert!(
            matches!(parked, Reservation::Parked { until: u } if (u - until).num_milliseconds().abs() < 2),
            "{}: {parked:?}",
            db.label()
        );
        let status = b.provider_status(ProviderId::Greynoise, &limits(1.0, 0, "k")).await.unwrap();
        assert!(status.parked_until.is_some());

        a.record(
            ProviderId::Threatfox,
            GateEvent::KeyRejected {
                key_fingerprint: key_fingerprint(&Secret::new("old-key")),
            },
        )
        .await
        .unwrap();
        let old = limits(0.0, 0, "old-key");
        assert_eq!(b.reserve(ProviderId::Threatfox, &old).await.unwrap(), Reservation::KeyRejected);
        assert!(b.provider_status(ProviderId::Threatfox, &old).await.unwrap().key_rejected);
        let new = limits(0.0, 0, "new-key");
        assert!(matches!(
            b.reserve(ProviderId::Threatfox, &new).await.unwrap(),
            Reservation::Granted { .. }
        ));
        assert!(matches!(
            a.reserve(ProviderId::Threatfox, &old).await.unwrap(),
            Reservation::Granted { .. }
        ), "the rejection was lifted");
    })
    .await;
}

#[tokio::test]
async fn a_daily_quota_is_spent_across_stores() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = Store::connect(db.url()).await.unwrap();
        let l = limits(0.0, 3, "k");
        for store in [&a, &b, &a] {
            assert!(matches!(
                store.reserve(ProviderId::Abuseipdb, &l).await.unwrap(),
                Reservation::Granted { .. }
            ));
        }
        let spent = b.reserve(ProviderId::Abuseipdb, &l).await.unwrap();
        let Reservation::QuotaExhausted { reset_at } = spent else {
            panic!("{}: {spent:?}", db.label());
        };
        let now = a.db_now().await.unwrap();
        assert!(reset_at > now && reset_at <= now + chrono::Duration::days(1));
        assert_eq!(
            reset_at.time(),
            chrono::NaiveTime::MIN,
            "resets at 00:00 UTC"
        );
        let status = a.provider_status(ProviderId::Abuseipdb, &l).await.unwrap();
        assert_eq!(status.quota_remaining, Some(0));
        assert_eq!(status.quota_reset_at, Some(reset_at));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unmetered_provider_is_granted_without_a_limits_row_and_sees_a_park_soon() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = Store::connect(db.url()).await.unwrap();
        let unmetered = limits(0.0, 0, "k");
        // A provider's full concurrency at once, before the provider has a limits row.
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (b, unmetered) = (b.clone(), unmetered.clone());
            calls.spawn(async move { b.reserve(ProviderId::Greynoise, &unmetered).await });
        }
        let answers = calls.join_all().await;
        assert!(
            answers
                .iter()
                .all(|r| matches!(r, Ok(Reservation::Granted { .. }))),
            "{}: {answers:?}",
            db.label()
        );

        let until = a.db_now().await.unwrap() + chrono::Duration::hours(1);
        a.record(ProviderId::Greynoise, GateEvent::Park { until })
            .await
            .unwrap();
        let seen = enrichd_testkit::eventually(Duration::from_secs(5), || {
            let (b, unmetered) = (b.clone(), unmetered.clone());
            async move {
                matches!(
                    b.reserve(ProviderId::Greynoise, &unmetered).await,
                    Ok(Reservation::Parked { .. })
                )
            }
        })
        .await;
        assert!(
            seen,
            "{}: another store's park never reached this one",
            db.label()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_taken_in_blocks_keep_the_cluster_rate_and_unused_quota_comes_back() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = Store::connect(db.url()).await.unwrap();
        let rate = 200.0;
        let l = limits(rate, 10_000, "k");
        let burst = |store: Store, l: ProviderLimits| async move {
            let mut calls = Vec::new();
            while calls.len() < 100 {
                match store.reserve(ProviderId::Abuseipdb, &l).await.unwrap() {
                    Reservation::Granted { wait, .. } => {
                        let at = tokio::time::Instant::now() + wait;
                        calls.push(at);
                        // A caller holds its slot until its time, as the provider actor does.
                        tokio::time::sleep_until(at).await;
                    }
                    Reservation::Busy { .. } => tokio::task::yield_now().await,
                    other => panic!("{other:?}"),
                }
            }
            calls
        };
        let (ca, cb) = tokio::join!(burst(a.clone(), l.clone()), burst(b.clone(), l.clone()));
        let mut calls: Vec<_> = ca.into_iter().chain(cb).collect();
        calls.sort();
        // Two replicas taking blocks off one cursor: about the rate in any 100 ms (20), never
        // the double that two replicas granting the same slots would make. Each replica
        // places its slots on its own estimate of the database clock (it starts its block
        // when the reserving transaction has committed), so under load one replica's late
        // slots can meet the other's first ones at a block's edge.
        let window = Duration::from_millis(100);
        let most = calls
            .iter()
            .map(|start| {
                calls
                    .iter()
                    .filter(|t| **t >= *start && **t < *start + window)
                    .count()
            })
            .max()
            .unwrap();
        assert!(
            most <= 30,
            "{}: {most} calls in 100 ms at 200/s",
            db.label()
        );
        let spent = calls.last().unwrap().duration_since(calls[0]).as_secs_f64();
        assert!(
            spent >= 199.0 / rate - 0.05,
            "{}: 200 calls in {spent:.3} s",
            db.label()
        );

        // What the replicas reserved ahead and did not use comes back (the next block takes
        // it along; shutdown gives it back at once), so the day's count is what was used.
        let held = 10_000
            - a.provider_status(ProviderId::Abuseipdb, &l)
                .await
                .unwrap()
                .quota_remaining
                .unwrap();
        assert!(held >= 200, "{}", db.label());
        let released = a.release_slots().await.unwrap() + b.release_slots().await.unwrap();
        assert_eq!(u64::from(held - 200), released, "{}", db.label());
        let status = a.provider_status(ProviderId::Abuseipdb, &l).await.unwrap();
        assert_eq!(
            status.quota_remaining,
            Some(10_000 - 200),
            "{}: unused slots hold no quota",
            db.label()
        );
    })
    .await;
}
