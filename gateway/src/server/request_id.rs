//! `X-Request-Id`: kept when the client sent one, otherwise made here (a random per-process
//! prefix and a counter, 24 hex digits); forwarded upstream like any request header and copied
//! onto the response unless the response already carries one.
//!
//! This does what tower-http's `SetRequestId` + `PropagateRequestId` pair did, in one layer
//! and without their per-request costs that nobody here uses: no `RequestId` request or
//! response extension (a response extension map is allocated just for it), no string
//! formatting for the id.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::header::{Entry, HeaderName, HeaderValue};
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// The header.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Layer that sets and propagates `X-Request-Id` (see the module docs).
#[derive(Clone, Debug)]
pub struct RequestIdLayer {
    ids: RequestIds,
}

impl RequestIdLayer {
    /// Ids `{prefix:08x}{counter:016x}`, the counter starting at 1.
    pub fn new(prefix: u32) -> RequestIdLayer {
        RequestIdLayer {
            ids: RequestIds {
                prefix,
                next: Arc::new(AtomicU64::new(1)),
            },
        }
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestId {
            inner,
            ids: self.ids.clone(),
        }
    }
}

/// Makes ids: a per-process prefix and a shared counter.
#[derive(Clone, Debug)]
struct RequestIds {
    prefix: u32,
    next: Arc<AtomicU64>,
}

impl RequestIds {
    fn make(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = request_id_hex(self.prefix, n);
        // Hex digits are always a valid header value.
        HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

/// `prefix` as 8 and `n` as 16 lower-case hex digits, without the formatting machinery
/// (this runs for every request).
fn request_id_hex(prefix: u32, n: u64) -> [u8; 24] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 24];
    for (i, b) in out[..8].iter_mut().enumerate() {
        *b = HEX[((prefix >> (28 - 4 * i)) & 0xf) as usize];
    }
    for (i, b) in out[8..].iter_mut().enumerate() {
        *b = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// The service built by [`RequestIdLayer`].
#[derive(Clone, Debug)]
pub struct RequestId<S> {
    inner: S,
    ids: RequestIds,
}

impl<S, B, ResB> Service<Request<B>> for RequestId<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = match req.headers().get(&X_REQUEST_ID) {
            Some(v) => v.clone(),
            None => {
                let v = self.ids.make();
                req.headers_mut().insert(X_REQUEST_ID.clone(), v.clone());
                v
            }
        };
        ResponseFuture {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

pin_project! {
    /// Future of [`RequestId`]: the inner future, then the id copied onto the response.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<ResB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            // One lookup: set only when the response has none.
            if let Entry::Vacant(slot) = res.headers_mut().entry(&X_REQUEST_ID) {
                slot.insert(id);
            }
        }
        Poll::Ready(Ok(res))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    #[test]
    fn ids_are_prefix_and_counter_in_hex() {
        assert_eq!(
            &request_id_hex(0x6e13_d0da, 0x17),
            b"6e13d0da0000000000000017"
        );
        assert_eq!(
            &request_id_hex(u32::MAX, u64::MAX),
            b"ffffffffffffffffffffffff"
        );
        let id = format!("{:08x}{:016x}", 0x0102_0304u32, 0x0a0b_0c0d_0e0f_1011u64);
        assert_eq!(
            &request_id_hex(0x0102_0304, 0x0a0b_0c0d_0e0f_1011),
            id.as_bytes()
        );
    }

    /// Echoes the request's id in `seen` and, when asked by the request, sets its own.
    async fn upstream(req: Request<()>) -> Result<Response<()>, Infallible> {
        let mut res = Response::new(());
        if let Some(v) = req.headers().get(&X_REQUEST_ID) {
            res.headers_mut().insert("seen", v.clone());
        }
        if req.headers().contains_key("own") {
            res.headers_mut()
                .insert(X_REQUEST_ID.clone(), HeaderValue::from_static("upstream"));
        }
        Ok(res)
    }

    fn svc() -> impl Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone {
        RequestIdLayer::new(0xabcd_ef01).layer(tower::service_fn(upstream))
    }

    #[tokio::test]
    async fn makes_forwards_and_returns_an_id() {
        let s = svc();
        let a = s.clone().oneshot(Request::new(())).await.unwrap();
        let b = s.oneshot(Request::new(())).await.unwrap();
        assert_eq!(a.headers()[&X_REQUEST_ID], "abcdef010000000000000001");
        assert_eq!(a.headers()["seen"], "abcdef010000000000000001");
        assert_eq!(b.headers()[&X_REQUEST_ID], "abcdef010000000000000002");
    }

    #[tokio::test]
    async fn keeps_the_clients_id() {
        let req = Request::builder()
            .header("x-request-id", "client-1")
            .body(())
            .unwrap();
        let res = svc().oneshot(req).await.unwrap();
        assert_eq!(res.headers()[&X_REQUEST_ID], "client-1");
        assert_eq!(res.headers()["seen"], "client-1");
    }

    #[tokio::test]
    async fn keeps_the_upstreams_id() {
        let req = Request::builder().header("own", "1").body(()).unwrap();
        let res = svc().oneshot(req).await.unwrap();
        assert_eq!(res.headers()[&X_REQUEST_ID], "upstream");
        assert_eq!(res.headers().get_all(&X_REQUEST_ID).iter().count(), 1);
    }
}
