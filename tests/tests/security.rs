//! Protocol and security scenarios through the real binary (SCENARIOS.md §2.5, §2.6, F3):
//! P2 upgrade smuggling and CONNECT, P3 oversized heads and keys, F3 an upstream dying
//! mid-response, S1 the forwarded-header trust boundary, S2 IPv6 rotation, S5 ReDoS-shaped
//! rules, S6 admin-plane abuse.
//!
//! Scenarios that push load hold `SERIAL`, so two of them never run at once on the 2-core box.
//! Every run is bounded in requests (≤ 5k) and time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fairgate_tests::raw::{exchange, Ending, RawConn, RawMode, RawUpstream};
use fairgate_tests::{
    empty, eventually, metric, run_fairgate, Client, Gateway, Upstream, DEADLINE,
};
use http::Request;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOKEN: &str = "tok-S3CR3T-4242-never-logged";

fn config(upstream: std::net::SocketAddr, extra: &str, policy: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{upstream}']}}
log: {{decisions: off}}
{extra}
policy:
{policy}"
    )
}

/// Sends `n` requests built by `make` over `concurrency` tasks; returns the status counts
/// (index = status code) and the elapsed time.
async fn blast<F>(
    client: &Client,
    n: usize,
    concurrency: usize,
    make: F,
) -> (Arc<Vec<AtomicUsize>>, Duration)
where
    F: Fn(usize) -> Request<fairgate_tests::TestBody> + Send + Sync + 'static,
{
    let counts: Arc<Vec<AtomicUsize>> = Arc::new((0..600).map(|_| AtomicUsize::new(0)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let make = Arc::new(make);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, counts, next, make) =
            (client.clone(), counts.clone(), next.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    break;
                }
                let status = match client.try_send(make(i)).await {
                    Ok(r) => r.status.as_u16() as usize,
                    Err(_) => 599,
                };
                counts[status.min(599)].fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for t in tasks {
        t.await.expect("load task");
    }
    (counts, started.elapsed())
}

// === P2 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2_upgrade_without_101_is_no_tunnel_and_connect_is_refused() {
    let up = RawUpstream::start(RawMode::Ok).await;
    let gw = Gateway::start(&config(up.addr, "", "  version: 1\n"));

    // (a) An upgrade request answered 200 (the raw upstream never says 101), with a request
    // pipelined behind it and then bytes that are no HTTP at all.
    let mut c = RawConn::connect(gw.data).await;
    c.send(b"GET /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let reply = c.read_responses(2, Duration::from_secs(5)).await;
    let statuses: Vec<u16> = reply.responses().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200], "{}", reply.text());
    c.send(b"\x00\x01RAW-TUNNEL-BYTES\r\n\r\n").await;
    let rest = c.read_to_end(Duration::from_secs(5)).await;
    // Junk after a non-101 answer is parsed as HTTP (and refused), never passed through.
    assert_ne!(rest.ending, Ending::Open, "{}", rest.text());
    let targets: Vec<String> = up.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(targets, ["/up", "/second"]);
    let seen = up.all_bytes();
    assert!(
        !seen.windows(16).any(|w| w == b"RAW-TUNNEL-BYTES"),
        "tunnel bytes reached the upstream"
    );
    assert!(up.parse_errors().is_empty(), "{:?}", up.parse_errors());

    // (b) CONNECT is not configured: 405, nothing forwarded.
    let r = exchange(
        gw.data,
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(r.responses()[0].status, 405, "{}", r.text());
    assert_eq!(up.heads(), 2);
}

