//! Fault scenarios through the real binary (SCENARIOS.md §2.3 F1, F2, F8, F9 and the e2e and
//! clock-jump parts of O2), shortened for the `ci` tier; the shortened forms and the figures
//! of the last run are in `docs/reliability/faults.md`.
//!
//! Every scenario takes [`SERIAL`], so two load-y scenarios never share the 2-core machine.
//! Faults are injected on a schedule measured from the start of the load (a fault plan, not
//! synchronisation); every wait on a condition polls with a deadline.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fairgate_tests::load::{self, LoadSpec, Sample};
use fairgate_tests::{
    empty, eventually, fairgate_bin, listening_sockets, metric, CapMode, Client, Gateway, Upstream,
};

/// One scenario at a time: they load the machine.
pub(crate) static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// === helpers ===

/// The `q` quantile of `latencies` (zero when empty).
fn quantile(mut latencies: Vec<Duration>, q: f64) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    latencies.sort_unstable();
    let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
    latencies[i]
}

/// Samples scheduled in `[from, to)`.
fn window(t: &[Sample], from: Duration, to: Duration) -> Vec<Sample> {
    t.iter()
        .filter(|s| s.offset >= from && s.offset < to)
        .copied()
        .collect()
}

fn latencies(samples: &[Sample], status: u16) -> Vec<Duration> {
    samples
        .iter()
        .filter(|s| s.status == status)
        .map(|s| s.latency)
        .collect()
}

async fn metrics(c: &Client, gw: &Gateway) -> String {
    c.get(&gw.admin_url("/metrics")).await.text()
}

/// Resident set size of `pid` in KiB (`/proc/PID/status`).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn health(c: &Client, url: &str) -> Option<u16> {
    let req = http::Request::get(url).body(empty()).unwrap();
    c.try_send(req).await.ok().map(|r| r.status.as_u16())
}

fn assert_no_panic(gw: &Gateway) {
    assert!(!gw.stderr().contains("panicked"), "{}", gw.stderr());
}

// === F1 ===

/// F1 (shortened: 300 rps for 10 s, upstream killed at 3 s, restarted at 6 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_upstream_refuses_connections_then_recovers() {
    let _serial = SERIAL.lock().await;
    f1(
        300,
        Duration::from_secs(3),
        Duration::from_secs(6),
        Duration::from_secs(10),
    )
    .await;
}

/// F1 at `rate` for `run_for`: the upstream is stopped ("SIGKILL") at `kill_at` and
/// restarted on its port at `restart_at`.
pub(crate) async fn f1(rate: u32, kill_at: Duration, restart_at: Duration, run_for: Duration) {
    let up = Upstream::start_counting().await;
    // Every 20th answer is an upstream 500: it must reach the client, never be retried.
    up.set_error_every(20, 500);
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0}}\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}'], connect_timeout: 500ms}}}}\nlog: {{decisions: off}}\n",
        up.addr
    ));
    let t0 = tokio::time::Instant::now();
    let load = tokio::spawn(load::run(LoadSpec::get(&gw.url("/f1"), rate, run_for)));
    tokio::time::sleep_until(t0 + kill_at).await;
    up.stop().await;
    let killed = t0.elapsed();
    tokio::time::sleep_until(t0 + restart_at).await;
    up.restart().await;
    let restarted = t0.elapsed();
    let report = load.await.unwrap();
    let t = report.timeline();
    let c = Client::new();
    let m = metrics(&c, &gw).await;
    eprintln!(
        "F1 {} killed={killed:?} restarted={restarted:?}",
        report.summary()
    );

    // Before the kill: the baseline B (p99 of the 200s).
    let before = window(t, Duration::ZERO, kill_at);
    let b = quantile(latencies(&before, 200), 0.99);
    // While the upstream is down: every answer is a fast 502 (connect refused).
    // (Margins of 100 ms on both sides: a request's scheduled offset and the moment it
    // reaches the gateway differ by the scheduler's lag.)
    let down = window(
        t,
        killed + Duration::from_millis(100),
        restart_at - Duration::from_millis(100),
    );
    assert!(!down.is_empty());
    let not_502: Vec<_> = down.iter().filter(|s| s.status != 502).collect();
    assert!(
        not_502.is_empty(),
        "{} of {} answers while down were not 502: {:?}",
        not_502.len(),
        down.len(),
        &not_502[..not_502.len().min(5)]
    );
    let p99_502 = quantile(latencies(&down, 502), 0.99);
    eprintln!("F1 figures: B={b:?} p99(502)={p99_502:?}");
    // SCENARIOS: 502 p99 <= 50 ms; relative to B on this shared machine (debug build).
    assert!(
        p99_502 <= Duration::from_millis(50) + b * 2,
        "502 p99 {p99_502:?} (B {b:?})"
    );
    let connect_errors = metric(
        &m,
        r#"fairgate_upstream_errors_total{upstream="u",kind="connect"}"#,
    )
    .unwrap_or(0.0);
    assert!(connect_errors >= 1.0, "{m}");

    // Only connect failures are retried (here: nothing, one target): every request the
    // upstream saw is a 200 or 500 the client got, or one cut off by the kill (protocol).
    let answered = report.count(200) + report.count(500);
    let protocol = metric(
        &m,
        r#"fairgate_upstream_errors_total{upstream="u",kind="protocol"}"#,
    )
    .unwrap_or(0.0) as u64;
    let seen = up.count() as u64;
    assert!(
        seen >= answered && seen <= answered + protocol,
        "upstream saw {seen}, clients got {answered} answers, {protocol} cut off"
    );
    assert_eq!(
        report.count(500) as usize,
        up.errors_sent(),
        "500s retried?"
    );

    // From 2 s after the restart: >= 99 % success and no 502 from a stale pooled connection.
    let after = window(t, restarted + Duration::from_secs(2), run_for);
    assert!(after.len() > 100, "{}", after.len());
    let ok = after
        .iter()
        .filter(|s| s.status == 200 || s.status == 500)
        .count();
    let ratio = ok as f64 / after.len() as f64;
    let stale = after.iter().filter(|s| s.status == 502).count();
    let early = window(t, restarted, restarted + Duration::from_secs(2));
    let early_bad = early
        .iter()
        .filter(|s| s.status != 200 && s.status != 500)
        .count();
    eprintln!(
        "F1 figures: after+2s ok={ok}/{} ({:.4}); within 2 s of restart: {early_bad}/{} not ok",
        after.len(),
        ratio,
        early.len()
    );
    assert!(ratio >= 0.99, "success {ratio}");
    assert_eq!(stale, 0, "502s after the restart");
    assert_eq!(report.errors, 0, "transport errors: {}", report.summary());
    assert_no_panic(&gw);
}

