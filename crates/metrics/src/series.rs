//! Every enrichd series: its name, help text and type, registered once in [`Metrics::new`], and
//! the label sets of the labelled ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use enrichd_core::metric_names as names;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{self, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

/// Upper bounds (seconds) of the latency histogram buckets, 1 ms to 30 s; `+Inf` is implied.
///
/// Provider calls time out in seconds, DNS answers in milliseconds: one fixed ladder covers both
/// so every latency panel reads the same.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A gauge of fractional seconds.
pub type SecondsGauge = Gauge<f64, AtomicU64>;

/// `provider`: a provider id, or `ptr` / `event` where the cache hit was not a provider's.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    /// The provider id (`ProviderId::as_str`), or `ptr` / `event` for cache hits.
    pub provider: &'static str,
}

/// `outcome` and `provider` of one lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// `ProviderOutcome::as_str`. Declared first: labels are exposed in field order, and the
    /// hand-written exporter this replaced sorted them by name.
    pub outcome: &'static str,
    /// `ProviderId::as_str`.
    pub provider: &'static str,
}

/// `outcome` of one PTR lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `PtrOutcome::as_str`.
    pub outcome: &'static str,
}

/// `reason` a delivery was dead-lettered for.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason without its details, so the label set stays small and fixed.
    pub reason: String,
}

/// The enrichd series, each a typed handle: recording is an atomic operation on the handle
/// (a labelled family first finds its series under a read lock, creating it on first use).
///
/// Production code records into [`crate::global()`]; tests make their own with
/// [`Metrics::new`] so they do not see each other's series. A series is exported from its
/// first update on, labelled or not, so a worker without a bus shows no bus series and a
/// gauge nobody has measured yet is absent rather than a made-up 0.
#[derive(Debug)]
pub struct Metrics {
    /// Holds a clone of every handle below; only [`Metrics::render`] reads it.
    registry: Registry,
    /// `enrichd_backlog`: attackers with due work, as of the last backfill pass.
    pub backlog: Unlabelled<Gauge>,
    /// `enrichd_breaker_state`: 0 closed, 1 half-open, 2 open.
    pub breaker_state: Family<ProviderLabel, Gauge>,
    /// `enrichd_cache_hits_total`: work skipped because stored state was fresh.
    pub cache_hits: Family<ProviderLabel, Counter>,
    /// `enrichd_events_acked_total`: deliveries acked.
    pub events_acked: Unlabelled<Counter>,
    /// `enrichd_events_consumed_total`: deliveries received from the work queue.
    pub events_consumed: Unlabelled<Counter>,
    /// `enrichd_events_dead_lettered_total`: deliveries republished to the dead-letter exchange.
    pub events_dead_lettered: Family<ReasonLabel, Counter>,
    /// `enrichd_in_flight`: jobs in flight in this replica.
    pub in_flight: Unlabelled<Gauge>,
    /// `enrichd_lookups_total`: provider lookups.
    pub lookups: Family<LookupLabels, Counter>,
    /// `enrichd_outbox_depth`: outbox rows waiting to be published.
    pub outbox_depth: Unlabelled<Gauge>,
    /// `enrichd_outbox_oldest_age_seconds`: age of the oldest unpublished outbox row.
    pub outbox_oldest_age: Unlabelled<SecondsGauge>,
    /// `enrichd_provider_latency_seconds`: provider call latency over [`LATENCY_BUCKETS`].
    pub provider_latency: Family<ProviderLabel, Histogram>,
    /// `enrichd_ptr_lookups_total`: PTR lookups.
    pub ptr_lookups: Family<OutcomeLabel, Counter>,
    /// `enrichd_quota_remaining`: provider quota left, when known.
    pub quota_remaining: Family<ProviderLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every series, registered in name order (the order of the exposition) and empty.
    pub fn new() -> Self {
        let mut r = Registry::default();
        // Help texts end without a period: the library adds one.
        Self {
            backlog: register(
                &mut r,
                names::BACKLOG,
                "Attackers with due work, as of the last backfill pass",
                Unlabelled::default(),
            ),
            breaker_state: register(
                &mut r,
                names::BREAKER_STATE,
                "Circuit breaker state (0 closed, 1 half-open, 2 open), by provider",
                Family::default(),
            ),
            cache_hits: register(
                &mut r,
                names::CACHE_HITS,
                "Work skipped because stored state was fresh, by provider (ptr for reverse DNS)",
                Family::default(),
            ),
            events_acked: register(
                &mut r,
                names::EVENTS_ACKED,
                "Deliveries acked",
                Unlabelled::default(),
            ),
            events_consumed: register(
                &mut r,
                names::EVENTS_CONSUMED,
                "Deliveries received from the work queue",
                Unlabelled::default(),
            ),
            events_dead_lettered: register(
                &mut r,
                names::EVENTS_DEAD_LETTERED,
                "Deliveries republished to the dead-letter exchange, by reason",
                Family::default(),
            ),
            in_flight: register(
                &mut r,
                names::IN_FLIGHT,
                "Jobs in flight in this replica",
                Unlabelled::default(),
            ),
            lookups: register(
                &mut r,
                names::LOOKUPS,
                "Provider lookups, by provider and outcome",
                Family::default(),
            ),
            outbox_depth: register(
                &mut r,
                names::OUTBOX_DEPTH,
                "Outbox rows waiting to be published",
                Unlabelled::default(),
            ),
            outbox_oldest_age: register(
                &mut r,
                names::OUTBOX_OLDEST_AGE,
                "Age of the oldest unpublished outbox row in seconds",
                Unlabelled::default(),
            ),
            provider_latency: register(
                &mut r,
                names::PROVIDER_LATENCY,
                "Provider call latency in seconds, by provider",
                Family::new_with_constructor(latency_histogram),
            ),
            ptr_lookups: register(
                &mut r,
                names::PTR_LOOKUPS,
                "PTR lookups, by outcome",
                Family::default(),
            ),
            quota_remaining: register(
                &mut r,
                names::QUOTA_REMAINING,
                "Provider quota left, when known, by provider",
                Family::default(),
            ),
            registry: r,
        }
    }

