//! Target `identify` (SCENARIOS.md P6 (3)): CIDR, IP and forwarding-list parsing.
//!
//! The input is read as text, one item per line: the first line goes through
//! `identify::parse_node` and `Cidr::from_str`, the others are `X-Forwarded-For` lines
//! (or, starting with `F`, `Forwarded` lines) of a request from the peer the first byte
//! picks. Checked:
//! - a parsed node is canonical (never IPv4-mapped IPv6) and its text parses back to it;
//! - a parsed CIDR prints and parses back to itself, and its set holds its first and last
//!   (canonical) address; the key of an aggregated IP is a CIDR holding the IP;
//! - the client IP is the peer when the peer is untrusted, is canonical, and is either the
//!   peer or an untrusted address: the walk never stops on a trusted hop.

use std::net::IpAddr;
use std::ops::ControlFlow;
use std::str::FromStr;

use fairgate_middleware::identify::{aggregate, canonical_ip, client_ip, ip_key, parse_node};
use fairgate_middleware::HeaderValues;
use fairgate_policies::compiled::HeaderSource;
use fairgate_policies::matcher::IpSet;
use fairgate_policies::model::Cidr;

const PEERS: [&str; 4] = [
    "127.0.0.2",
    "198.51.100.9",
    "::ffff:127.0.0.2",
    "2001:db8:ffff::1",
];
const TRUSTED: [&str; 4] = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "2001:db8:ffff::/48",
    "192.0.2.128/25",
];

struct Forwarding<'a> {
    xff: Vec<&'a str>,
    forwarded: Vec<&'a str>,
}

impl Forwarding<'_> {
    fn values(&self, name: &str) -> &[&str] {
        match name {
            "x-forwarded-for" => &self.xff,
            "forwarded" => &self.forwarded,
            _ => &[],
        }
    }
}

impl HeaderSource for Forwarding<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.values(name).first().copied()
    }
}

impl HeaderValues for Forwarding<'_> {
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str) -> ControlFlow<()>) {
        for v in self.values(name) {
            if f(v).is_break() {
                return;
            }
        }
    }
}

fn check_ip_key(ip: IpAddr, v4: u8, v6: u8) {
    let key = ip_key(ip, v4, v6);
    let cidr = Cidr::from_str(key.as_str())
        .unwrap_or_else(|e| panic!("key {:?} of {ip} is not a CIDR: {e}", key.as_str()));
    let set = IpSet::new([cidr]);
    assert!(
        set.contains(canonical_ip(ip)),
        "{ip} not in its key {}",
        key.as_str()
    );
    assert_eq!(aggregate(ip, v4, v6), cidr.0.network(), "{ip} /{v4} /{v6}");
}

/// Runs one input; panics on a broken invariant.
pub fn check(data: &[u8]) {
    let peer: IpAddr = PEERS[usize::from(data.first().copied().unwrap_or(0)) % PEERS.len()]
        .parse()
        .expect("peer");
    let prefixes = data.get(1).copied().unwrap_or(0);
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or("");

    if let Some(ip) = parse_node(first) {
        assert_eq!(canonical_ip(ip), ip, "{first:?} parsed to a mapped address");
        assert_eq!(parse_node(&ip.to_string()), Some(ip), "{first:?}");
        check_ip_key(ip, prefixes % 33, prefixes.wrapping_mul(7) % 129);
    }
    if let Ok(c) = Cidr::from_str(first) {
        let back = Cidr::from_str(&c.to_string());
        assert_eq!(back, Ok(c), "{first:?} printed as {c}");
        let set = IpSet::new([c]);
        // IPv4-mapped addresses are IPv4 (`::ffff:a.b.c.d` is `a.b.c.d`), so an IPv6 network
        // spanning `::ffff:0:0/96` (`::/80`, `::/0`) does not hold them: only canonical
        // addresses are checked.
        for (end, addr) in [("first", c.0.network()), ("last", c.0.broadcast())] {
            if canonical_ip(addr) == addr {
                assert!(set.contains(addr), "{c} misses its {end} address {addr}");
            }
        }
    }

    let mut fwd = Forwarding {
        xff: Vec::new(),
        forwarded: Vec::new(),
    };
    for l in lines {
        match l.strip_prefix('F') {
            Some(f) => fwd.forwarded.push(f),
            None => fwd.xff.push(l),
        }
    }
    let trusted = IpSet::new(TRUSTED.iter().map(|c| Cidr::from_str(c).expect("cidr")));
    let is_trusted = |ip: IpAddr| trusted.contains(ip);
    let ip = client_ip(peer, &fwd, &is_trusted);
    let peer = canonical_ip(peer);
    assert_eq!(canonical_ip(ip), ip, "client ip {ip} is not canonical");
    if !is_trusted(peer) {
        assert_eq!(ip, peer, "an untrusted peer's headers were believed");
    } else {
        assert!(
            ip == peer || !is_trusted(ip),
            "the walk stopped on trusted {ip}"
        );
    }
}
