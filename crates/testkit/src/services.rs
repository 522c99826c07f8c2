//! The real services tests talk to, and what happens when one is missing.
//!
//! Locally a test may skip when PostgreSQL or RabbitMQ is not there; under `CI=true` a
//! missing service is a failure, never a silent skip.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// PostgreSQL server URL without a database (`IT_DATABASE_URL`'s server part), default
/// `postgres://postgres@127.0.0.1:5432`.
pub fn postgres_server_url() -> String {
    std::env::var("IT_PG_SERVER_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// AMQP URL of the broker (`IT_AMQP_URL`), default `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub fn amqp_url() -> String {
    std::env::var("IT_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Whether we run under CI, where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns `true` when `addr` accepts TCP connections. When it does not: panics under CI,
/// otherwise prints a skip notice and returns `false`.
///
/// # Panics
/// Under `CI=true` when the service is unreachable.
pub fn require(service: &str, addr: &str) -> bool {
    let reachable = addr
        .parse::<SocketAddr>()
        .ok()
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    if reachable {
        return true;
    }
    assert!(
        !in_ci(),
        "{service} at {addr} is required under CI=true but is unreachable"
    );
    eprintln!("skipping: {service} at {addr} is unreachable (allowed outside CI only)");
    false
}

/// [`require`] for the PostgreSQL server.
pub fn require_postgres() -> bool {
    require("PostgreSQL", "127.0.0.1:5432")
}

/// [`require`] for the RabbitMQ broker.
pub fn require_rabbitmq() -> bool {
    require("RabbitMQ", "127.0.0.1:5672")
}
