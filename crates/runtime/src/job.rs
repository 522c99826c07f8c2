//! One enrichment pass for one address: claim what is due, ask PTR and providers in parallel,
//! write the results in one transaction (shared with other addresses' by the `StoreBatcher`).
//!
//! The pass reports "durable" as soon as its claims are committed: from then on the address's
//! work is either leased by this live process or recorded as due, so a bus delivery can be
//! acked (SPEC §1.7) and a crash loses nothing: the lease lapses and any replica's backfill
//! finishes the work.

use std::sync::Arc;
use std::time::Duration;

use actix::Recipient;
use enrichd_core::messages::{JobId, ProviderUnavailable, QueryProvider, ResolvePtr};
use enrichd_core::metric_names;
use enrichd_core::ports::PtrReport;
use enrichd_core::{AddressPolicy, CanonicalIp, ProviderId, ProviderReport};
use enrichd_store::{
    ApplyContext, ApplyItem, ApplyOutcome, ClaimMode, Claims, EventNote, Lease, Store, StoreError,
    StoredScope,
};
use futures::future::join_all;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::relay::OutboxHandoff;
use crate::store_batcher::{ClaimSettings, StoreBatcher};

/// Writes tried while the store is unavailable (about 11 s of waiting, well inside the leases).
const APPLY_ATTEMPTS: u32 = 6;

/// Slack on top of a provider's own deadlines before we stop waiting for its actor.
const MAILBOX_SLACK: Duration = Duration::from_secs(5);

/// What a pass needs; cheap to clone (handles and recipients).
#[derive(Clone)]
pub struct JobDeps {
    /// The store.
    pub store: Store,
    /// Global predicate plus exclusions.
    pub policy: AddressPolicy,
    /// Configured providers, TTL, bus and PTR switches.
    pub ctx: ApplyContext,
    /// Provider actors, one per usable provider, in contract order.
    pub providers: Vec<(ProviderId, Recipient<QueryProvider>)>,
    /// The PTR pool; `None` when PTR is disabled (then no DNS traffic at all).
    pub ptr: Option<Recipient<ResolvePtr>>,
    /// A provider lease: the longest reservation wait, the call deadline and 20 s of slack.
    pub provider_lease: Duration,
    /// A PTR lease: the lookup deadline plus 20 s.
    pub ptr_lease: Duration,
    /// This process's relay: rows a pass claimed for it are handed over, and it is woken for
    /// the others, so it publishes without polling. `None` in tests without a bus.
    pub outbox: Option<Arc<OutboxHandoff>>,
    /// Longest a bus delivery waits for its job's claims before it is acked anyway (its event
    /// is recorded by then, so the backfill finishes the work): `ENRICHD_ACK_DEADLINE_SECS`.
    pub ack_deadline: Duration,
    /// Notified when deferred work falls due again, so the backfill takes it at once rather
    /// than at its next poll.
    pub backfill_wake: Option<Arc<Notify>>,
}

impl JobDeps {
    /// Starts the batcher every job of these deps claims and writes through (on the current
    /// runtime).
    pub fn start_batcher(&self) -> StoreBatcher {
        let claim = ClaimSettings {
            providers: self.providers.iter().map(|(id, _)| *id).collect(),
            ptr: self.ptr.is_some(),
            lease: self.provider_lease.max(self.ptr_lease),
        };
        StoreBatcher::start(&self.store, claim, self.ctx.clone())
    }
}

impl std::fmt::Debug for JobDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobDeps")
            .field(
                "providers",
                &self.providers.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            )
            .field("ptr", &self.ptr.is_some())
            .finish_non_exhaustive()
    }
}

/// What one pass did, for logs, metrics and `lookup`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobSummary {
    /// Providers asked in this pass.
    pub asked: Vec<ProviderId>,
    /// Providers that could not be asked (parked, breaker open, stale, unreachable).
    pub unavailable: Vec<(ProviderId, ProviderUnavailable)>,
    /// Whether PTR was resolved in this pass.
    pub ptr_resolved: bool,
    /// What the write did.
    pub applied: ApplyOutcome,
}

