//! The Redis state backend against a real `redis-server` (started on a free loopback port
//! by `fairgate_tests::redis`): the exact-mode script, the async exchange, the failure
//! modes, error replies (OOM, WRONGTYPE: F4 (b), (c)) and a 3-node Redis Cluster. Engines
//! run on a manual clock standing still, so local buckets only hold their burst; Redis time
//! moves, but the quotas here refill once a minute.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Req;
use fairgate_middleware::engine::Begun;
use fairgate_middleware::fleet::{self, FleetHandle, BREAKER_THRESHOLD};
use fairgate_middleware::{Decision, Engine, HttpHeaders, RequestFacts};
use fairgate_tests::redis::{RedisCluster, RedisServer};
use fairgate_tests::{eventually, DEADLINE};

fn policy(url: &str, mode: &str, on_failure: &str, bandwidths: &str) -> String {
    format!(
        "version: 1
plans:
  free:
    bandwidths: {bandwidths}
default_plan: free
state:
  backend: redis
  redis:
    url: {url}
    mode: {mode}
    sync_interval: 10ms
    timeout: 25ms
    on_failure: {on_failure}
"
    )
}

fn gateway(yaml: &str) -> (Arc<Engine>, FleetHandle) {
    let (engine, _clock, _store) = common::engine(yaml);
    let handle = fleet::start(&engine)
        .expect("fleet starts")
        .expect("redis backend");
    (engine, handle)
}

async fn decide(engine: &Engine, req: &Req) -> Decision {
    let begun = {
        let headers = HttpHeaders(&req.headers);
        engine.begin(&RequestFacts {
            peer: req.peer,
            method: req.method,
            host: "example.test",
            path: req.path,
            query: req.query,
            operation: req.operation,
            headers: &headers,
        })
    };
    match begun {
        Begun::Decided(d) => d,
        Begun::Remote(check) => check.resolve().await,
    }
}

fn status(d: &Decision) -> u16 {
    match d {
        Decision::Admit(_) => 200,
        Decision::Reject(r) => r.status,
    }
}

