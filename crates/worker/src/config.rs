//! Configuration: a TOML file and the environment, composed into one validated [`Settings`].
//!
//! Precedence, lowest first: built-in defaults, the file (`--config`, default `enrichd.toml`
//! when present), the reference's `DECNET_*` variables, `ENRICHD_*` variables. The file is
//! strict (`deny_unknown_fields`): a typo there is a mistake we can point at. Unknown
//! `ENRICHD_*` variables only warn, because orchestrators inject their own
//! (`ENRICHD_SERVICE_HOST` on Kubernetes). API keys come only from the environment or from a
//! file the configuration names, never from the TOML itself, and print as `***`.
//!
//! Logic lives in [`Settings::from_sources`], which takes the file text and an [`Env`], so
//! tests never touch the process environment.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use enrichd_core::scope::AddressPolicy;
use enrichd_core::{ProviderId, Secret};
use ipnet::IpNet;
use serde::Deserialize;

/// Where variables come from: the process, or a map in tests.
pub trait Env {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Option<String>;
    /// Every variable name, for the unknown-variable warning.
    fn keys(&self) -> Vec<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }

    fn keys(&self) -> Vec<String> {
        std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .collect()
    }
}

impl<S: BuildHasher> Env for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }

    fn keys(&self) -> Vec<String> {
        HashMap::keys(self).cloned().collect()
    }
}

/// One configuration problem, reported on its own stderr line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config: {0}")]
pub struct ConfigError(pub String);

/// Every problem found, so an operator fixes them all in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// === file shape ===

/// The TOML file. Every field is optional: absent means "default, or the environment".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    auto_migrate: Option<bool>,
    exclude_cidrs: Option<Vec<String>>,
    ttl_hours: Option<u64>,
    poll_interval_secs: Option<u64>,
    grace_secs: Option<u64>,
    metrics_addr: Option<String>,
    log_format: Option<String>,
    #[serde(default)]
    bus: FileBus,
    #[serde(default)]
    dns: FileDns,
    #[serde(default)]
    providers: FileProviders,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBus {
    amqp_url: Option<String>,
    exchange: Option<String>,
    queue: Option<String>,
    prefetch: Option<u64>,
    ack_deadline_secs: Option<u64>,
    dlq_max_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDns {
    servers: Option<Vec<String>>,
    ptr_enabled: Option<bool>,
    fcrdns: Option<bool>,
    timeout_ms: Option<u64>,
    concurrency: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProviders {
    enabled: Option<Vec<String>>,
    feodo_refresh_secs: Option<u64>,
    feodo_max_age_secs: Option<u64>,
    greynoise: Option<FileProvider>,
    abuseipdb: Option<FileProvider>,
    feodo: Option<FileProvider>,
    threatfox: Option<FileProvider>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProvider {
    base_url: Option<String>,
    /// A file holding the key (a mounted secret); the key itself never sits in the TOML.
    api_key_file: Option<PathBuf>,
    rate_per_sec: Option<f64>,
    concurrency: Option<u64>,
    daily_quota: Option<u64>,
}

// === validated settings ===

/// The validated configuration of one process.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `sqlite://…` or `postgres://…`.
    pub database_url: String,
    /// Migrate before `run`, `lookup` and `backfill`.
    pub auto_migrate: bool,
    /// The bus; `None` = no broker, poll mode.
    pub bus: Option<BusSettings>,
    /// Reverse DNS.
    pub dns: DnsSettings,
    /// Configured providers, in the contract's order, with their settings.
    pub providers: Vec<ProviderSettings>,
    /// Feodo feed refresh interval.
    pub feodo_refresh: Duration,
    /// Feodo data older than this makes the provider unavailable.
    pub feodo_max_age: Duration,
    /// Operator exclusions on top of the special-purpose blocks.
    pub exclude_cidrs: Vec<IpNet>,
    /// Provider answer lifetime.
    pub ttl: Duration,
    /// Backfill wait when a batch comes back empty.
    pub poll_interval: Duration,
    /// Shutdown grace period.
    pub grace: Duration,
    /// Prometheus and probe listener.
    pub metrics_addr: SocketAddr,
    /// `ENRICHD_LOG_FORMAT`; `None`: decided by the command and the terminal
    /// ([`crate::telemetry::LogStyle::choose`]).
    pub log_format: Option<LogFormat>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, for a collector.
    Json,
    /// Compact text lines, for a person.
    Text,
}

impl LogFormat {
    fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "json" => Some(Self::Json),
            "text" => Some(Self::Text),
            _ => None,
        }
    }
}

