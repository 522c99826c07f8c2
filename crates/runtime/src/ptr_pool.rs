//! `PtrResolverPool`: the actor that answers [`ResolvePtr`] (SPEC §3, §6).
//!
//! A thin shell over a [`PtrResolver`] (in production `enrichd_dns::HickoryPtrResolver`): the
//! resolver owns the deadline and the concurrency limit, so the actor only hands each request
//! to it. Every request becomes a [`ResponseFuture`] that runs beside the mailbox, so a slow
//! lookup never delays the next message; the resolver's semaphore is what bounds them.
//!
//! # Faults
//! A handler never panics. A lookup future that panics anyway (a bug in the resolver or in
//! hickory) is caught: its sender gets `servfail` (retried later with backoff) instead of a
//! closed mailbox, and the actor is told to stop, so its `Supervisor` restarts it and
//! [`Supervised::restarting`] rebuilds the resolver, whose internal state (connections,
//! server statistics, locks) may have been left inconsistent. Lookups already running on the
//! old resolver finish on it. Restart budgets are the supervisor wiring's concern.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, ResponseFuture, Supervised};
use enrichd_core::PtrOutcome;
use enrichd_core::ports::{PtrReport, PtrResolver};
use futures::FutureExt;
use tracing::{Instrument, error, info_span, warn};

use crate::messages::{ResolvePtr, ResolverFaulted};

/// Why a resolver could not be (re)built.
pub type BuildError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Builds a fresh resolver; called once at start and again on every restart.
pub type ResolverFactory<R> = Box<dyn FnMut() -> Result<Arc<R>, BuildError> + Send + 'static>;

/// Answers [`ResolvePtr`] through a shared [`PtrResolver`]; see the module docs.
pub struct PtrResolverPool<R: PtrResolver> {
    /// Shared with the lookups in flight, which keep the resolver they started on alive.
    resolver: Arc<R>,
    /// Rebuilds `resolver` on restart; `None` keeps the same resolver across restarts.
    factory: Option<ResolverFactory<R>>,
    /// Bumped on every rebuild, so several lookups panicking on one resolver cause one
    /// restart, not one each.
    generation: u64,
    /// Restart budget; `None` restarts without limit (tests).
    restart_policy: Option<crate::supervision::RestartPolicy>,
}

impl<R: PtrResolver> fmt::Debug for PtrResolverPool<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PtrResolverPool")
            .field("generation", &self.generation)
            .field("rebuilds", &self.factory.is_some())
            .finish_non_exhaustive()
    }
}

impl<R: PtrResolver> PtrResolverPool<R> {
    /// A pool over `resolver`, kept across restarts (for resolvers with no state to poison).
    pub fn new(resolver: Arc<R>) -> Self {
        Self {
            resolver,
            factory: None,
            generation: 0,
            restart_policy: None,
        }
    }

    /// A pool whose resolver `factory` builds now and rebuilds on every restart.
    ///
    /// # Errors
    /// The factory's error when the first resolver cannot be built (a start-up failure).
    pub fn with_factory(mut factory: ResolverFactory<R>) -> Result<Self, BuildError> {
        let resolver = factory()?;
        Ok(Self {
            resolver,
            factory: Some(factory),
            generation: 0,
            restart_policy: None,
        })
    }

    /// Limits restarts to `policy`'s budget.
    #[must_use]
    pub fn with_restart_policy(mut self, policy: crate::supervision::RestartPolicy) -> Self {
        self.restart_policy = Some(policy);
        self
    }

    /// How many times the resolver has been rebuilt.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl<R: PtrResolver> Actor for PtrResolverPool<R> {
    type Context = Context<Self>;
}

impl<R: PtrResolver> Supervised for PtrResolverPool<R> {
    fn restarting(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        if let Some(policy) = self.restart_policy.as_mut() {
            policy.on_restart(ctx);
        }
        let Some(factory) = self.factory.as_mut() else {
            return;
        };
        match factory() {
            Ok(resolver) => self.resolver = resolver,
            // The old resolver is still better than none; the next fault tries again.
            Err(e) => error!(
                actor = "PtrResolverPool",
                error = %e,
                "Could not rebuild the PTR resolver; keeping the previous one."
            ),
        }
    }
}

impl<R: PtrResolver> Handler<ResolverFaulted> for PtrResolverPool<R> {
    type Result = ();

