//! The embedded form as a fleet: the example axum app (`examples/axum_app.rs`) run as two real
//! processes against one real `redis-server` admits what a fleet of gateways admits (the
//! `exact` bound of docs/policy.md: rate × time + burst), because the layer starts the Redis
//! backend the policy names exactly as the gateway does. Each replica alone would admit the
//! whole quota. The same app gives its operator what the gateway gives: metrics, the admin
//! router and a decision log that `fairgate audit` finds exact.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use fairgate_tests::load::{run_all, LoadSpec};
use fairgate_tests::redis::RedisServer;
use fairgate_tests::{eventually, metric, run_fairgate, Client, DEADLINE};

/// `target/<profile>/examples/axum_app`, built by `cargo test` with the crate's examples (a
/// filtered run, `--test embedded`, does not build them: `cargo build -p fairgate-middleware
/// --example axum_app` first).
fn example_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir
        .join("examples")
        .join(format!("axum_app{}", std::env::consts::EXE_SUFFIX));
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/axum_app.rs");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    assert!(
        modified(&bin) >= modified(&source),
        "{} is missing or older than its source: run `cargo build -p fairgate-middleware --example axum_app`",
        bin.display()
    );
    bin
}

/// One replica of the example app, killed by PID on drop.
struct App {
    child: Child,
    addr: SocketAddr,
}

impl App {
    fn start(policy: &Path) -> App {
        App::start_with(policy, &[])
    }

    /// A replica with `env` set (`FAIRGATE_ADMIN_TOKEN`, `FAIRGATE_DECISION_LOG`…).
    fn start_with(policy: &Path, env: &[(&str, &str)]) -> App {
        let mut child = Command::new(example_bin())
            .arg(policy)
            .arg("127.0.0.1:0")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the example app starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    let _ = tx.send(addr.parse::<SocketAddr>().expect("an address"));
                }
            }
        });
        let addr = rx
            .recv_timeout(DEADLINE)
            .expect("the app prints `listening on http://ADDR`");
        App { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn policy(dir: &Path, state: &str) -> PathBuf {
    let path = dir.join("policy.yaml");
    std::fs::write(
        &path,
        format!(
            "version: 1
identify: {{client_key: [{{header: x-api-key}}]}}
plans: {{free: {{bandwidths: ['20/s burst 5']}}}}
default_plan: free
{state}"
        ),
    )
    .unwrap();
    path
}

/// Sends 40/s for 5 s as one client spread over `apps`; returns (admitted, elapsed).
async fn spread(apps: &[App]) -> (u64, Duration) {
    let specs = apps
        .iter()
        .map(|a| {
            LoadSpec::get_with(
                &a.url("/"),
                &[("x-api-key", "spread")],
                20,
                Duration::from_secs(5),
            )
        })
        .collect();
    let reports = run_all(specs).await;
    for r in &reports {
        assert_eq!(r.errors, 0, "{}", r.summary());
        for status in r.by_status.keys() {
            assert!(*status == 200 || *status == 429, "{}", r.summary());
        }
    }
    let admitted = reports.iter().map(|r| r.count(200)).sum();
    let elapsed = reports.iter().map(|r| r.elapsed).max().unwrap_or_default();
    (admitted, elapsed)
}

/// The bound of one GCRA bucket over the run: rate × elapsed + burst (+1 for the last
/// emission interval the answers may straddle).
fn bound(elapsed: Duration) -> u64 {
    (20.0 * elapsed.as_secs_f64()).floor() as u64 + 5 + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_app_replicas_with_a_redis_policy_share_one_quota() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = policy(
        dir.path(),
        &format!(
            "state:\n  backend: redis\n  redis: {{url: '{}', mode: exact, timeout: 25ms, on_failure: closed}}\n",
            redis.url()
        ),
    );
    let apps = [App::start(&path), App::start(&path)];
    // Both replicas reach Redis (a probe client, not the measured one, gets a quota answer
    // rather than `on_failure: closed`'s 503).
    for app in &apps {
        let ok = eventually(DEADLINE, || async {
            Client::new()
                .get_with(&app.url("/"), &[("x-api-key", "probe")])
                .await
                .status
                != 503
        })
        .await;
        assert!(ok, "replica {} never reached Redis", app.addr);
    }
    let (admitted, elapsed) = spread(&apps).await;
    let bound = bound(elapsed);
    eprintln!("2 app replicas on Redis: admitted {admitted}, bound {bound} over {elapsed:?}");
    assert!(
        admitted <= bound,
        "admitted {admitted} > one quota's {bound}"
    );
    assert!(
        admitted >= 20 * 5,
        "admitted {admitted} < the quota over 5 s"
    );
}

/// The control: with local state each replica hands out the whole quota, so the shared
/// bound above is one the test can miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_app_replicas_with_local_state_each_admit_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let path = policy(dir.path(), "");
    let apps = [App::start(&path), App::start(&path)];
    let (admitted, elapsed) = spread(&apps).await;
    eprintln!("2 app replicas, local state: admitted {admitted} over {elapsed:?}");
    assert!(
        admitted > bound(elapsed) + 50,
        "admitted {admitted}: local replicas should each admit about one quota"
    );
}

