//! The usage endpoint on the data port (issue 16, item 2), through the real binary: a client
//! reads its own quota with the numbers its `RateLimit` fields carry, at no cost; it can never
//! read or cap another client (another key on the same IP, a forged `X-Forwarded-For` from
//! an untrusted peer, a key in the URL); it lowers its own cap, is held to it, cannot raise it
//! past its plan, lifts it; the cap survives a restart and a policy reload; the number of
//! caps is bounded.

use std::collections::BTreeMap;
use std::path::Path;

use fairgate_tests::{full, Client, Gateway, Reply, Upstream};
use serde_json::Value;
use sfv::{BareItem, ListEntry, Parser};

const USAGE: &str = "/.well-known/fairgate/quota";

/// `10/h burst 10`: nothing refills while a test runs (one unit every 6 minutes).
fn policy(extra: &str) -> String {
    format!(
        "version: 1
identify: {{client_key: [{{header: x-api-key}}]}}
plans:
  free: {{bandwidths: ['10/h burst 10'], concurrency: 4}}
default_plan: free
responses: {{ratelimit_headers: always}}
usage_endpoint: {{path: {USAGE}, self_caps: true, caps_file: caps.json, max_caps: 2}}
{extra}"
    )
}

fn config(up: &Upstream) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams: {{u: {{targets: ['{}']}}}}
policy: policy.yaml
log: {{decisions: off}}
",
        up.addr
    )
}

fn start(up: &Upstream, policy: &str) -> Gateway {
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
    Gateway::start_in(dir, &config(up))
}

/// The integer parameters of the one item of a structured-field list, by name.
fn item(field: &str, value: &str) -> (String, BTreeMap<String, i64>) {
    let list = Parser::new(value)
        .parse_list()
        .unwrap_or_else(|e| panic!("{field}: {value:?}: {e}"));
    assert_eq!(list.len(), 1, "{field}: {value:?}");
    let ListEntry::Item(item) = &list[0] else {
        panic!("{field}: {value:?}");
    };
    let BareItem::String(name) = &item.bare_item else {
        panic!("{field}: {value:?}");
    };
    let params = item
        .params
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_integer().map_or(-1, i64::from)))
        .collect();
    (name.as_str().to_owned(), params)
}

async fn request(c: &Client, gw: &Gateway, key: &str) -> Reply {
    c.get_with(&gw.url("/x"), &[("x-api-key", key)]).await
}

