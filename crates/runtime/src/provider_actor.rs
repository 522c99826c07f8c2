//! `ProviderActor`: one per provider, answering [`QueryProvider`] (SPEC §3, §7).
//!
//! A thin shell that applies one failure policy to every provider, in this order:
//! 1. the provider must be usable ([`ProviderHooks::availability`]; Feodo's feed may be
//!    stale) → else [`ProviderUnavailable::Stale`];
//! 2. no local park (rate limit or rejected key) → else `Parked` / `KeyRejected`;
//! 3. a concurrency permit (a semaphore, default 4);
//! 4. the [`CircuitBreaker`] admits the call → else `BreakerOpen` (one probe after 30 s);
//! 5. for metered providers, a cluster-wide slot from the [`ProviderGate`]: `Granted { wait }`
//!    waits, then calls; `Busy` / `Parked` → `Parked`, `KeyRejected` → `KeyRejected`,
//!    `QuotaExhausted` → an `ok` reply carrying a `skipped_quota` report with `resume_at`;
//! 6. the call, then the fate of its result: quota headers are shared with the gate;
//!    `RateLimited` parks the provider (gate and locally) and yields a `rate_limited` report;
//!    `KeyRejected` parks it until the key changes, with one clear log line, and yields
//!    `ProviderUnavailable::KeyRejected`; any other failure becomes an `error` report.
//!
//! Whenever nothing is sent, the reply is a [`ProviderUnavailable`]: the work stays due and its
//! per-IP backoff does not advance.
//!
//! The breaker counts breaker-tripping failures (timeouts, transport, 5xx, decode) and `Ok`
//! reports whose outcome is `error` (AbuseIPDB's metered failures, see
//! [`enrichd_intel::Observed`]); every other answer, including 4xx and rate limits, shows the
//! provider is up and closes it.
//!
//! # Faults
//! Handler bodies never panic. A provider call that panics anyway is caught: the sender gets
//! `Unreachable` (the work stays due) and the actor stops itself so its `Supervisor` restarts
//! it with the same address ([`InjectFault`] does the same on demand, for supervision tests).
//! Breaker, parks and permits live in state shared with the calls in flight and survive the
//! restart: they describe the provider, not the actor.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use actix::{
    Actor, ActorContext, AsyncContext, Context, Handler, Message, ResponseFuture, Supervised,
};
use chrono::{DateTime, Utc};
use enrichd_core::messages::{ProviderUnavailable, QueryProvider};
use enrichd_core::ports::{GateEvent, ProviderGate, ProviderLimits, Reservation};
use enrichd_core::provider::ProviderFate;
use enrichd_core::text::column_text;
use enrichd_core::{CanonicalIp, ProviderError, ProviderId, ProviderOutcome, ProviderReport};
use enrichd_intel::{
    Attempt, Availability, BreakerConfig, BreakerState, CircuitBreaker, ProviderHooks,
    QuotaObservation, Ticket,
};
use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// Longest error reason stored with an `error` report.
const MAX_REASON_CHARS: usize = 200;

/// Tuning of one provider actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderActorConfig {
    /// Calls in flight at once (`ENRICHD_<PROVIDER>_CONCURRENCY`, default 4; at least 1).
    pub concurrency: usize,
    /// Circuit-breaker thresholds (5 failures, 30 s).
    pub breaker: BreakerConfig,
}

impl Default for ProviderActorConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            breaker: BreakerConfig::default(),
        }
    }
}

/// Ask for a provider actor's state, for health beats and metrics.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "ProviderStatus")]
pub struct GetProviderStatus;

/// A provider actor's state as this replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderStatus {
    /// The provider.
    pub provider: ProviderId,
    /// The circuit breaker.
    pub breaker: BreakerState,
    /// End of the current rate-limit park seen by this replica, if it is still running.
    pub parked_until: Option<DateTime<Utc>>,
    /// Whether the configured key was rejected (parked until it changes).
    pub key_rejected: bool,
    /// Newest quota figure seen (reservation or provider headers).
    pub quota_remaining: Option<u32>,
    /// When the quota resets, if the provider said.
    pub quota_reset_at: Option<DateTime<Utc>>,
    /// Calls holding a concurrency permit now.
    pub in_flight: usize,
    /// Supervised restarts so far.
    pub restarts: u32,
}

