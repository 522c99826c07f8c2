//! A harness for running the real `enrichd` binary against the real RabbitMQ and PostgreSQL,
//! a fake GreyNoise/Feodo speaking their wire contracts, and a loopback DNS server.

#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support shared by several test binaries; a failure is a test failure"
)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use enrichd_bus::publish::{Outgoing, Publisher};
use enrichd_bus::{Topology, connect};
use enrichd_core::Secret;
use enrichd_testkit::dns::{DnsServer, Zone};
use enrichd_testkit::http::{HttpServer, Request, Response};
use enrichd_testkit::services::amqp_url;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

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

/// Received `attacker.intel.enriched` messages: (AMQP `message_id`, envelope).
pub type Results = Arc<Mutex<Vec<(Option<String>, serde_json::Value)>>>;

/// The test's side of the bus: publishes events and collects `attacker.intel.enriched`.
pub struct TestBus {
    pub topology: Topology,
    pub publisher: Publisher,
    pub connection: lapin::Connection,
    pub results: Results,
}

impl TestBus {
    pub async fn start(topology: Topology) -> Self {
        let connection = connect(&Secret::new(amqp_url()), "enrichd-test")
            .await
            .expect("connect");
        let publisher = Publisher::open(&connection).await.expect("publisher");
        let mismatches = topology.declare(&connection).await.expect("declare");
        assert!(mismatches.is_empty(), "{mismatches:?}");
        let channel = connection.create_channel().await.expect("channel");
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("results queue");
        channel
            .queue_bind(
                queue.name().clone(),
                topology.exchange.as_str().into(),
                "attacker.intel.enriched".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind results");
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "results".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume results");
        let results: Results = Arc::default();
        let sink = Arc::clone(&results);
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().to_owned());
                let value = serde_json::from_slice(&delivery.data).unwrap_or_default();
                sink.lock().await.push((id, value));
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        Self {
            topology,
            publisher,
            connection,
            results,
        }
    }

    /// Deletes the test's queues and exchanges. Quorum queues stay on the shared broker
    /// until deleted, each a Raft member with its own timers and files, so a test that
    /// passes leaves none behind (one that fails keeps them for a look). Call it once the
    /// workers are gone: a consumer that sees its queue deleted reconnects and declares it
    /// again.
    pub async fn teardown(self) {
        let failed = self.topology.delete(&self.connection).await;
        assert!(failed.is_empty(), "teardown: {failed:?}");
        let _ = self.connection.close(200, "done".into()).await;
    }

    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        self.publisher
            .publish(Outgoing::persistent(
                &self.topology.exchange,
                routing_key,
                body,
            ))
            .await
            .expect("publish");
    }

    /// An `attacker.scored` envelope for `ip`, as the reference's profiler sends it.
    pub async fn publish_scored(&self, ip: &str) {
        self.publish_raw("attacker.scored", scored_envelope(ip).as_bytes())
            .await;
    }

    pub async fn result_count(&self) -> usize {
        self.results.lock().await.len()
    }

    /// Messages waiting in `queue` (passive declare).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        self.queue_counts(queue).await.0
    }

    /// Messages waiting in `queue` and its consumers (passive declare).
    pub async fn queue_counts(&self, queue: &str) -> (u32, u32) {
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_or((u32::MAX, u32::MAX), |q| {
                (q.message_count(), q.consumer_count())
            })
    }
}

pub fn scored_envelope(ip: &str) -> String {
    serde_json::json!({
        "v": 1, "id": uuid::Uuid::new_v4().simple().to_string(), "topic": "attacker.scored",
        "type": "scored", "ts": 1_763_900_000.5,
        "payload": {
            "attacker_ip": ip, "event_count": 12, "service_count": 2, "decky_count": 1,
            "bounty_count": 0, "credential_count": 3, "is_traversal": false
        }
    })
    .to_string()
}

/// A running `enrichd` process; killed when dropped.
pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
    pub metrics: String,
}

impl Worker {
    pub fn env(
        database_url: &str,
        fakes: &FakeProviders,
        dns: &DnsServer,
    ) -> Vec<(String, String)> {
        let base = fakes.server.base_url();
        [
            ("ENRICHD_DATABASE_URL", database_url.to_owned()),
            ("ENRICHD_PROVIDERS", "greynoise,feodo".to_owned()),
            ("ENRICHD_GREYNOISE_BASE_URL", base.clone()),
            ("ENRICHD_FEODO_BASE_URL", base),
            ("ENRICHD_GREYNOISE_RATE_PER_SEC", "0".to_owned()),
            ("ENRICHD_GREYNOISE_CONCURRENCY", "16".to_owned()),
            ("ENRICHD_DNS_SERVERS", dns.addr().to_string()),
            ("ENRICHD_POLL_INTERVAL_SECS", "1".to_owned()),
            ("ENRICHD_GRACE_SECS", "10".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Starts `enrichd run` with `env` (a clean environment otherwise) and waits until its
    /// metrics listener answers.
    pub async fn start(name: &str, env: &[(String, String)]) -> Self {
        let port = free_port();
        let log = std::env::temp_dir().join(format!(
            "enrichd-{name}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_enrichd"))
            .arg("run")
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("ENRICHD_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("enrichd starts");
        let worker = Self {
            child,
            log,
            metrics: format!("127.0.0.1:{port}"),
        };
        let up = enrichd_testkit::eventually(Duration::from_secs(60), || async {
            worker.scrape().await.is_some()
        })
        .await;
        assert!(
            up,
            "enrichd never served /metrics; log:\n{}",
            worker.log_text()
        );
        worker
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/metrics` text, if the worker answers.
    pub async fn scrape(&self) -> Option<String> {
        http_get(&self.metrics, "/metrics").await
    }

    /// One counter's value summed over its label sets (0 when absent).
    pub async fn counter(&self, name: &str) -> u64 {
        let text = self.scrape().await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "counters are whole, non-negative numbers"
                )]
                let whole = v as u64;
                whole
            })
            .sum()
    }

    /// One series' value: `series` is the exact text before the value, labels included
    /// (`enrichd_lookups_total{outcome="ok",provider="greynoise"}`); 0 when absent.
    pub async fn series(&self, series: &str) -> u64 {
        let text = self.scrape().await.unwrap_or_default();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()?
            .ok()?
            .code()
    }
}

/// A minimal HTTP GET returning the body of a 200.
pub async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
