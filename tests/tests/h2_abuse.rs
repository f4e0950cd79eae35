//! P5 — HTTP/2 abuse (SCENARIOS.md §2.5), short CI form, against the real binary in front of
//! the in-repo [`Upstream`].
//!
//! The attacks are hand-written frames over a `TcpStream` (h2c prior knowledge): a frame is a
//! 9-byte header and a payload, and the request heads are HPACK "literal without indexing",
//! which is a few bytes to encode (see [`Frames`] and [`Block`]). A reader task parses what
//! the gateway sends back (SETTINGS, GOAWAY, RST_STREAM, response HEADERS) into [`Seen`].
//! Legitimate h2 traffic runs on another connection (hyper's client, which is h2 underneath)
//! during each attack and must keep succeeding (≥ 99 %).
//!
//! Per case: (a) rapid reset, (b) CONTINUATION flood, (c) SETTINGS and PING floods,
//! (d) 1,000 streams against `max_concurrent_streams` 100, (e) a header list over
//! `max_header_list_size`, (f) invalid pseudo-headers and `:authority` vs `host`,
//! (g) a zero-window stall, and (h) per-client quotas counting streams like requests. Each
//! scenario takes [`SERIAL`]; the figures of the last run are in `docs/reliability/h2.md`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fairgate_tests::proc::{self, Sampler, MIB};
use fairgate_tests::{eventually, Client, Gateway, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Scenarios in this file never run at the same time.
pub(crate) static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types and flags (RFC 9113 §6).
pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
pub(crate) const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
pub(crate) const PING: u8 = 0x6;
pub(crate) const GOAWAY: u8 = 0x7;
pub(crate) const CONTINUATION: u8 = 0x9;
pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;

// Error codes.
pub(crate) const PROTOCOL_ERROR: u32 = 0x1;
pub(crate) const CANCEL: u32 = 0x8;
pub(crate) const REFUSED_STREAM: u32 = 0x7;
pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Most RSS growth allowed during one attack (SCENARIOS.md P5).
pub(crate) const RSS_BUDGET: u64 = 64 * MIB;
/// Most gateway CPU one attack connection may cost (SCENARIOS.md P5).
pub(crate) const CPU_BUDGET: f64 = 1.0;

pub(crate) fn config(upstream: &Upstream, limits: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
workers: 1
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
limits:
  max_header_bytes: 16KiB
{limits}
log: {{decisions: off}}
",
        upstream.addr
    )
}

// === frames ===

/// Appends one frame to `out`.
pub(crate) fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Frame builders over one output buffer.
#[derive(Default)]
pub(crate) struct Frames(pub(crate) Vec<u8>);

impl Frames {
    pub(crate) fn settings(mut self, params: &[(u16, u32)]) -> Self {
        let mut p = Vec::new();
        for (id, v) in params {
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&v.to_be_bytes());
        }
        frame(&mut self.0, SETTINGS, 0, 0, &p);
        self
    }
    pub(crate) fn settings_ack(mut self) -> Self {
        frame(&mut self.0, SETTINGS, ACK, 0, &[]);
        self
    }
    pub(crate) fn headers(mut self, stream: u32, flags: u8, block: &[u8]) -> Self {
        frame(&mut self.0, HEADERS, flags, stream, block);
        self
    }
    pub(crate) fn continuation(mut self, stream: u32, flags: u8, block: &[u8]) -> Self {
        frame(&mut self.0, CONTINUATION, flags, stream, block);
        self
    }
    pub(crate) fn rst(mut self, stream: u32, code: u32) -> Self {
        frame(&mut self.0, RST_STREAM, 0, stream, &code.to_be_bytes());
        self
    }
    pub(crate) fn ping(mut self, data: u64) -> Self {
        frame(&mut self.0, PING, 0, 0, &data.to_be_bytes());
        self
    }
    /// A complete GET on `stream`.
    pub(crate) fn get(self, stream: u32, path: &str) -> Self {
        self.headers(stream, END_STREAM | END_HEADERS, &Block::get(path).0)
    }
}

/// An HPACK header block: static-table indexes and literals without indexing (no Huffman).
#[derive(Default, Clone)]
pub(crate) struct Block(pub(crate) Vec<u8>);

