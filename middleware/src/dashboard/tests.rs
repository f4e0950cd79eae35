use std::net::IpAddr;

use fairgate_policies::PolicyStore;
use prometheus_client::registry::Registry;

use super::*;
use crate::clock::ManualClock;
use crate::engine::RequestFacts;

const S: u64 = 1_000_000_000;

/// Clients are keyed by IP (no extractor): `ip(n)` is client `192.0.2.n`.
const POLICY: &str = "
version: 1
default_plan: free
plans:
  free: {bandwidths: [{rate: 1/s, burst: 2}]}
rules:
  - name: blocked
    when: {path: {prefix: /blocked}}
    action: deny
";

fn ip(n: u8) -> IpAddr {
    IpAddr::from([192, 0, 2, n])
}

fn facts(peer: &IpAddr, path: &'static str) -> RequestFacts<'static> {
    RequestFacts {
        peer: *peer,
        method: "GET",
        host: "example.test",
        path,
        query: None,
        operation: None,
        headers: &(),
    }
}

fn setup(policy: &str, config: DashboardConfig) -> (Arc<Engine>, Dashboard, Arc<ManualClock>) {
    let store = PolicyStore::from_yaml_str(policy, "p.yaml").expect("policy");
    let clock = ManualClock::new(1000 * S);
    let engine = Engine::with_clock(store, clock.clone());
    let mut registry = Registry::default();
    let metrics = EngineMetrics::register(&mut registry);
    let dashboard = Dashboard::new(engine.clone(), metrics.clone(), config);
    engine.set_observer(Arc::new((metrics, dashboard.clone())));
    (engine, dashboard, clock)
}

fn series<'a>(data: &'a Value, decision: &str, stage: &str) -> Vec<&'a Value> {
    data["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["decision"] == decision && s["stage"] == stage)
        .collect()
}

