//! What the provider actor asks a provider besides `lookup`.
//!
//! [`IntelProvider`] (in core) is the whole port for "ask about one address". The actor also
//! needs to know whether a provider can answer at all right now (Feodo's feed may be stale),
//! whether a call spends a cluster-wide rate-limit slot (Feodo's lookups are local), and what
//! the provider said about its quota on the way (AbuseIPDB's headers on every response).
//! Every method has a default that fits a plain HTTP provider, so a fake provider in a test
//! implements this trait with an empty `impl`.

use std::future::Future;

use chrono::{DateTime, Utc};
use enrichd_core::ports::IntelProvider;
use enrichd_core::{CanonicalIp, ProviderError, ProviderReport};

/// Whether a provider can answer before anything is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Ready to be asked.
    Ready,
    /// Its bulk data is missing or older than the staleness limit: the actor answers
    /// `ProviderUnavailable::Stale` and the work stays due.
    Stale,
}

/// What a provider said about its quota (`X-RateLimit-Remaining` / `X-RateLimit-Reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaObservation {
    /// Calls left in the current window.
    pub remaining: u32,
    /// When the window resets, if the provider said.
    pub reset_at: Option<DateTime<Utc>>,
}

/// One lookup's result plus the quota headers seen on its response.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The lookup result, exactly what [`IntelProvider::lookup`] returns.
    ///
    /// An `Ok` report whose outcome is `error` is a failure the provider already turned into
    /// a report because it needs more than a bare error (AbuseIPDB after a metered 2xx sets
    /// `min_backoff` to 24 h); the actor counts it as a breaker-tripping failure.
    pub result: Result<ProviderReport, ProviderError>,
    /// Quota headers, when the response carried them.
    pub quota: Option<QuotaObservation>,
}

/// The provider actor's extra questions; see the module docs.
pub trait ProviderHooks: IntelProvider {
    /// Whether each call must first reserve a cluster-wide rate-limit slot. `false` for
    /// local lookups (Feodo).
    fn metered(&self) -> bool {
        true
    }

    /// Whether the provider can say anything about `ip` at all. `false` (GreyNoise and IPv6)
    /// makes the actor answer `skipped_unsupported` before anything else: no rate slot, no
    /// quota unit, no wait behind a park or an open breaker for an answer known in advance.
    fn supports(&self, ip: CanonicalIp) -> bool {
        let _ = ip;
        true
    }

    /// Called before every lookup. Bulk providers refresh their data here when due (never a
    /// download per lookup) and report whether the data is usable.
    fn availability(&self) -> impl Future<Output = Availability> + Send {
        async { Availability::Ready }
    }

    /// [`IntelProvider::lookup`] plus the quota headers of the response.
    fn lookup_observed(&self, ip: CanonicalIp) -> impl Future<Output = Observed> + Send {
        async move {
            Observed {
                result: self.lookup(ip).await,
                quota: None,
            }
        }
    }
}
