//! `PolicyStore`: loading, publishing, reload reports, failed reloads, listeners, and
//! readers racing a thousand swaps.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fairgate_policies::compile::policy_hash;
use fairgate_policies::decode::parse_policy;
use fairgate_policies::store::{ReloadOutcome, MAX_POLICY_BYTES};
use fairgate_policies::{Policy, PolicyStore};

const BASE: &str = r#"
version: 1
rules:
  - name: block-bots
    when: {user_agent: {regex: [badbot]}}
    action: deny
  - name: login
    when: {method: POST, path: /login}
    action: {limit: {rate: 5/min}}
  - name: gone-later
    when: {path: /old}
    action: deny
plans:
  free: {bandwidths: ["10/s burst 20", "1000/day"]}
  pro: {bandwidths: ["100/s"]}
default_plan: free
clients:
  key-a: {bandwidths: ["50/s"]}
"#;

fn base() -> Policy {
    parse_policy(BASE, "base.yaml").unwrap()
}

#[test]
fn handles_are_shareable() {
    fn shared<T: Send + Sync>() {}
    fn unwind_safe<T: std::panic::RefUnwindSafe + std::panic::UnwindSafe>() {}
    shared::<PolicyStore>();
    shared::<fairgate_policies::CompiledPolicy>();
    unwind_safe::<fairgate_policies::CompiledPolicy>();
    unwind_safe::<fairgate_policies::matcher::RuleSet>();
}

#[test]
fn first_policy_is_version_one() {
    let store = PolicyStore::from_yaml_str(BASE, "base.yaml").unwrap();
    assert_eq!(store.version(), 1);
    assert_eq!(store.load().version, 1);
    assert_eq!(store.load_full().rules.len(), 3);
    assert!(store.path().is_none());
    let status = store.last_reload();
    assert_eq!((status.version, status.succeeded, status.failed), (1, 0, 0));
    assert!(status.last_ok());
    assert!(status.last_attempt_at.is_none());
    assert_eq!(PolicyStore::for_test(base()).load().hash, store.load().hash);
}

#[test]
fn reload_report_lists_what_changed() {
    let store = PolicyStore::for_test(base());
    let old_hash = store.load().hash;
    let mut p = base();
    // Modify a rule, remove one, add one.
    p.rules[0].mode = fairgate_policies::model::Mode::Shadow;
    p.rules.retain(|r| r.name != "gone-later");
    let mut added = p.rules[1].clone();
    added.name = "login2".into();
    p.rules.push(added);
    // Change free's first bandwidth (T changes), drop pro, add gold.
    p.plans.get_mut("free").unwrap().bandwidths[0].rate = "20/s".parse().unwrap();
    let gold = p.plans.remove("pro").unwrap();
    p.plans.insert("gold".into(), gold);
    let report = store.swap_policy(p).unwrap();
    assert!(!report.unchanged);
    assert_eq!((report.previous_version, report.version), (1, 2));
    assert_eq!(report.previous_hash, old_hash);
    assert_eq!(report.hash, store.load().hash);
    assert_eq!(store.version(), 2);
    assert_eq!(report.rules_added, ["login2"]);
    assert_eq!(report.rules_removed, ["gone-later"]);
    assert_eq!(report.rules_modified, ["block-bots"]);
    assert_eq!(report.plans_added, ["gold"]);
    assert_eq!(report.plans_removed, ["pro"]);
    assert_eq!(report.plans_modified, ["free"]);
    let ids = |v: &[Arc<str>]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(ids(&report.bandwidths_changed), ["plan:free/0"]);
    assert_eq!(
        ids(&report.bandwidths_added),
        ["plan:gold/0", "rule:login2"]
    );
    assert_eq!(ids(&report.bandwidths_removed), ["plan:pro/0"]);
    let status = store.last_reload();
    assert_eq!((status.version, status.succeeded, status.failed), (2, 1, 0));
    assert!(status.last_attempt_at.is_some());
}

#[test]
fn identical_reload_succeeds_without_a_new_version() {
    let store = PolicyStore::for_test(base());
    let before = store.load_full();
    let report = store.reload_from_str(BASE, "again.yaml").unwrap();
    assert!(report.unchanged);
    assert_eq!(report.version, 1);
    assert!(report.rules_modified.is_empty() && report.bandwidths_changed.is_empty());
    // Nothing was published: the very same Arc is still current.
    assert!(Arc::ptr_eq(&before, &store.load_full()));
    assert_eq!(store.last_reload().succeeded, 1);
}

