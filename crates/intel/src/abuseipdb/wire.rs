//! AbuseIPDB check answers and their mapping to a report (pure).

use chrono::{DateTime, Utc};
use enrichd_core::{
    ProviderError, ProviderFields, ProviderId, ProviderOutcome, ProviderReport, Verdict,
};
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use super::METERED_ERROR_BACKOFF;
use crate::client::resume_at;
use crate::json;

/// `abuseipdb_raw` keeps only this many reports, the newest.
const KEPT_REPORTS: usize = 20;

#[derive(Debug, Deserialize)]
struct Envelope {
    data: Value,
}

/// The fields we read from `data`; others are kept in the raw body but not interpreted.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Data {
    /// Must be an integer: a string or a float is a decode error, never a score of 0.
    abuse_confidence_score: i64,
    #[serde(default)]
    total_reports: Option<u64>,
    #[serde(default)]
    reports: Option<Vec<Report>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    #[serde(default)]
    categories: Option<Vec<i64>>,
    #[serde(default)]
    reported_at: Option<String>,
}

/// Maps one AbuseIPDB response to a report or a typed failure.
pub(crate) fn report(
    status: u16,
    headers: &HeaderMap,
    body: Result<Vec<u8>, ProviderError>,
    now: DateTime<Utc>,
) -> Result<ProviderReport, ProviderError> {
    match status {
        200..=299 => Ok(metered(body).unwrap_or_else(|err| {
            let mut report = ProviderReport::error(ProviderId::Abuseipdb, err.to_string());
            report.min_backoff = Some(METERED_ERROR_BACKOFF);
            report
        })),
        401 | 403 => Err(ProviderError::KeyRejected),
        429 => Err(ProviderError::RateLimited {
            resume_at: resume_at(headers, now),
        }),
        500..=599 => Err(ProviderError::Server { status }),
        _ => Err(ProviderError::Unexpected(format!("http status {status}"))),
    }
}

fn metered(body: Result<Vec<u8>, ProviderError>) -> Result<ProviderReport, ProviderError> {
    let value = json::parse_object(&body?)?;
    let Envelope { data: mut raw } = json::decode(&value)?;
    if !raw.is_object() {
        return Err(ProviderError::Decode(format!(
            "expected data to be an object, got {}",
            json::kind(&raw)
        )));
    }
    let data: Data = json::decode(&raw)?;
    let score = i32::try_from(data.abuse_confidence_score)
        .ok()
        .filter(|s| (0..=100).contains(s))
        .ok_or_else(|| {
            ProviderError::Decode(format!(
                "abuseConfidenceScore {} outside 0..=100",
                data.abuse_confidence_score
            ))
        })?;
    let mut categories: Vec<i64> = data
        .reports
        .iter()
        .flatten()
        .filter_map(|r| r.categories.as_ref())
        .flatten()
        .copied()
        .collect();
    categories.sort_unstable();
    categories.dedup();

    if let Some(reports) = raw.get_mut("reports").and_then(Value::as_array_mut) {
        keep_newest(reports, data.reports.as_deref().unwrap_or_default());
    }

    let verdict = match score {
        75.. => Some(Verdict::Malicious),
        25..=74 => Some(Verdict::Suspicious),
        1..=24 => Some(Verdict::Benign),
        // Silence about an address that attacked a honeypot proves nothing.
        _ if data.total_reports.unwrap_or(0) == 0 => None,
        _ => Some(Verdict::Benign),
    };
    Ok(ProviderReport::answer(
        ProviderOutcome::Ok,
        verdict,
        ProviderFields::Abuseipdb { score, categories },
        raw,
    ))
}

