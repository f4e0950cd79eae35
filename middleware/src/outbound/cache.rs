//! A short-TTL response cache for safe requests, bounded in entries and bytes.
//!
//! Only `GET` and `HEAD` with an empty body are looked up and stored; the key is method, URI
//! and the configured `vary` headers. A response is stored when its status is cacheable by
//! default (RFC 9110 §15.1: 200, 203, 204, 300, 301, 404, 405, 410, 414, 501) and its body
//! fits [`CacheConfig::max_entry_bytes`]; it lives for the TTL of the longest matching route
//! prefix, else the default TTL (a zero TTL stores nothing). With
//! [`CacheConfig::honour_cache_control`], a response's `Cache-Control: no-store`, `no-cache`
//! or `private` keeps it out, and `max-age=N` lowers its TTL to `N` seconds (never raises it:
//! the configured TTL is the most staleness the caller accepts).
//!
//! Bounds: at most `max_entries` entries and `max_bytes` bytes (body plus headers, see
//! [`BufferedResponse::weight`]); inserting past a bound evicts the oldest insertions first.
//! Expired entries are dropped when met. Time is `tokio::time::Instant`, so tests step it
//! with `tokio::time::pause` and `advance`.
//!
//! [`Cache::warm_up`] preloads a list of URIs at start. The store sits behind one
//! `std::sync::Mutex` held for a lookup or an insert, never across an `.await`.
//!
//! ```
//! # use std::time::Duration;
//! # use fairgate_middleware::outbound::{CacheConfig, CacheLayer};
//! let layer = CacheLayer::new(
//!     CacheConfig::default()
//!         .ttl(Duration::from_secs(1))
//!         .route("/quotas/", Duration::from_secs(30))
//!         .max_entries(10_000)
//!         .max_bytes(64 << 20)
//!         .honour_cache_control(true),
//! );
//! # drop(layer);
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::body::{buffer, Buffered, BufferedResponse, OutboundBody};

#[cfg(feature = "redis")]
mod shared;
use super::{is_shareable, no_observer, BoxError, ObserverHandle, OutboundEvent, OutboundObserver};

/// Configuration of [`CacheLayer`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    ttl: Duration,
    routes: Vec<(String, Duration)>,
    max_entries: usize,
    max_bytes: usize,
    max_entry_bytes: usize,
    honour_cache_control: bool,
    vary: Vec<HeaderName>,
    lease: Duration,
    max_wait: Duration,
}

impl Default for CacheConfig {
    /// TTL 1 s, 10 000 entries, 64 MiB, entries up to 1 MiB, `Cache-Control` ignored; shared
    /// (fleet mode): a 2 s lease, waits of at most 5 s.
    fn default() -> Self {
        CacheConfig {
            ttl: Duration::from_secs(1),
            routes: Vec::new(),
            max_entries: 10_000,
            max_bytes: 64 << 20,
            max_entry_bytes: 1 << 20,
            honour_cache_control: false,
            vary: Vec::new(),
            lease: Duration::from_secs(2),
            max_wait: Duration::from_secs(5),
        }
    }
}

impl CacheConfig {
    /// The TTL of requests no route matches (zero: not cached).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The TTL of paths starting with `path_prefix` (longest prefix wins; zero: not cached).
    pub fn route(mut self, path_prefix: impl Into<String>, ttl: Duration) -> Self {
        self.routes.push((path_prefix.into(), ttl));
        self.routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        self
    }

    /// Most entries kept.
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self
    }

    /// Most bytes kept (see [`BufferedResponse::weight`]).
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// Largest response body stored (default 1 MiB, never above `max_bytes`).
    pub fn max_entry_bytes(mut self, n: usize) -> Self {
        self.max_entry_bytes = n;
        self
    }

    /// Whether responses' `Cache-Control` may keep them out or shorten their TTL.
    pub fn honour_cache_control(mut self, yes: bool) -> Self {
        self.honour_cache_control = yes;
        self
    }

    /// Adds a request header whose value is part of the key. A response whose `Vary` names
    /// a header not added here (or `*`) is not stored.
    pub fn vary(mut self, name: HeaderName) -> Self {
        self.vary.push(name);
        self
    }

    /// Shared cache (fleet mode): how long a replica fetching a key holds its lease before
    /// another may take over (default 2 s; renewed every third of it while the fetch lasts,
    /// so a slow answer keeps it and a dead replica's lapses).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(1));
        self
    }

    /// Shared cache (fleet mode): the longest a request waits for another replica's fetch
    /// before calling for itself (default 5 s).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    fn ttl_for(&self, uri: &Uri) -> Duration {
        let path = uri.path();
        self.routes
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map_or(self.ttl, |(_, t)| *t)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    method: Method,
    uri: Uri,
    vary: Vec<Option<HeaderValue>>,
}

