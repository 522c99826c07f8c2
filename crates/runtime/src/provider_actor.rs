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

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, ResponseFuture, Supervised};
use chrono::{DateTime, Utc};
use enrichd_core::job::{CallSlot, ProviderAnswer, ProviderUnavailable};
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

use crate::messages::{CallPanicked, GetProviderStatus, InjectFault, QueryProvider};

/// Below this many calls left, every quota header is written to the shared store.
const QUOTA_RECORD_EVERY_CALL_BELOW: u32 = 50;

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

/// Answers [`QueryProvider`] for one provider; see the module docs.
pub struct ProviderActor<P: ProviderHooks, G: ProviderGate> {
    shared: Arc<Shared<P, G>>,
    restarts: u32,
    /// Restart budget; `None` restarts without limit (tests).
    restart_policy: Option<crate::supervision::RestartPolicy>,
}

/// What the actor and its calls in flight share.
struct Shared<P, G> {
    id: ProviderId,
    provider: Arc<P>,
    gate: Arc<G>,
    limits: ProviderLimits,
    concurrency: usize,
    /// Shared with the answers: a permit travels with an answer until it is durable.
    permits: Arc<Semaphore>,
    breaker: Mutex<CircuitBreaker>,
    local: Mutex<Local>,
}

/// This replica's view of the provider's parks and quota. The gate (the shared store) is the
/// authority; this copy keeps us quiet when recording a park in the store failed.
#[derive(Debug, Default)]
struct Local {
    /// When quota headers were last written to the shared store (see `observe_quota`).
    quota_recorded_at: Option<Instant>,
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
                permits: Arc::new(Semaphore::new(concurrency)),
                breaker: Mutex::new(CircuitBreaker::new(config.breaker)),
                local: Mutex::new(Local::default()),
            }),
            restarts: 0,
            restart_policy: None,
        }
    }

    /// Limits restarts to `policy`'s budget.
    #[must_use]
    pub fn with_restart_policy(mut self, policy: crate::supervision::RestartPolicy) -> Self {
        self.restart_policy = Some(policy);
        self
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
    fn restarting(&mut self, ctx: &mut Context<Self>) {
        self.restarts += 1;
        if let Some(policy) = self.restart_policy.as_mut() {
            policy.on_restart(ctx);
        }
        warn!(
            actor = "ProviderActor",
            provider = %self.shared.id,
            restarts = self.restarts,
            "Provider actor restarting."
        );
    }
}

