//! Request counters, served at `GET /_stats` and `GET /_log`, cleared by `POST /_reset`.
//!
//! The documents are typed here, once, for both sides: the fake serialises [`Stats`] and
//! [`RequestLog`], and the tools that read them (`enrichd-harness`, for the fault suite and
//! the benchmark) deserialise the same types.
//!
//! `/_stats` is
//! `{"requests": {"greynoise": N, ...}, "per_key": {"greynoise": {"distinct": n,
//! "max_per_key": k, "total": N}, ...}, "timeline": {"greynoise": [epoch_ms, ...]}}`, plus
//! `"rate_limited": {"greynoise": [epoch_ms of each 429 sent], ...}`, `"errors": {"greynoise":
//! N, ...}` (500s sent) and `"dns": {"queries": N}`. `/_log` lists every provider request as
//! `[arrival epoch_ms, key, status]` (key = the address; `feed` for Feodo downloads).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use enrichd_core::ProviderId;
use enrichd_testkit::dns::QueryCounter;
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (wall clock, comparable across processes).
pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// === the documents ===

/// The `/_stats` document. Every map is keyed by provider id and holds all four providers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests served per provider (Feodo: feed downloads).
    pub requests: BTreeMap<String, u64>,
    /// Requests per provider grouped by key (the address).
    pub per_key: BTreeMap<String, PerKey>,
    /// Arrival time (epoch ms) of every request, in arrival order. Left out of a summary
    /// ([`Stats::without_timelines`]): it holds one number per request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub timeline: BTreeMap<String, Vec<u64>>,
    /// When each 429 was sent (epoch ms).
    pub rate_limited: BTreeMap<String, Vec<u64>>,
    /// 500s sent.
    pub errors: BTreeMap<String, u64>,
    /// The DNS server's counter.
    pub dns: DnsStats,
}

/// One provider's requests grouped by key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerKey {
    /// Distinct keys asked about.
    pub distinct: u64,
    /// Most requests for one key.
    #[allow(clippy::struct_field_names, reason = "the /_stats field's name")]
    pub max_per_key: u64,
    /// All requests.
    pub total: u64,
}

/// The DNS part of `/_stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStats {
    /// Packets received, answered or not.
    pub queries: u64,
}

impl Stats {
    /// Requests served for `provider`.
    pub fn requests(&self, provider: ProviderId) -> u64 {
        self.requests.get(provider.as_str()).copied().unwrap_or(0)
    }

    /// Requests served over every provider.
    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }

    /// `provider`'s requests grouped by key (zero when absent).
    pub fn per_key(&self, provider: ProviderId) -> PerKey {
        self.per_key
            .get(provider.as_str())
            .copied()
            .unwrap_or_default()
    }

    /// Arrival times of `provider`'s requests (empty in a summary).
    pub fn timeline(&self, provider: ProviderId) -> &[u64] {
        self.timeline
            .get(provider.as_str())
            .map_or(&[], Vec::as_slice)
    }

    /// When `provider`'s 429s were sent.
    pub fn rate_limited(&self, provider: ProviderId) -> &[u64] {
        self.rate_limited
            .get(provider.as_str())
            .map_or(&[], Vec::as_slice)
    }

    /// The document without its timelines, for a report.
    #[must_use]
    pub fn without_timelines(mut self) -> Self {
        self.timeline.clear();
        self
    }
}

/// The `/_log` document: every provider request, per provider id, in arrival order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestLog(pub BTreeMap<String, Vec<LogEntry>>);

/// One request in the `/_log` document, `[arrival epoch_ms, key, status]`; the status is 0
/// while the answer is still being decided.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LogEntry(pub u64, pub String, pub u16);

impl LogEntry {
    /// When the request arrived (epoch ms).
    pub fn arrival_ms(&self) -> u64 {
        self.0
    }

    /// The key it asked about (the address; `feed` for Feodo).
    pub fn key(&self) -> &str {
        &self.1
    }

    /// The status it was answered with.
    pub fn status(&self) -> u16 {
        self.2
    }
}

impl RequestLog {
    /// `provider`'s requests, in arrival order.
    pub fn entries(&self, provider: ProviderId) -> &[LogEntry] {
        self.0.get(provider.as_str()).map_or(&[], Vec::as_slice)
    }
}

// === the live counters ===

#[derive(Debug, Default)]
struct ProviderLog {
    per_key: HashMap<Box<str>, u32>,
    timeline: Vec<u64>,
    /// `(arrival ms, key, status)`, status filled in when the answer is decided.
    log: Vec<(u64, Box<str>, u16)>,
    rate_limited: Vec<u64>,
    errors: u64,
}

/// One request as recorded at arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// Earlier requests for the same `(provider, key)`: the fault roll's attempt number.
    pub attempt: u32,
    /// Position in the log, to fill in the status later.
    pub slot: usize,
}

/// All counters; one lock per provider, so providers never contend with each other.
#[derive(Debug, Default)]
pub struct Counters {
    providers: [Mutex<ProviderLog>; 4],
    /// The DNS server counts its own packets; `/_stats` reports them and `/_reset` clears them.
    dns_queries: QueryCounter,
}

impl Counters {
    /// Counters reporting `dns_queries` as the DNS server's.
    pub fn new(dns_queries: QueryCounter) -> Self {
        Self {
            providers: Default::default(),
            dns_queries,
        }
    }

