//! The Feodo blocklist parser (`FeodoIndex::from_json`) on the whole input as a feed body.
//! No panic; a short reason for a bad body; and the index agrees with the feed read here
//! independently: every entry with an address is indexed, each address once, with every port
//! the feed lists for it, sorted and unique.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use enrichd_core::CanonicalIp;
use enrichd_intel::FeodoIndex;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let index = match FeodoIndex::from_json(data) {
        Ok(index) => index,
        Err(err) => {
            assert!(err.to_string().chars().count() <= 256, "long reason: {err}");
            return;
        }
    };
    assert!(index.len() <= index.entries());
    assert_eq!(index.is_empty(), index.len() == 0);

    let mut feed: Value =
        serde_json::from_slice(data).expect("an index from a body that is not json");
    strip_nul(&mut feed);
    let items = feed
        .as_array()
        .expect("an index from a body that is not a list");
    let mut expected: BTreeMap<CanonicalIp, BTreeSet<u64>> = BTreeMap::new();
    let mut entries = 0;
    for item in items {
        let Some(ip) = item
            .get("ip_address")
            .and_then(Value::as_str)
            .and_then(|text| CanonicalIp::parse(text).ok())
        else {
            continue;
        };
        entries += 1;
        expected
            .entry(ip)
            .or_default()
            .extend(item.get("port").and_then(Value::as_u64));
    }
    assert_eq!(index.entries(), entries);
    assert_eq!(index.len(), expected.len());
    for (ip, ports) in expected {
        let listing = index.get(ip).expect("a listed address is indexed");
        let kept: Vec<u64> = listing.raw["ports"]
            .as_array()
            .expect("ports is a list")
            .iter()
            .map(|p| p.as_u64().expect("a port is a whole number"))
            .collect();
        assert_eq!(kept, ports.into_iter().collect::<Vec<_>>(), "ports of {ip}");
        if let Some(family) = &listing.malware_family {
            assert!(!family.is_empty() && family.chars().count() <= 64);
            assert!(!family.contains('\0'));
        }
    }
});

/// The parser strips NUL from every string and key before reading (PostgreSQL refuses it);
/// read the feed the same way.
fn strip_nul(value: &mut Value) {
    match value {
        Value::String(s) => s.retain(|c| c != '\0'),
        Value::Array(items) => items.iter_mut().for_each(strip_nul),
        Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                for (k, v) in std::mem::take(map) {
                    map.insert(k.replace('\0', ""), v);
                }
            }
            map.values_mut().for_each(strip_nul);
        }
        _ => {}
    }
}
