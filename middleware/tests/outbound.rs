//! The outbound layers against a real upstream on loopback that enforces its own rate limit
//! (429 + `Retry-After` past N per second) and counts calls (issue #7's acceptance tests).
//!
//! Client and upstream share one runtime with paused time, so `Retry-After`, backoff, the
//! rate limiter's waits and the upstream's window all run on the same virtual clock: the
//! timings asserted here are exact and the tests take milliseconds of real time.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fairgate_middleware::outbound::{
    throttled, CacheConfig, CacheLayer, CoalesceConfig, CoalesceLayer, LimitConfig,
    OutboundLimitLayer, OutboundStats, RetryConfig, RetryLayer, ThrottleReason,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

// === the upstream ===

/// What the upstream answers.
const MODE_LIMITED: u16 = 0;
/// Always 503 (no `Retry-After`).
const MODE_UNAVAILABLE: u16 = 1;

#[derive(Debug)]
struct Upstream {
    addr: std::net::SocketAddr,
    /// Requests accepted per second (sliding window).
    per_sec: usize,
    mode: AtomicU16,
    calls: AtomicUsize,
    /// When each 2xx answer was given.
    accepted: Mutex<VecDeque<Instant>>,
    all_accepted: Mutex<Vec<Instant>>,
    /// Arrival time of every call.
    arrivals: Mutex<Vec<(Method, Instant)>>,
    /// Answers wait until this is `true`.
    gate: watch::Sender<bool>,
    /// `Cache-Control` to send, if any.
    cache_control: Mutex<Option<&'static str>>,
    /// Body size of each answer.
    body_len: AtomicUsize,
    /// `Vary` to send, if any.
    vary: Mutex<Option<&'static str>>,
}

impl Upstream {
    async fn start(per_sec: usize) -> Arc<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Arc::new(Upstream {
            addr: listener.local_addr().unwrap(),
            per_sec,
            mode: AtomicU16::new(MODE_LIMITED),
            calls: AtomicUsize::new(0),
            accepted: Mutex::default(),
            all_accepted: Mutex::default(),
            arrivals: Mutex::default(),
            gate: watch::channel(true).0,
            cache_control: Mutex::new(None),
            body_len: AtomicUsize::new(2),
            vary: Mutex::new(None),
        });
        let u = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let u = u.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(u.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        up
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Waits (real-time deadline) until `n` calls have reached the upstream.
    async fn wait_for_calls(&self, n: usize) {
        let arrived =
            fairgate_tests::eventually(fairgate_tests::DEADLINE, || async { self.calls() >= n })
                .await;
        assert!(
            arrived,
            "{} of {n} calls reached the upstream",
            self.calls()
        );
    }

    /// The most 2xx answers given within any one-second window.
    fn max_per_window(&self) -> usize {
        let times = self.all_accepted.lock().unwrap().clone();
        let mut max = 0;
        for (i, t) in times.iter().enumerate() {
            let n = times[i..]
                .iter()
                .take_while(|u| **u - *t < Duration::from_secs(1))
                .count();
            max = max.max(n);
        }
        max
    }
}

async fn handle(
    u: Arc<Upstream>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let now = Instant::now();
    u.calls.fetch_add(1, Ordering::SeqCst);
    u.arrivals.lock().unwrap().push((req.method().clone(), now));
    let _ = req.into_body().collect().await;
    let mut gate = u.gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;
    let reply = |status: StatusCode, retry_after: Option<&str>| {
        let mut r = Response::new(Full::new(Bytes::from(vec![
            b'x';
            u.body_len
                .load(Ordering::SeqCst)
        ])));
        *r.status_mut() = status;
        if let Some(ra) = retry_after {
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, ra.parse().unwrap());
        }
        if let Some(v) = *u.vary.lock().unwrap() {
            r.headers_mut()
                .insert(http::header::VARY, v.parse().unwrap());
        }
        if let Some(cc) = *u.cache_control.lock().unwrap() {
            r.headers_mut()
                .insert(http::header::CACHE_CONTROL, cc.parse().unwrap());
        }
        Ok(r)
    };
    if u.mode.load(Ordering::SeqCst) == MODE_UNAVAILABLE {
        return reply(StatusCode::SERVICE_UNAVAILABLE, None);
    }
    let now = Instant::now();
    let mut window = u.accepted.lock().unwrap();
    while window
        .front()
        .is_some_and(|t| now - *t >= Duration::from_secs(1))
    {
        window.pop_front();
    }
    if window.len() >= u.per_sec {
        let wait = Duration::from_secs(1) - (now - window[0]);
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return reply(
            StatusCode::TOO_MANY_REQUESTS,
            Some(&secs.max(1).to_string()),
        );
    }
    window.push_back(now);
    u.all_accepted.lock().unwrap().push(now);
    drop(window);
    reply(StatusCode::OK, None)
}

