//! Which addresses may leave the machine.
//!
//! An address is *global* when it lies in no IANA special-purpose block whose "Globally
//! Reachable" is false and is not multicast. 6to4 (`2002::/16`) and NAT64 (`64:ff9b::/96`)
//! addresses follow the IPv4 address they embed; Teredo is never global. Anything that is not
//! global, or that an operator excluded, gets no DNS query and no provider call.
//!
//! The block table is a snapshot of the IANA IPv4 and IPv6 Special-Purpose Address Registries;
//! `ARCHITECTURE.md` carries the same snapshot and the date it was taken.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::CanonicalIp;

/// One registry row: a block, whether it is globally reachable, and its registry name.
struct SpecialBlock {
    net: &'static str,
    globally_reachable: bool,
    name: &'static str,
}

const fn block(net: &'static str, globally_reachable: bool, name: &'static str) -> SpecialBlock {
    SpecialBlock {
        net,
        globally_reachable,
        name,
    }
}

/// IANA IPv4 Special-Purpose Address Registry (snapshot), plus multicast and the deprecated
/// 6to4 relay anycast block, whose "N/A" we treat as not global: nothing answers there.
const IPV4_BLOCKS: &[SpecialBlock] = &[
    block("0.0.0.0/8", false, "this network"),
    block("10.0.0.0/8", false, "private-use"),
    block("100.64.0.0/10", false, "shared address space (CGNAT)"),
    block("127.0.0.0/8", false, "loopback"),
    block("169.254.0.0/16", false, "link-local"),
    block("172.16.0.0/12", false, "private-use"),
    block("192.0.0.0/24", false, "IETF protocol assignments"),
    block("192.0.0.9/32", true, "port control protocol anycast"),
    block(
        "192.0.0.10/32",
        true,
        "traversal using relays around NAT anycast",
    ),
    block("192.0.2.0/24", false, "documentation (TEST-NET-1)"),
    block("192.31.196.0/24", true, "AS112-v4"),
    block("192.52.193.0/24", true, "AMT"),
    block("192.88.99.0/24", false, "deprecated 6to4 relay anycast"),
    block("192.168.0.0/16", false, "private-use"),
    block("192.175.48.0/24", true, "direct delegation AS112 service"),
    block("198.18.0.0/15", false, "benchmarking"),
    block("198.51.100.0/24", false, "documentation (TEST-NET-2)"),
    block("203.0.113.0/24", false, "documentation (TEST-NET-3)"),
    block("224.0.0.0/4", false, "multicast"),
    block("240.0.0.0/4", false, "reserved"),
    block("255.255.255.255/32", false, "limited broadcast"),
];

/// IANA IPv6 Special-Purpose Address Registry (snapshot), plus multicast, the deprecated
/// site-local block and the deprecated IPv4-compatible block, which no global route reaches.
/// `2002::/16` and `64:ff9b::/96` are absent: they are judged by their embedded IPv4.
const IPV6_BLOCKS: &[SpecialBlock] = &[
    block("::/128", false, "unspecified"),
    block("::1/128", false, "loopback"),
    block("::/96", false, "deprecated IPv4-compatible"),
    block("::ffff:0:0/96", false, "IPv4-mapped"),
    block("64:ff9b:1::/48", false, "local-use IPv4/IPv6 translation"),
    block("100::/64", false, "discard-only"),
    block("100:0:0:1::/64", false, "dummy IPv6 prefix"),
    block("2001::/23", false, "IETF protocol assignments"),
    block("2001::/32", false, "Teredo"),
    block("2001:1::1/128", true, "port control protocol anycast"),
    block(
        "2001:1::2/128",
        true,
        "traversal using relays around NAT anycast",
    ),
    block(
        "2001:1::3/128",
        true,
        "DNS-SD service registration protocol anycast",
    ),
    block("2001:2::/48", false, "benchmarking"),
    block("2001:3::/32", true, "AMT"),
    block("2001:4:112::/48", true, "AS112-v6"),
    block("2001:10::/28", false, "deprecated ORCHID"),
    block("2001:20::/28", true, "ORCHIDv2"),
    block("2001:30::/28", true, "drone remote ID protocol entity tags"),
    block("2001:db8::/32", false, "documentation"),
    block("2620:4f:8000::/48", true, "direct delegation AS112 service"),
    block("3fff::/20", false, "documentation"),
    block("5f00::/16", false, "segment routing SIDs"),
    block("fc00::/7", false, "unique-local"),
    block("fe80::/10", false, "link-local unicast"),
    block("fec0::/10", false, "deprecated site-local"),
    block("ff00::/8", false, "multicast"),
];

/// Where an address may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressScope {
    /// Globally reachable and not excluded: DNS and providers may be asked.
    Global,
    /// In a special-purpose block that is not globally reachable.
    NonGlobal {
        /// Registry name of the most specific block that matched.
        block: &'static str,
    },
    /// Global, but inside an operator's `ENRICHD_EXCLUDE_CIDRS`.
    Excluded,
}

