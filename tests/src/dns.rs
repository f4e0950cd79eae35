//! A DNS server the tests control: a small UDP responder on 127.0.0.1 built on hickory's
//! message types, answering A records (TTL 1 s) from a table the test changes, NXDOMAIN for
//! names it does not have, or nothing at all ([`Dns::set_answering`]`(false)`: the client
//! times out).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

/// A DNS server for the test: A records by name, TTL 1 s.
pub struct Dns {
    /// Where it answers (UDP).
    pub addr: SocketAddr,
    zone: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
    answering: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Dns {
    /// Starts a server on 127.0.0.1 (an ephemeral port) on the current runtime.
    pub async fn start() -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = socket.local_addr().unwrap();
        let zone: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>> = Arc::default();
        let answering = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn({
            let (zone, answering) = (zone.clone(), answering.clone());
            async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                        continue;
                    };
                    if !answering.load(Ordering::SeqCst) {
                        continue; // a server that does not answer: the client times out
                    }
                    let Ok(query) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    let reply = answer(&query, &zone.lock().unwrap());
                    let _ = socket.send_to(&reply.to_vec().unwrap(), peer).await;
                }
            }
        });
        Dns {
            addr,
            zone,
            answering,
            task,
        }
    }

    /// Answers `name` with `ips` from now on.
    pub fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        self.zone
            .lock()
            .unwrap()
            .insert(name.to_owned(), ips.to_vec());
    }

    /// Answers NXDOMAIN for `name` from now on.
    pub fn remove(&self, name: &str) {
        self.zone.lock().unwrap().remove(name);
    }

    /// Whether it answers at all.
    pub fn set_answering(&self, on: bool) {
        self.answering.store(on, Ordering::SeqCst);
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply to `query`: its A records (TTL 1 s), an empty answer for other types of a known
/// name, NXDOMAIN for an unknown name.
fn answer(query: &Message, zone: &HashMap<String, Vec<Ipv4Addr>>) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    for q in query.queries() {
        reply.add_query(q.clone());
        let name = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        match zone.get(&name) {
            None => {
                reply.set_response_code(ResponseCode::NXDomain);
            }
            Some(ips) if q.query_type() == RecordType::A => {
                for ip in ips {
                    reply.add_answer(Record::from_rdata(q.name().clone(), 1, RData::A(A(*ip))));
                }
            }
            Some(_) => {}
        }
    }
    reply
}
