//! The built-in demo upstream, `builtin:echo`: a tiny HTTP server inside the gateway process,
//! bound to an ephemeral loopback port at startup, so the example config works with nothing
//! else running. It goes through the same proxy path (pool, keep-alive, headers) as a real
//! upstream.
//!
//! - `GET /status/NNN` answers status NNN;
//! - `GET /bytes/N` answers N bytes (at most 64 MiB), streamed;
//! - `/slow?ms=N` waits N ms (at most 60 s) before echoing;
//! - anything else answers 200 with a JSON echo: method, path, query, a few request headers
//!   and the number of body bytes received.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::body::{self, ProxyBody};

const MAX_BYTES: u64 = 64 * 1024 * 1024;
const MAX_SLOW_MS: u64 = 60_000;
const ECHOED_HEADERS: [&str; 8] = [
    "host",
    "user-agent",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
    "via",
    "x-api-key",
    "content-type",
];

/// Starts the echo server on `127.0.0.1:0` and returns its address. It runs until the
/// runtime shuts down.
pub async fn start() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let builder = builder.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(handle);
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(addr)
}

/// Answers one request (public for tests and benches).
pub async fn handle(req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        let mut res = Response::new(body::empty());
        *res.status_mut() = status;
        return Ok(res);
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let Ok(n) = n.parse::<u64>() else {
            return Ok(text(StatusCode::BAD_REQUEST, "bad byte count"));
        };
        let mut res = Response::new(body::boxed(Repeat::new(n.min(MAX_BYTES))));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return Ok(res);
    }
    if path == "/slow" {
        let ms = query_param(req.uri().query().unwrap_or(""), "ms")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1000)
            .min(MAX_SLOW_MS);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut echo = serde_json::Map::new();
    echo.insert("method".into(), req.method().as_str().into());
    echo.insert("path".into(), path.into());
    echo.insert("query".into(), req.uri().query().unwrap_or("").into());
    let mut headers = serde_json::Map::new();
    for name in ECHOED_HEADERS {
        if let Some(v) = req.headers().get(name).and_then(|v| v.to_str().ok()) {
            headers.insert(name.into(), v.into());
        }
    }
    echo.insert("headers".into(), headers.into());
    let mut body_bytes = 0u64;
    let mut incoming = req.into_body();
    while let Some(frame) = incoming.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_bytes += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    echo.insert("body_bytes".into(), body_bytes.into());
    let json = serde_json::Value::Object(echo).to_string();
    let mut res = Response::new(body::boxed(Full::new(Bytes::from(json))));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

fn text(status: StatusCode, msg: &'static str) -> Response<ProxyBody> {
    let mut res = Response::new(body::boxed(Full::new(Bytes::from_static(msg.as_bytes()))));
    *res.status_mut() = status;
    res
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `n` bytes of `x`, in 16 KiB frames.
struct Repeat {
    remaining: u64,
    chunk: Bytes,
}

impl Repeat {
    fn new(n: u64) -> Repeat {
        Repeat {
            remaining: n,
            chunk: Bytes::from(vec![b'x'; 16 * 1024]),
        }
    }
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64);
        self.remaining -= n;
        let data = self.chunk.slice(..n as usize);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn repeat_yields_exactly_n_bytes() {
        let b = Repeat::new(40_000).collect().await.unwrap().to_bytes();
        assert_eq!(b.len(), 40_000);
    }

    #[test]
    fn query_param_finds_values() {
        assert_eq!(query_param("a=1&ms=250", "ms"), Some("250"));
        assert_eq!(query_param("a=1", "ms"), None);
    }
}
