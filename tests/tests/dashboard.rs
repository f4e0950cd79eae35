//! The live dashboard in a real browser (issue 16, item 1): the real gateway, real traffic,
//! Debian's Chromium driven through chromedriver (installed when missing). The page must show
//! the traffic in its charts, drill into a client, and an override set from the page must
//! take effect on the data plane.
//!
//! Screenshots of each view are written to `$FAIRGATE_SCREENSHOTS` when it is set (the ones in
//! `docs/dashboard/` were made with `FAIRGATE_SCREENSHOTS=docs/dashboard cargo test -p
//! fairgate-tests --test dashboard`), else into the test's temp directory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fairgate_tests::{ensure_package, Client, Gateway, DEADLINE};
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use serde_json::{json, Value};

const TOKEN: &str = "dash-token";

const POLICY: &str = "version: 1
identify:
  client_key: [{header: x-api-key}]
overrides_file: overrides.yaml
default_plan: free
plans:
  free: {bandwidths: [{rate: 10/min, burst: 10}], concurrency: 4}
  pro: {bandwidths: [{rate: 1000/min, burst: 500}], concurrency: 20}
rules:
  - name: bad-bot
    when: {user_agent: {contains: badbot}}
    action: deny
  - name: scanners
    mode: shadow
    when: {path: {prefix: /wp-admin}}
    action: deny
shedding: {limit: 6, reject_delay: {max: 200ms, max_waiting: 16}}
";

fn config() -> String {
    format!(
        "listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
  token: {TOKEN}
  dashboard: {{step: 1s, history: 10min}}
routes: [{{upstream: demo}}]
upstreams:
  demo: {{targets: [builtin:echo]}}
policy: policy.yaml
"
    )
}

/// chromedriver on a free loopback port, stopped by PID when dropped.
struct Driver {
    child: Child,
    addr: SocketAddr,
}

impl Driver {
    /// Starts chromedriver on a port it picks, and waits for the line that names it.
    fn start() -> Driver {
        let mut child = Command::new("chromedriver")
            .arg("--port=0")
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let port = line
                    .strip_prefix("ChromeDriver was started successfully on port ")
                    .and_then(|p| p.trim_end_matches('.').parse::<u16>().ok());
                if let Some(port) = port {
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(DEADLINE)
            .expect("chromedriver said which port it listens on");
        Driver {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Browser {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000"],
        }),
    );
    // What `until` waits at most for one redraw.
    caps.insert("timeouts".into(), json!({"script": 10_000}));
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://{}", driver.addr))
        .await
        .expect("a WebDriver session")
}

/// Evaluates `script` (a function body returning a value) until `ok` accepts its result;
/// between two tries it waits for the page's next redraw (its `fairgate:drawn` event), so
/// nothing here sleeps.
async fn until(b: &Browser, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let v = b.execute(script, vec![]).await.unwrap_or(Value::Null);
        if ok(&v) {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the page never showed {what}; last: {v}"
        );
        // Within the session's script timeout; the page redraws every step (1 s here).
        let _ = b
            .execute_async(
                "const done = arguments[arguments.length - 1];\n\
                 document.addEventListener('fairgate:drawn', () => done(true), {once: true});",
                vec![],
            )
            .await;
    }
}

