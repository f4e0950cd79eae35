//! A small driver for instruction-count profiling of the admit decision:
//! `valgrind --tool=callgrind --toggle-collect='*admit_loop*' target/release/admit_profile full 1000 20000`.
//!
//! Runs the engine bench policy ([`fairgate_benches::POLICY`]; `full`, or `core` without its
//! rules, or `one`: [`fairgate_benches::ONE_BANDWIDTH_POLICY`]) over `keys` API keys
//! round-robin, first inserting every key, then `iters` decisions inside `admit_loop`, so that
//! callgrind can count only the steady state.

use fairgate_benches::{core_policy, decide, keys, ONE_BANDWIDTH_POLICY, POLICY};
use fairgate_middleware::Engine;
use fairgate_policies::PolicyStore;

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
    let yaml = match mode.as_str() {
        "core" => core_policy(),
        "one" => ONE_BANDWIDTH_POLICY.to_owned(),
        _ => POLICY.to_owned(),
    };
    let engine = Engine::new(PolicyStore::from_yaml_str(&yaml, "profile.yaml").expect("policy"));
    let keys = keys(n_keys.max(1));
    for k in &keys {
        decide(&engine, k);
    }
    admit_loop(&engine, &keys, iters);
}
