//! Quotas per calendar period (issue #17): counted from the period's start, reset at the
//! next, all-or-nothing with the GCRA bandwidths, kept across reloads. Under a manual
//! clock placed in wall time with `Engine::set_wall_time`, so a month passes in a test.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use fairgate_middleware::{Decision, Engine, Rejection, Stage};

/// `2026-01-31T23:00:00Z` as a `SystemTime`.
fn wall(rfc3339: &str) -> SystemTime {
    let secs = rfc3339
        .parse::<fairgate_policies::units::Timestamp>()
        .expect("a UTC time")
        .unix_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn rejection(d: Decision) -> Rejection {
    match d {
        Decision::Reject(r) => r,
        Decision::Admit(a) => panic!("expected a rejection, got {a:?}"),
    }
}

/// Remaining of bandwidth `name` in `key`'s usage.
fn remaining(e: &Engine, key: &str, name: &str) -> u64 {
    let u = e.client_usage(key).expect("a tracked client");
    u.bandwidths
        .iter()
        .find(|b| &*b.ratelimit.bandwidth == name)
        .unwrap_or_else(|| panic!("no bandwidth {name} in {u:?}"))
        .ratelimit
        .remaining
}

const MONTHLY: &str = "version: 1
plans:
  free:
    bandwidths: [{quota: 3, period: month, name: monthly}, {rate: 10/s, name: fast}]
default_plan: free
";

#[test]
fn a_month_quota_rejects_until_the_first_and_points_at_the_reset() {
    let (e, clock, _) = engine(MONTHLY);
    e.set_wall_time(wall("2026-01-31T23:00:00Z"));
    let r = Req::from("192.0.2.1");
    assert_eq!(admit_n(&e, &r, 3), 3);
    let rej = rejection(r.decide(&e));
    assert_eq!(rej.stage, Stage::Quota);
    assert_eq!(rej.bandwidth.as_deref(), Some("monthly"));
    // The reset is February 1st, 00:00 UTC: one hour away, exactly.
    assert_eq!(rej.retry_after, Some(Duration::from_secs(3600)));
    let info = rej.ratelimit.expect("ratelimit numbers");
    assert_eq!(
        (
            info.quota,
            info.window_secs,
            info.remaining,
            info.reset_secs
        ),
        (3, 30 * 86_400, 0, 3600)
    );
    // A second before the reset: still January's, told one second.
    clock.advance(Duration::from_secs(3599));
    let rej = rejection(r.decide(&e));
    assert_eq!(rej.retry_after, Some(Duration::from_secs(1)));
    // February: the whole quota again, and not a unit more.
    clock.advance(Duration::from_secs(1));
    assert_eq!(admit_n(&e, &r, 5), 3);
    let rej = rejection(r.decide(&e));
    // 28 days of February to the next reset.
    assert_eq!(rej.retry_after, Some(Duration::from_secs(28 * 86_400)));
}

#[test]
fn a_period_and_a_rate_are_all_or_nothing() {
    let (e, clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: [{quota: 5, period: day, name: daily}, {rate: 1/min, burst: 1, name: slow}]
default_plan: free
",
    );
    e.set_wall_time(wall("2026-03-10T12:00:00Z"));
    let r = Req::from("192.0.2.1");
    assert!(admit(&e, &r));
    // The rate rejects: the day's count is given back.
    let rej = rejection(r.decide(&e));
    assert_eq!(rej.bandwidth.as_deref(), Some("slow"));
    assert_eq!(remaining(&e, "192.0.2.1", "daily"), 4);
    // Four more a minute apart use the day up; the sixth is refused by the day, and the
    // rate's bucket, consumed first in the check, is given back.
    for _ in 0..4 {
        clock.advance(Duration::from_secs(60));
        assert!(admit(&e, &r));
    }
    clock.advance(Duration::from_secs(60));
    let rej = rejection(r.decide(&e));
    assert_eq!(rej.bandwidth.as_deref(), Some("daily"));
    assert_eq!(remaining(&e, "192.0.2.1", "slow"), 1);
    assert_eq!(
        rej.retry_after,
        Some(Duration::from_secs(12 * 3600 - 5 * 60))
    );
}

#[test]
fn a_reload_keeps_the_count_and_applies_the_new_quota() {
    let (e, _clock, store) = engine(MONTHLY);
    e.set_wall_time(wall("2026-01-15T10:00:00Z"));
    let r = Req::from("192.0.2.1");
    assert_eq!(admit_n(&e, &r, 5), 3);
    // Upgraded to 5 a month: the 3 used stay used, 2 are left.
    store
        .reload_from_str(&MONTHLY.replace("quota: 3", "quota: 5"), "test.yaml")
        .unwrap();
    assert_eq!(admit_n(&e, &r, 5), 2);
    // Down to 4: over it already, refused until February.
    store
        .reload_from_str(&MONTHLY.replace("quota: 3", "quota: 4"), "test.yaml")
        .unwrap();
    assert_eq!(admit_n(&e, &r, 2), 0);
}

#[test]
fn a_day_in_a_time_zone_resets_at_local_midnight() {
    let (e, clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: [{quota: 2, period: day, time_zone: Europe/Paris}]
default_plan: free
",
    );
    // 23:59 in Paris (UTC+1 in January).
    e.set_wall_time(wall("2026-01-15T22:59:00Z"));
    let r = Req::from("192.0.2.1");
    assert_eq!(admit_n(&e, &r, 3), 2);
    let rej = rejection(r.decide(&e));
    assert_eq!(rej.retry_after, Some(Duration::from_secs(60)));
    clock.advance(Duration::from_secs(60));
    assert_eq!(admit_n(&e, &r, 3), 2);
}

#[test]
fn a_week_runs_from_monday() {
    let (e, clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: [{quota: 1, period: week}]
default_plan: free
",
    );
    // Sunday 2026-12-06, 23:00 UTC: the week ends at Monday's midnight.
    e.set_wall_time(wall("2026-12-06T23:00:00Z"));
    let r = Req::from("192.0.2.1");
    assert!(admit(&e, &r));
    assert_eq!(
        rejection(r.decide(&e)).retry_after,
        Some(Duration::from_secs(3600))
    );
    clock.advance(Duration::from_secs(3600));
    assert!(admit(&e, &r));
    assert_eq!(
        rejection(r.decide(&e)).retry_after,
        Some(Duration::from_secs(7 * 86_400))
    );
}

/// In an axum app: the layer's answers point at the reset, and under paused tokio time
/// (the engine on `TokioClock`) the month ends and the quota comes back.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_axum_app_refuses_until_the_first_and_admits_after_it() {
    use axum::{routing::get, Router};
    use fairgate_middleware::{AdmissionLayer, EngineBuilder, TokioClock};
    use tower::ServiceExt as _;

    let store = fairgate_policies::PolicyStore::from_yaml_str(
        "version: 1
identify: {client_key: [{header: x-api-key}]}
plans:
  metered: {bandwidths: [{quota: 2, period: month, name: monthly}]}
default_plan: metered
",
        "policy.yaml",
    )
    .unwrap();
    let engine = EngineBuilder::new(store)
        .clock(std::sync::Arc::new(TokioClock::new()))
        .start()
        .unwrap();
    engine.set_wall_time(wall("2026-01-31T23:59:00Z"));
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(AdmissionLayer::new(engine));
    let call = |app: Router| async move {
        let req = http::Request::get("/")
            .header("x-api-key", "acme")
            .body(axum::body::Body::empty())
            .unwrap();
        app.oneshot(req).await.unwrap()
    };
    assert_eq!(call(app.clone()).await.status(), 200);
    assert_eq!(call(app.clone()).await.status(), 200);
    let refused = call(app.clone()).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "60");
    let limit = refused.headers()["ratelimit"].to_str().unwrap();
    assert!(limit.contains(";r=0;t=60"), "RateLimit: {limit}");
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(call(app.clone()).await.status(), 429);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(call(app.clone()).await.status(), 200);
}

/// A period beyond the client entry's two slots lives in an entry of its own, checked the
/// same way.
#[test]
fn a_period_in_its_own_entry_counts_the_same() {
    let (e, clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: ['100/s', '1000/min', {quota: 2, period: day, name: daily}]
default_plan: free
",
    );
    e.set_wall_time(wall("2026-06-30T23:00:00Z"));
    let r = Req::from("192.0.2.1");
    assert_eq!(admit_n(&e, &r, 4), 2);
    let rej = rejection(r.decide(&e));
    assert_eq!(rej.bandwidth.as_deref(), Some("daily"));
    assert_eq!(rej.retry_after, Some(Duration::from_secs(3600)));
    // The rates were given back: 98 of 100 left on the first.
    assert_eq!(remaining(&e, "192.0.2.1", "free-0"), 98);
    clock.advance(Duration::from_secs(3600));
    assert_eq!(admit_n(&e, &r, 4), 2);
}
