//! Retries that back off: 429/503/connect failures, exponential backoff with full jitter,
//! `Retry-After` honoured, under a retry budget; optional client-side adaptive throttling.
//!
//! **What is retried.** A response whose status is in [`RetryConfig::on_status`] (default
//! 429 and 503), a response carrying the [`ConnectFailed`] extension, or an error whose
//! source chain holds an `io::Error` of a connect kind (refused, host or network
//! unreachable, address not available) — when [`RetryConfig::on_connect`] is on. A
//! [`Throttled`] from a layer below is never retried (it is our own refusal).
//!
//! **Which requests.** Only idempotent methods (`GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`,
//! `DELETE`) unless [`RetryConfig::retry_non_idempotent`], and only requests whose body is
//! empty when they arrive (`Body::is_end_stream`): a body that was sent cannot be sent
//! again, so a request with one is sent exactly once. The replayed request is a copy of
//! method, URI, version, headers and extensions with `B::default()` as its (empty) body.
//!
//! **When.** Attempt `n + 1` waits `rand(0, min(max_backoff, base·2^(n−1)))` (full jitter,
//! so a crowd of callers spreads out instead of retrying in lock-step). A `Retry-After`
//! (delay-seconds or HTTP-date) is a floor: the wait is `Retry-After + jitter`, never
//! earlier. A `Retry-After` longer than [`RetryConfig::max_retry_after`] ends the retries
//! and the response goes back to the caller with its header.
//!
//! **Budget.** Every request deposits into a [`RetryBudget`] (tower's
//! [`TpsBudget`]): retries may be at most `percent` of the
//! requests of the last `ttl`, plus `min_per_sec` per second. An empty budget ends the
//! retries ([`OutboundEvent::RetryBudgetExhausted`]), so when throttling is frequent the
//! extra load is bounded by `percent` instead of multiplying by `max_attempts`.
//!
//! **Adaptive throttling** (Google SRE book, "Handling Overload"): over a sliding window the
//! client counts `requests` (attempts, and local rejections) and `accepts` (attempts the
//! upstream did not answer with a retryable status or a connect failure), and rejects a new
//! request locally with probability `p = max(0, (requests − K·accepts) / (requests + 1))`
//! as a [`Throttled`] (`adaptive`). With `K = 2` the upstream still sees about twice the
//! traffic it accepts, enough to notice when it recovers.
//!
//! ```
//! # use std::time::Duration;
//! # use fairgate_middleware::outbound::{AdaptiveThrottle, RetryConfig, RetryLayer};
//! let layer = RetryLayer::new(
//!     RetryConfig::default()
//!         .max_attempts(3)
//!         .backoff(Duration::from_millis(50), Duration::from_secs(2))
//!         .budget(0.1, 10, Duration::from_secs(10)),
//! )
//! .adaptive(AdaptiveThrottle::new(2.0, Duration::from_secs(60)));
//! # drop(layer);
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, Service, ServiceExt};

use super::{
    is_idempotent, no_observer, throttled, BoxError, ConnectFailed, ObserverHandle, OutboundEvent,
    OutboundObserver, ThrottleReason, Throttled,
};

/// Configuration of [`RetryLayer`].
#[derive(Debug, Clone)]
pub struct RetryConfig {
    statuses: Vec<StatusCode>,
    on_connect: bool,
    max_attempts: u32,
    base: Duration,
    max_backoff: Duration,
    max_retry_after: Duration,
    retry_non_idempotent: bool,
    budget_percent: f32,
    budget_min_per_sec: u32,
    budget_ttl: Duration,
}

impl Default for RetryConfig {
    /// 429, 503 and connect failures; 3 attempts; backoff 50 ms doubling up to 2 s;
    /// `Retry-After` up to 10 s; budget 10 % of the last 10 s plus 10 per second.
    fn default() -> Self {
        RetryConfig {
            statuses: vec![
                StatusCode::TOO_MANY_REQUESTS,
                StatusCode::SERVICE_UNAVAILABLE,
            ],
            on_connect: true,
            max_attempts: 3,
            base: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(10),
            retry_non_idempotent: false,
            budget_percent: 0.1,
            budget_min_per_sec: 10,
            budget_ttl: Duration::from_secs(10),
        }
    }
}

impl RetryConfig {
    /// The statuses retried (replaces the default 429 and 503).
    pub fn on_status(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.statuses = statuses.into_iter().collect();
        self
    }

    /// Whether connect failures are retried (default yes).
    pub fn on_connect(mut self, yes: bool) -> Self {
        self.on_connect = yes;
        self
    }

