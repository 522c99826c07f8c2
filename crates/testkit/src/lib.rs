//! Test support for enrichd: for tests, and for the tools around the binary (`enrichd-fakes`
//! serves its DNS and HTTP servers); never a dependency of the enrichd binary.
//!
//! # Layout
//! - [`db`]: a fresh PostgreSQL database or SQLite file per test.
//! - [`dns`]: an in-process authoritative DNS server on a loopback port.
//! - [`http`]: a scriptable HTTP/1.1 server speaking a provider's wire contract.
//! - [`proxy`]: a TCP proxy a test can cut, to take a service away from one process.
//! - [`services`]: whether the real PostgreSQL / RabbitMQ are reachable, and what to do if not.
//! - [`tracing`]: a test-writer subscriber, installed once.
//! - [`eventually`]: wait for a condition instead of sleeping.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failure is a test failure"
)]

pub mod db;
pub mod dns;
pub mod http;
pub mod proxy;
pub mod services;
pub mod tracing;

use std::future::Future;
use std::time::Duration;

/// Polls `condition` every 20 ms until it is true or `timeout` passes; returns whether it
/// became true. This synchronises on the observed state, never on elapsed time.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