/// F1, two targets: a connect failure is retried once on the other target, so stopping one
/// target loses nothing; an upstream 500 is never retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_connect_failures_are_retried_on_another_target_and_nothing_else() {
    let _serial = SERIAL.lock().await;
    let (u1, u2) = (
        Upstream::start_counting().await,
        Upstream::start_counting().await,
    );
    u2.set_error_every(10, 500);
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0}}\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}', '{}'], balance: round_robin}}}}\nlog: {{decisions: off}}\n",
        u1.addr, u2.addr
    ));
    u1.stop().await;
    let report = load::run(LoadSpec::get(&gw.url("/f1b"), 200, Duration::from_secs(3))).await;
    eprintln!("F1 two targets {}", report.summary());
    let m = metrics(&Client::new(), &gw).await;
    let connect = metric(
        &m,
        r#"fairgate_upstream_errors_total{upstream="u",kind="connect"}"#,
    )
    .unwrap_or(0.0);
    assert!(connect >= 1.0, "no connect failure was seen: {m}");
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert_eq!(report.count(502), 0, "a connect failure was not retried");
    assert_eq!(report.count(200) + report.count(500), report.sent);
    // Every 500 reached the client once: none was retried on the other target.
    assert_eq!(report.count(500) as usize, u2.errors_sent());
    assert_eq!(u2.count() as u64, report.sent);
}

// === F2 ===

/// F2 (shortened: route A timeout 1 s, A black-holed at 1 s of a 6 s run; B at 200 rps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_black_hole_times_out_at_the_route_timeout_and_spares_other_routes() {
    let _serial = SERIAL.lock().await;
    f2(
        Duration::from_secs(1),
        Duration::from_secs(1),
        Duration::from_secs(6),
        200,
    )
    .await;
}

