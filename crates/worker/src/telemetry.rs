//! The one tracing subscriber of the process, on stderr so stdout stays for command output.

use std::io::IsTerminal;

/// The default filter. sqlx reports every pool wait over its threshold as a warning; under
/// load that is thousands of lines a minute saying only "busy", which the metrics say better.
const DEFAULT_FILTER: &str = "info,sqlx::pool::acquire=error";

/// Installs the subscriber: filter from `RUST_LOG` (default [`DEFAULT_FILTER`]), JSON lines
/// unless stderr is a terminal (production logs go to a collector; people read the compact
/// form).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = if std::io::stderr().is_terminal() {
        builder.compact().try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    };
    // A second init (tests) keeps the first subscriber; nothing to report.
    drop(installed);
}
