//! One enrichment pass for one address: claim what is due, ask PTR and providers in parallel,
//! write the results in one transaction (shared with other addresses' by the
//! `RepositoryWriter`).
//!
//! The pass reports "durable" as soon as its claims are committed: from then on the address's
//! work is either leased by this live process or recorded as due, so a bus delivery can be
//! acked (SPEC §1.7) and a crash loses nothing: the lease lapses and any replica's backfill
//! finishes the work.
//!
//! What a crash may cost is the calls already paid for and not yet written. An answer of a
//! provider with a daily quota keeps its concurrency slot ([`CallSlot`]) until it is durable,
//! so those never outnumber that provider's concurrency. Answers normally go with the pass's
//! one write; one holding a slot that has waited [`EARLY_WRITE_AFTER`] for a slower provider
//! is written on its own (batched with other addresses' answers), so a slow provider does not
//! keep the fast ones' slots taken.

use std::sync::Arc;
use std::time::Duration;

use actix::Recipient;
use backon::Retryable;
use chrono::Utc;
use enrichd_core::job::{CallSlot, JobId, ProviderAnswer, ProviderUnavailable};
use enrichd_core::ports::PtrReport;
use enrichd_core::{AddressPolicy, CanonicalIp, ProviderId, ProviderReport};
use enrichd_metrics::{LookupLabels, OutcomeLabel, ProviderLabel};
use enrichd_store::{
    ApplyContext, ApplyItem, ApplyOutcome, ClaimMode, Claims, EventNote, Lease, Store, StoreError,
    StoredScope,
};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::{FutureExt, future};

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::messages::{QueryProvider, ResolvePtr};
use crate::relay::OutboxHandoff;
use crate::repository_writer::{ClaimSettings, RepositoryWriter, Writer};
use crate::supervision::backoff;

/// A write with no lease to keep (nothing paid for in it) is tried for about 11 s while the
/// store is unavailable.
const UNLEASED_WRITE_PATIENCE: Duration = Duration::from_secs(11);

/// A paid-for answer's write is retried while the store is unavailable until this long before
/// its lease lapses: after that another replica may take the work, and the answer is lost.
const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// An answer that has waited this long for its pass's slower providers is written on its own.
/// Shorter writes more (a statement's share per answer); longer keeps slots taken while a
/// slow provider answers, which with the default concurrency of 4 is what limits a provider.
pub const EARLY_WRITE_AFTER: Duration = Duration::from_millis(50);

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
    /// How long a pass may wait for a provider that has no slot for it yet (`enrichd lookup`);
    /// `None`: not at all, the work is deferred and the backfill takes it again.
    pub patience: Option<Patience>,
}

/// How long a pass waits for a provider's next rate slot or the end of its park, and who
/// hears about the waits (`enrichd lookup` shows them).
#[derive(Clone)]
pub struct Patience {
    /// Longest a pass waits for one provider.
    pub max_wait: Duration,
    /// Told before each wait and about each provider that stays unavailable.
    pub notices: Arc<dyn Fn(ProviderNotice) + Send + Sync>,
}

impl std::fmt::Debug for Patience {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patience")
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

/// What a patient pass says about a provider it could not ask at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderNotice {
    /// The address.
    pub ip: CanonicalIp,
    /// The provider.
    pub provider: ProviderId,
    /// Why it could not be asked.
    pub reason: ProviderUnavailable,
    /// `true`: the pass waits until [`ProviderUnavailable::resumes_at`] and asks again;
    /// `false`: the provider stays unasked in this pass.
    pub waiting: bool,
}

