//! The enrichd actor system (SPEC §3): thin actix shells around the adapter crates.
//!
//! # Layout
//! - [`supervision`]: restart budgets and panic containment shared by every supervised actor.
//! - [`ptr_pool`]: `PtrResolverPool`, bounded concurrency over the DNS adapter.
//! - [`provider_actor`]: `ProviderActor`, one per provider: concurrency cap, circuit breaker,
//!   cluster-wide slot reservation, parks.

pub mod provider_actor;
pub mod ptr_pool;
pub mod supervision;