impl Block {
    /// `GET path` with `:scheme http` and `:authority gw`.
    pub(crate) fn get(path: &str) -> Block {
        Block::default()
            .indexed(2) // :method GET
            .indexed(6) // :scheme http
            .name_ref(4, path) // :path
            .name_ref(1, "gw") // :authority
    }
    pub(crate) fn indexed(mut self, index: u8) -> Block {
        self.0.push(0x80 | index);
        self
    }
    /// A literal whose name is static-table entry `index` (< 15).
    pub(crate) fn name_ref(mut self, index: u8, value: &str) -> Block {
        self.0.push(index);
        hpack_string(&mut self.0, value.as_bytes());
        self
    }
    /// A literal with a literal name.
    pub(crate) fn literal(mut self, name: &str, value: &str) -> Block {
        self.0.push(0);
        hpack_string(&mut self.0, name.as_bytes());
        hpack_string(&mut self.0, value.as_bytes());
        self
    }
}

/// An HPACK string literal (no Huffman): 7-bit-prefix length, then the bytes.
pub(crate) fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

// === the attacking connection ===

/// What the gateway sent on one raw connection.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) settings: usize,
    pub(crate) settings_acks: usize,
    pub(crate) pings_acked: usize,
    /// `(last stream id, error code)`.
    pub(crate) goaway: Option<(u32, u32)>,
    /// `(stream, error code)`.
    pub(crate) resets: Vec<(u32, u32)>,
    /// `(stream, status)` of response heads; status 0 when it is not a static-table index.
    pub(crate) responses: Vec<(u32, u16)>,
    pub(crate) data_bytes: usize,
    /// The gateway closed (EOF or reset).
    pub(crate) closed: bool,
}

impl Seen {
    pub(crate) fn resets_with(&self, code: u32) -> usize {
        self.resets.iter().filter(|(_, c)| *c == code).count()
    }
    pub(crate) fn response(&self, stream: u32) -> Option<u16> {
        self.responses
            .iter()
            .find(|(s, _)| *s == stream)
            .map(|(_, st)| *st)
    }
    pub(crate) fn reset(&self, stream: u32) -> Option<u32> {
        self.resets
            .iter()
            .find(|(s, _)| *s == stream)
            .map(|(_, c)| *c)
    }
    /// GOAWAY received, or the connection closed.
    pub(crate) fn ended(&self) -> bool {
        self.goaway.is_some() || self.closed
    }
}

/// The status of a response head from its first HPACK bytes (static table 8..=14, or 431);
/// 0 for anything else.
pub(crate) fn status_of(block: &[u8]) -> u16 {
    match block.first() {
        Some(0x88) => 200,
        Some(0x89) => 204,
        Some(0x8a) => 206,
        Some(0x8b) => 304,
        Some(0x8c) => 400,
        Some(0x8d) => 404,
        Some(0x8e) => 500,
        // `:status` (static name 8) with the Huffman-coded literal "431", as h2 writes it.
        Some(0x48 | 0x08) if block.get(1..5) == Some(&[0x83, 0x69, 0x90, 0xff]) => 431,
        _ => 0,
    }
}

/// A raw h2c connection to the gateway: the test writes frames, a reader task records what
/// comes back (unless the connection was opened with `read: false` after the handshake).
pub(crate) struct Raw {
    w: OwnedWriteHalf,
    seen: Arc<Mutex<Seen>>,
    reading: tokio::sync::watch::Sender<bool>,
    reader: JoinHandle<()>,
}

