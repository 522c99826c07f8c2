//! `enrichd-bench`: the benchmark of issue 7 (SPEC §11), one command:
//!
//! ```sh
//! cargo run --release -p enrichd-bench -- --report bench-report.json
//! ```
//!
//! It builds the release `enrichd` and `enrichd-fakes` (unless `--no-build`), starts the fakes
//! (fake providers and a PTR server on loopback, with `--latency-ms` and fault rates), and
//! drives the real `enrichd` binary against the local RabbitMQ and PostgreSQL (a fresh
//! database and uniquely named exchange and queues per scenario) and SQLite:
//!
//! 1. `ceilings`: a bare lapin consumer with per-message acks on enrichd's kind of queue, and
//!    batched upserts and small transactions on the same databases;
//! 2. `backfill_postgres` / `backfill_sqlite`: `enrichd backfill` over 2,000 attackers;
//! 3. `ingestion`: 100,000 `attacker.scored` events over 5,000 addresses, one `enrichd run`;
//! 4. `latency`: new addresses at 1,000 events/s, publish to `attacker.intel.enriched`;
//! 5. `memory`: peak resident memory with 100,000 distinct addresses.
//!
//! Every figure is printed next to its target with PASS/MISS, and the whole report is written
//! as JSON. The run is bounded by `--deadline-secs` (default 840 s) and cleans up after itself.

#![allow(
    clippy::cast_precision_loss,
    reason = "rates and percentiles are floats; the counts behind them stay far below 2^52"
)]

mod amqp;
mod db;
mod enrichd;
mod floor;
mod procs;
mod report;
mod scenarios;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

use enrichd_core::Secret;
use enrichd_harness::binary::sibling_or;
use enrichd_harness::enrichd::Limits;
use enrichd_harness::fakes::{Fakes, FakesOptions};

use crate::report::{Report, ScenarioReport};
use crate::scenarios::{BackfillShape, Ctx, Sizes};

/// Benchmarks the release enrichd binary against fake providers, RabbitMQ, PostgreSQL and
/// SQLite on loopback, and reports each figure next to its target.
#[derive(Debug, Parser)]
#[command(name = "enrichd-bench", version)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent command-line switches"
)]
struct Args {
    /// Where the JSON report goes.
    #[arg(long, default_value = "bench-report.json")]
    report: PathBuf,
    /// Logs, SQLite files and perf data.
    #[arg(long, default_value = "target/bench")]
    work_dir: PathBuf,
    /// Skip `cargo build --release -p enrichd-worker -p enrichd-fakes`.
    #[arg(long)]
    no_build: bool,
    /// The enrichd binary (default: next to this one, i.e. target/release/enrichd).
    #[arg(long)]
    enrichd: Option<PathBuf>,
    /// The enrichd-fakes binary (default: next to this one).
    #[arg(long)]
    fakes: Option<PathBuf>,
    /// Scenarios to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ceilings,backfill_postgres,backfill_sqlite,backfill_reference_sqlite,backfill_reference_sqlite_metered,backfill_reference_sqlite_quota,ingestion,latency_floor,latency,memory"
    )]
    scenarios: Vec<String>,
    /// Added to every fake provider answer.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Fraction of fake provider answers that are HTTP 500.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fraction of fake provider answers that are HTTP 429.
    #[arg(long, default_value_t = 0.0)]
    rate_limit_rate: f64,
    /// Seed of the fakes' deterministic faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Calls in flight per provider (and PTR lookups in flight).
    #[arg(long, default_value_t = 32)]
    concurrency: u32,
    /// Attackers in the backfill scenarios.
    #[arg(long, default_value_t = 2000)]
    backfill_attackers: usize,
    /// Events in the ingestion scenario.
    #[arg(long, default_value_t = 100_000)]
    ingest_events: usize,
    /// Distinct addresses among them.
    #[arg(long, default_value_t = 5000)]
    ingest_ips: usize,
    /// Messages through the bare consumer.
    #[arg(long, default_value_t = 100_000)]
    ceiling_messages: usize,
    /// Rows per pass of the upsert ceiling.
    #[arg(long, default_value_t = 20_000)]
    ceiling_rows: usize,
    /// Measured events in the latency scenario (after 500 warm-up events).
    #[arg(long, default_value_t = 5000)]
    latency_events: usize,
    /// Events per second in the latency scenario.
    #[arg(long, default_value_t = 1000)]
    latency_rate: u32,
    /// Distinct addresses in the memory scenario.
    #[arg(long, default_value_t = 100_000)]
    rss_ips: usize,
    /// PostgreSQL server, without database (loopback only).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pg_url: String,
    /// RabbitMQ (loopback only).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// `RUST_LOG` for enrichd.
    #[arg(long, default_value = "warn")]
    rust_log: String,
    /// Attach `perf record` to enrichd in every scenario (data in the work dir). Distorts the
    /// figures; for finding hot paths, not for reporting.
    #[arg(long)]
    perf: bool,
    /// Log enrichd's statements slower than this many milliseconds to PostgreSQL's server log
    /// (set per scenario database; for finding slow statements, not for reporting).
    #[arg(long)]
    pg_log_slow_ms: Option<u64>,
    /// Keep the databases and queues (for inspection).
    #[arg(long)]
    keep: bool,
    /// Hard bound on the whole run, in seconds.
    #[arg(long, default_value_t = 840)]
    deadline_secs: u64,
}

