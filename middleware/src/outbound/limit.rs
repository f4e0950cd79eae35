//! Outbound limits: rate and concurrency towards an upstream, per upstream or per key, with a
//! bounded queue and a deadline.
//!
//! - **Rate**: GCRA with the engine's arithmetic ([`crate::gcra`]): "r per P, burst b" has
//!   emission interval `T = P / r` and capacity `C = b·T`. Unlike the admission engine, which
//!   rejects at once, a caller's request *reserves* the next slot: `TAT ← max(TAT, now) + T`
//!   and waits until `TAT − C` (zero wait while the burst lasts). So over any window of
//!   length `t` at most `b + r·t/P` requests leave, and they leave as early as allowed. A
//!   reservation whose wait would pass the queue timeout is not made: the request fails at
//!   once with [`Throttled`] (`rate`). A reservation of a request cancelled while waiting is
//!   not given back (erring on the upstream's side).
//! - **Concurrency**: a `tokio::sync::Semaphore` per state; the permit is held until the
//!   response body ends ([`LimitBody`]).
//! - **Queue**: at most `queue_max` requests wait (for a rate slot or a permit) at once;
//!   more fail at once (`queue_full`); a permit not had by the deadline fails
//!   (`queue_timeout`).
//! - **Keys**: [`KeyBy::Upstream`] (default) keeps one state; [`KeyBy::Header`] one per value
//!   of a request header (say `x-region`), up to `max_keys` states; requests without the
//!   header, and new keys past the bound, share the upstream-wide state.
//!
//! `tower::limit` has rate and concurrency limits, but both answer `Pending` from
//! `poll_ready` without bound and know nothing of keys; a client of a quota API wants a
//! deadline and a typed refusal, which is why this layer is ours.
//!
//! ```
//! # use std::time::Duration;
//! # use fairgate_middleware::outbound::{KeyBy, LimitConfig, OutboundLimitLayer};
//! let layer = OutboundLimitLayer::new(
//!     LimitConfig::default()
//!         .rate(100, Duration::from_secs(1), 20)
//!         .concurrency(32)
//!         .queue(1000, Duration::from_secs(2))
//!         .key(KeyBy::Header(http::HeaderName::from_static("x-region"))),
//! );
//! # drop(layer);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::{
    no_observer, BoxError, ObserverHandle, OutboundEvent, OutboundObserver, ThrottleReason,
    Throttled,
};
use crate::clock::{duration_to_nanos, Nanos};
use crate::gcra::Params;

/// What the limits are kept per.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KeyBy {
    /// One state for everything through the layer.
    #[default]
    Upstream,
    /// One state per value of this request header.
    Header(HeaderName),
}

/// Configuration of [`OutboundLimitLayer`].
#[derive(Debug, Clone)]
pub struct LimitConfig {
    rate: Option<Params>,
    concurrency: Option<usize>,
    queue_max: usize,
    queue_timeout: Duration,
    key: KeyBy,
    max_keys: usize,
}

impl Default for LimitConfig {
    /// No rate, no concurrency limit; a queue of 1000 for 2 s; one upstream-wide state;
    /// 1024 keys.
    fn default() -> Self {
        LimitConfig {
            rate: None,
            concurrency: None,
            queue_max: 1000,
            queue_timeout: Duration::from_secs(2),
            key: KeyBy::Upstream,
            max_keys: 1024,
        }
    }
}

impl LimitConfig {
    /// At most `count` per `period` with bursts of `burst`. Values that round to a zero
    /// emission interval (or zero `burst`) leave the rate unlimited; the gateway's decoder
    /// rejects them first.
    pub fn rate(mut self, count: u64, period: Duration, burst: u64) -> Self {
        self.rate = Params::new(count, duration_to_nanos(period), burst);
        self
    }

