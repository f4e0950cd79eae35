//! Nightly-tier scenarios (redis): run by `scripts/nightly.sh`, not by `.ci/run`.
//!
//! SCENARIOS.md F6 (Redis restart with data loss under 3 gateways) and F7 (multi-instance
//! accuracy over 30 s, exact and async, and with Redis down). Scenarios run one at a time.

use std::time::{Duration, Instant};

use fairgate_tests::load::run_all;
use fairgate_tests::redis::{admitted, fleet_config as config, spread, wait_fleet, RedisServer};
use fairgate_tests::{metric, Client, Gateway, Upstream};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// === F7 ===

async fn f7(mode: &str, redis_down: bool, gateways: usize) -> (u64, f64) {
    let mut redis = RedisServer::start();
    let up = Upstream::start().await;
    let on_failure = if redis_down { "open" } else { "local" };
    let cfg = config(&up, &redis.url(), mode, on_failure, "40/s burst 20");
    let gws: Vec<Gateway> = (0..gateways).map(|_| Gateway::start(&cfg)).collect();
    wait_fleet(&gws).await;
    if redis_down {
        redis.kill();
    }
    // 5× the quota, round-robin over the gateways, for 30 s.
    let reports = run_all(spread(&gws, 100, 30)).await;
    for r in &reports {
        assert_eq!(r.errors, 0, "{}", r.summary());
    }
    let got = admitted(&reports);
    let elapsed = reports
        .iter()
        .map(|r| r.elapsed)
        .max()
        .unwrap_or_default()
        .as_secs_f64();
    // Decisions taken locally because a Redis call failed or ran over its budget.
    let mut failure_admits = 0.0;
    for gw in &gws {
        let m = Client::new().get(&gw.admin_url("/metrics")).await.text();
        failure_admits += metric(&m, "fairgate_redis_failure_mode_admits_total").unwrap_or(0.0);
    }
    eprintln!(
        "F7 {mode} redis_down={redis_down} gateways={gateways}: admitted {got} over {elapsed:.2} s \
         (quota {:.0}); failure-mode admits {failure_admits}",
        40.0 * elapsed + 20.0
    );
    (got, elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f7_exact_mode_admits_the_quota_within_5_percent() {
    let _serial = SERIAL.lock().await;
    for n in [2, 3] {
        let (got, elapsed) = f7("exact", false, n).await;
        let bound = (40.0 * elapsed + 20.0) * 1.05;
        assert!(
            (got as f64) <= bound,
            "{n} gateways: admitted {got} > {bound}"
        );
        assert!(
            got as f64 >= 40.0 * 30.0 * 0.95,
            "{n} gateways: admitted {got}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f7_async_mode_admits_the_quota_within_the_documented_slack() {
    let _serial = SERIAL.lock().await;
    for n in [2, 3] {
        let (got, elapsed) = f7("async", false, n).await;
        // fleet.rs: rate × W + burst + N × (burst + rate × sync_interval), within 10 %.
        let bound = (40.0 * elapsed + 20.0) * 1.10;
        assert!(
            (got as f64) <= bound,
            "{n} gateways: admitted {got} > {bound}"
        );
        assert!(
            got as f64 >= 40.0 * 30.0 * 0.95,
            "{n} gateways: admitted {got}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f7_with_redis_down_each_gateway_keeps_its_local_quota() {
    let _serial = SERIAL.lock().await;
    let (got, elapsed) = f7("async", true, 2).await;
    // on_failure: open — at most N × the local quota.
    let bound = 2.0 * (40.0 * elapsed + 20.0);
    assert!((got as f64) <= bound, "admitted {got} > {bound}");
}

// === F6 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f6_redis_restart_with_data_loss_bounds_over_admission_and_log_lines() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let up = Upstream::start().await;
    let cfg = config(&up, &redis.url(), "async", "local", "30/s burst 10");
    let gws = vec![
        Gateway::start(&cfg),
        Gateway::start(&cfg),
        Gateway::start(&cfg),
    ];
    wait_fleet(&gws).await;
    let load = tokio::spawn(run_all(spread(&gws, 50, 40)));
    tokio::time::sleep(Duration::from_secs(10)).await; // the fault's schedule
    let _ = redis.cli(&["SHUTDOWN", "NOSAVE"]);
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await; // the outage
    redis.restart();
    let restart_offset = Duration::from_secs(20) + Duration::from_millis(20);
    let reports = load.await.expect("load");
    let after: u64 = reports
        .iter()
        .map(|r| {
            r.window(restart_offset, restart_offset + Duration::from_secs(10))
                .get(&200)
                .copied()
                .unwrap_or(0)
        })
        .sum();
    // quota × 10 s + burst + one more window's quota (the documented bound).
    let bound = 30 * 10 + 10 + 30;
    eprintln!("F6: admitted {after} in the 10 s after the restart (bound {bound})");
    assert!(after <= bound, "admitted {after} > {bound}");
    // Error lines are rate limited: ≤ 1 a second per instance over the outage.
    let outage = down_at.elapsed().as_secs() + 1;
    for g in &gws {
        let lines = g.stderr().matches("redis call failed").count() as u64;
        assert!(
            lines <= outage + 1,
            "{lines} error lines over {outage} s:\n{}",
            g.stderr()
        );
    }
}