/// The example app serves its operator what the gateway serves its own: the engine's
/// metrics and the admin endpoints (nested at `/admin`, behind a bearer token, outside
/// admission), and a complete decision log that `fairgate audit` replays without finding a
/// request wrongly admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_serves_metrics_the_admin_router_and_an_auditable_decision_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = policy(dir.path(), "");
    let log = dir.path().join("decisions.jsonl");
    let app = App::start_with(
        &path,
        &[
            ("FAIRGATE_ADMIN_TOKEN", "t0ken"),
            ("FAIRGATE_DECISION_LOG", log.to_str().unwrap()),
            ("FAIRGATE_DECISION_LOG_AUDIT", "1"),
        ],
    );
    let c = Client::new();
    let (mut admitted, mut rejected) = (0, 0);
    // Client `a` far over its quota (20/s burst 5), back to back; client `b` within it.
    for i in 0..60 {
        let key = if i % 6 == 5 { "b" } else { "a" };
        match c
            .get_with(&app.url("/"), &[("x-api-key", key)])
            .await
            .status
            .as_u16()
        {
            200 => admitted += 1,
            429 => rejected += 1,
            other => panic!("status {other}"),
        }
    }
    assert!(
        rejected > 0 && admitted >= 5,
        "{admitted} admitted, {rejected} rejected"
    );

    // The admin router wants its token, and is not itself admitted or counted.
    let auth = [("authorization", "Bearer t0ken")];
    assert_eq!(c.get(&app.url("/admin/status")).await.status, 401);
    assert_eq!(c.get(&app.url("/admin/metrics")).await.status, 401);
    let status = c.get_with(&app.url("/admin/status"), &auth).await;
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["policy"]["version"], 1);
    let a = c.get_with(&app.url("/admin/clients/a"), &auth).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["plan"], "free");
    assert_eq!(a.json()["bandwidths"][0]["quota"], 20);
    let top = c.get_with(&app.url("/admin/clients/top?n=5"), &auth).await;
    let mut keys: Vec<String> = top.json()["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| c["key"].as_str().unwrap_or("").to_owned())
        .collect();
    keys.sort();
    assert_eq!(keys, ["a", "b"]);

    let m = c.get_with(&app.url("/admin/metrics"), &auth).await;
    assert_eq!(m.status, 200);
    assert!(m
        .header("content-type")
        .starts_with("text/plain; version=0.0.4"));
    let text = m.text();
    let series = |decision: &str, stage: &str| {
        metric(
            &text,
            &format!(
                "fairgate_requests_total{{stage=\"{stage}\",decision=\"{decision}\",rule=\"\",plan=\"free\"}}"
            ),
        )
    };
    assert_eq!(series("admit", "none"), Some(f64::from(admitted)), "{text}");
    assert_eq!(
        series("reject", "quota"),
        Some(f64::from(rejected)),
        "{text}"
    );
    assert_eq!(metric(&text, "fairgate_tracked_keys"), Some(2.0), "{text}");
    assert_eq!(metric(&text, "fairgate_in_flight"), Some(0.0), "{text}");
    assert_eq!(
        metric(&text, "fairgate_policy_reloads_total{result=\"error\"}"),
        Some(0.0)
    );

    // Every decision reaches the file, and the audit finds them exact.
    let lines = || {
        std::fs::read_to_string(&log)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let all = eventually(DEADLINE, || async { lines() >= 60 }).await;
    assert!(all, "{} of 60 decision lines", lines());
    assert_eq!(lines(), 60);
    let (l, p) = (log.to_str().unwrap(), path.to_str().unwrap());
    let (code, json, err) = run_fairgate(&["audit", l, "--policy", p, "--json"]);
    assert_eq!(code, 0, "{err}\n{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let o = &v["overall"];
    assert_eq!(o["wrongly_admitted"], 0, "{json}");
    assert_eq!(o["correctly_admitted"], admitted, "{json}");
    assert_eq!(o["correctly_rejected"], rejected, "{json}");
    drop(app);
}
