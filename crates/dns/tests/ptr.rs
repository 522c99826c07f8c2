//! `HickoryPtrResolver` against the testkit's loopback DNS server (issue 4, "Shown by").

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a test failure"
)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use enrichd_core::ports::{PtrReport, PtrResolver};
use enrichd_core::{CanonicalIp, PtrOutcome};
use enrichd_dns::{DnsConfig, HickoryPtrResolver};
use enrichd_testkit::dns::{Behaviour, DnsServer, Zone};
use tokio::time::Instant;

/// Generous enough for a loaded 2-core machine, far below the 2 s production deadline.
const DEADLINE: Duration = Duration::from_millis(1500);

fn ip(text: &str) -> CanonicalIp {
    CanonicalIp::parse(text).unwrap()
}

fn addr(text: &str) -> IpAddr {
    ip(text).addr()
}

fn resolver_for(
    servers: &[&DnsServer],
    timeout: Duration,
    concurrency: usize,
) -> HickoryPtrResolver {
    HickoryPtrResolver::new(&DnsConfig {
        servers: servers.iter().map(|s| s.addr()).collect(),
        timeout,
        concurrency,
        fcrdns: false,
    })
    .unwrap()
}

fn resolver(server: &DnsServer) -> HickoryPtrResolver {
    resolver_for(&[server], DEADLINE, 10)
}

fn ok(name: &str, ttl_secs: u64) -> PtrReport {
    PtrReport {
        outcome: PtrOutcome::Ok,
        name: Some(name.to_owned()),
        record_ttl: Some(Duration::from_secs(ttl_secs)),
        forward_confirmed: None,
    }
}

#[tokio::test]
async fn resolves_an_ipv4_name_lowercased_without_the_trailing_dot() {
    enrichd_testkit::tracing::init();
    let server = DnsServer::start(Zone::new().ptr(addr("8.8.8.8"), "DNS.Google.", 21_600));
    let report = resolver(&server).resolve(ip("8.8.8.8")).await;
    assert_eq!(report, ok("dns.google", 21_600));
}

#[tokio::test]
async fn resolves_an_ipv6_name() {
    let v6 = "2001:4860:4860::8888";
    let server = DnsServer::start(Zone::new().ptr(addr(v6), "dns.google.", 3600));
    let report = resolver(&server).resolve(ip(v6)).await;
    assert_eq!(report, ok("dns.google", 3600));
}

#[tokio::test]
async fn carries_the_record_ttl_unclamped_into_the_report() {
    // Clamping to [1 h, 7 d] is `PtrOutcome::due`'s job; the report must carry the raw TTL.
    let server = DnsServer::start(
        Zone::new()
            .ptr(addr("1.1.1.1"), "one.one.one.one.", 42)
            .ptr(addr("1.0.0.1"), "one.one.one.one.", 30 * 86_400),
    );
    let resolver = resolver(&server);
    assert_eq!(
        resolver.resolve(ip("1.1.1.1")).await.record_ttl,
        Some(Duration::from_secs(42))
    );
    assert_eq!(
        resolver.resolve(ip("1.0.0.1")).await.record_ttl,
        Some(Duration::from_secs(30 * 86_400))
    );
}

#[tokio::test]
async fn unknown_address_and_nodata_are_nxdomain() {
    let server = DnsServer::start(
        Zone::new()
            .ptr(addr("8.8.8.8"), "dns.google.", 300)
            .txt_only(addr("8.8.4.4"))
            .behave(addr("9.9.9.9"), Behaviour::Nodata)
            .ptr(addr("1.1.1.1"), "one.one.one.one.", 300)
            .behave(addr("1.1.1.1"), Behaviour::Nxdomain),
    );
    let resolver = resolver(&server);
    for (case, text) in [
        ("no such name", "8.8.8.9"),
        ("name with a TXT record only", "8.8.4.4"),
        ("NOERROR with an empty answer", "9.9.9.9"),
        ("NXDOMAIN although records exist", "1.1.1.1"),
        ("IPv6 with no name", "2001:4860:4860::8844"),
    ] {
        let report = resolver.resolve(ip(text)).await;
        assert_eq!(
            report,
            PtrReport::without_name(PtrOutcome::Nxdomain),
            "{case}"
        );
    }
}

