//! ThreatFox search answers, the exact-match filter, and the mapping to a report (pure).

use std::net::IpAddr;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use enrichd_core::text::column_text;
use enrichd_core::{
    CanonicalIp, ProviderError, ProviderFields, ProviderOutcome, ProviderReport, Verdict,
};
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use crate::client::resume_at;
use crate::json;

#[derive(Debug, Deserialize)]
struct Answer {
    query_status: String,
    #[serde(default)]
    data: Value,
}

/// The fields we read from one IOC entry; others stay in the raw entry.
#[derive(Debug, Deserialize)]
struct Entry {
    #[serde(default)]
    ioc: Option<String>,
    #[serde(default)]
    threat_type: Option<String>,
    #[serde(default)]
    ioc_type: Option<String>,
    #[serde(default)]
    malware: Option<String>,
    #[serde(default)]
    malware_printable: Option<String>,
}

/// Maps one ThreatFox response for a search of `ip` to a report or a typed failure.
pub(crate) fn report(
    status: u16,
    headers: &HeaderMap,
    body: Result<Vec<u8>, ProviderError>,
    ip: CanonicalIp,
    now: DateTime<Utc>,
) -> Result<ProviderReport, ProviderError> {
    match status {
        200 => {}
        401 => return Err(ProviderError::KeyRejected),
        402 | 429 => {
            return Err(ProviderError::RateLimited {
                resume_at: resume_at(headers, now),
            });
        }
        500..=599 => return Err(ProviderError::Server { status }),
        _ => return Err(ProviderError::Unexpected(format!("http status {status}"))),
    }
    let value = json::parse_object(&body?)?;
    let answer: Answer = json::decode(&value)?;
    match answer.query_status.as_str() {
        "ok" => {}
        "no_result" => return Ok(not_listed()),
        "ratelimited" => {
            return Err(ProviderError::RateLimited {
                resume_at: resume_at(headers, now),
            });
        }
        "unknown_auth_key" => return Err(ProviderError::KeyRejected),
        other => {
            return Err(ProviderError::Unexpected(format!(
                "query_status {}",
                column_text(other, 64)
            )));
        }
    }
    // `ok` with no data has been seen for addresses ThreatFox knows nothing about.
    if answer.data.is_null() {
        return Ok(not_listed());
    }
    let Value::Array(entries) = answer.data else {
        return Err(ProviderError::Decode(format!(
            "expected data to be an array, got {}",
            json::kind(&answer.data)
        )));
    };
    let mut hits = Vec::new();
    let (mut threat_types, mut ioc_types, mut families) = (Vec::new(), Vec::new(), Vec::new());
    for raw in entries {
        let entry: Entry = json::decode(&raw)?;
        if !entry.ioc.as_deref().is_some_and(|ioc| ioc_is(ioc, ip)) {
            continue;
        }
        threat_types.extend(entry.threat_type);
        ioc_types.extend(entry.ioc_type);
        let family = entry
            .malware
            .filter(|m| !m.trim().is_empty())
            .or(entry.malware_printable);
        families.extend(family);
        hits.push(raw);
    }
    if hits.is_empty() {
        return Ok(not_listed());
    }
    Ok(ProviderReport::answer(
        ProviderOutcome::Ok,
        Some(Verdict::Malicious),
        ProviderFields::Threatfox {
            listed: true,
            threat_types: sorted_unique(threat_types),
            ioc_types: sorted_unique(ioc_types),
            malware_families: sorted_unique(families),
        },
        Value::Array(hits),
    ))
}

/// ThreatFox knows nothing about the address: clears any stale positive columns.
fn not_listed() -> ProviderReport {
    ProviderReport::answer(
        ProviderOutcome::NotFound,
        None,
        ProviderFields::Threatfox {
            listed: false,
            threat_types: Vec::new(),
            ioc_types: Vec::new(),
            malware_families: Vec::new(),
        },
        json::empty_object(),
    )
}

fn sorted_unique(mut items: Vec<String>) -> Vec<String> {
    items.retain(|s| !s.is_empty());
    items.sort_unstable();
    items.dedup();
    items
}

