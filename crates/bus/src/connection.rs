//! Connecting to the broker on a runtime of our own.

use std::sync::OnceLock;

use async_rs::TokioRuntime;
use enrichd_core::Secret;
use lapin::{Connection, ConnectionProperties};

use crate::BusError;

/// One multi-thread runtime for every AMQP connection of the process. Kept in a static so it is
/// never dropped inside an async context (tokio forbids that).
static AMQP_RUNTIME: OnceLock<TokioRuntime> = OnceLock::new();

fn runtime() -> Result<TokioRuntime, BusError> {
    if let Some(rt) = AMQP_RUNTIME.get() {
        return Ok(rt.clone());
    }
    let rt = TokioRuntime::tokio().map_err(BusError::Runtime)?;
    // Another thread may have won the race; either runtime works, keep the stored one.
    Ok(AMQP_RUNTIME.get_or_init(|| rt).clone())
}

/// Opens a connection named `name` (shown in the management UI) to `url`.
///
/// # Errors
/// [`BusError::Amqp`] when the broker cannot be reached or refuses us. The error never
/// contains the URL, which may carry a password.
pub async fn connect(url: &Secret, name: &str) -> Result<Connection, BusError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect_with_runtime(url.expose(), properties, runtime()?)
        .await
        .map_err(BusError::amqp("connect"))
}
