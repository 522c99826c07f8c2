//! `enrichd-faults`: the fault suite (SPEC §2, §5, §8, §11; issue 6).
//!
//! Starts real `enrichd run` replicas as processes against the real RabbitMQ and PostgreSQL
//! on loopback plus `enrichd-fakes`, breaks things (kill -9, broker restart, database
//! restart, provider errors and 429s), and prints its figures and checks per scenario, then
//! `faults: N passed, M failed`. Exit 0 only when every scenario passed; a missing service or
//! binary is a failure, never a skip. Services it restarted are running again when it ends,
//! whatever happened.
//!
//! ```text
//! bash scripts/faults.sh                 # builds the binaries, runs every scenario
//! enrichd-faults --only kill9            # one scenario (binaries next to this one)
//! ```

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a report tool: its output is the report"
)]
#![allow(
    clippy::cast_precision_loss,
    reason = "figures: counts far below 2^52 shown as rates"
)]

mod pg;
mod rabbit;
mod report;
mod scenarios;
mod services;
mod world;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use enrichd_harness::binary::sibling_or;
use tokio::time::Instant;

use crate::report::Report;
use crate::services::{Services, ServicesGuard};
use crate::world::Ctx;

/// The enrichd fault suite: real replicas, real RabbitMQ and PostgreSQL, fake providers.
#[derive(Debug, Parser)]
#[command(name = "enrichd-faults")]
struct Cli {
    /// Run only these scenarios (repeatable); default all, in order.
    #[arg(long)]
    only: Vec<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// The enrichd binary (default: `enrichd` next to this binary).
    #[arg(long)]
    enrichd: Option<PathBuf>,
    /// The enrichd-fakes binary (default: `enrichd-fakes` next to this binary).
    #[arg(long)]
    fakes: Option<PathBuf>,
    /// Directory for replica and fake logs (default: a new one under the temp directory).
    #[arg(long)]
    logs: Option<PathBuf>,
    /// Extra `KEY=VALUE` for every replica's environment, after the scenario's own
    /// (repeatable; for trying a tuning against the same faults).
    #[arg(long = "replica-env", value_parser = key_value)]
    replica_env: Vec<(String, String)>,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn context(cli: &Cli) -> Result<Ctx> {
    let enrichd = sibling_or(cli.enrichd.as_deref(), "enrichd")?;
    let fakes = sibling_or(cli.fakes.as_deref(), "enrichd-fakes")?;
    for (what, path) in [("enrichd", &enrichd), ("enrichd-fakes", &fakes)] {
        if !path.is_file() {
            bail!(
                "{what} binary not found at {} (build it: cargo build -p enrichd-worker -p enrichd-fakes)",
                path.display()
            );
        }
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let logs = cli
        .logs
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("enrichd-faults-{run_id}")));
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    Ok(Ctx {
        enrichd,
        fakes,
        logs,
        run_id,
        services: Services::detect()?,
        extra_env: cli.replica_env.clone(),
    })
}

async fn run_all(ctx: &Ctx, names: &[&str]) -> (usize, usize) {
    let (mut passed, mut failed) = (0, 0);
    for name in names {
        let what = scenarios::ALL
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, w)| *w);
        Report::start(name, what);
        let started = Instant::now();
        let mut report = Report::default();
        let outcome = scenarios::run(name, ctx, &mut report).await;
        // A scenario that restarted a service must not leave it down for the next one.
        for action in ctx.services.ensure_running() {
            println!("   note    {action}");
        }
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) if report.passed() => {
                passed += 1;
                println!("-> {name}: PASSED in {secs:.1} s");
            }
            Ok(()) => {
                failed += 1;
                println!(
                    "-> {name}: FAILED in {secs:.1} s ({})",
                    report.failures().join("; ")
                );
            }
            Err(e) => {
                failed += 1;
                println!("-> {name}: FAILED in {secs:.1} s: {e:#}");
            }
        }
    }
    (passed, failed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.list {
        for (name, what) in scenarios::ALL {
            println!("{name}: {what}");
        }
        return ExitCode::SUCCESS;
    }
    let names: Vec<&str> = if cli.only.is_empty() {
        scenarios::ALL.iter().map(|(n, _)| *n).collect()
    } else {
        cli.only.iter().map(String::as_str).collect()
    };
    if let Some(unknown) = names
        .iter()
        .find(|n| !scenarios::ALL.iter().any(|(name, _)| name == *n))
    {
        eprintln!("error: no scenario named {unknown:?} (see --list)");
        return ExitCode::from(64);
    }
    let ctx = match context(&cli) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("error: {e:#}");
            println!("faults: 0 passed, {} failed", names.len());
            return ExitCode::FAILURE;
        }
    };
    let _guard = ServicesGuard(ctx.services.clone());
    println!(
        "faults: {} scenarios; enrichd {}; logs in {}",
        names.len(),
        ctx.enrichd.display(),
        ctx.logs.display()
    );
    let started = Instant::now();
    let (passed, failed) = tokio::select! {
        counts = run_all(&ctx, &names) => counts,
        _ = tokio::signal::ctrl_c() => {
            println!("\nfaults: interrupted");
            (0, names.len())
        }
    };
    println!(
        "\nfaults: whole suite {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!("faults: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
