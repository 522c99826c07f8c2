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

use common::{FakeProviders, dns_for, enrichd_bin, exec, scalar, worker_env};
use enrichd_core::ProviderId;
use enrichd_harness::enrichd::{Enrichd, EnrichdEnv};
use enrichd_testkit::db::TestDb;
use enrichd_testkit::dns::{DnsServer, Zone};
use enrichd_testkit::http::{HttpServer, Request, Response};

async fn enrichd(args: &[&str], env: &EnrichdEnv) -> Output {
    let env = env.clone().set("RUST_LOG", "warn");
    Enrichd::output(enrichd_bin(), args, &env)
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
    let env = worker_env(db.url(), &fakes, &dns);

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
    let env = worker_env(db.url(), &fakes, &dns);
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
    let env = worker_env(db.url(), &fakes, &dns);
    let first = enrichd(&["lookup", "--json", "8.8.4.4"], &env).await;
    assert_eq!(lines(&first)[0]["ptr_record"], "h0.fake.test");
    let queries = dns.queries();

    let env = env.set("ENRICHD_PTR_ENABLED", "false");
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
    let env = worker_env(db.url(), &fakes, &dns);
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
    let env = worker_env(db.url(), &fakes, &dns);
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
    let env = worker_env(db.url(), &fakes, &dns);
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
    let broken = env.clone().provider_base_url(
        ProviderId::Greynoise,
        &enrichd_testkit::http::refused_url().await,
    );
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

/// All four providers on one server, each speaking its wire contract: GreyNoise knows every
/// address but `unknown` (404), AbuseIPDB never had a report, ThreatFox has no result, and
/// Feodo lists 45.155.205.233. `greynoise_status` overrides GreyNoise's answer.
async fn four_providers(unknown: &'static str, greynoise_status: Option<u16>) -> HttpServer {
    HttpServer::start(move |request: &Request| {
        if let Some(ip) = request.path.strip_prefix("/v3/community/") {
            if let Some(status) = greynoise_status {
                return Response::json(status, r#"{"message":"slow down"}"#)
                    .header("retry-after", "3600");
            }
            if ip == unknown {
                return Response::json(
                    404,
                    format!(r#"{{"ip":"{ip}","noise":false,"riot":false,"message":"IP not observed scanning the internet or contained in RIOT data set."}}"#),
                );
            }
            let body = serde_json::json!({"ip": ip, "noise": true, "riot": false,
                "classification": "malicious", "name": "Mirai", "message": "Success"});
            return Response::json(200, body.to_string());
        }
        if request.path == "/api/v2/check" {
            let body = serde_json::json!({"data": {"abuseConfidenceScore": 0,
                "totalReports": 0, "reports": []}});
            return Response::json(200, body.to_string())
                .header("x-ratelimit-remaining", "990");
        }
        if request.path == "/api/v1/" {
            return Response::json(
                200,
                r#"{"query_status":"no_result","data":"Your search did not yield any results"}"#,
            );
        }
        if request.path == "/downloads/ipblocklist.json" {
            let feed = serde_json::json!([{"ip_address": "45.155.205.233", "port": 443,
                "status": "online", "malware": "QakBot"}]);
            return Response::json(200, feed.to_string());
        }
        Response::status(404)
    })
    .await
}

/// The environment with every provider on `server` and the default rate limits.
fn default_limits_env(db: &TestDb, server: &HttpServer, dns: &DnsServer) -> EnrichdEnv {
    EnrichdEnv::new()
        .database(db.url())
        .dns_servers(&dns.addr().to_string())
        .api_key(ProviderId::Abuseipdb, "test-abuseipdb")
        .api_key(ProviderId::Threatfox, "test-threatfox")
        .providers_at(&server.base_url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_of_five_under_default_limits_waits_for_every_provider() {
    let db = TestDb::sqlite();
    let ips = [
        "45.155.205.233",
        "8.8.8.8",
        "1.1.1.1",
        "9.9.9.9",
        "208.67.222.222",
    ];
    let server = four_providers("9.9.9.9", None).await;
    let dns = dns_for(&[]);
    let env = default_limits_env(&db, &server, &dns);
    let mut args = vec!["lookup", "--json"];
    args.extend(ips);
    let out = enrichd(&args, &env).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // GreyNoise's default is one call per 1.5 s: the third address's slot is 3 s away.
    assert!(
        stderr.contains("greynoise: waiting for rate limit, "),
        "a progress line while waiting: {stderr}"
    );
    let rows = lines(&out);
    assert_eq!(rows.len(), 5);
    for row in &rows {
        for provider in ["greynoise", "abuseipdb", "feodo", "threatfox"] {
            let outcome = row["provider_outcomes"][provider].as_str().unwrap_or("-");
            assert!(
                outcome == "ok" || outcome == "not_found",
                "{provider} answered for every address: {row}"
            );
        }
        assert!(row.get("provider_resume_at").is_none(), "{row}");
    }
    let unknown = rows.iter().find(|r| r["attacker_ip"] == "9.9.9.9").unwrap();
    assert_eq!(unknown["greynoise_classification"], "unknown");
    assert_eq!(unknown["aggregate_verdict"], "unknown");
    assert_eq!(unknown["provider_outcomes"]["greynoise"], "not_found");
    let greynoise_requests = server
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v3/community/"))
        .count();
    assert_eq!(
        greynoise_requests, 5,
        "one request per address, none wasted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_cannot_answer_in_time_is_shown_with_its_state() {
    let db = TestDb::sqlite();
    let server = four_providers("", Some(429)).await;
    let dns = dns_for(&[]);
    let env = default_limits_env(&db, &server, &dns);
    let out = enrichd(
        &["lookup", "--json", "--max-wait", "5", "8.8.8.8", "1.1.1.1"],
        &env,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let rows = lines(&out);
    assert_eq!(rows.len(), 2);
    for row in &rows {
        // The first call's 429 parks GreyNoise for an hour: both addresses say so.
        assert_eq!(
            row["provider_outcomes"]["greynoise"], "rate_limited",
            "{row}"
        );
        assert_eq!(row["provider_outcomes"]["abuseipdb"], "ok", "{row}");
    }
    let parked = rows
        .iter()
        .filter(|r| r.get("provider_resume_at").is_some())
        .count();
    assert!(parked >= 1, "the park's end is given: {rows:?}");
    let greynoise_requests = server
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v3/community/"))
        .count();
    assert_eq!(greynoise_requests, 1, "nothing sent while parked");

    let table = enrichd(&["lookup", "--max-wait", "1", "1.0.0.1"], &env).await;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("rate_limited until "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_confirmation_is_stored_published_and_shown() {
    let db = TestDb::sqlite();
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let (honest, liar, unchecked) = ("8.8.8.8", "1.1.1.1", "9.9.9.9");
    let zone = Zone::new()
        .ptr(honest.parse().unwrap(), "dns.google.", 3600)
        .a("dns.google.", honest.parse().unwrap(), 3600)
        // Claims a name whose address is someone else's: recorded, flagged unconfirmed.
        .ptr(liar.parse().unwrap(), "mail.bank.example.", 3600)
        .a("mail.bank.example.", "203.0.113.7".parse().unwrap(), 3600)
        .ptr(unchecked.parse().unwrap(), "dns9.quad9.net.", 3600);
    let dns = DnsServer::start(zone);
    let env = worker_env(db.url(), &fakes, &dns);

    let off = enrichd(&["lookup", "--json", unchecked], &env).await;
    assert_eq!(
        lines(&off)[0]["ptr_forward_confirmed"],
        serde_json::Value::Null
    );

    let env = env.set("ENRICHD_PTR_FCRDNS", "true");
    let out = enrichd(&["lookup", "--json", honest, liar], &env).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = lines(&out);
    let by_ip = |ip: &str| {
        rows.iter()
            .find(|r| r["attacker_ip"] == ip)
            .unwrap()
            .clone()
    };
    assert_eq!(by_ip(honest)["ptr_record"], "dns.google");
    assert_eq!(by_ip(honest)["ptr_forward_confirmed"], true);
    assert_eq!(by_ip(liar)["ptr_record"], "mail.bank.example");
    assert_eq!(by_ip(liar)["ptr_forward_confirmed"], false);

    // Stored: a second lookup answers from state, with no DNS query.
    let queries = dns.queries();
    let again = enrichd(&["lookup", honest, liar], &env).await;
    assert_eq!(dns.queries(), queries);
    let table = String::from_utf8_lossy(&again.stdout).to_string();
    let header = table.lines().next().unwrap();
    assert!(header.contains("fcrdns"), "{table}");
    let liar_line = table.lines().find(|l| l.starts_with(liar)).unwrap();
    assert!(liar_line.contains("unconfirmed"), "{table}");
    let honest_line = table.lines().find(|l| l.starts_with(honest)).unwrap();
    assert!(honest_line.contains(" confirmed"), "{table}");
    let conn = db.connect().await;
    let stored = scalar(
        &conn,
        &format!(
            "SELECT COUNT(*) FROM enrichd_ip_state WHERE ip = '{liar}' \
             AND ptr_forward_confirmed = 0"
        ),
    )
    .await;
    assert_eq!(stored, 1, "stored as false");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_turned_off_stops_counting_and_backfill_all_rewrites_the_rows() {
    let db = TestDb::sqlite();
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let dns = dns_for(&["8.8.4.4".parse().unwrap()]);
    let env = worker_env(db.url(), &fakes, &dns);
    assert_eq!(enrichd(&["migrate"], &env).await.status.code(), Some(0));
    let conn = db.connect().await;
    exec(
        &conn,
        "INSERT INTO attackers (uuid, ip, first_seen, last_seen, updated_at) VALUES \
         ('5d1c7a0e-3f0b-4b8e-9f59-0c1d2e3f4a5b', '8.8.4.4', '2026-11-23 10:00:00.000000', \
          '2026-11-23 10:00:00.000000', '2026-11-23 10:00:00.000000')",
    )
    .await;
    let verdict = "SELECT COUNT(*) FROM attacker_intel WHERE aggregate_verdict = 'malicious' \
                   AND greynoise_classification = 'malicious'";
    let out = enrichd(&["backfill"], &env).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(scalar(&conn, verdict).await, 1, "GreyNoise says malicious");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("nothing is due"), "{stdout}");

    // GreyNoise turned off: nothing is due (Feodo's answer is fresh), so a plain backfill
    // leaves the row; `--all` rewrites it from the configured providers' state alone.
    let env = env.set("ENRICHD_PROVIDERS", "feodo");
    let requests = fakes.server.request_count();
    let out = enrichd(&["backfill", "--all"], &env).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fakes.server.request_count(),
        requests,
        "nothing asked again"
    );
    assert_eq!(
        scalar(
            &conn,
            "SELECT COUNT(*) FROM attacker_intel WHERE aggregate_verdict IS NULL \
             AND greynoise_classification IS NULL AND feodo_listed = 0"
        )
        .await,
        1,
        "the old GreyNoise verdict no longer counts"
    );

    // Turned back on: its stored answer is fresh and is used again, with no request.
    let env = env.set("ENRICHD_PROVIDERS", "greynoise,feodo");
    let out = enrichd(&["backfill", "--all"], &env).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        fakes.server.request_count(),
        requests,
        "stored state reused"
    );
    assert_eq!(scalar(&conn, verdict).await, 1);
}

/// Attacker rows for `ips`, on a migrated database.
async fn attackers_for(conn: &sea_orm::DatabaseConnection, ips: &[&str]) {
    for (n, ip) in ips.iter().enumerate() {
        exec(
            conn,
            &format!(
                "INSERT INTO attackers (uuid, ip, first_seen, last_seen, updated_at) VALUES \
                 ('00000000-0000-4000-8000-{n:012}', '{ip}', '2026-11-23 10:00:00.000000', \
                  '2026-11-23 10:00:00.000000', '2026-11-23 10:00:00.000000')"
            ),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_waits_for_rate_slots_and_says_when_the_rest_waits_too_long() {
    let db = TestDb::sqlite();
    let ips = ["8.8.8.8", "1.1.1.1", "9.9.9.9", "208.67.222.222"];
    let server = four_providers("", None).await;
    let dns = dns_for(&[]);
    let env = default_limits_env(&db, &server, &dns);
    // One call per 2 s: the third address's slot is 4 s out, past the 2 s a call may wait
    // for its slot, so its work is deferred and the backfill waits for it.
    let env = env.set("ENRICHD_GREYNOISE_RATE_PER_SEC", "0.5");
    // About providers: a PTR lookup slowed past its deadline on a loaded machine would be
    // owed for 15 minutes and rightly end the backfill "waiting past --max-wait".
    let env = env.set("ENRICHD_PTR_ENABLED", "false");
    assert_eq!(enrichd(&["migrate"], &env).await.status.code(), Some(0));
    let conn = db.connect().await;
    attackers_for(&conn, &ips).await;

    let out = enrichd(&["backfill"], &env).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("greynoise: waiting for rate limit"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("nothing is due"), "{stdout}");
    assert_eq!(
        scalar(
            &conn,
            "SELECT COUNT(*) FROM attacker_intel WHERE greynoise_classification = 'malicious'"
        )
        .await,
        4,
        "every address got its GreyNoise answer at the default rate"
    );

    // A park an hour long is past the patience: the backfill ends and says what waits.
    let parked_server = four_providers("", Some(429)).await;
    let db = TestDb::sqlite();
    let env = default_limits_env(&db, &parked_server, &dns);
    assert_eq!(enrichd(&["migrate"], &env).await.status.code(), Some(0));
    let conn = db.connect().await;
    attackers_for(&conn, &ips).await;
    let out = enrichd(&["backfill", "--max-wait", "10"], &env).await;
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("waits past --max-wait (10 s)"), "{stdout}");
    assert!(
        stdout.contains("greynoise: 4 addresses, rate_limited until"),
        "{stdout}"
    );
}
