//! The gate's decisions as pure functions of a provider's limits row and the database clock:
//! reserving a slot, giving unused ones back, a provider's statement about its limits, the
//! quota period and the status. No I/O: the caller locks and stores the row.

use std::time::Duration;

use chrono::{DateTime, Days, NaiveTime, Utc};
use enrichd_core::ports::{GateEvent, ProviderLimits, Reservation};

use super::ProviderStatus;
use crate::slots::Unused;

/// A slot further ahead than this is not held for: the caller is told `Busy`.
pub const SLOT_HORIZON: Duration = Duration::from_secs(2);
/// The longest park a provider can impose.
const MAX_PARK: chrono::Duration = chrono::Duration::hours(24);

/// The stored limits row of one provider.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct LimitsRow {
    pub(super) next_slot_at: Option<DateTime<Utc>>,
    pub(super) quota_day: Option<String>,
    pub(super) quota_used: i64,
    pub(super) quota_remaining: Option<i64>,
    pub(super) quota_reset_at: Option<DateTime<Utc>>,
    pub(super) parked_until: Option<DateTime<Utc>>,
    pub(super) rejected_key_fingerprint: Option<String>,
}

/// Whether `limits` carries a key other than the rejected one, which lifts the rejection.
pub(super) fn clears_rejection(row: &LimitsRow, limits: &ProviderLimits) -> bool {
    row.rejected_key_fingerprint.is_some()
        && row.rejected_key_fingerprint.as_deref() != limits.key_fingerprint.as_deref()
}

/// The reservation of an unmetered provider: parks, key rejection and header quota only.
pub(super) fn decide_unmetered(
    row: &LimitsRow,
    limits: &ProviderLimits,
    now: DateTime<Utc>,
) -> Reservation {
    if let Some(until) = row.parked_until.filter(|u| *u > now) {
        return Reservation::Parked { until };
    }
    if row.rejected_key_fingerprint.is_some()
        && row.rejected_key_fingerprint.as_deref() == limits.key_fingerprint.as_deref()
    {
        return Reservation::KeyRejected;
    }
    let reset_passed = row.quota_reset_at.is_some_and(|reset| now >= reset);
    match row.quota_remaining {
        Some(left) if left <= 0 && !reset_passed => Reservation::QuotaExhausted {
            reset_at: quota_reset(row, now),
        },
        left => Reservation::Granted {
            wait: Duration::ZERO,
            quota_remaining: left
                .filter(|_| !reset_passed)
                .map(|l| u32::try_from(l).unwrap_or(0)),
        },
    }
}

fn next_utc_midnight(now: DateTime<Utc>) -> DateTime<Utc> {
    now.date_naive()
        .checked_add_days(Days::new(1))
        .map_or(now + chrono::Duration::days(1), |d| {
            d.and_time(NaiveTime::MIN).and_utc()
        })
}

/// Starts a new quota period when the provider's reset time (or, without one, the UTC day)
/// has passed.
fn roll_quota(row: &mut LimitsRow, now: DateTime<Utc>) {
    let today = now.date_naive().to_string();
    let rolled = match row.quota_reset_at {
        Some(reset) => now >= reset,
        None => row.quota_day.as_deref() != Some(today.as_str()),
    };
    if rolled {
        row.quota_used = 0;
        row.quota_remaining = None;
        row.quota_reset_at = None;
        row.quota_day = Some(today);
    }
}

