//! The traits adapters implement, so actors can run against real adapters or test fakes.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};

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

/// The limits one provider key is held to, cluster-wide.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderLimits {
    /// Calls per second across the cluster; `0.0` = unlimited.
    pub rate_per_sec: f64,
    /// Calls per UTC day across the cluster; `0` = unlimited.
    pub daily_quota: u32,
    /// SHA-256 prefix of the configured key (`None` without a key). A key-rejection park
    /// holds only while this still matches.
    pub key_fingerprint: Option<String>,
}

/// The answer to a slot reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Call after `wait` (the reserved slot, measured on the database clock).
    Granted {
        /// How long to wait before sending.
        wait: Duration,
        /// Quota left after this call, when a quota applies.
        quota_remaining: Option<u32>,
    },
    /// The next free slot is too far ahead to hold a job for; try again at `retry_at`.
    Busy {
        /// When a slot is likely free.
        retry_at: DateTime<Utc>,
    },
    /// Parked for a rate limit until `until`.
    Parked {
        /// End of the park.
        until: DateTime<Utc>,
    },
    /// Parked because this key was rejected; lifts when the configured key changes.
    KeyRejected,
    /// The daily quota is spent until `reset_at`.
    QuotaExhausted {
        /// When the quota resets.
        reset_at: DateTime<Utc>,
    },
}

/// Something a provider told us about its limits, to be shared with every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateEvent {
    /// Quota headers (`X-RateLimit-Remaining` / `X-RateLimit-Reset`).
    QuotaObserved {
        /// Calls left.
        remaining: u32,
        /// When the quota resets, if the provider said.
        reset_at: Option<DateTime<Utc>>,
    },
    /// A 429 / 402 / `ratelimited`: park until then.
    Park {
        /// End of the park.
        until: DateTime<Utc>,
    },
    /// 401 / 403 / `unknown_auth_key` for the key with this fingerprint.
    KeyRejected {
        /// SHA-256 prefix of the rejected key.
        key_fingerprint: String,
    },
}

/// Cluster-wide rate, quota and park state per provider key (implemented by the store).
pub trait ProviderGate: Send + Sync + 'static {
    /// Error type of the backing store.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reserves one call slot for `provider` under `limits`, on the database clock, so any
    /// number of replicas together stay within the limits.
    fn reserve(
        &self,
        provider: ProviderId,
        limits: &ProviderLimits,
    ) -> impl Future<Output = Result<Reservation, Self::Error>> + Send;

    /// Records what the provider said about its limits.
    fn record(
        &self,
        provider: ProviderId,
        event: GateEvent,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The end of a park in force for `provider`, if any: checked again after waiting for a
    /// slot, because another replica may have been told to back off meanwhile.
    fn parked_until(
        &self,
        provider: ProviderId,
    ) -> impl Future<Output = Result<Option<DateTime<Utc>>, Self::Error>> + Send;
}
