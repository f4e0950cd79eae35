//! Coalescing: identical concurrent requests share one upstream call.
//!
//! Two requests are identical when method, URI and the configured headers (say
//! `Authorization`, or `Accept`) are equal. Only `GET` and `HEAD` with an empty body are
//! coalesced (other methods pass through untouched). The first request of a key is the
//! *leader*: it makes the call and reads the response into memory (up to
//! [`CoalesceConfig::max_body`]); requests arriving while it is in flight are *followers*
//! and wait on a `tokio::sync::watch` channel for its outcome:
//!
//! - a buffered response: each follower gets a copy (the body bytes are shared, not copied);
//! - an error: each follower gets a [`CoalescedError`] around it;
//! - a body over the bound, or a leader that was cancelled: followers make their own calls.
//!
//! The in-flight table is a `std::sync::Mutex<HashMap>` held only to look up or insert a
//! key, never across an `.await`; the leader removes its key when it finishes or is dropped.
//!
//! ```
//! # use fairgate_middleware::outbound::{CoalesceConfig, CoalesceLayer};
//! let layer = CoalesceLayer::new(CoalesceConfig::default().key_header(http::header::AUTHORIZATION));
//! # drop(layer);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body::Body;
use tokio::sync::watch;
use tower::{Layer, Service, ServiceExt};

use super::body::{buffer, Buffered, BufferedResponse, OutboundBody};
use super::{
    is_shareable, no_observer, BoxError, CoalescedError, ObserverHandle, OutboundEvent,
    OutboundObserver,
};

/// Configuration of [`CoalesceLayer`].
#[derive(Debug, Clone)]
pub struct CoalesceConfig {
    headers: Vec<HeaderName>,
    max_body: usize,
}

impl Default for CoalesceConfig {
    /// Method and URI only; bodies up to 1 MiB are shared.
    fn default() -> Self {
        CoalesceConfig {
            headers: Vec::new(),
            max_body: 1 << 20,
        }
    }
}

impl CoalesceConfig {
    /// Adds a header whose value is part of the key (requests differing in it are not shared).
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.headers.push(name);
        self
    }

    /// Largest response body shared with followers (default 1 MiB); larger ones stream to
    /// the leader only and followers make their own calls.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    method: Method,
    uri: Uri,
    headers: Vec<Option<HeaderValue>>,
}

/// What followers receive.
#[derive(Clone)]
enum Outcome {
    Response(Arc<BufferedResponse>),
    Error(CoalescedError),
    /// Make your own call.
    Own,
}

type Flights = Mutex<HashMap<Key, watch::Receiver<Option<Outcome>>>>;

/// Coalesces identical concurrent requests; see the [module docs](self).
#[derive(Clone)]
pub struct CoalesceLayer {
    config: Arc<CoalesceConfig>,
    flights: Arc<Flights>,
    observer: ObserverHandle,
}

impl fmt::Debug for CoalesceLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceLayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CoalesceLayer {
    /// A layer with `config`. Services built from one layer share one in-flight table.
    pub fn new(config: CoalesceConfig) -> Self {
        CoalesceLayer {
            config: Arc::new(config),
            flights: Arc::default(),
            observer: no_observer(),
        }
    }

    /// Reports [`OutboundEvent::Coalesced`] to `observer`.
    pub fn observer(mut self, observer: Arc<dyn OutboundObserver>) -> Self {
        self.observer = observer;
        self
    }
}

impl<S> Layer<S> for CoalesceLayer {
    type Service = Coalesce<S>;

    fn layer(&self, inner: S) -> Coalesce<S> {
        Coalesce {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`CoalesceLayer`].
#[derive(Clone, Debug)]
pub struct Coalesce<S> {
    inner: S,
    layer: CoalesceLayer,
}

/// Removes the leader's key from the table when the leader finishes or is dropped.
struct LeaderGuard {
    flights: Arc<Flights>,
    key: Option<Key>,
    tx: watch::Sender<Option<Outcome>>,
}

impl LeaderGuard {
    fn finish(mut self, outcome: Outcome) {
        self.remove();
        // No receiver left is fine: nobody followed.
        let _ = self.tx.send(Some(outcome));
    }

    fn remove(&mut self) {
        if let Some(key) = self.key.take() {
            let mut map = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            if map
                .get(&key)
                .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
            {
                map.remove(&key);
            }
        }
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        // Cancelled before finishing: followers see the sender go and call for themselves.
        self.remove();
    }
}

impl<S, B, RB> Service<Request<B>> for Coalesce<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Body + Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<OutboundBody<RB>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness of the inner service is awaited in the future, on its own clone.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        if !is_shareable(req.method()) || !req.body().is_end_stream() {
            return Box::pin(async move {
                let res = inner.oneshot(req).await.map_err(Into::into)?;
                Ok(res.map(OutboundBody::stream))
            });
        }
        let config = &self.layer.config;
        let key = Key {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: config
                .headers
                .iter()
                .map(|h| req.headers().get(h).cloned())
                .collect(),
        };
        let flights = self.layer.flights.clone();
        let observer = self.layer.observer.clone();
        let max_body = config.max_body;
        let mut map = flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = map.get(&key) {
            let mut rx = rx.clone();
            drop(map);
            let waiting = Waiting::start(observer.clone());
            return Box::pin(async move {
                let outcome = rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|v| v.clone());
                drop(waiting);
                match outcome {
                    Some(Outcome::Response(r)) => {
                        observer.event(OutboundEvent::Coalesced);
                        Ok(r.to_response())
                    }
                    Some(Outcome::Error(e)) => {
                        observer.event(OutboundEvent::Coalesced);
                        Err(e.into())
                    }
                    Some(Outcome::Own) | None => {
                        let res = inner.oneshot(req).await.map_err(Into::into)?;
                        Ok(res.map(OutboundBody::stream))
                    }
                }
            });
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), rx);
        drop(map);
        let guard = LeaderGuard {
            flights,
            key: Some(key),
            tx,
        };
        Box::pin(async move {
            let res = match inner.oneshot(req).await {
                Ok(res) => res,
                Err(e) => {
                    let shared = CoalescedError(Arc::new(e.into()));
                    guard.finish(Outcome::Error(shared.clone()));
                    return Err(shared.into());
                }
            };
            match buffer(res, max_body).await {
                Ok(Buffered::Complete(r)) => {
                    let res = r.to_response();
                    guard.finish(Outcome::Response(Arc::new(r)));
                    Ok(res)
                }
                Ok(Buffered::TooLarge(res)) => {
                    guard.finish(Outcome::Own);
                    Ok(res)
                }
                Err(e) => {
                    let shared = CoalescedError(Arc::new(e));
                    guard.finish(Outcome::Error(shared.clone()));
                    Err(shared.into())
                }
            }
        })
    }
}

/// A follower's wait, reported as [`OutboundEvent::CoalesceWaitStarted`] when it begins
/// and [`OutboundEvent::CoalesceWaitEnded`] when it ends, also when the request is dropped
/// while waiting (so a gauge of waiting followers never drifts).
struct Waiting(ObserverHandle);

impl Waiting {
    fn start(observer: ObserverHandle) -> Waiting {
        observer.event(OutboundEvent::CoalesceWaitStarted);
        Waiting(observer)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.event(OutboundEvent::CoalesceWaitEnded);
    }
}
