//! Policy-reload scenarios through the real binary (SCENARIOS.md §2.4 R1, R3, R4, R5, R6),
//! shortened for the `ci` tier (see `docs/reliability/faults.md`). `tests/reload.rs` keeps
//! the basic reload behaviour (file edit, SIGHUP, admin reload, an invalid edit, 100 reloads
//! under load, overrides across a restart); these add the scenario criteria.
//!
//! Every scenario takes [`SERIAL`]: R1 loads the machine and R5 measures debounce timing.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fairgate_tests::load::{self, LoadSpec};
use fairgate_tests::{empty, eventually, metric, Client, Gateway, Reply, Upstream};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// === helpers ===

fn config(up: &Upstream, decisions: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
policy: policy.yaml
log: {{decisions: {decisions}}}
",
        up.addr
    )
}

fn start(up: &Upstream, policy: &str) -> Gateway {
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
    Gateway::start_in(dir, &config(up, "off"))
}

/// Writes a file the way editors do: a temp file renamed over the original.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn get_ua(c: &Client, gw: &Gateway, ua: &str) -> u16 {
    c.get_with(&gw.url("/"), &[("user-agent", ua)])
        .await
        .status
        .as_u16()
}

async fn admin(c: &Client, gw: &Gateway, method: &str, path: &str) -> Reply {
    c.request(method, &gw.admin_url(path), &[], empty()).await
}

async fn metrics(c: &Client, gw: &Gateway) -> String {
    admin(c, gw, "GET", "/metrics").await.text()
}

