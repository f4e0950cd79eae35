//! The tower layer in an axum app: what `AdmissionLayer` adds to a request, against bare axum
//! and against `tower_governor` keyed by the same API keys.
//!
//! Each variant is the same axum `GET /` router on one current-thread runtime, driven in
//! process (`oneshot` on a clone of the router, as a server does per request), so the time per
//! iteration is the CPU the app spends on a request without the sockets' noise; the load
//! harness (`benches/load/run.sh --contenders axum`) measures the same app served on
//! 127.0.0.1. Requests, with their `x-api-key` (rotating over 100,000 keys) and `ConnectInfo`,
//! are built in the untimed setup; only the call is timed. Variants:
//!
//! - `bare`: no middleware;
//! - `governor`: `tower_governor`, 1000/s burst 2000 per `x-api-key` (never hit);
//! - `fairgate_admit`: `AdmissionLayer` with `benches/load/policy-full.yaml`, every request
//!   admitted (limits never hit);
//! - `fairgate_reject30`: the same, 3 requests in 10 from a key that has spent its quota;
//! - `fairgate_reject`: the same, every request rejected with 429 (the cost of a rejection);
//! - `fairgate_admit_default_cap`: as `fairgate_admit`, but with the default `state.max_keys`
//!   (100,000), so the 100,000 clients fill the store to its cap.
//!
//! Added CPU per request is a variant's time minus `bare`'s; BENCHMARKS.md records both.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::routing::get;
use axum::Router;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tower::ServiceExt;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

/// Distinct client keys the requests rotate over.
const KEYS: usize = 100_000;
/// Distinct keys of the clients over quota (as in the load harness's `keys.lua`).
const THROTTLED_KEYS: usize = 1_000;

/// tower_governor key: the `x-api-key` header, owned (governor's keyed state stores it).
#[derive(Debug, Clone, Copy)]
struct ApiKey;

impl KeyExtractor for ApiKey {
    type Key = String;

    fn extract<T>(&self, req: &Request<T>) -> Result<String, GovernorError> {
        req.headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

fn app() -> Router {
    Router::new().route("/", get(|| async { "ok\n" }))
}

fn policy_path() -> String {
    format!("{}/load/policy-full.yaml", env!("CARGO_MANIFEST_DIR"))
}

/// The full policy without its `max_keys` line (so with the default cap), written to a
/// temporary file that lives as long as the returned guard.
fn default_cap_policy() -> tempfile::TempPath {
    let full = std::fs::read_to_string(policy_path()).expect("benches/load/policy-full.yaml");
    let text: String = full
        .lines()
        .filter(|l| !l.trim_start().starts_with("max_keys:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut file = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    std::io::Write::write_all(&mut file, text.as_bytes()).expect("write policy");
    file.into_temp_path()
}

/// The key sequence of a variant: `reject_tenths` of every 10 requests come from one of the
/// 1,000 `throttled-*` keys, which the policy puts on a plan of 1/day burst 20.
fn keys(reject_tenths: usize) -> Vec<HeaderValue> {
    (0..KEYS)
        .map(|j| {
            let key = if j % 10 < reject_tenths {
                format!("throttled-{:06}", j % THROTTLED_KEYS)
            } else {
                format!("k-{j:06}")
            };
            HeaderValue::from_str(&key).expect("ascii key")
        })
        .collect()
}

fn request(key: &HeaderValue, peer: SocketAddr) -> Request<Body> {
    let mut req = Request::builder()
        .uri("/")
        .header("x-api-key", key.clone())
        .header("user-agent", "wrk")
        .body(Body::empty())
        .expect("valid request");
    req.extensions_mut().insert(ConnectInfo(peer));
    req
}

fn bench_layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");

    let governor = GovernorConfigBuilder::default()
        .per_millisecond(1)
        .burst_size(2000)
        .key_extractor(ApiKey)
        .finish()
        .expect("quota");
    let fairgate = || {
        fairgate_middleware::AdmissionLayer::from_policy_file(policy_path())
            .expect("benches/load/policy-full.yaml loads")
    };
    let small = default_cap_policy();
    let fairgate_default_cap = fairgate_middleware::AdmissionLayer::from_policy_file(&small)
        .expect("the default-cap policy loads");

    // (name, router, tenths of the requests that come from a spent key)
    let variants: Vec<(&str, Router, usize)> = vec![
        ("bare", app(), 0),
        ("governor", app().layer(GovernorLayer::new(governor)), 0),
        ("fairgate_admit", app().layer(fairgate()), 0),
        ("fairgate_reject30", app().layer(fairgate()), 3),
        ("fairgate_reject", app().layer(fairgate()), 10),
        (
            "fairgate_admit_default_cap",
            app().layer(fairgate_default_cap),
            0,
        ),
    ];

    let mut group = c.benchmark_group("axum_layer");
    group.throughput(Throughput::Elements(1));
    for (name, router, reject_tenths) in variants {
        let keys = keys(reject_tenths);
        let mut i = 0usize;
        let mut warmed = false;
        group.bench_function(BenchmarkId::new("100k_keys", name), |b| {
            // Untimed warm-up, once, and only when this variant is selected: every key's
            // state exists and the throttled keys have spent their burst of 20, so the timed
            // calls see steady state. Then check the steady-state status.
            if !warmed {
                warmed = true;
                let rounds = if reject_tenths == 0 { 1 } else { 3 };
                for _ in 0..rounds {
                    for key in &keys {
                        let _ = rt.block_on(router.clone().oneshot(request(key, peer)));
                    }
                }
                let resp = rt
                    .block_on(router.clone().oneshot(request(&keys[0], peer)))
                    .expect("infallible");
                let expected = if reject_tenths > 0 {
                    StatusCode::TOO_MANY_REQUESTS
                } else {
                    StatusCode::OK
                };
                assert_eq!(resp.status(), expected, "{name}: steady-state status");
            }
            b.iter_batched(
                || {
                    i = (i + 1) % KEYS;
                    (router.clone(), request(&keys[i], peer))
                },
                // The response is dropped inside the timed part: releasing the admission
                // ticket (concurrency permit) on drop is part of the layer's cost.
                |(router, req)| rt.block_on(router.oneshot(req)).map(|resp| resp.status()),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
    drop(small);
}

criterion_group!(benches, bench_layer);
criterion_main!(benches);