impl AddressScope {
    /// Whether traffic about this address may leave the machine.
    pub fn may_egress(self) -> bool {
        matches!(self, Self::Global)
    }
}

/// Why an exclusion list could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a CIDR or address: {entry:?}")]
pub struct CidrParseError {
    /// The offending entry.
    pub entry: String,
}

/// The global predicate plus an operator's exclusions (their scanners, partners).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    excluded: Vec<IpNet>,
}

impl AddressPolicy {
    /// A policy excluding `nets` on top of the special-purpose blocks.
    pub fn new(excluded: Vec<IpNet>) -> Self {
        Self { excluded }
    }

    /// Parses a comma-separated list of CIDRs; a bare address means that one host.
    ///
    /// Every bad entry is reported, so an operator fixes the list in one go.
    pub fn parse_exclusions(list: &str) -> Result<Vec<IpNet>, Vec<CidrParseError>> {
        let mut nets = Vec::new();
        let mut errors = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match entry.parse::<IpNet>() {
                Ok(net) => nets.push(net.trunc()),
                Err(_) => match entry.parse::<IpAddr>() {
                    Ok(addr) => nets.push(IpNet::from(addr)),
                    Err(_) => errors.push(CidrParseError {
                        entry: entry.to_owned(),
                    }),
                },
            }
        }
        if errors.is_empty() {
            Ok(nets)
        } else {
            Err(errors)
        }
    }

    /// The operator's exclusions.
    pub fn excluded(&self) -> &[IpNet] {
        &self.excluded
    }

    /// Classifies `ip`.
    pub fn scope(&self, ip: CanonicalIp) -> AddressScope {
        if let Some(block) = non_global_block(ip.addr()) {
            return AddressScope::NonGlobal { block };
        }
        let candidates = [Some(ip.addr()), embedded_ipv4(ip.addr()).map(IpAddr::V4)];
        let excluded = candidates
            .into_iter()
            .flatten()
            .any(|addr| self.excluded.iter().any(|net| net.contains(&addr)));
        if excluded {
            AddressScope::Excluded
        } else {
            AddressScope::Global
        }
    }
}

/// Whether `addr` is globally reachable (ignoring operator exclusions).
pub fn is_global(addr: IpAddr) -> bool {
    non_global_block(addr).is_none()
}

/// The registry name of the block that makes `addr` non-global, if any.
fn non_global_block(addr: IpAddr) -> Option<&'static str> {
    match CanonicalIp::from_addr(addr).addr() {
        IpAddr::V4(v4) => ipv4_non_global_block(v4),
        IpAddr::V6(v6) => match embedded_ipv4(IpAddr::V6(v6)) {
            Some(v4) => ipv4_non_global_block(v4),
            None => ipv6_non_global_block(v6),
        },
    }
}

/// The IPv4 address carried by a 6to4 or NAT64 (`64:ff9b::/96`) address.
fn embedded_ipv4(addr: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = addr else { return None };
    let segments = v6.segments();
    let octets = v6.octets();
    if segments[0] == 0x2002 {
        return Some(Ipv4Addr::new(octets[2], octets[3], octets[4], octets[5]));
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(Ipv4Addr::new(
            octets[12], octets[13], octets[14], octets[15],
        ));
    }
    None
}

fn ipv4_non_global_block(addr: Ipv4Addr) -> Option<&'static str> {
    most_specific(IPV4_BLOCKS, |text| {
        text.parse::<Ipv4Net>()
            .ok()
            .filter(|net| net.contains(&addr))
            .map(|net| net.prefix_len())
    })
}

fn ipv6_non_global_block(addr: Ipv6Addr) -> Option<&'static str> {
    most_specific(IPV6_BLOCKS, |text| {
        text.parse::<Ipv6Net>()
            .ok()
            .filter(|net| net.contains(&addr))
            .map(|net| net.prefix_len())
    })
}

