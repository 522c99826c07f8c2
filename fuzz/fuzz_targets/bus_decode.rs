//! The delivery decoder (`enrichd_bus::decode`) on the whole input as a body. No panic; an
//! accepted event's address is canonical (its text parses back to itself), its uuid is
//! lowercase uuid text, its `first_seen` at most 64 characters and its topic the routing key;
//! only bodies over 64 KiB are `TooLarge`; every poison reason is short enough for a header.

#![no_main]

use enrichd_bus::decode::MAX_BODY_BYTES;
use enrichd_bus::{Poison, decode};
use enrichd_core::CanonicalIp;
use libfuzzer_sys::fuzz_target;

/// Routing keys the listener binds, plus an empty and an odd one (picked by the body length).
const ROUTING_KEYS: [&str; 4] = ["attacker.observed", "attacker.scored", "", "x.\u{e9}\u{0}"];

fuzz_target!(|data: &[u8]| {
    let routing_key = ROUTING_KEYS[data.len() % ROUTING_KEYS.len()];
    match decode(data, routing_key) {
        Ok(event) => {
            assert!(data.len() <= MAX_BODY_BYTES);
            assert_eq!(event.topic, routing_key);
            let shown = event.ip.to_string();
            assert_eq!(CanonicalIp::parse(&shown), Ok(event.ip), "{shown}");
            if let Some(uuid) = &event.attacker_uuid {
                assert_eq!(uuid.len(), 36);
                assert!(
                    uuid.bytes().enumerate().all(|(i, b)| match i {
                        8 | 13 | 18 | 23 => b == b'-',
                        _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
                    }),
                    "{uuid:?}"
                );
            }
            if let Some(first_seen) = &event.first_seen {
                assert!(first_seen.chars().count() <= 64);
            }
        }
        Err(poison) => {
            match poison {
                Poison::TooLarge(len) => {
                    assert_eq!(len, data.len());
                    assert!(len > MAX_BODY_BYTES);
                }
                _ => assert!(data.len() <= MAX_BODY_BYTES),
            }
            // The reason travels in the `x-enrichd-reason` header.
            assert!(
                poison.to_string().len() <= 1024,
                "reason of {} bytes",
                poison.to_string().len()
            );
        }
    }
});
