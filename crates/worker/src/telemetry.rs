//! The one tracing subscriber of the process, on stderr so stdout stays for command output.
//!
//! Who reads the lines decides their form: a collector reads `enrichd run` and anything not
//! on a terminal (JSON lines, `info` and up); a person reads `lookup`, `check`, `migrate`,
//! `backfill` and `dlq` on a terminal (compact text, `warn` and up, so the answer is not
//! buried under start-up chatter). `ENRICHD_LOG_FORMAT` picks the form and `RUST_LOG` the
//! filter, whatever the command.

use std::io::IsTerminal;

use crate::cli::Command;
use crate::config::LogFormat;

/// The default filter for a collector. sqlx reports every pool wait over its threshold as a
/// warning; under load that is thousands of lines a minute saying only "busy", which the
/// metrics say better.
const COLLECTOR_FILTER: &str = "info,sqlx::pool::acquire=error";

/// The default filter for a person at a terminal: what needs attention only.
const PERSON_FILTER: &str = "warn,sqlx::pool::acquire=error";

/// The form and default filter of the log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStyle {
    /// JSON or text.
    pub format: LogFormat,
    /// The filter when `RUST_LOG` is unset.
    pub default_filter: &'static str,
}

impl LogStyle {
    /// The style for `command`: `configured` is `ENRICHD_LOG_FORMAT`, `terminal` whether
    /// stderr is one.
    pub fn choose(command: &Command, configured: Option<LogFormat>, terminal: bool) -> Self {
        let for_a_person = terminal && !matches!(command, Command::Run);
        let format = configured.unwrap_or(if for_a_person {
            LogFormat::Text
        } else {
            LogFormat::Json
        });
        Self {
            format,
            default_filter: if for_a_person {
                PERSON_FILTER
            } else {
                COLLECTOR_FILTER
            },
        }
    }

    /// [`LogStyle::choose`] for this process's stderr.
    pub fn for_process(command: &Command, configured: Option<LogFormat>) -> Self {
        Self::choose(command, configured, std::io::stderr().is_terminal())
    }
}

/// Installs the subscriber: filter from `RUST_LOG`, else the style's default.
pub fn init(style: LogStyle) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(style.default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match style.format {
        LogFormat::Text => builder
            .compact()
            .without_time()
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber; nothing to report.
    drop(installed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup() -> Command {
        Command::Lookup {
            ips: vec!["8.8.8.8".into()],
            json: false,
            refresh: false,
            max_wait: 60,
        }
    }

    #[test]
    fn a_person_at_a_terminal_gets_text_warnings_and_everyone_else_json() {
        let person = LogStyle::choose(&lookup(), None, true);
        assert_eq!(person.format, LogFormat::Text);
        assert!(person.default_filter.starts_with("warn"));

        let piped = LogStyle::choose(&lookup(), None, false);
        assert_eq!(piped.format, LogFormat::Json);
        assert!(piped.default_filter.starts_with("info"));

        let worker = LogStyle::choose(&Command::Run, None, true);
        assert_eq!(
            worker.format,
            LogFormat::Json,
            "run keeps JSON on a terminal"
        );
        assert!(worker.default_filter.starts_with("info"));
    }

    #[test]
    fn the_configured_format_wins() {
        let text = LogStyle::choose(&Command::Run, Some(LogFormat::Text), false);
        assert_eq!(text.format, LogFormat::Text);
        let json = LogStyle::choose(&Command::Migrate, Some(LogFormat::Json), true);
        assert_eq!(json.format, LogFormat::Json);
        assert!(
            json.default_filter.starts_with("warn"),
            "still a person's filter"
        );
    }
}
