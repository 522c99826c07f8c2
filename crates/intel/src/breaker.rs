//! A circuit breaker per provider, as a pure state machine (the clock is passed in).
//!
//! Closed: calls flow; consecutive breaker-tripping failures (timeouts, transport, 5xx,
//! decode) are counted and the fifth opens it. Open: nothing is sent for the cool-down (30 s).
//! Half-open: exactly one probe goes through; its success closes the breaker, its failure
//! re-opens it for another cool-down. An answer that is not a failure (any 2xx, but also a
//! 4xx, a rate limit or a rejected key: the provider is up and talking) resets the count.

use std::time::Duration;

use tokio::time::Instant;

/// Breaker thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long it stays open before letting one probe through.
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cool_down: Duration::from_secs(30),
        }
    }
}

/// The breaker's state, as shown in health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Nothing is sent until the cool-down ends.
    Open,
    /// The cool-down ended; one probe may go (or is in flight).
    HalfOpen,
}

impl BreakerState {
    /// The label used in health beats and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Permission for one call, handed back with its result through [`CircuitBreaker::record`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a ticket must be recorded, or a half-open breaker never admits another probe"]
pub struct Ticket {
    probe: bool,
}

impl Ticket {
    /// Whether this call is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// How an admitted call ended, as the breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The provider answered (including 4xx, rate limits, rejected keys).
    Answered,
    /// A breaker-tripping failure (`ProviderFate::RecordError { trips_breaker: true }`).
    Failed,
    /// Nothing was sent after all (no rate-limit slot, cancelled).
    NotSent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

/// The breaker; see the module docs.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: State,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: State::Closed { failures: 0 },
        }
    }

    /// The state at `now` (an open breaker whose cool-down ended shows as half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until } if now < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asks to send one call at `now`; `None` means the breaker is open (or its one probe is
    /// already in flight) and nothing may be sent.
    pub fn admit(&mut self, now: Instant) -> Option<Ticket> {
        match self.state {
            State::Closed { .. } => Some(Ticket { probe: false }),
            State::Open { until } if now < until => None,
            State::Open { .. }
            | State::HalfOpen {
                probe_in_flight: false,
            } => {
                self.state = State::HalfOpen {
                    probe_in_flight: true,
                };
                Some(Ticket { probe: true })
            }
            State::HalfOpen {
                probe_in_flight: true,
            } => None,
        }
    }

    /// Records how an admitted call ended.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "taking the ticket by value is the point: it cannot be recorded twice"
    )]
    pub fn record(&mut self, ticket: Ticket, attempt: Attempt, now: Instant) {
        match (attempt, ticket.probe) {
            (Attempt::NotSent, true) => {
                if matches!(self.state, State::HalfOpen { .. }) {
                    self.state = State::HalfOpen {
                        probe_in_flight: false,
                    };
                }
            }
            (Attempt::NotSent, false) => {}
            // Any answer proves the provider is reachable, even one that predates the opening.
            (Attempt::Answered, _) => self.state = State::Closed { failures: 0 },
            (Attempt::Failed, true) => self.open(now),
            (Attempt::Failed, false) => {
                // A late failure from before the breaker opened changes nothing: only the
                // probe decides a half-open breaker's fate.
                if let State::Closed { failures } = self.state {
                    let failures = failures + 1;
                    if failures >= self.config.failure_threshold {
                        self.open(now);
                    } else {
                        self.state = State::Closed { failures };
                    }
                }
            }
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open {
            until: now + self.config.cool_down,
        };
    }
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self::new(BreakerConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps of a breaker script, each with the expected result.
    enum Step {
        /// Admit a call at `t` seconds; expect admission (and whether it is the probe).
        Admit(u64, Option<bool>),
        /// Finish the oldest outstanding ticket.
        Finish(u64, Attempt),
        /// Expect this state at `t`.
        State(u64, BreakerState),
    }
    use Attempt::{Answered, Failed, NotSent};
    use BreakerState::{Closed, HalfOpen, Open};
    use Step::{Admit, Finish, State as Is};

    fn run(name: &str, steps: &[Step]) {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut breaker = CircuitBreaker::default();
        let mut outstanding = std::collections::VecDeque::new();
        for (i, step) in steps.iter().enumerate() {
            match step {
                Admit(t, expected) => {
                    let ticket = breaker.admit(at(*t));
                    assert_eq!(
                        ticket.as_ref().map(Ticket::is_probe),
                        *expected,
                        "{name}: step {i}"
                    );
                    outstanding.extend(ticket);
                }
                Finish(t, attempt) => {
                    let ticket = outstanding.pop_front().expect("a ticket to finish");
                    breaker.record(ticket, *attempt, at(*t));
                }
                Is(t, state) => assert_eq!(breaker.state(at(*t)), *state, "{name}: step {i}"),
            }
        }
    }

    fn fail_n(t: u64, n: usize) -> Vec<Step> {
        (0..n)
            .flat_map(|_| [Admit(t, Some(false)), Finish(t, Failed)])
            .collect()
    }

    #[test]
    fn opens_after_five_consecutive_failures() {
        let mut steps = fail_n(0, 4);
        steps.extend([Is(0, Closed), Admit(0, Some(false)), Finish(1, Failed)]);
        steps.extend([Is(1, Open), Admit(2, None), Admit(30, None), Is(30, Open)]);
        run("five failures", &steps);
    }

    #[test]
    fn an_answer_resets_the_count() {
        let mut steps = fail_n(0, 4);
        steps.extend([Admit(0, Some(false)), Finish(0, Answered)]);
        steps.extend(fail_n(0, 4));
        steps.push(Is(0, Closed));
        run("reset by answer", &steps);
    }

    #[test]
    fn client_errors_and_rate_limits_never_open_it() {
        // 4xx / 429 are recorded as `Answered` by the actor.
        let steps: Vec<Step> = (0..20)
            .flat_map(|_| [Admit(0, Some(false)), Finish(0, Answered)])
            .chain([Is(0, Closed)])
            .collect();
        run("4xx", &steps);
    }

    #[test]
    fn lets_exactly_one_probe_through_after_the_cool_down() {
        let mut steps = fail_n(0, 5);
        steps.extend([
            Is(29, Open),
            Admit(29, None),
            Is(30, HalfOpen),
            Admit(30, Some(true)),
            Admit(30, None),
            Admit(31, None),
            Finish(31, Answered),
            Is(31, Closed),
            Admit(31, Some(false)),
        ]);
        run("probe succeeds", &steps);
    }

    #[test]
    fn a_failed_probe_reopens_for_another_cool_down() {
        let mut steps = fail_n(0, 5);
        steps.extend([
            Admit(40, Some(true)),
            Finish(41, Failed),
            Is(41, Open),
            Admit(70, None),
            Is(71, HalfOpen),
            Admit(71, Some(true)),
        ]);
        run("probe fails", &steps);
    }

    #[test]
    fn a_probe_that_was_never_sent_frees_the_slot() {
        let mut steps = fail_n(0, 5);
        steps.extend([
            Admit(30, Some(true)),
            Finish(30, NotSent),
            Is(30, HalfOpen),
            Admit(30, Some(true)),
        ]);
        run("probe not sent", &steps);
    }

    #[test]
    fn late_failures_do_not_decide_a_half_open_breaker() {
        let mut steps: Vec<Step> = (0..5).map(|_| Admit(0, Some(false))).collect();
        // Five calls in flight; all fail; the breaker opens once.
        steps.extend((0..5).map(|_| Finish(1, Failed)));
        steps.extend([Is(1, Open), Is(31, HalfOpen)]);
        run("late failures", &steps);
        let mut steps: Vec<Step> = (0..6).map(|_| Admit(0, Some(false))).collect();
        steps.extend((0..5).map(|_| Finish(1, Failed)));
        steps.extend([Admit(31, Some(true))]);
        // The sixth, pre-opening call fails late while the probe is out: still half-open.
        steps.extend([Finish(32, Failed), Is(32, HalfOpen), Admit(32, None)]);
        run("late failure during probe", &steps);
    }
}
