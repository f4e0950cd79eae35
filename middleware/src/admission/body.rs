//! [`AdmissionBody`]: the inner response body, counted, completing the ticket when it
//! ends; or a rejection's small fixed body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::decision::{Outcome, Stage, Ticket};

pin_project! {
    /// The response body of [`super::Admission`].
    #[project = Proj]
    // pin-project-lite cannot carry docs on variant fields; the variant docs say what they hold.
    #[allow(missing_docs)]
    pub enum AdmissionBody<B> {
        /// The inner body. Its ticket completes at end of stream (post-hoc cost, adaptive
        /// limit); if the body is dropped first (client gone), the ticket is dropped and
        /// the permits released.
        Inner {
            #[pin]
            body: B,
            done: Option<PendingCompletion>,
        },
        /// A fixed body: a rejection's (`stage` names the stage that rejected), or the
        /// usage endpoint's.
        Full {
            data: Option<Bytes>,
            stage: Option<Stage>,
        },
    }
}

/// The ticket and what its completion needs.
#[derive(Debug)]
pub struct PendingCompletion {
    ticket: Ticket,
    status: u16,
    bytes: u64,
    start: tokio::time::Instant,
}

impl PendingCompletion {
    fn complete(self) {
        self.ticket.complete(Outcome {
            status: self.status,
            response_bytes: self.bytes,
            latency: self.start.elapsed(),
        });
    }
}

impl<B: Body> AdmissionBody<B> {
    pub(crate) fn admitted(
        body: B,
        ticket: Ticket,
        status: u16,
        start: tokio::time::Instant,
    ) -> Self {
        let done = PendingCompletion {
            ticket,
            status,
            bytes: 0,
            start,
        };
        if body.is_end_stream() {
            // Nobody may poll an empty body: complete now.
            done.complete();
            return AdmissionBody::Inner { body, done: None };
        }
        AdmissionBody::Inner {
            body,
            done: Some(done),
        }
    }
}

impl<B> AdmissionBody<B> {
    /// A fixed body.
    pub fn full(data: Bytes) -> Self {
        AdmissionBody::Full {
            data: (!data.is_empty()).then_some(data),
            stage: None,
        }
    }

    /// A rejection's body: `stage` rejected the request.
    pub(crate) fn rejection(data: Bytes, stage: Stage) -> Self {
        AdmissionBody::Full {
            data: (!data.is_empty()).then_some(data),
            stage: Some(stage),
        }
    }

    /// The stage that rejected the request this body answers (`None` for an admitted
    /// request's body and the usage endpoint's): what an access log records.
    pub fn rejected_by(&self) -> Option<Stage> {
        match self {
            AdmissionBody::Full { stage, .. } => *stage,
            AdmissionBody::Inner { .. } => None,
        }
    }
}

impl<B> Body for AdmissionBody<B>
where
    B: Body,
    B::Data: From<Bytes>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project() {
            Proj::Inner { mut body, done } => {
                let polled = body.as_mut().poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(d), Some(data)) = (done.as_mut(), frame.data_ref()) {
                            d.bytes += data.remaining() as u64;
                        }
                        // hyper's HTTP/1 server stops polling once the body says it has
                        // ended (or a Content-Length is written) and drops it without ever
                        // seeing `None`: the last data frame completes the ticket then, or
                        // the drop would only release it and the adaptive limiter and the
                        // observer would never learn the outcome.
                        if body.is_end_stream() {
                            if let Some(d) = done.take() {
                                d.complete();
                            }
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(d) = done.take() {
                            d.complete();
                        }
                    }
                    // An error ends the response: drop the ticket (permits released).
                    Poll::Ready(Some(Err(_))) => drop(done.take()),
                    Poll::Pending => {}
                }
                polled
            }
            Proj::Full { data, .. } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d.into())))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AdmissionBody::Inner { body, .. } => body.is_end_stream(),
            AdmissionBody::Full { data, .. } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AdmissionBody::Inner { body, .. } => body.size_hint(),
            AdmissionBody::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl<B> std::fmt::Debug for AdmissionBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdmissionBody::Inner { done, .. } => f
                .debug_struct("AdmissionBody::Inner")
                .field("pending_ticket", &done.is_some())
                .finish_non_exhaustive(),
            AdmissionBody::Full { data, .. } => f
                .debug_struct("AdmissionBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
        }
    }
}
