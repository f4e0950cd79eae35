//! SCENARIOS S3 (engine level): a flood of 1,000,000 distinct keys stays within
//! `max_keys`, and the heavy hitter stays limited.

mod common;

use std::net::{IpAddr, Ipv6Addr};

use common::*;
use fairgate_middleware::{Decision, HttpHeaders, RequestFacts};

#[test]
fn a_million_distinct_keys_stay_under_max_keys_and_the_heavy_hitter_stays_limited() {
    let (e, clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: ['10/s burst 5']
default_plan: free
state: {max_keys: 20000}
",
    );
    let headers = http::HeaderMap::new();
    let headers = HttpHeaders(&headers);
    let heavy: IpAddr = "192.0.2.66".parse().unwrap();
    let mut heavy_admitted = 0u64;
    let start = clock_now(&clock);
    for i in 0..1_000_000u64 {
        // 1 µs per arrival: 1 virtual second in all. Each key a new /64.
        clock.advance_ns(1_000);
        let peer = IpAddr::V6(Ipv6Addr::from(
            (0x2001_0db8u128 << 96) | (u128::from(i) << 64) | 1,
        ));
        let facts = RequestFacts {
            peer,
            method: "GET",
            host: "",
            path: "/",
            query: None,
            operation: None,
            headers: &headers,
        };
        let _ = e.decide(&facts);
        if i % 100 == 0 {
            let facts = RequestFacts {
                peer: heavy,
                ..facts
            };
            if let Decision::Admit(_) = e.decide(&facts) {
                heavy_admitted += 1;
            }
        }
        if i % 10_000 == 0 {
            assert!(e.tracked_keys() <= 20_000, "{} at {i}", e.tracked_keys());
        }
    }
    let elapsed_s = (clock_now(&clock) - start) as f64 / 1e9;
    assert!(e.tracked_keys() <= 20_000);
    assert!(e.evictions() > 0, "the flood forced evictions");
    // 10,000 attempts by the heavy hitter over ~1 s: at most burst + rate × elapsed.
    let bound = 5.0 + 10.0 * elapsed_s;
    assert!(
        (heavy_admitted as f64) <= bound,
        "heavy hitter admitted {heavy_admitted}, bound {bound}"
    );
    assert!(heavy_admitted >= 5);
}

fn clock_now(c: &fairgate_middleware::ManualClock) -> u64 {
    use fairgate_middleware::Clock;
    c.now()
}
