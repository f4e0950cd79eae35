//! Decision cost of the admission engine, beside governor's keyed limiter.
//!
//! Full pipeline: 10 rules (CIDR, user-agent, path, method, header conditions), 2 plans ×
//! 2 bandwidths, a concurrency quota and static shedding, all sized so that every request
//! is admitted (the steady-state admit path). Keys: one hot key, or 1,000,000 API keys
//! visited round-robin. One thread, and two threads (`iter_custom`) on the same engine.
//! governor's `DefaultKeyedRateLimiter<String>` checks the same key sets, and
//! `fairgate-no-rules` runs the same quotas and shedding without the rules (the engine's
//! own share, without the policy matcher). With two threads the time is wall time per
//! decision over both threads (throughput), not per-thread latency.
//!
//! Run: `cargo bench -p fairgate-benches --bench engine`. For stable instruction counts of
//! the same decisions (wall time on a shared VM is noisy), profile
//! `benches/src/bin/admit_profile.rs` under callgrind; its doc comment has the command.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fairgate_benches::{core_policy, decide, keys, POLICY};
use fairgate_middleware::Engine;
use fairgate_policies::PolicyStore;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

fn governor() -> DefaultKeyedRateLimiter<String> {
    let q = Quota::per_second(NonZeroU32::new(1_000_000_000).expect("nonzero"));
    RateLimiter::keyed(q)
}

/// Runs `iters` operations over `threads` threads; wall time.
fn threaded(iters: u64, threads: u64, op: impl Fn(u64) + Sync) -> Duration {
    let per = iters / threads;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let op = &op;
            s.spawn(move || {
                for i in 0..per {
                    op(t * per + i);
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    group.throughput(Throughput::Elements(1));
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.sample_size(20);

    for &n_keys in &[1usize, 1_000_000] {
        let keys = Arc::new(keys(n_keys));
        let store = PolicyStore::from_yaml_str(POLICY, "bench.yaml").expect("bench policy");
        let engine = Engine::new(store);
        // The same quotas and shedding without the 10 rules: the engine's own share.
        let core_policy = core_policy();
        let core = Engine::new(
            PolicyStore::from_yaml_str(&core_policy, "core.yaml").expect("core policy"),
        );
        let gov = governor();
        // Insert every key once so the timed loop is the steady state.
        for k in keys.iter() {
            decide(&engine, k);
            decide(&core, k);
            let _ = gov.check_key(k);
        }
        for &threads in &[1u64, 2] {
            let label = format!("{n_keys}keys/{threads}thr");
            group.bench_function(BenchmarkId::new("fairgate", &label), |b| {
                b.iter_custom(|iters| {
                    threaded(iters, threads, |i| {
                        decide(&engine, &keys[(i as usize) % n_keys])
                    })
                })
            });
            group.bench_function(BenchmarkId::new("fairgate-no-rules", &label), |b| {
                b.iter_custom(|iters| {
                    threaded(iters, threads, |i| {
                        decide(&core, &keys[(i as usize) % n_keys])
                    })
                })
            });
            group.bench_function(BenchmarkId::new("governor", &label), |b| {
                b.iter_custom(|iters| {
                    threaded(iters, threads, |i| {
                        let _ = black_box(gov.check_key(&keys[(i as usize) % n_keys]));
                    })
                })
            });
        }
        drop(engine);
        drop(core);
    }
    group.finish();
}

/// What reading the engine's clock costs on this machine.
fn clock(c: &mut Criterion) {
    use fairgate_middleware::{Clock, MonotonicClock};
    let mut group = c.benchmark_group("clock");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(20);
    let clock = MonotonicClock::new();
    group.bench_function("MonotonicClock::now", |b| b.iter(|| black_box(clock.now())));
    group.finish();
}

criterion_group!(benches, clock, bench);
criterion_main!(benches);
