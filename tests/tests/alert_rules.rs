//! Every alert in `examples/alerts.yaml` is checked (issue 16, item 4): `promtool check
//! rules` accepts the file, `promtool test rules` passes the hand-written unit tests in
//! `tests/alerts/alerts_test.yaml`, and each alert there has a case where it fires (some
//! expected alert) and one where it stays silent (`exp_alerts: []`) on control series. A new
//! alert without both fails here. `tests/tests/alerts.rs` feeds the rules series scraped from
//! the real binary instead.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use fairgate_tests::ensure_package;
use yaml_rust2::{Yaml, YamlLoader};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
        .canonicalize()
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn load(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).expect("read");
    let mut docs = YamlLoader::load_from_str(&text).expect("YAML");
    assert_eq!(docs.len(), 1, "{}", path.display());
    docs.remove(0)
}

/// `promtool ARGS…`; panics with its output unless it succeeds.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The alert names of a rules file.
fn alerts(rules: &Yaml) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for group in rules["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            if let Some(name) = rule["alert"].as_str() {
                assert!(names.insert(name.to_owned()), "alert {name} defined twice");
            }
        }
    }
    names
}

/// (alerts with a firing case, alerts with a silent case) of a promtool test file.
fn cases(tests: &Yaml) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut fires, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for group in tests["tests"].as_vec().expect("tests") {
        for case in group["alert_rule_test"].as_vec().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_owned();
            match case["exp_alerts"].as_vec() {
                Some(expected) if !expected.is_empty() => fires.insert(name),
                _ => silent.insert(name),
            };
        }
    }
    (fires, silent)
}

#[test]
fn every_alert_passes_promtool_and_has_a_firing_and_a_silent_unit_test() {
    ensure_package("prometheus", &["promtool"]);
    let rules = repo_file("examples/alerts.yaml");
    let tests = repo_file("tests/alerts/alerts_test.yaml");
    let checked = promtool(&["check", "rules", rules.to_str().expect("utf-8")]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    promtool(&["test", "rules", tests.to_str().expect("utf-8")]);

    let names = alerts(&load(&rules));
    assert!(
        names.contains("FairgatePlanAtLimit")
            && names.contains("FairgateHotWhileBorrowing")
            && names.contains("FairgateRedisBreakerOpen"),
        "{names:?}"
    );
    let (fires, silent) = cases(&load(&tests));
    let no_firing: Vec<&String> = names.difference(&fires).collect();
    let no_silent: Vec<&String> = names.difference(&silent).collect();
    assert!(
        no_firing.is_empty() && no_silent.is_empty(),
        "alerts without a unit test where they fire: {no_firing:?}; without one where they \
         stay silent: {no_silent:?} (add them to tests/alerts/alerts_test.yaml)"
    );
    let unknown: Vec<&String> = fires
        .union(&silent)
        .filter(|n| !names.contains(*n))
        .collect();
    assert!(
        unknown.is_empty(),
        "tests of alerts that do not exist: {unknown:?}"
    );
}

/// The check above can fail: a rules file with an alert the unit tests do not cover is
/// reported, and `promtool test rules` rejects a control case that does fire.
#[test]
fn an_uncovered_alert_and_a_wrong_control_case_are_caught() {
    ensure_package("prometheus", &["promtool"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "groups:\n  - name: g\n    rules:\n      - alert: Covered\n        expr: up == 0\n      \
         - alert: Uncovered\n        expr: up == 2\n",
    )
    .expect("write");
    let tests = dir.path().join("tests.yaml");
    std::fs::write(
        &tests,
        "rule_files: [rules.yaml]\ntests:\n  - interval: 1m\n    input_series:\n      \
         - series: up\n        values: '0x3'\n    alert_rule_test:\n      \
         - eval_time: 2m\n        alertname: Covered\n        exp_alerts: []\n",
    )
    .expect("write");
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&tests)
        .output()
        .expect("run promtool");
    assert!(!out.status.success(), "a control case that fires must fail");
    let names = alerts(&load(&rules));
    let (fires, silent) = cases(&load(&tests));
    assert_eq!(
        names.difference(&fires).collect::<Vec<_>>(),
        ["Covered", "Uncovered"]
    );
    assert_eq!(names.difference(&silent).collect::<Vec<_>>(), ["Uncovered"]);
}
