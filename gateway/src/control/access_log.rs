//! The access log (`log.access`): one line per request, in JSON or the Common/Combined Log
//! Formats, written by a thread of its own.
//!
//! The request path only fills an [`Entry`] and hands it to a bounded queue (`buffer` lines);
//! a full queue drops the line and counts it (`fairgate_access_log_dropped_total`), so a slow
//! disk never slows requests down. Every 20 ms the writer drains the queue, formats, appends
//! and flushes (a line is on disk within tens of milliseconds of its request ending). SIGUSR1 makes it
//! reopen its file (rotation: rename the file, then send SIGUSR1); a file that cannot be
//! reopened keeps the old one and is logged.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fairgate_middleware::clock::civil_utc;
use http::{HeaderValue, Method, Version};
use prometheus_client::metrics::counter::Counter;

use crate::config::{AccessFormat, AccessLogConfig, AccessTarget};

/// One request, as the access log writes it.
#[derive(Debug)]
pub struct Entry {
    /// When the request arrived.
    pub time: SystemTime,
    /// The TCP peer's address.
    pub peer: Option<IpAddr>,
    /// Method.
    pub method: Method,
    /// Path and query, as received.
    pub target: String,
    /// HTTP version.
    pub version: Version,
    /// Response status (0: no response).
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    /// From the request's arrival to the end of its response.
    pub duration: Duration,
    /// The upstream pool of the route it matched.
    pub upstream: Option<Arc<str>>,
    /// `x-request-id`.
    pub request_id: Option<HeaderValue>,
    /// The admission stage that rejected it (`None`: admitted, or not decided).
    pub stage: Option<&'static str>,
    /// `Referer` (Combined format only).
    pub referer: Option<HeaderValue>,
    /// `User-Agent` (Combined format only).
    pub user_agent: Option<HeaderValue>,
}

#[derive(Debug)]
struct Shared {
    tx: SyncSender<Entry>,
    dropped: Counter,
    reopen: Arc<AtomicBool>,
    format: AccessFormat,
}

/// The access log's sending side; cheap to clone. The writer thread ends (after writing
/// what is queued) when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
}

impl AccessLog {
    /// Opens the target and starts the writer thread; drops count in `dropped`
    /// (`fairgate_access_log_dropped_total`).
    pub fn start(config: &AccessLogConfig, dropped: Counter) -> io::Result<AccessLog> {
        let (tx, rx) = mpsc::sync_channel(config.buffer);
        let reopen = Arc::new(AtomicBool::new(false));
        let sink = Sink::open(&config.target)?;
        let format = config.format;
        let flag = Arc::clone(&reopen);
        std::thread::Builder::new()
            .name("fairgate-access-log".to_owned())
            .spawn(move || write_loop(rx, sink, format, &flag))?;
        Ok(AccessLog {
            shared: Arc::new(Shared {
                tx,
                dropped,
                reopen,
                format,
            }),
        })
    }

    /// Queues `entry`; a full queue drops it (counted).
    pub fn send(&self, entry: Entry) {
        match self.shared.tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.dropped.inc();
            }
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.get()
    }

    /// Whether lines carry `Referer` and `User-Agent` (the Combined format).
    pub fn wants_agent(&self) -> bool {
        self.shared.format == AccessFormat::Combined
    }

    /// Asks the writer to reopen its file before its next line (SIGUSR1).
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
    }
}

enum Sink {
    Stdout(BufWriter<io::Stdout>),
    File(PathBuf, BufWriter<File>),
}