// === the client ===

type Body = Full<Bytes>;

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn get(up: &Upstream, path: &str) -> Request<Body> {
    Request::get(format!("http://{}{path}", up.addr))
        .body(Body::default())
        .unwrap()
}

async fn body_of<B>(res: Response<B>) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    res.into_body().collect().await.unwrap().to_bytes()
}

// === coalescing ===

#[tokio::test(start_paused = true)]
async fn two_hundred_identical_concurrent_requests_make_one_upstream_call() {
    let up = Upstream::start(10).await;
    let stats = OutboundStats::shared();
    let mut svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new(CoalesceConfig::default()).observer(stats.clone()))
        .service(client());
    // Hold the upstream's answer until every request has been made.
    up.gate.send_replace(false);
    let futures: Vec<_> = (0..200)
        .map(|_| svc.call(get(&up, "/quota?region=eu")))
        .collect();
    // The followers joined when they were called: 199 wait before anything ran.
    assert_eq!(stats.coalesce_waiting(), 199);
    let all = tokio::spawn(futures_join(futures));
    up.wait_for_calls(1).await;
    up.gate.send_replace(true);
    let results = all.await.unwrap();
    for r in results {
        let r = r.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(body_of(r).await, "xx");
    }
    assert_eq!(up.calls(), 1);
    assert_eq!(stats.coalesced(), 199);
    assert_eq!(stats.coalesce_waiting(), 0);
}

/// Runs already-made calls concurrently (the calls themselves were made in order, so the
/// first one is the leader).
async fn futures_join<F>(fs: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("no panic"));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn followers_of_a_response_over_the_bound_make_their_own_calls() {
    let up = Upstream::start(1000).await;
    up.body_len.store(4096, Ordering::SeqCst);
    let mut svc = CoalesceLayer::new(CoalesceConfig::default().max_body(1024)).layer(client());
    up.gate.send_replace(false);
    let futures: Vec<_> = (0..5).map(|_| svc.call(get(&up, "/big"))).collect();
    let all = tokio::spawn(futures_join(futures));
    up.wait_for_calls(1).await;
    up.gate.send_replace(true);
    for r in all.await.unwrap() {
        assert_eq!(body_of(r.unwrap()).await.len(), 4096);
    }
    assert_eq!(up.calls(), 5, "1 leader + 4 followers on their own");
}

// === outbound limits ===

