//! `enrichd check`: validate the configuration and reach what it names, spending no quota.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use enrichd_store::{SchemaStatus, Store};

use crate::config::{Settings, redact_url};
use crate::exit;

/// The status table, one row per component; unhealthy rows make the command exit 1.
#[derive(Default)]
struct Report {
    text: String,
    healthy: bool,
}

impl Report {
    fn row(&mut self, name: &str, status: &str, detail: &str) {
        let _ = writeln!(self.text, "{name:<11} {status:<14} {detail}");
    }

    fn fail(&mut self, name: &str, status: &str, detail: &str) {
        self.healthy = false;
        self.row(name, status, detail);
    }
}

pub(super) async fn check(settings: &Settings) -> u8 {
    let mut report = Report {
        healthy: true,
        ..Report::default()
    };
    report.row("config", "ok", "valid");
    let store = check_database(settings, &mut report).await;
    check_bus(settings, &mut report).await;
    check_dns(settings, &mut report).await;
    check_providers(settings, store.as_ref(), &mut report).await;

    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(report.text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return exit::FAILURE;
    }
    if report.healthy {
        exit::OK
    } else {
        exit::FAILURE
    }
}

/// The database row; returns the store when it is reachable, for the provider rows.
async fn check_database(settings: &Settings, report: &mut Report) -> Option<Store> {
    let database = redact_url(&settings.database_url);
    // A server over TCP; a Unix-socket URL (`postgres:///db?host=/run/postgresql`) has no
    // host to probe and goes straight to the pool.
    let is_server = ["postgres://", "postgresql://"]
        .iter()
        .any(|scheme| settings.database_url.starts_with(scheme))
        && !host_port(&settings.database_url).is_empty();
    // A refused or silent server is reported at once (3 s at most) rather than after the
    // pool's 10 s acquire timeout.
    if is_server && !url_reachable(&settings.database_url).await {
        report.fail("database", "unreachable", &database);
        return None;
    }
    let Ok(store) = super::open_store(settings, false).await else {
        report.fail("database", "unreachable", &database);
        return None;
    };
    match store.schema_status().await {
        Ok(SchemaStatus::Current) => {
            report.row(
                "database",
                "reachable",
                &format!("{database} (schema current)"),
            );
        }
        Ok(SchemaStatus::Behind { found: None }) => {
            report.row(
                "database",
                "reachable",
                &format!("{database} (not migrated yet)"),
            );
        }
        Ok(SchemaStatus::Behind { found: Some(v) }) => {
            report.row(
                "database",
                "reachable",
                &format!("{database} (schema {v} needs migrating)"),
            );
        }
        Ok(SchemaStatus::Ahead { found }) => report.fail(
            "database",
            "too new",
            &format!("{database} (schema {found} is newer than this binary)"),
        ),
        Err(e) => report.fail(
            "database",
            "error",
            &format!("{database}: {}", enrichd_core::error::chain(&e)),
        ),
    }
    Some(store)
}

async fn check_bus(settings: &Settings, report: &mut Report) {
    let Some(bus) = &settings.bus else {
        report.row("bus", "off", "no ENRICHD_AMQP_URL: poll mode");
        return;
    };
    let url = redact_url(bus.amqp_url.expose());
    if url_reachable(bus.amqp_url.expose()).await {
        report.row("bus", "reachable", &url);
    } else {
        report.fail("bus", "unreachable", &url);
    }
}