const KNOWN: [&str; 10] = [
    "ceilings",
    "backfill_postgres",
    "backfill_sqlite",
    "backfill_reference_sqlite",
    "backfill_reference_sqlite_metered",
    "backfill_reference_sqlite_quota",
    "ingestion",
    "latency_floor",
    "latency",
    "memory",
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("enrichd-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Refuses anything but loopback: the benchmark never sends traffic off the machine.
fn require_loopback(url: &str, what: &str) -> anyhow::Result<()> {
    let authority = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['/', '?'])
        .next()
        .unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host_port
        .strip_prefix('[')
        .and_then(|h| h.split_once(']').map(|(h, _)| h))
        .unwrap_or_else(|| host_port.split(':').next().unwrap_or(""));
    if !matches!(host, "127.0.0.1" | "localhost" | "::1") {
        bail!("{what} must be on loopback, not {host:?}");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

async fn build() -> anyhow::Result<()> {
    eprintln!("enrichd-bench: cargo build --release -p enrichd-worker -p enrichd-fakes");
    let status =
        tokio::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--release",
                "-p",
                "enrichd-worker",
                "-p",
                "enrichd-fakes",
            ])
            .current_dir(workspace_root())
            .status()
            .await
            .context("run cargo")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    Ok(())
}

#[allow(
    clippy::too_many_lines,
    reason = "the run's sequence, read top to bottom"
)]
async fn run(args: Args) -> anyhow::Result<bool> {
    require_loopback(&args.pg_url, "--pg-url")?;
    require_loopback(&args.amqp_url, "--amqp-url")?;
    for s in &args.scenarios {
        if !KNOWN.contains(&s.as_str()) {
            bail!("unknown scenario {s:?} (known: {})", KNOWN.join(", "));
        }
    }
    let started = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339();
    let deadline = started + Duration::from_secs(args.deadline_secs);
    if !args.no_build {
        build().await?;
    }
    let enrichd_bin = sibling_or(args.enrichd.as_deref(), "enrichd")?;
    let fakes_bin = sibling_or(args.fakes.as_deref(), "enrichd-fakes")?;
    for (bin, hint) in [
        (&enrichd_bin, "enrichd-worker"),
        (&fakes_bin, "enrichd-fakes"),
    ] {
        if !bin.exists() {
            bail!(
                "{} is missing: run `cargo build --release -p {hint}` (or drop --no-build)",
                bin.display()
            );
        }
    }
    std::fs::create_dir_all(&args.work_dir)?;
    let work_dir = std::fs::canonicalize(&args.work_dir)?;
    let enrichd_bin = std::fs::canonicalize(&enrichd_bin)?;
    let fakes_bin = std::fs::canonicalize(&fakes_bin)?;

    let options = FakesOptions {
        latency_ms: args.latency_ms,
        error_rate: args.error_rate,
        rate_limit_rate: args.rate_limit_rate,
        seed: args.seed,
    };
    let fakes = Fakes::start(&fakes_bin, options, &work_dir.join("fakes.log")).await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let machine = machine(&args, &enrichd_bin).await;
    let config = json!({
        "run_id": run_id,
        "enrichd": enrichd_bin.display().to_string(),
        "fakes": {"binary": fakes_bin.display().to_string(), "http": fakes.http_addr(), "dns": fakes.dns_addr(),
                  "latency_ms": args.latency_ms, "error_rate": args.error_rate,
                  "rate_limit_rate": args.rate_limit_rate, "seed": args.seed},
        "concurrency_per_provider": args.concurrency,
        "rate_limits_and_quotas": "lifted (ENRICHD_<P>_RATE_PER_SEC=0, _DAILY_QUOTA=0)",
        "backfill_attackers": args.backfill_attackers,
        "ingest_events": args.ingest_events, "ingest_ips": args.ingest_ips,
        "ceiling_messages": args.ceiling_messages, "ceiling_rows": args.ceiling_rows,
        "latency_events": args.latency_events, "latency_rate": args.latency_rate,
        "rss_ips": args.rss_ips, "rust_log": args.rust_log, "perf": args.perf,
        "deadline_secs": args.deadline_secs,
    });
    let ctx = Ctx {
        run_id: run_id.clone(),
        sizes: Sizes {
            latency_ms: args.latency_ms,
            backfill_attackers: args.backfill_attackers,
            ingest_events: args.ingest_events,
            ingest_ips: args.ingest_ips,
            ceiling_messages: args.ceiling_messages,
            ceiling_rows: args.ceiling_rows,
            latency_events: args.latency_events,
            latency_rate: args.latency_rate,
            rss_ips: args.rss_ips,
        },
        launcher: enrichd::Launcher {
            binary: enrichd_bin,
            work_dir: work_dir.clone(),
            fakes_base_url: fakes.base_url(),
            fakes_dns: fakes.dns_addr().to_string(),
            concurrency: args.concurrency,
            rust_log: args.rust_log.clone(),
        },
        fakes,
        pg_server: args.pg_url.trim_end_matches('/').to_owned(),
        amqp_url: args.amqp_url.clone(),
        work_dir,
        ticks: procs::clock_ticks(),
        perf: args.perf,
        pg_log_slow_ms: args.pg_log_slow_ms,
        bare_consumer_rate: Mutex::new(None),
        unmetered_backfill_rate: Mutex::new(None),
        cleanup: Mutex::default(),
    };

    let mut reports = Vec::new();
    for name in KNOWN
        .iter()
        .filter(|k| args.scenarios.iter().any(|s| s == *k))
    {
        let mut report = ScenarioReport {
            name: (*name).to_owned(),
            wall_secs: 0.0,
            error: None,
            figures: Vec::new(),
            details: json!({}),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining < Duration::from_secs(20) {
            report.error = Some("skipped: the run's deadline is reached".into());
            reports.push(report);
            continue;
        }
        // The memory run adapts to the time left; the others have fixed caps.
        let cap = match *name {
            "memory" => remaining.saturating_sub(Duration::from_secs(30)),
            "ingestion" => Duration::from_secs(360),
            _ => Duration::from_secs(300),
        }
        .min(remaining);
        eprintln!("enrichd-bench: {name} (cap {} s)", cap.as_secs());
        let scenario_started = Instant::now();
        let outcome = tokio::time::timeout(cap, run_one(&ctx, name, &mut report, cap)).await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => report.error = Some(format!("{e:#}")),
            Err(_) => report.error = Some(format!("cut at its {} s cap", cap.as_secs())),
        }
        report.wall_secs = procs::round3(scenario_started.elapsed().as_secs_f64());
        if let Some(e) = &report.error {
            eprintln!("enrichd-bench: {name}: {e}");
        }
        reports.push(report);
    }

    if !args.keep {
        cleanup(&ctx).await;
    }
    let Ctx { fakes, .. } = ctx;
    fakes.stop().await;

    let report = Report {
        machine,
        config,
        started_at,
        wall_secs: procs::round3(started.elapsed().as_secs_f64()),
        scenarios: reports,
    };
    let table = report::render(&report);
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{table}")?;
    writeln!(
        stdout,
        "report: {}  (run {run_id}, {:.0} s)",
        args.report.display(),
        report.wall_secs
    )?;
    std::fs::write(&args.report, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("write {}", args.report.display()))?;
    let all_ran = report.scenarios.iter().all(|s| s.error.is_none());
    Ok(all_ran)
}

