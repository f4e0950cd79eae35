//! The caller's side: tower layers for HTTP clients of rate-limited APIs.
//!
//! A burst of concurrent calls to a rate-limited API fails work that never needed to fail:
//! identical calls bypass the cache, nothing bounds how many go out at once, and retries hammer
//! the API at the worst moment. Four layers fix that; each is a plain tower [`Layer`] over any
//! `Service<http::Request<B>, Response = http::Response<RB>>` (a hyper-util client, the
//! gateway's proxy, a test service):
//!
//! | layer | what it does | module |
//! |---|---|---|
//! | [`CacheLayer`] | keeps responses of safe requests for a TTL per route, bounded in entries and bytes, `Cache-Control` aware, with a warm-up list | [`cache`] |
//! | [`CoalesceLayer`] | identical concurrent safe requests share one upstream call | [`coalesce`] |
//! | [`RetryLayer`] | retries 429/503/connect failures with full-jitter exponential backoff, honouring `Retry-After`, under a retry budget; optional client-side adaptive throttling | [`retry`] |
//! | [`OutboundLimitLayer`] | outbound rate (GCRA) and concurrency per upstream or per key, a bounded queue with a deadline, then [`Throttled`] | [`limit`] |
//!
//! With the `redis` feature too, the cache and the outbound limit also run in **fleet mode**
//! ([`fleet`]): several replicas hold one rate, one concurrency, one shared cache and one
//! fetch per key together on one Redis, falling back to their share while it is down.
//!
//! Stack them in that order, outermost first: a cache hit costs nothing, a miss is coalesced,
//! the one call left is retried as a whole, and every attempt (retries included) passes the
//! outbound limit, so the upstream never sees more than its configured rate.
//!
//! ```
//! # use std::time::Duration;
//! # use fairgate_middleware::outbound::*;
//! # use tower::ServiceBuilder;
//! # let client = tower::service_fn(|_: http::Request<String>| async {
//! #     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
//! # });
//! let stats = OutboundStats::shared();
//! let client = ServiceBuilder::new()
//!     .layer(CacheLayer::new(CacheConfig::default().ttl(Duration::from_secs(1))).observer(stats.clone()))
//!     .layer(CoalesceLayer::new(CoalesceConfig::default()).observer(stats.clone()))
//!     .layer(RetryLayer::new(RetryConfig::default()).observer(stats.clone()))
//!     .layer(OutboundLimitLayer::new(LimitConfig::default().rate(100, Duration::from_secs(1), 10).concurrency(32)).observer(stats.clone()))
//!     .service(client);
//! # drop(client);
//! ```
//!
//! Why our own layers where tower has some: tower has no coalescing and no response cache;
//! `tower::retry` leaves backoff, `Retry-After` and request replay to the policy (we use its
//! [`TpsBudget`](tower::retry::budget::TpsBudget) for the budget); `tower::limit` rejects
//! nothing (its services stay `Pending`), whereas a client of a quota API needs a bounded queue
//! with a deadline and a typed "throttled" answer. The rate uses the engine's GCRA arithmetic
//! ([`crate::gcra`]).
//!
//! Responses are shared by the cache and coalescing, so they are buffered up to a bound
//! ([`OutboundBody`]); a larger response streams to its own caller only. Futures are boxed:
//! these layers sit in front of a network call, buffer bodies and sleep, so a heap-allocated
//! future per call is noise next to the call itself.
//!
//! Errors: every layer returns [`BoxError`]; a local refusal is a [`Throttled`] (find it with
//! [`throttled`]), an error shared with coalesced followers is a [`CoalescedError`].
//! Counters go to an [`OutboundObserver`] ([`OutboundStats`] counts them in atomics).

pub mod body;
pub mod cache;
pub mod coalesce;
#[cfg(feature = "redis")]
pub mod fleet;
pub mod limit;
pub mod retry;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;

pub use body::{BufferedResponse, OutboundBody};
pub use cache::{Cache, CacheConfig, CacheLayer};
pub use coalesce::{Coalesce, CoalesceConfig, CoalesceLayer};
#[cfg(feature = "redis")]
pub use fleet::{OutboundFleet, WeakOutboundFleet};
pub use limit::{KeyBy, LimitBody, LimitConfig, OutboundLimit, OutboundLimitLayer};
pub use retry::{AdaptiveThrottle, Retry, RetryBudget, RetryConfig, RetryLayer};

#[allow(unused_imports)] // used by the doc links above
use tower::Layer;

/// The error type of every outbound layer.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request was refused locally, without reaching the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleReason {
    /// The outbound rate would delay the request past the queue timeout.
    Rate,
    /// The queue of waiting requests is full.
    QueueFull,
    /// No concurrency slot freed up before the queue timeout.
    QueueTimeout,
    /// Client-side adaptive throttling rejected it (the upstream accepts too few requests).
    Adaptive,
}

impl ThrottleReason {
    /// A short label (`rate`, `queue_full`, `queue_timeout`, `adaptive`).
    pub fn as_str(self) -> &'static str {
        match self {
            ThrottleReason::Rate => "rate",
            ThrottleReason::QueueFull => "queue_full",
            ThrottleReason::QueueTimeout => "queue_timeout",
            ThrottleReason::Adaptive => "adaptive",
        }
    }
}

