//! Raw HTTP/1 on both sides of the gateway, byte for byte.
//!
//! - [`RawUpstream`]: a TCP listener on `127.0.0.1:0` that keeps the exact bytes of every
//!   connection, counts request heads with a strict parser (`httparse`, CRLF only, one
//!   `Content-Length` or `Transfer-Encoding: chunked`, nothing else), and answers each request
//!   according to its [`RawMode`] (a plain 200, or headers plus half a body and then a TCP
//!   reset, for F3);
//! - [`RawConn`] and [`exchange`]: a client that sends exact bytes (from any source address in
//!   `127.0.0.0/8`), reads with a deadline, and reports how the connection ended (closed,
//!   reset, or still open), plus [`parse_responses`] to split what came back into responses.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

// === RawUpstream ===

/// How a [`RawUpstream`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RawMode {
    /// `200` with `Content-Length: 2` and body `ok`, keep-alive.
    Ok = 0,
    /// A `200` head announcing `Content-Length: 100`, 50 body bytes, then a TCP reset
    /// (SO_LINGER 0), for F3.
    HalfBodyThenReset = 1,
}

/// One request head as the raw upstream parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRequest {
    /// Index of the connection it came on.
    pub conn: usize,
    /// Method.
    pub method: String,
    /// Request target.
    pub target: String,
    /// Header lines, in order, as sent.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body bytes (after de-chunking).
    pub body: Vec<u8>,
}

#[derive(Debug, Default)]
struct RawShared {
    requests: Mutex<Vec<RawRequest>>,
    /// Exact bytes per connection.
    bytes: Mutex<Vec<Vec<u8>>>,
    /// Connections whose bytes the strict parser refused (index, reason).
    errors: Mutex<Vec<(usize, String)>>,
    connections: AtomicUsize,
    mode: AtomicU8,
}

/// A byte-recording HTTP/1.1 upstream on `127.0.0.1:0` (see the module docs).
#[derive(Debug, Clone)]
pub struct RawUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<RawShared>,
}

impl RawUpstream {
    /// Starts one on the current tokio runtime.
    pub async fn start(mode: RawMode) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw upstream");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(RawShared::default());
        shared.mode.store(mode as u8, Ordering::SeqCst);
        let sh = shared.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = sh.connections.fetch_add(1, Ordering::SeqCst);
                sh.bytes.lock().unwrap().push(Vec::new());
                tokio::spawn(serve_raw(stream, conn, sh.clone()));
            }
        });
        RawUpstream { addr, shared }
    }

    /// Changes how later requests are answered.
    pub fn set_mode(&self, mode: RawMode) {
        self.shared.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Requests parsed so far.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Number of request heads parsed so far.
    pub fn heads(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Every byte received, all connections concatenated in order of connection.
    pub fn all_bytes(&self) -> Vec<u8> {
        self.shared.bytes.lock().unwrap().concat()
    }

    /// What the strict parser refused: (connection, reason).
    pub fn parse_errors(&self) -> Vec<(usize, String)> {
        self.shared.errors.lock().unwrap().clone()
    }
}

async fn serve_raw(mut stream: TcpStream, conn: usize, sh: Arc<RawShared>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Answer every complete request already buffered.
        loop {
            match parse_request(&buf) {
                Strict::Partial => break,
                Strict::Error(e) => {
                    sh.errors.lock().unwrap().push((conn, e));
                    return;
                }
                Strict::Complete(mut req, used) => {
                    buf.drain(..used);
                    req.conn = conn;
                    sh.requests.lock().unwrap().push(req);
                    let mode = sh.mode.load(Ordering::SeqCst);
                    if mode == RawMode::HalfBodyThenReset as u8 {
                        let _ = stream
                            .write_all(
                                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: text/plain\r\n\r\n",
                            )
                            .await;
                        let _ = stream.write_all(&[b'h'; 50]).await;
                        let _ = stream.flush().await;
                        // The head and half body must have reached the peer before the
                        // reset (a reset discards what is still in our send queue).
                        if let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) {
                            crate::proc::wait_acked(local, peer, crate::DEADLINE).await;
                        }
                        let _ = stream.set_zero_linger();
                        drop(stream);
                        return;
                    }
                    if stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Raw-Upstream: 1\r\n\r\nok",
                        )
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        sh.bytes.lock().unwrap()[conn].extend_from_slice(&chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
    }
}

enum Strict {
    Partial,
    Error(String),
    Complete(RawRequest, usize),
}

/// Strict request parser: CRLF line ends only, at most one framing header, exact chunked.
fn parse_request(buf: &[u8]) -> Strict {
    if buf.is_empty() {
        return Strict::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Strict::Partial,
        Err(e) => return Strict::Error(format!("head: {e}")),
    };
    if buf[..head_len]
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || buf[i - 1] != b'\r'))
    {
        return Strict::Error("bare LF".to_owned());
    }
    let mut cl = None;
    let mut te = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            if cl.is_some() {
                return Strict::Error("duplicate content-length".to_owned());
            }
            let Some(n) = std::str::from_utf8(h.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
            else {
                return Strict::Error("bad content-length".to_owned());
            };
            cl = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if te || !h.value.eq_ignore_ascii_case(b"chunked") {
                return Strict::Error("transfer-encoding other than one `chunked`".to_owned());
            }
            te = true;
        }
    }
    if te && cl.is_some() {
        return Strict::Error("content-length with transfer-encoding".to_owned());
    }
    let mut request = RawRequest {
        conn: 0,
        method: req.method.unwrap_or("").to_owned(),
        target: req.path.unwrap_or("").to_owned(),
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect(),
        body: Vec::new(),
    };
    let rest = &buf[head_len..];
    if let Some(n) = cl {
        if rest.len() < n {
            return Strict::Partial;
        }
        request.body = rest[..n].to_vec();
        return Strict::Complete(request, head_len + n);
    }
    if !te {
        return Strict::Complete(request, head_len);
    }
    // Chunked: size CRLF data CRLF … 0 CRLF CRLF (no trailers from the gateway).
    let mut at = 0;
    loop {
        let Some(eol) = find_crlf(&rest[at..]) else {
            return Strict::Partial;
        };
        let line = &rest[at..at + eol];
        let size_text = line.split(|&b| b == b';').next().unwrap_or(b"");
        let Some(size) = std::str::from_utf8(size_text)
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok())
        else {
            return Strict::Error("bad chunk size".to_owned());
        };
        at += eol + 2;
        if size == 0 {
            if rest.len() < at + 2 {
                return Strict::Partial;
            }
            if &rest[at..at + 2] != b"\r\n" {
                return Strict::Error("trailers or missing final CRLF".to_owned());
            }
            return Strict::Complete(request, head_len + at + 2);
        }
        if rest.len() < at + size + 2 {
            return Strict::Partial;
        }
        request.body.extend_from_slice(&rest[at..at + size]);
        if &rest[at + size..at + size + 2] != b"\r\n" {
            return Strict::Error("chunk without CRLF".to_owned());
        }
        at += size + 2;
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