// === P3 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p3_oversized_heads_are_431_or_414_and_long_keys_still_count() {
    let up = RawUpstream::start(RawMode::Ok).await;
    let gw = Gateway::start(&config(
        up.addr,
        "limits: {max_header_bytes: 32KiB, max_headers: 100}",
        "  version: 1
  identify: {client_key: [{header: x-api-key}], max_key_length: 256}
  plans: {free: {bandwidths: ['3/h burst 3']}}
  default_plan: free
",
    ));
    let t = Duration::from_secs(5);
    let status = |r: &fairgate_tests::raw::RawReply| r.responses().first().map_or(0, |r| r.status);

    // One 64 KiB header.
    let big = "a".repeat(64 * 1024);
    let r = exchange(
        gw.data,
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        t,
    )
    .await;
    assert_eq!(status(&r), 431);
    assert_ne!(r.ending, Ending::Open);
    // 101 headers (Host + 100) → 431; exactly 100 is served.
    let lines = |k: usize| (0..k).map(|i| format!("X-H{i}: v\r\n")).collect::<String>();
    let r = exchange(
        gw.data,
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\n{}Connection: close\r\n\r\n",
            lines(99)
        )
        .as_bytes(),
        t,
    )
    .await;
    assert_eq!(status(&r), 431, "Connection is the 101st header");
    let r = exchange(
        gw.data,
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\n{}Connection: close\r\n\r\n",
            lines(98)
        )
        .as_bytes(),
        t,
    )
    .await;
    assert_eq!(status(&r), 200, "100 headers are allowed");
    // A 100 KiB target is over the head limit: hyper answers 431 before anything parses it.
    // A target that fits the head limit but is over 8 KiB is 414.
    let long = "a".repeat(100 * 1024);
    let r = exchange(
        gw.data,
        format!("GET /{long} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        t,
    )
    .await;
    assert_eq!(status(&r), 431);
    let long = "a".repeat(16 * 1024);
    let r = exchange(
        gw.data,
        format!("GET /{long} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        t,
    )
    .await;
    assert_eq!(status(&r), 414);
    assert_eq!(up.heads(), 1, "only the 100-header request was forwarded");

    // A 20 KiB limiter key (over max_key_length 256) is hashed, and still counted: 3 of 5
    // pass; a key differing in its last byte is another client.
    let key_a = format!("{}A", "k".repeat(20 * 1024));
    let key_b = format!("{}B", "k".repeat(20 * 1024));
    let c = Client::new();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            c.get_with(&gw.url("/key"), &[("x-api-key", &key_a)])
                .await
                .status
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(
        c.get_with(&gw.url("/key"), &[("x-api-key", &key_b)])
            .await
            .status,
        200
    );
    let top = c.get(&gw.admin_url("/clients/top?n=10")).await.json();
    let keys: Vec<String> = top["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| c["key"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(keys.iter().all(|k| k.len() <= 256), "{keys:?}");
    assert!(
        keys.iter().filter(|k| k.starts_with("h:")).count() >= 2,
        "{keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p3_many_connections_pushing_huge_heads_are_all_closed() {
    let _serial = SERIAL.lock().await;
    let up = RawUpstream::start(RawMode::Ok).await;
    let gw = Gateway::start(&config(
        up.addr,
        "limits: {max_header_bytes: 32KiB, max_headers: 100}",
        "  version: 1\n",
    ));
    // VmHWM: the peak resident set since the process started.
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    };
    let baseline_kib = rss(gw.pid());
    // 1,000 connections × 1 MiB of header bytes each (SCENARIOS.md P3).
    const CONNS: usize = 1000;
    let header = format!("X-Flood: {}\r\n", "f".repeat(8 * 1024 - 12));
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        let addr = gw.data;
        let header = header.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = RawConn::connect(addr).await;
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
            for _ in 0..128 {
                c.send(header.as_bytes()).await;
            }
            c.read_to_end(Duration::from_secs(10)).await.ending
        }));
    }
    let mut open = 0;
    for t in tasks {
        if t.await.expect("task") == Ending::Open {
            open += 1;
        }
    }
    let peak_kib = rss(gw.pid());
    assert_eq!(open, 0, "connections left open");
    assert_eq!(up.heads(), 0);
    let bound_kib = (CONNS as u64 * 2 * 32) + 32 * 1024;
    eprintln!("P3 flood: rss {baseline_kib} KiB → {peak_kib} KiB (bound +{bound_kib} KiB)");
    assert!(
        peak_kib <= baseline_kib + bound_kib,
        "{baseline_kib} → {peak_kib}"
    );
    // Still serving.
    assert_eq!(Client::new().get(&gw.url("/after")).await.status, 200);
}

