//! The statement texts the store sends, pinned byte for byte per backend.
//!
//! PostgreSQL caches a prepared statement per text and connection, and ARCHITECTURE.md's
//! planner notes are about these exact texts: a refactoring of how statements are built must
//! not change what is sent. A scenario that goes through every kind of statement (intake,
//! claims, the write with its joined parts, the outbox, the gate, the read-only views) runs
//! on a fresh database of each backend, and every text sent is compared, in order, with
//! `pinned/<backend>.sql` (one statement per line; lines starting with `--` are notes).
//!
//! A deliberate change of a text: run with `PINNED_STATEMENTS=update` to rewrite the files,
//! and say in the commit why the new texts are right.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use enrichd_core::ports::{GateEvent, ProviderGate, ProviderLimits, PtrReport};
use enrichd_core::{
    CanonicalIp, ProviderFields, ProviderId, ProviderOutcome, ProviderReport, PtrOutcome, Verdict,
};
use enrichd_testkit::db::TestDb;

use crate::{
    ApplyContext, ApplyItem, ClaimMode, ClaimSettings, Claims, EventNote, Lease, Store, StoredScope,
};

/// Every statement text sent through `store`'s pools from now on, in order.
fn record(store: &mut Store) -> Arc<Mutex<Vec<String>>> {
    let sent = Arc::new(Mutex::new(Vec::new()));
    for pool in [&mut store.write, &mut store.read] {
        let sent = Arc::clone(&sent);
        pool.set_metric_callback(move |info| {
            sent.lock().unwrap().push(info.statement.sql.clone());
        });
    }
    sent
}

fn ip(text: &str) -> CanonicalIp {
    CanonicalIp::parse(text).unwrap()
}

fn note(text: &str, attacker_uuid: Option<&str>, claim: bool) -> EventNote {
    EventNote {
        ip: ip(text),
        scope: StoredScope::Global,
        attacker_uuid: attacker_uuid.map(str::to_owned),
        first_seen: Some(DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap()),
        claim,
    }
}

fn answer(provider: ProviderId) -> ProviderReport {
    let fields = match provider {
        ProviderId::Greynoise => ProviderFields::Greynoise {
            classification: "malicious".into(),
            name: Some("Acme Scanner".into()),
            tags: vec!["Mirai".into()],
        },
        ProviderId::Abuseipdb => ProviderFields::Abuseipdb {
            score: 90,
            categories: vec![14, 18],
        },
        ProviderId::Feodo => ProviderFields::Feodo {
            listed: true,
            malware_family: Some("QakBot".into()),
        },
        ProviderId::Threatfox => ProviderFields::Threatfox {
            listed: false,
            threat_types: Vec::new(),
            ioc_types: Vec::new(),
            malware_families: Vec::new(),
        },
    };
    ProviderReport::answer(
        ProviderOutcome::Ok,
        Some(Verdict::Malicious),
        fields,
        serde_json::json!({"provider": provider.as_str()}),
    )
}

/// The claimed work of `claims` answered: PTR with `ptr`, every provider with an answer.
fn answers(target: &str, scope: StoredScope, claims: &Claims, ptr: Option<PtrReport>) -> ApplyItem {
    ApplyItem {
        ip: ip(target),
        scope,
        write_rows: true,
        ptr: claims.ptr.zip(ptr),
        providers: claims
            .providers
            .iter()
            .map(|(provider, lease)| (*lease, answer(*provider)))
            .collect(),
    }
}

fn named(name: &str) -> PtrReport {
    PtrReport {
        outcome: PtrOutcome::Ok,
        name: Some(name.into()),
        record_ttl: Some(Duration::from_secs(3600)),
        forward_confirmed: Some(true),
    }
}

const A: &str = "198.51.100.7";
const B: &str = "203.0.113.9";
const C: &str = "192.0.2.1";
const NAMED_UUID: &str = "0b0e7d5c-1111-4aaa-8bbb-000000000001";
const LEASE: Duration = Duration::from_secs(30);

