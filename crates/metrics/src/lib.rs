//! Metrics for enrichd (SPEC §11): every series as a typed handle on a prometheus-client
//! registry, and the listener that serves them on `/metrics` next to `/healthz` and `/readyz`.
//!
//! Actors and adapters record through the fields of [`global()`]; the worker binary starts
//! [`serve`] on `ENRICHD_METRICS_ADDR`. Series names come from
//! [`enrichd_core::metric_names`], so the exporter, the dashboard and the deployment test agree.
//!
//! ```
//! use enrichd_metrics::{LookupLabels, Metrics};
//!
//! let metrics = Metrics::new();
//! let lookup = LookupLabels { outcome: "ok", provider: "feodo" };
//! metrics.lookups.get_or_create(&lookup).inc();
//! assert_eq!(metrics.lookups.get_or_create(&lookup).get(), 1);
//! assert!(metrics.render().contains(r#"enrichd_lookups_total{outcome="ok",provider="feodo"} 1"#));
//! ```
//!
//! # Layout
//! - `series`: [`Metrics`], its label sets and [`Unlabelled`].
//! - `server`: [`serve`] / [`serve_with`], hyper's HTTP/1.1 server with our limits, and
//!   [`Probes`].

mod series;
mod server;

pub use series::{
    LATENCY_BUCKETS, LookupLabels, Metrics, OutcomeLabel, ProviderLabel, ReasonLabel, SecondsGauge,
    Unlabelled,
};
pub use server::{MAX_HEAD_BYTES, ProbeFuture, Probes, ServerOptions, serve, serve_with};

use std::sync::{Arc, LazyLock};

static GLOBAL: LazyLock<Arc<Metrics>> = LazyLock::new(|| Arc::new(Metrics::new()));

/// The process-wide series that [`serve`] exports.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// The process-wide series, shared with a listener task.
fn global_arc() -> Arc<Metrics> {
    Arc::clone(&GLOBAL)
}