fn reloads(m: &str, result: &str) -> f64 {
    metric(
        m,
        &format!(r#"fairgate_policy_reloads_total{{result="{result}"}}"#),
    )
    .unwrap_or(0.0)
}

async fn policy_hash(c: &Client, gw: &Gateway) -> String {
    admin(c, gw, "GET", "/status").await.json()["policy"]["hash"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn deny_ua(name: &str) -> String {
    format!("version: 1\nrules:\n  - {{name: deny-{name}, when: {{user_agent: {{exact: [{name}]}}}}, action: deny}}\n")
}

// === R1 ===

const R1_OLD: &str = "version: 1
rules:
  - {name: no-evil, when: {user_agent: {prefix: [evil]}}, action: deny}
";
const R1_NEW: &str = "version: 1
rules:
  - {name: no-evil, when: {user_agent: {prefix: [evil]}}, action: deny}
  - {name: no-newbad, when: {user_agent: {prefix: [newbad]}}, action: deny}
";

/// R1 (shortened: 300 rps for 9 s; truncated YAML at 3 s, a valid new policy at 6 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r1_invalid_yaml_under_load_keeps_the_old_policy() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    let gw = start(&up, R1_OLD);
    let c = Client::new();
    let policy = gw.dir().join("policy.yaml");
    let m0 = metrics(&c, &gw).await;
    let (errors0, ok0) = (reloads(&m0, "error"), reloads(&m0, "ok"));

    let t0 = tokio::time::Instant::now();
    let load = tokio::spawn(load::run(LoadSpec::get(
        &gw.url("/r1"),
        300,
        Duration::from_secs(9),
    )));
    tokio::time::sleep_until(t0 + Duration::from_secs(3)).await;
    // Truncated in the middle of a flow mapping: a YAML syntax error.
    let truncated = &R1_NEW[..R1_NEW.find("prefix: [newb").unwrap() + 13];
    replace(&policy, truncated);
    let failed = eventually(Duration::from_secs(2), || async {
        reloads(&metrics(&c, &gw).await, "error") >= errors0 + 1.0
    })
    .await;
    assert!(failed, "the bad file was not reported:\n{}", gw.stderr());
    let m = metrics(&c, &gw).await;
    assert_eq!(
        reloads(&m, "error"),
        errors0 + 1.0,
        "one error per bad file"
    );
    assert_eq!(metric(&m, "fairgate_policy_last_reload_success"), Some(0.0));
    let status = admin(&c, &gw, "GET", "/status").await.json();
    let err = status["last_reload"]["errors"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    eprintln!("R1 error: {err}");
    let located = err.split(':').collect::<Vec<_>>();
    assert!(
        err.contains("policy.yaml:")
            && located.len() >= 3
            && located[1].parse::<u32>().is_ok()
            && located[2].parse::<u32>().is_ok(),
        "not file:line:col: {err}"
    );
    assert!(gw.stderr().contains(&err), "the error is not in the log");
    // Between the bad and the good file, the old deny rule still holds; the new one is not
    // there.
    while t0.elapsed() < Duration::from_secs(6) {
        assert_eq!(get_ua(&c, &gw, "evil/1").await, 403);
        assert_eq!(get_ua(&c, &gw, "newbad/1").await, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    replace(&policy, R1_NEW);
    let written = Instant::now();
    let active = eventually(Duration::from_secs(2), || async {
        get_ua(&c, &gw, "newbad/1").await == 403
    })
    .await;
    let took = written.elapsed();
    assert!(active, "the new policy is not active within 2 s");
    let report = load.await.unwrap();
    eprintln!("R1 {} new policy active after {took:?}", report.summary());
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert_eq!(report.successes(), report.sent, "{}", report.summary());
    let m = metrics(&c, &gw).await;
    assert!(reloads(&m, "ok") > ok0);
    assert_eq!(metric(&m, "fairgate_policy_last_reload_success"), Some(1.0));
    // The watcher survives: one more edit takes effect.
    replace(&policy, R1_OLD);
    assert!(
        eventually(Duration::from_secs(2), || async {
            get_ua(&c, &gw, "newbad/1").await == 200
        })
        .await,
        "the watcher stopped after the bad file"
    );
}

// === R3 ===

fn r3_policy(other_path: &str, name: &str, rate: &str, burst: u32) -> String {
    format!(
        "version: 1
rules:
  - {{name: other, when: {{path: {other_path}}}, action: deny}}
  - {{name: {name}, action: {{limit: {{rate: {rate}, burst: {burst}}}}}}}
"
    )
}

/// Sends `n` requests from `ip`; returns how many were admitted.
async fn send_n(c: &Client, gw: &Gateway, n: usize) -> usize {
    let mut admitted = 0;
    for _ in 0..n {
        if c.get(&gw.url("/r3")).await.status == 200 {
            admitted += 1;
        }
    }
    admitted
}

/// How many requests are admitted before the first rejection (at most `max`).
async fn remaining(c: &Client, gw: &Gateway, max: usize) -> usize {
    for i in 0..max {
        let s = c.get(&gw.url("/r3")).await.status.as_u16();
        if s != 200 {
            assert_eq!(s, 429);
            return i;
        }
    }
    max
}

async fn reload_to(c: &Client, gw: &Gateway, text: &str) {
    std::fs::write(gw.dir().join("policy.yaml"), text).unwrap();
    let r = admin(c, gw, "POST", "/reload").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// R3: 90 of 100 tokens used, then (a) an identical policy, (b) an unrelated change, (c) this
/// rule's limit 100 → 10, (d) the rule renamed. Each step uses its own client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_reload_keeps_counters() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    // 100/h: under 3 tokens refill during the whole test.
    let base = r3_policy("/other", "r3", "100/h", 100);
    let gw = start(&up, &base);
    let steps = [
        ("a identical", base.clone()),
        ("b unrelated", r3_policy("/other2", "r3", "100/h", 100)),
        ("c limit 100 -> 10", r3_policy("/other", "r3", "10/h", 10)),
        ("d renamed", r3_policy("/other", "r3-renamed", "100/h", 100)),
    ];
    let mut figures = Vec::new();
    for (i, (step, variant)) in steps.iter().enumerate() {
        reload_to(&Client::new(), &gw, &base).await;
        let c = Client::from_ip(&format!("127.0.0.{}", 30 + i));
        assert_eq!(send_n(&c, &gw, 90).await, 90, "{step}: 90 of 100");
        reload_to(&c, &gw, variant).await;
        let left = remaining(&c, &gw, 120).await;
        figures.push(format!("{step}: {left}"));
        match i {
            0 | 1 => assert!((9..=11).contains(&left), "{step}: remaining {left}"),
            // The fill fraction (10 %, plus well under a hundredth of a token refilled) is
            // kept: 10 % of 10 is exactly one request. Gubernator's "consumed 90 > limit 10"
            // would give 0, a reset would give 10.
            2 => assert_eq!(left, 1, "{step}: remaining {left}"),
            _ => assert!((99..=101).contains(&left), "{step}: remaining {left}"),
        }
    }
    eprintln!("R3 remaining after reload: {}", figures.join(", "));
}

// === R4 ===

fn r4_policy(concurrency: u32) -> String {
    format!("version: 1\nplans: {{p: {{concurrency: {concurrency}}}}}\ndefault_plan: p\n")
}

/// Starts `n` requests of `delay_ms` from `ip`; the handles give their statuses.
fn fire(gw: &Gateway, ip: &str, n: usize, delay_ms: u64) -> Vec<tokio::task::JoinHandle<u16>> {
    (0..n)
        .map(|_| {
            let c = Client::from_ip(ip);
            let url = gw.url(&format!("/r4?delay_ms={delay_ms}"));
            tokio::spawn(async move { c.get(&url).await.status.as_u16() })
        })
        .collect()
}

async fn statuses(h: Vec<tokio::task::JoinHandle<u16>>) -> Vec<u16> {
    let mut out = Vec::new();
    for h in h {
        out.push(h.await.unwrap());
    }
    out
}

/// R4: max in flight 10, 10 requests in flight; reload identical, then 5, then 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r4_reload_and_in_flight_permits() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    let gw = start(&up, &r4_policy(10));
    let c = Client::new();
    let ip = "127.0.0.41";
    let held = fire(&gw, ip, 10, 1500);
    assert!(eventually(Duration::from_secs(5), || async { up.in_flight() == 10 }).await);

    // Identical policy: still 10, not "old permits + new permits".
    reload_to(&c, &gw, &r4_policy(10)).await;
    let extra = statuses(fire(&gw, ip, 5, 0)).await;
    assert!(extra.iter().all(|s| *s != 200), "{extra:?}");
    assert!(up.max_in_flight() <= 10, "{}", up.max_in_flight());

    // Down to 5: no admits while 10 are in flight.
    reload_to(&c, &gw, &r4_policy(5)).await;
    let extra = statuses(fire(&gw, ip, 3, 0)).await;
    assert!(extra.iter().all(|s| *s != 200), "{extra:?}");
    assert!(statuses(held).await.iter().all(|s| *s == 200));
    // Once they ended, at most 5 at a time.
    up.reset_max_in_flight();
    let burst = statuses(fire(&gw, ip, 10, 500)).await;
    let admitted = burst.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, 5, "{burst:?}");
    assert!(up.max_in_flight() <= 5, "{}", up.max_in_flight());

    // Up to 20: usable at once, once the gateway has released the burst's permits (a client
    // can read its response a moment before the ticket ends).
    let released = eventually(Duration::from_secs(2), || async {
        metric(&metrics(&c, &gw).await, "fairgate_in_flight") == Some(0.0)
    })
    .await;
    assert!(released, "{}", metrics(&c, &gw).await);
    reload_to(&c, &gw, &r4_policy(20)).await;
    up.reset_max_in_flight();
    let burst = statuses(fire(&gw, ip, 20, 500)).await;
    assert!(burst.iter().all(|s| *s == 200), "{burst:?}");
    assert_eq!(up.max_in_flight(), 20);

    // No permit leaked across generations.
    let drained = eventually(Duration::from_secs(2), || async {
        metric(&metrics(&c, &gw).await, "fairgate_in_flight") == Some(0.0)
    })
    .await;
    assert!(drained, "{}", metrics(&c, &gw).await);
    let after = statuses(fire(&gw, ip, 20, 0)).await;
    assert!(after.iter().all(|s| *s == 200), "{after:?}");
}

// === R5 ===

/// Samples the active policy hash every 10 ms until dropped.
struct HashSampler {
    seen: Arc<Mutex<BTreeSet<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl HashSampler {
    fn start(gw: &Gateway) -> HashSampler {
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let url = gw.admin_url("/status");
        let task = tokio::spawn({
            let (seen, stop) = (seen.clone(), stop.clone());
            async move {
                let c = Client::new();
                while !stop.load(Ordering::SeqCst) {
                    let v = c.get(&url).await.json();
                    if let Some(h) = v["policy"]["hash"].as_str() {
                        seen.lock().unwrap().insert(h.to_owned());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        HashSampler { seen, stop, task }
    }

    async fn finish(self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        let seen = self.seen.lock().unwrap().clone();
        seen
    }
}

/// Runs one writer: samples hashes while `write` runs, waits for `final_ua` to be denied
/// (within 2 s of the last write), and checks that only the old and the final policy were
/// ever active and that there was at most one reload per debounce window.
async fn writer_phase<F, Fut>(c: &Client, gw: &Gateway, name: &str, final_ua: &str, write: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let old = policy_hash(c, gw).await;
    let m0 = metrics(c, gw).await;
    let before = reloads(&m0, "ok") + reloads(&m0, "error");
    let sampler = HashSampler::start(gw);
    let began = Instant::now();
    write().await;
    let last_write = Instant::now();
    let active = eventually(Duration::from_secs(2), || async {
        get_ua(c, gw, final_ua).await == 403
    })
    .await;
    let took = last_write.elapsed();
    // Keep sampling for a debounce window more, so a late intermediate policy would show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = sampler.finish().await;
    let final_hash = policy_hash(c, gw).await;
    let m = metrics(c, gw).await;
    let n_reloads = reloads(&m, "ok") + reloads(&m, "error") - before;
    let windows = (began.elapsed().as_millis() / 250 + 1) as f64;
    eprintln!(
        "R5 {name}: final active {took:?} after the last write; {n_reloads} reload(s) in {:?}; {} hash(es) seen",
        began.elapsed(),
        seen.len()
    );
    assert!(active, "{name}: the final policy is not active within 2 s");
    let allowed: BTreeSet<String> = [old, final_hash].into();
    assert!(
        seen.is_subset(&allowed),
        "{name}: an intermediate policy was active: {seen:?} (allowed {allowed:?})"
    );
    assert!(
        n_reloads <= windows,
        "{name}: {n_reloads} reloads in {windows} debounce windows"
    );
}

/// R5: truncate + 3 chunks, editor rename, delete + recreate, 100 writes in 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r5_non_atomic_writers_only_ever_show_the_old_or_the_final_policy() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    let gw = start(&up, &deny_ua("phase-0"));
    let c = Client::new();
    let path = gw.dir().join("policy.yaml");

    // Truncate, then write in 3 chunks 50 ms apart.
    let text = deny_ua("phase-1");
    let p = path.clone();
    writer_phase(&c, &gw, "truncate + 3 chunks", "phase-1", || async move {
        use std::io::Write;
        let mut f = std::fs::File::create(&p).unwrap();
        let third = text.len() / 3;
        for chunk in [&text[..third], &text[third..2 * third], &text[2 * third..]] {
            f.write_all(chunk.as_bytes()).unwrap();
            f.flush().unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // Editor-style: a temp file renamed over the original.
    let p = path.clone();
    writer_phase(&c, &gw, "rename", "phase-2", || async move {
        replace(&p, &deny_ua("phase-2"));
    })
    .await;

    // Delete: the last-known-good policy stays, one warning; then recreate.
    let p = path.clone();
    let gw_ref = &gw;
    let c_ref = &c;
    writer_phase(&c, &gw, "delete + recreate", "phase-3", || async move {
        std::fs::remove_file(&p).unwrap();
        let noticed = eventually(Duration::from_secs(3), || async {
            gw_ref.stderr().contains("policy file is gone")
        })
        .await;
        assert!(noticed, "the deletion was not logged:\n{}", gw_ref.stderr());
        assert_eq!(
            get_ua(c_ref, gw_ref, "phase-2").await,
            403,
            "last-known-good"
        );
        std::fs::write(&p, deny_ua("phase-3")).unwrap();
    })
    .await;
    assert_eq!(
        gw.stderr().matches("policy file is gone").count(),
        1,
        "{}",
        gw.stderr()
    );

    // 100 writes in 1 s: one reload of the final content.
    let p = path.clone();
    writer_phase(&c, &gw, "100 writes in 1 s", "phase-4-99", || async move {
        let start = tokio::time::Instant::now();
        for i in 0..100u64 {
            std::fs::write(&p, deny_ua(&format!("phase-4-{i}"))).unwrap();
            tokio::time::sleep_until(start + Duration::from_millis(10 * (i + 1))).await;
        }
    })
    .await;
    assert!(!gw.stderr().contains("panicked"));
}

/// R5: a ConfigMap-style `..data` symlink swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r5_symlink_swap_is_picked_up() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    let dir = Gateway::tempdir();
    let root = dir.path();
    for (v, ua) in [("v1", "sym-1"), ("v2", "sym-2")] {
        std::fs::create_dir(root.join(v)).unwrap();
        std::fs::write(root.join(v).join("policy.yaml"), deny_ua(ua)).unwrap();
    }
    std::os::unix::fs::symlink("v1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.yaml", root.join("policy.yaml")).unwrap();
    let gw = Gateway::start_in(dir.clone(), &config(&up, "off"));
    let c = Client::new();
    assert_eq!(get_ua(&c, &gw, "sym-1").await, 403);
    let root = root.to_path_buf();
    writer_phase(&c, &gw, "symlink swap", "sym-2", || async move {
        std::os::unix::fs::symlink("v2", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    })
    .await;
    assert_eq!(get_ua(&c, &gw, "sym-1").await, 200);
}

// === R6 ===

fn r6_policy(mode: &str) -> String {
    format!(
        "version: 1\nrules:\n  - {{name: r6, mode: {mode}, action: {{limit: {{rate: 10/h, burst: 20}}}}}}\n"
    )
}

/// R6: a shadow limit never rejects, counts what enforce mode rejects on the same trace,
/// logs `shadow_reject`, and switching it to enforce by reload keeps its counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r6_shadow_mode_counts_what_enforce_would_reject() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    let trace = 200; // 10× the burst, within a few seconds: 10/h refills nothing
    let run_trace = |gw: &Gateway| {
        let url = gw.url("/r6");
        async move {
            let c = Client::from_ip("127.0.0.51");
            let mut by_status = std::collections::BTreeMap::<u16, u32>::new();
            for _ in 0..trace {
                *by_status
                    .entry(c.get(&url).await.status.as_u16())
                    .or_default() += 1;
            }
            by_status
        }
    };
    // Enforce mode, for the reference count.
    let enforce = start(&up, &r6_policy("enforce"));
    let enforced = run_trace(&enforce).await;
    let rejected = f64::from(enforced.get(&429).copied().unwrap_or(0));
    drop(enforce);

    // The same trace in shadow mode.
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("policy.yaml"), r6_policy("shadow")).unwrap();
    let gw = Gateway::start_in(dir, &config(&up, "stdout"));
    let shadowed = run_trace(&gw).await;
    let c = Client::new();
    let m = metrics(&c, &gw).await;
    let would_reject =
        fairgate_tests::metric(&m, r#"fairgate_shadow_rejects_total{rule="r6"}"#).unwrap_or(0.0);
    eprintln!("R6 enforce {enforced:?}, shadow {shadowed:?}, would_reject {would_reject}");
    assert_eq!(
        shadowed.get(&200).copied(),
        Some(trace),
        "shadow mode rejected"
    );
    assert!(rejected > 0.0);
    assert!(
        (would_reject - rejected).abs() <= rejected * 0.01,
        "would_reject {would_reject} vs enforce {rejected}"
    );
    let logged = eventually(Duration::from_secs(3), || async {
        gw.stdout().contains("shadow_reject")
    })
    .await;
    assert!(logged, "no shadow_reject in the decision log");

    // Switch to enforce by a file edit: active within 2 s, and the bucket is still empty
    // (the first request after the switch is rejected; a reset bucket would admit 20).
    let before = policy_hash(&c, &gw).await;
    let edited = Instant::now();
    replace(&gw.dir().join("policy.yaml"), &r6_policy("enforce"));
    let switched = eventually(Duration::from_secs(2), || async {
        policy_hash(&c, &gw).await != before
    })
    .await;
    eprintln!("R6 enforce active after {:?}", edited.elapsed());
    assert!(switched, "enforce mode not active within 2 s");
    let probe = Client::from_ip("127.0.0.51");
    assert_eq!(
        probe.get(&gw.url("/r6")).await.status,
        429,
        "the counter was reset by the mode switch"
    );
}
