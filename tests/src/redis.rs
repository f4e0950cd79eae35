//! A real `redis-server` for the fleet tests, on `127.0.0.1` and a free port.
//!
//! [`RedisServer::start`] installs the Debian `redis-server` package when the binary is
//! missing (as root, with a `/usr/sbin/policy-rc.d` that exits 101 so the packaged service
//! never starts; removed afterwards), runs `redis-server --bind 127.0.0.1 --port <free>
//! --save '' --appendonly no --enable-debug-command local` as a child, and waits for
//! `PING`. Faults: [`RedisServer::kill`] (SIGKILL), [`RedisServer::stop`] /
//! [`RedisServer::cont`] (SIGSTOP / SIGCONT), [`RedisServer::restart`] (same port, empty).
//! The child is killed by PID on drop. [`RedisCluster::start`] runs `n` such servers with
//! `--cluster-enabled yes` and joins them into a Redis Cluster (`redis-cli --cluster create`,
//! no replicas). The fleet scenarios' shared pieces (a gateway config on Redis, one client
//! spread over every gateway, waiting for the fleet to form) are here too.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::DEADLINE;

/// A running `redis-server` child.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    /// Extra `redis-server` arguments (cluster mode).
    extra: Vec<String>,
}

/// Makes sure `redis-server` and `redis-cli` exist, installing the Debian package if not
/// (see [`crate::ensure_package`]).
///
/// # Panics
///
/// When the install fails (not root, no package index).
pub fn ensure_installed() {
    crate::ensure_package("redis-server", &["redis-server", "redis-cli"]);
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl RedisServer {
    /// Starts a fresh server on a free port and waits for `PING`.
    ///
    /// # Panics
    ///
    /// When it cannot be installed or does not answer within [`DEADLINE`].
    pub fn start() -> RedisServer {
        ensure_installed();
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            extra: Vec::new(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "local",
                "--protected-mode",
                "no",
            ])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let start = Instant::now();
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(
                start.elapsed() < DEADLINE,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's PID (0 when killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Runs `redis-cli -p <port> <args>` and returns its stdout (empty on failure).
    pub fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        if self.pid() != 0 {
            let _ = Command::new("kill")
                .arg(format!("-{name}"))
                .arg(self.pid().to_string())
                .status();
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the server hangs (connections stay open, nothing answers).
    pub fn stop(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`RedisServer::stop`].
    pub fn cont(&self) {
        self.signal("CONT");
    }

    /// Kills the server (if running) and starts an empty one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A stopped process would ignore nothing but SIGKILL anyway; wake it for tidiness.
        self.cont();
        self.kill();
    }
}

// === cluster ===

/// A Redis Cluster of `redis-server` children on 127.0.0.1 (masters only), each killed by
/// PID on drop.
pub struct RedisCluster {
    /// The nodes (masters), in creation order.
    pub nodes: Vec<RedisServer>,
    /// Holds the nodes' `nodes-<port>.conf` files.
    _dir: tempfile::TempDir,
}

/// A free port below 55535 whose cluster bus port (+ 10000) is free too.
fn free_cluster_port() -> u16 {
    let start = Instant::now();
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = l.local_addr().expect("local addr").port();
        if port < 55535 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
        assert!(start.elapsed() < DEADLINE, "no free cluster port pair");
    }
}

impl RedisCluster {
    /// Starts `n` (at least 3) cluster-enabled servers, creates the cluster over them (slots
    /// spread evenly, no replicas) and waits until every node says `cluster_state:ok`.
    ///
    /// # Panics
    ///
    /// When a node cannot start, the cluster cannot be created, or it is not ok within
    /// [`DEADLINE`].
    pub fn start(n: usize) -> RedisCluster {
        assert!(
            n >= 3,
            "redis-cli --cluster create needs at least 3 masters"
        );
        ensure_installed();
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut ports: Vec<u16> = Vec::with_capacity(n);
        while ports.len() < n {
            let p = free_cluster_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let nodes: Vec<RedisServer> = ports
            .iter()
            .map(|&port| {
                let conf = dir.path().join(format!("nodes-{port}.conf"));
                let mut server = RedisServer {
                    port,
                    child: None,
                    extra: vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        conf.to_string_lossy().into_owned(),
                        "--dir".into(),
                        dir.path().to_string_lossy().into_owned(),
                    ],
                };
                server.spawn();
                server
            })
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes, _dir: dir };
        let start = Instant::now();
        while !cluster
            .nodes
            .iter()
            .all(|node| node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(start.elapsed() < DEADLINE, "the cluster is not ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// The seed node urls (`redis://127.0.0.1:<port>` each).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The seed nodes as a YAML flow list, for `state.redis.cluster`.
    pub fn yaml_list(&self) -> String {
        let urls: Vec<String> = self.urls().iter().map(|u| format!("'{u}'")).collect();
        format!("[{}]", urls.join(", "))
    }

    /// Keys held by each node (`DBSIZE`), in node order.
    pub fn dbsizes(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| n.cli(&["DBSIZE"]).trim().parse().unwrap_or(0))
            .collect()
    }

    /// Runs `redis-cli -c` (following redirects) against the first node.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        self.nodes[0].cli(&all)
    }
}

// === fleet scenarios ===

/// A gateway config for the fleet scenarios: one upstream, clients keyed by `x-api-key`, one
/// plan of `quota`, state on Redis at `redis` with `mode` and `on_failure`.
pub fn fleet_config(
    upstream: &crate::Upstream,
    redis: &str,
    mode: &str,
    on_failure: &str,
    quota: &str,
) -> String {
    fleet_config_on(
        upstream,
        &format!("url: '{redis}'"),
        mode,
        on_failure,
        quota,
    )
}

/// [`fleet_config`] with the Redis target given as YAML: `url: '…'`, or
/// `cluster: [...]` ([`RedisCluster::yaml_list`]).
pub fn fleet_config_on(
    upstream: &crate::Upstream,
    target: &str,
    mode: &str,
    on_failure: &str,
    quota: &str,
) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
log: {{decisions: stdout, sample_admits: 0}}
policy:
  version: 1
  identify: {{client_key: [{{header: x-api-key}}]}}
  plans: {{free: {{bandwidths: ['{quota}']}}}}
  default_plan: free
  state:
    backend: redis
    redis: {{{target}, mode: {mode}, sync_interval: 20ms, timeout: 25ms, on_failure: {on_failure}}}
",
        upstream.addr
    )
}

/// One client (API key `spread`) sending `rate_each` requests/s to every gateway for `secs`.
pub fn spread(
    gateways: &[crate::Gateway],
    rate_each: u32,
    secs: u64,
) -> Vec<crate::load::LoadSpec> {
    gateways
        .iter()
        .map(|g| {
            crate::load::LoadSpec::get_with(
                &g.url("/q"),
                &[("x-api-key", "spread")],
                rate_each,
                Duration::from_secs(secs),
            )
        })
        .collect()
}

/// Requests admitted (200) over all reports.
pub fn admitted(reports: &[crate::load::LoadReport]) -> u64 {
    reports.iter().map(|r| r.count(200)).sum()
}

/// Waits until every gateway has registered itself and sees the others.
pub async fn wait_fleet(gateways: &[crate::Gateway]) {
    let n = gateways.len() as f64;
    for g in gateways {
        let ok = crate::eventually(Duration::from_secs(5), || async {
            let m = crate::Client::new()
                .get(&g.admin_url("/metrics"))
                .await
                .text();
            crate::metric(&m, "fairgate_fleet_gateways") == Some(n)
        })
        .await;
        assert!(ok, "gateway does not see {n} gateways:\n{}", g.stderr());
    }
}
