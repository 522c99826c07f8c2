//! Metrics for enrichd (SPEC §11): a process-global series registry, the Prometheus text
//! exposition of it, and the small HTTP listener that serves `/metrics`, `/healthz` and
//! `/readyz`.
//!
//! Actors and adapters record through handles taken from [`global()`]; the worker binary starts
//! [`serve`] on `ENRICHD_METRICS_ADDR`. Series names come from
//! [`enrichd_core::metric_names`], so the exporter, the dashboard and the deployment test agree.
//!
//! Handles are cheap: taking one locks the registry once, recording on it is one atomic
//! operation. Keep the handle when a series is recorded often.
//!
//! ```
//! use enrichd_core::metric_names;
//! use enrichd_metrics::Registry;
//!
//! let registry = Registry::new();
//! let lookups = registry.counter(metric_names::LOOKUPS, &[("provider", "feodo"), ("outcome", "ok")]);
//! lookups.inc();
//! assert_eq!(registry.counter_value(metric_names::LOOKUPS, &[("outcome", "ok"), ("provider", "feodo")]), 1);
//! assert!(registry.render().contains(r#"enrichd_lookups_total{outcome="ok",provider="feodo"} 1"#));
//! ```
//!
//! # Layout
//! - `registry`: [`Registry`], the [`Counter`], [`Gauge`] and [`Histogram`] handles.
//! - `render`: Prometheus text format 0.0.4 and the help text of every enrichd series.
//! - `server`: [`serve`] / [`serve_with`], a hand-rolled HTTP/1.1 listener, and [`Probes`].

mod registry;
mod render;
mod server;

pub use registry::{Counter, Gauge, Histogram, LATENCY_BUCKETS, Registry};
pub use server::{MAX_HEAD_BYTES, ProbeFuture, Probes, ServerOptions, serve, serve_with};

use std::sync::LazyLock;

static GLOBAL: LazyLock<Registry> = LazyLock::new(Registry::new);

/// The process-wide registry that [`serve`] exports.
pub fn global() -> &'static Registry {
    &GLOBAL
}
