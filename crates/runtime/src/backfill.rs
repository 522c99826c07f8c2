//! The backfill loop (SPEC §8): finds attackers with no intel row or with due work, newest
//! first, and hands their addresses to the `Aggregator` in batches. A full batch starts the
//! next one as soon as half a batch of jobs has finished; a short one waits for the poll
//! interval or a wake-up. Wake-ups are a
//! [`Notify`], which stores a permit when nobody waits, so none is ever lost.
//!
//! It is the engine of poll mode (no broker) and the safety net of bus mode: whatever a bus
//! delivery recorded as due, or a dead replica left leased, ends here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::Addr;
use backon::BackoffBuilder;
use enrichd_core::job::{JobId, Origin};
use enrichd_store::{ApplyContext, Store};
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use crate::aggregator::Aggregator;
use crate::messages::{Drain, EnrichIp, Room};
use crate::supervision::backoff;

/// Least time between a short batch and the next one started by a wake-up.
const MIN_WAKE_SPACING: Duration = Duration::from_secs(1);

/// How the loop paces itself.
#[derive(Debug, Clone)]
pub struct BackfillConfig {
    /// Addresses per batch (and requests in flight from the backfill).
    pub batch: u32,
    /// Wait after a short batch (`ENRICHD_POLL_INTERVAL_SECS`).
    pub poll_interval: Duration,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        Self {
            batch: 500,
            poll_interval: Duration::from_secs(60),
        }
    }
}

/// Counters shared with the health beat, metrics and the progress bar.
#[derive(Debug, Default)]
pub struct BackfillStats {
    /// Addresses in the last batch (the backlog as far as one batch sees it).
    pub last_batch: AtomicU64,
    /// Addresses handed to the aggregator since start.
    pub dispatched_total: AtomicU64,
}

/// What the loop needs.
#[derive(Debug, Clone)]
pub struct Backfill {
    /// The store.
    pub store: Store,
    /// Where jobs run.
    pub aggregator: Addr<Aggregator>,
    /// Configured providers and switches (decides what is due).
    pub ctx: ApplyContext,
    /// Pacing.
    pub config: BackfillConfig,
    /// Wakes the loop before its poll interval ends.
    pub wake: Arc<Notify>,
    /// Shared counters.
    pub stats: Arc<BackfillStats>,
}

impl Backfill {
    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let retry_policy = || backoff(Duration::from_millis(100), Duration::from_secs(5)).build();
        let mut retries = retry_policy();
        let mut failures = 0u32;
        while !*stop.borrow() {
            let full = match self.one_batch().await {
                Ok(n) => {
                    failures = 0;
                    retries = retry_policy();
                    n >= self.config.batch as usize
                }
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, attempt = failures, "Backlog query failed; retrying.");
                    let wait = retries.next().unwrap_or(Duration::from_secs(5));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            };
            if full {
                // Query again once half a batch of jobs has finished: sooner would only find
                // the same queued addresses again (see `Room`).
                let below = (self.config.batch as usize / 2).max(1);
                tokio::select! {
                    _ = self.aggregator.send(Room { below }) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let slept_from = tokio::time::Instant::now();
            tokio::select! {
                () = tokio::time::sleep(self.config.poll_interval) => {}
                () = self.wake.notified() => {
                    // Wake-ups can come in bursts (every deferred item has its own); one
                    // backlog query a second serves them all, and the query is not free on
                    // a large attackers table.
                    let rest = MIN_WAKE_SPACING.saturating_sub(slept_from.elapsed());
                    tokio::select! {
                        () = tokio::time::sleep(rest) => {}
                        _ = stop.changed() => {}
                    }
                }
                _ = stop.changed() => {}
            }
        }
        debug!("Backfill stopped.");
    }

    /// Does everything due now, then returns how many addresses it handed out; for
    /// `enrichd backfill`. `progress` hears the running count after each batch.
    ///
    /// # Errors
    /// The store's error text when the backlog cannot be read.
    pub async fn run_until_empty(&self, progress: impl Fn(u64)) -> Result<u64, String> {
        let mut total = 0;
        loop {
            let mut handed = self.one_batch().await?;
            if handed == 0 {
                // Jobs still running hold leases that hide their addresses from the backlog;
                // once they finish, look once more before calling it done.
                let _ = self.aggregator.send(Drain).await;
                handed = self.one_batch().await?;
                if handed == 0 {
                    return Ok(total);
                }
            }
            total += handed as u64;
            progress(total);
        }
    }

    /// A pass for every address with an attacker row, due or not (`enrichd backfill --all`):
    /// each recomputes its rows from stored state under the current configuration (a
    /// provider turned off stops counting), and asks only what is due. Returns how many
    /// addresses it handed out; `progress` hears the running count.
    ///
    /// # Errors
    /// The store's error text when the addresses cannot be read.
    pub async fn run_all(&self, progress: impl Fn(u64)) -> Result<u64, String> {
        let mut total = 0;
        let mut after = None;
        loop {
            let ips = self
                .store
                .mapped_addresses(after, self.config.batch)
                .await
                .map_err(|e| enrichd_core::error::chain(&e))?;
            let Some(last) = ips.last().copied() else {
                break;
            };
            after = Some(last);
            total += self.dispatch(ips).await as u64;
            progress(total);
        }
        let _ = self.aggregator.send(Drain).await;
        Ok(total)
    }

    /// One batch: reads the backlog and waits until every address is durable in the aggregator.
    async fn one_batch(&self) -> Result<usize, String> {
        let ips = self
            .store
            .backlog(self.config.batch, &self.ctx)
            .await
            .map_err(|e| enrichd_core::error::chain(&e))?;
        self.stats
            .last_batch
            .store(ips.len() as u64, Ordering::Relaxed);
        Ok(self.dispatch(ips).await)
    }

    /// Hands `ips` to the aggregator and waits until each is durable there.
    async fn dispatch(&self, ips: Vec<enrichd_core::CanonicalIp>) -> usize {
        let n = ips.len();
        futures::stream::iter(ips)
            .for_each_concurrent(None, |ip| {
                let aggregator = self.aggregator.clone();
                async move {
                    let request = EnrichIp {
                        job_id: JobId::new(),
                        ip,
                        attacker_uuid: None,
                        first_seen: None,
                        origin: Origin::Backfill,
                    };
                    if let Ok(Err(e)) = aggregator.send(request).await {
                        debug!(%ip, error = %e, "Backfill job not durable; it stays due.");
                    }
                }
            })
            .await;
        self.stats
            .dispatched_total
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }
}
