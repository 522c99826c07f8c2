//! Batched claims and writes: many addresses per transaction behave exactly like one call per
//! address, and one refused address costs the others nothing.

use std::time::Duration;

use enrichd_core::ports::PtrReport;
use enrichd_core::{ProviderId, PtrOutcome};
use enrichd_store::{
    ApplyItem, ClaimMode, ClaimSettings, Claims, EventNote, Store, StoreError, StoredScope,
};
use enrichd_testkit::db::TestDb;

use crate::store_common::{
    abuseipdb, add_attacker, at, claim, claim_one, count, exec, greynoise, ip, migrated, on_both,
    texts,
};

const LEASE: Duration = Duration::from_secs(30);
const BOTH: [ProviderId; 2] = [ProviderId::Greynoise, ProviderId::Abuseipdb];

fn uuid(n: usize) -> String {
    format!("00000000-0000-4000-8000-0000000000{n:02}")
}

fn named(n: usize) -> PtrReport {
    PtrReport {
        outcome: PtrOutcome::Ok,
        name: Some(format!("host-{n}.example.net")),
        record_ttl: Some(Duration::from_secs(3600)),
        forward_confirmed: None,
    }
}

/// A migrated store with `count` attacker rows at `<prefix>.1`, `<prefix>.2`, …; returns the
/// store, a connection for checks and the addresses.
async fn with_attackers(
    db: &TestDb,
    prefix: &str,
    count: usize,
) -> (Store, sea_orm::DatabaseConnection, Vec<String>) {
    let store = migrated(db).await;
    let conn = db.connect().await;
    let targets: Vec<String> = (1..=count).map(|n| format!("{prefix}.{n}")).collect();
    for (n, target) in targets.iter().enumerate() {
        add_attacker(&conn, &uuid(n), target, 0).await;
    }
    (store, conn, targets)
}

/// How many rows of `table` hold a lease in `owner_column`, whoever holds it.
async fn leases_held(conn: &sea_orm::DatabaseConnection, table: &str, owner_column: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {table} WHERE {owner_column} IS NOT NULL");
    count(conn, &sql, vec![]).await
}

/// The items a pass would write for `claims`: a PTR name and an answer per claimed provider.
fn answers(n: usize, target: &str, claims: &Claims) -> ApplyItem {
    ApplyItem {
        ip: ip(target),
        scope: StoredScope::Global,
        write_rows: true,
        ptr: claims.ptr.map(|lease| (lease, named(n))),
        providers: claims
            .providers
            .iter()
            .map(|(provider, lease)| {
                let report = match provider {
                    ProviderId::Greynoise => greynoise("malicious"),
                    _ => abuseipdb(10),
                };
                (*lease, report)
            })
            .collect(),
    }
}

