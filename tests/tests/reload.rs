//! Live policy changes through the real binary: file edits, SIGHUP, the admin API, invalid
//! edits, reloads under load, and overrides that survive a restart.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fairgate_tests::{empty, eventually, metric, Client, Gateway, Upstream};

const DENY_CURL: &str = "version: 1
rules:
  - {name: no-curl, when: {user_agent: {prefix: [curl]}}, action: deny}
";
const ALLOW_ALL: &str = "version: 1\n";

fn config(upstream: &Upstream) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0, token: t0k}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
policy: policy.yaml
log: {{decisions: off}}
",
        upstream.addr
    )
}

fn start(up: &Upstream, policy: &str) -> Gateway {
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
    Gateway::start_in(dir, &config(up))
}

/// Writes a file the way editors do: a temp file renamed over the original.
fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn status_of(c: &Client, gw: &Gateway, ua: &str) -> u16 {
    c.get_with(&gw.url("/"), &[("user-agent", ua)])
        .await
        .status
        .as_u16()
}

async fn admin(c: &Client, gw: &Gateway, method: &str, path: &str) -> fairgate_tests::Reply {
    c.request(
        method,
        &gw.admin_url(path),
        &[("authorization", "Bearer t0k")],
        empty(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_edit_changes_decisions_within_a_second() {
    let up = Upstream::start().await;
    let gw = start(&up, ALLOW_ALL);
    let c = Client::new();
    assert_eq!(status_of(&c, &gw, "curl/8").await, 200);
    let edited = Instant::now();
    replace(&gw.dir().join("policy.yaml"), DENY_CURL);
    let changed = eventually(Duration::from_secs(5), || async {
        status_of(&c, &gw, "curl/8").await == 403
    })
    .await;
    assert!(changed, "the edit never took effect:\n{}", gw.stderr());
    // Debounce is 250ms; allow scheduling noise on a busy 2-core machine.
    assert!(
        edited.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        edited.elapsed()
    );
    assert_eq!(status_of(&c, &gw, "firefox").await, 200);
    let s = admin(&c, &gw, "GET", "/status").await.json();
    assert_eq!(s["policy"]["version"], 2);
    assert_eq!(s["last_reload"]["result"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_admin_reload_the_policy() {
    let up = Upstream::start().await;
    let gw = start(&up, ALLOW_ALL);
    let c = Client::new();
    let reloads_ok =
        |text: &str| metric(text, r#"fairgate_policy_reloads_total{result="ok"}"#).unwrap_or(0.0);
    let before = reloads_ok(&admin(&c, &gw, "GET", "/metrics").await.text());
    gw.signal("HUP");
    let seen = eventually(Duration::from_secs(5), || async {
        reloads_ok(&admin(&c, &gw, "GET", "/metrics").await.text()) > before
    })
    .await;
    assert!(seen, "SIGHUP did not reload:\n{}", gw.stderr());

    // The admin API reloads on demand and reports the new version.
    std::fs::write(gw.dir().join("policy.yaml"), DENY_CURL).unwrap();
    let r = admin(&c, &gw, "POST", "/reload").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["result"], "ok");
    assert!(v["version"].as_u64().unwrap() >= 2);
    assert_eq!(status_of(&c, &gw, "curl/8").await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_keeps_the_old_policy_and_shows_the_error() {
    let up = Upstream::start().await;
    let gw = start(&up, DENY_CURL);
    let c = Client::new();
    assert_eq!(status_of(&c, &gw, "curl/8").await, 403);
    replace(
        &gw.dir().join("policy.yaml"),
        "version: 1\nrules:\n  - {name: no-curl, when: {user_agent: {prefixx: [curl]}}, action: deny}\n",
    );
    let failed = eventually(Duration::from_secs(5), || async {
        let m = admin(&c, &gw, "GET", "/metrics").await.text();
        metric(&m, r#"fairgate_policy_reloads_total{result="error"}"#).unwrap_or(0.0) >= 1.0
    })
    .await;
    assert!(
        failed,
        "the invalid edit was not reported:\n{}",
        gw.stderr()
    );
    let m = admin(&c, &gw, "GET", "/metrics").await.text();
    assert_eq!(metric(&m, "fairgate_policy_last_reload_success"), Some(0.0));
    let s = admin(&c, &gw, "GET", "/status").await.json();
    assert_eq!(s["last_reload"]["result"], "error");
    assert_eq!(s["policy"]["version"], 1);
    let err = s["last_reload"]["errors"][0].as_str().unwrap().to_owned();
    assert!(
        err.contains("policy.yaml:3:") && err.contains("prefixx"),
        "{err}"
    );
    // The old policy is still enforced, and the error is in the log.
    assert_eq!(status_of(&c, &gw, "curl/8").await, 403);
    assert!(gw.stderr().contains("prefixx"), "{}", gw.stderr());
    // A POST /reload of the same bad file answers 422 with every error.
    let r = admin(&c, &gw, "POST", "/reload").await;
    assert_eq!(r.status, 422);
    assert!(r.json()["errors"][0].as_str().unwrap().contains("prefixx"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_during_100_reloads_under_load() {
    let up = Upstream::start().await;
    let quota_a =
        "version: 1\nplans: {p: {bandwidths: ['100000/s burst 100000']}}\ndefault_plan: p\n";
    let quota_b =
        "version: 1\nplans: {p: {bandwidths: ['200000/s burst 200000']}}\ndefault_plan: p\n";
    let gw = start(&up, quota_a);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let c = Client::new();
        let url = gw.url("/load");
        let stop = stop.clone();
        let sent = sent.clone();
        load.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get(&url).body(empty()).unwrap();
                match c.try_send(req).await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => failures.push(format!("status {}", r.status)),
                    Err(e) => failures.push(e),
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    let c = Client::new();
    for i in 0..100 {
        std::fs::write(
            gw.dir().join("policy.yaml"),
            if i % 2 == 0 { quota_b } else { quota_a },
        )
        .unwrap();
        let r = admin(&c, &gw, "POST", "/reload").await;
        assert_eq!(r.status, 200, "reload {i}: {}", r.text());
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for t in load {
        failures.extend(t.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        sent.load(Ordering::Relaxed) >= 100,
        "too little load: {}",
        sent.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_override_persists_across_a_restart() {
    let up = Upstream::start().await;
    let policy = "version: 1
identify: {client_key: [{header: x-api-key}]}
plans:
  free: {bandwidths: ['1/min burst 2']}
  pro: {bandwidths: ['1000/s burst 1000']}
default_plan: free
overrides_file: overrides.yaml
";
    let mut gw = start(&up, policy);
    let c = Client::new();
    let key = [("x-api-key", "cust-1")];
    for _ in 0..2 {
        assert_eq!(c.get_with(&gw.url("/"), &key).await.status, 200);
    }
    assert_eq!(c.get_with(&gw.url("/"), &key).await.status, 429);

    // Invalid overrides are refused with positions.
    let r = c
        .request(
            "PUT",
            &gw.admin_url("/clients/cust-1/override"),
            &[("authorization", "Bearer t0k")],
            fairgate_tests::full("{plan: gold}"),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("gold"), "{}", r.text());

    let r = c
        .request(
            "PUT",
            &gw.admin_url("/clients/cust-1/override"),
            &[
                ("authorization", "Bearer t0k"),
                ("content-type", "application/json"),
            ],
            fairgate_tests::full(r#"{"plan": "pro"}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        c.get_with(&gw.url("/"), &key).await.status,
        200,
        "the override applies at once"
    );
    let u = admin(&c, &gw, "GET", "/clients/cust-1").await.json();
    assert_eq!(u["plan"], "pro");
    assert!(std::fs::read_to_string(gw.dir().join("overrides.yaml"))
        .unwrap()
        .contains("cust-1"));

    // Restart on the same files: the override is still there.
    let dir = gw.dir_handle();
    gw.kill();
    let gw2 = Gateway::start_in(dir, &config(&up));
    let u = admin(&c, &gw2, "GET", "/clients/cust-1").await.json();
    assert_eq!(u["plan"], "pro", "{u}");
    for _ in 0..5 {
        assert_eq!(c.get_with(&gw2.url("/"), &key).await.status, 200);
    }
}
