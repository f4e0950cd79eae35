//! Limits on client connections that hyper does not enforce by itself: slow clients and
//! too many connections from one source (`limits.max_connections_per_source`,
//! `limits.body_min_rate`, `limits.write_timeout`; `docs/gateway.md`, "Slow clients").
//!
//! This module owns three guards, all built from one [`ConnLimits`] per gateway:
//!
//! - **Per-source connection cap** ([`SourceTable`]): at most N open connections from one
//!   source (an IPv4 address, or an IPv6 /64). Connection N + 1 is closed right after
//!   `accept`, before a byte is read: no hyper connection, no admission, no upstream permit.
//!   The table holds only sources with at least one open connection (a source's entry goes
//!   when its last connection closes), so its size is bounded by the open connections, and
//!   it is keyed with std's randomly seeded SipHash so a client cannot aim at one bucket.
//!   Every listener and every per-core thread of a gateway shares the one table.
//! - **Slow read** ([`ClientIo`]): when the gateway has bytes to write and the client's
//!   socket accepts none for `write_timeout`, the write fails and hyper closes the
//!   connection. A write that makes any progress disarms the deadline.
//! - **Silent connections** ([`ClientIo`]): hyper's `header_read_timeout` only runs once
//!   the protocol (HTTP/1 or HTTP/2) is chosen from the first bytes; a connection whose
//!   first bytes do not arrive within `header_read_timeout` of the accept is closed too.
//! - **Slow body** ([`MinRate`]): a request body must deliver at least `bytes` bytes in every
//!   window of `per` that the gateway spends waiting for it. A window starts when the body
//!   first makes the gateway wait and restarts each time it has delivered `bytes`; a window
//!   that closes short fails the body with [`SlowBody`]: the upstream request is aborted
//!   (it never sees a complete request) and the client gets 408 (see [`crate::proxy`]), or
//!   its connection is closed when a response was already under way.
//!
//! What is held meanwhile: header reading happens before the tower stack runs, so a
//! slowloris connection holds no admission ticket and no upstream permit (it is bounded by
//! `header_read_timeout` and the per-source cap). A request whose head has arrived has been
//! admitted (its ticket counts towards the engine's in-flight and concurrency limits) and
//! has an upstream connection while its body streams; a slow body holds both for at most
//! one `per` window past its last `bytes` bytes, which `body_min_rate` bounds.
//!
//! Refusals and slow clients are counted in `fairgate_connections_refused_total{reason}` and
//! `fairgate_slow_clients_total{kind}`; a per-source refusal is logged at most once a second
//! (with how many were not logged in between).

use std::collections::HashMap;
use std::future::Future;
use std::hash::RandomState;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;
use crate::config::{BodyMinRate, Limits};
use crate::control::metrics::ClientCounters;

/// The connection limits of one gateway: the shared per-source table, the slow-client
/// settings and their counters. Cheap to clone (one `Arc`).
#[derive(Clone, Debug)]
pub struct ConnLimits {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    table: Arc<SourceTable>,
    header_read_timeout: Duration,
    write_timeout: Duration,
    body_min_rate: Option<BodyMinRate>,
    counters: ClientCounters,
    refusal_log: LogEvery,
}

// === impl ConnLimits ===

impl ConnLimits {
    /// The limits `limits` configures, counting into `counters`.
    pub fn new(limits: &Limits, counters: ClientCounters) -> ConnLimits {
        ConnLimits {
            inner: Arc::new(Inner {
                table: SourceTable::new(limits.max_connections_per_source),
                header_read_timeout: limits.header_read_timeout,
                write_timeout: limits.write_timeout,
                body_min_rate: limits.body_min_rate,
                counters,
                refusal_log: LogEvery::new(Duration::from_secs(1)),
            }),
        }
    }

    /// Takes a connection slot of `peer`'s source, or `None` (counted and logged, at most a
    /// line a second) when the source already has `max_connections_per_source` open: the
    /// caller then closes the connection without reading from it.
    pub fn admit(&self, peer: SocketAddr) -> Option<SourceSlot> {
        let slot = self.inner.table.try_open(peer.ip());
        if slot.is_none() {
            self.inner.counters.refused_per_source.inc();
            if let Some(skipped) = self.inner.refusal_log.ready() {
                tracing::warn!(
                    source = %source_key(peer.ip()),
                    max = self.inner.table.max(),
                    not_logged = skipped,
                    "connection refused: too many open connections from this source"
                );
            }
        }
        slot
    }