#[test]
fn failed_reload_keeps_the_current_policy_and_is_recorded() {
    let store = PolicyStore::for_test(base());
    let before = store.load_full();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    store.on_reload(move |o| {
        log.lock().unwrap().push(match o {
            ReloadOutcome::Reloaded(r) => format!("ok v{}", r.version),
            ReloadOutcome::Failed(e) => format!("failed {}", e.len()),
        })
    });
    let bad = BASE
        .replace("rate: 5/min", "rate: 0/min")
        .replace("default_plan: free", "default_plan: freee");
    let errs = store.reload_from_str(&bad, "bad.yaml").unwrap_err();
    assert_eq!(errs.len(), 2, "{errs}");
    assert!(errs.to_string().contains("bad.yaml:"), "{errs}");
    assert!(Arc::ptr_eq(&before, &store.load_full()));
    let status = store.last_reload();
    assert_eq!((status.version, status.succeeded, status.failed), (1, 0, 1));
    assert!(!status.last_ok());
    assert_eq!(status.last_error.as_ref().unwrap(), &errs);
    // The next good reload clears the error.
    store
        .reload_from_str(&BASE.replace("/old", "/older"), "good.yaml")
        .unwrap();
    let status = store.last_reload();
    assert!(status.last_ok());
    assert_eq!((status.version, status.succeeded, status.failed), (2, 1, 1));
    assert_eq!(*seen.lock().unwrap(), ["failed 2", "ok v2"]);
}

#[test]
fn store_without_a_file_cannot_reload_from_disk() {
    let store = PolicyStore::for_test(base());
    let err = store.reload().unwrap_err();
    assert!(err.to_string().contains("not loaded from a file"), "{err}");
    assert_eq!(store.last_reload().failed, 0);
}

#[test]
fn files_with_overrides_load_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(
        &path,
        format!("{BASE}overrides_file: extra/overrides.yaml\n"),
    )
    .unwrap();
    // A missing overrides file means no overrides.
    let store = PolicyStore::from_file(&path).unwrap();
    assert_eq!(store.path(), Some(path.as_path()));
    assert_eq!(
        store.overrides_path(),
        Some(dir.path().join("extra/overrides.yaml"))
    );
    assert_eq!(store.load().clients.len(), 1);
    std::fs::create_dir(dir.path().join("extra")).unwrap();
    std::fs::write(
        dir.path().join("extra/overrides.yaml"),
        "key-a: {plan: pro}\nkey-b: {concurrency: 3}\n",
    )
    .unwrap();
    let report = store.reload().unwrap();
    assert_eq!(report.version, 2);
    assert_eq!(
        report
            .bandwidths_removed
            .iter()
            .map(|s| &**s)
            .collect::<Vec<_>>(),
        ["client:key-a/0"]
    );
    let p = store.load();
    assert_eq!(p.clients["key-a"].plan, Some(p.plan_index["pro"]));
    assert_eq!(p.clients["key-b"].concurrency, Some(3));
    // An override naming an unknown plan is an error located in the overrides file.
    std::fs::write(
        dir.path().join("extra/overrides.yaml"),
        "key-a: {plan: platinum}\n",
    )
    .unwrap();
    let err = store.reload().unwrap_err().to_string();
    assert!(err.contains("overrides.yaml:1:"), "{err}");
    assert_eq!(store.version(), 2);
}

#[test]
fn file_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yaml");
    let err = PolicyStore::from_file(&missing).unwrap_err().to_string();
    assert!(err.ends_with("nope.yaml: file not found"), "{err}");

    let big = dir.path().join("big.yaml");
    std::fs::write(&big, vec![b'#'; MAX_POLICY_BYTES as usize + 10]).unwrap();
    let err = PolicyStore::from_file(&big).unwrap_err().to_string();
    assert!(err.contains("big.yaml"), "{err}");

    let latin1 = dir.path().join("latin1.yaml");
    std::fs::write(&latin1, b"version: 1\nrules: []\n# caf\xe9\n").unwrap();
    let err = PolicyStore::from_file(&latin1).unwrap_err();
    assert_eq!((err.0[0].line, err.0[0].column), (3, 6), "{err}");

    // A failing reload of a file store keeps the policy.
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, BASE).unwrap();
    let store = PolicyStore::from_file(&good).unwrap();
    std::fs::write(&good, "version: 1\nrules: [").unwrap();
    let err = store.reload().unwrap_err();
    assert!(err.0[0].line > 0, "{err}");
    assert_eq!(store.version(), 1);
    std::fs::remove_file(&good).unwrap();
    assert!(store.reload().is_err());
    assert_eq!(store.last_reload().failed, 2);
}

