//! [`ResponseFuture`]: the inner service's future, a ready rejection, or a rejection that
//! waits out its reject delay first.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use pin_project_lite::pin_project;

use super::body::AdmissionBody;
use super::response::admitted_headers;
use crate::decision::{Admitted, DelayGuard};

pin_project! {
    /// The response future of [`super::Admission`].
    #[project = Proj]
    // pin-project-lite cannot carry docs on variant fields; the variant docs say what they hold.
    #[allow(missing_docs)]
    pub enum ResponseFuture<F, B> {
        /// Admitted: the inner service runs; the ticket rides along into the body.
        Admitted {
            #[pin]
            fut: F,
            admitted: Option<Admitted>,
            start: tokio::time::Instant,
        },
        /// Rejected: answer at once.
        Ready {
            response: Option<Response<AdmissionBody<B>>>,
        },
        /// Rejected with a reject delay: answer when the timer fires.
        Delayed {
            #[pin]
            sleep: tokio::time::Sleep,
            response: Option<Response<AdmissionBody<B>>>,
            guard: Option<DelayGuard>,
        },
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn admitted(fut: F, admitted: Admitted, start: tokio::time::Instant) -> Self {
        ResponseFuture::Admitted {
            fut,
            admitted: Some(admitted),
            start,
        }
    }

    pub(crate) fn ready(response: Response<AdmissionBody<B>>) -> Self {
        ResponseFuture::Ready {
            response: Some(response),
        }
    }

    pub(crate) fn delayed(
        response: Response<AdmissionBody<B>>,
        delay: Duration,
        guard: DelayGuard,
    ) -> Self {
        ResponseFuture::Delayed {
            sleep: tokio::time::sleep(delay),
            response: Some(response),
            guard: Some(guard),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
    B::Data: From<Bytes>,
{
    type Output = Result<Response<AdmissionBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Admitted {
                fut,
                admitted,
                start,
            } => {
                // On error the ticket is dropped with the future's state: permits released.
                let response = ready!(fut.poll(cx))?;
                let Some(Admitted { ticket, ratelimit }) = admitted.take() else {
                    // Polled after completion: a caller bug; answer like a fresh error-free
                    // response would be wrong, so stay pending is worse. Panic-free: a 500.
                    let mut r = Response::new(AdmissionBody::full(Bytes::new()));
                    *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                    return Poll::Ready(Ok(r));
                };
                let (mut parts, body) = response.into_parts();
                if let Some(info) = &ratelimit {
                    admitted_headers(&mut parts.headers, info);
                }
                let body = AdmissionBody::admitted(body, ticket, parts.status.as_u16(), *start);
                Poll::Ready(Ok(Response::from_parts(parts, body)))
            }
            Proj::Ready { response } => Poll::Ready(Ok(take(response))),
            Proj::Delayed {
                sleep,
                response,
                guard,
            } => {
                ready!(sleep.poll(cx));
                guard.take();
                Poll::Ready(Ok(take(response)))
            }
        }
    }
}

fn take<B>(slot: &mut Option<Response<AdmissionBody<B>>>) -> Response<AdmissionBody<B>> {
    slot.take().unwrap_or_else(|| {
        let mut r = Response::new(AdmissionBody::full(Bytes::new()));
        *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}
