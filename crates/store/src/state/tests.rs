//! Tests of the merge of stored state into `attacker_intel` columns and the payload.

use super::*;
use chrono::TimeZone;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

fn answered(
    provider: ProviderId,
    verdict: Option<Verdict>,
    fields: ProviderFields,
) -> ProviderState {
    ProviderState {
        provider,
        outcome: Some(ProviderOutcome::Ok),
        verdict,
        fields: Some(fields),
        raw: Some(serde_json::json!({"k": 1}).into()),
        answered_at: Some(now()),
        queried_at: Some(now()),
        next_attempt_at: Some(now() + chrono::Duration::hours(24)),
        attempts: 0,
        last_error: None,
    }
}

fn ctx(providers: &[ProviderId]) -> ApplyContext {
    ApplyContext {
        providers: providers.to_vec(),
        ..ApplyContext::default()
    }
}

#[test]
fn merges_every_stored_answer_and_aggregates_them() {
    let states = [
        answered(
            ProviderId::Greynoise,
            Some(Verdict::Benign),
            ProviderFields::Greynoise {
                classification: "benign".into(),
                name: Some("x".repeat(300)),
                tags: vec!["Scanner".into()],
            },
        ),
        answered(
            ProviderId::Abuseipdb,
            Some(Verdict::Malicious),
            ProviderFields::Abuseipdb {
                score: 90,
                categories: vec![14, 18],
            },
        ),
    ];
    let m = merge(
        "1.2.3.4",
        StoredScope::Global,
        &states,
        &PtrState::default(),
        &ctx(&[ProviderId::Greynoise, ProviderId::Abuseipdb]),
        now(),
    );
    assert_eq!(m.columns.aggregate_verdict.as_deref(), Some("malicious"));
    assert_eq!(
        m.columns.greynoise_name.as_ref().map(|n| n.chars().count()),
        Some(128)
    );
    assert_eq!(m.payload.providers, ["greynoise", "abuseipdb"]);
    assert_eq!(m.payload.abuseipdb_categories, [14, 18]);
    assert_eq!(m.payload.greynoise_tags, ["Scanner"]);
    assert_eq!(m.columns.expires_at, now() + chrono::Duration::hours(24));
    assert_eq!(m.payload.provider_outcomes.len(), 2);
}

#[test]
fn an_error_keeps_the_earlier_answer_and_brings_expiry_forward() {
    let mut state = answered(
        ProviderId::Feodo,
        Some(Verdict::Malicious),
        ProviderFields::Feodo {
            listed: true,
            malware_family: Some("QakBot".into()),
        },
    );
    state.outcome = Some(ProviderOutcome::Error);
    state.next_attempt_at = Some(now() + chrono::Duration::minutes(5));
    let states = [state];
    let m = merge(
        "1.2.3.4",
        StoredScope::Global,
        &states,
        &PtrState::default(),
        &ctx(&[ProviderId::Feodo]),
        now(),
    );
    assert_eq!(m.columns.feodo_listed, Some(true));
    assert_eq!(m.payload.provider_outcomes["feodo"], "error");
    assert_eq!(m.columns.expires_at, now() + chrono::Duration::minutes(5));
}

#[test]
fn unasked_providers_are_due_now_and_skips_never_are() {
    let mut skipped = answered(
        ProviderId::Greynoise,
        None,
        ProviderFields::Feodo {
            listed: false,
            malware_family: None,
        },
    );
    skipped.outcome = Some(ProviderOutcome::SkippedUnsupported);
    skipped.fields = None;
    skipped.next_attempt_at = None;
    let only_skipped = merge(
        "2001:4860::1",
        StoredScope::Global,
        std::slice::from_ref(&skipped),
        &PtrState::default(),
        &ctx(&[ProviderId::Greynoise]),
        now(),
    );
    assert_eq!(
        only_skipped.columns.expires_at,
        now() + chrono::Duration::hours(24)
    );
    assert_eq!(only_skipped.columns.aggregate_verdict, None);
    let with_unasked = merge(
        "2001:4860::1",
        StoredScope::Global,
        std::slice::from_ref(&skipped),
        &PtrState::default(),
        &ctx(&[ProviderId::Greynoise, ProviderId::Threatfox]),
        now(),
    );
    assert_eq!(with_unasked.columns.expires_at, now());
}

#[test]
fn a_provider_turned_off_no_longer_counts() {
    let states = [
        answered(
            ProviderId::Greynoise,
            Some(Verdict::Benign),
            ProviderFields::Greynoise {
                classification: "benign".into(),
                name: None,
                tags: vec![],
            },
        ),
        answered(
            ProviderId::Abuseipdb,
            Some(Verdict::Malicious),
            ProviderFields::Abuseipdb {
                score: 100,
                categories: vec![18],
            },
        ),
    ];
    let both = merge(
        "1.2.3.4",
        StoredScope::Global,
        &states,
        &PtrState::default(),
        &ctx(&[ProviderId::Greynoise, ProviderId::Abuseipdb]),
        now(),
    );
    assert_eq!(both.payload.aggregate_verdict.as_deref(), Some("malicious"));
    let off = merge(
        "1.2.3.4",
        StoredScope::Global,
        &states,
        &PtrState::default(),
        &ctx(&[ProviderId::Greynoise]),
        now(),
    );
    assert_eq!(off.payload.aggregate_verdict.as_deref(), Some("benign"));
    assert_eq!(off.payload.providers, ["greynoise"]);
    assert_eq!(off.payload.abuseipdb_score, None);
    assert_eq!(off.columns.abuseipdb_raw, None);
    assert!(off.payload.abuseipdb_categories.is_empty());
    assert_eq!(
        off.payload.provider_outcomes.keys().collect::<Vec<_>>(),
        ["greynoise"]
    );
    assert_ne!(payload_digest(&both.payload), payload_digest(&off.payload));
}

#[test]
fn non_global_rows_are_empty_and_last_a_century() {
    let m = merge(
        "10.0.0.1",
        StoredScope::NonGlobal,
        &[],
        &PtrState::default(),
        &ctx(&ProviderId::ALL),
        now(),
    );
    assert_eq!(m.columns.aggregate_verdict, None);
    assert_eq!(m.columns.greynoise_tags, serde_json::json!([]));
    assert!(m.columns.expires_at > now() + chrono::Duration::days(36_000));
    assert!(m.payload.providers.is_empty());
}

#[test]
fn digest_changes_only_with_payload_keys() {
    let a = merge(
        "1.2.3.4",
        StoredScope::Global,
        &[],
        &PtrState::default(),
        &ctx(&[]),
        now(),
    );
    let later = now() + chrono::Duration::hours(1);
    let b = merge(
        "1.2.3.4",
        StoredScope::Global,
        &[],
        &PtrState::default(),
        &ctx(&[]),
        later,
    );
    assert_eq!(payload_digest(&a.payload), payload_digest(&b.payload));
    let ptr = PtrState {
        name: Some("dns.google".into()),
        outcome: Some(PtrOutcome::Ok),
        ..PtrState::default()
    };
    let c = merge("1.2.3.4", StoredScope::Global, &[], &ptr, &ctx(&[]), now());
    assert_ne!(payload_digest(&a.payload), payload_digest(&c.payload));
}
