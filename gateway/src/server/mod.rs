//! Listeners and connections: binding with `SO_REUSEPORT`, serving HTTP/1.1 and h2c on one
//! port (hyper-util `auto`), HTTP/1.1 and HTTP/2 over TLS (see [`crate::tls`]), request-head
//! limits, the framing check on every connection (see [`crate::server::framing`]: ambiguous HTTP/1
//! framing is answered 400 + `Connection: close`), the connection limits of
//! [`crate::server::conn_limits`] (per-source cap at accept, first-bytes and write deadlines on the
//! stream, minimum request-body rate), and graceful shutdown.
//!
//! Every listening socket sets `SO_REUSEPORT`, so that a new gateway process can bind the
//! same port while the old one drains: start the new one with `--reuse-port`, then SIGTERM
//! the old one (see `docs/gateway.md`). Without `--reuse-port` ([`Sharing::Exclusive`]) a
//! listener first checks that nothing listens on its address, so a second gateway started by
//! mistake fails with "address in use" instead of silently taking half the connections.
//!
//! hyper serves h2c by prior knowledge only. An HTTP/1.1 request offering `Upgrade: h2c` is
//! answered in HTTP/1.1, and the offer is removed from it before anything else sees it (see
//! `decline_h2c`). On stop a server
//! first *drains* for [`DRAIN_WINDOW`]: it keeps accepting, and answers every HTTP/1.1
//! request with `Connection: close`, so keep-alive clients learn to reconnect (to the new
//! process) from a response instead of finding their idle connection closed under a request
//! already on the wire; then it closes the listener and lets hyper finish what is in flight. It also lets the
//! `thread_per_core` runtime give every worker thread its own socket on the same address
//! (see [`crate::server::runtime`]).

pub mod body_limit;
pub mod conn_limits;
pub mod debug_trace;
pub mod framing;
pub mod request_id;
pub mod runtime;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::{header, HeaderMap, HeaderValue, Request, Response, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::Service;

use crate::body::BoxError;
use crate::config::Limits;
use crate::server::conn_limits::{ConnLimits, MinRate};
use crate::server::framing::{FramingCheck, FramingIo, Verdicts};
use crate::tls::Tls;

/// Most head bytes the framing scanner keeps. hyper stops reading a head at the configured
/// `max_header_bytes` (and answers 431), so this only bounds a head hyper would refuse anyway;
/// a longer one is refused by the scanner too.
const MAX_SCANNED_HEAD: usize = 16 * 1024 * 1024;

/// How long a stopping server keeps accepting and answering with `Connection: close` before
/// it closes its listener (see the module docs). Short against any sane `shutdown_grace`.
pub const DRAIN_WINDOW: Duration = Duration::from_millis(500);

/// Whether a listener may share its address with sockets that already listen there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sharing {
    /// Fail with [`io::ErrorKind::AddrInUse`] when another socket listens on the address
    /// (the default).
    #[default]
    Exclusive,
    /// Join the `SO_REUSEPORT` sockets listening there: the kernel spreads new connections
    /// over all of them (`fairgate run --reuse-port`, for an upgrade).
    Shared,
}

/// Binds a listening socket with `SO_REUSEADDR` and `SO_REUSEPORT`, after checking that no
/// other socket listens on `addr` unless `sharing` is [`Sharing::Shared`] (must be called
/// inside a tokio runtime, which the listener is registered with).
pub fn bind(addr: SocketAddr, sharing: Sharing) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr, sharing)?)
}

/// [`bind`] without a runtime: a non-blocking std listener, to be handed to a runtime later
/// with `TcpListener::from_std`.
pub fn bind_std(addr: SocketAddr, sharing: Sharing) -> io::Result<std::net::TcpListener> {
    // Port 0 picks a port nobody listens on.
    if addr.port() != 0 {
        match sharing {
            Sharing::Exclusive => ensure_unused(addr)?,
            Sharing::Shared => {
                if ensure_unused(addr).is_err() {
                    tracing::warn!(
                        %addr,
                        "--reuse-port: joining the sockets already listening on this address; \
                         new connections are spread over every process listening there until \
                         the others stop"
                    );
                }
            }
        }
    }
    bind_another(addr)
}

