//! The shared fake world for process-level tests and benchmarks.
//!
//! One loopback HTTP port speaks all four providers' wire contracts (SPEC §7) and one loopback
//! UDP port answers every PTR query; both servers are `enrichd-testkit`'s, so the fake world
//! adds only what the providers answer. Answers are a pure function of the address ([`world`]);
//! faults (500, 429) are a pure function of `(seed, provider, ip, attempt#)` ([`faults`]);
//! every request is counted per provider and per `(provider, ip)` with its arrival time
//! ([`stats`]), so a test can check "one call per (IP, provider)" or "no 10-second window
//! holds more than the limit" from the outside.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let fakes = enrichd_fakes::start(enrichd_fakes::FakeConfig::default()).await?;
//! let banner = fakes.banner(); // {"http":"127.0.0.1:PORT","dns":"127.0.0.1:PORT"}
//! println!("{}", serde_json::to_string(&banner)?);
//! # Ok(()) }
//! ```

pub mod faults;
mod http;
pub mod stats;
pub mod world;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use enrichd_testkit::dns::DnsServer;
use enrichd_testkit::http::HttpServer;
use serde::{Deserialize, Serialize};

pub use faults::FaultPlan;
pub use stats::{Counters, Stats};

/// How the fake world behaves.
#[derive(Debug, Clone, Default)]
pub struct FakeConfig {
    /// HTTP port; 0 = chosen by the OS.
    pub http_port: u16,
    /// DNS port; 0 = chosen by the OS.
    pub dns_port: u16,
    /// Added to every provider answer (not to `/_stats`, `/_reset`, `/_health`, `/_log`).
    pub latency: Duration,
    /// Which provider answers fail, and how.
    pub faults: FaultPlan,
    /// What AbuseIPDB's `X-RateLimit-Limit` says; `X-RateLimit-Remaining` counts down from it.
    pub abuseipdb_quota: u64,
}

impl FakeConfig {
    /// Defaults with a generous AbuseIPDB header quota, so a long benchmark never runs dry.
    pub fn new() -> Self {
        Self {
            abuseipdb_quota: world::DEFAULT_ABUSEIPDB_QUOTA,
            ..Self::default()
        }
    }
}

/// Everything the HTTP handler shares between requests.
#[derive(Debug)]
pub struct Shared {
    /// The configuration it was started with.
    pub config: FakeConfig,
    /// Counters.
    pub counters: Counters,
}

/// The one line the binary prints at start, `{"http":"127.0.0.1:PORT","dns":"127.0.0.1:PORT"}`:
/// what a tool reads to find the fake world. Written and read with this one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Banner {
    /// The HTTP address: every provider's base URL is `http://` + this.
    pub http: SocketAddr,
    /// The DNS address (UDP).
    pub dns: SocketAddr,
}

/// A running fake world; the servers stop when this is dropped.
#[derive(Debug)]
pub struct RunningFakes {
    http: HttpServer,
    dns: DnsServer,
    shared: Arc<Shared>,
}

impl RunningFakes {
    /// The HTTP address (`127.0.0.1:PORT`): every provider's base URL is `http://` + this.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.addr()
    }

    /// The DNS address (`127.0.0.1:PORT`, UDP).
    pub fn dns_addr(&self) -> SocketAddr {
        self.dns.addr()
    }

    /// Where both servers listen.
    pub fn banner(&self) -> Banner {
        Banner {
            http: self.http_addr(),
            dns: self.dns_addr(),
        }
    }

    /// The live counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Serves until the process ends: both servers run until this value is dropped, and
    /// nothing here drops it.
    pub async fn wait(self) {
        let _servers = self;
        std::future::pending::<()>().await;
    }
}

/// Binds both ports on 127.0.0.1 and starts serving.
///
/// # Errors
/// When a port cannot be bound.
pub async fn start(config: FakeConfig) -> std::io::Result<RunningFakes> {
    let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let dns = DnsServer::bind(loopback(config.dns_port), world::zone())?;
    let http_addr = loopback(config.http_port);
    let shared = Arc::new(Shared {
        config,
        counters: Counters::new(dns.query_counter()),
    });
    let handler_shared = Arc::clone(&shared);
    // Recording off: a benchmark sends millions of requests, and the counters keep what the
    // tools read.
    let http = HttpServer::builder()
        .addr(http_addr)
        .without_recording()
        .serve_async(move |request| http::respond(request, Arc::clone(&handler_shared)))
        .await?;
    Ok(RunningFakes { http, dns, shared })
}
