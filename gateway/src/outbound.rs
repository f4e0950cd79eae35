//! Outbound protection towards upstream pools: coalescing, caching, outbound limits, retries.
//!
//! An upstream pool with an `outbound:` block gets the tower layers of
//! [`fairgate_middleware::outbound`] between admission and the proxy, outermost first:
//! cache → coalesce → retry → outbound limit → the proxy's own forwarding (target pick,
//! connect-failure failover, timeouts). Every retry therefore passes the outbound limit
//! again, and a cache hit or a coalesced follower never reaches the pool.
//!
//! This module owns the config model of the block ([`OutboundConfig`], decoded in
//! `config::decode::outbound`), the stack built from it ([`build_stack`]), the answer to a
//! request refused locally ([`error_response`]) and the metrics
//! ([`OutboundMetrics`]: `fairgate_outbound_{coalesced,cache_hits,cache_misses,throttled,
//! retries,retry_budget_exhausted}_total`, labelled by upstream).
//!
//! Coalescing and cache keys always include the request's `Authorization`, `Cookie` and
//! `X-Api-Key` headers (so one caller never gets another's response) plus the configured
//! `headers` / `vary` lists; add `host` there when one pool serves several virtual hosts.
//! Upgrade requests bypass the stack.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use fairgate_middleware::outbound::{
    throttled, AdaptiveThrottle, CacheConfig, CacheLayer, CoalesceConfig, CoalesceLayer, KeyBy,
    LimitConfig, OutboundEvent, OutboundLimitLayer, OutboundObserver, RetryConfig, RetryLayer,
};
use fairgate_policies::units::Rate;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};

use crate::body::{self, BoxError, ProxyBody};

// === config model ===

/// A pool's `outbound:` block. Absent keys: that layer is off.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundConfig {
    /// Coalesce identical concurrent `GET`/`HEAD` requests (`coalesce: true` or a map).
    pub coalesce: Option<CoalesceSettings>,
    /// Cache responses of `GET`/`HEAD` requests.
    pub cache: Option<CacheSettings>,
    /// Outbound rate (`100/s`, or `{rate: 100/s, burst: 20, key: {header: x-region}}`).
    pub rate: Option<RateSettings>,
    /// Most requests in flight to the pool (per key when `rate.key` is a header).
    pub concurrency: Option<u32>,
    /// The wait queue in front of `rate` and `concurrency` (default `{max: 1000, timeout: 2s}`).
    pub queue: QueueSettings,
    /// Retries on upstream 429/503 and connect failures.
    pub retry: Option<RetrySettings>,
    /// Status of a request refused locally (default 503; 429 also accepted).
    pub throttle_status: StatusCode,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            coalesce: None,
            cache: None,
            rate: None,
            concurrency: None,
            queue: QueueSettings::default(),
            retry: None,
            throttle_status: StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// `coalesce:` settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CoalesceSettings {
    /// More request headers in the key.
    pub headers: Vec<HeaderName>,
    /// Largest shared response body (default 1MiB).
    pub max_body: Option<u64>,
}

/// `cache:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    /// TTL of paths no `routes` entry matches (default 1s).
    pub ttl: Duration,
    /// TTL per path prefix (longest wins).
    pub routes: Vec<(String, Duration)>,
    /// Most entries (default 10000).
    pub max_entries: u64,
    /// Most bytes (default 64MiB).
    pub max_bytes: u64,
    /// Largest body stored (default 1MiB).
    pub max_entry_bytes: u64,
    /// Let responses' `Cache-Control` keep them out or shorten their TTL (default false).
    pub honour_cache_control: bool,
    /// More request headers in the key.
    pub vary: Vec<HeaderName>,
    /// Paths fetched with `GET` at start.
    pub warm_up: Vec<String>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            ttl: Duration::from_secs(1),
            routes: Vec::new(),
            max_entries: 10_000,
            max_bytes: 64 << 20,
            max_entry_bytes: 1 << 20,
            honour_cache_control: false,
            vary: Vec::new(),
            warm_up: Vec::new(),
        }
    }
}

/// `rate:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RateSettings {
    /// The rate.
    pub rate: Rate,
    /// Burst (default: the rate's count).
    pub burst: Option<u64>,
    /// What the rate and concurrency are kept per (default the whole pool).
    pub key: KeyBy,
}

/// `queue:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    /// Most waiting requests (default 1000).
    pub max: u64,
    /// Longest wait (default 2s).
    pub timeout: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            max: 1000,
            timeout: Duration::from_secs(2),
        }
    }
}

