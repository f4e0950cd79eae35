//! Nightly-tier scenarios (faults): run by `scripts/nightly.sh`, not by `.ci/run`.
//!
//! The full-length forms of SCENARIOS.md F1, F2 and F8, and F9's last-known-good start.
//! The scenario bodies live in `faults.rs` (included below, so its `ci`-tier tests run here
//! too, as `faults::…`).

#[path = "faults.rs"]
mod faults;

use std::time::Duration;

use fairgate_tests::{fairgate_bin, Gateway, Upstream};

/// F1 as specified: 500 rps for 20 s, the upstream killed at 5 s and restarted at 12 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_full_length() {
    let _serial = faults::SERIAL.lock().await;
    faults::f1(
        500,
        Duration::from_secs(5),
        Duration::from_secs(12),
        Duration::from_secs(20),
    )
    .await;
}

/// F2 as specified: route A's timeout 2 s, A black-holed for the rest of a 30 s run (the
/// spec's SIGSTOP for 15 s), route B at 500 rps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_full_length() {
    let _serial = faults::SERIAL.lock().await;
    faults::f2(
        Duration::from_secs(2),
        Duration::from_secs(5),
        Duration::from_secs(30),
        500,
    )
    .await;
}

/// F8 as specified for nightly: 5 upgrades in 60 s at 1k rps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f8_five_upgrades_in_a_minute() {
    let _serial = faults::SERIAL.lock().await;
    faults::f8(1000, 5, Duration::from_secs(10), Duration::from_secs(60)).await;
}

/// F9 (d) as specified: after a SIGKILL, a restart whose current policy file is invalid
/// starts from the last-known-good policy and serves under it.
///
/// Known failure: the gateway keeps no last-known-good snapshot on disk, so this start exits
/// 1 (the `ci` test `f9_sigkill_then_restart_serves_only_after_the_policy_compiled` pins
/// that safe behaviour). This test states the specified behaviour until a snapshot exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f9_restart_with_an_invalid_file_starts_from_last_known_good() {
    let _serial = faults::SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    let dir = Gateway::tempdir();
    std::fs::write(
        dir.path().join("policy.yaml"),
        "version: 1\nrules:\n  - {name: no-evil, when: {user_agent: {prefix: [evil]}}, action: deny}\n",
    )
    .unwrap();
    let config = format!(
        "listen: 127.0.0.1:0\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\npolicy: policy.yaml\nlog: {{decisions: off}}\n",
        up.addr
    );
    let mut gw = Gateway::start_in(dir.clone(), &config);
    gw.kill();
    std::fs::write(
        dir.path().join("policy.yaml"),
        "version: 1\nrules: [{name: x\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(fairgate_bin())
        .arg("run")
        .arg("--config")
        .arg(dir.path().join("gateway.yaml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = fairgate_tests::eventually(Duration::from_secs(3), || {
        let done = matches!(child.try_wait(), Ok(Some(_)));
        async move { done }
    })
    .await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        !exited,
        "the gateway did not start from the last-known-good policy: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