impl Raw {
    /// Connects, sends the preface and `settings`, waits for the gateway's SETTINGS and
    /// acknowledges them (h2 applies its own limits once they are acknowledged).
    pub(crate) async fn open(addr: SocketAddr, settings: &[(u16, u32)]) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (mut r, w) = stream.into_split();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (reading, mut reading2) = tokio::sync::watch::channel(true);
        let s2 = seen.clone();
        let reader = tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                // Paused: wait until reading is on again (or the connection is gone).
                if reading2.wait_for(|on| *on).await.is_err() {
                    return;
                }
                match r.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        s2.lock().unwrap().closed = true;
                        return;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                let mut at = 0;
                while buf.len() - at >= 9 {
                    let h = &buf[at..at + 9];
                    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    if buf.len() - at < 9 + len {
                        break;
                    }
                    let (ty, flags) = (h[3], h[4]);
                    let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    let p = &buf[at + 9..at + 9 + len];
                    let mut s = s2.lock().unwrap();
                    match ty {
                        SETTINGS if flags & ACK != 0 => s.settings_acks += 1,
                        SETTINGS => s.settings += 1,
                        PING if flags & ACK != 0 => s.pings_acked += 1,
                        GOAWAY if p.len() >= 8 => {
                            let last = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff;
                            let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                            s.goaway.get_or_insert((last, code));
                        }
                        RST_STREAM if p.len() >= 4 => {
                            s.resets
                                .push((id, u32::from_be_bytes([p[0], p[1], p[2], p[3]])));
                        }
                        HEADERS => {
                            let pad = if flags & 0x8 != 0 { 1 } else { 0 };
                            let prio = if flags & 0x20 != 0 { 5 } else { 0 };
                            let block = p.get(pad + prio..).unwrap_or_default();
                            let status = status_of(block);
                            // Trailers would be a second HEADERS on the stream; keep the first.
                            if s.response(id).is_none() {
                                s.responses.push((id, status));
                            }
                        }
                        DATA => s.data_bytes += len,
                        _ => {}
                    }
                    at += 9 + len;
                }
                buf.drain(..at);
            }
        });
        let mut raw = Raw {
            w,
            seen,
            reading,
            reader,
        };
        let mut hello = PREFACE.to_vec();
        hello.extend_from_slice(&Frames::default().settings(settings).0);
        raw.send(&hello).await.expect("preface");
        let s = raw.seen.clone();
        assert!(
            eventually(Duration::from_secs(5), || {
                let s = s.clone();
                async move { s.lock().unwrap().settings > 0 }
            })
            .await,
            "no SETTINGS from the gateway"
        );
        raw.send(&Frames::default().settings_ack().0)
            .await
            .expect("settings ack");
        raw
    }

    /// Writes `bytes`; an error means the gateway closed the connection.
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.w.write_all(bytes).await
    }

    /// Stops reading (the kernel buffers fill, then the gateway's writes block).
    pub(crate) fn pause_reading(&self) {
        self.reading.send_replace(false);
    }

    /// Waits up to `timeout` for `check` on what was seen.
    pub(crate) async fn wait(&self, timeout: Duration, check: impl Fn(&Seen) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if check(&self.seen.lock().unwrap()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

// === legitimate traffic and measurements ===

/// Legitimate h2c requests on their own connection, paced, until stopped.
pub(crate) struct Legit {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    sent: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Legit {
    pub(crate) fn start(gw: &Gateway) -> Legit {
        let url = gw.url("/legit");
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicUsize::new(0));
        let (stop2, ok2, sent2) = (stop.clone(), ok.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let client = Client::h2c();
            while !stop2.load(Ordering::SeqCst) {
                sent2.fetch_add(1, Ordering::SeqCst);
                let req = http::Request::get(&url)
                    .body(fairgate_tests::empty())
                    .expect("request");
                let r = tokio::time::timeout(Duration::from_secs(5), client.try_send(req)).await;
                if matches!(r, Ok(Ok(ref reply)) if reply.status == 200) {
                    ok2.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Legit {
            stop,
            ok,
            sent,
            task,
        }
    }

    /// Waits until `n` requests succeeded (or 10 s passed).
    pub(crate) async fn warm(&self, n: usize) {
        let ok = self.ok.clone();
        eventually(Duration::from_secs(10), || {
            let ok = ok.clone();
            async move { ok.load(Ordering::SeqCst) >= n }
        })
        .await;
    }

    /// Lets at least 20 requests run, stops, and asserts ≥ 99 % success; returns
    /// `(ok, sent)`.
    pub(crate) async fn finish(self, case: &str) -> (usize, usize) {
        let sent = self.sent.clone();
        eventually(Duration::from_secs(10), || {
            let sent = sent.clone();
            async move { sent.load(Ordering::SeqCst) >= 21 }
        })
        .await;
        self.stop.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let (ok, sent) = (
            self.ok.load(Ordering::SeqCst),
            self.sent.load(Ordering::SeqCst),
        );
        assert!(sent >= 20, "{case}: only {sent} legitimate requests ran");
        assert!(
            ok * 100 >= sent * 99,
            "{case}: legitimate success {ok}/{sent} is below 99 %"
        );
        (ok, sent)
    }
}

/// Gateway CPU and RSS around one attack.
pub(crate) struct Cost {
    pid: u32,
    cpu0: f64,
    rss0: u64,
    sampler: Sampler,
}

impl Cost {
    pub(crate) fn start(gw: &Gateway) -> Cost {
        let pid = gw.pid();
        Cost {
            pid,
            cpu0: proc::cpu_seconds(pid).expect("cpu"),
            rss0: proc::rss(pid).expect("rss"),
            sampler: Sampler::start(pid, Duration::from_millis(100)),
        }
    }

    /// `(cpu seconds, rss rise in bytes)`, asserted against the P5 budgets.
    pub(crate) fn finish(self, case: &str, connections: f64) -> (f64, u64) {
        let cpu = proc::cpu_seconds(self.pid).expect("cpu") - self.cpu0;
        let mut series = self.sampler.stop();
        let now = proc::rss(self.pid).expect("rss");
        let peak = proc::max_rss(&series).max(now);
        series.clear();
        let rise = peak.saturating_sub(self.rss0);
        println!(
            "{case}: gateway cpu {cpu:.3}s, rss {:.1} MiB -> peak {:.1} MiB (+{:.1} MiB)",
            self.rss0 as f64 / MIB as f64,
            peak as f64 / MIB as f64,
            rise as f64 / MIB as f64
        );
        assert!(
            cpu <= CPU_BUDGET * connections,
            "{case}: gateway used {cpu:.3} CPU-seconds for {connections} attack connection(s)"
        );
        assert!(
            rise < RSS_BUDGET,
            "{case}: gateway RSS rose {} MiB",
            rise / MIB
        );
        (cpu, rise)
    }
}

/// Requests the upstream received for `path`.
pub(crate) fn attack_requests(up: &Upstream, path: &str) -> usize {
    up.requests().iter().filter(|r| r.uri == path).count()
}

// === scenarios ===

/// (a) Rapid reset (CVE-2023-44487): 10,000 HEADERS + RST_STREAM pairs on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_gets_goaway_well_before_10k() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, ""));
    let legit = Legit::start(&gw);
    let cost = Cost::start(&gw);

    let mut raw = Raw::open(gw.data, &[]).await;
    let mut pairs_sent = 0u32;
    'attack: for batch in 0..100u32 {
        let mut f = Frames::default();
        for i in 0..100u32 {
            let id = 1 + 2 * (batch * 100 + i);
            f = f.get(id, "/rr").rst(id, CANCEL);
        }
        if raw.send(&f.0).await.is_err() {
            break 'attack;
        }
        pairs_sent += 100;
        if raw.seen().ended() {
            break 'attack;
        }
    }
    assert!(
        raw.wait(Duration::from_secs(10), Seen::ended).await,
        "rapid reset: no GOAWAY and no close after {pairs_sent} pairs"
    );
    let (goaway, closed) = {
        let s = raw.seen();
        (s.goaway, s.closed)
    };
    let (cpu, rise) = cost.finish("rapid reset", 1.0);
    let (ok, sent) = legit.finish("rapid reset").await;
    // Whatever the gateway had dispatched has reached the upstream once nothing is in flight.
    eventually(Duration::from_secs(5), || {
        let up = up.clone();
        async move { up.in_flight() == 0 }
    })
    .await;
    let upstream = attack_requests(&up, "/rr");
    println!(
        "rapid reset: {pairs_sent} pairs written, goaway {goaway:?}, closed {closed}, \
         upstream saw {upstream} attack requests, cpu {cpu:.3}s, rss +{} KiB, legit {ok}/{sent}",
        rise / 1024
    );
    if let Some((last, code)) = goaway {
        assert_eq!(code, ENHANCE_YOUR_CALM, "rapid reset: GOAWAY code");
        assert!(
            last < 2 * 1000,
            "rapid reset: GOAWAY last stream {last}: more than 1,000 streams accepted"
        );
    }
    // The bound: no more than 1,000 of the 10,000 reset requests reach the upstream.
    assert!(
        upstream <= 1000,
        "rapid reset: the upstream saw {upstream} attack requests"
    );
}

/// (b) CONTINUATION flood: one HEADERS without END_HEADERS and then CONTINUATION frames
/// that never end the block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_continuation_flood_is_closed_with_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, ""));
    let legit = Legit::start(&gw);
    let cost = Cost::start(&gw);

    let mut raw = Raw::open(gw.data, &[]).await;
    let start = Block::get("/cont").0;
    raw.send(&Frames::default().headers(1, END_STREAM, &start).0)
        .await
        .expect("headers");
    // 4 KiB of literal headers per frame, up to 64 MiB in all.
    let mut piece = Block::default();
    while piece.0.len() < 4000 {
        piece = piece.literal(
            "x-flood",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        );
    }
    let mut batch = Frames::default();
    for _ in 0..64 {
        batch = batch.continuation(1, 0, &piece.0);
    }
    let mut flood_bytes = 0usize;
    for _ in 0..256 {
        if raw.send(&batch.0).await.is_err() || raw.seen().ended() {
            break;
        }
        flood_bytes += batch.0.len();
    }
    assert!(
        raw.wait(Duration::from_secs(10), Seen::ended).await,
        "continuation flood: still open after {} KiB",
        flood_bytes / 1024
    );
    let goaway = raw.seen().goaway;
    let (cpu, rise) = cost.finish("continuation flood", 1.0);
    let (ok, sent) = legit.finish("continuation flood").await;
    let forwarded = attack_requests(&up, "/cont");
    println!(
        "continuation flood: {} KiB written before the end, goaway {goaway:?}, cpu {cpu:.3}s, \
         rss +{} KiB, forwarded {forwarded}, legit {ok}/{sent}",
        flood_bytes / 1024,
        rise / 1024
    );
    assert_eq!(forwarded, 0, "continuation flood: a request was forwarded");
    // The block limit is the 16 KiB header list; the gateway must stop well before 64 MiB.
    assert!(
        flood_bytes < 8 * MIB as usize,
        "continuation flood: the gateway read {} KiB before closing",
        flood_bytes / 1024
    );
}

/// (c) 100k SETTINGS frames on one connection and 100k PING frames on another, read back
/// as fast as the gateway answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_settings_and_ping_floods_cost_bounded_cpu() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    let gw = Gateway::start(&config(&up, ""));
    let legit = Legit::start(&gw);

    for kind in ["settings", "ping"] {
        let cost = Cost::start(&gw);
        let mut raw = Raw::open(gw.data, &[]).await;
        let mut batch = Frames::default();
        for i in 0..1000u64 {
            batch = match kind {
                "settings" => batch.settings(&[(0x4, 65_535)]),
                _ => batch.ping(i),
            };
        }
        let mut frames = 0usize;
        for _ in 0..100 {
            if raw.send(&batch.0).await.is_err() {
                break;
            }
            frames += 1000;
        }
        // Absorbed (every frame answered) or ended.
        let answered = |s: &Seen| match kind {
            "settings" => s.settings_acks >= frames,
            _ => s.pings_acked >= frames,
        };
        assert!(
            raw.wait(Duration::from_secs(20), |s| s.ended() || answered(s))
                .await,
            "{kind} flood: neither answered nor ended"
        );
        let (acks, goaway, closed) = {
            let s = raw.seen();
            let acks = if kind == "settings" {
                s.settings_acks
            } else {
                s.pings_acked
            };
            (acks, s.goaway, s.closed)
        };
        let (cpu, rise) = cost.finish(&format!("{kind} flood"), 1.0);
        println!(
            "{kind} flood: {frames} frames written, {acks} acks, goaway {goaway:?}, closed \
             {closed}, cpu {cpu:.3}s, rss +{} KiB",
            rise / 1024
        );
    }
    let (ok, sent) = legit.finish("settings/ping floods").await;
    println!("settings/ping floods: legit {ok}/{sent}");
}

/// (d) 1,000 streams at once against `max_concurrent_streams: 100`, first ignoring the
/// gateway's SETTINGS (raw frames: the excess is refused), then respecting them (hyper's
/// client queues); the upstream never has more than 100 in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_streams_over_max_concurrent_are_refused() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    let gw = Gateway::start(&config(&up, "  http2: {max_concurrent_streams: 100}"));
    let legit = Legit::start(&gw);
    let cost = Cost::start(&gw);
    up.state.delay_ms.store(1000, Ordering::SeqCst);
    up.reset_max_in_flight();

    let mut raw = Raw::open(gw.data, &[]).await;
    let mut f = Frames::default();
    for i in 0..1000u32 {
        f = f.get(1 + 2 * i, "/d?delay_ms=1000");
    }
    raw.send(&f.0).await.expect("streams");
    assert!(
        raw.wait(Duration::from_secs(15), |s| s.ended()
            || s.responses.len() + s.resets.len() >= 1000)
            .await,
        "1,000 streams: not every stream was answered or refused"
    );
    let (refused, answered, other_resets, goaway) = {
        let s = raw.seen();
        let refused = s.resets_with(REFUSED_STREAM);
        (
            refused,
            s.responses.iter().filter(|(_, st)| *st == 200).count(),
            s.resets.len() - refused,
            s.goaway,
        )
    };
    let max_raw = up.max_in_flight();
    println!(
        "1,000 raw streams: {answered} answered 200, {refused} refused, {other_resets} other \
         resets, goaway {goaway:?}, upstream max in flight {max_raw}"
    );
    assert_eq!(goaway, None, "1,000 streams: GOAWAY");
    assert_eq!(answered, 100, "1,000 streams: answered");
    assert_eq!(refused, 900, "1,000 streams: refused");
    assert!(max_raw <= 101, "upstream in flight {max_raw}");
    drop(raw);

    // A client that respects SETTINGS: 1,000 requests on one h2 connection, all answered.
    up.state.delay_ms.store(100, Ordering::SeqCst);
    up.reset_max_in_flight();
    let client = Client::h2c();
    let url = gw.url("/d2");
    let replies = futures_util::future::join_all((0..1000).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let req = http::Request::get(&url)
                .body(fairgate_tests::empty())
                .expect("request");
            client.try_send(req).await.map(|r| r.status.as_u16())
        }
    }))
    .await;
    let ok = replies.iter().filter(|r| matches!(r, Ok(200))).count();
    let max_polite = up.max_in_flight();
    let (cpu, rise) = cost.finish("1,000 streams", 2.0);
    let (lok, lsent) = legit.finish("1,000 streams").await;
    println!(
        "1,000 polite streams: {ok} ok, upstream max in flight {max_polite}; cpu {cpu:.3}s, \
         rss +{} KiB, legit {lok}/{lsent}",
        rise / 1024
    );
    assert_eq!(
        ok,
        1000,
        "polite streams: {:?}",
        replies.iter().find(|r| r.is_err())
    );
    // One more than 100 for the legitimate connection's request.
    assert!(max_polite <= 101, "upstream in flight {max_polite}");
}