/// `retry:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    /// Statuses retried (default 429 and 503).
    pub statuses: Vec<StatusCode>,
    /// Retry connect failures (default true; `connect` in `on`).
    pub connect: bool,
    /// Attempts in all (default 3).
    pub max_attempts: u32,
    /// Backoff base (default 50ms).
    pub base: Duration,
    /// Backoff cap (default 2s).
    pub max_backoff: Duration,
    /// Longest `Retry-After` waited for (default 10s).
    pub max_retry_after: Duration,
    /// Retries as a fraction of requests (default 0.1, written `10%`).
    pub budget: f32,
    /// Retries allowed per second regardless (default 10).
    pub min_per_sec: u32,
    /// Retry non-idempotent methods with an empty body too (default false).
    pub non_idempotent: bool,
    /// Client-side adaptive throttling.
    pub adaptive: Option<AdaptiveSettings>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            statuses: vec![
                StatusCode::TOO_MANY_REQUESTS,
                StatusCode::SERVICE_UNAVAILABLE,
            ],
            connect: true,
            max_attempts: 3,
            base: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(10),
            budget: 0.1,
            min_per_sec: 10,
            non_idempotent: false,
            adaptive: None,
        }
    }
}

/// `retry.adaptive:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveSettings {
    /// The multiplier `K` (default 2).
    pub k: f64,
    /// The window (default 60s).
    pub window: Duration,
}

impl Default for AdaptiveSettings {
    fn default() -> Self {
        AdaptiveSettings {
            k: 2.0,
            window: Duration::from_secs(60),
        }
    }
}

// === the stack ===

/// The boxed outbound stack of one pool.
pub type Stack = BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, BoxError>;

/// The future of one call through a [`Stack`].
pub type StackFuture =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, BoxError>> + Send + 'static>>;

/// Calls `stack`, which is always ready: every layer in it answers `poll_ready` with
/// `Ready` and waits inside its future instead. Calling through this boxed future (rather
/// than `ServiceExt::oneshot`) also keeps the caller's async block free of the stack's
/// higher-ranked `Service` bounds, which rustc cannot prove `Send` there.
pub fn call(stack: &mut Stack, req: Request<ProxyBody>) -> StackFuture {
    let mut cx = Context::from_waker(Waker::noop());
    match stack.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => stack.call(req),
        Poll::Ready(Err(e)) => Box::pin(std::future::ready(Err(e))),
        Poll::Pending => Box::pin(std::future::ready(Err(BoxError::from(
            "outbound stack not ready",
        )))),
    }
}

/// Headers always part of coalescing and cache keys: credentials.
static CREDENTIALS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::COOKIE,
    HeaderName::from_static("x-api-key"),
];

/// Builds the stack of `config` over `inner` (the proxy's own forwarding).
pub fn build_stack<S>(
    config: &OutboundConfig,
    observer: Arc<dyn OutboundObserver>,
    inner: S,
) -> Stack
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let limit = (config.rate.is_some() || config.concurrency.is_some()).then(|| {
        let mut l = LimitConfig::default().queue(
            usize::try_from(config.queue.max).unwrap_or(usize::MAX),
            config.queue.timeout,
        );
        if let Some(r) = &config.rate {
            l = l
                .rate(
                    r.rate.count(),
                    r.rate.period(),
                    r.burst.unwrap_or(r.rate.count()),
                )
                .key(r.key.clone());
        }
        if let Some(c) = config.concurrency {
            l = l.concurrency(c as usize);
        }
        OutboundLimitLayer::new(l).observer(observer.clone())
    });
    let retry = config.retry.as_ref().map(|r| {
        let c = RetryConfig::default()
            .on_status(r.statuses.iter().copied())
            .on_connect(r.connect)
            .max_attempts(r.max_attempts)
            .backoff(r.base, r.max_backoff)
            .max_retry_after(r.max_retry_after)
            .retry_non_idempotent(r.non_idempotent)
            .budget(r.budget, r.min_per_sec, Duration::from_secs(10));
        let mut layer = RetryLayer::new(c).observer(observer.clone());
        if let Some(a) = &r.adaptive {
            layer = layer.adaptive(AdaptiveThrottle::new(a.k, a.window));
        }
        layer
    });
    let coalesce = config.coalesce.as_ref().map(|c| {
        let mut cc = CoalesceConfig::default();
        for h in CREDENTIALS.iter().chain(&c.headers) {
            cc = cc.key_header(h.clone());
        }
        if let Some(m) = c.max_body {
            cc = cc.max_body(usize::try_from(m).unwrap_or(usize::MAX));
        }
        CoalesceLayer::new(cc).observer(observer.clone())
    });
    let cache = config.cache.as_ref().map(|c| {
        let mut cc = CacheConfig::default()
            .ttl(c.ttl)
            .max_entries(usize::try_from(c.max_entries).unwrap_or(usize::MAX))
            .max_bytes(usize::try_from(c.max_bytes).unwrap_or(usize::MAX))
            .max_entry_bytes(usize::try_from(c.max_entry_bytes).unwrap_or(usize::MAX))
            .honour_cache_control(c.honour_cache_control);
        for (p, t) in &c.routes {
            cc = cc.route(p.clone(), *t);
        }
        for h in CREDENTIALS.iter().chain(&c.vary) {
            cc = cc.vary(h.clone());
        }
        CacheLayer::new(cc).observer(observer.clone())
    });
    // Each optional layer boxes the body again so that the stack has one type whatever is
    // on; the cost is one allocation per layer per request, next to an upstream call.
    let svc = ServiceBuilder::new()
        .map_err(Into::<BoxError>::into)
        .service(inner);
    let svc = BoxCloneSyncService::new(svc);
    let svc: Stack = match limit {
        Some(l) => BoxCloneSyncService::new(
            ServiceBuilder::new()
                .map_response(|r: Response<_>| r.map(body::boxed))
                .layer(l)
                .service(svc),
        ),
        None => svc,
    };
    let svc: Stack = match retry {
        Some(r) => BoxCloneSyncService::new(ServiceBuilder::new().layer(r).service(svc)),
        None => svc,
    };
    let svc: Stack = match coalesce {
        Some(c) => BoxCloneSyncService::new(
            ServiceBuilder::new()
                .map_response(|r: Response<_>| r.map(body::boxed))
                .layer(c)
                .service(svc),
        ),
        None => svc,
    };
    match cache {
        Some(c) => BoxCloneSyncService::new(
            ServiceBuilder::new()
                .map_response(|r: Response<_>| r.map(body::boxed))
                .layer(c)
                .service(svc),
        ),
        None => svc,
    }
}

