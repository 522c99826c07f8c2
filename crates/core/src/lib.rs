//! The enrichd domain, with no I/O: what an attacker address is, which addresses may leave
//! the machine, what providers and PTR lookups can answer, when work falls due again, how
//! verdicts aggregate, the vocabulary of a job, and the ports the adapters implement. No actor
//! framework: the actor messages live in `enrichd-runtime`.
//!
//! Every other crate depends on this one and on nothing of each other's (adapters ← runtime
//! ← worker), so these types are the shared vocabulary of the whole service.
//!
//! # Layout
//! - [`ip`]: strict parsing and canonicalisation of attacker addresses.
//! - [`scope`]: the "global" predicate (IANA special-purpose snapshot) and operator exclusions.
//! - [`provider`]: provider ids, their answers and their typed failures.
//! - [`verdict`]: verdict labels and the aggregate rule.
//! - [`outcome`]: provider and PTR outcomes and their due-time rules.
//! - [`payload`]: the `attacker.intel.enriched` payload and the bus envelope.
//! - [`job`]: job ids, request origins, why a provider was not asked, provider answers.
//! - [`metric_names`]: Prometheus series names.
//! - [`ports`]: the traits adapters implement.
//! - [`secret`]: API keys that never print.
//! - [`text`]: truncation and sanitising of strings bound for size-limited columns.
//! - [`error`]: error-chain formatting for logs.

pub mod error;
pub mod ip;
pub mod job;
pub mod metric_names;
pub mod outcome;
pub mod payload;
pub mod ports;
pub mod provider;
pub mod scope;
pub mod secret;
pub mod text;
pub mod verdict;

pub use ip::{CanonicalIp, IpParseError};
pub use outcome::{Due, ProviderOutcome, PtrOutcome};
pub use provider::{ProviderError, ProviderFields, ProviderId, ProviderReport};
pub use scope::{AddressPolicy, AddressScope};
pub use secret::Secret;
pub use verdict::Verdict;
