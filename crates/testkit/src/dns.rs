//! An in-process authoritative DNS server on `127.0.0.1:<random port>`, built from a zone the
//! test writes.
//!
//! It is a tiny hand-rolled UDP responder that encodes with hickory-proto rather than a
//! hickory-server `Catalog`: the tests need answers a well-behaved authoritative server never
//! gives on purpose (SERVFAIL or REFUSED for one name, silence, names with hostile bytes,
//! answers in a different order on every query), and every packet must be counted, including
//! the ones it drops. Zones are plain maps, so they cost nothing to build in debug runs.
//!
//! The server runs on its own thread with a current-thread runtime, so it keeps answering
//! while the test's own runtime is busy (or blocked), and stops when the [`DnsServer`] drops.
//!
//! ```no_run
//! use enrichd_testkit::dns::{Behaviour, DnsServer, Zone};
//! # fn demo() {
//! let server = DnsServer::start(
//!     Zone::new()
//!         .ptr("8.8.8.8".parse().unwrap(), "dns.google.", 300)
//!         .behave("9.9.9.9".parse().unwrap(), Behaviour::Servfail),
//! );
//! let addr = server.addr(); // point the resolver at this
//! assert_eq!(server.queries(), 0);
//! # }
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

/// How the server treats queries for one name (or, for [`DnsServer::silent`], for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Answer from the zone: the records of the asked type, NODATA if the name has only other
    /// types, NXDOMAIN if the name is unknown.
    Answer,
    /// Answer SERVFAIL.
    Servfail,
    /// Answer REFUSED.
    Refused,
    /// Answer FORMERR.
    FormErr,
    /// Answer NOTIMP.
    NotImp,
    /// Answer NXDOMAIN even if the zone holds records for the name.
    Nxdomain,
    /// Answer NOERROR with an empty answer (NODATA), as for a name that has only other types.
    Nodata,
    /// Never answer: the query is read, counted and dropped.
    Silent,
}

#[derive(Debug, Clone)]
struct Entry {
    behaviour: Behaviour,
    records: Vec<Record>,
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            behaviour: Behaviour::Answer,
            records: Vec::new(),
        }
    }
}

/// The data a [`DnsServer`] answers from: records and per-name behaviours.
#[derive(Debug, Clone, Default)]
#[must_use = "a zone is built by chaining; pass it to DnsServer::start"]
pub struct Zone {
    entries: HashMap<LowerName, Entry>,
    rotate_answers: bool,
}

/// The reverse-DNS name of `ip` (`4.3.2.1.in-addr.arpa.` or the 32-nibble `ip6.arpa.` form).
pub fn reverse_name(ip: IpAddr) -> Name {
    Name::from(ip)
}

fn parse_name(name: &str) -> Name {
    let mut parsed = Name::from_ascii(name).unwrap_or_else(|e| panic!("bad name {name:?}: {e}"));
    parsed.set_fqdn(true);
    parsed
}

impl Zone {
    /// An empty zone: every name is NXDOMAIN.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &Name) -> &mut Entry {
        self.entries.entry(LowerName::new(name)).or_default()
    }

    fn add(mut self, record: Record) -> Self {
        let name = record.name.clone();
        self.entry(&name).records.push(record);
        self
    }

    /// Adds a PTR record `ip → target` (`target` in presentation form, e.g. `dns.google.`).
    /// Call several times for several PTR records on one address.
    ///
    /// # Panics
    /// If `target` is not a valid name.
    pub fn ptr(self, ip: IpAddr, target: &str, ttl: u32) -> Self {
        let target = parse_name(target);
        self.ptr_name(ip, target, ttl)
    }

    /// Adds a PTR record whose target is built from raw label bytes, so it can carry bytes a
    /// presentation-form name cannot (NUL, spaces, control bytes, a dot inside a label).
    ///
    /// # Panics
    /// If a label is empty or over 63 bytes, or the name is over 255 octets.
    pub fn ptr_raw_labels(self, ip: IpAddr, labels: &[&[u8]], ttl: u32) -> Self {
        let mut target = Name::from_labels(labels.iter().copied())
            .unwrap_or_else(|e| panic!("bad labels {labels:?}: {e}"));
        target.set_fqdn(true);
        self.ptr_name(ip, target, ttl)
    }

    /// Adds a PTR record with an already built target name.
    pub fn ptr_name(self, ip: IpAddr, target: Name, ttl: u32) -> Self {
        self.add(Record::from_rdata(
            reverse_name(ip),
            ttl,
            RData::PTR(PTR(target)),
        ))
    }

    /// Adds an A record (for forward confirmation).
    ///
    /// # Panics
    /// If `name` is not a valid name.
    pub fn a(self, name: &str, ip: Ipv4Addr, ttl: u32) -> Self {
        self.add(Record::from_rdata(parse_name(name), ttl, RData::A(A(ip))))
    }

    /// Adds an AAAA record (for forward confirmation).
    ///
    /// # Panics
    /// If `name` is not a valid name.
    pub fn aaaa(self, name: &str, ip: Ipv6Addr, ttl: u32) -> Self {
        self.add(Record::from_rdata(
            parse_name(name),
            ttl,
            RData::AAAA(AAAA(ip)),
        ))
    }

    /// Gives `ip`'s reverse name a TXT record and no PTR: a PTR query is then NODATA, the
    /// natural way (the name exists with another type).
    pub fn txt_only(self, ip: IpAddr) -> Self {
        self.add(Record::from_rdata(
            reverse_name(ip),
            300,
            RData::TXT(TXT::new(vec!["not a ptr".to_owned()])),
        ))
    }

    /// Sets how queries for `ip`'s reverse name are answered.
    pub fn behave(mut self, ip: IpAddr, behaviour: Behaviour) -> Self {
        self.entry(&reverse_name(ip)).behaviour = behaviour;
        self
    }

    /// Sets how queries for a forward name (presentation form) are answered.
    ///
    /// # Panics
    /// If `name` is not a valid name.
    pub fn behave_name(mut self, name: &str, behaviour: Behaviour) -> Self {
        self.entry(&parse_name(name)).behaviour = behaviour;
        self
    }

    /// Rotates each answer set by one more position on every query, so a client sees the same
    /// records in a different order each time.
    pub fn rotate_answers(mut self) -> Self {
        self.rotate_answers = true;
        self
    }
}

