//! `limits.max_body` through the real binary: every body over the limit is answered 413
//! with a problem+json body — with a `Content-Length`, chunked on HTTP/1.1 and without a
//! length on HTTP/2 — and the upstream never sees a completed request.
//!
//! The upstream here is a raw TCP listener that keeps every byte each connection delivered
//! and answers only a request whose body it saw end (a `0` chunk or the `Content-Length`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fairgate_tests::{chunked, eventually, full, Client, Gateway, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One upstream connection as seen by the raw upstream.
#[derive(Debug, Default)]
struct Conn {
    bytes: Vec<u8>,
    /// The gateway closed (or reset) it.
    closed: bool,
    /// Whole requests it carried (each answered).
    completed: usize,
    /// Where the current request starts in `bytes` (no pipelining: the gateway waits for
    /// each answer).
    current: usize,
}

#[derive(Clone, Default)]
struct RawUpstream {
    conns: Arc<Mutex<Vec<Conn>>>,
}

/// Whether `buf` holds a whole HTTP/1.1 request (head plus a body that ended).
fn complete(buf: &[u8]) -> bool {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let body = &buf[head_end + 4..];
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    body.len() >= len
}

impl RawUpstream {
    async fn start() -> (RawUpstream, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = RawUpstream::default();
        let conns = up.conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let i = {
                    let mut c = conns.lock().unwrap();
                    c.push(Conn::default());
                    c.len() - 1
                };
                let conns = conns.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        let done = {
                            let mut c = conns.lock().unwrap();
                            let conn = &mut c[i];
                            if n == 0 {
                                conn.closed = true;
                                return;
                            }
                            conn.bytes.extend_from_slice(&buf[..n]);
                            let done = complete(&conn.bytes[conn.current..]);
                            if done {
                                conn.completed += 1;
                                conn.current = conn.bytes.len();
                            }
                            done
                        };
                        if done {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await;
                        }
                    }
                });
            }
        });
        (up, addr)
    }

    /// Waits until every connection the gateway opened is closed, then checks that none
    /// carried a whole request and none delivered more body than `max_body`.
    async fn assert_no_complete_request(&self, max_body: usize) {
        let conns = self.conns.clone();
        let closed = eventually(Duration::from_secs(10), || {
            let conns = conns.clone();
            async move { conns.lock().unwrap().iter().all(|c| c.closed) }
        })
        .await;
        let c = self.conns.lock().unwrap();
        assert!(closed, "an upstream connection stayed open: {c:?}");
        for conn in c.iter() {
            assert_eq!(conn.completed, 0, "the upstream saw a whole request");
            let body = conn
                .bytes
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(0, |h| conn.bytes.len() - h - 4);
            // Chunk framing adds a few bytes per chunk on top of the data.
            assert!(
                body <= max_body + 64,
                "{body} body bytes reached the upstream"
            );
        }
    }

    fn completed(&self) -> usize {
        self.conns.lock().unwrap().iter().map(|c| c.completed).sum()
    }
}

fn config(upstream: std::net::SocketAddr) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{upstream}']}}
limits: {{max_body: 1KiB}}
"
    )
}

fn assert_413(r: &Reply) {
    assert_eq!(r.status, 413, "{:?} {}", r.headers, r.text());
    assert_eq!(r.header("content-type"), "application/problem+json");
    let v = r.json();
    assert_eq!(v["status"], 413);
    assert_eq!(v["title"], "Payload Too Large");
}

fn chunks(total: usize, size: usize) -> Vec<Bytes> {
    (0..total)
        .step_by(size)
        .map(|start| Bytes::from(vec![b'x'; (total - start).min(size)]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_chunked_body_over_the_limit_is_413() {
    let (up, addr) = RawUpstream::start().await;
    let gw = Gateway::start(&config(addr));
    let r = Client::new()
        .request("POST", &gw.url("/b"), &[], chunked(chunks(2_000, 500)))
        .await;
    assert_413(&r);
    up.assert_no_complete_request(1024).await;
    let m = Client::new().get(&gw.admin_url("/metrics")).await.text();
    assert!(
        !m.lines()
            .any(|l| l.starts_with("fairgate_upstream_errors_total") && !l.ends_with(" 0")),
        "counted as an upstream error: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_chunked_body_over_the_limit_is_413() {
    // The client is still writing when the 413 is sent: the gateway drains the rest before
    // closing (else the client gets a reset instead of the answer).
    for size in [200_000, 4_000_000] {
        let (up, addr) = RawUpstream::start().await;
        let gw = Gateway::start(&config(addr));
        let r = Client::new()
            .try_send(
                http::Request::post(gw.url("/b"))
                    .body(chunked(chunks(size, 8192)))
                    .unwrap(),
            )
            .await
            .unwrap_or_else(|e| panic!("{size} bytes: no answer: {e}"));
        assert_413(&r);
        up.assert_no_complete_request(1024).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_body_without_a_length_over_the_limit_is_413() {
    let (up, addr) = RawUpstream::start().await;
    let gw = Gateway::start(&config(addr));
    let c = Client::h2c();
    let r = c
        .request("POST", &gw.url("/b"), &[], chunked(chunks(2_000, 500)))
        .await;
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_413(&r);
    up.assert_no_complete_request(1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_over_the_limit_is_413_and_never_forwarded() {
    let (up, addr) = RawUpstream::start().await;
    let gw = Gateway::start(&config(addr));
    let r = Client::new()
        .request("POST", &gw.url("/b"), &[], full(vec![b'x'; 4096]))
        .await;
    assert_413(&r);
    assert!(
        up.conns.lock().unwrap().is_empty(),
        "no upstream connection"
    );
}

/// The control: bodies within the limit go through whole, chunked or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_within_the_limit_are_forwarded_whole() {
    let (up, addr) = RawUpstream::start().await;
    let gw = Gateway::start(&config(addr));
    let c = Client::new();
    let r = c
        .request("POST", &gw.url("/b"), &[], chunked(chunks(1_000, 250)))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = c
        .request("POST", &gw.url("/b"), &[], full(vec![b'x'; 1024]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.completed(), 2);
}