/// RabbitMQ settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusSettings {
    /// `amqp://` or `amqps://`; may carry credentials, so it prints redacted.
    pub amqp_url: Secret,
    /// Topic exchange.
    pub exchange: String,
    /// Shared work queue.
    pub queue: String,
    /// Deliveries in flight per replica.
    pub prefetch: u16,
    /// Longest a delivery waits before it is acked as "work recorded as due".
    pub ack_deadline: Duration,
    /// The dead-letter queue's bound in bytes (`x-max-length-bytes`).
    pub dlq_max_bytes: u64,
}

impl BusSettings {
    /// The topology these settings name.
    pub fn topology(&self) -> enrichd_bus::Topology {
        enrichd_bus::Topology::new(&self.exchange, &self.queue)
            .with_dead_max_bytes(self.dlq_max_bytes)
    }
}

/// Reverse-DNS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Nameservers; empty = the system's.
    pub servers: Vec<SocketAddr>,
    /// Kill switch: `false` means no DNS traffic at all.
    pub ptr_enabled: bool,
    /// Forward-confirm names.
    pub fcrdns: bool,
    /// Per-lookup deadline.
    pub timeout: Duration,
    /// Lookups in flight.
    pub concurrency: usize,
}

/// One configured provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSettings {
    /// Which provider.
    pub id: ProviderId,
    /// Endpoint base, overridable so tests and benchmarks point at a local fake.
    pub base_url: String,
    /// The key, when one is configured.
    pub api_key: Option<Secret>,
    /// Cluster-wide calls per second; 0 = unlimited.
    pub rate_per_sec: f64,
    /// Calls in flight per replica.
    pub concurrency: usize,
    /// Cluster-wide calls per UTC day; 0 = unlimited.
    pub daily_quota: u32,
}

impl ProviderSettings {
    /// Why this provider cannot run, when it needs a key and has none.
    pub fn disabled_reason(&self) -> Option<String> {
        let needs_key = matches!(self.id, ProviderId::Abuseipdb | ProviderId::Threatfox);
        (needs_key && self.api_key.is_none()).then(|| {
            format!(
                "{} needs an API key (ENRICHD_{}_API_KEY); it is disabled",
                self.id,
                self.id.env_name()
            )
        })
    }
}

/// Built-in defaults per provider: base URL, rate per second, daily quota.
fn provider_defaults(id: ProviderId) -> (&'static str, f64, u32) {
    match id {
        ProviderId::Greynoise => ("https://api.greynoise.io", 1.0 / 1.5, 0),
        ProviderId::Abuseipdb => ("https://api.abuseipdb.com", 2.0, 1000),
        ProviderId::Feodo => ("https://feodotracker.abuse.ch", 0.0, 0),
        ProviderId::Threatfox => ("https://threatfox-api.abuse.ch", 2.0, 0),
    }
}

/// Every variable the contract defines, without its `ENRICHD_` (or `DECNET_`) prefix: for the
/// unknown-variable warning, and for the test that checks deployment files use real names.
pub fn known_variables() -> Vec<String> {
    let mut known: Vec<String> = [
        "DATABASE_URL",
        "AUTO_MIGRATE",
        "AMQP_URL",
        "EXCHANGE",
        "QUEUE",
        "PREFETCH",
        "ACK_DEADLINE_SECS",
        "DLQ_MAX_BYTES",
        "DNS_SERVERS",
        "PTR_ENABLED",
        "PTR_FCRDNS",
        "PTR_TIMEOUT_MS",
        "PTR_CONCURRENCY",
        "PROVIDERS",
        "ABUSECH_AUTH_KEY",
        "FEODO_REFRESH_SECS",
        "FEODO_MAX_AGE_SECS",
        "EXCLUDE_CIDRS",
        "TTL_HOURS",
        "POLL_INTERVAL_SECS",
        "GRACE_SECS",
        "METRICS_ADDR",
        "LOG_FORMAT",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for id in ProviderId::ALL {
        for suffix in [
            "BASE_URL",
            "API_KEY",
            "RATE_PER_SEC",
            "CONCURRENCY",
            "DAILY_QUOTA",
        ] {
            known.push(format!("{}_{suffix}", id.env_name()));
        }
    }
    known
}

/// Reads `ENRICHD_<name>`, else the reference's `DECNET_<name>`; empty counts as unset except
/// where emptiness means something (`ENRICHD_PROVIDERS=""` = none), which callers handle via
/// [`Lookup::raw`].
struct Lookup<'a> {
    env: &'a dyn Env,
}

