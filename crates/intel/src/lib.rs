//! Threat-intel providers for enrichd (SPEC §7): GreyNoise, AbuseIPDB, ThreatFox over HTTP and
//! the Feodo Tracker blocklist as a local index.
//!
//! Plain async library code, testable without actix: each provider implements
//! [`enrichd_core::ports::IntelProvider`] (one address in, a [`ProviderReport`] or a typed
//! [`ProviderError`] out) plus [`ProviderHooks`], the few extra questions the provider actor
//! asks (is the provider usable at all, does a call spend a cluster-wide slot, what did the
//! provider say about its quota). Retries, rate limits, parks and the circuit breaker are the
//! actor's policy, applied identically to every provider; the [`CircuitBreaker`] itself lives
//! here as a pure state machine.
//!
//! Every HTTP call goes through one pooled reqwest client per provider (rustls with the ring
//! provider, no redirects, proxy variables honoured), under a whole-call deadline that also
//! covers a body that trickles, with the body cap enforced while streaming.
//!
//! # Layout
//! - [`config`]: provider settings ([`ProviderConfig`], [`FeodoConfig`]) and why a provider
//!   cannot be built.
//! - [`hooks`]: the actor's extra questions ([`ProviderHooks`]).
//! - [`breaker`]: the pure [`CircuitBreaker`].
//! - [`greynoise`], [`abuseipdb`], [`feodo`], [`threatfox`]: the providers, each with a
//!   private `wire` module (serde DTOs and the pure wire → report mapping).
//! - `client` (private): the HTTP exchange, body cap, deadline and rate-limit headers.

pub mod abuseipdb;
pub mod breaker;
mod client;
pub mod config;
pub mod feodo;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod greynoise;
pub mod hooks;
mod json;
pub mod threatfox;

use enrichd_core::Secret;
use sha2::{Digest, Sha256};

pub use abuseipdb::AbuseIpdb;
pub use breaker::{Attempt, BreakerConfig, BreakerState, CircuitBreaker, Ticket};
pub use config::{BuildError, Disabled, FeodoConfig, ProviderConfig};
pub use feodo::{FeedError, Feodo, FeodoIndex, RefreshOutcome};
pub use greynoise::GreyNoise;
pub use hooks::{Availability, Observed, ProviderHooks, QuotaObservation};
pub use threatfox::ThreatFox;

#[doc(no_inline)]
pub use enrichd_core::{ProviderError, ProviderReport};

/// Installs rustls' ring crypto provider as the process default.
///
/// The workspace builds reqwest with `rustls-no-provider` (no aws-lc C build), and reqwest
/// panics when building a client without a process-level provider. Idempotent: a provider
/// already installed (by us or by `main`) is kept. Every client constructor here calls it.
pub fn install_crypto_provider() {
    // `Err` only means some provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A stable, non-reversible fingerprint of an API key: the first 16 hex characters of its
/// SHA-256. Stored with a key-rejection park so the park holds only while the configured key
/// is unchanged; safe to log.
pub fn key_fingerprint(key: &Secret) -> String {
    let digest = Sha256::digest(key.expose().as_bytes());
    digest
        .iter()
        .take(8)
        .fold(String::with_capacity(16), |mut out, byte| {
            use std::fmt::Write as _;
            let _ = write!(out, "{byte:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_a_sha256_prefix_and_hides_the_key() {
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(key_fingerprint(&Secret::new("abc")), "ba7816bf8f01cfea");
        assert_ne!(
            key_fingerprint(&Secret::new("key-one")),
            key_fingerprint(&Secret::new("key-two"))
        );
        assert!(!key_fingerprint(&Secret::new("hunter2")).contains("hunter2"));
    }

    #[test]
    fn crypto_provider_install_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
