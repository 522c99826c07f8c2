//! `enrichd run`: the worker.

use crate::config::Settings;
use crate::{exit, lock};

pub(super) async fn run(settings: &Settings) -> u8 {
    // Taken before anything else touches the file, so a second run fails fast and clearly.
    let _run_lock = match lock::sqlite_path(&settings.database_url).map(|p| lock::acquire(&p)) {
        Some(Err(e)) => {
            tracing::error!(error = %e, "Refusing to start.");
            eprintln!("error: {e}");
            return exit::FAILURE;
        }
        Some(Ok(held)) => Some(held),
        None => None,
    };
    let _store = match super::open_current_store(settings).await {
        Ok(store) => store,
        Err(code) => return code,
    };
    tracing::info!("Worker started; waiting for a stop signal.");
    crate::signal::shutdown().await;
    tracing::info!("Stopped.");
    exit::OK
}
