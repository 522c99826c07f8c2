//! The shared fake world for process-level tests and benchmarks.
//!
//! One loopback HTTP port speaks all four providers' wire contracts (SPEC §7) and one loopback
//! UDP port answers every PTR query. Answers are a pure function of the address ([`world`]);
//! faults (500, 429) are a pure function of `(seed, provider, ip, attempt#)` ([`faults`]);
//! every request is counted per provider and per `(provider, ip)` with its arrival time
//! ([`stats`]), so a test can check "one call per (IP, provider)" or "no 10-second window
//! holds more than the limit" from the outside.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let fakes = enrichd_fakes::start(enrichd_fakes::FakeConfig::default()).await?;
//! println!("{}", fakes.banner()); // {"http":"127.0.0.1:PORT","dns":"127.0.0.1:PORT"}
//! # Ok(()) }
//! ```

pub mod dns;
pub mod faults;
pub mod http;
pub mod stats;
pub mod world;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

pub use faults::FaultPlan;
pub use stats::Stats;

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

/// Everything a running server shares between connections.
#[derive(Debug)]
pub struct Shared {
    /// The configuration it was started with.
    pub config: FakeConfig,
    /// Counters.
    pub stats: Stats,
}

/// A running fake world; the servers stop when this is dropped.
#[derive(Debug)]
pub struct RunningFakes {
    http: SocketAddr,
    dns: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningFakes {
    /// The HTTP address (`127.0.0.1:PORT`): every provider's base URL is `http://` + this.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The DNS address (`127.0.0.1:PORT`, UDP).
    pub fn dns_addr(&self) -> SocketAddr {
        self.dns
    }

    /// The one line printed at start: `{"http":"127.0.0.1:PORT","dns":"127.0.0.1:PORT"}`.
    pub fn banner(&self) -> String {
        // Written by hand so the keys keep the documented order.
        format!(r#"{{"http":"{}","dns":"{}"}}"#, self.http, self.dns)
    }

    /// The live counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Serves until both servers stop (they stop only on a fatal socket error).
    pub async fn wait(mut self) {
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for RunningFakes {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Binds both ports on 127.0.0.1 and starts serving.
///
/// # Errors
/// When a port cannot be bound.
pub async fn start(config: FakeConfig) -> std::io::Result<RunningFakes> {
    let listener = TcpListener::bind(("127.0.0.1", config.http_port)).await?;
    let socket = UdpSocket::bind(("127.0.0.1", config.dns_port)).await?;
    let http = listener.local_addr()?;
    let dns = socket.local_addr()?;
    let shared = Arc::new(Shared {
        config,
        stats: Stats::default(),
    });
    let tasks = vec![
        tokio::spawn(http::serve(listener, Arc::clone(&shared))),
        tokio::spawn(dns::serve(socket, Arc::clone(&shared))),
    ];
    Ok(RunningFakes {
        http,
        dns,
        shared,
        tasks,
    })
}