// === F3 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f3_upstream_dying_mid_body_never_looks_complete() {
    let up = RawUpstream::start(RawMode::HalfBodyThenReset).await;
    let gw = Gateway::start(&config(up.addr, "", "  version: 1\n"));
    let c = Client::new();
    let before = c.get(&gw.admin_url("/metrics")).await.text();
    let errors = |m: &str| {
        ["connect", "timeout", "protocol", "body"]
            .iter()
            .filter_map(|k| {
                metric(
                    m,
                    &format!(r#"fairgate_upstream_errors_total{{upstream="u",kind="{k}"}}"#),
                )
            })
            .sum::<f64>()
    };

    let mut conn = RawConn::connect(gw.data).await;
    conn.send(b"GET /half HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let reply = conn.read_to_end(Duration::from_secs(5)).await;
    assert_ne!(reply.ending, Ending::Open, "{}", reply.text());
    let responses = reply.responses();
    assert!(
        !responses.iter().any(|r| r.status == 200 && r.complete),
        "a truncated body was presented as complete: {}",
        reply.text()
    );
    // The next request, on a new connection, to a healthy upstream: 200.
    up.set_mode(RawMode::Ok);
    assert_eq!(c.get(&gw.url("/next")).await.status, 200);
    // The body that broke off is counted as one upstream error (kind `body`).
    let counted = eventually(DEADLINE, || async {
        let now = c.get(&gw.admin_url("/metrics")).await.text();
        errors(&now) == errors(&before) + 1.0
    })
    .await;
    let after = c.get(&gw.admin_url("/metrics")).await.text();
    assert!(
        counted,
        "F3: upstream errors {} → {}, want +1",
        errors(&before),
        errors(&after)
    );
    eprintln!(
        "F3: client saw {:?} ({} body bytes), upstream errors {} → {}",
        reply.ending,
        responses.first().map_or(0, |r| r.body.len()),
        errors(&before),
        errors(&after)
    );
    assert!(
        gw.stderr().lines().all(|l| !l.contains("panicked")),
        "{}",
        gw.stderr()
    );
}

// === S1 ===

/// One S1 case: (client, headers, the key that must be charged, keys that must not be).
type TrustCase<'a> = (&'a Client, Vec<(&'a str, String)>, &'a str, Vec<&'a str>);

/// Remaining requests of `key`'s first bandwidth, from the admin API.
async fn remaining(c: &Client, gw: &Gateway, key: &str) -> u64 {
    let enc = key.replace('/', "%2F").replace(':', "%3A");
    let r = c.get(&gw.admin_url(&format!("/clients/{enc}"))).await;
    assert_eq!(r.status, 200, "{key}: {}", r.text());
    r.json()["bandwidths"][0]["remaining"]
        .as_u64()
        .unwrap_or_else(|| panic!("{key}: {}", r.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_forwarded_headers_are_believed_only_from_trusted_hops() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        up.addr,
        "",
        "  version: 1
  identify: {trusted_proxies: [127.0.0.2/32]}
  plans: {free: {bandwidths: ['10/h burst 10']}}
  default_plan: free
",
    ));
    let admin = Client::new();
    let trusted = Client::from_ip("127.0.0.2");
    let untrusted = Client::from_ip("127.0.0.3");
    let xff10k: String = (0..5000)
        .map(|i| format!("10.{}.{}.1", i / 250, i % 250))
        .collect::<Vec<_>>()
        .join(",")
        + ", 192.0.2.30";

    let cases: Vec<TrustCase<'_>> = vec![
        (
            &untrusted,
            vec![("x-forwarded-for", "192.0.2.10".into())],
            "127.0.0.3",
            vec!["192.0.2.10"],
        ),
        (
            &trusted,
            vec![("x-forwarded-for", "198.51.100.66, 192.0.2.11".into())],
            "192.0.2.11",
            vec!["198.51.100.66"],
        ),
        (
            &trusted,
            vec![
                ("x-forwarded-for", "192.0.2.99".into()),
                ("x-forwarded-for", "192.0.2.12".into()),
            ],
            "192.0.2.12",
            vec!["192.0.2.99"],
        ),
        (
            &trusted,
            vec![("x-forwarded-for", "192.0.2.13, not-an-ip".into())],
            "127.0.0.2",
            vec!["192.0.2.13"],
        ),
        (
            &trusted,
            vec![("x-forwarded-for", "127.0.0.2, 127.0.0.2".into())],
            "127.0.0.2",
            vec![],
        ),
        (
            &trusted,
            vec![("x-forwarded-for", "::ffff:192.0.2.14".into())],
            "192.0.2.14",
            vec![],
        ),
        (
            &trusted,
            vec![("x-forwarded-for", "192.0.2.16:5555".into())],
            "192.0.2.16",
            vec![],
        ),
        (
            &trusted,
            vec![("x-forwarded-for", "[2001:db8:7:7::1]:443".into())],
            "2001:db8:7:7::/64",
            vec![],
        ),
        (
            &trusted,
            vec![("forwarded", "for=\"[2001:db8:5:5::1]:80\"".into())],
            "2001:db8:5:5::/64",
            vec![],
        ),
        (
            &trusted,
            vec![("forwarded", "for=198.51.100.9, for=192.0.2.17".into())],
            "192.0.2.17",
            vec!["198.51.100.9"],
        ),
        (
            &untrusted,
            vec![("x-real-ip", "192.0.2.18".into())],
            "127.0.0.3",
            vec!["192.0.2.18"],
        ),
        (
            &trusted,
            vec![("x-real-ip", "192.0.2.19".into())],
            "127.0.0.2",
            vec!["192.0.2.19"],
        ),
        (
            &trusted,
            vec![("x-forwarded-for", xff10k)],
            "192.0.2.30",
            vec![],
        ),
    ];
    let mut table = String::new();
    for (i, (client, headers, charged, spared)) in cases.iter().enumerate() {
        let before = remaining(&admin, &gw, charged).await;
        let spared_before: Vec<u64> =
            futures_util::future::join_all(spared.iter().map(|k| remaining(&admin, &gw, k))).await;
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let started = Instant::now();
        let r = client.get_with(&gw.url(&format!("/s1/{i}")), &h).await;
        let took = started.elapsed();
        assert_eq!(r.status, 200, "case {i}");
        let after = remaining(&admin, &gw, charged).await;
        assert_eq!(after + 1, before, "case {i}: {charged} was not charged");
        for (k, b) in spared.iter().zip(spared_before) {
            assert_eq!(
                remaining(&admin, &gw, k).await,
                b,
                "case {i}: {k} was charged"
            );
        }
        table.push_str(&format!("case {i}: charged {charged} ({took:?})\n"));
    }
    eprintln!("{table}");

    // Outbound: the peer is appended; a spoofed chain from an untrusted peer stays as sent,
    // with the real peer last (the upstream's own trust config decides).
    let rec = up.requests();
    assert_eq!(rec[0].headers["x-forwarded-for"], "192.0.2.10, 127.0.0.3");

    // Attack (i): an untrusted client rotating XFF on every request is one bucket.
    let attacker = Client::from_ip("127.0.0.4");
    let base = gw.url("/attack");
    let (counts, _) = blast(&attacker, 100, 4, move |i| {
        Request::get(format!("{base}{i}"))
            .header("x-forwarded-for", format!("198.51.100.{}", i % 250))
            .body(empty())
            .expect("request")
    })
    .await;
    let admitted = counts[200].load(Ordering::SeqCst);
    assert_eq!(admitted + counts[429].load(Ordering::SeqCst), 100);
    eprintln!("S1 attack (i): 100 sent, {admitted} admitted (one bucket: 10 + refill)");
    assert!(admitted <= 11, "{admitted}");
}

// These requests need the full URL: `blast` takes whole requests.
fn get_to(gw: &Gateway, path: &str, xff: String) -> Request<fairgate_tests::TestBody> {
    Request::get(gw.url(path))
        .header("x-forwarded-for", xff)
        .body(empty())
        .expect("request")
}

// === S2 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_ipv6_rotation_is_bounded_by_the_prefix() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    let gw = Arc::new(Gateway::start(&config(
        up.addr,
        "",
        "  version: 1
  identify: {trusted_proxies: [127.0.0.2/32], ipv6_prefix: 64}
  plans: {free: {bandwidths: ['1/s burst 5']}}
  default_plan: free
",
    )));
    let proxy = Client::from_ip("127.0.0.2");
    let admin = Client::new();
    let keys = |m: &str| metric(m, "fairgate_tracked_keys").unwrap_or(0.0);
    let before = keys(&admin.get(&gw.admin_url("/metrics")).await.text());

    // A random address in one /64 on every request.
    let g = gw.clone();
    let (counts, t64) = blast(&proxy, 1500, 8, move |_| {
        get_to(
            &g,
            "/v6",
            format!(
                "2001:db8:1:2:{:x}:{:x}:{:x}:{:x}",
                fastrand_u16(),
                fastrand_u16(),
                fastrand_u16(),
                fastrand_u16()
            ),
        )
    })
    .await;
    let admitted64 = counts[200].load(Ordering::SeqCst);
    assert_eq!(admitted64 + counts[429].load(Ordering::SeqCst), 1500);
    let bound64 = 5.0 + 1.0 * t64.as_secs_f64() + 1.0;
    // 256 /64s inside one /56, 8 requests each.
    let g = gw.clone();
    let (counts, t56) = blast(&proxy, 2048, 8, move |i| {
        get_to(
            &g,
            "/v6",
            format!(
                "2001:db8:ff:ff{:02x}:{:x}::{:x}",
                i % 256,
                fastrand_u16(),
                fastrand_u16()
            ),
        )
    })
    .await;
    let admitted56 = counts[200].load(Ordering::SeqCst);
    assert_eq!(admitted56 + counts[429].load(Ordering::SeqCst), 2048);
    let bound56 = 256.0 * (5.0 + t56.as_secs_f64() + 1.0);
    // IPv4 keys are per address.
    for ip in ["192.0.2.50", "192.0.2.51"] {
        assert_eq!(proxy.send(get_to(&gw, "/v4", ip.into())).await.status, 200);
    }
    let m = admin.get(&gw.admin_url("/metrics")).await.text();
    let grown = keys(&m) - before;
    eprintln!(
        "S2: /64 attacker {admitted64}/1500 admitted in {t64:?} (bound {bound64:.0}); /56 attacker \
         {admitted56}/2048 in {t56:?} (bound {bound56:.0}); limiter keys +{grown}"
    );
    assert!((admitted64 as f64) <= bound64, "{admitted64} > {bound64}");
    assert!((admitted56 as f64) <= bound56, "{admitted56} > {bound56}");
    assert!(
        admitted56 >= 256 * 5,
        "every /64 has its own burst: {admitted56}"
    );
    assert!(grown <= 1.0 + 256.0 + 2.0 + 2.0, "keys grew by {grown}");
    assert!(remaining(&admin, &gw, "192.0.2.50").await == 4);
}

