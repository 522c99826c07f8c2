//! AbuseIPDB check API: `GET {base}/api/v2/check?ipAddress=<ip>&maxAgeInDays=30&verbose`
//! with `Key` and `Accept: application/json` (SPEC §7).
//!
//! Every response's `X-RateLimit-Remaining` / `X-RateLimit-Reset` are returned with the
//! result ([`ProviderHooks::lookup_observed`]) so the actor can share them cluster-wide.
//!
//! A 2xx answer is metered: it has spent a unit of the daily quota. If anything goes wrong
//! after one (a body that does not decode, is too large or trickles past the deadline), a
//! quick retry would spend quota again, so the lookup returns an `error` *report* with
//! `min_backoff` = 24 h instead of a bare [`ProviderError`]. The actor counts such a report
//! as a breaker-tripping failure.

pub(crate) mod wire;

use std::time::Duration;

use enrichd_core::ports::IntelProvider;
use enrichd_core::{CanonicalIp, ProviderError, ProviderId, ProviderReport};
use reqwest::header::HeaderValue;

use crate::client::{HttpClient, key_header, quota_observation};
use crate::config::{BuildError, Disabled, ProviderConfig};
use crate::hooks::{Observed, ProviderHooks};

/// Least wait before retrying an address whose metered answer could not be used.
pub const METERED_ERROR_BACKOFF: Duration = Duration::from_secs(24 * 3600);

/// The AbuseIPDB provider.
#[derive(Debug, Clone)]
pub struct AbuseIpdb {
    http: HttpClient,
    key: HeaderValue,
}

impl AbuseIpdb {
    /// Builds the provider.
    ///
    /// # Errors
    /// [`BuildError::Disabled`] without a key: the caller logs it once and runs without
    /// AbuseIPDB.
    pub fn new(config: &ProviderConfig) -> Result<Self, BuildError> {
        let key = config
            .key()
            .ok_or(BuildError::Disabled(Disabled::MissingKey(
                ProviderId::Abuseipdb,
            )))?;
        Ok(Self {
            key: key_header(ProviderId::Abuseipdb, key)?,
            http: HttpClient::new(ProviderId::Abuseipdb, config)?,
        })
    }

    async fn check(&self, ip: CanonicalIp) -> Observed {
        let url = self.http.url(&format!(
            "/api/v2/check?ipAddress={ip}&maxAgeInDays=30&verbose"
        ));
        let request = self
            .http
            .get(&url)
            .header("key", self.key.clone())
            .header("accept", "application/json");
        let exchange = match self.http.exchange(request).await {
            Ok(exchange) => exchange,
            Err(err) => {
                return Observed {
                    result: Err(err),
                    quota: None,
                };
            }
        };
        let now = chrono::Utc::now();
        Observed {
            quota: quota_observation(&exchange.headers, now),
            result: wire::report(exchange.status, &exchange.headers, exchange.body, now),
        }
    }
}

impl IntelProvider for AbuseIpdb {
    fn id(&self) -> ProviderId {
        ProviderId::Abuseipdb
    }

    async fn lookup(&self, ip: CanonicalIp) -> Result<ProviderReport, ProviderError> {
        self.check(ip).await.result
    }
}

impl ProviderHooks for AbuseIpdb {
    async fn lookup_observed(&self, ip: CanonicalIp) -> Observed {
        self.check(ip).await
    }
}