    fn handle(&mut self, msg: ResolverFaulted, ctx: &mut Context<Self>) {
        // A stale report about a resolver already replaced needs no second restart.
        if msg.generation == self.generation {
            ctx.stop();
        }
    }
}

impl<R: PtrResolver> Handler<ResolvePtr> for PtrResolverPool<R> {
    type Result = ResponseFuture<PtrReport>;

    fn handle(&mut self, msg: ResolvePtr, ctx: &mut Context<Self>) -> Self::Result {
        let resolver = Arc::clone(&self.resolver);
        let generation = self.generation;
        let pool = ctx.address();
        let span = info_span!("job", job_id = %msg.job_id, ip = %msg.ip);
        Box::pin(
            async move {
                // The future owns only an `Arc` and a copy of the address: nothing the actor
                // keeps is observed in a half-updated state if the lookup unwinds.
                let lookup = AssertUnwindSafe(resolver.resolve(msg.ip)).catch_unwind();
                match lookup.await {
                    Ok(report) => report,
                    Err(_panic) => {
                        warn!(
                            actor = "PtrResolverPool",
                            outcome = %PtrOutcome::Servfail,
                            "PTR lookup panicked; answering servfail and rebuilding the resolver."
                        );
                        // Losing this is fine: the actor is already stopping or gone.
                        pool.do_send(ResolverFaulted { generation });
                        PtrReport::without_name(PtrOutcome::Servfail)
                    }
                }
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::future::Future;
    use std::net::IpAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use actix::{Addr, Supervisor};
    use enrichd_core::CanonicalIp;
    use enrichd_core::job::JobId;
    use enrichd_dns::{DnsConfig, HickoryPtrResolver};
    use enrichd_testkit::dns::{Behaviour, DnsServer, Zone};

    use super::*;

    fn ip(text: &str) -> CanonicalIp {
        CanonicalIp::parse(text).unwrap()
    }

    fn resolve(ip: CanonicalIp) -> ResolvePtr {
        ResolvePtr {
            job_id: JobId::new(),
            ip,
        }
    }

    fn loopback_server() -> DnsServer {
        let a = |t: &str| t.parse::<IpAddr>().unwrap();
        DnsServer::start(
            Zone::new()
                .ptr(a("8.8.8.8"), "dns.google.", 21_600)
                .ptr(a("2001:4860:4860::8888"), "dns.google.", 3600)
                .behave(a("9.9.9.9"), Behaviour::Servfail)
                .behave(a("1.1.1.1"), Behaviour::Silent),
        )
    }

    fn hickory_pool(server: &DnsServer) -> Addr<PtrResolverPool<HickoryPtrResolver>> {
        let config = DnsConfig {
            servers: vec![server.addr()],
            timeout: Duration::from_millis(300),
            concurrency: 10,
            fcrdns: false,
        };
        let pool = PtrResolverPool::with_factory(Box::new(move || {
            HickoryPtrResolver::shared(&config).map_err(Into::into)
        }))
        .unwrap();
        Supervisor::start(|_| pool)
    }

    #[actix::test]
    async fn answers_resolve_ptr_against_the_loopback_server() {
        let server = loopback_server();
        let pool = hickory_pool(&server);
        let cases = [
            ("8.8.8.8", PtrOutcome::Ok, Some("dns.google")),
            ("2001:4860:4860::8888", PtrOutcome::Ok, Some("dns.google")),
            ("8.8.4.4", PtrOutcome::Nxdomain, None),
            ("9.9.9.9", PtrOutcome::Servfail, None),
            ("1.1.1.1", PtrOutcome::Timeout, None),
            ("10.1.2.3", PtrOutcome::SkippedNonGlobal, None),
        ];
        for (text, outcome, name) in cases {
            let report = pool.send(resolve(ip(text))).await.unwrap();
            assert_eq!(report.outcome, outcome, "{text}");
            assert_eq!(report.name.as_deref(), name, "{text}");
        }
        assert_eq!(
            pool.send(resolve(ip("8.8.8.8"))).await.unwrap().record_ttl,
            Some(Duration::from_secs(21_600))
        );
    }

    #[actix::test]
    async fn a_slow_lookup_does_not_hold_up_the_mailbox() {
        let server = loopback_server();
        let pool = hickory_pool(&server);
        // The silent address holds one permit for the whole deadline ...
        let slow = pool.send(resolve(ip("1.1.1.1")));
        let slow = actix::spawn(slow);
        // ... while 50 more requests through the same actor are answered.
        let fast = (0..50).map(|_| pool.send(resolve(ip("8.8.8.8"))));
        let reports = futures::future::join_all(fast).await;
        assert!(
            !slow.is_finished(),
            "the fast lookups finished within the slow one's deadline"
        );
        for report in reports {
            assert_eq!(report.unwrap().name.as_deref(), Some("dns.google"));
        }
        assert_eq!(slow.await.unwrap().unwrap().outcome, PtrOutcome::Timeout);
    }

    /// Panics when asked about `trigger`, answers `ok` otherwise.
    struct PanicsOn {
        trigger: CanonicalIp,
    }

    impl PtrResolver for PanicsOn {
        fn resolve(&self, ip: CanonicalIp) -> impl Future<Output = PtrReport> + Send {
            let trigger = self.trigger;
            async move {
                assert_ne!(ip, trigger, "resolver bug");
                PtrReport {
                    outcome: PtrOutcome::Ok,
                    name: Some("fine.example".to_owned()),
                    record_ttl: Some(Duration::from_secs(60)),
                    forward_confirmed: None,
                }
            }
        }
    }

    #[actix::test]
    async fn a_panicking_lookup_answers_servfail_and_the_resolver_is_rebuilt() {
        let builds = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&builds);
        let pool = PtrResolverPool::with_factory(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(PanicsOn {
                trigger: ip("6.6.6.6"),
            }))
        }))
        .unwrap();
        let addr = Supervisor::start(|_| pool);
        assert_eq!(builds.load(Ordering::SeqCst), 1);