/// Fetches each `warm_up` path of `config` through `stack` (filling its cache); `decorate`
/// adds what the proxy needs to route the request (the pool's route).
pub async fn warm_up(
    config: &OutboundConfig,
    upstream: &str,
    stack: Stack,
    decorate: impl Fn(&mut Request<ProxyBody>),
) {
    let Some(cache) = &config.cache else { return };
    for path in &cache.warm_up {
        let mut req = Request::new(body::empty());
        match path.parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => continue,
        }
        decorate(&mut req);
        match call(&mut stack.clone(), req).await {
            Ok(res) if res.status().is_success() => {
                tracing::debug!(%upstream, %path, "cache warmed up");
            }
            Ok(res) => {
                tracing::warn!(%upstream, %path, status = %res.status(), "cache warm-up got no success")
            }
            Err(e) => tracing::warn!(%upstream, %path, error = %e, "cache warm-up failed"),
        }
    }
}

/// The answer to a request the stack failed: the configured status with `Retry-After` for a
/// local refusal, 502 otherwise.
pub fn error_response(error: &BoxError, throttle_status: StatusCode) -> Response<ProxyBody> {
    let Some(t) = throttled(&**error) else {
        tracing::warn!(error = %error, "outbound request failed");
        return crate::problem::response(StatusCode::BAD_GATEWAY, "upstream request failed");
    };
    let mut res = crate::problem::response(
        throttle_status,
        "the upstream's outbound limit is reached; retry later",
    );
    let secs = t
        .retry_after()
        .map_or(1, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
        .max(1);
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        res.headers_mut().insert(header::RETRY_AFTER, v);
    }
    res
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: Arc<str>,
}

/// The outbound counters, one family each, labelled by upstream.
#[derive(Debug, Clone)]
pub struct OutboundMetrics {
    coalesced: Family<UpstreamLabels, Counter>,
    cache_hits: Family<UpstreamLabels, Counter>,
    cache_misses: Family<UpstreamLabels, Counter>,
    throttled: Family<UpstreamLabels, Counter>,
    retries: Family<UpstreamLabels, Counter>,
    budget_exhausted: Family<UpstreamLabels, Counter>,
    coalesce_waiting: Family<UpstreamLabels, Gauge>,
}