/// Whether an IOC is exactly this address: the IP, `ip:port` (`[v6]:port`, or an unbracketed
/// IPv6 whose text before the last `:` is this very address and the rest a port), or a URL
/// whose host is the IP. Compared as parsed addresses, so textual variants of one IPv6 match.
pub(crate) fn ioc_is(ioc: &str, ip: CanonicalIp) -> bool {
    let ioc = ioc.trim();
    if unbracketed_v6_with_port(ioc, ip) {
        return true;
    }
    let host = if let Some((_, rest)) = ioc.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        match split_host_port(host_port) {
            Some((host, _)) => host,
            None => host_port,
        }
    } else if let Some((host, _)) = split_host_port(ioc) {
        host
    } else {
        ioc
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    IpAddr::from_str(host).is_ok_and(|addr| CanonicalIp::from_addr(addr) == ip)
}

/// `2001:db8::1:443` for `2001:db8::1`: ambiguous on its own (it is also an address of its
/// own), so it counts only when the text before the last `:` is exactly the searched address.
fn unbracketed_v6_with_port(ioc: &str, ip: CanonicalIp) -> bool {
    let Some((host, port)) = ioc.rsplit_once(':') else {
        return false;
    };
    !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && host.contains(':')
        && IpAddr::from_str(host).is_ok_and(|addr| CanonicalIp::from_addr(addr) == ip)
}