/// (e) A header list over `max_header_list_size` (16 KiB here): refused, never forwarded,
/// and the connection still serves the next stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_header_list_over_the_limit_is_refused() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, ""));
    let legit = Legit::start(&gw);

    let mut raw = Raw::open(gw.data, &[]).await;
    let big = Block::get("/big")
        .literal("x-big", &"b".repeat(20 * 1024))
        .0;
    // Split over HEADERS + CONTINUATION (frames are at most 16 KiB).
    let f = Frames::default()
        .headers(1, END_STREAM, &big[..10_000])
        .continuation(1, END_HEADERS, &big[10_000..])
        .get(3, "/after");
    raw.send(&f.0).await.expect("send");
    assert!(
        raw.wait(Duration::from_secs(5), |s| s.ended()
            || (s.response(1).is_some() || s.reset(1).is_some())
                && s.response(3).is_some())
            .await,
        "header list: no answer"
    );
    let (r1, rst1, r3, goaway) = {
        let s = raw.seen();
        (s.response(1), s.reset(1), s.response(3), s.goaway)
    };
    let (ok, sent) = legit.finish("header list").await;
    let forwarded: Vec<String> = up.requests().iter().map(|r| r.uri.clone()).collect();
    println!(
        "header list: stream 1 response {r1:?} reset {rst1:?}; next stream {r3:?}; goaway \
         {goaway:?}; forwarded {:?}; legit {ok}/{sent}",
        forwarded
            .iter()
            .filter(|u| *u != "/legit")
            .collect::<Vec<_>>()
    );
    assert!(
        !forwarded.iter().any(|u| u == "/big"),
        "the oversized header list was forwarded"
    );
    assert_eq!(r1, Some(431), "header list: stream 1 (reset {rst1:?})");
    assert_eq!(goaway, None, "header list: the connection was closed");
    assert_eq!(r3, Some(200), "header list: the next stream was not served");
}

