//! Request framing checks: ambiguous HTTP/1 framing is answered 400 and never forwarded.
//!
//! hyper parses every request head itself, and for most malformed framing it answers 400 and
//! closes (a `Transfer-Encoding` that does not end in `chunked`, `Transfer-Encoding` on
//! HTTP/1.0, differing `Content-Length` values, `Content-Length: +5`, NUL or CR in a value,
//! obs-fold, `Content-Length : 5`). Some ambiguous heads it accepts and normalises, and the
//! request it then hands to the service no longer shows the ambiguity: with both
//! `Content-Length` and `Transfer-Encoding` it drops the length and reads chunked; it reads
//! `Transfer-Encoding: chunked, chunked` or two `Transfer-Encoding` lines as chunked; it
//! accepts bare-LF line ends. Our policy is stricter (SCENARIOS.md P1, P8): every ambiguous
//! head gets **400 with `Connection: close`** and is never forwarded.
//!
//! So the check runs on the bytes, not on the parsed request. [`FramingIo`] wraps a
//! connection's stream; as hyper reads request bytes through it, a [`Scanner`] follows the
//! HTTP/1 message boundaries (head, then a `Content-Length` or chunked body, then the next
//! head) and parses each head once more with `httparse`, the parser hyper uses. A head is
//! *ambiguous* when it has
//!
//! - `Content-Length` and `Transfer-Encoding` together,
//! - more than one `Content-Length` (even with equal values) or more than one
//!   `Transfer-Encoding` line,
//! - a `Content-Length` that is not plain digits (no sign, no leading zero, ≤ 19 digits),
//! - a `Transfer-Encoding` other than exactly `chunked` (any case; `chunked, chunked`,
//!   `xchunked`, `chunked, gzip`, a tab or several spaces before the value), or one on HTTP/1.0,
//! - a bare LF instead of CRLF anywhere in the head,
//! - more than one `Host`, or an absolute-form target whose authority differs from `Host`.
//!
//! The scanner numbers heads; [`FramingCheck`] (the service wrapper the server installs)
//! numbers the requests hyper hands it on the same connection, and answers the first ambiguous
//! one with 400 + `Connection: close` (hyper then closes the connection after writing it), so
//! nothing after it on that connection — a smuggled `GET /smuggled` included — is ever parsed
//! as a request. Where the scanner cannot follow the stream any more (a chunked body hyper
//! would reject too, a head `httparse` rejects, which hyper answers itself), it stops
//! scanning and refuses the *next* request on that connection the same way: a request it has
//! not checked is never served. HTTP/2 (the `PRI` preface) and upgraded connections are not
//! HTTP/1 messages: the scanner stops there and flags nothing.
//!
//! [`FramingIo`] also closes a connection shut down in the middle of a request body
//! lingeringly (see its docs), so a response sent before the body was read is not lost.
//!
//! Cost: one extra `httparse` pass per head (the head bytes are copied only when a head spans
//! reads), a counter per chunk line, no allocation per request after the first head buffer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Either;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tower::Service;

use crate::body::ProxyBody;
use crate::problem;

/// No head was found ambiguous.
const NONE: u64 = u64::MAX;
/// Header lines parsed on the stack before falling back to the heap.
const STACK_HEADERS: usize = 64;

/// Why a head is ambiguous (kept for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguity {
    /// `Content-Length` and `Transfer-Encoding` together.
    LengthAndChunked,
    /// Two or more `Content-Length` lines.
    DuplicateLength,
    /// A `Content-Length` value that is not plain digits.
    BadLength,
    /// Two or more `Transfer-Encoding` lines.
    DuplicateTransferEncoding,
    /// A `Transfer-Encoding` value other than exactly `chunked`.
    BadTransferEncoding,
    /// `Transfer-Encoding` on HTTP/1.0.
    TransferEncodingOnHttp10,
    /// A bare LF line end in the head.
    BareLf,
    /// Two or more `Host` lines.
    DuplicateHost,
    /// An absolute-form target whose authority differs from `Host`.
    HostMismatch,
    /// The scanner lost the message boundaries (a body hyper rejects too, or a head over
    /// the scanner's bound).
    Unfollowable,
}

// === Verdicts ===

