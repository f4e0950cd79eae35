//! The usage endpoint served by the tower layer in an axum app (the gateway's request path
//! is the same layer): the same JSON, the same caps, kept in the same file.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::{routing::get, Router};
use fairgate_middleware::AdmissionLayer;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

const USAGE: &str = "/.well-known/fairgate/quota";

const POLICY: &str = "version: 1
identify: {client_key: [{header: x-api-key}]}
plans:
  free: {bandwidths: ['6/min burst 6']}
default_plan: free
responses: {ratelimit_headers: always}
usage_endpoint: {path: /.well-known/fairgate/quota, self_caps: true, caps_file: caps.json}
";

fn app(policy: &std::path::Path, hits: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route(
            "/",
            get(move || async move {
                hits.fetch_add(1, Ordering::Relaxed);
                "ok"
            }),
        )
        .layer(AdmissionLayer::from_policy_file(policy).expect("the policy builds"))
}

async fn send(
    app: &Router,
    method: &str,
    path: &str,
    body: &str,
) -> (StatusCode, http::HeaderMap, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("x-api-key", "k")
        .body(axum::body::Body::from(body.to_owned()))
        .unwrap();
    req.extensions_mut()
        .insert(ConnectInfo("127.0.0.1:5000".parse::<SocketAddr>().unwrap()));
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

fn bandwidth(json: &str) -> Value {
    let v: Value = serde_json::from_str(json).unwrap();
    v["bandwidths"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_serves_the_usage_endpoint_and_keeps_caps() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let app = app(&policy, hits.clone());

    let (status, headers, _) = send(&app, "GET", "/", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["ratelimit"], "\"free-0\";r=5;t=10");

    let (status, headers, body) = send(&app, "GET", USAGE, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    let b = bandwidth(&body);
    assert_eq!(
        (
            &b["name"],
            &b["quota"],
            &b["window_seconds"],
            &b["burst"],
            &b["remaining"]
        ),
        (
            &Value::from("free-0"),
            &Value::from(6),
            &Value::from(60),
            &Value::from(6),
            &Value::from(5)
        ),
        "{body}"
    );
    assert_eq!(
        hits.load(Ordering::Relaxed),
        1,
        "the app never sees the endpoint"
    );

    // Cap 6 → 2 per minute: 5 of 6 left is 1 of 2; then held to it.
    let (status, _, body) = send(
        &app,
        "PUT",
        USAGE,
        r#"{"bandwidths": {"free-0": {"quota": 2}}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(bandwidth(&body)["remaining"], 1, "{body}");
    assert_eq!(send(&app, "GET", "/", "").await.0, StatusCode::OK);
    let (status, headers, _) = send(&app, "GET", "/", "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        headers["ratelimit-policy"],
        "\"free-0\";q=2;w=60;fairgate-burst=2"
    );
    let (status, _, body) = send(
        &app,
        "PUT",
        USAGE,
        r#"{"bandwidths": {"free-0": {"quota": 7}}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.contains("at most quota 6 per 60 s"), "{body}");

    // Kept in the caps file: a layer built anew from the policy (an app restart) has it.
    let caps = std::fs::read_to_string(dir.path().join("caps.json")).unwrap();
    assert!(caps.contains("\"k\""), "{caps}");
    let again = self::app(&policy, hits.clone());
    let (_, _, body) = send(&again, "GET", USAGE, "").await;
    assert_eq!(bandwidth(&body)["quota"], 2, "{body}");

    // Lifted.
    let (status, _, body) = send(&app, "DELETE", USAGE, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(bandwidth(&body)["quota"], 6, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["cap"], Value::Null, "{body}");

    // A path that is not the endpoint's reaches the app.
    let (status, _, _) = send(&app, "GET", "/.well-known/fairgate/quota/x", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(hits.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_the_endpoint_on_and_off_from_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    let without = POLICY.replace(
        "usage_endpoint: {path: /.well-known/fairgate/quota, self_caps: true, caps_file: caps.json}\n",
        "",
    );
    std::fs::write(&policy, &without).unwrap();
    let layer = AdmissionLayer::from_policy_file(&policy).expect("the policy builds");
    let engine = layer.engine().clone();
    let app = Router::new().fallback(|| async { "the app" }).layer(layer);

    let (status, _, body) = send(&app, "GET", USAGE, "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "the app"));

    std::fs::write(&policy, POLICY).unwrap();
    engine.store().reload().expect("reload");
    let (status, headers, body) = send(&app, "GET", USAGE, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["content-type"], "application/json", "{body}");
    assert_eq!(bandwidth(&body)["quota"], 6, "{body}");

    std::fs::write(&policy, &without).unwrap();
    engine.store().reload().expect("reload");
    let (_, _, body) = send(&app, "GET", USAGE, "").await;
    assert_eq!(body, "the app");
}