#[tokio::test]
async fn servfail_refused_formerr_and_notimp_are_servfail() {
    let server = DnsServer::start(
        Zone::new()
            .behave(addr("9.9.9.9"), Behaviour::Servfail)
            .behave(addr("9.9.9.10"), Behaviour::Refused)
            .behave(addr("9.9.9.11"), Behaviour::FormErr)
            .behave(addr("9.9.9.12"), Behaviour::NotImp)
            .behave(addr("2620:fe::fe"), Behaviour::Servfail),
    );
    let resolver = resolver(&server);
    for text in ["9.9.9.9", "9.9.9.10", "9.9.9.11", "9.9.9.12", "2620:fe::fe"] {
        let started = Instant::now();
        let report = resolver.resolve(ip(text)).await;
        assert_eq!(
            report,
            PtrReport::without_name(PtrOutcome::Servfail),
            "{text}"
        );
        // An error answer is final: it must not be waited out like a silent server.
        assert!(
            started.elapsed() < DEADLINE / 2,
            "{text} took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn several_ptr_records_give_the_same_smallest_name_whatever_the_answer_order() {
    let target = addr("45.33.32.77");
    let server = DnsServer::start(
        Zone::new()
            .ptr(target, "scanner-b.example.net.", 600)
            .ptr(target, "Scanner-A.example.net.", 900)
            .ptr(target, "scanner-c.example.net.", 300)
            .rotate_answers(),
    );
    let resolver = resolver(&server);
    for attempt in 0..6 {
        let before = server.queries();
        let report = resolver.resolve(CanonicalIp::from(target)).await;
        assert_eq!(
            report,
            ok("scanner-a.example.net", 900),
            "attempt {attempt}"
        );
        // Every lookup really went to the server (no resolver cache), so each saw a new order.
        assert!(server.queries() > before, "attempt {attempt} was not sent");
    }
}

#[tokio::test]
async fn a_name_with_hostile_bytes_is_invalid_name() {
    let server = DnsServer::start(
        Zone::new()
            .ptr_raw_labels(
                addr("45.33.32.1"),
                &[b"evil\x00host", b"example", b"net"],
                300,
            )
            .ptr_raw_labels(addr("45.33.32.2"), &[b"has space", b"example", b"net"], 300)
            .ptr_raw_labels(
                addr("45.33.32.3"),
                &[b"\x1b[31mred", b"example", b"net"],
                300,
            )
            .ptr_raw_labels(addr("45.33.32.4"), &[b"bank.com", b"evil", b"net"], 300)
            .ptr_raw_labels(addr("45.33.32.5"), &[b"tab\there", b"example", b"net"], 300)
            // One good name next to a hostile one is still a good name.
            .ptr_raw_labels(addr("45.33.32.6"), &[b"\x00", b"example", b"net"], 300)
            .ptr(addr("45.33.32.6"), "fine.example.net.", 300),
    );
    let resolver = resolver(&server);
    for last in 1..=5 {
        let text = format!("45.33.32.{last}");
        let report = resolver.resolve(ip(&text)).await;
        assert_eq!(
            report,
            PtrReport::without_name(PtrOutcome::InvalidName),
            "{text}"
        );
    }
    assert_eq!(
        resolver.resolve(ip("45.33.32.6")).await,
        ok("fine.example.net", 300)
    );
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let server = DnsServer::silent();
    let resolver = resolver_for(&[&server], Duration::from_millis(200), 10);
    let started = Instant::now();
    let report = resolver.resolve(ip("8.8.8.8")).await;
    assert_eq!(report, PtrReport::without_name(PtrOutcome::Timeout));
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "{:?}",
        started.elapsed()
    );
    assert!(server.queries() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_lookups_drain_in_deadline_rounds_without_holding_up_a_healthy_server() {
    let deadline = Duration::from_millis(200);
    let concurrency = 10;
    let lookups = 100u32;
    let silent = DnsServer::silent();
    let healthy = DnsServer::start(Zone::new().ptr(addr("8.8.8.8"), "dns.google.", 300));
    let slow = Arc::new(resolver_for(&[&silent], deadline, concurrency));
    let fast = resolver_for(&[&healthy], deadline, concurrency);

    let started = Instant::now();
    let batch = tokio::spawn({
        let slow = Arc::clone(&slow);
        async move {
            let all = (0..lookups).map(|n| {
                let slow = Arc::clone(&slow);
                let last = u8::try_from(n + 1).unwrap();
                let target = CanonicalIp::from(IpAddr::from([45, 33, 33, last]));
                async move { slow.resolve(target).await }
            });
            futures::future::join_all(all).await
        }
    });

    // Wait until the silent batch is really occupying its permits, then use the healthy one.
    assert!(
        enrichd_testkit::eventually(Duration::from_secs(5), || async {
            silent.queries() >= concurrency
        })
        .await,
        "the silent batch never started"
    );
    for _ in 0..10 {
        let one = Instant::now();
        assert_eq!(fast.resolve(ip("8.8.8.8")).await, ok("dns.google", 300));
        assert!(
            one.elapsed() < deadline / 2,
            "healthy lookup held up: {:?}",
            one.elapsed()
        );
    }
    assert!(
        !batch.is_finished(),
        "the healthy lookups must have run during the silent batch"
    );

    let reports = batch.await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(reports.len(), lookups as usize);
    assert!(
        reports
            .iter()
            .all(|r| *r == PtrReport::without_name(PtrOutcome::Timeout)),
        "every silent lookup times out"
    );
    let rounds = lookups.div_ceil(u32::try_from(concurrency).unwrap());
    // No faster than the concurrency allows (the permit bound works) ...
    assert!(
        elapsed >= deadline * (rounds - 1),
        "too fast for {concurrency} permits: {elapsed:?}"
    );
    // ... and no slower than one deadline per round plus slack (waiting is not a deadline).
    assert!(
        elapsed <= deadline * rounds + Duration::from_millis(1500),
        "silent lookups piled up: {elapsed:?}"
    );
}

#[tokio::test]
async fn a_silent_server_among_the_configured_ones_costs_no_deadline() {
    let silent = DnsServer::silent();
    let healthy = DnsServer::start(Zone::new().ptr(addr("8.8.8.8"), "dns.google.", 300));
    let resolver = resolver_for(&[&silent, &healthy], Duration::from_secs(2), 10);
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(resolver.resolve(ip("8.8.8.8")).await, ok("dns.google", 300));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn nothing_is_sent_until_a_lookup_is_asked_for() {
    let server = DnsServer::start(Zone::new().ptr(addr("8.8.8.8"), "dns.google.", 300));
    let resolver = resolver(&server);
    assert_eq!(server.queries(), 0, "building a resolver sends nothing");
    resolver.resolve(ip("8.8.8.8")).await;
    assert!(
        enrichd_testkit::eventually(Duration::from_secs(2), || async { server.queries() >= 1 })
            .await,
        "the counter sees a real query"
    );
}

#[tokio::test]
async fn non_global_addresses_are_skipped_without_a_query() {
    let server = DnsServer::start(Zone::new().ptr(addr("10.0.0.1"), "internal.corp.", 300));
    let resolver = resolver(&server);
    for text in [
        "10.0.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "fe80::1",
        "fd00::1",
        "100.64.0.1",
    ] {
        assert_eq!(
            resolver.resolve(ip(text)).await,
            PtrReport::without_name(PtrOutcome::SkippedNonGlobal),
            "{text}"
        );
    }
    assert_eq!(server.queries(), 0);
}

#[tokio::test]
async fn forward_confirmation_records_whether_the_name_resolves_back() {
    let server = DnsServer::start(
        Zone::new()
            .ptr(addr("8.8.8.8"), "dns.google.", 300)
            .a("dns.google.", "8.8.8.8".parse().unwrap(), 300)
            .ptr(addr("2001:4860:4860::8888"), "dns.google.", 300)
            .aaaa("dns.google.", "2001:4860:4860::8888".parse().unwrap(), 300)
            .ptr(addr("45.33.32.10"), "liar.example.net.", 300)
            .a("liar.example.net.", "45.33.32.99".parse().unwrap(), 300)
            .ptr(addr("45.33.32.11"), "gone.example.net.", 300)
            .ptr(addr("45.33.32.12"), "broken.example.net.", 300)
            .behave_name("broken.example.net.", Behaviour::Servfail),
    );
    let resolver = HickoryPtrResolver::new(&DnsConfig {
        servers: vec![server.addr()],
        timeout: DEADLINE,
        concurrency: 10,
        fcrdns: true,
    })
    .unwrap();
    for (text, expected) in [
        ("8.8.8.8", Some(true)),
        ("2001:4860:4860::8888", Some(true)),
        ("45.33.32.10", Some(false)),
        ("45.33.32.11", Some(false)),
        ("45.33.32.12", None),
    ] {
        let report = resolver.resolve(ip(text)).await;
        assert_eq!(report.outcome, PtrOutcome::Ok, "{text}");
        assert_eq!(report.forward_confirmed, expected, "{text}");
    }
}