/// Cuts `reports` to the [`KEPT_REPORTS`] newest, newest first. `parsed` holds the same
/// reports, decoded. Reports without a readable time sort last; ties keep their order.
fn keep_newest(reports: &mut Vec<Value>, parsed: &[Report]) {
    let mut ranked: Vec<(Option<DateTime<Utc>>, Value)> = std::mem::take(reports)
        .into_iter()
        .enumerate()
        .map(|(i, report)| {
            let at = parsed
                .get(i)
                .and_then(|r| r.reported_at.as_deref())
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc));
            (at, report)
        })
        .collect();
    ranked.sort_by_key(|r| std::cmp::Reverse(r.0));
    ranked.truncate(KEPT_REPORTS);
    *reports = ranked.into_iter().map(|(_, report)| report).collect();
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

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/abuseipdb/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(path).unwrap()
    }

    fn ok(body: &[u8]) -> ProviderReport {
        report(200, &HeaderMap::new(), Ok(body.to_vec()), now()).unwrap()
    }

    fn with_score(score: i64, total: u64) -> Vec<u8> {
        json!({"data": {"abuseConfidenceScore": score, "totalReports": total}})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn fixtures_map_to_columns() {
        let r = ok(&fixture("ok_verbose_malicious.json"));
        assert_eq!(r.outcome, ProviderOutcome::Ok);
        assert_eq!(r.verdict, Some(Verdict::Malicious));
        assert_eq!(
            r.fields,
            Some(ProviderFields::Abuseipdb {
                score: 100,
                categories: vec![14, 18, 22]
            })
        );
        assert_eq!(r.raw["isp"], "Example Hosting BV", "raw is the data object");
        assert_eq!(r.raw["reports"].as_array().unwrap().len(), 2);

        let r = ok(&fixture("ok_suspicious.json"));
        assert_eq!(r.verdict, Some(Verdict::Suspicious));
        assert_eq!(
            r.fields,
            Some(ProviderFields::Abuseipdb {
                score: 57,
                categories: vec![]
            })
        );

        let r = ok(&fixture("ok_never_reported.json"));
        assert_eq!(r.verdict, None, "0 with no reports is no opinion");
        assert_eq!(
            r.fields,
            Some(ProviderFields::Abuseipdb {
                score: 0,
                categories: vec![]
            })
        );
    }

    #[test]
    fn verdict_thresholds() {
        let cases = [
            (100, 5, Some(Verdict::Malicious)),
            (75, 5, Some(Verdict::Malicious)),
            (74, 5, Some(Verdict::Suspicious)),
            (25, 5, Some(Verdict::Suspicious)),
            (24, 5, Some(Verdict::Benign)),
            (1, 5, Some(Verdict::Benign)),
            (1, 0, Some(Verdict::Benign)),
            (0, 3, Some(Verdict::Benign)),
            (0, 0, None),
        ];
        for (score, total, verdict) in cases {
            assert_eq!(
                ok(&with_score(score, total)).verdict,
                verdict,
                "{score}/{total}"
            );
        }
        let missing_total = br#"{"data":{"abuseConfidenceScore":0}}"#;
        assert_eq!(ok(missing_total).verdict, None);
    }

    #[test]
    fn raw_keeps_the_twenty_newest_reports_and_categories_cover_all() {
        let reports: Vec<Value> = (0..30)
            .map(|day| {
                json!({
                    "reportedAt": format!("2026-04-{:02}T00:00:00+00:00", day + 1),
                    "categories": [day % 7, 30 - day % 3],
                    "comment": format!("report {day}")
                })
            })
            .collect();
        let body =
            json!({"data": {"abuseConfidenceScore": 90, "totalReports": 30, "reports": reports}});
        let r = ok(body.to_string().as_bytes());
        let kept = r.raw["reports"].as_array().unwrap();
        assert_eq!(kept.len(), 20);
        assert_eq!(kept[0]["comment"], "report 29", "newest first");
        assert_eq!(kept[19]["comment"], "report 10");
        let Some(ProviderFields::Abuseipdb { categories, .. }) = r.fields else {
            panic!("abuseipdb fields");
        };
        assert_eq!(categories, vec![0, 1, 2, 3, 4, 5, 6, 28, 29, 30]);
    }

    #[test]
    fn reports_in_any_order_and_offset_are_kept_newest_first() {
        // 25 reports, shuffled, some in a non-UTC offset, one without a readable time.
        let mut reports: Vec<Value> = (0..24)
            .map(|hour| {
                let instant = Utc.with_ymd_and_hms(2026, 4, 10, hour, 30, 0).unwrap();
                let at = if hour % 2 == 0 {
                    instant.to_rfc3339()
                } else {
                    let east = chrono::FixedOffset::east_opt(2 * 3600).unwrap();
                    instant.with_timezone(&east).to_rfc3339()
                };
                json!({"reportedAt": at, "comment": format!("hour {hour}")})
            })
            .collect();
        reports.push(json!({"reportedAt": "yesterday", "comment": "no time"}));
        reports.reverse();
        reports.swap(3, 17);
        reports.swap(0, 11);
        let body =
            json!({"data": {"abuseConfidenceScore": 80, "totalReports": 25, "reports": reports}});
        let r = ok(body.to_string().as_bytes());
        let kept: Vec<&str> = r.raw["reports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["comment"].as_str().unwrap())
            .collect();
        let expected: Vec<String> = (4..24).rev().map(|h| format!("hour {h}")).collect();
        assert_eq!(kept, expected);
    }

    #[test]
    fn bad_score_is_a_metered_error_never_zero() {
        for body in [
            fixture("bad_score_type.json"),
            br#"{"data":{"abuseConfidenceScore":null}}"#.to_vec(),
            br#"{"data":{"abuseConfidenceScore":57.5}}"#.to_vec(),
            br#"{"data":{"abuseConfidenceScore":101}}"#.to_vec(),
            br#"{"data":{"totalReports":1}}"#.to_vec(),
            br#"{"data":[]}"#.to_vec(),
            br#"{"data":{"abuseConfidenceScore":5,"reports":[{"categories":"x"}]}}"#.to_vec(),
            b"<html>oops</html>".to_vec(),
            b"{\"data\":{\"abuseConfi".to_vec(),
        ] {
            let r = ok(&body);
            assert_eq!(
                r.outcome,
                ProviderOutcome::Error,
                "{}",
                String::from_utf8_lossy(&body)
            );
            assert!(r.fields.is_none());
            assert_eq!(r.verdict, None);
            assert_eq!(r.min_backoff, Some(METERED_ERROR_BACKOFF));
            assert!(r.error.unwrap().starts_with("undecodable response"));
        }
        let cut = report(
            200,
            &HeaderMap::new(),
            Err(ProviderError::TooLarge { limit_bytes: 10 }),
            now(),
        )
        .unwrap();
        assert_eq!(cut.outcome, ProviderOutcome::Error);
        assert_eq!(cut.min_backoff, Some(METERED_ERROR_BACKOFF));
    }

    #[test]
    fn failures_are_typed() {
        let mut limited = HeaderMap::new();
        let reset = now().timestamp() + 7200;
        limited.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        limited.insert(
            "x-ratelimit-reset",
            HeaderValue::from_str(&reset.to_string()).unwrap(),
        );
        let cases = [
            (
                429,
                "daily_limit_429.json",
                Err(ProviderError::RateLimited {
                    resume_at: now() + TimeDelta::hours(2),
                }),
            ),
            (
                401,
                "unauthorized_401.json",
                Err(ProviderError::KeyRejected),
            ),
            (
                422,
                "invalid_ip_422.json",
                Err(ProviderError::Unexpected("http status 422".into())),
            ),
            (
                502,
                "invalid_ip_422.json",
                Err(ProviderError::Server { status: 502 }),
            ),
        ];
        for (status, file, expected) in cases {
            let got = report(status, &limited, Ok(fixture(file)), now());
            assert_eq!(got, expected, "{file}");
        }
    }
}