/// Calls left: the lower of what our own daily quota leaves and the newest header (less what
/// was reserved since); `None` when neither applies.
fn quota_left(row: &LimitsRow, limits: &ProviderLimits) -> Option<i64> {
    let ours = (limits.daily_quota > 0).then(|| i64::from(limits.daily_quota) - row.quota_used);
    match (ours, row.quota_remaining) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn quota_reset(row: &LimitsRow, now: DateTime<Utc>) -> DateTime<Utc> {
    row.quota_reset_at.unwrap_or_else(|| next_utc_midnight(now))
}

/// Decides one reservation at `now` and updates `row` accordingly.
pub(super) fn decide(
    row: &mut LimitsRow,
    limits: &ProviderLimits,
    now: DateTime<Utc>,
) -> Reservation {
    if let Some(until) = row.parked_until.filter(|u| *u > now) {
        return Reservation::Parked { until };
    }
    if let Some(rejected) = row.rejected_key_fingerprint.as_deref() {
        if limits.key_fingerprint.as_deref() == Some(rejected) {
            return Reservation::KeyRejected;
        }
        // A different key is configured: the rejection was about the old one.
        row.rejected_key_fingerprint = None;
    }
    roll_quota(row, now);
    let left = quota_left(row, limits);
    if left.is_some_and(|l| l <= 0) {
        return Reservation::QuotaExhausted {
            reset_at: quota_reset(row, now),
        };
    }
    let mut wait = Duration::ZERO;
    if limits.rate_per_sec.is_finite() && limits.rate_per_sec > 0.0 {
        let slot = row.next_slot_at.map_or(now, |s| s.max(now));
        let ahead = (slot - now).to_std().unwrap_or(Duration::ZERO);
        if ahead > SLOT_HORIZON {
            let horizon = chrono::Duration::from_std(SLOT_HORIZON).unwrap_or_default();
            return Reservation::Busy {
                retry_at: slot - horizon,
            };
        }
        let interval = Duration::from_secs_f64((1.0 / limits.rate_per_sec).min(86_400.0));
        let interval = chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::days(1));
        row.next_slot_at = Some(crate::sql::micros(slot + interval));
        wait = ahead;
    }
    row.quota_used += 1;
    row.quota_remaining = row.quota_remaining.map(|r| r - 1);
    Reservation::Granted {
        wait,
        quota_remaining: left.map(|l| u32::try_from(l - 1).unwrap_or(0)),
    }
}

/// Returns slots reserved and not used to `row`: their quota units (while the quota period
/// they were taken in lasts), and the rate cursor when nobody reserved after them.
pub(super) fn give_back(row: &mut LimitsRow, unused: &[Unused], now: DateTime<Utc>) {
    roll_quota(row, now);
    for block in unused.iter().filter(|u| u.count > 0) {
        if block.quota_day.is_some() && block.quota_day == row.quota_day {
            row.quota_used = (row.quota_used - i64::from(block.count)).max(0);
            row.quota_remaining = row.quota_remaining.map(|r| r + i64::from(block.count));
        }
        if let Some(first) = block.first_ahead
            && block.cursor_after.is_some()
            && row.next_slot_at == block.cursor_after
        {
            row.next_slot_at = Some(crate::sql::micros(first.max(now)));
        }
    }
}

/// Applies a provider's statement about its limits to `row`.
pub(super) fn observe(row: &mut LimitsRow, event: &GateEvent, now: DateTime<Utc>) {
    match event {
        GateEvent::QuotaObserved {
            remaining,
            reset_at,
        } => {
            roll_quota(row, now);
            row.quota_remaining = Some(i64::from(*remaining));
            if let Some(reset) = reset_at.filter(|r| *r > now) {
                row.quota_reset_at = Some(crate::sql::micros(reset));
            }
        }
        GateEvent::Park { until } => {
            let until = crate::sql::micros((*until).min(now + MAX_PARK));
            row.parked_until = Some(row.parked_until.filter(|p| *p > until).unwrap_or(until));
        }
        GateEvent::KeyRejected { key_fingerprint } => {
            row.rejected_key_fingerprint = Some(key_fingerprint.clone());
        }
    }
}

/// The rate and quota state `row` stands for at `now` under `limits` (nothing reserved).
pub(super) fn status(
    mut row: LimitsRow,
    limits: &ProviderLimits,
    now: DateTime<Utc>,
) -> ProviderStatus {
    roll_quota(&mut row, now);
    let left = quota_left(&row, limits);
    ProviderStatus {
        parked_until: row.parked_until.filter(|p| *p > now),
        key_rejected: row.rejected_key_fingerprint.is_some()
            && row.rejected_key_fingerprint == limits.key_fingerprint,
        quota_remaining: left.map(|l| u32::try_from(l.max(0)).unwrap_or(0)),
        quota_reset_at: left.map(|_| quota_reset(&row, now)),
    }
}

#[cfg(test)]
mod tests;
