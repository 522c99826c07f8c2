//! Running the real `enrichd` binary against the fakes: its environment, its `/metrics`, and
//! a watcher that samples its memory and CPU while it runs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::http;
use crate::procs::{self, Spawned};

/// Providers, in the contract's order.
pub(crate) const PROVIDERS: [&str; 4] = ["greynoise", "abuseipdb", "feodo", "threatfox"];
/// Providers asked once per address (Feodo is a downloaded feed).
pub(crate) const PER_IP_PROVIDERS: [&str; 3] = ["greynoise", "abuseipdb", "threatfox"];

/// How to run enrichd.
#[derive(Debug, Clone)]
pub(crate) struct Launcher {
    pub binary: PathBuf,
    pub work_dir: PathBuf,
    pub fakes_http: String,
    pub fakes_dns: String,
    pub concurrency: u32,
    pub rust_log: String,
}

/// The bus part of enrichd's environment.
#[derive(Debug, Clone)]
pub(crate) struct BusEnv {
    pub url: String,
    pub exchange: String,
    pub queue: String,
}

/// The providers' rate limits and quotas in a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Limits {
    /// `_RATE_PER_SEC=0`, `_DAILY_QUOTA=0`: no slot is reserved (the ceiling).
    Lifted,
    /// Configured, as every real deployment is: each call takes a cluster-wide slot.
    Metered {
        /// Calls per second, per provider.
        rate_per_sec: f64,
        /// Calls per day, per provider.
        daily_quota: u32,
    },
}

impl Launcher {
    /// enrichd's environment: the fakes as every provider's base URL and as the only DNS
    /// server, every rate limit and quota lifted, `concurrency` per provider, metrics on a
    /// free loopback port.
    pub(crate) fn env(
        &self,
        database_url: &str,
        bus: Option<&BusEnv>,
        metrics_port: u16,
    ) -> Vec<(String, String)> {
        self.env_with(database_url, bus, metrics_port, Limits::Lifted)
    }

    /// [`Launcher::env`] with `limits` on the keyed providers.
    pub(crate) fn env_with(
        &self,
        database_url: &str,
        bus: Option<&BusEnv>,
        metrics_port: u16,
        limits: Limits,
    ) -> Vec<(String, String)> {
        let mut env = vec![
            ("ENRICHD_DATABASE_URL".into(), database_url.to_owned()),
            ("ENRICHD_AUTO_MIGRATE".into(), "true".into()),
            ("ENRICHD_DNS_SERVERS".into(), self.fakes_dns.clone()),
            (
                "ENRICHD_PTR_CONCURRENCY".into(),
                self.concurrency.to_string(),
            ),
            (
                "ENRICHD_METRICS_ADDR".into(),
                format!("127.0.0.1:{metrics_port}"),
            ),
            ("ENRICHD_GRACE_SECS".into(), "5".into()),
            ("ENRICHD_GREYNOISE_API_KEY".into(), "bench-greynoise".into()),
            ("ENRICHD_ABUSEIPDB_API_KEY".into(), "bench-abuseipdb".into()),
            ("ENRICHD_THREATFOX_API_KEY".into(), "bench-threatfox".into()),
            ("RUST_LOG".into(), self.rust_log.clone()),
        ];
        for provider in PROVIDERS {
            let upper = provider.to_ascii_uppercase();
            env.push((
                format!("ENRICHD_{upper}_BASE_URL"),
                format!("http://{}", self.fakes_http),
            ));
            let (rate, quota) = match limits {
                Limits::Metered {
                    rate_per_sec,
                    daily_quota,
                } if provider != "feodo" => (rate_per_sec.to_string(), daily_quota.to_string()),
                _ => ("0".to_owned(), "0".to_owned()),
            };
            env.push((format!("ENRICHD_{upper}_RATE_PER_SEC"), rate));
            env.push((format!("ENRICHD_{upper}_DAILY_QUOTA"), quota));
            env.push((
                format!("ENRICHD_{upper}_CONCURRENCY"),
                self.concurrency.to_string(),
            ));
        }
        if let Some(bus) = bus {
            env.push(("ENRICHD_AMQP_URL".into(), bus.url.clone()));
            env.push(("ENRICHD_EXCHANGE".into(), bus.exchange.clone()));
            env.push(("ENRICHD_QUEUE".into(), bus.queue.clone()));
        }
        env
    }

