//! Decision cost with the state backends: local, Redis `async`, Redis `exact`.
//!
//! The engine bench's policy without its rules (quotas, a concurrency quota, shedding),
//! every request admitted, one thread, one hot key or 10,000 keys round-robin:
//!
//! - `local`: `state.backend: local` (the default);
//! - `async`: `backend: redis, mode: async` — decided locally, the cost recorded in the
//!   per-key batch that a background task exchanges with Redis every 20 ms;
//! - `exact`: `mode: exact` — every decision awaits one Lua script on Redis (loopback),
//!   one request at a time (latency, not throughput: concurrent requests are pipelined on
//!   the one multiplexed connection).
//!
//! Redis is a real `redis-server` on a free loopback port (installed when missing, see
//! `fairgate_tests::redis`). Run: `cargo bench -p fairgate-benches --bench fleet`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fairgate_benches::{core_policy, decide, keys, Headers, PEER};
use fairgate_middleware::engine::Begun;
use fairgate_middleware::{fleet, Decision, Engine, RequestFacts};
use fairgate_policies::PolicyStore;
use fairgate_tests::redis::RedisServer;

fn policy(state: &str) -> String {
    core_policy().replace("state: {max_keys: 4000000}", state)
}

fn redis_state(url: &str, mode: &str) -> String {
    format!(
        "state:\n  backend: redis\n  max_keys: 4000000\n  redis: {{url: '{url}', mode: {mode}, sync_interval: 20ms, timeout: 25ms, on_failure: open}}"
    )
}

async fn decide_exact(engine: &Engine, key: &str) {
    let headers = Headers { key };
    let facts = RequestFacts {
        peer: PEER,
        method: "GET",
        host: "api.example",
        path: "/v1/items",
        query: None,
        operation: None,
        headers: &headers,
    };
    let begun = engine.begin(&facts);
    let d = match begun {
        Begun::Decided(d) => d,
        Begun::Remote(check) => check.resolve().await,
    };
    match d {
        Decision::Admit(a) => drop(black_box(a)),
        Decision::Reject(r) => panic!("the bench policy must admit: {r:?}"),
    }
}

fn bench(c: &mut Criterion) {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = rt.enter();
    let engine = |state: &str| -> (Arc<Engine>, Option<fleet::FleetHandle>) {
        let store = PolicyStore::from_yaml_str(&policy(state), "fleet.yaml").expect("policy");
        let engine = Engine::new(store);
        let handle = fleet::start(&engine).expect("fleet");
        (engine, handle)
    };
    let (local, _) = engine("state: {max_keys: 4000000}");
    let (async_, _ha) = engine(&redis_state(&redis.url(), "async"));
    let (exact, _he) = engine(&redis_state(&redis.url(), "exact"));

    let mut group = c.benchmark_group("fleet_decision");
    group.throughput(Throughput::Elements(1));
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.sample_size(20);
    for &n in &[1usize, 10_000] {
        let keys = keys(n);
        for k in &keys {
            decide(&local, k);
            decide(&async_, k);
        }
        let label = format!("{n}keys");
        group.bench_function(BenchmarkId::new("local", &label), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = i.wrapping_add(1);
                decide(&local, &keys[i % n]);
            })
        });
        group.bench_function(BenchmarkId::new("async", &label), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = i.wrapping_add(1);
                decide(&async_, &keys[i % n]);
            })
        });
        group.bench_function(BenchmarkId::new("exact", &label), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for i in 0..iters {
                        decide_exact(&exact, &keys[(i as usize) % n]).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
    // Calls over the 25 ms budget on a loaded machine are admitted (`on_failure: open`)
    // and counted: report them with the figures.
    for (name, e) in [("async", &async_), ("exact", &exact)] {
        eprintln!("{name}: {:?}", e.backend_snapshot().expect("fleet"));
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
