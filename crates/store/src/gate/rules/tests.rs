//! Table tests of the gate's decisions.

use super::*;
use chrono::TimeZone;

#[test]
fn unmetered_reservations_honour_parks_rejections_and_header_quota() {
    let now = now();
    let limits = limits(0.0, 0);
    let granted = Reservation::Granted {
        wait: Duration::ZERO,
        quota_remaining: None,
    };
    assert_eq!(
        decide_unmetered(&LimitsRow::default(), &limits, now),
        granted
    );
    let parked = LimitsRow {
        parked_until: Some(now + chrono::Duration::seconds(5)),
        ..Default::default()
    };
    assert!(matches!(
        decide_unmetered(&parked, &limits, now),
        Reservation::Parked { .. }
    ));
    let lapsed = LimitsRow {
        parked_until: Some(now - chrono::Duration::seconds(5)),
        ..Default::default()
    };
    assert_eq!(decide_unmetered(&lapsed, &limits, now), granted);
    let spent = LimitsRow {
        quota_remaining: Some(0),
        quota_reset_at: Some(now + chrono::Duration::hours(1)),
        ..Default::default()
    };
    assert!(matches!(
        decide_unmetered(&spent, &limits, now),
        Reservation::QuotaExhausted { .. }
    ));
    let reset = LimitsRow {
        quota_reset_at: Some(now - chrono::Duration::seconds(1)),
        ..spent
    };
    assert_eq!(decide_unmetered(&reset, &limits, now), granted);
    let keyed = ProviderLimits {
        key_fingerprint: Some("abc".into()),
        ..limits.clone()
    };
    let rejected = LimitsRow {
        rejected_key_fingerprint: Some("abc".into()),
        ..Default::default()
    };
    assert_eq!(
        decide_unmetered(&rejected, &keyed, now),
        Reservation::KeyRejected
    );
    let other = ProviderLimits {
        key_fingerprint: Some("new".into()),
        ..limits
    };
    assert_eq!(decide_unmetered(&rejected, &other, now), granted);
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

fn limits(rate: f64, quota: u32) -> ProviderLimits {
    ProviderLimits {
        rate_per_sec: rate,
        daily_quota: quota,
        key_fingerprint: Some("aaaa".into()),
    }
}

#[test]
fn slots_are_spaced_by_the_rate_and_busy_beyond_the_horizon() {
    let mut row = LimitsRow::default();
    let l = limits(2.0, 0);
    let waits: Vec<Reservation> = (0..6).map(|_| decide(&mut row, &l, now())).collect();
    let ms = |r: &Reservation| match r {
        Reservation::Granted { wait, .. } => Some(wait.as_millis()),
        _ => None,
    };
    assert_eq!(
        waits.iter().map(ms).collect::<Vec<_>>(),
        [Some(0), Some(500), Some(1000), Some(1500), Some(2000), None]
    );
    assert_eq!(
        waits[5],
        Reservation::Busy {
            retry_at: now() + chrono::Duration::milliseconds(500)
        }
    );
}

#[test]
fn quota_exhausts_and_resets_at_utc_midnight() {
    let mut row = LimitsRow::default();
    let l = limits(0.0, 2);
    assert!(matches!(
        decide(&mut row, &l, now()),
        Reservation::Granted {
            quota_remaining: Some(1),
            ..
        }
    ));
    assert!(matches!(
        decide(&mut row, &l, now()),
        Reservation::Granted {
            quota_remaining: Some(0),
            ..
        }
    ));
    let midnight = Utc.with_ymd_and_hms(2026, 11, 24, 0, 0, 0).unwrap();
    assert_eq!(
        decide(&mut row, &l, now()),
        Reservation::QuotaExhausted { reset_at: midnight }
    );
    assert!(matches!(
        decide(&mut row, &l, midnight),
        Reservation::Granted { .. }
    ));
}

#[test]
fn the_lower_of_reserved_and_header_quota_applies() {
    let mut row = LimitsRow::default();
    let l = limits(0.0, 1000);
    let reset = now() + chrono::Duration::hours(5);
    observe(
        &mut row,
        &GateEvent::QuotaObserved {
            remaining: 1,
            reset_at: Some(reset),
        },
        now(),
    );
    assert!(matches!(
        decide(&mut row, &l, now()),
        Reservation::Granted {
            quota_remaining: Some(0),
            ..
        }
    ));
    assert_eq!(
        decide(&mut row, &l, now()),
        Reservation::QuotaExhausted { reset_at: reset }
    );
    assert!(matches!(
        decide(&mut row, &l, reset),
        Reservation::Granted { .. }
    ));
}

#[test]
fn parks_hold_until_their_end_and_key_rejection_until_the_key_changes() {
    let mut row = LimitsRow::default();
    let l = limits(0.0, 0);
    let until = now() + chrono::Duration::minutes(10);
    observe(&mut row, &GateEvent::Park { until }, now());
    assert_eq!(decide(&mut row, &l, now()), Reservation::Parked { until });
    assert!(matches!(
        decide(&mut row, &l, until),
        Reservation::Granted { .. }
    ));
    observe(
        &mut row,
        &GateEvent::Park {
            until: now() + chrono::Duration::days(9),
        },
        now(),
    );
    assert_eq!(row.parked_until, Some(now() + chrono::Duration::hours(24)));

    let mut row = LimitsRow::default();
    observe(
        &mut row,
        &GateEvent::KeyRejected {
            key_fingerprint: "aaaa".into(),
        },
        now(),
    );
    assert_eq!(decide(&mut row, &l, now()), Reservation::KeyRejected);
    let new_key = ProviderLimits {
        key_fingerprint: Some("bbbb".into()),
        ..l
    };
    assert!(matches!(
        decide(&mut row, &new_key, now()),
        Reservation::Granted { .. }
    ));
    assert_eq!(row.rejected_key_fingerprint, None);
}

fn at(y: i32, m: u32, d: u32, h: u32, min: u32, sec: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, sec).unwrap()
}