    /// Attempts in all, the first included (at least 1; 1 means no retries).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Backoff base and cap: retry `n` waits up to `min(max, base·2^(n−1))`.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.base = base;
        self.max_backoff = max.max(base);
        self
    }

    /// The longest `Retry-After` still waited for (default 10 s); longer ones end retries.
    pub fn max_retry_after(mut self, d: Duration) -> Self {
        self.max_retry_after = d;
        self
    }

    /// Retry non-idempotent methods too (still only with an empty body).
    pub fn retry_non_idempotent(mut self, yes: bool) -> Self {
        self.retry_non_idempotent = yes;
        self
    }

    /// Retries may be `percent` (0.1 = 10 %, at most 10.0) of the requests of the last
    /// `ttl` (1 s to 60 s, clamped), plus `min_per_sec` per second.
    pub fn budget(mut self, percent: f32, min_per_sec: u32, ttl: Duration) -> Self {
        self.budget_percent = percent;
        self.budget_min_per_sec = min_per_sec;
        self.budget_ttl = ttl;
        self
    }
}

/// A retry budget shared by the services of one [`RetryLayer`]. Wraps tower's
/// [`TpsBudget`] with its arguments clamped to the range it accepts (it asserts them).
pub struct RetryBudget(TpsBudget);

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RetryBudget").finish_non_exhaustive()
    }
}

impl RetryBudget {
    /// See [`RetryConfig::budget`].
    pub fn new(percent: f32, min_per_sec: u32, ttl: Duration) -> RetryBudget {
        let percent = if percent.is_finite() {
            percent.clamp(0.0, 10.0)
        } else {
            0.0
        };
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let min = min_per_sec.min(i32::MAX as u32 - 1);
        RetryBudget(TpsBudget::new(ttl, min, percent))
    }

    /// Records one request.
    pub fn deposit(&self) {
        self.0.deposit();
    }

    /// Takes one retry; false when the budget is empty.
    pub fn withdraw(&self) -> bool {
        self.0.withdraw()
    }
}

const ADAPTIVE_SLOTS: usize = 10;

#[derive(Debug, Default)]
struct Slot {
    epoch: AtomicU64,
    requests: AtomicU64,
    accepts: AtomicU64,
}

/// Client-side adaptive throttling (Google SRE): see the [module docs](self).
///
/// Counts live in ten slots of `window / 10` each, in atomics; a slot is reset when its
/// time comes round again (a race at that moment loses a count or two, which the
/// probability tolerates).
#[derive(Debug)]
pub struct AdaptiveThrottle {
    k: f64,
    slot_ns: u64,
    origin: Instant,
    slots: [Slot; ADAPTIVE_SLOTS],
}

impl AdaptiveThrottle {
    /// Throttling with multiplier `k` (≥ 1; SRE suggests 2) over `window` (at least 10 ms).
    pub fn new(k: f64, window: Duration) -> AdaptiveThrottle {
        let window = window.max(Duration::from_millis(10));
        AdaptiveThrottle {
            k: if k.is_finite() { k.max(1.0) } else { 2.0 },
            slot_ns: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX) / ADAPTIVE_SLOTS as u64,
            origin: Instant::now(),
            slots: Default::default(),
        }
    }

    fn epoch(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX) / self.slot_ns + 1
    }

    fn slot(&self) -> &Slot {
        let epoch = self.epoch();
        let slot = &self.slots[(epoch % ADAPTIVE_SLOTS as u64) as usize];
        let old = slot.epoch.load(Ordering::Acquire);
        if old != epoch
            && slot
                .epoch
                .compare_exchange(old, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Release);
            slot.accepts.store(0, Ordering::Release);
        }
        slot
    }

    /// Records one request and whether the upstream accepted it.
    pub fn record(&self, accepted: bool) {
        let slot = self.slot();
        slot.requests.fetch_add(1, Ordering::AcqRel);
        if accepted {
            slot.accepts.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn record_rejected(&self) {
        self.slot().requests.fetch_add(1, Ordering::AcqRel);
    }

    /// `(requests, accepts)` in the window.
    pub fn counts(&self) -> (u64, u64) {
        let epoch = self.epoch();
        let mut out = (0, 0);
        for s in &self.slots {
            let e = s.epoch.load(Ordering::Acquire);
            if e + (ADAPTIVE_SLOTS as u64) > epoch && e <= epoch {
                out.0 += s.requests.load(Ordering::Acquire);
                out.1 += s.accepts.load(Ordering::Acquire);
            }
        }
        out
    }

    /// `max(0, (requests − K·accepts) / (requests + 1))` now.
    pub fn reject_probability(&self) -> f64 {
        let (requests, accepts) = self.counts();
        let r = requests as f64;
        ((r - self.k * accepts as f64) / (r + 1.0)).max(0.0)
    }

    /// Draws whether to reject a request now (without recording anything).
    pub fn should_reject(&self, rng: &mut fastrand::Rng) -> bool {
        let p = self.reject_probability();
        p > 0.0 && rng.f64() < p
    }
}

struct Shared {
    config: RetryConfig,
    budget: RetryBudget,
    adaptive: Option<Arc<AdaptiveThrottle>>,
    observer: ObserverHandle,
}

/// Retries with backoff under a budget; see the [module docs](self).
#[derive(Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
    seed: Option<u64>,
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("config", &self.shared.config)
            .field("adaptive", &self.shared.adaptive.is_some())
            .finish_non_exhaustive()
    }
}

