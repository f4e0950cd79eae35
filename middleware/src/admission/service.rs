//! [`Admission`]: the service the layer builds.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::Service;

use super::body::AdmissionBody;
use super::future::ResponseFuture;
use super::headers::HttpHeaders;
use super::response::rejection_response;
use super::usage;
use crate::decision::{Decision, RequestContext};
use crate::engine::{Begun, Engine, RequestFacts, UsageSettings};

/// The client's socket address, as a request extension (the gateway inserts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The operation (e.g. gateway route) a request was resolved to, as a request extension;
/// it selects the operation's cost by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation(pub Arc<str>);

/// Admission control around `S`. Decides in `call`; `poll_ready` is the inner service's.
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    engine: Arc<Engine>,
}

impl<S> Admission<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, engine: Arc<Engine>) -> Self {
        Admission { inner, engine }
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

impl<S> Admission<S> {
    /// Answers a request to the usage endpoint, for the client it comes from (identified
    /// as the engine identifies its requests; nothing is decided or charged).
    fn usage<B, F, ResBody>(&self, u: &UsageSettings, req: Request<B>) -> ResponseFuture<F, ResBody>
    where
        B: http_body::Body + Send + 'static,
    {
        let key = {
            let host = host_of(&req);
            let headers = HttpHeaders(req.headers());
            let facts = RequestFacts {
                peer: peer_of(req.extensions()),
                method: req.method().as_str(),
                host: &host,
                path: req.uri().path(),
                query: req.uri().query(),
                operation: None,
                headers: &headers,
            };
            self.engine.client_key_of(&facts)
        };
        match usage::serve(&self.engine, u, key, req) {
            usage::Answer::Now(reply) => ResponseFuture::ready(reply.into_response()),
            usage::Answer::Later(pending) => ResponseFuture::usage(pending),
        }
    }
}

static WARNED_NO_PEER: AtomicBool = AtomicBool::new(false);

fn peer_of(ext: &http::Extensions) -> IpAddr {
    if let Some(p) = ext.get::<PeerAddr>() {
        return p.0.ip();
    }
    #[cfg(feature = "axum")]
    if let Some(c) = ext.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return c.0.ip();
    }
    if !WARNED_NO_PEER.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "request without a peer address (no PeerAddr or ConnectInfo extension): \
             attributing it to 0.0.0.0; serve with into_make_service_with_connect_info"
        );
    }
    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
}

/// Host without port, lower case (borrowed unless it has upper-case letters).
fn host_of<B>(req: &Request<B>) -> Cow<'_, str> {
    let raw = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("");
    let host = if raw.starts_with('[') {
        raw.split_once(']')
            .map_or(raw, |(h, _)| h.trim_start_matches('['))
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

impl<S, B, ResBody> Service<Request<B>> for Admission<S>
where
    // `Send + 'static`: an exact-mode fleet decision carries the service and the request
    // into the future until Redis answers.
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    B: http_body::Body + Send + 'static,
    ResBody: http_body::Body,
    ResBody::Data: From<Bytes>,
{
    type Response = Response<AdmissionBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The usage endpoint: one relaxed load while the policy has none.
        if self.engine.usage_armed() {
            if let Some(u) = self.engine.usage_endpoint_at(req.uri().path()) {
                return self.usage(&u, req);
            }
        }
        let start = tokio::time::Instant::now();
        let decision = {
            let host = host_of(&req);
            let headers = HttpHeaders(req.headers());
            let facts = RequestFacts {
                peer: peer_of(req.extensions()),
                method: req.method().as_str(),
                host: &host,
                path: req.uri().path(),
                query: req.uri().query(),
                operation: req.extensions().get::<Operation>().map(|o| &*o.0),
                headers: &headers,
            };
            self.engine
                .begin_with(&facts, req.extensions().get::<RequestContext>())
        };
        let decision = match decision {
            Begun::Decided(d) => d,
            Begun::Remote(check) => {
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let grpc = super::grpc::is_grpc(req.headers());
                return ResponseFuture::remote(
                    Box::pin(check.resolve()),
                    Box::new(move || inner.call(req)),
                    start,
                    grpc,
                );
            }
        };
        match decision {
            Decision::Admit(admitted) => {
                // The ready service goes into the future; a fresh clone (not yet ready)
                // stays for the next poll_ready.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::admitted(inner.call(req), admitted, start)
            }
            Decision::Reject(mut rejection) => {
                // The rejection's form: gRPC's for a gRPC call (one header lookup, on
                // rejections only).
                let response = if super::grpc::is_grpc(req.headers()) {
                    super::grpc::grpc_rejection_response(&rejection)
                } else {
                    rejection_response(&rejection)
                };
                match (rejection.delay, rejection.delay_guard.take()) {
                    (Some(delay), Some(guard)) => ResponseFuture::delayed(response, delay, guard),
                    _ => ResponseFuture::ready(response),
                }
            }
        }
    }
}