#[test]
fn a_rejection_is_lifted_only_by_a_different_key() {
    let cases = [
        (None, Some("aaaa"), false),
        (None, None, false),
        (Some("aaaa"), Some("aaaa"), false),
        (Some("aaaa"), Some("bbbb"), true),
        (Some("aaaa"), None, true),
    ];
    for (rejected, configured, lifted) in cases {
        let row = LimitsRow {
            rejected_key_fingerprint: rejected.map(str::to_owned),
            ..LimitsRow::default()
        };
        let limits = ProviderLimits {
            key_fingerprint: configured.map(str::to_owned),
            ..limits(0.0, 0)
        };
        assert_eq!(
            clears_rejection(&row, &limits),
            lifted,
            "rejected {rejected:?}, configured {configured:?}"
        );
    }
}

#[test]
fn the_next_utc_midnight_is_always_ahead() {
    let cases = [
        (now(), at(2026, 11, 24, 0, 0, 0)),
        (at(2026, 11, 24, 0, 0, 0), at(2026, 11, 25, 0, 0, 0)),
        (at(2026, 12, 31, 23, 59, 59), at(2027, 1, 1, 0, 0, 0)),
        (at(2028, 2, 28, 12, 0, 0), at(2028, 2, 29, 0, 0, 0)),
    ];
    for (from, midnight) in cases {
        assert_eq!(next_utc_midnight(from), midnight, "from {from}");
    }
}

#[test]
fn a_quota_period_rolls_at_its_reset_time_or_else_at_the_utc_day() {
    let today = Some("2026-11-23");
    let yesterday = Some("2026-11-22");
    let hour = chrono::Duration::hours(1);
    // (stored day, stored reset time, whether the period rolls at `now()`)
    let cases = [
        (today, None, false),
        (yesterday, None, true),
        (None, None, true),
        (yesterday, Some(now() + hour), false),
        (today, Some(now() - hour), true),
        (today, Some(now()), true),
    ];
    for (day, reset, rolls) in cases {
        let stored = LimitsRow {
            quota_day: day.map(str::to_owned),
            quota_used: 7,
            quota_remaining: Some(3),
            quota_reset_at: reset,
            ..LimitsRow::default()
        };
        let mut row = stored.clone();
        roll_quota(&mut row, now());
        let fresh = LimitsRow {
            quota_day: today.map(str::to_owned),
            ..LimitsRow::default()
        };
        let expected = if rolls { fresh } else { stored };
        assert_eq!(row, expected, "day {day:?}, reset {reset:?}");
    }
}

#[test]
fn calls_left_are_the_lower_of_our_quota_and_the_header() {
    // (our daily quota, used, header's remaining, calls left)
    let cases = [
        (0, 0, None, None),
        (10, 3, None, Some(7)),
        (10, 12, None, Some(-2)),
        (0, 5, Some(4), Some(4)),
        (10, 3, Some(2), Some(2)),
        (10, 3, Some(9), Some(7)),
    ];
    for (daily_quota, used, header, left) in cases {
        let row = LimitsRow {
            quota_used: used,
            quota_remaining: header,
            ..LimitsRow::default()
        };
        assert_eq!(
            quota_left(&row, &limits(0.0, daily_quota)),
            left,
            "quota {daily_quota}, used {used}, header {header:?}"
        );
    }
}

