//! Stored per-IP state as plain values, and the pure merge of that state into the compatible
//! `attacker_intel` columns and the `attacker.intel.enriched` payload.
//!
//! Everything here is a function of the merged stored state, never of the last pass alone,
//! so two writers for one IP (serialised by the IP's row lock) always produce the same row.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use enrichd_core::payload::IntelPayload;
use enrichd_core::text::{column_text, column_text_opt};
use enrichd_core::{ProviderFields, ProviderId, ProviderOutcome, PtrOutcome, Verdict, verdict};
use serde::{Deserialize, Serialize};

/// How long a row for a non-global address stays valid: it never needs work.
pub(crate) const NON_GLOBAL_VALIDITY: chrono::Duration = chrono::Duration::days(36_500);

/// Where an address may go, as stored in `enrichd_ip_state.scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoredScope {
    /// Global and not excluded.
    Global,
    /// In a special-purpose block.
    NonGlobal,
    /// Excluded by the operator.
    Excluded,
}

impl StoredScope {
    /// The stored label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::NonGlobal => "non_global",
            Self::Excluded => "excluded",
        }
    }

    /// Parses a stored label.
    pub fn from_label(label: &str) -> Option<Self> {
        [Self::Global, Self::NonGlobal, Self::Excluded]
            .into_iter()
            .find(|s| s.as_str() == label)
    }

    /// Whether lookups about this address may leave the machine.
    pub fn is_global(self) -> bool {
        self == Self::Global
    }
}

impl From<enrichd_core::AddressScope> for StoredScope {
    fn from(scope: enrichd_core::AddressScope) -> Self {
        match scope {
            enrichd_core::AddressScope::Global => Self::Global,
            enrichd_core::AddressScope::NonGlobal { .. } => Self::NonGlobal,
            enrichd_core::AddressScope::Excluded => Self::Excluded,
        }
    }
}

/// What the store knows about one (IP, provider).
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderState {
    /// The provider.
    pub provider: ProviderId,
    /// Outcome of the last applied result; `None` before any result.
    pub outcome: Option<ProviderOutcome>,
    /// Verdict of the last answer (kept across errors).
    pub verdict: Option<Verdict>,
    /// Columns of the last answer (kept across errors).
    pub fields: Option<ProviderFields>,
    /// Raw body of the last answer (shared with the report it came from).
    pub raw: Option<std::sync::Arc<serde_json::Value>>,
    /// When the last answer was obtained (the claim time of its lease).
    pub answered_at: Option<DateTime<Utc>>,
    /// Claim time of the last applied result (the fence).
    pub queried_at: Option<DateTime<Utc>>,
    /// When the work falls due again; `None` with an outcome = never.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Consecutive failures.
    pub attempts: u32,
    /// Reason of the last failure.
    pub last_error: Option<String>,
}

impl ProviderState {
    /// Whether the work is due at `now`.
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        self.outcome.is_none() || self.next_attempt_at.is_some_and(|at| at <= now)
    }
}

/// What the store knows about one IP's PTR name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PtrState {
    /// The good name, kept across failures.
    pub name: Option<String>,
    /// Outcome of the last applied lookup.
    pub outcome: Option<PtrOutcome>,
    /// When the stored name was resolved.
    pub resolved_at: Option<DateTime<Utc>>,
    /// When the PTR work falls due again; `None` with an outcome = never.
    pub expires_at: Option<DateTime<Utc>>,
    /// Consecutive failures.
    pub attempts: u32,
    /// Claim time of the last applied lookup (the fence).
    pub queried_at: Option<DateTime<Utc>>,
    /// Whether the stored name resolves back to the address (`None`: not checked, or no
    /// name). Belongs to the name: kept and cleared with it.
    pub forward_confirmed: Option<bool>,
}

impl PtrState {
    /// Whether the PTR work is due at `now`.
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        self.outcome.is_none() || self.expires_at.is_some_and(|at| at <= now)
    }
}

