//! Nightly-tier scenarios (security): run by `scripts/nightly.sh`, not by `.ci/run`.
//!
//! P1 differential: the smuggling corpus (`fairgate_tests::raw::corpus`) through nginx-light
//! and haproxy (whichever are installed; `scripts/nightly.sh` installs both), each run with its
//! own config on loopback in front of the raw recording upstream and killed by PID. A case
//! that every available reference proxy refuses but the gateway forwards is a failure. The
//! verdict table is printed for `docs/reliability/security.md`.
//!
//! S1, realistic variant: nginx-light in front of the gateway as the trusted proxy
//! (`proxy_add_x_forwarded_for`, connecting from 127.0.0.2); a client on 127.0.0.3 spoofing
//! `X-Forwarded-For` is still keyed by its own address, and rotating the header buys nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fairgate_tests::raw::corpus::{Want, BENIGN, CORPUS};
use fairgate_tests::raw::{Ending, RawConn, RawMode, RawUpstream};
use fairgate_tests::{Client, Gateway, Upstream};

/// A reference proxy process, killed by PID on drop.
struct Reference {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn wait_listening(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn start_nginx(dir: &Path, upstream: SocketAddr) -> Option<Reference> {
    start_nginx_with(dir, upstream, "proxy_set_header Connection \"\";")
}

/// nginx proxying to `upstream` with `directives` added to its location.
fn start_nginx_with(dir: &Path, upstream: SocketAddr, directives: &str) -> Option<Reference> {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|b| Path::new(b).exists())?;
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream raw {{ server {upstream}; keepalive 4; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://raw;
      proxy_http_version 1.1;
      {directives}
    }}
  }}
}}
"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let r = Reference {
        name: "nginx",
        child,
        addr,
    };
    wait_listening(addr).then_some(r)
}

fn start_haproxy(dir: &Path, upstream: SocketAddr) -> Option<Reference> {
    let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|b| Path::new(b).exists())?;
    let port = free_port();
    let conf = format!(
        "global
  maxconn 512
defaults
  mode http
  timeout connect 2s
  timeout client 5s
  timeout server 5s
frontend fe
  bind 127.0.0.1:{port}
  default_backend raw
backend raw
  server raw {upstream}
"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf).expect("write haproxy.cfg");
    let child = Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let r = Reference {
        name: "haproxy",
        child,
        addr,
    };
    wait_listening(addr).then_some(r)
}

/// Runs case `n` through `addr`; true when the case's own request reached `upstream`
/// (forwarded), false when it was refused.
async fn forwarded(addr: SocketAddr, up: &RawUpstream, n: usize, bytes: &str) -> (bool, String) {
    let mut c = RawConn::connect(addr).await;
    let payload = format!("{bytes}{BENIGN}").replace("{N}", &n.to_string());
    c.send(payload.as_bytes()).await;
    let mut reply = c.read_responses(2, Duration::from_secs(3)).await;
    if reply.ending == Ending::Open {
        let more = c.read_to_end(Duration::from_millis(300)).await;
        reply.bytes.extend_from_slice(&more.bytes);
    }
    let statuses: Vec<u16> = reply.responses().iter().map(|r| r.status).collect();
    let mine = format!("/c{n}");
    let reached = up
        .requests()
        .iter()
        .any(|r| r.target == mine || r.target.ends_with(&mine));
    (reached, format!("{statuses:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p1_differential_against_nginx_and_haproxy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut refs = Vec::new();
    for start in [start_nginx, start_haproxy] {
        let up = RawUpstream::start(RawMode::Ok).await;
        if let Some(r) = start(dir.path(), up.addr) {
            refs.push((r, up));
        }
    }
    assert!(
        !refs.is_empty(),
        "neither nginx nor haproxy is installed (scripts/nightly.sh installs them)"
    );
    let gw_up = RawUpstream::start(RawMode::Ok).await;
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nroutes: [{{upstream: raw}}]\nupstreams: {{raw: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
        gw_up.addr
    ));

    let mut table = String::from("| case | want |");
    for (r, _) in &refs {
        table.push_str(&format!(" {} |", r.name));
    }
    table.push_str(" fairgate |\n");
    let mut failures = Vec::new();
    // One case at a time: the references' upstream records are attributed by target.
    for (n, (name, want, bytes)) in CORPUS.iter().enumerate() {
        let mut row = format!("| {name} | {want:?} |");
        let mut all_refuse = true;
        for (r, up) in &refs {
            let (reached, statuses) = forwarded(r.addr, up, n, bytes).await;
            all_refuse &= !reached;
            row.push_str(&format!(
                " {} {statuses} |",
                if reached { "forwarded" } else { "refused" }
            ));
        }
        let (reached, statuses) = forwarded(gw.data, &gw_up, n, bytes).await;
        row.push_str(&format!(
            " {} {statuses} |",
            if reached { "forwarded" } else { "refused" }
        ));
        table.push_str(&row);
        table.push('\n');
        if all_refuse && reached {
            failures.push(*name);
        }
        if *want != Want::Forward && reached {
            failures.push(*name);
        }
    }
    let used: Vec<&str> = refs.iter().map(|(r, _)| r.name).collect();
    eprintln!("references: {used:?}\n{table}");
    assert!(
        failures.is_empty(),
        "forwarded although refused by every reference or ambiguous: {failures:?}"
    );
}

/// Remaining requests of `key`'s first bandwidth, from the admin API.
async fn remaining(c: &Client, gw: &Gateway, key: &str) -> u64 {
    let r = c.get(&gw.admin_url(&format!("/clients/{key}"))).await;
    assert_eq!(r.status, 200, "{key}: {}", r.text());
    r.json()["bandwidths"][0]["remaining"]
        .as_u64()
        .unwrap_or_else(|| panic!("{key}: {}", r.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_nginx_in_front_as_the_trusted_proxy() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams: {{u: {{targets: ['{}']}}}}
log: {{decisions: off}}
policy:
  version: 1
  identify: {{trusted_proxies: [127.0.0.2/32]}}
  plans: {{free: {{bandwidths: ['10/h burst 10']}}}}
  default_plan: free
",
        up.addr
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = start_nginx_with(
        dir.path(),
        gw.data,
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      proxy_bind 127.0.0.2;",
    )
    .expect("nginx is not installed (scripts/nightly.sh installs nginx-light)");
    let admin = Client::new();
    let client = Client::from_ip("127.0.0.3");
    let url = format!("http://{}/s1", nginx.addr);

    let before = remaining(&admin, &gw, "127.0.0.3").await;
    let r = client
        .get_with(&url, &[("x-forwarded-for", "192.0.2.66")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(remaining(&admin, &gw, "127.0.0.3").await + 1, before);
    assert_eq!(remaining(&admin, &gw, "192.0.2.66").await, 10);
    let rec = up.requests().pop().expect("forwarded");
    assert_eq!(
        rec.headers["x-forwarded-for"], "192.0.2.66, 127.0.0.3, 127.0.0.2",
        "nginx appends the client, the gateway appends nginx"
    );

    // Rotating the spoofed header: still one bucket (9 left, then 429s).
    let mut admitted = 0;
    for i in 0..30 {
        let spoof = format!("198.51.100.{i}");
        if client
            .get_with(&url, &[("x-forwarded-for", &spoof)])
            .await
            .status
            == 200
        {
            admitted += 1;
        }
    }
    eprintln!("S1 behind nginx: 30 rotating-XFF requests, {admitted} admitted");
    assert_eq!(admitted, 9);
}
