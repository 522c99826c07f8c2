//! The enrichd binary as a process: the environment it runs with ([`EnrichdEnv`]), a command
//! started with its log in a file ([`Enrichd::start`]) or run for its output
//! ([`Enrichd::output`]), readiness (`/readyz`, and consuming the work queue), and its
//! metrics.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context as _, bail};
use enrichd_bus::Topology;
use enrichd_core::ProviderId;
use tokio::process::Command;
use tokio::time::Instant;

use crate::bus::TestBus;
use crate::http::HttpClient;
use crate::metrics::Metrics;
use crate::process::Process;

/// The providers asked once per address (Feodo is a downloaded feed): the keyed ones, whose
/// limits a run sets.
pub const PER_ADDRESS: [ProviderId; 3] = [
    ProviderId::Greynoise,
    ProviderId::Abuseipdb,
    ProviderId::Threatfox,
];

/// How long a control request to enrichd may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A provider's rate limit and daily quota in a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limits {
    /// The contract's defaults: nothing set.
    Default,
    /// `_RATE_PER_SEC=0`, `_DAILY_QUOTA=0`: no slot is reserved.
    Lifted,
    /// Every call takes a cluster-wide slot, at this rate and within this quota.
    Metered {
        /// Calls per second.
        rate_per_sec: f64,
        /// Calls per day (0: none).
        daily_quota: u32,
    },
}

/// enrichd's environment: exactly these variables, nothing inherited, so a developer's
/// `ENRICHD_*` never leaks into a run. Setting a variable again replaces it.
#[derive(Debug, Clone, Default, PartialEq)]
#[must_use = "an environment is built by chaining"]
pub struct EnrichdEnv {
    vars: Vec<(String, String)>,
}

impl EnrichdEnv {
    /// An empty environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` (replacing an earlier value).
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        match self.vars.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((key.to_owned(), value)),
        }
        self
    }

    /// Removes `key`.
    pub fn unset(mut self, key: &str) -> Self {
        self.vars.retain(|(k, _)| k != key);
        self
    }

    /// `key`'s value, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every variable, in the order first set.
    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// `ENRICHD_DATABASE_URL`.
    pub fn database(self, url: &str) -> Self {
        self.set("ENRICHD_DATABASE_URL", url)
    }

    /// The broker at `amqp_url` with `topology`'s exchange and work queue.
    pub fn bus(self, amqp_url: &str, topology: &Topology) -> Self {
        self.set("ENRICHD_AMQP_URL", amqp_url)
            .set("ENRICHD_EXCHANGE", topology.exchange.as_str())
            .set("ENRICHD_QUEUE", topology.queue.as_str())
    }

    /// `provider`'s base URL.
    pub fn provider_base_url(self, provider: ProviderId, base_url: &str) -> Self {
        self.set(&provider_var(provider, "BASE_URL"), base_url)
    }

    /// Every provider's base URL (the fakes serve all four on one port).
    pub fn providers_at(self, base_url: &str) -> Self {
        ProviderId::ALL.into_iter().fold(self, |env, provider| {
            env.provider_base_url(provider, base_url)
        })
    }

    /// `provider`'s API key.
    pub fn api_key(self, provider: ProviderId, key: &str) -> Self {
        self.set(&provider_var(provider, "API_KEY"), key)
    }

    /// `limits` for each of `providers`.
    pub fn limits(self, providers: &[ProviderId], limits: Limits) -> Self {
        let (rate, quota) = match limits {
            Limits::Default => return self,
            Limits::Lifted => ("0".to_owned(), "0".to_owned()),
            Limits::Metered {
                rate_per_sec,
                daily_quota,
            } => (rate_per_sec.to_string(), daily_quota.to_string()),
        };
        providers.iter().fold(self, |env, provider| {
            env.set(&provider_var(*provider, "RATE_PER_SEC"), rate.as_str())
                .set(&provider_var(*provider, "DAILY_QUOTA"), quota.as_str())
        })
    }

    /// Calls in flight per process for each of `providers`.
    pub fn concurrency(self, providers: &[ProviderId], calls: u32) -> Self {
        providers.iter().fold(self, |env, provider| {
            env.set(&provider_var(*provider, "CONCURRENCY"), calls.to_string())
        })
    }

    /// `ENRICHD_DNS_SERVERS` (`host:port`, comma-separated).
    pub fn dns_servers(self, servers: &str) -> Self {
        self.set("ENRICHD_DNS_SERVERS", servers)
    }
}