/// Every kind of statement the store sends, once or more, in an order that does not depend
/// on timing: no gate cache is read twice within its recheck time, no lease lapses.
async fn scenario(store: &Store) {
    let ctx = ApplyContext {
        ptr_enabled: true,
        relay_claim: Some(Duration::from_secs(30)),
        ..ApplyContext::default()
    };
    intake_claims_and_writes(store, ctx.clone()).await;
    let until = relay_and_leases(store).await;
    gate(store, until).await;
    views(store, &ctx).await;
}

/// Intake, claims and writes, with and without a relay claiming the outbox rows.
async fn intake_claims_and_writes(store: &Store, mut ctx: ApplyContext) {
    let two = [ProviderId::Greynoise, ProviderId::Abuseipdb];
    let settings = ClaimSettings {
        providers: two.to_vec(),
        ptr: true,
        lease: LEASE,
    };

    // Intake: a named attacker row and an unnamed one created, both claimed with intake.
    let intakes = store
        .note_events(
            vec![note(A, Some(NAMED_UUID), true), note(B, None, true)],
            &settings,
        )
        .await;
    assert!(intakes.iter().all(Result::is_ok), "{intakes:?}");
    // Intake of known attackers (their `last_seen` touched), without a claim.
    store
        .note_event(ip(A), StoredScope::Global, None, None)
        .await
        .unwrap();
    store
        .note_event(ip(C), StoredScope::Global, None, None)
        .await
        .unwrap();

    // A claim over existing rows, ours included (refresh), with a provider never claimed.
    let three = [
        ProviderId::Greynoise,
        ProviderId::Abuseipdb,
        ProviderId::Feodo,
    ];
    let claims = store
        .claim_batch(
            &[ip(A), ip(B), ip(C)],
            &three,
            true,
            LEASE,
            ClaimMode::Refresh,
        )
        .await
        .unwrap();

    // The write: PTR names, provider answers, a scope change without PTR, handed off rows.
    let items = vec![
        answers(A, StoredScope::Global, &claims[0], Some(named("a.example"))),
        answers(B, StoredScope::Global, &claims[1], Some(named("b.example"))),
        ApplyItem {
            ptr: None,
            ..answers(C, StoredScope::NonGlobal, &claims[2], None)
        },
    ];
    let written = store.apply_batch(items, &ctx).await;
    assert!(written.iter().all(Result::is_ok), "{written:?}");

    // A negative PTR answer clears the stored name; the outbox row goes without a claim.
    ctx.relay_claim = None;
    let again = store
        .claim_work(ip(A), &[], true, LEASE, ClaimMode::Refresh)
        .await
        .unwrap();
    store
        .apply(
            ip(A),
            StoredScope::Global,
            again
                .ptr
                .map(|lease: Lease| (lease, PtrReport::without_name(PtrOutcome::Nxdomain))),
            Vec::new(),
            &ctx,
        )
        .await
        .unwrap();
}

/// The relay's statements, then leases deferred and given back; returns the end of the
/// deferral.
async fn relay_and_leases(store: &Store) -> DateTime<Utc> {
    // The relay: claim, delete what was published, release what was replaced meanwhile.
    let mut rows: Vec<(String, i64)> = store
        .claim_outbox(10, LEASE)
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.attacker_uuid, row.version))
        .collect();
    rows.push(("0b0e7d5c-1111-4aaa-8bbb-00000000ffff".into(), 7));
    store.delete_outbox_batch(&rows).await.unwrap();

    // Leases given back.
    let until = store.db_now().await.unwrap() + chrono::Duration::seconds(5);
    store
        .defer_work(ip(B), ProviderId::Greynoise, until)
        .await
        .unwrap();
    store
        .release_work(ip(B), &[ProviderId::Greynoise, ProviderId::Abuseipdb], true)
        .await
        .unwrap();
    until
}

/// The gate: a metered reservation, a park until `until`, an unmetered read, a status.
async fn gate(store: &Store, until: DateTime<Utc>) {
    let metered = ProviderLimits {
        rate_per_sec: 1.0,
        daily_quota: 100,
        key_fingerprint: Some("aaaa".into()),
    };
    store
        .reserve(ProviderId::Abuseipdb, &metered)
        .await
        .unwrap();
    store
        .record(ProviderId::Greynoise, GateEvent::Park { until })
        .await
        .unwrap();
    let unmetered = ProviderLimits {
        rate_per_sec: 0.0,
        daily_quota: 0,
        key_fingerprint: None,
    };
    store.reserve(ProviderId::Feodo, &unmetered).await.unwrap();
    store
        .provider_status(ProviderId::Abuseipdb, &metered)
        .await
        .unwrap();
}

