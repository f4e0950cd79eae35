//! Harness for fairgate's end-to-end tests: they run the real `fairgate` binary.
//!
//! - [`Gateway`] starts the binary on a temp config with ephemeral ports, learns the bound
//!   ports from its `fairgate listening data=… admin=…` stderr line, keeps its output, and
//!   kills it by PID on drop;
//! - [`Upstream`] is an in-process HTTP server (tokio + hyper on `127.0.0.1:0`) that records
//!   what it received (count, headers, bodies, connections, in-flight maximum), with a
//!   controllable delay and status;
//! - [`Client`] is a hyper-util client, optionally bound to a source address in `127.0.0.0/8`
//!   (so a test can be "another client") or speaking h2c with prior knowledge;
//! - [`eventually`] polls a condition with a deadline: tests never sleep to synchronise.

pub mod dns;
pub mod load;
pub mod proc;
pub mod raw;
pub mod redis;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Boxed body used by the harness.
pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// How long any harness wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

// === Debian packages ===

static INSTALL: Mutex<()> = Mutex::new(());

/// Makes sure every one of `binaries` is on the `PATH`, installing the Debian `package` with
/// `apt-get install -y` when one is missing (running `apt-get update` once if the first
/// attempt fails). While it installs, a `/usr/sbin/policy-rc.d` that exits 101 keeps the
/// package's service from starting (removed afterwards if it was not there). Installs are
/// serialised within the test process.
///
/// # Panics
///
/// When the install fails (not root, no package index).
pub fn ensure_package(package: &str, binaries: &[&str]) {
    ensure_package_for(package, || binaries.iter().all(|b| which(b)));
}

/// [`ensure_package`] for a package without a binary to look for (a library, a Python
/// module): `present` tells whether what the test needs of it is there.
///
/// # Panics
///
/// When the install fails, or `present` is still false after it.
pub fn ensure_package_for(package: &str, present: impl Fn() -> bool) {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if present() {
        return;
    }
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let had_policy = policy.exists();
    if !had_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n").expect("write policy-rc.d");
        let _ = Command::new("chmod").arg("+x").arg(policy).status();
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-o", "DPkg::Lock::Timeout=300", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let ok = install() || {
        let _ = Command::new("apt-get")
            .args(["update", "-o", "DPkg::Lock::Timeout=300"])
            .stdout(Stdio::null())
            .status();
        install()
    };
    if !had_policy {
        let _ = std::fs::remove_file(policy);
    }
    assert!(ok && present(), "cannot install {package}");
}

/// Whether `bin` is on the `PATH`.
pub fn which(bin: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

// === binary ===

/// `fairgate_shed_total` samples of one `/metrics` scrape, by `priority`, read with a
/// Prometheus text parser.
///
/// # Panics
///
/// When the text does not parse, or the family is not a counter.
pub fn shed_samples(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    let lines = metrics.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("parse /metrics");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "fairgate_shed_total")
        .map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("fairgate_shed_total is not a counter: {other:?}"),
            };
            (s.labels.get("priority").unwrap_or("").to_owned(), v)
        })
        .collect()
}

/// Waits for `child` to exit, at most `timeout`, blocking on the exit itself (a waiter
/// thread) rather than polling. On timeout the child is killed by PID, reaped, and `None`
/// is returned.
pub fn wait_child(child: Child, timeout: Duration) -> Option<ExitStatus> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut child = child;
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(timeout) {
        Ok(status) => status.ok(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let _ = rx.recv();
            None
        }
    }
}

/// The `fairgate` binary built next to this test executable (`target/<profile>/fairgate`).
///
/// # Panics
///
/// When it is not built: run `cargo build -p fairgate-gateway` first (`cargo test
/// --workspace` builds it before running tests).
pub fn fairgate_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> → target/debug/fairgate
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = dir.join(format!("fairgate{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not found: run `cargo build -p fairgate-gateway` first",
        bin.display()
    );
    bin
}