impl Sink {
    fn open(target: &AccessTarget) -> io::Result<Sink> {
        Ok(match target {
            AccessTarget::Stdout => Sink::Stdout(BufWriter::new(io::stdout())),
            AccessTarget::File(p) => Sink::File(p.clone(), BufWriter::new(append(p)?)),
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(w) => w,
            Sink::File(_, w) => w,
        }
    }

    fn reopen(&mut self) {
        if let Sink::File(path, w) = self {
            let _ = w.flush();
            match append(path) {
                Ok(f) => {
                    *w = BufWriter::new(f);
                    tracing::info!(file = %path.display(), "access log reopened");
                }
                Err(e) => tracing::error!(
                    file = %path.display(),
                    error = %e,
                    "cannot reopen the access log: still writing to the old file"
                ),
            }
        }
    }
}

fn append(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// How often the writer drains its queue. It sleeps in between instead of waiting on the
/// queue, so a request's `send` never has to wake it (a wake per line was most of the access
/// log's cost in the load harness: a futex call and a context switch per request).
const DRAIN_EVERY: Duration = Duration::from_millis(20);

fn write_loop(rx: Receiver<Entry>, mut sink: Sink, format: AccessFormat, reopen: &AtomicBool) {
    let mut line = String::with_capacity(512);
    loop {
        std::thread::sleep(DRAIN_EVERY);
        if reopen.swap(false, Ordering::AcqRel) {
            sink.reopen();
        }
        let mut wrote = false;
        let gone = loop {
            match rx.try_recv() {
                Ok(e) => {
                    line.clear();
                    format_entry(&mut line, &e, format);
                    if let Err(err) = sink.writer().write_all(line.as_bytes()) {
                        tracing::error!(error = %err, "cannot write the access log");
                    }
                    wrote = true;
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if wrote {
            let _ = sink.writer().flush();
        }
        if gone {
            return;
        }
    }
}

/// Appends `e` as one line (with its newline) in `format`.
pub fn format_entry(out: &mut String, e: &Entry, format: AccessFormat) {
    match format {
        AccessFormat::Json => json_line(out, e),
        AccessFormat::Common | AccessFormat::Combined => {
            clf_line(out, e, format == AccessFormat::Combined)
        }
    }
    out.push('\n');
}

fn header_text(v: Option<&HeaderValue>) -> Option<&str> {
    v.and_then(|v| v.to_str().ok())
}

/// One JSON object, written field by field (no intermediate `serde_json::Value`: building one
/// per line cost the writer thread several microseconds per request).
fn json_line(out: &mut String, e: &Entry) {
    let c = civil_utc(e.time);
    let _ = write!(
        out,
        "{{\"time\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z\",\"peer\":",
        c.year, c.month, c.day, c.hour, c.minute, c.second, c.millis
    );
    match e.peer {
        Some(p) => {
            let _ = write!(out, "\"{p}\"");
        }
        None => out.push_str("null"),
    }
    out.push_str(",\"method\":");
    json_str(out, Some(e.method.as_str()));
    out.push_str(",\"target\":");
    json_str(out, Some(&e.target));
    let _ = write!(
        out,
        ",\"version\":\"{:?}\",\"status\":{},\"bytes\":{},\"duration_ms\":{:.3},\"upstream\":",
        e.version,
        e.status,
        e.bytes,
        e.duration.as_secs_f64() * 1e3
    );
    json_str(out, e.upstream.as_deref());
    out.push_str(",\"request_id\":");
    json_str(out, header_text(e.request_id.as_ref()));
    out.push_str(",\"stage\":");
    json_str(out, e.stage);
    out.push_str(",\"referer\":");
    json_str(out, header_text(e.referer.as_ref()));
    out.push_str(",\"user_agent\":");
    json_str(out, header_text(e.user_agent.as_ref()));
    out.push('}');
}

/// A JSON string (or `null`), escaped as RFC 8259 asks.
fn json_str(out: &mut String, s: Option<&str>) {
    let Some(s) = s else {
        out.push_str("null");
        return;
    };
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `peer - - [10/Oct/2000:13:55:36 +0000] "GET /x HTTP/1.1" 200 2326` (+ `"referer"
/// "agent"` when combined). Quotes and control bytes inside quoted fields are escaped.
fn clf_line(out: &mut String, e: &Entry, combined: bool) {
    let c = civil_utc(e.time);
    let peer = e.peer.map_or_else(|| "-".to_owned(), |p| p.to_string());
    let month = MONTHS[(c.month.clamp(1, 12) - 1) as usize];
    let _ = write!(
        out,
        "{peer} - - [{:02}/{month}/{:04}:{:02}:{:02}:{:02} +0000] \"",
        c.day, c.year, c.hour, c.minute, c.second
    );
    quoted(out, e.method.as_str());
    out.push(' ');
    quoted(out, &e.target);
    let _ = write!(out, " {:?}\" {} ", e.version, e.status);
    if e.bytes == 0 {
        out.push('-');
    } else {
        let _ = write!(out, "{}", e.bytes);
    }
    if combined {
        for v in [&e.referer, &e.user_agent] {
            out.push_str(" \"");
            quoted(out, header_text(v.as_ref()).unwrap_or("-"));
            out.push('"');
        }
    }
}

/// Writes `s` for a quoted field: `"` and `\` escaped, control bytes as `\xHH`.
fn quoted(out: &mut String, s: &str) {
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn entry() -> Entry {
        Entry {
            time: UNIX_EPOCH + Duration::from_millis(971_186_136_250),
            peer: Some("127.0.0.1".parse().unwrap()),
            method: Method::GET,
            target: "/a \"b\"?q=1".to_owned(),
            version: Version::HTTP_11,
            status: 429,
            bytes: 181,
            duration: Duration::from_micros(1_500),
            upstream: Some(Arc::from("api")),
            request_id: Some(HeaderValue::from_static("abc-1")),
            stage: Some("quota"),
            referer: None,
            user_agent: Some(HeaderValue::from_static("curl/8")),
        }
    }

    #[test]
    fn the_formats_say_what_operators_expect() {
        let mut s = String::new();
        format_entry(&mut s, &entry(), AccessFormat::Common);
        assert_eq!(
            s,
            "127.0.0.1 - - [10/Oct/2000:13:55:36 +0000] \"GET /a \\\"b\\\"?q=1 HTTP/1.1\" 429 181\n"
        );
        s.clear();
        format_entry(&mut s, &entry(), AccessFormat::Combined);
        assert!(s.ends_with(" 429 181 \"-\" \"curl/8\"\n"), "{s}");
        s.clear();
        format_entry(&mut s, &entry(), AccessFormat::Json);
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(v["time"], "2000-10-10T13:55:36.250Z");
        assert_eq!(v["status"], 429);
        assert_eq!(v["stage"], "quota");
        assert_eq!(v["upstream"], "api");
        assert_eq!(v["request_id"], "abc-1");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["version"], "HTTP/1.1");
        // Escapes survive a JSON parser.
        let mut odd = entry();
        odd.target = "/\"q\"\\\u{1}\n".to_owned();
        s.clear();
        format_entry(&mut s, &odd, AccessFormat::Json);
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(v["target"], "/\"q\"\\\u{1}\n");
        assert_eq!(v["referer"], serde_json::Value::Null);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(
            &AccessLogConfig {
                target: AccessTarget::File(path.clone()),
                format: AccessFormat::Common,
                buffer: 1,
            },
            Counter::default(),
        )
        .unwrap();
        // The writer drains as it goes: send until something is dropped, bounded.
        let mut sent = 0u64;
        while log.dropped() == 0 && sent < 1_000_000 {
            log.send(entry());
            sent += 1;
        }
        assert!(
            log.dropped() > 0,
            "a queue of 1 overflows under a tight loop"
        );
        let dropped = log.dropped();
        drop(log);
        // What was not dropped is written, all of it, once the writer has drained its queue.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .count() as u64;
            if lines == sent - dropped {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{lines} of {sent} − {dropped}"
            );
            std::thread::yield_now();
        }
    }
}