        let report = addr.send(resolve(ip("6.6.6.6"))).await.unwrap();
        assert_eq!(report, PtrReport::without_name(PtrOutcome::Servfail));
        assert!(
            enrichd_testkit::eventually(Duration::from_secs(5), || {
                let builds = Arc::clone(&builds);
                async move { builds.load(Ordering::SeqCst) == 2 }
            })
            .await,
            "the supervisor restarted the pool and rebuilt its resolver"
        );
        // Same address, still answering, on the rebuilt resolver.
        let report = addr.send(resolve(ip("8.8.8.8"))).await.unwrap();
        assert_eq!(report.name.as_deref(), Some("fine.example"));
        assert!(addr.connected());
    }

    #[actix::test]
    async fn several_panics_on_one_resolver_restart_it_once() {
        let builds = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&builds);
        let pool = PtrResolverPool::with_factory(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(PanicsOn {
                trigger: ip("6.6.6.6"),
            }))
        }))
        .unwrap();
        let addr = Supervisor::start(|_| pool);
        let all = (0..5).map(|_| addr.send(resolve(ip("6.6.6.6"))));
        let outcomes: HashSet<_> = futures::future::join_all(all)
            .await
            .into_iter()
            .map(|r| r.unwrap().outcome)
            .collect();
        assert_eq!(outcomes, HashSet::from([PtrOutcome::Servfail]));
        // A message sent after the fault reports is handled after them, so once it is
        // answered every restart that was going to happen has happened.
        addr.send(resolve(ip("8.8.8.8"))).await.unwrap();
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }

    #[actix::test]
    async fn a_failed_rebuild_keeps_the_previous_resolver() {
        let builds = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&builds);
        let pool = PtrResolverPool::with_factory(Box::new(move || {
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                Ok(Arc::new(PanicsOn {
                    trigger: ip("6.6.6.6"),
                }))
            } else {
                Err("config unreadable".into())
            }
        }))
        .unwrap();
        let addr = Supervisor::start(|_| pool);
        addr.send(resolve(ip("6.6.6.6"))).await.unwrap();
        assert!(
            enrichd_testkit::eventually(Duration::from_secs(5), || {
                let builds = Arc::clone(&builds);
                async move { builds.load(Ordering::SeqCst) == 2 }
            })
            .await
        );
        let report = addr.send(resolve(ip("8.8.8.8"))).await.unwrap();
        assert_eq!(report.name.as_deref(), Some("fine.example"));
    }

    #[test]
    fn a_first_build_failure_is_returned_to_the_caller() {
        let result =
            PtrResolverPool::<PanicsOn>::with_factory(Box::new(|| Err("no servers".into())));
        assert_eq!(result.unwrap_err().to_string(), "no servers");
    }
}