/// F2: route A (timeout `timeout`) is black-holed at `hole_at` of a `run_for` run; route B
/// gets `b_rate` requests per second throughout.
pub(crate) async fn f2(timeout: Duration, hole_at: Duration, run_for: Duration, b_rate: u32) {
    let a = Upstream::start_counting().await;
    let b = Upstream::start_counting().await;
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes:
  - {{name: a, path_prefix: /a, upstream: a, timeout: {}ms}}
  - {{name: b, upstream: b}}
upstreams:
  a: {{targets: ['{}']}}
  b: {{targets: ['{}']}}
log: {{decisions: off}}
",
        timeout.as_millis(),
        a.addr,
        b.addr
    ));
    // Baseline B: route B alone.
    let base = load::run(LoadSpec::get(&gw.url("/b"), b_rate, Duration::from_secs(2))).await;
    assert_eq!(base.successes(), base.sent, "{}", base.summary());
    let b_p99 = base.p99();
    let rss0 = rss_kib(gw.pid());

    let t0 = tokio::time::Instant::now();
    let run = tokio::spawn(load::run_all(vec![
        LoadSpec::get(&gw.url("/a"), 20, run_for),
        LoadSpec::get(&gw.url("/b"), b_rate, run_for),
    ]));
    tokio::time::sleep_until(t0 + hole_at).await;
    a.set_black_hole(true);
    let reports = run.await.unwrap();
    let ended = Instant::now();
    let (ra, rb) = (&reports[0], &reports[1]);
    eprintln!("F2 A {}\nF2 B {}", ra.summary(), rb.summary());

    // A: 200 before the black hole, then 504 at the route timeout ±10 %.
    let ta = ra.timeline();
    let healthy = window(ta, Duration::ZERO, hole_at - Duration::from_millis(100));
    assert!(healthy.iter().all(|s| s.status == 200), "{healthy:?}");
    let holed = window(ta, hole_at + Duration::from_millis(200), run_for);
    assert!(holed.len() >= 20, "{}", holed.len());
    assert!(
        holed.iter().all(|s| s.status == 504),
        "{:?}",
        holed.iter().filter(|s| s.status != 504).collect::<Vec<_>>()
    );
    let l504 = latencies(&holed, 504);
    let (min, p99) = (*l504.iter().min().unwrap(), quantile(l504.clone(), 0.99));
    eprintln!(
        "F2 figures: 504 min={min:?} p99={p99:?}; B p99 baseline={b_p99:?} during={:?}",
        rb.p99()
    );
    assert!(min >= timeout.mul_f64(0.9), "a 504 came early: {min:?}");
    assert!(p99 <= timeout.mul_f64(1.1), "504 p99 {p99:?}");

    // B: unaffected.
    assert!(rb.success_ratio() >= 0.99, "{}", rb.summary());
    assert!(
        rb.p99() <= (b_p99 * 2).max(b_p99 + Duration::from_millis(10)),
        "B p99 {:?} vs baseline {b_p99:?}",
        rb.p99()
    );

    // A's in-flight requests are released within timeout + 1 s, at the gateway and at the
    // upstream (the gateway drops the upstream request on timeout).
    let c = Client::new();
    let drained = eventually(timeout + Duration::from_secs(1), || async {
        metric(&metrics(&c, &gw).await, "fairgate_in_flight") == Some(0.0) && a.in_flight() == 0
    })
    .await;
    assert!(
        drained,
        "in flight: gateway {:?}, upstream A {} ({:?} after the load)",
        metric(&metrics(&c, &gw).await, "fairgate_in_flight"),
        a.in_flight(),
        ended.elapsed()
    );
    let m = metrics(&c, &gw).await;
    let timeouts = metric(
        &m,
        r#"fairgate_upstream_errors_total{upstream="a",kind="timeout"}"#,
    )
    .unwrap_or(0.0);
    assert_eq!(timeouts as u64, ra.count(504), "{m}");
    let rss1 = rss_kib(gw.pid());
    eprintln!("F2 figures: RSS {rss0} KiB -> {rss1} KiB");
    assert!(
        rss1 < rss0 + 32 * 1024,
        "RSS rose from {rss0} to {rss1} KiB"
    );
    assert_no_panic(&gw);
}

// === F8 ===

/// F8 (shortened: one upgrade at 2 s of a 6 s run at 300 rps, plus 20 requests of 2 s in
/// flight at the upgrade and one key at 90 % of its quota).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f8_graceful_upgrade_on_the_same_port_drops_nothing() {
    let _serial = SERIAL.lock().await;
    f8(300, 1, Duration::from_secs(2), Duration::from_secs(6)).await;
}

/// A policy with one tracked key on a `20/s burst 20` plan; everyone else is unlimited.
const F8_POLICY: &str = "version: 1
identify: {client_key: [{header: x-api-key}]}
plans:
  tracked: {bandwidths: ['20/s burst 20']}
  open: {bandwidths: ['1000000/s burst 1000000']}
default_plan: open
clients:
  tracked-key: {plan: tracked}
";