impl RetryLayer {
    /// A layer with `config`. Services built from one layer share one budget.
    pub fn new(config: RetryConfig) -> Self {
        let budget = RetryBudget::new(
            config.budget_percent,
            config.budget_min_per_sec,
            config.budget_ttl,
        );
        RetryLayer {
            shared: Arc::new(Shared {
                config,
                budget,
                adaptive: None,
                observer: no_observer(),
            }),
            seed: None,
        }
    }

    fn rebuild(self, f: impl FnOnce(&mut Shared)) -> Self {
        let old = &self.shared;
        let mut shared = Shared {
            config: old.config.clone(),
            budget: RetryBudget::new(
                old.config.budget_percent,
                old.config.budget_min_per_sec,
                old.config.budget_ttl,
            ),
            adaptive: old.adaptive.clone(),
            observer: old.observer.clone(),
        };
        f(&mut shared);
        RetryLayer {
            shared: Arc::new(shared),
            seed: self.seed,
        }
    }

    /// Reports retries, exhausted budgets and adaptive rejections to `observer`. Call before
    /// building services (the budget starts afresh).
    pub fn observer(self, observer: Arc<dyn OutboundObserver>) -> Self {
        self.rebuild(|s| s.observer = observer)
    }

    /// Turns on client-side adaptive throttling. Call before building services.
    pub fn adaptive(self, throttle: AdaptiveThrottle) -> Self {
        let t = Arc::new(throttle);
        self.rebuild(|s| s.adaptive = Some(t))
    }

    /// Seeds the jitter (tests); by default every service draws its own seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The adaptive throttle, if on.
    pub fn adaptive_throttle(&self) -> Option<&AdaptiveThrottle> {
        self.shared.adaptive.as_deref()
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            shared: self.shared.clone(),
            rng: self
                .seed
                .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed),
        }
    }
}

/// The service of [`RetryLayer`].
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
    rng: fastrand::Rng,
}

impl<S: fmt::Debug> fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// What an attempt's outcome calls for.
#[derive(Debug, PartialEq)]
enum Class {
    /// Accepted by the upstream: done.
    Accepted,
    /// Retryable, after at least this `Retry-After`.
    Retry(Option<Duration>),
    /// Not retryable and not an accept (a local refusal, another error).
    Final,
}

fn classify<RB>(config: &RetryConfig, out: &Result<Response<RB>, BoxError>) -> Class {
    match out {
        Ok(res) => {
            if res.extensions().get::<ConnectFailed>().is_some() {
                return if config.on_connect {
                    Class::Retry(None)
                } else {
                    Class::Final
                };
            }
            if config.statuses.contains(&res.status()) {
                Class::Retry(retry_after(res.headers()))
            } else {
                Class::Accepted
            }
        }
        Err(e) => {
            if throttled(&**e).is_some() {
                Class::Final
            } else if config.on_connect && is_connect_error(&**e) {
                Class::Retry(None)
            } else {
                Class::Final
            }
        }
    }
}