fn fastrand_u16() -> u16 {
    // std-only randomness for the rotation (the tests crate has no rand dependency).
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() as u16
}

// === S5 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_redos_shaped_rules_cost_linear_time() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    let alternatives: String = (0..500)
        .map(|i| format!("\"scanner-{i:03}/1.0\", "))
        .collect();
    let policy = format!(
        "  version: 1
  rules:
    - name: redos
      when: {{user_agent: {{regex: ['(a+)+$', '(a|aa)*c', '(.*a){{20}}$']}}}}
      action: deny
    - name: ua-list
      when: {{user_agent: {{exact: [{alternatives}]}}}}
      action: deny
"
    );
    let gw = Gateway::start(&config(up.addr, "", &policy));
    let c = Client::new();
    // The loader refuses what only a backtracking engine can do.
    let dir = tempfile::tempdir().expect("tempdir");
    for bad in ["'(a)\\1'", "'(?=a)b'", "'(?<!a)b'"] {
        let p = dir.path().join("bad.yaml");
        std::fs::write(&p, format!("version: 1\nrules:\n  - name: bad\n    when: {{user_agent: {{regex: [{bad}]}}}}\n    action: deny\n")).unwrap();
        let (code, _, err) = run_fairgate(&["check", p.to_str().unwrap()]);
        assert_ne!(code, 0, "{bad} was accepted");
        assert!(err.contains("regex") || err.contains("user_agent"), "{err}");
    }

    async fn median(c: &Client, gw: &Gateway, ua: &str, n: usize) -> (Duration, Duration, u16) {
        let mut times = Vec::with_capacity(n);
        let mut status = 0;
        for _ in 0..n {
            let started = Instant::now();
            let r = c.get_with(&gw.url("/ua"), &[("user-agent", ua)]).await;
            times.push(started.elapsed());
            status = r.status.as_u16();
        }
        times.sort();
        (times[n / 2], times[n * 99 / 100], status)
    }
    let small = median(&c, &gw, "curl/8", 200).await;
    let ua16 = format!("{}!", "a".repeat(16 * 1024));
    let ua32 = format!("{}!", "a".repeat(32 * 1024));
    let m16 = median(&c, &gw, &ua16, 1000).await;
    let m32 = median(&c, &gw, &ua32, 1000).await;
    let ratio = m32.0.as_secs_f64() / m16.0.as_secs_f64();
    eprintln!(
        "S5: median/p99 small {:?}/{:?}, 16 KiB {:?}/{:?}, 32 KiB {:?}/{:?} (ratio {ratio:.2}); status {}",
        small.0, small.1, m16.0, m16.1, m32.0, m32.1, m32.2
    );
    assert_eq!(m32.2, 200, "none of the rules matches `a…a!`");
    assert!(ratio <= 2.5, "32 KiB / 16 KiB = {ratio:.2}");
    assert!(m32.1 < Duration::from_millis(50), "p99 {:?}", m32.1);
}

