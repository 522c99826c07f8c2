//! `enrichd lookup <ip>... [--json] [--refresh]`: PTR and every provider for the given
//! addresses, reusing fresh stored state unless `--refresh`. Results are stored in enrichd's
//! own state; attacker rows are never created.

use std::io::Write as _;

use enrichd_core::CanonicalIp;
use enrichd_core::messages::{EnrichIp, JobId, Origin};
use enrichd_core::payload::IntelPayload;
use futures::future::join_all;

use crate::config::Settings;
use crate::{exit, wiring};

pub(super) async fn lookup(settings: &Settings, ips: &[String], json: bool, refresh: bool) -> u8 {
    let mut status = exit::OK;
    let mut parsed = Vec::new();
    for text in ips {
        match CanonicalIp::parse(text) {
            Ok(ip) => parsed.push(ip),
            Err(e) => {
                eprintln!("error: {e}");
                status = exit::FAILURE;
            }
        }
    }
    if parsed.is_empty() {
        return status;
    }
    let store = match super::open_current_store(settings).await {
        Ok(store) => store,
        Err(code) => return code,
    };
    let core = wiring::start_core(settings, &store, None, wiring::OutboxRelay::Elsewhere);
    let answers = join_all(parsed.iter().map(|ip| {
        core.aggregator.send(EnrichIp {
            job_id: JobId::new(),
            ip: *ip,
            attacker_uuid: None,
            first_seen: None,
            origin: Origin::Lookup { refresh },
        })
    }))
    .await;

    let mut rows: Vec<IntelPayload> = Vec::new();
    for (ip, answer) in parsed.iter().zip(answers) {
        match answer {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("error: {ip}: {e}");
                status = exit::FAILURE;
            }
            Err(e) => {
                eprintln!("error: {ip}: {e}");
                status = exit::FAILURE;
            }
        }
        match store.lookup_view(*ip, &core.deps.ctx).await {
            Ok(views) => rows.extend(views),
            Err(e) => {
                eprintln!("error: {ip}: {}", enrichd_core::error::chain(&e));
                status = exit::FAILURE;
            }
        }
    }
    let text = if json {
        render_json(&rows)
    } else {
        render_table(&rows, &core.deps.ctx.providers)
    };
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return exit::FAILURE;
    }
    status
}

fn render_json(rows: &[IntelPayload]) -> String {
    rows.iter()
        .filter_map(|row| serde_json::to_string(row).ok())
        .map(|line| line + "\n")
        .collect()
}

/// One line per address: PTR, aggregate, then each configured provider's outcome and gist.
fn render_table(rows: &[IntelPayload], providers: &[enrichd_core::ProviderId]) -> String {
    let mut header = vec!["ip".to_owned(), "ptr".to_owned(), "verdict".to_owned()];
    header.extend(providers.iter().map(|p| p.as_str().to_owned()));
    let mut lines = vec![header];
    for row in rows {
        let ptr = match (&row.ptr_record, row.ptr_outcome.as_deref()) {
            (Some(name), _) => name.clone(),
            (None, Some(outcome)) => format!("({outcome})"),
            (None, None) => "-".into(),
        };
        let mut line = vec![
            row.attacker_ip.clone(),
            ptr,
            row.aggregate_verdict.clone().unwrap_or_else(|| "-".into()),
        ];
        for provider in providers {
            line.push(provider_cell(row, *provider));
        }
        lines.push(line);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|col| {
            lines
                .iter()
                .map(|l| l[col].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    lines
        .iter()
        .map(|line| {
            let cells: Vec<String> = line
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_owned() + "\n"
        })
        .collect()
}

fn provider_cell(row: &IntelPayload, provider: enrichd_core::ProviderId) -> String {
    use enrichd_core::ProviderId as P;
    let outcome = row
        .provider_outcomes
        .get(provider.as_str())
        .map_or("-", String::as_str);
    if outcome != "ok" {
        return outcome.to_owned();
    }
    match provider {
        P::Greynoise => {
            let class = row.greynoise_classification.as_deref().unwrap_or("?");
            match &row.greynoise_name {
                Some(name) => format!("{class} ({name})"),
                None => class.to_owned(),
            }
        }
        P::Abuseipdb => row
            .abuseipdb_score
            .map_or_else(|| "ok".into(), |s| format!("score {s}")),
        P::Feodo => match (row.feodo_listed, &row.feodo_malware_family) {
            (Some(true), Some(family)) => format!("listed ({family})"),
            (Some(true), None) => "listed".into(),
            _ => "not listed".into(),
        },
        P::Threatfox => match row.threatfox_listed {
            Some(true) => format!("listed ({})", row.threatfox_malware_families.join(", ")),
            _ => "not listed".into(),
        },
    }
}
