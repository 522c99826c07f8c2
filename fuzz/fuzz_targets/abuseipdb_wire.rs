//! AbuseIPDB's wire mapping and quota headers: `[status][flags][header length][headers][body]`
//! (see `common`). No panic; the report invariants in `common::check`; a 2xx answer is always
//! a report (a bad body is a metered `error` with the 24 h backoff, never a score of 0).

#![no_main]

mod common;

use std::time::Duration;

use enrichd_core::{ProviderFields, ProviderId, ProviderOutcome, Verdict};
use enrichd_intel::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(common::Parsed { answer, .. }) = common::parse(data) else {
        return;
    };
    let (now, status, headers) = (answer.now_secs, answer.status, answer.headers.clone());
    let result = fuzzing::abuseipdb(answer);
    common::check(ProviderId::Abuseipdb, now, &result);
    if (200..=299).contains(&status) {
        let report = result.as_ref().expect("a 2xx answer is a report");
        match report.outcome {
            ProviderOutcome::Ok => {
                let Some(ProviderFields::Abuseipdb { score, .. }) = report.fields else {
                    panic!("ok without columns");
                };
                if report.verdict.is_none() {
                    assert_eq!(score, 0, "no verdict with a score");
                }
                if report.verdict == Some(Verdict::Malicious) {
                    assert!(score >= 75);
                }
                if let Some(reports) = report.raw.get("reports").and_then(|r| r.as_array()) {
                    assert!(reports.len() <= 20, "{} reports kept", reports.len());
                }
            }
            ProviderOutcome::Error => {
                assert_eq!(report.min_backoff, Some(Duration::from_secs(24 * 3600)));
            }
            other => panic!("2xx became {other:?}"),
        }
    }
    let _ = fuzzing::abuseipdb_quota(&headers, now);
});
