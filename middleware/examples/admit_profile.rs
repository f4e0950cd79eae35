//! A small driver for instruction-count profiling of the admit decision:
//! `valgrind --tool=callgrind --toggle-collect='*admit_loop*' target/release/examples/admit_profile full 1000 20000`.
//!
//! Runs the bench policy of `benches/benches/engine.rs` (`full`, or `core` without its
//! rules) over `keys` API keys round-robin, first inserting every key, then `iters`
//! decisions inside `admit_loop`, so that callgrind can count only the steady state.

use std::hint::black_box;
use std::ops::ControlFlow;

use fairgate_middleware::{Decision, Engine, HeaderValues, RequestFacts};
use fairgate_policies::compiled::HeaderSource;
use fairgate_policies::PolicyStore;

const POLICY: &str = "version: 1
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

struct Headers<'a> {
    key: &'a str,
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

fn decide(engine: &Engine, key: &str) {
    let headers = Headers { key };
    let facts = RequestFacts {
        peer: std::net::IpAddr::from([10, 1, 2, 3]),
        method: "GET",
        host: "api.example",
        path: "/v1/items",
        query: None,
        operation: None,
        headers: &headers,
    };
    match engine.decide(&facts) {
        Decision::Admit(a) => drop(black_box(a)),
        Decision::Reject(r) => panic!("the profile policy must admit: {r:?}"),
    }
}

#[inline(never)]
fn admit_loop(engine: &Engine, keys: &[String], iters: usize) {
    for i in 0..iters {
        decide(engine, &keys[i % keys.len()]);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "full".into());
    let n_keys: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let iters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let yaml = if mode == "core" {
        let start = POLICY.find("rules:").expect("rules");
        let end = POLICY.find("plans:").expect("plans");
        format!("{}{}", &POLICY[..start], &POLICY[end..])
    } else {
        POLICY.to_owned()
    };
    let engine = Engine::new(PolicyStore::from_yaml_str(&yaml, "profile.yaml").expect("policy"));
    let keys: Vec<String> = (0..n_keys.max(1))
        .map(|i| format!("api-key-{i:012}"))
        .collect();
    for k in &keys {
        decide(&engine, k);
    }
    admit_loop(&engine, &keys, iters);
}
