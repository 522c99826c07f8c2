//! `/metrics`, `/healthz`, `/readyz` for `enrichd run`, and the gauges nobody updates inline
//! (backlog, in-flight, outbox, quota, breaker), refreshed every few seconds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::{Addr, Recipient};
use enrichd_core::ProviderId;
use enrichd_metrics::{ProbeFuture, Probes, ProviderLabel};
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
    let metrics = enrichd_metrics::global();
    loop {
        metrics.in_flight.set(saturating_i64(
            sources.aggregator.in_flight.load(Ordering::Relaxed),
        ));
        metrics.backlog.set(saturating_i64(
            sources.backfill.last_batch.load(Ordering::Relaxed),
        ));
        if let Ok(stats) = sources.store.outbox_stats().await {
            metrics.outbox_depth.set(saturating_i64(stats.depth));
            metrics
                .outbox_oldest_age
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
            let labels = ProviderLabel {
                provider: id.as_str(),
            };
            let breaker = match status.breaker.as_str() {
                "closed" => 0,
                "half_open" => 1,
                _ => 2,
            };
            metrics.breaker_state.get_or_create(&labels).set(breaker);
            if let Some(remaining) = status.quota_remaining {
                metrics
                    .quota_remaining
                    .get_or_create(&labels)
                    .set(i64::from(remaining));
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Counts beyond `i64::MAX` do not happen; if one did, the gauge would show the maximum.
fn saturating_i64(count: impl TryInto<i64>) -> i64 {
    count.try_into().unwrap_or(i64::MAX)
}
