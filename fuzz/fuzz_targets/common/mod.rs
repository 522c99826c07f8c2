//! Shared by the provider targets: how an input becomes an HTTP answer, and the invariants
//! every provider report must keep.

#![allow(dead_code)]

use enrichd_core::{ProviderError, ProviderFields, ProviderId, ProviderReport};
use enrichd_intel::fuzzing::Answer;
use serde_json::Value;

/// Statuses worth trying, picked by the first input byte: every branch of the mappings plus
/// odd ones a broken proxy could produce.
const STATUSES: [u16; 24] = [
    200,
    404,
    429,
    401,
    403,
    402,
    400,
    500,
    503,
    599,
    201,
    204,
    299,
    300,
    304,
    422,
    499,
    100,
    0,
    600,
    999,
    199,
    418,
    u16::MAX,
];

/// A plausible clock and two edges, picked by the second input byte.
const CLOCKS: [i64; 3] = [1_795_000_000, 0, 4_102_444_800];

/// Errors a body download can end in (the client's, never the parser's).
fn body_error(selector: u8) -> ProviderError {
    match selector % 3 {
        0 => ProviderError::Timeout(std::time::Duration::from_secs(5)),
        1 => ProviderError::TooLarge {
            limit_bytes: 1 << 20,
        },
        _ => ProviderError::Transport("connection reset".into()),
    }
}

/// The input layout (seeds in `fuzz/seeds/*_wire/` follow it):
/// `[status][flags][header length n][n header bytes: "name: value\n"…][body…]`.
/// `flags`: bits 0–1 pick the clock, bit 2 makes the body an error, bits 3–7 are the
/// target's own (ThreatFox: which address was searched).
pub struct Parsed {
    pub answer: Answer,
    pub flags: u8,
}

pub fn parse(data: &[u8]) -> Option<Parsed> {
    let (&status, rest) = data.split_first()?;
    let (&flags, rest) = rest.split_first()?;
    let (&header_len, rest) = rest.split_first()?;
    let header_len = usize::from(header_len).min(rest.len());
    let (headers, body) = rest.split_at(header_len);
    let body = if flags & 0b100 == 0 {
        Ok(body.to_vec())
    } else {
        Err(body_error(flags >> 3))
    };
    Some(Parsed {
        answer: Answer {
            status: STATUSES[usize::from(status) % STATUSES.len()],
            headers: headers.to_vec(),
            body,
            now_secs: CLOCKS[usize::from(flags & 0b11) % CLOCKS.len()],
        },
        flags,
    })
}

/// Longest failure reason we accept: reasons are logged and stored, never a body dump.
const MAX_REASON_CHARS: usize = 256;

/// The invariants every provider's mapping keeps, whatever the answer.
pub fn check(provider: ProviderId, now_secs: i64, result: &Result<ProviderReport, ProviderError>) {
    match result {
        Ok(report) => check_report(provider, report),
        Err(err) => {
            let reason = err.to_string();
            assert!(
                reason.chars().count() <= MAX_REASON_CHARS,
                "reason too long: {} chars",
                reason.chars().count()
            );
            if let ProviderError::RateLimited { resume_at } = err {
                let now = enrichd_intel::fuzzing::now(now_secs).timestamp();
                let at = resume_at.timestamp();
                assert!(
                    (now..=now + 24 * 3600).contains(&at),
                    "park outside now..now+24h: {at} vs {now}"
                );
            }
        }
    }
}

fn check_report(provider: ProviderId, report: &ProviderReport) {
    assert_eq!(report.provider, provider);
    // Columns exactly for answers; an error has no verdict, no columns and a short reason.
    assert_eq!(
        report.fields.is_some(),
        report.outcome.is_answer(),
        "{report:?}"
    );
    if let Some(fields) = &report.fields {
        assert_eq!(fields.provider(), provider);
        check_fields(fields);
    }
    if report.outcome.is_failure() {
        assert_eq!(report.verdict, None, "an error with a verdict: {report:?}");
        let reason = report.error.as_deref().expect("an error without a reason");
        assert!(reason.chars().count() <= MAX_REASON_CHARS);
    } else {
        assert_eq!(report.error, None);
    }
    // The raw body goes into a PostgreSQL JSON column, which refuses \u0000.
    assert!(!has_nul(&report.raw), "NUL in the stored raw body");
}

fn check_fields(fields: &ProviderFields) {
    let no_nul = |s: &str| assert!(!s.contains('\0'), "NUL in a column: {s:?}");
    match fields {
        ProviderFields::Greynoise {
            classification,
            name,
            tags,
        } => {
            assert!(classification.chars().count() <= 32);
            no_nul(classification);
            if let Some(name) = name {
                assert!(name.chars().count() <= 128);
                no_nul(name);
            }
            tags.iter().for_each(|t| no_nul(t));
        }
        ProviderFields::Abuseipdb { score, categories } => {
            assert!((0..=100).contains(score), "score {score}");
            assert!(
                categories.windows(2).all(|w| w[0] < w[1]),
                "categories not sorted unique"
            );
        }
        ProviderFields::Feodo { malware_family, .. } => {
            if let Some(family) = malware_family {
                assert!(!family.is_empty() && family.chars().count() <= 64);
                no_nul(family);
            }
        }
        ProviderFields::Threatfox {
            threat_types,
            ioc_types,
            malware_families,
            ..
        } => {
            for list in [threat_types, ioc_types, malware_families] {
                assert!(
                    list.windows(2).all(|w| w[0] < w[1]),
                    "not sorted unique: {list:?}"
                );
                assert!(list.iter().all(|s| !s.is_empty()), "empty entry: {list:?}");
                list.iter().for_each(|s| no_nul(s));
            }
        }
    }
}

pub fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}
