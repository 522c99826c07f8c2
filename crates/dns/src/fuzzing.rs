//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, off by default): the
//! private PTR name rules with public types, and the ways a PTR target reaches them. Not an
//! API: nothing else may depend on it.

use hickory_proto::op::Message;
use hickory_proto::rr::RData;
use hickory_proto::serialize::binary::BinDecodable;

pub use hickory_proto::rr::Name;

use crate::name;

/// Longest usable name, in characters, without the trailing dot.
pub const MAX_NAME_CHARS: usize = name::MAX_NAME_CHARS;

/// What an address's PTR targets come down to (the private `name::Choice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chosen {
    /// The chosen name, its record's TTL (seconds) and the target as received.
    Usable {
        /// Lowercase, no trailing dot.
        name: String,
        /// The record's TTL.
        ttl: u32,
        /// The target as received.
        target: Name,
    },
    /// Targets came back, but none is usable.
    Invalid,
    /// No targets at all.
    Empty,
}

/// The usable text form of `target` (`name::usable_name`).
pub fn usable_name(target: &Name) -> Option<String> {
    name::usable_name(target)
}

/// The name chosen among `targets`, each with its TTL (`name::choose`).
pub fn choose(targets: &[(Name, u32)]) -> Chosen {
    match name::choose(targets.iter().map(|(target, ttl)| (target, *ttl))) {
        name::Choice::Usable { name, ttl, target } => Chosen::Usable { name, ttl, target },
        name::Choice::Invalid => Chosen::Invalid,
        name::Choice::Empty => Chosen::Empty,
    }
}

/// A name decoded from DNS wire format (labels, with compression pointers into `bytes`).
pub fn name_from_wire(bytes: &[u8]) -> Option<Name> {
    Name::from_bytes(bytes).ok()
}

/// The PTR targets of a DNS answer in wire format, picked from its answer section as the
/// resolver picks them; `None` when the message does not decode.
pub fn ptr_targets(message: &[u8]) -> Option<Vec<(Name, u32)>> {
    let message = Message::from_vec(message).ok()?;
    Some(
        message
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::PTR(ptr) => Some((ptr.0.clone(), record.ttl)),
                _ => None,
            })
            .collect(),
    )
}