async fn run_one(
    ctx: &Ctx,
    name: &str,
    report: &mut ScenarioReport,
    cap: Duration,
) -> anyhow::Result<()> {
    match name {
        "ceilings" => scenarios::ceilings(ctx, report).await,
        "backfill_postgres" | "backfill_sqlite" => {
            let sqlite = name == "backfill_sqlite";
            let target = scenarios::backfill_target(ctx, sqlite, name).await?;
            let first_octet = if sqlite { 50 } else { 45 };
            let shape = BackfillShape {
                limits: Limits::Lifted,
                reference_tables: false,
            };
            scenarios::backfill(ctx, report, &target, name, first_octet, shape).await
        }
        "backfill_reference_sqlite"
        | "backfill_reference_sqlite_metered"
        | "backfill_reference_sqlite_quota" => {
            let target = scenarios::backfill_target(ctx, true, name).await?;
            let (limits, first_octet) = match name {
                "backfill_reference_sqlite_metered" => (
                    Limits::Metered {
                        rate_per_sec: scenarios::METERED_RATE,
                        daily_quota: 0,
                    },
                    52,
                ),
                "backfill_reference_sqlite_quota" => (
                    Limits::Metered {
                        rate_per_sec: scenarios::METERED_RATE,
                        daily_quota: 1_000_000,
                    },
                    53,
                ),
                _ => (Limits::Lifted, 51),
            };
            let shape = BackfillShape {
                limits,
                reference_tables: true,
            };
            scenarios::backfill(ctx, report, &target, name, first_octet, shape).await
        }
        "ingestion" => scenarios::ingestion(ctx, report).await,
        "latency_floor" => scenarios::latency_floor(ctx, report).await,
        "latency" => scenarios::latency(ctx, report).await,
        "memory" => {
            scenarios::memory(ctx, report, cap.saturating_sub(Duration::from_secs(30))).await
        }
        other => bail!("unknown scenario {other}"),
    }
}

