//! The series store. Families are keyed by name and series by their sorted labels; values live
//! in atomics behind `Arc`s shared with the handles, so recording never takes the registry lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing::warn;

/// Upper bounds (seconds) of the latency histogram buckets, 1 ms to 30 s; `+Inf` is implied.
///
/// Provider calls time out in seconds, DNS answers in milliseconds: one fixed ladder covers both
/// so every latency panel reads the same.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Sorted by label name, names unique: the identity of a series within its family.
pub(crate) type Labels = Vec<(&'static str, String)>;

/// One metric family; the variant is its Prometheus type.
pub(crate) enum Family {
    Counter(BTreeMap<Labels, Arc<AtomicU64>>),
    /// Values are `f64` bits.
    Gauge(BTreeMap<Labels, Arc<AtomicU64>>),
    Histogram(BTreeMap<Labels, Arc<HistogramCore>>),
}

impl Family {
    fn kind(&self) -> &'static str {
        match self {
            Self::Counter(_) => "counter",
            Self::Gauge(_) => "gauge",
            Self::Histogram(_) => "histogram",
        }
    }
}

pub(crate) type Families = BTreeMap<&'static str, Family>;

/// A set of metric series.
///
/// Cloning is cheap and shares the series: the HTTP listener holds a clone of the registry it
/// exports. Production code records into [`crate::global()`]; tests make their own with
/// [`Registry::new`] so they do not see each other's series.
///
/// A name registered with one type and asked for with another, an invalid metric or label name,
/// or the reserved label `le` on a histogram is a programming error: it is logged and the caller
/// gets a working handle that is not exported, never a panic.
#[derive(Clone, Default)]
pub struct Registry {
    families: Arc<Mutex<Families>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("families", &self.lock().len())
            .finish()
    }
}