/// (f) Malformed request heads (RFC 9113 §8.3) are stream errors and never forwarded; a
/// `host` that differs from `:authority` is recorded (see `docs/reliability/h2.md`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_invalid_pseudo_headers_are_refused() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, ""));
    let legit = Legit::start(&gw);

    let base = || Block::default().indexed(2).indexed(6);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unknown pseudo-header",
            base()
                .name_ref(4, "/f1")
                .name_ref(1, "gw")
                .literal(":foo", "bar")
                .0,
        ),
        (
            "pseudo-header after a regular one",
            base()
                .name_ref(4, "/f2")
                .literal("x-a", "1")
                .name_ref(1, "gw")
                .0,
        ),
        ("missing :path", base().name_ref(1, "gw").0),
        (
            "two :path",
            base()
                .name_ref(4, "/f4")
                .name_ref(4, "/f4b")
                .name_ref(1, "gw")
                .0,
        ),
        (
            "upper-case name",
            base()
                .name_ref(4, "/f5")
                .name_ref(1, "gw")
                .literal("X-Upper", "1")
                .0,
        ),
        (
            "connection-specific header",
            base()
                .name_ref(4, "/f6")
                .name_ref(1, "gw")
                .literal("connection", "keep-alive")
                .0,
        ),
        ("empty :path", base().name_ref(4, "").name_ref(1, "gw").0),
        (
            ":status in a request",
            base()
                .name_ref(4, "/f8")
                .name_ref(1, "gw")
                .name_ref(8, "200")
                .0,
        ),
    ];
    for (i, (name, block)) in cases.iter().enumerate() {
        let mut raw = Raw::open(gw.data, &[]).await;
        let f = Frames::default().headers(1, END_STREAM | END_HEADERS, block);
        raw.send(&f.0).await.expect("send");
        assert!(
            raw.wait(Duration::from_secs(5), |s| s.ended()
                || s.response(1).is_some()
                || s.reset(1).is_some())
                .await,
            "{name}: no answer"
        );
        let (r, rst, goaway) = {
            let s = raw.seen();
            (s.response(1), s.reset(1), s.goaway)
        };
        println!(
            "(f{}) {name}: response {r:?}, reset {rst:?}, goaway {goaway:?}",
            i + 1
        );
        assert!(
            r.is_some_and(|s| s == 400) || rst == Some(PROTOCOL_ERROR) || goaway.is_some(),
            "{name}: response {r:?}, reset {rst:?}"
        );
    }
    let forwarded: Vec<String> = up
        .requests()
        .iter()
        .map(|r| r.uri.clone())
        .filter(|u| u != "/legit")
        .collect();
    assert!(
        forwarded.is_empty(),
        "malformed heads forwarded: {forwarded:?}"
    );

    // `:authority` and `host` that disagree: record what the gateway does.
    let mut raw = Raw::open(gw.data, &[]).await;
    let block = base()
        .name_ref(4, "/conflict")
        .name_ref(1, "a.example")
        .literal("host", "b.example")
        .0;
    raw.send(
        &Frames::default()
            .headers(1, END_STREAM | END_HEADERS, &block)
            .0,
    )
    .await
    .expect("send");
    assert!(
        raw.wait(Duration::from_secs(5), |s| s.ended()
            || s.response(1).is_some()
            || s.reset(1).is_some())
            .await,
        "authority/host conflict: no answer"
    );
    let (r, rst) = {
        let s = raw.seen();
        (s.response(1), s.reset(1))
    };
    let hosts: Vec<String> = up
        .requests()
        .iter()
        .filter(|r| r.uri == "/conflict")
        .map(|r| format!("{:?}", r.headers.get("host")))
        .collect();
    println!("(f9) :authority a.example vs host b.example: response {r:?}, reset {rst:?}, upstream host {hosts:?}");
    // RFC 9113 §8.3.1: malformed. Routing reads `:authority`; the upstream must not get
    // another `Host`.
    assert_eq!(
        r,
        Some(400),
        "authority/host conflict answered {r:?} / {rst:?}"
    );
    assert!(hosts.is_empty(), "forwarded with host {hosts:?}");
    let (ok, sent) = legit.finish("invalid pseudo-headers").await;
    println!("invalid pseudo-headers: legit {ok}/{sent}");
}

