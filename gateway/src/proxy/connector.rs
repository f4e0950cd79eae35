//! How a pool's clients open connections: TCP through hyper-util's `HttpConnector` (connect
//! timeout, `TCP_NODELAY`, keep-alive), then, for a pool with `tls:`, a rustls handshake
//! (`tokio-rustls`, `ring` provider) bounded by the same connect timeout.
//!
//! Our own small connector rather than `hyper-rustls`: the name a target's certificate is
//! checked against is the pool's choice per target ([`super::upstream::server_name`]), not
//! the host of the request URI, and a failed handshake must be told from a refused
//! connection ([`TlsFailed`]) to be counted and logged as such.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tower::Service;

use crate::body::BoxError;

/// A TLS handshake with an upstream failed (unknown CA, expired or wrong-name certificate,
/// a client certificate refused, no `h2` by ALPN, or the handshake timed out). Found in a
/// connect error's source chain by [`tls_failure`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct TlsFailed(String);

/// Why TLS failed, if it did somewhere in `e`'s source chain: a [`TlsFailed`] handshake, or
/// an alert the upstream sent after the client's side of the handshake was done (in TLS 1.3
/// a server refuses a client certificate, or its absence, only then: the first request
/// fails with `received fatal alert: CertificateRequired`).
pub(crate) fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(t) = err.downcast_ref::<TlsFailed>() {
            return Some(t.0.clone());
        }
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        // `io::Error::source` skips the error it wraps: look inside.
        if let Some(inner) = err.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(r.to_string());
            }
        }
        next = err.source();
    }
    None
}

/// The TLS side of a pool's connector.
#[derive(Clone)]
pub(crate) struct TlsSettings {
    pub(crate) connector: TlsConnector,
    /// The name each target's certificate is checked against, by the target's authority
    /// (the URI the client connects for); replaced when the pool's target set changes.
    pub(crate) names: Arc<arc_swap::ArcSwap<Vec<(Authority, ServerName<'static>)>>>,
    /// Whether ALPN must have chosen `h2` (`protocol: h2`).
    pub(crate) require_h2: bool,
}

/// A pool's connector: TCP, then TLS when the pool has it.
#[derive(Clone)]
pub(crate) struct Connector {
    tcp: HttpConnector,
    tls: Option<TlsSettings>,
    handshake_timeout: Duration,
}

impl Connector {
    /// A connector over `tcp` (its scheme check is turned off: `https` URIs are ours).
    pub(crate) fn new(
        mut tcp: HttpConnector,
        tls: Option<TlsSettings>,
        handshake_timeout: Duration,
    ) -> Connector {
        tcp.enforce_http(false);
        Connector {
            tcp,
            tls,
            handshake_timeout,
        }
    }
}

impl Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let timeout = self.handshake_timeout;
        let name = tls.as_ref().and_then(|t| {
            let authority = uri.authority()?;
            t.names
                .load()
                .iter()
                .find(|(a, _)| a == authority)
                .map(|(_, n)| n.clone())
        });
        let tcp = self.tcp.call(uri);
        Box::pin(async move {
            let io = tcp.await?;
            let Some(tls) = tls else {
                return Ok(Conn::Plain(io));
            };
            let Some(name) = name else {
                return Err(TlsFailed("no server name for this target".to_owned()).into());
            };
            let stream = io.into_inner();
            let handshake = tls.connector.connect(name, stream);
            let stream = match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(TlsFailed(e.to_string()).into()),
                Err(_) => return Err(TlsFailed(format!("no handshake within {timeout:?}")).into()),
            };
            let h2 = stream.get_ref().1.alpn_protocol() == Some(&b"h2"[..]);
            if tls.require_h2 && !h2 {
                return Err(
                    TlsFailed("the upstream did not agree to h2 by ALPN".to_owned()).into(),
                );
            }
            Ok(Conn::Tls(Box::new(TokioIo::new(stream)), h2))
        })
    }
}

/// A connection to an upstream target, plain or TLS (with whether ALPN chose `h2`; boxed:
/// a rustls session is about a kilobyte).
pub(crate) enum Conn {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>, bool),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Conn::Plain(io) => io.connected(),
            Conn::Tls(io, h2) => {
                let connected = io.inner().get_ref().0.connected();
                if *h2 {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
    }
}

impl Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(io, _) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(io, _) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_flush(cx),
            Conn::Tls(io, _) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(io, _) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(io) => io.is_write_vectored(),
            Conn::Tls(io, _) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::Tls(io, _) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}
