//! Turns [`Settings`] into running actors: one supervised actor per usable provider (each on
//! its own arbiter, so a slow or faulting provider never shares a thread with another), the
//! PTR pool (on its own arbiter too), and the aggregator with the dependencies its jobs need.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Arbiter, Recipient, Supervisor};
use enrichd_core::ProviderId;
use enrichd_core::ports::ProviderLimits;
use enrichd_dns::{DnsConfig, HickoryPtrResolver};
use enrichd_intel::{
    AbuseIpdb, BuildError, Feodo, FeodoConfig, GreyNoise, ProviderConfig, ProviderHooks, ThreatFox,
};
use enrichd_runtime::aggregator::{Aggregator, AggregatorStats};
use enrichd_runtime::job::{JobDeps, Patience};
use enrichd_runtime::messages::{ChildGaveUp, GetProviderStatus, QueryProvider, ResolvePtr};
use enrichd_runtime::provider_actor::{ProviderActor, ProviderActorConfig};
use enrichd_runtime::ptr_pool::PtrResolverPool;
use enrichd_runtime::relay::{self, OutboxHandoff};
use enrichd_runtime::supervision::{RestartBudget, RestartPolicy};
use enrichd_store::{ApplyContext, Store};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::config::{ProviderSettings, Settings};

/// Longest a call waits for its cluster-wide rate slot before the work is left due (the
/// store answers `Busy` beyond it).
const SLOT_HORIZON: Duration = Duration::from_secs(2);
/// Lease slack on top of the call's own time (SPEC §5).
const LEASE_SLACK: Duration = Duration::from_secs(20);

/// The started core of the worker.
pub struct Core {
    /// What jobs need (also used by `lookup` and `backfill`).
    pub deps: JobDeps,
    /// The job runner.
    pub aggregator: Addr<Aggregator>,
    /// Job counters.
    pub stats: Arc<AggregatorStats>,
    /// Provider actors' status, for health beats and metrics.
    pub provider_status: Vec<(ProviderId, Recipient<GetProviderStatus>)>,
    /// Rows jobs hand to the relay, and its wake-up.
    pub outbox: Arc<OutboxHandoff>,
    /// Woken when deferred work falls due (and when the bus goes down).
    pub backfill_wake: Arc<Notify>,
    /// Keeps the provider and PTR arbiters (threads) alive as long as the core.
    _arbiters: Vec<Arbiter>,
}

/// A started provider: the actor's two faces and its thread.
type StartedProvider = (
    ProviderId,
    Recipient<QueryProvider>,
    Recipient<GetProviderStatus>,
    Arbiter,
);

/// Where the outbox rows this process writes are published from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxRelay {
    /// By this process's relay (`run` with a bus): writes claim their rows and hand them over.
    InProcess,
    /// By whichever worker's relay claims them (`lookup`, `backfill`).
    Elsewhere,
}

/// Starts the actors. `give_up` hears about a spent restart budget (the Coordinator);
/// `None` outside `run`, where restarts are simply unlimited for the command's short life.
/// With `patience` (`lookup`), passes wait for providers' slots, and their leases last that
/// much longer so no other replica takes the work meanwhile.
pub fn start_core(
    settings: &Settings,
    store: &Store,
    give_up: Option<&Recipient<ChildGaveUp>>,
    relay: OutboxRelay,
    patience: Option<Patience>,
) -> Core {
    enrichd_intel::install_crypto_provider();
    let mut providers = Vec::new();
    let mut provider_status = Vec::new();
    let mut arbiters = Vec::new();
    for provider in &settings.providers {
        match start_provider(settings, provider, store, give_up) {
            Ok(Some((id, query, status, arbiter))) => {
                providers.push((id, query));
                provider_status.push((id, status));
                arbiters.push(arbiter);
            }
            Ok(None) => {}
            Err(e) => {
                error!(provider = %provider.id, error = %e, "Provider cannot start; it is left out.");
            }
        }
    }

    let ptr = settings
        .dns
        .ptr_enabled
        .then(|| start_ptr_pool(settings, give_up))
        .flatten()
        .map(|(pool, arbiter)| {
            arbiters.push(arbiter);
            pool
        });
    let outbox = Arc::new(OutboxHandoff::new());
    let backfill_wake = Arc::new(Notify::new());
    let call_timeout = Duration::from_secs(10);
    let deps = JobDeps {
        store: store.clone(),
        policy: settings.address_policy(),
        ctx: ApplyContext {
            providers: providers.iter().map(|(id, _)| *id).collect(),
            ttl: settings.ttl,
            outbox_enabled: settings.bus.is_some(),
            ptr_enabled: ptr.is_some(),
            relay_claim: (settings.bus.is_some() && relay == OutboxRelay::InProcess)
                .then_some(relay::CLAIM_FOR),
        },
        providers,
        ptr,
        provider_lease: SLOT_HORIZON
            + call_timeout
            + LEASE_SLACK
            + patience.as_ref().map_or(Duration::ZERO, |p| p.max_wait),
        ptr_lease: settings.dns.timeout + LEASE_SLACK,
        outbox: Some(Arc::clone(&outbox)),
        backfill_wake: Some(Arc::clone(&backfill_wake)),
        ack_deadline: settings
            .bus
            .as_ref()
            .map_or(Duration::from_secs(30), |b| b.ack_deadline),
        patience,
    };
    let stats = Arc::new(AggregatorStats::default());
    let writer = deps.repository_writer();
    let writer = match give_up {
        Some(r) => writer.with_restart_policy(RestartPolicy::new(
            "RepositoryWriter",
            RestartBudget::default(),
            r.clone(),
        )),
        None => writer,
    };
    let aggregator = Aggregator::new(deps.clone(), writer.start(), Arc::clone(&stats)).start();
    Core {
        deps,
        aggregator,
        stats,
        provider_status,
        outbox,
        backfill_wake,
        _arbiters: arbiters,
    }
}

