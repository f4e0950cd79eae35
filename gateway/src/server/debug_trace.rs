//! tower-http's `Trace` (a span per request, request and response events at `debug`), only
//! when the process log shows them.
//!
//! `Trace` reads the clock three times and wraps the response body for every request even when
//! its events are filtered out. [`DebugTraceLayer::new`] reads the log level once, at start:
//! below `debug` for `tower_http`, the service is a plain pass-through (same types either way,
//! so the stack is built once).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body_util::Either;
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_http::classify::{NeverClassifyEos, ServerErrorsAsFailures, SharedClassifier};
use tower_http::trace::{ResponseBody, ResponseFuture, Trace, TraceLayer};

type Traced<S> = Trace<S, SharedClassifier<ServerErrorsAsFailures>>;

/// Adds `Trace` when `tower_http` logs at `debug` (see the module docs).
#[derive(Clone, Debug)]
pub struct DebugTraceLayer {
    on: bool,
}

impl DebugTraceLayer {
    /// Traces when the global subscriber, as installed now, enables `debug` for `tower_http`.
    pub fn new() -> DebugTraceLayer {
        DebugTraceLayer {
            on: tracing::enabled!(target: "tower_http::trace", tracing::Level::DEBUG),
        }
    }
}

impl Default for DebugTraceLayer {
    fn default() -> Self {
        DebugTraceLayer::new()
    }
}

impl<S> Layer<S> for DebugTraceLayer {
    type Service = DebugTrace<S>;

    fn layer(&self, inner: S) -> DebugTrace<S> {
        if self.on {
            DebugTrace::Traced(TraceLayer::new_for_http().layer(inner))
        } else {
            DebugTrace::Plain(inner)
        }
    }
}

/// The service of [`DebugTraceLayer`].
#[derive(Clone, Debug)]
pub enum DebugTrace<S> {
    /// Traced.
    Traced(Traced<S>),
    /// Passed through.
    Plain(S),
}

type TracedBody<B> =
    ResponseBody<B, NeverClassifyEos<tower_http::classify::ServerErrorsFailureClass>>;

impl<S, ReqB, ResB> Service<Request<ReqB>> for DebugTrace<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: std::fmt::Display + 'static,
    ReqB: http_body::Body,
    ResB: http_body::Body,
    ResB::Error: std::fmt::Display + 'static,
{
    type Response = Response<Either<TracedBody<ResB>, ResB>>;
    type Error = S::Error;
    type Future = DebugTraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        match self {
            DebugTrace::Traced(t) => t.poll_ready(cx),
            DebugTrace::Plain(s) => s.poll_ready(cx),
        }
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        match self {
            DebugTrace::Traced(t) => DebugTraceFuture::Traced { fut: t.call(req) },
            DebugTrace::Plain(s) => DebugTraceFuture::Plain { fut: s.call(req) },
        }
    }
}

pin_project! {
    /// The future of [`DebugTrace`]: `fut` is `Trace`'s future or the inner service's.
    #[allow(missing_docs)]
    #[project = Proj]
    pub enum DebugTraceFuture<F> {
        /// Traced.
        Traced { #[pin] fut: ResponseFuture<F, ServerErrorsAsFailures> },
        /// Passed through.
        Plain { #[pin] fut: F },
    }
}

impl<F, ResB, E> Future for DebugTraceFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    E: std::fmt::Display + 'static,
    ResB: http_body::Body,
    ResB::Error: std::fmt::Display + 'static,
{
    type Output = Result<Response<Either<TracedBody<ResB>, ResB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Traced { fut } => fut.poll(cx).map(|r| r.map(|res| res.map(Either::Left))),
            Proj::Plain { fut } => fut.poll(cx).map(|r| r.map(|res| res.map(Either::Right))),
        }
    }
}
