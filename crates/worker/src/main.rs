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

    telemetry::init();
    for name in Settings::unknown_variables(&ProcessEnv) {
        tracing::warn!(variable = %name, "Unknown ENRICHD_ variable ignored.");
    }

    let code = actix_rt::System::new().block_on(commands::dispatch(cli.command, settings));
    ExitCode::from(code)
}