/// F8: `upgrades` graceful upgrades, one every `every` from `every` on, of a gateway under
/// `rate` requests per second for `run_for`. Each upgrade starts a new process on the same
/// port (`--reuse-port`) with 20 requests of 2 s in flight on the old one, then SIGTERMs the
/// old one.
pub(crate) async fn f8(rate: u32, upgrades: u32, every: Duration, run_for: Duration) {
    let up = Upstream::start_counting().await;
    let config = |listen: &str| {
        format!(
            "listen: {listen}\nadmin: {{listen: 127.0.0.1:0}}\nshutdown_grace: 5s\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\npolicy: policy.yaml\nlog: {{decisions: off}}\n",
            up.addr
        )
    };
    // Every process shares the port it is given (`--reuse-port`), as an upgrade does.
    let start = |listen: String| {
        let dir = Gateway::tempdir();
        std::fs::write(dir.path().join("policy.yaml"), F8_POLICY).unwrap();
        let cfg = config(&listen);
        tokio::task::spawn_blocking(move || Gateway::start_with_args(dir, &cfg, &["--reuse-port"]))
    };
    let mut old = start("127.0.0.1:0".into()).await.unwrap();
    let addr = old.data;
    let t0 = tokio::time::Instant::now();
    let url = old.url("/f8");
    let load = tokio::spawn(load::run_all(vec![
        LoadSpec::get(&url, rate, run_for),
        // The tracked key at 90 % of its quota: never rejected, before or after an upgrade.
        LoadSpec::get_with(&url, &[("x-api-key", "tracked-key")], 18, run_for),
    ]));
    let mut exits = Vec::new();
    let mut long_ok = 0;
    for n in 1..=upgrades {
        tokio::time::sleep_until(t0 + every * n - Duration::from_millis(500)).await;
        let before = up.in_flight();
        let long: Vec<_> = (0..20)
            .map(|_| {
                let url = old.url("/long?delay_ms=2000");
                tokio::spawn(async move {
                    let req = http::Request::get(&url).body(empty()).unwrap();
                    Client::new().try_send(req).await
                })
            })
            .collect();
        assert!(
            eventually(Duration::from_secs(5), || async {
                up.in_flight() >= before + 20
            })
            .await,
            "the long requests never reached the upstream"
        );
        // The new process binds the same port, then the old one is told to go.
        let new = start(addr.to_string()).await.unwrap();
        assert_eq!(new.data, addr);
        old.signal("TERM");
        let termed = t0.elapsed();
        let (exit, gone) =
            tokio::task::spawn_blocking(move || (old.wait_exit(Duration::from_secs(7)), old))
                .await
                .unwrap();
        let exit = exit.expect("the old process exits within grace + shutdown");
        assert!(exit.success(), "{exit:?}\n{}", gone.stderr());
        assert_no_panic(&gone);
        exits.push(format!("TERM at {termed:?}, exited at {:?}", t0.elapsed()));
        for l in long {
            match l.await.unwrap() {
                Ok(r) if r.status == 200 => long_ok += 1,
                other => panic!("a long request failed: {other:?}"),
            }
        }
        old = new;
    }
    let reports = load.await.unwrap();
    let (report, tracked) = (&reports[0], &reports[1]);
    eprintln!(
        "F8 {}\nF8 tracked key {}\nF8 {exits:?}",
        report.summary(),
        tracked.summary()
    );
    let failed_at: Vec<Duration> = report
        .timeline()
        .iter()
        .filter(|s| s.status == 0 || s.status >= 500)
        .map(|s| s.offset)
        .collect();
    eprintln!("F8 failed requests scheduled at {failed_at:?}");
    assert_eq!(long_ok, 20 * upgrades);
    for r in [report, tracked] {
        assert_eq!(r.errors, 0, "refused or reset: {}", r.summary());
        let server_errors: u64 = r.by_status.range(500..600).map(|(_, n)| n).sum();
        assert_eq!(server_errors, 0, "{}", r.summary());
    }
    assert_eq!(report.successes(), report.sent, "{}", report.summary());
    // 90 % of the quota: every request admitted, and at most quota × time + one burst per
    // process (state is not handed over; the documented bound).
    assert_eq!(tracked.count(200), tracked.sent, "{}", tracked.summary());
    let bound = 20.0 * run_for.as_secs_f64() + 20.0 * f64::from(upgrades + 1);
    assert!(tracked.count(200) as f64 <= bound);
    // The last process serves alone now, on its two per-core sockets.
    assert_eq!(listening_sockets(addr), 2);
    assert_eq!(Client::new().get(&old.url("/after")).await.status, 200);
    assert_no_panic(&old);
}

// === F9 ===

const DENY_EVIL: &str = "version: 1
rules:
  - {name: no-evil, when: {user_agent: {prefix: [evil]}}, action: deny}