/// A loopback port nothing listens on.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("redis://127.0.0.1:{port}")
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let done = eventually(DEADLINE, || {
        let ok = f();
        async move { ok }
    })
    .await;
    assert!(done, "timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_mode_two_gateways_share_one_quota_exactly() {
    let redis = RedisServer::start();
    let yaml = policy(&redis.url(), "exact", "closed", "['1/min burst 5']");
    let (a, _ha) = gateway(&yaml);
    let (b, _hb) = gateway(&yaml);
    let r = Req::from("192.0.2.1");
    let mut admitted = 0;
    for i in 0..20 {
        let e = if i % 2 == 0 { &a } else { &b };
        let d = decide(e, &r).await;
        match status(&d) {
            200 => admitted += 1,
            429 => {
                let Decision::Reject(rej) = &d else {
                    unreachable!()
                };
                assert!(rej.retry_after.is_some_and(|w| w >= Duration::from_secs(1)));
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 5, "one burst across both gateways");
    // Another client has its own bucket.
    assert_eq!(status(&decide(&b, &Req::from("192.0.2.2")).await), 200);
    assert_eq!(a.backend_snapshot().unwrap().errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_mode_is_all_or_nothing() {
    let redis = RedisServer::start();
    let yaml = policy(
        &redis.url(),
        "exact",
        "closed",
        "['1/min burst 5', '1/min burst 3']",
    );
    let (a, _h) = gateway(&yaml);
    let r = Req::from("192.0.2.1");
    for _ in 0..3 {
        assert_eq!(status(&decide(&a, &r).await), 200);
    }
    for _ in 0..5 {
        assert_eq!(status(&decide(&a, &r).await), 429);
    }
    // The first bandwidth was charged for the 3 admits only: TAT − now ≤ 3 × 60 s.
    let keys = redis.cli(&["--raw", "KEYS", "fairgate:{192.0.2.1}:t:*"]);
    let mut keys: Vec<&str> = keys.lines().collect();
    keys.sort();
    assert_eq!(keys.len(), 2, "one TAT key per bandwidth: {keys:?}");
    let time = redis.cli(&["--raw", "TIME"]);
    let mut t = time.lines();
    let now_us: f64 =
        t.next().unwrap().parse::<f64>().unwrap() * 1e6 + t.next().unwrap().parse::<f64>().unwrap();
    for key in keys {
        let tat: f64 = redis.cli(&["--raw", "GET", key]).trim().parse().unwrap();
        let ahead_s = (tat - now_us) / 1e6;
        assert!(
            (170.0..=180.0).contains(&ahead_s),
            "{key}: {ahead_s} s ahead, expected 3 × 60 s"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_charges_what_the_other_gateways_used() {
    let redis = RedisServer::start();
    let yaml = policy(&redis.url(), "async", "local", "['1/min burst 10']");
    let (a, _ha) = gateway(&yaml);
    let (b, _hb) = gateway(&yaml);
    let r = Req::from("192.0.2.1");
    // A spends the whole burst locally, then shares it.
    assert_eq!(common::admit_n(&a, &r, 15), 10);
    wait_for("a's exchange", || a.backend_snapshot().unwrap().syncs >= 1).await;
    // B has not seen the client: its first request is decided on its own (full) bucket…
    assert!(common::admit(&b, &r));
    // …and its exchange brings the fleet's usage in.
    wait_for("b's exchange", || b.backend_snapshot().unwrap().syncs >= 1).await;
    assert_eq!(
        common::admit_n(&b, &r, 10),
        0,
        "b now sees the fleet's usage"
    );
    assert_eq!(
        a.backend_snapshot().unwrap().errors + b.backend_snapshot().unwrap().errors,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_mode_failure_modes_when_redis_is_unreachable() {
    let url = dead_url();
    let r = Req::from("192.0.2.1");

    // closed: 503, and once the breaker is open, without trying Redis.
    let (e, _h) = gateway(&policy(&url, "exact", "closed", "['1/min burst 5']"));
    for _ in 0..BREAKER_THRESHOLD + 5 {
        assert_eq!(status(&decide(&e, &r).await), 503);
    }
    let s = e.backend_snapshot().unwrap();
    assert!(
        s.degraded,
        "breaker open after {BREAKER_THRESHOLD} failures"
    );
    assert_eq!(s.failure_mode_rejects, u64::from(BREAKER_THRESHOLD) + 5);
    assert!(s.calls <= u64::from(BREAKER_THRESHOLD) + 1, "{s:?}");

    // open: everything admitted, and counted.
    let (e, _h) = gateway(&policy(&url, "exact", "open", "['1/min burst 5']"));
    for _ in 0..20 {
        assert_eq!(status(&decide(&e, &r).await), 200);
    }
    assert_eq!(e.backend_snapshot().unwrap().failure_mode_admits, 20);

    // local: the local limits (one gateway registered: N = 1).
    let (e, _h) = gateway(&policy(&url, "exact", "local", "['1/min burst 5']"));
    let mut admitted = 0;
    for _ in 0..20 {
        if status(&decide(&e, &r).await) == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_at_most_the_budget_and_recovery_is_automatic() {
    let redis = RedisServer::start();
    let (e, _h) = gateway(&policy(
        &redis.url(),
        "exact",
        "open",
        "['1/min burst 1000']",
    ));
    let r = Req::from("192.0.2.1");
    assert_eq!(status(&decide(&e, &r).await), 200);
    redis.stop();
    let mut worst = Duration::ZERO;
    for _ in 0..50 {
        let t = Instant::now();
        assert_eq!(
            status(&decide(&e, &r).await),
            200,
            "on_failure: open admits"
        );
        worst = worst.max(t.elapsed());
    }
    // 25 ms budget; the margin is scheduling on a loaded 2-core machine.
    assert!(
        worst < Duration::from_millis(150),
        "worst decision took {worst:?}"
    );
    let s = e.backend_snapshot().unwrap();
    assert!(s.degraded);
    assert!(s.calls < 50, "the breaker stopped the calls: {s:?}");
    redis.cont();
    // Probes (≤ 5/s) find Redis again; the breaker closes on the first success.
    let recovered = eventually(Duration::from_secs(5), || async {
        decide(&e, &r).await;
        !e.backend_snapshot().unwrap().degraded
    })
    .await;
    assert!(recovered, "still degraded 5 s after SIGCONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_mode_leases_hold_concurrency_fleet_wide_and_expire_with_their_gateway() {
    let redis = RedisServer::start();
    let yaml = policy(&redis.url(), "exact", "closed", "['1/s burst 1000']")
        .replace("    bandwidths:", "    concurrency: 2\n    bandwidths:");
    let (a, ha) = gateway(&yaml);
    let (b, _hb) = gateway(&yaml);
    let r = Req::from("192.0.2.1");
    let leases = || {
        redis
            .cli(&["ZCARD", "fairgate:{192.0.2.1}:leases"])
            .trim()
            .parse::<u64>()
            .unwrap_or(u64::MAX)
    };
    let a1 = decide(&a, &r).await;
    let b1 = decide(&b, &r).await;
    assert_eq!((status(&a1), status(&b1)), (200, 200));
    assert_eq!(leases(), 2);
    // Each gateway holds one request: only the fleet-wide limit can refuse the third.
    let third = decide(&a, &r).await;
    let Decision::Reject(rej) = &third else {
        panic!("a third request in flight was admitted")
    };
    assert_eq!(
        (rej.status, rej.stage),
        (429, fairgate_middleware::Stage::Concurrency)
    );
    // The ticket's drop gives the lease back.
    drop(b1);
    wait_for("the released lease", || leases() == 1).await;
    let b2 = decide(&b, &r).await;
    assert_eq!(status(&b2), 200);
    // Gateway A "dies" holding a lease: nothing renews it, it expires (3 s).
    assert_eq!(ha.fleet().leases_held(), 1);
    drop(ha);
    wait_for("the dead gateway's lease to expire", || {
        redis.cli(&["EVAL", "return redis.call('ZCOUNT', KEYS[1], math.floor(tonumber(redis.call('TIME')[1]) * 1000), '+inf')", "1", "fairgate:{192.0.2.1}:leases"]).trim() == "1"
    })
    .await;
    assert_eq!(status(&decide(&b, &r).await), 200);
    drop((a1, b2));
}

// === Redis Cluster ===

/// [`policy`] on the seed nodes of `cluster` instead of one url.
fn cluster_policy(
    cluster: &RedisCluster,
    mode: &str,
    on_failure: &str,
    bandwidths: &str,
) -> String {
    policy("SEEDS", mode, on_failure, bandwidths)
        .replace("url: SEEDS", &format!("cluster: {}", cluster.yaml_list()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_holds_one_quota_per_client_and_spreads_clients_over_its_nodes() {
    let cluster = RedisCluster::start(3);
    // exact: two gateways share one burst, as on one server.
    let yaml = cluster_policy(
        &cluster,
        "exact",
        "closed",
        "['1/min burst 5', '1/min burst 8']",
    );
    let (a, _ha) = gateway(&yaml);
    let (b, _hb) = gateway(&yaml);
    let r = Req::from("192.0.2.1");
    let mut admitted = 0;
    for i in 0..20 {
        let e = if i % 2 == 0 { &a } else { &b };
        match status(&decide(e, &r).await) {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected status {other}: {:?}", a.backend_snapshot()),
        }
    }
    assert_eq!(admitted, 5, "one burst across both gateways");
    // Many clients: each client's keys share one slot (one script per decision works: no
    // CROSSSLOT), and the clients land on more than one node.
    for i in 0..40 {
        let d = decide(&a, &Req::from(&format!("198.51.100.{i}"))).await;
        assert_eq!(status(&d), 200, "client {i}: {:?}", a.backend_snapshot());
    }
    let sizes = cluster.dbsizes();
    assert!(
        sizes.iter().filter(|&&n| n > 0).count() >= 2,
        "keys on one node only: {sizes:?}"
    );
    assert_eq!(
        sizes.iter().sum::<u64>(),
        2 * 41 + 1,
        "2 TAT keys per client + the registry: {sizes:?}"
    );
    // The registry (its own slot) counts both gateways.
    wait_for("both gateways registered", || {
        a.backend_snapshot().unwrap().gateways == 2 && b.backend_snapshot().unwrap().gateways == 2
    })
    .await;
    assert_eq!(
        a.backend_snapshot().unwrap().errors + b.backend_snapshot().unwrap().errors,
        0
    );

    // async: a second gateway picks up the first one's usage through the cluster.
    let yaml = cluster_policy(&cluster, "async", "local", "['1/min burst 10']");
    let (c, _hc) = gateway(&yaml);
    let (d, _hd) = gateway(&yaml);
    let r = Req::from("192.0.2.77");
    assert_eq!(common::admit_n(&c, &r, 15), 10);
    wait_for("c's exchange", || c.backend_snapshot().unwrap().syncs >= 1).await;
    assert!(common::admit(&d, &r));
    wait_for("d's exchange", || d.backend_snapshot().unwrap().syncs >= 1).await;
    assert_eq!(common::admit_n(&d, &r, 10), 0, "d sees the fleet's usage");
    assert_eq!(
        c.backend_snapshot().unwrap().errors + d.backend_snapshot().unwrap().errors,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_is_down_follows_on_failure_without_waiting() {
    let seeds = format!("['{}', '{}']", dead_url(), dead_url());
    let yaml = policy("SEEDS", "exact", "closed", "['1/min burst 5']")
        .replace("url: SEEDS", &format!("cluster: {seeds}"));
    let (e, _h) = gateway(&yaml);
    let r = Req::from("192.0.2.1");
    let mut worst = Duration::ZERO;
    for _ in 0..BREAKER_THRESHOLD + 5 {
        let t = Instant::now();
        assert_eq!(status(&decide(&e, &r).await), 503);
        worst = worst.max(t.elapsed());
    }
    assert!(
        worst < Duration::from_millis(150),
        "worst decision took {worst:?}"
    );
    let s = e.backend_snapshot().unwrap();
    assert!(s.degraded, "{s:?}");
    assert_eq!(s.failure_mode_rejects, u64::from(BREAKER_THRESHOLD) + 5);
}

// === F4 (b) and (c): error replies ===

/// The TAT key of `client`'s first bandwidth (after one decision made it).
fn tat_key(redis: &RedisServer, client: &str) -> String {
    let keys = redis.cli(&["--raw", "KEYS", &format!("fairgate:{{{client}}}:t:*")]);
    keys.lines().next().expect("a TAT key").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_type_key_sends_only_its_client_to_on_failure_and_never_opens_the_breaker() {
    let redis = RedisServer::start();
    let yaml = policy(&redis.url(), "exact", "closed", "['1/min burst 100']");
    let (e, _h) = gateway(&yaml);
    let bad = Req::from("192.0.2.66");
    let good = Req::from("192.0.2.1");
    assert_eq!(status(&decide(&e, &bad).await), 200);
    let key = tat_key(&redis, "192.0.2.66");
    // A list where the TAT (a string) should be: WRONGTYPE from Redis itself.
    redis.cli(&["DEL", &key]);
    redis.cli(&["LPUSH", &key, "x"]);
    for _ in 0..3 * BREAKER_THRESHOLD {
        assert_eq!(
            status(&decide(&e, &bad).await),
            503,
            "closed: 503 for the bad key"
        );
        assert_eq!(status(&decide(&e, &good).await), 200, "others unaffected");
    }
    // Only the bad client, many times in a row: still not degraded.
    for _ in 0..3 * BREAKER_THRESHOLD {
        assert_eq!(status(&decide(&e, &bad).await), 503);
    }
    let s = e.backend_snapshot().unwrap();
    assert!(!s.degraded, "one client's key degraded the fleet: {s:?}");
    assert_eq!(s.errors, 6 * u64::from(BREAKER_THRESHOLD), "{s:?}");
    assert_eq!(s.failure_mode_rejects, 6 * u64::from(BREAKER_THRESHOLD));
    // A string that is not a number: the script answers WRONGTYPE too.
    redis.cli(&["DEL", &key]);
    redis.cli(&["SET", &key, "garbage"]);
    assert_eq!(status(&decide(&e, &bad).await), 503);
    assert!(!e.backend_snapshot().unwrap().degraded);
    // Fixing the key restores fleet-wide decisions for the client.
    redis.cli(&["DEL", &key]);
    assert_eq!(status(&decide(&e, &bad).await), 200);

    // async mode: the bad key stays unshared, the others keep exchanging.
    let yaml = policy(&redis.url(), "async", "local", "['1/min burst 100']");
    let (e, _h) = gateway(&yaml);
    redis.cli(&["DEL", &key]);
    redis.cli(&["LPUSH", &key, "x"]);
    let good = Req::from("192.0.2.2");
    for _ in 0..3 {
        assert!(common::admit(&e, &bad), "local limits for the bad key");
        assert!(common::admit(&e, &good));
    }
    let good_tat = key.replace("192.0.2.66", "192.0.2.2");
    wait_for(
        "an exchange that reports the bad key and shares the good one",
        || {
            let s = e.backend_snapshot().unwrap();
            s.errors >= 1 && !redis.cli(&["GET", &good_tat]).trim().is_empty()
        },
    )
    .await;
    let s = e.backend_snapshot().unwrap();
    assert!(!s.degraded, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_opens_the_breaker_without_stalling_and_recovers() {
    let redis = RedisServer::start();
    let r = Req::from("192.0.2.1");
    // exact / open: OOM replies are failures: admitted and counted, then the breaker opens.
    let (e, _h) = gateway(&policy(
        &redis.url(),
        "exact",
        "open",
        "['1/min burst 1000']",
    ));
    assert_eq!(status(&decide(&e, &r).await), 200);
    let oom = || {
        redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
        redis.cli(&["DEBUG", "POPULATE", "20000", "filler", "64"]);
        redis.cli(&["CONFIG", "SET", "maxmemory", "1mb"]);
        assert!(
            redis.cli(&["SET", "probe", "x"]).contains("OOM"),
            "redis is not out of memory"
        );
    };
    oom();
    let mut worst = Duration::ZERO;
    for _ in 0..50 {
        let t = Instant::now();
        assert_eq!(
            status(&decide(&e, &r).await),
            200,
            "on_failure: open admits"
        );
        worst = worst.max(t.elapsed());
    }
    assert!(
        worst < Duration::from_millis(150),
        "worst decision took {worst:?}"
    );
    let s = e.backend_snapshot().unwrap();
    assert!(s.degraded, "{s:?}");
    assert!(s.errors >= u64::from(BREAKER_THRESHOLD), "{s:?}");
    assert_eq!(s.failure_mode_admits, 50);
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    let recovered = eventually(Duration::from_secs(5), || async {
        decide(&e, &r).await;
        !e.backend_snapshot().unwrap().degraded
    })
    .await;
    assert!(recovered, "still degraded 5 s after memory came back");

    // async / local: the exchanges fail with OOM, so the fleet goes degraded (not only
    // counted), then back once writes succeed.
    let (e, _h) = gateway(&policy(
        &redis.url(),
        "async",
        "local",
        "['1/min burst 100000']",
    ));
    oom();
    let degraded = eventually(DEADLINE, || async {
        common::admit(&e, &r);
        e.backend_snapshot().unwrap().degraded
    })
    .await;
    assert!(degraded, "{:?}", e.backend_snapshot());
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    let recovered = eventually(Duration::from_secs(5), || async {
        common::admit(&e, &r);
        !e.backend_snapshot().unwrap().degraded
    })
    .await;
    assert!(recovered, "still degraded 5 s after memory came back");
}

// === limit rules (issue 13, item 10) ===

/// [`policy`] with a `limit` rule counting every request in one global bucket.
fn global_rule_policy(url: &str, mode: &str, on_failure: &str, rule: &str) -> String {
    policy(url, mode, on_failure, "['1000/min burst 1000']").replace(
        "default_plan: free\n",
        &format!(
            "default_plan: free\nrules:\n  - {{name: signups, action: {{limit: {{{rule}, key: global}}}}}}\n"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_mode_holds_a_global_limit_rule_across_two_gateways_in_redis() {
    let redis = RedisServer::start();
    let yaml = global_rule_policy(&redis.url(), "exact", "closed", "rate: 1/min, burst: 5");
    let (a, _ha) = gateway(&yaml);
    let (b, _hb) = gateway(&yaml);
    let mut admitted = 0;
    for i in 0..20u8 {
        let e = if i % 2 == 0 { &a } else { &b };
        // A different client each time: the rule, not a quota, is what limits them.
        let d = decide(e, &Req::from(format!("192.0.2.{}", i + 1).as_str())).await;
        match &d {
            Decision::Admit(_) => admitted += 1,
            Decision::Reject(r) => {
                assert_eq!(r.status, 429);
                assert_eq!(r.rule.as_deref(), Some("signups"));
                assert_eq!(r.stage, fairgate_middleware::Stage::Rule);
                assert!(r.retry_after.is_some_and(|w| w >= Duration::from_secs(1)));
            }
        }
    }
    assert_eq!(admitted, 5, "one burst across both gateways");
    let keys = redis.cli(&["--raw", "KEYS", "fairgate:{}:t:rule:signups"]);
    assert_eq!(
        keys.lines().count(),
        1,
        "the rule's bucket is in redis: {keys}"
    );
    assert_eq!(
        a.backend_snapshot().unwrap().errors + b.backend_snapshot().unwrap().errors,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_exchanges_a_global_limit_rule_between_gateways() {
    let redis = RedisServer::start();
    let yaml = global_rule_policy(&redis.url(), "async", "local", "rate: 1/min, burst: 10");
    let (a, _ha) = gateway(&yaml);
    let (b, _hb) = gateway(&yaml);
    // A spends the rule's whole burst (many clients), then shares it.
    let admitted = (1..=15u8)
        .filter(|i| common::admit(&a, &Req::from(format!("192.0.2.{i}").as_str())))
        .count();
    assert_eq!(admitted, 10);
    wait_for("a's exchange", || a.backend_snapshot().unwrap().syncs >= 1).await;
    // B's first request is decided on its own (full) bucket, and its exchange brings the
    // fleet's usage in.
    assert!(common::admit(&b, &Req::from("198.51.100.1")));
    wait_for("b's exchange", || b.backend_snapshot().unwrap().syncs >= 1).await;
    let admitted = (2..=11u8)
        .filter(|i| common::admit(&b, &Req::from(format!("198.51.100.{i}").as_str())))
        .count();
    assert_eq!(admitted, 0, "b now sees the fleet's use of the rule");
    let keys = redis.cli(&["--raw", "KEYS", "fairgate:{}:t:rule:signups"]);
    assert_eq!(
        keys.lines().count(),
        1,
        "the rule's bucket is in redis: {keys}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_rule_follows_on_failure_when_redis_is_unreachable() {
    let url = dead_url();
    // closed: 503 of stage `backend`, in both modes (async once the breaker is open).
    for mode in ["exact", "async"] {
        let (e, _h) = gateway(&global_rule_policy(
            &url,
            mode,
            "closed",
            "rate: 1/min, burst: 5",
        ));
        let r = Req::from("192.0.2.1");
        if mode == "async" {
            // Decided locally until the exchanges (of the usage recorded here) open the
            // breaker.
            assert!(common::admit(&e, &r));
            wait_for("the breaker to open", || {
                e.backend_snapshot().unwrap().degraded
            })
            .await;
        }
        for _ in 0..3 {
            let d = decide(&e, &r).await;
            let Decision::Reject(rej) = &d else {
                panic!("{mode}: admitted with redis down and on_failure: closed");
            };
            assert_eq!(rej.status, 503, "{mode}");
            assert_eq!(rej.stage, fairgate_middleware::Stage::Backend, "{mode}");
        }
        assert!(
            e.backend_snapshot().unwrap().failure_mode_rejects >= 3,
            "{mode}"
        );
    }
    // open, exact: the rule is skipped (admitted and counted).
    let (e, _h) = gateway(&global_rule_policy(
        &url,
        "exact",
        "open",
        "rate: 1/min, burst: 5",
    ));
    let r = Req::from("192.0.2.1");
    for _ in 0..20 {
        assert_eq!(status(&decide(&e, &r).await), 200);
    }
    assert_eq!(e.backend_snapshot().unwrap().failure_mode_admits, 20);
    // local, exact: the local bucket decides.
    let (e, _h) = gateway(&global_rule_policy(
        &url,
        "exact",
        "local",
        "rate: 1/min, burst: 5",
    ));
    let mut admitted = 0;
    for _ in 0..20 {
        admitted += u32::from(status(&decide(&e, &r).await) == 200);
    }
    assert_eq!(admitted, 5);
}

// === calendar periods ===

/// `rfc3339` (UTC, whole seconds) as a `SystemTime`.
fn wall(rfc3339: &str) -> std::time::SystemTime {
    let secs = rfc3339
        .parse::<fairgate_policies::units::Timestamp>()
        .expect("a UTC time")
        .unix_secs();
    std::time::UNIX_EPOCH + Duration::from_secs(secs)
}

/// A quota per calendar month is the fleet's in exact mode: one count in Redis, in a key
/// named by the period's start that expires at its end; Retry-After and `t` point at the
/// reset, and the next month is a new key with the whole quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_mode_a_month_quota_is_one_count_for_the_fleet_reset_on_the_first() {
    let redis = RedisServer::start();
    let yaml = policy(
        &redis.url(),
        "exact",
        "closed",
        "[{quota: 4, period: month}, '100/s']",
    );
    let (a, _ha) = gateway(&yaml);
    let (b, _hb) = gateway(&yaml);
    for e in [&a, &b] {
        e.set_wall_time(wall("2026-01-31T23:00:00Z"));
    }
    let r = Req::from("192.0.2.1");
    let mut statuses = Vec::new();
    for i in 0..6 {
        let e = if i % 2 == 0 { &a } else { &b };
        statuses.push(status(&decide(e, &r).await));
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    let Decision::Reject(rej) = decide(&b, &r).await else {
        panic!("expected a rejection");
    };
    // The manual clocks stand still at 23:00:00: the reset is one hour away, exactly.
    assert_eq!(rej.retry_after, Some(Duration::from_secs(3600)));
    let info = rej.ratelimit.expect("ratelimit numbers");
    assert_eq!((info.remaining, info.reset_secs), (0, 3600));
    // January 2026 starts at 1767225600.
    let key = "fairgate:{192.0.2.1}:p:plan:free/0@month:1767225600";
    assert_eq!(redis.cli(&["--raw", "GET", key]).trim(), "4");
    let ttl_ms: u64 = redis.cli(&["--raw", "PTTL", key]).trim().parse().unwrap();
    assert!(
        (3_590_000..=3_601_000).contains(&ttl_ms),
        "expires with the period (+1 s): {ttl_ms} ms"
    );
    // February 1st: a new period, a new key, the whole quota.
    for e in [&a, &b] {
        e.set_wall_time(wall("2026-02-01T00:00:00Z"));
    }
    let mut admitted = 0;
    for i in 0..6 {
        let e = if i % 2 == 0 { &a } else { &b };
        admitted += usize::from(status(&decide(e, &r).await) == 200);
    }
    assert_eq!(admitted, 4);
    let feb = "fairgate:{192.0.2.1}:p:plan:free/0@month:1769904000";
    assert_eq!(redis.cli(&["--raw", "GET", feb]).trim(), "4");
    assert_eq!(a.backend_snapshot().unwrap().errors, 0);
}

/// In async mode a period's count is exchanged like a bucket: a gateway that has not seen
/// the client learns the fleet's count at its next exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_shares_a_day_count_between_gateways() {
    let redis = RedisServer::start();
    let yaml = policy(&redis.url(), "async", "local", "[{quota: 10, period: day}]");
    let (a, _ha) = gateway(&yaml);
    let (b, _hb) = gateway(&yaml);
    for e in [&a, &b] {
        e.set_wall_time(wall("2026-05-04T12:00:00Z"));
    }
    let r = Req::from("192.0.2.1");
    assert_eq!(common::admit_n(&a, &r, 15), 10);
    wait_for("a's exchange", || a.backend_snapshot().unwrap().syncs >= 1).await;
    // B decides its first request alone, then its exchange brings the fleet's count in.
    assert!(common::admit(&b, &r));
    wait_for("b's exchange", || b.backend_snapshot().unwrap().syncs >= 1).await;
    assert_eq!(
        common::admit_n(&b, &r, 10),
        0,
        "b now sees the fleet's count"
    );
    // 2026-05-04 starts at 1777852800.
    let key = "fairgate:{192.0.2.1}:p:plan:free/0@day:1777852800";
    assert_eq!(redis.cli(&["--raw", "GET", key]).trim(), "11");
    assert_eq!(
        a.backend_snapshot().unwrap().errors + b.backend_snapshot().unwrap().errors,
        0
    );
}
