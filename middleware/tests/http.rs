//! The layer in a real axum app on 127.0.0.1:0, driven by a real HTTP client.

use std::net::SocketAddr;

use axum::{routing::get, Router};
use fairgate_middleware::AdmissionLayer;
use fairgate_policies::PolicyStore;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const POLICY: &str = "version: 1
identify:
  client_key: [{header: x-api-key}]
plans:
  free:
    bandwidths: ['1/min burst 3']
  shared:
    bandwidths: ['1/h burst 10']
default_plan: free
clients:
  team-100:
    plan: shared
";

/// Serves the app; returns its address and the server task.
async fn serve() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let store = PolicyStore::from_yaml_str(POLICY, "policy.yaml").unwrap_or_else(|e| panic!("{e}"));
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(AdmissionLayer::from_store(store).expect("a local policy builds"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    (addr, task)
}

/// One request on its own new connection.
async fn get_once(addr: SocketAddr, key: &str) -> http::Response<bytes::Bytes> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "localhost")
        .header("x-api-key", key)
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    drop(sender);
    let _ = conn.await;
    http::Response::from_parts(parts, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_answers_429_with_headers_and_problem_json() {
    let (addr, server) = serve().await;
    // A pooled client too, to show keep-alive connections behave the same.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    for _ in 0..3 {
        let req = Request::get(format!("http://{addr}/"))
            .header("x-api-key", "k-1")
            .body(Empty::new())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = resp.into_body().collect().await.unwrap();
    }
    let resp = get_once(addr, "k-1").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = resp.headers();
    assert_eq!(h["retry-after"], "60", "1/min burst 3: next unit in 60 s");
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(
        h["ratelimit-policy"],
        "\"free-0\";q=1;w=60;fairgate-burst=3"
    );
    assert_eq!(h["ratelimit"], "\"free-0\";r=0;t=180");
    let body = std::str::from_utf8(resp.body()).unwrap();
    assert!(
        body.contains(
            "\"type\":\"https://iana.org/assignments/http-problem-types#quota-exceeded\""
        ),
        "{body}"
    );
    assert!(body.contains("\"status\":429"));
    assert!(body.contains("\"violated-policies\":[\"free-0\"]"));
    // Another key is unaffected.
    assert_eq!(get_once(addr, "k-2").await.status(), StatusCode::OK);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_shared_across_connections() {
    let (addr, server) = serve().await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        tasks.push(tokio::spawn(async move {
            get_once(addr, "team-100").await.status()
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, limited), (10, 90), "one limit over 100 connections");
    server.abort();
}
