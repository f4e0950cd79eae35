//! Admission through the real binary: quotas, rules (UA, path, IP through a trusted proxy),
//! and shedding under concurrent load.

use std::sync::Arc;
use std::time::Duration;

use fairgate_tests::{metric, Client, Gateway, Upstream};

fn config(upstream: &Upstream, policy: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
log: {{decisions: stdout, sample_admits: 0}}
policy:
{policy}",
        upstream.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_rejects_with_429_retry_after_and_ratelimit_headers() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        &up,
        "  version: 1
  identify: {client_key: [{header: x-api-key}]}
  plans: {free: {bandwidths: ['1/min burst 5']}}
  default_plan: free
",
    ));
    let c = Client::new();
    for i in 0..5 {
        let r = c.get_with(&gw.url("/q"), &[("x-api-key", "k1")]).await;
        assert_eq!(r.status, 200, "request {i} is within the burst");
    }
    let r = c.get_with(&gw.url("/q"), &[("x-api-key", "k1")]).await;
    assert_eq!(r.status, 429);
    let retry: u64 = r
        .header("retry-after")
        .parse()
        .expect("Retry-After seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(
        r.header("ratelimit-policy")
            .contains("\"free-0\";q=1;w=60;fairgate-burst=5"),
        "{:?}",
        r.headers
    );
    assert!(r.header("ratelimit").contains("r=0"), "{:?}", r.headers);
    assert_eq!(r.header("content-type"), "application/problem+json");
    // Another key has its own bucket; the upstream saw only the admitted requests.
    assert_eq!(
        c.get_with(&gw.url("/q"), &[("x-api-key", "k2")])
            .await
            .status,
        200
    );
    assert_eq!(up.count(), 6);

    let m = c.get(&gw.admin_url("/metrics")).await.text();
    assert_eq!(
        metric(
            &m,
            r#"fairgate_requests_total{stage="quota",decision="reject",rule="",plan="free"}"#
        ),
        Some(1.0),
        "{m}"
    );
    // The rejection is in the decision log with the stable fields.
    let ok = fairgate_tests::eventually(Duration::from_secs(5), || {
        let out = gw.stdout();
        async move { out.contains("\"decision\":\"reject\"") }
    })
    .await;
    assert!(ok, "no decision-log line: {}", gw.stdout());
    let line = gw
        .stdout()
        .lines()
        .find(|l| l.contains("\"decision\":\"reject\""))
        .unwrap()
        .to_owned();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["client"], "k1");
    assert_eq!(v["stage"], "quota");
    assert_eq!(v["plan"], "free");
    assert_eq!(v["status"], 429);
    assert_eq!(v["route"], "route0");
    assert!(v["retry_after"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_deny_by_user_agent_path_and_ip_through_a_trusted_proxy() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        &up,
        "  version: 1
  identify: {trusted_proxies: [127.0.0.2/32]}
  rules:
    - {name: bad-ua, when: {user_agent: {contains: [badbot]}}, action: deny}
    - {name: no-admin, when: {path: {prefix: [/wp-admin]}}, action: deny}
    - {name: bad-net, when: {ip: [192.0.2.0/24]}, action: deny}
",
    ));
    let c = Client::new();
    let r = c
        .get_with(&gw.url("/"), &[("user-agent", "Mozilla badbot/1.0")])
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(c.get(&gw.url("/wp-admin/x.php")).await.status, 403);
    assert_eq!(c.get(&gw.url("/fine")).await.status, 200);

    // From the trusted proxy 127.0.0.2, the client is the rightmost untrusted XFF entry.
    let trusted = Client::from_ip("127.0.0.2");
    let r = trusted
        .get_with(&gw.url("/"), &[("x-forwarded-for", "192.0.2.7")])
        .await;
    assert_eq!(
        r.status, 403,
        "the trusted proxy's XFF names a denied client"
    );
    let r = trusted
        .get_with(&gw.url("/"), &[("x-forwarded-for", "198.51.100.7")])
        .await;
    assert_eq!(r.status, 200);
    // From an untrusted peer, XFF is ignored: the client is the peer itself.
    let untrusted = Client::from_ip("127.0.0.3");
    let r = untrusted
        .get_with(&gw.url("/"), &[("x-forwarded-for", "192.0.2.7")])
        .await;
    assert_eq!(
        r.status, 200,
        "an untrusted peer's XFF must not be believed"
    );

    let m = c.get(&gw.admin_url("/metrics")).await.text();
    for rule in ["bad-ua", "no-admin", "bad-net"] {
        let series = format!(
            r#"fairgate_requests_total{{stage="rule",decision="reject",rule="{rule}",plan=""}}"#
        );
        assert_eq!(metric(&m, &series), Some(1.0), "{series}\n{m}");
    }
    // Denied requests never reached the upstream.
    assert!(up
        .requests()
        .iter()
        .all(|r| !r.uri.starts_with("/wp-admin")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_answers_503_beyond_the_in_flight_limit() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        &up,
        "  version: 1
  shedding: {limit: 4}
",
    ));
    let c = Client::new();
    let url = Arc::new(gw.url("/slow?delay_ms=1500"));
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let c = c.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move { c.get(&url).await }));
    }
    let mut ok = 0;
    let mut shed = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status.as_u16() {
            200 => ok += 1,
            503 => {
                shed += 1;
                assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!((1..=4).contains(&ok), "admitted {ok}");
    assert_eq!(ok + shed, 12);
    assert!(
        up.max_in_flight() <= 4,
        "upstream saw {} at once",
        up.max_in_flight()
    );
    let m = c.get(&gw.admin_url("/metrics")).await.text();
    assert_eq!(
        metric(&m, r#"fairgate_shed_total{priority="normal"}"#),
        Some(f64::from(shed)),
        "{m}"
    );
    assert_eq!(metric(&m, "fairgate_shed_limit"), Some(4.0), "{m}");
    assert_eq!(metric(&m, "fairgate_in_flight"), Some(0.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_admits_are_logged_with_status_and_latency() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0
routes: [{{name: api, upstream: u, operation: read}}]
upstreams:
  u: {{targets: ['{}']}}
log: {{decisions: stdout, sample_admits: 1.0}}
policy:
  version: 1
  plans: {{free: {{bandwidths: ['100/s burst 100']}}}}
  default_plan: free
  operations: [{{name: read, cost: 2}}]
",
        up.addr
    ));
    let c = Client::new();
    assert_eq!(c.get(&gw.url("/slow?delay_ms=50")).await.status, 200);
    up.state
        .status
        .store(404, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(c.get(&gw.url("/missing")).await.status, 404);
    let logged = fairgate_tests::eventually(Duration::from_secs(5), || {
        let out = gw.stdout();
        async move {
            out.lines()
                .filter(|l| l.contains("\"decision\":\"admit\""))
                .count()
                == 2
        }
    })
    .await;
    assert!(logged, "{}", gw.stdout());
    let lines: Vec<serde_json::Value> = gw
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["status"], 200);
    assert!(
        lines[0]["latency_ms"].as_f64().unwrap() >= 50.0,
        "{}",
        lines[0]
    );
    assert_eq!(lines[0]["route"], "api");
    assert_eq!(lines[0]["operation"], "read");
    assert_eq!(lines[0]["cost"], 2);
    assert_eq!(lines[0]["plan"], "free");
    assert!(lines[0]["stage"].is_null());
    assert_eq!(lines[1]["status"], 404);
}
