//! Decision cost of the admission engine, beside governor's keyed limiter.
//!
//! Full pipeline: 10 rules (CIDR, user-agent, path, method, header conditions), 2 plans ×
//! 2 bandwidths, a concurrency quota and static shedding, all sized so that every request
//! is admitted (the steady-state admit path). Key sets: one hot key; 100,000 API keys drawn
//! from a Zipf distribution (s = 1, a fixed seed: a few hot clients and a long tail); and
//! 1,000,000 API keys visited round-robin (uniform: every decision a cold key). One thread,
//! and two threads (`iter_custom`) on the same engine. Beside fairgate, over the same key
//! sequences: governor's `DefaultKeyedRateLimiter<String>` (one GCRA bandwidth per key),
//! pingora-limits' `Rate` (a count-min sketch of events per 1 s window, `observe` then a
//! compare against the limit: fixed memory, approximate, no per-key state), and
//! `fairgate-no-rules`, the same quotas and shedding without the rules (the engine's own
//! share, without the policy matcher), and `fairgate-one-bandwidth`, one plan with one
//! bandwidth and nothing else (the engine at its smallest). With two threads the time is wall
//! time per decision over both threads (throughput), not per-thread latency.
//!
//! Run: `cargo bench -p fairgate-benches --bench engine`. For stable instruction counts of
//! the same decisions (wall time on a shared VM is noisy), profile
//! `benches/src/bin/admit_profile.rs` under callgrind; its doc comment has the command.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fairgate_benches::{core_policy, decide, keys, ONE_BANDWIDTH_POLICY, POLICY};
use fairgate_middleware::Engine;
use fairgate_policies::PolicyStore;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use pingora_limits::rate::Rate;

fn governor() -> DefaultKeyedRateLimiter<String> {
    let q = Quota::per_second(NonZeroU32::new(1_000_000_000).expect("nonzero"));
    RateLimiter::keyed(q)
}

/// The limit the pingora-limits contender compares against (never reached).
const PINGORA_LIMIT: isize = 1_000_000_000;

/// One key set: the keys, and the sequence of indices the timed loops visit.
struct KeySet {
    label: &'static str,
    keys: Vec<String>,
    /// Indices into `keys`, visited in order (wrapping).
    order: Vec<u32>,
}

impl KeySet {
    fn key(&self, i: u64) -> &String {
        &self.keys[self.order[(i % self.order.len() as u64) as usize] as usize]
    }
}

/// `n` keys visited round-robin.
fn uniform(label: &'static str, n: usize) -> KeySet {
    KeySet {
        label,
        keys: keys(n),
        order: (0..n as u32).collect(),
    }
}

/// `n` keys, a sequence of 2^20 visits drawn from Zipf(s = 1) over them (key 0 the
/// hottest), from a fixed seed so every run and contender sees the same sequence.
fn zipf(label: &'static str, n: usize) -> KeySet {
    let mut cdf = Vec::with_capacity(n);
    let mut total = 0.0f64;
    for rank in 1..=n {
        total += 1.0 / rank as f64;
        cdf.push(total);
    }
    // xorshift64*: deterministic, no dependency; quality is ample for picking ranks.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let order = (0..1 << 20)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let u = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            cdf.partition_point(|&c| c < u * total).min(n - 1) as u32
        })
        .collect();
    KeySet {
        label,
        keys: keys(n),
        order,
    }
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

    let sets = [
        uniform("1key", 1),
        zipf("100000keys-zipf", 100_000),
        uniform("1000000keys", 1_000_000),
    ];
    for set in &sets {
        let store = PolicyStore::from_yaml_str(POLICY, "bench.yaml").expect("bench policy");
        let engine = Engine::new(store);
        // The same quotas and shedding without the 10 rules: the engine's own share.
        let core_policy = core_policy();
        let core = Engine::new(
            PolicyStore::from_yaml_str(&core_policy, "core.yaml").expect("core policy"),
        );
        // One plan with one bandwidth, no rules: the engine at its smallest, beside governor.
        let one = Engine::new(
            PolicyStore::from_yaml_str(ONE_BANDWIDTH_POLICY, "one.yaml").expect("one policy"),
        );
        let gov = governor();
        let rate = Rate::new(Duration::from_secs(1));
        // Insert every key once so the timed loop is the steady state.
        for k in &set.keys {
            decide(&engine, k);
            decide(&core, k);
            decide(&one, k);
            let _ = gov.check_key(k);
            let _ = rate.observe(k, 1);
        }
        for &threads in &[1u64, 2] {
            let label = format!("{}/{threads}thr", set.label);
            group.bench_function(BenchmarkId::new("fairgate", &label), |b| {
                b.iter_custom(|iters| threaded(iters, threads, |i| decide(&engine, set.key(i))))
            });
            group.bench_function(BenchmarkId::new("fairgate-no-rules", &label), |b| {
                b.iter_custom(|iters| threaded(iters, threads, |i| decide(&core, set.key(i))))
            });
            group.bench_function(BenchmarkId::new("fairgate-one-bandwidth", &label), |b| {
                b.iter_custom(|iters| threaded(iters, threads, |i| decide(&one, set.key(i))))
            });
            group.bench_function(BenchmarkId::new("governor", &label), |b| {
                b.iter_custom(|iters| {
                    threaded(iters, threads, |i| {
                        let _ = black_box(gov.check_key(set.key(i)));
                    })
                })
            });
            group.bench_function(BenchmarkId::new("pingora-limits", &label), |b| {
                b.iter_custom(|iters| {
                    threaded(iters, threads, |i| {
                        assert!(black_box(rate.observe(set.key(i), 1)) <= PINGORA_LIMIT);
                    })
                })
            });
        }
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