// === raw client ===

/// How a raw connection ended when the read stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The server closed it (EOF).
    Closed,
    /// The server reset it (ECONNRESET).
    Reset,
    /// Still open when the deadline passed.
    Open,
}

/// What a raw exchange read back.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// Every byte read.
    pub bytes: Vec<u8>,
    /// How the connection ended.
    pub ending: Ending,
}

impl RawReply {
    /// The bytes as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The responses in the bytes (see [`parse_responses`]).
    pub fn responses(&self) -> Vec<RawResponse> {
        parse_responses(&self.bytes)
    }
}

/// A client connection that sends exact bytes.
#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
}

impl RawConn {
    /// Connects from 127.0.0.1.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        RawConn {
            stream: TcpStream::connect(addr).await.expect("connect"),
        }
    }

    /// Connects from `source` (any address in 127.0.0.0/8).
    pub async fn connect_from(source: &str, addr: SocketAddr) -> RawConn {
        let ip: IpAddr = source.parse().expect("source ip");
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(ip, 0)).expect("bind source");
        RawConn {
            stream: socket.connect(addr).await.expect("connect"),
        }
    }

    /// Sends `bytes` (a reset or closed peer is not an error here: the read reports it).
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads until the server closes or resets the connection, or `timeout` passes.
    pub async fn read_to_end(&mut self, timeout: Duration) -> RawReply {
        let deadline = Instant::now() + timeout;
        let mut bytes = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Err(_) => {
                    return RawReply {
                        bytes,
                        ending: Ending::Open,
                    }
                }
                Ok(Ok(0)) => {
                    return RawReply {
                        bytes,
                        ending: Ending::Closed,
                    }
                }
                Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return RawReply {
                        bytes,
                        ending: Ending::Reset,
                    }
                }
                Ok(Err(_)) => {
                    return RawReply {
                        bytes,
                        ending: Ending::Closed,
                    }
                }
            }
        }
    }

    /// Reads until `n` complete responses arrived (then returns with [`Ending::Open`]), the
    /// connection ends, or `timeout` passes.
    pub async fn read_responses(&mut self, n: usize, timeout: Duration) -> RawReply {
        let deadline = Instant::now() + timeout;
        let mut bytes = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if parse_responses(&bytes)
                .iter()
                .filter(|r| r.complete)
                .count()
                >= n
            {
                return RawReply {
                    bytes,
                    ending: Ending::Open,
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Err(_) => {
                    return RawReply {
                        bytes,
                        ending: Ending::Open,
                    }
                }
                Ok(Ok(0)) => {
                    return RawReply {
                        bytes,
                        ending: Ending::Closed,
                    }
                }
                Ok(Ok(k)) => bytes.extend_from_slice(&buf[..k]),
                Ok(Err(e)) => {
                    let ending = if e.kind() == std::io::ErrorKind::ConnectionReset {
                        Ending::Reset
                    } else {
                        Ending::Closed
                    };
                    return RawReply { bytes, ending };
                }
            }
        }
    }
}