/// The per-pass settings the merge and the writer need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyContext {
    /// Configured providers (their due times decide `expires_at`; `provider_outcomes` lists them).
    pub providers: Vec<ProviderId>,
    /// Provider answer TTL (`ENRICHD_TTL_HOURS`).
    pub ttl: Duration,
    /// Whether a bus is configured: only then are outbox rows written.
    pub outbox_enabled: bool,
    /// Whether PTR resolution is on (backlog considers PTR due work only then).
    pub ptr_enabled: bool,
    /// With a relay in this process: outbox rows are written already claimed by it for this
    /// long and handed to it with the write's outcome ([`crate::ApplyOutcome::handed_off`]),
    /// so it publishes them without a claim transaction of its own. `None` (`lookup`,
    /// `backfill`): rows are left for any running worker's relay to claim.
    pub relay_claim: Option<Duration>,
}

impl Default for ApplyContext {
    fn default() -> Self {
        Self {
            providers: ProviderId::ALL.to_vec(),
            ttl: Duration::from_hours(24),
            outbox_enabled: false,
            ptr_enabled: true,
            relay_claim: None,
        }
    }
}

/// The compatible `attacker_intel` columns of one IP (all but `uuid`, `attacker_uuid`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IntelColumns<'a> {
    pub(crate) attacker_ip: String,
    pub(crate) greynoise_classification: Option<String>,
    pub(crate) greynoise_name: Option<String>,
    pub(crate) greynoise_tags: serde_json::Value,
    /// Borrowed from the stored state it came from: raw bodies are the largest values a
    /// write handles, and copying each into the row cost more than the rest of the merge.
    /// `None` is written as `{}`.
    pub(crate) greynoise_raw: Option<&'a serde_json::Value>,
    pub(crate) greynoise_queried_at: Option<DateTime<Utc>>,
    pub(crate) abuseipdb_score: Option<i32>,
    pub(crate) abuseipdb_categories: serde_json::Value,
    pub(crate) abuseipdb_raw: Option<&'a serde_json::Value>,
    pub(crate) abuseipdb_queried_at: Option<DateTime<Utc>>,
    pub(crate) feodo_listed: Option<bool>,
    pub(crate) feodo_malware_family: Option<String>,
    pub(crate) feodo_raw: Option<&'a serde_json::Value>,
    pub(crate) feodo_queried_at: Option<DateTime<Utc>>,
    pub(crate) threatfox_listed: Option<bool>,
    pub(crate) threatfox_threat_types: serde_json::Value,
    pub(crate) threatfox_ioc_types: serde_json::Value,
    pub(crate) threatfox_malware_families: serde_json::Value,
    pub(crate) threatfox_raw: Option<&'a serde_json::Value>,
    pub(crate) threatfox_queried_at: Option<DateTime<Utc>>,
    pub(crate) aggregate_verdict: Option<String>,
    pub(crate) cached_at: DateTime<Utc>,
    pub(crate) expires_at: DateTime<Utc>,
}

fn empty_list() -> serde_json::Value {
    serde_json::Value::Array(Vec::new())
}

fn strings(items: &[String]) -> serde_json::Value {
    serde_json::Value::Array(
        items
            .iter()
            .map(|s| serde_json::Value::String(column_text(s, usize::MAX)))
            .collect(),
    )
}

impl<'a> IntelColumns<'a> {
    /// A row with every provider column empty.
    pub(crate) fn empty(ip: &str, cached_at: DateTime<Utc>, expires_at: DateTime<Utc>) -> Self {
        Self {
            attacker_ip: ip.to_owned(),
            greynoise_classification: None,
            greynoise_name: None,
            greynoise_tags: empty_list(),
            greynoise_raw: None,
            greynoise_queried_at: None,
            abuseipdb_score: None,
            abuseipdb_categories: empty_list(),
            abuseipdb_raw: None,
            abuseipdb_queried_at: None,
            feodo_listed: None,
            feodo_malware_family: None,
            feodo_raw: None,
            feodo_queried_at: None,
            threatfox_listed: None,
            threatfox_threat_types: empty_list(),
            threatfox_ioc_types: empty_list(),
            threatfox_malware_families: empty_list(),
            threatfox_raw: None,
            threatfox_queried_at: None,
            aggregate_verdict: None,
            cached_at,
            expires_at,
        }
    }