/// The longest-prefix block containing the address decides; `None` when that block is
/// globally reachable or no block contains it.
fn most_specific(
    blocks: &'static [SpecialBlock],
    prefix_if_contains: impl Fn(&str) -> Option<u8>,
) -> Option<&'static str> {
    blocks
        .iter()
        .filter_map(|b| prefix_if_contains(b.net).map(|len| (len, b)))
        .max_by_key(|(len, _)| *len)
        .filter(|(_, b)| !b.globally_reachable)
        .map(|(_, b)| b.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope_of(text: &str) -> AddressScope {
        AddressPolicy::default().scope(CanonicalIp::parse(text).unwrap())
    }

    #[test]
    fn every_block_entry_parses() {
        for b in IPV4_BLOCKS {
            assert!(b.net.parse::<Ipv4Net>().is_ok(), "{}", b.net);
        }
        for b in IPV6_BLOCKS {
            assert!(b.net.parse::<Ipv6Net>().is_ok(), "{}", b.net);
        }
    }

    #[test]
    fn classifies_special_purpose_blocks() {
        let non_global = [
            // IPv4
            ("0.0.0.0", "this network"),
            ("0.1.2.3", "this network"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("10.0.0.1", "private-use"),
            ("172.16.0.1", "private-use"),
            ("172.31.255.255", "private-use"),
            ("192.168.1.1", "private-use"),
            ("100.64.0.1", "shared address space (CGNAT)"),
            ("100.127.255.255", "shared address space (CGNAT)"),
            ("169.254.10.10", "link-local"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("192.0.2.1", "documentation (TEST-NET-1)"),
            ("198.51.100.7", "documentation (TEST-NET-2)"),
            ("203.0.113.9", "documentation (TEST-NET-3)"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.254", "reserved"),
            ("255.255.255.255", "limited broadcast"),
            ("192.0.0.8", "IETF protocol assignments"),
            ("192.0.0.170", "IETF protocol assignments"),
            // IPv6
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fc00::1", "unique-local"),
            ("fd12:3456:789a::1", "unique-local"),
            ("fe80::1", "link-local unicast"),
            ("febf::1", "link-local unicast"),
            ("fec0::1", "deprecated site-local"),
            ("ff02::1", "multicast"),
            ("ff0e::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("2001:2::1", "benchmarking"),
            ("2001:10::1", "deprecated ORCHID"),
            ("100::1", "discard-only"),
            ("64:ff9b:1::1", "local-use IPv4/IPv6 translation"),
            ("::1.2.3.4", "deprecated IPv4-compatible"),
            ("5f00::1", "segment routing SIDs"),
            // 6to4 and NAT64 follow their embedded IPv4.
            ("2002:c0a8:0101::1", "private-use"),
            ("2002:7f00:1::", "loopback"),
            ("64:ff9b::10.0.0.1", "private-use"),
            ("64:ff9b::c000:201", "documentation (TEST-NET-1)"),
            // ::ffff: mapped is canonicalised to IPv4 first.
            ("::ffff:192.168.0.1", "private-use"),
            ("::ffff:127.0.0.1", "loopback"),
        ];
        for (addr, block) in non_global {
            assert_eq!(scope_of(addr), AddressScope::NonGlobal { block }, "{addr}");
        }

        let global = [
            "1.1.1.1",
            "8.8.8.8",
            "45.155.205.233",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.0.9",
            "192.0.0.10",
            "192.31.196.1",
            "192.175.48.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2a00:1450:4001:829::200e",
            "2606:4700:4700::1111",
            "2001:1::1",
            "2001:3::1",
            "2001:4:112::1",
            "2001:20::1",
            "2620:4f:8000::1",
            "2002:0808:0808::1",
            "64:ff9b::8.8.8.8",
            "::ffff:8.8.8.8",
        ];
        for addr in global {
            assert_eq!(scope_of(addr), AddressScope::Global, "{addr}");
            assert!(
                is_global(CanonicalIp::parse(addr).unwrap().addr()),
                "{addr}"
            );
        }
    }

    #[test]
    fn operator_exclusions_apply_to_global_addresses() {
        let nets =
            AddressPolicy::parse_exclusions(" 45.155.205.0/24, 2a00:1450::/32 ,8.8.8.8").unwrap();
        let policy = AddressPolicy::new(nets);
        let scope = |t: &str| policy.scope(CanonicalIp::parse(t).unwrap());
        assert_eq!(scope("45.155.205.233"), AddressScope::Excluded);
        assert_eq!(scope("::ffff:45.155.205.1"), AddressScope::Excluded);
        assert_eq!(
            scope("2002:2d9b:cde9::1"),
            AddressScope::Excluded,
            "6to4 of 45.155.205.233"
        );
        assert_eq!(scope("2a00:1450:4001:829::200e"), AddressScope::Excluded);
        assert_eq!(scope("8.8.8.8"), AddressScope::Excluded);
        assert_eq!(scope("8.8.4.4"), AddressScope::Global);
        assert_eq!(
            scope("10.0.0.1"),
            AddressScope::NonGlobal {
                block: "private-use"
            }
        );
        assert!(!scope("8.8.8.8").may_egress());
        assert!(scope("1.1.1.1").may_egress());
    }

    #[test]
    fn reports_every_bad_exclusion() {
        let errors = AddressPolicy::parse_exclusions("10.0.0.0/8,bogus,1.2.3.4/33,,").unwrap_err();
        let entries: Vec<_> = errors.iter().map(|e| e.entry.as_str()).collect();
        assert_eq!(entries, ["bogus", "1.2.3.4/33"]);
        assert_eq!(
            AddressPolicy::parse_exclusions("").unwrap(),
            Vec::<IpNet>::new()
        );
    }
}