    /// At most `n` requests in flight (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n.max(1));
        self
    }

    /// At most `max` requests waiting, each for at most `timeout`.
    pub fn queue(mut self, max: usize, timeout: Duration) -> Self {
        self.queue_max = max;
        self.queue_timeout = timeout;
        self
    }

    /// What the limits are kept per.
    pub fn key(mut self, key: KeyBy) -> Self {
        self.key = key;
        self
    }

    /// Most per-key states ([`KeyBy::Header`]).
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }
}

#[derive(Debug)]
struct KeyState {
    /// Theoretical arrival time, ns since the layer's origin (0: a full bucket).
    tat: AtomicU64,
    permits: Option<Arc<Semaphore>>,
    /// Fleet mode: the limit's name in Redis (the layer's name, `/<header value>` per key).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    name: String,
    /// Fleet mode while Redis does not answer: the share's bucket and in-flight count.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    share_tat: AtomicU64,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    share_in_flight: Arc<AtomicUsize>,
}

impl KeyState {
    fn new(config: &LimitConfig, name: String) -> KeyState {
        KeyState {
            tat: AtomicU64::new(0),
            permits: config.concurrency.map(|n| Arc::new(Semaphore::new(n))),
            name,
            share_tat: AtomicU64::new(0),
            share_in_flight: Arc::default(),
        }
    }
}

/// What an admitted request holds until its response ends: its local permit and, in fleet
/// mode, its fleet-wide lease or its place in the share.
#[derive(Default)]
pub(crate) struct Held {
    permit: Option<OwnedSemaphorePermit>,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    lease: Option<Box<dyn Send + Sync>>,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    share: Option<ShareSlot>,
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("permit", &self.permit.is_some())
            .field("lease", &self.lease.is_some())
            .field("share", &self.share.is_some())
            .finish()
    }
}

/// One request in flight within the share (fleet mode, Redis unreachable).
#[derive(Debug)]
pub(crate) struct ShareSlot(Arc<AtomicUsize>);

impl Drop for ShareSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The fleet mode of one layer: the fleet and the limit's name there.
#[cfg(feature = "redis")]
#[derive(Clone)]
struct FleetLimit {
    fleet: super::fleet::OutboundFleet,
    name: String,
}

/// A replica's share of `p` in a fleet of `n`: the rate and burst divided by `n` (the burst
/// at least 1).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
fn share(p: Params, n: u64) -> Params {
    let n = n.max(1);
    let t = p.t.saturating_mul(n);
    let burst = (p.burst() / n).max(1);
    Params {
        t,
        c: t.saturating_mul(burst),
    }
}

struct Shared {
    config: LimitConfig,
    #[cfg(feature = "redis")]
    fleet: Option<FleetLimit>,
    origin: Instant,
    global: Arc<KeyState>,
    keyed: Mutex<HashMap<HeaderValue, Arc<KeyState>>>,
    waiting: AtomicUsize,
    observer: ObserverHandle,
}