/// Runs `fairgate` with `args` to completion: (exit code, stdout, stderr).
pub fn run_fairgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(fairgate_bin())
        .args(args)
        .output()
        .expect("run fairgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// === Gateway ===

/// A running `fairgate` process.
pub struct Gateway {
    child: Option<Child>,
    /// The first data-plane address.
    pub data: SocketAddr,
    /// Every data-plane address, in config order.
    pub data_addrs: Vec<SocketAddr>,
    /// The admin address, when configured.
    pub admin: Option<SocketAddr>,
    dir: Arc<tempfile::TempDir>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Gateway {
    /// A fresh temp directory for a gateway's files.
    pub fn tempdir() -> Arc<tempfile::TempDir> {
        Arc::new(tempfile::tempdir().expect("tempdir"))
    }

    /// Writes `gateway.yaml` (and nothing else) into a new temp dir and starts the gateway.
    pub fn start(config: &str) -> Gateway {
        Self::start_in(Self::tempdir(), config)
    }

    /// Writes `gateway.yaml` into `dir` (other files, such as a policy, may already be there)
    /// and starts the gateway. Waits for its listening line.
    ///
    /// # Panics
    ///
    /// When the process exits or prints no listening line within [`DEADLINE`].
    pub fn start_in(dir: Arc<tempfile::TempDir>, config: &str) -> Gateway {
        Self::start_with_args(dir, config, &[])
    }

    /// [`start_in`](Self::start_in) with more arguments after `run --config FILE` (such as
    /// `--reuse-port`).
    ///
    /// # Panics
    ///
    /// When the process exits or prints no listening line within [`DEADLINE`].
    pub fn start_with_args(dir: Arc<tempfile::TempDir>, config: &str, args: &[&str]) -> Gateway {
        Self::start_with_env(dir, config, args, &[])
    }

    /// [`start_with_args`](Self::start_with_args) with environment variables set for the
    /// process (such as the test-only `FAIRGATE_TEST_WALL_CLOCK`).
    ///
    /// # Panics
    ///
    /// When the process exits or prints no listening line within [`DEADLINE`].
    pub fn start_with_env(
        dir: Arc<tempfile::TempDir>,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, config).expect("write gateway.yaml");
        let mut child = Command::new(fairgate_bin())
            .arg("run")
            .arg("--config")
            .arg(&path)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fairgate");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        pump(child.stdout.take().expect("stdout"), stdout.clone());
        pump(child.stderr.take().expect("stderr"), stderr.clone());
        let started = Instant::now();
        let line = loop {
            if let Some(l) = stderr
                .lock()
                .unwrap()
                .lines()
                .find(|l| l.starts_with("fairgate listening "))
            {
                break l.to_owned();
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "fairgate exited with {status} before listening:\n{}",
                    stderr.lock().unwrap()
                );
            }
            assert!(
                started.elapsed() < DEADLINE,
                "fairgate printed no listening line:\n{}",
                stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let (data_addrs, admin) = parse_listening(&line);
        Gateway {
            child: Some(child),
            data: data_addrs[0],
            data_addrs,
            admin,
            dir,
            stdout,
            stderr,
        }
    }

    /// The temp directory holding `gateway.yaml`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A handle on the temp directory (to start another gateway on the same files).
    pub fn dir_handle(&self) -> Arc<tempfile::TempDir> {
        self.dir.clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `http://DATA{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.data)
    }

    /// `http://ADMIN{path}`.
    ///
    /// # Panics
    ///
    /// When the gateway has no admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin.expect("admin listener"))
    }

    /// Sends a signal by name (`HUP`, `TERM`, `INT`) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The names of the process's threads (Linux: `/proc/PID/task/*/comm`; empty elsewhere).
    pub fn thread_names(&self) -> Vec<String> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return Vec::new();
        };
        let mut names: Vec<String> = tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim_end().to_owned())
            .collect();
        names.sort();
        names
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Everything the process wrote to stdout so far (the decision log by default).
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pump<R: std::io::Read + Send + 'static>(r: R, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut line = String::new();
        while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            into.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
}

