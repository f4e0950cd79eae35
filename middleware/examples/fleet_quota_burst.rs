//! The fleet case of issue #18: three replicas of a service call one quota API whose limit
//! belongs to the account, not to a replica.
//!
//! Each replica receives, at the same moment, a burst of 200 calls over 20 resources; the
//! API allows 10 calls per second for the whole account (429 + `Retry-After` past that) and
//! counts every call. Every replica has the outbound layers (cache → coalesce → retry →
//! outbound limit of 8/s); with `--without`, each keeps them to itself, so three replicas
//! each respecting their own limit still exceed the account's. By default the layers run in
//! fleet mode on one Redis (started and stopped here): one rate for the fleet, one shared
//! cache, one fetch per resource across the fleet.
//!
//! ```text
//! cargo run --release --example fleet_quota_burst               # fleet mode
//! cargo run --release --example fleet_quota_burst -- --without  # each replica alone
//! ```
//!
//! `redis-server` must be on the `PATH`; when it is not, it is installed with `apt-get` as
//! the test harness does (as root), else the example says so and stops. The last line is
//! `calls=N failed=F upstream_calls=U max_upstream_per_s=R`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fairgate_middleware::outbound::{
    BoxError, CacheConfig, CacheLayer, CoalesceConfig, CoalesceLayer, LimitConfig, OutboundFleet,
    OutboundLimitLayer, OutboundStats, RetryConfig, RetryLayer,
};
use fairgate_policies::model::{
    default_key_prefix, default_redis_timeout, default_sync_interval, FleetMode, OnFailure,
    RedisState,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

const REPLICAS: usize = 3;
const CALLS: usize = 200;
const RESOURCES: usize = 20;
/// The account's quota: calls per second, for every replica together.
const API_RATE: usize = 10;

/// The quota API: `API_RATE` calls per sliding second, 429 + `Retry-After` past that.
#[derive(Default)]
struct QuotaApi {
    calls: AtomicUsize,
    window: Mutex<VecDeque<Instant>>,
    arrivals: Mutex<Vec<Instant>>,
}

impl QuotaApi {
    /// The most calls received within any one second.
    fn max_per_second(&self) -> usize {
        let times = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| **t - times[i] < Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

async fn answer(
    api: Arc<QuotaApi>,
    _req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    api.calls.fetch_add(1, Ordering::SeqCst);
    let now = Instant::now();
    api.arrivals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(now);
    // A little work per call, so that concurrent calls overlap.
    tokio::time::sleep(Duration::from_millis(20)).await;
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
    let api = Arc::new(QuotaApi::default());
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

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
type Svc = BoxCloneSyncService<Request<Full<Bytes>>, Response<BoxBody>, BoxError>;

/// One replica's client: cache → coalesce → retry → outbound limit, in fleet mode when
/// `fleet` is given.
fn replica(fleet: Option<&OutboundFleet>, stats: &Arc<OutboundStats>) -> Svc {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut cache = CacheLayer::new(CacheConfig::default().ttl(Duration::from_secs(30)))
        .observer(stats.clone());
    let mut limit = OutboundLimitLayer::new(
        LimitConfig::default()
            .rate(API_RATE as u64 - 2, Duration::from_secs(1), 1)
            .concurrency(4)
            .queue(1000, Duration::from_secs(10)),
    )
    .observer(stats.clone());
    if let Some(f) = fleet {
        cache = cache.shared(f.clone(), "quota-api");
        limit = limit.fleet(f.clone(), "quota-api");
    }
    let svc = ServiceBuilder::new()
        .layer(cache)
        .layer(CoalesceLayer::new(CoalesceConfig::default()).observer(stats.clone()))
        .layer(RetryLayer::new(RetryConfig::default()).observer(stats.clone()))
        .layer(limit)
        .service(client)
        .map_response(|r| r.map(|b| b.map_err(BoxError::from).boxed_unsync()));
    BoxCloneSyncService::new(svc)
}

fn redis_settings(url: String) -> RedisState {
    RedisState {
        url: Some(url),
        cluster: Vec::new(),
        mode: FleetMode::default(),
        sync_interval: default_sync_interval(),
        timeout: default_redis_timeout(),
        on_failure: OnFailure::default(),
        key_prefix: default_key_prefix(),
    }
}

/// Starts `redis-server` as the test harness does (installing it with apt-get if missing).
fn start_redis() -> fairgate_tests::redis::RedisServer {
    let started = std::panic::catch_unwind(fairgate_tests::redis::RedisServer::start);
    match started {
        Ok(r) => r,
        Err(_) => {
            eprintln!(
                "error: this example needs `redis-server` on the PATH (apt-get install \
                 redis-server), or root to install it; run with `-- --without` to skip the \
                 fleet layers"
            );
            std::process::exit(1);
        }
    }
}

#[tokio::main]
async fn main() {
    let without = std::env::args().any(|a| a == "--without");
    let redis = (!without).then(start_redis);
    let (addr, api) = start_api().await;
    let stats = OutboundStats::shared();
    let mut fleets = Vec::new();
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        let fleet = redis
            .as_ref()
            .map(|r| OutboundFleet::connect(&redis_settings(r.url())).expect("a valid redis url"));
        replicas.push(replica(fleet.as_ref(), &stats));
        fleets.extend(fleet);
    }
    // The replicas are up: registered and subscribed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fleets
        .iter()
        .all(|f| f.replicas() == REPLICAS as u64 && f.subscribed())
    {
        if Instant::now() > deadline {
            eprintln!("error: the replicas could not reach redis-server");
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Every call starts at the same moment.
    let (go, ready) = watch::channel(false);
    let failed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for svc in &replicas {
        for i in 0..CALLS {
            let svc = svc.clone();
            let mut ready = ready.clone();
            let failed = failed.clone();
            let uri = format!("http://{addr}/quotas/resource-{}", i % RESOURCES);
            tasks.push(tokio::spawn(async move {
                let _ = ready.wait_for(|go| *go).await;
                let req = Request::get(uri)
                    .body(Full::default())
                    .expect("a valid request");
                let ok = match svc.oneshot(req).await {
                    Ok(res) => {
                        let ok = res.status().is_success();
                        ok && res.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                };
                if !ok {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
    }
    let started = Instant::now();
    go.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }
    let took = started.elapsed();
    let snapshot = fleets.first().map(OutboundFleet::snapshot);
    drop(fleets);
    drop(redis);
    println!(
        "{} replicas × {CALLS} calls over {RESOURCES} resources, quota {API_RATE}/s for the \
         account, {}: {took:.1?}; coalesced {}, cache hits {}, retries {}, throttled locally {}{}",
        REPLICAS,
        if without {
            "each replica's layers alone"
        } else {
            "fleet mode on redis"
        },
        stats.coalesced(),
        stats.cache_hits(),
        stats.retries(),
        stats.throttled(),
        snapshot.map_or(String::new(), |s| format!(
            "; redis calls {} (errors {}) from one replica",
            s.calls, s.errors
        )),
    );
    println!(
        "calls={} failed={} upstream_calls={} max_upstream_per_s={}",
        REPLICAS * CALLS,
        failed.load(Ordering::SeqCst),
        api.calls.load(Ordering::SeqCst),
        api.max_per_second(),
    );
}