/// `ENRICHD_<PROVIDER>_<suffix>`.
fn provider_var(provider: ProviderId, suffix: &str) -> String {
    format!("ENRICHD_{}_{suffix}", provider.env_name())
}

/// A running enrichd command (`run`, `migrate`, `backfill`, …); killed when dropped.
#[derive(Debug)]
pub struct Enrichd {
    process: Process,
    /// What it was started as (`run`, `backfill --all`), for messages.
    command: String,
    /// `127.0.0.1:PORT` of its metrics listener (`run` serves one).
    metrics: String,
    http: HttpClient,
}

impl Enrichd {
    /// Starts `binary args…` with exactly `env`, plus a metrics listener on a free loopback
    /// port when `env` names none; its stdout and stderr go to `log`.
    pub fn start(
        binary: &Path,
        args: &[&str],
        env: &EnrichdEnv,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let metrics = match env.get("ENRICHD_METRICS_ADDR") {
            Some(addr) => addr.to_owned(),
            None => format!("127.0.0.1:{}", crate::ports::free_port()?),
        };
        let mut command = command(binary, args, env);
        command.env("ENRICHD_METRICS_ADDR", &metrics);
        Ok(Self {
            process: Process::spawn(command, log)?,
            command: args.join(" "),
            metrics,
            http: HttpClient::new()?,
        })
    }