/// Runs one pass for `ip`. `on_durable` is called once the claims are committed, with the
/// attacker rows of `event` when there is one.
///
/// With `event`, the bus event that asked for the pass is recorded first: in the claim's own
/// transaction for a global address ([`EventNote::claim`]), so a new address costs one commit
/// before its lookups instead of two.
///
/// # Errors
/// [`StoreError`] when the store cannot be read or written; nothing was lost (leases lapse).
pub async fn enrich(
    job_id: JobId,
    ip: CanonicalIp,
    mode: ClaimMode,
    event: Option<EventNote>,
    deps: &JobDeps,
    writer: &StoreBatcher,
    on_durable: impl FnOnce(Vec<String>),
) -> Result<JobSummary, StoreError> {
    let scope = StoredScope::from(deps.policy.scope(ip));
    if !scope.is_global() {
        let attacker_uuids = match event {
            Some(note) => writer.note(note).await?.attacker_uuids,
            None => Vec::new(),
        };
        // Recorded as skipped (every provider column empty, aggregate NULL, no event); nothing
        // is sent anywhere.
        let applied = writer
            .apply(ApplyItem {
                ip,
                scope,
                ptr: None,
                providers: Vec::new(),
            })
            .await?;
        on_durable(attacker_uuids);
        return Ok(JobSummary {
            applied,
            ..JobSummary::default()
        });
    }

    let provider_ids: Vec<ProviderId> = deps.providers.iter().map(|(id, _)| *id).collect();
    let (claims, attacker_uuids) = match event {
        Some(note) => {
            let intake = writer
                .note(EventNote {
                    claim: true,
                    ..note
                })
                .await?;
            (intake.claims.unwrap_or_default(), intake.attacker_uuids)
        }
        None => (writer.claim(ip, mode).await?, Vec::new()),
    };
    on_durable(attacker_uuids);
    debug!(%job_id, %ip, providers = claims.providers.len(), ptr = claims.ptr.is_some(), "Claimed work.");
    record_cache_hits(&provider_ids, deps.ptr.is_some(), &claims);

    let (ptr, reports, unavailable) = ask(job_id, ip, &claims, deps).await;
    defer_parked(ip, &unavailable, deps).await;
    let summary_asked: Vec<ProviderId> = reports.iter().map(|(_, r)| r.provider).collect();
    let ptr_resolved = ptr.is_some();
    // Even with nothing new, the write recomputes every attacker row of the address from the
    // stored state: an attacker row that appeared since the last pass gets its intel row.
    let mut applied = apply_answers(ip, scope, ptr, reports, writer).await?;
    if let Some(outbox) = &deps.outbox {
        if applied.events > applied.handed_off.len() {
            outbox.wake_claim();
        }
        outbox.hand_off(std::mem::take(&mut applied.handed_off));
    }
    Ok(JobSummary {
        asked: summary_asked,
        unavailable,
        ptr_resolved,
        applied,
    })
}

/// Writes the answers of a pass. They were paid for (quota, rate), so a store that is briefly
/// unreachable or out of connections is waited for, within the leases, rather than giving up
/// and asking the providers again later.
async fn apply_answers(
    ip: CanonicalIp,
    scope: StoredScope,
    ptr: Option<(Lease, PtrReport)>,
    reports: Vec<(Lease, ProviderReport)>,
    writer: &StoreBatcher,
) -> Result<ApplyOutcome, StoreError> {
    let item = ApplyItem {
        ip,
        scope,
        ptr,
        providers: reports,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        match writer.apply(item.clone()).await {
            Err(e) if e.is_unavailable() && attempt < APPLY_ATTEMPTS => {
                debug!(%ip, attempt, error = %e, "Store unavailable; retrying the write.");
                tokio::time::sleep(crate::supervision::jittered_backoff(attempt + 2)).await;
            }
            other => return other,
        }
    }
}

