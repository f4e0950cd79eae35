//! Shared inputs for fairgate's benches and profiling drivers: the engine bench policy and a
//! header-free way to describe a request. Benches live in `benches/`, drivers in `src/bin/`.
//! This crate owns no product code and must not be depended on by the product crates.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::ControlFlow;

use fairgate_middleware::{Decision, Engine, HeaderValues, RequestFacts};
use fairgate_policies::compiled::HeaderSource;

/// The engine bench policy: 10 rules (CIDR, user-agent, path, method, header conditions),
/// 2 plans × 2 bandwidths, a concurrency quota and static shedding, sized so that every
/// request of [`decide`] is admitted.
pub const POLICY: &str = "version: 1
identify:
  trusted_proxies: [10.0.0.0/8]
  client_key: [{header: x-api-key}]
rules:
  - name: bad-net-1
    when: {ip: [203.0.113.0/24, 198.51.100.0/24]}
    action: deny
  - name: bad-net-2
    when: {ip: ['2001:db8:dead::/48']}
    action: deny
  - name: scanners
    when: {user_agent: {contains: [sqlmap, nikto, masscan]}}
    action: deny
  - name: old-clients
    when: {user_agent: {prefix: 'legacy-client/0.'}}
    action: deny
  - name: admin
    when: {path: {prefix: /admin}}
    action: deny
  - name: dotfiles
    when: {path: {glob: '**/.*'}}
    action: deny
  - name: login
    when: {path: /login, method: [POST]}
    action: {limit: {rate: 5/min}}
  - name: debug-header
    when: {headers: [{name: x-debug, present: true}]}
    action: deny
  - name: batch
    when: {headers: [{name: x-batch, present: true}]}
    action: {tag: {priority: sheddable}}
  - name: wp
    when: {path: {regex: '^/wp-(admin|login)'}}
    action: deny
plans:
  free:
    bandwidths: ['1000000000/s burst 1000000000', '100000000000/day burst 100000000000']
    concurrency: 1000
  pro:
    bandwidths: ['1000000000/s burst 2000000000', '200000000000/day burst 200000000000']
    concurrency: 2000
default_plan: free
shedding:
  limit: {static: 100000}
state: {max_keys: 4000000}
";

/// Headers without the `http` crate: user-agent, forwarded-for and the API key.
pub struct Headers<'a> {
    /// The `x-api-key` value.
    pub key: &'a str,
}

impl HeaderSource for Headers<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        match name {
            "x-api-key" => Some(self.key),
            "user-agent" => Some("bench-client/1.0"),
            "x-forwarded-for" => Some("192.0.2.44"),
            _ => None,
        }
    }
}

impl HeaderValues for Headers<'_> {
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str) -> ControlFlow<()>) {
        if let Some(v) = self.header(name) {
            let _ = f(v);
        }
    }
}

/// The peer of [`decide`]'s requests: a trusted proxy (10.0.0.0/8).
pub const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));

/// One admit decision for API key `key` from a trusted proxy; panics if it is not admitted.
pub fn decide(engine: &Engine, key: &str) {
    let headers = Headers { key };
    let facts = RequestFacts {
        // A constant, not parsed per call: an adapter gets the peer as a `SocketAddr`, and
        // parsing text here (≈ 190 instructions) was harness cost counted as the engine's.
        peer: PEER,
        method: "GET",
        host: "api.example",
        path: "/v1/items",
        query: None,
        operation: None,
        headers: &headers,
    };
    match engine.decide(&facts) {
        Decision::Admit(a) => drop(black_box(a)),
        Decision::Reject(r) => panic!("the bench policy must admit: {r:?}"),
    }
}

/// [`POLICY`] without its `rules:` section: the engine's own share, without the matcher.
pub fn core_policy() -> String {
    let start = POLICY.find("rules:").expect("rules");
    let end = POLICY.find("plans:").expect("plans");
    format!("{}{}", &POLICY[..start], &POLICY[end..])
}

/// The smallest policy of the engine's kind, for issue #15's "one bandwidth, no rules" target
/// beside governor's keyed limiter: clients by API key, one plan with one bandwidth, nothing
/// else (no rules, trusted proxies, concurrency, operations or shedding).
pub const ONE_BANDWIDTH_POLICY: &str = "version: 1
identify:
  client_key: [{header: x-api-key}]
plans:
  free:
    bandwidths: ['1000000000/s burst 1000000000']
default_plan: free
state: {max_keys: 4000000}
";

/// `n` distinct API keys.
pub fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("api-key-{i:012}")).collect()
}
