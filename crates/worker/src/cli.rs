//! The command line. Flags are process knobs only; everything else is configuration.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// What `enrichd --help` opens with: what it does for its user.
const ABOUT: &str = "\
enrichd turns the IP addresses attacking your honeypots into intelligence: each address's
reverse-DNS name and a threat-intel verdict from GreyNoise, AbuseIPDB, Feodo Tracker and
ThreatFox, written beside your attacker rows and published for dashboards, SIEMs and the
ATT&CK tagger. Rate limits and daily quotas hold for the whole cluster; nothing is ever sent
about private or excluded addresses.";

/// How to start, under the command list.
const START: &str = "\
Start with `enrichd lookup 45.155.205.233` (SQLite ./enrichd.db, no broker). Set
ENRICHD_ABUSEIPDB_API_KEY and ENRICHD_THREATFOX_API_KEY to use those providers;
`enrichd check` shows what is configured and reachable.";

/// The `enrichd` command line.
#[derive(Debug, Parser)]
#[command(name = "enrichd", version, about = ABOUT, after_help = START, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML). Default: ./enrichd.toml when it exists.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker: consume the bus (when configured) and the database backlog.
    Run,
    /// Create or update the schema, then exit.
    Migrate,
    /// Look up addresses now: PTR and every provider, reusing fresh stored state.
    Lookup {
        /// Addresses to look up.
        #[arg(required = true, value_name = "IP")]
        ips: Vec<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Ask again even when the stored state is fresh.
        #[arg(long)]
        refresh: bool,
        /// Longest wait for a provider's rate slot or the end of its park; a provider that
        /// cannot answer sooner is shown with its state (`rate_limited until …`).
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        max_wait: u64,
    },
    /// Do the work that is due now, with a progress bar, then exit.
    ///
    /// It ends when nothing is due, or when everything still owed waits longer than
    /// `--max-wait` (a rate slot, a park, a spent quota, a retry), and says which.
    Backfill {
        /// Also rewrite every address's rows from stored state, due or not: after a provider
        /// was turned off, its old answers stop counting everywhere at once.
        #[arg(long)]
        all: bool,
        /// Longest wait for owed work to become possible before stopping.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        max_wait: u64,
    },
    /// Validate the configuration and reach the database, bus, DNS and providers without
    /// spending quota.
    Check,
    /// Dead-letter queue maintenance.
    Dlq {
        /// What to do with the dead letters.
        #[command(subcommand)]
        action: DlqAction,
    },
}

/// Dead-letter actions.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Move dead letters back to the work queue.
    Replay {
        /// Move at most this many.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
    },
    /// Drop every dead letter.
    Purge,
}
