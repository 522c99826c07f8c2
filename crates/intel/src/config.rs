//! Per-provider settings and why a provider cannot be built.
//!
//! The worker's configuration loader fills these from `ENRICHD_<PROVIDER>_*`; the defaults
//! are the contract's (SPEC §7, §9).

use std::time::Duration;

use enrichd_core::{ProviderId, Secret};

/// Whole-call deadline (request, headers and body).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Body cap for per-IP answers.
pub const DEFAULT_BODY_LIMIT: u64 = 4 * 1024 * 1024;
/// Body cap for AbuseIPDB, whose verbose answer carries up to thousands of reports.
pub const ABUSEIPDB_BODY_LIMIT: u64 = 32 * 1024 * 1024;
/// Body cap for the Feodo feed.
pub const FEED_BODY_LIMIT: u64 = 64 * 1024 * 1024;
/// A neutral `User-Agent` (the reference's): never name the project or honeypots.
pub const DEFAULT_USER_AGENT: &str = "curl/7.88.1";
/// How often the Feodo feed is refreshed.
pub const DEFAULT_FEODO_REFRESH: Duration = Duration::from_secs(3600);
/// How old the Feodo data may get before the provider is unavailable.
pub const DEFAULT_FEODO_MAX_AGE: Duration = Duration::from_secs(86_400);

/// The real public endpoint base of a provider.
pub fn default_base_url(provider: ProviderId) -> &'static str {
    match provider {
        ProviderId::Greynoise => "https://api.greynoise.io",
        ProviderId::Abuseipdb => "https://api.abuseipdb.com",
        ProviderId::Feodo => "https://feodotracker.abuse.ch",
        ProviderId::Threatfox => "https://threatfox-api.abuse.ch",
    }
}

/// How to reach one provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    /// Scheme, host and optional path prefix (`ENRICHD_<PROVIDER>_BASE_URL`); a trailing
    /// slash is ignored.
    pub base_url: String,
    /// The API key; `None` (or empty) means no key.
    pub api_key: Option<Secret>,
    /// Whole-call deadline, covering a body that trickles.
    pub timeout: Duration,
    /// Largest body accepted; a larger one is an error, detected while streaming.
    pub body_limit: u64,
    /// The `User-Agent` header.
    pub user_agent: String,
}

impl ProviderConfig {
    /// The contract's defaults for `provider`: real base URL, no key, 10 s, its body cap.
    pub fn defaults(provider: ProviderId) -> Self {
        Self {
            base_url: default_base_url(provider).to_owned(),
            api_key: None,
            timeout: DEFAULT_TIMEOUT,
            body_limit: match provider {
                ProviderId::Abuseipdb => ABUSEIPDB_BODY_LIMIT,
                ProviderId::Feodo => FEED_BODY_LIMIT,
                ProviderId::Greynoise | ProviderId::Threatfox => DEFAULT_BODY_LIMIT,
            },
            user_agent: DEFAULT_USER_AGENT.to_owned(),
        }
    }

    /// Replaces the base URL.
    #[must_use]
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Self {
        self.base_url = base_url.into();
        self
    }

    /// Sets the key; an empty key counts as none.
    #[must_use]
    pub fn with_api_key(mut self, key: Option<Secret>) -> Self {
        self.api_key = key.filter(|k| !k.is_empty());
        self
    }

    /// Replaces the whole-call deadline.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Replaces the body cap.
    #[must_use]
    pub fn with_body_limit(mut self, body_limit: u64) -> Self {
        self.body_limit = body_limit;
        self
    }

    /// The key, unless absent or empty.
    pub(crate) fn key(&self) -> Option<&Secret> {
        self.api_key.as_ref().filter(|k| !k.is_empty())
    }
}

/// The Feodo feed: where it is and how fresh it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeodoConfig {
    /// Transport settings; `api_key` is sent as `Auth-Key` when set.
    pub http: ProviderConfig,
    /// Refresh interval (`ENRICHD_FEODO_REFRESH_SECS`).
    pub refresh: Duration,
    /// Data older than this makes the provider unavailable (`ENRICHD_FEODO_MAX_AGE_SECS`).
    pub max_age: Duration,
}

impl Default for FeodoConfig {
    fn default() -> Self {
        Self {
            http: ProviderConfig::defaults(ProviderId::Feodo),
            refresh: DEFAULT_FEODO_REFRESH,
            max_age: DEFAULT_FEODO_MAX_AGE,
        }
    }
}

/// Why a provider is switched off rather than failing per address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Disabled {
    /// The provider requires a key and none is configured.
    #[error("no api key configured (set ENRICHD_{env}_API_KEY)", env = .0.env_name())]
    MissingKey(ProviderId),
}

/// Why a provider could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The provider is disabled by configuration: log this once at start-up and run
    /// without it.
    #[error("{} disabled", .0.provider())]
    Disabled(#[source] Disabled),
    /// The base URL is not an absolute `http`/`https` URL.
    #[error("invalid base url for {provider}: {reason}")]
    BaseUrl {
        /// The provider.
        provider: ProviderId,
        /// What is wrong with it.
        reason: String,
    },
    /// The key cannot be sent in an HTTP header (control characters). The key itself is
    /// never shown.
    #[error("api key for {0} contains characters not allowed in an http header")]
    KeyNotHeaderSafe(ProviderId),
    /// The HTTP client could not be built (TLS set-up).
    #[error("cannot build the http client for {provider}")]
    Client {
        /// The provider.
        provider: ProviderId,
        /// reqwest's reason.
        #[source]
        source: reqwest::Error,
    },
}

impl Disabled {
    /// The provider that is disabled.
    pub fn provider(self) -> ProviderId {
        match self {
            Self::MissingKey(provider) => provider,
        }
    }
}

impl BuildError {
    /// Whether the provider is merely disabled (not a configuration error).
    pub fn is_disabled(&self) -> bool {
        matches!(self, Self::Disabled(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_contract() {
        let abuse = ProviderConfig::defaults(ProviderId::Abuseipdb);
        assert_eq!(abuse.body_limit, 32 * 1024 * 1024);
        assert_eq!(abuse.timeout, Duration::from_secs(10));
        assert_eq!(abuse.user_agent, "curl/7.88.1");
        assert_eq!(
            ProviderConfig::defaults(ProviderId::Greynoise).body_limit,
            4 * 1024 * 1024
        );
        let feodo = FeodoConfig::default();
        assert_eq!(feodo.http.body_limit, 64 * 1024 * 1024);
        assert_eq!(feodo.refresh, Duration::from_secs(3600));
        assert_eq!(feodo.max_age, Duration::from_secs(86_400));
    }

    #[test]
    fn empty_key_is_no_key() {
        let config =
            ProviderConfig::defaults(ProviderId::Threatfox).with_api_key(Some(Secret::new(" \n")));
        assert!(config.api_key.is_none());
    }

    #[test]
    fn disabled_reason_names_the_variable_not_a_key() {
        let err = BuildError::Disabled(Disabled::MissingKey(ProviderId::Abuseipdb));
        assert_eq!(err.to_string(), "abuseipdb disabled");
        assert_eq!(
            enrichd_core::error::chain(&err),
            "abuseipdb disabled: no api key configured (set ENRICHD_ABUSEIPDB_API_KEY)"
        );
        assert!(err.is_disabled());
    }
}
