//! The series through the public API: exposition text, series identity, concurrency.

use std::collections::BTreeSet;

use enrichd_core::metric_names as names;
use enrichd_metrics::{LATENCY_BUCKETS, LookupLabels, Metrics, ProviderLabel, ReasonLabel};

fn provider(provider: &'static str) -> ProviderLabel {
    ProviderLabel { provider }
}

/// The exposition with the series of each counter and gauge family sorted: prometheus-client
/// keeps a family's series in a hash map, and Prometheus does not care about their order. A
/// histogram's lines keep their order (buckets ascending, then sum and count).
fn sorted_series(text: &str) -> String {
    let mut out = String::new();
    for family in text
        .split_inclusive('\n')
        .collect::<Vec<_>>()
        .chunk_by(|_, next| !next.starts_with("# HELP "))
    {
        let (header, series) = family.split_at(2.min(family.len()));
        let mut series = series.to_vec();
        if !header.iter().any(|line| line.ends_with(" histogram\n")) {
            series.sort_unstable();
        }
        out.extend(header.iter().copied().chain(series));
    }
    out
}

#[test]
fn renders_a_small_set_exactly() {
    let metrics = Metrics::new();
    metrics
        .lookups
        .get_or_create(&LookupLabels {
            outcome: "ok",
            provider: "feodo",
        })
        .inc_by(3);
    metrics
        .lookups
        .get_or_create(&LookupLabels {
            outcome: "error",
            provider: "abuseipdb",
        })
        .inc();
    metrics
        .events_dead_lettered
        .get_or_create(&ReasonLabel {
            reason: "bad \"json\"\nat \\x".to_owned(),
        })
        .inc();
    metrics.backlog.set(2);
    metrics.outbox_oldest_age.set(1.5);
    metrics
        .quota_remaining
        .get_or_create(&provider("abuseipdb"))
        .set(42);
    let latency = metrics
        .provider_latency
        .get_or_create_owned(&provider("feodo"));
    latency.observe(0.003_906_25);
    latency.observe(0.125);
    latency.observe(45.0);

    let expected = r#"# HELP enrichd_backlog Attackers with due work, as of the last backfill pass.
# TYPE enrichd_backlog gauge
enrichd_backlog 2
# HELP enrichd_events_dead_lettered_total Deliveries republished to the dead-letter exchange, by reason.
# TYPE enrichd_events_dead_lettered_total counter
enrichd_events_dead_lettered_total{reason="bad \"json\"\nat \\x"} 1
# HELP enrichd_lookups_total Provider lookups, by provider and outcome.
# TYPE enrichd_lookups_total counter
enrichd_lookups_total{outcome="error",provider="abuseipdb"} 1
enrichd_lookups_total{outcome="ok",provider="feodo"} 3
# HELP enrichd_outbox_oldest_age_seconds Age of the oldest unpublished outbox row in seconds.
# TYPE enrichd_outbox_oldest_age_seconds gauge
enrichd_outbox_oldest_age_seconds 1.5
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
    assert_eq!(sorted_series(&metrics.render()), expected);
}

#[test]
fn nothing_recorded_renders_nothing() {
    assert_eq!(Metrics::new().render(), "");
}