/// 4 readers call `load()` in a loop while 1,000 swaps happen: every policy seen is one
/// that was published, and each reader's versions never go backwards.
#[test]
fn readers_see_only_published_policies_in_order() {
    const SWAPS: usize = 1000;
    // No regex in these: compiling one per swap would dominate a debug-build test.
    let plain = || {
        let mut p = base();
        p.rules[0].when = None;
        p
    };
    let variants: Vec<Policy> = (0..SWAPS)
        .map(|i| {
            let mut p = plain();
            p.rules[2].name = format!("rule-{i}");
            p.plans.get_mut("free").unwrap().bandwidths[0].burst = Some(20 + i as u64);
            p
        })
        .collect();
    let store = PolicyStore::for_test(plain());
    let mut published: HashSet<[u8; 32]> = variants
        .iter()
        .map(|p| policy_hash(p, &Default::default()).unwrap().0)
        .collect();
    published.insert(store.load().hash.0);
    let published = Arc::new(published);
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (store, published, done) = (store.clone(), published.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut last, mut loads) = (0u64, 0u64);
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let p = store.load();
                    assert!(
                        published.contains(&p.hash.0),
                        "unpublished policy {:?}",
                        p.hash
                    );
                    assert!(
                        p.version >= last,
                        "version went back from {last} to {}",
                        p.version
                    );
                    // The version and the content travel together.
                    assert_eq!(p.version == 1, p.source.rules[2].name == "gone-later");
                    last = p.version;
                    loads += 1;
                    if finished {
                        return (last, loads);
                    }
                }
            })
        })
        .collect();
    for p in variants {
        store.swap_policy(p).unwrap();
    }
    done.store(true, Ordering::Release);
    for r in readers {
        let (last, loads) = r.join().unwrap();
        // Each reader's final load happened after the last swap.
        assert_eq!(last, 1 + SWAPS as u64);
        assert!(loads > 0);
    }
    assert_eq!(store.version(), 1 + SWAPS as u64);
    assert_eq!(store.last_reload().succeeded, SWAPS as u64);
}

#[test]
fn a_reload_keeps_one_allocation_per_bandwidth_id() {
    // Runtime state may key buckets by the id's address; a new Arc per reload would make such
    // a table grow with every reload.
    let store = PolicyStore::from_yaml_str(BASE, "base.yaml").unwrap();
    let before = store.load_full();
    let ids = |p: &fairgate_policies::CompiledPolicy| {
        let mut v: Vec<Arc<str>> = p.bandwidths().map(|b| Arc::clone(&b.id)).collect();
        v.sort();
        v
    };
    let changed = BASE
        .replace("100/s", "200/s")
        .replace("gone-later", "renamed");
    store.reload_from_str(&changed, "base.yaml").unwrap();
    let after = store.load_full();
    assert_eq!(after.version, 2);
    for id in ids(&after) {
        let old = ids(&before).into_iter().find(|o| *o == id);
        let old = old.unwrap_or_else(|| panic!("{id} not in the old policy"));
        assert!(Arc::ptr_eq(&old, &id), "{id} was reallocated by the reload");
    }
}

/// A restart with a broken policy file starts from the last file that loaded, keeps watching
/// the real file, and refreshes the snapshot on every successful reload (SCENARIOS F9).
#[test]
fn a_broken_file_at_start_falls_back_to_the_last_known_good_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    let snapshot = dir.path().join(".policy.yaml.last-good");
    let good = "version: 1\nrules:\n  - {name: no-evil, when: {user_agent: {prefix: [evil]}}, action: deny}\n";
    std::fs::write(&path, good).unwrap();

    // No snapshot and a broken file: the file's errors, nothing else.
    let broken = "version: 1\nrules: [{name: x\n";
    std::fs::write(&path, broken).unwrap();
    let errors = PolicyStore::from_file_with_snapshot(&path, &snapshot).unwrap_err();
    assert!(errors.to_string().contains("policy.yaml:"), "{errors}");

    // A good start writes the snapshot byte for byte.
    std::fs::write(&path, good).unwrap();
    let (store, file_errors) = PolicyStore::from_file_with_snapshot(&path, &snapshot).unwrap();
    assert!(file_errors.is_none());
    assert_eq!(std::fs::read_to_string(&snapshot).unwrap(), good);
    let good_hash = store.load().hash;
    drop(store);

    // Broken at restart: the snapshot serves, the file's errors are reported and recorded,
    // and the store still reloads the real file.
    std::fs::write(&path, broken).unwrap();
    let (store, file_errors) = PolicyStore::from_file_with_snapshot(&path, &snapshot).unwrap();
    let file_errors = file_errors.expect("the file's errors");
    assert!(
        file_errors.to_string().contains("policy.yaml:"),
        "{file_errors}"
    );
    assert_eq!(store.load().hash, good_hash);
    assert_eq!(store.path(), Some(path.as_path()));
    assert!(!store.last_reload().last_ok());
    assert_eq!(
        std::fs::read_to_string(&snapshot).unwrap(),
        good,
        "a failure never overwrites it"
    );

    let newer = "version: 1\nrules:\n  - {name: no-bad, when: {user_agent: {prefix: [bad]}}, action: deny}\n";
    std::fs::write(&path, newer).unwrap();
    store.reload().unwrap();
    assert_ne!(store.load().hash, good_hash);
    assert_eq!(std::fs::read_to_string(&snapshot).unwrap(), newer);

    // A snapshot that does not load either: the file's errors.
    std::fs::write(&snapshot, "not: [a policy").unwrap();
    std::fs::write(&path, broken).unwrap();
    assert!(PolicyStore::from_file_with_snapshot(&path, &snapshot).is_err());
}