/// Sends `bytes` on a fresh connection from 127.0.0.1 and reads until the server ends the
/// connection or `timeout` passes.
pub async fn exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> RawReply {
    let mut c = RawConn::connect(addr).await;
    c.send(bytes).await;
    c.read_to_end(timeout).await
}

/// One response split out of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Headers (names lower-cased).
    pub headers: Vec<(String, String)>,
    /// Body bytes received (up to `Content-Length`, or to the end without one).
    pub body: Vec<u8>,
    /// Whether the whole body announced by `Content-Length` (or chunked framing) arrived.
    pub complete: bool,
}

impl RawResponse {
    /// A header's value ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// Whether `Connection` carries `close`.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("close"))
    }
}

/// Splits a client-side byte stream into responses (1xx interim responses included). Stops
/// at the first thing that is not a response; the last one may be incomplete.
pub fn parse_responses(mut bytes: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = res.parse(bytes) else {
            break;
        };
        let status = res.code.unwrap_or(0);
        let hs: Vec<(String, String)> = res
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let rest = &bytes[head..];
        let cl = hs
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.trim().parse::<usize>().ok());
        let chunked = hs
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
        let no_body = status < 200 || status == 204 || status == 304;
        let (body, used, complete) = if no_body {
            (Vec::new(), 0, true)
        } else if chunked {
            dechunk(rest)
        } else if let Some(n) = cl {
            let take = n.min(rest.len());
            (rest[..take].to_vec(), take, take == n)
        } else {
            (rest.to_vec(), rest.len(), true)
        };
        out.push(RawResponse {
            status,
            headers: hs,
            body,
            complete,
        });
        bytes = &rest[used..];
    }
    out
}

