//! Request counters, served at `GET /_stats` and `GET /_log`, cleared by `POST /_reset`.
//!
//! `/_stats` is the contract other tools read:
//! `{"requests": {"greynoise": N, ...}, "per_key": {"greynoise": {"distinct": n,
//! "max_per_key": k, "total": N}, ...}, "timeline": {"greynoise": [epoch_ms, ...]}}`, plus
//! `"rate_limited": {"greynoise": [epoch_ms of each 429 sent], ...}`, `"errors": {"greynoise":
//! N, ...}` (500s sent) and `"dns": {"queries": N}`. `/_log` lists every provider request as
//! `[arrival epoch_ms, key, status]` (key = the address; `feed` for Feodo downloads).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::world::Provider;

/// Milliseconds since the Unix epoch (wall clock, comparable across processes).
pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

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
pub struct Stats {
    providers: [Mutex<ProviderLog>; 4],
    dns_queries: AtomicU64,
}

impl Stats {
    fn log(&self, provider: Provider) -> MutexGuard<'_, ProviderLog> {
        // A panic while holding the lock cannot leave a counter half-written; keep serving.
        self.providers[provider.index()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a request for `(provider, key)` arriving now.
    pub fn arrive(&self, provider: Provider, key: &str) -> Arrival {
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
    pub fn answered(&self, provider: Provider, arrival: Arrival, status: u16) {
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
    pub fn requests(&self, provider: Provider) -> u64 {
        self.log(provider).timeline.len() as u64
    }

    /// Counts one DNS query.
    pub fn dns_query(&self) {
        self.dns_queries.fetch_add(1, Ordering::Relaxed);
    }

    /// DNS queries so far.
    pub fn dns_queries(&self) -> u64 {
        self.dns_queries.load(Ordering::Relaxed)
    }

    /// Clears everything (attempt numbers too).
    pub fn reset(&self) {
        for provider in Provider::ALL {
            *self.log(provider) = ProviderLog::default();
        }
        self.dns_queries.store(0, Ordering::Relaxed);
    }

    /// The `/_stats` document.
    pub fn to_json(&self) -> Value {
        let mut requests = Map::new();
        let mut per_key = Map::new();
        let mut timeline = Map::new();
        let mut rate_limited = Map::new();
        let mut errors = Map::new();
        for provider in Provider::ALL {
            let log = self.log(provider);
            let id = provider.as_str().to_owned();
            requests.insert(id.clone(), json!(log.timeline.len()));
            per_key.insert(
                id.clone(),
                json!({
                    "distinct": log.per_key.len(),
                    "max_per_key": log.per_key.values().copied().max().unwrap_or(0),
                    "total": log.timeline.len(),
                }),
            );
            timeline.insert(id.clone(), json!(log.timeline));
            rate_limited.insert(id.clone(), json!(log.rate_limited));
            errors.insert(id, json!(log.errors));
        }
        json!({
            "requests": requests,
            "per_key": per_key,
            "timeline": timeline,
            "rate_limited": rate_limited,
            "errors": errors,
            "dns": {"queries": self.dns_queries()},
        })
    }

    /// The `/_log` document.
    pub fn log_json(&self) -> Value {
        let mut out = Map::new();
        for provider in Provider::ALL {
            let log = self.log(provider);
            let entries: Vec<Value> = log
                .log
                .iter()
                .map(|(ms, key, status)| json!([ms, key, status]))
                .collect();
            out.insert(provider.as_str().to_owned(), Value::Array(entries));
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_counts_attempts_and_the_maximum() {
        let stats = Stats::default();
        assert_eq!(stats.arrive(Provider::Greynoise, "45.1.1.1").attempt, 0);
        assert_eq!(stats.arrive(Provider::Greynoise, "45.1.1.1").attempt, 1);
        let third = stats.arrive(Provider::Greynoise, "45.1.1.2");
        assert_eq!(third.attempt, 0);
        stats.answered(Provider::Greynoise, third, 429);
        stats.arrive(Provider::Threatfox, "45.1.1.1");
        let doc = stats.to_json();
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
        assert_eq!(stats.log_json()["greynoise"][2][1], "45.1.1.2");
        assert_eq!(stats.log_json()["greynoise"][2][2], 429);
        stats.reset();
        assert_eq!(stats.to_json()["requests"]["greynoise"], 0);
        assert_eq!(stats.arrive(Provider::Greynoise, "45.1.1.1").attempt, 0);
    }
}
