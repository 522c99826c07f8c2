//! The `enrichd-fakes` binary as other tools use it: started as a process, its banner read,
//! then asked through enrichd's own providers and resolver, and its `/_stats` read back.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use enrichd_core::ports::{IntelProvider, PtrResolver};
use enrichd_core::{CanonicalIp, ProviderId, ProviderOutcome, PtrOutcome, Secret};
use enrichd_dns::{DnsConfig, HickoryPtrResolver};
use enrichd_intel::{AbuseIpdb, Feodo, FeodoConfig, GreyNoise, ProviderConfig, ThreatFox};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The running binary; killed when dropped.
struct Fakes {
    child: Child,
    http: SocketAddr,
    dns: SocketAddr,
}

impl Drop for Fakes {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str]) -> Fakes {
    let mut child = Command::new(env!("CARGO_BIN_EXE_enrichd-fakes"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let banner: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(banner.as_object().unwrap().len(), 2, "{line}");
    Fakes {
        http: banner["http"].as_str().unwrap().parse().unwrap(),
        dns: banner["dns"].as_str().unwrap().parse().unwrap(),
        child,
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn config(provider: ProviderId, fakes: &Fakes) -> ProviderConfig {
    ProviderConfig::defaults(provider)
        .with_base_url(format!("http://{}", fakes.http))
        .with_api_key(Some(Secret::new("fake-key")))
        .with_timeout(Duration::from_secs(5))
}

fn ip(text: &str) -> CanonicalIp {
    CanonicalIp::parse(text).unwrap()
}

#[tokio::test]
async fn enrichd_providers_and_resolver_understand_the_fake_world() {
    enrichd_intel::install_crypto_provider();
    let fakes = spawn(&[]);
    let ips: Vec<String> = (1..=40).map(|i| format!("45.77.{}.{}", i % 7, i)).collect();

    let greynoise = GreyNoise::new(&config(ProviderId::Greynoise, &fakes)).unwrap();
    let abuseipdb = AbuseIpdb::new(&config(ProviderId::Abuseipdb, &fakes)).unwrap();
    let threatfox = ThreatFox::new(&config(ProviderId::Threatfox, &fakes)).unwrap();
    let mut outcomes = Vec::new();
    for text in &ips {
        for report in [
            greynoise.lookup(ip(text)).await.unwrap(),
            abuseipdb.lookup(ip(text)).await.unwrap(),
            threatfox.lookup(ip(text)).await.unwrap(),
        ] {
            assert!(
                matches!(
                    report.outcome,
                    ProviderOutcome::Ok | ProviderOutcome::NotFound
                ),
                "{text}: {report:?}"
            );
            outcomes.push((report.provider, report.outcome));
        }
    }
    assert!(outcomes.contains(&(ProviderId::Greynoise, ProviderOutcome::NotFound)));
    assert!(outcomes.contains(&(ProviderId::Greynoise, ProviderOutcome::Ok)));

    let feodo = Feodo::new(&FeodoConfig {
        http: config(ProviderId::Feodo, &fakes),
        refresh: Duration::from_secs(3600),
        max_age: Duration::from_secs(86_400),
    })
    .unwrap();
    feodo.refresh().await.unwrap();
    assert!(feodo.index().get(ip("45.155.205.233")).is_some());
    assert!(feodo.index().get(ip("45.77.1.1")).is_none());
    // The second download carries the ETag and gets a 304.
    assert_eq!(
        feodo.refresh().await.unwrap(),
        enrichd_intel::feodo::RefreshOutcome::NotModified
    );

    let resolver = HickoryPtrResolver::new(&DnsConfig {
        servers: vec![fakes.dns],
        timeout: Duration::from_secs(2),
        concurrency: 4,
        fcrdns: true,
    })
    .unwrap();
    let ptr = resolver.resolve(ip("45.155.205.233")).await;
    assert_eq!(ptr.outcome, PtrOutcome::Ok);
    assert_eq!(ptr.name.as_deref(), Some("h-45-155-205-233.fake.test"));
    assert_eq!(ptr.record_ttl, Some(Duration::from_secs(3600)));
    assert_eq!(ptr.forward_confirmed, Some(true));

    let (status, counters) = request(fakes.http, "GET", "/_stats").await;
    assert_eq!(status, 200);
    for provider in ["greynoise", "abuseipdb", "threatfox"] {
        assert_eq!(counters["requests"][provider], 40, "{provider}");
        assert_eq!(
            counters["per_key"][provider],
            serde_json::json!({"distinct": 40, "max_per_key": 1, "total": 40}),
            "{provider}"
        );
        assert_eq!(counters["timeline"][provider].as_array().unwrap().len(), 40);
    }
    assert_eq!(counters["requests"]["feodo"], 2, "feodo counts downloads");
    assert!(counters["dns"]["queries"].as_u64().unwrap() >= 2);

    assert_eq!(request(fakes.http, "POST", "/_reset").await.0, 200);
    let (_, counters) = request(fakes.http, "GET", "/_stats").await;
    assert_eq!(counters["requests"]["greynoise"], 0);
    assert_eq!(request(fakes.http, "GET", "/_health").await.0, 200);
}

#[tokio::test]
async fn faults_answer_500_and_429_and_are_counted() {
    enrichd_intel::install_crypto_provider();
    let fakes = spawn(&[
        "--error-rate",
        "0.5",
        "--rate-limit-rate",
        "0.5",
        "--seed",
        "3",
    ]);
    let greynoise = GreyNoise::new(&config(ProviderId::Greynoise, &fakes)).unwrap();
    for i in 1..=30 {
        let answer = greynoise.lookup(ip(&format!("45.78.0.{i}"))).await;
        assert!(
            !matches!(&answer, Ok(r) if r.outcome == ProviderOutcome::Ok || r.outcome == ProviderOutcome::NotFound),
            "every answer is a fault: {answer:?}"
        );
    }
    let (_, counters) = request(fakes.http, "GET", "/_stats").await;
    let limited = counters["rate_limited"]["greynoise"]
        .as_array()
        .unwrap()
        .len();
    let errors = counters["errors"]["greynoise"].as_u64().unwrap();
    assert_eq!(limited as u64 + errors, 30);
    assert!(limited > 5 && errors > 5, "429s {limited}, 500s {errors}");
    let (_, log) = request(fakes.http, "GET", "/_log").await;
    let statuses: Vec<u64> = log["greynoise"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[2].as_u64().unwrap())
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 500 || *s == 429),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn connections_are_kept_alive_and_latency_is_added() {
    let fakes = spawn(&["--latency-ms", "150"]);
    let mut stream = tokio::net::TcpStream::connect(fakes.http).await.unwrap();
    let started = tokio::time::Instant::now();
    let two = "GET /v3/community/45.79.0.1 HTTP/1.1\r\nhost: x\r\n\r\nGET /v3/community/45.79.0.2 HTTP/1.1\r\nhost: x\r\n\r\n";
    stream.write_all(two.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("HTTP/1.1 ").count() < 2
        || !String::from_utf8_lossy(&seen).contains("45.79.0.2")
    {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    let (_, counters) = request(fakes.http, "GET", "/_stats").await;
    assert_eq!(counters["requests"]["greynoise"], 2);
}

#[test]
fn bad_fault_rates_are_a_usage_error() {
    let status = Command::new(env!("CARGO_BIN_EXE_enrichd-fakes"))
        .args(["--error-rate", "1.5"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(64));
    let status = Command::new(env!("CARGO_BIN_EXE_enrichd-fakes"))
        .args(["--error-rate", "0.7", "--rate-limit-rate", "0.7"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(64));
}