#[test]
fn unused_slots_give_back_their_quota_and_the_cursor_nobody_moved() {
    let ms = chrono::Duration::milliseconds;
    let today = Some("2026-11-23".to_owned());
    let cursor = Some(now() + ms(900));
    let stored = LimitsRow {
        next_slot_at: cursor,
        quota_day: today.clone(),
        quota_used: 10,
        quota_remaining: Some(40),
        ..LimitsRow::default()
    };
    let unused = |count, first_ahead, cursor_after, quota_day: &Option<String>| Unused {
        count,
        first_ahead,
        cursor_after,
        quota_day: quota_day.clone(),
    };
    let other_day = Some("2026-11-22".to_owned());
    // (what is given back, expected (next slot, used, header's remaining))
    let cases = [
        (unused(3, None, None, &today), (cursor, 7, Some(43))),
        (unused(3, None, None, &other_day), (cursor, 10, Some(40))),
        (
            unused(0, Some(now() + ms(100)), cursor, &today),
            (cursor, 10, Some(40)),
        ),
        (unused(12, None, None, &today), (cursor, 0, Some(52))),
        (
            unused(2, Some(now() + ms(100)), cursor, &today),
            (Some(now() + ms(100)), 8, Some(42)),
        ),
        (
            unused(2, Some(now() - ms(100)), cursor, &today),
            (Some(now()), 8, Some(42)),
        ),
        (
            unused(2, Some(now() + ms(100)), Some(now() + ms(500)), &today),
            (cursor, 8, Some(42)),
        ),
        (
            unused(2, Some(now() + ms(100)), None, &today),
            (cursor, 8, Some(42)),
        ),
    ];
    for (given, (next_slot_at, quota_used, quota_remaining)) in cases {
        let mut row = stored.clone();
        give_back(&mut row, std::slice::from_ref(&given), now());
        assert_eq!(
            (row.next_slot_at, row.quota_used, row.quota_remaining),
            (next_slot_at, quota_used, quota_remaining),
            "{given:?}"
        );
    }
}

#[test]
fn the_status_shows_parks_rejection_and_the_quota_that_applies() {
    let later = now() + chrono::Duration::hours(2);
    let midnight = at(2026, 11, 24, 0, 0, 0);
    let today = Some("2026-11-23".to_owned());
    let status_of = |row: LimitsRow, daily_quota| status(row, &limits(0.0, daily_quota), now());
    let no_quota = status_of(LimitsRow::default(), 0);
    assert_eq!(
        no_quota,
        ProviderStatus {
            parked_until: None,
            key_rejected: false,
            quota_remaining: None,
            quota_reset_at: None,
        }
    );
    let cases = [
        (
            LimitsRow {
                parked_until: Some(later),
                ..LimitsRow::default()
            },
            0,
            ProviderStatus {
                parked_until: Some(later),
                ..no_quota.clone()
            },
        ),
        (
            LimitsRow {
                parked_until: Some(now()),
                ..LimitsRow::default()
            },
            0,
            no_quota.clone(),
        ),
        (
            LimitsRow {
                rejected_key_fingerprint: Some("aaaa".into()),
                ..LimitsRow::default()
            },
            0,
            ProviderStatus {
                key_rejected: true,
                ..no_quota.clone()
            },
        ),
        (
            LimitsRow {
                rejected_key_fingerprint: Some("old".into()),
                ..LimitsRow::default()
            },
            0,
            no_quota.clone(),
        ),
        (
            LimitsRow {
                quota_day: today.clone(),
                quota_used: 12,
                ..LimitsRow::default()
            },
            10,
            ProviderStatus {
                quota_remaining: Some(0),
                quota_reset_at: Some(midnight),
                ..no_quota.clone()
            },
        ),
        (
            LimitsRow {
                quota_day: today,
                quota_remaining: Some(5),
                quota_reset_at: Some(later),
                ..LimitsRow::default()
            },
            0,
            ProviderStatus {
                quota_remaining: Some(5),
                quota_reset_at: Some(later),
                ..no_quota.clone()
            },
        ),
        (
            LimitsRow {
                quota_day: Some("2026-11-22".into()),
                quota_used: 10,
                ..LimitsRow::default()
            },
            10,
            ProviderStatus {
                quota_remaining: Some(10),
                quota_reset_at: Some(midnight),
                ..no_quota.clone()
            },
        ),
    ];
    for (row, daily_quota, expected) in cases {
        assert_eq!(status_of(row.clone(), daily_quota), expected, "{row:?}");
    }
}
