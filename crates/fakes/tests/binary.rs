//! The `enrichd-fakes` binary as other tools use it: started as a process, its banner read,
//! then asked through enrichd's own providers and resolver, and its `/_stats` read back.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use enrichd_core::ports::{IntelProvider, PtrResolver};
use enrichd_core::{CanonicalIp, ProviderId, ProviderOutcome, PtrOutcome, Secret};
use enrichd_dns::{DnsConfig, HickoryPtrResolver};
use enrichd_harness::fakes::{Fakes, FakesOptions, PerKey};
use enrichd_intel::{AbuseIpdb, Feodo, FeodoConfig, GreyNoise, ProviderConfig, ThreatFox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn log(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "enrichd-fakes-test-{name}-{}.log",
        std::process::id()
    ))
}

/// The binary as the tools start it: banner read (it names exactly its two ports, or the
/// start fails) and `/_health` answered.
async fn spawn(name: &str, options: FakesOptions) -> Fakes {
    Fakes::start(
        Path::new(env!("CARGO_BIN_EXE_enrichd-fakes")),
        options,
        &log(name),
    )
    .await
    .unwrap()
}

fn config(provider: ProviderId, fakes: &Fakes) -> ProviderConfig {
    ProviderConfig::defaults(provider)
        .with_base_url(fakes.base_url())
        .with_api_key(Some(Secret::new("fake-key")))
        .with_timeout(Duration::from_secs(5))
}

fn ip(text: &str) -> CanonicalIp {
    CanonicalIp::parse(text).unwrap()
}

#[tokio::test]
async fn enrichd_providers_and_resolver_understand_the_fake_world() {
    enrichd_intel::install_crypto_provider();
    let fakes = spawn("world", FakesOptions::default()).await;
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
        servers: vec![fakes.dns_addr()],
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

    let counters = fakes.stats().await.unwrap();
    for provider in enrichd_harness::enrichd::PER_ADDRESS {
        assert_eq!(counters.requests(provider), 40, "{provider}");
        assert_eq!(
            counters.per_key(provider),
            PerKey {
                distinct: 40,
                max_per_key: 1,
                total: 40
            },
            "{provider}"
        );
        assert_eq!(counters.timeline(provider).len(), 40);
    }
    assert_eq!(
        counters.requests(ProviderId::Feodo),
        2,
        "feodo counts downloads"
    );
    assert!(counters.dns.queries >= 2);

    fakes.reset().await.unwrap();
    let counters = fakes.stats().await.unwrap();
    assert_eq!(counters.requests(ProviderId::Greynoise), 0);
    assert_eq!(counters.dns.queries, 0, "the DNS count is reset too");
    assert_eq!(fakes.get("/_health").await.unwrap().status, 200);
}

#[tokio::test]
async fn faults_answer_500_and_429_and_are_counted() {
    enrichd_intel::install_crypto_provider();
    let fakes = spawn(
        "faults",
        FakesOptions {
            error_rate: 0.5,
            rate_limit_rate: 0.5,
            seed: 3,
            ..FakesOptions::default()
        },
    )
    .await;
    let greynoise = GreyNoise::new(&config(ProviderId::Greynoise, &fakes)).unwrap();
    for i in 1..=30 {
        let answer = greynoise.lookup(ip(&format!("45.78.0.{i}"))).await;
        assert!(
            !matches!(&answer, Ok(r) if r.outcome == ProviderOutcome::Ok || r.outcome == ProviderOutcome::NotFound),
            "every answer is a fault: {answer:?}"
        );
    }
    let counters = fakes.stats().await.unwrap();
    let limited = counters.rate_limited(ProviderId::Greynoise).len();
    let errors = counters.errors["greynoise"];
    assert_eq!(limited as u64 + errors, 30);
    assert!(limited > 5 && errors > 5, "429s {limited}, 500s {errors}");
    let log = fakes.request_log().await.unwrap();
    let statuses: Vec<u16> = log
        .entries(ProviderId::Greynoise)
        .iter()
        .map(enrichd_harness::fakes::LogEntry::status)
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 500 || *s == 429),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn connections_are_kept_alive_and_latency_is_added() {
    let fakes = spawn(
        "latency",
        FakesOptions {
            latency_ms: 150,
            ..FakesOptions::default()
        },
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(fakes.http_addr())
        .await
        .unwrap();
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
    let counters = fakes.stats().await.unwrap();
    assert_eq!(counters.requests(ProviderId::Greynoise), 2);
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
