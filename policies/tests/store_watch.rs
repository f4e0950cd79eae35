//! The file watcher against real files in a temp dir: in-place writes, chunked writes,
//! rename-over, ConfigMap-style symlink swaps, delete then recreate, invalid edits, bursts,
//! and overrides-file changes. Every wait polls with a deadline; nothing sleeps to
//! synchronise.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fairgate_policies::watch::{watch, WatchError, WatchHandle, DEFAULT_DEBOUNCE};
use fairgate_policies::PolicyStore;

const DEADLINE: Duration = Duration::from_secs(5);
const DEBOUNCE: Duration = Duration::from_millis(100);

/// A valid policy whose one rule is named `marker`.
fn policy(marker: &str) -> String {
    format!(
        "version: 1\nrules:\n  - name: {marker}\n    when: {{path: /{marker}}}\n    action: deny\n"
    )
}

fn marker(store: &PolicyStore) -> String {
    store.load().source.rules[0].name.clone()
}

/// Polls `cond` every 10 ms until it holds or the deadline passes.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn setup(dir: &Path, marker: &str) -> (PathBuf, PolicyStore, WatchHandle) {
    let path = dir.join("policy.yaml");
    fs::write(&path, policy(marker)).unwrap();
    let store = PolicyStore::from_file(&path).unwrap();
    let handle = watch(store.clone(), DEBOUNCE).unwrap();
    (path, store, handle)
}

#[test]
fn in_place_write_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store, _w) = setup(dir.path(), "one");
    fs::write(&path, policy("two")).unwrap();
    wait_for("policy two", || marker(&store) == "two");
    assert_eq!(store.version(), 2);
}

#[test]
fn truncate_and_write_in_chunks_never_publishes_a_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store, w) = setup(dir.path(), "one");
    let full = policy("two").replace(
        "when: {path: /two}",
        "when: {path: {prefix: [/two, /three, /four]}}",
    );
    // Every prefix cut inside the flow mapping is invalid YAML.
    let cut1 = full.find("/three").unwrap();
    let cut2 = full.find("/four").unwrap();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    for chunk in [&full[..cut1], &full[cut1..cut2], &full[cut2..]] {
        f.write_all(chunk.as_bytes()).unwrap();
        f.flush().unwrap();
        // A slow writer; whether a reload lands between chunks or not, only the old or
        // the final policy may ever be active.
        std::thread::sleep(Duration::from_millis(30));
        let m = marker(&store);
        assert!(m == "one" || m == "two", "intermediate policy {m}");
    }
    drop(f);
    wait_for("policy two", || marker(&store) == "two");
    assert_eq!(store.load().source.rules.len(), 1);
    assert!(store.last_reload().last_ok());
    assert!(w.status().reloads >= 1);
}

#[test]
fn rename_over_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store, _w) = setup(dir.path(), "one");
    let tmp = dir.path().join(".policy.yaml.tmp");
    fs::write(&tmp, policy("two")).unwrap();
    fs::rename(&tmp, &path).unwrap();
    wait_for("policy two", || marker(&store) == "two");
    // Editor style: move the original away, write a new file.
    fs::rename(&path, dir.path().join("policy.yaml~")).unwrap();
    fs::write(&path, policy("three")).unwrap();
    wait_for("policy three", || marker(&store) == "three");
}

#[cfg(unix)]
#[test]
fn configmap_symlink_swap_reloads() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Kubernetes layout: policy.yaml -> ..data/policy.yaml, ..data -> ..v1
    fs::create_dir(d.join("..v1")).unwrap();
    fs::write(d.join("..v1/policy.yaml"), policy("one")).unwrap();
    symlink("..v1", d.join("..data")).unwrap();
    symlink("..data/policy.yaml", d.join("policy.yaml")).unwrap();
    let store = PolicyStore::from_file(d.join("policy.yaml")).unwrap();
    let _w = watch(store.clone(), DEBOUNCE).unwrap();
    assert_eq!(marker(&store), "one");
    // The update: a new version dir, a new ..data symlink renamed over the old one.
    fs::create_dir(d.join("..v2")).unwrap();
    fs::write(d.join("..v2/policy.yaml"), policy("two")).unwrap();
    symlink("..v2", d.join("..data_tmp")).unwrap();
    fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    fs::remove_dir_all(d.join("..v1")).unwrap();
    wait_for("policy two", || marker(&store) == "two");
}