    /// Every recorded series in Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(4096);
        // Writing to a String cannot fail, and none of our label values fails to encode.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// Registers `metric` under `name` and returns the handle to keep. prometheus-client appends
/// `_total` to a counter's name itself, so a counter is registered without it and exported
/// under `name` exactly.
fn register<M: Metric + Clone>(
    registry: &mut Registry,
    name: &'static str,
    help: &str,
    metric: M,
) -> M {
    let name = match metric.metric_type() {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    };
    registry.register(name, help, metric.clone());
    metric
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

// === impl Unlabelled ===

/// A series without labels that, like the series of a [`Family`], is exported only from its
/// first update on. Clones record into the same series.
#[derive(Clone, Debug, Default)]
pub struct Unlabelled<M> {
    metric: M,
    /// Set by the first update; the exposition skips the series until then.
    updated: Arc<AtomicBool>,
}

impl<M> Unlabelled<M> {
    fn updated(&self) -> &M {
        // Relaxed: a scrape racing the first update shows the series or not, either is fine.
        self.updated.store(true, Ordering::Relaxed);
        &self.metric
    }
}

impl Unlabelled<Counter> {
    /// Add one.
    pub fn inc(&self) {
        self.updated().inc();
    }

    /// Add `n` (0 still exports the series).
    pub fn inc_by(&self, n: u64) {
        self.updated().inc_by(n);
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.metric.get()
    }
}

impl<N, A: gauge::Atomic<N>> Unlabelled<Gauge<N, A>> {
    /// Set the value.
    pub fn set(&self, value: N) {
        self.updated().set(value);
    }

    /// Current value.
    pub fn get(&self) -> N {
        self.metric.get()
    }
}

impl<M: EncodeMetric> EncodeMetric for Unlabelled<M> {
    fn encode(&self, encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.metric.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.metric.metric_type()
    }

    fn is_empty(&self) -> bool {
        !self.updated.load(Ordering::Relaxed)
    }
}
