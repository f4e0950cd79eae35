//! A burst of concurrent calls to a rate-limited quota API, without and with fairgate's
//! outbound layers (issue #7).
//!
//! A service asks a cloud provider's quota API for the limits of 20 resources, 200 calls at
//! once (10 callers per resource), and the API takes 10 calls per second, answering 429 with
//! `Retry-After` past that. Without the layers most calls fail. With cache → coalesce →
//! retry → outbound limit, every call succeeds and the API sees one call per resource.
//!
//! ```text
//! cargo run -p fairgate-middleware --example quota_burst
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fairgate_middleware::outbound::{
    CacheConfig, CacheLayer, CoalesceConfig, CoalesceLayer, LimitConfig, OutboundLimitLayer,
    OutboundStats, RetryConfig, RetryLayer,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::{Service, ServiceBuilder, ServiceExt};

const CALLS: usize = 200;
const RESOURCES: usize = 20;
const API_RATE: usize = 10;

/// The quota API: `API_RATE` calls per sliding second, 429 + `Retry-After` past that.
struct QuotaApi {
    calls: AtomicUsize,
    window: Mutex<VecDeque<Instant>>,
}

async fn answer(
    api: Arc<QuotaApi>,
    _req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    api.calls.fetch_add(1, Ordering::SeqCst);
    // A little work per call, so that concurrent calls overlap.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let now = Instant::now();
    let mut w = api.window.lock().unwrap_or_else(|e| e.into_inner());
    while w
        .front()
        .is_some_and(|t| now - *t >= Duration::from_secs(1))
    {
        w.pop_front();
    }
    if w.len() >= API_RATE {
        let mut res = Response::new(Full::new(Bytes::from_static(b"throttled")));
        *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        res.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
        return Ok(res);
    }
    w.push_back(now);
    Ok(Response::new(Full::new(Bytes::from_static(
        b"{\"limit\":100}",
    ))))
}

async fn start_api() -> (std::net::SocketAddr, Arc<QuotaApi>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let api = Arc::new(QuotaApi {
        calls: AtomicUsize::new(0),
        window: Mutex::default(),
    });
    let a = api.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let a = a.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| answer(a.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, api)
}

/// Makes the burst through `svc`; returns how many calls succeeded.
async fn burst<S, RB>(svc: S, addr: std::net::SocketAddr) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: std::fmt::Display + Send,
    S::Future: Send,
    RB: http_body::Body + Send + 'static,
    RB::Data: Send,
{
    let tasks: Vec<_> = (0..CALLS)
        .map(|i| {
            let svc = svc.clone();
            let uri = format!("http://{addr}/quotas/resource-{}", i % RESOURCES);
            tokio::spawn(async move {
                let req = Request::get(uri)
                    .body(Full::default())
                    .expect("a valid request");
                match svc.oneshot(req).await {
                    Ok(res) => {
                        let ok = res.status().is_success();
                        let _ = res.into_body().collect().await;
                        ok
                    }
                    Err(e) => {
                        eprintln!("call failed: {e}");
                        false
                    }
                }
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap_or(false) {
            ok += 1;
        }
    }
    ok
}

#[tokio::main]
async fn main() {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

    let (addr, api) = start_api().await;
    let started = Instant::now();
    let ok = burst(client.clone(), addr).await;
    println!(
        "without the layers: {ok}/{CALLS} calls succeeded, the API saw {} calls ({:.1?})",
        api.calls.load(Ordering::SeqCst),
        started.elapsed()
    );

    let (addr, api) = start_api().await;
    let stats = OutboundStats::shared();
    let svc = ServiceBuilder::new()
        .layer(
            CacheLayer::new(CacheConfig::default().ttl(Duration::from_secs(30)))
                .observer(stats.clone()),
        )
        .layer(CoalesceLayer::new(CoalesceConfig::default()).observer(stats.clone()))
        .layer(RetryLayer::new(RetryConfig::default()).observer(stats.clone()))
        .layer(
            OutboundLimitLayer::new(
                LimitConfig::default()
                    .rate(API_RATE as u64 - 2, Duration::from_secs(1), 2)
                    .concurrency(4)
                    .queue(1000, Duration::from_secs(10)),
            )
            .observer(stats.clone()),
        )
        .service(client);
    let started = Instant::now();
    let ok = burst(svc, addr).await;
    println!(
        "with the layers:    {ok}/{CALLS} calls succeeded, the API saw {} calls ({:.1?}; \
         coalesced {}, cache hits {}, retries {}, throttled locally {})",
        api.calls.load(Ordering::SeqCst),
        started.elapsed(),
        stats.coalesced(),
        stats.cache_hits(),
        stats.retries(),
        stats.throttled(),
    );
}