#[tokio::test]
async fn a_batch_claims_and_writes_many_addresses_like_one_call_each() {
    on_both(|db: TestDb| async move {
        let (a, conn, targets) = with_attackers(&db, "45.155.205", 6).await;
        let other = Store::connect(db.url()).await.unwrap();
        let mut ctx = crate::store_common::ctx(&BOTH);
        ctx.ptr_enabled = true;
        // Another replica holds AbuseIPDB for the first address.
        let held = claim_one(&other, &targets[0], ProviderId::Abuseipdb, LEASE).await;
        assert_eq!(held.providers.len(), 1);

        // The second address is named twice: both get the same claims.
        let mut asked: Vec<_> = targets.iter().map(|t| ip(t)).collect();
        asked.push(ip(&targets[1]));
        let claims = a
            .claim_batch(&asked, &BOTH, true, LEASE, ClaimMode::Due)
            .await
            .unwrap();
        assert_eq!(claims.len(), asked.len());
        assert_eq!(claims[6], claims[1], "{}", db.label());
        let claimed: Vec<Vec<ProviderId>> = claims
            .iter()
            .map(|c| c.providers.iter().map(|(p, _)| *p).collect())
            .collect();
        assert_eq!(claimed[0], [ProviderId::Greynoise], "{}", db.label());
        for providers in &claimed[1..] {
            assert_eq!(providers, &BOTH, "{}", db.label());
        }
        assert!(claims.iter().all(|c| c.ptr.is_some()), "{}", db.label());

        let items: Vec<ApplyItem> = targets
            .iter()
            .enumerate()
            .map(|(n, t)| answers(n, t, &claims[n]))
            .collect();
        let outcomes = a.apply_batch(items, &ctx).await;
        for (n, outcome) in outcomes.into_iter().enumerate() {
            let outcome = outcome.unwrap_or_else(|e| panic!("{} {n}: {e}", db.label()));
            assert_eq!(outcome.applied, claimed[n], "{} {n}", db.label());
            assert_eq!(outcome.ptr_applied, Some(true));
            assert_eq!((outcome.intel_rows, outcome.events), (1, 1), "{} {n}", db.label());
        }

        for (n, target) in targets.iter().enumerate() {
            let row = texts(
                &conn,
                "SELECT i.greynoise_classification || ' ' || i.aggregate_verdict || ' ' || a.ptr_record \
                 FROM attacker_intel i JOIN attackers a ON a.uuid = i.attacker_uuid \
                 WHERE i.attacker_ip = $1",
                vec![target.clone().into()],
            )
            .await;
            assert_eq!(
                row,
                [Some(format!("malicious malicious host-{n}.example.net"))],
                "{} {target}",
                db.label()
            );
        }
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM enrichd_outbox", vec![]).await, 6);
        // Our leases ended with the write; the other replica's lease is untouched.
        assert_eq!(
            leases_held(&conn, "enrichd_provider_state", "lease_owner").await,
            1,
            "{}",
            db.label()
        );
        assert_eq!(
            leases_held(&conn, "enrichd_ip_state", "ptr_lease_owner").await,
            0
        );
        // Nothing is due any more but the held item.
        let again = a
            .claim_batch(&asked, &BOTH, true, LEASE, ClaimMode::Due)
            .await
            .unwrap();
        assert!(again.iter().all(Claims::is_empty), "{} {again:?}", db.label());
    })
    .await;
}

/// New provider and address rows are created already leased, and only the rows that existed go
/// through the lease update: an address with both kinds still gets each due item exactly once.
#[tokio::test]
async fn a_claim_over_new_and_known_rows_leases_each_due_provider_once() {
    on_both(|db: TestDb| async move {
        let (a, conn, targets) = with_attackers(&db, "45.155.207", 3).await;
        let ctx = crate::store_common::ctx(&[ProviderId::Greynoise]);
        // The first address has a fresh GreyNoise answer; the second's GreyNoise lease is ours
        // and still open.
        let first = claim_one(&a, &targets[0], ProviderId::Greynoise, LEASE).await;
        let written = a
            .apply_batch(vec![answers(0, &targets[0], &first)], &ctx)
            .await;
        assert!(written[0].is_ok(), "{} {written:?}", db.label());
        let held = claim_one(&a, &targets[1], ProviderId::Greynoise, LEASE).await;
        assert_eq!(held.providers.len(), 1, "{}", db.label());

        let asked: Vec<_> = targets.iter().map(|t| ip(t)).collect();
        let claims = a
            .claim_batch(&asked, &BOTH, true, LEASE, ClaimMode::Due)
            .await
            .unwrap();
        let claimed: Vec<Vec<ProviderId>> = claims
            .iter()
            .map(|c| c.providers.iter().map(|(p, _)| *p).collect())
            .collect();
        assert_eq!(
            claimed,
            [vec![ProviderId::Abuseipdb], BOTH.to_vec(), BOTH.to_vec()],
            "{}",
            db.label()
        );
        assert_eq!(
            leases_held(&conn, "enrichd_provider_state", "lease_owner").await,
            5,
            "{}",
            db.label()
        );
        // PTR: the first two rows existed (created by the single claims), the third is new.
        assert!(claims.iter().all(|c| c.ptr.is_some()), "{}", db.label());
        assert_eq!(
            leases_held(&conn, "enrichd_ip_state", "ptr_lease_owner").await,
            3,
            "{}",
            db.label()
        );
    })
    .await;
}

