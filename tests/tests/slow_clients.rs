//! SCENARIOS.md P4 (slowloris, slow body, slow read) and the per-source connection cap,
//! through the real binary with raw TCP clients bound to distinct 127.0.0.N sources.
//!
//! The `ci` form of SCENARIOS (three 30 s `slowhttptest` runs at `-c 1000`, 10 s timeouts)
//! does not fit this file's 90 s budget, so the timeouts are shortened to 1 s
//! (`header_read_timeout`, `body_min_rate.per`, `write_timeout`) and the attacks to a few
//! seconds; the "±1 s of a 10 s timeout" criterion becomes a window stated per test.
//! Every scenario holds `SERIAL`, so two of them never load the 2-core box at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fairgate_tests::load::{self, LoadSpec};
use fairgate_tests::{eventually, full, metric, proc, Client, Gateway, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(upstream: SocketAddr, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{upstream}']}}
log: {{decisions: off}}
{extra}"
    )
}

async fn bounded<F: std::future::Future<Output = ()>>(limit: Duration, f: F) {
    tokio::time::timeout(limit, f)
        .await
        .expect("scenario exceeded its time bound");
}

/// A TCP connection from `source` (any 127.0.0.N); `rcvbuf` shrinks its receive buffer.
async fn connect_from(source: &str, addr: SocketAddr, rcvbuf: Option<u32>) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(source.parse().expect("ip"), 0))
        .expect("bind source");
    if let Some(size) = rcvbuf {
        sock.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    sock.connect(addr).await.expect("connect")
}

async fn metric_of(gw: &Gateway, series: &str) -> f64 {
    let text = Client::new().get(&gw.admin_url("/metrics")).await.text();
    metric(&text, series).unwrap_or(0.0)
}

/// Reads until the peer closes (or errors), for at most `limit`; returns the bytes read and
/// whether the end was seen.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

// === Slowloris ===

/// One slowloris client: connects, sends a partial head a byte every 100 ms, and records
/// how long each connection lived until the gateway closed it; reconnects until `until`.
/// Adds one permit to `connected` once its first connection has sent the start of its head.
async fn slowloris(
    source: &'static str,
    addr: SocketAddr,
    until: Instant,
    connected: Arc<Semaphore>,
) -> Vec<Duration> {
    let mut lives = Vec::new();
    let mut first = Some(connected);
    while Instant::now() < until {
        let s = connect_from(source, addr, None).await;
        let opened = Instant::now();
        let (mut r, mut w) = s.into_split();
        let announce = first.take();
        let writer = async move {
            if w.write_all(b"GET / HTTP/1.1\r\nhost: slow\r\nx-a: ")
                .await
                .is_err()
            {
                return;
            }
            if let Some(connected) = announce {
                connected.add_permits(1);
            }
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if w.write_all(b"a").await.is_err() {
                    return;
                }
            }
        };
        let reader = async move {
            let mut buf = [0u8; 512];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        tokio::select! {
            () = reader => {}
            () = writer => {}
            () = tokio::time::sleep(Duration::from_secs(10)) => panic!("never closed"),
        }
        lives.push(opened.elapsed());
    }
    lives
}