#[test]
fn delete_keeps_the_last_good_policy_until_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store, w) = setup(dir.path(), "one");
    fs::remove_file(&path).unwrap();
    wait_for("the watcher to notice", || w.status().file_missing);
    assert_eq!(marker(&store), "one");
    assert_eq!(store.version(), 1);
    // Deleting is not a failed reload.
    assert_eq!(store.last_reload().failed, 0);
    fs::write(&path, policy("two")).unwrap();
    wait_for("policy two", || marker(&store) == "two");
    assert!(!w.status().file_missing);
    assert_eq!(store.version(), 2);
}

#[test]
fn invalid_edit_keeps_the_old_policy_then_a_fix_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (path, store, _w) = setup(dir.path(), "one");
    fs::write(
        &path,
        "version: 1\nrules:\n  - name: x\n    action: explode\n",
    )
    .unwrap();
    wait_for("the failed reload", || store.last_reload().failed == 1);
    assert_eq!(marker(&store), "one");
    let err = store.last_reload().last_error.unwrap();
    assert_eq!(err.0[0].line, 4, "{err}");
    fs::write(&path, policy("two")).unwrap();
    wait_for("policy two", || marker(&store) == "two");
    assert!(store.last_reload().last_ok());
}

#[test]
fn a_burst_of_writes_is_debounced_to_the_final_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    fs::write(&path, policy("p0")).unwrap();
    let store = PolicyStore::from_file(&path).unwrap();
    let w = watch(store.clone(), Duration::from_millis(300)).unwrap();
    for i in 1..=50 {
        fs::write(&path, policy(&format!("p{i}"))).unwrap();
    }
    wait_for("the final policy", || marker(&store) == "p50");
    // 50 writes within far less than the window: far fewer reloads than writes.
    let reloads = w.status().reloads;
    assert!((1..10).contains(&reloads), "{reloads} reloads");
    assert!(w.status().events >= 1);
}

#[test]
fn overrides_file_changes_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    fs::create_dir(dir.path().join("ov")).unwrap();
    let text = "version: 1\nplans: {free: {bandwidths: [10/s]}, pro: {bandwidths: [100/s]}}\noverrides_file: ov/clients.yaml\n";
    fs::write(&path, text).unwrap();
    let store = PolicyStore::from_file(&path).unwrap();
    let _w = watch(store.clone(), DEBOUNCE).unwrap();
    assert!(store.load().clients.is_empty());
    fs::write(dir.path().join("ov/clients.yaml"), "key-a: {plan: pro}\n").unwrap();
    wait_for("the override", || {
        store.load().clients.contains_key("key-a")
    });
}

#[test]
fn watching_needs_a_file_and_stops_on_drop() {
    let store = PolicyStore::from_yaml_str(&policy("one"), "inline").unwrap();
    assert!(matches!(
        watch(store, DEFAULT_DEBOUNCE),
        Err(WatchError::NoFile)
    ));
    let dir = tempfile::tempdir().unwrap();
    let (path, store, w) = setup(dir.path(), "one");
    // A control: a second store of the same file, watched with a debounce ten times longer.
    // When the control has reloaded, a watcher of `store` that were still running (shorter
    // debounce, same events) would have reloaded it first.
    let control = PolicyStore::from_file(&path).unwrap();
    let _control_w = watch(control.clone(), DEBOUNCE * 10).unwrap();
    drop(w);
    fs::write(&path, policy("two")).unwrap();
    wait_for("the control's reload", || marker(&control) == "two");
    assert_eq!(marker(&store), "one", "a dropped watcher reloaded");
    assert_eq!(store.version(), 1);
    // The store itself still reloads by hand.
    store.reload().unwrap();
    assert_eq!((marker(&store).as_str(), store.version()), ("two", 2));
}
