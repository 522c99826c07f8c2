//! Reverse DNS for enrichd (SPEC §6): PTR lookups over hickory-resolver, mapped onto enrichd's
//! own [`PtrOutcome`](enrichd_core::PtrOutcome)s and name rules.
//!
//! This is a plain async library, testable without actix. In the actor graph it sits behind
//! `PtrResolverPool` (enrichd-runtime), which forwards `ResolvePtr` messages to a
//! [`HickoryPtrResolver`] through the [`PtrResolver`](enrichd_core::ports::PtrResolver) port.
//!
//! # Layout
//! - [`config`]: [`DnsConfig`], the section an operator sets (`ENRICHD_DNS_*`, `ENRICHD_PTR_FCRDNS`).
//! - `name` (private): choosing and validating the name among PTR targets (pure).
//! - [`resolver`]: [`HickoryPtrResolver`]: deadline, concurrency, outcome mapping, FCrDNS.
//!
//! # Concurrency and deadlines
//! Each lookup first waits for a permit of the resolver's own semaphore (`concurrency`
//! permits, default 10), then runs under an outer `tokio::time::timeout` of `timeout`
//! (default 2 s) that covers the whole lookup, forward confirmation included. Waiting for a
//! permit is not counted against the deadline, so a lookup that got its permit always has its
//! full time, and a permit is never held longer than one deadline: a silent server turns 100
//! queued lookups into at most `timeout × ceil(100 / concurrency)` of work, never a pile-up.
//!
//! The semaphore belongs to one resolver instance, that is to one set of nameservers. It is
//! deliberately not a process-wide limit: two resolvers pointed at different servers never
//! share a budget, so a dead server cannot starve lookups sent to a healthy one (tested).
//! Within one server set, hickory races each query to two servers at once and ranks them by
//! response time, so a dead server among healthy ones costs no lookup its deadline (tested).
//! What one semaphore cannot do is tell apart, in advance, lookups that will be slow because
//! of a slow authoritative server *behind* a healthy recursive resolver; those queue with the
//! rest, bounded by the rule above. The pool does no retries: the caller's due-time rules
//! (`PtrOutcome::due`) retry later, with backoff, instead of holding a permit.

pub mod config;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod name;
pub mod resolver;

pub use config::DnsConfig;
pub use resolver::{DnsError, HickoryPtrResolver};
