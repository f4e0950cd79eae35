//! The admin API's `/clients/{key}` and `/clients/top` through the real binary (issue 13,
//! item 5): they show the plan the client is charged to, also when a `tag` rule chose it,
//! and answer 404 only when no plan applies to an unknown client.

use fairgate_tests::{Client, Gateway, Upstream};
use serde_json::Value;

fn config(upstream: &Upstream, policy: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
policy:
{policy}",
        upstream.addr
    )
}

/// `partner` is chosen by a `tag` rule on `x-partner`; it is much smaller than `free`.
const PLANS: &str = "  version: 1
  identify: {client_key: [{header: x-api-key}]}
  plans:
    free: {bandwidths: ['10/min burst 10']}
    partner: {bandwidths: ['1/min burst 2']}
  rules:
    - name: partners
      when: {headers: [{name: x-partner, present: true}]}
      action: {tag: {plan: partner}}
";

async fn send(c: &Client, gw: &Gateway, key: &str, partner: bool) -> u16 {
    let mut headers = vec![("x-api-key", key)];
    if partner {
        headers.push(("x-partner", "1"));
    }
    c.get_with(&gw.url("/x"), &headers).await.status.as_u16()
}

async fn client(c: &Client, gw: &Gateway, key: &str) -> (u16, Value) {
    let r = c.get(&gw.admin_url(&format!("/clients/{key}"))).await;
    let status = r.status.as_u16();
    (status, r.json())
}

/// The bandwidth entries of a usage object, as (plan, remaining, fill_fraction).
fn bandwidths(usage: &Value) -> Vec<(String, u64, f64)> {
    usage["bandwidths"]
        .as_array()
        .expect("bandwidths")
        .iter()
        .map(|b| {
            (
                b["plan"].as_str().expect("plan").to_owned(),
                b["remaining"].as_u64().expect("remaining"),
                b["fill_fraction"].as_f64().expect("fill_fraction"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tagged_client_is_shown_on_its_tagged_plan() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, &format!("{PLANS}  default_plan: free\n")));
    let c = Client::new();
    let statuses = [
        send(&c, &gw, "p1", true).await,
        send(&c, &gw, "p1", true).await,
        send(&c, &gw, "p1", true).await,
    ];
    assert_eq!(statuses, [200, 200, 429], "the tagged plan's burst is 2");

    let (status, u) = client(&c, &gw, "p1").await;
    assert_eq!(status, 200, "{u}");
    assert_eq!(u["plan"], "partner", "{u}");
    let bws = bandwidths(&u);
    assert_eq!(bws.len(), 1, "only the plan it has buckets in: {u}");
    assert_eq!(bws[0].0, "partner");
    assert_eq!(bws[0].1, 0, "nothing remaining: {u}");
    // `1/min burst 2`: the numbers of RateLimit-Policy, rate and burst.
    let bw = &u["bandwidths"][0];
    assert_eq!(
        (&bw["quota"], &bw["window_seconds"], &bw["burst"]),
        (&Value::from(1), &Value::from(60), &Value::from(2)),
        "{u}"
    );
    assert!(u["usage"].as_f64().unwrap() > 0.9, "{u}");

    // Tagged and untagged requests: both plans, the most used one named.
    assert_eq!(send(&c, &gw, "mixed", false).await, 200);
    assert_eq!(send(&c, &gw, "mixed", true).await, 200);
    assert_eq!(send(&c, &gw, "mixed", true).await, 200);
    let (_, u) = client(&c, &gw, "mixed").await;
    assert_eq!(u["plan"], "partner", "{u}");
    let mut plans: Vec<String> = bandwidths(&u).into_iter().map(|b| b.0).collect();
    plans.sort();
    assert_eq!(plans, ["free", "partner"], "{u}");

    // /clients/top shows the same.
    let top = c.get(&gw.admin_url("/clients/top?n=10")).await.json();
    let p1 = top["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .find(|e| e["key"] == "p1")
        .unwrap_or_else(|| panic!("p1 in {top}"));
    assert_eq!(p1["plan"], "partner", "{top}");
    assert_eq!(bandwidths(p1)[0].1, 0, "{top}");

    // A client with no state has full buckets of the default plan: 200, not 404.
    let (status, u) = client(&c, &gw, "nobody").await;
    assert_eq!(status, 200, "{u}");
    assert_eq!(u["plan"], "free", "{u}");
    let bws = bandwidths(&u);
    assert_eq!(bws.len(), 1, "{u}");
    assert_eq!(bws[0].0, "free");
    assert_eq!(bws[0].1, 10, "a full bucket: {u}");
    assert_eq!(bws[0].2, 1.0, "{u}");
    assert_eq!(u["usage"].as_f64(), Some(0.0), "{u}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_plan_unknown_clients_are_404_and_tagged_ones_are_shown() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, PLANS));
    let c = Client::new();
    assert_eq!(send(&c, &gw, "p2", true).await, 200);

    let (status, u) = client(&c, &gw, "p2").await;
    assert_eq!(status, 200, "{u}");
    assert_eq!(u["plan"], "partner", "{u}");
    assert_eq!(bandwidths(&u)[0].1, 1, "one of two used: {u}");

    // No plan applies to a client without state: 404 problem+json.
    let r = c.get(&gw.admin_url("/clients/nobody")).await;
    assert_eq!(r.status.as_u16(), 404, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/problem+json");
    // Untagged traffic (no quota) leaves no state either.
    assert_eq!(send(&c, &gw, "free-rider", false).await, 200);
    let (status, _) = client(&c, &gw, "free-rider").await;
    assert_eq!(status, 404);
}
