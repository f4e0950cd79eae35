//! Proxy correctness through the real binary: methods, bodies both ways, headers, keep-alive,
//! h2c, framing, upgrades, and upstream failures.

use std::time::Duration;

use bytes::Bytes;
use fairgate_tests::{chunked, empty, full, raw_exchange, Client, Gateway, Upstream};

fn config(upstream: &Upstream, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes:
  - {{name: slow, path_prefix: /slow, upstream: u, timeout: 300ms}}
  - {{name: all, upstream: u}}
upstreams:
  u: {{targets: ['{}']}}
log: {{decisions: off}}
{extra}",
        upstream.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_bodies_and_headers_pass_through() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, ""));
    let c = Client::new();

    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let r = c
            .request(method, &gw.url("/m?q=1"), &[("x-custom", "v")], full("hi"))
            .await;
        assert_eq!(r.status, 200, "{method}");
        assert_eq!(r.header("x-upstream"), "yes");
    }
    let head = c.request("HEAD", &gw.url("/m"), &[], empty()).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let got = up.requests();
    let methods: Vec<&str> = got.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods,
        ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    );
    assert!(got.iter().all(|r| r.uri.starts_with("/m")));
    assert_eq!(got[1].body, "hi");
    assert_eq!(got[1].headers["x-custom"], "v");
    // Forwarding headers.
    assert_eq!(got[0].headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(got[0].headers["x-forwarded-proto"], "http");
    assert_eq!(got[0].headers["via"], "1.1 fairgate");
    assert!(!got[0].headers["x-request-id"].is_empty());
    assert!(got[0].headers["host"]
        .to_str()
        .unwrap()
        .contains(&gw.data.port().to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_chunked_bodies_stream_both_ways() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, ""));
    let c = Client::new();

    // 3 MiB with a length, echoed back.
    let big = Bytes::from(
        (0..3 * 1024 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let r = c
        .request("POST", &gw.url("/echo-body"), &[], full(big.clone()))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), big.len());
    assert!(r.body == big, "echoed body differs");

    // Chunked request (no length), echoed back.
    let chunks: Vec<Bytes> = (0..64)
        .map(|i| Bytes::from(vec![b'a' + (i % 26) as u8; 10_000]))
        .collect();
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let r = c
        .request("POST", &gw.url("/echo-body"), &[], chunked(chunks))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), total);
    let rec = up
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.uri == "/echo-body")
        .unwrap();
    assert_eq!(rec.body.len(), total);

    // Chunked response from the upstream.
    let r = c.get(&gw.url("/bytes/200000")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 200_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_and_forwarded_for_appended() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, ""));
    let req = "GET /hop HTTP/1.1\r\nHost: example.test\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n\
               Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n\
         Upgrade: h2c\r\nX-Forwarded-For: 192.0.2.1\r\nX-End: kept\r\nConnection: close\r\n\r\n";
    let res = raw_exchange(gw.data, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    let lower = res.to_ascii_lowercase();
    // The upstream's hop-by-hop response headers do not reach the client.
    assert!(!lower.contains("x-upstream-hop"), "{res}");
    assert!(!lower.contains("keep-alive: timeout"), "{res}");
    assert!(lower.contains("via: 1.1 fairgate"), "{res}");
    let rec = up.requests().pop().unwrap();
    for h in [
        "x-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "upgrade",
        "connection",
    ] {
        assert!(
            !rec.headers.contains_key(h),
            "{h} reached the upstream: {:?}",
            rec.headers
        );
    }
    assert_eq!(rec.headers["x-end"], "kept");
    assert_eq!(rec.headers["host"], "example.test");
    assert_eq!(rec.headers["x-forwarded-for"], "192.0.2.1, 127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_reuses_connections_and_h2c_works() {
    let up = Upstream::start().await;
    // Two per-core threads (the default runtime), each with its own upstream pool.
    let gw = Gateway::start(&config(&up, "workers: 2\n"));
    let c = Client::new();
    for _ in 0..20 {
        assert_eq!(c.get(&gw.url("/k")).await.status, 200);
    }
    // Sequential requests: at most one pooled upstream connection per gateway thread (the
    // test client may open a second connection while its first is on the way back to its
    // pool, and the kernel may give it to the other thread).
    assert!(
        (1..=2).contains(&up.connections()),
        "upstream connections were not reused: {}",
        up.connections()
    );

    let h2 = Client::h2c();
    for _ in 0..5 {
        let r = h2.get(&gw.url("/h2")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.version, http::Version::HTTP_2);
    }
    let rec = up.requests().pop().unwrap();
    // HTTP/2 in, HTTP/1.1 to the upstream with a Host header from :authority.
    assert_eq!(rec.version, http::Version::HTTP_11);
    assert!(rec.headers["host"]
        .to_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_and_connect_are_refused() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, ""));
    // CL + TE with a smuggled request after the chunked body. hyper drops the
    // Content-Length, reads the body as chunked and closes the connection after answering,
    // so the smuggled request is never parsed, let alone forwarded.
    let smuggle = "POST /cl-te HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
                   3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let res = raw_exchange(gw.data, smuggle.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(res.matches("HTTP/1.1 ").count(), 1, "{res}");
    assert!(
        res.to_ascii_lowercase().contains("connection: close"),
        "{res}"
    );
    let seen: Vec<String> = up.requests().iter().map(|r| r.uri.clone()).collect();
    assert!(!seen.iter().any(|u| u == "/smuggled"), "{seen:?}");
    if let Some(r) = up.requests().iter().find(|r| r.uri == "/cl-te") {
        assert_eq!(r.body, "abc");
        assert!(r.headers.get("content-length").is_none_or(|v| v == "3"));
    }

    // A bad Content-Length is a 400 from hyper.
    let res = raw_exchange(
        gw.data,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");

    // CONNECT is refused.
    let res = raw_exchange(
        gw.data,
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 405"), "{res}");
    assert!(res.contains("application/problem+json"), "{res}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_and_bodies_are_refused() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        &up,
        "limits: {max_header_bytes: 16KiB, max_headers: 20, max_body: 1KiB}\n",
    ));
    let c = Client::new();
    let big = "x".repeat(32 * 1024);
    let res = raw_exchange(
        gw.data,
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        res.starts_with("HTTP/1.1 431"),
        "{}",
        &res[..res.len().min(200)]
    );
    let many: String = (0..30).map(|i| format!("X-H{i}: v\r\n")).collect();
    let res = raw_exchange(
        gw.data,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 431"), "{res}");
    let r = c
        .request("POST", &gw.url("/b"), &[], full(vec![b'x'; 4096]))
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_slow_is_504() {
    let up = Upstream::start().await;
    // A port nothing listens on: bind, note it, close it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes:
  - {{path_prefix: /dead, upstream: dead}}
  - {{path_prefix: /slow, upstream: live, timeout: 300ms}}
  - {{upstream: both}}
upstreams:
  dead: {{targets: ['{dead}']}}
  live: {{targets: ['{}']}}
  both: {{targets: ['{dead}', '{}'], balance: round_robin}}
log: {{decisions: off}}
",
        up.addr, up.addr
    ));
    let c = Client::new();
    let r = c.get(&gw.url("/dead")).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("content-type"), "application/problem+json");
    assert_eq!(r.json()["status"], 502);

    let started = std::time::Instant::now();
    let r = c.get(&gw.url("/slow?delay_ms=3000")).await;
    assert_eq!(r.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.json()["status"], 504);

    // A connect failure is retried once on the other target: every request succeeds,
    // bodies included.
    for i in 0..6 {
        let r = c
            .request("POST", &gw.url("/retry"), &[], full(format!("body{i}")))
            .await;
        assert_eq!(r.status, 200, "request {i}");
    }
    let bodies: Vec<Bytes> = up
        .requests()
        .into_iter()
        .filter(|r| r.uri == "/retry")
        .map(|r| r.body)
        .collect();
    assert_eq!(bodies.len(), 6);
    assert!(bodies
        .iter()
        .enumerate()
        .all(|(i, b)| *b == format!("body{i}")));

    let m = c.get(&gw.admin_url("/metrics")).await.text();
    assert!(
        fairgate_tests::metric(
            &m,
            r#"fairgate_upstream_errors_total{upstream="dead",kind="connect"}"#
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    assert_eq!(
        fairgate_tests::metric(
            &m,
            r#"fairgate_upstream_errors_total{upstream="live",kind="timeout"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_paths_on_the_data_port_go_upstream() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, ""));
    let c = Client::new();
    for path in [
        "/reload",
        "/metrics",
        "/status",
        "/admin/reload",
        "/-/reload",
        "/clients/top",
        "/health",
    ] {
        let r = c.request("POST", &gw.url(path), &[], empty()).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(
            r.text(),
            "ok",
            "{path} was answered by something else than the upstream"
        );
    }
    assert_eq!(up.count(), 7);

    // Without a catch-all route, unrouted requests are 404 from the gateway itself.
    let gw2 = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nroutes: [{{path_prefix: /api/, upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
        up.addr
    ));
    let r = c.get(&gw2.url("/metrics")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), "application/problem+json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_spliced_only_after_101() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, ""));
    let mut s = tokio::net::TcpStream::connect(gw.data).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the 101");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s.write_all(b"ping through the tunnel").await.unwrap();
    let mut got = Vec::new();
    while got.len() < 23 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&got, b"ping through the tunnel");

    // An upgrade request the upstream answers with 200 is an ordinary response: no tunnel.
    let res = raw_exchange(
        gw.data,
        b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert!(!res.contains("101"), "{res}");
}
