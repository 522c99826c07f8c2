//! GreyNoise's wire mapping: `[status][flags][header length][headers][body]` (see `common`).
//! No panic; the report invariants in `common::check`; an answer always has a verdict.

#![no_main]

mod common;

use enrichd_core::{ProviderId, ProviderOutcome};
use enrichd_intel::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(common::Parsed { answer, .. }) = common::parse(data) else {
        return;
    };
    let (now, headers) = (answer.now_secs, answer.headers.clone());
    let result = fuzzing::greynoise(answer);
    common::check(ProviderId::Greynoise, now, &result);
    if let Ok(report) = &result {
        if matches!(
            report.outcome,
            ProviderOutcome::Ok | ProviderOutcome::NotFound
        ) {
            assert!(
                report.verdict.is_some(),
                "a GreyNoise answer without a verdict"
            );
        }
    }
    // The rate-limit hint on its own, for every header block: within now..now+24h.
    let at = fuzzing::resume_at(&headers, now).timestamp();
    let now = fuzzing::now(now).timestamp();
    assert!((now..=now + 24 * 3600).contains(&at));
});
