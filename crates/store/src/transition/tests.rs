//! Table tests of the write's state transitions and the claim's fence.

use super::*;
use chrono::TimeZone;
use enrichd_core::{ProviderFields, ProviderId, ProviderOutcome, Verdict};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

fn lease() -> Lease {
    Lease {
        claimed_at: t0(),
        until: t0() + chrono::Duration::seconds(30),
    }
}

const TTL: Duration = Duration::from_hours(24);

fn good() -> ProviderReport {
    ProviderReport::answer(
        ProviderOutcome::Ok,
        Some(Verdict::Malicious),
        ProviderFields::Feodo {
            listed: true,
            malware_family: Some("QakBot".into()),
        },
        serde_json::json!({"ip_address": "1.2.3.4"}),
    )
}

#[test]
fn errors_keep_the_answer_and_back_off_by_consecutive_failures() {
    let ok = next_provider_state(None, &lease(), &good(), TTL, t0());
    assert_eq!(ok.attempts, 0);
    assert_eq!(ok.next_attempt_at, Some(t0() + chrono::Duration::hours(24)));
    let err = ProviderReport::error(ProviderId::Feodo, "server error 503");
    let e1 = next_provider_state(Some(&ok), &lease(), &err, TTL, t0());
    assert_eq!(e1.attempts, 1);
    assert_eq!(e1.fields, ok.fields);
    assert_eq!(e1.verdict, Some(Verdict::Malicious));
    assert_eq!(
        e1.next_attempt_at,
        Some(t0() + chrono::Duration::minutes(5))
    );
    let e2 = next_provider_state(Some(&e1), &lease(), &err, TTL, t0());
    assert_eq!(e2.attempts, 2);
    assert_eq!(
        e2.next_attempt_at,
        Some(t0() + chrono::Duration::minutes(10))
    );
    let parked = ProviderReport {
        resume_at: Some(t0() + chrono::Duration::hours(3)),
        ..ProviderReport::bare(ProviderId::Feodo, ProviderOutcome::RateLimited)
    };
    let rl = next_provider_state(Some(&e2), &lease(), &parked, TTL, t0());
    assert_eq!(rl.attempts, 2, "rate limits do not advance backoff");
    assert_eq!(rl.next_attempt_at, Some(t0() + chrono::Duration::hours(3)));
    let negative = ProviderReport::answer(
        ProviderOutcome::Ok,
        None,
        ProviderFields::Feodo {
            listed: false,
            malware_family: None,
        },
        serde_json::json!({}),
    );
    let cleared = next_provider_state(Some(&rl), &lease(), &negative, TTL, t0());
    assert_eq!(cleared.verdict, None);
    assert_eq!(cleared.attempts, 0);
    assert!(matches!(
        cleared.fields,
        Some(ProviderFields::Feodo { listed: false, .. })
    ));
}

#[test]
fn ptr_failures_keep_a_good_name_and_negative_answers_clear_it() {
    let named = PtrReport {
        outcome: PtrOutcome::Ok,
        name: Some("dns.google".into()),
        record_ttl: Some(Duration::from_secs(7200)),
        forward_confirmed: None,
    };
    let good = next_ptr_state(&PtrState::default(), &lease(), &named, t0());
    assert_eq!(good.name.as_deref(), Some("dns.google"));
    assert_eq!(good.expires_at, Some(t0() + chrono::Duration::hours(2)));
    let failed = next_ptr_state(
        &good,
        &lease(),
        &PtrReport::without_name(PtrOutcome::Timeout),
        t0(),
    );
    assert_eq!(failed.name.as_deref(), Some("dns.google"));
    assert_eq!(failed.attempts, 1);
    assert_eq!(
        failed.expires_at,
        Some(t0() + chrono::Duration::minutes(15))
    );
    let gone = next_ptr_state(
        &failed,
        &lease(),
        &PtrReport::without_name(PtrOutcome::Nxdomain),
        t0(),
    );
    assert_eq!(gone.name, None);
    assert_eq!(gone.attempts, 0);
}

#[test]
fn a_claim_clears_the_stored_fence_by_at_least_a_microsecond() {
    let us = chrono::Duration::microseconds;
    // (stored `queried_at`, the claim time the write is fenced with)
    let cases = [
        (None, t0()),
        (Some(t0() - us(1)), t0()),
        (Some(t0()), t0() + us(1)),
        (
            Some(t0() + chrono::Duration::seconds(3)),
            t0() + chrono::Duration::seconds(3) + us(1),
        ),
    ];
    for (stored, claimed_at) in cases {
        let fenced = newer_than(lease(), stored);
        assert_eq!(fenced.claimed_at, claimed_at, "stored {stored:?}");
        assert_eq!(fenced.until, lease().until, "the lease ends when it did");
    }
}

