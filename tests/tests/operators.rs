//! What the gateway tells operators, checked through the real binary: `/metrics` in the
//! format its `Content-Type` names (parsed by `promtool` and by the Prometheus Python
//! client's OpenMetrics parser), request counters whose labels partition the requests, a
//! process log without ANSI escapes off a terminal, inline-policy errors with their full
//! path, listeners that do not silently share a port (and say which one is in use), and
//! the h2c upgrade offer that is declined rather than forwarded.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use fairgate_tests::{
    ensure_package, ensure_package_for, eventually, fairgate_bin, listening_sockets, raw_exchange,
    run_fairgate, wait_child, Client, Gateway, Upstream, DEADLINE,
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Accept` of a Prometheus 2.x scrape.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// A policy whose requests end in every kind of decision: `allow` (UA `trusted`), `deny`
/// (UA `evil`), quota admits and rejections (3 requests of burst 3 per key), and a shadow
/// limit that would reject every request after the first of each key.
const POLICY: &str = "version: 1
plans:
  free: {bandwidths: ['1/h burst 3']}
default_plan: free
rules:
  - {name: trusted, when: {user_agent: {prefix: [trusted]}}, action: allow}
  - {name: no-evil, when: {user_agent: {prefix: [evil]}}, action: deny}
  - {name: would-limit, mode: shadow, action: {limit: {rate: 1/h, burst: 1}}}
";

fn gateway(up: &Upstream) -> Gateway {
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    Gateway::start_in(
        dir,
        &format!(
            "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams: {{u: {{targets: ['{}']}}}}
policy: policy.yaml
log: {{decisions: off}}
",
            up.addr
        ),
    )
}

/// Sends the mix of [`POLICY`]; returns how many requests were sent.
async fn send_mix(gw: &Gateway) -> usize {
    let c = Client::new();
    let mut sent = 0;
    for (ua, n) in [("trusted", 4), ("evil", 2), ("plain", 5)] {
        for _ in 0..n {
            let r = c.get_with(&gw.url("/mix"), &[("user-agent", ua)]).await;
            assert!(matches!(r.status.as_u16(), 200 | 403 | 429), "{}", r.status);
            sent += 1;
        }
    }
    sent
}

/// `GET /metrics` with `accept` (none: no header); returns the content type and body.
async fn scrape(gw: &Gateway, accept: Option<&str>) -> (String, String) {
    let c = Client::new();
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
    let r = c.get_with(&gw.admin_url("/metrics"), &headers).await;
    assert_eq!(r.status, 200);
    (r.header("content-type").to_owned(), r.text())
}

// === real parsers ===

/// One metric family as a parser read it.
#[derive(Debug)]
struct Family {
    name: String,
    kind: String,
    samples: Vec<Sample>,
}

/// One sample: its name, its labels as `k=v` joined by commas (`-` for none), its value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: String,
    value: f64,
}

/// Debian's interpreter, which sees Debian's `python3-prometheus-client` (a `python3` on the
/// `PATH` may be another one).
const PYTHON: &str = "/usr/bin/python3";

/// Parses `body` with the Prometheus Python client's parser of `format` (`openmetrics`: the
/// strict OpenMetrics 1.0 parser, `text`: the 0.0.4 one), installing the Debian package when
/// it is missing. Returns every family; panics with the parser's error.
fn python_parse(format: &str, body: &str) -> Vec<Family> {
    let import = |module: &str| {
        Command::new(PYTHON)
            .args(["-c", &format!("import {module}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let module = match format {
        "openmetrics" => "prometheus_client.openmetrics.parser",
        _ => "prometheus_client.parser",
    };
    ensure_package_for("python3-prometheus-client", || import(module));
    let script = format!(
        "import sys\nfrom {module} import text_string_to_metric_families as parse\n\
         for f in parse(sys.stdin.read()):\n\
         \x20   print('F', f.name, f.type)\n\
         \x20   for s in f.samples:\n\
         \x20       print('S', s.name, ','.join(k + '=' + v for k, v in sorted(s.labels.items())) or '-', repr(float(s.value)))\n"
    );
    let mut child = Command::new(PYTHON)
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the {format} parser refused the body: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut families: Vec<Family> = Vec::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["F", name, kind] => families.push(Family {
                name: (*name).into(),
                kind: (*kind).into(),
                samples: Vec::new(),
            }),
            ["S", name, labels, value] => families.last_mut().unwrap().samples.push(Sample {
                name: (*name).into(),
                labels: (*labels).into(),
                value: value.parse().unwrap(),
            }),
            _ => panic!("unexpected parser output {line:?}"),
        }
    }
    families
}

fn family<'a>(families: &'a [Family], name: &str) -> &'a Family {
    families
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no family {name} in {families:?}"))
}

// === /metrics ===

/// Without `Accept` (or with `*/*`, or the 0.0.4 text only) `/metrics` is Prometheus text
/// 0.0.4 that `promtool check metrics` accepts with no problem at all: every counter typed
/// under its `_total` sample name, no `# EOF`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_text_format_passes_promtool() {
    ensure_package("prometheus", &["promtool"]);
    let up = Upstream::start_counting().await;
    let gw = gateway(&up);
    send_mix(&gw).await;
    for accept in [
        None,
        Some("*/*"),
        Some("text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
    ] {
        let (content_type, body) = scrape(&gw, accept).await;
        assert_eq!(content_type, TEXT_004, "Accept {accept:?}");
        assert!(!body.contains("# EOF"), "{body}");
        assert!(
            body.contains("# TYPE fairgate_requests_total counter\n"),
            "{body}"
        );
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool");
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = promtool.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool: {:?}\n{said}\n{body}",
            out.status
        );
        // The 0.0.4 parser of the Prometheus client types the counter too.
        let families = python_parse("text", &body);
        assert_eq!(family(&families, "fairgate_requests").kind, "counter");
        assert_eq!(
            family(&families, "fairgate_upstream_duration_seconds").kind,
            "histogram"
        );
    }
}

