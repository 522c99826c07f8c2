//! The `attacker.intel.enriched` payload and the bus envelope (SPEC §4).
//!
//! The payload keys, names and types are the reference's, unchanged, because a dashboard,
//! SIEMs and an ATT&CK tagger consume them. List fields are always arrays, never null.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Topic (routing key) of enrichment results.
pub const TOPIC_INTEL_ENRICHED: &str = "attacker.intel.enriched";
/// Topic of health beats.
pub const TOPIC_HEALTH: &str = "system.enrich.health";
/// Topic of cluster control messages.
pub const TOPIC_CONTROL: &str = "system.enrich.control";
/// Topic of new-attacker events.
pub const TOPIC_OBSERVED: &str = "attacker.observed";
/// Topic of profiler scores.
pub const TOPIC_SCORED: &str = "attacker.scored";

/// Keys the tagger derives tag ids from; they must never appear in our payload.
pub const FORBIDDEN_PAYLOAD_KEYS: [&str; 6] = [
    "source_id",
    "session_id",
    "token_id",
    "identity_uuid",
    "credential_id",
    "uuid",
];

/// One attacker row's enrichment, as published and as printed by `enrichd lookup --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntelPayload {
    /// The attacker row (null in `lookup` output when no row has this address).
    pub attacker_uuid: Option<String>,
    /// The address queried.
    pub attacker_ip: String,
    /// Aggregate over the stored verdicts of all providers.
    pub aggregate_verdict: Option<String>,
    /// Providers whose answer is in the row.
    pub providers: Vec<String>,
    /// `abuseConfidenceScore`.
    pub abuseipdb_score: Option<i32>,
    /// Sorted unique report categories.
    pub abuseipdb_categories: Vec<i64>,
    /// GreyNoise classification.
    pub greynoise_classification: Option<String>,
    /// GreyNoise actor label.
    pub greynoise_name: Option<String>,
    /// GreyNoise tags.
    pub greynoise_tags: Vec<String>,
    /// On the Feodo blocklist.
    pub feodo_listed: Option<bool>,
    /// Feodo malware family.
    pub feodo_malware_family: Option<String>,
    /// Has a real `ThreatFox` hit.
    pub threatfox_listed: Option<bool>,
    /// `ThreatFox` threat types.
    pub threatfox_threat_types: Vec<String>,
    /// `ThreatFox` IOC types.
    pub threatfox_ioc_types: Vec<String>,
    /// `ThreatFox` malware families.
    pub threatfox_malware_families: Vec<String>,
    /// Reverse-DNS name.
    pub ptr_record: Option<String>,
    /// Outcome of the PTR lookup.
    pub ptr_outcome: Option<String>,
    /// With forward confirmation on (`ENRICHD_PTR_FCRDNS`): whether `ptr_record` resolves
    /// back to the address. `null` when not checked or there is no name. An unconfirmed name
    /// is still given: it is evidence, and this says how much to trust it.
    pub ptr_forward_confirmed: Option<bool>,
    /// `{provider: outcome}` for every configured provider with state.
    pub provider_outcomes: BTreeMap<String, String>,
}

/// The bus envelope, both directions:
/// `{"v":1,"id":"<32 hex>","topic":..,"type":..,"ts":<epoch seconds>,"payload":{..}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<P> {
    /// Envelope version, always 1.
    pub v: u8,
    /// 32 lowercase hex characters; also the AMQP `message_id`, so consumers can dedupe.
    pub id: String,
    /// The topic (routing key).
    pub topic: String,
    /// The leaf type (`intel.enriched`, `health`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Epoch seconds.
    pub ts: f64,
    /// The payload object.
    pub payload: P,
}

impl<P> Envelope<P> {
    /// A new envelope with a fresh id.
    pub fn new(topic: &str, kind: &str, ts: f64, payload: P) -> Self {
        Self {
            v: 1,
            id: uuid::Uuid::new_v4().simple().to_string(),
            topic: topic.to_owned(),
            kind: kind.to_owned(),
            ts,
            payload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IntelPayload {
        IntelPayload {
            attacker_uuid: Some("0b7c4a36-6f53-4c44-a9f1-2a3b5e1f0c11".into()),
            attacker_ip: "45.155.205.233".into(),
            aggregate_verdict: Some("malicious".into()),
            providers: vec!["abuseipdb".into()],
            abuseipdb_score: Some(100),
            abuseipdb_categories: vec![14, 18, 22],
            greynoise_classification: None,
            greynoise_name: None,
            greynoise_tags: vec![],
            feodo_listed: None,
            feodo_malware_family: None,
            threatfox_listed: None,
            threatfox_threat_types: vec![],
            threatfox_ioc_types: vec![],
            threatfox_malware_families: vec![],
            ptr_record: None,
            ptr_outcome: Some("nxdomain".into()),
            ptr_forward_confirmed: None,
            provider_outcomes: BTreeMap::from([("abuseipdb".into(), "ok".into())]),
        }
    }

    #[test]
    fn payload_has_the_reference_keys_and_no_tagger_keys() {
        let value = serde_json::to_value(sample()).unwrap();
        let object = value.as_object().unwrap();
        for key in FORBIDDEN_PAYLOAD_KEYS {
            assert!(!object.contains_key(key), "{key}");
        }
        // The reference's 15 keys plus ptr_record, ptr_outcome, ptr_forward_confirmed and
        // provider_outcomes.
        assert_eq!(object.len(), 19);
        assert!(object["ptr_forward_confirmed"].is_null());
        assert!(object["greynoise_tags"].is_array());
        assert!(object["feodo_listed"].is_null());
        assert_eq!(object["abuseipdb_score"], 100);
    }

    #[test]
    fn envelope_wire_shape() {
        let envelope = Envelope::new(TOPIC_INTEL_ENRICHED, "intel.enriched", 1.5, sample());
        let value = serde_json::to_value(&envelope).unwrap();
        assert_eq!(value["v"], 1);
        assert_eq!(value["type"], "intel.enriched");
        assert_eq!(value["topic"], TOPIC_INTEL_ENRICHED);
        let id = value["id"].as_str().unwrap();
        assert_eq!(id.len(), 32);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert!(value["payload"].is_object());
    }
}
