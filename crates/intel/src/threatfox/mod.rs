//! ThreatFox IOC search: `POST {base}/api/v1/` with
//! `{"query":"search_ioc","search_term":"<ip>"}` and `Auth-Key` (SPEC §7).
//!
//! The search matches substrings (`45.155.205.233` also finds `145.155.205.233:8080`), so
//! entries are filtered to those that really are this address: the bare IP, `ip:port`
//! (`[v6]:port` for IPv6), or a URL whose host is the IP.

pub(crate) mod wire;

use enrichd_core::ports::IntelProvider;
use enrichd_core::{CanonicalIp, ProviderError, ProviderId, ProviderReport};
use reqwest::header::HeaderValue;

use crate::client::{HttpClient, key_header};
use crate::config::{BuildError, Disabled, ProviderConfig};
use crate::hooks::ProviderHooks;

/// The ThreatFox provider.
#[derive(Debug, Clone)]
pub struct ThreatFox {
    http: HttpClient,
    key: HeaderValue,
}

impl ThreatFox {
    /// Builds the provider.
    ///
    /// # Errors
    /// [`BuildError::Disabled`] without a key (required since 2025): the caller logs it once
    /// and runs without ThreatFox.
    pub fn new(config: &ProviderConfig) -> Result<Self, BuildError> {
        let key = config
            .key()
            .ok_or(BuildError::Disabled(Disabled::MissingKey(
                ProviderId::Threatfox,
            )))?;
        Ok(Self {
            key: key_header(ProviderId::Threatfox, key)?,
            http: HttpClient::new(ProviderId::Threatfox, config)?,
        })
    }
}

impl IntelProvider for ThreatFox {
    fn id(&self) -> ProviderId {
        ProviderId::Threatfox
    }

    async fn lookup(&self, ip: CanonicalIp) -> Result<ProviderReport, ProviderError> {
        let url = self.http.url("/api/v1/");
        let query = serde_json::json!({"query": "search_ioc", "search_term": ip.to_string()});
        let request = self
            .http
            .post(&url)
            .header("auth-key", self.key.clone())
            .header("accept", "application/json")
            .json(&query);
        let exchange = self.http.exchange(request).await?;
        wire::report(
            exchange.status,
            &exchange.headers,
            exchange.body,
            ip,
            chrono::Utc::now(),
        )
    }
}

impl ProviderHooks for ThreatFox {}
