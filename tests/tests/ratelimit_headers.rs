//! What the responses tell a client about its quota, through the real binary: the
//! `RateLimit-Policy` and `RateLimit` fields parsed with a real structured-field parser
//! (`sfv`), on admits, rejections and borrowed admits, and the problem+json bodies of
//! concurrency and deny rejections.

use std::collections::BTreeMap;
use std::time::Duration;

use fairgate_tests::{eventually, Client, Gateway, Reply, Upstream};
use sfv::{BareItem, ListEntry, Parser};

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

/// One list member: its name and its integer parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    name: String,
    params: BTreeMap<String, i64>,
}

/// Parses a field as a structured-field List of String items with Integer parameters;
/// panics (failing the test) on anything else.
fn parse_list(field: &str, value: &str) -> Vec<Member> {
    let list = Parser::new(value)
        .parse_list()
        .unwrap_or_else(|e| panic!("{field}: {value:?} is not a structured-field list: {e}"));
    list.into_iter()
        .map(|entry| {
            let ListEntry::Item(item) = entry else {
                panic!("{field}: inner list in {value:?}");
            };
            let name = match &item.bare_item {
                BareItem::String(s) => s.as_str().to_owned(),
                other => panic!("{field}: item {other:?} is not a String in {value:?}"),
            };
            let params = item
                .params
                .iter()
                .map(|(k, v)| {
                    let n = v
                        .as_integer()
                        .unwrap_or_else(|| panic!("{field}: {k} is not an Integer in {value:?}"));
                    (k.as_str().to_owned(), i64::from(n))
                })
                .collect();
            Member { name, params }
        })
        .collect()
}

fn member(name: &str, params: &[(&str, i64)]) -> Member {
    Member {
        name: name.to_owned(),
        params: params.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
    }
}

fn policy_of(r: &Reply) -> Vec<Member> {
    parse_list("RateLimit-Policy", r.header("ratelimit-policy"))
}

fn limit_of(r: &Reply) -> Vec<Member> {
    parse_list("RateLimit", r.header("ratelimit"))
}

/// Every bandwidth of the plan is advertised with its sustained rate as `q` per `w` seconds
/// and its burst as `fairgate-burst`; `RateLimit` names the bandwidth closest to running out.
/// (Before: one item, `q` = burst and `w` = the time to refill it: `100/s burst 1` was
/// `q=1;w=1`, and a daily bandwidth next to a per-second one was never advertised.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_policy_advertises_every_bandwidth_with_rate_and_burst() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        &up,
        "  version: 1
  identify: {client_key: [{header: x-api-key}]}
  plans:
    fast: {bandwidths: ['100/s burst 1']}
    half: {bandwidths: ['20/s burst 10']}
    deep: {bandwidths: ['10/s burst 25']}
    daily: {bandwidths: ['10/s burst 20', '100000/day']}
    tight: {bandwidths: ['1000/s burst 1000', '5/day burst 3']}
    odd: {bandwidths: ['3/10s burst 2', {rate: 5/250ms, burst: 7, name: quarter}]}
  default_plan: fast
  clients:
    k-half: {plan: half}
    k-deep: {plan: deep}
    k-daily: {plan: daily}
    k-tight: {plan: tight}
    k-odd: {plan: odd}
  responses: {ratelimit_headers: always}
