//! Leases: claimed and compared on the database clock; released on shutdown.

use std::time::Duration;

use enrichd_core::{CanonicalIp, ProviderId};
use enrichd_store::{ClaimMode, Store, StoredScope};
use enrichd_testkit::db::TestDb;
use enrichd_testkit::eventually;

use crate::store_common::{claim, ctx, greynoise, ip, migrated, on_both};

const SHORT: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(300);

#[tokio::test]
async fn a_lease_is_refused_to_another_owner_until_it_lapses_on_the_database_clock() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = Store::connect(db.url()).await.unwrap();
        let target = ip("9.9.9.9");
        let work = [ProviderId::Greynoise, ProviderId::Threatfox];
        let held = claim(&a, target, &work, true, SHORT, ClaimMode::Due).await;
        assert_eq!(held.providers.len(), 2, "{}", db.label());
        let lease = held.ptr.expect("ptr lease");
        assert!(lease.until > lease.claimed_at);

        let refused = claim(&b, target, &work, true, LONG, ClaimMode::Refresh).await;
        assert!(refused.is_empty(), "{refused:?}");

        let taken = std::sync::Arc::new(std::sync::Mutex::new(None));
        let lapsed = eventually(Duration::from_secs(10), || {
            let b = b.clone();
            let taken = taken.clone();
            async move {
                let claims = claim(&b, target, &work, true, LONG, ClaimMode::Due).await;
                let got = !claims.is_empty();
                if got {
                    *taken.lock().unwrap() = Some(claims);
                }
                got
            }
        })
        .await;
        assert!(lapsed, "the lease never lapsed");
        let taken = taken.lock().unwrap().take().unwrap();
        assert_eq!(taken.providers.len(), 2);
        let ptr = taken.ptr.expect("ptr taken over");
        assert!(
            ptr.claimed_at > lease.until,
            "taken only after the lease's end on the DB clock"
        );
        assert!(b.db_now().await.unwrap() >= ptr.claimed_at);
    })
    .await;
}

#[tokio::test]
async fn fresh_work_is_not_claimed_and_released_leases_are_free_at_once() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = Store::connect(db.url()).await.unwrap();
        let target = ip("9.9.9.10");
        let only = [ProviderId::Greynoise];
        let claims = claim(&a, target, &only, false, LONG, ClaimMode::Due).await;
        // The holder itself may renew its own lease; another owner may not take it.
        let renewed = claim(&a, target, &only, false, LONG, ClaimMode::Refresh).await;
        assert_eq!(renewed.providers.len(), 1);
        let other = claim(&b, target, &only, false, LONG, ClaimMode::Refresh).await;
        assert!(other.is_empty(), "{other:?}");
        assert_eq!(a.release_leases().await.unwrap(), 1);
        let claims_b = claim(&b, target, &only, false, LONG, ClaimMode::Due).await;
        assert_eq!(
            claims_b.providers.len(),
            1,
            "released lease is free: {}",
            db.label()
        );
        assert!(claims_b.providers[0].1.claimed_at >= claims.providers[0].1.claimed_at);
        b.apply(
            target,
            StoredScope::Global,
            None,
            vec![(claims_b.providers[0].1, greynoise("benign"))],
            &ctx(&only),
        )
        .await
        .unwrap();
        // Answered and fresh: nothing is due; a refresh still takes it; the lease was cleared.
        let due = claim(&a, target, &only, false, LONG, ClaimMode::Due).await;
        assert!(due.is_empty(), "{due:?}");
        let refresh = claim(&a, target, &only, false, LONG, ClaimMode::Refresh).await;
        assert_eq!(refresh.providers.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn giving_back_one_item_frees_only_that_item() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = Store::connect(db.url()).await.unwrap();
        let target = ip("9.9.9.12");
        let both = [ProviderId::Feodo, ProviderId::Threatfox];
        claim(&a, target, &both, true, LONG, ClaimMode::Due).await;
        a.release_work(target, &[ProviderId::Feodo], true)
            .await
            .unwrap();
        let partial = claim(&b, target, &both, true, LONG, ClaimMode::Due).await;
        assert!(partial.ptr.is_some());
        assert_eq!(
            partial.providers.iter().map(|p| p.0).collect::<Vec<_>>(),
            [ProviderId::Feodo]
        );
        let rest = claim(
            &b,
            target,
            &[ProviderId::Threatfox],
            false,
            LONG,
            ClaimMode::Due,
        )
        .await;
        assert!(rest.is_empty(), "{}: threatfox is still held", db.label());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_claiming_the_same_new_addresses_at_once_share_them_out() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = Store::connect(db.url()).await.unwrap();
        let targets: Vec<CanonicalIp> = (1..=40).map(|n| ip(&format!("10.9.0.{n}"))).collect();
        let reversed: Vec<CanonicalIp> = targets.iter().rev().copied().collect();
        let work = [ProviderId::Greynoise, ProviderId::Threatfox];
        let (by_a, by_b) = tokio::join!(
            a.claim_batch(&targets, &work, true, LONG, ClaimMode::Due),
            b.claim_batch(&reversed, &work, true, LONG, ClaimMode::Due),
        );
        let (by_a, by_b) = (by_a.unwrap(), by_b.unwrap());
        for (i, target) in targets.iter().enumerate() {
            let (mine, theirs) = (&by_a[i], &by_b[targets.len() - 1 - i]);
            assert_eq!(
                usize::from(mine.ptr.is_some()) + usize::from(theirs.ptr.is_some()),
                1,
                "{}: the PTR of {target} is leased exactly once",
                db.label()
            );
            for provider in work {
                let holders = [mine, theirs]
                    .iter()
                    .filter(|c| c.providers.iter().any(|(p, _)| *p == provider))
                    .count();
                assert_eq!(
                    holders,
                    1,
                    "{}: {provider:?} of {target} is leased exactly once",
                    db.label()
                );
            }
        }
    })
    .await;
}
