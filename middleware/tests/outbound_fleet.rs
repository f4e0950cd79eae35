//! The outbound layers' fleet mode (issue #18) with a real `redis-server` and a real upstream
//! on loopback: several replicas (layer stacks, each with its own `OutboundFleet`, as
//! separate processes would have) share one Redis.
//!
//! Redis decides on its own clock, so these tests run in real time; every wait polls a
//! condition with a deadline, and every bound asserted is one the single-process layers
//! would break.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fairgate_middleware::outbound::{
    BoxError, CacheConfig, CacheLayer, CoalesceConfig, CoalesceLayer, LimitConfig, OutboundFleet,
    OutboundLimitLayer, OutboundStats,
};
use fairgate_policies::model::{
    default_key_prefix, default_sync_interval, FleetMode, HumanDuration, OnFailure, RedisState,
};
use fairgate_tests::redis::RedisServer;
use fairgate_tests::{eventually, DEADLINE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

// === the upstream ===

#[derive(Debug)]
struct Upstream {
    addr: std::net::SocketAddr,
    calls: AtomicUsize,
    arrivals: Mutex<Vec<Instant>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Answers wait until this is `true`.
    gate: watch::Sender<bool>,
    /// How long each answer takes.
    delay: Mutex<Duration>,
    /// Extra response headers.
    headers: Mutex<Vec<(HeaderName, HeaderValue)>>,
    body_len: AtomicUsize,
}

impl Upstream {
    async fn start() -> Arc<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Arc::new(Upstream {
            addr: listener.local_addr().unwrap(),
            calls: AtomicUsize::new(0),
            arrivals: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            gate: watch::channel(true).0,
            delay: Mutex::new(Duration::ZERO),
            headers: Mutex::default(),
            body_len: AtomicUsize::new(16),
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

    fn header(&self, name: &'static str, value: &'static str) {
        self.headers.lock().unwrap().push((
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        ));
    }

    /// The most calls that arrived within any one second.
    fn max_per_second(&self) -> usize {
        let mut times = self.arrivals.lock().unwrap().clone();
        times.sort();
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

    fn uri(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn handle(
    u: Arc<Upstream>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    u.calls.fetch_add(1, Ordering::SeqCst);
    u.arrivals.lock().unwrap().push(Instant::now());
    let now = u.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    u.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let mut gate = u.gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;
    let delay = *u.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    u.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut body = format!("{} ", req.uri().path()).into_bytes();
    body.resize(u.body_len.load(Ordering::SeqCst).max(body.len()), b'x');
    let mut res = Response::new(Full::new(Bytes::from(body)));
    for (n, v) in u.headers.lock().unwrap().iter() {
        res.headers_mut().append(n.clone(), v.clone());
    }
    Ok(res)
}

// === replicas ===

type Svc = BoxCloneSyncService<Request<Full<Bytes>>, Response<BoxBody>, BoxError>;
type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

fn settings(url: &str, timeout: Duration) -> RedisState {
    RedisState {
        url: Some(url.to_owned()),
        cluster: Vec::new(),
        mode: FleetMode::default(),
        sync_interval: default_sync_interval(),
        timeout: HumanDuration(timeout),
        on_failure: OnFailure::default(),
        key_prefix: default_key_prefix(),
    }
}

/// One replica: its own `OutboundFleet`, then cache (shared) → coalesce → limit (fleet),
/// each layer only when given.
struct Replica {
    fleet: OutboundFleet,
    stats: Arc<OutboundStats>,
    svc: Svc,
    cache: Option<CacheLayer>,
    /// The stack below the cache (for warm-up through the cache layer).
    below: Svc,
}

fn replica(url: &str, cache: Option<CacheConfig>, limit: Option<LimitConfig>) -> Replica {
    let fleet = OutboundFleet::connect(&settings(url, Duration::from_millis(250))).unwrap();
    let stats = OutboundStats::shared();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let limited: BoxCloneSyncService<Request<Full<Bytes>>, Response<BoxBody>, BoxError> =
        match limit {
            Some(l) => BoxCloneSyncService::new(
                ServiceBuilder::new()
                    .layer(
                        OutboundLimitLayer::new(l)
                            .observer(stats.clone())
                            .fleet(fleet.clone(), "api"),
                    )
                    .service(client)
                    .map_response(|r| r.map(|b| b.map_err(BoxError::from).boxed_unsync())),
            ),
            None => BoxCloneSyncService::new(
                client
                    .map_err(BoxError::from)
                    .map_response(|r| r.map(|b| b.map_err(BoxError::from).boxed_unsync())),
            ),
        };
    let coalesced = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(CoalesceLayer::new(CoalesceConfig::default()).observer(stats.clone()))
            .service(limited)
            .map_response(|r| r.map(|b| b.map_err(BoxError::from).boxed_unsync())),
    );
    let (svc, cache) = match cache {
        Some(c) => {
            let layer = CacheLayer::new(c)
                .observer(stats.clone())
                .shared(fleet.clone(), "api");
            let svc = ServiceBuilder::new()
                .layer(layer.clone())
                .service(coalesced.clone())
                .map_response(|r| r.map(|b| b.map_err(BoxError::from).boxed_unsync()));
            (BoxCloneSyncService::new(svc), Some(layer))
        }
        None => (coalesced.clone(), None),
    };
    Replica {
        fleet,
        stats,
        svc,
        cache,
        below: coalesced,
    }
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

async fn send(svc: Svc, uri: &str, headers: &[(&'static str, &'static str)]) -> Answer {
    let mut req = Request::get(uri).body(Full::default()).unwrap();
    for (n, v) in headers {
        req.headers_mut()
            .insert(HeaderName::from_static(n), HeaderValue::from_static(v));
    }
    let res = svc.oneshot(req).await.expect("the call succeeds");
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("a whole body").to_bytes(),
    }
}

fn age(a: &Answer) -> Option<u64> {
    a.headers.get("age")?.to_str().ok()?.parse().ok()
}

/// Waits until every replica has seen all of them registered (the share's divisor).
async fn formed(replicas: &[&Replica]) {
    let n = replicas.len() as u64;
    assert!(
        eventually(DEADLINE, || async {
            replicas.iter().all(|r| r.fleet.replicas() == n)
        })
        .await,
        "the fleet did not form: {:?}",
        replicas
            .iter()
            .map(|r| r.fleet.replicas())
            .collect::<Vec<_>>()
    );
}

/// Waits until `n` requests of these replicas wait for another replica's fetch.
async fn waiting(replicas: &[&Replica], n: u64) {
    let count = || {
        replicas
            .iter()
            .map(|r| r.stats.coalesce_waiting())
            .sum::<u64>()
    };
    assert!(
        eventually(DEADLINE, || async { count() >= n }).await,
        "{} of {n} requests wait",
        count()
    );
}

fn shared_entries(redis: &RedisServer) -> Vec<String> {
    redis
        .cli(&["--scan", "--pattern", "fairgate:out:c:*"])
        .lines()
        .map(str::to_owned)
        .collect()
}

// === limits ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_together_never_exceed_the_fleet_rate() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    // 20/s, burst 2: at most 2 + 20 = 22 calls in any second, for the fleet.
    let limit = || {
        LimitConfig::default()
            .rate(20, Duration::from_secs(1), 2)
            .queue(1000, Duration::from_secs(10))
    };
    let rs: Vec<Replica> = (0..3)
        .map(|_| replica(&redis.url(), None, Some(limit())))
        .collect();
    // 3 × 20 distinct calls at once: 60 calls need 3 s at 20/s; one replica's own limit
    // would let 3 × 22 through in the first second.
    let mut tasks = Vec::new();
    for (i, r) in rs.iter().enumerate() {
        for j in 0..20 {
            let svc = r.svc.clone();
            let uri = up.uri(&format!("/r{i}-{j}"));
            tasks.push(tokio::spawn(async move {
                send(svc.clone(), &uri, &[]).await.status
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(up.calls(), 60);
    let max = up.max_per_second();
    assert!(
        max <= 22,
        "{max} calls in one second, the fleet's limit is 22"
    );
    assert!(
        rs.iter().all(|r| r.fleet.snapshot().errors == 0),
        "every reservation was made in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_concurrency_holds_across_replicas_and_leases_are_given_back() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    *up.delay.lock().unwrap() = Duration::from_millis(100);
    let limit = || {
        LimitConfig::default()
            .concurrency(2)
            .queue(1000, Duration::from_secs(10))
    };
    let rs: Vec<Replica> = (0..3)
        .map(|_| replica(&redis.url(), None, Some(limit())))
        .collect();
    let mut tasks = Vec::new();
    for (i, r) in rs.iter().enumerate() {
        for j in 0..6 {
            let svc = r.svc.clone();
            let uri = up.uri(&format!("/c{i}-{j}"));
            tasks.push(tokio::spawn(async move {
                send(svc.clone(), &uri, &[]).await.status
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(up.calls(), 18);
    let max = up.max_in_flight.load(Ordering::SeqCst);
    assert!(
        max <= 2,
        "{max} calls in flight at once, the fleet's limit is 2"
    );
    assert_eq!(max, 2, "the limit was reached (the test can see a breach)");
    // Every lease was given back: the lease set empties (releases are sent by a task).
    assert!(
        eventually(DEADLINE, || async {
            redis.cli(&["ZCARD", "fairgate:{out:api}:leases"]).trim() == "0"
        })
        .await,
        "leases left: {}",
        redis.cli(&["ZCARD", "fairgate:{out:api}:leases"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_each_replica_falls_back_to_its_share_and_nothing_fails() {
    let mut redis = RedisServer::start();
    let up = Upstream::start().await;
    // 30/s burst 3 for the fleet; a share is 10/s burst 1.
    let limit = || {
        LimitConfig::default()
            .rate(30, Duration::from_secs(1), 3)
            .queue(1000, Duration::from_secs(10))
    };
    let cache = || CacheConfig::default().ttl(Duration::from_secs(30));
    let rs: Vec<Replica> = (0..3)
        .map(|_| replica(&redis.url(), Some(cache()), Some(limit())))
        .collect();
    formed(&rs.iter().collect::<Vec<_>>()).await;
    // Each replica calls one distinct resource after another, as fast as its limit lets it,
    // then one resource every replica asks for: a steady stream across the kill.
    let tasks: Vec<_> = rs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let svc = r.svc.clone();
            let up = up.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for j in 0..30 {
                    statuses.push(
                        send(svc.clone(), &up.uri(&format!("/{i}-{j}")), &[])
                            .await
                            .status,
                    );
                }
                statuses.push(send(svc.clone(), &up.uri("/common"), &[]).await.status);
                statuses
            })
        })
        .collect();
    assert!(
        eventually(DEADLINE, || async { up.calls() >= 30 }).await,
        "the stream is under way"
    );
    redis.kill();
    let killed = Instant::now();
    let before = up.calls();
    for t in tasks {
        let statuses = t.await.unwrap();
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "no call fails for Redis: {statuses:?}"
        );
    }
    assert!(before < 85, "calls were left for after the kill: {before}");
    // Before the kill 3 + 30 a second for the fleet; after, 3 × (1 + 10). A replica that
    // kept the whole limit for itself would send 30 a second alone.
    let max = up.max_per_second();
    assert!(max <= 33, "{max} calls in one second");
    let after = up.calls() - before;
    let took = killed.elapsed();
    assert!(
        after as f64 <= 3.0 + 30.0 * took.as_secs_f64() + 3.0,
        "{after} calls in {took:?} after the kill"
    );
    assert!(
        rs.iter().all(|r| r.fleet.snapshot().errors > 0),
        "every replica met the dead Redis"
    );
}

// === the shared cache ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_one_replica_fetched_serves_the_others_with_age() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    // The upstream's answer is already 5 s old (it came from the API's own cache).
    up.header("age", "5");
    let cache = || CacheConfig::default().ttl(Duration::from_secs(30));
    let a = replica(&redis.url(), Some(cache()), None);
    let b = replica(&redis.url(), Some(cache()), None);
    let uri = up.uri("/quotas/r1");
    let first = send(a.svc.clone(), &uri, &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(up.calls(), 1);
    assert_eq!(shared_entries(&redis).len(), 1);
    let started = Instant::now();
    let from_redis = send(b.svc.clone(), &uri, &[]).await;
    assert_eq!(up.calls(), 1, "the other replica was answered from Redis");
    assert_eq!(from_redis.body, first.body);
    let bound = 5 + started.elapsed().as_secs() + 1;
    let age_b = age(&from_redis).expect("an Age header");
    assert!((5..=bound).contains(&age_b), "Age {age_b}");
    // Now in b's local cache too, and a's local cache answers with Age as well.
    let again = send(b.svc.clone(), &uri, &[]).await;
    assert!(age(&again).is_some_and(|a| a >= 5));
    assert!(age(&send(a.svc.clone(), &uri, &[]).await).is_some_and(|a| a >= 5));
    assert_eq!(up.calls(), 1);
    let ttl: i64 = redis
        .cli(&["PTTL", &shared_entries(&redis)[0]])
        .trim()
        .parse()
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 30_000,
        "the entry expires with its TTL: {ttl}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_across_replicas_make_one_upstream_call() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    up.gate.send_replace(false);
    let cache = || CacheConfig::default().ttl(Duration::from_secs(30));
    let rs: Vec<Replica> = (0..3)
        .map(|_| replica(&redis.url(), Some(cache()), None))
        .collect();
    assert!(
        eventually(DEADLINE, || async {
            rs.iter().all(|r| r.fleet.subscribed())
        })
        .await,
        "notifications subscribed"
    );
    let uri = up.uri("/quotas/hot");
    let mut tasks = Vec::new();
    for r in &rs {
        for _ in 0..10 {
            let svc = r.svc.clone();
            let uri = uri.clone();
            tasks.push(tokio::spawn(
                async move { send(svc.clone(), &uri, &[]).await },
            ));
        }
    }
    // One call reached the upstream and the 29 others wait for it, across the replicas.
    waiting(&rs.iter().collect::<Vec<_>>(), 29).await;
    assert_eq!(up.calls(), 1);
    let released = Instant::now();
    up.gate.send_replace(true);
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
    }
    assert_eq!(up.calls(), 1, "one upstream call for the whole fleet");
    // Notified, not polled and not after the 2 s lease.
    assert!(released.elapsed() < Duration::from_secs(2));
    let coalesced: u64 = rs.iter().map(|r| r.stats.coalesced()).sum();
    assert_eq!(coalesced, 29);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncacheable_answer_releases_every_waiter_at_once() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    up.header("cache-control", "no-store");
    up.gate.send_replace(false);
    *up.delay.lock().unwrap() = Duration::from_millis(300);
    let cache = || CacheConfig::default().ttl(Duration::from_secs(30));
    let rs: Vec<Replica> = (0..3)
        .map(|_| replica(&redis.url(), Some(cache()), None))
        .collect();
    assert!(
        eventually(DEADLINE, || async {
            rs.iter().all(|r| r.fleet.subscribed())
        })
        .await
    );
    let uri = up.uri("/private/thing");
    let mut tasks = Vec::new();
    for r in &rs {
        for _ in 0..4 {
            let svc = r.svc.clone();
            let uri = uri.clone();
            tasks.push(tokio::spawn(async move {
                send(svc.clone(), &uri, &[]).await.status
            }));
        }
    }
    waiting(&rs.iter().collect::<Vec<_>>(), 11).await;
    up.gate.send_replace(true);
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert!(
        shared_entries(&redis).is_empty(),
        "no-store is never shared"
    );
    // The leader, then the waiters all at once: each replica's waiters share one call (its
    // in-process coalescing), and the three replicas' calls overlap instead of queueing
    // one lease after another.
    assert_eq!(up.calls(), 4);
    assert!(
        up.max_in_flight.load(Ordering::SeqCst) >= 3,
        "the waiters' calls overlapped: {}",
        up.max_in_flight.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leaders_lease_is_taken_over_when_it_lapses() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let cache = CacheConfig::default()
        .ttl(Duration::from_secs(30))
        .lease(Duration::from_millis(800));
    let b = replica(&redis.url(), Some(cache), None);
    assert!(eventually(DEADLINE, || async { b.fleet.subscribed() }).await);
    let uri = up.uri("/quotas/r9");
    // A replica took the lease and died: nothing renews it, nothing settles it.
    let lease = format!("fairgate:out:l:api|GET {uri}");
    assert_eq!(
        redis.cli(&["SET", &lease, "dead", "PX", "800"]).trim(),
        "OK"
    );
    let started = Instant::now();
    let a = send(b.svc.clone(), &uri, &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(up.calls(), 1);
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "it waited for the lease: {:?}",
        started.elapsed()
    );
    assert_eq!(shared_entries(&redis).len(), 1, "the new holder stored it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_aborted_mid_fetch_hands_over_at_once() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    up.gate.send_replace(false);
    // A 30 s lease: only the aborted leader's own `retry` can hand over within the test.
    let cache = || {
        CacheConfig::default()
            .ttl(Duration::from_secs(30))
            .lease(Duration::from_secs(30))
            .max_wait(Duration::from_secs(60))
    };
    let a = replica(&redis.url(), Some(cache()), None);
    let b = replica(&redis.url(), Some(cache()), None);
    assert!(eventually(DEADLINE, || async { b.fleet.subscribed() }).await);
    let uri = up.uri("/quotas/r5");
    let svc = a.svc.clone();
    let u = uri.clone();
    let leader = tokio::spawn(async move { send(svc.clone(), &u, &[]).await });
    assert!(eventually(DEADLINE, || async { up.calls() == 1 }).await);
    let svc = b.svc.clone();
    let u = uri.clone();
    let follower = tokio::spawn(async move { send(svc.clone(), &u, &[]).await });
    waiting(&[&b], 1).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    assert!(
        eventually(DEADLINE, || async { up.calls() == 2 }).await,
        "b took over"
    );
    up.gate.send_replace(true);
    let answer = tokio::time::timeout(DEADLINE, follower)
        .await
        .expect("well before the 30 s lease")
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_and_requests_are_never_shared() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let cache = || {
        CacheConfig::default()
            .ttl(Duration::from_secs(30))
            .max_entry_bytes(64 << 10)
            .vary(HeaderName::from_static("accept-language"))
    };
    let a = replica(&redis.url(), Some(cache()), None);
    let b = replica(&redis.url(), Some(cache()), None);
    let both = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let (a, b) = (a.svc.clone(), b.svc.clone());
        let uri = up.uri(path);
        async move {
            assert_eq!(send(a.clone(), &uri, headers).await.status, StatusCode::OK);
            assert_eq!(send(b.clone(), &uri, headers).await.status, StatusCode::OK);
        }
    };
    // A body over max_entry_bytes (2 MiB) streams to its caller and is not written.
    up.body_len.store(2 << 20, Ordering::SeqCst);
    both("/huge", &[]).await;
    assert_eq!(up.calls(), 2);
    up.body_len.store(16, Ordering::SeqCst);
    // Authorization, not in `vary`: each replica calls for itself.
    both("/mine", &[("authorization", "Bearer a")]).await;
    assert_eq!(up.calls(), 4);
    // `Vary` on a header the key includes: shared per value.
    up.header("vary", "Accept-Language");
    both("/lang", &[("accept-language", "fr")]).await;
    assert_eq!(up.calls(), 5);
    assert_eq!(
        send(
            b.svc.clone(),
            &up.uri("/lang"),
            &[("accept-language", "de")]
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(up.calls(), 6, "another language is another entry");
    assert_eq!(
        shared_entries(&redis).len(),
        2,
        "{:?}",
        shared_entries(&redis)
    );
    // `Vary` on a header the key does not include: not stored at all.
    up.headers.lock().unwrap().clear();
    up.header("vary", "x-tenant");
    both("/tenant", &[]).await;
    assert_eq!(up.calls(), 8);
    // `private` and `no-store`: not shared (even though the local cache ignores them).
    for (path, cc) in [("/p", "private, max-age=60"), ("/n", "no-store")] {
        up.headers.lock().unwrap().clear();
        up.headers.lock().unwrap().push((
            HeaderName::from_static("cache-control"),
            HeaderValue::from_static(cc),
        ));
        let before = up.calls();
        both(path, &[]).await;
        assert_eq!(up.calls(), before + 2, "{cc}");
    }
    assert_eq!(
        shared_entries(&redis).len(),
        2,
        "{:?}",
        shared_entries(&redis)
    );
    // Garbage at an entry's key (written by something else): not served.
    up.headers.lock().unwrap().clear();
    let key = format!("fairgate:out:c:api|GET {}", up.uri("/garbage"));
    redis.cli(&["SET", &key, "FGC1\u{1}\u{2}"]);
    let before = up.calls();
    assert_eq!(
        send(a.svc.clone(), &up.uri("/garbage"), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(up.calls(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_starting_together_preloads_once() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    *up.delay.lock().unwrap() = Duration::from_millis(50);
    let cache = || CacheConfig::default().ttl(Duration::from_secs(30));
    let rs: Vec<Replica> = (0..3)
        .map(|_| replica(&redis.url(), Some(cache()), None))
        .collect();
    assert!(
        eventually(DEADLINE, || async {
            rs.iter().all(|r| r.fleet.subscribed())
        })
        .await
    );
    let uris: Vec<http::Uri> = (0..5)
        .map(|i| up.uri(&format!("/warm/{i}")).parse().unwrap())
        .collect();
    // This replica's cache layer (its store) over the stack below it, all three at once.
    let warm = |r: &Replica| {
        let cache = tower::Layer::layer(r.cache.as_ref().unwrap(), r.below.clone());
        let uris = uris.clone();
        async move { cache.warm_up::<Full<Bytes>, BoxBody>(uris).await }
    };
    let (x, y, z) = tokio::join!(warm(&rs[0]), warm(&rs[1]), warm(&rs[2]));
    assert_eq!([x, y, z], [5, 5, 5], "every replica holds the 5 entries");
    assert_eq!(up.calls(), 5, "one preload for the fleet");
}
