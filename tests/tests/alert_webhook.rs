//! Usage alerts end to end (issue 16, item 3): the real `fairgate` binary POSTs an alert
//! event to a webhook receiver on loopback once per threshold crossing, and a dead receiver
//! (one that never answers, or a closed port) loses no request, delays none, and leaves
//! only a bounded queue behind, its drops counted in `fairgate_alerts_total`.

use std::time::{Duration, Instant};

use fairgate_tests::{eventually, metric, Client, Gateway, Upstream, DEADLINE};

/// A plan of 10 requests per hour (burst 10: nothing refills during a test) whose alerts
/// go to `webhook`, plus the gateway's `alerts:` sender block.
fn config(upstream: &Upstream, webhook: &str, sender: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
log: {{decisions: stdout, sample_admits: 0}}
{sender}
policy:
  version: 1
  default_plan: free
  plans:
    free:
      bandwidths: [{{rate: 10/h, burst: 10, name: hourly}}]
      alerts: {{thresholds: [0.5, 1.0], webhook: '{webhook}/hooks/quota'}}
",
        upstream.addr
    )
}

async fn scrape(c: &Client, gw: &Gateway, series: &str) -> f64 {
    let text = c.get(&gw.admin_url("/metrics")).await.text();
    metric(&text, series).unwrap_or(-1.0)
}

