//! The `enrichd` binary's library half: command line, configuration, telemetry, the
//! single-run lock, and the commands. `main.rs` only parses, dispatches and exits.
//!
//! # Layout
//! - [`cli`]: the clap command line and its exit codes.
//! - [`config`]: file + environment → validated [`config::Settings`].
//! - [`telemetry`]: the tracing subscriber (JSON when not on a terminal).
//! - [`observe`]: probes and gauges for `/metrics`, `/healthz`, `/readyz`.
//! - [`lock`]: one `enrichd run` per SQLite file.
//! - [`signal`]: the shutdown signals (SIGTERM, SIGINT).
//! - [`wiring`]: settings → running actors.
//! - [`commands`]: `migrate`, `check`, `run`, ….

pub mod cli;
pub mod commands;
pub mod config;
pub mod lock;
pub mod observe;
pub mod signal;
pub mod telemetry;
pub mod wiring;

/// Process exit codes (sysexits where one fits).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// A runtime failure (store unreachable, a child gave up, a second run on one SQLite file).
    pub const FAILURE: u8 = 1;
    /// Bad command line (`EX_USAGE`).
    pub const USAGE: u8 = 64;
    /// Bad configuration (`EX_CONFIG`).
    pub const CONFIG: u8 = 78;
}
