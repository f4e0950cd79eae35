//! Shedding by priority class through the real binary (issue 13, items 2–4): each shed
//! request is counted under its own `priority` label, a small limit still keeps a slot for
//! critical requests, and with burst sharing's defaults borrowed requests are shed before
//! normal ones.
//!
//! Requests are held in flight by the upstream (`?delay_ms=`, far longer than the test) and
//! the test waits, with `eventually`, until the upstream sees them: no sleeps.

use std::collections::BTreeMap;

use fairgate_tests::{eventually, shed_samples, Client, Gateway, Upstream, DEADLINE};
use tokio::task::JoinHandle;

/// Long enough that a held request outlives the test (the gateway is killed first).
const HOLD: &str = "delay_ms=25000";

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

/// Clients are identified by `x-api-key`; `/critical/…` and `/sheddable/…` are tagged.
const TAGS: &str = "  identify: {client_key: [{header: x-api-key}]}
  rules:
    - name: critical
      when: {path: {prefix: /critical/}}
      action: {tag: {priority: critical}}
    - name: sheddable
      when: {path: {prefix: /sheddable/}}
      action: {tag: {priority: sheddable}}
";

struct Harness {
    up: Upstream,
    gw: Gateway,
    c: Client,
    held: Vec<JoinHandle<u16>>,
}

impl Harness {
    async fn start(policy: &str) -> Harness {
        let up = Upstream::start_counting().await;
        let gw = Gateway::start(&config(&up, policy));
        Harness {
            up,
            gw,
            c: Client::new(),
            held: Vec::new(),
        }
    }

    async fn get(&self, path: &str, key: &str) -> u16 {
        self.c
            .get_with(&self.gw.url(path), &[("x-api-key", key)])
            .await
            .status
            .as_u16()
    }

    /// Sends a request the upstream holds; true once the upstream has it in flight,
    /// false when the gateway answered it instead (shed or rejected).
    async fn hold(&mut self, path: &str, key: &str) -> bool {
        let before = self.up.in_flight();
        let c = self.c.clone();
        let url = self.gw.url(&format!("{path}?{HOLD}"));
        let key = key.to_owned();
        let task = tokio::spawn(async move {
            c.get_with(&url, &[("x-api-key", &key)])
                .await
                .status
                .as_u16()
        });
        let up = self.up.clone();
        assert!(
            eventually(DEADLINE, || {
                let done = task.is_finished();
                let up = up.clone();
                async move { done || up.in_flight() > before }
            })
            .await,
            "the held request neither reached the upstream nor was answered"
        );
        if self.up.in_flight() > before {
            self.held.push(task);
            true
        } else {
            let status = task.await.expect("task");
            assert_eq!(status, 503, "a held request that does not fit is shed");
            false
        }
    }

    async fn shed(&self) -> BTreeMap<String, f64> {
        let m = self.c.get(&self.gw.admin_url("/metrics")).await.text();
        shed_samples(&m)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for t in &self.held {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_requests_are_counted_under_their_own_priority() {
    // Limit 4: slots critical 4, normal 3, borrowed 2, sheddable 1; borrowing below 3.
    let mut h = Harness::start(&format!(
        "  version: 1
{TAGS}  plans: {{tiny: {{bandwidths: ['1/min burst 1']}}, roomy: {{bandwidths: ['1000/s burst 1000']}}}}
  default_plan: roomy
  clients: {{greedy: {{plan: tiny}}}}
  burst_sharing: {{enabled: true}}
  shedding: {{limit: 4}}
"
    ))
    .await;
    // `greedy` uses its quota up while the gateway is idle.
    assert_eq!(h.get("/q", "greedy").await, 200);
    for i in 0..2 {
        assert!(h.hold("/hold", &format!("filler-{i}")).await);
    }
    // Two in flight: sheddable (1 slot) is shed; `greedy` may borrow (2 < 3) but the
    // borrowed class (2 slots) is full.
    assert_eq!(h.get("/sheddable/x", "s").await, 503);
    assert_eq!(h.get("/q", "greedy").await, 503);
    // Four in flight: critical and normal are shed too.
    for i in 0..2 {
        assert!(h.hold("/critical/hold", &format!("crit-filler-{i}")).await);
    }
    assert_eq!(h.get("/critical/x", "c").await, 503);
    assert_eq!(h.get("/q", "n").await, 503);
    let want: BTreeMap<String, f64> = ["borrowed", "critical", "normal", "sheddable"]
        .into_iter()
        .map(|p| (p.to_owned(), 1.0))
        .collect();
    assert_eq!(h.shed().await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_is_admitted_when_normal_fills_a_limit_of_four() {
    let mut h = Harness::start(&format!(
        "  version: 1
{TAGS}  shedding: {{limit: 4}}
"
    ))
    .await;
    let mut normal = 0;
    for i in 0..4 {
        if h.hold("/hold", &format!("n{i}")).await {
            normal += 1;
        }
    }
    assert_eq!(normal, 3, "normal fills ⌊0.9 × 4⌋ = 3 slots");
    // The fourth slot is critical's.
    assert!(h.hold("/critical/hold", "c").await, "critical is admitted");
    assert_eq!(h.up.in_flight(), 4);
    // And now the limit is reached for critical too.
    assert_eq!(h.get("/critical/x", "c2").await, 503);
    assert_eq!(
        h.shed().await,
        BTreeMap::from([("critical".into(), 1.0), ("normal".into(), 1.0)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn borrowed_requests_are_shed_before_normal_ones() {
    // Limit 10 with the defaults: borrowed fits below 7 in flight, normal below 9, and
    // borrowing is allowed below 9 (`below_utilization` 0.9).
    let mut h = Harness::start(
        "  version: 1
  identify: {client_key: [{header: x-api-key}]}
  plans: {tiny: {bandwidths: ['1/min burst 1']}, roomy: {bandwidths: ['1000/s burst 1000']}}
  default_plan: roomy
  clients: {greedy: {plan: tiny}}
  burst_sharing: {enabled: true}
  shedding: {limit: 10}
",
    )
    .await;
    assert_eq!(h.get("/q", "greedy").await, 200, "within its quota");
    assert_eq!(h.get("/q", "greedy").await, 200, "borrowed while idle");
    for i in 0..7 {
        assert!(h.hold("/hold", &format!("filler-{i}")).await);
    }
    // Seven in flight: `greedy` still borrows, and its borrowed request is shed, answered
    // with the IETF problem type for reduced capacity ...
    let shed =
        h.c.get_with(&h.gw.url("/q"), &[("x-api-key", "greedy")])
            .await;
    assert_eq!(shed.status, 503);
    assert_eq!(
        shed.json()["type"],
        "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
    );
    assert!(shed.headers.contains_key("retry-after"));
    // ... while a normal request is admitted.
    assert_eq!(h.get("/q", "n1").await, 200);
    assert_eq!(
        h.shed().await,
        BTreeMap::from([("borrowed".into(), 1.0)]),
        "borrowed is shed first"
    );
    // Nine in flight: no more borrowing (the quota's 429); normal is shed now.
    for i in 7..9 {
        assert!(h.hold("/hold", &format!("filler-{i}")).await);
    }
    assert_eq!(h.get("/q", "greedy").await, 429);
    assert_eq!(h.get("/q", "n2").await, 503);
    assert_eq!(
        h.shed().await,
        BTreeMap::from([("borrowed".into(), 1.0), ("normal".into(), 1.0)])
    );
}
