//! The gateway's outbound layers through the real binary (issue #7): an upstream that
//! enforces its own rate limit (429 + `Retry-After` past N per second) and counts calls.
//!
//! The scenarios put load on the one gateway they start, so they run one at a time
//! (`SERIAL`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fairgate_tests::{eventually, metric, Client, Gateway};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An upstream answering at most `per_sec` requests per sliding second with 200, others
/// with 429 and `Retry-After`.
struct Limited {
    addr: SocketAddr,
    per_sec: usize,
    calls: AtomicUsize,
    window: Mutex<VecDeque<Instant>>,
    accepted: Mutex<Vec<Instant>>,
    arrivals: Mutex<Vec<Instant>>,
    /// Answers wait while this is `false`.
    gate: watch::Sender<bool>,
}

impl Limited {
    async fn start(per_sec: usize) -> Arc<Limited> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Arc::new(Limited {
            addr: listener.local_addr().unwrap(),
            per_sec,
            calls: AtomicUsize::new(0),
            window: Mutex::default(),
            accepted: Mutex::default(),
            arrivals: Mutex::default(),
            gate: watch::channel(true).0,
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

    /// The most 200s given within any one-second window.
    fn max_per_window(&self) -> usize {
        let times = self.accepted.lock().unwrap().clone();
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

async fn handle(
    u: Arc<Limited>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    u.calls.fetch_add(1, Ordering::SeqCst);
    u.arrivals.lock().unwrap().push(Instant::now());
    let _ = req.into_body().collect().await;
    let _ = u.gate.subscribe().wait_for(|open| *open).await;
    let now = Instant::now();
    let retry_after = {
        let mut w = u.window.lock().unwrap();
        while w
            .front()
            .is_some_and(|t| now - *t >= Duration::from_secs(1))
        {
            w.pop_front();
        }
        if w.len() >= u.per_sec {
            let wait = Duration::from_secs(1) - (now - w[0]);
            Some((wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1))
        } else {
            w.push_back(now);
            u.accepted.lock().unwrap().push(now);
            None
        }
    };
    let mut res = Response::new(Full::new(Bytes::from_static(b"quota")));
    if let Some(secs) = retry_after {
        *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        res.headers_mut()
            .insert("retry-after", secs.to_string().parse().unwrap());
    }
    Ok(res)
}

fn config(up: &Limited, outbound: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes:
  - {{name: all, upstream: api}}
upstreams:
  api:
    targets: ['{}']
    outbound:
{outbound}
log: {{decisions: off}}
",
        up.addr
    )
}

async fn metrics(gw: &Gateway) -> String {
    Client::new().get(&gw.admin_url("/metrics")).await.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_identical_gets_make_one_upstream_call() {
    let _serial = SERIAL.lock().await;
    let up = Limited::start(10).await;
    let gw = Gateway::start(&config(
        &up,
        "      coalesce: true
      rate: {rate: 10/s, burst: 5}
      retry: {on: [429, 503, connect], max_attempts: 3, base: 50ms, max_backoff: 1s, budget: 10%}",
    ));
    // Hold the upstream's answer until all 200 requests are inside the gateway.
    up.gate.send_replace(false);
    let client = Client::new();
    let url = gw.url("/quota?region=eu");
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (c, url) = (client.clone(), url.clone());
            tokio::spawn(async move { c.get(&url).await })
        })
        .collect();
    let all_in = eventually(Duration::from_secs(10), || async {
        metric(&metrics(&gw).await, "fairgate_in_flight") == Some(200.0)
    })
    .await;
    assert!(all_in, "200 requests in flight:\n{}", metrics(&gw).await);
    // Admitted is not yet coalesced: wait until the 199 followers wait on the leader's call.
    let all_wait = eventually(Duration::from_secs(10), || async {
        metric(
            &metrics(&gw).await,
            r#"fairgate_outbound_coalesce_waiting{upstream="api"}"#,
        ) == Some(199.0)
    })
    .await;
    assert!(all_wait, "199 followers waiting:\n{}", metrics(&gw).await);
    up.gate.send_replace(true);
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "quota");
    }
    assert_eq!(up.calls(), 1);
    let m = metrics(&gw).await;
    assert_eq!(
        metric(&m, r#"fairgate_outbound_coalesced_total{upstream="api"}"#),
        Some(199.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"fairgate_outbound_retries_total{upstream="api"}"#),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, r#"fairgate_outbound_coalesce_waiting{upstream="api"}"#),
        Some(0.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_gets_stay_under_the_upstream_limit_and_retries_follow_retry_after() {
    let _serial = SERIAL.lock().await;
    // The upstream takes 20 per second; the gateway sends at most 12/s with bursts of 4
    // (16 in any second, 4 to spare for loopback jitter).
    let up = Limited::start(20).await;
    let gw = Gateway::start(&config(
        &up,
        "      rate: {rate: 12/s, burst: 4}
      concurrency: 8
      queue: {max: 1000, timeout: 10s}
      retry: {max_attempts: 3, budget: 10%}",
    ));
    let client = Client::new();
    let started = Instant::now();
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let (c, url) = (client.clone(), gw.url(&format!("/item/{i}")));
            tokio::spawn(async move { c.get(&url).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let took = started.elapsed();
    assert_eq!(up.calls(), 40, "no 429s, no retries");
    assert!(up.max_per_window() <= 20, "{}", up.max_per_window());
    // 4 at once, then 36 at 12/s: 3 s.
    assert!(took >= Duration::from_millis(2900), "{took:?}");

    // A second, unlimited gateway in front of the same upstream, now saturated: a burst of
    // 30 gets 429s, which the gateway retries after `Retry-After` (and under its budget).
    let gw2 = Gateway::start(&config(
        &up,
        "      retry: {max_attempts: 2, base: 10ms, max_backoff: 100ms, budget: 1000%}",
    ));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = up.arrivals.lock().unwrap().len();
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let (c, url) = (client.clone(), gw2.url(&format!("/burst/{i}")));
            tokio::spawn(async move { c.get(&url).await.status })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap() == 200 {
            ok += 1;
        }
    }
    let arrivals = up.arrivals.lock().unwrap()[before..].to_vec();
    // 20 accepted at once, 10 told to wait about a second, retried no sooner, accepted.
    assert_eq!(ok, 30);
    assert_eq!(arrivals.len(), 40);
    let first = arrivals[0];
    let retried: Vec<Duration> = arrivals[30..].iter().map(|t| *t - first).collect();
    assert!(
        retried.iter().all(|d| *d >= Duration::from_millis(900)),
        "retries came before Retry-After: {retried:?}"
    );
    let m = metrics(&gw2).await;
    assert_eq!(
        metric(&m, r#"fairgate_outbound_retries_total{upstream="api"}"#),
        Some(10.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_refusal_is_a_503_with_retry_after_and_counted() {
    let _serial = SERIAL.lock().await;
    let up = Limited::start(100).await;
    let gw = Gateway::start(&config(
        &up,
        "      rate: 1/10s
      queue: {max: 0, timeout: 0s}",
    ));
    let c = Client::new();
    assert_eq!(c.get(&gw.url("/a")).await.status, 200);
    let refused = c.get(&gw.url("/b")).await;
    assert_eq!(refused.status, 503);
    let ra: u64 = refused.header("retry-after").parse().unwrap();
    assert!((9..=10).contains(&ra), "{ra}");
    assert_eq!(refused.header("content-type"), "application/problem+json");
    assert_eq!(up.calls(), 1);
    let m = metrics(&gw).await;
    assert_eq!(
        metric(&m, r#"fairgate_outbound_throttled_total{upstream="api"}"#),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_answers_within_its_ttl_and_warms_up_at_start() {
    let _serial = SERIAL.lock().await;
    let up = Limited::start(100).await;
    let gw = Gateway::start(&config(
        &up,
        "      cache: {ttl: 30s, max_entries: 100, max_bytes: 1MiB, warm_up: [/warm]}",
    ));
    let warmed = eventually(Duration::from_secs(5), || async { up.calls() == 1 }).await;
    assert!(warmed, "the warm-up request reached the upstream");
    let c = Client::new();
    assert_eq!(c.get(&gw.url("/warm")).await.text(), "quota");
    assert_eq!(c.get(&gw.url("/other")).await.text(), "quota");
    assert_eq!(c.get(&gw.url("/other")).await.text(), "quota");
    assert_eq!(up.calls(), 2, "warm entry and one miss");
    let m = metrics(&gw).await;
    assert_eq!(
        metric(&m, r#"fairgate_outbound_cache_hits_total{upstream="api"}"#),
        Some(2.0),
        "{m}"
    );
    // A client with credentials does not get the anonymous entry.
    let r = c
        .get_with(&gw.url("/other"), &[("authorization", "Bearer x")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.calls(), 3);
}

/// O7 (SCENARIOS.md §2.2) through the real binary: the upstream answers 503 to half the
/// requests for 7 s, then heals; 1,000 rps of mixed GET and POST for 10 s. The pool
/// retries idempotent requests on 503 (3 attempts) under a 10 % budget with no per-second
/// floor. Criteria: upstream requests ≤ 1.10 × client requests; ≤ 3 attempts per request;
/// no POST sent twice; 1 s after the upstream heals it sees the offered rate (no backlog of
/// retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o7_a_retry_storm_stays_within_the_budget_through_the_gateway() {
    use fairgate_tests::load::{self, LoadSpec};
    use fairgate_tests::{full, Upstream};
    use std::collections::HashMap;

    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    up.set_error_fraction(0.5, 7, 503);
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes:
  - {{name: all, upstream: api}}
upstreams:
  api:
    targets: ['{}']
    outbound:
      retry: {{on: [503], max_attempts: 3, base: 5ms, max_backoff: 50ms, budget: 10%, min_per_sec: 0}}
log: {{decisions: off}}
",
        up.addr
    ));
    let url = gw.url("/o7");
    let make: load::MakeRequest = Arc::new(move |i| {
        let builder = Request::builder().uri(&url).header("x-id", i.to_string());
        if i % 2 == 0 {
            builder.method("GET").body(fairgate_tests::empty()).unwrap()
        } else {
            builder
                .method("POST")
                .body(full(format!("order {i}")))
                .unwrap()
        }
    });
    const RATE: u32 = 1000;
    let start = tokio::time::Instant::now();
    let heal_at = start + Duration::from_secs(7);
    // The scenario's schedule: heal at 7 s, then count what the upstream receives in the
    // second that starts 1 s after healing.
    let schedule = {
        let up = up.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(heal_at).await;
            up.set_error_fraction(0.0, 0, 503);
            tokio::time::sleep_until(heal_at + Duration::from_secs(1)).await;
            let from = up.count();
            tokio::time::sleep_until(heal_at + Duration::from_secs(2)).await;
            up.count() - from
        })
    };
    let report = load::run(LoadSpec::new(RATE, Duration::from_secs(10), make)).await;
    let after_heal = schedule.await.unwrap();
    eprintln!("O7 client: {}", report.summary());
    assert_eq!(report.errors + report.dropped, 0, "{}", report.summary());
    let client = report.sent as usize;
    let seen = up.requests();
    let mut attempts: HashMap<String, (String, usize)> = HashMap::new();
    for r in &seen {
        let id = r.headers["x-id"].to_str().unwrap().to_owned();
        attempts.entry(id).or_insert((r.method.to_string(), 0)).1 += 1;
    }
    let most = attempts.values().map(|(_, n)| *n).max().unwrap_or(0);
    let posts_twice = attempts
        .values()
        .filter(|(m, n)| m == "POST" && *n > 1)
        .count();
    let retried = attempts.values().filter(|(_, n)| *n > 1).count();
    let m = metrics(&gw).await;
    let series = |name: &str| metric(&m, &format!("{name}{{upstream=\"api\"}}")).unwrap_or(0.0);
    eprintln!(
        "O7: client requests {client}, upstream requests {} ({:.3}×), requests retried {retried}, \
         most attempts {most}, POSTs sent twice {posts_twice}, upstream 503s {}; \
         retries_total {}, budget_exhausted_total {}; upstream requests in the 2nd second \
         after healing {after_heal} (offered {RATE})",
        seen.len(),
        seen.len() as f64 / client as f64,
        up.errors_sent(),
        series("fairgate_outbound_retries_total"),
        series("fairgate_outbound_retry_budget_exhausted_total"),
    );
    assert_eq!(
        attempts.len(),
        client,
        "every request reached the upstream once at least"
    );
    assert!(
        seen.len() as f64 <= 1.10 * client as f64,
        "upstream requests {} for {client} client requests",
        seen.len()
    );
    assert!(most <= 3, "{most} attempts for one request");
    assert_eq!(posts_twice, 0, "a POST was sent twice");
    assert!(retried > 0, "the budget allowed no retry at all");
    assert!(series("fairgate_outbound_retry_budget_exhausted_total") > 0.0);
    let offered = f64::from(RATE);
    assert!(
        (after_heal as f64) >= 0.9 * offered && (after_heal as f64) <= 1.1 * offered,
        "upstream saw {after_heal} requests in the 2nd second after healing, offered {RATE}"
    );
}

/// Issue #18 through the real binary: three gateways whose pool's `outbound:` block is in
/// fleet mode on one real `redis-server` hold one rate and one cache together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_on_one_redis_hold_one_outbound_rate_and_share_one_cache() {
    let _serial = SERIAL.lock().await;
    let redis = fairgate_tests::redis::RedisServer::start();
    // The upstream takes 20 a second; each gateway alone would send 2 + 12 in a second,
    // three of them 42: only the fleet's one bucket keeps them under 20. Redis gets 1 s to
    // answer (the default is 25 ms): this test is about sharing, and on a loaded machine a
    // late answer would send a gateway to the upstream on its own (the timeout path is
    // `redis_failures`' to test).
    let up = Limited::start(20).await;
    let outbound = format!(
        "      rate: {{rate: 12/s, burst: 2}}
      queue: {{max: 1000, timeout: 10s}}
      cache: {{ttl: 30s}}
      fleet: {{redis: {{url: '{}', timeout: 1s}}}}",
        redis.url()
    );
    let gws: Vec<Gateway> = (0..3)
        .map(|_| Gateway::start(&config(&up, &outbound)))
        .collect();
    let client = Client::new();
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let (c, url) = (client.clone(), gws[i % 3].url(&format!("/item/{i}")));
            tokio::spawn(async move { c.get(&url).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        up.calls(),
        30,
        "no 429s: the fleet stayed under the upstream's limit"
    );
    assert!(up.max_per_window() <= 14, "{}", up.max_per_window());
    // /item/0 was fetched through the first gateway; the others answer it from Redis, with
    // its age.
    for gw in &gws[1..] {
        let r = client.get(&gw.url("/item/0")).await;
        assert_eq!(r.status, 200);
        assert_eq!(&r.body[..], b"quota");
        assert!(
            r.header("age").parse::<u64>().is_ok(),
            "Age: {:?}",
            r.header("age")
        );
    }
    assert_eq!(up.calls(), 30, "served from the shared cache");
    // Each gateway sees the three registered, and Redis answering.
    for gw in &gws {
        let seen = eventually(fairgate_tests::DEADLINE, || async {
            let m = metrics(gw).await;
            metric(&m, r#"fairgate_outbound_fleet_replicas{upstream="api"}"#) == Some(3.0)
                && metric(&m, r#"fairgate_outbound_fleet_degraded{upstream="api"}"#) == Some(0.0)
        })
        .await;
        assert!(seen, "{}", metrics(gw).await);
    }
}

/// `fleet: {redis: state}` names the policy's Redis: without one the gateway refuses to
/// start, naming the key, instead of holding the pool's limits per gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_block_naming_the_policys_redis_without_one_refuses_to_start() {
    let _serial = SERIAL.lock().await;
    let up = Limited::start(20).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    std::fs::write(
        &path,
        config(
            &up,
            "      rate: 10/s
      fleet: {redis: state}",
        ),
    )
    .unwrap();
    // Waits for the process's exit itself (killed by PID on drop if it never exits).
    let child = tokio::process::Command::new(fairgate_tests::fairgate_bin())
        .args(["run", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(fairgate_tests::DEADLINE, child.wait_with_output())
        .await
        .expect("the gateway exits instead of serving")
        .unwrap();
    let status = out.status;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!status.success());
    assert!(
        stderr.contains(
            "upstreams.api.outbound.fleet.redis: `state` names the policy's `state.redis`, and \
             the policy has no `state.backend: redis`"
        ),
        "{stderr}"
    );
    assert_eq!(up.calls(), 0);
}
