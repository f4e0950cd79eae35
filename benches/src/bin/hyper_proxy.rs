//! A minimal hyper reverse proxy: the floor for a Rust proxy in the load harness
//! (`benches/load/run.sh`, contender `hyper`).
//!
//! It does only what any HTTP/1.1 reverse proxy must: accept connections, rewrite the request
//! URI to the one upstream, forward it over a pooled keep-alive client and stream the response
//! back. No routing, no admission, no logging, no metrics, so the gap between this and
//! `fairgate` is what fairgate's own work costs.
//!
//! Usage: `hyper_proxy LISTEN_ADDR UPSTREAM_ADDR [THREADS]`. With one thread (the default) it
//! runs on a current-thread tokio runtime, the same one-core budget as the other contenders;
//! with more, on a multi-thread runtime with that many workers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

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