impl OutboundMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> OutboundMetrics {
        let m = OutboundMetrics {
            coalesced: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            throttled: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            coalesce_waiting: Family::default(),
        };
        registry.register(
            "outbound_coalesced",
            "Requests answered by an identical concurrent call's response",
            m.coalesced.clone(),
        );
        registry.register(
            "outbound_cache_hits",
            "Requests answered from the outbound cache",
            m.cache_hits.clone(),
        );
        registry.register(
            "outbound_cache_misses",
            "Cacheable requests not found in the outbound cache",
            m.cache_misses.clone(),
        );
        registry.register(
            "outbound_throttled",
            "Requests refused locally by the outbound limit or adaptive throttling",
            m.throttled.clone(),
        );
        registry.register(
            "outbound_retries",
            "Requests sent to the upstream again",
            m.retries.clone(),
        );
        registry.register(
            "outbound_retry_budget_exhausted",
            "Retries not sent because the retry budget was empty",
            m.budget_exhausted.clone(),
        );
        registry.register(
            "outbound_coalesce_waiting",
            "Requests waiting right now for an identical concurrent call's response",
            m.coalesce_waiting.clone(),
        );
        m
    }

    /// The observer of upstream `name` (its series are created now, at zero).
    pub fn observer(&self, name: &Arc<str>) -> Arc<PoolObserver> {
        let l = UpstreamLabels {
            upstream: name.clone(),
        };
        Arc::new(PoolObserver {
            coalesced: self.coalesced.get_or_create_owned(&l),
            cache_hits: self.cache_hits.get_or_create_owned(&l),
            cache_misses: self.cache_misses.get_or_create_owned(&l),
            throttled: self.throttled.get_or_create_owned(&l),
            retries: self.retries.get_or_create_owned(&l),
            budget_exhausted: self.budget_exhausted.get_or_create_owned(&l),
            coalesce_waiting: self.coalesce_waiting.get_or_create_owned(&l),
        })
    }
}

/// Counts one pool's outbound events into its pre-resolved counters.
#[derive(Debug)]
pub struct PoolObserver {
    coalesced: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    throttled: Counter,
    retries: Counter,
    budget_exhausted: Counter,
    coalesce_waiting: Gauge,
}

impl OutboundObserver for PoolObserver {
    fn event(&self, event: OutboundEvent) {
        let c = match event {
            OutboundEvent::Coalesced => &self.coalesced,
            OutboundEvent::CacheHit => &self.cache_hits,
            OutboundEvent::CacheMiss => &self.cache_misses,
            OutboundEvent::Throttled(_) => &self.throttled,
            OutboundEvent::Retry => &self.retries,
            OutboundEvent::RetryBudgetExhausted => &self.budget_exhausted,
            OutboundEvent::CoalesceWaitStarted => {
                self.coalesce_waiting.inc();
                return;
            }
            OutboundEvent::CoalesceWaitEnded => {
                self.coalesce_waiting.dec();
                return;
            }
        };
        c.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fairgate_middleware::outbound::ThrottleReason;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn a_local_refusal_answers_the_configured_status_with_retry_after() {
        let err: BoxError = "connection reset".into();
        assert_eq!(
            error_response(&err, StatusCode::SERVICE_UNAVAILABLE).status(),
            StatusCode::BAD_GATEWAY
        );
        // One request per 100 s and no queue: the second is refused for about 100 s.
        let config = OutboundConfig {
            rate: Some(RateSettings {
                rate: "1/100s".parse().unwrap(),
                burst: None,
                key: KeyBy::Upstream,
            }),
            queue: QueueSettings {
                max: 0,
                timeout: Duration::ZERO,
            },
            throttle_status: StatusCode::TOO_MANY_REQUESTS,
            ..OutboundConfig::default()
        };
        let inner = tower::service_fn(|_: Request<ProxyBody>| async {
            Ok::<_, std::convert::Infallible>(Response::new(body::empty()))
        });
        let mut reg = Registry::default();
        let metrics = OutboundMetrics::register(&mut reg);
        let stack = build_stack(&config, metrics.observer(&Arc::from("u")), inner);
        let ok = stack.clone().oneshot(Request::new(body::empty())).await;
        assert_eq!(ok.unwrap().status(), StatusCode::OK);
        let err = stack
            .clone()
            .oneshot(Request::new(body::empty()))
            .await
            .unwrap_err();
        assert_eq!(
            throttled(&*err).map(|t| t.reason()),
            Some(ThrottleReason::Rate)
        );
        let res = error_response(&err, config.throttle_status);
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[header::RETRY_AFTER], "100");
    }

    #[test]
    fn metrics_are_labelled_by_upstream() {
        // As `crate::metrics` builds it.
        let mut reg = Registry::with_prefix("fairgate");
        let m = OutboundMetrics::register(&mut reg);
        let o = m.observer(&Arc::from("api"));
        o.event(OutboundEvent::Coalesced);
        o.event(OutboundEvent::Coalesced);
        o.event(OutboundEvent::Throttled(ThrottleReason::QueueFull));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("fairgate_outbound_coalesced_total{upstream=\"api\"} 2"),
            "{text}"
        );
        assert!(text.contains("fairgate_outbound_throttled_total{upstream=\"api\"} 1"));
        assert!(text.contains("fairgate_outbound_retry_budget_exhausted_total{upstream=\"api\"} 0"));
    }
}
