//! Quotas per calendar period (issue 17, item 3) through the real binary: a month's quota
//! is refused until the 1st with `Retry-After` and `RateLimit`'s `t` pointing at the reset,
//! a reload keeps the month's count, and with Redis the count is the fleet's and outlives
//! the gateways. Each gateway is placed in wall time with the test-only
//! `FAIRGATE_TEST_WALL_CLOCK` (read once at start; its clock runs on from there), so a month
//! ends within a test.

use std::collections::BTreeMap;
use std::time::Instant;

use fairgate_tests::redis::RedisServer;
use fairgate_tests::{empty, Client, Gateway, Reply, Upstream};
use sfv::{BareItem, ListEntry, Parser};

const KEY: [(&str, &str); 1] = [("x-api-key", "acme")];

fn config(upstream: &Upstream, policy: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0, token: t0k}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
policy: {policy}
log: {{decisions: off}}
",
        upstream.addr
    )
}

fn monthly(quota: u64) -> String {
    format!(
        "version: 1
identify: {{client_key: [{{header: x-api-key}}]}}
plans:
  metered:
    bandwidths: [{{quota: {quota}, period: month, name: monthly}}, {{rate: 100/s, name: fast}}]
default_plan: metered
"
    )
}

/// The integer parameters of the first `name` member of structured-field list `value`.
fn params(value: &str, name: &str) -> BTreeMap<String, i64> {
    let list = Parser::new(value)
        .parse_list()
        .unwrap_or_else(|e| panic!("{value:?} is not a structured-field list: {e}"));
    for entry in list {
        let ListEntry::Item(item) = entry else {
            continue;
        };
        if matches!(&item.bare_item, BareItem::String(s) if s.as_str() == name) {
            return item
                .params
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), i64::from(v.as_integer()?))))
                .collect();
        }
    }
    panic!("no member {name} in {value:?}");
}

async fn get(c: &Client, gw: &Gateway) -> Reply {
    c.get_with(&gw.url("/"), &KEY).await
}

async fn statuses(c: &Client, gw: &Gateway, n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(get(c, gw).await.status.as_u16());
    }
    out
}

/// A 429 of the month's quota: `Retry-After` and `RateLimit`'s `t` are the seconds to
/// February 1st 00:00 UTC from a wall clock that started at 23:00:00 `started` ago (at most
/// a second more than that, rounded up).
#[track_caller]
fn points_at_the_reset(r: &Reply, started: Instant) {
    assert_eq!(r.status.as_u16(), 429, "{:?}", r.headers);
    let retry: u64 = r
        .header("retry-after")
        .parse()
        .expect("Retry-After seconds");
    let elapsed = started.elapsed().as_secs();
    assert!(
        (3600 - elapsed - 1..=3600).contains(&retry),
        "Retry-After {retry} s, {elapsed} s after 23:00:00"
    );
    let limit = params(r.header("ratelimit"), "monthly");
    assert_eq!(limit["r"], 0);
    assert_eq!(limit["t"], retry as i64, "RateLimit t is Retry-After");
    // A month is advertised as its nominal 30 days.
    assert_eq!(
        params(r.header("ratelimit-policy"), "monthly")["w"],
        30 * 86_400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_quota_is_refused_until_the_first_and_a_reload_keeps_its_count() {
    let up = Upstream::start().await;
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("policy.yaml"), monthly(3)).unwrap();
    let started = Instant::now();
    let gw = Gateway::start_with_env(
        dir,
        &config(&up, "policy.yaml"),
        &[],
        &[("FAIRGATE_TEST_WALL_CLOCK", "2026-01-31T23:00:00Z")],
    );
    let c = Client::new();
    assert_eq!(statuses(&c, &gw, 3).await, [200, 200, 200]);
    let r = get(&c, &gw).await;
    points_at_the_reset(&r, started);
    assert_eq!(params(r.header("ratelimit-policy"), "monthly")["q"], 3);
    // An upgrade to 5 a month: the 3 used stay used.
    std::fs::write(gw.dir().join("policy.yaml"), monthly(5)).unwrap();
    let reload = c
        .request(
            "POST",
            &gw.admin_url("/reload"),
            &[("authorization", "Bearer t0k")],
            empty(),
        )
        .await;
    assert_eq!(reload.status, 200, "{}", reload.text());
    assert_eq!(statuses(&c, &gw, 2).await, [200, 200]);
    let r = get(&c, &gw).await;
    points_at_the_reset(&r, started);
    assert_eq!(params(r.header("ratelimit-policy"), "monthly")["q"], 5);
    assert_eq!(up.count(), 5);
    assert!(
        gw.stderr().contains("FAIRGATE_TEST_WALL_CLOCK is set"),
        "the test clock is announced"
    );
}

fn fleet_policy(redis: &RedisServer) -> String {
    format!(
        "{{version: 1, identify: {{client_key: [{{header: x-api-key}}]}},
  plans: {{metered: {{bandwidths: [{{quota: 4, period: month, name: monthly}}]}}}},
  default_plan: metered,
  state: {{backend: redis, redis: {{url: '{}', mode: exact, timeout: 250ms, on_failure: closed}}}}}}",
        redis.url()
    )
}

fn start_at(up: &Upstream, redis: &RedisServer, wall: &str) -> Gateway {
    Gateway::start_with_env(
        Gateway::tempdir(),
        &config(up, &fleet_policy(redis)),
        &[],
        &[("FAIRGATE_TEST_WALL_CLOCK", wall)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_month_quota_is_the_fleets_and_outlives_its_gateways() {
    let up = Upstream::start().await;
    let redis = RedisServer::start();
    let c = Client::new();
    let started = Instant::now();
    let a = start_at(&up, &redis, "2026-01-31T23:00:00Z");
    let b = start_at(&up, &redis, "2026-01-31T23:00:00Z");
    // Two gateways, one count: 4 in all.
    let mut seen = Vec::new();
    for i in 0..6 {
        let gw = if i % 2 == 0 { &a } else { &b };
        seen.push(get(&c, gw).await.status.as_u16());
    }
    assert_eq!(seen, [200, 200, 200, 200, 429, 429]);
    let r = get(&c, &b).await;
    assert_eq!(r.status.as_u16(), 429);
    let retry: u64 = r.header("retry-after").parse().unwrap();
    let elapsed = started.elapsed().as_secs();
    assert!(
        (3600 - elapsed - 1..=3600).contains(&retry),
        "Retry-After {retry} s, {elapsed} s after 23:00:00"
    );
    assert_eq!(params(r.header("ratelimit"), "monthly")["t"], retry as i64);
    drop((a, b));
    // A gateway started later in January finds the month's count in Redis.
    let late = start_at(&up, &redis, "2026-01-31T23:30:00Z");
    assert_eq!(statuses(&c, &late, 1).await, [429]);
    drop(late);
    // February: a new period, the whole quota again, for the fleet.
    let feb = start_at(&up, &redis, "2026-02-01T00:00:00Z");
    assert_eq!(statuses(&c, &feb, 5).await, [200, 200, 200, 200, 429]);
    assert_eq!(up.count(), 8);
    assert_eq!(
        redis
            .cli(&[
                "--raw",
                "GET",
                "fairgate:{acme}:p:plan:metered/monthly@month:1769904000"
            ])
            .trim(),
        "4"
    );
}