async fn usage(c: &Client, gw: &Gateway, key: &str) -> Value {
    let r = c.get_with(&gw.url(USAGE), &[("x-api-key", key)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("cache-control"), "no-store");
    r.json()
}

async fn put_cap(c: &Client, gw: &Gateway, key: &str, cap: &str) -> Reply {
    c.request(
        "PUT",
        &gw.url(USAGE),
        &[("x-api-key", key), ("content-type", "application/json")],
        full(cap.to_owned()),
    )
    .await
}

async fn delete_cap(c: &Client, gw: &Gateway, key: &str) -> Reply {
    c.request("DELETE", &gw.url(USAGE), &[("x-api-key", key)], full(""))
        .await
}

/// (quota, window, burst, remaining, reset) of the one bandwidth of a usage document.
fn numbers(u: &Value) -> (u64, u64, u64, u64, u64) {
    let bws = u["bandwidths"].as_array().expect("bandwidths");
    assert_eq!(bws.len(), 1, "{u}");
    let b = &bws[0];
    assert_eq!(b["name"], "free-0", "{u}");
    let n = |k: &str| b[k].as_u64().unwrap_or_else(|| panic!("{k} in {u}"));
    (
        n("quota"),
        n("window_seconds"),
        n("burst"),
        n("remaining"),
        n("reset_seconds"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_shows_the_ratelimit_numbers_and_costs_nothing() {
    let up = Upstream::start().await;
    let gw = start(&up, &policy(""));
    let c = Client::new();
    let mut last = None;
    for _ in 0..3 {
        let r = request(&c, &gw, "a").await;
        assert_eq!(r.status, 200);
        last = Some(r);
    }
    let r = last.unwrap();
    let (name, pol) = item("RateLimit-Policy", r.header("ratelimit-policy"));
    let (lname, lim) = item("RateLimit", r.header("ratelimit"));
    assert_eq!((name.as_str(), lname.as_str()), ("free-0", "free-0"));

    let u = usage(&c, &gw, "a").await;
    let (q, w, burst, remaining, reset) = numbers(&u);
    assert_eq!(
        (q, w, burst) as (u64, u64, u64),
        (
            pol["q"] as u64,
            pol["w"] as u64,
            pol["fairgate-burst"] as u64
        ),
        "{u}"
    );
    assert_eq!((q, w, burst), (10, 3600, 10), "{u}");
    assert_eq!(remaining, lim["r"] as u64, "{u}");
    assert_eq!(remaining, 7, "{u}");
    // The reset counts down in whole seconds: at most one second later than the header's.
    let t = lim["t"] as u64;
    assert!(
        reset == t || reset + 1 == t,
        "reset {reset}, header t={t}: {u}"
    );
    assert_eq!(u["plan"], "free", "{u}");
    assert_eq!(u["concurrency_limit"], 4, "{u}");
    assert_eq!(u["in_flight"], 0, "{u}");
    assert_eq!(u["borrowing"], false, "{u}");
    assert_eq!(u["spare_capacity"], false, "no burst sharing: {u}");
    assert_eq!(u["cap"], Value::Null, "{u}");
    assert_eq!(u["self_caps"], true, "{u}");

    // Reading costs nothing: more reads than the burst, then one request has 6 left.
    for _ in 0..12 {
        usage(&c, &gw, "a").await;
    }
    let r = request(&c, &gw, "a").await;
    assert_eq!(r.status, 200);
    assert_eq!(item("RateLimit", r.header("ratelimit")).1["r"], 6);
    // The endpoint is answered by the gateway, not the upstream, and is not a decision.
    assert_eq!(up.count(), 4, "only the four requests reached the upstream");
    let metrics = c.get(&gw.admin_url("/metrics")).await.text();
    let requests: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("fairgate_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(requests, 4.0, "{metrics}");

    // Other methods are refused with the ones it allows.
    let r = c
        .request("POST", &gw.url(USAGE), &[("x-api-key", "a")], full(""))
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), "GET, HEAD, PUT, DELETE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reads_and_caps_only_itself() {
    let up = Upstream::start().await;
    let gw = start(&up, &policy(""));
    let c = Client::new();
    for _ in 0..3 {
        assert_eq!(request(&c, &gw, "a").await.status, 200);
    }
    // Same IP, another key: its own, untouched bucket.
    assert_eq!(numbers(&usage(&c, &gw, "b").await).3, 10);
    assert_eq!(numbers(&usage(&c, &gw, "a").await).3, 7);
    // A key in the URL names nobody: the caller is who its headers say.
    let r = c
        .get_with(&gw.url(&format!("{USAGE}?key=a")), &[("x-api-key", "b")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(numbers(&r.json()).3, 10, "still b's own usage");

    // A caps itself; b sees no cap and keeps its quota.
    let r = put_cap(&c, &gw, "a", r#"{"bandwidths": {"free-0": {"quota": 2}}}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = usage(&c, &gw, "b").await;
    assert_eq!(b["cap"], Value::Null, "{b}");
    assert_eq!(numbers(&b).0, 10, "{b}");
    assert_eq!(request(&c, &gw, "b").await.status, 200);

    // Keyless clients are their IP; a forwarded header from an untrusted peer is ignored.
    let from2 = Client::from_ip("127.0.0.2");
    let from3 = Client::from_ip("127.0.0.3");
    let xff = [("x-forwarded-for", "127.0.0.3")];
    for _ in 0..2 {
        assert_eq!(from2.get_with(&gw.url("/x"), &xff).await.status, 200);
    }
    let own = from2.get_with(&gw.url(USAGE), &xff).await.json();
    assert_eq!(numbers(&own).3, 8, "127.0.0.2's own usage: {own}");
    let other = from3.get(&gw.url(USAGE)).await.json();
    assert_eq!(
        numbers(&other).3,
        10,
        "127.0.0.3 was never charged: {other}"
    );
    // A cap set with a forged header lands on the sender.
    let r = from2
        .request(
            "PUT",
            &gw.url(USAGE),
            &xff,
            full(r#"{"concurrency": 1}"#.to_owned()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["concurrency_limit"], 1);
    let other = from3.get(&gw.url(USAGE)).await.json();
    assert_eq!(other["cap"], Value::Null, "{other}");
    assert_eq!(other["concurrency_limit"], 4, "{other}");

    // `max_caps: 2`: a third client's cap is refused, saying why; an existing one may change.
    let r = put_cap(&c, &gw, "c", r#"{"concurrency": 2}"#).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("limit of 2 self-set caps"),
        "{}",
        r.text()
    );
    assert_eq!(usage(&c, &gw, "c").await["cap"], Value::Null);
    let r = put_cap(&c, &gw, "a", r#"{"concurrency": 3}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_held_to_its_cap_cannot_raise_it_and_lifts_it() {
    let up = Upstream::start().await;
    let gw = start(&up, &policy(""));
    let c = Client::new();
    assert_eq!(request(&c, &gw, "a").await.status, 200);

    let r = put_cap(&c, &gw, "a", r#"{"bandwidths": {"free-0": {"quota": 3}}}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let u = r.json();
    assert_eq!(u["cap"]["bandwidths"]["free-0"]["quota"], 3, "{u}");
    // 10 → 3 per hour; the burst scales with it; 9 of 10 left keeps its fraction: 2 of 3.
    assert_eq!(numbers(&u), (3, 3600, 3, 2, numbers(&u).4), "{u}");

    // Held to it: two more, then 429 naming the capped bandwidth.
    assert_eq!(request(&c, &gw, "a").await.status, 200);
    let r = request(&c, &gw, "a").await;
    assert_eq!(r.status, 200);
    let (_, pol) = item("RateLimit-Policy", r.header("ratelimit-policy"));
    assert_eq!((pol["q"], pol["fairgate-burst"]), (3, 3));
    let r = request(&c, &gw, "a").await;
    assert_eq!(r.status, 429, "held to the cap, though the plan allows 10");
    assert_eq!(item("RateLimit", r.header("ratelimit")).1["r"], 0);

    // The operator sees it.
    let admin = c.get(&gw.admin_url("/clients/a")).await.json();
    assert_eq!(admin["cap"]["bandwidths"]["free-0"]["quota"], 3, "{admin}");
    assert_eq!(admin["bandwidths"][0]["quota"], 3, "{admin}");

    // Above the plan: refused with the allowed maximum; nothing changes.
    let r = put_cap(&c, &gw, "a", r#"{"bandwidths": {"free-0": {"quota": 11}}}"#).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/problem+json");
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .contains("at most quota 10 per 3600 s with burst 10"),
        "{}",
        r.text()
    );
    let r = put_cap(&c, &gw, "a", r#"{"concurrency": 5}"#).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("at most 4"), "{}", r.text());
    let r = put_cap(&c, &gw, "a", r#"{"bandwidths": {"gold": {"quota": 1}}}"#).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("free-0"),
        "names the client's bandwidths: {}",
        r.text()
    );
    let r = put_cap(&c, &gw, "a", r#"{"bandwidths": {"free-0": {"quota": 0}}}"#).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let errors = r.json()["errors"].to_string();
    assert!(errors.contains("request body:1:"), "{errors}");
    assert!(errors.contains("must be at least 1"), "{errors}");
    assert_eq!(
        numbers(&usage(&c, &gw, "a").await).0,
        3,
        "still capped at 3"
    );

    // Lifted: the plan's quota again, with the same fraction of the bucket left (0.7 of 3
    // is 2.3 of 10): lifting refills nothing.
    let r = delete_cap(&c, &gw, "a").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let u = r.json();
    assert_eq!(u["cap"], Value::Null, "{u}");
    assert_eq!(numbers(&u).0, 10, "{u}");
    assert_eq!(numbers(&u).3, 2, "{u}");
    let r = request(&c, &gw, "a").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        item("RateLimit-Policy", r.header("ratelimit-policy")).1["q"],
        10
    );
    assert_eq!(item("RateLimit", r.header("ratelimit")).1["r"], 1);
    assert_eq!(
        c.get(&gw.admin_url("/clients/a")).await.json()["cap"],
        Value::Null
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_survives_a_restart_and_a_policy_reload() {
    let up = Upstream::start().await;
    let mut gw = start(&up, &policy(""));
    let c = Client::new();
    let r = put_cap(
        &c,
        &gw,
        "a",
        r#"{"bandwidths": {"free-0": {"quota": 2}}, "concurrency": 1}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let caps = std::fs::read_to_string(gw.dir().join("caps.json")).expect("caps.json");
    assert!(caps.contains("\"a\""), "{caps}");

    let dir = gw.dir_handle();
    gw.kill();
    let gw = Gateway::start_in(dir, &config(&up));
    let u = usage(&c, &gw, "a").await;
    assert_eq!(u["cap"]["concurrency"], 1, "{u}");
    assert_eq!(u["concurrency_limit"], 1, "{u}");
    assert_eq!(numbers(&u).0, 2, "{u}");
    assert_eq!(request(&c, &gw, "a").await.status, 200);
    assert_eq!(request(&c, &gw, "a").await.status, 200);
    assert_eq!(request(&c, &gw, "a").await.status, 429);

    // A reload of a changed policy keeps the cap (the same caps file).
    reload_with(&c, &gw, &policy("state: {max_keys: 50000}\n")).await;
    let u = usage(&c, &gw, "a").await;
    assert_eq!(numbers(&u).0, 2, "{u}");
    assert_eq!(u["cap"]["concurrency"], 1, "{u}");
    assert_eq!(request(&c, &gw, "a").await.status, 429);
    assert_eq!(numbers(&usage(&c, &gw, "b").await).0, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_self_caps_the_endpoint_only_reads_and_a_bad_caps_file_is_refused() {
    let up = Upstream::start().await;
    let read_only = format!(
        "version: 1
plans: {{free: {{bandwidths: ['10/h burst 10']}}}}
default_plan: free
usage_endpoint: {{path: {USAGE}}}
"
    );
    let gw = start(&up, &read_only);
    let c = Client::new();
    let r = put_cap(&c, &gw, "a", r#"{"concurrency": 1}"#).await;
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.header("allow"), "GET, HEAD");
    assert_eq!(usage(&c, &gw, "a").await["self_caps"], false);
    // Another path is proxied as before.
    assert_eq!(
        c.get(&gw.url("/.well-known/fairgate/other")).await.status,
        200
    );
    assert_eq!(up.count(), 1);

    // A caps file with a bad value stops the start with its position.
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("policy.yaml"), policy("")).unwrap();
    std::fs::write(
        dir.path().join("caps.json"),
        "{\"a\": {\"concurrency\": 0}}\n",
    )
    .unwrap();
    let (code, _, err) =
        fairgate_tests::run_fairgate(&["check", dir.path().join("policy.yaml").to_str().unwrap()]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("caps.json:1:"), "{err}");
    assert!(err.contains("concurrency"), "{err}");
}

async fn reload_with(c: &Client, gw: &Gateway, policy: &str) {
    write(&gw.dir().join("policy.yaml"), policy);
    let r = c
        .request("POST", &gw.admin_url("/reload"), &[], full(""))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["unchanged"], false, "{}", r.text());
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}
