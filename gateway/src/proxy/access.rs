//! The access log's tower layer: notes what a request is when it arrives (time, peer,
//! method, target, version, request id, the upstream of the route it matches), what answered
//! it (status, the admission stage that rejected it), and writes its line when the response
//! body ends or is dropped (bytes sent, duration). The writing is
//! [`AccessLog`](crate::control::access_log::AccessLog)'s, off the request path.
//!
//! It sits between the request id and the router, so it sees every request, also those the
//! router or the body limit answer (`stage: null`, their own status).

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Buf;
use fairgate_middleware::AdmissionBody;
use http::{header, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::control::access_log::{AccessLog, Entry};
use crate::proxy::routing::RouteTable;
use crate::server::request_id::X_REQUEST_ID;
use crate::server::ConnInfo;

/// A response body that knows whether admission rejected its request.
pub trait RejectedBy {
    /// The admission stage that rejected the request (`None`: admitted, or answered before
    /// admission).
    fn rejected_by(&self) -> Option<&'static str>;
}

impl<B> RejectedBy for AdmissionBody<B> {
    fn rejected_by(&self) -> Option<&'static str> {
        AdmissionBody::rejected_by(self).map(|s| s.as_str())
    }
}

impl<A: RejectedBy, B> RejectedBy for Either<A, B> {
    fn rejected_by(&self) -> Option<&'static str> {
        match self {
            Either::Left(a) => a.rejected_by(),
            Either::Right(_) => None,
        }
    }
}

/// Adds the access log (see the module docs). Without a log (`log.access` off) it only
/// passes the response through (the stack keeps one type either way): no note, no line.
#[derive(Clone, Debug)]
pub struct AccessLayer {
    log: Option<AccessLog>,
    table: Arc<RouteTable>,
}

impl AccessLayer {
    /// Logs to `log` (`None`: off), naming upstreams from `table` (the router's).
    pub fn new(log: Option<AccessLog>, table: Arc<RouteTable>) -> AccessLayer {
        AccessLayer { log, table }
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Access<S> {
        Access {
            inner,
            log: self.log.clone(),
            table: self.table.clone(),
        }
    }
}

/// The service of [`AccessLayer`].
#[derive(Clone, Debug)]
pub struct Access<S> {
    inner: S,
    log: Option<AccessLog>,
    table: Arc<RouteTable>,
}

impl<S, B, RB> Service<Request<B>> for Access<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Body + RejectedBy,
{
    type Response = Response<Logged<RB>>;
    type Error = S::Error;
    type Future = AccessFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(log) = &self.log else {
            return AccessFuture {
                inner: self.inner.call(req),
                note: None,
            };
        };
        let agent = log.wants_agent();
        let note = Note {
            time: SystemTime::now(),
            start: Instant::now(),
            peer: req.extensions().get::<ConnInfo>().map(|c| c.peer.ip()),
            method: req.method().clone(),
            target: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned()),
            version: req.version(),
            upstream: self.table.find(&req).map(|r| r.pool.name().clone()),
            request_id: req.headers().get(&X_REQUEST_ID).cloned(),
            referer: agent
                .then(|| req.headers().get(header::REFERER).cloned())
                .flatten(),
            user_agent: agent
                .then(|| req.headers().get(header::USER_AGENT).cloned())
                .flatten(),
        };
        let log = log.clone();
        AccessFuture {
            inner: self.inner.call(req),
            note: Some((note, log)),
        }
    }
}

/// What is known of a request before its response.
#[derive(Debug)]
struct Note {
    time: SystemTime,
    start: Instant,
    peer: Option<IpAddr>,
    method: http::Method,
    target: String,
    version: http::Version,
    upstream: Option<Arc<str>>,
    request_id: Option<http::HeaderValue>,
    referer: Option<http::HeaderValue>,
    user_agent: Option<http::HeaderValue>,
}

impl Note {
    fn entry(self, status: u16, bytes: u64, stage: Option<&'static str>) -> Entry {
        Entry {
            time: self.time,
            peer: self.peer,
            method: self.method,
            target: self.target,
            version: self.version,
            status,
            bytes,
            duration: self.start.elapsed(),
            upstream: self.upstream,
            request_id: self.request_id,
            stage,
            referer: self.referer,
            user_agent: self.user_agent,
        }
    }
}

pin_project! {
    /// The future of [`Access`].
    pub struct AccessFuture<F> {
        #[pin]
        inner: F,
        note: Option<(Note, AccessLog)>,
    }
}

impl<F, RB, E> Future for AccessFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: Body + RejectedBy,
{
    type Output = Result<Response<Logged<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        let Some((note, log)) = this.note.take() else {
            // No access log: the response as it is.
            return Poll::Ready(out.map(|res| res.map(|body| Logged::new(body, None))));
        };
        Poll::Ready(match out {
            Ok(res) => {
                let status = res.status().as_u16();
                let stage = res.body().rejected_by();
                Ok(res.map(|body| {
                    let mut pending = Pending {
                        note: Some(note),
                        log,
                        status,
                        stage,
                        bytes: 0,
                    };
                    if body.is_end_stream() {
                        // Nobody polls an empty body: its line is written now.
                        pending.finish();
                    }
                    Logged::new(body, Some(pending))
                }))
            }
            Err(e) => {
                log.send(note.entry(0, 0, None));
                Err(e)
            }
        })
    }
}

/// A line waiting for its response body to end.
#[derive(Debug)]
pub struct Pending {
    note: Option<Note>,
    log: AccessLog,
    status: u16,
    stage: Option<&'static str>,
    bytes: u64,
}

impl Pending {
    fn finish(&mut self) {
        if let Some(note) = self.note.take() {
            self.log
                .send(note.entry(self.status, self.bytes, self.stage));
        }
    }
}

impl Drop for Pending {
    /// A body dropped before its end (the client went away) is logged with what was sent.
    fn drop(&mut self) {
        self.finish();
    }
}

pin_project! {
    /// A response body that counts its bytes and writes the access-log line at its end.
    pub struct Logged<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
    }
}

impl<B> Logged<B> {
    fn new(inner: B, pending: Option<Pending>) -> Logged<B> {
        Logged { inner, pending }
    }
}

impl<B: Body> Body for Logged<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(p) = this.pending.as_mut() {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        p.bytes += d.remaining() as u64;
                    }
                }
                Some(Err(_)) | None => p.finish(),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
