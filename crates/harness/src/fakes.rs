//! The `enrichd-fakes` process (fake providers on one HTTP port, a PTR-for-everything DNS
//! server on one UDP port, both on loopback) and its typed stats client. The documents are
//! the fakes' own types ([`enrichd_fakes::stats`]), read as they are written.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use enrichd_fakes::Banner;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

pub use enrichd_fakes::stats::{DnsStats, LogEntry, PerKey, RequestLog, Stats};

use crate::http::HttpClient;
use crate::process::Process;

/// How long a control request to the fakes may take: `/_stats` of a long run is megabytes.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Latency and faults the fakes inject; the default is the binary's own (none, seed 0).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FakesOptions {
    /// Milliseconds added to every provider answer.
    pub latency_ms: u64,
    /// Fraction of provider answers that are HTTP 500.
    pub error_rate: f64,
    /// Fraction of provider answers that are HTTP 429 (`Retry-After: 2`).
    pub rate_limit_rate: f64,
    /// Seed of the fault decisions.
    pub seed: u64,
}

impl FakesOptions {
    /// The command-line arguments that ask for these options.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--latency-ms".into(),
            self.latency_ms.to_string(),
            "--error-rate".into(),
            self.error_rate.to_string(),
            "--rate-limit-rate".into(),
            self.rate_limit_rate.to_string(),
            "--seed".into(),
            self.seed.to_string(),
        ]
    }
}

/// A running `enrichd-fakes`; killed when dropped.
#[derive(Debug)]
pub struct Fakes {
    process: Process,
    banner: Banner,
    http: HttpClient,
}

impl Fakes {
    /// Starts the binary with `options` (its stderr to `log`), reads the banner naming its
    /// ports, checks both are on loopback and that it answers `/_health`.
    pub async fn start(binary: &Path, options: FakesOptions, log: &Path) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        command.args(options.args());
        let mut process = Process::spawn_piped(command, log)?;
        let stdout = process.take_stdout().context("the fakes' stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("enrichd-fakes printed no banner within 20 s")??
            .context("enrichd-fakes exited before printing its banner")?;
        let banner: Banner = serde_json::from_str(&first)
            .with_context(|| format!("enrichd-fakes banner {first:?}"))?;
        for addr in [banner.http, banner.dns] {
            if !addr.ip().is_loopback() {
                bail!("enrichd-fakes listens on {addr}, not loopback");
            }
        }
        // Keep draining stdout so a chatty fake never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let fakes = Self {
            process,
            banner,
            http: HttpClient::new()?,
        };
        let health = fakes.get("/_health").await?;
        if health.status != 200 {
            bail!("enrichd-fakes /_health answered {}", health.status);
        }
        Ok(fakes)
    }

    /// Its process id (for CPU sampling).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The HTTP address of the providers.
    pub fn http_addr(&self) -> SocketAddr {
        self.banner.http
    }

    /// The DNS address (UDP).
    pub fn dns_addr(&self) -> SocketAddr {
        self.banner.dns
    }

    /// `http://<http_addr>`: every provider's base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.banner.http)
    }

    /// `GET /_stats`.
    pub async fn stats(&self) -> anyhow::Result<Stats> {
        self.get("/_stats").await?.json("/_stats")
    }

    /// `GET /_log`: every provider request with its status.
    pub async fn request_log(&self) -> anyhow::Result<RequestLog> {
        self.get("/_log").await?.json("/_log")
    }

    /// `POST /_reset`: every counter back to zero.
    pub async fn reset(&self) -> anyhow::Result<()> {
        let addr = self.banner.http.to_string();
        let response = self.http.post(&addr, "/_reset", CONTROL_TIMEOUT).await?;
        if !(200..300).contains(&response.status) {
            bail!("/_reset answered {}", response.status);
        }
        Ok(())
    }

    /// `GET path` on the HTTP port.
    pub async fn get(&self, path: &str) -> anyhow::Result<crate::http::HttpResponse> {
        let addr = self.banner.http.to_string();
        self.http.get(&addr, path, CONTROL_TIMEOUT).await
    }

    /// Stops the process.
    pub async fn stop(mut self) {
        let _ = self.process.kill9().await;
    }
}