impl JobDeps {
    /// The repository writer every job of these deps claims and writes through, not started
    /// yet (the caller gives it its restart budget).
    pub fn repository_writer(&self) -> RepositoryWriter {
        let claim = ClaimSettings {
            providers: self.providers.iter().map(|(id, _)| *id).collect(),
            ptr: self.ptr.is_some(),
            lease: self.provider_lease.max(self.ptr_lease),
        };
        RepositoryWriter::new(&self.store, claim, self.ctx.clone())
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
    writer: &Writer,
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
                write_rows: true,
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

    let pass = Pass {
        job_id,
        ip,
        scope,
        deps,
        writer,
    };
    let asked = pass.ask(&claims).await;
    defer_parked(ip, &asked.unavailable, deps).await;
    let ptr_resolved = asked.ptr.is_some();
    // Even with nothing new, the write recomputes every attacker row of the address from the
    // stored state: an attacker row that appeared since the last pass gets its intel row.
    let (reports, slots): (Vec<_>, Vec<_>) = asked
        .held
        .into_iter()
        .map(|held| ((held.lease, held.report), held.slot))
        .unzip();
    let item = ApplyItem {
        ip,
        scope,
        write_rows: true,
        ptr: asked.ptr,
        providers: reports,
    };
    let written = write_durably(item, writer).await;
    drop(slots);
    let mut applied = written?;
    if let Some(outbox) = &deps.outbox {
        if applied.events > applied.handed_off.len() {
            outbox.wake_claim();
        }
        outbox.hand_off(std::mem::take(&mut applied.handed_off));
    }
    applied.applied.extend(asked.written_early.applied);
    applied.stale.extend(asked.written_early.stale);
    applied.applied.sort_unstable();
    applied.stale.sort_unstable();
    Ok(JobSummary {
        asked: asked.answered,
        unavailable: asked.unavailable,
        ptr_resolved,
        applied,
    })
}

/// Writes `item` through the batcher. Its answers were paid for (quota, rate), so a store
/// that is unreachable or out of connections is waited for until shortly before the first of
/// their leases lapses, rather than giving up and asking the providers again later; a write
/// with nothing paid for in it waits about 11 s.
async fn write_durably(item: ApplyItem, writer: &Writer) -> Result<ApplyOutcome, StoreError> {
    let first_lapse = item
        .providers
        .iter()
        .map(|(lease, _)| lease.until)
        .chain(item.ptr.as_ref().map(|(lease, _)| lease.until))
        .min();
    let patience = match first_lapse {
        Some(until) if !item.providers.is_empty() => (until - Utc::now())
            .to_std()
            .unwrap_or_default()
            .saturating_sub(LEASE_MARGIN),
        _ => UNLEASED_WRITE_PATIENCE,
    };
    let ip = item.ip;
    let written = (|| writer.apply(item.clone()))
        .retry(
            backoff(Duration::from_millis(400), Duration::from_secs(5))
                .with_total_delay(Some(patience)),
        )
        .when(StoreError::is_unavailable)
        .notify(|e, wait| {
            debug!(%ip, error = %e, wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "Store unavailable; retrying the write.");
        })
        .await;
    if let Err(e) = &written
        && e.is_unavailable()
    {
        warn!(%ip, error = %e, "Store unavailable past the lease; the answers are left to be asked again.");
    }
    written
}

/// One pass's context while it asks.
struct Pass<'a> {
    job_id: JobId,
    ip: CanonicalIp,
    scope: StoredScope,
    deps: &'a JobDeps,
    writer: &'a Writer,
}

/// A provider's answer held until it is written, with the slot its call took.
struct Held {
    lease: Lease,
    report: ProviderReport,
    slot: CallSlot,
    arrived: Instant,
}

/// What a pass's asking left for its write.
#[derive(Default)]
struct Asked {
    /// The PTR answer.
    ptr: Option<(Lease, PtrReport)>,
    /// Answers not written yet, with their slots.
    held: Vec<Held>,
    /// Providers that answered (written early or held).
    answered: Vec<ProviderId>,
    /// What the early writes wrote.
    written_early: ApplyOutcome,
    /// Providers that could not be asked.
    unavailable: Vec<(ProviderId, ProviderUnavailable)>,
}