async fn check_dns(settings: &Settings, report: &mut Report) {
    if !settings.dns.ptr_enabled {
        report.row(
            "dns",
            "disabled",
            "ENRICHD_PTR_ENABLED=false: no DNS traffic",
        );
        return;
    }
    let servers = if settings.dns.servers.is_empty() {
        "system resolvers".to_owned()
    } else {
        let list: Vec<String> = settings
            .dns
            .servers
            .iter()
            .map(ToString::to_string)
            .collect();
        list.join(", ")
    };
    let detail = format!(
        "{servers}, deadline {} ms",
        settings.dns.timeout.as_millis()
    );
    let config = enrichd_dns::DnsConfig {
        servers: settings.dns.servers.clone(),
        timeout: settings.dns.timeout,
        concurrency: settings.dns.concurrency,
        fcrdns: settings.dns.fcrdns,
    };
    match enrichd_dns::HickoryPtrResolver::new(&config) {
        Ok(resolver) => match resolver.probe().await {
            Ok(()) => report.row("dns", "reachable", &detail),
            Err(reason) => report.fail("dns", "unreachable", &format!("{detail}: {reason}")),
        },
        Err(e) => report.fail("dns", "error", &enrichd_core::error::chain(&e)),
    }
}

/// Per provider: configured or disabled, whether its endpoint accepts a TCP connection (no
/// request is sent, so no quota is spent), and the cluster-wide park and quota state. Breaker
/// state lives in each running worker; it is on `/metrics` (`enrichd_breaker_state`) and in
/// the health beats, not here.
async fn check_providers(settings: &Settings, store: Option<&Store>, report: &mut Report) {
    if settings.providers.is_empty() {
        report.row("providers", "none", "ENRICHD_PROVIDERS is empty");
    }
    for provider in &settings.providers {
        if let Some(reason) = provider.disabled_reason() {
            report.row(provider.id.as_str(), "disabled", &reason);
            continue;
        }
        let key = if provider.api_key.is_some() {
            "key set"
        } else {
            "no key"
        };
        let mut detail = format!(
            "{} ({key}, {:.2}/s)",
            provider.base_url, provider.rate_per_sec
        );
        if let Some(store) = store {
            let limits = enrichd_core::ports::ProviderLimits {
                rate_per_sec: provider.rate_per_sec,
                daily_quota: provider.daily_quota,
                key_fingerprint: provider
                    .api_key
                    .as_ref()
                    .map(enrichd_intel::key_fingerprint),
            };
            if let Ok(status) = store.provider_status(provider.id, &limits).await {
                if let Some(until) = status.parked_until {
                    let _ = write!(detail, ", parked until {until}");
                }
                if status.key_rejected {
                    detail.push_str(", key rejected");
                }
                if let Some(remaining) = status.quota_remaining {
                    let _ = write!(detail, ", quota left {remaining}");
                }
            }
        }
        if url_reachable(&provider.base_url).await {
            report.row(provider.id.as_str(), "reachable", &detail);
        } else {
            report.fail(provider.id.as_str(), "unreachable", &detail);
        }
    }
}

/// The `host[:port]` of `url`, without credentials; empty when it has none.
fn host_port(url: &str) -> &str {
    let Some((_, rest)) = url.split_once("://") else {
        return "";
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority.rsplit_once('@').map_or(authority, |(_, h)| h)
}

/// Whether `url`'s host:port accepts a TCP connection, without sending anything (no login,
/// no request, no quota). `url` may carry credentials (`amqp://user:pass@host`); the port
/// defaults by scheme.
async fn url_reachable(url: &str) -> bool {
    let Some((scheme, _)) = url.split_once("://") else {
        return false;
    };
    let host_port = host_port(url);
    if host_port.is_empty() {
        return false;
    }
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => 443,
        "amqp" => 5672,
        "amqps" => 5671,
        "postgres" | "postgresql" => 5432,
        _ => 80,
    };
    let has_port = host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
    let target = if has_port {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(target),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_port_drops_credentials_and_is_empty_for_sockets() {
        assert_eq!(host_port("postgres://u:secret@db:5433/x"), "db:5433");
        assert_eq!(host_port("amqp://guest:guest@[::1]:5672/%2f"), "[::1]:5672");
        assert_eq!(host_port("https://api.greynoise.io/v3"), "api.greynoise.io");
        assert_eq!(host_port("postgres:///enrichd?host=/run/postgresql"), "");
        assert_eq!(host_port("not a url"), "");
    }
}