fn parse_listening(line: &str) -> (Vec<SocketAddr>, Option<SocketAddr>) {
    let mut data = Vec::new();
    let mut admin = None;
    for part in line.split_whitespace() {
        if let Some(d) = part.strip_prefix("data=") {
            data = d
                .split(',')
                .map(|a| a.parse().expect("a data address in the listening line"))
                .collect();
        }
        if let Some(a) = part.strip_prefix("admin=") {
            admin = a.parse().ok();
        }
    }
    assert!(
        !data.is_empty(),
        "no data address in the listening line: {line}"
    );
    (data, admin)
}

// === waiting ===

/// Polls `check` every 10 ms until it returns true or `timeout` passes; returns whether it
/// became true.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// === Upstream ===

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: Method,
    /// Path and query.
    pub uri: String,
    /// HTTP version.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// The gateway-side address of the connection it came on.
    pub peer: SocketAddr,
}

/// What a test upstream does with requests beyond its concurrency cap
/// ([`Upstream::set_concurrency_cap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapMode {
    /// Answer the excess at once with 503.
    Reject,
    /// Queue the excess until a slot frees up.
    Queue,
}

/// What a test upstream shares with the test.
#[derive(Debug)]
pub struct UpstreamState {
    requests: Mutex<Vec<Recorded>>,
    /// Delay before answering, in ms (also settable per request with `?delay_ms=N`).
    pub delay_ms: AtomicU64,
    /// Status to answer (0: 200).
    pub status: AtomicU16,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    connections: AtomicUsize,
    /// Keep every request ([`Upstream::requests`]); false only counts them.
    record: AtomicBool,
    /// Requests received (recorded or not).
    received: AtomicUsize,
    /// Sequence number of the next answer, for the error schedule.
    seq: AtomicU64,
    /// Every Nth answer is an error (0: off).
    error_every: AtomicU64,
    /// A seeded fraction of answers are errors, in parts per million (0: off).
    error_ppm: AtomicU64,
    error_seed: AtomicU64,
    error_status: AtomicU16,
    errors_sent: AtomicUsize,
    /// Requests above this many in flight are rejected or queued (0: no cap).
    cap: AtomicUsize,
    cap_queue: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    capped: AtomicUsize,
    /// Answer nothing, ever (until stopped).
    black_hole: AtomicBool,
    /// New connections get headers and half a `Content-Length` body, then a reset.
    rst_mid_body: AtomicBool,
    resets: AtomicUsize,
}

impl Default for UpstreamState {
    fn default() -> Self {
        UpstreamState {
            requests: Mutex::default(),
            delay_ms: AtomicU64::new(0),
            status: AtomicU16::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            record: AtomicBool::new(true),
            received: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
            error_every: AtomicU64::new(0),
            error_ppm: AtomicU64::new(0),
            error_seed: AtomicU64::new(0),
            error_status: AtomicU16::new(500),
            errors_sent: AtomicUsize::new(0),
            cap: AtomicUsize::new(0),
            cap_queue: Mutex::new(None),
            capped: AtomicUsize::new(0),
            black_hole: AtomicBool::new(false),
            rst_mid_body: AtomicBool::new(false),
            resets: AtomicUsize::new(0),
        }
    }
}

/// The running accept loop of an [`Upstream`]: dropping `kill` stops it and every
/// connection it accepted.
#[derive(Debug)]
struct Serving {
    kill: tokio::sync::watch::Sender<()>,
    accept: tokio::task::JoinHandle<()>,
}

/// An in-process HTTP/1.1 + h2c upstream on `127.0.0.1:0`.
///
/// Paths: `/echo-body` streams the request body back; `/bytes/N` answers N bytes (chunked);
/// `/ws` accepts an `Upgrade: websocket` with 101 and echoes bytes; anything else answers
/// `ok` (status from [`UpstreamState::status`], after [`UpstreamState::delay_ms`]).
///
/// Fault controls: an error schedule ([`Upstream::set_error_every`],
/// [`Upstream::set_error_fraction`]), a concurrency cap ([`Upstream::set_concurrency_cap`]),
/// a black hole ([`Upstream::set_black_hole`]), a reset in the middle of a body
/// ([`Upstream::set_rst_mid_body`]), and [`Upstream::stop`] / [`Upstream::restart`] (the
/// in-process equivalent of SIGKILL and a restart on the same port). For long runs,
/// [`Upstream::set_record`]`(false)` only counts requests.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its recorder and controls.
    pub state: Arc<UpstreamState>,
    serving: Arc<Mutex<Option<Serving>>>,
}