impl Pass<'_> {
    /// Asks PTR and every claimed provider at once; each answers within its own deadline. An
    /// answer that waits [`EARLY_WRITE_AFTER`] for the others is written on its own meanwhile.
    async fn ask(&self, claims: &Claims) -> Asked {
        let mut asked = Asked::default();
        let mut calls: FuturesUnordered<_> = claims
            .providers
            .iter()
            .filter_map(|(id, lease)| {
                let recipient = self
                    .deps
                    .providers
                    .iter()
                    .find(|(p, _)| p == id)
                    .map(|(_, r)| r.clone())?;
                Some(self.call(*id, *lease, recipient))
            })
            .collect();
        // Resolves at once to `None` when there is no PTR work.
        let ptr = self.resolve_ptr(claims.ptr).fuse();
        tokio::pin!(ptr);
        let mut ptr_pending = true;
        let mut early_writes = FuturesUnordered::new();
        while !calls.is_empty() || ptr_pending {
            // Only answers holding a slot are written early: to free it. The others are
            // cheaper in the pass's one write.
            let flush_at = asked
                .held
                .iter()
                .filter(|h| h.slot.is_held())
                .map(|h| h.arrived)
                .min();
            tokio::select! {
                Some((id, lease, answer)) = calls.next() => match answer {
                    Ok(answer) => {
                        asked.answered.push(id);
                        asked.held.push(Held {
                            lease,
                            report: answer.report,
                            slot: answer.slot,
                            arrived: Instant::now(),
                        });
                    }
                    Err(reason) => {
                        debug!(job_id = %self.job_id, ip = %self.ip, provider = %id, reason = %reason, "Provider unavailable; work stays due.");
                        asked.unavailable.push((id, reason));
                    }
                },
                answer = &mut ptr, if ptr_pending => {
                    ptr_pending = false;
                    asked.ptr = answer;
                }
                () = sleep_until(flush_at.map(|at| at + EARLY_WRITE_AFTER)), if flush_at.is_some() => {
                    let due = Instant::now() - EARLY_WRITE_AFTER;
                    let (early, later): (Vec<Held>, Vec<Held>) = std::mem::take(&mut asked.held)
                        .into_iter()
                        .partition(|h| h.slot.is_held() && h.arrived <= due);
                    asked.held = later;
                    early_writes.push(self.write_early(early));
                }
                Some(written) = early_writes.next(), if !early_writes.is_empty() => {
                    absorb(&mut asked, written);
                }
            }
        }
        while let Some(written) = early_writes.next().await {
            absorb(&mut asked, written);
        }
        if let Some((_, report)) = &asked.ptr {
            enrichd_metrics::global()
                .ptr_lookups
                .get_or_create(&OutcomeLabel {
                    outcome: report.outcome.as_str(),
                })
                .inc();
        }
        asked
    }

    /// Asks one provider; with [`Patience`], waits for its next slot or the end of its park
    /// as long as that comes within the patience, and asks again.
    async fn call(
        &self,
        id: ProviderId,
        lease: Lease,
        recipient: Recipient<QueryProvider>,
    ) -> (
        ProviderId,
        Lease,
        Result<ProviderAnswer, ProviderUnavailable>,
    ) {
        let timeout = self
            .deps
            .provider_lease
            .saturating_sub(Duration::from_secs(20))
            + MAILBOX_SLACK;
        let patience = self.deps.patience.as_ref();
        let patient_until = patience.map(|p| Utc::now() + p.max_wait);
        loop {
            let started = Instant::now();
            let answer = recipient
                .send(QueryProvider {
                    job_id: self.job_id,
                    provider: id,
                    ip: self.ip,
                })
                .timeout(timeout)
                .await
                .unwrap_or(Err(ProviderUnavailable::Unreachable));
            let reason = match answer {
                Ok(answer) => {
                    record_lookup(id, &answer.report, started.elapsed());
                    return (id, lease, Ok(answer));
                }
                Err(reason) => reason,
            };
            let (Some(patience), Some(until)) = (patience, patient_until) else {
                return (id, lease, Err(reason));
            };
            let resume = reason.resumes_at().filter(|at| *at <= until);
            (patience.notices)(ProviderNotice {
                ip: self.ip,
                provider: id,
                reason,
                waiting: resume.is_some(),
            });
            let Some(resume) = resume else {
                return (id, lease, Err(reason));
            };
            tokio::time::sleep((resume - Utc::now()).to_std().unwrap_or_default()).await;
        }
    }

    async fn resolve_ptr(&self, lease: Option<Lease>) -> Option<(Lease, PtrReport)> {
        let (Some(lease), Some(pool)) = (lease, self.deps.ptr.as_ref()) else {
            return None;
        };
        let deadline = self.deps.ptr_lease.saturating_sub(Duration::from_secs(20)) + MAILBOX_SLACK;
        let job_id = self.job_id;
        let ip = self.ip;
        match pool.send(ResolvePtr { job_id, ip }).timeout(deadline).await {
            Ok(report) => Some((lease, report)),
            Err(e) => {
                // The lease lapses and the work is retried; a failure never replaces a name.
                warn!(%job_id, %ip, error = %e, "PTR pool did not answer.");
                None
            }
        }
    }

    /// Writes answers that waited for slower providers, without the attacker rows (the
    /// pass's own write recomputes those), then releases their slots.
    async fn write_early(&self, held: Vec<Held>) -> Result<ApplyOutcome, Vec<Held>> {
        let item = ApplyItem {
            ip: self.ip,
            scope: self.scope,
            write_rows: false,
            ptr: None,
            providers: held.iter().map(|h| (h.lease, h.report.clone())).collect(),
        };
        match write_durably(item, self.writer).await {
            Ok(outcome) => Ok(outcome),
            // Kept for the pass's own write, which fails the same way or gets them in.
            Err(_) => Err(held),
        }
    }
}

