//! `enrichd backfill`: do everything that is due now, with a progress bar, then exit.

use std::sync::Arc;
use std::time::Duration;

use enrichd_runtime::backfill::{Backfill, BackfillConfig, BackfillStats};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Settings;
use crate::{exit, wiring};

/// The progress bar's length comes from one look at the backlog (capped: it is an estimate
/// for the ETA, and the backlog keeps changing underneath anyway).
const ESTIMATE_CAP: u32 = 1_000_000;

pub(super) async fn backfill(settings: &Settings) -> u8 {
    let store = match super::open_current_store(settings).await {
        Ok(store) => store,
        Err(code) => return code,
    };
    let core = wiring::start_core(settings, &store, None, wiring::OutboxRelay::Elsewhere);
    let estimate = store
        .backlog(ESTIMATE_CAP, &core.deps.ctx)
        .await
        .map_or(0, |ips| ips.len() as u64);
    let bar = ProgressBar::new(estimate);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {pos}/{len} addresses  {per_sec}  ETA {eta}  elapsed {elapsed}",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    let backfill = Backfill {
        store: store.clone(),
        aggregator: core.aggregator.clone(),
        ctx: core.deps.ctx.clone(),
        config: BackfillConfig {
            poll_interval: settings.poll_interval,
            ..BackfillConfig::default()
        },
        wake: Arc::clone(&core.backfill_wake),
        stats: Arc::new(BackfillStats::default()),
    };
    let result = backfill
        .run_until_empty(|done| {
            if done > bar.length().unwrap_or(0) {
                bar.set_length(done);
            }
            bar.set_position(done);
        })
        .await;
    bar.finish();
    match result {
        Ok(total) => {
            tracing::info!(addresses = total, "Backfill complete.");
            exit::OK
        }
        Err(e) => {
            tracing::error!(error = %e, "Backfill stopped: the backlog cannot be read.");
            exit::FAILURE
        }
    }
}
