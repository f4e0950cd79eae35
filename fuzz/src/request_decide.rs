//! Target `request_decide` (SCENARIOS.md P6 (1)): request head bytes → `httparse` →
//! identification, rules, quota and shedding in `Engine::decide` on a fixed policy that
//! uses every stage. Nothing may panic; a rejection's status and `Retry-After` must be
//! sane and the client key bounded; an untrusted peer without a key is its own client.
//!
//! The first byte picks the peer (a trusted proxy or not, IPv4 or IPv6), the second how far
//! the manual clock moves; the rest is the head. The engine lives across inputs (state
//! carries over, as in a server), with a small state table so that a full table is reached.

use std::net::IpAddr;
use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fairgate_middleware::{Decision, Engine, HeaderValues, ManualClock, Outcome, RequestFacts};
use fairgate_policies::compiled::HeaderSource;
use fairgate_policies::decode::parse_policy;
use fairgate_policies::PolicyStore;

use crate::input::Input;

/// The fixed policy: every stage, small buckets, a small state table.
pub const POLICY: &str = r#"version: 1
identify:
  trusted_proxies: [127.0.0.2/32, "2001:db8:ffff::/48"]
  ipv6_prefix: 64
  client_key: [{header: x-api-key}, {query: api_key}, bearer]
  max_key_length: 64
rules:
  - {name: health, when: {path: /healthz, ip: [10.0.0.0/8]}, action: allow}
  - {name: bad-bots, when: {user_agent: {regex: ["(?i)badbot", "sqlmap"]}}, action: deny}
  - name: legal
    when: {path: {prefix: /media/}, ip: [192.0.2.0/24, "2001:db8::/32"]}
    action: {deny: {status: 451}}
  - name: login
    when: {method: POST, path: /login}
    action: {limit: {rate: 5/min, burst: 5, key: ip}}
  - name: tenant-search
    when: {path: {glob: "/api/*/search"}}
    action: {limit: {rate: 10/s, burst: 20, key: {header: x-tenant}}}
  - name: scrapers
    mode: shadow
    when: {user_agent: {contains: [curl, python-requests], ignore_case: true}}
    action: {limit: {rate: 10/min, key: client, estimator: sketch}}
  - {name: exports, when: {operation: export}, action: {limit: {rate: 5/s, key: global}}}
  - name: internal
    when:
      host: {suffix: .internal.example.com, ignore_case: true}
      headers: [{name: x-debug, present: false}, {name: x-env, value: {exact: prod}}]
    action: {tag: {priority: critical}}
  - name: batch
    when:
      any: [{path: {prefix: /batch/}}, {headers: [{name: x-priority, value: low}]}]
      not: {method: [GET, HEAD]}
    action: {tag: {priority: sheddable}}
  - name: partners
    when: {all: [{headers: [{name: x-partner, present: true}]}, {path: {prefix: /partner/}}]}
    action: {tag: {plan: pro}}
plans:
  free: {bandwidths: ["5/s burst 5", "100/day"], concurrency: 2}
  pro: {bandwidths: ["50/s burst 50", {rate: 1000/day, name: daily}], concurrency: 8}
default_plan: free
operations:
  - {name: export, when: {path: {prefix: /export/}}, cost: 3, post_hoc: {bytes: 1KiB}}
  - {name: report, when: {path: {regex: "^/reports/[0-9]+$"}}, cost: 2, post_hoc: {duration: 250ms}}
clients:
  key-abc: {plan: pro}
  key-def: {bandwidths: ["2/s burst 4"], concurrency: 1}
burst_sharing: {enabled: true, below_utilization: 0.5}
shedding:
  limit: 16
  thresholds: {critical: 1.0, normal: 0.9, borrowed: 0.7, sheddable: 0.5}
responses: {quota_status: 429, shed_status: 503, deny_status: 403, ratelimit_headers: always}
state: {max_keys: 64}
"#;

struct Fixture {
    engine: Arc<Engine>,
    clock: Arc<ManualClock>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let policy = parse_policy(POLICY, "fuzz-policy.yaml").expect("the fixed policy parses");
        let store = PolicyStore::from_policy(policy).expect("the fixed policy compiles");
        let clock = ManualClock::new(1_000_000_000);
        let engine = Engine::with_clock(store, clock.clone());
        Fixture { engine, clock }
    })
}

/// The parsed header lines, in order; values that are not UTF-8 are unreadable (`None`).
struct Headers<'a>(Vec<(&'a str, Option<&'a str>)>);

impl HeaderSource for Headers<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| *v)
    }
}

impl HeaderValues for Headers<'_> {
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str) -> ControlFlow<()>) {
        for (n, v) in &self.0 {
            if n.eq_ignore_ascii_case(name) && f(v.unwrap_or("\u{0}")).is_break() {
                return;
            }
        }
    }
}

const PEERS: [&str; 4] = [
    "127.0.0.2",
    "198.51.100.9",
    "2001:db8:ffff::1",
    "2001:db8:1:2::3",
];

/// Runs one input; panics on a broken invariant.
pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let peer: IpAddr = input.pick(&PEERS).parse().expect("peer");
    let advance = u64::from(input.byte()) * 7_000_000;
    let head = input.rest();
    let mut slots = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut slots);
    let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
        return;
    };
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return;
    };
    let headers = Headers(
        req.headers
            .iter()
            .map(|h| (h.name, std::str::from_utf8(h.value).ok()))
            .collect(),
    );
    let host_header = headers.header("host").unwrap_or("");
    let host = host_header
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host_header, |(h, _)| h)
        .to_ascii_lowercase();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let f = fixture();
    f.clock.advance_ns(advance);
    let facts = RequestFacts {
        peer,
        method,
        host: &host,
        path,
        query,
        operation: None,
        headers: &headers,
    };
    let keyless = headers.header("x-api-key").is_none()
        && headers.header("authorization").is_none()
        && query.is_none_or(|q| !q.contains("api_key"));
    match f.engine.decide(&facts) {
        Decision::Admit(admitted) => {
            // Complete with a post-hoc outcome half the time, else drop the ticket.
            if advance % 2 == 0 {
                admitted.ticket.complete(Outcome {
                    status: 200,
                    response_bytes: advance,
                    latency: Duration::from_nanos(advance),
                });
            }
        }
        Decision::Reject(r) => {
            assert!((400..600).contains(&r.status), "status {}", r.status);
            if let Some(d) = r.retry_after {
                assert!(d >= Duration::from_secs(1), "retry after {d:?}");
            }
            let key = r.client_key.as_str();
            assert!(!key.is_empty() && key.len() <= 64, "client key {key:?}");
            // An untrusted peer without a key is its own client, whatever it forwards.
            if keyless && peer.to_string() == "198.51.100.9" {
                assert_eq!(key, "198.51.100.9");
            }
        }
    }
    if advance == 0 {
        f.engine.prune();
    }
}