#[tokio::test(start_paused = true)]
async fn two_hundred_distinct_concurrent_requests_never_exceed_the_upstream_limit() {
    // The upstream takes 50 per second. The client allows itself 40/s with bursts of 10:
    // at most 10 + 40 = 50 in any second.
    let up = Upstream::start(50).await;
    let stats = OutboundStats::shared();
    let svc = ServiceBuilder::new()
        .layer(
            OutboundLimitLayer::new(
                LimitConfig::default()
                    .rate(40, Duration::from_secs(1), 10)
                    .concurrency(8)
                    .queue(1000, Duration::from_secs(10)),
            )
            .observer(stats.clone()),
        )
        .service(client());
    let start = Instant::now();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let svc = svc.clone();
            let req = get(&up, &format!("/item/{i}"));
            tokio::spawn(async move { svc.oneshot(req).await.map(|r| r.status()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(up.calls(), 200, "no 429, no retries");
    assert!(up.max_per_window() <= 50, "{}", up.max_per_window());
    assert_eq!(stats.throttled(), 0);
    // 10 at once, then 190 at 40/s.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(4750), "{took:?}");
    assert!(took < Duration::from_millis(5000), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn without_the_limit_most_of_a_burst_is_throttled_and_with_it_the_queue_bound_fails_fast() {
    let up = Upstream::start(50).await;
    let svc = client();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let svc = svc.clone();
            let req = get(&up, &format!("/item/{i}"));
            tokio::spawn(async move { svc.oneshot(req).await.unwrap().status() })
        })
        .collect();
    let mut throttled_count = 0;
    for t in tasks {
        if t.await.unwrap() == StatusCode::TOO_MANY_REQUESTS {
            throttled_count += 1;
        }
    }
    assert_eq!(throttled_count, 150);

    // A queue of 5 with a 1 s deadline at 10/s burst 1: more than can leave in time fail
    // at once with a typed error.
    let stats = OutboundStats::shared();
    let svc = OutboundLimitLayer::new(
        LimitConfig::default()
            .rate(10, Duration::from_secs(1), 1)
            .queue(5, Duration::from_secs(1)),
    )
    .observer(stats.clone())
    .layer(client());
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let svc = svc.clone();
            let req = get(&up, &format!("/other/{i}"));
            tokio::spawn(async move { svc.oneshot(req).await.map(|r| r.status()) })
        })
        .collect();
    let mut ok = 0;
    let mut reasons = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => reasons.push(throttled(&*e).expect("a Throttled").reason()),
        }
    }
    assert_eq!(ok, 6, "one at once and five queued");
    assert_eq!(reasons.len(), 14);
    assert!(reasons
        .iter()
        .all(|r| matches!(r, ThrottleReason::QueueFull | ThrottleReason::Rate)));
    assert_eq!(stats.throttled(), 14);
}

// === retries ===

#[tokio::test(start_paused = true)]
async fn retries_follow_retry_after() {
    // One request per second: the second of two concurrent requests is told
    // `Retry-After: 1` and its retry arrives no sooner.
    let up = Upstream::start(1).await;
    let stats = OutboundStats::shared();
    let svc = RetryLayer::new(
        RetryConfig::default().backoff(Duration::from_millis(50), Duration::from_secs(1)),
    )
    .seed(3)
    .observer(stats.clone())
    .layer(client());
    let a = tokio::spawn(svc.clone().oneshot(get(&up, "/a")));
    let b = tokio::spawn(svc.clone().oneshot(get(&up, "/b")));
    assert_eq!(a.await.unwrap().unwrap().status(), 200);
    assert_eq!(b.await.unwrap().unwrap().status(), 200);
    assert_eq!(up.calls(), 3);
    assert_eq!(stats.retries(), 1);
    let arrivals = up.arrivals.lock().unwrap().clone();
    let gap = arrivals[2].1 - arrivals[1].1;
    assert!(gap >= Duration::from_secs(1), "{gap:?}");
    assert!(
        gap <= Duration::from_millis(1050),
        "jitter at most the 50 ms base: {gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_a_retry_storm() {
    // The upstream is down (503). 200 concurrent requests with 3 attempts each would make
    // 600 calls; a 10 % budget (no per-second floor) allows 20 retries.
    let up = Upstream::start(1000).await;
    up.mode.store(MODE_UNAVAILABLE, Ordering::SeqCst);
    let stats = OutboundStats::shared();
    let svc = RetryLayer::new(RetryConfig::default().max_attempts(3).budget(
        0.1,
        0,
        Duration::from_secs(10),
    ))
    .observer(stats.clone())
    .layer(client());
    let tasks: Vec<_> = (0..200)
        .map(|i| tokio::spawn(svc.clone().oneshot(get(&up, &format!("/r/{i}")))))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), 503);
    }
    let calls = up.calls();
    assert!((200..=222).contains(&calls), "{calls} upstream calls");
    assert_eq!(calls as u64, 200 + stats.retries());
    assert!(stats.retries() >= 18, "{}", stats.retries());
    assert!(stats.retry_budget_exhausted() >= 170);
}

