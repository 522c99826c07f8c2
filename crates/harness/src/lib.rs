//! enrichd and its fakes as processes, a test bus, envelopes and free ports: the one copy of
//! the tooling that the fault suite (`enrichd-faults`), the benchmark (`enrichd-bench`) and
//! the worker's integration tests share. Tools and tests only: never a dependency of the
//! enrichd binary.
//!
//! # Layout
//! - [`process`]: a child process whose output goes to a log file: signals, terminate with
//!   grace, `kill -9`, the exit with a deadline, the log's tail, the pid.
//! - [`enrichd`]: the enrichd binary: its environment ([`enrichd::EnrichdEnv`]), a command
//!   started with its log, readiness, metrics.
//! - [`metrics`]: Prometheus text from `/metrics`, summed by series name and labels.
//! - [`fakes`]: the `enrichd-fakes` process and its typed stats client.
//! - [`bus`]: a test's side of RabbitMQ: enrichd's topology declared, events published,
//!   queue counts, the `attacker.intel.enriched` events received.
//! - [`events`]: `attacker.scored` and `attacker.observed` envelopes, built from
//!   [`enrichd_core::payload::Envelope`].
//! - [`http`]: one small HTTP client for loopback control endpoints.
//! - [`ports`]: free loopback ports. [`binary`]: the binaries next to a tool.
//!
//! Errors are `anyhow` errors with context: every caller is a tool that prints the chain in
//! one line, or a test that fails with it, and none decides anything by the kind of failure.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::path::Path;
//! use std::time::Duration;
//! use enrichd_harness::enrichd::{Enrichd, EnrichdEnv, Limits, PER_ADDRESS};
//! use enrichd_harness::fakes::{Fakes, FakesOptions};
//!
//! let fakes = Fakes::start(Path::new("target/debug/enrichd-fakes"), FakesOptions::default(),
//!     Path::new("/tmp/fakes.log")).await?;
//! let env = EnrichdEnv::new()
//!     .database("sqlite:///tmp/demo.db?mode=rwc")
//!     .providers_at(&fakes.base_url())
//!     .limits(&PER_ADDRESS, Limits::Lifted)
//!     .dns_servers(&fakes.dns_addr().to_string());
//! let mut enrichd = Enrichd::start(Path::new("target/debug/enrichd"), &["run"], &env,
//!     Path::new("/tmp/enrichd.log"))?;
//! enrichd.wait_ready(Duration::from_secs(60)).await?;
//! let acked = enrichd.metric("enrichd_events_acked_total", &[]).await;
//! # let _ = acked; Ok(()) }
//! ```

pub mod binary;
pub mod bus;
pub mod enrichd;
pub mod events;
pub mod fakes;
pub mod http;
pub mod metrics;
pub mod ports;
pub mod process;
