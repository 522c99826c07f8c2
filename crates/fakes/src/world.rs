//! What each provider answers about an address: a pure function of the address text, so
//! every run (and every replica) sees the same world.
//!
//! | provider | answers (by a hash of the address) |
//! |---|---|
//! | greynoise | 40 % 404 not observed, 20 % benign, 30 % malicious (with tags), 10 % `unknown`; IPv6 → 400 |
//! | abuseipdb | score 0 (half of them never reported), 1..24, 25..74 or 75..100, with up to three reports |
//! | threatfox | 20 % an `ip:port` hit (IPv4 only), else `no_result` |
//! | feodo | one fixed feed: the fixture's two addresses plus `45.155.205.1` – `45.155.205.32` |
//!
//! Reverse DNS: every address has the PTR name `h-45-155-205-233.fake.test.` (IPv6:
//! `h6-<32 hex nibbles>.fake.test.`), whose A/AAAA record points back at the address
//! ([`zone`]).

use std::net::IpAddr;

use enrichd_testkit::dns::Zone;
use serde_json::{Value, json};

/// `X-RateLimit-Limit` the fake AbuseIPDB reports by default: high enough that no benchmark
/// ever sees its header quota run out.
pub const DEFAULT_ABUSEIPDB_QUOTA: u64 = 1_000_000;

/// The entity tag of the (never changing) Feodo feed.
pub const FEODO_ETAG: &str = "\"enrichd-fakes-feodo-1\"";
/// Its `Last-Modified`.
pub const FEODO_LAST_MODIFIED: &str = "Mon, 23 Nov 2026 00:00:00 GMT";

/// An answer: status, extra headers, JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Extra headers (`content-type` and `content-length` are always sent).
    pub headers: Vec<(&'static str, String)>,
    /// Body (empty for 304).
    pub body: Vec<u8>,
}

impl Answer {
    /// A JSON answer.
    pub fn json(status: u16, body: &Value) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.to_string().into_bytes(),
        }
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// FNV-1a over the text, then mixed: a stable per-address hash across runs and platforms.
pub fn hash_str(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    crate::faults::mix(h)
}

/// A per-provider hash, so one provider's bucket says nothing about another's.
fn salted(text: &str, salt: u64) -> u64 {
    crate::faults::mix(hash_str(text) ^ salt)
}

/// GreyNoise's answer for `ip` (the text after `/v3/community/`).
pub fn greynoise(ip: &str) -> Answer {
    let Ok(addr) = ip.parse::<IpAddr>() else {
        return Answer::json(
            400,
            &json!({"message": "Request is not a valid routable IPv4 address"}),
        );
    };
    if addr.is_ipv6() {
        return Answer::json(
            400,
            &json!({"message": "Request is not a valid routable IPv4 address"}),
        );
    }
    let h = hash_str(ip);
    let base = |classification: &str, name: &str, tags: &[&str]| {
        json!({
            "ip": ip,
            "noise": true,
            "riot": false,
            "classification": classification,
            "name": name,
            "tags": tags,
            "link": format!("https://viz.greynoise.io/ip/{ip}"),
            "last_seen": "2026-11-22",
            "message": "Success",
        })
    };
    match h % 10 {
        0..=3 => Answer::json(
            404,
            &json!({
                "ip": ip,
                "noise": false,
                "riot": false,
                "message": "IP not observed scanning the internet or contained in RIOT data set.",
            }),
        ),
        4 | 5 => Answer::json(200, &base("benign", "Censys", &[])),
        6..=8 => Answer::json(
            200,
            &base(
                "malicious",
                "unknown",
                &["ssh_bruteforcer", "telnet_scanner"],
            ),
        ),
        _ => Answer::json(200, &base("unknown", "", &[])),
    }
}