impl fmt::Display for ThrottleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThrottleReason::Rate => {
                "outbound rate limit would delay the request past the queue timeout"
            }
            ThrottleReason::QueueFull => "outbound queue is full",
            ThrottleReason::QueueTimeout => "no outbound concurrency slot before the queue timeout",
            ThrottleReason::Adaptive => "rejected locally by adaptive throttling",
        })
    }
}

/// A request refused locally by an outbound layer. Map it to 503 or 429 with
/// [`Throttled::retry_after`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct Throttled {
    reason: ThrottleReason,
    retry_after: Option<Duration>,
}

impl Throttled {
    pub(crate) fn new(reason: ThrottleReason, retry_after: Option<Duration>) -> Throttled {
        Throttled {
            reason,
            retry_after,
        }
    }

    /// Why it was refused.
    pub fn reason(&self) -> ThrottleReason {
        self.reason
    }

    /// When trying again could succeed, if known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

/// The error of a coalesced call, shared with every follower of that call.
#[derive(Debug, Clone)]
pub struct CoalescedError(Arc<BoxError>);

impl fmt::Display for CoalescedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "coalesced call failed: {}", self.0)
    }
}

impl std::error::Error for CoalescedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&**self.0)
    }
}

/// The [`Throttled`] in `error`'s chain, if any (through [`CoalescedError`] too).
pub fn throttled<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Throttled> {
    let mut e: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cur) = e {
        if let Some(t) = cur.downcast_ref::<Throttled>() {
            return Some(t);
        }
        e = cur.source();
    }
    None
}

/// A response extension a client service sets when the request never reached the upstream
/// because no connection could be made: [`RetryLayer`] retries it like a connect error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectFailed;

/// What happened in an outbound layer, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundEvent {
    /// A request got the response of an identical concurrent call.
    Coalesced,
    /// A request was answered from the cache.
    CacheHit,
    /// A cacheable request was not in the cache.
    CacheMiss,
    /// A request was refused locally ([`Throttled`]).
    Throttled(ThrottleReason),
    /// A request was sent again.
    Retry,
    /// A retry was wanted but the retry budget was empty.
    RetryBudgetExhausted,
    /// A request started waiting for an identical concurrent call (a follower).
    CoalesceWaitStarted,
    /// A follower stopped waiting (answered, fell back to its own call, or dropped).
    CoalesceWaitEnded,
}

/// Receives [`OutboundEvent`]s. Called on the request path: keep it cheap.
pub trait OutboundObserver: Send + Sync + fmt::Debug {
    /// One event.
    fn event(&self, event: OutboundEvent);
}

/// An observer that does nothing (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl OutboundObserver for NoObserver {
    fn event(&self, _: OutboundEvent) {}
}

/// Counts [`OutboundEvent`]s in atomics.
#[derive(Debug, Default)]
pub struct OutboundStats {
    coalesced: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    throttled: AtomicU64,
    retries: AtomicU64,
    retry_budget_exhausted: AtomicU64,
    coalesce_waiting: AtomicU64,
}

impl OutboundStats {
    /// New zeroed counters behind an `Arc`, ready to hand to several layers.
    pub fn shared() -> Arc<OutboundStats> {
        Arc::new(OutboundStats::default())
    }

    /// Requests answered by another call's response.
    pub fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    /// Cache hits.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.load(Ordering::Relaxed)
    }

    /// Cache misses.
    pub fn cache_misses(&self) -> u64 {
        self.cache_misses.load(Ordering::Relaxed)
    }

    /// Requests refused locally.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// Retries sent.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Retries the budget refused.
    pub fn retry_budget_exhausted(&self) -> u64 {
        self.retry_budget_exhausted.load(Ordering::Relaxed)
    }

    /// Followers waiting for an identical concurrent call right now.
    pub fn coalesce_waiting(&self) -> u64 {
        self.coalesce_waiting.load(Ordering::Relaxed)
    }
}

impl OutboundObserver for OutboundStats {
    fn event(&self, event: OutboundEvent) {
        let c = match event {
            OutboundEvent::Coalesced => &self.coalesced,
            OutboundEvent::CacheHit => &self.cache_hits,
            OutboundEvent::CacheMiss => &self.cache_misses,
            OutboundEvent::Throttled(_) => &self.throttled,
            OutboundEvent::Retry => &self.retries,
            OutboundEvent::RetryBudgetExhausted => &self.retry_budget_exhausted,
            OutboundEvent::CoalesceWaitStarted => &self.coalesce_waiting,
            OutboundEvent::CoalesceWaitEnded => {
                self.coalesce_waiting.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The shared observer handle the layers hold.
pub(crate) type ObserverHandle = Arc<dyn OutboundObserver>;

pub(crate) fn no_observer() -> ObserverHandle {
    Arc::new(NoObserver)
}

/// Safe methods (RFC 9110 §9.2.1) that may be shared and cached: `GET` and `HEAD`.
pub(crate) fn is_shareable(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// Idempotent methods (RFC 9110 §9.2.2).
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}