fn start_provider(
    settings: &Settings,
    provider: &ProviderSettings,
    store: &Store,
    give_up: Option<&Recipient<ChildGaveUp>>,
) -> Result<Option<StartedProvider>, BuildError> {
    let http = ProviderConfig::defaults(provider.id)
        .with_base_url(provider.base_url.clone())
        .with_api_key(provider.api_key.clone());
    let built = match provider.id {
        ProviderId::Greynoise => {
            GreyNoise::new(&http).map(|p| spawn(p, settings, provider, store, give_up))
        }
        ProviderId::Abuseipdb => {
            AbuseIpdb::new(&http).map(|p| spawn(p, settings, provider, store, give_up))
        }
        ProviderId::Threatfox => {
            ThreatFox::new(&http).map(|p| spawn(p, settings, provider, store, give_up))
        }
        ProviderId::Feodo => {
            let feodo = FeodoConfig {
                http,
                refresh: settings.feodo_refresh,
                max_age: settings.feodo_max_age,
            };
            Feodo::new(&feodo).map(|p| spawn(p, settings, provider, store, give_up))
        }
    };
    match built {
        Ok(started) => Ok(Some(started)),
        Err(e) if e.is_disabled() => {
            warn!(provider = %provider.id, reason = %enrichd_core::error::chain(&e), "Provider disabled.");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn spawn<P: ProviderHooks>(
    instance: P,
    _settings: &Settings,
    provider: &ProviderSettings,
    store: &Store,
    give_up: Option<&Recipient<ChildGaveUp>>,
) -> StartedProvider {
    let limits = ProviderLimits {
        rate_per_sec: provider.rate_per_sec,
        daily_quota: provider.daily_quota,
        key_fingerprint: provider
            .api_key
            .as_ref()
            .map(enrichd_intel::key_fingerprint),
    };
    let config = ProviderActorConfig {
        concurrency: provider.concurrency,
        ..ProviderActorConfig::default()
    };
    let instance = Arc::new(instance);
    let gate = Arc::new(store.clone());
    let policy =
        give_up.map(|r| RestartPolicy::new("ProviderActor", RestartBudget::default(), r.clone()));
    let arbiter = Arbiter::new();
    let addr = Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
        let actor = ProviderActor::new(instance, gate, limits, config);
        match policy {
            Some(policy) => actor.with_restart_policy(policy),
            None => actor,
        }
    });
    info!(provider = %provider.id, concurrency = provider.concurrency, rate_per_sec = provider.rate_per_sec, "Provider started.");
    (
        provider.id,
        addr.clone().recipient(),
        addr.recipient(),
        arbiter,
    )
}

/// The PTR pool on a thread of its own, like each provider: a lookup opens a UDP socket, and
/// its sends and answers then never wait for the thread the jobs share.
fn start_ptr_pool(
    settings: &Settings,
    give_up: Option<&Recipient<ChildGaveUp>>,
) -> Option<(Recipient<ResolvePtr>, Arbiter)> {
    let config = DnsConfig {
        servers: settings.dns.servers.clone(),
        timeout: settings.dns.timeout,
        concurrency: settings.dns.concurrency,
        fcrdns: settings.dns.fcrdns,
    };
    let factory = Box::new(move || HickoryPtrResolver::shared(&config).map_err(Into::into));
    match PtrResolverPool::with_factory(factory) {
        Ok(pool) => {
            let pool = match give_up {
                Some(r) => pool.with_restart_policy(RestartPolicy::new(
                    "PtrResolverPool",
                    RestartBudget::default(),
                    r.clone(),
                )),
                None => pool,
            };
            let arbiter = Arbiter::new();
            let pool = Supervisor::start_in_arbiter(&arbiter.handle(), move |_| pool);
            Some((pool.recipient(), arbiter))
        }
        Err(e) => {
            error!(error = %e, "PTR resolver cannot start; reverse DNS is off for this process.");
            None
        }
    }
}