/// The per-connection link between the [`Scanner`] (which numbers heads as bytes arrive) and
/// [`FramingCheck`] (which numbers requests as hyper hands them over). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Verdicts(Arc<VerdictState>);

#[derive(Debug)]
struct VerdictState {
    /// Index of the first head that must be refused, or [`NONE`].
    bad: AtomicU64,
    /// Requests handed to the service so far.
    served: AtomicU64,
}

impl Default for VerdictState {
    fn default() -> Self {
        VerdictState {
            bad: AtomicU64::new(NONE),
            served: AtomicU64::new(0),
        }
    }
}

impl Verdicts {
    /// Fresh state for a new connection.
    pub fn new() -> Verdicts {
        Verdicts::default()
    }

    /// Marks head `index` (0-based on this connection) as one to refuse, unless an earlier
    /// one is marked already.
    fn flag(&self, index: u64) {
        let _ = self
            .0
            .bad
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (index < cur).then_some(index)
            });
    }

    /// Counts one request handed to the service; true when it must be refused.
    ///
    /// hyper serves an HTTP/1 connection's requests one after another, so the n-th call is
    /// the n-th head the scanner saw.
    pub fn next_request_is_ambiguous(&self) -> bool {
        let n = self.0.served.fetch_add(1, Ordering::AcqRel);
        n >= self.0.bad.load(Ordering::Acquire)
    }
}

// === Scanner ===

/// Follows HTTP/1 request framing over a byte stream and flags ambiguous heads in
/// [`Verdicts`]. See the module docs.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// Head bytes kept while a head spans reads.
    head: Vec<u8>,
    /// Heads completed so far (the index of the head being read).
    heads: u64,
    max_head: usize,
    verdicts: Verdicts,
    /// The first ambiguity found (for logs and tests).
    first: Option<Ambiguity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head (the very first one may be an HTTP/2 preface).
    Head,
    /// Skipping `n` more body bytes, then a head.
    Length(u64),
    /// Chunked body.
    Chunk(Chunk),
    /// Not following the stream any more.
    Opaque,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of a chunk size so far (`seen` is whether any digit came).
    Size { size: u64, seen: bool },
    /// Spaces or tabs after the size.
    SizeLws { size: u64 },
    /// A chunk extension up to CR.
    Extension { size: u64 },
    /// LF after the size line's CR.
    SizeLf { size: u64 },
    /// Chunk data.
    Data(u64),
    /// CR after the data.
    DataCr,
    /// LF after the data.
    DataLf,
    /// Start of a trailer line or the final CRLF.
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// LF ending a trailer line.
    TrailerLf,
    /// LF of the final CRLF.
    EndLf,
}

impl Scanner {
    /// A scanner for one connection. `max_head` bounds the head bytes kept; a longer head is
    /// refused (hyper, with a lower limit, refuses it first with 431).
    pub fn new(max_head: usize, verdicts: Verdicts) -> Scanner {
        Scanner {
            state: State::Head,
            head: Vec::new(),
            heads: 0,
            max_head,
            verdicts,
            first: None,
        }
    }

    /// Whether the stream stands inside a request body (one hyper has not read to its end).
    fn in_body(&self) -> bool {
        matches!(self.state, State::Length(_) | State::Chunk(_))
    }

    /// The first ambiguity found on this connection.
    pub fn first_ambiguity(&self) -> Option<Ambiguity> {
        self.first
    }