fn values(s: &Value) -> Vec<f64> {
    s["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn each_step_shows_the_decisions_made_in_it_per_second() {
    let step = DashboardConfig {
        step: Duration::from_secs(2),
        points: 10,
    };
    let (engine, dashboard, _clock) = setup(POLICY, step);
    dashboard.sample();
    // Step 1: two admits and a quota rejection for .1, one deny for .2.
    for _ in 0..3 {
        engine.decide(&facts(&ip(1), "/"));
    }
    engine.decide(&facts(&ip(2), "/blocked"));
    dashboard.sample();
    // Step 2: nothing.
    dashboard.sample();
    let data = dashboard.data();
    assert_eq!(data["times"].as_array().unwrap().len(), 3);
    let admits = series(&data, "admit", "none");
    assert_eq!(admits.len(), 1);
    assert_eq!(
        values(admits[0]),
        vec![0.0, 1.0, 0.0],
        "2 admits in a 2 s step"
    );
    let quota = series(&data, "reject", "quota");
    assert_eq!(values(quota[0]), vec![0.0, 0.5, 0.0]);
    assert_eq!(quota[0]["plan"], "free");
    let rule = series(&data, "reject", "rule");
    assert_eq!(rule[0]["rule"], "blocked");
    assert_eq!(values(rule[0]), vec![0.0, 0.5, 0.0]);
}

#[test]
fn history_keeps_a_fixed_number_of_samples() {
    let (engine, dashboard, _clock) = setup(
        POLICY,
        DashboardConfig {
            step: Duration::from_secs(1),
            points: 4,
        },
    );
    for _ in 0..10 {
        engine.decide(&facts(&ip(1), "/"));
        dashboard.sample();
    }
    let data = dashboard.data();
    assert_eq!(data["times"].as_array().unwrap().len(), 4);
    for s in data["decisions"].as_array().unwrap() {
        assert_eq!(s["values"].as_array().unwrap().len(), 4, "{s}");
    }
    assert_eq!(data["shedding"]["in_flight"].as_array().unwrap().len(), 4);
}

#[test]
fn series_past_the_bound_are_summed_into_other() {
    // More deny rules than series kept: each rule's rejections are a series of its own.
    let mut policy = String::from("version: 1\nrules:\n");
    let n = MAX_SERIES + 20;
    for i in 0..n {
        policy.push_str(&format!(
            "  - {{name: r{i}, when: {{path: {{exact: /r{i}}}}}, action: deny}}\n"
        ));
    }
    let (engine, dashboard, _clock) = setup(&policy, DashboardConfig::default());
    dashboard.sample();
    let paths: Vec<&'static str> = (0..n)
        .map(|i| &*Box::leak(format!("/r{i}").into_boxed_str()))
        .collect();
    for p in &paths {
        engine.decide(&facts(&ip(1), p));
    }
    dashboard.sample();
    let data = dashboard.data();
    let all = data["decisions"].as_array().unwrap();
    assert!(all.len() <= MAX_SERIES + 1, "{} series", all.len());
    let total: f64 = all.iter().map(|s| values(s).last().copied().unwrap()).sum();
    let expected = n as f64 / 5.0;
    assert!(
        (total - expected).abs() < 1e-9,
        "every rejection is in some series: {total} != {expected}"
    );
    assert!(all.iter().any(|s| s["stage"] == "other"));
}

#[test]
fn a_client_drill_down_has_its_history_and_only_its_own_decisions() {
    let (engine, dashboard, clock) = setup(POLICY, DashboardConfig::default());
    let a = ip(1).to_string();
    dashboard.watch(&a);
    for _ in 0..3 {
        engine.decide(&facts(&ip(1), "/"));
    }
    engine.decide(&facts(&ip(2), "/"));
    dashboard.sample();
    clock.advance(Duration::from_secs(10));
    dashboard.sample();
    let c = dashboard.client(&a).expect("known client");
    let recent = c["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 3, "{recent:?}");
    assert_eq!(recent[0]["decision"], "reject", "newest first");
    assert_eq!(recent[0]["stage"], "quota");
    let h = &c["history"];
    let used = h["bandwidths"].as_object().unwrap();
    assert_eq!(used.len(), 1);
    let used: Vec<f64> = used
        .values()
        .next()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(used.len(), 2);
    assert!(used[0] > 0.99, "the bucket was empty: {used:?}");
    assert!(used[1] < 0.01, "and full again 10 s later: {used:?}");
    // Another client: the default plan's full buckets, no history, none of .1's decisions.
    let other = dashboard
        .client("192.0.2.99")
        .expect("the default plan applies");
    assert!(other["history"].is_null());
    assert_eq!(other["recent"], json!([]));
}

#[test]
fn client_histories_and_recent_decisions_are_bounded() {
    let (engine, dashboard, _clock) = setup(POLICY, DashboardConfig::default());
    for n in 0..(MAX_CLIENTS + 30) {
        dashboard.watch(&format!("k{n}"));
    }
    for i in 0..(RECENT + 100) {
        engine.decide(&facts(&ip(u8::try_from(i % 200).unwrap()), "/"));
    }
    dashboard.sample();
    assert!(lock(&dashboard.inner.history).clients.len() <= MAX_CLIENTS);
    assert_eq!(lock(&dashboard.inner.recent).len(), RECENT);
}

#[test]
fn reloads_and_actions_are_listed_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, POLICY).unwrap();
    let store = PolicyStore::from_file(&file).unwrap();
    let engine = Engine::new(store.clone());
    let mut registry = Registry::default();
    let metrics = EngineMetrics::register(&mut registry);
    let dashboard = Dashboard::new(engine, metrics, DashboardConfig::default());
    std::fs::write(&file, POLICY.replace("rate: 1/s", "rate: 2/s")).unwrap();
    store.reload().unwrap();
    std::fs::write(&file, "version: 1\nplans: [").unwrap();
    assert!(store.reload().is_err());
    dashboard.record_action("reset", "k", &json!({"buckets": 1}));
    let data = dashboard.data();
    let reloads = data["policy"]["reloads"].as_array().unwrap();
    assert_eq!(reloads.len(), 2);
    assert_eq!(reloads[0]["result"], "error");
    assert_eq!(reloads[1]["result"], "ok");
    assert_eq!(reloads[1]["plans_modified"], json!(["free"]));
    assert_eq!(data["actions"][0]["action"], "reset");
}