struct Entry {
    response: Arc<BufferedResponse>,
    expires: Instant,
    /// When it was stored here, and its age then (its `Age` from upstream or the shared
    /// cache): its `Age` on a hit is their sum with the time since.
    stored: Instant,
    age: Duration,
    weight: usize,
    seq: u64,
}

impl Entry {
    fn new(response: BufferedResponse, ttl: Duration, age: Duration, seq: u64) -> Entry {
        let now = Instant::now();
        Entry {
            weight: response.weight(),
            response: Arc::new(response),
            // From when the response arrived, not when it was asked for.
            expires: now + ttl,
            stored: now,
            age,
            seq,
        }
    }
}

/// A stored response as served: its `Age` is what it has spent in caches (RFC 9111 §5.1).
fn serve<B>(response: &BufferedResponse, age: Duration) -> Response<OutboundBody<B>> {
    let mut res = response.to_response();
    res.headers_mut()
        .insert(header::AGE, HeaderValue::from(age.as_secs()));
    res
}

/// The `Age` a response arrived with (0 when absent or not a number).
fn upstream_age(headers: &HeaderMap) -> Duration {
    headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs)
}

#[derive(Default)]
struct Store {
    map: HashMap<Key, Entry>,
    /// Insertion order: `(seq, key)`; stale rows (replaced or removed keys) are skipped.
    order: VecDeque<(u64, Key)>,
    bytes: usize,
    seq: u64,
}

impl Store {
    /// The response stored for `key` and its age now.
    fn get(&mut self, key: &Key, now: Instant) -> Option<(Arc<BufferedResponse>, Duration)> {
        let e = self.map.get(key)?;
        if e.expires > now {
            return Some((
                e.response.clone(),
                e.age + now.saturating_duration_since(e.stored),
            ));
        }
        if let Some(e) = self.map.remove(key) {
            self.bytes -= e.weight;
        }
        None
    }

