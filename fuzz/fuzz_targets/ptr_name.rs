//! PTR name handling (`usable_name`, `choose`) on names built from the input.
//!
//! Layout: a first byte with the top bit set makes the rest a DNS message in wire format,
//! whose PTR answers are picked as the resolver picks them. Otherwise the input is a list of
//! targets, each `[kind][ttl: 4 bytes LE][length][bytes]`, built by kind % 4 from labels
//! split on 0xFF (`Name::from_labels`), `Name::from_ascii`, `Name::from_utf8`, or a wire-format
//! name. No panic; a usable name is exactly what SPEC §6 allows (printable ASCII labels
//! without a dot, lowercased, at most 253 characters, no trailing dot); the choice is the
//! smallest usable (name, TTL) whatever the order of the targets.

#![no_main]

use enrichd_dns::fuzzing::{self, Chosen, MAX_NAME_CHARS, Name};
use libfuzzer_sys::fuzz_target;

/// More targets than any honest answer has; keeps each run short.
const MAX_TARGETS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let targets = if mode & 0x80 != 0 {
        match fuzzing::ptr_targets(rest) {
            Some(targets) => targets,
            None => return,
        }
    } else {
        targets_from(rest)
    };
    for (name, _) in &targets {
        check_name(name);
    }
    check_choice(&targets);
});

fn targets_from(mut data: &[u8]) -> Vec<(Name, u32)> {
    let mut targets = Vec::new();
    while let Some((&kind, rest)) = data.split_first() {
        if targets.len() == MAX_TARGETS {
            break;
        }
        let Some((ttl, rest)) = rest.split_first_chunk::<4>() else {
            break;
        };
        let Some((&len, rest)) = rest.split_first() else {
            break;
        };
        let (bytes, rest) = rest.split_at(usize::from(len).min(rest.len()));
        data = rest;
        let text = String::from_utf8_lossy(bytes);
        let name = match kind % 4 {
            0 => Name::from_labels(bytes.split(|b| *b == 0xff))
                .ok()
                .map(|mut name| {
                    name.set_fqdn(kind & 0x10 != 0);
                    name
                }),
            1 => Name::from_ascii(&*text).ok(),
            2 => Name::from_utf8(&*text).ok(),
            _ => fuzzing::name_from_wire(bytes),
        };
        if let Some(name) = name {
            targets.push((name, u32::from_le_bytes(*ttl)));
        }
    }
    targets
}

/// SPEC §6's rule, written out independently: every label printable ASCII (0x21..=0x7e)
/// without a dot, and 1..=253 characters joined.
fn allowed(name: &Name) -> bool {
    let labels: Vec<&[u8]> = name.iter().collect();
    let chars = labels.iter().map(|l| l.len()).sum::<usize>() + labels.len().saturating_sub(1);
    (1..=MAX_NAME_CHARS).contains(&chars)
        && labels
            .iter()
            .all(|l| l.iter().all(|b| (0x21..=0x7e).contains(b) && *b != b'.'))
}

fn check_name(name: &Name) {
    let usable = fuzzing::usable_name(name);
    assert_eq!(usable.is_some(), allowed(name), "{name:?} -> {usable:?}");
    if let Some(text) = &usable {
        assert!(!text.is_empty() && text.len() <= MAX_NAME_CHARS);
        assert!(!text.ends_with('.') && !text.starts_with('.') && !text.contains(".."));
        assert!(
            text.bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && !b.is_ascii_uppercase())
        );
        let labels: Vec<Vec<u8>> = name.iter().map(<[u8]>::to_ascii_lowercase).collect();
        let split: Vec<&[u8]> = text.split('.').map(str::as_bytes).collect();
        assert_eq!(split, labels.iter().map(Vec::as_slice).collect::<Vec<_>>());
    }
    // Case and the trailing dot never change the answer.
    assert_eq!(fuzzing::usable_name(&name.to_lowercase()), usable);
    let mut other = name.clone();
    other.set_fqdn(!name.is_fqdn());
    assert_eq!(fuzzing::usable_name(&other), usable);
}

fn check_choice(targets: &[(Name, u32)]) {
    let best = targets
        .iter()
        .filter_map(|(name, ttl)| fuzzing::usable_name(name).map(|text| (text, *ttl)))
        .min();
    let chosen = fuzzing::choose(targets);
    match (&chosen, &best) {
        (Chosen::Empty, None) => assert!(targets.is_empty()),
        (Chosen::Invalid, None) => assert!(!targets.is_empty()),
        (Chosen::Usable { name, ttl, target }, Some((b_name, b_ttl))) => {
            assert_eq!((name, ttl), (b_name, b_ttl));
            assert_eq!(fuzzing::usable_name(target).as_ref(), Some(name));
        }
        _ => panic!("chose {chosen:?}, expected {best:?}"),
    }
    // Whatever order the server answers in.
    let reversed: Vec<(Name, u32)> = targets.iter().rev().cloned().collect();
    let again = fuzzing::choose(&reversed);
    match (&chosen, &again) {
        (
            Chosen::Usable { name, ttl, .. },
            Chosen::Usable {
                name: n2, ttl: t2, ..
            },
        ) => {
            assert_eq!((name, ttl), (n2, t2));
        }
        (a, b) => assert_eq!(a, b),
    }
}