    /// Starts `enrichd <command>`; its log is `<work_dir>/<label>.log`.
    pub(crate) fn start(
        &self,
        command: &str,
        label: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<Spawned> {
        let log = self.work_dir.join(format!("{label}.log"));
        let _ = std::fs::remove_file(&log);
        procs::spawn(&self.binary, &[command], env, &log)
    }

    /// Runs `enrichd migrate` to completion.
    pub(crate) async fn migrate(
        &self,
        label: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<()> {
        let mut child = self.start("migrate", &format!("{label}-migrate"), env)?;
        let status = tokio::time::timeout(Duration::from_secs(60), child.child.wait())
            .await
            .context("enrichd migrate did not finish within 60 s")??;
        if !status.success() {
            bail!("enrichd migrate failed ({status}):\n{}", child.log_tail(20));
        }
        Ok(())
    }
}

/// A free loopback TCP port (bound and released; the race with other processes is benign
/// here: enrichd fails loudly if it lost).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `/metrics` summed per series name (labels folded), or `None` when not served.
pub(crate) async fn scrape(port: u16) -> Option<HashMap<String, f64>> {
    let response = http::request(&format!("127.0.0.1:{port}"), "GET", "/metrics")
        .await
        .ok()?;
    if response.status != 200 {
        return None;
    }
    let text = String::from_utf8_lossy(&response.body);
    let mut series: HashMap<String, f64> = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => (&line[..i], &line[i..]),
            None => continue,
        };
        let rest = rest.rfind('}').map_or(rest, |j| &rest[j + 1..]);
        if let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *series.entry(name.to_owned()).or_default() += value;
        }
    }
    Some(series)
}

/// Samples a running process every 100 ms: peak `VmHWM`, last `VmRSS`, last CPU seconds.
/// The last sample before the process ends is what remains (`/proc` forgets a reaped child).
#[derive(Debug, Default)]
pub(crate) struct Watch {
    pub hwm_kib: AtomicU64,
    pub rss_kib: AtomicU64,
    /// CPU milliseconds.
    pub cpu_ms: AtomicU64,
    pub stop: AtomicBool,
}

impl Watch {
    /// Starts sampling `pid`.
    pub(crate) fn start(pid: u32, ticks: f64) -> Arc<Self> {
        let watch = Arc::new(Self::default());
        let me = Arc::clone(&watch);
        tokio::spawn(async move {
            while !me.stop.load(Ordering::Relaxed) {
                me.sample(pid, ticks);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        watch
    }

    /// Takes one sample now (call right before stopping the process).
    pub(crate) fn sample(&self, pid: u32, ticks: f64) {
        if let Some(hwm) = procs::status_kib(pid, "VmHWM") {
            self.hwm_kib.fetch_max(hwm, Ordering::Relaxed);
        }
        if let Some(rss) = procs::status_kib(pid, "VmRSS") {
            self.rss_kib.store(rss, Ordering::Relaxed);
        }
        if let Some(cpu) = procs::cpu_secs(pid, ticks) {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "CPU milliseconds of one run are small and positive"
            )]
            self.cpu_ms.store((cpu * 1000.0) as u64, Ordering::Relaxed);
        }
    }

    /// Peak resident memory so far, MiB.
    pub(crate) fn hwm_mib(&self) -> f64 {
        self.hwm_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }

    /// CPU seconds at the last sample.
    pub(crate) fn cpu_secs(&self) -> f64 {
        self.cpu_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }
}
