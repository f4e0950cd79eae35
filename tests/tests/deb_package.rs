//! Issue #19, item 7: fairgate installs the way edge software is installed.
//!
//! Builds the Debian package with `cargo deb` (installing cargo-deb when missing) from the
//! binary this test suite runs, installs it with `dpkg -i`, checks what it put where (the
//! binary in `/usr/bin`, the config in `/etc/fairgate` as conffiles, the systemd unit, which
//! `systemd-analyze verify` accepts), then runs the installed binary exactly as the installed
//! unit does — its `ExecStartPre` check, its `ExecStart`, its `ExecReload` signal, its
//! `KillSignal` — against the installed config, and sends it real requests. The package is
//! purged at the end, whatever happens.
//!
//! Needs root (`dpkg -i`), like the tests that install Debian packages. The installed config
//! listens on 127.0.0.1:8080 (data) and 127.0.0.1:9090 (admin), as shipped.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fairgate_tests::{ensure_package, eventually, fairgate_bin, Client, DEADLINE};

/// The cargo-deb release the package is built with (installed when `cargo deb` is missing).
const CARGO_DEB_VERSION: &str = "3.8.0";
const UNIT: &str = "/usr/lib/systemd/system/fairgate.service";
const DATA: &str = "127.0.0.1:8080";
const ADMIN: &str = "127.0.0.1:9090";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ensure_cargo_deb() {
    if run(Command::new("cargo").args(["deb", "--version"])).0 {
        return;
    }
    let (ok, text) = run(Command::new("cargo").args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ]));
    assert!(ok, "cannot install cargo-deb: {text}");
}

/// Purges the package when dropped, so a failing test leaves no install behind.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "fairgate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The command line of `key=` in the installed unit, split on spaces (the unit's lines use no
/// quoting), with `$MAINPID` replaced.
fn unit_command(unit: &str, key: &str, main_pid: Option<u32>) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("the unit has no {key}=\n{unit}"));
    line.split_whitespace()
        .map(|w| match (w, main_pid) {
            ("$MAINPID", Some(pid)) => pid.to_string(),
            _ => w.to_string(),
        })
        .collect()
}

fn unit_setting<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

