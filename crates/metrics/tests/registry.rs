//! The registry through its public API: exposition text, series identity, concurrency.

use enrichd_core::metric_names as names;
use enrichd_metrics::{LATENCY_BUCKETS, Registry};

#[test]
fn renders_a_small_registry_exactly() {
    let registry = Registry::new();
    registry
        .counter(names::LOOKUPS, &[("provider", "feodo"), ("outcome", "ok")])
        .add(3);
    registry
        .counter(
            names::LOOKUPS,
            &[("provider", "abuseipdb"), ("outcome", "error")],
        )
        .inc();
    registry
        .counter(
            names::EVENTS_DEAD_LETTERED,
            &[("reason", "bad \"json\"\nat \\x")],
        )
        .inc();
    registry.gauge(names::BACKLOG, &[]).set(1.5);
    registry
        .gauge(names::QUOTA_REMAINING, &[("provider", "abuseipdb")])
        .set_u64(42);
    let latency = registry.histogram(names::PROVIDER_LATENCY, &[("provider", "feodo")]);
    latency.observe_secs(0.003_906_25);
    latency.observe_secs(0.125);
    latency.observe_secs(45.0);

    let expected = r#"# HELP enrichd_backlog Attackers with due work, as of the last backfill pass.
# TYPE enrichd_backlog gauge
enrichd_backlog 1.5
# HELP enrichd_events_dead_lettered_total Deliveries republished to the dead-letter exchange, by reason.
# TYPE enrichd_events_dead_lettered_total counter
enrichd_events_dead_lettered_total{reason="bad \"json\"\nat \\x"} 1
# HELP enrichd_lookups_total Provider lookups, by provider and outcome.
# TYPE enrichd_lookups_total counter
enrichd_lookups_total{outcome="error",provider="abuseipdb"} 1
enrichd_lookups_total{outcome="ok",provider="feodo"} 3
# HELP enrichd_provider_latency_seconds Provider call latency in seconds, by provider.
# TYPE enrichd_provider_latency_seconds histogram
enrichd_provider_latency_seconds_bucket{provider="feodo",le="0.001"} 0
enrichd_provider_latency_seconds_bucket{provider="feodo",le="0.0025"} 0
enrichd_provider_latency_seconds_bucket{provider="feodo",le="0.005"} 1
enrichd_provider_latency_seconds_bucket{provider="feodo",le="0.01"} 1
enrichd_provider_latency_seconds_bucket{provider="feodo",le="0.025"} 1
enrichd_provider_latency_seconds_bucket{provider="feodo",le="0.05"} 1
enrichd_provider_latency_seconds_bucket{provider="feodo",le="0.1"} 1
enrichd_provider_latency_seconds_bucket{provider="feodo",le="0.25"} 2
enrichd_provider_latency_seconds_bucket{provider="feodo",le="0.5"} 2
enrichd_provider_latency_seconds_bucket{provider="feodo",le="1"} 2
enrichd_provider_latency_seconds_bucket{provider="feodo",le="2.5"} 2
enrichd_provider_latency_seconds_bucket{provider="feodo",le="5"} 2
enrichd_provider_latency_seconds_bucket{provider="feodo",le="10"} 2
enrichd_provider_latency_seconds_bucket{provider="feodo",le="30"} 2
enrichd_provider_latency_seconds_bucket{provider="feodo",le="+Inf"} 3
enrichd_provider_latency_seconds_sum{provider="feodo"} 45.12890625
enrichd_provider_latency_seconds_count{provider="feodo"} 3
# HELP enrichd_quota_remaining Provider quota left, when known, by provider.
# TYPE enrichd_quota_remaining gauge
enrichd_quota_remaining{provider="abuseipdb"} 42
"#;
    assert_eq!(registry.render(), expected);
}

#[test]
fn empty_registry_renders_nothing() {
    assert_eq!(Registry::new().render(), "");
}