#[tokio::test]
async fn one_refused_address_costs_the_others_nothing() {
    on_both(|db: TestDb| async move {
        let (a, conn, targets) = with_attackers(&db, "45.155.206", 3).await;
        let ctx = crate::store_common::ctx(&BOTH);
        let asked: Vec<_> = targets.iter().map(|t| ip(t)).collect();
        let claims = a
            .claim_batch(
                &asked,
                &[ProviderId::Greynoise],
                false,
                LEASE,
                ClaimMode::Due,
            )
            .await
            .unwrap();
        // A row of the second address no longer decodes: its write must fail, alone.
        exec(
            &conn,
            "INSERT INTO enrichd_provider_state (ip, provider, outcome, attempts, updated_at) \
             SELECT ip, 'abuseipdb', 'no-such-outcome', 0, updated_at FROM enrichd_ip_state \
             WHERE ip = $1",
            vec![targets[1].clone().into()],
        )
        .await;
        let items: Vec<ApplyItem> = targets
            .iter()
            .enumerate()
            .map(|(n, t)| answers(n, t, &claims[n]))
            .collect();
        let outcomes = a.apply_batch(items, &ctx).await;
        assert!(
            matches!(outcomes[1], Err(StoreError::Malformed { .. })),
            "{} {:?}",
            db.label(),
            outcomes[1]
        );
        for n in [0, 2] {
            let outcome = outcomes[n].as_ref().unwrap();
            assert_eq!(
                outcome.applied,
                [ProviderId::Greynoise],
                "{} {n}",
                db.label()
            );
        }
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM attacker_intel", vec![]).await,
            2,
            "{}",
            db.label()
        );
    })
    .await;
}

#[tokio::test]
async fn one_intake_batch_creates_one_attacker_row_per_address() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let conn = db.connect().await;
        let named = "5b0f2d6e-3c1a-4e8b-9a7d-2f6c8e1b4a90";
        let note = |text: &str, uuid: Option<&str>| EventNote {
            ip: ip(text),
            scope: StoredScope::Global,
            attacker_uuid: uuid.map(str::to_owned),
            first_seen: None,
            claim: false,
        };
        // The second address comes twice in the batch, the third names its attacker row.
        let notes = vec![
            note("45.155.207.1", None),
            note("45.155.207.2", None),
            note("45.155.207.3", Some(named)),
            note("45.155.207.2", None),
        ];
        let intakes: Vec<_> = a
            .note_events(notes, &ClaimSettings::default())
            .await
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{}: {e}", db.label())))
            .collect();
        assert!(intakes[0].created.is_some() && intakes[1].created.is_some());
        assert_eq!(intakes[2].attacker_uuids, [named], "{}", db.label());
        assert_eq!(intakes[3].created, None, "{}", db.label());
        assert_eq!(intakes[3].attacker_uuids, intakes[1].attacker_uuids);
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM attackers", vec![]).await,
            3,
            "{}",
            db.label()
        );
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM enrichd_attacker_map m JOIN enrichd_ip_state s \
                 ON s.ip = m.ip WHERE s.scope = 'global' AND s.last_event_at IS NOT NULL",
                vec![]
            )
            .await,
            3,
            "{}",
            db.label()
        );
    })
    .await;
}