    /// Feeds bytes just read from the client.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Opaque => return,
                State::Head => data = self.feed_head(data),
                State::Length(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    data = &data[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Length(left)
                    };
                }
                State::Chunk(c) => data = self.feed_chunked(c, data),
            }
        }
    }

    fn refuse(&mut self, index: u64, why: Ambiguity) {
        self.verdicts.flag(index);
        self.first.get_or_insert(why);
        self.state = State::Opaque;
        self.head = Vec::new();
    }

    /// Stops following the stream without flagging (hyper refuses what comes, or it is not
    /// HTTP/1 any more).
    fn stop(&mut self) {
        self.state = State::Opaque;
        self.head = Vec::new();
    }

    /// Consumes head bytes; returns what follows the head (if it ended in `data`).
    fn feed_head<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        // The HTTP/2 preface (`PRI * HTTP/2.0`) is an invalid HTTP/1 version to httparse:
        // the scanner stops there without flagging anything.
        // Parse straight from `data` when no earlier bytes are pending (the common case).
        let (analysis, consumed_from_data) = if self.head.is_empty() {
            match analyse(data) {
                Parsed::Partial => {
                    if data.len() > self.max_head {
                        self.refuse(self.heads, Ambiguity::Unfollowable);
                    } else {
                        self.head.extend_from_slice(data);
                    }
                    return &[];
                }
                Parsed::Invalid => {
                    self.stop();
                    return &[];
                }
                Parsed::Complete(a) => {
                    let len = a.len;
                    (a, len)
                }
            }
        } else {
            let before = self.head.len();
            self.head.extend_from_slice(data);
            match analyse(&self.head) {
                Parsed::Partial => {
                    if self.head.len() > self.max_head {
                        self.refuse(self.heads, Ambiguity::Unfollowable);
                    }
                    return &[];
                }
                Parsed::Invalid => {
                    self.stop();
                    return &[];
                }
                Parsed::Complete(a) => {
                    // The head ends in `data`: `head[..before]` alone was partial.
                    let used = a.len.saturating_sub(before);
                    // An idle keep-alive connection should not keep a large head buffer.
                    if self.head.capacity() > 4096 {
                        self.head = Vec::new();
                    } else {
                        self.head.clear();
                    }
                    (a, used)
                }
            }
        };
        let index = self.heads;
        self.heads += 1;
        match analysis.framing {
            Err(why) => {
                self.refuse(index, why);
                &[]
            }
            Ok(Framing::None) => &data[consumed_from_data..],
            Ok(Framing::Length(0)) => &data[consumed_from_data..],
            Ok(Framing::Length(n)) => {
                self.state = State::Length(n);
                &data[consumed_from_data..]
            }
            Ok(Framing::Chunked) => {
                self.state = State::Chunk(Chunk::Size {
                    size: 0,
                    seen: false,
                });
                &data[consumed_from_data..]
            }
        }
    }

    /// Follows a chunked body (the same grammar hyper's decoder accepts).
    fn feed_chunked<'a>(&mut self, mut c: Chunk, data: &'a [u8]) -> &'a [u8] {
        let mut i = 0;
        while i < data.len() {
            if let Chunk::Data(n) = c {
                let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len() - i);
                i += take;
                let left = n - take as u64;
                c = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left)
                };
                continue;
            }
            let b = data[i];
            i += 1;
            let next = match (c, b) {
                (Chunk::Size { size, .. }, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let digit = u64::from(match b {
                        b'0'..=b'9' => b - b'0',
                        b'a'..=b'f' => b - b'a' + 10,
                        _ => b - b'A' + 10,
                    });
                    size.checked_mul(16)
                        .and_then(|s| s.checked_add(digit))
                        .map(|size| Chunk::Size { size, seen: true })
                }
                (Chunk::Size { size, seen: true }, b' ' | b'\t')
                | (Chunk::SizeLws { size }, b' ' | b'\t') => Some(Chunk::SizeLws { size }),
                (Chunk::Size { size, seen: true }, b';') | (Chunk::SizeLws { size }, b';') => {
                    Some(Chunk::Extension { size })
                }
                (Chunk::Size { size, seen: true }, b'\r')
                | (Chunk::SizeLws { size }, b'\r')
                | (Chunk::Extension { size }, b'\r') => Some(Chunk::SizeLf { size }),
                (Chunk::Extension { .. }, b'\n') => None,
                (Chunk::Extension { size }, _) => Some(Chunk::Extension { size }),
                (Chunk::SizeLf { size: 0 }, b'\n') => Some(Chunk::TrailerStart),
                (Chunk::SizeLf { size }, b'\n') => Some(Chunk::Data(size)),
                (Chunk::DataCr, b'\r') => Some(Chunk::DataLf),
                (Chunk::DataLf, b'\n') => Some(Chunk::Size {
                    size: 0,
                    seen: false,
                }),
                (Chunk::TrailerStart, b'\r') => Some(Chunk::EndLf),
                (Chunk::TrailerStart | Chunk::Trailer, b'\n') => None,
                (Chunk::Trailer, b'\r') => Some(Chunk::TrailerLf),
                (Chunk::TrailerStart | Chunk::Trailer, _) => Some(Chunk::Trailer),
                (Chunk::TrailerLf, b'\n') => Some(Chunk::TrailerStart),
                (Chunk::EndLf, b'\n') => {
                    self.state = State::Head;
                    return &data[i..];
                }
                _ => None,
            };
            match next {
                Some(n) => c = n,
                None => {
                    // hyper rejects this body too; whatever follows is not a request we
                    // checked, so the next one on this connection is refused.
                    let next_head = self.heads;
                    self.refuse(next_head, Ambiguity::Unfollowable);
                    return &[];
                }
            }
        }
        self.state = State::Chunk(c);
        &[]
    }
}

