//! The worker end to end (issue #5): the real binary, the real RabbitMQ and PostgreSQL (a
//! database and uniquely named exchange/queues per test), fake providers, a loopback DNS server.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure is a test failure"
)]

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{
    FakeProviders, bus, dns_for, enrichd_bin, scalar, scored, start_worker, topology, worker_env,
};
use enrichd_core::payload::{Envelope, TOPIC_CONTROL, TOPIC_SCORED};
use enrichd_harness::enrichd::{Enrichd, EnrichdEnv};
use enrichd_harness::process::Signal;
use enrichd_testkit::db::TestDb;
use enrichd_testkit::eventually;
use enrichd_testkit::proxy::TcpProxy;
use enrichd_testkit::services::{amqp_url, require_postgres, require_rabbitmq};

const WAIT: Duration = Duration::from_secs(60);

fn ips(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}.{}", i + 1)).collect()
}

fn parsed(ips: &[String]) -> Vec<IpAddr> {
    ips.iter().map(|ip| ip.parse().unwrap()).collect()
}

fn services_up() -> bool {
    require_postgres() && require_rabbitmq()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scored_envelope_becomes_a_compatible_row_and_an_enriched_event() {
    if !services_up() {
        return;
    }
    let db = TestDb::postgres().await;
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let dns = dns_for(&parsed(&["45.155.205.233".to_owned()]));
    let (bus, results) = bus(topology("happy")).await;
    let env = worker_env(db.url(), &fakes, &dns).bus(&amqp_url(), &bus.topology);
    let worker = start_worker("happy", &env).await;

    bus.publish_event(&scored("45.155.205.233")).await.unwrap();
    assert!(
        eventually(WAIT, || async { results.count() >= 1 }).await,
        "{}",
        worker.process().log_text()
    );

    let received = results.messages()[0].clone();
    let (message_id, envelope) = (received.message_id, received.envelope);
    assert_eq!(envelope["v"], 1);
    assert_eq!(envelope["topic"], "attacker.intel.enriched");
    assert_eq!(envelope["type"], "intel.enriched");
    assert!(envelope["ts"].is_f64());
    let id = envelope["id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert_eq!(
        message_id.as_deref(),
        Some(id),
        "message_id is the envelope id"
    );
    let p = &envelope["payload"];
    let uuid = p["attacker_uuid"].as_str().unwrap();
    assert_eq!(uuid.len(), 36, "uuid4 with dashes");
    assert_eq!(p["attacker_ip"], "45.155.205.233");
    assert_eq!(p["aggregate_verdict"], "malicious");
    assert_eq!(p["providers"], serde_json::json!(["greynoise", "feodo"]));
    assert!(p["abuseipdb_score"].is_null());
    assert_eq!(p["abuseipdb_categories"], serde_json::json!([]));
    assert_eq!(p["greynoise_classification"], "malicious");
    assert_eq!(p["greynoise_name"], "Mirai");
    assert_eq!(
        p["greynoise_tags"],
        serde_json::json!(["telnet_bruteforcer"])
    );
    assert_eq!(p["feodo_listed"], true);
    assert_eq!(p["feodo_malware_family"], "QakBot");
    assert!(p["threatfox_listed"].is_null());
    for key in [
        "threatfox_threat_types",
        "threatfox_ioc_types",
        "threatfox_malware_families",
    ] {
        assert_eq!(p[key], serde_json::json!([]), "{key}");
    }
    assert_eq!(p["ptr_record"], "h0.fake.test");
    assert_eq!(p["ptr_outcome"], "ok");
    assert!(
        p.get("ptr_forward_confirmed")
            .is_some_and(serde_json::Value::is_null),
        "published, null without forward confirmation: {p}"
    );
    assert_eq!(
        p["provider_outcomes"],
        serde_json::json!({"greynoise": "ok", "feodo": "ok"})
    );
    for forbidden in enrichd_core::payload::FORBIDDEN_PAYLOAD_KEYS {
        assert!(p.get(forbidden).is_none(), "{forbidden}");
    }

    let conn = db.connect().await;
    assert_eq!(scalar(&conn, "SELECT COUNT(*) FROM attackers").await, 1);
    assert_eq!(
        scalar(
            &conn,
            &format!(
                "SELECT COUNT(*) FROM attacker_intel WHERE attacker_uuid = '{uuid}' \
            AND aggregate_verdict = 'malicious' AND feodo_listed AND length(uuid) = 32 \
            AND greynoise_classification = 'malicious' AND abuseipdb_score IS NULL"
            )
        )
        .await,
        1
    );
    assert_eq!(
        scalar(&conn, &format!("SELECT COUNT(*) FROM attackers WHERE uuid = '{uuid}' AND ptr_record = 'h0.fake.test'")).await,
        1
    );
    assert_eq!(fakes.greynoise_calls().get("45.155.205.233"), Some(&1));
    drop(worker);
    bus.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_for_fifty_addresses_cost_fifty_lookups() {
    if !services_up() {
        return;
    }
    let db = TestDb::postgres().await;
    let fakes = FakeProviders::start(Duration::from_millis(20)).await;
    let addresses = ips("8.8.9", 50);
    let dns = dns_for(&parsed(&addresses));
    let (bus, _results) = bus(topology("fifty")).await;
    let env = worker_env(db.url(), &fakes, &dns).bus(&amqp_url(), &bus.topology);
    let worker = start_worker("fifty", &env).await;

    for round in 0..20 {
        for ip in &addresses {
            let _ = round;
            bus.publish_event(&scored(ip)).await.unwrap();
        }
    }
    let acked = eventually(WAIT, || async {
        worker.counter("enrichd_events_acked_total", &[]).await >= 1000
    })
    .await;
    assert!(acked, "{}", worker.process().log_text());
    let conn = db.connect().await;
    let enriched = eventually(WAIT, || async {
        scalar(
            &conn,
            "SELECT COUNT(*) FROM attacker_intel WHERE greynoise_classification IS NOT NULL",
        )
        .await
            == 50
    })
    .await;
    assert!(enriched, "{}", worker.process().log_text());
    assert_eq!(
        scalar(&conn, "SELECT COUNT(*) FROM attackers").await,
        50,
        "one attacker row per address"
    );
    let calls = fakes.greynoise_calls();
    assert_eq!(calls.len(), 50);
    assert!(calls.values().all(|n| *n == 1), "{calls:?}");

    // The metrics add up to what happened.
    let metrics = worker.metrics().await.expect("metrics");
    assert_eq!(metrics.count("enrichd_events_consumed_total", &[]), 1000);
    assert_eq!(metrics.count("enrichd_events_acked_total", &[]), 1000);
    assert_eq!(metrics.count("enrichd_events_dead_lettered_total", &[]), 0);
    let ok = [("outcome", "ok")];
    let greynoise = [("provider", "greynoise")];
    assert_eq!(
        metrics.count("enrichd_lookups_total", &[ok[0], greynoise[0]]),
        50
    );
    assert_eq!(metrics.count("enrichd_ptr_lookups_total", &ok), 50);
    assert_eq!(
        metrics.count("enrichd_provider_latency_seconds_count", &greynoise),
        50
    );
    assert_eq!(
        usize::try_from(metrics.count("enrichd_ptr_lookups_total", &ok)).unwrap(),
        dns.queries(),
        "every PTR lookup counted is a query the DNS server saw"
    );
    // Repetition was answered from memory (and from fresh stored state), never by a lookup.
    assert!(metrics.count("enrichd_cache_hits_total", &[("provider", "event")]) > 0);

    // The acks are coalesced: what the counter says was acked, the broker has settled. Once
    // the killed worker's consumer is gone, any delivery it left unacked is back in the queue.
    drop(worker);
    let consumer_gone = eventually(WAIT, || async {
        bus.queue_counts(&bus.topology.queue)
            .await
            .is_ok_and(|c| c.consumers == 0)
    })
    .await;
    assert!(consumer_gone);
    assert_eq!(
        bus.queue_counts(&bus.topology.queue)
            .await
            .unwrap()
            .messages,
        0
    );
    bus.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_twice_gives_one_row_one_event_and_one_lookup() {
    if !services_up() {
        return;
    }
    let db = TestDb::postgres().await;
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let dns = dns_for(&parsed(&["1.1.1.7".to_owned()]));
    let (bus, results) = bus(topology("twice")).await;
    let env = worker_env(db.url(), &fakes, &dns).bus(&amqp_url(), &bus.topology);
    let worker = start_worker("twice", &env).await;

    let body = enrichd_harness::events::body(&scored("1.1.1.7")).unwrap();
    bus.publish(TOPIC_SCORED, &body).await.unwrap();
    assert!(eventually(WAIT, || async { results.count() == 1 }).await);
    bus.publish(TOPIC_SCORED, &body).await.unwrap();
    assert!(
        eventually(WAIT, || async {
            worker.counter("enrichd_events_acked_total", &[]).await == 2
        })
        .await
    );
    let conn = db.connect().await;
    // The second pass is durable once acked; its write (if any) has happened when the outbox
    // is empty and no job is in flight.
    assert!(
        eventually(WAIT, || async {
            worker.counter("enrichd_in_flight", &[]).await == 0
                && scalar(&conn, "SELECT COUNT(*) FROM enrichd_outbox").await == 0
        })
        .await
    );
    assert_eq!(
        scalar(&conn, "SELECT COUNT(*) FROM attacker_intel").await,
        1
    );
    assert_eq!(scalar(&conn, "SELECT COUNT(*) FROM attackers").await, 1);
    assert_eq!(
        results.count(),
        1,
        "an unchanged payload publishes no second event"
    );
    assert_eq!(fakes.greynoise_calls().get("1.1.1.7"), Some(&1));
    drop(worker);
    bus.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_with_its_reason_and_consumption_goes_on() {
    if !services_up() {
        return;
    }
    let db = TestDb::postgres().await;
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let dns = dns_for(&parsed(&["9.9.9.10".to_owned()]));
    let (bus, results) = bus(topology("poison")).await;
    let env = worker_env(db.url(), &fakes, &dns).bus(&amqp_url(), &bus.topology);
    let worker = start_worker("poison", &env).await;

    bus.publish("attacker.observed", b"this is not json")
        .await
        .unwrap();
    bus.publish("attacker.observed", br#"{"attacker_ip":"1.2.3.4:22"}"#)
        .await
        .unwrap();
    bus.publish("attacker.scored", b"[1,2]").await.unwrap();
    bus.publish_event(&scored("9.9.9.10")).await.unwrap();
    assert!(
        eventually(WAIT, || async { results.count() == 1 }).await,
        "{}",
        worker.process().log_text()
    );
    assert!(
        eventually(WAIT, || async {
            bus.queue_counts(&bus.topology.dead_queue)
                .await
                .is_ok_and(|c| c.messages == 3)
        })
        .await
    );
    assert_eq!(
        worker
            .counter("enrichd_events_dead_lettered_total", &[])
            .await,
        3
    );

    // Read the dead letters and their reasons.
    let channel = bus.connection().create_channel().await.unwrap();
    let mut reasons = Vec::new();
    while let Some(message) = channel
        .basic_get(
            bus.topology.dead_queue.as_str().into(),
            lapin::options::BasicGetOptions::default(),
        )
        .await
        .unwrap()
    {
        let headers = message.delivery.properties.headers().clone().unwrap();
        if let Some(lapin::types::AMQPValue::LongString(reason)) =
            headers.inner().get("x-enrichd-reason")
        {
            reasons.push(String::from_utf8_lossy(reason.as_bytes()).into_owned());
        }
    }
    assert_eq!(reasons.len(), 3);
    let all = reasons.join("|");
    assert!(
        all.contains("not json")
            && all.contains("attacker_ip rejected")
            && all.contains("not a json object"),
        "{all}"
    );
    drop(worker);
    bus.teardown().await.unwrap();
}

/// Peak resident memory of `pid` (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_poison_is_dead_lettered_cut_to_64_kib_and_never_held_whole() {
    if !services_up() {
        return;
    }
    let db = TestDb::postgres().await;
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let dns = dns_for(&[]);
    let topology = topology("large").with_dead_max_bytes(1024 * 1024);
    let (bus, _results) = bus(topology).await;
    let env = worker_env(db.url(), &fakes, &dns).bus(&amqp_url(), &bus.topology);
    let env = env.set("ENRICHD_DLQ_MAX_BYTES", "1048576");
    let worker = start_worker("large", &env).await;
    let pid = worker.process().pid();
    let before = peak_rss_kib(pid);

    // Twenty 10 MB bodies: each becomes a 64 KiB letter saying what it was.
    let body = {
        let mut b = br#"{"attacker_ip":"8.8.8.8","pad":""#.to_vec();
        b.resize(10 * 1024 * 1024, b'x');
        b
    };
    for _ in 0..20 {
        bus.publish("attacker.scored", &body).await.unwrap();
    }
    assert!(
        eventually(WAIT, || async {
            worker
                .counter("enrichd_events_dead_lettered_total", &[])
                .await
                == 20
        })
        .await,
        "{}",
        worker.process().log_text()
    );
    let peak_mib = peak_rss_kib(pid) / 1024;
    eprintln!(
        "peak RSS {peak_mib} MiB (before the flood: {} MiB)",
        before / 1024
    );

    // The queue holds 1 MiB at most: the oldest letters were dropped for the newest.
    let depth = bus
        .queue_counts(&bus.topology.dead_queue)
        .await
        .unwrap()
        .messages;
    assert!(
        (1..=16).contains(&depth),
        "bounded in bytes: {depth} letters"
    );
    let channel = bus.connection().create_channel().await.unwrap();
    let letter = channel
        .basic_get(
            bus.topology.dead_queue.as_str().into(),
            lapin::options::BasicGetOptions::default(),
        )
        .await
        .unwrap()
        .expect("a letter");
    assert_eq!(letter.delivery.data.len(), 64 * 1024);
    assert_eq!(&letter.delivery.data[..], &body[..64 * 1024]);
    let headers = letter.delivery.properties.headers().clone().unwrap();
    let headers = headers.inner();
    assert_eq!(
        headers.get("x-enrichd-truncated"),
        Some(&lapin::types::AMQPValue::Boolean(true))
    );
    assert_eq!(
        headers.get("x-enrichd-original-size"),
        Some(&lapin::types::AMQPValue::LongLongInt(10 * 1024 * 1024))
    );
    let Some(lapin::types::AMQPValue::LongString(reason)) = headers.get("x-enrichd-reason") else {
        panic!("a reason: {headers:?}");
    };
    assert!(
        String::from_utf8_lossy(reason.as_bytes()).starts_with("body over 64 KiB"),
        "{reason:?}"
    );
    // 200 MB went through; what stayed resident is a fraction of it (each body is cut on
    // receipt). Republished whole, the same flood peaked at 233 MiB.
    assert!(peak_mib < 100, "peak RSS {peak_mib} MiB");
    drop(worker);
    bus.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_pauses_intake_and_loses_nothing() {
    if !services_up() {
        return;
    }
    let db = TestDb::postgres().await;
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap(), true).await;
    let proxied_url = db
        .url()
        .replace("127.0.0.1:5432", &proxy.addr().to_string());
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let addresses = ips("8.8.10", 20);
    let dns = dns_for(&parsed(&addresses));
    let (bus, _results) = bus(topology("outage")).await;
    let env = worker_env(&proxied_url, &fakes, &dns).bus(&amqp_url(), &bus.topology);
    let worker = start_worker("outage", &env).await;

    proxy.set_open(false);
    for ip in &addresses {
        bus.publish_event(&scored(ip)).await.unwrap();
    }
    // The deliveries arrive but cannot become durable: none is acked or dead-lettered.
    assert!(
        eventually(WAIT, || async {
            worker.counter("enrichd_events_consumed_total", &[]).await >= 20
        })
        .await
    );
    assert_eq!(worker.counter("enrichd_events_acked_total", &[]).await, 0);
    proxy.set_open(true);

    let conn = db.connect().await;
    let enriched = eventually(Duration::from_secs(90), || async {
        scalar(
            &conn,
            "SELECT COUNT(*) FROM attacker_intel WHERE greynoise_classification IS NOT NULL",
        )
        .await
            == 20
    })
    .await;
    assert!(enriched, "{}", worker.process().log_text());
    assert_eq!(
        worker
            .counter("enrichd_events_dead_lettered_total", &[])
            .await,
        0
    );
    assert_eq!(
        bus.queue_counts(&bus.topology.dead_queue)
            .await
            .unwrap()
            .messages,
        0
    );
    assert_eq!(scalar(&conn, "SELECT COUNT(*) FROM attackers").await, 20);
    drop(worker);
    bus.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_work_loses_nothing_and_duplicates_nothing() {
    if !services_up() {
        return;
    }
    let db = TestDb::postgres().await;
    // Slow providers so the signal lands while lookups are in flight.
    let fakes = FakeProviders::start(Duration::from_millis(300)).await;
    let addresses = ips("8.8.11", 100);
    let dns = dns_for(&parsed(&addresses));
    let (bus, _results) = bus(topology("sigterm")).await;
    let env = worker_env(db.url(), &fakes, &dns)
        .set("ENRICHD_GREYNOISE_CONCURRENCY", "4")
        .bus(&amqp_url(), &bus.topology);
    let mut worker = start_worker("sigterm", &env).await;
    for ip in &addresses {
        bus.publish_event(&scored(ip)).await.unwrap();
    }
    assert!(eventually(WAIT, || async { fakes.greynoise_calls().len() >= 5 }).await);
    worker.process_mut().signal(Signal::Term).await.unwrap();
    assert_eq!(
        worker
            .process_mut()
            .wait_exit(Duration::from_secs(30))
            .await
            .and_then(|status| status.code()),
        Some(0),
        "{}",
        worker.process().log_text()
    );

    let worker = start_worker("sigterm-2", &env).await;
    let conn = db.connect().await;
    let done = eventually(Duration::from_secs(120), || async {
        scalar(
            &conn,
            "SELECT COUNT(*) FROM attacker_intel WHERE greynoise_classification IS NOT NULL",
        )
        .await
            == 100
    })
    .await;
    assert!(done, "{}", worker.process().log_text());
    assert_eq!(
        scalar(&conn, "SELECT COUNT(*) FROM attackers").await,
        100,
        "no duplicate attacker rows"
    );
    assert_eq!(
        scalar(&conn, "SELECT COUNT(*) FROM attacker_intel").await,
        100,
        "no duplicate intel rows"
    );
    drop(worker);
    bus.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_down_at_start_poll_mode_works_then_the_bus_is_consumed() {
    if !services_up() {
        return;
    }
    let db = TestDb::postgres().await;
    let broker = TcpProxy::start("127.0.0.1:5672".parse().unwrap(), false).await;
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let addresses = ips("8.8.12", 6);
    let dns = dns_for(&parsed(&addresses));
    let (bus, _results) = bus(topology("pollmode")).await;

    // A backlog: attacker rows the reference's profiler would have written.
    let migrate = Enrichd::output(
        enrichd_bin(),
        &["migrate"],
        &EnrichdEnv::new().database(db.url()),
    )
    .await
    .unwrap();
    assert!(migrate.status.success());
    let conn = db.connect().await;
    for (i, ip) in addresses.iter().take(5).enumerate() {
        common::exec(
            &conn,
            &format!(
                "INSERT INTO attackers (uuid, ip, first_seen, last_seen, updated_at) VALUES \
                 ('00000000-0000-4000-8000-00000000000{i}', '{ip}', now(), now(), now())"
            ),
        )
        .await;
    }
    let proxied_amqp = amqp_url().replace("127.0.0.1:5672", &broker.addr().to_string());
    let env = worker_env(db.url(), &fakes, &dns).bus(&proxied_amqp, &bus.topology);
    let worker = start_worker("pollmode", &env).await;

    let backlog_done = eventually(WAIT, || async {
        scalar(
            &conn,
            "SELECT COUNT(*) FROM attacker_intel WHERE greynoise_classification IS NOT NULL",
        )
        .await
            == 5
    })
    .await;
    assert!(backlog_done, "{}", worker.process().log_text());
    assert_eq!(
        worker.counter("enrichd_events_consumed_total", &[]).await,
        0
    );

    broker.set_open(true);
    bus.publish_event(&scored(&addresses[5])).await.unwrap();
    let consumed = eventually(Duration::from_secs(90), || async {
        scalar(
            &conn,
            "SELECT COUNT(*) FROM attacker_intel WHERE greynoise_classification IS NOT NULL",
        )
        .await
            == 6
    })
    .await;
    assert!(consumed, "{}", worker.process().log_text());
    assert!(worker.counter("enrichd_events_acked_total", &[]).await >= 1);
    drop(worker);
    bus.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_on_the_control_topic_drains_and_exits_zero() {
    if !services_up() {
        return;
    }
    let db = TestDb::postgres().await;
    let fakes = FakeProviders::start(Duration::ZERO).await;
    let dns = dns_for(&[]);
    let (bus, _results) = bus(topology("stop")).await;
    let env = worker_env(db.url(), &fakes, &dns).bus(&amqp_url(), &bus.topology);
    let mut worker = start_worker("stop", &env).await;
    // The control queue is declared once the session is up; a health beat proves that.
    assert!(
        eventually(WAIT, || async {
            worker.process().log_text().contains("Connected to the bus")
        })
        .await
    );
    let stop = Envelope::new(
        TOPIC_CONTROL,
        "control",
        1.0,
        serde_json::json!({"action": "stop", "requested_by": "test", "ts": 1.0}),
    );
    bus.publish_event(&stop).await.unwrap();
    assert_eq!(
        worker
            .process_mut()
            .wait_exit(Duration::from_secs(30))
            .await
            .and_then(|status| status.code()),
        Some(0),
        "{}",
        worker.process().log_text()
    );
    drop(worker);
    bus.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_and_purge_from_the_command_line() {
    if !services_up() {
        return;
    }
    let (bus, _results) = bus(topology("dlqcli")).await;
    for i in 0..3 {
        let body = format!(r#"{{"attacker_ip":"8.8.13.{i}"}}"#);
        bus.publisher()
            .publish(enrichd_bus::publish::Outgoing::persistent(
                &bus.topology.dead_letter_exchange,
                &bus.topology.dead_queue,
                body.as_bytes(),
            ))
            .await
            .unwrap();
    }
    let env = EnrichdEnv::new().bus(&amqp_url(), &bus.topology);
    let run = |args: &'static [&'static str]| {
        let env = env.clone();
        async move { Enrichd::output(enrichd_bin(), args, &env).await.unwrap() }
    };
    let replay = run(&["dlq", "replay", "--limit", "2"]).await;
    assert_eq!(
        replay.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(String::from_utf8_lossy(&replay.stdout).contains("replayed 2"));
    assert_eq!(
        bus.queue_counts(&bus.topology.queue)
            .await
            .unwrap()
            .messages,
        2
    );
    assert_eq!(
        bus.queue_counts(&bus.topology.dead_queue)
            .await
            .unwrap()
            .messages,
        1
    );

    let purge = run(&["dlq", "purge"]).await;
    assert_eq!(purge.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&purge.stdout).contains("purged 1"));
    assert_eq!(
        bus.queue_counts(&bus.topology.dead_queue)
            .await
            .unwrap()
            .messages,
        0
    );

    // Without a broker configured it is a configuration error.
    let none = Enrichd::output(enrichd_bin(), &["dlq", "purge"], &EnrichdEnv::new())
        .await
        .unwrap();
    assert_eq!(none.status.code(), Some(78));
    bus.teardown().await.unwrap();
}
