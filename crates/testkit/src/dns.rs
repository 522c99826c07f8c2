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
//! A zone can also answer for every address ([`Zone::every_address`]): a PTR for each reverse
//! name, built by a function, and the A or AAAA record that leads back. `enrichd-fakes` serves
//! such a zone to benchmarks, where no zone could list every address in advance.
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

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
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

/// Answers for names the zone does not list: a PTR for every address, and the forward record
/// of every name so made. See [`Zone::every_address`].
#[derive(Debug, Clone, Copy)]
struct Synthesis {
    /// The PTR target of an address (presentation form, trailing dot).
    ptr: fn(IpAddr) -> String,
    /// The address a name made by `ptr` leads back to; `None` for any other name.
    forward: fn(&str) -> Option<IpAddr>,
    ttl: u32,
}

/// Owner, primary server and mailbox of the SOA record sent with every negative answer.
#[derive(Debug, Clone)]
struct Authority {
    owner: Name,
    mname: Name,
    rname: Name,
}

impl Default for Authority {
    fn default() -> Self {
        Self {
            owner: Name::from_str("arpa.").unwrap(),
            mname: Name::from_str("ns.example.test.").unwrap(),
            rname: Name::from_str("hostmaster.example.test.").unwrap(),
        }
    }
}

/// The data a [`DnsServer`] answers from: records and per-name behaviours.
#[derive(Debug, Clone, Default)]
#[must_use = "a zone is built by chaining; pass it to DnsServer::start"]
pub struct Zone {
    entries: HashMap<LowerName, Entry>,
    rotate_answers: bool,
    synthesis: Option<Synthesis>,
    authority: Authority,
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

    /// Answers for every address the zone does not list: a PTR query for a full reverse name
    /// gets `ptr(address)`, and an A or AAAA query for a name that `forward` maps to an
    /// address of that family gets the address, both with `ttl`; anything else unlisted is
    /// NXDOMAIN. `forward` must invert `ptr`, so forward confirmation of every name succeeds.
    pub fn every_address(
        mut self,
        ptr: fn(IpAddr) -> String,
        forward: fn(&str) -> Option<IpAddr>,
        ttl: u32,
    ) -> Self {
        self.synthesis = Some(Synthesis { ptr, forward, ttl });
        self
    }

    /// Sends negative answers with an SOA for `origin` (`ns.<origin>`, `hostmaster.<origin>`)
    /// instead of the default one for `arpa.`.
    ///
    /// # Panics
    /// If `origin` is not a valid name.
    pub fn authority(mut self, origin: &str) -> Self {
        let owner = parse_name(origin);
        let under = |label: &str| {
            owner
                .prepend_label(label)
                .unwrap_or_else(|e| panic!("bad name {label}.{origin}: {e}"))
        };
        self.authority = Authority {
            mname: under("ns"),
            rname: under("hostmaster"),
            owner,
        };
        self
    }
}

/// How many packets a [`DnsServer`] has received, answered or not; a handle that outlives
/// a borrow of the server and can be reset.
#[derive(Debug, Clone, Default)]
pub struct QueryCounter(Arc<AtomicUsize>);

impl QueryCounter {
    /// Packets received since the start or the last [`QueryCounter::reset`].
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Starts counting from zero again.
    pub fn reset(&self) {
        self.0.store(0, Ordering::SeqCst);
    }

    /// Counts one packet; returns how many came before it.
    fn count(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst)
    }
}