",
    ));
    let c = Client::new();
    let get = |key: &'static str| {
        let c = c.clone();
        let url = gw.url("/x");
        async move {
            let r = c.get_with(&url, &[("x-api-key", key)]).await;
            assert_eq!(r.status, 200, "{key}: {:?}", r.headers);
            r
        }
    };

    let r = get("k-fast").await;
    assert_eq!(
        policy_of(&r),
        [member(
            "fast-0",
            &[("q", 100), ("w", 1), ("fairgate-burst", 1)]
        )]
    );
    assert_eq!(limit_of(&r)[0].name, "fast-0");

    let r = get("k-half").await;
    assert_eq!(
        policy_of(&r),
        [member(
            "half-0",
            &[("q", 20), ("w", 1), ("fairgate-burst", 10)]
        )]
    );

    let r = get("k-deep").await;
    assert_eq!(
        policy_of(&r),
        [member(
            "deep-0",
            &[("q", 10), ("w", 1), ("fairgate-burst", 25)]
        )]
    );

    // Both bandwidths; the per-second one is closest to running out (19 of 20 left, the
    // daily one has 99,999 of 100,000).
    let r = get("k-daily").await;
    assert_eq!(
        policy_of(&r),
        [
            member("daily-0", &[("q", 10), ("w", 1), ("fairgate-burst", 20)]),
            member(
                "daily-1",
                &[("q", 100_000), ("w", 86_400), ("fairgate-burst", 100_000)]
            ),
        ]
    );
    let limit = limit_of(&r);
    assert_eq!(limit.len(), 1, "{limit:?}");
    assert_eq!(limit[0].name, "daily-0");
    assert_eq!(limit[0].params["r"], 19);

    // Here the daily bandwidth is closest to running out: 2 left of a burst of 3.
    let r = get("k-tight").await;
    assert_eq!(
        policy_of(&r),
        [
            member(
                "tight-0",
                &[("q", 1000), ("w", 1), ("fairgate-burst", 1000)]
            ),
            member("tight-1", &[("q", 5), ("w", 86_400), ("fairgate-burst", 3)]),
        ]
    );
    let limit = limit_of(&r);
    assert_eq!(limit.len(), 1, "{limit:?}");
    assert_eq!(limit[0].name, "tight-1");
    assert_eq!(limit[0].params["r"], 2);

    // Periods other than whole seconds: 3 per 10 s is q=3;w=10; 5 per 250 ms is 20 a second.
    let r = get("k-odd").await;
    assert_eq!(
        policy_of(&r),
        [
            member("odd-0", &[("q", 3), ("w", 10), ("fairgate-burst", 2)]),
            member("quarter", &[("q", 20), ("w", 1), ("fairgate-burst", 7)]),
        ]
    );
}

/// A quota rejection advertises the whole plan too, names the exceeded bandwidth in
/// `RateLimit` (nothing left) and in the problem's `violated-policies`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_rejection_advertises_the_whole_plan() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        &up,
        "  version: 1
  identify: {client_key: [{header: x-api-key}]}
  plans: {free: {bandwidths: ['1/min burst 1', '100/day']}}
  default_plan: free
",
    ));
    let c = Client::new();
    let first = c.get_with(&gw.url("/x"), &[("x-api-key", "k")]).await;
    assert_eq!(first.status, 200);
    // `on_reject` (the default): admits carry no fields.
    assert!(
        first.headers.get("ratelimit").is_none(),
        "{:?}",
        first.headers
    );
    let r = c.get_with(&gw.url("/x"), &[("x-api-key", "k")]).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        policy_of(&r),
        [
            member("free-0", &[("q", 1), ("w", 60), ("fairgate-burst", 1)]),
            member(
                "free-1",
                &[("q", 100), ("w", 86_400), ("fairgate-burst", 100)]
            ),
        ]
    );
    let limit = limit_of(&r);
    assert_eq!(limit.len(), 1, "{limit:?}");
    assert_eq!(limit[0].name, "free-0");
    assert_eq!(limit[0].params["r"], 0);
    let t = limit[0].params["t"];
    assert!((1..=60).contains(&t), "{t}");
    let body = r.json();
    assert_eq!(body["violated-policies"], serde_json::json!(["free-0"]));
}

/// A request admitted over quota by burst sharing carries the fields too (remaining 0):
/// they used to disappear exactly when the client went over its quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_borrowed_admit_carries_the_ratelimit_fields() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        &up,
        "  version: 1
  identify: {client_key: [{header: x-api-key}]}
  plans: {free: {bandwidths: ['1/min burst 1', '1000/day']}}
  default_plan: free
  shedding: {limit: 100}
  burst_sharing: {enabled: true, below_utilization: 0.7}
  responses: {ratelimit_headers: always}
",
    ));
    let c = Client::new();
    let first = c.get_with(&gw.url("/x"), &[("x-api-key", "k")]).await;
    assert_eq!(first.status, 200);
    assert_eq!(limit_of(&first)[0].params["r"], 0);
    // Over quota, but the service is idle: borrowed.
    let r = c.get_with(&gw.url("/x"), &[("x-api-key", "k")]).await;
    assert_eq!(r.status, 200, "borrowed: {:?}", r.headers);
    assert_eq!(up.count(), 2);
    assert_eq!(
        policy_of(&r),
        [
            member("free-0", &[("q", 1), ("w", 60), ("fairgate-burst", 1)]),
            member(
                "free-1",
                &[("q", 1000), ("w", 86_400), ("fairgate-burst", 1000)]
            ),
        ]
    );
    let limit = limit_of(&r);
    assert_eq!(limit.len(), 1, "{limit:?}");
    assert_eq!(limit[0].name, "free-0");
    assert_eq!(limit[0].params["r"], 0);
    assert_eq!(r.headers["fairgate-borrowed"], "?1");
    assert!(!first.headers.contains_key("fairgate-borrowed"));
}

