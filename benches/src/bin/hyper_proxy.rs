//! A minimal hyper reverse proxy: the floor for a Rust proxy in the load harness
//! (`benches/load/run.sh`, contender `hyper`).
//!
//! It does only what any HTTP/1.1 reverse proxy must: accept connections, rewrite the request
//! URI to the one upstream, forward it over a pooled keep-alive client and stream the response
//! back. No routing, no admission, no logging, no metrics, so the gap between this and
//! `fairgate` is what fairgate's own work costs.
//!
//! With `HYPER_PROXY_POOL=conn` (contender `hyper-conn`) it forwards over its own pool of
//! `hyper::client::conn::http1` connections instead of hyper-util's legacy `Client`: what
//! the client side of a proxy costs without the legacy pool (issue #15's question).
//!
//! Usage: `hyper_proxy LISTEN_ADDR UPSTREAM_ADDR [THREADS]`. With one thread (the default) it
//! runs on a current-thread tokio runtime, the same one-core budget as the other contenders;
//! with more, on a multi-thread runtime with that many workers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Either the upstream's body or an empty one for a 502.
type ProxyBody = http_body_util::Either<Incoming, http_body_util::Empty<bytes::Bytes>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 || args.len() > 4 {
        eprintln!("usage: hyper_proxy LISTEN_ADDR UPSTREAM_ADDR [THREADS]");
        return ExitCode::from(2);
    }
    let (Ok(listen), Ok(upstream)) = (args[1].parse::<SocketAddr>(), args[2].parse::<SocketAddr>())
    else {
        eprintln!("addresses must be ip:port");
        return ExitCode::from(2);
    };
    let threads = match args.get(3).map(|t| t.parse::<usize>()) {
        None => 1,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("threads must be a positive integer");
            return ExitCode::from(2);
        }
    };
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot build the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(listen, upstream)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyper_proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    if std::env::var("HYPER_PROXY_POOL").is_ok_and(|v| v == "conn") {
        return serve_conn(listen, upstream).await;
    }
    let listener = TcpListener::bind(listen).await?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector);
    // The authority part of every upstream URI, built once.
    let authority: hyper::http::uri::Authority = upstream
        .to_string()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            // Running out of file descriptors and the like: keep serving the others.
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let authority = authority.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let client = client.clone();
                let authority = authority.clone();
                async move { Ok::<_, Infallible>(forward(&client, authority, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    authority: hyper::http::uri::Authority,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let mut uri = parts.uri.into_parts();
    uri.scheme = Some(hyper::http::uri::Scheme::HTTP);
    uri.authority = Some(authority);
    parts.uri = match Uri::from_parts(uri) {
        Ok(uri) => uri,
        Err(_) => return bad_gateway(),
    };
    match client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(http_body_util::Either::Left),
        Err(_) => bad_gateway(),
    }
}

fn bad_gateway() -> Response<ProxyBody> {
    let mut resp = Response::new(http_body_util::Either::Right(http_body_util::Empty::new()));
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp
}

// === HYPER_PROXY_POOL=conn: the proxy over its own pool of http1 connections ===

type Sender = hyper::client::conn::http1::SendRequest<Incoming>;

/// Idle upstream connections (LIFO).
#[derive(Clone)]
struct ConnPool {
    upstream: SocketAddr,
    idle: Arc<Mutex<Vec<Sender>>>,
}

impl ConnPool {
    async fn checkout(&self) -> Option<Sender> {
        loop {
            let popped = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(mut s) = popped else { break };
            if s.is_closed() {
                continue;
            }
            // Checked in when its last response body ended: ready, or about to be.
            if s.ready().await.is_ok() {
                return Some(s);
            }
        }
        let stream = tokio::net::TcpStream::connect(self.upstream).await.ok()?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Some(sender)
    }

    fn checkin(&self, s: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < 1024 {
            idle.push(s);
        }
    }
}

/// A response body that gives its connection back to the pool when it is dropped.
struct Returning {
    inner: Incoming,
    back: Option<(Sender, ConnPool)>,
}

impl hyper::body::Body for Returning {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let Some((s, pool)) = self.back.take() {
            if hyper::body::Body::is_end_stream(&self.inner) {
                pool.checkin(s);
            }
        }
    }
}

type ConnBody = http_body_util::Either<Returning, http_body_util::Empty<bytes::Bytes>>;

async fn serve_conn(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let pool = ConnPool {
        upstream,
        idle: Arc::new(Mutex::new(Vec::new())),
    };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        let pool = pool.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let pool = pool.clone();
                async move { Ok::<_, Infallible>(forward_conn(pool, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward_conn(pool: ConnPool, req: Request<Incoming>) -> Response<ConnBody> {
    let bad_gateway = || {
        let mut resp = Response::new(http_body_util::Either::Right(http_body_util::Empty::new()));
        *resp.status_mut() = StatusCode::BAD_GATEWAY;
        resp
    };
    let Some(mut sender) = pool.checkout().await else {
        return bad_gateway();
    };
    // The request keeps its origin-form target and its Host header.
    match sender.send_request(req).await {
        Ok(resp) => resp.map(|inner| {
            http_body_util::Either::Left(Returning {
                inner,
                back: Some((sender, pool)),
            })
        }),
        Err(_) => bad_gateway(),
    }
}