/// A running loopback DNS server; stops when dropped.
#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Starts a server answering from `zone` on `127.0.0.1:<random port>` (UDP).
    ///
    /// # Panics
    /// If the socket or the server thread cannot be set up.
    pub fn start(zone: Zone) -> Self {
        Self::spawn(Some(zone))
    }

    /// Starts a server that reads and counts every query and never answers.
    ///
    /// # Panics
    /// If the socket or the server thread cannot be set up.
    pub fn silent() -> Self {
        Self::spawn(None)
    }

    fn spawn(zone: Option<Zone>) -> Self {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        std_socket.set_nonblocking(true).expect("nonblocking");
        let addr = std_socket.local_addr().expect("local addr");
        let queries = Arc::new(AtomicUsize::new(0));
        let (shutdown, mut stop) = oneshot::channel();
        let counter = Arc::clone(&queries);
        let thread = std::thread::Builder::new()
            .name(format!("testkit-dns-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("dns server runtime");
                runtime.block_on(async move {
                    let socket = UdpSocket::from_std(std_socket).expect("tokio udp");
                    let mut buf = vec![0u8; 4096];
                    loop {
                        tokio::select! {
                            _ = &mut stop => break,
                            received = socket.recv_from(&mut buf) => {
                                let Ok((len, peer)) = received else { continue };
                                let seq = counter.fetch_add(1, Ordering::SeqCst);
                                let Some(zone) = zone.as_ref() else { continue };
                                if let Some(reply) = respond(zone, &buf[..len], seq) {
                                    let _ = socket.send_to(&reply, peer).await;
                                }
                            }
                        }
                    }
                });
            })
            .expect("spawn dns server thread");
        Self {
            addr,
            queries,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The server's address (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many packets the server has received, answered or not.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn soa_record() -> Record {
    let origin = Name::from_str("arpa.").unwrap();
    Record::from_rdata(
        origin,
        60,
        RData::SOA(SOA::new(
            Name::from_str("ns.example.test.").unwrap(),
            Name::from_str("hostmaster.example.test.").unwrap(),
            1,
            3600,
            600,
            86400,
            60,
        )),
    )
}

/// Builds the reply to one packet, or `None` to stay silent.
fn respond(zone: &Zone, packet: &[u8], seq: usize) -> Option<Vec<u8>> {
    let request = Message::from_vec(packet).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut reply = Message::response(request.metadata.id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    if request.edns.is_some() {
        reply.set_edns(Edns::new());
    }
    let Some(query) = request.queries.first().cloned() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply.to_vec().ok();
    };
    reply.add_query(query.clone());

    let entry = zone.entries.get(&LowerName::new(query.name()));
    let behaviour = entry.map_or(Behaviour::Answer, |e| e.behaviour);
    let code = match behaviour {
        Behaviour::Silent => return None,
        Behaviour::Servfail => Some(ResponseCode::ServFail),
        Behaviour::Refused => Some(ResponseCode::Refused),
        Behaviour::FormErr => Some(ResponseCode::FormErr),
        Behaviour::NotImp => Some(ResponseCode::NotImp),
        Behaviour::Nxdomain => Some(ResponseCode::NXDomain),
        Behaviour::Nodata | Behaviour::Answer => None,
    };
    if let Some(code) = code {
        reply.metadata.response_code = code;
        if code == ResponseCode::NXDomain {
            reply.add_authority(soa_record());
        }
        return reply.to_vec().ok();
    }

    match entry {
        None => {
            reply.metadata.response_code = ResponseCode::NXDomain;
            reply.add_authority(soa_record());
        }
        Some(entry) => {
            let mut answers: Vec<Record> = if behaviour == Behaviour::Nodata {
                Vec::new()
            } else {
                entry
                    .records
                    .iter()
                    .filter(|r| {
                        query.query_type() == RecordType::ANY
                            || r.record_type() == query.query_type()
                    })
                    .map(|r| {
                        let mut r = r.clone();
                        // The owner name echoes the query's spelling, as real servers do.
                        r.name = query.name().clone();
                        r
                    })
                    .collect()
            };
            if zone.rotate_answers && !answers.is_empty() {
                let by = seq % answers.len();
                answers.rotate_left(by);
            }
            if answers.is_empty() {
                reply.add_authority(soa_record());
            }
            reply.add_answers(answers);
        }
    }
    reply.to_vec().ok()
}
