//! Choosing the name among an address's PTR targets, and refusing unusable ones (SPEC §6).
//!
//! The name ends up in a database column, an analyst's dashboard and exports, and it is
//! chosen by whoever controls the attacker's reverse zone, so it is hostile input. A DNS
//! label may carry any byte (`\000`, spaces, control bytes, even a `.` inside one label that
//! would print as two labels), so validation works on the raw label bytes, never on a
//! presentation form in which escapes could hide them.

use hickory_proto::rr::Name;

/// Longest usable name, in characters, without the trailing dot.
pub(crate) const MAX_NAME_CHARS: usize = 253;

/// What an address's PTR targets come down to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Choice {
    /// The chosen name, its record's TTL (seconds) and the target as received.
    Usable {
        name: String,
        ttl: u32,
        target: Name,
    },
    /// Targets came back, but none is usable.
    Invalid,
    /// No targets at all.
    Empty,
}

/// The usable text form of `target` (lowercase, no trailing dot), or `None` if it is empty,
/// longer than [`MAX_NAME_CHARS`], or carries a byte outside printable ASCII (0x21..=0x7e) or
/// a dot inside a label.
pub(crate) fn usable_name(target: &Name) -> Option<String> {
    let mut text = String::new();
    for label in target {
        if !text.is_empty() {
            text.push('.');
        }
        for &byte in label {
            if !(0x21..=0x7e).contains(&byte) || byte == b'.' {
                return None;
            }
            text.push(char::from(byte.to_ascii_lowercase()));
        }
        if text.len() > MAX_NAME_CHARS {
            return None;
        }
    }
    (!text.is_empty()).then_some(text)
}

/// Chooses the lexicographically smallest usable name (lowest TTL among equal names), so the
/// same record set gives the same name whatever order the server answers in.
///
/// Unusable targets are passed over rather than spoiling the set: a zone with one good and one
/// broken name still has a good name. Only when no target is usable is the result
/// [`Choice::Invalid`].
pub(crate) fn choose<'a>(targets: impl IntoIterator<Item = (&'a Name, u32)>) -> Choice {
    let mut any = false;
    let mut best: Option<(String, u32, &Name)> = None;
    for (target, ttl) in targets {
        any = true;
        let Some(name) = usable_name(target) else {
            continue;
        };
        let better = best
            .as_ref()
            .is_none_or(|(b_name, b_ttl, _)| (&name, ttl) < (b_name, *b_ttl));
        if better {
            best = Some((name, ttl, target));
        }
    }
    match best {
        Some((name, ttl, target)) => Choice::Usable {
            name,
            ttl,
            target: target.clone(),
        },
        None if any => Choice::Invalid,
        None => Choice::Empty,
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn name(text: &str) -> Name {
        Name::from_str(text).unwrap()
    }

    fn raw(labels: &[&[u8]]) -> Name {
        let mut n = Name::from_labels(labels.iter().copied()).unwrap();
        n.set_fqdn(true);
        n
    }

    #[test]
    fn lowercases_and_drops_the_trailing_dot() {
        assert_eq!(
            usable_name(&name("DNS.Google.")).as_deref(),
            Some("dns.google")
        );
        assert_eq!(
            usable_name(&name("dns.google")).as_deref(),
            Some("dns.google")
        );
    }

    #[test]
    fn refuses_bytes_outside_printable_ascii() {
        let cases: [&[&[u8]]; 6] = [
            &[b"evil\x00host", b"example", b"test"],
            &[b"has space", b"example"],
            &[b"tab\there", b"example"],
            &[b"del\x7f", b"example"],
            &[b"caf\xc3\xa9", b"example"],
            &[b"esc\x1b[31m", b"example"],
        ];
        for labels in cases {
            assert_eq!(usable_name(&raw(labels)), None, "{labels:?}");
        }
    }

    #[test]
    fn refuses_a_dot_hidden_inside_one_label() {
        assert_eq!(usable_name(&raw(&[b"bank.com", b"evil", b"test"])), None);
    }

    #[test]
    fn refuses_the_root_name() {
        assert_eq!(usable_name(&Name::root()), None);
    }

    #[test]
    fn accepts_a_name_of_exactly_253_characters() {
        // hickory refuses to build or decode anything longer (255 octets on the wire), so the
        // length guard is defence in depth and a longer name cannot be constructed here.
        let label = [b'a'; 63];
        assert!(Name::from_labels([&label[..], &label, &label, &label]).is_err());
        let exact = raw(&[&label, &label, &label, &label[..61]]);
        assert_eq!(usable_name(&exact).map(|n| n.len()), Some(253));
    }

    #[test]
    fn chooses_the_smallest_name_whatever_the_order() {
        let b = name("b.example.");
        let a = name("A.example.");
        let c = name("c.example.");
        for order in [[&b, &a, &c], [&c, &b, &a], [&a, &c, &b]] {
            let choice = choose(order.iter().map(|n| (*n, 300)));
            assert!(
                matches!(&choice, Choice::Usable { name, .. } if name == "a.example"),
                "{choice:?}"
            );
        }
    }

    #[test]
    fn passes_over_unusable_targets_and_reports_invalid_only_when_none_is_usable() {
        let bad = raw(&[b"\x00", b"example"]);
        let good = name("z.example.");
        let choice = choose([(&bad, 60), (&good, 900)]);
        assert!(matches!(choice, Choice::Usable { ref name, ttl: 900, .. } if name == "z.example"));
        assert_eq!(choose([(&bad, 60)]), Choice::Invalid);
        assert_eq!(choose(std::iter::empty()), Choice::Empty);
    }

    #[test]
    fn equal_names_take_the_lowest_ttl() {
        let upper = name("HOST.example.");
        let lower = name("host.example.");
        let choice = choose([(&upper, 600), (&lower, 120)]);
        assert!(matches!(choice, Choice::Usable { ttl: 120, .. }));
    }
}