#[test]
fn every_series_is_exported_under_its_enrichd_name_type_and_own_help() {
    let metrics = Metrics::new();
    metrics.backlog.set(1);
    metrics
        .breaker_state
        .get_or_create(&provider("feodo"))
        .set(0);
    metrics.cache_hits.get_or_create(&provider("ptr")).inc();
    metrics.events_acked.inc();
    metrics.events_consumed.inc();
    metrics
        .events_dead_lettered
        .get_or_create(&ReasonLabel {
            reason: "decode".to_owned(),
        })
        .inc();
    metrics.in_flight.set(1);
    metrics
        .lookups
        .get_or_create(&LookupLabels {
            outcome: "ok",
            provider: "feodo",
        })
        .inc();
    metrics.outbox_depth.set(1);
    metrics.outbox_oldest_age.set(1.0);
    metrics
        .provider_latency
        .get_or_create(&provider("feodo"))
        .observe(0.1);
    metrics
        .ptr_lookups
        .get_or_create(&enrichd_metrics::OutcomeLabel { outcome: "ok" })
        .inc();
    metrics
        .quota_remaining
        .get_or_create(&provider("feodo"))
        .set(1);

    let text = metrics.render();
    let types: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.split_once(' '))
        .collect();
    let exported: BTreeSet<&str> = types.iter().map(|(name, _)| *name).collect();
    assert_eq!(exported, BTreeSet::from(names::ALL), "{text}");
    assert_eq!(
        types.len(),
        names::ALL.len(),
        "one TYPE line per series: {text}"
    );
    for (name, kind) in types {
        let expected = if name == names::PROVIDER_LATENCY {
            "histogram"
        } else if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        assert_eq!(kind, expected, "{name}");
    }
    let helps: Vec<&str> = text
        .lines()
        .filter_map(|line| {
            line.strip_prefix("# HELP ")?
                .split_once(' ')
                .map(|(_, help)| help)
        })
        .collect();
    assert_eq!(helps.len(), names::ALL.len(), "{text}");
    assert_eq!(
        helps.iter().collect::<BTreeSet<_>>().len(),
        helps.len(),
        "{helps:?}"
    );
    assert!(
        helps
            .iter()
            .all(|help| help.ends_with('.') && !help.ends_with("..")),
        "one period, added by the library: {helps:?}"
    );
}