impl Upstream {
    /// Starts an upstream on the current tokio runtime.
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        Self::start_with(listener)
    }

    /// Starts an upstream on `addr` (e.g. `127.0.0.3:PORT`, several loopback addresses on one
    /// port, as the addresses of one DNS name are); fails when it cannot be bound.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Upstream> {
        Ok(Self::start_with(TcpListener::bind(addr).await?))
    }

    fn start_with(listener: TcpListener) -> Upstream {
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(UpstreamState::default());
        let up = Upstream {
            addr,
            state,
            serving: Arc::new(Mutex::new(None)),
        };
        up.serve(listener);
        up
    }

    /// Starts an upstream that only counts requests ([`Upstream::set_record`]`(false)`).
    pub async fn start_counting() -> Upstream {
        let up = Self::start().await;
        up.set_record(false);
        up
    }

    fn serve(&self, listener: TcpListener) {
        let (kill, killed) = tokio::sync::watch::channel(());
        let st = self.state.clone();
        let accept = tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let mut stop = killed.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.changed() => return,
                };
                let Ok((stream, peer)) = accepted else {
                    continue;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let builder = builder.clone();
                let mut killed = killed.clone();
                tokio::spawn(async move {
                    if st.rst_mid_body.load(Ordering::SeqCst) {
                        tokio::select! {
                            _ = reset_mid_body(&st, stream) => {}
                            _ = killed.changed() => {}
                        }
                        return;
                    }
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), peer, req));
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    // Dropping the connection future closes the socket: a killed process.
                    tokio::select! {
                        _ = conn => {}
                        _ = killed.changed() => {}
                    }
                });
            }
        });
        *self.serving.lock().unwrap() = Some(Serving { kill, accept });
    }

    /// Stops at once, as SIGKILL would: closes the listener (new connections are refused)
    /// and drops every open connection, in the middle of whatever it was doing.
    pub async fn stop(&self) {
        let serving = self.serving.lock().unwrap().take();
        if let Some(Serving { kill, accept }) = serving {
            drop(kill);
            let _ = accept.await;
        }
    }

    /// Listens again on the same address after [`Upstream::stop`], keeping its state and
    /// controls.
    ///
    /// # Panics
    ///
    /// When the address cannot be bound again within [`DEADLINE`].
    pub async fn restart(&self) {
        self.stop().await;
        let started = Instant::now();
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        started.elapsed() < DEADLINE,
                        "cannot bind {} again: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        self.serve(listener);
    }

    /// Whether it is accepting connections (not [`Upstream::stop`]ped).
    pub fn is_running(&self) -> bool {
        self.serving.lock().unwrap().is_some()
    }

    /// Keep every request (the default), or only count them (long runs).
    pub fn set_record(&self, record: bool) {
        self.state.record.store(record, Ordering::SeqCst);
    }

    /// Answers every `n`th request, counting from the first answer after this call, with
    /// `status`; 0 turns it off.
    pub fn set_error_every(&self, n: u64, status: u16) {
        self.state.seq.store(0, Ordering::SeqCst);
        self.state.error_status.store(status, Ordering::SeqCst);
        self.state.error_ppm.store(0, Ordering::SeqCst);
        self.state.error_every.store(n, Ordering::SeqCst);
    }

    /// Answers a fraction (0..=1) of requests with `status`, chosen by a hash of `seed` and
    /// the answer's sequence number (the same seed gives the same schedule); 0 turns it off.
    pub fn set_error_fraction(&self, fraction: f64, seed: u64, status: u16) {
        self.state.seq.store(0, Ordering::SeqCst);
        let ppm = (fraction.clamp(0.0, 1.0) * 1e6).round() as u64;
        self.state.error_status.store(status, Ordering::SeqCst);
        self.state.error_seed.store(seed, Ordering::SeqCst);
        self.state.error_every.store(0, Ordering::SeqCst);
        self.state.error_ppm.store(ppm, Ordering::SeqCst);
    }

    /// Error answers sent by the schedules above.
    pub fn errors_sent(&self) -> usize {
        self.state.errors_sent.load(Ordering::SeqCst)
    }

    /// Caps requests in flight at `max` (0: no cap); the excess is rejected (503) or queued.
    /// A queue is sized when this is called: change the cap only while nothing is queued.
    pub fn set_concurrency_cap(&self, max: usize, mode: CapMode) {
        *self.state.cap_queue.lock().unwrap() = match (max, mode) {
            (1.., CapMode::Queue) => Some(Arc::new(tokio::sync::Semaphore::new(max))),
            _ => None,
        };
        let cap = if mode == CapMode::Reject { max } else { 0 };
        self.state.cap.store(cap, Ordering::SeqCst);
    }

    /// Requests answered 503 by the concurrency cap.
    pub fn capped(&self) -> usize {
        self.state.capped.load(Ordering::SeqCst)
    }

    /// While on, requests are received (and counted) but never answered.
    pub fn set_black_hole(&self, on: bool) {
        self.state.black_hole.store(on, Ordering::SeqCst);
    }

    /// While on, each new connection reads one request head, answers a `Content-Length:
    /// 1000` head and 500 bytes of body, then resets the connection (RST).
    pub fn set_rst_mid_body(&self, on: bool) {
        self.state.rst_mid_body.store(on, Ordering::SeqCst);
    }

    /// Connections reset by [`Upstream::set_rst_mid_body`].
    pub fn resets(&self) -> usize {
        self.state.resets.load(Ordering::SeqCst)
    }

    /// Requests received so far (complete, bodies included; empty unless recording).
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Number of requests received so far (recorded or only counted).
    pub fn count(&self) -> usize {
        self.state.received.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The most requests it was answering at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Forgets the maximum so far: [`Upstream::max_in_flight`] restarts from the current
    /// in-flight count.
    pub fn reset_max_in_flight(&self) {
        let now = self.state.in_flight.load(Ordering::SeqCst);
        self.state.max_in_flight.store(now, Ordering::SeqCst);
    }

    /// Requests it is answering now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }
}