/// Makes the actor stop itself, so its supervisor restarts it. For supervision tests and for
/// operators' fault drills; harmless otherwise (state shared with calls survives).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct InjectFault;

/// A provider call panicked: restart.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
struct CallPanicked;

/// Answers [`QueryProvider`] for one provider; see the module docs.
pub struct ProviderActor<P: ProviderHooks, G: ProviderGate> {
    shared: Arc<Shared<P, G>>,
    restarts: u32,
}

/// What the actor and its calls in flight share.
struct Shared<P, G> {
    id: ProviderId,
    provider: Arc<P>,
    gate: Arc<G>,
    limits: ProviderLimits,
    concurrency: usize,
    permits: Semaphore,
    breaker: Mutex<CircuitBreaker>,
    local: Mutex<Local>,
}

/// This replica's view of the provider's parks and quota. The gate (the shared store) is the
/// authority; this copy keeps us quiet when recording a park in the store failed.
#[derive(Debug, Default)]
struct Local {
    parked_until: Option<DateTime<Utc>>,
    key_rejected: bool,
    quota_remaining: Option<u32>,
    quota_reset_at: Option<DateTime<Utc>>,
}

impl<P: ProviderHooks, G: ProviderGate> fmt::Debug for ProviderActor<P, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderActor")
            .field("provider", &self.shared.id)
            .field("concurrency", &self.shared.concurrency)
            .field("restarts", &self.restarts)
            .finish_non_exhaustive()
    }
}

impl<P: ProviderHooks, G: ProviderGate> ProviderActor<P, G> {
    /// An actor asking `provider`, reserving slots from `gate` under `limits`.
    pub fn new(
        provider: Arc<P>,
        gate: Arc<G>,
        limits: ProviderLimits,
        config: ProviderActorConfig,
    ) -> Self {
        let concurrency = config.concurrency.max(1);
        Self {
            shared: Arc::new(Shared {
                id: provider.id(),
                provider,
                gate,
                limits,
                concurrency,
                permits: Semaphore::new(concurrency),
                breaker: Mutex::new(CircuitBreaker::new(config.breaker)),
                local: Mutex::new(Local::default()),
            }),
            restarts: 0,
        }
    }

    /// The provider this actor asks.
    pub fn provider(&self) -> ProviderId {
        self.shared.id
    }
}

impl<P: ProviderHooks, G: ProviderGate> Actor for ProviderActor<P, G> {
    type Context = Context<Self>;
}

impl<P: ProviderHooks, G: ProviderGate> Supervised for ProviderActor<P, G> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.restarts += 1;
        warn!(
            actor = "ProviderActor",
            provider = %self.shared.id,
            restarts = self.restarts,
            "Provider actor restarting."
        );
    }
}

impl<P: ProviderHooks, G: ProviderGate> Handler<QueryProvider> for ProviderActor<P, G> {
    type Result = ResponseFuture<Result<ProviderReport, ProviderUnavailable>>;

    fn handle(&mut self, msg: QueryProvider, ctx: &mut Context<Self>) -> Self::Result {
        let shared = Arc::clone(&self.shared);
        let me = ctx.address();
        let span = info_span!("job", job_id = %msg.job_id, provider = %shared.id, ip = %msg.ip);
        Box::pin(
            async move {
                if msg.provider != shared.id {
                    warn!(asked = %msg.provider, "Query routed to the wrong provider actor.");
                    return Err(ProviderUnavailable::Unreachable);
                }
                // The future owns only an `Arc`: nothing the actor keeps is observed half
                // updated if the call unwinds (the ticket guard settles the breaker).
                match AssertUnwindSafe(shared.query(msg.ip)).catch_unwind().await {
                    Ok(result) => result,
                    Err(_panic) => {
                        error!(
                            actor = "ProviderActor",
                            "Provider call panicked; the work stays due and the actor restarts."
                        );
                        // Losing this is fine: the actor is already stopping or gone.
                        me.do_send(CallPanicked);
                        Err(ProviderUnavailable::Unreachable)
                    }
                }
            }
            .instrument(span),
        )
    }
}

