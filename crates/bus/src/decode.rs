//! Turning a delivery body into an enrichment request, or into a poison reason.
//!
//! Pure and total: every byte string ends as a [`EventRequest`] or a [`Poison`] with a short
//! reason for the `x-enrichd-reason` header. Only `attacker_ip`, `attacker_uuid` and
//! `first_seen` are read; every other field is ignored whatever its type, so a producer adding
//! fields never poisons its own events.

use enrichd_core::CanonicalIp;
use serde_json::{Map, Value};

/// Bodies above this are poison: no honest event is this large, and parsing one costs memory.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A decoded attacker event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRequest {
    /// The routing key it arrived with.
    pub topic: String,
    /// The attacker address, canonical.
    pub ip: CanonicalIp,
    /// The attacker row, when the event named a well-formed one.
    pub attacker_uuid: Option<String>,
    /// The producer's `first_seen`, as sent (ISO-8601), when a string.
    pub first_seen: Option<String>,
}

/// Why a body cannot be processed; becomes the `x-enrichd-reason` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Poison {
    /// Over [`MAX_BODY_BYTES`].
    #[error("body over 64 KiB ({0} bytes)")]
    TooLarge(usize),
    /// Not JSON at all.
    #[error("not json")]
    NotJson,
    /// JSON, but not an object.
    #[error("not a json object")]
    NotAnObject,
    /// No `attacker_ip`, or not a string.
    #[error("no attacker_ip string")]
    NoAttackerIp,
    /// `attacker_ip` is not an address.
    #[error("attacker_ip rejected: {0}")]
    BadAttackerIp(String),
}

/// Why a delivery is dead-lettered: poison, or an event the store refused for good. Its
/// `Display` is the `x-enrichd-reason` header; [`DeadLetterReason::as_label`] the metric
/// label, a small fixed set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeadLetterReason {
    /// The body cannot name an attacker address.
    #[error(transparent)]
    Poison(#[from] Poison),
    /// The store refused the event's write for good (a constraint, a value it cannot hold).
    #[error("store rejected: {0}")]
    StoreRejected(String),
}

impl DeadLetterReason {
    /// The reason refused by the store, its detail cut to 200 characters for the header.
    pub fn store_rejected(detail: &str) -> Self {
        Self::StoreRejected(detail.chars().take(200).collect())
    }

    /// The `reason` label of `enrichd_events_dead_lettered_total`.
    pub fn as_label(&self) -> &'static str {
        match self {
            Self::Poison(Poison::TooLarge(_)) => "body over 64 KiB",
            Self::Poison(Poison::NotJson) => "not json",
            Self::Poison(Poison::NotAnObject) => "not a json object",
            Self::Poison(Poison::NoAttackerIp) => "no attacker_ip string",
            Self::Poison(Poison::BadAttackerIp(_)) => "attacker_ip rejected",
            Self::StoreRejected(_) => "store rejected",
        }
    }

    /// The body's size before it was cut to 64 KiB, when it was over.
    pub fn original_size(&self) -> Option<usize> {
        match self {
            Self::Poison(Poison::TooLarge(size)) => Some(*size),
            _ => None,
        }
    }
}

/// Decodes one delivery body that arrived with `routing_key`.
///
/// # Errors
/// The [`Poison`] reason when the body cannot name an attacker address.
pub fn decode(body: &[u8], routing_key: &str) -> Result<EventRequest, Poison> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Poison::TooLarge(body.len()));
    }
    let value: Value = serde_json::from_slice(body).map_err(|_| Poison::NotJson)?;
    let Value::Object(object) = value else {
        return Err(Poison::NotAnObject);
    };
    let payload = payload_of(&object);
    let Some(Value::String(ip_text)) = payload.get("attacker_ip") else {
        return Err(Poison::NoAttackerIp);
    };
    let ip = CanonicalIp::parse(ip_text).map_err(|e| Poison::BadAttackerIp(e.to_string()))?;
    let attacker_uuid = match payload.get("attacker_uuid") {
        Some(Value::String(uuid)) if is_uuid_text(uuid) => Some(uuid.to_ascii_lowercase()),
        _ => None,
    };
    let first_seen = match payload.get("first_seen") {
        Some(Value::String(text)) => Some(text.chars().take(64).collect()),
        _ => None,
    };
    Ok(EventRequest {
        topic: routing_key.to_owned(),
        ip,
        attacker_uuid,
        first_seen,
    })
}

/// Cuts an oversized body down to its first [`MAX_BODY_BYTES`] at once, so a flood of large
/// poison does not hold megabytes per delivery while each is dead-lettered, and returns its
/// original size. `None`: the body was within the limit and is untouched.
pub fn cut_oversized(body: &mut Vec<u8>) -> Option<usize> {
    let size = body.len();
    if size <= MAX_BODY_BYTES {
        return None;
    }
    body.truncate(MAX_BODY_BYTES);
    body.shrink_to_fit();
    Some(size)
}

/// An object whose `payload` is an object is an envelope; any other object is a bare payload.
fn payload_of(object: &Map<String, Value>) -> &Map<String, Value> {
    match object.get("payload") {
        Some(Value::Object(inner)) => inner,
        _ => object,
    }
}