/// Binds one more `SO_REUSEPORT` socket on `addr`, joining whatever listens there (the
/// per-core threads' sockets on the address the first one checked and bound).
pub fn bind_another(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Fails with `AddrInUse` when a socket listens on `addr`: a probe socket without
/// `SO_REUSEPORT` cannot bind an address a listening socket holds (`SO_REUSEADDR` only lets
/// it past connections of an earlier process still in `TIME_WAIT`). The probe is closed
/// before it ever listens. Two gateways started at the same instant could both pass the
/// check; one started by mistake next to a running one cannot.
fn ensure_unused(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())
}

/// The HTTP/1.1 + HTTP/2 connection builder with the configured request-head limits.
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper requires at least 8 KiB; the config decoder enforces it.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    // `limits.http2` (docs/gateway.md, "HTTP/2 limits"): every bound is set explicitly, so
    // a hyper/h2 upgrade that changes a default cannot loosen them.
    let h2 = &limits.http2;
    let mut http2 = builder.http2();
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(h2.header_list_size(limits.max_header_bytes))
        .max_concurrent_streams(h2.max_concurrent_streams)
        .max_pending_accept_reset_streams(h2.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(h2.max_local_error_reset_streams)
        .keep_alive_interval(h2.keep_alive_interval)
        .initial_stream_window_size(h2.initial_stream_window)
        .initial_connection_window_size(h2.initial_connection_window);
    if let Some(timeout) = h2.keep_alive_timeout {
        http2.keep_alive_timeout(timeout);
    }
    if let Some(max) = h2.max_send_buf_size {
        // The decoder bounds it to 1GiB, below hyper's `u32::MAX` assertion.
        http2.max_send_buf_size(max as usize);
    }
    builder
}

/// The request body the data-plane service receives: hyper's, under `limits.body_min_rate`.
pub type RequestBody = MinRate<Incoming>;

/// Accepts connections on `listener` and serves each with a clone of `service` until `stop`
/// turns true (or its sender is dropped); then stops accepting (closing the listener), asks
/// every connection to finish its in-flight requests and returns when they have.
///
/// `limits` applies the connection limits (shared by every listener of the gateway): a
/// connection over its source's cap is closed before anything is read, the stream gets the
/// write deadline and every request body the minimum rate.
///
/// With `tls`, each connection first completes a TLS handshake (bounded by its timeout, and
/// abandoned when `stop` turns true) on its own task, so a slow handshake never delays the
/// accept loop; its requests carry the scheme `https`.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<Tls>,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
) where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let graceful = GracefulShutdown::new();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let draining = Arc::new(AtomicBool::new(false));
    let drain_until = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(drain_until);
    let mut stop_seen = false;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s), if !stop_seen => {
                stop_seen = true;
                draining.store(true, Ordering::Relaxed);
                drain_until.as_mut().reset(tokio::time::Instant::now() + DRAIN_WINDOW);
                continue;
            }
            () = &mut drain_until => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        // Over the source's cap: closed before any read (no hyper, no admission, no permit).
        let Some(slot) = limits.admit(peer) else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Ambiguous HTTP/1 framing is found on the bytes (see `crate::server::framing`).
        let verdicts = Verdicts::new();
        let svc = TowerToHyperService::new(FramingCheck::new(
            WithConn {
                inner: service.clone(),
                info: ConnInfo { peer, scheme },
                draining: draining.clone(),
                limits: limits.clone(),
            },
            verdicts.clone(),
        ));
        let Some(tls) = &tls else {
            let io = FramingIo::new(limits.client_io(stream), MAX_SCANNED_HEAD, verdicts);
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), svc)
                .into_owned();
            let watched = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = watched.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                drop(slot);
            });
            continue;
        };
        let tls = tls.clone();
        let builder = builder.clone();
        let mut stop = stop.clone();
        // Taken now, so that a shutdown starting during the handshake still reaches the
        // connection (hyper-util's `Watcher` sees the shutdown signal sent after it was made).
        let watcher = graceful.watcher();
        let limits = limits.clone();
        tokio::spawn(async move {
            // Held for the connection's life, handshake included.
            let _slot = slot;
            let stream = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                handshake = tls.accept(stream) => match handshake {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "tls handshake failed");
                        return;
                    }
                },
            };
            let io = FramingIo::new(limits.client_io(stream), MAX_SCANNED_HEAD, verdicts);
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), svc)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Facts about the client connection, inserted per request by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// `https` when the connection is TLS, else `http`.
    pub scheme: &'static str,
}