impl Registry {
    /// An empty registry, independent of the global one.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter `name` with `labels`, created at 0 on first use. Label order does not matter;
    /// a repeated label name keeps its first value.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        let Some(key) = checked_key(name, labels, false) else {
            return Counter(Arc::default());
        };
        let mut families = self.lock();
        match families
            .entry(name)
            .or_insert_with(|| Family::Counter(BTreeMap::new()))
        {
            Family::Counter(series) => Counter(Arc::clone(series.entry(key).or_default())),
            other => {
                type_clash(name, "counter", other);
                Counter(Arc::default())
            }
        }
    }

    /// The gauge `name` with `labels`, created at 0 on first use.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        let Some(key) = checked_key(name, labels, false) else {
            return Gauge(Arc::default());
        };
        let mut families = self.lock();
        match families
            .entry(name)
            .or_insert_with(|| Family::Gauge(BTreeMap::new()))
        {
            // 0u64 is the bit pattern of 0.0f64, so `or_default` starts the gauge at zero.
            Family::Gauge(series) => Gauge(Arc::clone(series.entry(key).or_default())),
            other => {
                type_clash(name, "gauge", other);
                Gauge(Arc::default())
            }
        }
    }

    /// The histogram `name` with `labels` and the [`LATENCY_BUCKETS`], empty on first use.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        let Some(key) = checked_key(name, labels, true) else {
            return Histogram(Arc::default());
        };
        let mut families = self.lock();
        match families
            .entry(name)
            .or_insert_with(|| Family::Histogram(BTreeMap::new()))
        {
            Family::Histogram(series) => Histogram(Arc::clone(series.entry(key).or_default())),
            other => {
                type_clash(name, "histogram", other);
                Histogram(Arc::default())
            }
        }
    }

    /// Current value of a counter; 0 when the series does not exist.
    pub fn counter_value(&self, name: &str, labels: &[(&'static str, &str)]) -> u64 {
        match self.lock().get(name) {
            Some(Family::Counter(series)) => series
                .get(&key(labels))
                .map_or(0, |v| v.load(Ordering::Relaxed)),
            _ => 0,
        }
    }

    /// Current value of a gauge; `None` when the series does not exist.
    pub fn gauge_value(&self, name: &str, labels: &[(&'static str, &str)]) -> Option<f64> {
        match self.lock().get(name) {
            Some(Family::Gauge(series)) => series
                .get(&key(labels))
                .map(|v| f64::from_bits(v.load(Ordering::Relaxed))),
            _ => None,
        }
    }

    /// Number of observations in a histogram; 0 when the series does not exist.
    pub fn histogram_count(&self, name: &str, labels: &[(&'static str, &str)]) -> u64 {
        match self.lock().get(name) {
            Some(Family::Histogram(series)) => {
                series.get(&key(labels)).map_or(0, |h| h.snapshot().count)
            }
            _ => 0,
        }
    }

    /// The whole registry in Prometheus text exposition format 0.0.4, families sorted by name
    /// and series by labels.
    pub fn render(&self) -> String {
        crate::render::render(&self.lock())
    }

    /// A poisoned lock only means another thread panicked between two map operations; the maps
    /// stay consistent, and metrics must keep working.
    fn lock(&self) -> MutexGuard<'_, Families> {
        self.families.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn type_clash(name: &str, wanted: &str, existing: &Family) {
    warn!(
        metric = name,
        wanted,
        registered = existing.kind(),
        "Metric asked for with a type other than its registered one; the handle is not exported."
    );
}

/// Sorted by label name, first value wins on a repeated name.
fn key(labels: &[(&'static str, &str)]) -> Labels {
    let mut key: Labels = Vec::with_capacity(labels.len());
    for (name, value) in labels {
        if !key.iter().any(|(n, _)| n == name) {
            key.push((name, (*value).to_owned()));
        }
    }
    key.sort_unstable_by(|a, b| a.0.cmp(b.0));
    key
}

fn checked_key(
    name: &'static str,
    labels: &[(&'static str, &str)],
    histogram: bool,
) -> Option<Labels> {
    if !valid_metric_name(name) {
        warn!(
            metric = name,
            "Invalid metric name; the handle is not exported."
        );
        return None;
    }
    if let Some((label, _)) = labels
        .iter()
        .find(|(label, _)| !valid_label_name(label) || (histogram && *label == "le"))
    {
        warn!(
            metric = name,
            label, "Invalid or reserved label name; the handle is not exported."
        );
        return None;
    }
    Some(key(labels))
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, and not `__`-prefixed (reserved for Prometheus itself).
fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

// === impl Counter ===

/// A monotonically increasing count. Clones record into the same series.
#[derive(Clone, Debug)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Add one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Add `n`.
    pub fn add(&self, n: u64) {
        // Relaxed: each series is an independent tally; nothing is ordered against it.
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

// === impl Gauge ===

/// A value that goes up and down. Clones record into the same series.
#[derive(Clone, Debug)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    /// Set the value.
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }

    /// Set the value from an integer (depths, counts of rows).
    #[expect(
        clippy::cast_precision_loss,
        reason = "Prometheus values are f64; counts above 2^53 lose precision there anyway"
    )]
    pub fn set_u64(&self, value: u64) {
        self.set(value as f64);
    }

    /// Add `delta` (negative to subtract), atomically with respect to other `add`s.
    pub fn add(&self, delta: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + delta).to_bits())
            });
    }

    /// Add one.
    pub fn inc(&self) {
        self.add(1.0);
    }

    /// Subtract one.
    pub fn dec(&self) {
        self.add(-1.0);
    }

    /// Current value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

// === impl Histogram ===

/// A latency distribution over [`LATENCY_BUCKETS`]. Clones record into the same series.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<HistogramCore>);

impl Histogram {
    /// Record one observation in seconds. NaN and infinities are dropped (they would poison
    /// `_sum` for the life of the process); negative values count as 0.
    pub fn observe_secs(&self, secs: f64) {
        self.0.observe(secs);
    }

    /// Record one elapsed time.
    pub fn observe(&self, elapsed: Duration) {
        self.0.observe(elapsed.as_secs_f64());
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.0.snapshot().count
    }

    /// Sum of the observations, seconds.
    pub fn sum(&self) -> f64 {
        self.0.snapshot().sum
    }
}

/// Per-bucket (not cumulative) counts, the last one for values above every bound, and the sum.
/// The count is derived from the buckets so `+Inf` and `_count` always agree in one rendering.
#[derive(Debug, Default)]
pub(crate) struct HistogramCore {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_bits: AtomicU64,
}

pub(crate) struct HistogramSnapshot {
    /// `(upper bound, cumulative count)` for each finite bound.
    pub(crate) cumulative: Vec<(f64, u64)>,
    pub(crate) count: u64,
    pub(crate) sum: f64,
}

impl HistogramCore {
    fn observe(&self, secs: f64) {
        if !secs.is_finite() {
            return;
        }
        let secs = secs.max(0.0);
        let index = LATENCY_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + secs).to_bits())
            });
    }

    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0u64;
        let mut cumulative = Vec::with_capacity(LATENCY_BUCKETS.len());
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            running = running.saturating_add(bucket.load(Ordering::Relaxed));
            cumulative.push((*bound, running));
        }
        let overflow = self.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            cumulative,
            count: running.saturating_add(overflow),
            sum: f64::from_bits(self.sum_bits.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_and_label_names_follow_the_prometheus_grammar() {
        assert!(valid_metric_name("enrichd_lookups_total"));
        assert!(valid_metric_name("a:b_c9"));
        assert!(!valid_metric_name(""));
        assert!(!valid_metric_name("9lives"));
        assert!(!valid_metric_name("bad-name"));
        assert!(valid_label_name("provider"));
        assert!(valid_label_name("_x1"));
        assert!(!valid_label_name("__name__"));
        assert!(!valid_label_name("1x"));
        assert!(!valid_label_name("a.b"));
        assert!(!valid_label_name(""));
    }

    #[test]
    fn label_key_is_sorted_and_keeps_the_first_of_a_repeated_name() {
        assert_eq!(
            key(&[("z", "1"), ("a", "2"), ("z", "3")]),
            vec![("a", "2".to_owned()), ("z", "1".to_owned())]
        );
    }

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_holds_them() {
        let h = HistogramCore::default();
        h.observe(0.001); // on the bound: le is inclusive
        h.observe(0.0011);
        h.observe(31.0);
        h.observe(f64::NAN);
        h.observe(-1.0);
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.cumulative[0], (0.001, 2));
        assert_eq!(s.cumulative[1], (0.0025, 3));
        assert_eq!(s.cumulative[LATENCY_BUCKETS.len() - 1], (30.0, 3));
        assert!((s.sum - 31.0021).abs() < 1e-9);
    }
}