";

/// F9 (a): SIGTERM under load: health turns 503 while requests are still in flight, they
/// finish, the data listener closes, exit 0 within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f9_sigterm_under_load_drains_and_exits_0() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    let mut gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0}}\nshutdown_grace: 4s\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
        up.addr
    ));
    let t0 = tokio::time::Instant::now();
    let load = tokio::spawn(load::run(LoadSpec::get(
        &gw.url("/f9"),
        200,
        Duration::from_secs(3),
    )));
    tokio::time::sleep_until(t0 + Duration::from_secs(1)).await;
    let slow: Vec<_> = (0..5)
        .map(|_| {
            let url = gw.url("/slow?delay_ms=1500");
            tokio::spawn(async move { Client::new().get(&url).await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || async { up.in_flight() >= 5 }).await);
    let c = Client::new();
    let health_url = gw.admin_url("/health");
    assert_eq!(health(&c, &health_url).await, Some(200));
    let termed = Instant::now();
    gw.signal("TERM");
    let unhealthy = eventually(Duration::from_secs(2), || async {
        health(&c, &health_url).await == Some(503)
    })
    .await;
    assert!(unhealthy, "/health did not turn 503");
    // Unhealthy first: the slow requests are still running when /health says 503.
    let still_running = up.in_flight();
    assert!(still_running >= 1, "health turned 503 only after the drain");
    let closed = eventually(Duration::from_secs(2), || async {
        listening_sockets(gw.data) == 0
    })
    .await;
    assert!(closed, "the data listener is still open");
    for s in slow {
        assert_eq!(
            s.await.unwrap().status,
            200,
            "an in-flight request was cut off"
        );
    }
    let exit = tokio::task::spawn_blocking(move || (gw.wait_exit(Duration::from_secs(5)), gw))
        .await
        .unwrap();
    let (status, gw) = exit;
    let status = status.expect("exit within the grace period");
    eprintln!("F9 TERM: exit {status:?} after {:?}", termed.elapsed());
    assert!(status.success(), "{status:?}");
    assert!(termed.elapsed() < Duration::from_secs(4) + Duration::from_millis(500));
    let report = load.await.unwrap();
    eprintln!("F9 TERM load {}", report.summary());
    // Requests after the listener closed are refused (transport errors); none is a 5xx.
    let server_errors: u64 = report.by_status.range(500..600).map(|(_, n)| n).sum();
    assert_eq!(server_errors, 0, "{}", report.summary());
    assert_no_panic(&gw);
}

/// F9 (b): SIGINT exits 0 within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f9_sigint_exits_within_a_second() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    let mut gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
        up.addr
    ));
    assert_eq!(Client::new().get(&gw.url("/")).await.status, 200);
    let sent = Instant::now();
    gw.signal("INT");
    let status = gw.wait_exit(Duration::from_secs(1));
    let took = sent.elapsed();
    eprintln!("F9 INT: exit {status:?} after {took:?}");
    assert!(status.expect("exit within 1 s").success());
}

/// A policy that takes a moment to compile: the deny rule plus many regex rules.
fn heavy_policy() -> String {
    let mut p = String::from(DENY_EVIL);
    for i in 0..300 {
        p.push_str(&format!(
            "  - {{name: r{i}, when: {{path: {{regex: ['^/x{i}/[a-z]+/[0-9]{{2,}}$']}}}}, action: deny}}\n"
        ));
    }
    p
}