/// How a checked head frames its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

struct Analysis {
    /// Head length in bytes.
    len: usize,
    framing: Result<Framing, Ambiguity>,
}

enum Parsed {
    Partial,
    Invalid,
    Complete(Analysis),
}

fn analyse(buf: &[u8]) -> Parsed {
    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    let mut req = httparse::Request::new(&mut stack);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Parsed::Complete(check(buf, len, &req)),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            // Rare: retry with room for what hyper accepts at most (its `max_headers` is
            // below this; beyond it hyper answers 431 itself).
            let mut heap = vec![httparse::EMPTY_HEADER; 1024];
            let mut req = httparse::Request::new(&mut heap);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(len)) => Parsed::Complete(check(buf, len, &req)),
                Ok(httparse::Status::Partial) => Parsed::Partial,
                Err(_) => Parsed::Invalid,
            }
        }
        Err(_) => Parsed::Invalid,
    }
}

/// Applies the module's rules to a complete head of `len` bytes at the start of `buf`.
fn check(buf: &[u8], len: usize, req: &httparse::Request<'_, '_>) -> Analysis {
    Analysis {
        len,
        framing: framing_of(buf, len, req),
    }
}

fn framing_of(
    buf: &[u8],
    len: usize,
    req: &httparse::Request<'_, '_>,
) -> Result<Framing, Ambiguity> {
    let head = &buf[..len];
    // Bare LF: every LF must follow a CR. memchr finds the few LFs of a head a word (or a
    // vector) at a time; a loop over every byte was ≈ 5 instructions a byte of each head.
    for i in memchr::memchr_iter(b'\n', head) {
        if i == 0 || head[i - 1] != b'\r' {
            return Err(Ambiguity::BareLf);
        }
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut host: Option<&[u8]> = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            if length.is_some() {
                return Err(Ambiguity::DuplicateLength);
            }
            length = Some(parse_length(h.value).ok_or(Ambiguity::BadLength)?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if chunked {
                return Err(Ambiguity::DuplicateTransferEncoding);
            }
            if req.version == Some(0) {
                return Err(Ambiguity::TransferEncodingOnHttp10);
            }
            if !h.value.eq_ignore_ascii_case(b"chunked") || !plain_value(head, h.value) {
                return Err(Ambiguity::BadTransferEncoding);
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"host") {
            if host.is_some() {
                return Err(Ambiguity::DuplicateHost);
            }
            host = Some(h.value);
        }
    }
    if chunked && length.is_some() {
        return Err(Ambiguity::LengthAndChunked);
    }
    if let (Some(path), Some(host)) = (req.path, host) {
        if let Some(authority) = absolute_form_authority(path) {
            if !authority.as_bytes().eq_ignore_ascii_case(host) {
                return Err(Ambiguity::HostMismatch);
            }
        }
    }
    Ok(match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::None,
    })
}

