//! `enrichd check`: validate the configuration and reach what it names, spending no quota.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use enrichd_store::SchemaStatus;

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
    check_database(settings, &mut report).await;
    check_bus(settings, &mut report).await;
    check_dns(settings, &mut report);
    check_providers(settings, &mut report);

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

async fn check_database(settings: &Settings, report: &mut Report) {
    let database = redact_url(&settings.database_url);
    let Ok(store) = super::open_store(settings, false).await else {
        report.fail("database", "unreachable", &database);
        return;
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
}

async fn check_bus(settings: &Settings, report: &mut Report) {
    let Some(bus) = &settings.bus else {
        report.row("bus", "off", "no ENRICHD_AMQP_URL: poll mode");
        return;
    };
    let url = redact_url(bus.amqp_url.expose());
    if tcp_reachable(bus.amqp_url.expose()).await {
        report.row("bus", "reachable", &url);
    } else {
        report.fail("bus", "unreachable", &url);
    }
}

fn check_dns(settings: &Settings, report: &mut Report) {
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
        settings
            .dns
            .servers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let detail = format!(
        "{servers}, deadline {} ms",
        settings.dns.timeout.as_millis()
    );
    report.row("dns", "enabled", &detail);
}

fn check_providers(settings: &Settings, report: &mut Report) {
    if settings.providers.is_empty() {
        report.row("providers", "none", "ENRICHD_PROVIDERS is empty");
    }
    for provider in &settings.providers {
        let key = if provider.api_key.is_some() {
            "key set"
        } else {
            "no key"
        };
        match provider.disabled_reason() {
            Some(reason) => report.row(provider.id.as_str(), "disabled", &reason),
            None => report.row(
                provider.id.as_str(),
                "configured",
                &format!(
                    "{} ({key}, {:.2}/s)",
                    provider.base_url, provider.rate_per_sec
                ),
            ),
        }
    }
}

/// Whether the broker's host:port accepts TCP, without logging in.
async fn tcp_reachable(amqp_url: &str) -> bool {
    let Some((_, rest)) = amqp_url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let default_port = if amqp_url.starts_with("amqps") {
        5671
    } else {
        5672
    };
    let target = if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
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