const SENT: &str = r#"fairgate_alerts_total{result="sent"}"#;
const FAILED: &str = r#"fairgate_alerts_total{result="failed"}"#;
const DROPPED: &str = r#"fairgate_alerts_total{result="dropped"}"#;
const QUEUED: &str = "fairgate_alerts_queued";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_receiver_gets_one_event_per_crossing() {
    let up = Upstream::start_counting().await;
    let receiver = Upstream::start().await;
    let gw = Gateway::start(&config(&up, &format!("http://{}", receiver.addr), ""));
    let admin = Client::new();
    // Two clients use up their 10 and are refused 2 more each: each crosses 0.5 (5 left)
    // and 1.0 (none left) once; the refusals cross nothing.
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let c = Client::from_ip(ip);
        for i in 0..12 {
            let status = c.get(&gw.url("/x")).await.status;
            assert_eq!(status, if i < 10 { 200 } else { 429 }, "{ip} request {i}");
        }
    }
    assert!(
        eventually(DEADLINE, || {
            let (admin, gw) = (&admin, &gw);
            async move { scrape(admin, gw, SENT).await == 4.0 }
        })
        .await,
        "four events sent"
    );
    let text = admin.get(&gw.admin_url("/metrics")).await.text();
    assert_eq!(metric(&text, QUEUED), Some(0.0), "{text}");
    assert_eq!(metric(&text, DROPPED), Some(0.0), "{text}");
    assert_eq!(metric(&text, FAILED), Some(0.0), "{text}");
    let mut events: Vec<serde_json::Value> = receiver
        .requests()
        .iter()
        .map(|r| {
            assert_eq!(r.method, "POST");
            assert_eq!(r.uri, "/hooks/quota");
            assert_eq!(r.headers["content-type"], "application/json");
            serde_json::from_slice(&r.body).expect("a JSON event")
        })
        .collect();
    assert_eq!(events.len(), 4, "{events:?}");
    events.sort_by_key(|e| (e["client"].to_string(), e["threshold"].to_string()));
    let summary: Vec<(String, f64, u64)> = events
        .iter()
        .map(|e| {
            assert_eq!(e["type"], "alert");
            assert_eq!(e["plan"], "free");
            assert_eq!(e["bandwidth"], "hourly");
            assert_eq!(e["burst"], 10);
            assert_eq!(e["policy_version"], 1);
            assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
            (
                e["client"].as_str().expect("client").to_owned(),
                e["threshold"].as_f64().expect("threshold"),
                e["remaining"].as_u64().expect("remaining"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("127.0.0.2".to_owned(), 0.5, 5),
            ("127.0.0.2".to_owned(), 1.0, 0),
            ("127.0.0.3".to_owned(), 0.5, 5),
            ("127.0.0.3".to_owned(), 1.0, 0),
        ]
    );
    assert_eq!(events[0]["usage"], 0.5);
    assert_eq!(events[1]["usage"], 1.0);
    // Near-limit admits are counted although `ratelimit_headers` is left at `on_reject`:
    // per client, the admits leaving 1 and 0 of 10.
    let near = metric(
        &text,
        r#"fairgate_near_limit_total{plan="free",bandwidth="hourly"}"#,
    );
    assert_eq!(near, Some(4.0), "{text}");
}

/// Clients on `n` loopback addresses from 127.0.0.10 on each use up their quota (10
/// admits); returns the slowest answer.
async fn use_up(gw: &Gateway, n: u8) -> Duration {
    let mut slowest = Duration::ZERO;
    for k in 0..n {
        let c = Client::from_ip(&format!("127.0.0.{}", 10 + k));
        for i in 0..10 {
            let start = Instant::now();
            let status = c.get(&gw.url("/x")).await.status;
            slowest = slowest.max(start.elapsed());
            assert_eq!(status, 200, "client {k} request {i}");
        }
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_delays_no_request_and_its_queue_stays_bounded() {
    let up = Upstream::start_counting().await;
    let receiver = Upstream::start().await;
    receiver.set_black_hole(true);
    // One try of 60 s per event: the first event holds the sender for the whole test.
    let sender = "alerts: {queue: 4, attempts: 1, timeout: 60s}";
    let gw = Gateway::start(&config(&up, &format!("http://{}", receiver.addr), sender));
    let admin = Client::new();
    // 30 clients × 2 crossings = 60 events.
    let slowest = use_up(&gw, 30).await;
    assert!(
        slowest < Duration::from_secs(2),
        "a request waited {slowest:?} behind the silent receiver"
    );
    assert_eq!(up.count(), 300, "every request reached the upstream");
    // One event is with the sender (held for 60 s), the rest wait or were dropped.
    assert!(
        eventually(DEADLINE, || {
            let (admin, gw) = (&admin, &gw);
            async move {
                scrape(admin, gw, QUEUED).await + scrape(admin, gw, DROPPED).await == 59.0
            }
        })
        .await,
        "every event but the one being tried is queued or dropped"
    );
    let text = admin.get(&gw.admin_url("/metrics")).await.text();
    // The queue holds its bound: 4 (or 3, when the sender took its event only after the
    // queue had filled, so that one more was dropped).
    let queued = metric(&text, QUEUED).expect("queued");
    assert!((3.0..=4.0).contains(&queued), "{text}");
    assert_eq!(metric(&text, DROPPED), Some(59.0 - queued), "{text}");
    assert_eq!(metric(&text, SENT), Some(0.0), "{text}");
    assert_eq!(metric(&text, FAILED), Some(0.0), "{text}");
    assert!(receiver.count() <= 1, "one try in flight at most");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_fails_each_event_after_its_tries_and_loses_no_request() {
    let up = Upstream::start_counting().await;
    // A port nothing listens on: bound, then closed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let sender = "alerts: {attempts: 3, backoff: 10ms, timeout: 1s}";
    let gw = Gateway::start(&config(&up, &format!("http://{closed}"), sender));
    let admin = Client::new();
    let slowest = use_up(&gw, 5).await;
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    assert_eq!(up.count(), 50);
    assert!(
        eventually(DEADLINE, || {
            let (admin, gw) = (&admin, &gw);
            async move { scrape(admin, gw, FAILED).await == 10.0 }
        })
        .await,
        "every event failed after its tries"
    );
    let text = admin.get(&gw.admin_url("/metrics")).await.text();
    assert_eq!(metric(&text, QUEUED), Some(0.0), "{text}");
    assert_eq!(metric(&text, DROPPED), Some(0.0), "{text}");
    assert_eq!(metric(&text, SENT), Some(0.0), "{text}");
}