    fn insert(&mut self, key: Key, entry: Entry, max_entries: usize, max_bytes: usize) {
        if let Some(old) = self.map.remove(&key) {
            self.bytes -= old.weight;
        }
        while !self.map.is_empty()
            && (self.map.len() + 1 > max_entries || self.bytes + entry.weight > max_bytes)
        {
            let Some((seq, k)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&k).is_some_and(|e| e.seq == seq) {
                if let Some(e) = self.map.remove(&k) {
                    self.bytes -= e.weight;
                }
            }
        }
        // Stale order rows of replaced keys would grow the queue without bound.
        if self.order.len() > 2 * max_entries.max(16) {
            let map = &self.map;
            self.order
                .retain(|(seq, k)| map.get(k).is_some_and(|e| e.seq == *seq));
        }
        self.bytes += entry.weight;
        self.order.push_back((entry.seq, key.clone()));
        self.map.insert(key, entry);
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

/// Caches responses of safe requests; see the [module docs](self).
#[derive(Clone)]
pub struct CacheLayer {
    config: Arc<CacheConfig>,
    store: Arc<Mutex<Store>>,
    observer: ObserverHandle,
    #[cfg(feature = "redis")]
    shared: Option<shared::Shared>,
}

impl fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CacheLayer {
    /// A layer with `config`. Services built from one layer share one store.
    pub fn new(config: CacheConfig) -> Self {
        CacheLayer {
            config: Arc::new(config),
            store: Arc::default(),
            observer: no_observer(),
            #[cfg(feature = "redis")]
            shared: None,
        }
    }

    /// Fleet mode (feature `redis`): the shared cache in Redis behind the local one, and
    /// fleet-wide coalescing of misses by lease (see [`super::fleet`]). `name` keeps apart
    /// the caches of different upstreams in one Redis (a pool's name). Never shared:
    /// `Cache-Control: private` or `no-store`, `Set-Cookie`, trailers, and answers to requests
    /// with `Authorization` unless it is a [`vary`](CacheConfig::vary) header.
    #[cfg(feature = "redis")]
    pub fn shared(mut self, fleet: super::fleet::OutboundFleet, name: impl Into<String>) -> Self {
        self.shared = Some(shared::Shared {
            fleet,
            name: name.into(),
            local: Arc::default(),
        });
        self
    }

    /// Reports cache hits and misses to `observer`.
    pub fn observer(mut self, observer: Arc<dyn OutboundObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// Entries and bytes stored now.
    pub fn usage(&self) -> (usize, usize) {
        let s = self.store.lock().unwrap_or_else(|e| e.into_inner());
        (s.map.len(), s.bytes)
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Cache<S> {
        Cache {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`CacheLayer`].
#[derive(Clone, Debug)]
pub struct Cache<S> {
    inner: S,
    layer: CacheLayer,
}

impl<S> Cache<S> {
    /// The layer (store and config) this service uses.
    pub fn layer(&self) -> &CacheLayer {
        &self.layer
    }

    /// Preloads `uris` with `GET` requests through this cache; returns how many were stored.
    /// Failures are logged and skipped.
    pub async fn warm_up<B, RB>(&self, uris: impl IntoIterator<Item = Uri>) -> usize
    where
        Self: Service<Request<B>, Response = Response<OutboundBody<RB>>, Error = BoxError>,
        S: Clone,
        B: Default,
    {
        let mut stored = 0;
        for uri in uris {
            let mut req = Request::new(B::default());
            *req.uri_mut() = uri.clone();
            match self.clone().oneshot(req).await {
                Ok(_) => {
                    let key = Key {
                        method: Method::GET,
                        uri,
                        vary: self.layer.config.vary.iter().map(|_| None).collect(),
                    };
                    let now = Instant::now();
                    let hit = self
                        .layer
                        .store
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&key, now)
                        .is_some();
                    if hit {
                        stored += 1;
                    }
                }
                Err(e) => tracing::warn!(%uri, error = %e, "cache warm-up request failed"),
            }
        }
        stored
    }
}

/// The TTL `headers` allow, given the configured `ttl`.
fn allowed_ttl(headers: &HeaderMap, ttl: Duration) -> Duration {
    let mut ttl = ttl;
    for v in headers.get_all(header::CACHE_CONTROL) {
        let Ok(v) = v.to_str() else { continue };
        for directive in v.split(',').map(str::trim) {
            let (name, value) = directive
                .split_once('=')
                .map_or((directive, None), |(n, v)| (n.trim(), Some(v.trim())));
            if name.eq_ignore_ascii_case("no-store")
                || name.eq_ignore_ascii_case("no-cache")
                || name.eq_ignore_ascii_case("private")
            {
                return Duration::ZERO;
            }
            if name.eq_ignore_ascii_case("max-age") {
                match value
                    .map(|v| v.trim_matches('"'))
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    Some(secs) => ttl = ttl.min(Duration::from_secs(secs)),
                    // An invalid max-age is treated as stale (RFC 9111 §4.2.1).
                    None => return Duration::ZERO,
                }
            }
        }
    }
    ttl
}

fn cacheable_status(s: StatusCode) -> bool {
    matches!(
        s.as_u16(),
        200 | 203 | 204 | 300 | 301 | 404 | 405 | 410 | 414 | 501
    )
}

impl<S, B, RB> Service<Request<B>> for Cache<S>
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
        let config = self.layer.config.clone();
        let ttl = config.ttl_for(req.uri());
        if !is_shareable(req.method()) || !req.body().is_end_stream() || ttl.is_zero() {
            return Box::pin(async move {
                let res = inner.oneshot(req).await.map_err(Into::into)?;
                Ok(res.map(OutboundBody::stream))
            });
        }
        let key = Key {
            method: req.method().clone(),
            uri: req.uri().clone(),
            vary: config
                .vary
                .iter()
                .map(|h| req.headers().get(h).cloned())
                .collect(),
        };
        let now = Instant::now();
        let store = self.layer.store.clone();
        let observer = self.layer.observer.clone();
        let hit = store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key, now);
        if let Some((r, age)) = hit {
            observer.event(OutboundEvent::CacheHit);
            let res = serve(&r, age);
            return Box::pin(std::future::ready(Ok(res)));
        }
        #[cfg(feature = "redis")]
        let lookup = self
            .layer
            .shared
            .clone()
            .and_then(|sh| sh.lookup_for(&key, &config, req.headers(), &observer));
        Box::pin(async move {
            #[cfg(feature = "redis")]
            let mut lead = None;
            #[cfg(feature = "redis")]
            if let Some(lookup) = lookup {
                match lookup.run(&config).await {
                    shared::Found::Hit(r, age, left) => {
                        observer.event(OutboundEvent::CacheHit);
                        let res = serve(&r, age);
                        let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
                        let seq = s.next_seq();
                        let entry = Entry::new(r, left, age, seq);
                        s.insert(key, entry, config.max_entries, config.max_bytes);
                        return Ok(res);
                    }
                    shared::Found::Lead(l) => lead = Some(l),
                    shared::Found::Own => {}
                }
            }
            observer.event(OutboundEvent::CacheMiss);
            #[cfg(feature = "redis")]
            let res = match &lead {
                Some(l) => {
                    let call = async { inner.oneshot(req).await.map_err(Into::into) };
                    l.fetch(call).await
                }
                None => inner.oneshot(req).await.map_err(Into::into),
            };
            #[cfg(not(feature = "redis"))]
            let res: Result<_, BoxError> = inner.oneshot(req).await.map_err(Into::into);
            let res = res?;
            let ttl = if config.honour_cache_control {
                allowed_ttl(res.headers(), ttl)
            } else {
                ttl
            };
            if !cacheable_status(res.status())
                || ttl.is_zero()
                || !vary_allowed(res.headers(), &config.vary)
            {
                #[cfg(feature = "redis")]
                if let Some(l) = lead {
                    l.settle_pass().await;
                }
                return Ok(res.map(OutboundBody::stream));
            }
            let max = config.max_entry_bytes.min(config.max_bytes);
            match buffer(res, max).await? {
                Buffered::Complete(r) => {
                    let res = r.to_response();
                    #[cfg(feature = "redis")]
                    if let Some(l) = lead {
                        l.settle_response(&r, ttl).await;
                    }
                    let age = upstream_age(&r.headers);
                    if r.weight() <= config.max_bytes && config.max_entries > 0 {
                        let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
                        let seq = s.next_seq();
                        s.insert(
                            key,
                            Entry::new(r, ttl, age, seq),
                            config.max_entries,
                            config.max_bytes,
                        );
                    }
                    Ok(res)
                }
                Buffered::TooLarge(res) => {
                    #[cfg(feature = "redis")]
                    if let Some(l) = lead {
                        l.settle_pass().await;
                    }
                    Ok(res)
                }
            }
        })
    }
}

/// Whether a response's `Vary` names only request headers that are part of the key
/// (`vary`); `Vary: *` never is.
fn vary_allowed(headers: &HeaderMap, vary: &[HeaderName]) -> bool {
    headers.get_all(header::VARY).iter().all(|v| {
        let Ok(v) = v.to_str() else { return false };
        v.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .all(|n| n != "*" && vary.iter().any(|h| h.as_str().eq_ignore_ascii_case(n)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_lowers_or_blocks_the_ttl() {
        let ttl = Duration::from_secs(10);
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(header::CACHE_CONTROL, HeaderValue::from_static(v));
            m
        };
        assert_eq!(allowed_ttl(&HeaderMap::new(), ttl), ttl);
        assert_eq!(allowed_ttl(&h("max-age=3"), ttl), Duration::from_secs(3));
        assert_eq!(allowed_ttl(&h("public, max-age=60"), ttl), ttl);
        assert_eq!(allowed_ttl(&h("no-store"), ttl), Duration::ZERO);
        assert_eq!(allowed_ttl(&h("private, max-age=5"), ttl), Duration::ZERO);
        assert_eq!(allowed_ttl(&h("max-age=abc"), ttl), Duration::ZERO);
    }

    #[test]
    fn longest_route_prefix_wins() {
        let c = CacheConfig::default()
            .ttl(Duration::from_secs(1))
            .route("/a", Duration::from_secs(2))
            .route("/a/b", Duration::ZERO);
        let ttl = |s: &str| c.ttl_for(&s.parse().unwrap());
        assert_eq!(ttl("/x"), Duration::from_secs(1));
        assert_eq!(ttl("/a/c"), Duration::from_secs(2));
        assert_eq!(ttl("/a/b/c"), Duration::ZERO);
    }

    #[test]
    fn the_store_stays_within_its_bounds() {
        let now = Instant::now();
        let mut s = Store::default();
        let resp = |n: usize| BufferedResponse {
            status: StatusCode::OK,
            version: http::Version::HTTP_11,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![0u8; n]),
            trailers: None,
        };
        for i in 0..100u32 {
            let key = Key {
                method: Method::GET,
                uri: format!("/k{}", i % 30).parse().unwrap(),
                vary: vec![],
            };
            let r = resp(100 + i as usize);
            let seq = s.next_seq();
            let e = Entry::new(r, Duration::from_secs(5), Duration::ZERO, seq);
            s.insert(key, e, 10, 1500);
            assert!(s.map.len() <= 10);
            assert!(s.bytes <= 1500, "{}", s.bytes);
            let sum: usize = s.map.values().map(|e| e.weight).sum();
            assert_eq!(sum, s.bytes);
        }
        assert!(s.order.len() <= 64);
        // Expiry.
        let key = s.map.keys().next().unwrap().clone();
        assert!(s.get(&key, now).is_some());
        // Entries were stored after `now`: five seconds after the last one, all are gone.
        assert!(s
            .get(&key, Instant::now() + Duration::from_secs(5))
            .is_none());
        assert!(!s.map.contains_key(&key));
    }
}
