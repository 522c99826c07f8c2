//! The events enrichd consumes, as the reference's producers send them (SPEC §4), built from
//! [`Envelope`]: `attacker.scored` from the profiler, `attacker.observed` from the correlator.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use enrichd_core::payload::{Envelope, TOPIC_OBSERVED, TOPIC_SCORED};
use serde::{Deserialize, Serialize};

/// The profiler's `attacker.scored` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scored {
    /// The attacker's address.
    pub attacker_ip: String,
    /// Events seen from it.
    pub event_count: u64,
    /// Services it touched.
    pub service_count: u64,
    /// Deckies it touched.
    pub decky_count: u64,
    /// Bounties it collected.
    pub bounty_count: u64,
    /// Credentials it tried.
    pub credential_count: u64,
    /// Whether it moved between deckies.
    pub is_traversal: bool,
}

impl Scored {
    /// The profiler's score of `attacker_ip` on its `tick`-th pass: `10 + tick` events over
    /// two services of one decky, three credentials, no bounty, no traversal.
    pub fn tick(attacker_ip: impl Into<String>, tick: u64) -> Self {
        Self {
            attacker_ip: attacker_ip.into(),
            event_count: 10 + tick,
            service_count: 2,
            decky_count: 1,
            bounty_count: 0,
            credential_count: 3,
            is_traversal: false,
        }
    }

    /// The `attacker.scored` envelope of this payload, stamped `ts` (epoch seconds).
    pub fn envelope(self, ts: f64) -> Envelope<Self> {
        Envelope::new(TOPIC_SCORED, "scored", ts, self)
    }
}

/// The correlator's `attacker.observed` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// The attacker's address.
    pub attacker_ip: String,
    /// The decky that saw it.
    pub decky: String,
    /// The service it touched.
    pub service: String,
    /// What it did.
    pub event_type: String,
    /// When it was first seen (ISO-8601).
    pub first_seen: String,
}

impl Observed {
    /// A first SSH login attempt on `decky-1` by `attacker_ip`, first seen at `first_seen`.
    pub fn ssh_login(attacker_ip: impl Into<String>, first_seen: impl Into<String>) -> Self {
        Self {
            attacker_ip: attacker_ip.into(),
            decky: "decky-1".into(),
            service: "ssh".into(),
            event_type: "login_attempt".into(),
            first_seen: first_seen.into(),
        }
    }

    /// The `attacker.observed` envelope of this payload, stamped `ts` (epoch seconds).
    pub fn envelope(self, ts: f64) -> Envelope<Self> {
        Envelope::new(TOPIC_OBSERVED, "observed", ts, self)
    }
}

/// Now, in epoch seconds to the millisecond, as producers stamp `ts`.
pub fn epoch_secs() -> f64 {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    #[expect(
        clippy::cast_precision_loss,
        reason = "epoch milliseconds are far below 2^52"
    )]
    let millis = millis as f64;
    millis / 1000.0
}

/// The JSON body of `envelope`.
pub fn body<P: Serialize>(envelope: &Envelope<P>) -> anyhow::Result<Vec<u8>> {
    serde_json::to_vec(envelope).context("serialise an envelope")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scored_envelope_has_the_profilers_shape_and_decodes_as_enrichd_reads_it() {
        let envelope = Scored::tick("45.155.205.233", 2).envelope(1_763_900_000.5);
        let bytes = body(&envelope).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["v"], 1);
        assert_eq!(value["topic"], "attacker.scored");
        assert_eq!(value["type"], "scored");
        assert_eq!(value["ts"], 1_763_900_000.5);
        assert_eq!(value["id"].as_str().unwrap().len(), 32);
        assert_eq!(
            value["payload"],
            serde_json::json!({
                "attacker_ip": "45.155.205.233", "event_count": 12, "service_count": 2,
                "decky_count": 1, "bounty_count": 0, "credential_count": 3,
                "is_traversal": false
            })
        );
        let event = enrichd_bus::decode(&bytes, TOPIC_SCORED).unwrap();
        assert_eq!(event.ip.to_string(), "45.155.205.233");
        assert_eq!(event.topic, "attacker.scored");
    }

    #[test]
    fn an_observed_envelope_carries_first_seen_to_enrichd() {
        let envelope = Observed::ssh_login("2001:db8::1", "2026-11-23T10:00:00Z").envelope(1.0);
        let bytes = body(&envelope).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["type"], "observed");
        assert_eq!(value["payload"]["service"], "ssh");
        let event = enrichd_bus::decode(&bytes, TOPIC_OBSERVED).unwrap();
        assert_eq!(event.first_seen.as_deref(), Some("2026-11-23T10:00:00Z"));
    }

    #[test]
    fn now_is_after_the_contracts_date() {
        assert!(epoch_secs() > 1_763_900_000.0);
    }
}