/// (g) Zero-window stall: the client advertises a 0 stream window, asks for 8 MiB and never
/// reads. The gateway's memory stays bounded; with `keep_alive_interval` the unanswered PING
/// closes the connection and the upstream connection is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_zero_window_stall_is_bounded_and_closed() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(
        &up,
        "  http2: {keep_alive_interval: 1s, keep_alive_timeout: 1s}",
    ));
    let legit = Legit::start(&gw);
    legit.warm(3).await;
    let fds0 = proc::fd_count(gw.pid()).expect("fds");
    let cost = Cost::start(&gw);

    let mut raw = Raw::open(gw.data, &[(0x4, 0)]).await;
    raw.send(&Frames::default().get(1, "/bytes/8388608").0)
        .await
        .expect("send");
    assert!(
        raw.wait(Duration::from_secs(5), |s| s.response(1).is_some())
            .await,
        "zero window: no response head"
    );
    raw.pause_reading();
    let stalled_fds = proc::fd_count(gw.pid()).expect("fds");
    // hyper PINGs after 1s and closes 1s later without the ACK: well within 10s.
    let stalled_at = Instant::now();
    let closed = eventually(Duration::from_secs(10), || {
        let pid = gw.pid();
        async move { proc::fd_count(pid).is_some_and(|n| n <= fds0) }
    })
    .await;
    let released_after = stalled_at.elapsed();
    let data = raw.seen().data_bytes;
    let (cpu, rise) = cost.finish("zero window", 1.0);
    let (ok, sent) = legit.finish("zero window").await;
    println!(
        "zero window: {data} DATA bytes sent to the client, gateway fds {fds0} -> {stalled_fds} \
         while stalled, released {closed} after {released_after:?}, cpu {cpu:.3}s, rss +{} KiB, legit {ok}/{sent}",
        rise / 1024
    );
    assert_eq!(data, 0, "zero window: DATA sent past a 0 window");
    assert!(
        closed,
        "zero window: the stalled connection (and its upstream connection) was not released"
    );
}

