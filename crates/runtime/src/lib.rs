//! The enrichd actor system (SPEC §3): thin actix shells around the adapter crates.
//!
//! # Layout
//! - [`messages`]: every message the actors exchange (the protocol, in one place).
//! - [`acks`]: coalesced acknowledgements of one consuming channel.
//! - [`job`]: one enrichment pass for one address (claim, ask, write).
//! - [`coordinator`]: `Coordinator`, the root: shutdown order and exit code.
//! - [`bus_listener`]: `BusListener`, consuming, settling, relay and health beats.
//! - [`health`]: the health beat's contents.
//! - [`backfill`]: the backlog loop (poll mode, and the safety net in bus mode).
//! - [`relay`]: the outbox relay (confirmed publishing of results).
//! - [`aggregator`]: `Aggregator`, single-flight jobs per address and the durable point.
//! - [`repository_writer`]: `RepositoryWriter`, the actor that owns the writes: intake, claims
//!   and results gathered into shared transactions, on an arbiter of its own.
//! - [`supervision`]: restart budgets and panic containment shared by every supervised actor.
//! - [`ptr_pool`]: `PtrResolverPool`, bounded concurrency over the DNS adapter.
//! - [`provider_actor`]: `ProviderActor`, one per provider: concurrency cap, circuit breaker,
//!   cluster-wide slot reservation, parks.

pub mod acks;
pub mod aggregator;
pub mod backfill;
pub mod bus_listener;
pub mod coordinator;
pub mod health;
pub mod job;
pub mod messages;
pub mod provider_actor;
pub mod ptr_pool;
pub mod relay;
pub mod repository_writer;
pub mod supervision;
