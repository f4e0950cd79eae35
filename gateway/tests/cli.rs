//! Smoke test of the `fairgate` binary's CLI. Having an integration test here also makes
//! `cargo test --workspace` build `target/<profile>/fairgate`, which the end-to-end tests in
//! the `fairgate-tests` crate run.

use std::process::Command;

fn fairgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fairgate"))
        .args(args)
        .output()
        .expect("run fairgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_help_and_usage_errors() {
    let (code, out, _) = fairgate(&["version"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("fairgate {}", env!("CARGO_PKG_VERSION"))
    );
    let (code, out, _) = fairgate(&["--help"]);
    assert_eq!(code, 0);
    for sub in ["run", "check", "schema", "version"] {
        assert!(out.contains(sub), "{out}");
    }
    // No config and no subcommand: a clear error, no panic.
    let (code, _, err) = fairgate(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("fairgate run --config"), "{err}");
    let (code, _, err) = fairgate(&["check"]);
    assert_eq!(code, 2, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn the_example_gateway_config_checks() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/gateway.yaml");
    let (code, out, err) = fairgate(&["check", "--gateway", root]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 route(s)"), "{out}");
}
