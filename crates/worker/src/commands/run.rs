//! `enrichd run`: the worker.

use std::sync::Arc;

use actix::{Actor, Addr, AsyncContext, Context};
use enrichd_runtime::backfill::{Backfill, BackfillConfig, BackfillStats};
use enrichd_runtime::bus_listener::{BusConfig, BusDeps, BusListener, BusStats};
use enrichd_runtime::coordinator::Coordinator;
use enrichd_runtime::health::HealthSource;
use enrichd_runtime::messages::{AttachBus, Shutdown};
use enrichd_store::Store;
use tokio::sync::{Notify, oneshot, watch};

use crate::config::Settings;
use crate::wiring::Core;
use crate::{exit, lock, observe, wiring};

pub(super) async fn run(settings: &Settings) -> u8 {
    // Taken before anything else touches the file, so a second run fails fast and clearly.
    let _run_lock = match lock::sqlite_path(&settings.database_url).map(|p| lock::acquire(&p)) {
        Some(Err(e)) => {
            tracing::error!(error = %e, "Refusing to start.");
            eprintln!("error: {e}");
            return exit::FAILURE;
        }
        Some(Ok(held)) => Some(held),
        None => None,
    };
    let store = match super::open_current_store(settings).await {
        Ok(store) => store,
        Err(code) => return code,
    };
    let instance = instance_id();

    let (exit_tx, exit_rx) = oneshot::channel();
    let (backfill_stop, backfill_stop_rx) = watch::channel(false);
    // The Coordinator needs the aggregator and the actors need the Coordinator (for a spent
    // restart budget): create it first and attach the rest. The core lives as long as `run`:
    // its arbiters are the provider threads.
    let mut core_slot = None;
    let coordinator = Coordinator::create(|ctx| {
        let give_up = ctx.address().recipient();
        let core = wiring::start_core(
            settings,
            &store,
            Some(&give_up),
            wiring::OutboxRelay::InProcess,
            None,
        );
        let backfill_wake = Arc::clone(&core.backfill_wake);
        let backfill_stats = Arc::new(BackfillStats::default());
        let backfill = Backfill {
            store: store.clone(),
            aggregator: core.aggregator.clone(),
            ctx: core.deps.ctx.clone(),
            config: BackfillConfig {
                poll_interval: settings.poll_interval,
                ..BackfillConfig::default()
            },
            wake: Arc::clone(&backfill_wake),
            stats: Arc::clone(&backfill_stats),
        };
        actix::spawn(backfill.run(backfill_stop_rx));
        actix::spawn(observe::refresh_gauges(observe::GaugeSources {
            store: store.clone(),
            aggregator: Arc::clone(&core.stats),
            backfill: Arc::clone(&backfill_stats),
            providers: core.provider_status.clone(),
        }));
        if settings.bus.is_some() {
            start_bus(
                settings,
                &store,
                &core,
                &instance,
                backfill_wake,
                backfill_stats,
                ctx,
            );
        } else {
            tracing::info!(
                "No ENRICHD_AMQP_URL: running on the database backlog alone (poll mode)."
            );
        }
        let coordinator = Coordinator::new(
            None,
            core.aggregator.clone(),
            backfill_stop,
            store.clone(),
            settings.grace,
            exit_tx,
        );
        core_slot = Some(core);
        coordinator
    });
    tracing::info!(instance = %instance, "Worker started.");
    let _metrics_server = match &core_slot {
        Some(core) => serve_metrics(settings, core.aggregator.clone(), store.clone()).await,
        None => None,
    };

    tokio::pin!(exit_rx);
    tokio::select! {
        () = crate::signal::shutdown() => coordinator.do_send(Shutdown { exit_code: exit::OK }),
        code = &mut exit_rx => return code.unwrap_or(exit::FAILURE),
    }
    let code = exit_rx.await.unwrap_or(exit::FAILURE);
    drop(core_slot);
    tracing::info!(exit_code = code, "Stopped.");
    code
}

/// Starts the bus listener and attaches it to the Coordinator being created.
fn start_bus(
    settings: &Settings,
    store: &Store,
    core: &Core,
    instance: &str,
    backfill_wake: Arc<Notify>,
    backfill_stats: Arc<BackfillStats>,
    ctx: &mut Context<Coordinator>,
) {
    let Some(bus) = &settings.bus else { return };
    let health = HealthSource {
        instance: instance.to_owned(),
        started: tokio::time::Instant::now(),
        aggregator: Arc::clone(&core.stats),
        backfill: backfill_stats,
        providers: core.provider_status.clone(),
    };
    let listener = BusListener::new(
        BusConfig {
            url: bus.amqp_url.clone(),
            topology: bus.topology(),
            prefetch: bus.prefetch,
            instance: instance.to_owned(),
        },
        BusDeps {
            aggregator: core.aggregator.clone(),
            store: store.clone(),
            outbox: Arc::clone(&core.outbox),
            backfill_wake,
            health,
            coordinator: ctx.address().recipient(),
            stats: Arc::new(BusStats::default()),
        },
    )
    .start();
    ctx.notify(AttachBus(listener));
}

/// Serves `/metrics`, `/healthz`, `/readyz`; a failure to bind is logged, never fatal.
async fn serve_metrics(
    settings: &Settings,
    aggregator: Addr<enrichd_runtime::aggregator::Aggregator>,
    store: Store,
) -> Option<tokio::task::JoinHandle<()>> {
    let probes = Arc::new(observe::WorkerProbes { aggregator, store });
    match enrichd_metrics::serve(settings.metrics_addr, probes).await {
        Ok((addr, task)) => {
            tracing::info!(addr = %addr, "Serving /metrics, /healthz and /readyz.");
            Some(task)
        }
        Err(e) => {
            // Observability must not take the worker down; the probes' absence says enough.
            tracing::error!(addr = %settings.metrics_addr, error = %e, "Cannot serve metrics.");
            None
        }
    }
}

/// `<host>-<pid>-<random>`: unique per process, readable in the management UI and health beats.
fn instance_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "enrichd".into());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..6])
}