/// With Prometheus' `Accept`, `/metrics` is OpenMetrics 1.0.0 under its own content type,
/// and the strict OpenMetrics parser reads it with its types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_openmetrics_when_the_scraper_prefers_it() {
    let up = Upstream::start_counting().await;
    let gw = gateway(&up);
    send_mix(&gw).await;
    for accept in [
        PROMETHEUS_ACCEPT,
        "application/openmetrics-text; version=1.0.0",
        "text/plain;version=0.0.4;q=0.5,application/openmetrics-text;version=1.0.0;q=0.9",
    ] {
        let (content_type, body) = scrape(&gw, Some(accept)).await;
        assert_eq!(content_type, OPENMETRICS, "Accept {accept}");
        assert!(body.ends_with("# EOF\n"));
        let families = python_parse("openmetrics", &body);
        assert_eq!(family(&families, "fairgate_requests").kind, "counter");
        assert_eq!(family(&families, "fairgate_in_flight").kind, "gauge");
        assert_eq!(
            family(&families, "fairgate_upstream_duration_seconds").kind,
            "histogram"
        );
    }
}

/// `fairgate_requests_total` counts each request once, by the decision that settled it: its
/// samples add up to the requests sent (a shadow rule's hit is counted apart, in
/// `fairgate_shadow_rejects_total`), in both formats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_counter_labels_partition_the_requests() {
    let up = Upstream::start_counting().await;
    let gw = gateway(&up);
    let sent = send_mix(&gw).await;
    for format in ["openmetrics", "text"] {
        let accept = match format {
            "openmetrics" => PROMETHEUS_ACCEPT,
            _ => "text/plain;version=0.0.4",
        };
        let (_, body) = scrape(&gw, Some(accept)).await;
        let families = python_parse(format, &body);
        let requests = family(&families, "fairgate_requests");
        let by_labels: BTreeMap<&str, f64> = requests
            .samples
            .iter()
            .filter(|s| s.name == "fairgate_requests_total")
            .map(|s| (s.labels.as_str(), s.value))
            .collect();
        let total: f64 = by_labels.values().sum();
        assert_eq!(total, sent as f64, "{format}: {by_labels:#?}");
        assert!(
            by_labels.keys().all(|l| !l.contains("shadow_reject")),
            "{by_labels:#?}"
        );
        // The 4 allowed requests are counted as settled by their rule, not as plan admits
        // (no plan was involved); the 5 plain ones as quota admits and rejections of `free`.
        let allowed: f64 = by_labels
            .iter()
            .filter(|(l, _)| l.contains("rule=trusted"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(allowed, 4.0, "{format}: {by_labels:#?}");
        for (labels, _) in by_labels.iter().filter(|(l, _)| l.contains("rule=trusted")) {
            assert!(
                labels.contains("stage=rule")
                    && labels.contains("decision=admit")
                    && !labels.contains("plan=free"),
                "{format}: an allowed request labelled {labels}"
            );
        }
        let free: f64 = by_labels
            .iter()
            .filter(|(l, _)| l.contains("plan=free"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(free, 5.0, "{format}: {by_labels:#?}");
        // The shadow rule would have rejected all but the first request of each of the two
        // keys it saw under its limit (the allowed and denied ones stop before it).
        let shadow = family(&families, "fairgate_shadow_rejects");
        let hits: f64 = shadow
            .samples
            .iter()
            .filter(|s| s.name == "fairgate_shadow_rejects_total" && s.labels == "rule=would-limit")
            .map(|s| s.value)
            .sum();
        assert!(hits >= 1.0, "{shadow:?}");
    }
}

// === process log ===

/// The process log written to a file carries no ANSI escape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_log_in_a_file_has_no_ansi_escapes() {
    let up = Upstream::start_counting().await;
    let dir = Gateway::tempdir();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
            up.addr
        ),
    )
    .unwrap();
    let log_path = dir.path().join("fairgate.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(fairgate_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn fairgate");
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let started = eventually(DEADLINE, || async { read().contains("fairgate started") }).await;
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let exited = eventually(DEADLINE, || {
        let done = child.try_wait().ok().flatten().is_some();
        async move { done }
    })
    .await;
    if !exited {
        let _ = child.kill();
    }
    let _ = child.wait();
    let text = read();
    assert!(started, "no startup line in the log:\n{text}");
    assert!(text.contains("shutting down"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escapes in the log file:\n{}",
        text.replace('\u{1b}', "<ESC>")
    );
}

// === inline policy errors ===

const BAD_INLINE: &str = "listen: 127.0.0.1:0
routes: [{upstream: u}]
upstreams: {u: {targets: ['127.0.0.1:9']}}
policy:
  version: 1
  default_plan: nope
  plans:
    free: {bandwidths: ['10/s burst 5']}
  rules:
    - {name: x, when: {path: {prefix: [/a]}}, action: bogus}
";

/// Errors in an inline policy name their full path in the gateway file (`policy.…`), from
/// `fairgate check --gateway` and from `fairgate run`.
#[test]
fn inline_policy_errors_carry_the_full_path() {
    let dir = Gateway::tempdir();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, BAD_INLINE).unwrap();
    let file = file.to_str().unwrap();
    for args in [
        vec!["check", "--gateway", file],
        vec!["run", "--config", file],
    ] {
        let (code, _, stderr) = run_fairgate(&args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "{file}:6:17: policy.default_plan: unknown plan `nope`"
            )),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "{file}:10:55: policy.rules[0].action: unknown value"
            )),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 2, "{args:?}: {stderr}");
    }
}