/// `1*DIGIT` without a leading zero (except `0` itself), at most 19 digits (fits `u64`).
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || (v.len() > 1 && v[0] == b'0') {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// True when `value` (a slice of `head`) follows its colon with nothing or one space, and is
/// followed by CRLF directly (no tab, no run of spaces: a proxy in front may read those
/// differently).
fn plain_value(head: &[u8], value: &[u8]) -> bool {
    let start = (value.as_ptr() as usize).wrapping_sub(head.as_ptr() as usize);
    let end = start + value.len();
    if start > head.len() || end + 2 > head.len() {
        return false;
    }
    let before_ok = match start.checked_sub(1).map(|i| head[i]) {
        Some(b':') => true,
        Some(b' ') => start >= 2 && head[start - 2] == b':',
        _ => false,
    };
    before_ok && &head[end..end + 2] == b"\r\n"
}

/// The authority of an absolute-form target (`http://host[:port]/path`), if it is one.
fn absolute_form_authority(target: &str) -> Option<&str> {
    let rest = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
        .or_else(|| {
            // Any other scheme: `scheme://`.
            let (scheme, rest) = target.split_once("://")?;
            scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                .then_some(rest)
        })?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    // Userinfo is not part of the host.
    Some(authority.rsplit_once('@').map_or(authority, |(_, h)| h))
}

// === FramingIo ===

/// Lingering close: at most this long spent discarding a request body nobody read...
const LINGER_TIME: Duration = Duration::from_secs(5);
/// ...and at most this many bytes of it.
const LINGER_BYTES: u64 = 8 << 20;

pin_project! {
    /// A connection stream that runs every byte the client sends through a [`Scanner`].
    /// Writes pass through untouched.
    ///
    /// Lingering close: when the connection is shut down in the middle of a request body
    /// (a response was sent without reading all of it: a 413 for `limits.max_body`, or any
    /// early answer), closing the socket with the client's bytes unread would make the
    /// kernel send a reset, and a client still writing its body would lose the response it
    /// was sent. So the shutdown first closes the write side (the response and a FIN reach
    /// the client), then reads and discards what the client still sends until it stops, at
    /// most [`LINGER_TIME`] and [`LINGER_BYTES`], and only then lets the socket close.
    #[derive(Debug)]
    pub struct FramingIo<T> {
        #[pin]
        inner: T,
        scanner: Scanner,
        linger: Option<Linger>,
    }
}

/// The state of a lingering close.
#[derive(Debug)]
struct Linger {
    deadline: Pin<Box<Sleep>>,
    left: u64,
    write_closed: bool,
}

impl<T> FramingIo<T> {
    /// Wraps `inner`; ambiguous heads are flagged in `verdicts`.
    pub fn new(inner: T, max_head: usize, verdicts: Verdicts) -> FramingIo<T> {
        FramingIo {
            inner,
            scanner: Scanner::new(max_head, verdicts),
            linger: None,
        }
    }
}

impl<T: AsyncRead> AsyncRead for FramingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                this.scanner.feed(new);
            }
        }
        res
    }
}

impl<T: AsyncRead + AsyncWrite> AsyncWrite for FramingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if this.linger.is_none() && this.scanner.in_body() {
            *this.linger = Some(Linger {
                deadline: Box::pin(tokio::time::sleep(LINGER_TIME)),
                left: LINGER_BYTES,
                write_closed: false,
            });
        }
        let Some(l) = this.linger.as_mut() else {
            return this.inner.poll_shutdown(cx);
        };
        if !l.write_closed {
            std::task::ready!(this.inner.as_mut().poll_shutdown(cx))?;
            l.write_closed = true;
        }
        let mut discard = [0u8; 8192];
        loop {
            if l.left == 0 || l.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut discard);
            match this.inner.as_mut().poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    l.left = l.left.saturating_sub(buf.filled().len() as u64);
                }
                // The client is gone: nothing left to protect.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// === FramingCheck ===

/// The response body of [`FramingCheck`]: the inner service's, or the 400's.
pub type CheckedBody<B> = Either<B, ProxyBody>;

/// Wraps a connection's service: a request whose head the scanner flagged is answered
/// 400 + `Connection: close` without calling `inner`, and one whose target is longer than
/// [`MAX_TARGET`] is answered 414.
#[derive(Debug, Clone)]
pub struct FramingCheck<S> {
    inner: S,
    verdicts: Verdicts,
}

impl<S> FramingCheck<S> {
    /// Wraps `inner` for one connection.
    pub fn new(inner: S, verdicts: Verdicts) -> FramingCheck<S> {
        FramingCheck { inner, verdicts }
    }
}

/// Longest request target served (bytes of path and query, or of the whole absolute-form
/// target): longer ones get 414. A head over `limits.max_header_bytes` never gets here:
/// hyper answers it 431 and closes, whatever part of it is long.
pub const MAX_TARGET: usize = 8 * 1024;