    fn log(&self, provider: ProviderId) -> MutexGuard<'_, ProviderLog> {
        // A panic while holding the lock cannot leave a counter half-written; keep serving.
        self.providers[provider as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a request for `(provider, key)` arriving now.
    pub fn arrive(&self, provider: ProviderId, key: &str) -> Arrival {
        let now = epoch_ms();
        let mut log = self.log(provider);
        let attempt = if let Some(count) = log.per_key.get_mut(key) {
            *count += 1;
            *count - 1
        } else {
            log.per_key.insert(key.into(), 1);
            0
        };
        log.timeline.push(now);
        let slot = log.log.len();
        log.log.push((now, key.into(), 0));
        Arrival { attempt, slot }
    }

    /// Records the status sent for an arrival.
    pub fn answered(&self, provider: ProviderId, arrival: Arrival, status: u16) {
        let now = epoch_ms();
        let mut log = self.log(provider);
        if let Some(entry) = log.log.get_mut(arrival.slot) {
            entry.2 = status;
        }
        match status {
            429 => log.rate_limited.push(now),
            500..=599 => log.errors += 1,
            _ => {}
        }
    }

    /// Requests to `provider` so far.
    pub fn requests(&self, provider: ProviderId) -> u64 {
        self.log(provider).timeline.len() as u64
    }

    /// Clears everything (attempt numbers and the DNS count too).
    pub fn reset(&self) {
        for provider in ProviderId::ALL {
            *self.log(provider) = ProviderLog::default();
        }
        self.dns_queries.reset();
    }

    /// The `/_stats` document.
    pub fn snapshot(&self) -> Stats {
        let mut stats = Stats {
            dns: DnsStats {
                queries: self.dns_queries.get() as u64,
            },
            ..Stats::default()
        };
        for provider in ProviderId::ALL {
            let log = self.log(provider);
            let id = provider.as_str().to_owned();
            let total = log.timeline.len() as u64;
            stats.requests.insert(id.clone(), total);
            stats.per_key.insert(
                id.clone(),
                PerKey {
                    distinct: log.per_key.len() as u64,
                    max_per_key: u64::from(log.per_key.values().copied().max().unwrap_or(0)),
                    total,
                },
            );
            stats.timeline.insert(id.clone(), log.timeline.clone());
            stats
                .rate_limited
                .insert(id.clone(), log.rate_limited.clone());
            stats.errors.insert(id, log.errors);
        }
        stats
    }

    /// The `/_log` document.
    pub fn request_log(&self) -> RequestLog {
        let mut out = BTreeMap::new();
        for provider in ProviderId::ALL {
            let log = self.log(provider);
            let entries = log
                .log
                .iter()
                .map(|(ms, key, status)| LogEntry(*ms, key.to_string(), *status))
                .collect();
            out.insert(provider.as_str().to_owned(), entries);
        }
        RequestLog(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn per_key_counts_attempts_and_the_maximum() {
        let stats = Counters::default();
        assert_eq!(stats.arrive(ProviderId::Greynoise, "45.1.1.1").attempt, 0);
        assert_eq!(stats.arrive(ProviderId::Greynoise, "45.1.1.1").attempt, 1);
        let third = stats.arrive(ProviderId::Greynoise, "45.1.1.2");
        assert_eq!(third.attempt, 0);
        stats.answered(ProviderId::Greynoise, third, 429);
        stats.arrive(ProviderId::Threatfox, "45.1.1.1");
        let doc = serde_json::to_value(stats.snapshot()).unwrap();
        assert_eq!(doc["requests"]["greynoise"], 3);
        assert_eq!(doc["requests"]["threatfox"], 1);
        assert_eq!(doc["requests"]["abuseipdb"], 0);
        assert_eq!(
            doc["per_key"]["greynoise"],
            json!({"distinct": 2, "max_per_key": 2, "total": 3})
        );
        assert_eq!(doc["timeline"]["greynoise"].as_array().unwrap().len(), 3);
        assert_eq!(
            doc["rate_limited"]["greynoise"].as_array().unwrap().len(),
            1
        );
        assert_eq!(doc["dns"], json!({"queries": 0}));
        let log = serde_json::to_value(stats.request_log()).unwrap();
        assert_eq!(log["greynoise"][2][1], "45.1.1.2");
        assert_eq!(log["greynoise"][2][2], 429);
        stats.reset();
        assert_eq!(stats.snapshot().requests(ProviderId::Greynoise), 0);
        assert_eq!(stats.arrive(ProviderId::Greynoise, "45.1.1.1").attempt, 0);
    }

    #[test]
    fn the_documents_read_back_as_written_and_a_summary_has_no_timeline() {
        let counters = Counters::default();
        let arrival = counters.arrive(ProviderId::Abuseipdb, "45.1.1.9");
        counters.answered(ProviderId::Abuseipdb, arrival, 500);
        let stats = counters.snapshot();
        let text = serde_json::to_string(&stats).unwrap();
        let read: Stats = serde_json::from_str(&text).unwrap();
        assert_eq!(read, stats);
        assert_eq!(read.errors["abuseipdb"], 1);
        assert_eq!(read.timeline(ProviderId::Abuseipdb).len(), 1);

        let summary = serde_json::to_value(stats.without_timelines()).unwrap();
        let mut keys: Vec<&str> = summary
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["dns", "errors", "per_key", "rate_limited", "requests"]
        );

        let log = counters.request_log();
        let read: RequestLog = serde_json::from_str(&serde_json::to_string(&log).unwrap()).unwrap();
        assert_eq!(read, log);
        let entry = &read.entries(ProviderId::Abuseipdb)[0];
        assert_eq!((entry.key(), entry.status()), ("45.1.1.9", 500));
    }
}
