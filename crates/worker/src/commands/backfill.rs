//! `enrichd backfill [--all] [--max-wait SECS]`: do everything that is due now, with a
//! progress bar, then exit, saying why: nothing is due, or what is still owed waits longer
//! than `--max-wait`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use enrichd_runtime::backfill::{Backfill, BackfillConfig, BackfillStats};
use enrichd_store::{Store, WaitingWork};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Settings;
use crate::{exit, wiring};

/// The progress bar's length comes from one look at the backlog (capped: it is an estimate
/// for the ETA, and the backlog keeps changing underneath anyway).
const ESTIMATE_CAP: u32 = 1_000_000;

/// Past the earliest owed item's time: a deferred lease ends a little after its slot.
const WAKE_MARGIN: Duration = Duration::from_millis(200);

pub(super) async fn backfill(settings: &Settings, all: bool, max_wait: Duration) -> u8 {
    let store = match super::open_current_store(settings).await {
        Ok(store) => store,
        Err(code) => return code,
    };
    let core = wiring::start_core(settings, &store, None, wiring::OutboxRelay::Elsewhere, None);
    let estimate = if all {
        0
    } else {
        store
            .backlog(ESTIMATE_CAP, &core.deps.ctx)
            .await
            .map_or(0, |ips| ips.len() as u64)
    };
    let bar = ProgressBar::new(estimate);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {pos}/{len} addresses  {per_sec}  ETA {eta}  elapsed {elapsed}  {msg}",
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
    let mut done = 0;
    let progress = |total: u64| {
        if total > bar.length().unwrap_or(0) {
            bar.set_length(total);
        }
        bar.set_position(total);
    };
    if all {
        match backfill.run_all(&progress).await {
            Ok(total) => done = total,
            Err(e) => return stopped(&bar, &e),
        }
    }
    let ending = loop {
        match backfill.run_until_empty(|n| progress(done + n)).await {
            Ok(total) => done += total,
            Err(e) => return stopped(&bar, &e),
        }
        let waiting = match store.waiting_work(&core.deps.ctx).await {
            Ok(waiting) => waiting,
            Err(e) => return stopped(&bar, &enrichd_core::error::chain(&e)),
        };
        let Some(next) = waiting.first() else {
            break Ending::NothingDue;
        };
        if next.wait > max_wait {
            break Ending::WaitsPastPatience(waiting);
        }
        let message = format!(
            "{}: {}, {} s ({} addresses)",
            next.what,
            next.reason.describe(),
            next.wait.as_secs().max(1),
            next.addresses
        );
        bar.set_message(message.clone());
        if bar.is_hidden() {
            eprintln!("{message}");
        } else {
            bar.println(&message);
        }
        tokio::time::sleep(next.wait + WAKE_MARGIN).await;
        bar.set_message("");
    };
    bar.finish_and_clear();
    report(&store, done, &ending, max_wait).await;
    exit::OK
}

/// Why the backfill ended.
enum Ending {
    NothingDue,
    WaitsPastPatience(Vec<WaitingWork>),
}

async fn report(store: &Store, done: u64, ending: &Ending, max_wait: Duration) {
    let now = store.db_now().await.unwrap_or_else(|_| chrono::Utc::now());
    let text = match ending {
        Ending::NothingDue => format!("backfill: {done} addresses passed; nothing is due.\n"),
        Ending::WaitsPastPatience(waiting) => {
            let mut text = format!(
                "backfill: {done} addresses passed; what is still owed waits past --max-wait \
                 ({} s):\n",
                max_wait.as_secs()
            );
            for work in waiting {
                let _ = writeln!(
                    text,
                    "  {}: {} addresses, {} until {}",
                    work.what,
                    work.addresses,
                    work.reason.describe(),
                    super::short_time(work.earliest, now)
                );
            }
            text
        }
    };
    tracing::info!(addresses = done, "Backfill complete.");
    super::print_out(&text);
}

fn stopped(bar: &ProgressBar, error: &str) -> u8 {
    bar.abandon();
    tracing::error!(error = %error, "Backfill stopped: the store cannot be read.");
    exit::FAILURE
}