/// AbuseIPDB's `check` answer for `ip`; `remaining` goes into `X-RateLimit-Remaining`.
pub fn abuseipdb(ip: &str, limit: u64, remaining: u64, reset_epoch_secs: u64) -> Answer {
    let quota = |a: Answer| {
        a.header("x-ratelimit-limit", limit.to_string())
            .header("x-ratelimit-remaining", remaining.to_string())
            .header("x-ratelimit-reset", reset_epoch_secs.to_string())
    };
    let Ok(addr) = ip.parse::<IpAddr>() else {
        return Answer::json(
            422,
            &json!({"errors": [{"detail": "The ip address must be a valid IPv4 or IPv6 address (e.g. 8.8.8.8 or 2001:4860:4860::8888).", "status": 422}]}),
        );
    };
    let h = salted(ip, 0xab) >> 8;
    let (score, total) = match h % 4 {
        0 => (0, if (h >> 4).is_multiple_of(2) { 0 } else { 2 }),
        1 => (1 + (h >> 4) % 24, 3),
        2 => (25 + (h >> 4) % 50, 9),
        _ => (75 + (h >> 4) % 26, 40),
    };
    let categories = [14u64, 15, 18, 21, 22];
    let reports: Vec<Value> = (0..total.min(3))
        .map(|i| {
            let a = categories[usize::try_from((h >> (8 + i)) % 5).unwrap_or(0)];
            let b = categories[usize::try_from((h >> (12 + i)) % 5).unwrap_or(0)];
            json!({
                "reportedAt": format!("2026-11-{:02}T0{}:00:00+00:00", 20 - i, i),
                "comment": "ssh brute force",
                "categories": [a, b],
                "reporterId": 1000 + i,
                "reporterCountryCode": "NL",
                "reporterCountryName": "Netherlands",
            })
        })
        .collect();
    quota(Answer::json(
        200,
        &json!({"data": {
            "ipAddress": ip,
            "isPublic": true,
            "ipVersion": if addr.is_ipv4() { 4 } else { 6 },
            "isWhitelisted": false,
            "abuseConfidenceScore": score,
            "countryCode": "NL",
            "usageType": "Data Center/Web Hosting/Transit",
            "isp": "Example Hosting BV",
            "domain": "example-hosting.nl",
            "hostnames": [],
            "isTor": false,
            "totalReports": total,
            "numDistinctUsers": total.min(7),
            "lastReportedAt": if total > 0 { Value::from("2026-11-20T00:00:00+00:00") } else { Value::Null },
            "reports": reports,
        }}),
    ))
}

/// ThreatFox's answer to a `search_ioc` for `term`.
pub fn threatfox(query: Option<&str>, term: Option<&str>) -> Answer {
    if query != Some("search_ioc") {
        return Answer::json(200, &json!({"query_status": "unknown_query"}));
    }
    let Some(term) = term.filter(|t| !t.is_empty()) else {
        return Answer::json(200, &json!({"query_status": "illegal_search_term"}));
    };
    let hit = term
        .parse::<IpAddr>()
        .is_ok_and(|a| a.is_ipv4() && salted(term, 0x7f) % 10 >= 8);
    if !hit {
        return Answer::json(
            200,
            &json!({"query_status": "no_result", "data": "Your search did not yield any results"}),
        );
    }
    Answer::json(
        200,
        &json!({"query_status": "ok", "data": [{
            "id": format!("{}", 1_000_000 + hash_str(term) % 1_000_000),
            "ioc": format!("{term}:443"),
            "threat_type": "botnet_cc",
            "threat_type_desc": "Indicator that identifies a botnet command&control server (C&C)",
            "ioc_type": "ip:port",
            "ioc_type_desc": "ip:port combination that is used for botnet Command&control (C&C)",
            "malware": "win.cobalt_strike",
            "malware_printable": "Cobalt Strike",
            "malware_alias": "Agentemis,BEACON,CobaltStrike",
            "confidence_level": 100,
            "first_seen": "2026-11-20 10:12:44 UTC",
            "last_seen": null,
            "reference": null,
            "reporter": "enrichd_fakes",
            "tags": ["c2"],
        }]}),
    )
}

/// Addresses the Feodo feed lists.
pub fn feodo_listed() -> Vec<String> {
    let mut listed = vec!["45.155.205.233".to_owned(), "194.26.29.10".to_owned()];
    listed.extend((1..=32).map(|i| format!("45.155.205.{i}")));
    listed
}

/// The Feodo feed; `if_none_match` equal to [`FEODO_ETAG`] gives 304.
pub fn feodo(if_none_match: Option<&str>) -> Answer {
    if if_none_match.is_some_and(|tag| tag.split(',').any(|t| t.trim() == FEODO_ETAG)) {
        return Answer {
            status: 304,
            headers: vec![("etag", FEODO_ETAG.to_owned())],
            body: Vec::new(),
        };
    }
    let entries: Vec<Value> = feodo_listed()
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            json!({
                "ip_address": ip,
                "port": if i % 2 == 0 { 443 } else { 8080 },
                "status": "online",
                "hostname": null,
                "as_number": 64500,
                "as_name": "EXAMPLE-AS",
                "country": "NL",
                "first_seen": "2026-11-01 11:02:13",
                "last_online": "2026-11-22",
                "malware": if i % 3 == 0 { "QakBot" } else { "Emotet" },
            })
        })
        .collect();
    Answer::json(200, &Value::Array(entries))
        .header("etag", FEODO_ETAG)
        .header("last-modified", FEODO_LAST_MODIFIED)
}

/// TTL of every synthetic DNS record.
pub const DNS_TTL: u32 = 3600;

/// The DNS the fake world serves: a PTR for every address ([`ptr_name`]), an A or AAAA record
/// for every such name ([`forward`]), NXDOMAIN for anything else, under `fake.test.`.
pub fn zone() -> Zone {
    Zone::new()
        .every_address(ptr_name, forward, DNS_TTL)
        .authority("fake.test.")
}

