//! Each provider against a local fake speaking its exact wire contract (SPEC §7), plus the
//! hostile answers every HTTP provider must survive.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

mod abuseipdb;
mod feodo;
mod greynoise;
mod hostile;
mod threatfox;

use std::time::Duration;

use enrichd_core::{CanonicalIp, ProviderId, Secret};
use enrichd_intel::ProviderConfig;

pub(crate) const KEY: &str = "test-key-0123456789";

pub(crate) fn fixture(provider: &str, name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/{provider}/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub(crate) fn ip(text: &str) -> CanonicalIp {
    CanonicalIp::parse(text).unwrap()
}

/// A config pointing at `base`, with a key and a short deadline so failures are quick.
pub(crate) fn config(provider: ProviderId, base: &str) -> ProviderConfig {
    ProviderConfig::defaults(provider)
        .with_base_url(base)
        .with_api_key(Some(Secret::new(KEY)))
        .with_timeout(Duration::from_secs(2))
}