/// (body, bytes used, complete) of a chunked body at the start of `b`.
fn dechunk(b: &[u8]) -> (Vec<u8>, usize, bool) {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = find_crlf(&b[at..]) else {
            return (body, b.len(), false);
        };
        let size = std::str::from_utf8(&b[at..at + eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size else {
            return (body, b.len(), false);
        };
        at += eol + 2;
        if size == 0 {
            // Trailers until the empty line.
            while let Some(eol) = find_crlf(&b[at..]) {
                at += eol + 2;
                if eol == 0 {
                    return (body, at, true);
                }
            }
            return (body, b.len(), false);
        }
        if b.len() < at + size + 2 {
            body.extend_from_slice(&b[at..b.len().min(at + size)]);
            return (body, b.len(), false);
        }
        body.extend_from_slice(&b[at..at + size]);
        at += size + 2;
    }
}

// === the P1 corpus ===

/// The P1 smuggling corpus (SCENARIOS.md §2.5), shared by `tests/smuggling.rs` (the gateway
/// and hyper alone) and `tests/nightly_security.rs` (nginx-light and haproxy).
pub mod corpus {
    /// What the gateway must do with a case.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Want {
        /// Unambiguous: both the case and the benign request are forwarded and answered 200.
        Forward,
        /// Ambiguous head: one `400` with `Connection: close`, the connection closes, nothing of
        /// the case reaches the upstream.
        Refuse,
        /// A body hyper cannot follow (chunk framing): nothing after it on the connection is
        /// served — no `/smuggled`, no `/benign`, no 2xx — and the connection closes.
        Cut,
    }

    /// P1 cases: (name, what the gateway must do, bytes). `{N}` is replaced by the case number.
    pub const CORPUS: &[(&str, Want, &str)] = &[
    // Controls.
    ("get", Want::Forward, "GET /c{N} HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("post-cl", Want::Forward, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"),
    ("post-chunked", Want::Forward, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("chunked-upper-ext-trailer", Want::Forward, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\n\r\n5;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
    ("absolute-form-same-host", Want::Forward, "GET http://x/c{N} HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("http10-cl", Want::Forward, "POST /c{N} HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"),
    ("underscore-te-is-another-header", Want::Forward, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\nContent-Length: 2\r\n\r\nhi"),
    // The three classic desyncs.
    ("CL.TE", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: 36\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\nX: "),
    ("TE.CL", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n23\r\nGET /smuggled{N} HTTP/1.1\r\nX: y\r\n\r\n0\r\n\r\n"),
    ("TE.TE-cow", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: cow\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("CL.TE-te-first", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    // Transfer-Encoding variants.
    ("te-chunked-chunked", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-chunked-gzip", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-gzip-chunked", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-gzip", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-identity", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nhi"),
    ("te-xchunked", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-chunkedx", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunkedx\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-leading-tab", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-two-spaces", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:  chunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-trailing-space", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked \r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-vertical-tab", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-space-before-colon", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-leading-space-line", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-obs-fold", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-duplicate-lines", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-gzip-then-chunked-lines", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-http10", Want::Refuse, "POST /c{N} HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("te-http10-with-cl", Want::Refuse, "POST /c{N} HTTP/1.0\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    // Content-Length variants.
    ("cl-duplicate-same", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi"),
    ("cl-duplicate-differ", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 38\r\n\r\nhiGET /smuggled{N} HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("cl-list", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\nhi"),
    ("cl-plus", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\nhi"),
    ("cl-minus", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\nhi"),
    ("cl-leading-zeros", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: 002\r\n\r\nhi"),
    ("cl-exponent", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\nhi"),
    ("cl-hex", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: 0x2\r\n\r\nhi"),
    ("cl-overflow-2^64", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551618\r\n\r\nhi"),
    ("cl-empty", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\nhi"),
    ("cl-space-before-colon", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length : 2\r\n\r\nhi"),
    ("cl-inner-space", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\r\nContent-Length: 1 2\r\n\r\nhi"),
    // Chunk framing.
    ("chunk-size-overflow", Want::Cut, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000002\r\nhi\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("chunk-garbage-extension", Want::Cut, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2;\nx\r\nhi\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("chunk-bad-size", Want::Cut, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2g\r\nhi\r\n0\r\n\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("chunk-runaway", Want::Cut, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhiGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("chunk-bare-lf", Want::Cut, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\nhi\n0\n\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    ("chunk-missing-final-crlf", Want::Cut, "POST /c{N} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nGET /smuggled{N} HTTP/1.1\r\n\r\n"),
    // Line and header syntax.
    ("bare-lf-head", Want::Refuse, "GET /c{N} HTTP/1.1\nHost: x\n\n"),
    ("bare-lf-one-line", Want::Refuse, "POST /c{N} HTTP/1.1\r\nHost: x\nContent-Length: 2\r\n\r\nhi"),
    ("bare-cr", Want::Refuse, "GET /c{N} HTTP/1.1\rHost: x\r\n\r\n"),
    ("obs-fold", Want::Refuse, "GET /c{N} HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"),
    ("nul-in-value", Want::Refuse, "GET /c{N} HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n"),
    ("cr-in-value", Want::Refuse, "GET /c{N} HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n"),
    ("space-in-name", Want::Refuse, "GET /c{N} HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n"),
    ("no-header-colon", Want::Refuse, "GET /c{N} HTTP/1.1\r\nHost: x\r\nX-A\r\n\r\n"),
    // Host ambiguity.
    ("two-hosts", Want::Refuse, "GET /c{N} HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
    ("absolute-form-other-host", Want::Refuse, "GET http://a.example/c{N} HTTP/1.1\r\nHost: b.example\r\n\r\n"),
    ("absolute-form-other-port", Want::Refuse, "GET http://x:81/c{N} HTTP/1.1\r\nHost: x\r\n\r\n"),
];

    /// The benign request sent after every case, on the same connection.
    pub const BENIGN: &str = "GET /benign{N} HTTP/1.1\r\nHost: x\r\n\r\n";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_parser_counts_and_refuses() {
        let two =
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\r\n";
        let Strict::Complete(a, used) = parse_request(two) else {
            panic!("first request")
        };
        assert_eq!((a.target.as_str(), a.body.as_slice()), ("/a", &b"hi"[..]));
        assert!(matches!(parse_request(&two[used..]), Strict::Complete(..)));
        let chunked =
            b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let Strict::Complete(c, used) = parse_request(chunked) else {
            panic!("chunked")
        };
        assert_eq!((c.body.as_slice(), used), (&b"abc"[..], chunked.len()));
        for bad in [
            &b"GET / HTTP/1.1\nHost: x\n\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(parse_request(bad), Strict::Error(_)));
        }
    }

    #[test]
    fn responses_are_split() {
        let b = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 400 Bad Request\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf";
        let r = parse_responses(b);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].status, r[0].complete), (200, true));
        assert!(r[1].closes());
        assert_eq!(r[1].body, b"no");
        assert_eq!((r[2].body.as_slice(), r[2].complete), (&b"half"[..], false));
    }
}