/// P4 slowloris: 200 connections sending a head a byte at a time are closed at
/// `header_read_timeout` (1 s here) while 200 rps of legitimate traffic from another source
/// keep succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_slowloris_connections_close_at_the_header_timeout_while_legit_traffic_flows() {
    let _serial = SERIAL.lock().await;
    bounded(Duration::from_secs(40), async {
        let up = Upstream::start().await;
        up.set_record(false);
        let gw = Gateway::start(&config(
            up.addr,
            "limits: {header_read_timeout: 1s, max_connections_per_source: 100}",
        ));
        let addr = gw.data;
        let url = gw.url("/legit");
        // Baseline B: the legitimate load alone.
        let base =
            load::run(LoadSpec::get(&url, 200, Duration::from_secs(3)).from_ip("127.0.0.2")).await;
        assert!(base.success_ratio() >= 0.99, "baseline: {}", base.summary());

        // 200 slowloris connections from four sources (50 each, under the cap of 100).
        let until = Instant::now() + Duration::from_millis(5500);
        let connected = Arc::new(Semaphore::new(0));
        let mut attackers = Vec::new();
        for source in ["127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"] {
            for _ in 0..50 {
                attackers.push(tokio::spawn(slowloris(
                    source,
                    addr,
                    until,
                    Arc::clone(&connected),
                )));
            }
        }
        // The legitimate load starts once all 200 attackers are connected and sending.
        let _all = connected.acquire_many(200).await.expect("semaphore open");
        let attacked =
            load::run(LoadSpec::get(&url, 200, Duration::from_secs(5)).from_ip("127.0.0.2")).await;
        let mut lives = Vec::new();
        for a in attackers {
            lives.extend(a.await.expect("attacker"));
        }
        lives.sort();
        let (min, max) = (lives[0], lives[lives.len() - 1]);
        let p99 = lives[lives.len() * 99 / 100];
        eprintln!(
            "P4 slowloris: {} attack connections, lifetime min {min:?} p99 {p99:?} max {max:?}; \
             legit baseline p99 {:?} ({}), under attack p99 {:?} ({})",
            lives.len(),
            base.p99(),
            base.summary(),
            attacked.p99(),
            attacked.summary()
        );
        assert!(lives.len() >= 200, "{}", lives.len());
        // Closed at 1 s: not before (minus timer slack), and at most +50 % after.
        assert!(min >= Duration::from_millis(950), "closed early: {min:?}");
        assert!(max <= Duration::from_millis(1500), "closed late: {max:?}");
        assert!(
            attacked.success_ratio() >= 0.99,
            "legit under attack: {}",
            attacked.summary()
        );
        // p99 ≤ 2 × B; B is a few ms on this box, so 2 ms of timer granularity is allowed on top
        // (see docs/reliability/slow-clients.md). Baseline and attack are two windows of a
        // shared machine, so the bound holds for the median second (a steady cost shows in
        // every second, a stall of the machine in one or two) and, loosely, for the whole run.
        let median_second = |r: &fairgate_tests::load::LoadReport| {
            let mut v = r.quantile_by_second(0.99);
            v.sort_unstable();
            v[v.len() / 2]
        };
        let (b_mid, a_mid) = (median_second(&base), median_second(&attacked));
        let bound = b_mid * 2 + Duration::from_millis(2);
        assert!(
            a_mid <= bound,
            "legit p99 in the median second {a_mid:?} over 2 × B = {bound:?}"
        );
        assert!(
            attacked.p99() <= base.p99() * 2 + Duration::from_millis(25),
            "legit p99 {:?} vs B {:?}",
            attacked.p99(),
            base.p99()
        );
    })
    .await;
}

// === Per-source cap ===

/// Opens a connection from `source` and has it serve one keep-alive request; `None` when
/// the gateway closed it instead (the per-source cap).
async fn open_served(source: &str, addr: SocketAddr) -> Option<TcpStream> {
    let mut s = connect_from(source, addr, None).await;
    s.write_all(b"GET /cap HTTP/1.1\r\nhost: cap\r\n\r\n")
        .await
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\nok") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                assert!(
                    got.is_empty(),
                    "half a response: {:?}",
                    String::from_utf8_lossy(&got)
                );
                return None;
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer and no close"),
        }
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    Some(s)
}