impl<P: ProviderHooks, G: ProviderGate> Handler<GetProviderStatus> for ProviderActor<P, G> {
    type Result = actix::MessageResult<GetProviderStatus>;

    fn handle(&mut self, _msg: GetProviderStatus, _ctx: &mut Context<Self>) -> Self::Result {
        let shared = &self.shared;
        let now = Utc::now();
        let local = lock(&shared.local);
        actix::MessageResult(ProviderStatus {
            provider: shared.id,
            breaker: lock(&shared.breaker).state(Instant::now()),
            parked_until: local.parked_until.filter(|until| *until > now),
            key_rejected: local.key_rejected,
            quota_remaining: local.quota_remaining,
            quota_reset_at: local.quota_reset_at,
            in_flight: shared
                .concurrency
                .saturating_sub(shared.permits.available_permits()),
            restarts: self.restarts,
        })
    }
}

impl<P: ProviderHooks, G: ProviderGate> Handler<InjectFault> for ProviderActor<P, G> {
    type Result = ();

    fn handle(&mut self, _msg: InjectFault, ctx: &mut Context<Self>) {
        warn!(provider = %self.shared.id, "Fault injected; stopping for a supervised restart.");
        ctx.stop();
    }
}

impl<P: ProviderHooks, G: ProviderGate> Handler<CallPanicked> for ProviderActor<P, G> {
    type Result = ();

