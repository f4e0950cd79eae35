//! A driver for instruction-count profiling of the tower layer in an axum app, the
//! in-process counterpart of `benches/benches/layer.rs` (whose wall times swing by ±30% on a
//! shared VM; instruction counts do not):
//! `valgrind --tool=callgrind --toggle-collect='*request_loop*' target/release/layer_profile reject 10000 20000`.
//!
//! Modes: `bare` (no middleware), `admit` (`AdmissionLayer` with
//! `benches/load/policy-full.yaml`, every request admitted) and `reject` (the same, every
//! request from a `throttled-*` key that has spent its quota, so answered 429) and
//! `admit-headers` (as `admit`, with `ratelimit_headers: always`: every admitted response
//! carries `RateLimit-Policy` and `RateLimit`). The driver
//! first sends every key's requests untimed (state exists, throttled keys have spent their
//! burst), builds `iters` requests, then runs them through `Router::oneshot` inside
//! `request_loop`, dropping each response there (the ticket's release is part of the cost).
//! Subtract `bare` from a mode for what the layer adds per request.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::routing::get;
use axum::Router;
use tower::ServiceExt;

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

#[inline(never)]
fn request_loop(rt: &tokio::runtime::Runtime, router: &Router, reqs: Vec<Request<Body>>) -> usize {
    let mut ok = 0;
    for req in reqs {
        let status = rt
            .block_on(router.clone().oneshot(req))
            .map(|r| r.status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ok += usize::from(status == StatusCode::OK);
    }
    ok
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "admit".into());
    let n_keys: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let iters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
    let app = Router::new().route("/", get(|| async { "ok\n" }));
    let router = match mode.as_str() {
        "bare" => app,
        "admit" | "reject" => {
            let policy = format!("{}/load/policy-full.yaml", env!("CARGO_MANIFEST_DIR"));
            // Inside the runtime: the policy file watcher may need one.
            let layer = rt.block_on(async {
                fairgate_middleware::AdmissionLayer::from_policy_file(&policy)
                    .expect("benches/load/policy-full.yaml loads")
            });
            app.layer(layer)
        }
        "admit-headers" => {
            let path = format!("{}/load/policy-full.yaml", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).expect("benches/load/policy-full.yaml");
            assert!(text.contains("ratelimit_headers: on_reject"));
            let text = text.replace("ratelimit_headers: on_reject", "ratelimit_headers: always");
            let store = fairgate_policies::PolicyStore::from_yaml_str(&text, &path)
                .expect("the policy compiles");
            // Inside the runtime, as above (no file watcher: the policy is a string).
            let layer = rt.block_on(async {
                fairgate_middleware::AdmissionLayer::from_store(store).expect("the policy starts")
            });
            app.layer(layer)
        }
        other => panic!("unknown mode {other:?}: bare, admit, admit-headers or reject"),
    };
    let prefix = if mode == "reject" { "throttled" } else { "k" };
    let keys: Vec<HeaderValue> = (0..n_keys.max(1))
        .map(|j| HeaderValue::from_str(&format!("{prefix}-{j:06}")).expect("ascii key"))
        .collect();
    // Warm-up: every key exists; a throttled key has spent its burst of 20.
    let rounds = if mode == "reject" { 21 } else { 1 };
    for _ in 0..rounds {
        for key in &keys {
            let _ = rt.block_on(router.clone().oneshot(request(key, peer)));
        }
    }
    if mode == "admit-headers" {
        let resp = rt
            .block_on(router.clone().oneshot(request(&keys[0], peer)))
            .expect("infallible");
        assert!(
            resp.headers().contains_key("ratelimit"),
            "{mode}: no RateLimit"
        );
    }
    let reqs: Vec<Request<Body>> = (0..iters)
        .map(|i| request(&keys[i % keys.len()], peer))
        .collect();
    let ok = request_loop(&rt, &router, reqs);
    let expected = if mode == "reject" { 0 } else { iters };
    assert_eq!(
        ok, expected,
        "{mode}: admitted requests in the profiled loop"
    );
}
