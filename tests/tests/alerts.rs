//! `examples/alerts.yaml` against what the real binary exports (issue 13, item 2): the
//! gateway sheds requests while its `/metrics` is scraped between sheds, the scraped
//! `fairgate_shed_total` samples become a `promtool test rules` input series (one scrape
//! every 15 s of rule time), and Prometheus's own rule engine decides which alerts fire.
//!
//! Shedding critical requests fires `FairgateSheddingCritical`; shedding only normal ones
//! does not (it fires `FairgateShedding` for `normal`, showing the control data is real).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use fairgate_tests::{
    ensure_package, eventually, shed_samples, Client, Gateway, Upstream, DEADLINE,
};
use tokio::task::JoinHandle;

/// Scrapes, each followed by one more shed request: 12 × 15 s = 3 minutes of rule time.
const SCRAPES: usize = 13;
const STEP: &str = "15s";

fn config(upstream: &Upstream) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
log: {{decisions: stdout, sample_admits: 0}}
policy:
  version: 1
  rules:
    - name: critical
      when: {{path: {{prefix: /critical/}}}}
      action: {{tag: {{priority: critical}}}}
  shedding: {{limit: 2}}
",
        upstream.addr
    )
}

/// Runs a gateway at its limit (two critical requests held), sheds one request to `path`
/// between scrapes, and returns the scrapes' `fairgate_shed_total` samples.
async fn scrape_while_shedding(path: &str) -> Vec<BTreeMap<String, f64>> {
    let up = Upstream::start_counting().await;
    let gw = Gateway::start(&config(&up));
    let c = Client::new();
    let mut held: Vec<JoinHandle<()>> = Vec::new();
    for _ in 0..2 {
        let c = c.clone();
        let url = gw.url("/critical/hold?delay_ms=25000");
        held.push(tokio::spawn(async move {
            c.get(&url).await;
        }));
    }
    assert!(
        eventually(DEADLINE, || {
            let n = up.in_flight();
            async move { n == 2 }
        })
        .await,
        "two requests held"
    );
    let mut scrapes = Vec::with_capacity(SCRAPES);
    for i in 0..SCRAPES {
        let m = c.get(&gw.admin_url("/metrics")).await.text();
        scrapes.push(shed_samples(&m));
        if i + 1 < SCRAPES {
            assert_eq!(c.get(&gw.url(path)).await.status, 503, "shed");
        }
    }
    for t in held {
        t.abort();
    }
    scrapes
}

/// The scrapes as `promtool` input series: one per label set, `_` where a scrape lacks it.
fn input_series(scrapes: &[BTreeMap<String, f64>]) -> String {
    let mut priorities: Vec<&String> = scrapes.iter().flat_map(|s| s.keys()).collect();
    priorities.sort();
    priorities.dedup();
    let mut out = String::new();
    for p in priorities {
        let values: Vec<String> = scrapes
            .iter()
            .map(|s| s.get(p).map_or("_".to_owned(), |v| v.to_string()))
            .collect();
        let _ = writeln!(
            out,
            "      - series: 'fairgate_shed_total{{priority=\"{p}\"}}'\n        values: '{}'",
            values.join(" ")
        );
    }
    out
}

/// Writes a `promtool test rules` file for `examples/alerts.yaml` and runs it; returns
/// (success, output).
fn promtool(dir: &Path, series: &str, alert_tests: &str) -> (bool, String) {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/alerts.yaml");
    let rules = rules.canonicalize().expect("examples/alerts.yaml");
    let test = format!(
        "rule_files: ['{}']
evaluation_interval: {STEP}
tests:
  - interval: {STEP}
    input_series:
{series}    alert_rule_test:
{alert_tests}",
        rules.display()
    );
    let file = dir.join("alerts_test.yaml");
    std::fs::write(&file, &test).expect("write the promtool test");
    let out = Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(&file)
        .output()
        .expect("run promtool");
    let text = format!(
        "{test}\n--- promtool:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const CRITICAL_FIRES: &str = "      - eval_time: 3m
        alertname: FairgateSheddingCritical
        exp_alerts:
          - exp_labels: {severity: critical}
            exp_annotations: {summary: 'fairgate is shedding critical requests'}
";

const CRITICAL_SILENT: &str = "      - eval_time: 3m
        alertname: FairgateSheddingCritical
        exp_alerts: []
";

const NORMAL_FIRES: &str = "      - eval_time: 3m
        alertname: FairgateShedding
        exp_alerts:
          - exp_labels: {severity: warning, priority: normal}
            exp_annotations:
              summary: 'fairgate is shedding normal requests'
              description: 'In flight is at the shedding limit; check upstream latency and fairgate_utilization.'
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_critical_requests_fires_the_critical_shed_alert() {
    ensure_package("prometheus", &["promtool"]);
    let scrapes = scrape_while_shedding("/critical/x").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, out) = promtool(dir.path(), &input_series(&scrapes), CRITICAL_FIRES);
    assert!(ok, "{out}");
    assert_eq!(
        scrapes.last().and_then(|s| s.get("critical")).copied(),
        Some((SCRAPES - 1) as f64),
        "{scrapes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_only_normal_requests_does_not_fire_the_critical_shed_alert() {
    ensure_package("prometheus", &["promtool"]);
    let scrapes = scrape_while_shedding("/x").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let tests = format!("{CRITICAL_SILENT}{NORMAL_FIRES}");
    let (ok, out) = promtool(dir.path(), &input_series(&scrapes), &tests);
    assert!(ok, "{out}");
    assert_eq!(
        scrapes.last().and_then(|s| s.get("normal")).copied(),
        Some((SCRAPES - 1) as f64),
        "{scrapes:?}"
    );
}
