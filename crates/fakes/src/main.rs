//! `enrichd-fakes`: serves the fake providers and DNS on loopback until killed.
//!
//! Prints one JSON line, `{"http":"127.0.0.1:PORT","dns":"127.0.0.1:PORT"}`, once both ports
//! are bound. Point enrichd at it with `ENRICHD_<PROVIDER>_BASE_URL=http://<http>` and
//! `ENRICHD_DNS_SERVERS=<dns>`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use enrichd_fakes::{FakeConfig, FaultPlan};

/// Fake GreyNoise, AbuseIPDB, ThreatFox, Feodo and PTR DNS on loopback, with deterministic
/// answers and faults, and request statistics at `GET /_stats`.
#[derive(Debug, Parser)]
#[command(name = "enrichd-fakes", version)]
struct Cli {
    /// Milliseconds added to every provider answer.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Fraction of provider answers that are HTTP 500 (0..=1).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    error_rate: f64,
    /// Fraction of provider answers that are HTTP 429 with `Retry-After: 2` (0..=1).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    rate_limit_rate: f64,
    /// Seed of the fault decisions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// HTTP port (0 = chosen by the OS).
    #[arg(long, default_value_t = 0)]
    http_port: u16,
    /// DNS port, UDP (0 = chosen by the OS).
    #[arg(long, default_value_t = 0)]
    dns_port: u16,
    /// AbuseIPDB's `X-RateLimit-Limit`; `X-RateLimit-Remaining` counts down from it.
    #[arg(long, default_value_t = enrichd_fakes::world::DEFAULT_ABUSEIPDB_QUOTA)]
    abuseipdb_quota: u64,
}

fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{text:?} is not a fraction between 0 and 1")),
    }
}

#[tokio::main]
#[expect(
    clippy::print_stdout,
    reason = "the one banner line is the program's output"
)]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(64);
        }
        // --help and --version.
        Err(e) => e.exit(),
    };
    if cli.error_rate + cli.rate_limit_rate > 1.0 {
        eprintln!("error: --error-rate plus --rate-limit-rate must not exceed 1");
        return ExitCode::from(64);
    }
    let config = FakeConfig {
        http_port: cli.http_port,
        dns_port: cli.dns_port,
        latency: Duration::from_millis(cli.latency_ms),
        faults: FaultPlan {
            error_rate: cli.error_rate,
            rate_limit_rate: cli.rate_limit_rate,
            seed: cli.seed,
        },
        abuseipdb_quota: cli.abuseipdb_quota,
    };
    let fakes = match enrichd_fakes::start(config).await {
        Ok(fakes) => fakes,
        Err(e) => {
            eprintln!("error: cannot bind: {e}");
            return ExitCode::FAILURE;
        }
    };
    match serde_json::to_string(&fakes.banner()) {
        Ok(banner) => println!("{banner}"),
        Err(e) => {
            eprintln!("error: cannot write the banner: {e}");
            return ExitCode::FAILURE;
        }
    }
    fakes.wait().await;
    ExitCode::SUCCESS
}