// === S6 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_admin_plane_is_loopback_authenticated_and_separate() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;

    // A non-loopback admin listener is refused without the flag, and with the flag but no
    // token (nothing is bound: the config is checked first).
    let dir = tempfile::tempdir().expect("tempdir");
    for (admin, why) in [
        ("{listen: '0.0.0.0:0'}", "allow_remote"),
        ("{listen: '0.0.0.0:0', allow_remote: true}", "token"),
        ("{listen: '0.0.0.0:0', token: x}", "allow_remote"),
    ] {
        let p = dir.path().join("gw.yaml");
        std::fs::write(&p, format!("listen: 127.0.0.1:0\nadmin: {admin}\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\n", up.addr)).unwrap();
        let (code, out, err) = run_fairgate(&["check", "--gateway", p.to_str().unwrap()]);
        assert_ne!(code, 0, "{admin}: {out}");
        assert!(err.contains(why), "{admin}: {err}");
    }

    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0, token: {TOKEN}}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
log: {{decisions: stdout, sample_admits: 1, max_rejections_per_rule: 10, format: json}}
policy:
  version: 1
  rules:
    - {{name: deny-flood, when: {{path: {{prefix: /deny}}}}, action: deny}}
  shedding: {{limit: 4}}
",
        up.addr
    ));
    assert!(gw.admin.expect("admin").ip().is_loopback());
    let c = Client::new();
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let wrong = [("authorization", "Bearer tok-S3CR3T-4242-never-loggeD")];

    // Mutating endpoints: POST + bearer.
    assert_eq!(
        c.request("POST", &gw.admin_url("/reload"), &[], empty())
            .await
            .status,
        401
    );
    assert_eq!(
        c.request("POST", &gw.admin_url("/reload"), &wrong, empty())
            .await
            .status,
        401
    );
    assert_eq!(
        c.request("GET", &gw.admin_url("/reload"), &auth, empty())
            .await
            .status,
        405
    );
    assert_eq!(
        c.request("GET", &gw.admin_url("/clients/k/override"), &auth, empty())
            .await
            .status,
        405
    );
    assert_eq!(
        c.request("POST", &gw.admin_url("/reload"), &auth, empty())
            .await
            .status,
        200
    );
    assert_eq!(c.get(&gw.admin_url("/metrics")).await.status, 401);
    assert_eq!(c.get(&gw.admin_url("/health")).await.status, 200);

    // Admin paths on the data port go to the upstream, never to admin handlers.
    for path in [
        "/reload",
        "/admin/reload",
        "/-/reload",
        "/metrics",
        "/status",
        "/policy",
    ] {
        let r = c.request("POST", &gw.url(path), &auth, empty()).await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "ok"),
            "{path}"
        );
    }

    // Overload: a slow upstream and a shedding limit of 4; the admin API still answers.
    up.state.delay_ms.store(300, Ordering::SeqCst);
    let data = Client::new();
    let g = gw.url("/slow");
    let load = tokio::spawn(async move {
        blast(&data, 120, 24, move |_| {
            Request::get(g.clone()).body(empty()).expect("request")
        })
        .await
    });
    let mut admin_ok = 0;
    let started = Instant::now();
    while !load.is_finished() && started.elapsed() < Duration::from_secs(20) {
        let t = Instant::now();
        let r = c.get_with(&gw.admin_url("/status"), &auth).await;
        assert_eq!(r.status, 200);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "admin took {:?}",
            t.elapsed()
        );
        admin_ok += 1;
    }
    let (counts, _) = load.await.expect("load");
    let shed = counts[503].load(Ordering::SeqCst);
    eprintln!("S6 overload: {shed} of 120 shed, admin answered {admin_ok} times meanwhile");
    assert!(shed > 0, "the data plane was not overloaded");
    assert!(admin_ok > 0);
    up.state.delay_ms.store(0, Ordering::SeqCst);

    // Log volume: 20,000 denials → at most `max_rejections_per_rule` (10) `decision` lines per
    // one-second window of the writer, the rest counted in that window's `summary` line. Every
    // denial is accounted for exactly once: lines + suppressed = 20,000.
    let flood_lines = |out: &str| -> (u64, u64, u64) {
        let (mut lines, mut suppressed, mut summaries) = (0, 0, 0);
        for v in out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            if v["type"] == "decision" && v["rule"] == "deny-flood" {
                lines += 1;
            } else if v["type"] == "summary" && v["key"] == "deny-flood" {
                summaries += 1;
                suppressed += v["suppressed"].as_u64().expect("suppressed is a count");
            } else {
                assert_ne!(v["type"], "dropped", "the decision log dropped lines: {v}");
            }
        }
        (lines, suppressed, summaries)
    };
    assert_eq!(flood_lines(&gw.stdout()), (0, 0, 0));
    let data = Client::new();
    let g = gw.url("/deny");
    let (counts, took) = blast(&data, 20_000, 16, move |_| {
        Request::get(g.clone()).body(empty()).expect("request")
    })
    .await;
    assert_eq!(counts[403].load(Ordering::SeqCst), 20_000);
    // The last window's summary is written when that window ends.
    let accounted = fairgate_tests::eventually(Duration::from_secs(5), || async {
        let (lines, suppressed, _) = flood_lines(&gw.stdout());
        lines + suppressed >= 20_000
    })
    .await;
    let (lines, suppressed, summaries) = flood_lines(&gw.stdout());
    eprintln!(
        "S6 log volume: 20000 denials in {took:?} → {lines} lines, {suppressed} suppressed in {summaries} summaries"
    );
    assert!(accounted, "{lines} lines + {suppressed} suppressed ≠ 20000");
    assert_eq!(lines + suppressed, 20_000, "every denial counted once");
    // Each window with a summary spent its whole budget; the windows are the summaries plus
    // at most the one still open.
    assert!(
        summaries >= 1,
        "a flood of 20000 in {took:?} had no summary"
    );
    assert!(
        lines >= 10 && lines <= 10 * (summaries + 1),
        "{lines} lines over {summaries} summarised windows (budget 10 each)"
    );

    // No token anywhere: logs, metrics, status, policy dump, config check output.
    let m = c.get_with(&gw.admin_url("/metrics"), &auth).await.text();
    let status = c.get_with(&gw.admin_url("/status"), &auth).await.text();
    let policy = c.get_with(&gw.admin_url("/policy"), &auth).await.text();
    let (_, check_out, check_err) = run_fairgate(&[
        "check",
        "--gateway",
        gw.dir().join("gateway.yaml").to_str().unwrap(),
    ]);
    for (what, text) in [
        ("stdout", gw.stdout()),
        ("stderr", gw.stderr()),
        ("metrics", m),
        ("status", status),
        ("policy", policy),
        ("check", check_out + &check_err),
    ] {
        assert!(!text.contains(TOKEN), "the admin token appears in {what}");
    }
}
