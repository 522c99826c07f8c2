//! GreyNoise community API: `GET {base}/v3/community/{ip}`, IPv4 only (SPEC §7).
//!
//! The key is optional: the community endpoint answers without one, at a lower limit, so
//! the `key` header is sent only when a key is configured.

pub(crate) mod wire;

use enrichd_core::ports::IntelProvider;
use enrichd_core::{CanonicalIp, ProviderError, ProviderId, ProviderOutcome, ProviderReport};
use reqwest::header::HeaderValue;

use crate::client::{HttpClient, key_header};
use crate::config::{BuildError, ProviderConfig};
use crate::hooks::ProviderHooks;

/// The GreyNoise provider.
#[derive(Debug, Clone)]
pub struct GreyNoise {
    http: HttpClient,
    key: Option<HeaderValue>,
}

impl GreyNoise {
    /// Builds the provider and its pooled client.
    pub fn new(config: &ProviderConfig) -> Result<Self, BuildError> {
        let key = config
            .key()
            .map(|k| key_header(ProviderId::Greynoise, k))
            .transpose()?;
        Ok(Self {
            http: HttpClient::new(ProviderId::Greynoise, config)?,
            key,
        })
    }
}

impl IntelProvider for GreyNoise {
    fn id(&self) -> ProviderId {
        ProviderId::Greynoise
    }

    async fn lookup(&self, ip: CanonicalIp) -> Result<ProviderReport, ProviderError> {
        if !ip.is_ipv4() {
            return Ok(ProviderReport::bare(
                ProviderId::Greynoise,
                ProviderOutcome::SkippedUnsupported,
            ));
        }
        let url = self.http.url(&format!("/v3/community/{ip}"));
        let mut request = self.http.get(&url).header("accept", "application/json");
        if let Some(key) = &self.key {
            request = request.header("key", key.clone());
        }
        let exchange = self.http.exchange(request).await?;
        wire::report(
            exchange.status,
            &exchange.headers,
            exchange.body,
            chrono::Utc::now(),
        )
    }
}

impl ProviderHooks for GreyNoise {
    fn supports(&self, ip: CanonicalIp) -> bool {
        ip.is_ipv4()
    }
}
