//! One small HTTP client for the loopback control endpoints of enrichd (`/metrics`,
//! `/readyz`) and of the fakes (`/_stats`, `/_log`, `/_reset`, `/_health`). Not for provider
//! traffic, which enrichd does itself.
//!
//! reqwest, as enrichd-intel uses it, with a connection per request (no pool, no proxy): a
//! pooled connection to a process that was just killed or restarted would only add a failed
//! attempt, and a proxy variable in the environment must never divert loopback traffic.

use std::time::Duration;

use anyhow::{Context as _, bail};
use reqwest::Method;
use serde::de::DeserializeOwned;

/// An answer: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The whole body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body of a 200 parsed as JSON into `T`; any other status is an error.
    pub fn json<T: DeserializeOwned>(&self, what: &str) -> anyhow::Result<T> {
        if self.status != 200 {
            bail!("{what} answered {}", self.status);
        }
        serde_json::from_slice(&self.body).with_context(|| format!("{what} is not its JSON"))
    }
}

/// A client for `http://<addr><path>` requests; cheap to clone.
#[derive(Debug, Clone)]
pub struct HttpClient {
    client: reqwest::Client,
}

impl HttpClient {
    /// A client with no connection pool and no proxy.
    pub fn new() -> anyhow::Result<Self> {
        // `Err` only means a provider is installed already, which is all the client needs.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .context("build the HTTP client")?;
        Ok(Self { client })
    }

    /// `GET http://<addr><path>`, the whole answer within `within`.
    pub async fn get(
        &self,
        addr: &str,
        path: &str,
        within: Duration,
    ) -> anyhow::Result<HttpResponse> {
        self.send(Method::GET, addr, path, within).await
    }

    /// `POST http://<addr><path>` with an empty body, the whole answer within `within`.
    pub async fn post(
        &self,
        addr: &str,
        path: &str,
        within: Duration,
    ) -> anyhow::Result<HttpResponse> {
        self.send(Method::POST, addr, path, within).await
    }

    async fn send(
        &self,
        method: Method,
        addr: &str,
        path: &str,
        within: Duration,
    ) -> anyhow::Result<HttpResponse> {
        let url = format!("http://{addr}{path}");
        let exchange = async {
            let response = self.client.request(method.clone(), &url).send().await?;
            let status = response.status().as_u16();
            let body = response.bytes().await?.to_vec();
            Ok::<_, reqwest::Error>(HttpResponse { status, body })
        };
        tokio::time::timeout(within, exchange)
            .await
            .with_context(|| format!("{method} {url} did not answer within {within:?}"))?
            .with_context(|| format!("{method} {url}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_read_only_from_a_200() {
        let ok = HttpResponse {
            status: 200,
            body: br#"{"a":1}"#.to_vec(),
        };
        assert_eq!(ok.json::<serde_json::Value>("x").unwrap()["a"], 1);
        let refused = HttpResponse {
            status: 503,
            body: b"schema not current".to_vec(),
        };
        let error = refused.json::<serde_json::Value>("/readyz").unwrap_err();
        assert_eq!(error.to_string(), "/readyz answered 503");
        assert_eq!(refused.text(), "schema not current");
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_naming_the_url() {
        let addr = format!("127.0.0.1:{}", crate::ports::free_port().unwrap());
        let client = HttpClient::new().unwrap();
        let error = client
            .get(&addr, "/metrics", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            format!("{error:#}").contains(&format!("GET http://{addr}/metrics")),
            "{error:#}"
        );
    }
}
