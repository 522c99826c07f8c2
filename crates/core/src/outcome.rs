//! What a lookup ended in, and when the work falls due again.
//!
//! The due-time rules live here, as pure functions, so the store, the actors and `lookup`
//! all schedule the same way and the table tests pin the contract (SPEC §5, §6, §7).

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

const MINUTE: Duration = Duration::from_mins(1);
const HOUR: Duration = Duration::from_hours(1);
const DAY: Duration = Duration::from_hours(24);

/// The outcome of asking one provider about one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderOutcome {
    /// The provider answered with data.
    Ok,
    /// The provider answered that it does not know the address.
    NotFound,
    /// The call failed (transport, 5xx, decode, unexpected answer).
    Error,
    /// The provider refused for its rate limit; the provider is parked.
    RateLimited,
    /// Our own daily quota for the provider is spent until it resets.
    SkippedQuota,
    /// The provider cannot answer for this address (IPv6 on GreyNoise, a 400).
    SkippedUnsupported,
    /// The address is not global; nothing was sent.
    SkippedNonGlobal,
}

impl ProviderOutcome {
    /// Every outcome, in declaration order.
    pub const ALL: [Self; 7] = [
        Self::Ok,
        Self::NotFound,
        Self::Error,
        Self::RateLimited,
        Self::SkippedQuota,
        Self::SkippedUnsupported,
        Self::SkippedNonGlobal,
    ];

    /// The stored and published label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NotFound => "not_found",
            Self::Error => "error",
            Self::RateLimited => "rate_limited",
            Self::SkippedQuota => "skipped_quota",
            Self::SkippedUnsupported => "skipped_unsupported",
            Self::SkippedNonGlobal => "skipped_non_global",
        }
    }

    /// Parses a stored label.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == label)
    }

    /// Whether the provider gave an answer whose columns belong in the row.
    pub fn is_answer(self) -> bool {
        matches!(self, Self::Ok | Self::NotFound)
    }

    /// Whether this outcome counts as a failed attempt for per-IP backoff.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Error)
    }

    /// When the (IP, provider) work falls due again.
    ///
    /// `attempts` counts consecutive failures including this one (1 for the first error).
    /// `resume_at` is when the provider's park or quota resets, for the outcomes that wait on
    /// it. `min_backoff` lets a provider demand a longer wait after an error (AbuseIPDB after a
    /// metered 2xx: a retry would spend quota again).
    pub fn due(
        self,
        attempts: u32,
        ttl: Duration,
        resume_at: Option<DateTime<Utc>>,
        min_backoff: Option<Duration>,
    ) -> Due {
        match self {
            Self::Ok | Self::NotFound => Due::After(ttl),
            Self::Error => {
                let backoff = doubling(5 * MINUTE, attempts, 6 * HOUR);
                Due::After(min_backoff.map_or(backoff, |floor| backoff.max(floor)))
            }
            Self::RateLimited | Self::SkippedQuota => resume_at.map_or(Due::After(HOUR), Due::At),
            Self::SkippedUnsupported | Self::SkippedNonGlobal => Due::Never,
        }
    }
}

impl fmt::Display for ProviderOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of a reverse-DNS (PTR) lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PtrOutcome {
    /// A usable name.
    Ok,
    /// NXDOMAIN or NODATA: the address has no name.
    Nxdomain,
    /// SERVFAIL, REFUSED, FORMERR or NOTIMP: the answer is unknown.
    Servfail,
    /// No answer within the deadline.
    Timeout,
    /// A name came back but is unusable (too long, non-printable bytes).
    InvalidName,
    /// The address is not global; nothing was sent.
    SkippedNonGlobal,
    /// PTR resolution is switched off.
    Disabled,
}

impl PtrOutcome {
    /// Every outcome, in declaration order.
    pub const ALL: [Self; 7] = [
        Self::Ok,
        Self::Nxdomain,
        Self::Servfail,
        Self::Timeout,
        Self::InvalidName,
        Self::SkippedNonGlobal,
        Self::Disabled,
    ];

    /// The stored and published label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Nxdomain => "nxdomain",
            Self::Servfail => "servfail",
            Self::Timeout => "timeout",
            Self::InvalidName => "invalid_name",
            Self::SkippedNonGlobal => "skipped_non_global",
            Self::Disabled => "disabled",
        }
    }

    /// Parses a stored label.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == label)
    }

    /// Whether this outcome is a failure that backs off (and never replaces a good name).
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Servfail | Self::Timeout)
    }

    /// When the PTR work falls due again.
    ///
    /// `attempts` counts consecutive failures including this one; `record_ttl` is the PTR
    /// record's own TTL for `ok`.
    pub fn due(self, attempts: u32, record_ttl: Option<Duration>) -> Due {
        match self {
            Self::Ok => Due::After(record_ttl.unwrap_or(HOUR).clamp(HOUR, 7 * DAY)),
            // An unusable name is as final as no name; asking again sooner would not help.
            Self::Nxdomain | Self::InvalidName => Due::After(DAY),
            Self::Servfail | Self::Timeout => Due::After(doubling(15 * MINUTE, attempts, DAY)),
            Self::SkippedNonGlobal | Self::Disabled => Due::Never,
        }
    }
}

