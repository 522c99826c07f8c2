//! The subcommands. Each returns the process exit code; errors are reported here, once.

mod backfill;
mod check;
mod dlq;
mod lookup;
mod migrate;
mod run;

use enrichd_store::{SchemaStatus, Store};

use crate::cli::Command;
use crate::config::{Settings, redact_url};
use crate::exit;

/// Runs one subcommand to completion.
pub async fn dispatch(command: Command, settings: Settings) -> u8 {
    match command {
        Command::Run => run::run(&settings).await,
        Command::Migrate => migrate::migrate(&settings).await,
        Command::Check => check::check(&settings).await,
        Command::Lookup {
            ips,
            json,
            refresh,
            max_wait,
        } => {
            let options = lookup::LookupOptions {
                json,
                refresh,
                max_wait: std::time::Duration::from_secs(max_wait),
            };
            lookup::lookup(&settings, &ips, options).await
        }
        Command::Backfill { all, max_wait } => {
            backfill::backfill(&settings, all, std::time::Duration::from_secs(max_wait)).await
        }
        Command::Dlq { action } => dlq::dlq(&settings, &action).await,
    }
}

/// Command output on stdout (logs and progress go to stderr). `false` when stdout is gone.
fn print_out(text: &str) -> bool {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_ok()
}

/// `13:05Z` for a time today (UTC), `2026-12-08 00:00Z` otherwise.
fn short_time(at: chrono::DateTime<chrono::Utc>, now: chrono::DateTime<chrono::Utc>) -> String {
    if at.date_naive() == now.date_naive() {
        at.format("%H:%MZ").to_string()
    } else {
        at.format("%Y-%m-%d %H:%MZ").to_string()
    }
}

/// Connects to the store and, when configured, migrates it; reports failures itself.
async fn open_store(settings: &Settings, migrate: bool) -> Result<Store, u8> {
    let store = match Store::connect(&settings.database_url).await {
        Ok(store) => store,
        Err(e) => {
            tracing::error!(
                database = %redact_url(&settings.database_url),
                error = %enrichd_core::error::chain(&e),
                "Cannot open the database."
            );
            return Err(exit::FAILURE);
        }
    };
    if migrate && let Err(e) = store.migrate().await {
        tracing::error!(error = %enrichd_core::error::chain(&e), "Migration failed.");
        return Err(exit::FAILURE);
    }
    Ok(store)
}

/// [`open_store`], then refuses a schema this binary does not match: one written by a newer
/// binary (its columns may mean things we do not know), or one not migrated yet when
/// auto-migration is off.
async fn open_current_store(settings: &Settings) -> Result<Store, u8> {
    let store = open_store(settings, settings.auto_migrate).await?;
    match store.schema_status().await {
        Ok(SchemaStatus::Current) => Ok(store),
        Ok(SchemaStatus::Ahead { found }) => {
            tracing::error!(
                schema = found,
                "The database schema is newer than this binary; upgrade enrichd."
            );
            Err(exit::FAILURE)
        }
        Ok(SchemaStatus::Behind { .. }) => {
            tracing::error!(
                "The database schema is not current; run `enrichd migrate` or set ENRICHD_AUTO_MIGRATE=true."
            );
            Err(exit::FAILURE)
        }
        Err(e) => {
            tracing::error!(error = %enrichd_core::error::chain(&e), "Cannot read the schema version.");
            Err(exit::FAILURE)
        }
    }
}