/// Counts one waiting request until dropped.
struct Waiter<'a>(&'a AtomicUsize);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    fn now(&self) -> Nanos {
        duration_to_nanos(self.origin.elapsed()).saturating_add(1)
    }

    fn state_for<B>(&self, req: &Request<B>) -> Arc<KeyState> {
        let KeyBy::Header(h) = &self.config.key else {
            return self.global.clone();
        };
        let Some(v) = req.headers().get(h) else {
            return self.global.clone();
        };
        let mut map = self.keyed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(v) {
            return s.clone();
        }
        if map.len() >= self.config.max_keys {
            return self.global.clone();
        }
        let name = format!(
            "{}/{}",
            self.global.name,
            String::from_utf8_lossy(v.as_bytes())
        );
        let s = Arc::new(KeyState::new(&self.config, name));
        map.insert(v.clone(), s.clone());
        s
    }

    fn enqueue(&self) -> Result<Waiter<'_>, Throttled> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let w = Waiter(&self.waiting);
        if before >= self.config.queue_max {
            return Err(Throttled::new(ThrottleReason::QueueFull, None));
        }
        Ok(w)
    }

    /// Reserves a slot of the local bucket `tat` with `p`: the wait, and the queue place
    /// taken when there is one; refuses a wait past the queue timeout (nothing reserved).
    fn reserve_local(
        &self,
        tat_cell: &AtomicU64,
        p: Params,
    ) -> Result<(u64, Option<Waiter<'_>>), Throttled> {
        let timeout_ns = duration_to_nanos(self.config.queue_timeout);
        let now = self.now();
        let mut waiter = None;
        let mut tat = tat_cell.load(Ordering::Acquire);
        loop {
            let next = tat.max(now).saturating_add(p.t);
            let wait = next.saturating_sub(p.c).saturating_sub(now);
            if wait > timeout_ns {
                return Err(Throttled::new(
                    ThrottleReason::Rate,
                    Some(Duration::from_nanos(wait)),
                ));
            }
            if wait > 0 && waiter.is_none() {
                waiter = Some(self.enqueue()?);
            }
            match tat_cell.compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok((wait, waiter)),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Waits for a rate slot and a permit (in fleet mode: the fleet's slot and lease, or the
    /// share while Redis does not answer), or refuses.
    async fn acquire(&self, state: &KeyState) -> Result<Held, Throttled> {
        let deadline = Instant::now() + self.config.queue_timeout;
        let mut waiter = None;
        if let Some(p) = self.config.rate {
            #[cfg(feature = "redis")]
            let fleet_wait = match &self.fleet {
                Some(f) => Some(self.reserve_fleet(f, state, p, &mut waiter).await?),
                None => None,
            };
            #[cfg(not(feature = "redis"))]
            let fleet_wait: Option<u64> = None;
            let wait = match fleet_wait {
                Some(wait) => wait,
                None => {
                    let (wait, w) = self.reserve_local(&state.tat, p)?;
                    waiter = w;
                    wait
                }
            };
            if wait > 0 {
                tokio::time::sleep(Duration::from_nanos(wait)).await;
            }
        }
        let mut held = Held::default();
        let Some(sem) = &state.permits else {
            return Ok(held);
        };
        held.permit = match sem.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                if waiter.is_none() {
                    waiter = Some(self.enqueue()?);
                }
                match tokio::time::timeout_at(deadline, sem.clone().acquire_owned()).await {
                    Ok(Ok(p)) => Some(p),
                    // The semaphore is never closed; a closed one is as good as no slot.
                    _ => return Err(Throttled::new(ThrottleReason::QueueTimeout, None)),
                }
            }
        };
        #[cfg(feature = "redis")]
        if let Some(f) = &self.fleet {
            self.lease_fleet(f, state, deadline, &mut held, &mut waiter)
                .await?;
        }
        drop(waiter);
        Ok(held)
    }

    /// Fleet mode: reserves the fleet's next slot in Redis, or the share's while Redis does
    /// not answer. Returns the wait.
    #[cfg(feature = "redis")]
    async fn reserve_fleet<'a>(
        &'a self,
        f: &FleetLimit,
        state: &KeyState,
        p: Params,
        waiter: &mut Option<Waiter<'a>>,
    ) -> Result<u64, Throttled> {
        use crate::backend::redis::Reserve;
        let timeout_ns = duration_to_nanos(self.config.queue_timeout);
        match f
            .fleet
            .inner
            .fleet
            .reserve(&state.name, p.t, p.c, timeout_ns)
            .await
        {
            Some(Reserve::Reserved(wait)) => {
                if wait > 0 {
                    *waiter = Some(self.enqueue()?);
                }
                Ok(wait)
            }
            Some(Reserve::Refused(wait)) => Err(Throttled::new(
                ThrottleReason::Rate,
                Some(Duration::from_nanos(wait)),
            )),
            None => {
                let n = f.fleet.replicas();
                let (wait, w) = self.reserve_local(&state.share_tat, share(p, n))?;
                *waiter = w;
                Ok(wait)
            }
        }
    }

    /// Fleet mode: takes one of the fleet's concurrency leases (waiting until one is given
    /// back, up to the deadline), or a place in the share while Redis does not answer.
    #[cfg(feature = "redis")]
    async fn lease_fleet<'a>(
        &'a self,
        f: &FleetLimit,
        state: &KeyState,
        deadline: Instant,
        held: &mut Held,
        waiter: &mut Option<Waiter<'a>>,
    ) -> Result<(), Throttled> {
        let Some(limit) = self.config.concurrency else {
            return Ok(());
        };
        let limit32 = u32::try_from(limit).unwrap_or(u32::MAX);
        let mut pause = Duration::from_millis(5);
        loop {
            match f
                .fleet
                .inner
                .fleet
                .outbound_lease(&state.name, limit32)
                .await
            {
                Some(Ok(lease)) => {
                    held.lease = Some(lease);
                    return Ok(());
                }
                Some(Err(())) => {}
                None => {
                    let n = usize::try_from(f.fleet.replicas()).unwrap_or(usize::MAX);
                    let share = (limit / n.max(1)).max(1);
                    let cell = &state.share_in_flight;
                    if cell.fetch_add(1, Ordering::AcqRel) < share {
                        held.share = Some(ShareSlot(Arc::clone(cell)));
                        return Ok(());
                    }
                    cell.fetch_sub(1, Ordering::AcqRel);
                }
            }
            // A lease is given back by another replica: ask again, 5 ms doubling to 50 ms,
            // in the queue meanwhile.
            if waiter.is_none() {
                *waiter = Some(self.enqueue()?);
            }
            if Instant::now() + pause > deadline {
                return Err(Throttled::new(ThrottleReason::QueueTimeout, None));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

/// Limits outbound rate and concurrency; see the [module docs](self).
#[derive(Clone)]
pub struct OutboundLimitLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for OutboundLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundLimitLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl OutboundLimitLayer {
    /// A layer with `config`. Services built from one layer share its states.
    pub fn new(config: LimitConfig) -> Self {
        Self::build(config, no_observer())
    }

    fn build(config: LimitConfig, observer: ObserverHandle) -> Self {
        OutboundLimitLayer {
            shared: Arc::new(Shared {
                global: Arc::new(KeyState::new(&config, String::new())),
                config,
                #[cfg(feature = "redis")]
                fleet: None,
                origin: Instant::now(),
                keyed: Mutex::default(),
                waiting: AtomicUsize::new(0),
                observer,
            }),
        }
    }

    /// Reports [`OutboundEvent::Throttled`] to `observer`. Call before building services.
    pub fn observer(self, observer: Arc<dyn OutboundObserver>) -> Self {
        let layer = Self::build(self.shared.config.clone(), observer);
        #[cfg(feature = "redis")]
        if let Some(f) = self.shared.fleet.clone() {
            return layer.fleet(f.fleet, f.name);
        }
        layer
    }

    /// Fleet mode (feature `redis`): the rate and concurrency hold for every replica using
    /// `fleet` with this `name` together (see [`super::fleet`]); while Redis does not answer,
    /// each keeps its share (the limits ÷ the replicas registered). Call before building
    /// services.
    #[cfg(feature = "redis")]
    pub fn fleet(self, fleet: super::fleet::OutboundFleet, name: impl Into<String>) -> Self {
        let name = name.into();
        let shared = &self.shared;
        OutboundLimitLayer {
            shared: Arc::new(Shared {
                global: Arc::new(KeyState::new(&shared.config, name.clone())),
                config: shared.config.clone(),
                fleet: Some(FleetLimit { fleet, name }),
                origin: Instant::now(),
                keyed: Mutex::default(),
                waiting: AtomicUsize::new(0),
                observer: shared.observer.clone(),
            }),
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::Acquire)
    }
}

impl<S> Layer<S> for OutboundLimitLayer {
    type Service = OutboundLimit<S>;

    fn layer(&self, inner: S) -> OutboundLimit<S> {
        OutboundLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`OutboundLimitLayer`].
#[derive(Clone)]
pub struct OutboundLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for OutboundLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B, RB> Service<Request<B>> for OutboundLimit<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Send + 'static,
    RB: Body<Data = Bytes> + Unpin,
{
    type Response = Response<LimitBody<RB>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Never `Pending`: waiting happens in the future, bounded by the queue.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        let shared = self.shared.clone();
        let state = shared.state_for(&req);
        Box::pin(async move {
            let held = match shared.acquire(&state).await {
                Ok(p) => p,
                Err(t) => {
                    shared.observer.event(OutboundEvent::Throttled(t.reason()));
                    return Err(t.into());
                }
            };
            let res = inner.oneshot(req).await.map_err(Into::into)?;
            Ok(res.map(|inner| LimitBody {
                inner,
                held: Some(held),
            }))
        })
    }
}

/// A response body holding its concurrency permit (and fleet lease) until it ends or is
/// dropped.
#[derive(Debug)]
pub struct LimitBody<B> {
    inner: B,
    held: Option<Held>,
}

impl<B> LimitBody<B> {
    /// The body without a permit.
    pub fn new(inner: B) -> Self {
        LimitBody { inner, held: None }
    }
}

impl<B> Body for LimitBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // The body is over: give the slot back now, not when the caller drops it.
            this.held = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(c: &LimitConfig) -> (Shared, Arc<KeyState>) {
        let global = Arc::new(KeyState::new(c, String::new()));
        (
            Shared {
                config: c.clone(),
                #[cfg(feature = "redis")]
                fleet: None,
                origin: Instant::now(),
                global: global.clone(),
                keyed: Mutex::default(),
                waiting: AtomicUsize::new(0),
                observer: no_observer(),
            },
            global,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_reserves_slots_and_refuses_past_the_deadline() {
        // 10/s burst 2, queue timeout 300 ms: T = 100 ms, C = 200 ms.
        let c = LimitConfig::default()
            .rate(10, Duration::from_secs(1), 2)
            .queue(100, Duration::from_millis(300));
        let (s, st) = state(&c);
        let start = Instant::now();
        // Two burst slots go at once, the next three wait 100, 200, 300 ms.
        let mut done = Vec::new();
        for _ in 0..5 {
            s.acquire(&st).await.unwrap();
            done.push(start.elapsed());
        }
        assert_eq!(done[0], Duration::ZERO);
        assert_eq!(done[1], Duration::ZERO);
        assert_eq!(done[2], Duration::from_millis(100));
        assert_eq!(done[4], Duration::from_millis(300));
        // A bucket owing 500 ms: the next slot would wait 400 ms, past the 300 ms timeout,
        // so it is refused at once and nothing is reserved.
        let owed = s.now() + 500_000_000;
        st.tat.store(owed, Ordering::Release);
        let err = tokio::time::timeout(Duration::ZERO, s.acquire(&st))
            .await
            .expect("refused at once")
            .unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_millis(400)));
        assert_eq!(st.tat.load(Ordering::Acquire), owed);
        assert_eq!(err.reason(), ThrottleReason::Rate);
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_is_bounded_in_length_and_time() {
        let c = LimitConfig::default()
            .concurrency(1)
            .queue(1, Duration::from_millis(500));
        let (s, st) = state(&c);
        let s = Arc::new(s);
        let held = s.acquire(&st).await.unwrap();
        let (s2, st2) = (s.clone(), st.clone());
        let waiting = tokio::spawn(async move { s2.acquire(&st2).await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(s.waiting.load(Ordering::Acquire), 1);
        let full = s.acquire(&st).await.unwrap_err();
        assert_eq!(full.reason(), ThrottleReason::QueueFull);
        let timed_out = waiting.await.unwrap().unwrap_err();
        assert_eq!(timed_out.reason(), ThrottleReason::QueueTimeout);
        assert_eq!(s.waiting.load(Ordering::Acquire), 0);
        drop(held);
        assert!(s.acquire(&st).await.unwrap().permit.is_some());
    }
}
