//! Shared helpers for the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use fairgate_middleware::{Decision, Engine, HttpHeaders, ManualClock, RequestFacts};
use fairgate_policies::PolicyStore;
use http::HeaderMap;

pub const S: u64 = 1_000_000_000;

/// An engine over a YAML policy with a manual clock standing at 1000 s.
pub fn engine(yaml: &str) -> (Arc<Engine>, Arc<ManualClock>, PolicyStore) {
    let store = PolicyStore::from_yaml_str(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    let clock = ManualClock::new(1000 * S);
    let engine = Engine::with_clock(store.clone(), clock.clone());
    (engine, clock, store)
}

/// A request description.
pub struct Req {
    pub peer: IpAddr,
    pub method: &'static str,
    pub path: &'static str,
    pub query: Option<&'static str>,
    pub operation: Option<&'static str>,
    pub headers: HeaderMap,
}

impl Req {
    pub fn from(peer: &str) -> Req {
        Req {
            peer: peer.parse().unwrap(),
            method: "GET",
            path: "/",
            query: None,
            operation: None,
            headers: HeaderMap::new(),
        }
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Req {
        self.headers.append(name, value.parse().unwrap());
        self
    }

    pub fn path(mut self, p: &'static str) -> Req {
        self.path = p;
        self
    }

    pub fn method(mut self, m: &'static str) -> Req {
        self.method = m;
        self
    }

    pub fn op(mut self, o: &'static str) -> Req {
        self.operation = Some(o);
        self
    }

    pub fn decide(&self, engine: &Engine) -> Decision {
        let headers = HttpHeaders(&self.headers);
        engine.decide(&RequestFacts {
            peer: self.peer,
            method: self.method,
            host: "example.test",
            path: self.path,
            query: self.query,
            operation: self.operation,
            headers: &headers,
        })
    }
}

/// Decides and immediately drops the ticket; true if admitted.
pub fn admit(engine: &Engine, req: &Req) -> bool {
    req.decide(engine).is_admit()
}

/// Counts admissions of `n` requests at the current time.
pub fn admit_n(engine: &Engine, req: &Req, n: usize) -> usize {
    (0..n).filter(|_| admit(engine, req)).count()
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