/// The reference's attacker ids are uuid4 text with dashes; anything else cannot name a row,
/// so it is ignored and the event falls back to matching attackers by address.
fn is_uuid_text(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0b7c4a36-6f53-4c44-a9f1-2a3b5e1f0c11";

    #[test]
    fn decodes_envelopes_and_bare_payloads() {
        let envelope = format!(
            r#"{{"v":1,"id":"abc","topic":"attacker.scored","type":"scored","ts":1.5,
               "payload":{{"attacker_ip":" ::ffff:45.155.205.233 ","attacker_uuid":"{UUID}",
               "event_count":"not-a-number","is_traversal":null}}}}"#
        );
        let request = decode(envelope.as_bytes(), "attacker.scored").unwrap();
        assert_eq!(request.ip.to_string(), "45.155.205.233");
        assert_eq!(request.attacker_uuid.as_deref(), Some(UUID));
        assert_eq!(request.topic, "attacker.scored");

        let bare = br#"{"attacker_ip":"2001:4860:4860::8888","decky":"d1","service":"ssh",
                        "event_type":"login","first_seen":"2026-11-23T10:00:00Z"}"#;
        let request = decode(bare, "attacker.observed").unwrap();
        assert_eq!(request.ip.to_string(), "2001:4860:4860::8888");
        assert_eq!(request.attacker_uuid, None);
        assert_eq!(request.first_seen.as_deref(), Some("2026-11-23T10:00:00Z"));
    }

    #[test]
    fn a_payload_that_is_not_an_object_means_a_bare_payload() {
        let body = br#"{"payload":"text","attacker_ip":"8.8.8.8"}"#;
        assert_eq!(
            decode(body, "attacker.observed").unwrap().ip.to_string(),
            "8.8.8.8"
        );
    }

    #[test]
    fn malformed_uuids_are_ignored_not_poison() {
        for uuid in [
            r#""nope""#,
            "42",
            "null",
            r#""0b7c4a36-6f53-4c44-a9f1-2a3b5e1f0c1z""#,
        ] {
            let body = format!(r#"{{"attacker_ip":"8.8.8.8","attacker_uuid":{uuid}}}"#);
            assert_eq!(
                decode(body.as_bytes(), "t").unwrap().attacker_uuid,
                None,
                "{uuid}"
            );
        }
    }

    #[test]
    fn poison_has_a_reason() {
        let huge = format!(
            r#"{{"attacker_ip":"8.8.8.8","pad":"{}"}}"#,
            "x".repeat(70_000)
        );
        let cases: Vec<(&[u8], Poison)> = vec![
            (b"", Poison::NotJson),
            (b"\xff\xfe", Poison::NotJson),
            (b"{\"attacker_ip\":", Poison::NotJson),
            (b"[1,2,3]", Poison::NotAnObject),
            (b"\"8.8.8.8\"", Poison::NotAnObject),
            (b"null", Poison::NotAnObject),
            (b"{}", Poison::NoAttackerIp),
            (b"{\"attacker_ip\":42}", Poison::NoAttackerIp),
            (b"{\"payload\":{\"ip\":\"8.8.8.8\"}}", Poison::NoAttackerIp),
            (huge.as_bytes(), Poison::TooLarge(huge.len())),
        ];
        for (body, expected) in cases {
            assert_eq!(decode(body, "t").unwrap_err(), expected);
        }
        let mut cut = huge.clone().into_bytes();
        assert_eq!(cut_oversized(&mut cut), Some(huge.len()));
        assert_eq!(cut.len(), MAX_BODY_BYTES);
        assert_eq!(&cut[..], &huge.as_bytes()[..MAX_BODY_BYTES]);
        let mut small = b"{}".to_vec();
        assert_eq!(cut_oversized(&mut small), None);
        assert_eq!(small, b"{}");

        let labels: Vec<&str> = [
            DeadLetterReason::from(Poison::TooLarge(70_000)),
            Poison::NotJson.into(),
            Poison::NotAnObject.into(),
            Poison::NoAttackerIp.into(),
            Poison::BadAttackerIp("x".into()).into(),
            DeadLetterReason::store_rejected(&"y".repeat(300)),
        ]
        .iter()
        .map(DeadLetterReason::as_label)
        .collect();
        // The label set the dashboard and alerts were built on.
        assert_eq!(
            labels,
            [
                "body over 64 KiB",
                "not json",
                "not a json object",
                "no attacker_ip string",
                "attacker_ip rejected",
                "store rejected"
            ]
        );
        let rejected = DeadLetterReason::store_rejected(&"y".repeat(300));
        assert_eq!(rejected.to_string().len(), "store rejected: ".len() + 200);
        assert_eq!(
            DeadLetterReason::from(Poison::TooLarge(70_000)).to_string(),
            "body over 64 KiB (70000 bytes)"
        );

        let err = decode(br#"{"attacker_ip":"1.2.3.4:22"}"#, "t").unwrap_err();
        assert!(matches!(err, Poison::BadAttackerIp(_)));
        assert!(
            err.to_string()
                .starts_with("attacker_ip rejected: not an IP address")
        );
    }
}
