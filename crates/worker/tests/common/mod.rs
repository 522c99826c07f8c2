//! What the worker's integration tests share beyond the harness: in-process fake providers
//! and DNS with per-test answers, each test's own names, the worker's environment for these
//! fakes, and small database helpers. Processes, the bus, envelopes and metrics are
//! `enrichd-harness`'s.

#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support shared by several test binaries; a failure is a test failure"
)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use enrichd_bus::Topology;
use enrichd_core::ProviderId;
use enrichd_core::payload::Envelope;
use enrichd_harness::bus::{Enriched, TestBus};
use enrichd_harness::enrichd::{Enrichd, EnrichdEnv, Limits};
use enrichd_harness::events::Scored;
use enrichd_testkit::dns::{DnsServer, Zone};
use enrichd_testkit::http::{HttpServer, Request, Response};
use enrichd_testkit::services::amqp_url;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

/// The binary under test.
pub fn enrichd_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_enrichd"))
}

/// A fake GreyNoise (per-IP answers, optional latency) and a fake Feodo feed, on one server.
pub struct FakeProviders {
    pub server: HttpServer,
}

impl FakeProviders {
    pub async fn start(latency: Duration) -> Self {
        let server = HttpServer::start(move |request: &Request| {
            let response = if let Some(ip) = request.path.strip_prefix("/v3/community/") {
                let body = serde_json::json!({
                    "ip": ip, "noise": true, "riot": false, "classification": "malicious",
                    "name": "Mirai", "tags": ["telnet_bruteforcer"], "message": "Success"
                });
                Response::json(200, body.to_string())
            } else if request.path == "/downloads/ipblocklist.json" {
                let feed = serde_json::json!([{
                    "ip_address": "45.155.205.233", "port": 443, "status": "online",
                    "malware": "QakBot", "first_seen": "2026-04-20 11:02:13"
                }]);
                Response::json(200, feed.to_string())
            } else {
                Response::status(404)
            };
            response.delay(latency)
        })
        .await;
        Self { server }
    }

    /// GreyNoise requests per IP.
    pub fn greynoise_calls(&self) -> HashMap<String, usize> {
        let mut calls = HashMap::new();
        for request in self.server.requests() {
            if let Some(ip) = request.path.strip_prefix("/v3/community/") {
                *calls.entry(ip.to_owned()).or_insert(0) += 1;
            }
        }
        calls
    }
}

/// A loopback DNS server with a PTR for every address in `ips` (`h<n>.fake.test`).
pub fn dns_for(ips: &[IpAddr]) -> DnsServer {
    let zone = ips.iter().enumerate().fold(Zone::new(), |zone, (n, ip)| {
        zone.ptr(*ip, &format!("H{n}.Fake.Test."), 3600)
    });
    DnsServer::start(zone)
}

/// Unique exchange and queue names for one test.
pub fn topology(test: &str) -> Topology {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Topology::new(
        &format!("t.{test}.{}", &id[..8]),
        &format!("t.{test}.{}.q", &id[..8]),
    )
}

/// The test's side of the bus under `topology`, and the `attacker.intel.enriched` events it
/// receives from now on.
pub async fn bus(topology: Topology) -> (TestBus, Enriched) {
    let bus = TestBus::declare(&amqp_url(), "enrichd-test", topology)
        .await
        .expect("the test bus");
    let results = bus.consume_enriched().await.expect("consume the results");
    (bus, results)
}

/// An `attacker.scored` envelope for `ip`, as the reference's profiler sends it.
pub fn scored(ip: &str) -> Envelope<Scored> {
    Scored::tick(ip, 2).envelope(1_763_900_000.5)
}

/// The worker's environment: GreyNoise and Feodo on `fakes` (GreyNoise unmetered, 16 calls
/// at once), `dns` as the only DNS server, a 1 s backfill poll.
pub fn worker_env(database_url: &str, fakes: &FakeProviders, dns: &DnsServer) -> EnrichdEnv {
    let base = fakes.server.base_url();
    EnrichdEnv::new()
        .database(database_url)
        .set("ENRICHD_PROVIDERS", "greynoise,feodo")
        .provider_base_url(ProviderId::Greynoise, &base)
        .provider_base_url(ProviderId::Feodo, &base)
        .limits(&[ProviderId::Greynoise], Limits::Lifted)
        .concurrency(&[ProviderId::Greynoise], 16)
        .dns_servers(&dns.addr().to_string())
        .set("ENRICHD_POLL_INTERVAL_SECS", "1")
        .set("ENRICHD_GRACE_SECS", "10")
        .set("RUST_LOG", "info")
}

/// Starts `enrichd run` with `env` (a clean environment otherwise), its log in a temporary
/// file named for the test, and waits until it is ready.
pub async fn start_worker(name: &str, env: &EnrichdEnv) -> Enrichd {
    let log = std::env::temp_dir().join(format!(
        "enrichd-{name}-{}.log",
        uuid::Uuid::new_v4().simple()
    ));
    let mut worker = Enrichd::start(enrichd_bin(), &["run"], env, &log).expect("enrichd starts");
    worker
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("enrichd becomes ready");
    worker
}

pub async fn scalar(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .expect("query")
        .expect("a row");
    row.try_get_by_index::<i64>(0).expect("an integer")
}

pub async fn exec(db: &DatabaseConnection, sql: &str) {
    db.execute_unprepared(sql).await.expect("statement");
}
