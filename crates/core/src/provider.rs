//! Threat-intel providers: their ids, what an answer carries, and how a call can fail.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{ProviderOutcome, Verdict};

/// A provider. The lowercase id appears unchanged in config keys, log fields, metric labels
/// and the state tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderId {
    /// GreyNoise community API.
    Greynoise,
    /// AbuseIPDB check API.
    Abuseipdb,
    /// abuse.ch Feodo Tracker IP blocklist (bulk feed).
    Feodo,
    /// abuse.ch `ThreatFox` IOC search.
    Threatfox,
}

impl ProviderId {
    /// Every provider, in the contract's order.
    pub const ALL: [Self; 4] = [
        Self::Greynoise,
        Self::Abuseipdb,
        Self::Feodo,
        Self::Threatfox,
    ];

    /// The provider's id.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Greynoise => "greynoise",
            Self::Abuseipdb => "abuseipdb",
            Self::Feodo => "feodo",
            Self::Threatfox => "threatfox",
        }
    }

    /// Parses an id (exact, lowercase).
    pub fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == id)
    }

    /// The id in upper case, as it appears in `ENRICHD_<PROVIDER>_*` variables.
    pub fn env_name(self) -> &'static str {
        match self {
            Self::Greynoise => "GREYNOISE",
            Self::Abuseipdb => "ABUSEIPDB",
            Self::Feodo => "FEODO",
            Self::Threatfox => "THREATFOX",
        }
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The compatible `attacker_intel` columns one provider's answer fills.
///
/// An answer (`ok` or `not_found`) always carries all of its provider's columns, so a
/// negative answer clears stale positives; an error carries none and leaves them as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "snake_case")]
pub enum ProviderFields {
    /// `greynoise_*` columns.
    Greynoise {
        /// Lowercased classification; `unknown` on 404.
        classification: String,
        /// Actor label, when a non-empty string.
        name: Option<String>,
        /// Tags, when a list of strings.
        tags: Vec<String>,
    },
    /// `abuseipdb_*` columns.
    Abuseipdb {
        /// `abuseConfidenceScore`, 0..=100.
        score: i32,
        /// Sorted unique report categories.
        categories: Vec<i64>,
    },
    /// `feodo_*` columns.
    Feodo {
        /// Whether the address is on the blocklist.
        listed: bool,
        /// The first entry's `malware`.
        malware_family: Option<String>,
    },
    /// `threatfox_*` columns.
    Threatfox {
        /// Whether an entry really is this address.
        listed: bool,
        /// Sorted unique `threat_type`s.
        threat_types: Vec<String>,
        /// Sorted unique `ioc_type`s.
        ioc_types: Vec<String>,
        /// Sorted unique `malware` (fallback `malware_printable`).
        malware_families: Vec<String>,
    },
}

impl ProviderFields {
    /// The provider these columns belong to.
    pub fn provider(&self) -> ProviderId {
        match self {
            Self::Greynoise { .. } => ProviderId::Greynoise,
            Self::Abuseipdb { .. } => ProviderId::Abuseipdb,
            Self::Feodo { .. } => ProviderId::Feodo,
            Self::Threatfox { .. } => ProviderId::Threatfox,
        }
    }
}

/// What one call to one provider about one address produced, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderReport {
    /// Who answered.
    pub provider: ProviderId,
    /// The typed outcome.
    pub outcome: ProviderOutcome,
    /// The provider's verdict; `None` is "no opinion" and is ignored by the aggregate.
    pub verdict: Option<Verdict>,
    /// Columns to write; `Some` exactly for `ok` and `not_found`.
    pub fields: Option<ProviderFields>,
    /// The raw body kept for analysts (already cut as the contract says); `{}` when none.
    /// Shared, not owned: a report is copied into the pass's write, the stored state and the
    /// compatible row, and deep copies of the body were the write path's largest cost.
    pub raw: Arc<serde_json::Value>,
    /// A short reason for `error` outcomes, safe to log and store (never a secret or a body).
    pub error: Option<String>,
    /// For `rate_limited` / `skipped_quota`: when the provider may be asked again.
    pub resume_at: Option<DateTime<Utc>>,
    /// For `error`: the least time to wait before retrying, when the provider demands it.
    pub min_backoff: Option<Duration>,
}

impl ProviderReport {
    /// A report with no answer columns (skips and errors).
    pub fn bare(provider: ProviderId, outcome: ProviderOutcome) -> Self {
        Self {
            provider,
            outcome,
            verdict: None,
            fields: None,
            raw: Arc::new(serde_json::Value::Object(serde_json::Map::new())),
            error: None,
            resume_at: None,
            min_backoff: None,
        }
    }

    /// An answer (`ok` / `not_found`) with its columns, verdict and raw body.
    pub fn answer(
        outcome: ProviderOutcome,
        verdict: Option<Verdict>,
        fields: ProviderFields,
        raw: impl Into<Arc<serde_json::Value>>,
    ) -> Self {
        Self {
            provider: fields.provider(),
            outcome,
            verdict,
            fields: Some(fields),
            raw: raw.into(),
            error: None,
            resume_at: None,
            min_backoff: None,
        }
    }