async fn screenshot(b: &Browser, dir: &PathBuf, name: &str) {
    let png = b.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::create_dir_all(dir).expect("screenshot dir");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

async fn tab(b: &Browser, view: &str) {
    b.find(Locator::Css(&format!("#tabs button[data-view='{view}']")))
        .await
        .expect("tab")
        .click()
        .await
        .expect("click tab");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_traffic_drills_into_a_client_and_sets_an_override() {
    ensure_package("chromium", &["chromium"]);
    ensure_package("chromium-driver", &["chromedriver"]);
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let gw = Gateway::start_in(dir, &config());
    let admin = gw.admin.expect("admin listener");
    let shots = std::env::var_os("FAIRGATE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| gw.dir().join("screenshots"));
    let http = Client::new();

    // Traffic: alice spends her free quota (10 admitted, then 429s), bob a little, a bot is
    // denied, a scanner is caught by a shadow rule.
    let key = |k: &'static str| [("x-api-key", k)];
    let mut statuses = Vec::new();
    for _ in 0..25 {
        statuses.push(http.get_with(&gw.url("/api"), &key("alice")).await.status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert!(statuses.iter().skip(10).all(|s| *s == 429), "{statuses:?}");
    for _ in 0..4 {
        http.get_with(&gw.url("/api"), &key("bob")).await;
    }
    for _ in 0..3 {
        let r = http
            .get_with(
                &gw.url("/"),
                &[("user-agent", "badbot/1.0"), ("x-api-key", "mallory")],
            )
            .await;
        assert_eq!(r.status, 403);
    }
    http.get_with(&gw.url("/wp-admin/x"), &key("bob")).await;

    let driver = Driver::start();
    let b = browser(&driver).await;
    // The token travels in the fragment (never sent to the server); the page keeps it in
    // the tab and sends it as a bearer token.
    b.goto(&format!("http://{admin}/dashboard#token={TOKEN}"))
        .await
        .expect("load the page");

    // A second wave a few samples later, so the charts have a shape (the page counts the
    // samples it has; no sleeping).
    let samples = "return data ? data.times.length : 0";
    until(&b, "three samples", samples, |v| {
        v.as_u64().unwrap_or(0) >= 3
    })
    .await;
    for _ in 0..6 {
        http.get_with(&gw.url("/api"), &key("bob")).await;
        http.get_with(&gw.url("/api"), &key("alice")).await;
    }
    // A burst of slow requests from 12 clients at once: over the shedding limit of 6.
    let slow: Vec<_> = (0..12)
        .map(|i| {
            let (http, url) = (http.clone(), gw.url("/slow?ms=700"));
            tokio::spawn(async move {
                let k = format!("burst-{i}");
                http.get_with(&url, &[("x-api-key", k.as_str())])
                    .await
                    .status
            })
        })
        .collect();
    let mut shed = 0;
    for t in slow {
        shed += usize::from(t.await.unwrap() == 503);
    }
    assert!(shed > 0, "some of the burst was shed");
    until(&b, "five samples", samples, |v| {
        v.as_u64().unwrap_or(0) >= 5
    })
    .await;

    // Decisions: the charts show the traffic (admits, 429s, the deny, the shadow hit).
    until(
        &b,
        "the decisions in its charts",
        "return Number(document.getElementById('chart-kinds').dataset.max || 0)",
        |v| v.as_f64().unwrap_or(0.0) > 0.0,
    )
    .await;
    let rows = until(
        &b,
        "the rejection series",
        "return Array.from(document.querySelectorAll('#series-table tbody tr')).map(r => r.innerText)",
        |v| {
            let t = v.to_string();
            t.contains("quota") && t.contains("bad-bot") && t.contains("shadow_reject")
        },
    )
    .await;
    assert!(rows.to_string().contains("free"), "{rows}");
    screenshot(&b, &shots, "decisions").await;

    // Clients: alice is at the top; her drill-down shows her bucket and her own decisions.
    tab(&b, "clients").await;
    until(
        &b,
        "alice among the top clients",
        "return Array.from(document.querySelectorAll('#top-table tr.client')).map(r => r.dataset.key)",
        |v| v.as_array().is_some_and(|a| a.iter().any(|k| k == "alice")),
    )
    .await;
    b.find(Locator::Css("#top-table tr.client[data-key='alice']"))
        .await
        .expect("alice's row")
        .click()
        .await
        .expect("open alice");
    let recent = until(
        &b,
        "alice's recent decisions",
        "return Array.from(document.querySelectorAll('#client-recent tbody tr')).map(r => r.innerText)",
        |v| v.as_array().is_some_and(|a| a.len() >= 20),
    )
    .await;
    let recent = recent.to_string();
    assert!(
        recent.contains("reject") && recent.contains("admit"),
        "{recent}"
    );
    assert!(
        !recent.contains("bad-bot"),
        "only alice's decisions: {recent}"
    );
    let plan = b
        .execute(
            "return document.getElementById('client-plan').innerText",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(plan, "free");
    until(
        &b,
        "alice's bucket history",
        "return Number(document.getElementById('chart-client').dataset.points || 0)",
        |v| v.as_f64().unwrap_or(0.0) >= 3.0,
    )
    .await;
    screenshot(&b, &shots, "client").await;

    // An override from the page: alice moves to `pro` for an hour, and is admitted again.
    let blocked = http.get_with(&gw.url("/api"), &key("alice")).await;
    assert_eq!(blocked.status, 429, "still over her free quota");
    b.find(Locator::Css("#override-plan"))
        .await
        .unwrap()
        .select_by_value("pro")
        .await
        .expect("choose pro");
    b.find(Locator::Css("#override-expiry"))
        .await
        .unwrap()
        .select_by_value("3600")
        .await
        .expect("an hour");
    b.find(Locator::Css("#override-set"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let msg = until(
        &b,
        "the override's result",
        "const e = document.getElementById('message-result'); return e ? e.innerText : null",
        |v| v.is_string(),
    )
    .await;
    assert_eq!(msg, "set override: done", "{msg}");
    until(
        &b,
        "alice on pro",
        "return document.getElementById('client-plan').innerText",
        |v| v == "pro",
    )
    .await;
    let admitted = http.get_with(&gw.url("/api"), &key("alice")).await;
    assert_eq!(admitted.status, 200, "the override takes effect");
    let file = std::fs::read_to_string(gw.dir().join("overrides.yaml")).expect("persisted");
    assert!(
        file.contains("\"pro\"") && file.contains("\"expires\""),
        "{file}"
    );

    // Shedding, policy (the override's reload and the action), fleet.
    tab(&b, "shedding").await;
    until(
        &b,
        "the shedding limit",
        "return document.getElementById('shed-now').innerText",
        |v| {
            v.as_str().is_some_and(|s| {
                s.contains("limit 6") && s.contains("reject delay") && s.contains("waiting")
            })
        },
    )
    .await;
    screenshot(&b, &shots, "shedding").await;
    tab(&b, "policy").await;
    until(
        &b,
        "the override in the actions and its reload",
        "return [document.getElementById('actions').innerText, document.getElementById('reloads').innerText]",
        |v| {
            let t = v.to_string();
            t.contains("override_set") && t.contains("alice") && t.contains("ok")
        },
    )
    .await;
    screenshot(&b, &shots, "policy").await;
    tab(&b, "fleet").await;
    until(
        &b,
        "the backend",
        "return document.getElementById('breaker').innerText",
        |v| v.as_str().is_some_and(|s| s.contains("Local state")),
    )
    .await;
    screenshot(&b, &shots, "fleet").await;

    // The process log recorded the action.
    assert!(
        gw.stderr().contains("operator action"),
        "the action is logged:\n{}",
        gw.stderr()
    );
    b.close().await.expect("end the session");
}
