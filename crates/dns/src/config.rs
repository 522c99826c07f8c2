//! The DNS section of the configuration.

use std::net::SocketAddr;
use std::time::Duration;

/// Default per-lookup deadline (SPEC §6).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Default number of lookups in flight per resolver (SPEC §3).
pub const DEFAULT_CONCURRENCY: usize = 10;

/// How PTR lookups are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Nameservers to ask (`ENRICHD_DNS_SERVERS`); empty means the system's (`/etc/resolv.conf`).
    /// A port other than 53 is honoured, so tests can use a server on `127.0.0.1:<port>`.
    pub servers: Vec<SocketAddr>,
    /// Deadline of one whole lookup, forward confirmation included. Must be non-zero.
    pub timeout: Duration,
    /// Lookups in flight at once; more wait for a permit (not counted against the deadline).
    /// Must be at least 1.
    pub concurrency: usize,
    /// Whether to check that the name resolves back to the address (`ENRICHD_PTR_FCRDNS`).
    pub fcrdns: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            concurrency: DEFAULT_CONCURRENCY,
            fcrdns: false,
        }
    }
}
