//! Restart budgets and panic containment for supervised actors.
//!
//! actix's `Supervisor` restarts an actor that *stops*, never one that panics (a panicking
//! handler closes the mailbox for good; DEPENDENCIES.md §5). So every supervised actor:
//! runs risky handler bodies through [`contain`] / [`contain_future`], which turn a panic into
//! a value; reacts to that value with `ctx.stop()`; and in `Supervised::restarting` asks its
//! [`RestartBudget`] whether it may come back. A spent budget means the fault is not transient:
//! the actor reports `ChildGaveUp` and the Coordinator exits 1, so the unacked deliveries go to
//! healthier replicas instead of circling here.

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use tokio::time::Instant;

/// A handler body panicked; the message is the panic payload when it was a string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("handler panicked: {0}")]
pub struct Panicked(pub String);

fn describe(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Runs `body`, turning a panic into [`Panicked`].
///
/// # Errors
/// [`Panicked`] when `body` panicked.
pub fn contain<R>(body: impl FnOnce() -> R) -> Result<R, Panicked> {
    std::panic::catch_unwind(AssertUnwindSafe(body)).map_err(|p| Panicked(describe(p.as_ref())))
}

/// Awaits `future`, turning a panic while polling it into [`Panicked`].
///
/// # Errors
/// [`Panicked`] when the future panicked.
pub async fn contain_future<F: Future>(future: F) -> Result<F::Output, Panicked> {
    AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .map_err(|p| Panicked(describe(p.as_ref())))
}

/// What a restart attempt is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart after this (jittered, growing) delay.
    Restart {
        /// Wait before rebuilding resources.
        delay: Duration,
    },
    /// Too many restarts within the window: give up.
    GiveUp,
}

/// At most `max_restarts` within `window`; the delay before each restart doubles from 100 ms
/// to 5 s with ±25 % jitter so a fleet does not hammer a recovering dependency in step.
#[derive(Debug, Clone)]
pub struct RestartBudget {
    max_restarts: usize,
    window: Duration,
    recent: VecDeque<Instant>,
    total: u64,
}

impl Default for RestartBudget {
    /// 5 restarts within 60 s.
    fn default() -> Self {
        Self::new(5, Duration::from_secs(60))
    }
}

impl RestartBudget {
    /// A budget of `max_restarts` per `window`.
    pub fn new(max_restarts: usize, window: Duration) -> Self {
        Self {
            max_restarts,
            window,
            recent: VecDeque::new(),
            total: 0,
        }
    }

    /// Records a restart at `now` and decides whether it may go ahead.
    pub fn on_restart(&mut self, now: Instant) -> RestartDecision {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.recent.pop_front();
        }
        self.total += 1;
        if self.recent.len() >= self.max_restarts {
            return RestartDecision::GiveUp;
        }
        self.recent.push_back(now);
        let attempt = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        RestartDecision::Restart {
            delay: restart_delay(attempt),
        }
    }

    /// Restarts attempted since creation (including a refused one).
    pub fn total_restarts(&self) -> u64 {
        self.total
    }
}

/// The process's one backoff policy: from `first`, doubling to `cap`, each delay jittered
/// (up to twice itself) so replicas that failed together do not retry together. Restarts,
/// reconnects and retries all take theirs from here.
pub fn backoff(first: Duration, cap: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(cap)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// The delay before restart number `attempt` (1-based): [`backoff`] from 100 ms to 5 s.
pub fn restart_delay(attempt: u32) -> Duration {
    let nth = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
    backoff(Duration::from_millis(100), Duration::from_secs(5))
        .build()
        .nth(nth)
        .unwrap_or(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_values() {
        assert_eq!(contain(|| 7), Ok(7));
        let err = contain(|| -> u8 { panic!("boom") }).unwrap_err();
        assert_eq!(err, Panicked("boom".into()));
        let err = contain(|| -> u8 { panic!("{}", String::from("formatted")) }).unwrap_err();
        assert_eq!(err.0, "formatted");
    }

    #[tokio::test]
    async fn panicking_futures_become_values() {
        assert_eq!(contain_future(async { 3 }).await, Ok(3));
        let err = contain_future(async {
            tokio::task::yield_now().await;
            panic!("late boom");
        })
        .await;
        assert_eq!(err, Err::<(), _>(Panicked("late boom".into())));
    }

    #[test]
    fn budget_allows_max_restarts_per_window_then_gives_up() {
        let start = Instant::now();
        let mut budget = RestartBudget::new(3, Duration::from_secs(60));
        for i in 0..3 {
            let decision = budget.on_restart(start + Duration::from_secs(i));
            assert!(
                matches!(decision, RestartDecision::Restart { .. }),
                "restart {i}"
            );
        }
        assert_eq!(
            budget.on_restart(start + Duration::from_secs(10)),
            RestartDecision::GiveUp
        );
        assert_eq!(budget.total_restarts(), 4);
        // Old restarts age out of the window.
        let later = start + Duration::from_secs(200);
        assert!(matches!(
            budget.on_restart(later),
            RestartDecision::Restart { .. }
        ));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..=20 {
            let d = restart_delay(attempt);
            assert!(d >= Duration::from_millis(100), "{attempt}: {d:?}");
            assert!(d <= Duration::from_secs(10), "{attempt}: {d:?}");
        }
        // Doubling: the tenth is at its 5 s cap, the first at most 200 ms even jittered.
        assert!(restart_delay(10) >= Duration::from_secs(5));
        assert!(restart_delay(1) <= Duration::from_millis(200));
    }
}

/// A supervised actor's restart policy: its budget and whom to tell when it is spent.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    actor: &'static str,
    budget: RestartBudget,
    report_to: actix::Recipient<crate::messages::ChildGaveUp>,
}

impl RestartPolicy {
    /// `actor` (a role name) restarts within `budget`; a spent budget is reported to `report_to`.
    pub fn new(
        actor: &'static str,
        budget: RestartBudget,
        report_to: actix::Recipient<crate::messages::ChildGaveUp>,
    ) -> Self {
        Self {
            actor,
            budget,
            report_to,
        }
    }

    /// Call from `Supervised::restarting`: delays the restarted actor's mailbox by the
    /// backoff, or reports `ChildGaveUp` when the budget is spent (the Coordinator then exits 1).
    pub fn on_restart<A>(&mut self, ctx: &mut actix::Context<A>)
    where
        A: actix::Actor<Context = actix::Context<A>>,
    {
        use actix::AsyncContext as _;
        match self.budget.on_restart(Instant::now()) {
            RestartDecision::Restart { delay } => {
                ctx.wait(actix::fut::wrap_future(tokio::time::sleep(delay)));
            }
            RestartDecision::GiveUp => {
                // Losing this only happens when the Coordinator is gone, i.e. we are exiting.
                self.report_to
                    .do_send(crate::messages::ChildGaveUp { actor: self.actor });
            }
        }
    }

    /// Restarts attempted so far.
    pub fn restarts(&self) -> u64 {
        self.budget.total_restarts()
    }
}
