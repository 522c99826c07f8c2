//! Deterministic faults: whether one provider answer is a 500 or a 429 is a pure function of
//! `(seed, provider, ip, attempt#)`, so a run can be replayed and a test can predict it.
//!
//! The Feodo feed is never faulted: a feed failure is all-or-nothing for every address, which
//! would make "every attacker ends with the providers that answered" depend on timing; the
//! feed's failure handling has its own tests in `enrichd-intel`.

use enrichd_core::ProviderId;

/// A fault the fake answers with instead of the provider's normal answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 500.
    ServerError,
    /// HTTP 429 with `Retry-After: 2`.
    RateLimited,
}

/// How often faults happen.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultPlan {
    /// Fraction of answers that are 500 (0.0..=1.0).
    pub error_rate: f64,
    /// Fraction of answers that are 429 (0.0..=1.0).
    pub rate_limit_rate: f64,
    /// Seed mixed into every decision.
    pub seed: u64,
}

impl FaultPlan {
    /// The fault for the `attempt`-th request (0-based) of `provider` about `ip`, if any.
    pub fn decide(&self, provider: ProviderId, ip: &str, attempt: u32) -> Option<Fault> {
        if provider == ProviderId::Feodo {
            return None;
        }
        let h = mix(self.seed
            ^ crate::world::hash_str(provider.as_str()).rotate_left(17)
            ^ crate::world::hash_str(ip)
            ^ u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let roll = unit(h);
        if roll < self.error_rate {
            Some(Fault::ServerError)
        } else if roll < self.error_rate + self.rate_limit_rate {
            Some(Fault::RateLimited)
        } else {
            None
        }
    }
}

/// splitmix64's finaliser: spreads every input bit over the output.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform value in `[0, 1)` from the top 53 bits.
#[expect(
    clippy::cast_precision_loss,
    reason = "53 bits fit an f64 mantissa exactly"
)]
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_rates_means_no_faults() {
        let plan = FaultPlan::default();
        assert!((0..1000).all(|a| plan.decide(ProviderId::Greynoise, "45.1.2.3", a).is_none()));
    }

    #[test]
    fn fault_fractions_follow_the_rates_and_replay_exactly() {
        let plan = FaultPlan {
            error_rate: 0.10,
            rate_limit_rate: 0.05,
            seed: 7,
        };
        let decisions: Vec<_> = (0..20_000u32)
            .map(|i| {
                plan.decide(
                    ProviderId::Abuseipdb,
                    &format!("45.0.{}.{}", i / 256, i % 256),
                    0,
                )
            })
            .collect();
        let errors = decisions
            .iter()
            .filter(|d| **d == Some(Fault::ServerError))
            .count();
        let limited = decisions
            .iter()
            .filter(|d| **d == Some(Fault::RateLimited))
            .count();
        assert!((1800..2200).contains(&errors), "errors {errors}");
        assert!((850..1150).contains(&limited), "429s {limited}");
        let again: Vec<_> = (0..20_000u32)
            .map(|i| {
                plan.decide(
                    ProviderId::Abuseipdb,
                    &format!("45.0.{}.{}", i / 256, i % 256),
                    0,
                )
            })
            .collect();
        assert_eq!(decisions, again);
    }

    #[test]
    fn a_retry_rolls_again_and_the_seed_changes_the_pattern() {
        let plan = FaultPlan {
            error_rate: 0.5,
            rate_limit_rate: 0.0,
            seed: 1,
        };
        let attempts: Vec<_> = (0..64)
            .map(|a| plan.decide(ProviderId::Threatfox, "45.9.9.9", a))
            .collect();
        assert!(attempts.contains(&None) && attempts.contains(&Some(Fault::ServerError)));
        let other = FaultPlan { seed: 2, ..plan };
        let other_attempts: Vec<_> = (0..64)
            .map(|a| other.decide(ProviderId::Threatfox, "45.9.9.9", a))
            .collect();
        assert_ne!(attempts, other_attempts);
    }

    #[test]
    fn the_feed_never_faults() {
        let plan = FaultPlan {
            error_rate: 1.0,
            rate_limit_rate: 0.0,
            seed: 0,
        };
        assert_eq!(plan.decide(ProviderId::Feodo, "feed", 0), None);
        assert_eq!(
            plan.decide(ProviderId::Greynoise, "45.1.1.1", 0),
            Some(Fault::ServerError)
        );
    }
}
