//! `enrichd migrate`: create or update the schema (under an advisory lock on PostgreSQL).

use crate::config::{Settings, redact_url};
use crate::exit;

pub(super) async fn migrate(settings: &Settings) -> u8 {
    match super::open_store(settings, true).await {
        Ok(_) => {
            tracing::info!(database = %redact_url(&settings.database_url), "Schema is current.");
            exit::OK
        }
        Err(code) => code,
    }
}