/// Reads one request head, then answers half of a `Content-Length` body and resets.
async fn reset_mid_body(st: &UpstreamState, mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    st.received.fetch_add(1, Ordering::SeqCst);
    let mut out =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1000\r\n\r\n".to_vec();
    out.extend_from_slice(&[b'h'; 500]);
    if stream.write_all(&out).await.is_err() {
        return;
    }
    let _ = stream.flush().await;
    // The half body must have reached the peer before the reset (a reset discards what is
    // still in our send queue).
    if let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) {
        crate::proc::wait_acked(local, peer, DEADLINE).await;
    }
    // Zero linger: closing sends RST instead of FIN (and never blocks).
    let _ = stream.set_zero_linger();
    st.resets.fetch_add(1, Ordering::SeqCst);
    drop(stream);
}

/// splitmix64: a well-mixed hash of the sequence number for the seeded error schedule.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The scheduled error status for this answer, if any.
fn scheduled_error(st: &UpstreamState) -> Option<StatusCode> {
    let every = st.error_every.load(Ordering::Relaxed);
    let ppm = st.error_ppm.load(Ordering::Relaxed);
    if every == 0 && ppm == 0 {
        return None;
    }
    let seq = st.seq.fetch_add(1, Ordering::SeqCst);
    let hit = if every > 0 {
        (seq + 1) % every == 0
    } else {
        mix(st.error_seed.load(Ordering::Relaxed) ^ seq) % 1_000_000 < ppm
    };
    if !hit {
        return None;
    }
    st.errors_sent.fetch_add(1, Ordering::SeqCst);
    StatusCode::from_u16(st.error_status.load(Ordering::Relaxed)).ok()
}

