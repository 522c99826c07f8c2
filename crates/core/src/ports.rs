//! The traits adapters implement, so actors can run against real adapters or test fakes.

use std::future::Future;
use std::time::Duration;

use crate::{CanonicalIp, ProviderError, ProviderId, ProviderReport, PtrOutcome};

/// What a reverse-DNS lookup produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtrReport {
    /// The typed outcome.
    pub outcome: PtrOutcome,
    /// The chosen name (lowercase, no trailing dot), for `ok`.
    pub name: Option<String>,
    /// The PTR record's TTL, for `ok`.
    pub record_ttl: Option<Duration>,
    /// With forward confirmation on: whether the name resolves back to the address.
    pub forward_confirmed: Option<bool>,
}

impl PtrReport {
    /// A report with no name.
    pub fn without_name(outcome: PtrOutcome) -> Self {
        Self {
            outcome,
            name: None,
            record_ttl: None,
            forward_confirmed: None,
        }
    }
}

/// A threat-intelligence source that can be asked about one address.
///
/// Implementations do no retries, rate limiting or circuit breaking: the provider actor
/// applies one policy to every provider so they all behave the same under failure.
pub trait IntelProvider: Send + Sync + 'static {
    /// Stable id: config key, `provider` log field, metric label, state-table value.
    fn id(&self) -> ProviderId;

    /// Asks about one global address.
    ///
    /// # Errors
    /// A [`ProviderError`] whose [`fate`](ProviderError::fate) decides what happens next.
    fn lookup(
        &self,
        ip: CanonicalIp,
    ) -> impl Future<Output = Result<ProviderReport, ProviderError>> + Send;
}

/// Reverse DNS for one address. Never fails: every failure is a [`PtrOutcome`].
pub trait PtrResolver: Send + Sync + 'static {
    /// Resolves the PTR name of one global address within the resolver's deadline.
    fn resolve(&self, ip: CanonicalIp) -> impl Future<Output = PtrReport> + Send;
}