    fn handle(&mut self, _msg: CallPanicked, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

// === impl Shared ===

impl<P: ProviderHooks, G: ProviderGate> Shared<P, G> {
    async fn query(&self, ip: CanonicalIp) -> Result<ProviderReport, ProviderUnavailable> {
        if self.provider.availability().await == Availability::Stale {
            debug!("Provider data stale; not asking.");
            return Err(ProviderUnavailable::Stale);
        }
        self.check_parks()?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ProviderUnavailable::Unreachable)?;
        // A park may have begun while this call queued for a permit.
        self.check_parks()?;
        let ticket = lock(&self.breaker)
            .admit(Instant::now())
            .ok_or(ProviderUnavailable::BreakerOpen)?;
        let mut ticket = TicketGuard {
            breaker: &self.breaker,
            ticket: Some(ticket),
        };

        if self.provider.metered()
            && let Some(early) = self.reserve().await?
        {
            return Ok(early);
        }

        let observed = self.provider.lookup_observed(ip).await;
        if let Some(quota) = observed.quota {
            self.observe_quota(quota).await;
        }
        match observed.result {
            Ok(report) => {
                if report.outcome == ProviderOutcome::Error {
                    ticket.finish(Attempt::Failed);
                    warn!(
                        outcome = %report.outcome,
                        error = report.error.as_deref().unwrap_or_default(),
                        "Provider lookup failed."
                    );
                } else {
                    ticket.finish(Attempt::Answered);
                    debug!(outcome = %report.outcome, "Provider answered.");
                }
                Ok(report)
            }
            Err(err) => self.apply_fate(&err, ticket).await,
        }
    }

    /// Refuses while this replica knows of a park.
    fn check_parks(&self) -> Result<(), ProviderUnavailable> {
        let local = lock(&self.local);
        if local.key_rejected {
            return Err(ProviderUnavailable::KeyRejected);
        }
        match local.parked_until {
            Some(until) if until > Utc::now() => Err(ProviderUnavailable::Parked(until)),
            _ => Ok(()),
        }
    }

    /// Reserves a cluster-wide slot and waits for it. `Ok(Some(report))` is an answer
    /// without a call (quota spent); `Err` means nothing may be sent now.
    async fn reserve(&self) -> Result<Option<ProviderReport>, ProviderUnavailable> {
        let reservation = match self.gate.reserve(self.id, &self.limits).await {
            Ok(reservation) => reservation,
            Err(err) => {
                warn!(
                    error = %enrichd_core::error::chain(&err),
                    "Cannot reserve a call slot; provider not asked."
                );
                return Err(ProviderUnavailable::Unreachable);
            }
        };
        match reservation {
            Reservation::Granted {
                wait,
                quota_remaining,
            } => {
                if quota_remaining.is_some() {
                    lock(&self.local).quota_remaining = quota_remaining;
                }
                if wait > Duration::ZERO {
                    tokio::time::sleep(wait).await;
                }
                Ok(None)
            }
            Reservation::Busy { retry_at } => Err(ProviderUnavailable::Parked(retry_at)),
            Reservation::Parked { until } => {
                let mut local = lock(&self.local);
                local.parked_until = local.parked_until.max(Some(until));
                Err(ProviderUnavailable::Parked(until))
            }
            Reservation::KeyRejected => Err(ProviderUnavailable::KeyRejected),
            Reservation::QuotaExhausted { reset_at } => {
                {
                    let mut local = lock(&self.local);
                    local.quota_remaining = Some(0);
                    local.quota_reset_at = Some(reset_at);
                }
                Ok(Some(ProviderReport {
                    resume_at: Some(reset_at),
                    ..ProviderReport::bare(self.id, ProviderOutcome::SkippedQuota)
                }))
            }
        }
    }

    async fn observe_quota(&self, quota: QuotaObservation) {
        {
            let mut local = lock(&self.local);
            local.quota_remaining = Some(quota.remaining);
            local.quota_reset_at = quota.reset_at.or(local.quota_reset_at);
        }
        self.record(GateEvent::QuotaObserved {
            remaining: quota.remaining,
            reset_at: quota.reset_at,
        })
        .await;
    }

    async fn apply_fate(
        &self,
        err: &ProviderError,
        mut ticket: TicketGuard<'_>,
    ) -> Result<ProviderReport, ProviderUnavailable> {
        match err.fate() {
            ProviderFate::ParkUntil(until) => {
                ticket.finish(Attempt::Answered);
                let newly_parked = {
                    let mut local = lock(&self.local);
                    let newly = local.parked_until.is_none_or(|p| p <= Utc::now());
                    local.parked_until = local.parked_until.max(Some(until));
                    newly
                };
                if newly_parked {
                    info!(parked_until = %until, "Provider rate-limited us; parked.");
                }
                self.record(GateEvent::Park { until }).await;
                Ok(ProviderReport {
                    resume_at: Some(until),
                    ..ProviderReport::bare(self.id, ProviderOutcome::RateLimited)
                })
            }
            ProviderFate::ParkUntilKeyChanges => {
                ticket.finish(Attempt::Answered);
                // Without a key the "configured key" is none; an empty fingerprint stands
                // for it, so configuring a key lifts the park.
                let key_fingerprint = self.limits.key_fingerprint.clone().unwrap_or_default();
                let first = !std::mem::replace(&mut lock(&self.local).key_rejected, true);
                if first {
                    error!(
                        key_fingerprint = %key_fingerprint,
                        "API key rejected by the provider; provider parked until the configured key changes."
                    );
                }
                self.record(GateEvent::KeyRejected { key_fingerprint })
                    .await;
                Err(ProviderUnavailable::KeyRejected)
            }
            ProviderFate::RecordError { trips_breaker } => {
                ticket.finish(if trips_breaker {
                    Attempt::Failed
                } else {
                    Attempt::Answered
                });
                let reason = column_text(&err.to_string(), MAX_REASON_CHARS);
                warn!(error = %reason, "Provider lookup failed.");
                Ok(ProviderReport::error(self.id, reason))
            }
        }
    }

    /// Tells the gate; a failure is logged and the local copy carries on.
    async fn record(&self, event: GateEvent) {
        if let Err(err) = self.gate.record(self.id, event).await {
            warn!(
                error = %enrichd_core::error::chain(&err),
                "Could not share provider limits with the cluster."
            );
        }
    }
}

/// Settles a breaker ticket exactly once: with the call's result, or as "not sent" when the
/// call never happened (an early return, a cancelled future, a panic).
struct TicketGuard<'a> {
    breaker: &'a Mutex<CircuitBreaker>,
    ticket: Option<Ticket>,
}

impl TicketGuard<'_> {
    fn finish(&mut self, attempt: Attempt) {
        if let Some(ticket) = self.ticket.take() {
            lock(self.breaker).record(ticket, attempt, Instant::now());
        }
    }
}

impl Drop for TicketGuard<'_> {
    fn drop(&mut self) {
        self.finish(Attempt::NotSent);
    }
}

/// Locks, ignoring poisoning: every critical section here leaves the state consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