/// A running loopback DNS server; stops when dropped.
#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddr,
    queries: QueryCounter,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    /// Starts a server answering from `zone` on `127.0.0.1:<random port>` (UDP).
    ///
    /// # Panics
    /// If the socket or the server thread cannot be set up.
    pub fn start(zone: Zone) -> Self {
        Self::spawn(LOOPBACK_ANY_PORT, Some(zone)).expect("start the dns server")
    }

    /// Starts a server that reads and counts every query and never answers.
    ///
    /// # Panics
    /// If the socket or the server thread cannot be set up.
    pub fn silent() -> Self {
        Self::spawn(LOOPBACK_ANY_PORT, None).expect("start the dns server")
    }

    /// Starts a server answering from `zone` on `addr` (UDP).
    ///
    /// # Errors
    /// When the address cannot be bound or the server thread cannot start.
    pub fn bind(addr: SocketAddr, zone: Zone) -> std::io::Result<Self> {
        Self::spawn(addr, Some(zone))
    }

    fn spawn(addr: SocketAddr, zone: Option<Zone>) -> std::io::Result<Self> {
        let std_socket = std::net::UdpSocket::bind(addr)?;
        std_socket.set_nonblocking(true)?;
        let addr = std_socket.local_addr()?;
        let queries = QueryCounter::default();
        let (shutdown, mut stop) = oneshot::channel();
        let counter = queries.clone();
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
                                let seq = counter.count();
                                let Some(zone) = zone.as_ref() else { continue };
                                if let Some(reply) = respond(zone, &buf[..len], seq) {
                                    let _ = socket.send_to(&reply, peer).await;
                                }
                            }
                        }
                    }
                });
            })?;
        Ok(Self {
            addr,
            queries,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The server's address (`127.0.0.1:<port>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many packets the server has received, answered or not.
    pub fn queries(&self) -> usize {
        self.queries.get()
    }

    /// A handle on the query count, for whoever reports it apart from the server.
    pub fn query_counter(&self) -> QueryCounter {
        self.queries.clone()
    }
}

/// `127.0.0.1:0`: a port the OS picks.
const LOOPBACK_ANY_PORT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

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

fn soa_record(authority: &Authority) -> Record {
    Record::from_rdata(
        authority.owner.clone(),
        60,
        RData::SOA(SOA::new(
            authority.mname.clone(),
            authority.rname.clone(),
            1,
            3600,
            600,
            86400,
            60,
        )),
    )
}

/// The answer an [`Zone::every_address`] zone gives to a name it does not list, if any.
fn synthesize(synthesis: Synthesis, query: &Query) -> Option<Record> {
    let name = query.name();
    let rdata = match query.query_type() {
        RecordType::PTR => name
            .parse_arpa_name()
            .ok()
            .filter(|net| net.prefix_len() == net.max_prefix_len())
            .and_then(|net| Name::from_str(&(synthesis.ptr)(net.addr())).ok())
            .map(|target| RData::PTR(PTR(target))),
        RecordType::A => match (synthesis.forward)(&name.to_ascii()) {
            Some(IpAddr::V4(v4)) => Some(RData::A(A(v4))),
            _ => None,
        },
        RecordType::AAAA => match (synthesis.forward)(&name.to_ascii()) {
            Some(IpAddr::V6(v6)) => Some(RData::AAAA(AAAA(v6))),
            _ => None,
        },
        _ => None,
    }?;
    Some(Record::from_rdata(name.clone(), synthesis.ttl, rdata))
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
            reply.add_authority(soa_record(&zone.authority));
        }
        return reply.to_vec().ok();
    }

    match entry {
        None => {
            if let Some(record) = zone.synthesis.and_then(|s| synthesize(s, &query)) {
                reply.add_answer(record);
            } else {
                reply.metadata.response_code = ResponseCode::NXDomain;
                reply.add_authority(soa_record(&zone.authority));
            }
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
                reply.add_authority(soa_record(&zone.authority));
            }
            reply.add_answers(answers);
        }
    }
    reply.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ptr_of(ip: IpAddr) -> String {
        format!("h-{}.every.test.", ip.to_string().replace(['.', ':'], "-"))
    }

    fn forward_of(name: &str) -> Option<IpAddr> {
        let label = name.strip_prefix("h-")?.strip_suffix(".every.test.")?;
        label.replace('-', ".").parse().ok()
    }

    fn ask(server: &DnsServer, name: &Name, rtype: RecordType) -> Message {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut query = Message::query();
        query.metadata.id = 7;
        query.add_query(Query::query(name.clone(), rtype));
        socket
            .send_to(&query.to_vec().unwrap(), server.addr())
            .unwrap();
        let mut buf = [0u8; 4096];
        let len = socket.recv(&mut buf).unwrap();
        Message::from_vec(&buf[..len]).unwrap()
    }

    #[test]
    fn an_every_address_zone_names_each_address_and_leads_back() {
        let server = DnsServer::start(
            Zone::new()
                .ptr("8.8.8.8".parse().unwrap(), "dns.google.", 300)
                .every_address(ptr_of, forward_of, 3600)
                .authority("every.test."),
        );
        let ip: IpAddr = "45.155.205.233".parse().unwrap();
        let reply = ask(&server, &reverse_name(ip), RecordType::PTR);
        assert_eq!(reply.metadata.id, 7);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(reply.answers[0].ttl, 3600);
        let RData::PTR(PTR(target)) = &reply.answers[0].data else {
            panic!("not a PTR: {reply:?}")
        };
        assert_eq!(target.to_ascii(), "h-45-155-205-233.every.test.");

        let forward = ask(&server, target, RecordType::A);
        assert_eq!(
            forward.answers[0].data,
            RData::A(A("45.155.205.233".parse().unwrap()))
        );
        // The listed address keeps its own record.
        let listed = ask(
            &server,
            &reverse_name("8.8.8.8".parse().unwrap()),
            RecordType::PTR,
        );
        assert_eq!(
            listed.answers[0].data,
            RData::PTR(PTR(Name::from_str("dns.google.").unwrap()))
        );
        // A name the zone neither lists nor makes, or the wrong family, is NXDOMAIN with the
        // zone's own SOA.
        for (name, rtype) in [
            ("dns.example.", RecordType::A),
            ("h-45-155-205-233.every.test.", RecordType::AAAA),
        ] {
            let reply = ask(&server, &Name::from_str(name).unwrap(), rtype);
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NXDomain,
                "{name}"
            );
            assert_eq!(
                reply.authorities[0].name,
                Name::from_str("every.test.").unwrap()
            );
        }
        assert_eq!(server.queries(), 5);
        let counter = server.query_counter();
        counter.reset();
        assert_eq!(server.queries(), 0);
    }
}
