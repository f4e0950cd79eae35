//! What a gateway on Redis tells clients and operators when things fail (issue 13, item 9),
//! through the real `fairgate` binary and a real `redis-server`: who gets the 503 of
//! `on_failure: closed` and what its body says, what `fairgate check` prints for a Redis
//! policy, what `/status` counts after failed reloads, and how soon an idle gateway on Redis
//! exits on SIGTERM.

use std::time::{Duration, Instant};

use fairgate_tests::redis::RedisServer;
use fairgate_tests::{eventually, metric, run_fairgate, Client, Gateway, Upstream};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A gateway on Redis at `redis` (`mode`, `on_failure: closed`): clients by `x-api-key` on
/// the plan `free`, and `vip` with no quota at all (`bandwidths: []`).
fn config(up: &Upstream, redis: &str, mode: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
policy:
  version: 1
  identify: {{client_key: [{{header: x-api-key}}]}}
  plans: {{free: {{bandwidths: ['1000/s burst 1000']}}}}
  default_plan: free
  clients: {{vip: {{bandwidths: []}}}}
  state:
    backend: redis
    redis: {{url: '{redis}', mode: {mode}, sync_interval: 20ms, timeout: 25ms, on_failure: closed}}
",
        up.addr
    )
}

async fn get(gw: &Gateway, key: &str) -> fairgate_tests::Reply {
    Client::new()
        .get_with(&gw.url("/q"), &[("x-api-key", key)])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_closed_rejects_only_requests_with_a_quota_and_says_the_backend_is_unavailable()
{
    let _serial = SERIAL.lock().await;
    for mode in ["exact", "async"] {
        let mut redis = RedisServer::start();
        let up = Upstream::start().await;
        let gw = Gateway::start(&config(&up, &redis.url(), mode));
        assert_eq!(get(&gw, "someone").await.status, 200, "{mode}");
        assert_eq!(get(&gw, "vip").await.status, 200, "{mode}");
        // Redis goes away (killed by PID): once the gateway knows, requests with a quota
        // get the 503 of `on_failure: closed`.
        redis.kill();
        let closed = eventually(Duration::from_secs(5), || async {
            get(&gw, "someone").await.status == 503
        })
        .await;
        assert!(closed, "{mode}: no 503 with Redis down:\n{}", gw.stderr());
        // A client without a quota is not affected by the outage.
        for _ in 0..20 {
            assert_eq!(get(&gw, "vip").await.status, 200, "{mode}");
        }
        let r = get(&gw, "someone").await;
        assert_eq!(r.status, 503, "{mode}");
        assert_eq!(r.header("content-type"), "application/problem+json");
        let body = r.json();
        assert_eq!(
            body["type"],
            "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity",
            "{mode}: {body}"
        );
        assert_eq!(
            body["title"], "temporary reduced capacity",
            "{mode}: {body}"
        );
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.starts_with("the state backend holding this quota is unavailable"),
            "{mode}: {body}"
        );
        assert!(
            !detail.contains('?') && !detail.contains("exceeded"),
            "{mode}: {body}"
        );
        // No quota was exceeded: the member is left out, not sent empty.
        assert!(body.get("violated-policies").is_none(), "{mode}: {body}");
        assert!(!r.header("retry-after").is_empty(), "{mode}");
        // The metrics name the stage truthfully.
        let m = Client::new().get(&gw.admin_url("/metrics")).await.text();
        assert!(
            m.lines()
                .any(|l| l.starts_with("fairgate_requests_total{")
                    && l.contains("stage=\"backend\"")),
            "{mode}: {m}"
        );
    }
}

#[test]
fn check_prints_the_redis_backend_and_where_limit_rules_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(
        &path,
        "version: 1
rules:
  - {name: signups, when: {path: /signup}, action: {limit: {rate: 20/s, key: global}}}
  - {name: scans, action: {limit: {rate: 5/s, estimator: sketch}}}
plans: {free: {bandwidths: ['10/s burst 20']}}
default_plan: free
state:
  backend: redis
  max_keys: 5000
  redis: {url: 'redis://:secret@127.0.0.1:6379', mode: exact, timeout: 30ms, on_failure: closed}
",
    )
    .unwrap();
    let (code, out, err) = run_fairgate(&["check", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("state: local"), "{out}");
    assert!(
        out.contains(
            "state: redis redis://:***@127.0.0.1:6379 (exact mode, timeout 30ms, on_failure closed, key prefix fairgate), at most 5000 local keys\n"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "  limit rules: 1 held in redis (estimator exact), 1 per gateway (estimator sketch)\n"
        ),
        "{out}"
    );
    assert!(!out.contains("secret"), "{out}");
}