fn target_len(uri: &http::Uri) -> usize {
    uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
}

/// An HTTP/2 request whose `host` header (any of them) names another authority than its
/// `:authority` (compared without case). Without `:authority`, `host` stands alone.
fn h2_authority_conflict<B>(req: &Request<B>) -> bool {
    let Some(authority) = req.uri().authority() else {
        return false;
    };
    req.headers().get_all(header::HOST).iter().any(|h| {
        !h.as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
    })
}

/// The 400 answer to an ambiguous head (`Connection: close`: hyper closes after it).
pub fn ambiguous_response() -> Response<ProxyBody> {
    let mut res = problem::response(StatusCode::BAD_REQUEST, "ambiguous request framing");
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

impl<S, ReqB, B> Service<Request<ReqB>> for FramingCheck<S>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
{
    type Response = Response<CheckedBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if target_len(req.uri()) > MAX_TARGET {
            return ResponseFuture::Refused {
                res: Some(problem::response(
                    StatusCode::URI_TOO_LONG,
                    "the request target is over 8 KiB",
                )),
            };
        }
        // HTTP/2 requests are never flagged (the scanner stops at the preface), but they
        // must not advance the HTTP/1 request count either. Their own ambiguity is a `host`
        // header naming another authority than `:authority` (RFC 9113 §8.3.1: malformed):
        // routing reads one and the upstream would get the other.
        if req.version() == http::Version::HTTP_2 {
            if h2_authority_conflict(&req) {
                tracing::debug!(uri = %req.uri(), "`host` differs from `:authority`: 400");
                return ResponseFuture::Refused {
                    res: Some(problem::response(
                        StatusCode::BAD_REQUEST,
                        "the host header differs from :authority",
                    )),
                };
            }
            return ResponseFuture::Inner {
                inner: self.inner.call(req),
            };
        }
        if self.verdicts.next_request_is_ambiguous() {
            tracing::debug!(uri = %req.uri(), "ambiguous request framing: 400 and close");
            return ResponseFuture::Refused {
                res: Some(ambiguous_response()),
            };
        }
        ResponseFuture::Inner {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// [`FramingCheck`]'s future.
    #[project = Proj]
    #[allow(missing_docs)]
    pub enum ResponseFuture<F> {
        /// The inner service runs.
        Inner { #[pin] inner: F },
        /// Refused: the 400 is ready.
        Refused { res: Option<Response<ProxyBody>> },
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CheckedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Inner { inner } => inner.poll(cx).map(|r| r.map(|res| res.map(Either::Left))),
            Proj::Refused { res } => match res.take() {
                Some(res) => Poll::Ready(Ok(res.map(Either::Right))),
                // Polled after completion: never ready again.
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` in pieces of `step` bytes; returns the flagged head index.
    fn scan(bytes: &[u8], step: usize) -> (Option<u64>, Option<Ambiguity>) {
        let v = Verdicts::new();
        let mut s = Scanner::new(64 * 1024, v.clone());
        for piece in bytes.chunks(step) {
            s.feed(piece);
        }
        let bad = v.0.bad.load(Ordering::Acquire);
        ((bad != NONE).then_some(bad), s.first_ambiguity())
    }

    /// A shutdown in the middle of a body drains what the client still sends (so a client
    /// still writing does not get a reset), then completes when the client stops.
    #[tokio::test]
    async fn a_shutdown_inside_a_body_drains_the_rest_first() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (server, mut client) = tokio::io::duplex(4096);
        let mut io = FramingIo::new(server, 64 * 1024, Verdicts::new());
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";
        client.write_all(head).await.unwrap();
        let mut buf = vec![0u8; head.len()];
        io.read_exact(&mut buf).await.unwrap();
        assert!(matches!(io.scanner.state, State::Length(_)));
        // The server answers and shuts down without reading the body; the client writes
        // all of it (far more than the pipe holds) and only then reads the answer.
        let server = tokio::spawn(async move {
            io.write_all(b"HTTP/1.1 413 Payload Too Large\r\n\r\n")
                .await
                .unwrap();
            io.shutdown().await.unwrap();
        });
        let mut answer = String::new();
        let exchange = async {
            client.write_all(&vec![b'x'; 100_000]).await.unwrap();
            client.read_to_string(&mut answer).await.unwrap();
        };
        // Without the drain the client's writes block for ever.
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("the body was drained");
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        drop(client);
        server.await.unwrap();
    }

    fn verdict(head: &str) -> Option<Ambiguity> {
        let whole = scan(head.as_bytes(), usize::MAX);
        // Byte by byte gives the same answer as one read.
        assert_eq!(whole, scan(head.as_bytes(), 1), "{head:?}");
        whole.1
    }

    #[test]
    fn plain_heads_pass() {
        for head in [
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\ntransfer-encoding:CHUNKED\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
            "GET http://x/a HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
        ] {
            assert_eq!(verdict(head), None, "{head:?}");
        }
    }

    #[test]
    fn ambiguous_heads_are_flagged() {
        use Ambiguity::*;
        for (head, why) in [
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", LengthAndChunked),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n", LengthAndChunked),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n", DuplicateLength),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\n", BadLength),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 004\r\n\r\n", BadLength),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551616\r\n\r\n", BadLength),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", BadTransferEncoding),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\n\r\n", BadTransferEncoding),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:  chunked\r\n\r\n", BadTransferEncoding),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked \r\n\r\n", BadTransferEncoding),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n", BadTransferEncoding),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", DuplicateTransferEncoding),
            ("POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", TransferEncodingOnHttp10),
            ("GET / HTTP/1.1\nHost: x\n\n", BareLf),
            ("GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", BareLf),
            ("GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", DuplicateHost),
            ("GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n", HostMismatch),
            ("GET http://user@a.example:81/ HTTP/1.1\r\nHost: a.example\r\n\r\n", HostMismatch),
        ] {
            assert_eq!(verdict(head), Some(why), "{head:?}");
        }
    }

    #[test]
    fn pipelined_heads_are_numbered_across_bodies() {
        let stream = "POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
                      POST /2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
                      GET /3 HTTP/1.1\r\nHost: x\r\n\r\n\
                      GET /4 HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n";
        for step in [1, 7, usize::MAX] {
            assert_eq!(
                scan(stream.as_bytes(), step),
                (Some(3), Some(Ambiguity::DuplicateHost)),
                "{step}"
            );
        }
    }

    #[test]
    fn a_body_hyper_rejects_refuses_the_next_request() {
        // Chunk data not followed by CRLF: hyper fails the body; nothing after it is served.
        let stream = "POST /1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n";
        assert_eq!(
            scan(stream.as_bytes(), 3),
            (Some(1), Some(Ambiguity::Unfollowable))
        );
        // Chunk size overflow.
        let stream = "POST /1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n";
        assert_eq!(scan(stream.as_bytes(), 1).0, Some(1));
    }

    #[test]
    fn http2_and_garbage_are_not_followed() {
        assert_eq!(
            scan(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0", 1),
            (None, None)
        );
        assert_eq!(scan(b"\x16\x03\x01 not http", 4), (None, None));
    }

    #[test]
    fn an_h2_host_header_must_name_the_authority() {
        let req = |host: Option<&str>| {
            let mut b = Request::builder()
                .version(http::Version::HTTP_2)
                .uri("http://a.example:8080/x");
            if let Some(h) = host {
                b = b.header(header::HOST, h);
            }
            b.body(()).unwrap()
        };
        assert!(!h2_authority_conflict(&req(None)));
        assert!(!h2_authority_conflict(&req(Some("A.Example:8080"))));
        assert!(h2_authority_conflict(&req(Some("b.example"))));
        assert!(h2_authority_conflict(&req(Some("a.example"))));
        let origin_form = Request::builder()
            .version(http::Version::HTTP_2)
            .uri("/x")
            .header(header::HOST, "b.example")
            .body(())
            .unwrap();
        assert!(!h2_authority_conflict(&origin_form));
    }

    #[test]
    fn counting_requests_finds_the_flagged_one() {
        let v = Verdicts::new();
        v.flag(2);
        v.flag(5);
        assert!(!v.next_request_is_ambiguous());
        assert!(!v.next_request_is_ambiguous());
        assert!(v.next_request_is_ambiguous());
        assert!(v.next_request_is_ambiguous());
    }
}