/// Read-only views and discovery, and the shutdown's release of leases.
async fn views(store: &Store, ctx: &ApplyContext) {
    store.backlog(10, ctx).await.unwrap();
    store.mapped_addresses(None, 10).await.unwrap();
    store.mapped_addresses(Some(ip(B)), 10).await.unwrap();
    store.waiting_work(ctx).await.unwrap();
    store.lookup_view(ip(A), ctx).await.unwrap();
    store.outbox_stats().await.unwrap();
    store.schema_status().await.unwrap();
    store.release_leases().await.unwrap();
}

/// Intake and a write through a pool of keyed sessions, whose transactions take the clock
/// from their first statement (PostgreSQL; on SQLite the same handle as before).
async fn keyed_scenario(store: &Store) {
    let ctx = ApplyContext {
        ptr_enabled: true,
        ..ApplyContext::default()
    };
    let settings = ClaimSettings {
        providers: vec![ProviderId::Threatfox],
        ptr: true,
        lease: LEASE,
    };
    let d = "198.51.100.200";
    let mut intakes = store
        .note_events(vec![note(d, None, true), note(A, None, false)], &settings)
        .await;
    let claims = intakes
        .remove(0)
        .unwrap()
        .claims
        .expect("claimed with intake");
    let item = answers(d, StoredScope::Global, &claims, Some(named("d.example")));
    let written = store.apply_batch(vec![item], &ctx).await;
    assert!(written.iter().all(Result::is_ok), "{written:?}");
}

/// The texts `scenario` (and `keyed_scenario`) sent on `db`, one per line.
async fn sent_on(db: &TestDb) -> String {
    let mut store = Store::connect(db.url()).await.unwrap();
    store.migrate().await.unwrap();
    let mut keyed = store.with_own_pool(2).await.unwrap();
    let sent = record(&mut store);
    scenario(&store).await;
    let keyed_sent = record(&mut keyed);
    keyed_scenario(&keyed).await;
    let mut lines = vec!["-- scenario".to_owned()];
    lines.extend(sent.lock().unwrap().iter().cloned());
    lines.push("-- keyed_scenario".to_owned());
    lines.extend(keyed_sent.lock().unwrap().iter().cloned());
    for line in &lines {
        assert!(!line.contains('\n'), "a statement text spans lines: {line}");
    }
    lines.join("\n") + "\n"
}

/// Compares `actual` with the pinned file of `backend`, or rewrites it on request.
fn compare(backend: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/sql/pinned")
        .join(format!("{backend}.sql"));
    if std::env::var("PINNED_STATEMENTS").is_ok_and(|v| v == "update") {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let pinned = std::fs::read_to_string(&path).unwrap_or_default();
    if pinned == actual {
        return;
    }
    let seen = std::env::temp_dir().join(format!("enrichd-pinned-{backend}.sql"));
    std::fs::write(&seen, actual).unwrap();
    let first_difference = pinned
        .lines()
        .zip(actual.lines())
        .enumerate()
        .find(|(_, (want, got))| want != got)
        .map_or_else(
            || {
                format!(
                    "{} pinned lines, {} sent",
                    pinned.lines().count(),
                    actual.lines().count()
                )
            },
            |(n, (want, got))| format!("line {}:\n pinned: {want}\n   sent: {got}", n + 1),
        );
    panic!(
        "{backend} statement texts differ from {} ({first_difference}); all sent texts are in {}",
        path.display(),
        seen.display()
    );
}

#[tokio::test]
async fn sqlite_statement_texts_are_the_pinned_ones() {
    let db = TestDb::sqlite();
    compare("sqlite", &sent_on(&db).await);
}

#[tokio::test]
async fn postgres_statement_texts_are_the_pinned_ones() {
    if !enrichd_testkit::services::require_postgres() {
        return;
    }
    let db = TestDb::postgres().await;
    compare("postgres", &sent_on(&db).await);
}