/// Connects from `source` and measures the time from the connect to the gateway's close;
/// asserts nothing is answered.
async fn refused_after(source: &str, addr: SocketAddr) -> Duration {
    let mut s = connect_from(source, addr, None).await;
    let t = Instant::now();
    let _ = s.write_all(b"GET /cap HTTP/1.1\r\nhost: cap\r\n\r\n").await;
    let (got, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    let elapsed = t.elapsed();
    assert!(closed, "connection over the cap stayed open");
    assert!(
        got.is_empty(),
        "answered over the cap: {}",
        String::from_utf8_lossy(&got)
    );
    elapsed
}

/// P4 per-source cap (100): connection #101 from one source is closed at once, other
/// sources are unaffected, closed slots are reusable, and refusals are counted; under both
/// runtimes (thread_per_core with 2 threads shares one table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_per_source_cap_refuses_connection_101_and_frees_slots() {
    let _serial = SERIAL.lock().await;
    bounded(Duration::from_secs(40), async {
        let up = Upstream::start().await;
        up.set_record(false);
        for runtime in ["thread_per_core", "multi_thread"] {
            let gw = Gateway::start(&config(
                up.addr,
                &format!(
                    "runtime: {runtime}
workers: 2
limits: {{header_read_timeout: 30s, max_connections_per_source: 100}}"
                ),
            ));
            let addr = gw.data;
            let source = "127.0.0.5";
            let mut open = Vec::new();
            for i in 0..100 {
                let s = open_served(source, addr).await;
                open.push(s.unwrap_or_else(|| panic!("{runtime}: connection #{} refused", i + 1)));
            }
            let mut refusals = 0.0;
            let mut times = Vec::new();
            for _ in 0..5 {
                times.push(refused_after(source, addr).await);
                refusals += 1.0;
            }
            times.sort();
            // Another source is not affected.
            assert!(open_served("127.0.0.6", addr).await.is_some(), "{runtime}: other source");
            // Close 50: 50 more are accepted again (slots are released, nothing leaks).
            open.truncate(50);
            let mut reopened = 0;
            let deadline = Instant::now() + Duration::from_secs(5);
            while reopened < 50 {
                assert!(Instant::now() < deadline, "{runtime}: slots not released");
                match open_served(source, addr).await {
                    Some(s) => {
                        open.push(s);
                        reopened += 1;
                    }
                    // The gateway has not seen every close yet.
                    None => refusals += 1.0,
                }
            }
            times.push(refused_after(source, addr).await);
            refusals += 1.0;
            let counted = metric_of(&gw, r#"fairgate_connections_refused_total{reason="per_source"}"#).await;
            eprintln!(
                "P4 cap ({runtime}): time to close #101: {:?} (median of 5 {:?}); refusals {refusals}, counted {counted}",
                times, times[times.len() / 2]
            );
            assert_eq!(counted, refusals, "{runtime}: refusals counted");
            // SCENARIOS: within 10 ms. The median is held to that; a single refusal may take
            // longer on this shared 2-core box under a debug build.
            assert!(times[times.len() / 2] <= Duration::from_millis(10), "{runtime}: {times:?}");
            assert!(times.iter().all(|t| *t <= Duration::from_millis(200)), "{runtime}: {times:?}");
            assert!(gw.stderr().contains("too many open connections from this source"));
            drop(open);
        }
    })
    .await;
}

// === Slow body ===

/// P4 slow body: a POST announcing 100000 bytes and sending 10 B/s is answered 408 after one
/// `body_min_rate` window (1 KiB per 1 s here) and the upstream never gets the whole body;
/// a normal POST and a slow-but-sufficient one pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_slow_body_is_answered_408_and_never_reaches_the_upstream_whole() {
    let _serial = SERIAL.lock().await;
    bounded(Duration::from_secs(30), async {
        let up = Upstream::start().await;
        let gw = Gateway::start(&config(
            up.addr,
            "limits: {header_read_timeout: 5s, body_min_rate: {bytes: 1KiB, per: 1s}}",
        ));
        let addr = gw.data;
        let c = Client::new();
        let r = c.request("POST", &gw.url("/normal"), &[], full(vec![b'n'; 100_000])).await;
        assert_eq!(r.status, 200);

        // 10 B/s.
        let s = connect_from("127.0.0.8", addr, None).await;
        let (mut rd, mut wr) = s.into_split();
        wr.write_all(b"POST /slow HTTP/1.1\r\nhost: slow\r\ncontent-length: 100000\r\n\r\n")
            .await
            .unwrap();
        let sent_head = Instant::now();
        let trickle = tokio::spawn(async move {
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if wr.write_all(b"s").await.is_err() {
                    return;
                }
            }
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf))
                .await
                .expect("an answer within 5 s")
                .expect("read");
            assert!(n > 0, "closed without an answer");
            got.extend_from_slice(&buf[..n]);
        }
        let answered = sent_head.elapsed();
        let head = String::from_utf8_lossy(&got).into_owned();
        assert!(head.starts_with("HTTP/1.1 408"), "{head}");
        // The connection then closes.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(3), rd.read_to_end(&mut rest)).await;
        trickle.abort();
        eprintln!("P4 slow body: 408 after {answered:?}; connection closed: {}", closed.is_ok());
        assert!(closed.is_ok(), "connection left open after the 408");
        // One window of 1 s from the first wait: [1 s, 1.5 s].
        assert!(answered >= Duration::from_millis(950), "{answered:?}");
        assert!(answered <= Duration::from_millis(1500), "{answered:?}");
        assert!(eventually(Duration::from_secs(3), || async { up.in_flight() == 0 }).await);
        assert!(
            up.requests().iter().filter(|r| r.uri == "/slow").all(|r| r.body.len() < 100_000),
            "the upstream received the whole slow body"
        );
        assert_eq!(metric_of(&gw, r#"fairgate_slow_clients_total{kind="body"}"#).await, 1.0);

        // 3 KiB/s against 1 KiB per 1 s: slow, but fast enough.
        let mut s = connect_from("127.0.0.8", addr, None).await;
        s.write_all(b"POST /steady HTTP/1.1\r\nhost: slow\r\ncontent-length: 6000\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.write_all(&[b't'; 600]).await.unwrap();
        }
        let (answer, _) = read_to_close(&mut s, Duration::from_secs(5)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(up.requests().iter().any(|r| r.uri == "/steady" && r.body.len() == 6000));
        assert_eq!(metric_of(&gw, r#"fairgate_slow_clients_total{kind="body"}"#).await, 1.0);
    })
    .await;
}

// === Slow read ===

/// P4 slow read: clients that request 16 MiB and never read are cut off around
/// `write_timeout` (1 s here) without the gateway buffering their responses; a client that
/// reads gets the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_slow_readers_are_closed_at_the_write_timeout_with_bounded_memory() {
    let _serial = SERIAL.lock().await;
    bounded(Duration::from_secs(30), async {
        const SIZE: usize = 16 * 1024 * 1024;
        const READERS: usize = 5;
        let up = Upstream::start().await;
        up.set_record(false);
        let gw = Gateway::start(&config(up.addr, "limits: {write_timeout: 1s}"));
        let addr = gw.data;
        let path = format!("/bytes/{SIZE}");
        // A reading client gets everything.
        let whole = Client::new().get(&gw.url(&path)).await;
        assert_eq!(whole.status, 200);
        assert_eq!(whole.body.len(), SIZE);

        let rss_before = proc::rss(gw.pid()).expect("rss");
        let mut clients = Vec::new();
        for _ in 0..READERS {
            let mut s = connect_from("127.0.0.9", addr, Some(4096)).await;
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: slow\r\n\r\n").as_bytes())
                .await
                .unwrap();
            clients.push(s);
        }
        let sent = Instant::now();
        let series = r#"fairgate_slow_clients_total{kind="read"}"#;
        let mut rss_max = rss_before;
        let mut cut_after = None;
        while sent.elapsed() < Duration::from_secs(10) {
            rss_max = rss_max.max(proc::rss(gw.pid()).unwrap_or(0));
            if metric_of(&gw, series).await >= READERS as f64 {
                cut_after = Some(sent.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cut_after = cut_after.expect("slow readers were not cut off within 10 s");
        // Each client gets what was already in flight, then the end: never the whole body.
        let mut received = Vec::new();
        for s in &mut clients {
            let (got, closed) = read_to_close(s, Duration::from_secs(5)).await;
            assert!(closed, "a slow reader's connection stayed open");
            received.push(got.len());
        }
        let growth = rss_max.saturating_sub(rss_before);
        eprintln!(
            "P4 slow read: {READERS} readers cut off after {cut_after:?}; bytes they got {received:?}; \
             RSS {} MiB -> max {} MiB (+{} KiB)",
            rss_before / proc::MIB,
            rss_max / proc::MIB,
            growth / 1024
        );
        assert!(received.iter().all(|&n| n < SIZE), "{received:?}");
        assert_eq!(metric_of(&gw, series).await, READERS as f64);
        // write_timeout 1 s after the buffers filled: [1 s, 2.5 s] from the request.
        assert!(cut_after >= Duration::from_millis(950), "{cut_after:?}");
        assert!(cut_after <= Duration::from_millis(2500), "{cut_after:?}");
        // 80 MiB of responses were stalled; the gateway holds only its per-connection buffers.
        assert!(growth <= 32 * proc::MIB, "RSS grew {} MiB", growth / proc::MIB);
    })
    .await;
}