    fn fill(&mut self, state: &'a ProviderState, fields: &ProviderFields) {
        let raw = state.raw.as_deref();
        let at = state.answered_at;
        match fields {
            ProviderFields::Greynoise {
                classification,
                name,
                tags,
            } => {
                self.greynoise_classification = Some(column_text(classification, 32));
                self.greynoise_name = column_text_opt(name.as_deref(), 128);
                self.greynoise_tags = strings(tags);
                self.greynoise_raw = raw;
                self.greynoise_queried_at = at;
            }
            ProviderFields::Abuseipdb { score, categories } => {
                self.abuseipdb_score = Some(*score);
                self.abuseipdb_categories = serde_json::Value::Array(
                    categories
                        .iter()
                        .map(|c| serde_json::Value::from(*c))
                        .collect(),
                );
                self.abuseipdb_raw = raw;
                self.abuseipdb_queried_at = at;
            }
            ProviderFields::Feodo {
                listed,
                malware_family,
            } => {
                self.feodo_listed = Some(*listed);
                self.feodo_malware_family = column_text_opt(malware_family.as_deref(), 64);
                self.feodo_raw = raw;
                self.feodo_queried_at = at;
            }
            ProviderFields::Threatfox {
                listed,
                threat_types,
                ioc_types,
                malware_families,
            } => {
                self.threatfox_listed = Some(*listed);
                self.threatfox_threat_types = strings(threat_types);
                self.threatfox_ioc_types = strings(ioc_types);
                self.threatfox_malware_families = strings(malware_families);
                self.threatfox_raw = raw;
                self.threatfox_queried_at = at;
            }
        }
    }
}

/// The merged view of one IP: its `attacker_intel` columns and its payload (with
/// `attacker_uuid` unset).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Merged<'a> {
    pub(crate) columns: IntelColumns<'a>,
    pub(crate) payload: IntelPayload,
}

