//! The health beat's contents (SPEC §4): who we are, how busy, and each provider's breaker,
//! park and quota as this replica sees them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::Recipient;
use enrichd_core::ProviderId;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::aggregator::AggregatorStats;
use crate::backfill::BackfillStats;
use crate::messages::GetProviderStatus;

/// Everything a beat reads; cheap to clone.
#[derive(Clone)]
pub struct HealthSource {
    /// This replica's id.
    pub instance: String,
    /// Process start.
    pub started: Instant,
    /// Jobs.
    pub aggregator: Arc<AggregatorStats>,
    /// Backlog.
    pub backfill: Arc<BackfillStats>,
    /// Provider actors.
    pub providers: Vec<(ProviderId, Recipient<GetProviderStatus>)>,
}

impl HealthSource {
    /// The beat's payload.
    pub async fn snapshot(&self) -> Value {
        let mut providers = Map::new();
        for (id, recipient) in &self.providers {
            let status = recipient
                .send(GetProviderStatus)
                .timeout(Duration::from_secs(2))
                .await;
            let entry = match status {
                Ok(s) => json!({
                    "breaker": s.breaker.as_str(),
                    "parked_until": s.parked_until.map(|t| t.to_rfc3339()),
                    "key_rejected": s.key_rejected,
                    "quota_remaining": s.quota_remaining,
                    "quota_reset_at": s.quota_reset_at.map(|t| t.to_rfc3339()),
                    "restarts": s.restarts,
                }),
                Err(_) => json!({ "breaker": "unknown", "parked_until": null,
                                  "quota_remaining": null, "quota_reset_at": null }),
            };
            providers.insert(id.as_str().to_owned(), entry);
        }
        json!({
            "worker": "enrich",
            "ts": epoch_seconds(),
            "instance": self.instance,
            "uptime_s": self.started.elapsed().as_secs(),
            "in_flight": self.aggregator.in_flight.load(Ordering::Relaxed),
            "processed_total": self.aggregator.processed_total.load(Ordering::Relaxed),
            "backlog": self.backfill.last_batch.load(Ordering::Relaxed),
            "providers": providers,
        })
    }
}

/// Seconds since the epoch, as the envelope's `ts`.
pub fn epoch_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