fn port_is_free(addr: &str) -> bool {
    TcpListener::bind(addr.parse::<SocketAddr>().expect("addr")).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_installs_and_the_installed_gateway_serves_its_installed_config() {
    for addr in [DATA, ADMIN] {
        assert!(
            port_is_free(addr),
            "{addr} is in use: the installed config listens there (stop what holds it)"
        );
    }
    ensure_package("dpkg", &["dpkg", "dpkg-deb"]);
    // The test purges the package at the end: never an installation it did not make.
    let (_, before) = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "fairgate"]));
    assert!(
        !before.contains("installed"),
        "a fairgate package is installed on this machine ({before}); remove it first"
    );
    ensure_package("systemd", &["systemd-analyze"]);
    ensure_cargo_deb();

    // Build the package from the binary under test (target/<profile>/fairgate).
    let bin = fairgate_bin();
    let profile_dir = bin.parent().expect("target/<profile>");
    let target_dir = profile_dir.parent().expect("target/");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("no profile in {}", profile_dir.display()),
    };
    let out = tempfile::tempdir().expect("tempdir");
    let (ok, text) = run(Command::new("cargo")
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", target_dir)
        .args([
            "deb",
            "-p",
            "fairgate-gateway",
            "--no-build",
            "--fast",
            "--profile",
        ])
        .arg(profile)
        .arg("-o")
        .arg(out.path()));
    assert!(ok, "cargo deb failed: {text}");
    let deb = std::fs::read_dir(out.path())
        .expect("read output dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap_or_else(|| panic!("cargo deb wrote no .deb: {text}"));

    // What the package declares.
    let (ok, info) = run(Command::new("dpkg-deb").arg("--field").arg(&deb));
    assert!(ok, "{info}");
    assert!(info.contains("Package: fairgate\n"), "{info}");
    assert!(info.contains("Section: net\n"), "{info}");

    // Install it.
    let installed = Installed;
    let (ok, text) = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i failed: {text}");
    let (_, status) = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "fairgate"]));
    assert_eq!(status, "install ok installed");
    let (_, files) = run(Command::new("dpkg-query").args(["-L", "fairgate"]));
    for path in [
        "/usr/bin/fairgate",
        "/etc/fairgate/gateway.yaml",
        "/etc/fairgate/policy.yaml",
        UNIT,
        "/usr/share/doc/fairgate/gateway.md",
    ] {
        assert!(
            files.lines().any(|l| l == path),
            "{path} not in the package:\n{files}"
        );
        assert!(Path::new(path).exists(), "{path} not installed");
    }
    // An upgrade keeps an operator's edits: the config files are conffiles.
    let (_, conffiles) =
        run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "fairgate"]));
    assert!(
        conffiles.contains("/etc/fairgate/gateway.yaml"),
        "{conffiles}"
    );
    assert!(
        conffiles.contains("/etc/fairgate/policy.yaml"),
        "{conffiles}"
    );
    // The installed binary is the one under test (cargo-deb strips it: compare what it says).
    let (_, installed_version) = run(Command::new("/usr/bin/fairgate").arg("version"));
    let (_, built_version) = run(Command::new(&bin).arg("version"));
    assert!(
        installed_version.starts_with("fairgate "),
        "{installed_version}"
    );
    assert_eq!(installed_version, built_version);

    // The unit: systemd accepts it, and it is sandboxed as the issue asks.
    let unit = std::fs::read_to_string(UNIT).expect("read unit");
    let (ok, text) = run(Command::new("systemd-analyze").args(["verify", UNIT]));
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("NoNewPrivileges", "yes"),
        ("StateDirectory", "fairgate"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(unit_setting(&unit, key), [value], "{key} in {UNIT}");
    }

    // ExecStartPre: the config check passes on the installed config.
    let pre = unit_command(&unit, "ExecStartPre", None);
    let (ok, text) = run(Command::new(&pre[0]).args(&pre[1..]));
    assert!(ok, "{pre:?}: {text}");

    // ExecStart: the installed gateway on the installed config.
    let start = unit_command(&unit, "ExecStart", None);
    assert_eq!(start[0], "/usr/bin/fairgate");
    let stderr = tempfile::NamedTempFile::new().expect("stderr file");
    // Killed by its PID if the test fails before it is stopped.
    let mut gateway = tokio::process::Command::new(&start[0])
        .args(&start[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.reopen().expect("reopen"))
        .kill_on_drop(true)
        .spawn()
        .expect("start the installed gateway");
    let pid = gateway.id().expect("pid");
    let log = || std::fs::read_to_string(stderr.path()).unwrap_or_default();

    let client = Client::new();
    let admin = format!("http://{ADMIN}");
    let up = eventually(DEADLINE, || {
        let client = client.clone();
        let url = format!("{admin}/health");
        async move {
            client
                .try_send(
                    http::Request::get(url)
                        .body(fairgate_tests::empty())
                        .expect("request"),
                )
                .await
                .is_ok_and(|r| r.status == 200)
        }
    })
    .await;
    assert!(up, "the installed gateway did not come up:\n{}", log());

    // The packaged policy: the demo upstream answers, RateLimit headers on every answer, the
    // free plan's burst of 10 then 429, the bad-bot rule.
    let data = format!("http://{DATA}");
    let r = client
        .get_with(&format!("{data}/hello"), &[("x-api-key", "pkg-test")])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.headers.contains_key("ratelimit-policy"), "{r:?}");
    // 5/s refills one request per 200 ms: twenty requests in a row meet a 429 after the ten
    // of the burst unless every one of them takes 200 ms.
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let r = client
            .get_with(&format!("{data}/"), &[("x-api-key", "pkg-burst")])
            .await;
        statuses.push(r.status.as_u16());
    }
    assert_eq!(statuses[..10], [200; 10], "{statuses:?}");
    assert!(statuses[10..].contains(&429), "{statuses:?}");
    let r = client
        .get_with(&format!("{data}/"), &[("user-agent", "BadBot/1.0")])
        .await;
    assert_eq!(r.status, 403);

    // ExecReload: the unit's reload command (SIGHUP to the main PID) reloads the policy.
    let status_of = || {
        let client = client.clone();
        let url = format!("{admin}/status");
        async move {
            let r = client.get(&url).await;
            serde_json::from_slice::<serde_json::Value>(&r.body).expect("status json")
        }
    };
    assert_eq!(status_of().await["last_reload"]["succeeded"], 0);
    let reload = unit_command(&unit, "ExecReload", Some(pid));
    let (ok, text) = run(Command::new(&reload[0]).args(&reload[1..]));
    assert!(ok, "{reload:?}: {text}");
    let reloaded = eventually(DEADLINE, || async {
        status_of().await["last_reload"]["succeeded"] == 1
    })
    .await;
    assert!(reloaded, "SIGHUP did not reload the policy:\n{}", log());

    // KillSignal: SIGTERM drains and exits 0.
    let (ok, text) = run(Command::new("kill").args(["-TERM", &pid.to_string()]));
    assert!(ok, "{text}");
    let exit = tokio::time::timeout(DEADLINE, gateway.wait()).await;
    assert!(
        matches!(exit, Ok(Ok(s)) if s.success()),
        "the gateway did not exit 0 on SIGTERM ({exit:?}):\n{}",
        log()
    );

    // Purging removes the binary and the config.
    drop(installed);
    assert!(!Path::new("/usr/bin/fairgate").exists());
    assert!(!Path::new("/etc/fairgate/gateway.yaml").exists());
}