// === listeners ===

/// Runs `fairgate run --config FILE` with `config`, expecting it to exit within the
/// deadline; returns its exit code and stderr. A process still running then is killed and
/// the test fails.
fn run_expecting_exit(config: &str) -> (i32, String) {
    let dir = Gateway::tempdir();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, config).unwrap();
    let err_path = dir.path().join("stderr");
    let child = Command::new(fairgate_bin())
        .args(["run", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn fairgate");
    let status = wait_child(child, DEADLINE);
    let stderr = read_file(&err_path);
    let Some(status) = status else {
        panic!("the second gateway kept running on an address in use:\n{stderr}");
    };
    (status.code().unwrap_or(-1), stderr)
}

fn read_file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn second_config(up: &Upstream, listen: SocketAddr, admin: &str) -> String {
    format!(
        "listen: {listen}\nadmin: {{listen: '{admin}'}}\nruntime: multi_thread\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
        up.addr
    )
}

/// A second gateway started by mistake on a port in use fails, saying which listener and
/// address; with `--reuse-port` it joins the first (an upgrade) and both serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_a_port_in_use_fails_unless_asked_to_share() {
    let up = Upstream::start_counting().await;
    let first = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0}}\nruntime: multi_thread\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
        up.addr
    ));
    let data = first.data;
    let admin = first.admin.unwrap();
    assert_eq!(listening_sockets(data), 1);

    // The data port in use.
    let cfg = second_config(&up, data, "127.0.0.1:0");
    let (code, stderr) = tokio::task::spawn_blocking(move || run_expecting_exit(&cfg))
        .await
        .unwrap();
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot listen on {data} (the data listener): Address in use"
        )) || stderr.contains(&format!(
            "cannot listen on {data} (the data listener): Address already in use"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("--reuse-port"), "{stderr}");

    // The admin port in use.
    let cfg = second_config(&up, "127.0.0.1:0".parse().unwrap(), &admin.to_string());
    let (code, stderr) = tokio::task::spawn_blocking(move || run_expecting_exit(&cfg))
        .await
        .unwrap();
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot listen on {admin} (the admin listener): Address"
        )),
        "{stderr}"
    );
    assert_eq!(listening_sockets(data), 1, "a failed start left a socket");
    assert_eq!(Client::new().get(&first.url("/")).await.status, 200);

    // Asked to share: it joins, says so, and both processes serve.
    let cfg = second_config(&up, data, &admin.to_string());
    let second = tokio::task::spawn_blocking(move || {
        Gateway::start_with_args(Gateway::tempdir(), &cfg, &["--reuse-port"])
    })
    .await
    .unwrap();
    assert_eq!(second.data, data);
    assert_eq!(listening_sockets(data), 2);
    assert!(
        second.stderr().contains("--reuse-port: joining"),
        "{}",
        second.stderr()
    );
    drop(first);
    assert!(
        eventually(DEADLINE, || async { listening_sockets(data) == 1 }).await,
        "the first gateway's socket stayed"
    );
    assert_eq!(Client::new().get(&second.url("/")).await.status, 200);
}