impl fmt::Display for PtrOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When work falls due again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// This long after the answer (measured on the database clock by the store).
    After(Duration),
    /// At an absolute time (a provider's reset).
    At(DateTime<Utc>),
    /// Not unless the configuration changes.
    Never,
}

impl Due {
    /// The absolute due time given the current (database) time; `None` for [`Due::Never`].
    pub fn at(self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::After(wait) => chrono::Duration::from_std(wait).ok().map(|w| now + w),
            Self::At(at) => Some(at),
            Self::Never => None,
        }
    }
}

/// `base` doubled per extra attempt, capped at `cap`: 1 → base, 2 → 2·base, …
pub fn doubling(base: Duration, attempts: u32, cap: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).min(31);
    base.checked_mul(1u32 << doublings)
        .map_or(cap, |d| d.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const TTL: Duration = Duration::from_secs(24 * 3600);

    fn mins(m: u64) -> Duration {
        Duration::from_secs(m * 60)
    }

    #[test]
    fn provider_due_times() {
        let reset = Utc.with_ymd_and_hms(2026, 11, 24, 0, 0, 0).unwrap();
        let cases = [
            (ProviderOutcome::Ok, 0, None, None, Due::After(TTL)),
            (ProviderOutcome::NotFound, 0, None, None, Due::After(TTL)),
            (ProviderOutcome::Error, 1, None, None, Due::After(mins(5))),
            (ProviderOutcome::Error, 2, None, None, Due::After(mins(10))),
            (ProviderOutcome::Error, 3, None, None, Due::After(mins(20))),
            (ProviderOutcome::Error, 7, None, None, Due::After(mins(320))),
            (ProviderOutcome::Error, 8, None, None, Due::After(mins(360))),
            (
                ProviderOutcome::Error,
                500,
                None,
                None,
                Due::After(mins(360)),
            ),
            (
                ProviderOutcome::Error,
                1,
                None,
                Some(mins(1440)),
                Due::After(mins(1440)),
            ),
            (
                ProviderOutcome::RateLimited,
                0,
                Some(reset),
                None,
                Due::At(reset),
            ),
            (
                ProviderOutcome::RateLimited,
                0,
                None,
                None,
                Due::After(mins(60)),
            ),
            (
                ProviderOutcome::SkippedQuota,
                0,
                Some(reset),
                None,
                Due::At(reset),
            ),
            (
                ProviderOutcome::SkippedUnsupported,
                0,
                None,
                None,
                Due::Never,
            ),
            (ProviderOutcome::SkippedNonGlobal, 0, None, None, Due::Never),
        ];
        for (outcome, attempts, resume, floor, expected) in cases {
            assert_eq!(
                outcome.due(attempts, TTL, resume, floor),
                expected,
                "{outcome} x{attempts}"
            );
        }
    }

    #[test]
    fn ptr_due_times() {
        let cases = [
            (
                PtrOutcome::Ok,
                0,
                Some(Duration::from_secs(300)),
                Due::After(mins(60)),
            ),
            (PtrOutcome::Ok, 0, Some(mins(600)), Due::After(mins(600))),
            (
                PtrOutcome::Ok,
                0,
                Some(mins(60 * 24 * 30)),
                Due::After(mins(60 * 24 * 7)),
            ),
            (PtrOutcome::Ok, 0, None, Due::After(mins(60))),
            (PtrOutcome::Nxdomain, 0, None, Due::After(mins(1440))),
            (PtrOutcome::InvalidName, 0, None, Due::After(mins(1440))),
            (PtrOutcome::Servfail, 1, None, Due::After(mins(15))),
            (PtrOutcome::Timeout, 2, None, Due::After(mins(30))),
            (PtrOutcome::Timeout, 7, None, Due::After(mins(960))),
            (PtrOutcome::Servfail, 8, None, Due::After(mins(1440))),
            (PtrOutcome::Servfail, 40, None, Due::After(mins(1440))),
            (PtrOutcome::SkippedNonGlobal, 0, None, Due::Never),
            (PtrOutcome::Disabled, 0, None, Due::Never),
        ];
        for (outcome, attempts, ttl, expected) in cases {
            assert_eq!(
                outcome.due(attempts, ttl),
                expected,
                "{outcome} x{attempts}"
            );
        }
    }

    #[test]
    fn due_resolves_against_the_given_clock() {
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
        assert_eq!(
            Due::After(mins(5)).at(now),
            Some(now + chrono::Duration::minutes(5))
        );
        assert_eq!(Due::At(now).at(now), Some(now));
        assert_eq!(Due::Never.at(now), None);
    }

    #[test]
    fn labels_round_trip() {
        for o in ProviderOutcome::ALL {
            assert_eq!(ProviderOutcome::from_label(o.as_str()), Some(o));
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        }
        for o in PtrOutcome::ALL {
            assert_eq!(PtrOutcome::from_label(o.as_str()), Some(o));
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        }
    }
}