/// F9 (c): SIGKILL, then a restart on the same ports: `/health` is 200 within 2 s, and the
/// data port never serves a request the policy denies (it is closed until the policy has
/// compiled). (d): an invalid current file at restart starts from the last-known-good snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f9_sigkill_then_restart_serves_only_after_the_policy_compiled() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("policy.yaml"), heavy_policy()).unwrap();
    let config = |data: &str, admin: &str| {
        format!(
            "listen: {data}\nadmin: {{listen: {admin}}}\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\npolicy: policy.yaml\nlog: {{decisions: off}}\n",
            up.addr
        )
    };
    let mut gw = Gateway::start_in(dir.clone(), &config("127.0.0.1:0", "127.0.0.1:0"));
    let (data, admin) = (gw.data, gw.admin.unwrap());
    let c = Client::new();
    assert_eq!(
        c.get_with(&gw.url("/"), &[("user-agent", "evil/1")])
            .await
            .status,
        403
    );
    gw.kill();
    assert!(up.count() == 0, "a denied request reached the upstream");

    // A prober sends denied requests on fresh connections the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicUsize::new(0));
    let prober = tokio::spawn({
        let (stop, answers) = (stop.clone(), answers.clone());
        async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let req = http::Request::get(format!("http://{data}/probe"))
                    .header("user-agent", "evil/2")
                    .header("connection", "close")
                    .body(empty())
                    .unwrap();
                if let Ok(r) = Client::new().try_send(req).await {
                    seen.push(r.status.as_u16());
                    answers.fetch_add(1, Ordering::SeqCst);
                }
                // Pace the probes (a refused connect returns at once).
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seen
        }
    });
    let restarted = Instant::now();
    let cfg = config(&data.to_string(), &admin.to_string());
    let d2 = dir.clone();
    let start = tokio::task::spawn_blocking(move || Gateway::start_in(d2, &cfg));
    let health_url = format!("http://{admin}/health");
    let healthy = eventually(Duration::from_secs(2), || async {
        health(&c, &health_url).await == Some(200)
    })
    .await;
    let took = restarted.elapsed();
    let mut gw = start.await.unwrap();
    // Keep probing until the restarted gateway has answered a few probes.
    let probed = eventually(Duration::from_secs(5), || async {
        answers.load(Ordering::SeqCst) >= 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let seen = prober.await.unwrap();
    assert!(probed, "the prober got {} answers", seen.len());
    eprintln!(
        "F9 KILL: health 200 after {took:?}; probe answers {}",
        seen.len()
    );
    assert!(
        healthy,
        "/health not 200 within 2 s of the restart:\n{}",
        gw.stderr()
    );
    assert!(
        seen.iter().all(|s| *s == 403),
        "the restarted gateway served a denied request: {seen:?}"
    );
    assert!(!seen.is_empty(), "the prober never got an answer");
    assert_eq!(up.count(), 0, "a denied request reached the upstream");

    // (d) The current file is invalid at restart: the gateway starts from the last-known-good
    // snapshot (`.policy.yaml.last-good`, written when the file last loaded), names the
    // file's errors with file:line:col, and keeps enforcing the last good policy.
    gw.kill();
    std::fs::write(
        dir.path().join("policy.yaml"),
        "version: 1\nrules:\n  - {name: no-evil, when: {user_agent: {prefixx: [evil]}}, action: deny}\n",
    )
    .unwrap();
    let mut gw = Gateway::start_in(dir.clone(), &config("127.0.0.1:0", "127.0.0.1:0"));
    assert!(
        gw.stderr().contains("policy.yaml:3:"),
        "the file's errors are not reported:\n{}",
        gw.stderr()
    );
    assert!(gw.stderr().contains("last-known-good"), "{}", gw.stderr());
    assert_eq!(
        c.get_with(&gw.url("/"), &[("user-agent", "evil/3")])
            .await
            .status,
        403,
        "the last good policy is not enforced"
    );
    assert_eq!(up.count(), 0, "a denied request reached the upstream");
    gw.kill();
}

// === O2 ===

/// O2 e2e (10 s): one client at 3× its rate; admitted = burst + rate × span ± 3 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o2_e2e_admitted_matches_the_bucket_within_3_percent() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    let dir = Gateway::tempdir();
    std::fs::write(
        dir.path().join("policy.yaml"),
        "version: 1\nplans: {p: {bandwidths: ['50/s burst 10']}}\ndefault_plan: p\n",
    )
    .unwrap();
    let gw = Gateway::start_in(
        dir,
        &format!(
            "listen: 127.0.0.1:0\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\npolicy: policy.yaml\nlog: {{decisions: off}}\n",
            up.addr
        ),
    );
    let report = load::run(
        LoadSpec::get(&gw.url("/o2"), 150, Duration::from_secs(10)).from_ip("127.0.0.21"),
    )
    .await;
    let t = report.timeline();
    let first = t.iter().map(|s| s.offset).min().unwrap();
    let last = t.iter().map(|s| s.offset).max().unwrap();
    let expected = 10.0 + 50.0 * (last - first).as_secs_f64();
    let admitted = report.count(200) as f64;
    eprintln!(
        "O2 e2e {} expected {expected:.1} admitted {admitted}",
        report.summary()
    );
    assert_eq!(
        report.count(200) + report.count(429),
        report.sent,
        "{}",
        report.summary()
    );
    assert!(
        (admitted - expected).abs() <= expected * 0.03,
        "admitted {admitted}, expected {expected:.1} ± 3 %"
    );
    assert_eq!(up.count() as f64, admitted);
}