async fn cleanup(ctx: &Ctx) {
    let created = std::mem::take(&mut *ctx.cleanup.lock().await);
    for db in &created.databases {
        db.drop_it().await;
    }
    if created.topologies.is_empty() {
        return;
    }
    let url = Secret::new(ctx.amqp_url.clone());
    match enrichd_bus::connect(&url, "enrichd-bench cleanup").await {
        Ok(connection) => {
            for topology in &created.topologies {
                for failure in topology.delete(&connection).await {
                    eprintln!("enrichd-bench: cleanup: {failure}");
                }
            }
            let _ = connection.close(200, "bench done".into()).await;
        }
        Err(e) => eprintln!(
            "enrichd-bench: cleanup: cannot reach RabbitMQ: {}",
            enrichd_core::error::chain(&e)
        ),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The machine and the software under test.
async fn machine(args: &Args, enrichd_bin: &Path) -> Value {
    let meminfo = read("/proc/meminfo");
    let mem_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_default();
    let admin = db::Target::Postgres {
        server: args.pg_url.trim_end_matches('/').to_owned(),
        name: "postgres".into(),
    };
    let pg_version = match admin.connect(1).await {
        Ok(conn) => {
            use sea_orm::ConnectionTrait as _;
            let row = conn
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT version()",
                ))
                .await
                .ok()
                .flatten();
            let _ = conn.close().await;
            row.and_then(|r| r.try_get_by_index::<String>(0).ok())
                .unwrap_or_default()
        }
        Err(_) => String::new(),
    };
    let root = workspace_root();
    let root_text = root.display().to_string();
    let commit = command_line("git", &["-C", &root_text, "rev-parse", "--short", "HEAD"]);
    let dirty = !command_line(
        "git",
        &[
            "-C",
            &root_text,
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )
    .is_empty();
    json!({
        "nproc": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "cpu_model": cpu_model,
        "memory_gib": procs::round3(mem_kib as f64 / 1024.0 / 1024.0),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "os": os,
        "load_average_at_start": read("/proc/loadavg").trim(),
        "rustc": command_line("rustc", &["--version"]),
        "postgresql": pg_version,
        "rabbitmq": command_line("rabbitmqctl", &["version"]),
        "git_commit": commit,
        "git_dirty": dirty,
        "enrichd_binary_bytes": std::fs::metadata(enrichd_bin).map_or(0, |m| m.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_accepted() {
        assert!(require_loopback("postgres://postgres@127.0.0.1:5432", "pg").is_ok());
        assert!(require_loopback("amqp://guest:guest@localhost:5672/%2f", "amqp").is_ok());
        assert!(require_loopback("postgres://u@[::1]:5432", "pg").is_ok());
        assert!(require_loopback("postgres://u@db.internal:5432", "pg").is_err());
        assert!(require_loopback("amqp://guest:guest@10.0.0.5:5672/%2f", "amqp").is_err());
    }

    #[test]
    fn scenario_addresses_are_distinct_and_global() {
        let list = scenarios::ips(45, 100_000);
        let unique: std::collections::HashSet<_> = list.iter().collect();
        assert_eq!(unique.len(), 100_000);
        for octet in [44, 45, 46, 47, 48, 49, 50] {
            for ip in [
                scenarios::ips(octet, 1)[0],
                scenarios::ips(octet, 100_000)[99_999],
            ] {
                let addr = std::net::IpAddr::V4(ip);
                assert!(enrichd_core::scope::is_global(addr), "{ip} is not global");
            }
        }
    }
}
