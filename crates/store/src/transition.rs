//! The pure state transitions of the write: what a PTR or provider result makes of the
//! stored state, and the fence a claim must clear. No I/O: table-tested in `tests.rs`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use enrichd_core::ports::PtrReport;
use enrichd_core::text::column_text;
use enrichd_core::{ProviderReport, PtrOutcome};

use crate::claim::Lease;
use crate::state::{ProviderState, PtrState};

/// Column limit of `enrichd_provider_state.last_error`.
pub(crate) const LAST_ERROR_CHARS: usize = 512;
/// Column limit of `attackers.ptr_record` / `enrichd_ip_state.ptr_name`.
const PTR_CHARS: usize = 256;

/// An address's PTR state before and after a write.
#[derive(Debug, Clone)]
pub(crate) struct PtrChange {
    pub(crate) old: PtrState,
    pub(crate) new: PtrState,
}

/// A claim is always newer than the result it may replace, even within the clock's
/// resolution, so the fence never refuses the legitimate holder.
pub(crate) fn newer_than(lease: Lease, last: Option<DateTime<Utc>>) -> Lease {
    match last.filter(|l| *l >= lease.claimed_at) {
        Some(last) => Lease {
            claimed_at: last + chrono::Duration::microseconds(1),
            ..lease
        },
        None => lease,
    }
}

/// The PTR state after applying `report` (claimed at `lease.claimed_at`) to `old`.
pub(crate) fn next_ptr_state(
    old: &PtrState,
    lease: &Lease,
    report: &PtrReport,
    now: DateTime<Utc>,
) -> PtrState {
    let outcome = report.outcome;
    let attempts = if outcome.is_failure() {
        old.attempts.saturating_add(1)
    } else {
        0
    };
    let expires_at = outcome.due(attempts, report.record_ttl).at(now);
    let good_name = report
        .name
        .as_deref()
        .map(|n| column_text(n, PTR_CHARS))
        .filter(|n| outcome == PtrOutcome::Ok && !n.is_empty());
    let (name, resolved_at, forward_confirmed) = match (outcome, good_name) {
        (PtrOutcome::Ok, Some(name)) => {
            (Some(name), Some(lease.claimed_at), report.forward_confirmed)
        }
        // A failure, or switching PTR off, never erases a good stored name.
        (PtrOutcome::Servfail | PtrOutcome::Timeout | PtrOutcome::Disabled, _)
        | (PtrOutcome::Ok, None) => (old.name.clone(), old.resolved_at, old.forward_confirmed),
        // A negative answer replaces it.
        (PtrOutcome::Nxdomain | PtrOutcome::InvalidName | PtrOutcome::SkippedNonGlobal, _) => {
            (None, None, None)
        }
    };
    PtrState {
        name,
        outcome: Some(outcome),
        resolved_at,
        expires_at,
        attempts,
        queried_at: Some(lease.claimed_at),
        forward_confirmed,
    }
}

/// The provider state after applying `report` (claimed at `lease.claimed_at`) to `old`.
pub(crate) fn next_provider_state(
    old: Option<&ProviderState>,
    lease: &Lease,
    report: &ProviderReport,
    ttl: Duration,
    now: DateTime<Utc>,
) -> ProviderState {
    let outcome = report.outcome;
    let old_attempts = old.map_or(0, |s| s.attempts);
    let attempts = if outcome.is_failure() {
        old_attempts.saturating_add(1)
    } else if outcome.is_answer() {
        0
    } else {
        // Rate limits, quota and skips do not advance per-IP backoff.
        old_attempts
    };
    let next_attempt_at = outcome
        .due(attempts, ttl, report.resume_at, report.min_backoff)
        .at(now);
    if outcome.is_answer() {
        ProviderState {
            provider: report.provider,
            outcome: Some(outcome),
            verdict: report.verdict,
            fields: report.fields.clone(),
            raw: Some(report.raw.clone()),
            answered_at: Some(lease.claimed_at),
            queried_at: Some(lease.claimed_at),
            next_attempt_at,
            attempts,
            last_error: None,
        }
    } else {
        // No answer: the earlier answer's columns, verdict and raw body stay.
        let mut next = old.cloned().unwrap_or(ProviderState {
            provider: report.provider,
            outcome: None,
            verdict: None,
            fields: None,
            raw: None,
            answered_at: None,
            queried_at: None,
            next_attempt_at: None,
            attempts: 0,
            last_error: None,
        });
        next.outcome = Some(outcome);
        next.queried_at = Some(lease.claimed_at);
        next.next_attempt_at = next_attempt_at;
        next.attempts = attempts;
        next.last_error = report
            .error
            .as_deref()
            .map(|e| column_text(e, LAST_ERROR_CHARS));
        next
    }
}

#[cfg(test)]
mod tests;