/// Whether `e`'s chain holds a connect failure.
fn is_connect_error(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::AddrNotAvailable
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// `Retry-After` as a delay: delay-seconds, or an HTTP-date compared with the wall clock
/// (the one place wall time is right: the header names a wall-clock instant).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The full-jitter backoff before retry number `retry` (1-based).
fn backoff(config: &RetryConfig, retry: u32, rng: &mut fastrand::Rng) -> Duration {
    let factor = 1u32
        .checked_shl(retry.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let cap = config
        .base
        .checked_mul(factor)
        .unwrap_or(config.max_backoff)
        .min(config.max_backoff);
    let cap_ns = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.u64(0..=cap_ns))
}

impl<S, B, RB> Service<Request<B>> for Retry<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Body + Default + Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness of the inner service is awaited in the future, on its own clone.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        let shared = self.shared.clone();
        let seed = self.rng.u64(..);
        Box::pin(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let config = &shared.config;
            if let Some(a) = &shared.adaptive {
                if a.should_reject(&mut rng) {
                    a.record_rejected();
                    let reason = ThrottleReason::Adaptive;
                    shared.observer.event(OutboundEvent::Throttled(reason));
                    return Err(Throttled::new(reason, None).into());
                }
            }
            shared.budget.deposit();
            let replayable = (is_idempotent(req.method()) || config.retry_non_idempotent)
                && req.body().is_end_stream()
                && config.max_attempts > 1;
            let (parts, body) = req.into_parts();
            let template = replayable.then(|| parts.clone());
            let mut req = Request::from_parts(parts, body);
            let mut attempt = 1;
            loop {
                let out = inner.clone().oneshot(req).await.map_err(Into::into);
                let class = classify(config, &out);
                if let Some(a) = &shared.adaptive {
                    a.record(class == Class::Accepted);
                }
                let Class::Retry(after) = class else {
                    return out;
                };
                let Some(template) = template.as_ref() else {
                    return out;
                };
                if attempt >= config.max_attempts {
                    return out;
                }
                if after.is_some_and(|a| a > config.max_retry_after) {
                    return out;
                }
                if !shared.budget.withdraw() {
                    shared.observer.event(OutboundEvent::RetryBudgetExhausted);
                    return out;
                }
                shared.observer.event(OutboundEvent::Retry);
                drop(out);
                let wait = after.unwrap_or_default() + backoff(config, attempt, &mut rng);
                tokio::time::sleep(wait).await;
                req = Request::from_parts(template.clone(), B::default());
                attempt += 1;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = SystemTime::now() + Duration::from_secs(120);
        h.insert(
            header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(
            header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_cap() {
        let c =
            RetryConfig::default().backoff(Duration::from_millis(50), Duration::from_millis(300));
        let mut rng = fastrand::Rng::with_seed(7);
        for retry in 1..=10u32 {
            let cap =
                Duration::from_millis(50 * (1u64 << (retry - 1))).min(Duration::from_millis(300));
            let draws: Vec<Duration> = (0..2000).map(|_| backoff(&c, retry, &mut rng)).collect();
            assert!(draws.iter().all(|d| *d <= cap));
            // Full jitter: spread over [0, cap], mean about cap / 2.
            let mean = draws.iter().sum::<Duration>() / draws.len() as u32;
            let half = cap / 2;
            assert!(
                mean > half.mul_f64(0.9) && mean < half.mul_f64(1.1),
                "{retry}: {mean:?}"
            );
            assert!(draws.iter().any(|d| *d < cap / 10));
        }
    }

    #[test]
    fn classification() {
        let c = RetryConfig::default();
        let res = |s: u16| -> Result<Response<()>, BoxError> {
            let mut r = Response::new(());
            *r.status_mut() = StatusCode::from_u16(s).unwrap();
            Ok(r)
        };
        assert_eq!(classify(&c, &res(200)), Class::Accepted);
        assert_eq!(classify(&c, &res(500)), Class::Accepted);
        assert_eq!(classify(&c, &res(503)), Class::Retry(None));
        let mut r = res(429).unwrap();
        r.headers_mut()
            .insert(header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(
            classify(&c, &Ok(r)),
            Class::Retry(Some(Duration::from_secs(2)))
        );
        let mut r = res(502).unwrap();
        r.extensions_mut().insert(ConnectFailed);
        assert_eq!(classify(&c, &Ok(r)), Class::Retry(None));
        let refused: BoxError =
            Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify::<()>(&c, &Err(refused)), Class::Retry(None));
        let local: BoxError = Box::new(Throttled::new(ThrottleReason::QueueFull, None));
        assert_eq!(classify::<()>(&c, &Err(local)), Class::Final);
        let other: BoxError = "boom".into();
        assert_eq!(classify::<()>(&c, &Err(other)), Class::Final);
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_probability_follows_the_formula_and_the_window() {
        let a = AdaptiveThrottle::new(2.0, Duration::from_secs(10));
        assert_eq!(a.reject_probability(), 0.0);
        for i in 0..1000 {
            a.record(i % 5 == 0); // 200 accepts of 1000
        }
        let p = a.reject_probability();
        let formula = (1000.0 - 2.0 * 200.0) / 1001.0;
        assert!((p - formula).abs() < 1e-9, "{p} vs {formula}");
        // Drawn rejections match p within ±10 % (relative).
        let mut rng = fastrand::Rng::with_seed(1);
        let n = 20_000;
        let rejected = (0..n).filter(|_| a.should_reject(&mut rng)).count();
        let observed = rejected as f64 / n as f64;
        assert!((observed - p).abs() < 0.1 * p, "{observed} vs {p}");
        // Healthy traffic keeps p at 0.
        let b = AdaptiveThrottle::new(2.0, Duration::from_secs(10));
        for i in 0..1000 {
            b.record(i % 2 == 0);
        }
        assert_eq!(b.reject_probability(), 0.0);
        // The window forgets.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(a.counts(), (0, 0));
        assert_eq!(a.reject_probability(), 0.0);
    }
}