#[tokio::test(start_paused = true)]
async fn a_request_with_a_body_is_sent_once_and_an_idempotent_one_is_retried() {
    let up = Upstream::start(1000).await;
    up.mode.store(MODE_UNAVAILABLE, Ordering::SeqCst);
    let stats = OutboundStats::shared();
    let svc = RetryLayer::new(RetryConfig::default().retry_non_idempotent(true))
        .observer(stats.clone())
        .layer(client());
    let post = Request::post(format!("http://{}/p", up.addr))
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    assert_eq!(svc.clone().oneshot(post).await.unwrap().status(), 503);
    assert_eq!(up.calls(), 1, "bytes reached the upstream: never again");
    let put = Request::put(format!("http://{}/p", up.addr))
        .body(Body::default())
        .unwrap();
    assert_eq!(svc.clone().oneshot(put).await.unwrap().status(), 503);
    assert_eq!(up.calls(), 4, "an empty PUT: three attempts");
    let svc = RetryLayer::new(RetryConfig::default()).layer(client());
    let post = Request::post(format!("http://{}/p", up.addr))
        .body(Body::default())
        .unwrap();
    assert_eq!(svc.oneshot(post).await.unwrap().status(), 503);
    assert_eq!(up.calls(), 5, "POST is not idempotent");
}

#[tokio::test(start_paused = true)]
async fn connect_failures_are_retried() {
    // A port nobody listens on: bind, read the port, close.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let stats = OutboundStats::shared();
    let svc = RetryLayer::new(RetryConfig::default().max_attempts(3))
        .observer(stats.clone())
        .layer(client());
    let req = Request::get(format!("http://{addr}/"))
        .body(Body::default())
        .unwrap();
    assert!(svc.oneshot(req).await.is_err());
    assert_eq!(stats.retries(), 2);
}

// === cache ===