/// The failed-reload counters of `/status` and of the metric.
async fn failed_reloads(gw: &Gateway) -> (f64, f64) {
    let c = Client::new();
    let status = c.get(&gw.admin_url("/status")).await.json();
    let m = c.get(&gw.admin_url("/metrics")).await.text();
    (
        status["last_reload"]["failed"].as_f64().unwrap_or(-1.0),
        metric(&m, r#"fairgate_policy_reloads_total{result="error"}"#).unwrap_or(0.0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reloads_by_sighup_and_post_reload_are_counted_alike_in_status_and_metrics() {
    let up = Upstream::start().await;
    let policy = "version: 1\nplans: {free: {bandwidths: ['10/s']}}\ndefault_plan: free\n";
    let broken = "version: 1\nplans: {free: {bandwidths: ['10/s']}}\ndefault_plan: nope\n";
    let head = format!(
        "listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0}}\nroutes: [{{upstream: u}}]\nupstreams:\n  u: {{targets: ['{}']}}\n",
        up.addr
    );
    // An inline policy (the gateway file) and a policy file.
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
    let inline = Gateway::start(&format!(
        "{head}policy:\n{}",
        policy
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    ));
    let file = Gateway::start_in(dir, &format!("{head}policy: policy.yaml\n"));
    for (name, gw, target, text) in [
        (
            "inline",
            &inline,
            inline.dir().join("gateway.yaml"),
            format!(
                "{head}policy:\n{}",
                broken
                    .lines()
                    .map(|l| format!("  {l}\n"))
                    .collect::<String>()
            ),
        ),
        (
            "file",
            &file,
            file.dir().join("policy.yaml"),
            broken.to_owned(),
        ),
    ] {
        std::fs::write(&target, text).unwrap();
        // SIGHUP, then POST /reload: each fails.
        let (_, before) = failed_reloads(gw).await;
        gw.signal("HUP");
        let seen = eventually(Duration::from_secs(5), || async {
            failed_reloads(gw).await.1 > before
        })
        .await;
        assert!(seen, "{name}: SIGHUP did not fail:\n{}", gw.stderr());
        let r = Client::new()
            .send(
                http::Request::post(gw.admin_url("/reload"))
                    .body(fairgate_tests::empty())
                    .unwrap(),
            )
            .await;
        assert_ne!(r.status, 200, "{name}: {}", r.text());
        // Both triggers counted, and `/status` agrees with the metric.
        let (status, metric) = failed_reloads(gw).await;
        assert!(metric >= before + 2.0, "{name}: metric {metric}");
        assert_eq!(
            status, metric,
            "{name}: /status failed {status}, metric {metric}"
        );
        let s = Client::new().get(&gw.admin_url("/status")).await.json();
        assert_eq!(s["last_reload"]["result"], "error", "{name}: {s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gateway_on_redis_exits_promptly_on_sigterm() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    for mode in ["exact", "async"] {
        let mut gw = Gateway::start(&config(&up, &redis.url(), mode));
        // Registered in Redis: the fleet tasks (heartbeat, exchange, leases) are running.
        let registered = eventually(Duration::from_secs(5), || async {
            let m = Client::new().get(&gw.admin_url("/metrics")).await.text();
            metric(&m, "fairgate_redis_calls_total").unwrap_or(0.0) >= 1.0
        })
        .await;
        assert!(registered, "{mode}: no redis call:\n{}", gw.stderr());
        gw.signal("TERM");
        let asked = Instant::now();
        let status = gw.wait_exit(Duration::from_secs(10));
        let took = asked.elapsed();
        eprintln!("{mode}: exited after {took:?}");
        assert!(status.is_some_and(|s| s.success()), "{mode}: {status:?}");
        // The drain window (500 ms) plus scheduling; the bug took 1.5–4.5 s.
        assert!(
            took < Duration::from_millis(1200),
            "{mode}: exit took {took:?}:\n{}",
            gw.stderr()
        );
    }
}