/// Merges the stored state of one IP into its row and payload.
///
/// `states` may hold providers that are no longer configured. Their stored answers are kept
/// (turning the provider back on reuses them while fresh) but count for nothing: the columns,
/// `providers`, the aggregate, `expires_at` and `provider_outcomes` come from the configured
/// providers only, so an old `malicious` from a provider an operator turned off cannot pin
/// the verdict.
pub(crate) fn merge<'a>(
    ip: &str,
    scope: StoredScope,
    states: &'a [ProviderState],
    ptr: &PtrState,
    ctx: &ApplyContext,
    now: DateTime<Utc>,
) -> Merged<'a> {
    let ptr_record = ptr.name.clone();
    // Never asked: say why rather than leave the reader guessing.
    let unasked = if !scope.is_global() {
        Some(PtrOutcome::SkippedNonGlobal)
    } else if !ctx.ptr_enabled {
        Some(PtrOutcome::Disabled)
    } else {
        None
    };
    let ptr_outcome = ptr.outcome.or(unasked).map(|o| o.as_str().to_owned());
    let ptr_forward_confirmed = ptr.name.as_ref().and(ptr.forward_confirmed);
    if !scope.is_global() {
        let columns = IntelColumns::empty(ip, now, now + NON_GLOBAL_VALIDITY);
        let provider_outcomes = ctx
            .providers
            .iter()
            .map(|p| {
                let outcome = states
                    .iter()
                    .find(|s| s.provider == *p)
                    .and_then(|s| s.outcome)
                    .unwrap_or(ProviderOutcome::SkippedNonGlobal);
                (p.as_str().to_owned(), outcome.as_str().to_owned())
            })
            .collect();
        let payload = payload_from(
            &columns,
            Vec::new(),
            PtrView {
                record: ptr_record,
                outcome: ptr_outcome,
                forward_confirmed: ptr_forward_confirmed,
            },
            provider_outcomes,
        );
        return Merged { columns, payload };
    }

    let ttl = chrono::Duration::from_std(ctx.ttl).unwrap_or(chrono::Duration::hours(24));
    let mut columns = IntelColumns::empty(ip, now, now + ttl);
    let mut answered = Vec::new();
    let configured = || {
        states
            .iter()
            .filter(|s| ctx.providers.contains(&s.provider))
    };
    for provider in ProviderId::ALL {
        let Some(state) = configured().find(|s| s.provider == provider) else {
            continue;
        };
        if let Some(fields) = state.fields.as_ref().filter(|f| f.provider() == provider) {
            columns.fill(state, fields);
            answered.push(provider.as_str().to_owned());
        }
    }
    columns.aggregate_verdict =
        verdict::aggregate(configured().map(|s| s.verdict)).map(|v| v.as_str().to_owned());

    let mut earliest: Option<DateTime<Utc>> = None;
    let mut provider_outcomes = BTreeMap::new();
    for provider in &ctx.providers {
        let state = states.iter().find(|s| s.provider == *provider);
        if let Some(outcome) = state.and_then(|s| s.outcome) {
            provider_outcomes.insert(provider.as_str().to_owned(), outcome.as_str().to_owned());
        }
        let due = match state {
            None => Some(now),
            Some(s) if s.outcome.is_none() => Some(now),
            Some(s)
                if matches!(
                    s.outcome,
                    Some(ProviderOutcome::SkippedUnsupported | ProviderOutcome::SkippedNonGlobal)
                ) =>
            {
                None
            }
            Some(s) => s.next_attempt_at,
        };
        if let Some(due) = due {
            earliest = Some(earliest.map_or(due, |e| e.min(due)));
        }
    }
    if let Some(earliest) = earliest {
        columns.expires_at = earliest;
    }
    let payload = payload_from(
        &columns,
        answered,
        PtrView {
            record: ptr_record,
            outcome: ptr_outcome,
            forward_confirmed: ptr_forward_confirmed,
        },
        provider_outcomes,
    );
    Merged { columns, payload }
}

fn json_strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The PTR keys of a payload.
struct PtrView {
    record: Option<String>,
    outcome: Option<String>,
    forward_confirmed: Option<bool>,
}

fn payload_from(
    c: &IntelColumns<'_>,
    providers: Vec<String>,
    ptr: PtrView,
    provider_outcomes: BTreeMap<String, String>,
) -> IntelPayload {
    IntelPayload {
        attacker_uuid: None,
        attacker_ip: c.attacker_ip.clone(),
        aggregate_verdict: c.aggregate_verdict.clone(),
        providers,
        abuseipdb_score: c.abuseipdb_score,
        abuseipdb_categories: c
            .abuseipdb_categories
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_i64).collect())
            .unwrap_or_default(),
        greynoise_classification: c.greynoise_classification.clone(),
        greynoise_name: c.greynoise_name.clone(),
        greynoise_tags: json_strings(&c.greynoise_tags),
        feodo_listed: c.feodo_listed,
        feodo_malware_family: c.feodo_malware_family.clone(),
        threatfox_listed: c.threatfox_listed,
        threatfox_threat_types: json_strings(&c.threatfox_threat_types),
        threatfox_ioc_types: json_strings(&c.threatfox_ioc_types),
        threatfox_malware_families: json_strings(&c.threatfox_malware_families),
        ptr_record: ptr.record,
        ptr_outcome: ptr.outcome,
        ptr_forward_confirmed: ptr.forward_confirmed,
        provider_outcomes,
    }
}

/// A digest of a payload's keys, so an unchanged payload (raw bodies and timestamps do not
/// count: they are not in it) publishes nothing.
pub(crate) fn payload_digest(payload: &IntelPayload) -> String {
    use sha2::{Digest, Sha256};
    let text = serde_json::to_string(payload).unwrap_or_default();
    let digest = Sha256::digest(text.as_bytes());
    crate::sql::hex(&digest[..16])
}

#[cfg(test)]
mod tests;