    /// Runs `binary args…` with exactly `env` to its end and returns what it printed.
    pub async fn output(binary: &Path, args: &[&str], env: &EnrichdEnv) -> anyhow::Result<Output> {
        command(binary, args, env)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("run {} {}", binary.display(), args.join(" ")))
    }

    /// The process.
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// The process, to signal, stop or wait for.
    pub fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// `127.0.0.1:PORT` of its metrics listener.
    pub fn metrics_addr(&self) -> &str {
        &self.metrics
    }

    /// Whether `/readyz` answers 200 (the database answers and its schema is current).
    pub async fn ready(&self) -> bool {
        matches!(
            self.http.get(&self.metrics, "/readyz", PROBE_TIMEOUT).await,
            Ok(response) if response.status == 200
        )
    }

    /// Waits until it is ready; fails at once, with its log, when it exits first.
    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let give_up = Instant::now() + within;
        loop {
            self.fail_if_exited()?;
            if self.ready().await {
                return Ok(());
            }
            if Instant::now() > give_up {
                bail!(
                    "enrichd {} was not ready within {within:?}:\n{}",
                    self.command,
                    self.process.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `bus`'s work queue has a consumer (enrichd has connected and declared);
    /// fails at once, with its log, when it exits first.
    pub async fn wait_consuming(&mut self, bus: &TestBus, within: Duration) -> anyhow::Result<()> {
        let queue = &bus.topology.queue;
        let give_up = Instant::now() + within;
        loop {
            self.fail_if_exited()?;
            if bus.queue_counts(queue).await?.consumers > 0 {
                return Ok(());
            }
            if Instant::now() > give_up {
                bail!(
                    "enrichd did not consume {queue} within {} s:\n{}",
                    within.as_secs(),
                    self.process.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An error with its log when it has exited.
    pub fn fail_if_exited(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.process.exit() {
            bail!(
                "enrichd {} exited ({status}):\n{}",
                self.command,
                self.process.log_tail(20)
            );
        }
        Ok(())
    }

    /// Waits up to `within` for it to exit 0; an error, with its log, otherwise.
    pub async fn finish(&mut self, within: Duration) -> anyhow::Result<()> {
        match self.process.wait_exit(within).await {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!(
                "enrichd {} failed ({status}):\n{}",
                self.command,
                self.process.log_tail(20)
            ),
            None => bail!("enrichd {} did not finish within {within:?}", self.command),
        }
    }

    /// Its `/metrics`, or `None` when the listener does not answer 200.
    pub async fn metrics(&self) -> Option<Metrics> {
        let response = self
            .http
            .get(&self.metrics, "/metrics", PROBE_TIMEOUT)
            .await
            .ok()?;
        (response.status == 200).then(|| Metrics::parse(&response.text()))
    }

    /// The sum of `name`'s series that carry every label in `labels`; `None` when it is not
    /// served or has no such series.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.metrics().await?.sum(name, labels)
    }

    /// A counter or gauge of whole numbers, as [`Enrichd::metric`]; 0 when it is not served
    /// or has no such series.
    pub async fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.metrics()
            .await
            .map_or(0, |metrics| metrics.count(name, labels))
    }
}

/// `binary args…` with exactly `env`.
fn command(binary: &Path, args: &[&str], env: &EnrichdEnv) -> Command {
    let mut command = Command::new(binary);
    command
        .args(args)
        .env_clear()
        .envs(env.vars().iter().map(|(k, v)| (k.as_str(), v.as_str())));
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_names_every_provider_and_later_values_win() {
        let env = EnrichdEnv::new()
            .database("sqlite://x.db")
            .providers_at("http://127.0.0.1:9")
            .limits(&PER_ADDRESS, Limits::Lifted)
            .limits(
                &[ProviderId::Abuseipdb],
                Limits::Metered {
                    rate_per_sec: 10_000.0,
                    daily_quota: 1_000_000,
                },
            )
            .concurrency(&PER_ADDRESS, 16)
            .api_key(ProviderId::Threatfox, "key")
            .bus("amqp://h/%2f", &Topology::new("decnet", "enrich.attackers"))
            .set("RUST_LOG", "info")
            .set("RUST_LOG", "warn");
        assert_eq!(
            env.get("ENRICHD_FEODO_BASE_URL"),
            Some("http://127.0.0.1:9")
        );
        assert_eq!(env.get("ENRICHD_GREYNOISE_RATE_PER_SEC"), Some("0"));
        assert_eq!(env.get("ENRICHD_ABUSEIPDB_RATE_PER_SEC"), Some("10000"));
        assert_eq!(env.get("ENRICHD_ABUSEIPDB_DAILY_QUOTA"), Some("1000000"));
        assert_eq!(
            env.get("ENRICHD_FEODO_RATE_PER_SEC"),
            None,
            "not a keyed provider"
        );
        assert_eq!(env.get("ENRICHD_THREATFOX_CONCURRENCY"), Some("16"));
        assert_eq!(env.get("ENRICHD_THREATFOX_API_KEY"), Some("key"));
        assert_eq!(env.get("ENRICHD_QUEUE"), Some("enrich.attackers"));
        assert_eq!(env.get("RUST_LOG"), Some("warn"));
        assert_eq!(
            env.vars().iter().filter(|(k, _)| k == "RUST_LOG").count(),
            1
        );
        let env = env.unset("RUST_LOG").limits(&PER_ADDRESS, Limits::Default);
        assert_eq!(env.get("RUST_LOG"), None);
        assert_eq!(env.get("ENRICHD_GREYNOISE_RATE_PER_SEC"), Some("0"));
    }

    #[tokio::test]
    async fn a_command_sees_only_its_environment() {
        let env = EnrichdEnv::new().set("ENRICHD_ONLY", "this");
        let out = Enrichd::output(Path::new("/usr/bin/env"), &[], &env)
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ENRICHD_ONLY=this\n");
    }
}