/// Per-client quotas count streams: 100 concurrent streams on one h2 connection meet the same
/// `1/min burst 50` quota as 100 HTTP/1 requests from another client address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_quotas_count_streams_like_requests() {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    let cfg = format!(
        "{}policy:
  version: 1
  plans: {{free: {{bandwidths: ['1/min burst 50']}}}}
  default_plan: free
",
        config(&up, "")
    );
    let gw = Gateway::start(&cfg);
    let url = gw.url("/q");
    let statuses = |clients: Vec<Client>| {
        let url = url.clone();
        async move {
            let replies = futures_util::future::join_all(clients.into_iter().map(|c| {
                let url = url.clone();
                async move { c.get(&url).await.status.as_u16() }
            }))
            .await;
            let ok = replies.iter().filter(|s| **s == 200).count();
            let limited = replies.iter().filter(|s| **s == 429).count();
            (ok, limited)
        }
    };
    // One h2c connection (from 127.0.0.1), 100 streams at once.
    let h2 = Client::h2c();
    let over_h2 = statuses(vec![h2; 100]).await;
    // 100 HTTP/1.1 requests from 127.0.0.2, 25 at a time (pooled connections, well under
    // `max_connections_per_source`).
    let h1 = Client::from_ip("127.0.0.2");
    let mut over_h1 = (0, 0);
    for _ in 0..4 {
        let (ok, limited) = statuses(vec![h1.clone(); 25]).await;
        over_h1 = (over_h1.0 + ok, over_h1.1 + limited);
    }
    println!("quota 1/min burst 50: h2 streams (ok, 429) {over_h2:?}, http/1 {over_h1:?}");
    assert_eq!(over_h2, (50, 50), "h2 streams");
    assert_eq!(over_h1, (50, 50), "http/1 requests");
    assert_eq!(up.count(), 100);
}