/// Work a provider had no slot for (its rate is taken, or it is parked) keeps its lease only
/// until then, plus a little jitter so the waiting addresses do not all return at once; the
/// backfill is woken for it. Without this the lease would hold the item for a full lease
/// period and a rate-limited provider would run far below its limit.
async fn defer_parked(
    ip: CanonicalIp,
    unavailable: &[(ProviderId, ProviderUnavailable)],
    deps: &JobDeps,
) {
    for (provider, reason) in unavailable {
        let ProviderUnavailable::Parked(until) = reason else {
            continue;
        };
        let jitter = chrono::Duration::milliseconds(rand::random_range(0..5_000));
        let at = *until + jitter;
        if let Err(e) = deps.store.defer_work(ip, *provider, at).await {
            debug!(%ip, provider = %provider, error = %e, "Could not defer; the lease lapses on its own.");
            continue;
        }
        if let Some(wake) = &deps.backfill_wake {
            let wake = Arc::clone(wake);
            let delay = (at - chrono::Utc::now()).to_std().unwrap_or_default();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                wake.notify_one();
            });
        }
    }
}

/// A provider answered (in any outcome): count it and how long the call took.
fn record_lookup(id: ProviderId, report: &ProviderReport, elapsed: Duration) {
    let registry = enrichd_metrics::global();
    let labels = [
        ("provider", id.as_str()),
        ("outcome", report.outcome.as_str()),
    ];
    registry.counter(metric_names::LOOKUPS, &labels).inc();
    registry
        .histogram(metric_names::PROVIDER_LATENCY, &[("provider", id.as_str())])
        .observe(elapsed);
}

/// Work that was configured but not claimed was fresh (or leased elsewhere): no lookup spent.
fn record_cache_hits(providers: &[ProviderId], ptr_enabled: bool, claims: &Claims) {
    let registry = enrichd_metrics::global();
    for id in providers {
        if !claims.providers.iter().any(|(claimed, _)| claimed == id) {
            registry
                .counter(metric_names::CACHE_HITS, &[("provider", id.as_str())])
                .inc();
        }
    }
    if ptr_enabled && claims.ptr.is_none() {
        registry
            .counter(metric_names::CACHE_HITS, &[("provider", "ptr")])
            .inc();
    }
}

type Asked = (
    Option<(Lease, PtrReport)>,
    Vec<(Lease, ProviderReport)>,
    Vec<(ProviderId, ProviderUnavailable)>,
);

/// Asks PTR and every claimed provider at once; each answers within its own deadline.
async fn ask(job_id: JobId, ip: CanonicalIp, claims: &Claims, deps: &JobDeps) -> Asked {
    let ptr_future = async {
        let (Some(lease), Some(pool)) = (claims.ptr, deps.ptr.as_ref()) else {
            return None;
        };
        let deadline = deps.ptr_lease.saturating_sub(Duration::from_secs(20)) + MAILBOX_SLACK;
        match pool.send(ResolvePtr { job_id, ip }).timeout(deadline).await {
            Ok(report) => Some((lease, report)),
            Err(e) => {
                // The lease lapses and the work is retried; a failure never replaces a name.
                warn!(%job_id, %ip, error = %e, "PTR pool did not answer.");
                None
            }
        }
    };
    let provider_futures = claims.providers.iter().filter_map(|(id, lease)| {
        let recipient = deps
            .providers
            .iter()
            .find(|(p, _)| p == id)
            .map(|(_, r)| r.clone())?;
        let timeout = deps.provider_lease.saturating_sub(Duration::from_secs(20)) + MAILBOX_SLACK;
        let (id, lease) = (*id, *lease);
        Some(async move {
            let started = tokio::time::Instant::now();
            let answer = recipient
                .send(QueryProvider {
                    job_id,
                    provider: id,
                    ip,
                })
                .timeout(timeout)
                .await
                .unwrap_or(Err(ProviderUnavailable::Unreachable));
            if let Ok(report) = &answer {
                record_lookup(id, report, started.elapsed());
            }
            (id, lease, answer)
        })
    });
    let (ptr, answers) = futures::future::join(ptr_future, join_all(provider_futures)).await;
    if let Some((_, report)) = &ptr {
        enrichd_metrics::global()
            .counter(
                metric_names::PTR_LOOKUPS,
                &[("outcome", report.outcome.as_str())],
            )
            .inc();
    }
    let mut reports = Vec::new();
    let mut unavailable = Vec::new();
    for (id, lease, answer) in answers {
        match answer {
            Ok(report) => reports.push((lease, report)),
            Err(reason) => {
                debug!(%job_id, %ip, provider = %id, reason = %reason, "Provider unavailable; work stays due.");
                unavailable.push((id, reason));
            }
        }
    }
    (ptr, reports, unavailable)
}