/// Takes an early write's result into the pass: what it wrote, or its answers back.
fn absorb(asked: &mut Asked, written: Result<ApplyOutcome, Vec<Held>>) {
    match written {
        Ok(outcome) => {
            asked.written_early.applied.extend(outcome.applied);
            asked.written_early.stale.extend(outcome.stale);
        }
        Err(held) => asked.held.extend(held),
    }
}

/// Sleeps until `at`, or forever without one (the `select!` branch is disabled then anyway).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => future::pending().await,
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
        let (ProviderUnavailable::Parked(until) | ProviderUnavailable::NoSlotUntil(until)) = reason
        else {
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
            let delay = (at - Utc::now()).to_std().unwrap_or_default();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                wake.notify_one();
            });
        }
    }
}

/// A provider answered (in any outcome): count it and how long the call took.
fn record_lookup(id: ProviderId, report: &ProviderReport, elapsed: Duration) {
    let metrics = enrichd_metrics::global();
    let labels = LookupLabels {
        outcome: report.outcome.as_str(),
        provider: id.as_str(),
    };
    metrics.lookups.get_or_create(&labels).inc();
    metrics
        .provider_latency
        .get_or_create(&ProviderLabel {
            provider: id.as_str(),
        })
        .observe(elapsed.as_secs_f64());
}

/// Work that was configured but not claimed was fresh (or leased elsewhere): no lookup spent.
fn record_cache_hits(providers: &[ProviderId], ptr_enabled: bool, claims: &Claims) {
    let cache_hits = &enrichd_metrics::global().cache_hits;
    for id in providers {
        if !claims.providers.iter().any(|(claimed, _)| claimed == id) {
            cache_hits
                .get_or_create(&ProviderLabel {
                    provider: id.as_str(),
                })
                .inc();
        }
    }
    if ptr_enabled && claims.ptr.is_none() {
        cache_hits
            .get_or_create(&ProviderLabel { provider: "ptr" })
            .inc();
    }
}
