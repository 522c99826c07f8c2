//! A test-writer tracing subscriber, installed once per test binary.

use std::sync::Once;

static INIT: Once = Once::new();

/// Installs a subscriber that writes through the test harness (captured unless a test fails),
/// filtered by `RUST_LOG` (default `warn`).
pub fn init() {
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}