/// A gateway under libfaketime (its wall clock follows a file), killed by PID on drop.
struct FakeClockGateway {
    child: Child,
    data: SocketAddr,
    admin: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Drop for FakeClockGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

fn start_under_faketime(dir: &std::path::Path, clock: &std::path::Path) -> FakeClockGateway {
    let mut child = Command::new(fairgate_bin())
        .arg("run")
        .arg("--config")
        .arg(dir.join("gateway.yaml"))
        .env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME_TIMESTAMP_FILE", clock)
        .env("FAKETIME_CACHE_DURATION", "1")
        // A real clock step moves CLOCK_REALTIME only.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fairgate under faketime");
    let stderr = Arc::new(Mutex::new(String::new()));
    {
        let stderr = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                stderr.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
    }
    let started = Instant::now();
    let line = loop {
        if let Some(l) = stderr
            .lock()
            .unwrap()
            .lines()
            .find(|l| l.starts_with("fairgate listening "))
        {
            break l.to_owned();
        }
        if let Ok(Some(s)) = child.try_wait() {
            panic!(
                "fairgate under faketime exited with {s}: {}",
                stderr.lock().unwrap()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no listening line"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let field = |key: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|p| p.strip_prefix(key))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    FakeClockGateway {
        data: field("data="),
        admin: field("admin="),
        child,
        stderr,
    }
}

/// Installs Debian's `faketime` when libfaketime is missing and this runs as root (as on the
/// CI machine); otherwise fails with what to install. Never skips: a missing tool must not
/// turn this scenario green.
fn ensure_libfaketime() {
    if std::path::Path::new(LIBFAKETIME).exists() {
        return;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "faketime"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status();
    }
    assert!(
        std::path::Path::new(LIBFAKETIME).exists(),
        "libfaketime ({LIBFAKETIME}) is missing: apt-get install faketime"
    );
}

/// The wall clock the gateway shows, as seconds since the epoch: the time of a reload it
/// makes now (`POST /reload`, then `/status` `last_reload.at`). Not the `Date` header:
/// hyper caches it until a wall-clock instant, so after a backward step it stays stale.
async fn gateway_clock(c: &Client, admin: SocketAddr) -> i64 {
    let r = c
        .request("POST", &format!("http://{admin}/reload"), &[], empty())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = c.get(&format!("http://{admin}/status")).await.json();
    let at = s["last_reload"]["at"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    parse_rfc3339(&at).unwrap_or_else(|| panic!("no reload time in {s}"))
}

/// Parses `2024-02-29T12:34:56.789Z` to seconds since the epoch.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|v| v.parse::<i64>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.trim_end_matches('Z').split(':');
    let (h, m) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec = t.next()?.split('.').next()?.parse::<i64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// O2 clock jump: the gateway's wall clock steps +1 h and then −1 h (libfaketime); in the
/// 2 s after each step one client at 5× its rate is admitted at most burst + 2 × rate, and
/// not starved either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o2_wall_clock_jumps_do_not_move_buckets() {
    let _serial = SERIAL.lock().await;
    ensure_libfaketime();
    let up = Upstream::start_counting().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("faketime.rc");
    std::fs::write(&clock, "+0\n").unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        "version: 1\nplans: {p: {bandwidths: ['20/s burst 10']}}\ndefault_plan: p\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("gateway.yaml"),
        format!(
            "listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0}}\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\npolicy: policy.yaml\nlog: {{decisions: off}}\n",
            up.addr
        ),
    )
    .unwrap();
    let gw = start_under_faketime(dir.path(), &clock);
    let c = Client::new();
    let real = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let skew0 = gateway_clock(&c, gw.admin).await - real();
    assert!(
        skew0.abs() <= 2,
        "the fake clock starts at real time: skew {skew0}"
    );
    let url = format!("http://{}/o2", gw.data);
    let (burst, rate) = (10u64, 20u64);
    for (step, offset) in [("+1h", 3600i64), ("-1h", -3600)] {
        // Empty the bucket, then step the wall clock and wait until the gateway shows it.
        let drain =
            load::run(LoadSpec::get(&url, 200, Duration::from_millis(500)).from_ip("127.0.0.22"))
                .await;
        assert!(drain.count(429) > 0, "{}", drain.summary());
        std::fs::write(&clock, format!("{step}\n")).unwrap();
        let stepped = eventually(Duration::from_secs(5), || async {
            (gateway_clock(&c, gw.admin).await - real() - offset).abs() <= 2
        })
        .await;
        assert!(
            stepped,
            "libfaketime did not step the gateway's clock to {step}:\n{}",
            gw.stderr.lock().unwrap()
        );
        let after =
            load::run(LoadSpec::get(&url, 100, Duration::from_secs(2)).from_ip("127.0.0.22")).await;
        let admitted = after.count(200);
        eprintln!(
            "O2 clock {step}: admitted {admitted} in 2 s; {}",
            after.summary()
        );
        assert_eq!(
            after.count(200) + after.count(429),
            after.sent,
            "{}",
            after.summary()
        );
        assert!(
            admitted <= burst + 2 * rate,
            "{step}: admitted {admitted} > burst + 2 × rate"
        );
        assert!(admitted >= rate, "{step}: starved, admitted {admitted}");
    }
    assert!(!gw.stderr.lock().unwrap().contains("panicked"));
}

// === the harness's fault controls ===

/// The instrumented upstream's controls do what the scenarios rely on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_fault_controls_behave_as_documented() {
    let up = Upstream::start().await;
    let c = Client::new();
    let url = |p: &str| format!("http://{}{p}", up.addr);
    let get = |p: String| {
        let c = c.clone();
        async move {
            let req = http::Request::get(p).body(empty()).unwrap();
            c.try_send(req).await.map(|r| r.status.as_u16())
        }
    };

    // Every 4th answer is an error.
    up.set_error_every(4, 503);
    let mut s = Vec::new();
    for _ in 0..8 {
        s.push(get(url("/e")).await.unwrap());
    }
    assert_eq!(s, [200, 200, 200, 503, 200, 200, 200, 503]);
    // A seeded fraction.
    up.set_error_fraction(0.25, 42, 500);
    let mut errors = 0;
    for _ in 0..400 {
        if get(url("/f")).await.unwrap() == 500 {
            errors += 1;
        }
    }
    assert!((60..=140).contains(&errors), "{errors} of 400 at 25 %");
    assert_eq!(up.errors_sent(), errors + 2);
    up.set_error_fraction(0.0, 0, 500);

    // A concurrency cap that rejects the excess.
    up.set_concurrency_cap(2, CapMode::Reject);
    let burst: Vec<_> = (0..4)
        .map(|_| tokio::spawn(get(url("/c?delay_ms=300"))))
        .collect();
    let mut codes = Vec::new();
    for b in burst {
        codes.push(b.await.unwrap().unwrap());
    }
    codes.sort_unstable();
    assert_eq!(codes, [200, 200, 503, 503]);
    assert_eq!(up.capped(), 2);
    // One that queues it.
    up.set_concurrency_cap(2, CapMode::Queue);
    up.reset_max_in_flight();
    let burst: Vec<_> = (0..4)
        .map(|_| tokio::spawn(get(url("/q?delay_ms=200"))))
        .collect();
    for b in burst {
        assert_eq!(b.await.unwrap().unwrap(), 200);
    }
    assert!(up.max_in_flight() <= 2, "{}", up.max_in_flight());
    up.set_concurrency_cap(0, CapMode::Reject);

    // Counting only.
    up.set_record(false);
    let (n, kept) = (up.count(), up.requests().len());
    assert_eq!(get(url("/n")).await.unwrap(), 200);
    assert_eq!((up.count(), up.requests().len()), (n + 1, kept));
    up.set_record(true);

    // A reset in the middle of a Content-Length body.
    up.set_rst_mid_body(true);
    let raw = fairgate_tests::raw_exchange(
        up.addr,
        b"GET /rst HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(raw.contains("content-length: 1000"), "{raw}");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(body.len(), 500);
    // A fresh client: the pooled connections above predate the mode.
    let fresh = Client::new()
        .try_send(http::Request::get(url("/rst")).body(empty()).unwrap())
        .await;
    assert!(fresh.is_err(), "a cut body must be an error: {fresh:?}");
    assert_eq!(up.resets(), 2);
    up.set_rst_mid_body(false);

    // A black hole answers nothing.
    up.set_black_hole(true);
    let hole = tokio::time::timeout(Duration::from_millis(300), get(url("/hole"))).await;
    assert!(hole.is_err(), "the black hole answered");
    up.set_black_hole(false);

    // Stop refuses connections and drops open ones; restart listens on the same port.
    let open = tokio::spawn(get(url("/open?delay_ms=5000")));
    assert!(eventually(Duration::from_secs(2), || async { up.in_flight() == 1 }).await);
    up.stop().await;
    assert!(!up.is_running());
    assert!(tokio::net::TcpStream::connect(up.addr).await.is_err());
    assert!(open.await.unwrap().is_err(), "the open request must be cut");
    assert!(eventually(Duration::from_secs(2), || async { up.in_flight() == 0 }).await);
    up.restart().await;
    assert_eq!(get(url("/back")).await.unwrap(), 200);
}
