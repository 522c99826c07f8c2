//! GreyNoise community answers and their mapping to a report (pure).

use chrono::{DateTime, Utc};
use enrichd_core::text::column_text;
use enrichd_core::{ProviderError, ProviderFields, ProviderOutcome, ProviderReport, Verdict};
use reqwest::header::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use crate::client::resume_at;
use crate::json;

/// `greynoise_classification` is VARCHAR(32).
const CLASSIFICATION_CHARS: usize = 32;
/// `greynoise_name` is VARCHAR(128).
const NAME_CHARS: usize = 128;

/// The fields we read from a 200 answer; others are ignored.
#[derive(Debug, Deserialize)]
struct Community {
    /// A wrong type here is a decode error: it is the answer's main fact.
    #[serde(default)]
    classification: Option<String>,
    /// Kept only when a non-empty string (SPEC §7), so any type is tolerated.
    #[serde(default)]
    name: Value,
    /// Kept only when a list of strings, so any type is tolerated.
    #[serde(default)]
    tags: Value,
}

/// Maps one GreyNoise response to a report or a typed failure.
pub(crate) fn report(
    status: u16,
    headers: &HeaderMap,
    body: Result<Vec<u8>, ProviderError>,
    now: DateTime<Utc>,
) -> Result<ProviderReport, ProviderError> {
    match status {
        200 => {
            let raw = json::parse_object(&body?)?;
            let answer: Community = json::decode(&raw)?;
            let classification = answer
                .classification
                .map_or_else(|| "unknown".to_owned(), |c| c.trim().to_lowercase());
            let verdict = Verdict::from_label(&classification).unwrap_or(Verdict::Unknown);
            let name = match &answer.name {
                Value::String(s) if !s.trim().is_empty() => Some(column_text(s, NAME_CHARS)),
                _ => None,
            };
            let tags = match &answer.tags {
                Value::Array(items) if items.iter().all(Value::is_string) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
                _ => Vec::new(),
            };
            Ok(ProviderReport::answer(
                ProviderOutcome::Ok,
                Some(verdict),
                ProviderFields::Greynoise {
                    classification: column_text(&classification, CLASSIFICATION_CHARS),
                    name,
                    tags,
                },
                raw,
            ))
        }
        404 => {
            // The 404 body is informative only; a garbled one does not change the answer.
            let raw = body
                .ok()
                .and_then(|b| json::parse_object(&b).ok())
                .unwrap_or_else(json::empty_object);
            Ok(ProviderReport::answer(
                ProviderOutcome::NotFound,
                Some(Verdict::Unknown),
                ProviderFields::Greynoise {
                    classification: "unknown".to_owned(),
                    name: None,
                    tags: Vec::new(),
                },
                raw,
            ))
        }
        400 => Ok(ProviderReport::bare(
            enrichd_core::ProviderId::Greynoise,
            ProviderOutcome::SkippedUnsupported,
        )),
        401 | 403 => Err(ProviderError::KeyRejected),
        429 => Err(ProviderError::RateLimited {
            resume_at: resume_at(headers, now),
        }),
        500..=599 => Err(ProviderError::Server { status }),
        _ => Err(ProviderError::Unexpected(format!("http status {status}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeDelta, TimeZone};
    use reqwest::header::HeaderValue;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/greynoise/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(path).unwrap()
    }

    fn fields(classification: &str, name: Option<&str>, tags: &[&str]) -> ProviderFields {
        ProviderFields::Greynoise {
            classification: classification.into(),
            name: name.map(Into::into),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    #[test]
    fn answers_map_to_columns_and_verdicts() {
        let cases = [
            (
                200,
                "ok_benign.json",
                ProviderOutcome::Ok,
                Verdict::Benign,
                fields("benign", Some("Censys"), &[]),
            ),
            (
                200,
                "ok_malicious.json",
                ProviderOutcome::Ok,
                Verdict::Malicious,
                fields("malicious", Some("unknown"), &[]),
            ),
            (
                200,
                "ok_with_tags.json",
                ProviderOutcome::Ok,
                Verdict::Malicious,
                fields(
                    "malicious",
                    Some("Tor"),
                    &["tor_exit_node", "ssh_bruteforcer"],
                ),
            ),
            (
                404,
                "not_found_404.json",
                ProviderOutcome::NotFound,
                Verdict::Unknown,
                fields("unknown", None, &[]),
            ),
        ];
        for (status, file, outcome, verdict, expected) in cases {
            let body = fixture(file);
            let report = report(status, &HeaderMap::new(), Ok(body.clone()), now()).unwrap();
            assert_eq!(report.outcome, outcome, "{file}");
            assert_eq!(report.verdict, Some(verdict), "{file}");
            assert_eq!(report.fields, Some(expected), "{file}");
            let raw: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(*report.raw, raw, "{file}: raw keeps the body");
        }
    }

    #[test]
    fn tolerant_fields() {
        let cases: &[(&str, ProviderFields, Verdict)] = &[
            ("{}", fields("unknown", None, &[]), Verdict::Unknown),
            (
                r#"{"classification":"MALICIOUS","name":"","tags":"x"}"#,
                fields("malicious", None, &[]),
                Verdict::Malicious,
            ),
            (
                r#"{"classification":"Suspicious","name":7,"tags":["a",1]}"#,
                fields("suspicious", None, &[]),
                Verdict::Suspicious,
            ),
            (
                r#"{"classification":"odd-new-label","name":null,"tags":[],"extra":{}}"#,
                fields("odd-new-label", None, &[]),
                Verdict::Unknown,
            ),
        ];
        for (body, expected, verdict) in cases {
            let report =
                report(200, &HeaderMap::new(), Ok(body.as_bytes().to_vec()), now()).unwrap();
            assert_eq!(report.fields.as_ref(), Some(expected), "{body}");
            assert_eq!(report.verdict, Some(*verdict), "{body}");
        }
    }

    #[test]
    fn failures_are_typed() {
        let mut retry = HeaderMap::new();
        retry.insert("retry-after", HeaderValue::from_static("600"));
        let park = now() + TimeDelta::seconds(600);
        let cases: Vec<(
            u16,
            &HeaderMap,
            &str,
            Result<ProviderOutcome, ProviderError>,
        )> = vec![
            (
                429,
                &retry,
                "rate_limited_429.json",
                Err(ProviderError::RateLimited { resume_at: park }),
            ),
            (
                400,
                &retry,
                "bad_request_400.json",
                Ok(ProviderOutcome::SkippedUnsupported),
            ),
            (401, &retry, "{}", Err(ProviderError::KeyRejected)),
            (403, &retry, "{}", Err(ProviderError::KeyRejected)),
            (
                503,
                &retry,
                "{}",
                Err(ProviderError::Server { status: 503 }),
            ),
            (
                418,
                &retry,
                "{}",
                Err(ProviderError::Unexpected("http status 418".into())),
            ),
        ];
        for (status, headers, body, expected) in cases {
            let body = if body.starts_with('{') {
                body.as_bytes().to_vec()
            } else {
                fixture(body)
            };
            let got = report(status, headers, Ok(body), now()).map(|r| r.outcome);
            assert_eq!(got, expected, "status {status}");
        }
    }

    #[test]
    fn hostile_bodies_are_decode_errors() {
        for body in [
            &b"<html><body>Bad gateway</body></html>"[..],
            b"{\"classification\": \"mal",
            b"[\"benign\"]",
            b"{\"classification\": 5}",
            b"",
        ] {
            let got = report(200, &HeaderMap::new(), Ok(body.to_vec()), now());
            assert!(
                matches!(got, Err(ProviderError::Decode(_))),
                "{body:?}: {got:?}"
            );
        }
    }
}