struct InFlight(Arc<UpstreamState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    st: Arc<UpstreamState>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    // A queueing cap holds the request before it counts as in flight.
    let queue = st.cap_queue.lock().unwrap().clone();
    let _permit = match queue {
        Some(q) => q.acquire_owned().await.ok(),
        None => None,
    };
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = InFlight(st.clone());
    let cap = st.cap.load(Ordering::SeqCst);
    if cap > 0 && now > cap {
        st.capped.fetch_add(1, Ordering::SeqCst);
        let res = Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(full("over capacity"))
            .expect("response");
        return Ok(res);
    }
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let path = req.uri().path().to_owned();

    if path == "/ws" {
        let upgrade = hyper::upgrade::on(&mut req);
        record(&st, &req, Bytes::new(), peer, &uri);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let res = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(empty())
            .expect("response");
        return Ok(res);
    }

    if path == "/echo-body" {
        // Stream the body back as it arrives (both directions stay streaming).
        let (parts, body) = req.into_parts();
        let head = Request::from_parts(parts, ());
        let st2 = st.clone();
        let uri2 = uri.clone();
        let collected = Arc::new(Mutex::new(Vec::new()));
        let c2 = collected.clone();
        let mapped = body
            .map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    c2.lock().unwrap().extend_from_slice(d);
                }
                f
            })
            .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) });
        let recorder = RecordOnDrop {
            st: st2,
            head: Some(head),
            peer,
            uri: uri2,
            body: collected,
        };
        let body = Recording {
            inner: mapped.boxed(),
            _rec: recorder,
        };
        return Ok(Response::new(body.boxed()));
    }

    let query_delay = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("delay_ms=")))
        .and_then(|v| v.parse::<u64>().ok());
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let head = Request::from_parts(parts, ());
    record(&st, &head, bytes, peer, &uri);
    if st.black_hole.load(Ordering::SeqCst) {
        // Never answers; the future ends when the connection is dropped.
        std::future::pending::<()>().await;
    }
    let delay = query_delay.unwrap_or_else(|| st.delay_ms.load(Ordering::SeqCst));
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        // Unknown length: chunked on HTTP/1.1.
        let chunks: Vec<Result<http_body::Frame<Bytes>, Infallible>> = (0..n)
            .step_by(8192)
            .map(|start| {
                Ok(http_body::Frame::data(Bytes::from(vec![
                    b'z';
                    (n - start)
                        .min(8192)
                ])))
            })
            .collect();
        let stream = futures_stream(chunks);
        return Ok(Response::new(stream));
    }
    let status = match scheduled_error(&st) {
        Some(s) => s,
        None => match st.status.load(Ordering::SeqCst) {
            0 => StatusCode::OK,
            s => StatusCode::from_u16(s).unwrap_or(StatusCode::OK),
        },
    };
    let res = Response::builder()
        .status(status)
        .header("connection", "x-upstream-hop")
        .header("x-upstream-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("x-upstream", "yes")
        .body(full("ok"))
        .expect("response");
    Ok(res)
}

fn record<B>(st: &UpstreamState, req: &Request<B>, body: Bytes, peer: SocketAddr, uri: &str) {
    st.received.fetch_add(1, Ordering::SeqCst);
    if !st.record.load(Ordering::Relaxed) {
        return;
    }
    st.requests.lock().unwrap().push(Recorded {
        method: req.method().clone(),
        uri: uri.to_owned(),
        version: req.version(),
        headers: req.headers().clone(),
        body,
        peer,
    });
}

struct RecordOnDrop {
    st: Arc<UpstreamState>,
    head: Option<Request<()>>,
    peer: SocketAddr,
    uri: String,
    body: Arc<Mutex<Vec<u8>>>,
}

impl Drop for RecordOnDrop {
    fn drop(&mut self) {
        if let Some(head) = self.head.take() {
            let body = Bytes::from(std::mem::take(&mut *self.body.lock().unwrap()));
            record(&self.st, &head, body, self.peer, &self.uri);
        }
    }
}

struct Recording {
    inner: TestBody,
    _rec: RecordOnDrop,
}

