//! [`HickoryPtrResolver`]: the [`PtrResolver`] port over hickory-resolver.
//!
//! The crate docs explain the concurrency and deadline design. This module maps what hickory
//! 0.26 returns onto [`PtrOutcome`]s:
//!
//! | hickory result | outcome |
//! |---|---|
//! | answer with a usable PTR target | `ok`, TTL of the chosen record |
//! | answer whose PTR targets are all unusable | `invalid_name` |
//! | `NoRecordsFound` (NXDOMAIN, or NOERROR with no PTR: NODATA) | `nxdomain` |
//! | `ResponseCode(..)` (SERVFAIL, REFUSED, FORMERR, NOTIMP, others) | `servfail` |
//! | hickory's `Timeout`, or our outer deadline | `timeout` |
//! | transport failures (I/O, no connection, busy, malformed answer) | `servfail` |
//!
//! A transport failure is `servfail` because no server gave an answer we could use, and both
//! back off the same way; `timeout` is kept for "nothing came back in time".

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use enrichd_core::ports::{PtrReport, PtrResolver};
use enrichd_core::scope::is_global;
use enrichd_core::{CanonicalIp, PtrOutcome};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use crate::DnsConfig;
use crate::name::{Choice, choose};

/// Why a [`HickoryPtrResolver`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// `concurrency` was 0: no lookup could ever run.
    #[error("dns concurrency must be at least 1")]
    ZeroConcurrency,
    /// `timeout` was 0: every lookup would time out.
    #[error("dns timeout must be greater than zero")]
    ZeroTimeout,
    /// No servers were configured and the system's resolver configuration is unreadable.
    #[error("cannot read the system resolver configuration")]
    SystemConfig(#[source] NetError),
    /// hickory refused the configuration.
    #[error("cannot build the dns resolver")]
    Build(#[source] NetError),
}

/// Reverse DNS over hickory-resolver, with enrichd's deadline, concurrency, outcome and name
/// rules. Cheap to share behind an `Arc`; every clone of that `Arc` shares one concurrency
/// budget.
pub struct HickoryPtrResolver {
    /// No cache (`PtrOutcome::due` and the store decide when to ask again), one attempt (the
    /// caller retries later with backoff rather than spending the deadline on retries).
    resolver: TokioResolver,
    /// Lookups in flight; a permit is held for at most one deadline.
    permits: Semaphore,
    timeout: Duration,
    fcrdns: bool,
}

impl std::fmt::Debug for HickoryPtrResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HickoryPtrResolver")
            .field("timeout", &self.timeout)
            .field("available_permits", &self.permits.available_permits())
            .field("fcrdns", &self.fcrdns)
            .finish_non_exhaustive()
    }
}

impl HickoryPtrResolver {
    /// Builds a resolver for `config`. With no servers configured it reads the system's
    /// resolver configuration (`/etc/resolv.conf`), keeping its nameservers only: our own
    /// deadline, attempts and cache settings replace the system's options.
    ///
    /// Sends nothing: the first packet leaves on the first [`resolve`](PtrResolver::resolve).
    pub fn new(config: &DnsConfig) -> Result<Self, DnsError> {
        if config.concurrency == 0 {
            return Err(DnsError::ZeroConcurrency);
        }
        if config.timeout.is_zero() {
            return Err(DnsError::ZeroTimeout);
        }
        let mut builder = if config.servers.is_empty() {
            TokioResolver::builder_tokio().map_err(DnsError::SystemConfig)?
        } else {
            let servers = config
                .servers
                .iter()
                .map(|addr| {
                    // The port is per connection in hickory 0.26; TCP is there for answers
                    // too large for UDP (many PTR records).
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let options = builder.options_mut();
        options.timeout = config.timeout;
        options.attempts = 1;
        options.cache_size = 0;
        // hickory clamps answer TTLs to one day by default, even with the cache off; the
        // report must carry the record's own TTL (`PtrOutcome::due` clamps to [1 h, 7 d]).
        options.positive_max_ttl = Some(Duration::from_secs(u64::from(u32::MAX)));
        // /etc/hosts could answer for an attacker address with a local alias; only DNS counts.
        options.use_hosts_file = ResolveHosts::Never;
        options.max_active_requests = Ord::max(options.max_active_requests, config.concurrency);
        let resolver = builder.build().map_err(DnsError::Build)?;
        Ok(Self {
            resolver,
            permits: Semaphore::new(config.concurrency),
            timeout: config.timeout,
            fcrdns: config.fcrdns,
        })
    }

    /// Convenience: [`new`](Self::new) wrapped in an `Arc`, as the actor holds it.
    pub fn shared(config: &DnsConfig) -> Result<Arc<Self>, DnsError> {
        Self::new(config).map(Arc::new)
    }

    /// Asks the nameservers for the root zone's NS records, for `enrichd check`: a question
    /// about no address at all, so nothing about attackers leaves the machine. Any answer,
    /// NXDOMAIN included, proves a server is there.
    ///
    /// # Errors
    /// A short reason when no server answered within the deadline.
    pub async fn probe(&self) -> Result<(), String> {
        let query = self.resolver.lookup(Name::root(), RecordType::NS);
        match tokio::time::timeout(self.timeout, query).await {
            Err(_elapsed) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) if error.is_no_records_found() => Ok(()),
            Ok(Err(error)) => match classify(&error) {
                PtrOutcome::Timeout => Err("timed out".to_owned()),
                _ => Err(error.to_string()),
            },
        }
    }

    async fn lookup(&self, ip: CanonicalIp, deadline: Instant) -> PtrReport {
        let lookup = match timeout_at(deadline, self.resolver.reverse_lookup(ip.addr())).await {
            Err(_elapsed) => return PtrReport::without_name(PtrOutcome::Timeout),
            Ok(Err(error)) => {
                let outcome = classify(&error);
                debug!(%ip, %outcome, error = %error, "PTR query failed.");
                return PtrReport::without_name(outcome);
            }
            Ok(Ok(lookup)) => lookup,
        };
        let targets = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::PTR(ptr) => Some((&ptr.0, record.ttl)),
                _ => None,
            });
        match choose(targets) {
            // NOERROR whose answer holds no PTR (e.g. only a CNAME) is NODATA.
            Choice::Empty => PtrReport::without_name(PtrOutcome::Nxdomain),
            Choice::Invalid => PtrReport::without_name(PtrOutcome::InvalidName),
            Choice::Usable { name, ttl, target } => {
                let forward_confirmed = if self.fcrdns {
                    self.confirm(ip, target, deadline).await
                } else {
                    None
                };
                PtrReport {
                    outcome: PtrOutcome::Ok,
                    name: Some(name),
                    record_ttl: Some(Duration::from_secs(u64::from(ttl))),
                    forward_confirmed,
                }
            }
        }
    }