impl Lookup<'_> {
    fn raw(&self, name: &str) -> Option<(String, String)> {
        for prefix in ["ENRICHD_", "DECNET_"] {
            let key = format!("{prefix}{name}");
            if let Some(value) = self.env.get(&key) {
                return Some((key, value));
            }
        }
        None
    }

    fn get(&self, name: &str) -> Option<(String, String)> {
        self.raw(name).filter(|(_, v)| !v.trim().is_empty())
    }
}

/// Collects problems while building settings.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn push(&mut self, message: impl Into<String>) {
        self.0.push(ConfigError(message.into()));
    }

    /// Parses an env value with `parse`, recording a problem (without the value when secret).
    fn env_value<T>(
        &mut self,
        lookup: &Lookup<'_>,
        name: &str,
        what: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let (key, value) = lookup.get(name)?;
        let parsed = parse(value.trim());
        if parsed.is_none() {
            self.push(format!("{key}={value:?} is not {what}"));
        }
        parsed
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn parse_u64(text: &str) -> Option<u64> {
    text.parse().ok()
}

fn parse_rate(text: &str) -> Option<f64> {
    text.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r >= 0.0)
}

fn parse_servers(list: &[String], problems: &mut Problems, source: &str) -> Vec<SocketAddr> {
    let mut servers = Vec::new();
    for entry in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match entry.parse::<SocketAddr>() {
            Ok(addr) => servers.push(addr),
            Err(_) => match entry.parse::<std::net::IpAddr>() {
                Ok(ip) => servers.push(SocketAddr::new(ip, 53)),
                Err(_) => problems.push(format!("{source}: {entry:?} is not address:port")),
            },
        }
    }
    servers
}

fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Rejects URLs whose scheme is not one of `schemes`; never echoes the URL, which may carry a
/// password.
fn check_scheme(url: &str, schemes: &[&str], source: &str, problems: &mut Problems) {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if !scheme.as_deref().is_some_and(|s| schemes.contains(&s)) {
        problems.push(format!(
            "{source}: the URL must start with one of {}",
            schemes.join("://, ") + "://"
        ));
    }
}

