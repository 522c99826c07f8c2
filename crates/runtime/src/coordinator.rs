//! `Coordinator`: the root. It owns the shutdown order and the exit code.
//!
//! Shutdown (SIGTERM, SIGINT, a cluster-wide `stop`, or a child that spent its restart
//! budget): stop intake, stop the backfill, drain jobs in flight, let the relay publish what
//! is in the outbox, release our leases so other replicas can take the work at once, close the
//! bus. All within `ENRICHD_GRACE_SECS`; whatever is not done by then stays unacked or leased
//! and is redelivered or picked up elsewhere, so nothing is lost either way.

use std::time::Duration;

use actix::prelude::*;
use enrichd_store::Store;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::aggregator::Aggregator;
use crate::bus_listener::BusListener;
use crate::messages::{AttachBus, ChildGaveUp, CloseConnection, Drain, Shutdown, StopIntake};

/// The root actor.
pub struct Coordinator {
    bus: Option<Addr<BusListener>>,
    aggregator: Addr<Aggregator>,
    backfill_stop: watch::Sender<bool>,
    store: Store,
    grace: Duration,
    exit: Option<oneshot::Sender<u8>>,
}

impl Coordinator {
    /// A coordinator; `exit` receives the process exit code when shutdown is complete.
    pub fn new(
        bus: Option<Addr<BusListener>>,
        aggregator: Addr<Aggregator>,
        backfill_stop: watch::Sender<bool>,
        store: Store,
        grace: Duration,
        exit: oneshot::Sender<u8>,
    ) -> Self {
        Self {
            bus,
            aggregator,
            backfill_stop,
            store,
            grace,
            exit: Some(exit),
        }
    }

    /// Attaches the bus listener once it exists (it needs our address first).
    pub fn set_bus(&mut self, bus: Addr<BusListener>) {
        self.bus = Some(bus);
    }
}

impl Actor for Coordinator {
    type Context = Context<Self>;
}

impl Handler<AttachBus> for Coordinator {
    type Result = ();

    fn handle(&mut self, msg: AttachBus, _ctx: &mut Context<Self>) {
        self.set_bus(msg.0);
    }
}

impl Handler<ChildGaveUp> for Coordinator {
    type Result = ();

    fn handle(&mut self, msg: ChildGaveUp, ctx: &mut Context<Self>) {
        error!(
            actor = msg.actor,
            "A supervised actor spent its restart budget; exiting so other replicas take over."
        );
        ctx.notify(Shutdown { exit_code: 1 });
    }
}

impl Handler<Shutdown> for Coordinator {
    type Result = ();

    fn handle(&mut self, msg: Shutdown, ctx: &mut Context<Self>) {
        let Some(exit) = self.exit.take() else {
            return; // already shutting down
        };
        info!(
            exit_code = msg.exit_code,
            grace_secs = self.grace.as_secs(),
            "Shutting down."
        );
        let bus = self.bus.clone();
        let aggregator = self.aggregator.clone();
        let backfill_stop = self.backfill_stop.clone();
        let store = self.store.clone();
        let grace = self.grace;
        let drain = async move {
            if let Some(bus) = &bus {
                step("stop intake", bus.send(StopIntake)).await;
            }
            let _ = backfill_stop.send(true);
            step("drain jobs", aggregator.send(Drain)).await;
            match store.release_leases().await {
                Ok(n) => info!(released = n, "Leases released."),
                Err(e) => {
                    warn!(error = %enrichd_core::error::chain(&e), "Leases not released; they lapse on their own.");
                }
            }
            // The coordinator's store handle shares the provider actors' blocks.
            match store.release_slots().await {
                Ok(n) => debug!(released = n, "Rate slots given back."),
                Err(e) => {
                    warn!(error = %enrichd_core::error::chain(&e), "Rate slots not given back; their quota units stay spent today.");
                }
            }
            if let Some(bus) = &bus {
                // The relay publishes one last round before the connections close.
                step("close bus", bus.send(CloseConnection)).await;
            }
        };
        ctx.spawn(
            async move {
                if tokio::time::timeout(grace, drain).await.is_err() {
                    warn!(
                        grace_secs = grace.as_secs(),
                        "Drain exceeded the grace period; unacked deliveries will be redelivered."
                    );
                }
                let _ = exit.send(msg.exit_code);
            }
            .into_actor(self),
        );
    }
}

async fn step<T>(name: &str, fut: impl Future<Output = Result<T, MailboxError>>) {
    if let Err(e) = fut.await {
        warn!(step = name, error = %e, "Shutdown step failed; continuing.");
    }
}