// === h2c ===

/// An HTTP/1.1 request offering `Upgrade: h2c` is answered in HTTP/1.1, and the upstream sees
/// neither the offer (`Upgrade`, `HTTP2-Settings`) nor its `Connection` tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_offer_is_declined_and_not_forwarded() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
        up.addr
    ));
    let reply = raw_exchange(
        gw.data,
        b"GET /h2c HTTP/1.1\r\nHost: example.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nX-Kept: yes\r\n\r\n",
        DEADLINE,
    )
    .await;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut res = httparse::Response::new(&mut headers);
    let parsed = res
        .parse(reply.as_bytes())
        .expect("a valid HTTP/1.1 response");
    assert!(parsed.is_complete(), "{reply}");
    assert_eq!(res.version, Some(1), "{reply}");
    assert_eq!(res.code, Some(200), "{reply}");
    assert!(
        !res.headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade")),
        "{reply}"
    );

    let got = up.requests();
    assert_eq!(got.len(), 1);
    let h = &got[0].headers;
    assert!(h.get("upgrade").is_none(), "{h:?}");
    assert!(h.get("http2-settings").is_none(), "{h:?}");
    for v in h.get_all("connection") {
        let v = v.to_str().unwrap().to_ascii_lowercase();
        assert!(
            !v.contains("upgrade") && !v.contains("http2-settings"),
            "{h:?}"
        );
    }
    assert_eq!(h.get("x-kept").unwrap(), "yes");
}

// === docs match the code ===

/// Every metric family the gateway exposes has its row in docs/gateway.md's metrics table,
/// so the reference cannot fall behind the code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exposed_metric_is_documented() {
    let up = Upstream::start_counting().await;
    let gw = gateway(&up);
    send_mix(&gw).await;
    let (_, body) = scrape(&gw, Some("text/plain;version=0.0.4")).await;
    let exposed: std::collections::BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(exposed.len() > 10, "{body}");
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/gateway.md"),
    )
    .unwrap();
    let table = &docs[docs.find("## Metrics").expect("a Metrics section")..];
    let table = &table[..table[3..].find("\n## ").map_or(table.len(), |i| i + 3)];
    let documented: std::collections::BTreeSet<String> = table
        .lines()
        .filter(|l| l.starts_with("| `fairgate_"))
        .flat_map(|l| {
            let first = l.split(" | ").next().unwrap_or_default();
            first
                .split('`')
                .filter(|w| w.starts_with("fairgate_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    let undocumented: Vec<_> = exposed.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "exposed but not in docs/gateway.md's metrics table: {undocumented:?}"
    );
}
