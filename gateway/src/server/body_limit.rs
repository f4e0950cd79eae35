//! The `limits.max_body` layer ([`BodyLimit`]): a 413 problem+json for a body over the
//! limit, declared or streamed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{header, Request, Response, StatusCode};
use http_body_util::{Either, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::ProxyBody;
use crate::problem;

/// The problem detail of every 413.
const TOO_LARGE: &str = "the request body is larger than limits.max_body";

/// The 413 for a body over `limits.max_body` (problem+json, like every other refusal).
pub fn too_large() -> Response<ProxyBody> {
    problem::response(StatusCode::PAYLOAD_TOO_LARGE, TOO_LARGE)
}

/// Whether `err` (or one of its sources) is a body that outgrew `limits.max_body`: what
/// the upstream client reports when [`BodyLimit`]'s [`Limited`] body stops a streamed body.
pub fn is_too_large(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<LengthLimitError>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// `limits.max_body` (see [`BodyLimit`]).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    max: usize,
}

impl BodyLimitLayer {
    /// Bodies over `max` bytes are refused with 413.
    pub fn new(max: usize) -> Self {
        BodyLimitLayer { max }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit {
            inner,
            max: self.max,
        }
    }
}

/// Refuses bodies over `limits.max_body` with a problem+json 413.
///
/// A `Content-Length` over the limit is answered at once and nothing is forwarded. Any
/// other body is passed on as a [`Limited`] body, which fails once more than the limit has
/// arrived; the proxy answers that failure 413 too ([`is_too_large`]). By then the
/// upstream may have received the request head and up to the limit of the body, and the
/// upstream connection is closed without ending the body (a chunked body never gets its
/// last chunk), so it never sees a complete request.
///
/// tower-http's `RequestBodyLimit` does the same checks, but answers its own 413 in
/// `text/plain`.
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    max: usize,
}

impl<S, B, ResB> Service<Request<B>> for BodyLimit<S>
where
    S: Service<Request<Limited<B>>, Response = Response<ResB>>,
{
    type Response = Response<Either<ResB, ProxyBody>>;
    type Error = S::Error;
    type Future = LimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max as u64) {
            return LimitFuture::TooLarge {
                res: Some(too_large()),
            };
        }
        let max = self.max;
        LimitFuture::Inner {
            fut: self.inner.call(req.map(|b| Limited::new(b, max))),
        }
    }
}

pin_project! {
    /// Future of [`BodyLimit`]: the inner service's, or the 413.
    // pin-project-lite cannot carry doc comments on variant fields.
    #[allow(missing_docs)]
    #[project = LimitFutureProj]
    pub enum LimitFuture<F> {
        /// Within the limit so far: the inner service's future.
        Inner { #[pin] fut: F },
        /// Refused here; the response is taken when polled.
        TooLarge { res: Option<Response<ProxyBody>> },
    }
}

impl<F, ResB, E> Future for LimitFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<Either<ResB, ProxyBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            LimitFutureProj::Inner { fut } => {
                fut.poll(cx).map(|r| r.map(|res| res.map(Either::Left)))
            }
            LimitFutureProj::TooLarge { res } => {
                let res = res.take().expect("polled after completion");
                Poll::Ready(Ok(res.map(Either::Right)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::BoxError;
    use bytes::Bytes;
    use http_body::Body;

    #[test]
    fn a_length_limit_error_is_found_through_its_sources() {
        #[derive(Debug)]
        struct Wrap(BoxError);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&*self.0)
            }
        }
        // What `Limited` fails with, as it reaches the proxy.
        let limited = Limited::new(http_body_util::Full::new(Bytes::from(vec![0u8; 10])), 5);
        let err = drain(limited).expect_err("over the limit");
        assert!(is_too_large(&Wrap(err)));
        assert!(!is_too_large(&Wrap("other".into())));
    }

    /// Polls a body to its end without an executor (all frames are ready).
    fn drain<B: Body + Unpin>(mut body: B) -> Result<(), B::Error> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
            frame?;
        }
        Ok(())
    }
}
