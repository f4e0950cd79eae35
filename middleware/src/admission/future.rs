//! [`ResponseFuture`]: the inner service's future, a ready rejection, a rejection that
//! waits out its reject delay first, or (exact fleet mode) a decision still waiting for
//! Redis, within the backend's timeout budget.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use super::body::AdmissionBody;
use super::response::{admitted_headers, rejection_response, BORROWED};
use crate::decision::{Admitted, Decision, DelayGuard};

/// The exact-mode fleet check (boxed: only the fleet path takes it).
pub(crate) type Check = Pin<Box<dyn Future<Output = Decision> + Send>>;
/// Calls the inner service once the check admits.
pub(crate) type Call<F> = Box<dyn FnOnce() -> F + Send>;

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
        /// Waiting for the fleet (exact mode); then the inner service runs or a rejection
        /// is answered.
        Remote {
            check: Check,
            call: Option<Call<F>>,
            start: tokio::time::Instant,
            grpc: bool,
        },
        /// The usage endpoint writing a cap; then its answer.
        Usage {
            pending: super::usage::Pending,
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

    /// `grpc`: the request is a gRPC call (a rejection is answered in gRPC's form).
    pub(crate) fn remote(
        check: Check,
        call: Call<F>,
        start: tokio::time::Instant,
        grpc: bool,
    ) -> Self {
        ResponseFuture::Remote {
            check,
            call: Some(call),
            start,
            grpc,
        }
    }

    pub(crate) fn usage(pending: super::usage::Pending) -> Self {
        ResponseFuture::Usage { pending }
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

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project() {
                Proj::Admitted {
                    fut,
                    admitted,
                    start,
                } => {
                    // On error the ticket is dropped with the future's state: permits released.
                    let response = ready!(fut.poll(cx))?;
                    let Some(Admitted { ticket, ratelimit }) = admitted.take() else {
                        // Polled after completion: a caller bug. Panic-free: a 500.
                        return Poll::Ready(Ok(internal_error()));
                    };
                    let (mut parts, body) = response.into_parts();
                    if let Some(info) = &ratelimit {
                        admitted_headers(&mut parts.headers, info);
                    }
                    if ticket.borrowed() {
                        // A structured-field boolean: true.
                        parts
                            .headers
                            .insert(BORROWED.clone(), HeaderValue::from_static("?1"));
                    }
                    let body = AdmissionBody::admitted(body, ticket, parts.status.as_u16(), *start);
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
                Proj::Ready { response } => return Poll::Ready(Ok(take(response))),
                Proj::Delayed {
                    sleep,
                    response,
                    guard,
                } => {
                    ready!(sleep.poll(cx));
                    guard.take();
                    return Poll::Ready(Ok(take(response)));
                }
                Proj::Remote {
                    check,
                    call,
                    start,
                    grpc,
                } => match ready!(check.as_mut().poll(cx)) {
                    Decision::Admit(admitted) => match call.take() {
                        Some(call) => ResponseFuture::admitted(call(), admitted, *start),
                        None => return Poll::Ready(Ok(internal_error())),
                    },
                    Decision::Reject(mut rejection) => {
                        let response = if *grpc {
                            super::grpc::grpc_rejection_response(&rejection)
                        } else {
                            rejection_response(&rejection)
                        };
                        match (rejection.delay, rejection.delay_guard.take()) {
                            (Some(delay), Some(guard)) => {
                                ResponseFuture::delayed(response, delay, guard)
                            }
                            _ => return Poll::Ready(Ok(response)),
                        }
                    }
                },
                Proj::Usage { pending } => {
                    let reply = ready!(pending.as_mut().poll(cx));
                    return Poll::Ready(Ok(reply.into_response()));
                }
            };
            self.set(next);
        }
    }
}

fn internal_error<B>() -> Response<AdmissionBody<B>> {
    let mut r = Response::new(AdmissionBody::full(Bytes::new()));
    *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
    r
}

fn take<B>(slot: &mut Option<Response<AdmissionBody<B>>>) -> Response<AdmissionBody<B>> {
    slot.take().unwrap_or_else(internal_error)
}
