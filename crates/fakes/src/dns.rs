//! The DNS side: a UDP responder that answers PTR for every `in-addr.arpa` / `ip6.arpa` name
//! with a synthetic name (TTL 3600), and A/AAAA for those synthetic names (so forward
//! confirmation succeeds). Anything else is NXDOMAIN. Encoding is hickory-proto's.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

use crate::Shared;
use crate::world;

/// TTL of every synthetic record.
pub const TTL: u32 = 3600;

/// Answers queries until the socket fails for good.
pub(crate) async fn serve(socket: UdpSocket, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        shared.stats.dns_query();
        if let Some(reply) = respond(&buf[..len]) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

fn soa() -> Option<Record> {
    Some(Record::from_rdata(
        Name::from_str("fake.test.").ok()?,
        60,
        RData::SOA(SOA::new(
            Name::from_str("ns.fake.test.").ok()?,
            Name::from_str("hostmaster.fake.test.").ok()?,
            1,
            3600,
            600,
            86_400,
            60,
        )),
    ))
}

/// The reply to one packet, or `None` for a packet that is not a query.
pub fn respond(packet: &[u8]) -> Option<Vec<u8>> {
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
    let name = query.name().clone();
    let answer = match query.query_type() {
        RecordType::PTR => name
            .parse_arpa_name()
            .ok()
            .filter(|net| net.prefix_len() == net.max_prefix_len())
            .and_then(|net| Name::from_str(&world::ptr_name(net.addr())).ok())
            .map(|target| RData::PTR(PTR(target))),
        RecordType::A | RecordType::AAAA => {
            match (query.query_type(), world::forward(&name.to_ascii())) {
                (RecordType::A, Some(IpAddr::V4(v4))) => Some(RData::A(A(v4))),
                (RecordType::AAAA, Some(IpAddr::V6(v6))) => Some(RData::AAAA(AAAA(v6))),
                _ => None,
            }
        }
        _ => None,
    };
    if let Some(rdata) = answer {
        reply.add_answer(Record::from_rdata(name, TTL, rdata));
    } else {
        reply.metadata.response_code = ResponseCode::NXDomain;
        if let Some(soa) = soa() {
            reply.add_authority(soa);
        }
    }
    reply.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn ask(name: &Name, rtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 42;
        m.add_query(Query::query(name.clone(), rtype));
        Message::from_vec(&respond(&m.to_vec().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn every_reverse_name_has_a_synthetic_ptr() {
        for ip in ["45.155.205.233", "2a01:4f8::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let reply = ask(&Name::from(ip), RecordType::PTR);
            assert_eq!(reply.metadata.id, 42);
            assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
            let record = &reply.answers[0];
            assert_eq!(record.ttl, TTL);
            let RData::PTR(PTR(target)) = &record.data else {
                panic!("not a PTR: {record:?}")
            };
            assert_eq!(target.to_ascii(), world::ptr_name(ip));
        }
    }

    #[test]
    fn synthetic_names_resolve_forward_and_others_are_nxdomain() {
        let reply = ask(
            &Name::from_str("h-45-155-205-233.fake.test.").unwrap(),
            RecordType::A,
        );
        assert_eq!(
            reply.answers[0].data,
            RData::A(A("45.155.205.233".parse().unwrap()))
        );
        let reply = ask(&Name::from_str("dns.google.").unwrap(), RecordType::A);
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    }
}
