//! A steady-state admit decision allocates nothing; and the state store's bytes per key.
//! Its own test binary: the counting allocator is global.
//!
//! Bytes per key: the bytes live in the allocator (sizes as requested, so without the
//! allocator's own rounding) grow by this much per client key the engine starts tracking,
//! i.e. the entry's `Arc` allocation plus the state table's share (pointer and control
//! byte per bucket, at whatever load factor the table has reached). Measured at 20,000 and
//! at 1,000,000 keys; the evicted-debt table is allocated up front and not counted (8 bytes
//! per `max_keys`, see `state/mod.rs`).

#![allow(unsafe_code)] // a GlobalAlloc wrapper is unsafe by definition; it only counts.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use fairgate_middleware::{Decision, HttpHeaders, RequestFacts};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        }
        LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const FULL_PIPELINE: &str = "version: 1
identify:
  trusted_proxies: [10.0.0.0/8]
  client_key: [{header: x-api-key}]
rules:
  - name: bad-net
    when: {ip: [203.0.113.0/24]}
    action: deny
  - name: bad-ua
    when: {user_agent: {contains: [sqlmap, nikto]}}
    action: deny
  - name: admin
    when: {path: {prefix: /admin}}
    action: deny
  - name: login
    when: {path: /login}
    action: {limit: {rate: 5/min}}
plans:
  free:
    bandwidths: ['1000000/s burst 1000000', '100000000/day burst 100000000']
    concurrency: 100
default_plan: free
shedding:
  limit: {static: 1000}
state: {max_keys: 2000000}
";

/// Issue #15's target: at most this many bytes per tracked client (issue #5's was 128).
const MAX_BYTES_PER_KEY: f64 = 96.0;

#[test]
fn steady_state_admit_allocates_nothing_and_entries_are_small() {
    let (e, clock, _) = engine(FULL_PIPELINE);
    let mut map = http::HeaderMap::new();
    map.insert("x-api-key", "key-0123456789".parse().unwrap());
    map.insert("user-agent", "curl/8.0".parse().unwrap());
    map.insert("x-forwarded-for", "192.0.2.44".parse().unwrap());
    let headers = HttpHeaders(&map);
    let facts = RequestFacts {
        peer: "10.1.2.3".parse().unwrap(),
        method: "GET",
        host: "api.example",
        path: "/v1/items",
        query: None,
        operation: None,
        headers: &headers,
    };
    // Warm up: the key's entries are created, per-thread scratch space allocated.
    for _ in 0..10 {
        assert!(e.decide(&facts).is_admit());
    }
    ALLOCS.store(0, Ordering::SeqCst);
    BYTES.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    for _ in 0..1000 {
        clock.advance_ns(1_000);
        match e.decide(&facts) {
            Decision::Admit(a) => drop(a),
            Decision::Reject(r) => panic!("{r:?}"),
        }
    }
    COUNTING.store(false, Ordering::SeqCst);
    assert_eq!(
        (ALLOCS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst)),
        (0, 0),
        "admit path allocations"
    );

    // Bytes per tracked key: 1,000,000 new clients, one entry each (the concurrency
    // counter and both bandwidths' buckets), measured at 20,000 and at 1,000,000.
    let before_keys = e.tracked_keys();
    let before = LIVE.load(Ordering::SeqCst);
    let per_key = || {
        let keys = e.tracked_keys() - before_keys;
        let bytes = LIVE.load(Ordering::SeqCst) - before;
        (bytes as f64 / keys as f64, keys)
    };
    let mut map = http::HeaderMap::new();
    let mut key = String::new();
    for i in 0..1_000_000u32 {
        use std::fmt::Write;
        key.clear();
        let _ = write!(key, "key-{i:016}");
        map.insert("x-api-key", http::HeaderValue::from_str(&key).unwrap());
        let headers = HttpHeaders(&map);
        let facts = RequestFacts {
            headers: &headers,
            ..facts
        };
        assert!(e.decide(&facts).is_admit());
        if i + 1 == 20_000 {
            let (per_key, keys) = per_key();
            eprintln!("state store: {per_key:.1} bytes per key over {keys} keys");
            assert!(
                per_key <= MAX_BYTES_PER_KEY,
                "{per_key} bytes per key at {keys}"
            );
        }
    }
    let (per_key, keys) = per_key();
    eprintln!("state store: {per_key:.1} bytes per key over {keys} keys");
    assert_eq!(keys, 1_000_000, "one entry per client, none evicted");
    assert!(
        per_key <= MAX_BYTES_PER_KEY,
        "{per_key} bytes per key at {keys}"
    );
}
