//! `enrichd lookup <ip>... [--json] [--refresh] [--max-wait SECS]`: PTR and every provider for
//! the given addresses, reusing fresh stored state unless `--refresh`. Results are stored in
//! enrichd's own state; attacker rows are never created.
//!
//! Rate limits are honoured, never lifted: a provider with no slot for an address yet is
//! waited for (a line on stderr says so) up to `--max-wait`; one that cannot answer within
//! it (parked, breaker open, key rejected) is shown with that state, never as a gap.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use enrichd_core::job::{JobId, Origin, ProviderUnavailable};
use enrichd_core::payload::IntelPayload;
use enrichd_core::{CanonicalIp, ProviderId};
use enrichd_runtime::job::{Patience, ProviderNotice};
use enrichd_runtime::messages::EnrichIp;
use futures::future::join_all;

use crate::config::Settings;
use crate::{exit, wiring};

/// `enrichd lookup`'s flags.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LookupOptions {
    /// One JSON object per line instead of a table.
    pub(crate) json: bool,
    /// Ask again even when fresh.
    pub(crate) refresh: bool,
    /// Longest wait for one provider's slot or park end.
    pub(crate) max_wait: Duration,
}

/// Providers a pass could not ask, by address: what is shown in their place.
type Unavailable = HashMap<(CanonicalIp, ProviderId), ProviderUnavailable>;

pub(super) async fn lookup(settings: &Settings, ips: &[String], options: LookupOptions) -> u8 {
    let mut status = exit::OK;
    let mut parsed = Vec::new();
    for text in ips {
        match CanonicalIp::parse(text) {
            Ok(ip) => {
                if !parsed.contains(&ip) {
                    parsed.push(ip);
                }
            }
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
    let unavailable: Arc<Mutex<Unavailable>> = Arc::default();
    let patience = Patience {
        max_wait: options.max_wait,
        notices: {
            let unavailable = Arc::clone(&unavailable);
            Arc::new(move |notice: ProviderNotice| {
                let mut gaps = unavailable.lock().unwrap_or_else(PoisonError::into_inner);
                if notice.waiting {
                    gaps.remove(&(notice.ip, notice.provider));
                    eprintln!("{}", waiting_line(&notice, Utc::now()));
                } else {
                    gaps.insert((notice.ip, notice.provider), notice.reason);
                }
            })
        },
    };
    let core = wiring::start_core(
        settings,
        &store,
        None,
        wiring::OutboxRelay::Elsewhere,
        Some(patience),
    );
    let answers = join_all(parsed.iter().map(|ip| {
        core.aggregator.send(EnrichIp {
            job_id: JobId::new(),
            ip: *ip,
            attacker_uuid: None,
            first_seen: None,
            origin: Origin::Lookup {
                refresh: options.refresh,
            },
        })
    }))
    .await;

    let gaps = std::mem::take(&mut *unavailable.lock().unwrap_or_else(PoisonError::into_inner));
    let now = store.db_now().await.unwrap_or_else(|_| Utc::now());
    let mut lines: Vec<Line> = Vec::new();
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
            Ok(views) => lines.extend(
                views
                    .into_iter()
                    .map(|payload| Line::new(payload, *ip, &gaps)),
            ),
            Err(e) => {
                eprintln!("error: {ip}: {}", enrichd_core::error::chain(&e));
                status = exit::FAILURE;
            }
        }
    }
    let text = if options.json {
        render_json(&lines)
    } else {
        render_table(&lines, &core.deps.ctx.providers, settings.dns.fcrdns, now)
    };
    if !super::print_out(&text) {
        return exit::FAILURE;
    }
    status
}

/// One printed row: the stored view, with the state of every provider this lookup could not
/// ask in place of its stored outcome.
#[derive(Debug, serde::Serialize)]
struct Line {
    #[serde(flatten)]
    payload: IntelPayload,
    /// When each provider shown `rate_limited` may be asked again.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    provider_resume_at: BTreeMap<String, DateTime<Utc>>,
}

impl Line {
    fn new(mut payload: IntelPayload, ip: CanonicalIp, gaps: &Unavailable) -> Self {
        let mut provider_resume_at = BTreeMap::new();
        for ((gap_ip, provider), reason) in gaps {
            if *gap_ip != ip {
                continue;
            }
            payload
                .provider_outcomes
                .insert(provider.as_str().to_owned(), reason.label().to_owned());
            if let Some(at) = reason.resumes_at() {
                provider_resume_at.insert(provider.as_str().to_owned(), at);
            }
        }
        Self {
            payload,
            provider_resume_at,
        }
    }
}

/// "greynoise: waiting for rate limit, 3 s (45.155.205.233)".
fn waiting_line(notice: &ProviderNotice, now: DateTime<Utc>) -> String {
    let at = notice.reason.resumes_at().unwrap_or(now);
    let secs = (at - now)
        .num_milliseconds()
        .max(0)
        .unsigned_abs()
        .div_ceil(1000);
    let what = match notice.reason {
        ProviderUnavailable::Parked(_) => {
            format!("rate_limited until {}", super::short_time(at, now))
        }
        _ => "waiting for rate limit".to_owned(),
    };
    format!("{}: {what}, {secs} s ({})", notice.provider, notice.ip)
}

fn render_json(rows: &[Line]) -> String {
    rows.iter()
        .filter_map(|row| serde_json::to_string(row).ok())
        .map(|line| line + "\n")
        .collect()
}

/// One line per address: PTR (and, with forward confirmation on, whether it confirmed),
/// aggregate, then each configured provider's outcome and gist.
fn render_table(
    rows: &[Line],
    providers: &[ProviderId],
    fcrdns: bool,
    now: DateTime<Utc>,
) -> String {
    let mut header = vec!["ip".to_owned(), "ptr".to_owned()];
    if fcrdns {
        header.push("fcrdns".to_owned());
    }
    header.push("verdict".to_owned());
    header.extend(providers.iter().map(|p| p.as_str().to_owned()));
    let mut lines = vec![header];
    for line in rows {
        let row = &line.payload;
        let ptr = match (&row.ptr_record, row.ptr_outcome.as_deref()) {
            (Some(name), _) => name.clone(),
            (None, Some(outcome)) => format!("({outcome})"),
            (None, None) => "-".into(),
        };
        let mut cells = vec![row.attacker_ip.clone(), ptr];
        if fcrdns {
            cells.push(
                match row.ptr_forward_confirmed {
                    Some(true) => "confirmed",
                    Some(false) => "unconfirmed",
                    None => "-",
                }
                .to_owned(),
            );
        }
        cells.push(row.aggregate_verdict.clone().unwrap_or_else(|| "-".into()));
        for provider in providers {
            cells.push(provider_cell(line, *provider, now));
        }
        lines.push(cells);
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

fn provider_cell(line: &Line, provider: ProviderId, now: DateTime<Utc>) -> String {
    use ProviderId as P;
    let row = &line.payload;
    let outcome = row
        .provider_outcomes
        .get(provider.as_str())
        .map_or("-", String::as_str);
    if let Some(at) = line.provider_resume_at.get(provider.as_str()) {
        return format!("{outcome} until {}", super::short_time(*at, now));
    }
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