    /// Whether `target` resolves back to `ip`, within what is left of the deadline: `Some`
    /// when the forward answer (or NXDOMAIN/NODATA) says so, `None` when it is unknown
    /// (failure or deadline), so an unreachable server is never recorded as a mismatch.
    async fn confirm(&self, ip: CanonicalIp, mut target: Name, deadline: Instant) -> Option<bool> {
        target.set_fqdn(true);
        let record_type = match ip.addr() {
            IpAddr::V4(_) => RecordType::A,
            IpAddr::V6(_) => RecordType::AAAA,
        };
        match timeout_at(deadline, self.resolver.lookup(target, record_type)).await {
            Err(_elapsed) => None,
            Ok(Ok(lookup)) => Some(lookup.answers().iter().any(|record| match &record.data {
                RData::A(a) => IpAddr::V4(a.0) == ip.addr(),
                RData::AAAA(aaaa) => IpAddr::V6(aaaa.0) == ip.addr(),
                _ => false,
            })),
            Ok(Err(error)) if error.is_no_records_found() => Some(false),
            Ok(Err(_)) => None,
        }
    }
}

impl PtrResolver for HickoryPtrResolver {
    async fn resolve(&self, ip: CanonicalIp) -> PtrReport {
        // The caller filters non-global addresses; this guard makes a caller bug cost a
        // wrong outcome rather than a query about an internal address leaving the machine.
        if !is_global(ip.addr()) {
            return PtrReport::without_name(PtrOutcome::SkippedNonGlobal);
        }
        // The semaphore is never closed, so this error cannot happen; answering `servfail`
        // (retried later) is the safe reading if it ever did.
        let Ok(_permit) = self.permits.acquire().await else {
            return PtrReport::without_name(PtrOutcome::Servfail);
        };
        let started = Instant::now();
        let deadline = started + self.timeout;
        // The outer deadline bounds everything, even a hickory bug that never returns.
        let report = timeout_at(deadline, self.lookup(ip, deadline))
            .await
            .unwrap_or_else(|_elapsed| PtrReport::without_name(PtrOutcome::Timeout));
        debug!(
            %ip,
            outcome = %report.outcome,
            ptr = report.name.as_deref().unwrap_or(""),
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "PTR lookup finished."
        );
        report
    }
}

/// The outcome of a failed hickory lookup (see the module table).
fn classify(error: &NetError) -> PtrOutcome {
    match error {
        _ if error.is_no_records_found() => PtrOutcome::Nxdomain,
        NetError::Timeout => PtrOutcome::Timeout,
        // Every response code (SERVFAIL, REFUSED, FORMERR, NOTIMP, ...) and every transport
        // failure: the answer is unknown.
        _ => PtrOutcome::Servfail,
    }
}

#[cfg(test)]
mod tests {
    use hickory_resolver::net::DnsError as HickoryDnsError;
    use hickory_resolver::proto::op::ResponseCode;

    use super::*;

    #[test]
    fn classifies_hickory_errors() {
        let cases = [
            (NetError::Timeout, PtrOutcome::Timeout),
            (
                NetError::Dns(HickoryDnsError::ResponseCode(ResponseCode::ServFail)),
                PtrOutcome::Servfail,
            ),
            (
                NetError::Dns(HickoryDnsError::ResponseCode(ResponseCode::Refused)),
                PtrOutcome::Servfail,
            ),
            (NetError::NoConnections, PtrOutcome::Servfail),
            (NetError::Busy, PtrOutcome::Servfail),
        ];
        for (error, expected) in cases {
            assert_eq!(classify(&error), expected, "{error}");
        }
    }

    #[test]
    fn refuses_a_zero_concurrency_or_timeout() {
        let zero_concurrency = DnsConfig {
            servers: vec!["127.0.0.1:53".parse().unwrap()],
            concurrency: 0,
            ..DnsConfig::default()
        };
        assert!(matches!(
            HickoryPtrResolver::new(&zero_concurrency),
            Err(DnsError::ZeroConcurrency)
        ));
        let zero_timeout = DnsConfig {
            servers: vec!["127.0.0.1:53".parse().unwrap()],
            timeout: Duration::ZERO,
            ..DnsConfig::default()
        };
        assert!(matches!(
            HickoryPtrResolver::new(&zero_timeout),
            Err(DnsError::ZeroTimeout)
        ));
    }
}
