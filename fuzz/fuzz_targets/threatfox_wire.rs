//! ThreatFox's wire mapping and IOC matching: `[status][flags][header length][headers][body]`
//! (see `common`; flag bits 3–7 pick the searched address). No panic; the report invariants
//! in `common::check`; listed exactly when every kept hit really is the searched address; and
//! the IOC forms the docs promise (`ip`, `ip:port`, `[v6]:port`, a URL) match an address
//! built from the body's first bytes.

#![no_main]

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enrichd_core::{CanonicalIp, ProviderFields, ProviderId, ProviderOutcome, Verdict};
use enrichd_intel::fuzzing;
use libfuzzer_sys::fuzz_target;

/// Searched addresses: the fixtures' own, IPv6 forms that look like `ip:port`, a mapped one.
const SEARCHED: [&str; 8] = [
    "45.155.205.233",
    "2001:db8::1",
    "2001:db8::1:443",
    "::ffff:45.155.205.233",
    "145.155.205.233",
    "::",
    "2001:db8::",
    "1.2.3.4",
];

fuzz_target!(|data: &[u8]| {
    let Some(common::Parsed { answer, flags }) = common::parse(data) else {
        return;
    };
    let ip = CanonicalIp::parse(SEARCHED[usize::from(flags >> 3) % SEARCHED.len()])
        .expect("a searched address parses");
    let (now, body) = (answer.now_secs, answer.body.clone());
    let result = fuzzing::threatfox(answer, ip);
    common::check(ProviderId::Threatfox, now, &result);
    if let Ok(report) = &result {
        let listed = matches!(
            report.fields,
            Some(ProviderFields::Threatfox { listed: true, .. })
        );
        assert_eq!(listed, report.outcome == ProviderOutcome::Ok);
        assert_eq!(listed, report.verdict == Some(Verdict::Malicious));
        if listed {
            let hits = report.raw.as_array().expect("hits are a list");
            assert!(!hits.is_empty());
            for hit in hits {
                let ioc = hit
                    .get("ioc")
                    .and_then(|i| i.as_str())
                    .expect("a hit has an ioc");
                assert!(fuzzing::threatfox_ioc_is(ioc, ip), "kept {ioc:?} for {ip}");
            }
        }
    }
    if let Ok(body) = body {
        if let Ok(text) = std::str::from_utf8(&body) {
            let _ = fuzzing::threatfox_ioc_is(text, ip);
        }
        promised_forms_match(&body);
    }
});

/// An address from the first bytes (a v4 or a v6, by the first byte's low bit) must match its
/// own text, `ip:port`, `[v6]:port` and a URL naming it.
fn promised_forms_match(bytes: &[u8]) {
    let Some((&kind, rest)) = bytes.split_first() else {
        return;
    };
    let addr = if kind & 1 == 0 {
        let Some(octets) = rest.first_chunk::<4>() else {
            return;
        };
        IpAddr::V4(Ipv4Addr::from(*octets))
    } else {
        let Some(octets) = rest.first_chunk::<16>() else {
            return;
        };
        IpAddr::V6(Ipv6Addr::from(*octets))
    };
    let ip = CanonicalIp::from_addr(addr);
    let host = match addr {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    for ioc in [
        addr.to_string(),
        ip.to_string(),
        format!("{host}:443"),
        format!("http://{host}/gate.php"),
        format!("https://user@{host}:8443/?q=1"),
    ] {
        assert!(fuzzing::threatfox_ioc_is(&ioc, ip), "{ioc:?} is not {ip}");
    }
}