/// The synthetic PTR name of `ip` (fully qualified, trailing dot).
pub fn ptr_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("h-{a}-{b}-{c}-{d}.fake.test.")
        }
        IpAddr::V6(v6) => {
            let hex = v6
                .octets()
                .iter()
                .fold(String::with_capacity(32), |mut s, b| {
                    use std::fmt::Write as _;
                    let _ = write!(s, "{b:02x}");
                    s
                });
            format!("h6-{hex}.fake.test.")
        }
    }
}

/// The address a synthetic name points back at (for forward confirmation).
pub fn forward(name: &str) -> Option<IpAddr> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let label = name.strip_suffix(".fake.test")?;
    if let Some(hex) = label.strip_prefix("h6-") {
        if hex.len() != 32 {
            return None;
        }
        let mut octets = [0u8; 16];
        for (i, octet) in octets.iter_mut().enumerate() {
            *octet = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        return Some(IpAddr::from(octets));
    }
    let dotted = label.strip_prefix("h-")?.replace('-', ".");
    dotted.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(a: &Answer) -> Value {
        serde_json::from_slice(&a.body).unwrap()
    }

    #[test]
    fn answers_are_a_function_of_the_address() {
        for i in 0..200 {
            let ip = format!("45.1.{}.{}", i / 100, i % 100);
            assert_eq!(greynoise(&ip), greynoise(&ip));
            assert_eq!(abuseipdb(&ip, 10, 5, 0), abuseipdb(&ip, 10, 5, 0));
            assert_eq!(
                threatfox(Some("search_ioc"), Some(&ip)),
                threatfox(Some("search_ioc"), Some(&ip))
            );
        }
    }

    #[test]
    fn the_world_holds_every_kind_of_answer() {
        let ips: Vec<String> = (0..500)
            .map(|i| format!("45.2.{}.{}", i / 200, i % 200))
            .collect();
        let statuses: std::collections::BTreeSet<_> = ips
            .iter()
            .map(|ip| {
                let a = greynoise(ip);
                (
                    a.status,
                    body(&a)["classification"].as_str().map(str::to_owned),
                )
            })
            .collect();
        for expected in [
            (404, None),
            (200, Some("benign".to_owned())),
            (200, Some("malicious".to_owned())),
            (200, Some("unknown".to_owned())),
        ] {
            assert!(statuses.contains(&expected), "{expected:?} in {statuses:?}");
        }
        let scores: Vec<u64> = ips
            .iter()
            .map(|ip| {
                body(&abuseipdb(ip, 1, 1, 0))["data"]["abuseConfidenceScore"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert!(scores.iter().all(|s| *s <= 100));
        assert!(scores.contains(&0) && scores.iter().any(|s| *s >= 75));
        let hits = ips
            .iter()
            .filter(|ip| body(&threatfox(Some("search_ioc"), Some(ip)))["query_status"] == "ok")
            .count();
        assert!((50..150).contains(&hits), "threatfox hits {hits}");
    }

    #[test]
    fn threatfox_hits_name_the_searched_address() {
        let ip = (0..1000)
            .map(|i| format!("45.3.{}.{}", i / 250, i % 250))
            .find(|ip| body(&threatfox(Some("search_ioc"), Some(ip)))["query_status"] == "ok")
            .unwrap();
        let b = body(&threatfox(Some("search_ioc"), Some(&ip)));
        assert_eq!(b["data"][0]["ioc"], format!("{ip}:443"));
        assert_eq!(
            body(&threatfox(Some("get_iocs"), Some(&ip)))["query_status"],
            "unknown_query"
        );
    }

    #[test]
    fn abuseipdb_reports_its_quota_headers() {
        let a = abuseipdb("45.4.4.4", 1000, 998, 1_800_000_000);
        assert!(
            a.headers
                .contains(&("x-ratelimit-remaining", "998".to_owned()))
        );
        assert!(
            a.headers
                .contains(&("x-ratelimit-reset", "1800000000".to_owned()))
        );
        assert_eq!(abuseipdb("not-an-ip", 1, 1, 0).status, 422);
    }

    #[test]
    fn greynoise_refuses_ipv6_like_the_real_one() {
        assert_eq!(greynoise("2001:db8::1").status, 400);
        assert_eq!(greynoise("nonsense").status, 400);
    }

    #[test]
    fn the_feed_answers_304_to_its_own_etag() {
        let full = feodo(None);
        assert_eq!(full.status, 200);
        assert_eq!(body(&full).as_array().unwrap().len(), feodo_listed().len());
        assert_eq!(feodo(Some(FEODO_ETAG)).status, 304);
        assert_eq!(feodo(Some("\"other\"")).status, 200);
    }

    #[test]
    fn ptr_names_point_back_at_their_address() {
        for ip in ["45.155.205.233", "2001:db8::42", "8.8.8.8"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(forward(&ptr_name(ip)), Some(ip), "{ip}");
        }
        assert_eq!(
            ptr_name("45.155.205.233".parse().unwrap()),
            "h-45-155-205-233.fake.test."
        );
        assert_eq!(forward("dns.google."), None);
        assert_eq!(forward("h-1-2-3.fake.test."), None);
    }
}