/// Splits `host:port` / `[v6]:port` when the port is all digits; a bare IPv6 (several colons,
/// no brackets) is not split.
fn split_host_port(text: &str) -> Option<(&str, &str)> {
    let (host, port) = text.rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if host.starts_with('[') {
        return host.ends_with(']').then_some((host, port));
    }
    (!host.contains(':')).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeDelta, TimeZone};
    use reqwest::header::HeaderValue;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
    }

    fn ip(text: &str) -> CanonicalIp {
        CanonicalIp::parse(text).unwrap()
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/threatfox/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(path).unwrap()
    }

    #[test]
    fn exact_match_filter() {
        let v4 = ip("45.155.205.233");
        let v6 = ip("2001:db8::1");
        let cases = [
            ("45.155.205.233", v4, true),
            ("45.155.205.233:443", v4, true),
            ("http://45.155.205.233/x86.bin", v4, true),
            ("https://45.155.205.233:8443/a?b#c", v4, true),
            ("http://user:pw@45.155.205.233/", v4, true),
            ("tcp://45.155.205.233", v4, true),
            ("145.155.205.233:8080", v4, false),
            ("45.155.205.2", v4, false),
            ("45.155.205.233.evil.example", v4, false),
            ("http://45.155.205.233.evil.example/", v4, false),
            ("http://evil.example/45.155.205.233", v4, false),
            ("45.155.205.233:port", v4, false),
            ("2001:db8::1", v6, true),
            ("[2001:db8::1]:443", v6, true),
            ("[2001:DB8:0::1]:443", v6, true),
            ("http://[2001:db8::1]:8080/p", v6, true),
            ("2001:db8::10", v6, false),
            ("[2001:db8::1]", v6, true),
            // Unbracketed: the text before the last `:` must be the address itself.
            ("2001:db8::1:443", v6, true),
            ("2001:0db8::1:8080", v6, true),
            ("2001:db8::1:99999x", v6, false),
            ("2001:db8::2:443", v6, false),
            ("2001:db8::1:443", ip("2001:db8::1:443"), true),
            ("2001:db8::1:443", ip("2001:db8::"), false),
        ];
        for (ioc, target, expected) in cases {
            assert_eq!(ioc_is(ioc, target), expected, "{ioc}");
        }
    }

    #[test]
    fn mixed_matches_keep_only_this_address() {
        let r = report(
            200,
            &HeaderMap::new(),
            Ok(fixture("ok_mixed_matches.json")),
            ip("45.155.205.233"),
            now(),
        )
        .unwrap();
        assert_eq!(r.outcome, ProviderOutcome::Ok);
        assert_eq!(r.verdict, Some(Verdict::Malicious));
        assert_eq!(
            r.fields,
            Some(ProviderFields::Threatfox {
                listed: true,
                threat_types: vec!["botnet_cc".into(), "payload_delivery".into()],
                ioc_types: vec!["ip:port".into(), "url".into()],
                malware_families: vec!["elf.mirai".into(), "win.cobalt_strike".into()],
            })
        );
        let raw = r.raw.as_array().unwrap();
        assert_eq!(raw.len(), 2);
        assert_eq!(raw[0]["id"], "1290001");
        assert_eq!(raw[1]["id"], "1290002");
    }

    #[test]
    fn malware_falls_back_to_printable_name() {
        let body = json!({"query_status": "ok", "data": [
            {"ioc": "45.155.205.233", "threat_type": "botnet_cc", "ioc_type": "ip:port",
             "malware": null, "malware_printable": "Unknown malware"}
        ]});
        let r = report(
            200,
            &HeaderMap::new(),
            Ok(body.to_string().into_bytes()),
            ip("45.155.205.233"),
            now(),
        )
        .unwrap();
        let Some(ProviderFields::Threatfox {
            malware_families, ..
        }) = r.fields
        else {
            panic!("threatfox fields");
        };
        assert_eq!(malware_families, vec!["Unknown malware".to_owned()]);

        let empty = json!({"query_status": "ok", "data": [
            {"ioc": "45.155.205.233:443", "threat_type": "botnet_cc", "ioc_type": "ip:port",
             "malware": "  ", "malware_printable": "Cobalt Strike"}
        ]});
        let r = report(
            200,
            &HeaderMap::new(),
            Ok(empty.to_string().into_bytes()),
            ip("45.155.205.233"),
            now(),
        )
        .unwrap();
        let Some(ProviderFields::Threatfox {
            malware_families, ..
        }) = r.fields
        else {
            panic!("threatfox fields");
        };
        assert_eq!(malware_families, vec!["Cobalt Strike".to_owned()]);
    }

    #[test]
    fn ok_with_null_data_is_not_listed() {
        let body = json!({"query_status": "ok", "data": null});
        let r = report(
            200,
            &HeaderMap::new(),
            Ok(body.to_string().into_bytes()),
            ip("45.155.205.233"),
            now(),
        )
        .unwrap();
        assert_eq!(r.outcome, ProviderOutcome::NotFound);
        assert_eq!(r.verdict, None);
    }

    #[test]
    fn no_result_and_substring_only_are_not_listed() {
        let only_substring = json!({"query_status": "ok", "data": [
            {"ioc": "145.155.205.233:8080", "threat_type": "botnet_cc", "ioc_type": "ip:port", "malware": "win.sliver"}
        ]})
        .to_string()
        .into_bytes();
        for body in [fixture("no_result.json"), only_substring] {
            let r = report(
                200,
                &HeaderMap::new(),
                Ok(body),
                ip("45.155.205.233"),
                now(),
            )
            .unwrap();
            assert_eq!(r.outcome, ProviderOutcome::NotFound);
            assert_eq!(r.verdict, None);
            assert_eq!(
                r.fields,
                Some(ProviderFields::Threatfox {
                    listed: false,
                    threat_types: vec![],
                    ioc_types: vec![],
                    malware_families: vec![],
                })
            );
            assert_eq!(*r.raw, json!({}));
        }
    }

    #[test]
    fn failures_are_typed() {
        let mut retry = HeaderMap::new();
        retry.insert("retry-after", HeaderValue::from_static("30"));
        let park = Err(ProviderError::RateLimited {
            resume_at: now() + TimeDelta::seconds(30),
        });
        let cases = [
            (200, fixture("ratelimited_402.json"), park.clone()),
            (402, fixture("ratelimited_402.json"), park.clone()),
            (429, b"{}".to_vec(), park),
            (
                200,
                fixture("unknown_auth_key.json"),
                Err(ProviderError::KeyRejected),
            ),
            (401, b"{}".to_vec(), Err(ProviderError::KeyRejected)),
            (
                200,
                fixture("illegal_search.json"),
                Err(ProviderError::Unexpected(
                    "query_status illegal_search".into(),
                )),
            ),
            (
                503,
                b"{}".to_vec(),
                Err(ProviderError::Server { status: 503 }),
            ),
            (
                404,
                b"{}".to_vec(),
                Err(ProviderError::Unexpected("http status 404".into())),
            ),
        ];
        for (status, body, expected) in cases {
            let got =
                report(status, &retry, Ok(body), ip("45.155.205.233"), now()).map(|r| r.outcome);
            assert_eq!(got, expected, "status {status}");
        }
    }

    #[test]
    fn hostile_bodies_are_decode_errors() {
        for body in [
            &b"<html>maintenance</html>"[..],
            b"{\"query_status\":\"ok\",\"data\":[{\"ioc\":",
            b"{\"data\":[]}",
            b"{\"query_status\":\"ok\",\"data\":\"nope\"}",
            b"{\"query_status\":\"ok\",\"data\":[{\"ioc\":5}]}",
            b"{\"query_status\":\"ok\",\"data\":[\"45.155.205.233\"]}",
        ] {
            let got = report(
                200,
                &HeaderMap::new(),
                Ok(body.to_vec()),
                ip("45.155.205.233"),
                now(),
            );
            assert!(
                matches!(got, Err(ProviderError::Decode(_))),
                "{}: {got:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
