//! Outbound protection towards upstream pools: coalescing, caching, outbound limits, retries.
//!
//! An upstream pool with an `outbound:` block gets the tower layers of
//! [`fairgate_middleware::outbound`] between admission and the proxy, outermost first:
//! cache → coalesce → retry → outbound limit → the proxy's own forwarding (target pick,
//! connect-failure failover, timeouts). Every retry therefore passes the outbound limit
//! again, and a cache hit or a coalesced follower never reaches the pool.
//!
//! This module owns the stack built from the block's config ([`OutboundConfig`], decoded in
//! `config::decode::outbound`): [`build_stack`], and the answer to a request refused locally
//! ([`error_response`]). Its metrics are `control::metrics::OutboundMetrics`
//! (`fairgate_outbound_{coalesced,cache_hits,cache_misses,throttled,retries,
//! retry_budget_exhausted}_total`, labelled by upstream).
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
    throttled, AdaptiveThrottle, CacheConfig, CacheLayer, CoalesceConfig, CoalesceLayer,
    LimitConfig, OutboundFleet, OutboundLimitLayer, OutboundObserver, RetryConfig, RetryLayer,
};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};

use crate::body::{self, BoxError, ProxyBody};
use crate::config::OutboundConfig;

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

/// Builds the stack of `config` over `inner` (the proxy's own forwarding). `fleet`: the
/// pool's `OutboundFleet` and name in Redis when its block has `fleet:`.
pub fn build_stack<S>(
    config: &OutboundConfig,
    observer: Arc<dyn OutboundObserver>,
    fleet: Option<(&OutboundFleet, &str)>,
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
        let layer = OutboundLimitLayer::new(l).observer(observer.clone());
        match fleet {
            Some((f, name)) => layer.fleet(f.clone(), name),
            None => layer,
        }
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
        if let Some(f) = &config.fleet {
            cc = cc.lease(f.lease).max_wait(f.max_wait);
        }
        let layer = CacheLayer::new(cc).observer(observer.clone());
        match fleet {
            Some((f, name)) => layer.shared(f.clone(), name),
            None => layer,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{QueueSettings, RateSettings};
    use crate::control::metrics::OutboundMetrics;
    use fairgate_middleware::outbound::KeyBy;
    use fairgate_middleware::outbound::ThrottleReason;
    use prometheus_client::registry::Registry;
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
        let stack = build_stack(&config, metrics.observer(&Arc::from("u")), None, inner);
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
}
