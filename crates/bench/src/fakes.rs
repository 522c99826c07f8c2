//! The `enrichd-fakes` process: fake providers on one HTTP port and a PTR server on one UDP
//! port, both on loopback, with request statistics at `/_stats`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

use crate::http;

/// Latency and faults the fakes inject.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Knobs {
    pub latency_ms: u64,
    pub error_rate: f64,
    pub rate_limit_rate: f64,
    pub seed: u64,
}

/// A running `enrichd-fakes`; killed when dropped.
pub(crate) struct Fakes {
    child: tokio::process::Child,
    pub pid: u32,
    /// `127.0.0.1:PORT` of the providers.
    pub http: String,
    /// `127.0.0.1:PORT` of the PTR server.
    pub dns: String,
}

impl Fakes {
    /// Starts the binary and reads the one JSON line naming its ports.
    pub(crate) async fn start(binary: &Path, knobs: Knobs, log: &Path) -> anyhow::Result<Self> {
        let err =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut child = Command::new(binary)
            .arg("--latency-ms")
            .arg(knobs.latency_ms.to_string())
            .arg("--error-rate")
            .arg(knobs.error_rate.to_string())
            .arg("--rate-limit-rate")
            .arg(knobs.rate_limit_rate.to_string())
            .arg("--seed")
            .arg(knobs.seed.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let pid = child.id().context("fakes have no pid")?;
        let stdout = child.stdout.take().context("fakes stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("enrichd-fakes printed no address line within 20 s")??
            .context("enrichd-fakes exited before printing its addresses")?;
        let doc: Value = serde_json::from_str(&first)
            .with_context(|| format!("enrichd-fakes address line is not JSON: {first}"))?;
        let (Some(http), Some(dns)) = (doc["http"].as_str(), doc["dns"].as_str()) else {
            bail!("enrichd-fakes address line lacks http/dns: {first}");
        };
        for addr in [http, dns] {
            if !addr.starts_with("127.0.0.1:") {
                bail!("enrichd-fakes listens on {addr}, not loopback");
            }
        }
        // Keep draining stdout so a chatty fake never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let fakes = Self {
            child,
            pid,
            http: http.to_owned(),
            dns: dns.to_owned(),
        };
        let health = http::request(&fakes.http, "GET", "/_health").await?;
        if health.status != 200 {
            bail!("enrichd-fakes /_health answered {}", health.status);
        }
        Ok(fakes)
    }

    /// `GET /_stats`.
    pub(crate) async fn stats(&self) -> anyhow::Result<Stats> {
        let r = http::request(&self.http, "GET", "/_stats").await?;
        if r.status != 200 {
            bail!("/_stats answered {}", r.status);
        }
        Ok(Stats(
            serde_json::from_slice(&r.body).context("/_stats is not JSON")?,
        ))
    }

    /// `POST /_reset`.
    pub(crate) async fn reset(&self) -> anyhow::Result<()> {
        let r = http::request(&self.http, "POST", "/_reset").await?;
        if !(200..300).contains(&r.status) {
            bail!("/_reset answered {}", r.status);
        }
        Ok(())
    }

    /// Stops the process.
    pub(crate) async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The `/_stats` document.
#[derive(Debug, Clone)]
pub(crate) struct Stats(pub Value);

/// `per_key` of one provider.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct PerKey {
    pub distinct: u64,
    #[allow(clippy::struct_field_names, reason = "the /_stats field's name")]
    pub max_per_key: u64,
    pub total: u64,
}

impl Stats {
    /// Requests served for `provider`.
    pub(crate) fn requests(&self, provider: &str) -> u64 {
        self.0["requests"][provider].as_u64().unwrap_or(0)
    }

    /// Sum of requests over every provider.
    pub(crate) fn total_requests(&self) -> u64 {
        self.0["requests"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
    }

    /// `per_key` of `provider`.
    pub(crate) fn per_key(&self, provider: &str) -> PerKey {
        let v = &self.0["per_key"][provider];
        PerKey {
            distinct: v["distinct"].as_u64().unwrap_or(0),
            max_per_key: v["max_per_key"].as_u64().unwrap_or(0),
            total: v["total"].as_u64().unwrap_or(0),
        }
    }

    /// First and last arrival (epoch ms) over the given providers.
    pub(crate) fn span_ms(&self, providers: &[&str]) -> Option<(u64, u64)> {
        let mut first = u64::MAX;
        let mut last = 0;
        for p in providers {
            if let Some(list) = self.0["timeline"][p].as_array() {
                for t in list.iter().filter_map(Value::as_u64) {
                    first = first.min(t);
                    last = last.max(t);
                }
            }
        }
        (last >= first).then_some((first, last))
    }

    /// The document without the (large) timelines, for the report.
    pub(crate) fn summary(&self) -> Value {
        let mut v = self.0.clone();
        if let Some(map) = v.as_object_mut() {
            map.remove("timeline");
        }
        v
    }
}