    /// An `error` outcome with a short reason.
    pub fn error(provider: ProviderId, reason: impl Into<String>) -> Self {
        Self {
            error: Some(reason.into()),
            ..Self::bare(provider, ProviderOutcome::Error)
        }
    }
}

/// Why a provider call produced no answer. Each variant has exactly one fate, decided by
/// [`ProviderError::fate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// 429 / 402 / `ratelimited`: the provider is parked until `resume_at`.
    #[error("rate limited by the provider")]
    RateLimited {
        /// From `Retry-After`, else `X-RateLimit-Reset`, else one hour; at most 24 h.
        resume_at: DateTime<Utc>,
    },
    /// 401 / 403 / `unknown_auth_key`: the configured key is refused.
    #[error("api key rejected")]
    KeyRejected,
    /// No response within the whole-call deadline (including a body that trickles).
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Connect, TLS or I/O failure.
    #[error("transport failure: {0}")]
    Transport(String),
    /// A 5xx answer.
    #[error("server error {status}")]
    Server {
        /// The HTTP status.
        status: u16,
    },
    /// The body did not match the wire contract (HTML, truncated JSON, wrong types).
    #[error("undecodable response: {0}")]
    Decode(String),
    /// The body exceeded the size cap.
    #[error("response body over {limit_bytes} bytes")]
    TooLarge {
        /// The cap that was exceeded.
        limit_bytes: u64,
    },
    /// A 4xx (or an API status) that retrying soon will not fix.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

/// What to do about a provider failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderFate {
    /// Park the provider (cluster-wide) until the time given; the IP stays due.
    ParkUntil(DateTime<Utc>),
    /// Park the provider until its configured key changes; the IP stays due.
    ParkUntilKeyChanges,
    /// Record an `error` outcome for the IP and back off; `trips_breaker` says whether it
    /// counts towards opening the circuit breaker.
    RecordError {
        /// Timeouts, transport errors, 5xx and decode errors count; 4xx answers do not.
        trips_breaker: bool,
    },
}

impl ProviderError {
    /// The one place that decides what a provider failure leads to.
    pub fn fate(&self) -> ProviderFate {
        match self {
            Self::RateLimited { resume_at } => ProviderFate::ParkUntil(*resume_at),
            Self::KeyRejected => ProviderFate::ParkUntilKeyChanges,
            Self::Timeout(_)
            | Self::Transport(_)
            | Self::Server { .. }
            | Self::Decode(_)
            | Self::TooLarge { .. } => ProviderFate::RecordError {
                trips_breaker: true,
            },
            Self::Unexpected(_) => ProviderFate::RecordError {
                trips_breaker: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_in_contract_order() {
        let ids: Vec<_> = ProviderId::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(ids, ["greynoise", "abuseipdb", "feodo", "threatfox"]);
        for p in ProviderId::ALL {
            assert_eq!(ProviderId::from_id(p.as_str()), Some(p));
            assert_eq!(p.env_name(), p.as_str().to_uppercase());
        }
        assert_eq!(ProviderId::from_id("GreyNoise"), None);
    }

    #[test]
    fn fate_of_every_failure() {
        let at = DateTime::<Utc>::UNIX_EPOCH;
        let cases = [
            (
                ProviderError::RateLimited { resume_at: at },
                ProviderFate::ParkUntil(at),
            ),
            (
                ProviderError::KeyRejected,
                ProviderFate::ParkUntilKeyChanges,
            ),
            (
                ProviderError::Timeout(Duration::from_secs(10)),
                ProviderFate::RecordError {
                    trips_breaker: true,
                },
            ),
            (
                ProviderError::Transport("connection refused".into()),
                ProviderFate::RecordError {
                    trips_breaker: true,
                },
            ),
            (
                ProviderError::Server { status: 503 },
                ProviderFate::RecordError {
                    trips_breaker: true,
                },
            ),
            (
                ProviderError::Decode("html".into()),
                ProviderFate::RecordError {
                    trips_breaker: true,
                },
            ),
            (
                ProviderError::TooLarge { limit_bytes: 1 },
                ProviderFate::RecordError {
                    trips_breaker: true,
                },
            ),
            (
                ProviderError::Unexpected("422".into()),
                ProviderFate::RecordError {
                    trips_breaker: false,
                },
            ),
        ];
        for (err, fate) in cases {
            assert_eq!(err.fate(), fate, "{err}");
        }
    }

    #[test]
    fn answers_carry_their_provider() {
        let report = ProviderReport::answer(
            ProviderOutcome::Ok,
            Some(Verdict::Malicious),
            ProviderFields::Feodo {
                listed: true,
                malware_family: Some("QakBot".into()),
            },
            serde_json::json!({}),
        );
        assert_eq!(report.provider, ProviderId::Feodo);
        let err = ProviderReport::error(ProviderId::Greynoise, "server error 503");
        assert_eq!(err.outcome, ProviderOutcome::Error);
        assert!(err.fields.is_none());
    }
}
