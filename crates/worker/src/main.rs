//! `enrichd`: parse, load configuration, dispatch, exit. Nothing else lives here.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use enrichd_worker::cli::Cli;
use enrichd_worker::config::{ProcessEnv, Settings};
use enrichd_worker::{commands, exit, telemetry};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => exit::OK,
                _ => exit::USAGE,
            };
            // Printing can only fail when stdout/stderr are gone; the exit code still tells.
            let _ = e.print();
            return ExitCode::from(code);
        }
    };

    let settings = match Settings::load(cli.config.as_deref(), &ProcessEnv) {
        Ok(settings) => settings,
        Err(errors) => {
            for problem in &errors.0 {
                eprintln!("{problem}");
            }
            return ExitCode::from(exit::CONFIG);
        }
    };

    telemetry::init(telemetry::LogStyle::for_process(
        &cli.command,
        settings.log_format,
    ));
    for name in Settings::unknown_variables(&ProcessEnv) {
        tracing::warn!(variable = %name, "Unknown ENRICHD_ variable ignored.");
    }

    let system = actix_rt::System::new();
    let code = system.block_on(commands::dispatch(cli.command, settings));
    // Work cut off by the grace period may still hold pooled database connections, and their
    // destructors need a live runtime: dropping it here made sqlx panic inside a destructor,
    // which aborts the process (SIGABRT instead of the exit code). What is durable is
    // committed and the rest is redelivered or leased, so leave without tearing it down.
    std::process::exit(i32::from(code))
}