impl Settings {
    /// Loads `path` (or `enrichd.toml` when present and no path is given) and the environment.
    ///
    /// # Errors
    /// Every problem found, one per line.
    pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<Self, ConfigErrors> {
        let default_path = Path::new("enrichd.toml");
        let (text, source) = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => (text, p.display().to_string()),
                Err(e) => {
                    return Err(ConfigErrors(vec![ConfigError(format!(
                        "cannot read {}: {e}",
                        p.display()
                    ))]));
                }
            },
            None if default_path.exists() => match std::fs::read_to_string(default_path) {
                Ok(text) => (text, default_path.display().to_string()),
                Err(e) => {
                    return Err(ConfigErrors(vec![ConfigError(format!(
                        "cannot read enrichd.toml: {e}"
                    ))]));
                }
            },
            None => (String::new(), String::from("defaults")),
        };
        Self::from_sources(&text, &source, env)
    }

    /// Builds settings from TOML text and an environment. All validation happens here.
    ///
    /// # Errors
    /// Every problem found, one per line.
    pub fn from_sources(
        toml_text: &str,
        source: &str,
        env: &dyn Env,
    ) -> Result<Self, ConfigErrors> {
        let mut problems = Problems::default();
        let file: FileConfig = match toml::from_str(toml_text) {
            Ok(file) => file,
            Err(e) => {
                let message = e.message().to_owned();
                return Err(ConfigErrors(vec![ConfigError(format!(
                    "{source}: {message}"
                ))]));
            }
        };
        let lookup = Lookup { env };

        let database_url = lookup
            .get("DATABASE_URL")
            .map(|(_, v)| v.trim().to_owned())
            .or(file.database_url)
            .unwrap_or_else(|| "sqlite://enrichd.db?mode=rwc".into());
        check_scheme(
            &database_url,
            &["sqlite", "postgres", "postgresql"],
            "database_url",
            &mut problems,
        );

        let auto_migrate = problems
            .env_value(&lookup, "AUTO_MIGRATE", "true or false", parse_bool)
            .or(file.auto_migrate)
            .unwrap_or(true);

        let bus = Self::bus(&lookup, file.bus, &mut problems);
        let dns = Self::dns(&lookup, file.dns, &mut problems);
        let (providers, feodo_refresh, feodo_max_age) =
            Self::providers(&lookup, file.providers, &mut problems);

        let exclude_text = lookup
            .get("EXCLUDE_CIDRS")
            .map(|(_, v)| v)
            .or_else(|| file.exclude_cidrs.map(|list| list.join(",")))
            .unwrap_or_default();
        let exclude_cidrs = match AddressPolicy::parse_exclusions(&exclude_text) {
            Ok(nets) => nets,
            Err(errors) => {
                for e in errors {
                    problems.push(format!("exclude_cidrs: {e}"));
                }
                Vec::new()
            }
        };

        let mut positive = |name: &str, file_value: Option<u64>, default: u64| {
            let value = problems
                .env_value(&lookup, name, "a whole number", parse_u64)
                .or(file_value)
                .unwrap_or(default);
            if value == 0 {
                problems.push(format!("{} must be at least 1", name.to_ascii_lowercase()));
            }
            value
        };
        let ttl_hours = positive("TTL_HOURS", file.ttl_hours, 24);
        let poll_secs = positive("POLL_INTERVAL_SECS", file.poll_interval_secs, 60);
        let grace_secs = problems
            .env_value(&lookup, "GRACE_SECS", "a whole number", parse_u64)
            .or(file.grace_secs)
            .unwrap_or(20);

        let metrics_text = lookup
            .get("METRICS_ADDR")
            .map(|(_, v)| v)
            .or(file.metrics_addr)
            .unwrap_or_else(|| "127.0.0.1:9464".into());
        let metrics_addr = metrics_text
            .trim()
            .parse::<SocketAddr>()
            .unwrap_or_else(|_| {
                problems.push(format!(
                    "metrics_addr: {metrics_text:?} is not address:port"
                ));
                SocketAddr::from(([127, 0, 0, 1], 9464))
            });

        let log_format = Self::log_format(&lookup, file.log_format, &mut problems);

        if !problems.0.is_empty() {
            return Err(ConfigErrors(problems.0));
        }
        Ok(Self {
            database_url,
            auto_migrate,
            bus,
            dns,
            providers,
            feodo_refresh,
            feodo_max_age,
            exclude_cidrs,
            ttl: Duration::from_secs(ttl_hours.saturating_mul(3600)),
            poll_interval: Duration::from_secs(poll_secs),
            grace: Duration::from_secs(grace_secs),
            metrics_addr,
            log_format,
        })
    }

    fn log_format(
        lookup: &Lookup<'_>,
        file: Option<String>,
        problems: &mut Problems,
    ) -> Option<LogFormat> {
        problems
            .env_value(lookup, "LOG_FORMAT", "json or text", LogFormat::parse)
            .or_else(|| {
                let text = file?;
                let parsed = LogFormat::parse(text.trim());
                if parsed.is_none() {
                    problems.push(format!("log_format: {text:?} is not json or text"));
                }
                parsed
            })
    }

    fn bus(lookup: &Lookup<'_>, file: FileBus, problems: &mut Problems) -> Option<BusSettings> {
        let url = lookup
            .get("AMQP_URL")
            .map(|(_, v)| v.trim().to_owned())
            .or(file.amqp_url)?;
        check_scheme(&url, &["amqp", "amqps"], "amqp_url", problems);
        let exchange = lookup
            .get("EXCHANGE")
            .map(|(_, v)| v)
            .or(file.exchange)
            .unwrap_or_else(|| "decnet".into());
        let queue = lookup
            .get("QUEUE")
            .map(|(_, v)| v)
            .or(file.queue)
            .unwrap_or_else(|| "enrich.attackers".into());
        let prefetch = problems
            .env_value(lookup, "PREFETCH", "a whole number", parse_u64)
            .or(file.prefetch)
            .unwrap_or(500);
        let prefetch = u16::try_from(prefetch)
            .ok()
            .filter(|p| *p > 0)
            .unwrap_or_else(|| {
                problems.push(format!("prefetch: {prefetch} is not within 1..=65535"));
                500
            });
        let ack_deadline_secs = problems
            .env_value(lookup, "ACK_DEADLINE_SECS", "a whole number", parse_u64)
            .or(file.ack_deadline_secs)
            .unwrap_or(30);
        if ack_deadline_secs == 0 {
            problems.push("ack_deadline_secs must be at least 1");
        }
        let dlq_max_bytes = problems
            .env_value(
                lookup,
                "DLQ_MAX_BYTES",
                "a whole number of bytes",
                parse_u64,
            )
            .or(file.dlq_max_bytes)
            .unwrap_or(enrichd_bus::topology::DEFAULT_DEAD_MAX_BYTES);
        if dlq_max_bytes < 65_536 {
            problems.push("dlq_max_bytes must be at least 65536 (one letter)");
        }
        for (name, value) in [("exchange", &exchange), ("queue", &queue)] {
            if value.trim().is_empty() || value.len() > 255 {
                problems.push(format!("{name}: must be 1 to 255 characters"));
            }
        }
        Some(BusSettings {
            amqp_url: Secret::new(url),
            exchange,
            queue,
            prefetch,
            ack_deadline: Duration::from_secs(ack_deadline_secs),
            dlq_max_bytes,
        })
    }

    fn dns(lookup: &Lookup<'_>, file: FileDns, problems: &mut Problems) -> DnsSettings {
        let servers = match lookup.get("DNS_SERVERS") {
            Some((key, value)) => parse_servers(&split_list(&value), problems, &key),
            None => parse_servers(&file.servers.unwrap_or_default(), problems, "dns.servers"),
        };
        let ptr_enabled = problems
            .env_value(lookup, "PTR_ENABLED", "true or false", parse_bool)
            .or(file.ptr_enabled)
            .unwrap_or(true);
        let fcrdns = problems
            .env_value(lookup, "PTR_FCRDNS", "true or false", parse_bool)
            .or(file.fcrdns)
            .unwrap_or(false);
        let timeout_ms = problems
            .env_value(lookup, "PTR_TIMEOUT_MS", "a whole number", parse_u64)
            .or(file.timeout_ms)
            .unwrap_or(2000);
        let concurrency = problems
            .env_value(lookup, "PTR_CONCURRENCY", "a whole number", parse_u64)
            .or(file.concurrency)
            .unwrap_or(10);
        if timeout_ms == 0 {
            problems.push("dns.timeout_ms must be at least 1");
        }
        if concurrency == 0 || concurrency > 10_000 {
            problems.push(format!(
                "dns.concurrency: {concurrency} is not within 1..=10000"
            ));
        }
        DnsSettings {
            servers,
            ptr_enabled,
            fcrdns,
            timeout: Duration::from_millis(timeout_ms),
            concurrency: usize::try_from(concurrency).unwrap_or(10),
        }
    }

    fn providers(
        lookup: &Lookup<'_>,
        mut file: FileProviders,
        problems: &mut Problems,
    ) -> (Vec<ProviderSettings>, Duration, Duration) {
        // Empty ENRICHD_PROVIDERS means "none", so read it raw.
        let names: Vec<String> = match lookup.raw("PROVIDERS") {
            Some((_, value)) => split_list(&value),
            None => file.enabled.take().unwrap_or_else(|| {
                ProviderId::ALL
                    .iter()
                    .map(|p| p.as_str().to_owned())
                    .collect()
            }),
        };
        let mut enabled = Vec::new();
        for name in &names {
            match ProviderId::from_id(&name.to_ascii_lowercase()) {
                Some(id) if !enabled.contains(&id) => enabled.push(id),
                Some(_) => {}
                None => problems.push(format!(
                    "providers: unknown provider {name:?} (known: greynoise, abuseipdb, feodo, threatfox)"
                )),
            }
        }
        enabled.sort();

        let feodo_refresh = problems
            .env_value(lookup, "FEODO_REFRESH_SECS", "a whole number", parse_u64)
            .or(file.feodo_refresh_secs)
            .unwrap_or(3600);
        let feodo_max_age = problems
            .env_value(lookup, "FEODO_MAX_AGE_SECS", "a whole number", parse_u64)
            .or(file.feodo_max_age_secs)
            .unwrap_or(86_400);
        if feodo_refresh == 0 || feodo_max_age == 0 {
            problems.push("feodo_refresh_secs and feodo_max_age_secs must be at least 1");
        }

        let mut sections: BTreeMap<ProviderId, FileProvider> = BTreeMap::new();
        for (id, section) in [
            (ProviderId::Greynoise, file.greynoise),
            (ProviderId::Abuseipdb, file.abuseipdb),
            (ProviderId::Feodo, file.feodo),
            (ProviderId::Threatfox, file.threatfox),
        ] {
            sections.insert(id, section.unwrap_or_default());
        }

        let providers = enabled
            .into_iter()
            .map(|id| {
                let section = sections.remove(&id).unwrap_or_default();
                Self::provider_settings(lookup, id, section, problems)
            })
            .collect();
        (
            providers,
            Duration::from_secs(feodo_refresh),
            Duration::from_secs(feodo_max_age),
        )
    }

    fn provider_settings(
        lookup: &Lookup<'_>,
        id: ProviderId,
        section: FileProvider,
        problems: &mut Problems,
    ) -> ProviderSettings {
        let upper = id.env_name();
        let (default_url, default_rate, default_quota) = provider_defaults(id);
        let base_url = lookup
            .get(&format!("{upper}_BASE_URL"))
            .map(|(_, v)| v.trim().trim_end_matches('/').to_owned())
            .or(section.base_url.map(|u| u.trim_end_matches('/').to_owned()))
            .unwrap_or_else(|| default_url.to_owned());
        check_scheme(
            &base_url,
            &["http", "https"],
            &format!("{id}.base_url"),
            problems,
        );

        let api_key = Self::api_key(lookup, id, section.api_key_file.as_deref(), problems);

        let rate_per_sec = problems
            .env_value(
                lookup,
                &format!("{upper}_RATE_PER_SEC"),
                "a non-negative number",
                parse_rate,
            )
            .or(section.rate_per_sec)
            .unwrap_or(default_rate);
        if !(rate_per_sec.is_finite() && rate_per_sec >= 0.0) {
            problems.push(format!("{id}.rate_per_sec must be a non-negative number"));
        }
        let concurrency = problems
            .env_value(
                lookup,
                &format!("{upper}_CONCURRENCY"),
                "a whole number",
                parse_u64,
            )
            .or(section.concurrency)
            .unwrap_or(4);
        if concurrency == 0 || concurrency > 1024 {
            problems.push(format!(
                "{id}.concurrency: {concurrency} is not within 1..=1024"
            ));
        }
        let daily_quota = problems
            .env_value(
                lookup,
                &format!("{upper}_DAILY_QUOTA"),
                "a whole number",
                parse_u64,
            )
            .or(section.daily_quota)
            .unwrap_or(u64::from(default_quota));
        let daily_quota = u32::try_from(daily_quota).unwrap_or_else(|_| {
            problems.push(format!("{id}.daily_quota: {daily_quota} is too large"));
            0
        });

        ProviderSettings {
            id,
            base_url,
            api_key,
            rate_per_sec,
            concurrency: usize::try_from(concurrency).unwrap_or(4),
            daily_quota,
        }
    }

    /// The key from the environment (ThreatFox: its own, then the abuse.ch one), else from
    /// the file the configuration names.
    fn api_key(
        lookup: &Lookup<'_>,
        id: ProviderId,
        key_file: Option<&Path>,
        problems: &mut Problems,
    ) -> Option<Secret> {
        let mut names = vec![format!("{}_API_KEY", id.env_name())];
        if matches!(id, ProviderId::Threatfox | ProviderId::Feodo) {
            names.push("ABUSECH_AUTH_KEY".into());
        }
        if let Some((_, value)) = names.iter().find_map(|n| lookup.get(n)) {
            return Some(Secret::new(value));
        }
        let path = key_file?;
        match std::fs::read_to_string(path) {
            Ok(text) => Some(Secret::new(text)).filter(|s| !s.is_empty()),
            Err(e) => {
                problems.push(format!(
                    "{id}.api_key_file {}: {}",
                    path.display(),
                    e.kind()
                ));
                None
            }
        }
    }

    /// `ENRICHD_*` variables the contract does not define: worth a warning, never an error.
    pub fn unknown_variables(env: &dyn Env) -> Vec<String> {
        let known = known_variables();
        let mut unknown: Vec<String> = env
            .keys()
            .into_iter()
            .filter_map(|k| k.strip_prefix("ENRICHD_").map(str::to_owned))
            .filter(|suffix| !known.contains(suffix))
            .map(|suffix| format!("ENRICHD_{suffix}"))
            .collect();
        unknown.sort();
        unknown
    }

    /// The exclusions as an address policy.
    pub fn address_policy(&self) -> AddressPolicy {
        AddressPolicy::new(self.exclude_cidrs.clone())
    }

    /// The settings of `id`, when configured.
    pub fn provider(&self, id: ProviderId) -> Option<&ProviderSettings> {
        self.providers.iter().find(|p| p.id == id)
    }
}

/// A URL with any password replaced by `***`, for printing.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests;