impl<P: ProviderHooks, G: ProviderGate> Handler<QueryProvider> for ProviderActor<P, G> {
    type Result = ResponseFuture<Result<ProviderAnswer, ProviderUnavailable>>;

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
    async fn query(&self, ip: CanonicalIp) -> Result<ProviderAnswer, ProviderUnavailable> {
        // Known before any gate: an unsupported address must not wait for, or spend, a slot.
        if !self.provider.supports(ip) {
            return Ok(ProviderAnswer::free(ProviderReport::bare(
                self.id,
                ProviderOutcome::SkippedUnsupported,
            )));
        }
        if self.provider.availability().await == Availability::Stale {
            debug!("Provider data stale; not asking.");
            return Err(ProviderUnavailable::Stale);
        }
        self.check_parks()?;
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| ProviderUnavailable::Unreachable)?;
        let report = self.call(ip).await?;
        // A daily quota is what a crash wastes for good: such an answer keeps its permit
        // until it is durable, so unwritten answers never outnumber the concurrency. Without
        // a quota a repeated call costs a moment of the rate, or nothing, and holding the
        // permit through the write would cost throughput (a fifth of it at the benchmark's
        // 20 ms providers).
        let slot = if self.limits.daily_quota > 0 {
            CallSlot::holding(permit)
        } else {
            drop(permit);
            CallSlot::free()
        };
        Ok(ProviderAnswer { report, slot })
    }

    /// One call under a concurrency permit the caller holds.
    async fn call(&self, ip: CanonicalIp) -> Result<ProviderReport, ProviderUnavailable> {
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
                    // A 429 here or at another replica while we waited parks the provider:
                    // the slot is forfeited rather than spent against a provider saying stop.
                    self.check_parks()?;
                    match self.gate.parked_until(self.id).await {
                        Ok(Some(until)) => {
                            let mut local = lock(&self.local);
                            local.parked_until = local.parked_until.max(Some(until));
                            return Err(ProviderUnavailable::Parked(until));
                        }
                        Ok(None) => {}
                        Err(_) => return Err(ProviderUnavailable::Unreachable),
                    }
                }
                Ok(None)
            }
            Reservation::Busy { retry_at } => Err(ProviderUnavailable::NoSlotUntil(retry_at)),
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
            // Every answer carries the headers; writing each one locks the provider's shared
            // row and made it the busiest row under load. Once a second is plenty while the
            // quota is far from spent; near the end every answer counts.
            let now = Instant::now();
            let recent = local
                .quota_recorded_at
                .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1));
            if recent && quota.remaining > QUOTA_RECORD_EVERY_CALL_BELOW {
                return;
            }
            local.quota_recorded_at = Some(now);
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use actix::{Addr, Supervisor};
    use chrono::TimeDelta;
    use enrichd_core::job::JobId;
    use enrichd_core::ports::IntelProvider;
    use enrichd_core::{ProviderFields, Secret, Verdict};
    use enrichd_intel::{
        AbuseIpdb, Feodo, FeodoConfig, GreyNoise, ProviderConfig, key_fingerprint,
    };
    use enrichd_testkit::eventually;
    use enrichd_testkit::http::{HttpServer, Response};

    use super::*;

    const KEY: &str = "actor-test-key";

    // === fakes ===

    /// A gate that honours parks, key rejections and an exhausted quota like the store does.
    #[derive(Default)]
    struct FakeGate {
        state: Mutex<GateState>,
    }

    #[derive(Default)]
    struct GateState {
        parked_until: Option<DateTime<Utc>>,
        rejected_key: Option<String>,
        quota_reset: Option<DateTime<Utc>>,
        reservations: usize,
        events: Vec<GateEvent>,
    }

    impl FakeGate {
        fn reservations(&self) -> usize {
            lock(&self.state).reservations
        }

        fn events(&self) -> Vec<GateEvent> {
            lock(&self.state).events.clone()
        }
    }

    impl ProviderGate for FakeGate {
        type Error = std::io::Error;

        async fn reserve(
            &self,
            _provider: ProviderId,
            limits: &ProviderLimits,
        ) -> Result<Reservation, Self::Error> {
            let mut state = lock(&self.state);
            state.reservations += 1;
            let key = limits.key_fingerprint.clone().unwrap_or_default();
            if state.rejected_key.as_ref() == Some(&key) {
                return Ok(Reservation::KeyRejected);
            }
            if let Some(until) = state.parked_until.filter(|u| *u > Utc::now()) {
                return Ok(Reservation::Parked { until });
            }
            if let Some(reset_at) = state.quota_reset {
                return Ok(Reservation::QuotaExhausted { reset_at });
            }
            Ok(Reservation::Granted {
                wait: Duration::ZERO,
                quota_remaining: None,
            })
        }

        async fn record(&self, _provider: ProviderId, event: GateEvent) -> Result<(), Self::Error> {
            let mut state = lock(&self.state);
            match &event {
                GateEvent::Park { until } => state.parked_until = Some(*until),
                GateEvent::KeyRejected { key_fingerprint } => {
                    state.rejected_key = Some(key_fingerprint.clone());
                }
                GateEvent::QuotaObserved { .. } => {}
            }
            state.events.push(event);
            Ok(())
        }

        async fn parked_until(
            &self,
            _provider: ProviderId,
        ) -> Result<Option<DateTime<Utc>>, Self::Error> {
            Ok(lock(&self.state).parked_until.filter(|u| *u > Utc::now()))
        }
    }

    /// What the scripted provider does on one call.
    #[derive(Clone)]
    enum Step {
        Answer,
        Fail(ProviderError),
        Panic,
    }

    /// A provider that follows a script (then repeats `then`), optionally holding each call
    /// until the test releases a permit.
    struct Scripted {
        calls: AtomicUsize,
        script: Mutex<VecDeque<Step>>,
        then: Step,
        hold: Option<Semaphore>,
    }

    impl Scripted {
        fn new(script: impl IntoIterator<Item = Step>, then: Step) -> Self {
            Self {
                calls: AtomicUsize::new(0),
                script: Mutex::new(script.into_iter().collect()),
                then,
                hold: None,
            }
        }

        fn holding(mut self) -> Self {
            self.hold = Some(Semaphore::new(0));
            self
        }

        fn release(&self, calls: usize) {
            if let Some(hold) = &self.hold {
                hold.add_permits(calls);
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl IntelProvider for Scripted {
        fn id(&self) -> ProviderId {
            ProviderId::Greynoise
        }

        async fn lookup(&self, _ip: CanonicalIp) -> Result<ProviderReport, ProviderError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let step = lock(&self.script)
                .pop_front()
                .unwrap_or_else(|| self.then.clone());
            if let Some(hold) = &self.hold {
                hold.acquire().await.unwrap().forget();
            }
            match step {
                Step::Answer => Ok(ProviderReport::answer(
                    ProviderOutcome::Ok,
                    Some(Verdict::Benign),
                    ProviderFields::Greynoise {
                        classification: "benign".into(),
                        name: None,
                        tags: vec![],
                    },
                    ProviderReport::bare(ProviderId::Greynoise, ProviderOutcome::Ok).raw,
                )),
                Step::Fail(err) => Err(err),
                Step::Panic => panic!("scripted provider bug"),
            }
        }
    }

    impl ProviderHooks for Scripted {}

    // === helpers ===

    fn limits() -> ProviderLimits {
        ProviderLimits {
            rate_per_sec: 0.0,
            daily_quota: 0,
            key_fingerprint: Some(key_fingerprint(&Secret::new(KEY))),
        }
    }

    fn start<P: ProviderHooks>(
        provider: Arc<P>,
        gate: Arc<FakeGate>,
        concurrency: usize,
    ) -> Addr<ProviderActor<P, FakeGate>> {
        let config = ProviderActorConfig {
            concurrency,
            ..ProviderActorConfig::default()
        };
        let actor = ProviderActor::new(provider, gate, limits(), config);
        Supervisor::start(move |_| actor)
    }

    fn query(provider: ProviderId, ip: &str) -> QueryProvider {
        QueryProvider {
            job_id: JobId::new(),
            provider,
            ip: CanonicalIp::parse(ip).unwrap(),
        }
    }

    async fn ask<P: ProviderHooks>(
        addr: &Addr<ProviderActor<P, FakeGate>>,
    ) -> Result<ProviderAnswer, ProviderUnavailable> {
        addr.send(query(ProviderId::Greynoise, "198.51.100.10"))
            .await
            .unwrap()
    }

    async fn status<P: ProviderHooks>(addr: &Addr<ProviderActor<P, FakeGate>>) -> ProviderStatus {
        addr.send(GetProviderStatus).await.unwrap()
    }

    fn greynoise(server: &HttpServer) -> Arc<GreyNoise> {
        let config = ProviderConfig::defaults(ProviderId::Greynoise)
            .with_base_url(server.base_url())
            .with_api_key(Some(Secret::new(KEY)))
            .with_timeout(Duration::from_secs(2));
        Arc::new(GreyNoise::new(&config).unwrap())
    }

    // === HTTP providers behind the actor ===

    #[actix::test]
    async fn a_429_parks_the_provider_and_nothing_is_sent_meanwhile() {
        let server = HttpServer::start(|_| {
            Response::json(429, r#"{"message":"slow down"}"#).header("retry-after", "120")
        })
        .await;
        let gate = Arc::new(FakeGate::default());
        let addr = start(greynoise(&server), Arc::clone(&gate), 4);

        let before = Utc::now();
        let report = ask(&addr).await.unwrap();
        assert_eq!(report.outcome, ProviderOutcome::RateLimited);
        let resume_at = report.resume_at.unwrap();
        assert!(resume_at >= before + TimeDelta::seconds(120));
        assert_eq!(gate.events(), vec![GateEvent::Park { until: resume_at }]);

        for _ in 0..5 {
            assert_eq!(
                ask(&addr).await,
                Err(ProviderUnavailable::Parked(resume_at))
            );
        }
        assert_eq!(server.request_count(), 1, "no request while parked");
        assert_eq!(status(&addr).await.parked_until, Some(resume_at));
        assert_eq!(status(&addr).await.breaker, BreakerState::Closed);
    }

    #[actix::test]
    async fn an_unsupported_address_is_skipped_before_any_gate() {
        let server = HttpServer::start(|_| Response::json(200, "{}")).await;
        let gate = Arc::new(FakeGate::default());
        // Parked cluster-wide: a supported address would wait; this one is answered at once.
        lock(&gate.state).parked_until = Some(Utc::now() + TimeDelta::minutes(10));
        let addr = start(greynoise(&server), Arc::clone(&gate), 4);
        for _ in 0..3 {
            let report = addr
                .send(query(ProviderId::Greynoise, "2001:4860:4860::8888"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(report.outcome, ProviderOutcome::SkippedUnsupported);
        }
        assert_eq!(gate.reservations(), 0, "no slot and no quota unit spent");
        assert_eq!(server.request_count(), 0);
    }

    #[actix::test]
    async fn the_gate_park_of_another_replica_is_honoured() {
        let server = HttpServer::start(|_| Response::json(200, "{}")).await;
        let gate = Arc::new(FakeGate::default());
        let until = Utc::now() + TimeDelta::minutes(10);
        lock(&gate.state).parked_until = Some(until);
        let addr = start(greynoise(&server), Arc::clone(&gate), 4);
        assert_eq!(ask(&addr).await, Err(ProviderUnavailable::Parked(until)));
        assert_eq!(server.request_count(), 0);
    }

    #[actix::test]
    async fn a_rejected_key_parks_until_the_key_changes() {
        let server = HttpServer::start(|_| Response::json(401, "{}")).await;
        let gate = Arc::new(FakeGate::default());
        let addr = start(greynoise(&server), Arc::clone(&gate), 4);

        assert_eq!(ask(&addr).await, Err(ProviderUnavailable::KeyRejected));
        let fingerprint = key_fingerprint(&Secret::new(KEY));
        assert_eq!(fingerprint.len(), 16);
        assert_eq!(
            gate.events(),
            vec![GateEvent::KeyRejected {
                key_fingerprint: fingerprint
            }]
        );
        for _ in 0..3 {
            assert_eq!(ask(&addr).await, Err(ProviderUnavailable::KeyRejected));
        }
        assert_eq!(server.request_count(), 1);
        assert!(status(&addr).await.key_rejected);
        assert_eq!(status(&addr).await.breaker, BreakerState::Closed);
    }

    #[actix::test]
    async fn an_exhausted_quota_is_reported_as_skipped_quota_without_a_call() {
        let server = HttpServer::start(|_| Response::json(200, "{}")).await;
        let gate = Arc::new(FakeGate::default());
        let reset_at = Utc::now() + TimeDelta::hours(3);
        lock(&gate.state).quota_reset = Some(reset_at);
        let addr = start(greynoise(&server), Arc::clone(&gate), 4);
        let report = ask(&addr).await.unwrap();
        assert_eq!(report.outcome, ProviderOutcome::SkippedQuota);
        assert_eq!(report.resume_at, Some(reset_at));
        assert_eq!(server.request_count(), 0);
        assert_eq!(status(&addr).await.quota_remaining, Some(0));
    }

    #[actix::test]
    async fn server_errors_become_error_reports() {
        let server = HttpServer::start(|_| Response::json(503, "{}")).await;
        let gate = Arc::new(FakeGate::default());
        let addr = start(greynoise(&server), Arc::clone(&gate), 4);
        let report = ask(&addr).await.unwrap();
        assert_eq!(report.outcome, ProviderOutcome::Error);
        assert_eq!(report.error.as_deref(), Some("server error 503"));
        assert_eq!(report.fields, None);
        assert_eq!(gate.reservations(), 1);
    }

    #[actix::test]
    async fn abuseipdb_quota_headers_are_shared_and_metered_errors_back_off_a_day() {
        let reset = Utc::now().timestamp() + 3600;
        let server = HttpServer::start(move |_| {
            Response::json(200, r#"{"data":{"abuseConfidenceScore":"n/a"}}"#)
                .header("x-ratelimit-remaining", "41")
                .header("x-ratelimit-reset", &reset.to_string())
        })
        .await;
        let config = ProviderConfig::defaults(ProviderId::Abuseipdb)
            .with_base_url(server.base_url())
            .with_api_key(Some(Secret::new(KEY)));
        let provider = Arc::new(AbuseIpdb::new(&config).unwrap());
        let gate = Arc::new(FakeGate::default());
        let addr = start(provider, Arc::clone(&gate), 4);

        let report = addr
            .send(query(ProviderId::Abuseipdb, "45.155.205.233"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(report.outcome, ProviderOutcome::Error);
        assert_eq!(
            report.min_backoff,
            Some(enrichd_intel::abuseipdb::METERED_ERROR_BACKOFF)
        );
        let reset_at = DateTime::from_timestamp(reset, 0);
        assert_eq!(
            gate.events(),
            vec![GateEvent::QuotaObserved {
                remaining: 41,
                reset_at
            }]
        );
        assert_eq!(status(&addr).await.quota_remaining, Some(41));

        // A metered failure counts for the breaker like any decode error.
        for _ in 0..4 {
            addr.send(query(ProviderId::Abuseipdb, "45.155.205.233"))
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(
            addr.send(query(ProviderId::Abuseipdb, "45.155.205.233"))
                .await
                .unwrap(),
            Err(ProviderUnavailable::BreakerOpen)
        );
        assert_eq!(server.request_count(), 5);
    }

    #[actix::test]
    async fn stale_feodo_is_unavailable_and_feodo_never_reserves_a_slot() {
        let server = HttpServer::start(|_| Response::json(503, "{}")).await;
        let config = FeodoConfig {
            http: ProviderConfig::defaults(ProviderId::Feodo).with_base_url(server.base_url()),
            ..FeodoConfig::default()
        };
        let gate = Arc::new(FakeGate::default());
        let addr = start(Arc::new(Feodo::new(&config).unwrap()), Arc::clone(&gate), 4);
        let stale = addr.send(query(ProviderId::Feodo, "45.155.205.233")).await;
        assert_eq!(stale.unwrap(), Err(ProviderUnavailable::Stale));

        let feed = HttpServer::start(|_| {
            Response::json(
                200,
                r#"[{"ip_address":"45.155.205.233","port":443,"malware":"QakBot"}]"#,
            )
        })
        .await;
        let config = FeodoConfig {
            http: ProviderConfig::defaults(ProviderId::Feodo).with_base_url(feed.base_url()),
            ..FeodoConfig::default()
        };
        let addr = start(Arc::new(Feodo::new(&config).unwrap()), Arc::clone(&gate), 4);
        let report = addr
            .send(query(ProviderId::Feodo, "45.155.205.233"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(report.verdict, Some(Verdict::Malicious));
        assert_eq!(gate.reservations(), 0, "local lookups spend no slot");
        assert_eq!(feed.request_count(), 1);
    }

    #[actix::test]
    async fn a_query_for_another_provider_is_refused() {
        let provider = Arc::new(Scripted::new([], Step::Answer));
        let addr = start(Arc::clone(&provider), Arc::new(FakeGate::default()), 4);
        let reply = addr
            .send(query(ProviderId::Threatfox, "198.51.100.10"))
            .await;
        assert_eq!(reply.unwrap(), Err(ProviderUnavailable::Unreachable));
        assert_eq!(provider.calls(), 0);
    }

    // === breaker, concurrency, supervision ===

    #[actix::test]
    async fn the_breaker_opens_after_five_failures_and_lets_one_probe_through_after_cool_down() {
        tokio::time::pause();
        let failure = Step::Fail(ProviderError::Server { status: 500 });
        let provider = Arc::new(Scripted::new(vec![failure; 5], Step::Answer).holding());
        let gate = Arc::new(FakeGate::default());
        let addr = start(Arc::clone(&provider), Arc::clone(&gate), 4);

        provider.release(5);
        for _ in 0..5 {
            assert_eq!(ask(&addr).await.unwrap().outcome, ProviderOutcome::Error);
        }
        assert_eq!(ask(&addr).await, Err(ProviderUnavailable::BreakerOpen));
        assert_eq!(status(&addr).await.breaker, BreakerState::Open);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(ask(&addr).await, Err(ProviderUnavailable::BreakerOpen));
        assert_eq!(provider.calls(), 5);
        assert_eq!(gate.reservations(), 5, "an open breaker spends no slot");

        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(status(&addr).await.breaker, BreakerState::HalfOpen);
        // The probe is held in flight; a second query meanwhile is refused.
        let probe = actix::spawn({
            let addr = addr.clone();
            async move { ask(&addr).await }
        });
        assert!(eventually(Duration::from_secs(5), || async { provider.calls() == 6 }).await);
        assert_eq!(ask(&addr).await, Err(ProviderUnavailable::BreakerOpen));
        provider.release(1);
        assert_eq!(probe.await.unwrap().unwrap().outcome, ProviderOutcome::Ok);
        assert_eq!(status(&addr).await.breaker, BreakerState::Closed);

        provider.release(3);
        for _ in 0..3 {
            assert_eq!(ask(&addr).await.unwrap().outcome, ProviderOutcome::Ok);
        }
        assert_eq!(provider.calls(), 9);
    }

    #[actix::test]
    async fn client_errors_never_open_the_breaker() {
        let provider = Arc::new(Scripted::new(
            [],
            Step::Fail(ProviderError::Unexpected("http status 422".into())),
        ));
        let addr = start(Arc::clone(&provider), Arc::new(FakeGate::default()), 4);
        for _ in 0..12 {
            let report = ask(&addr).await.unwrap();
            assert_eq!(report.outcome, ProviderOutcome::Error);
            assert_eq!(
                report.error.as_deref(),
                Some("unexpected answer: http status 422")
            );
        }
        assert_eq!(provider.calls(), 12);
        assert_eq!(status(&addr).await.breaker, BreakerState::Closed);
    }

    #[actix::test]
    async fn the_concurrency_cap_bounds_calls_in_flight() {
        let provider = Arc::new(Scripted::new([], Step::Answer).holding());
        let addr = start(Arc::clone(&provider), Arc::new(FakeGate::default()), 2);
        let pending: Vec<_> = (0..5)
            .map(|_| {
                let addr = addr.clone();
                actix::spawn(async move { ask(&addr).await })
            })
            .collect();
        assert!(eventually(Duration::from_secs(5), || async { provider.calls() == 2 }).await);
        assert_eq!(status(&addr).await.in_flight, 2);
        assert_eq!(provider.calls(), 2, "the others wait for a permit");
        provider.release(5);
        for call in pending {
            assert_eq!(call.await.unwrap().unwrap().outcome, ProviderOutcome::Ok);
        }
        assert_eq!(provider.calls(), 5);
        assert_eq!(status(&addr).await.in_flight, 0);
    }

    #[actix::test]
    async fn an_injected_fault_restarts_the_actor_behind_the_same_address() {
        let provider = Arc::new(Scripted::new([], Step::Answer));
        let addr = start(Arc::clone(&provider), Arc::new(FakeGate::default()), 4);
        addr.send(InjectFault).await.unwrap();
        assert!(
            eventually(Duration::from_secs(5), || {
                let addr = addr.clone();
                async move { status(&addr).await.restarts == 1 }
            })
            .await
        );
        assert_eq!(ask(&addr).await.unwrap().outcome, ProviderOutcome::Ok);
    }

    #[actix::test]
    async fn a_panicking_provider_leaves_the_work_due_and_the_actor_restarts() {
        let provider = Arc::new(Scripted::new([Step::Panic], Step::Answer));
        let addr = start(Arc::clone(&provider), Arc::new(FakeGate::default()), 1);
        assert_eq!(ask(&addr).await, Err(ProviderUnavailable::Unreachable));
        assert!(
            eventually(Duration::from_secs(5), || {
                let addr = addr.clone();
                async move { status(&addr).await.restarts == 1 }
            })
            .await
        );
        // The permit and the breaker ticket were given back by the unwinding call.
        assert_eq!(ask(&addr).await.unwrap().outcome, ProviderOutcome::Ok);
        assert_eq!(status(&addr).await.breaker, BreakerState::Closed);
        assert_eq!(status(&addr).await.in_flight, 0);
    }
}