#[test]
fn latency_buckets_span_one_millisecond_to_thirty_seconds() {
    assert_eq!(LATENCY_BUCKETS.first(), Some(&0.001));
    assert_eq!(LATENCY_BUCKETS.last(), Some(&30.0));
    assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn observations_land_in_the_first_bucket_whose_bound_holds_them() {
    let metrics = Metrics::new();
    let latency = metrics.provider_latency.get_or_create_owned(&provider("x"));
    latency.observe(0.001); // on the bound: le is inclusive
    latency.observe(0.0011);
    latency.observe(31.0);
    let text = metrics.render();
    for line in [
        r#"_bucket{provider="x",le="0.001"} 1"#,
        r#"_bucket{provider="x",le="0.0025"} 2"#,
        r#"_bucket{provider="x",le="30"} 2"#,
        r#"_bucket{provider="x",le="+Inf"} 3"#,
        r#"_count{provider="x"} 3"#,
        r#"_sum{provider="x"} 31.0021"#,
    ] {
        assert!(
            text.contains(&format!("{}{line}\n", names::PROVIDER_LATENCY)),
            "{line} in {text}"
        );
    }
}

#[test]
fn gauge_specials_use_prometheus_spelling() {
    for (value, spelled) in [
        (f64::NAN, "NaN"),
        (f64::INFINITY, "+Inf"),
        (f64::NEG_INFINITY, "-Inf"),
        (-2.5, "-2.5"),
    ] {
        let metrics = Metrics::new();
        metrics.outbox_oldest_age.set(value);
        assert!(
            metrics
                .render()
                .contains(&format!("\n{} {spelled}\n", names::OUTBOX_OLDEST_AGE)),
            "{spelled}: {}",
            metrics.render()
        );
    }
}

#[test]
fn same_labels_reach_the_same_series_and_clones_share_it() {
    let metrics = Metrics::new();
    let ok = LookupLabels {
        outcome: "ok",
        provider: "feodo",
    };
    let kept = metrics.lookups.get_or_create_owned(&ok);
    kept.inc();
    metrics.lookups.get_or_create(&ok).inc_by(2);
    kept.clone().inc();
    assert_eq!(kept.get(), 4);
    assert_eq!(metrics.lookups.get_or_create(&ok).get(), 4);
    let error = LookupLabels {
        outcome: "error",
        provider: "feodo",
    };
    assert_eq!(metrics.lookups.get_or_create(&error).get(), 0);

    let in_flight = metrics.in_flight.clone();
    in_flight.set(2);
    metrics.in_flight.set(1);
    assert_eq!(in_flight.get(), 1);

    let h1 = metrics.provider_latency.get_or_create_owned(&provider("x"));
    let h2 = metrics.provider_latency.get_or_create_owned(&provider("x"));
    h1.observe(std::time::Duration::from_millis(20).as_secs_f64());
    h2.observe(0.5);
    let text = metrics.render();
    assert!(
        text.contains(&format!(
            "{}_count{{provider=\"x\"}} 2\n",
            names::PROVIDER_LATENCY
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{}_sum{{provider=\"x\"}} 0.52\n",
            names::PROVIDER_LATENCY
        )),
        "{text}"
    );
}

#[test]
fn a_series_is_exported_from_its_first_update_on() {
    let metrics = Metrics::new();
    metrics
        .lookups
        .get_or_create(&LookupLabels {
            outcome: "ok",
            provider: "feodo",
        })
        .inc();
    let text = metrics.render();
    assert!(!text.contains(r#"outcome="error""#), "{text}");
    for name in [
        names::EVENTS_ACKED,
        names::BACKLOG,
        names::OUTBOX_OLDEST_AGE,
        names::PROVIDER_LATENCY,
    ] {
        assert!(!text.contains(name), "{name} in {text}");
    }
    // An update that adds nothing still exports the series.
    metrics.events_acked.inc_by(0);
    assert!(
        metrics
            .render()
            .contains(&format!("\n{} 0\n", names::EVENTS_ACKED)),
        "{}",
        metrics.render()
    );
}

#[test]
fn sets_are_independent() {
    let one = Metrics::new();
    let two = Metrics::new();
    one.events_acked.inc();
    assert_eq!(two.events_acked.get(), 0);
    assert_eq!(two.render(), "");
    assert!(one.render().contains(names::EVENTS_ACKED));
}

#[test]
fn the_global_set_is_one_set() {
    let hits = || {
        enrichd_metrics::global()
            .cache_hits
            .get_or_create(&provider("test_global"))
            .get()
    };
    assert!(std::ptr::eq(
        enrichd_metrics::global(),
        enrichd_metrics::global()
    ));
    let before = hits();
    enrichd_metrics::global()
        .cache_hits
        .get_or_create(&provider("test_global"))
        .inc();
    enrichd_metrics::global()
        .cache_hits
        .get_or_create(&provider("test_global"))
        .inc();
    assert_eq!(hits(), before + 2);
    assert!(
        enrichd_metrics::global()
            .render()
            .contains(r#"enrichd_cache_hits_total{provider="test_global"} "#)
    );
}

#[test]
fn concurrent_updates_from_threads_add_up() {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 10_000;
    let metrics = Metrics::new();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let metrics = &metrics;
            scope.spawn(move || {
                // Half the threads keep a handle, half look the series up each time: both race.
                let kept = metrics.cache_hits.get_or_create_owned(&provider("ptr"));
                let gauge = metrics
                    .quota_remaining
                    .get_or_create_owned(&provider("ptr"));
                let histogram = metrics
                    .provider_latency
                    .get_or_create_owned(&provider("ptr"));
                for _ in 0..PER_THREAD {
                    if t % 2 == 0 {
                        kept.inc();
                    } else {
                        metrics.cache_hits.get_or_create(&provider("ptr")).inc();
                    }
                    metrics.events_consumed.inc();
                    gauge.inc();
                    histogram.observe(0.01);
                }
            });
        }
    });
    let total = THREADS * PER_THREAD;
    assert_eq!(
        metrics.cache_hits.get_or_create(&provider("ptr")).get(),
        total
    );
    assert_eq!(metrics.events_consumed.get(), total);
    assert_eq!(
        metrics
            .quota_remaining
            .get_or_create(&provider("ptr"))
            .get(),
        i64::try_from(total).unwrap()
    );
    assert!(
        metrics.render().contains(&format!(
            "{}_count{{provider=\"ptr\"}} {total}\n",
            names::PROVIDER_LATENCY
        )),
        "{}",
        metrics.render()
    );
}