    /// Wraps a just-accepted connection's stream in its deadlines (see [`ClientIo`]).
    pub fn client_io<T>(&self, io: T) -> ClientIo<T> {
        ClientIo::new(
            io,
            self.inner.header_read_timeout,
            self.inner.write_timeout,
            self.inner.counters.slow_read.clone(),
        )
    }

    /// Wraps a request body so that it fails when it arrives slower than `body_min_rate`
    /// (a pass-through when that is off).
    pub fn min_rate<B>(&self, body: B) -> MinRate<B> {
        match self.inner.body_min_rate {
            Some(rate) => MinRate::new(body, rate, self.inner.counters.slow_body.clone()),
            None => MinRate::unlimited(body),
        }
    }

    /// The per-source table (shared by every listener and thread of the gateway).
    pub fn table(&self) -> &Arc<SourceTable> {
        &self.inner.table
    }
}

// === SourceTable ===

/// The key of a connection's source: an IPv4 address (an IPv4-mapped IPv6 address counts as
/// its IPv4 address) or the /64 prefix of an IPv6 address (the rest set to zero).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// Open connections per source, capped. Holds only sources with an open connection.
///
/// A mutex guards the map: it is taken twice per connection (open, close), never per
/// request, and held for one hash-map operation.
#[derive(Debug)]
pub struct SourceTable {
    max: u32,
    open: Mutex<HashMap<IpAddr, u32, RandomState>>,
}

impl SourceTable {
    /// A table allowing `max` open connections per source.
    pub fn new(max: NonZeroU32) -> Arc<SourceTable> {
        Arc::new(SourceTable {
            max: max.get(),
            open: Mutex::new(HashMap::with_hasher(RandomState::new())),
        })
    }

