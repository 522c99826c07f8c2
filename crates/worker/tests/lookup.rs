//! `enrichd lookup` and `enrichd backfill` as an analyst uses them on the embedded default:
//! fresh state is reused, nothing non-global leaves the machine, the PTR kill switch sends no
//! packet, and a `ptr_record` nulled behind enrichd's back is restored by the backfill.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure is a test failure"
)]

mod common;

use std::process::Output;
use std::time::Duration;

use common::{FakeProviders, dns_for, exec, scalar};
use enrichd_testkit::db::TestDb;

async fn enrichd(args: &[&str], env: &[(String, String)]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_enrichd"))
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("enrichd runs")
}

fn lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_lookup_reuses_fresh_state_without_any_request() {
    let db = TestDb::sqlite();
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let dns = dns_for(&["45.155.205.233".parse().unwrap()]);
    let env = common::Worker::env(db.url(), &fakes, &dns);

    let first = enrichd(&["lookup", "--json", "45.155.205.233"], &env).await;
    assert_eq!(
        first.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let rows = lines(&first);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert!(
        row["attacker_uuid"].is_null(),
        "no attacker row has this address"
    );
    assert_eq!(row["attacker_ip"], "45.155.205.233");
    assert_eq!(row["aggregate_verdict"], "malicious");
    assert_eq!(row["feodo_listed"], true);
    assert_eq!(row["ptr_record"], "h0.fake.test");
    assert_eq!(row["ptr_outcome"], "ok");
    assert_eq!(row["provider_outcomes"]["greynoise"], "ok");
    let requests = fakes.server.request_count();
    let queries = dns.queries();
    assert!(requests >= 2 && queries >= 1);

    let second = enrichd(&["lookup", "--json", "45.155.205.233"], &env).await;
    assert_eq!(second.status.code(), Some(0));
    assert_eq!(lines(&second), rows, "the same answer from stored state");
    assert_eq!(
        fakes.server.request_count(),
        requests,
        "no provider request"
    );
    assert_eq!(dns.queries(), queries, "no DNS query");

    // --refresh asks again.
    let third = enrichd(&["lookup", "--json", "--refresh", "45.155.205.233"], &env).await;
    assert_eq!(third.status.code(), Some(0));
    assert_eq!(fakes.greynoise_calls().get("45.155.205.233"), Some(&2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_global_addresses_are_reported_skipped_with_no_egress() {
    let db = TestDb::sqlite();
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let dns = dns_for(&[]);
    let env = common::Worker::env(db.url(), &fakes, &dns);
    let out = enrichd(
        &["lookup", "--json", "192.168.1.10", "::1", "100.64.0.9"],
        &env,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = lines(&out);
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!(row["ptr_outcome"], "skipped_non_global", "{row}");
        assert_eq!(
            row["provider_outcomes"]["greynoise"], "skipped_non_global",
            "{row}"
        );
        assert!(row["aggregate_verdict"].is_null());
    }
    assert_eq!(fakes.server.request_count(), 0);
    assert_eq!(dns.queries(), 0);

    let table = enrichd(&["lookup", "192.168.1.10"], &env).await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("ip"), "{text}");
    assert!(
        text.contains("192.168.1.10") && text.contains("skipped_non_global"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ptr_kill_switch_sends_no_packet_and_keeps_stored_names() {
    let db = TestDb::sqlite();
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let dns = dns_for(&["8.8.4.4".parse().unwrap()]);
    let mut env = common::Worker::env(db.url(), &fakes, &dns);
    let first = enrichd(&["lookup", "--json", "8.8.4.4"], &env).await;
    assert_eq!(lines(&first)[0]["ptr_record"], "h0.fake.test");
    let queries = dns.queries();

    env.push(("ENRICHD_PTR_ENABLED".into(), "false".into()));
    let out = enrichd(
        &["lookup", "--json", "--refresh", "8.8.4.4", "1.0.0.1"],
        &env,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = lines(&out);
    assert_eq!(rows[0]["ptr_record"], "h0.fake.test", "a stored name stays");
    assert_eq!(rows[1]["ptr_outcome"], "disabled");
    assert_eq!(
        dns.queries(),
        queries,
        "no DNS packet with the kill switch off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_addresses_are_refused_clearly() {
    let db = TestDb::sqlite();
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let dns = dns_for(&[]);
    let env = common::Worker::env(db.url(), &fakes, &dns);
    let out = enrichd(
        &["lookup", "--json", "1.2.3.4:22", "[::1]", "010.0.0.1"],
        &env,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("not an IP address").count(), 3, "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(fakes.server.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_enriches_attackers_and_restores_a_nulled_ptr_record() {
    let db = TestDb::sqlite();
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let dns = dns_for(&["9.9.9.9".parse().unwrap()]);
    let env = common::Worker::env(db.url(), &fakes, &dns);
    assert_eq!(enrichd(&["migrate"], &env).await.status.code(), Some(0));
    let conn = db.connect().await;
    exec(
        &conn,
        "INSERT INTO attackers (uuid, ip, first_seen, last_seen, updated_at) VALUES \
         ('0b7c4a36-6f53-4c44-a9f1-2a3b5e1f0c11', '9.9.9.9', '2026-11-23 10:00:00.000000', \
          '2026-11-23 10:00:00.000000', '2026-11-23 10:00:00.000000')",
    )
    .await;

    let out = enrichd(&["backfill"], &env).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        scalar(
            &conn,
            "SELECT COUNT(*) FROM attacker_intel WHERE aggregate_verdict = 'malicious'"
        )
        .await,
        1
    );
    assert_eq!(
        scalar(
            &conn,
            "SELECT COUNT(*) FROM attackers WHERE ptr_record = 'h0.fake.test'"
        )
        .await,
        1
    );

    exec(&conn, "UPDATE attackers SET ptr_record = NULL").await;
    let queries = dns.queries();
    let out = enrichd(&["backfill"], &env).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        scalar(
            &conn,
            "SELECT COUNT(*) FROM attackers WHERE ptr_record = 'h0.fake.test'"
        )
        .await,
        1
    );
    assert_eq!(
        dns.queries(),
        queries,
        "restored from stored state, not asked again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reaches_dns_and_providers_without_spending_quota() {
    let db = TestDb::sqlite();
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let dns = dns_for(&[]);
    let env = common::Worker::env(db.url(), &fakes, &dns);
    assert_eq!(enrichd(&["migrate"], &env).await.status.code(), Some(0));
    let out = enrichd(&["check"], &env).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in ["database", "dns", "greynoise", "feodo"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_default();
        assert_eq!(
            line.split_whitespace().nth(1),
            Some("reachable"),
            "{row}: {stdout}"
        );
    }
    assert_eq!(
        fakes.server.request_count(),
        0,
        "no request, so no quota spent"
    );
    assert!(
        dns.queries() >= 1,
        "the DNS server was asked (about the root zone)"
    );

    // A provider whose endpoint is down makes the check fail and says which.
    let mut broken = env.clone();
    broken.push((
        "ENRICHD_GREYNOISE_BASE_URL".into(),
        enrichd_testkit::http::refused_url().await,
    ));
    let out = enrichd(&["check"], &broken).await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("greynoise"))
        .unwrap_or_default();
    assert_eq!(
        line.split_whitespace().nth(1),
        Some("unreachable"),
        "{stdout}"
    );
}