impl http_body::Body for Recording {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

fn futures_stream(frames: Vec<Result<http_body::Frame<Bytes>, Infallible>>) -> TestBody {
    struct Frames(std::collections::VecDeque<Result<http_body::Frame<Bytes>, Infallible>>);
    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            std::task::Poll::Ready(self.0.pop_front())
        }
    }
    Frames(frames.into())
        .map_err(|never| -> Box<dyn std::error::Error + Send + Sync> { match never {} })
        .boxed()
}

/// A full body.
pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into())
        .map_err(|never| -> Box<dyn std::error::Error + Send + Sync> { match never {} })
        .boxed()
}

/// An empty body.
pub fn empty() -> TestBody {
    Empty::new()
        .map_err(|never| -> Box<dyn std::error::Error + Send + Sync> { match never {} })
        .boxed()
}

/// A body of `chunks`, sent without a length (chunked on HTTP/1.1).
pub fn chunked(chunks: Vec<Bytes>) -> TestBody {
    futures_stream(
        chunks
            .into_iter()
            .map(|c| Ok(http_body::Frame::data(c)))
            .collect(),
    )
}

// === Client ===

/// A collected response.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Version.
    pub version: Version,
}

impl Reply {
    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The body as JSON.
    ///
    /// # Panics
    ///
    /// When it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP client (keep-alive pooled).
#[derive(Clone, Debug)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<HttpConnector, TestBody>,
}

impl Client {
    /// A client connecting from 127.0.0.1.
    pub fn new() -> Client {
        Self::build(None, false)
    }

    /// A client whose connections come from `source` (any address in 127.0.0.0/8).
    pub fn from_ip(source: &str) -> Client {
        Self::build(Some(source.parse().expect("source ip")), false)
    }

    /// An h2c (HTTP/2 prior knowledge) client.
    pub fn h2c() -> Client {
        Self::build(None, true)
    }

    fn build(source: Option<IpAddr>, h2: bool) -> Client {
        let mut conn = HttpConnector::new();
        conn.set_local_address(source);
        conn.set_nodelay(true);
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .build(conn);
        Client { inner }
    }

    /// Sends `req` and collects the response.
    ///
    /// # Panics
    ///
    /// When the request fails at the transport level.
    pub async fn send(&self, req: Request<TestBody>) -> Reply {
        self.try_send(req).await.expect("request failed")
    }

    /// Sends `req` and collects the response, or the transport error.
    pub async fn try_send(&self, req: Request<TestBody>) -> Result<Reply, String> {
        let res = self
            .inner
            .request(req)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = res.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("{e:?}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
            version: parts.version,
        })
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Reply {
        self.send(Request::get(url).body(empty()).expect("request"))
            .await
    }

    /// `GET url` with headers.
    pub async fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> Reply {
        let mut b = Request::get(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(empty()).expect("request")).await
    }

    /// A request with a method, headers and a body.
    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: TestBody,
    ) -> Reply {
        let mut b = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(body).expect("request")).await
    }
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

/// Sends raw bytes on a fresh connection and reads until the server closes it or `timeout`
/// passes; returns what was read.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// How many TCP sockets on this machine listen on `addr` (Linux: `/proc/net/tcp` and
/// `/proc/net/tcp6`; 0 elsewhere). With `SO_REUSEPORT` several sockets can share one address.
pub fn listening_sockets(addr: SocketAddr) -> usize {
    let (file, local) = match addr {
        SocketAddr::V4(a) => (
            "/proc/net/tcp",
            // The kernel prints the address as a native-endian u32; on little-endian hosts
            // 127.0.0.1 reads 0100007F.
            format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(a.ip().octets()),
                a.port()
            ),
        ),
        SocketAddr::V6(a) => {
            let hex: String = a
                .ip()
                .octets()
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
                .collect();
            ("/proc/net/tcp6", format!("{hex}:{:04X}", a.port()))
        }
    };
    let Ok(table) = std::fs::read_to_string(file) else {
        return 0;
    };
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let mut cols = l.split_whitespace().skip(1);
            let (Some(l_addr), _, Some(state)) = (cols.next(), cols.next(), cols.next()) else {
                return false;
            };
            l_addr == local && state == LISTEN
        })
        .count()
}

/// A metric's value from Prometheus text (`name{labels}` exactly as printed), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}