    /// The cap.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Opens a connection of `ip`'s source, or `None` when it has `max` open already.
    pub fn try_open(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            table: self.clone(),
            key,
        })
    }

    /// Open connections of `ip`'s source.
    pub fn open(&self, ip: IpAddr) -> u32 {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&source_key(ip)).copied().unwrap_or(0)
    }

    /// Sources with at least one open connection (the table's size).
    pub fn sources(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn close(&self, key: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

/// One open connection of a source; dropping it closes the slot.
#[derive(Debug)]
pub struct SourceSlot {
    table: Arc<SourceTable>,
    key: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.table.close(self.key);
    }
}

/// Lets one event through per `every` and counts the ones it holds back.
#[derive(Debug)]
struct LogEvery {
    start: Instant,
    every_ms: u64,
    /// Milliseconds since `start` from which the next event may be logged.
    next_ms: AtomicU64,
    skipped: AtomicU64,
}

impl LogEvery {
    fn new(every: Duration) -> LogEvery {
        LogEvery {
            start: Instant::now(),
            every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
            next_ms: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// `Some(events held back since the last one let through)` when this one may be logged.
    fn ready(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(self.every_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.skipped.swap(0, Ordering::Relaxed));
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        None
    }
}

// === ClientIo ===

/// How many bytes decide the protocol: hyper-util's `auto` builder waits for up to this
/// many (the HTTP/2 preface) unless the first bytes already differ from the preface.
const PREFACE_LEN: usize = 24;

pin_project_lite::pin_project! {
    /// A client connection's stream under two deadlines (see the module docs):
    ///
    /// - writes fail with `TimedOut` once the peer has accepted no byte for
    ///   `write_timeout` while the gateway had bytes to write; any progress disarms it;
    /// - reads fail with `TimedOut` when the bytes that choose between HTTP/1 and HTTP/2
    ///   (the first byte, or the 24-byte HTTP/2 preface when it starts like one) have not
    ///   arrived within `header_read_timeout` of the accept. hyper's own header timer only
    ///   starts once the protocol is chosen, so without this a connection that sends
    ///   nothing (or half a preface) would be held forever.
    #[derive(Debug)]
    pub struct ClientIo<T> {
        #[pin]
        inner: T,
        write_timeout: Duration,
        // Allocated the first time a write stalls, then reset in place.
        stall: Option<Pin<Box<Sleep>>>,
        armed: bool,
        expired: bool,
        counter: Counter,
        // Until the protocol is chosen: the deadline, and the preface bytes seen so far.
        preface: Option<Pin<Box<Sleep>>>,
        preface_seen: usize,
    }
}

impl<T> ClientIo<T> {
    /// Wraps `inner` (just accepted): the protocol bytes are due within `first_bytes`, a
    /// stalled write fails after `write_timeout`; `counter` counts the stalled writes.
    pub fn new(
        inner: T,
        first_bytes: Duration,
        write_timeout: Duration,
        counter: Counter,
    ) -> ClientIo<T> {
        ClientIo {
            inner,
            write_timeout,
            stall: None,
            armed: false,
            expired: false,
            counter,
            preface: Some(Box::pin(tokio::time::sleep(first_bytes))),
            preface_seen: 0,
        }
    }
}

fn stalled_write() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the client accepted no response bytes within limits.write_timeout",
    )
}

impl<T: AsyncWrite> ClientIo<T> {
    /// Runs one write-side operation under the write deadline.
    fn guarded<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let this = self.project();
        if *this.expired {
            return Poll::Ready(Err(stalled_write()));
        }
        match op(this.inner, cx) {
            Poll::Ready(r) => {
                *this.armed = false;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = *this.write_timeout;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if !*this.armed {
                    stall.as_mut().reset(Instant::now() + timeout);
                    *this.armed = true;
                }
                if stall.as_mut().poll(cx).is_ready() {
                    *this.expired = true;
                    this.counter.inc();
                    return Poll::Ready(Err(stalled_write()));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncRead> AsyncRead for ClientIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let Some(deadline) = this.preface.as_mut() else {
            return this.inner.poll_read(cx, buf);
        };
        let before = buf.filled().len();
        match this.inner.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                let decided = match new.first() {
                    // End of stream: nothing more to wait for.
                    None => true,
                    Some(&first) => {
                        (*this.preface_seen == 0 && first != b'P')
                            || *this.preface_seen + new.len() >= PREFACE_LEN
                    }
                };
                if decided {
                    *this.preface = None;
                } else {
                    *this.preface_seen += new.len();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if deadline.as_mut().poll(cx).is_ready() {
                    *this.preface = None;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent no request within limits.header_read_timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for ClientIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.guarded(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.guarded(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guarded(cx, AsyncWrite::poll_flush)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guarded(cx, AsyncWrite::poll_shutdown)
    }
}

// === MinRate ===

/// Why a request body was failed: it arrived slower than `limits.body_min_rate`.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body arrived slower than {bytes} bytes per {per:?}")]
pub struct SlowBody {
    /// The configured minimum per window.
    pub bytes: u64,
    /// The window.
    pub per: Duration,
}

/// Whether `err` or one of its sources is a [`SlowBody`].
pub fn is_slow_body(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<SlowBody>() {
            return true;
        }
        cur = e.source();
    }
    false
}

pin_project_lite::pin_project! {
    /// A request body that fails with [`SlowBody`] when it delivers fewer than
    /// `rate.bytes` bytes in a window of `rate.per` spent waiting for it (see the module
    /// docs). Once failed it keeps failing: it never ends as if complete.
    #[derive(Debug)]
    pub struct MinRate<B> {
        #[pin]
        inner: B,
        rate: Option<BodyMinRate>,
        counter: Option<Counter>,
        window_bytes: u64,
        // Allocated the first time the body makes the gateway wait, then reset in place.
        window: Option<Pin<Box<Sleep>>>,
        armed: bool,
        failed: bool,
    }
}

impl<B> MinRate<B> {
    /// Wraps `inner` under `rate`; `counter` counts bodies failed for being slow.
    pub fn new(inner: B, rate: BodyMinRate, counter: Counter) -> MinRate<B> {
        MinRate {
            inner,
            rate: Some(rate),
            counter: Some(counter),
            window_bytes: 0,
            window: None,
            armed: false,
            failed: false,
        }
    }

    /// Wraps `inner` without a minimum rate (a pass-through).
    pub fn unlimited(inner: B) -> MinRate<B> {
        MinRate {
            inner,
            rate: None,
            counter: None,
            window_bytes: 0,
            window: None,
            armed: false,
            failed: false,
        }
    }
}

impl<B> Body for MinRate<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let Some(rate) = *this.rate else {
            return this.inner.poll_frame(cx).map_err(Into::into);
        };
        if *this.failed {
            return Poll::Ready(Some(Err(Box::new(SlowBody {
                bytes: rate.bytes,
                per: rate.per,
            }))));
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.window_bytes = this.window_bytes.saturating_add(data.len() as u64);
                    if *this.window_bytes >= rate.bytes {
                        // This window is satisfied; the next wait starts a new one.
                        *this.window_bytes = 0;
                        *this.armed = false;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                let window = this
                    .window
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(rate.per)));
                if !*this.armed {
                    window.as_mut().reset(Instant::now() + rate.per);
                    *this.armed = true;
                }
                if window.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                *this.failed = true;
                if let Some(c) = this.counter {
                    c.inc();
                }
                Poll::Ready(Some(Err(Box::new(SlowBody {
                    bytes: rate.bytes,
                    per: rate.per,
                }))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.failed && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
