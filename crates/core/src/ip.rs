//! Strict parsing of attacker addresses.
//!
//! Input comes from sensors, a profiler and operators' command lines, so it is hostile by
//! default. We trim ASCII whitespace and then accept exactly what `IpAddr::from_str` accepts:
//! no zone ids (`fe80::1%eth0`), brackets, ports or leading zeros (`010.0.0.1` is octal to
//! some parsers and decimal to others, so it is refused rather than guessed). The result is
//! canonical: an IPv4-mapped IPv6 address becomes its IPv4 address and IPv6 prints in RFC 5952
//! compressed lowercase form, so one host is always one key.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// The longest input we try to parse. The longest IPv6 text is 45 characters; anything far
/// beyond that is refused before parsing so a megabyte of garbage costs nothing.
const MAX_INPUT_CHARS: usize = 64;

/// An attacker address in canonical form: the key of all per-IP work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CanonicalIp(IpAddr);

/// Why a string is not an attacker address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpParseError {
    /// Nothing but whitespace.
    #[error("empty address")]
    Empty,
    /// Longer than any address can be.
    #[error("address text too long ({chars} characters)")]
    TooLong {
        /// Length of the rejected input, in characters.
        chars: usize,
    },
    /// Not an address in the strict grammar.
    #[error("not an IP address: {shown:?}")]
    Invalid {
        /// The input, cut short for logs.
        shown: String,
    },
}

impl CanonicalIp {
    /// Parses `text` strictly (see the module docs) and canonicalises it.
    pub fn parse(text: &str) -> Result<Self, IpParseError> {
        let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
        if trimmed.is_empty() {
            return Err(IpParseError::Empty);
        }
        let chars = trimmed.chars().count();
        if chars > MAX_INPUT_CHARS {
            return Err(IpParseError::TooLong { chars });
        }
        IpAddr::from_str(trimmed)
            .map(Self::from_addr)
            .map_err(|_| IpParseError::Invalid {
                shown: trimmed.chars().take(48).collect(),
            })
    }

    /// Canonicalises an already parsed address.
    pub fn from_addr(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => Self(IpAddr::V6(v6)),
            },
            IpAddr::V4(_) => Self(addr),
        }
    }

    /// The address itself.
    pub fn addr(self) -> IpAddr {
        self.0
    }

    /// Whether this is an IPv4 address (some providers answer only for IPv4).
    pub fn is_ipv4(self) -> bool {
        self.0.is_ipv4()
    }
}

impl fmt::Display for CanonicalIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for CanonicalIp {
    type Err = IpParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<IpAddr> for CanonicalIp {
    fn from(addr: IpAddr) -> Self {
        Self::from_addr(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> String {
        CanonicalIp::parse(text).map_or_else(|e| format!("ERR {e}"), |ip| ip.to_string())
    }

    #[test]
    fn canonicalises_accepted_forms() {
        let cases = [
            ("1.2.3.4", "1.2.3.4"),
            ("  1.2.3.4\t\n", "1.2.3.4"),
            ("::ffff:1.2.3.4", "1.2.3.4"),
            ("::FFFF:102:304", "1.2.3.4"),
            ("2001:0DB8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
            (
                "2a00:1450:4001:0829:0000:0000:0000:200e",
                "2a00:1450:4001:829::200e",
            ),
            ("::", "::"),
            ("::1", "::1"),
            // IPv4-compatible (deprecated) is not mapped and stays IPv6.
            ("::1.2.3.4", "::102:304"),
        ];
        for (input, expected) in cases {
            assert_eq!(canonical(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn rejects_hostile_strings() {
        let long = "1".repeat(10_000);
        let cases: &[&str] = &[
            "",
            "   ",
            "fe80::1%eth0",
            "fe80::1%25eth0",
            "[2001:db8::1]",
            "[2001:db8::1]:443",
            "1.2.3.4:22",
            "01.2.3.4",
            "1.2.3.04",
            "010.0.0.1",
            "1.2.3",
            "1.2.3.4.5",
            "256.1.1.1",
            "0x7f.0.0.1",
            "2130706433",
            "1.2.3.4/32",
            "example.com",
            "1.2.3.4 5.6.7.8",
            "1.2.3.4\u{a0}",
            "\u{200b}1.2.3.4",
            "１.２.３.４",
            "1.2.3.4\0",
            "::ffff:1.2.3.4%1",
            &long,
        ];
        for input in cases {
            assert!(CanonicalIp::parse(input).is_err(), "accepted {input:?}");
        }
    }

    #[test]
    fn reports_a_clear_reason() {
        assert_eq!(CanonicalIp::parse(" \t"), Err(IpParseError::Empty));
        assert!(matches!(
            CanonicalIp::parse(&"a".repeat(100)),
            Err(IpParseError::TooLong { chars: 100 })
        ));
        let err = CanonicalIp::parse("1.2.3.4:22").unwrap_err();
        assert_eq!(err.to_string(), "not an IP address: \"1.2.3.4:22\"");
    }
}
