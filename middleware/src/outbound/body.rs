//! Buffered responses that can be shared, and the body type of the sharing layers.
//!
//! Coalescing and caching hand one response to many callers, so they read its body into
//! memory first, up to a bound. A response that fits becomes a [`BufferedResponse`] (status,
//! headers, body bytes and trailers, cloned per caller by reference count). One that does
//! not fit keeps streaming to the caller that made the call: the bytes already read are
//! sent first, then the rest of the upstream body ([`OutboundBody`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};

use super::BoxError;

/// A response read completely into memory.
#[derive(Debug, Clone)]
pub struct BufferedResponse {
    /// Status.
    pub status: StatusCode,
    /// Version.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, if the body had any.
    pub trailers: Option<HeaderMap>,
}

impl BufferedResponse {
    /// Bytes this response takes in a cache: body plus header names and values.
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() + headers + 64
    }

    /// A fresh response with this status, headers and body (extensions are not kept).
    pub fn to_response<B>(&self) -> Response<OutboundBody<B>> {
        let mut res = Response::new(OutboundBody::full(self.body.clone(), self.trailers.clone()));
        *res.status_mut() = self.status;
        *res.version_mut() = self.version;
        *res.headers_mut() = self.headers.clone();
        res
    }
}

/// The response body of [`Cache`](super::Cache) and [`Coalesce`](super::Coalesce): a
/// buffered (shared) body, or the upstream body streaming through, possibly after a part
/// already read.
#[derive(Debug)]
pub struct OutboundBody<B> {
    kind: Kind<B>,
}

#[derive(Debug)]
enum Kind<B> {
    Full {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Stream {
        head: Option<Bytes>,
        rest: B,
    },
}

impl<B> OutboundBody<B> {
    /// A buffered body.
    pub fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        OutboundBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// The upstream body, unchanged.
    pub fn stream(body: B) -> Self {
        OutboundBody {
            kind: Kind::Stream {
                head: None,
                rest: body,
            },
        }
    }

    fn prefixed(head: Bytes, rest: B) -> Self {
        OutboundBody {
            kind: Kind::Stream {
                head: (!head.is_empty()).then_some(head),
                rest,
            },
        }
    }
}

impl<B> Default for OutboundBody<B> {
    fn default() -> Self {
        OutboundBody::full(Bytes::new(), None)
    }
}

impl<B> Body for OutboundBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.kind {
            Kind::Full { data, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            Kind::Stream { head, rest } => {
                if let Some(h) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(h))));
                }
                Pin::new(rest).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Stream { head, rest } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Stream { head, rest } => {
                let extra = head.as_ref().map_or(0, |h| h.len() as u64);
                let h = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower().saturating_add(extra));
                if let Some(u) = h.upper() {
                    out.set_upper(u.saturating_add(extra));
                }
                out
            }
        }
    }
}

/// The outcome of [`buffer`].
pub(crate) enum Buffered<B> {
    /// Read completely, within the bound.
    Complete(BufferedResponse),
    /// Over the bound: the part read, then the rest streaming.
    TooLarge(Response<OutboundBody<B>>),
}

/// Reads `res`'s body into memory if it has at most `max` bytes.
pub(crate) async fn buffer<B>(res: Response<B>, max: usize) -> Result<Buffered<B>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (parts, mut body) = res.into_parts();
    if body.size_hint().lower() > max as u64 {
        return Ok(Buffered::TooLarge(Response::from_parts(
            parts,
            OutboundBody::stream(body),
        )));
    }
    let mut buf = BytesMut::new();
    let mut first: Option<Bytes> = None;
    let mut trailers = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(Into::into)?;
        let frame = match frame.into_data() {
            Ok(data) => {
                // One data frame (the common small response) is kept without a copy.
                match first.take() {
                    None if buf.is_empty() => first = Some(data),
                    prev => {
                        if let Some(p) = prev {
                            buf.extend_from_slice(&p);
                        }
                        buf.extend_from_slice(&data);
                    }
                }
                let len = first.as_ref().map_or(0, Bytes::len) + buf.len();
                if len > max {
                    let head = match first.take() {
                        Some(f) => f,
                        None => buf.freeze(),
                    };
                    return Ok(Buffered::TooLarge(Response::from_parts(
                        parts,
                        OutboundBody::prefixed(head, body),
                    )));
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    let body = match first {
        Some(f) => f,
        None => buf.freeze(),
    };
    Ok(Buffered::Complete(BufferedResponse {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
        trailers,
    }))
}
