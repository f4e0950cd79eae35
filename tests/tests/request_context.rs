//! Per-request data reaches the decision log however late the decision is made: a Redis
//! `exact`-mode decision is taken in the response future, after the routing layer's `call`
//! has returned, and its decision-log lines still carry the request's route; a sampled
//! admit's line still waits for the response (status, latency). Runs the real `fairgate`
//! binary (`runtime: thread_per_core`, the default) against a real `redis-server`.

use std::time::Duration;

use fairgate_tests::redis::{wait_fleet, RedisServer};
use fairgate_tests::{eventually, Client, Gateway, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_mode_decision_lines_carry_the_route() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
runtime: thread_per_core
workers: 2
routes: [{{name: api, upstream: u, operation: read}}]
upstreams:
  u: {{targets: ['{}']}}
log: {{decisions: stdout, sample_admits: 1}}
policy:
  version: 1
  identify: {{client_key: [{{header: x-api-key}}]}}
  plans: {{free: {{bandwidths: ['1/min burst 2']}}}}
  default_plan: free
  operations: [{{name: read, cost: 1}}]
  state:
    backend: redis
    redis: {{url: '{}', mode: exact, sync_interval: 20ms, timeout: 500ms, on_failure: closed}}
",
        up.addr,
        redis.url()
    ));
    wait_fleet(std::slice::from_ref(&gw)).await;
    let c = Client::new();
    let key = [("x-api-key", "k1")];
    assert_eq!(c.get_with(&gw.url("/a"), &key).await.status, 200);
    assert_eq!(
        c.get_with(&gw.url("/slow?delay_ms=30"), &key).await.status,
        200
    );
    assert_eq!(c.get_with(&gw.url("/c"), &key).await.status, 429);

    let logged = eventually(Duration::from_secs(5), || {
        let out = gw.stdout();
        async move { out.lines().filter(|l| l.contains("\"decision\"")).count() >= 3 }
    })
    .await;
    assert!(logged, "stdout:\n{}\nstderr:\n{}", gw.stdout(), gw.stderr());
    let lines: Vec<serde_json::Value> = gw
        .stdout()
        .lines()
        .filter(|l| l.contains("\"decision\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let admits: Vec<_> = lines.iter().filter(|l| l["decision"] == "admit").collect();
    let rejects: Vec<_> = lines.iter().filter(|l| l["decision"] == "reject").collect();
    assert_eq!((admits.len(), rejects.len()), (2, 1), "{lines:?}");
    for l in &lines {
        assert_eq!(l["route"], "api", "{l}");
        assert_eq!(l["operation"], "read", "{l}");
        assert_eq!(l["client"], "k1", "{l}");
        assert_eq!(l["plan"], "free", "{l}");
    }
    // Admits are finished when the response ends: with its status and latency.
    for l in &admits {
        assert_eq!(l["status"], 200, "{l}");
        assert!(l["latency_ms"].as_f64().is_some(), "{l}");
    }
    assert!(
        admits
            .iter()
            .any(|l| l["latency_ms"].as_f64().unwrap() >= 30.0),
        "{admits:?}"
    );
    assert_eq!(rejects[0]["stage"], "quota", "{}", rejects[0]);
    assert_eq!(rejects[0]["status"], 429, "{}", rejects[0]);
}

/// Each per-core thread serves its own stack (over its own proxy), but the state of the
/// layers is the gateway's: request ids made on every core share the one per-process prefix
/// and counter (distinct ids, one prefix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_stacks_share_the_request_id_counter() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0
runtime: thread_per_core
workers: 2
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
log: {{decisions: off}}
",
        up.addr
    ));
    // Fresh connections, spread over both threads by the kernel (SO_REUSEPORT): the chance
    // that 32 all land on one thread is 2^-31.
    let mut ids = Vec::new();
    for _ in 0..32 {
        let out = fairgate_tests::raw_exchange(
            gw.data,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        let id = out
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("x-request-id")
                    .then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no x-request-id in {out}"));
        ids.push(id);
    }
    let prefixes: std::collections::BTreeSet<&str> = ids.iter().map(|i| &i[..8]).collect();
    assert_eq!(prefixes.len(), 1, "{ids:?}");
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
}
