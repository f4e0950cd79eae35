//! Adaptive growth in the tower layer of an axum app (the gateway's request path is the same
//! layer): a client busy for a window (10 minutes, under tokio's paused clock) is answered
//! with a grown quota, a fixed client is not, and the grown quota is in the growth file.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::{routing::get, Router};
use fairgate_middleware::{AdmissionLayer, EngineBuilder, TokioClock};
use http::{Request, StatusCode};
use tower::ServiceExt;

const POLICY: &str = "version: 1
identify: {client_key: [{header: x-api-key}]}
plans:
  pro:
    bandwidths: ['60/min burst 10']
    growth: {threshold: 0.8, window: 10m, step: 0.2, max_factor: 3}
default_plan: pro
clients: {f: {fixed: true}}
responses: {ratelimit_headers: always}
state: {growth_file: growth.json}
";

async fn send(app: &Router, key: &str) -> (StatusCode, String) {
    let mut req = Request::get("/")
        .header("x-api-key", key)
        .body(axum::body::Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(ConnectInfo("127.0.0.1:5000".parse::<SocketAddr>().unwrap()));
    let res = app.clone().oneshot(req).await.unwrap();
    let policy = res
        .headers()
        .get("ratelimit-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (res.status(), policy)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_layer_grows_a_busy_client_and_not_a_fixed_one() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let engine = EngineBuilder::from_policy_file(&policy)
        .unwrap()
        .no_watch()
        .prune_interval(None)
        .clock(Arc::new(TokioClock::new()))
        .start()
        .unwrap();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(AdmissionLayer::new(Arc::clone(&engine)));

    // One request every 1.2 s (50 a minute, 83 % of 60/min) for two 10-minute windows: the
    // first window ends complete and busy, so the first request of the next one (the 500th,
    // at 600 s) takes a step, after its own answer was built: the 501st shows it.
    let mut grown_at = None;
    for i in 0..(2 * 500) {
        for key in ["a", "f"] {
            let (status, policy) = send(&app, key).await;
            assert_eq!(status, StatusCode::OK, "{key} at 83 % of its quota");
            if key == "a" && grown_at.is_none() && policy.contains("q=72") {
                grown_at = Some(i);
            }
            if key == "f" {
                assert_eq!(
                    policy, "\"pro-0\";q=60;w=60;fairgate-burst=10",
                    "a fixed quota never grows"
                );
            }
        }
        tokio::time::advance(Duration::from_millis(1200)).await;
    }
    assert_eq!(
        grown_at,
        Some(501),
        "grown by 20 % at the first request of window 1"
    );
    let usage = engine.client_usage("a").unwrap();
    assert_eq!(usage.growth.map(|g| g.steps), Some(1));
    assert_eq!(usage.bandwidths[0].ratelimit.quota, 72);
    assert_eq!(usage.bandwidths[0].ratelimit.burst, 12);
    drop(app);
    drop(engine);
    let file = std::fs::read_to_string(dir.path().join("growth.json")).unwrap();
    assert!(
        file.contains("\"a\"") && file.contains("\"steps\": 1"),
        "{file}"
    );
}
