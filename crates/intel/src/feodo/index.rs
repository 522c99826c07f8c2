//! The Feodo Tracker blocklist as an in-memory index by canonical address.

use std::collections::HashMap;

use enrichd_core::CanonicalIp;
use enrichd_core::text::column_text;
use serde_json::Value;

use super::FeedError;
use crate::json;

/// `feodo_malware_family` is VARCHAR(64).
const FAMILY_CHARS: usize = 64;

/// What the feed says about one listed address, precomputed so a lookup is a hash probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    /// The first entry's `malware`.
    pub malware_family: Option<String>,
    /// The first entry plus `ports`: every port the feed lists for the address, sorted,
    /// unique. Shared with every report made from it.
    pub raw: std::sync::Arc<Value>,
}

/// The blocklist by canonical address. Immutable once built; a refresh builds a new one and
/// swaps it in whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeodoIndex {
    listings: HashMap<CanonicalIp, Listing>,
    entries: usize,
}

impl FeodoIndex {
    /// Builds the index from the feed body: a JSON array of objects with a string
    /// `ip_address`. Other entries (not objects, no or unparseable address) are skipped; an
    /// empty array is valid data.
    ///
    /// # Errors
    /// [`FeedError::Decode`] for a body that is not JSON, [`FeedError::NotAList`] for JSON
    /// that is not an array.
    pub fn from_json(body: &[u8]) -> Result<Self, FeedError> {
        let value = json::parse(body).map_err(|e| FeedError::Decode(e.to_string()))?;
        let Value::Array(items) = value else {
            return Err(FeedError::NotAList(json::kind(&value)));
        };
        let mut grouped: HashMap<CanonicalIp, (Value, Vec<u64>)> = HashMap::new();
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
            let port = item.get("port").and_then(Value::as_u64);
            let slot = grouped.entry(ip).or_insert_with(|| (item, Vec::new()));
            slot.1.extend(port);
        }
        let listings = grouped
            .into_iter()
            .map(|(ip, (mut first, mut ports))| {
                ports.sort_unstable();
                ports.dedup();
                let malware_family = first
                    .get("malware")
                    .and_then(Value::as_str)
                    .map(|m| column_text(m, FAMILY_CHARS))
                    .filter(|m| !m.is_empty());
                if let Value::Object(map) = &mut first {
                    map.insert("ports".into(), Value::from(ports));
                }
                (
                    ip,
                    Listing {
                        malware_family,
                        raw: std::sync::Arc::new(first),
                    },
                )
            })
            .collect();
        Ok(Self { listings, entries })
    }

    /// The listing for an address, if the feed has it.
    pub fn get(&self, ip: CanonicalIp) -> Option<&Listing> {
        self.listings.get(&ip)
    }

    /// Listed addresses.
    pub fn len(&self) -> usize {
        self.listings.len()
    }

    /// Whether no address is listed.
    pub fn is_empty(&self) -> bool {
        self.listings.is_empty()
    }

    /// Feed entries that were indexed (an address on two ports counts twice).
    pub fn entries(&self) -> usize {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/feodo/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(path).unwrap()
    }

    fn ip(text: &str) -> CanonicalIp {
        CanonicalIp::parse(text).unwrap()
    }

    #[test]
    fn one_address_on_two_ports_reports_both() {
        let index = FeodoIndex::from_json(&fixture("ipblocklist.json")).unwrap();
        assert_eq!((index.len(), index.entries()), (2, 3));
        let listing = index.get(ip("45.155.205.233")).unwrap();
        assert_eq!(listing.malware_family.as_deref(), Some("QakBot"));
        assert_eq!(listing.raw["ports"], json!([443, 2222]));
        assert_eq!(
            listing.raw["first_seen"], "2026-04-20 11:02:13",
            "first entry kept"
        );
        assert_eq!(
            index
                .get(ip("194.26.29.10"))
                .unwrap()
                .malware_family
                .as_deref(),
            Some("Emotet")
        );
        assert!(index.get(ip("8.8.8.8")).is_none());
    }

    #[test]
    fn empty_feed_is_valid_and_junk_entries_are_skipped() {
        assert!(
            FeodoIndex::from_json(&fixture("empty.json"))
                .unwrap()
                .is_empty()
        );
        let body = json!([
            1, "x", null, {"ip_address": 5}, {"ip_address": "not-an-ip"}, {"port": 1},
            {"ip_address": " ::ffff:198.51.100.7 ", "port": "80", "malware": null},
        ]);
        let index = FeodoIndex::from_json(body.to_string().as_bytes()).unwrap();
        assert_eq!(index.len(), 1);
        let listing = index.get(ip("198.51.100.7")).unwrap();
        assert_eq!(listing.malware_family, None);
        assert_eq!(listing.raw["ports"], json!([]));
    }

    #[test]
    fn not_a_list_and_garbage_are_errors() {
        assert!(matches!(
            FeodoIndex::from_json(&fixture("not_a_list.json")),
            Err(FeedError::NotAList("an object"))
        ));
        assert!(matches!(
            FeodoIndex::from_json(b"<html>"),
            Err(FeedError::Decode(_))
        ));
    }
}