/// With the default `ratelimit_headers: on_reject`, a borrowed admit is told what a
/// rejection would be told: the exhausted bandwidth (`r=0`), and that it rode on spare
/// capacity (`Fairgate-Borrowed: ?1`); an admit within quota carries neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_borrowed_admit_says_so_whatever_the_header_setting() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        &up,
        "  version: 1
  identify: {client_key: [{header: x-api-key}]}
  plans: {free: {bandwidths: ['1/min burst 1']}}
  default_plan: free
  shedding: {limit: 100}
  burst_sharing: {enabled: true}
",
    ));
    let c = Client::new();
    let within = c.get_with(&gw.url("/x"), &[("x-api-key", "k")]).await;
    assert_eq!(within.status, 200);
    assert!(
        !within.headers.contains_key("ratelimit"),
        "{:?}",
        within.headers
    );
    assert!(!within.headers.contains_key("fairgate-borrowed"));
    let borrowed = c.get_with(&gw.url("/x"), &[("x-api-key", "k")]).await;
    assert_eq!(borrowed.status, 200);
    assert_eq!(borrowed.headers["fairgate-borrowed"], "?1");
    let limit = limit_of(&borrowed);
    assert_eq!(limit[0].name, "free-0");
    assert_eq!(limit[0].params["r"], 0);
    assert!(limit[0].params["t"] >= 1);
    // With `never`, no RateLimit fields, but the borrowed signal stays.
    let gw = Gateway::start(&config(
        &up,
        "  version: 1
  identify: {client_key: [{header: x-api-key}]}
  plans: {free: {bandwidths: ['1/min burst 1']}}
  default_plan: free
  shedding: {limit: 100}
  burst_sharing: {enabled: true}
  responses: {ratelimit_headers: never}
",
    ));
    c.get_with(&gw.url("/x"), &[("x-api-key", "k")]).await;
    let borrowed = c.get_with(&gw.url("/x"), &[("x-api-key", "k")]).await;
    assert_eq!(borrowed.status, 200);
    assert_eq!(borrowed.headers["fairgate-borrowed"], "?1");
    assert!(!borrowed.headers.contains_key("ratelimit"));
}

/// A concurrency 429 names no bandwidth: its problem body has no `violated-policies`
/// member (it used to be an empty list), and it still says when to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_rejection_has_no_empty_violated_policies() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        &up,
        "  version: 1
  identify: {client_key: [{header: x-api-key}]}
  plans: {free: {bandwidths: ['100/s burst 100'], concurrency: 1}}
  default_plan: free
",
    ));
    let c = Client::new();
    // One request held in flight at the upstream.
    let held = {
        let c = c.clone();
        let url = gw.url("/slow?delay_ms=3000");
        tokio::spawn(async move { c.get_with(&url, &[("x-api-key", "k")]).await })
    };
    let up2 = up.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let up = up2.clone();
            async move { up.in_flight() == 1 }
        })
        .await,
        "the first request never reached the upstream"
    );
    let r = c.get_with(&gw.url("/x"), &[("x-api-key", "k")]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("content-type"), "application/problem+json");
    assert!(!r.header("retry-after").is_empty(), "{:?}", r.headers);
    let body = r.json();
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert!(
        body.get("violated-policies").is_none(),
        "no policy to name: {body}"
    );
    assert_eq!(held.await.unwrap().status, 200);
}

/// A deny is not retryable: no `Retry-After` (docs/policy.md says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_has_no_retry_after() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        &up,
        "  version: 1
  rules: [{name: no-admin, when: {path: {prefix: /admin}}, action: deny}]
",
    ));
    let r = Client::new().get(&gw.url("/admin/x")).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("content-type"), "application/problem+json");
    assert!(r.headers.get("retry-after").is_none(), "{:?}", r.headers);
    assert_eq!(
        r.json()["violated-policies"],
        serde_json::json!(["no-admin"])
    );
}
