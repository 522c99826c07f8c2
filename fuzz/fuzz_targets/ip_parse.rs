//! The strict address parser (`CanonicalIp::parse`) on the input as text. No panic; an
//! accepted address is canonical (its text parses back to itself and prints the same, an
//! IPv4-mapped IPv6 is never kept); it accepts exactly what the standard library accepts
//! after trimming ASCII whitespace, up to 64 characters; refusals are short.

#![no_main]

use std::net::IpAddr;

use enrichd_core::{CanonicalIp, IpParseError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = CanonicalIp::parse(&text);
    let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
    match &parsed {
        Ok(ip) => {
            let shown = ip.to_string();
            assert_eq!(CanonicalIp::parse(&shown).as_ref(), Ok(ip), "{shown}");
            assert_eq!(
                CanonicalIp::parse(&shown).map(|i| i.to_string()),
                Ok(shown.clone())
            );
            if let IpAddr::V6(v6) = ip.addr() {
                assert!(
                    v6.to_ipv4_mapped().is_none(),
                    "kept a mapped address: {shown}"
                );
            }
            assert!(trimmed.chars().count() <= 64);
            let std = trimmed
                .parse::<IpAddr>()
                .expect("accepted what std refuses");
            assert_eq!(CanonicalIp::from_addr(std), *ip);
        }
        Err(IpParseError::Empty) => assert!(trimmed.is_empty()),
        Err(IpParseError::TooLong { chars }) => assert!(*chars > 64),
        Err(IpParseError::Invalid { shown }) => {
            assert!(shown.chars().count() <= 48);
            assert!(
                trimmed.parse::<IpAddr>().is_err(),
                "refused what std accepts: {trimmed:?}"
            );
        }
    }
});