#[test]
fn each_ptr_outcome_keeps_replaces_or_clears_the_stored_name() {
    let earlier = t0() - chrono::Duration::days(1);
    let stored = PtrState {
        name: Some("old.example".into()),
        outcome: Some(PtrOutcome::Ok),
        resolved_at: Some(earlier),
        expires_at: Some(earlier),
        attempts: 2,
        queried_at: Some(earlier),
        forward_confirmed: Some(false),
    };
    let long = "a".repeat(300);
    let report = |outcome, name: Option<&str>| PtrReport {
        outcome,
        name: name.map(str::to_owned),
        record_ttl: None,
        forward_confirmed: Some(true),
    };
    let kept = (Some("old.example".to_owned()), Some(earlier), Some(false));
    let cleared = (None, None, None);
    let fresh = |name: &str| (Some(name.to_owned()), Some(t0()), Some(true));
    // (report, expected (name, resolved_at, forward_confirmed), attempts)
    let cases = [
        (
            report(PtrOutcome::Ok, Some("new.example")),
            fresh("new.example"),
            0,
        ),
        (
            report(PtrOutcome::Ok, Some(&long)),
            fresh(&"a".repeat(256)),
            0,
        ),
        (report(PtrOutcome::Ok, None), kept.clone(), 0),
        (report(PtrOutcome::Ok, Some("")), kept.clone(), 0),
        (report(PtrOutcome::Servfail, None), kept.clone(), 3),
        (
            report(PtrOutcome::Timeout, Some("ignored.example")),
            kept.clone(),
            3,
        ),
        (report(PtrOutcome::Disabled, None), kept, 0),
        (report(PtrOutcome::Nxdomain, None), cleared.clone(), 0),
        (
            report(PtrOutcome::InvalidName, Some("bad")),
            cleared.clone(),
            0,
        ),
        (report(PtrOutcome::SkippedNonGlobal, None), cleared, 0),
    ];
    for (report, (name, resolved_at, forward_confirmed), attempts) in cases {
        let next = next_ptr_state(&stored, &lease(), &report, t0());
        let what = format!("{:?} {:?}", report.outcome, report.name);
        assert_eq!(next.name, name, "{what}");
        assert_eq!(next.resolved_at, resolved_at, "{what}");
        assert_eq!(next.forward_confirmed, forward_confirmed, "{what}");
        assert_eq!(next.attempts, attempts, "{what}");
        assert_eq!(next.outcome, Some(report.outcome), "{what}");
        assert_eq!(
            next.queried_at,
            Some(t0()),
            "{what}: the fence is the claim"
        );
        assert_eq!(
            next.expires_at,
            report.outcome.due(attempts, None).at(t0()),
            "{what}"
        );
    }
}

#[test]
fn each_provider_outcome_sets_backoff_and_keeps_or_replaces_the_answer() {
    let stored = next_provider_state(
        Some(&next_provider_state(
            None,
            &lease(),
            &ProviderReport::error(ProviderId::Feodo, "first"),
            TTL,
            t0(),
        )),
        &lease(),
        &ProviderReport::error(ProviderId::Feodo, "second"),
        TTL,
        t0(),
    );
    let stored = ProviderState {
        verdict: Some(Verdict::Malicious),
        fields: good().fields,
        ..stored
    };
    assert_eq!(stored.attempts, 2);
    let not_found = ProviderReport::answer(
        ProviderOutcome::NotFound,
        None,
        ProviderFields::Feodo {
            listed: false,
            malware_family: None,
        },
        serde_json::json!({}),
    );
    let bare = |outcome| ProviderReport::bare(ProviderId::Feodo, outcome);
    // (report, attempts after it, whether its answer replaces the stored one)
    let cases = [
        (good(), 0, true),
        (not_found, 0, true),
        (
            ProviderReport::error(ProviderId::Feodo, "e".repeat(600)),
            3,
            false,
        ),
        (bare(ProviderOutcome::RateLimited), 2, false),
        (bare(ProviderOutcome::SkippedQuota), 2, false),
        (bare(ProviderOutcome::SkippedUnsupported), 2, false),
        (bare(ProviderOutcome::SkippedNonGlobal), 2, false),
    ];
    for (report, attempts, replaced) in cases {
        let next = next_provider_state(Some(&stored), &lease(), &report, TTL, t0());
        let what = format!("{:?}", report.outcome);
        assert_eq!(next.outcome, Some(report.outcome), "{what}");
        assert_eq!(next.attempts, attempts, "{what}");
        assert_eq!(
            next.queried_at,
            Some(t0()),
            "{what}: the fence is the claim"
        );
        assert_eq!(
            next.next_attempt_at,
            report.outcome.due(attempts, TTL, None, None).at(t0()),
            "{what}"
        );
        if replaced {
            assert_eq!(next.fields, report.fields, "{what}");
            assert_eq!(next.verdict, report.verdict, "{what}");
            assert_eq!(next.answered_at, Some(t0()), "{what}");
            assert_eq!(next.last_error, None, "{what}");
        } else {
            assert_eq!(next.fields, stored.fields, "{what}");
            assert_eq!(next.verdict, stored.verdict, "{what}");
            assert_eq!(next.answered_at, stored.answered_at, "{what}");
            assert_eq!(
                next.last_error.as_deref().map(str::len),
                report
                    .error
                    .as_deref()
                    .map(|e| e.len().min(LAST_ERROR_CHARS)),
                "{what}: the error text, cut to its column"
            );
        }
    }
}