#[tokio::test]
async fn an_intake_batch_claims_the_work_of_the_events_that_ask_for_it() {
    on_both(|db: TestDb| async move {
        let a = migrated(&db).await;
        let b = migrated(&db).await;
        let providers = [ProviderId::Greynoise, ProviderId::Abuseipdb];
        let settings = ClaimSettings {
            providers: providers.to_vec(),
            ptr: true,
            lease: Duration::from_secs(30),
        };
        let note = |text: &str, claim: bool| EventNote {
            ip: ip(text),
            scope: StoredScope::Global,
            attacker_uuid: None,
            first_seen: None,
            claim,
        };
        let intakes: Vec<_> = a
            .note_events(
                vec![note("45.155.208.1", true), note("45.155.208.2", false)],
                &settings,
            )
            .await
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{}: {e}", db.label())))
            .collect();
        let claimed = intakes[0].claims.clone().expect("claimed with the intake");
        assert!(claimed.ptr.is_some(), "{}", db.label());
        assert_eq!(
            claimed
                .providers
                .iter()
                .map(|(p, _)| *p)
                .collect::<Vec<_>>(),
            providers,
            "{}",
            db.label()
        );
        assert!(intakes[0].created.is_some());
        assert_eq!(
            intakes[1].claims, None,
            "an event that does not ask claims nothing"
        );

        // The intake's leases hold against another replica; the unclaimed address is free.
        let other = claim(
            &b,
            ip("45.155.208.1"),
            &providers,
            true,
            LEASE,
            ClaimMode::Due,
        )
        .await;
        assert!(other.is_empty(), "{}: {other:?}", db.label());
        let free = claim(
            &b,
            ip("45.155.208.2"),
            &providers,
            true,
            LEASE,
            ClaimMode::Due,
        )
        .await;
        assert!(
            free.ptr.is_some() && free.providers.len() == 2,
            "{}",
            db.label()
        );
    })
    .await;
}

#[tokio::test]
async fn a_pool_of_its_own_records_each_transactions_own_clock() {
    on_both(|db: TestDb| async move {
        let shared = migrated(&db).await;
        // On PostgreSQL its transactions read the clock in their first statement instead of
        // with `BEGIN`; on SQLite it is the same pools.
        let own = shared.with_own_pool(2).await.expect("a pool of its own");
        let conn = db.connect().await;
        let settings = ClaimSettings {
            providers: BOTH.to_vec(),
            ptr: true,
            lease: LEASE,
        };
        let before = shared.db_now().await.expect("clock");
        let past = before - chrono::Duration::days(2);
        let future = before + chrono::Duration::days(2);
        let note = |text: &str, first_seen| EventNote {
            ip: ip(text),
            scope: StoredScope::Global,
            attacker_uuid: None,
            first_seen: Some(first_seen),
            claim: true,
        };
        let intakes: Vec<_> = own
            .note_events(
                vec![note("45.155.209.1", past), note("45.155.209.2", future)],
                &settings,
            )
            .await
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{}: {e}", db.label())))
            .collect();
        let claims = intakes[0].claims.clone().expect("claimed with the intake");
        assert_eq!(claims.providers.len(), 2, "{}", db.label());
        let lease = claims.ptr.expect("the PTR claimed");
        let now = lease.claimed_at;
        assert!(now >= before, "{}: {now} < {before}", db.label());

        // The leases start at the clock the rows record; a first sighting later than that
        // clock is recorded as the clock.
        for (target, first) in [("45.155.209.1", past), ("45.155.209.2", now)] {
            let rows = count(
                &conn,
                "SELECT COUNT(*) FROM enrichd_ip_state WHERE ip = $1 AND last_event_at = $2 \
                 AND updated_at = $2 AND first_event_at = $3",
                vec![target.into(), at(&db, now), at(&db, first)],
            )
            .await;
            assert_eq!(rows, 1, "{}: {target}", db.label());
        }
        assert!(
            intakes[1]
                .claims
                .as_ref()
                .is_some_and(|c| c.providers.iter().all(|(_, l)| l.claimed_at == now)),
            "{}: one transaction, one clock",
            db.label()
        );

        // The write through the same pool lands, fenced by the claims, at a later clock.
        let ctx = crate::store_common::ctx(&BOTH);
        let outcome = own
            .apply_batch(vec![answers(1, "45.155.209.1", &claims)], &ctx)
            .await
            .pop()
            .expect("one outcome")
            .unwrap_or_else(|e| panic!("{}: {e}", db.label()));
        assert_eq!(outcome.applied, BOTH, "{}", db.label());
        assert_eq!(outcome.ptr_applied, Some(true), "{}", db.label());
        let written = count(
            &conn,
            "SELECT COUNT(*) FROM enrichd_ip_state WHERE ip = $1 AND ptr_name = $2 \
             AND updated_at > $3",
            vec![
                "45.155.209.1".into(),
                "host-1.example.net".into(),
                at(&db, now),
            ],
        )
        .await;
        assert_eq!(written, 1, "{}", db.label());
    })
    .await;
}