#[tokio::test(start_paused = true)]
async fn the_cache_serves_within_the_ttl_and_honours_cache_control() {
    let up = Upstream::start(1000).await;
    let stats = OutboundStats::shared();
    let layer = CacheLayer::new(
        CacheConfig::default()
            .ttl(Duration::from_secs(1))
            .route("/long/", Duration::from_secs(10))
            .honour_cache_control(true),
    )
    .observer(stats.clone());
    let svc = layer.layer(client());
    for _ in 0..3 {
        let r = svc.clone().oneshot(get(&up, "/short")).await.unwrap();
        assert_eq!(body_of(r).await, "xx");
    }
    assert_eq!(up.calls(), 1);
    assert_eq!((stats.cache_hits(), stats.cache_misses()), (2, 1));
    tokio::time::advance(Duration::from_millis(1001)).await;
    svc.clone().oneshot(get(&up, "/short")).await.unwrap();
    assert_eq!(up.calls(), 2, "expired after the TTL");

    // A longer route TTL, lowered by max-age.
    *up.cache_control.lock().unwrap() = Some("max-age=3");
    svc.clone().oneshot(get(&up, "/long/a")).await.unwrap();
    tokio::time::advance(Duration::from_millis(2900)).await;
    svc.clone().oneshot(get(&up, "/long/a")).await.unwrap();
    assert_eq!(up.calls(), 3);
    tokio::time::advance(Duration::from_millis(200)).await;
    svc.clone().oneshot(get(&up, "/long/a")).await.unwrap();
    assert_eq!(up.calls(), 4, "max-age=3 ended it");

    // no-store keeps it out.
    *up.cache_control.lock().unwrap() = Some("no-store");
    svc.clone().oneshot(get(&up, "/ns")).await.unwrap();
    svc.clone().oneshot(get(&up, "/ns")).await.unwrap();
    assert_eq!(up.calls(), 6);

    // 429 is not cached.
    *up.cache_control.lock().unwrap() = None;
    let limited = Upstream::start(1).await;
    let svc2 = layer.layer(client());
    svc2.clone().oneshot(get(&limited, "/x")).await.unwrap();
    let r = svc2.clone().oneshot(get(&limited, "/y")).await.unwrap();
    assert_eq!(r.status(), 429);
    let r = svc2.clone().oneshot(get(&limited, "/y")).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(limited.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_local_hit_carries_its_age_and_the_leader_none() {
    let up = Upstream::start(1000).await;
    let svc = CacheLayer::new(CacheConfig::default().ttl(Duration::from_secs(30))).layer(client());
    let age = |r: &Response<_>| {
        r.headers()
            .get(http::header::AGE)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let fresh = svc.clone().oneshot(get(&up, "/a")).await.unwrap();
    assert_eq!(
        age(&fresh),
        None,
        "a fresh answer has spent no time in a cache"
    );
    assert_eq!(
        age(&svc.clone().oneshot(get(&up, "/a")).await.unwrap()).as_deref(),
        Some("0")
    );
    tokio::time::advance(Duration::from_millis(3500)).await;
    assert_eq!(
        age(&svc.clone().oneshot(get(&up, "/a")).await.unwrap()).as_deref(),
        Some("3")
    );
    assert_eq!(up.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_response_varying_on_a_header_outside_the_key_is_not_cached() {
    let up = Upstream::start(1000).await;
    let svc = CacheLayer::new(CacheConfig::default().ttl(Duration::from_secs(30))).layer(client());
    *up.cache_control.lock().unwrap() = Some("max-age=60");
    up.vary.lock().unwrap().replace("accept-language");
    svc.clone().oneshot(get(&up, "/v")).await.unwrap();
    svc.clone().oneshot(get(&up, "/v")).await.unwrap();
    assert_eq!(
        up.calls(),
        2,
        "Vary names a header the key does not include"
    );
    up.vary.lock().unwrap().take();
    svc.clone().oneshot(get(&up, "/w")).await.unwrap();
    svc.clone().oneshot(get(&up, "/w")).await.unwrap();
    assert_eq!(up.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn warm_up_preloads_and_the_cache_stays_bounded() {
    let up = Upstream::start(1000).await;
    let layer = CacheLayer::new(
        CacheConfig::default()
            .ttl(Duration::from_secs(60))
            .max_entries(5),
    );
    let svc = layer.layer(client());
    let uris: Vec<http::Uri> = (0..3)
        .map(|i| format!("http://{}/warm/{i}", up.addr).parse().unwrap())
        .collect();
    let stored = svc.warm_up::<Body, _>(uris).await;
    assert_eq!(stored, 3);
    assert_eq!(up.calls(), 3);
    for i in 0..3 {
        svc.clone()
            .oneshot(get(&up, &format!("/warm/{i}")))
            .await
            .unwrap();
    }
    assert_eq!(up.calls(), 3, "served from the warm cache");
    for i in 0..20 {
        svc.clone()
            .oneshot(get(&up, &format!("/many/{i}")))
            .await
            .unwrap();
        assert!(layer.usage().0 <= 5);
    }
}

// === all four together ===

#[tokio::test(start_paused = true)]
async fn the_full_stack_turns_a_burst_into_few_calls_that_all_succeed() {
    // 200 concurrent calls over 20 distinct URIs against an upstream taking 5 per second.
    let up = Upstream::start(5).await;
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
                    .rate(4, Duration::from_secs(1), 1)
                    .queue(1000, Duration::from_secs(10)),
            )
            .observer(stats.clone()),
        )
        .service(client());
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let svc = svc.clone();
            let req = get(&up, &format!("/quota/{}", i % 20));
            tokio::spawn(async move { svc.oneshot(req).await.map(|r| r.status()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(up.calls(), 20, "one call per distinct URI");
    assert!(up.max_per_window() <= 5);
    assert_eq!(stats.retries(), 0);
    assert_eq!(stats.coalesced() + stats.cache_hits(), 180);
}
