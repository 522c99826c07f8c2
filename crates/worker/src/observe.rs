//! `/metrics`, `/healthz`, `/readyz` for `enrichd run`, and the gauges nobody updates inline
//! (backlog, in-flight, outbox, quota, breaker), refreshed every few seconds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::{Addr, Recipient};
use enrichd_core::ProviderId;
use enrichd_core::metric_names;
use enrichd_metrics::{ProbeFuture, Probes};
use enrichd_runtime::aggregator::{Aggregator, AggregatorStats};
use enrichd_runtime::backfill::BackfillStats;
use enrichd_runtime::messages::{GetProviderStatus, Ping};
use enrichd_store::{SchemaStatus, Store};

/// Liveness: the actor system answers. Readiness: the database answers and its schema is the
/// one this binary writes.
pub struct WorkerProbes {
    /// Pinged for liveness.
    pub aggregator: Addr<Aggregator>,
    /// Checked for readiness.
    pub store: Store,
}

impl Probes for WorkerProbes {
    fn healthy(&self) -> ProbeFuture<'_, bool> {
        Box::pin(async move { self.aggregator.send(Ping).await.is_ok() })
    }

    fn ready(&self) -> ProbeFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match self.store.schema_status().await {
                Ok(SchemaStatus::Current) => Ok(()),
                Ok(other) => Err(format!("schema not current: {other:?}")),
                Err(e) => Err(enrichd_core::error::chain(&e)),
            }
        })
    }
}

/// What the gauge refresher reads.
pub struct GaugeSources {
    /// Outbox depth and age.
    pub store: Store,
    /// Jobs.
    pub aggregator: Arc<AggregatorStats>,
    /// Backlog.
    pub backfill: Arc<BackfillStats>,
    /// Breaker and quota.
    pub providers: Vec<(ProviderId, Recipient<GetProviderStatus>)>,
}

/// Refreshes the gauges every 5 s, for ever (the task dies with the process).
pub async fn refresh_gauges(sources: GaugeSources) {
    let registry = enrichd_metrics::global();
    loop {
        registry
            .gauge(metric_names::IN_FLIGHT, &[])
            .set_u64(sources.aggregator.in_flight.load(Ordering::Relaxed) as u64);
        registry
            .gauge(metric_names::BACKLOG, &[])
            .set_u64(sources.backfill.last_batch.load(Ordering::Relaxed));
        if let Ok(stats) = sources.store.outbox_stats().await {
            registry
                .gauge(metric_names::OUTBOX_DEPTH, &[])
                .set_u64(stats.depth);
            registry
                .gauge(metric_names::OUTBOX_OLDEST_AGE, &[])
                .set(stats.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
        }
        for (id, recipient) in &sources.providers {
            let Ok(status) = recipient
                .send(GetProviderStatus)
                .timeout(Duration::from_secs(2))
                .await
            else {
                continue;
            };
            let labels = [("provider", id.as_str())];
            let breaker = match status.breaker.as_str() {
                "closed" => 0.0,
                "half_open" => 1.0,
                _ => 2.0,
            };
            registry
                .gauge(metric_names::BREAKER_STATE, &labels)
                .set(breaker);
            if let Some(remaining) = status.quota_remaining {
                registry
                    .gauge(metric_names::QUOTA_REMAINING, &labels)
                    .set_u64(u64::from(remaining));
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