#[test]
fn latency_buckets_span_one_millisecond_to_thirty_seconds() {
    assert_eq!(LATENCY_BUCKETS.first(), Some(&0.001));
    assert_eq!(LATENCY_BUCKETS.last(), Some(&30.0));
    assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn same_name_and_labels_return_the_same_series_in_any_label_order() {
    let registry = Registry::new();
    let a = registry.counter(names::LOOKUPS, &[("provider", "feodo"), ("outcome", "ok")]);
    let b = registry.counter(names::LOOKUPS, &[("outcome", "ok"), ("provider", "feodo")]);
    let other = registry.counter(
        names::LOOKUPS,
        &[("provider", "feodo"), ("outcome", "error")],
    );
    a.inc();
    b.add(2);
    a.clone().inc();
    assert_eq!(a.get(), 4);
    assert_eq!(b.get(), 4);
    assert_eq!(other.get(), 0);
    assert_eq!(
        registry.counter_value(names::LOOKUPS, &[("provider", "feodo"), ("outcome", "ok")]),
        4
    );

    let g1 = registry.gauge(names::IN_FLIGHT, &[]);
    let g2 = registry.gauge(names::IN_FLIGHT, &[]);
    g1.inc();
    g2.inc();
    g1.dec();
    assert_eq!(registry.gauge_value(names::IN_FLIGHT, &[]), Some(1.0));

    let h1 = registry.histogram(names::PROVIDER_LATENCY, &[("provider", "x")]);
    let h2 = registry.histogram(names::PROVIDER_LATENCY, &[("provider", "x")]);
    h1.observe(std::time::Duration::from_millis(20));
    h2.observe_secs(0.5);
    assert_eq!(
        registry.histogram_count(names::PROVIDER_LATENCY, &[("provider", "x")]),
        2
    );
    assert!((h1.sum() - 0.52).abs() < 1e-9);
}

#[test]
fn read_api_reports_missing_series_as_absent() {
    let registry = Registry::new();
    registry
        .counter(names::LOOKUPS, &[("provider", "feodo")])
        .inc();
    assert_eq!(
        registry.counter_value(names::LOOKUPS, &[("provider", "other")]),
        0
    );
    assert_eq!(registry.counter_value(names::EVENTS_ACKED, &[]), 0);
    assert_eq!(registry.gauge_value(names::BACKLOG, &[]), None);
    assert_eq!(registry.histogram_count(names::PROVIDER_LATENCY, &[]), 0);
}

#[test]
fn registries_are_independent_and_clones_share_series() {
    let one = Registry::new();
    let two = Registry::new();
    one.counter(names::EVENTS_ACKED, &[]).inc();
    assert_eq!(two.counter_value(names::EVENTS_ACKED, &[]), 0);
    one.clone().counter(names::EVENTS_ACKED, &[]).inc();
    assert_eq!(one.counter_value(names::EVENTS_ACKED, &[]), 2);
}

#[test]
fn the_global_registry_is_one_registry() {
    let name = "enrichd_metrics_test_global_total";
    enrichd_metrics::global().counter(name, &[]).inc();
    enrichd_metrics::global().counter(name, &[]).inc();
    assert_eq!(enrichd_metrics::global().counter_value(name, &[]), 2);
}

#[test]
fn misuse_gets_a_working_handle_that_is_not_exported() {
    let registry = Registry::new();
    registry.counter(names::BACKLOG, &[]).inc();
    // Same name, another type: the gauge works but the counter family is untouched.
    let gauge = registry.gauge(names::BACKLOG, &[]);
    gauge.set(7.0);
    assert!((gauge.get() - 7.0).abs() < f64::EPSILON);
    assert_eq!(registry.gauge_value(names::BACKLOG, &[]), None);
    assert_eq!(registry.counter_value(names::BACKLOG, &[]), 1);
    // Invalid names and the reserved `le` label.
    registry.counter("bad-name", &[]).inc();
    registry
        .counter(names::LOOKUPS, &[("bad label", "x")])
        .inc();
    registry
        .histogram(names::PROVIDER_LATENCY, &[("le", "1")])
        .observe_secs(1.0);
    let text = registry.render();
    assert!(!text.contains("bad"), "{text}");
    assert!(!text.contains(names::LOOKUPS), "{text}");
    assert!(!text.contains(names::PROVIDER_LATENCY), "{text}");
}

#[test]
fn concurrent_increments_from_threads_add_up() {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 10_000;
    let registry = Registry::new();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let registry = registry.clone();
            scope.spawn(move || {
                // Half the threads take a handle each time, half keep one: both paths race.
                let kept = registry.counter(names::EVENTS_CONSUMED, &[]);
                let gauge = registry.gauge(names::IN_FLIGHT, &[]);
                let histogram = registry.histogram(names::PROVIDER_LATENCY, &[]);
                for _ in 0..PER_THREAD {
                    if t % 2 == 0 {
                        kept.inc();
                    } else {
                        registry.counter(names::EVENTS_CONSUMED, &[]).inc();
                    }
                    gauge.add(1.0);
                    histogram.observe_secs(0.01);
                }
            });
        }
    });
    let total = THREADS * PER_THREAD;
    assert_eq!(registry.counter_value(names::EVENTS_CONSUMED, &[]), total);
    #[expect(clippy::cast_precision_loss, reason = "80 000 is exact in f64")]
    let expected = total as f64;
    assert_eq!(registry.gauge_value(names::IN_FLIGHT, &[]), Some(expected));
    assert_eq!(
        registry.histogram_count(names::PROVIDER_LATENCY, &[]),
        total
    );
}