/// Inserts the connection's [`ConnInfo`] (and the engine's peer address) into each request,
/// marks its credentials sensitive ([`mark_sensitive`]) and puts its body under the minimum
/// rate; while the server drains, marks HTTP/1.1
/// responses `Connection: close`.
#[derive(Clone, Debug)]
struct WithConn<S> {
    inner: S,
    info: ConnInfo,
    draining: Arc<AtomicBool>,
    limits: ConnLimits,
}

impl<S, B, RB> Service<Request<B>> for WithConn<S>
where
    S: Service<Request<MinRate<B>>, Response = Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Closing<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let close = req.version() == Version::HTTP_11 && self.draining.load(Ordering::Relaxed);
        if req.version() < Version::HTTP_2 {
            decline_h2c(req.headers_mut());
        }
        mark_sensitive(req.headers_mut());
        req.extensions_mut()
            .insert(fairgate_middleware::PeerAddr(self.info.peer));
        req.extensions_mut().insert(self.info);
        let req = req.map(|b| self.limits.min_rate(b));
        Closing {
            inner: self.inner.call(req),
            close,
        }
    }
}

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Marks the credentials a request carries (`Authorization`, `Proxy-Authorization`, `Cookie`,
/// `X-Api-Key`) sensitive: `Debug` (spans, logs) never prints them, and HPACK never indexes
/// them on an HTTP/2 connection. One pass over the request's headers, comparing names (what
/// tower-http's `SetSensitiveRequestHeaders` does with a hashed lookup per name).
fn mark_sensitive(headers: &mut HeaderMap) {
    for (name, value) in headers.iter_mut() {
        if name == header::AUTHORIZATION
            || name == header::COOKIE
            || name == header::PROXY_AUTHORIZATION
            || name == X_API_KEY
        {
            value.set_sensitive(true);
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`WithConn`]: adds `Connection: close` when asked to.
    struct Closing<F> {
        #[pin]
        inner: F,
        close: bool,
    }
}

impl<F, RB, E> Future for Closing<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut out = std::task::ready!(this.inner.poll(cx));
        if *this.close {
            if let Ok(res) = &mut out {
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        Poll::Ready(out)
    }
}

static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Declines an HTTP/1.1 request's offer to upgrade to h2c (RFC 7230 §6.7 lets a server
/// ignore `Upgrade`; RFC 9113 dropped this upgrade): hyper answers it in HTTP/1.1, and the
/// offer is removed so that the upstream never sees it either — an upstream accepting it
/// with a `101` would turn the connection into an HTTP/2 tunnel that bypasses admission.
/// Removes the `h2c` token of `Upgrade` (the header, and the `upgrade` token of
/// `Connection`, when it offered nothing else) and `HTTP2-Settings` with its `Connection`
/// token. Other upgrades (websocket) are left alone.
fn decline_h2c(headers: &mut HeaderMap) {
    let offers_h2c = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(tokens)
        .any(|t| t.eq_ignore_ascii_case("h2c"));
    if !offers_h2c && !headers.contains_key(&HTTP2_SETTINGS) {
        return;
    }
    if offers_h2c {
        let rest = join_tokens(headers, &header::UPGRADE, |t| {
            !t.eq_ignore_ascii_case("h2c")
        });
        headers.remove(header::UPGRADE);
        if let Some(rest) = rest {
            headers.insert(header::UPGRADE, rest);
        }
    }
    headers.remove(&HTTP2_SETTINGS);
    let upgrading = headers.contains_key(header::UPGRADE);
    let connection = join_tokens(headers, &header::CONNECTION, |t| {
        !t.eq_ignore_ascii_case("http2-settings")
            && (upgrading || !t.eq_ignore_ascii_case("upgrade"))
    });
    headers.remove(header::CONNECTION);
    if let Some(connection) = connection {
        headers.insert(header::CONNECTION, connection);
    }
}

/// The comma-separated tokens of one header value (none when it is not visible ASCII).
fn tokens(v: &HeaderValue) -> impl Iterator<Item = &str> {
    v.to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The tokens of every `name` line that `keep` keeps, as one value; `None` when none is kept.
fn join_tokens(
    headers: &HeaderMap,
    name: &HeaderName,
    keep: impl Fn(&str) -> bool,
) -> Option<HeaderValue> {
    let kept: Vec<&str> = headers
        .get_all(name)
        .iter()
        .flat_map(tokens)
        .filter(|t| keep(t))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// Waits for SIGTERM or SIGINT (Ctrl-C).
pub async fn terminate_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return "SIGINT";
            }
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Runs `f` on every SIGHUP until the process ends.
pub fn on_sighup<F, Fut>(f: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    #[cfg(unix)]
    on_signal(tokio::signal::unix::SignalKind::hangup(), "SIGHUP", f);
    #[cfg(not(unix))]
    let _ = f;
}

/// Runs `f` on every SIGUSR1 until the process ends (the access log's reopen).
pub fn on_sigusr1<F, Fut>(f: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    #[cfg(unix)]
    on_signal(
        tokio::signal::unix::SignalKind::user_defined1(),
        "SIGUSR1",
        f,
    );
    #[cfg(not(unix))]
    let _ = f;
}

#[cfg(unix)]
fn on_signal<F, Fut>(kind: tokio::signal::unix::SignalKind, name: &'static str, f: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    match tokio::signal::unix::signal(kind) {
        Ok(mut sig) => {
            tokio::spawn(async move {
                while sig.recv().await.is_some() {
                    f().await;
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, signal = name, "cannot listen for the signal"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn credentials_are_marked_sensitive_and_nothing_else() {
        let mut h = headers(&[
            ("authorization", "Bearer secret"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("proxy-authorization", "Basic eA=="),
            ("x-api-key", "key-1"),
            ("x-api-key-hint", "public"),
            ("accept", "*/*"),
        ]);
        mark_sensitive(&mut h);
        let sensitive: Vec<&str> = h
            .iter()
            .filter(|(_, v)| v.is_sensitive())
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(
            sensitive,
            [
                "authorization",
                "cookie",
                "cookie",
                "proxy-authorization",
                "x-api-key"
            ]
        );
        assert!(!format!("{h:?}").contains("secret"), "{h:?}");
    }

    #[test]
    fn declines_an_h2c_upgrade() {
        let mut h = headers(&[
            ("connection", "Upgrade, HTTP2-Settings, keep-alive"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ("x-other", "1"),
        ]);
        decline_h2c(&mut h);
        assert!(h.get(header::UPGRADE).is_none());
        assert!(h.get("http2-settings").is_none());
        assert_eq!(h.get(header::CONNECTION).unwrap(), "keep-alive");
        assert_eq!(h.get("x-other").unwrap(), "1");

        let mut h = headers(&[("connection", "upgrade"), ("upgrade", "h2c")]);
        decline_h2c(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn keeps_other_upgrades() {
        let mut h = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c, websocket"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ]);
        decline_h2c(&mut h);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "Upgrade");
        assert!(h.get("http2-settings").is_none());

        let ws = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        let mut h = ws.clone();
        decline_h2c(&mut h);
        assert_eq!(h, ws);
    }

    #[test]
    fn exclusive_bind_refuses_a_listening_address_and_shared_joins_it() {
        let first = bind_std("127.0.0.1:0".parse().unwrap(), Sharing::Exclusive).unwrap();
        let addr = first.local_addr().unwrap();
        let err = bind_std(addr, Sharing::Exclusive).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let second = bind_std(addr, Sharing::Shared).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        drop((first, second));
        // Free again: an exclusive bind succeeds.
        bind_std(addr, Sharing::Exclusive).unwrap();
    }
}
