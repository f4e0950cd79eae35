//! The fleet mode of the outbound layers (features `outbound` + `redis`): several replicas of
//! a service calling one rate-limited API hold its limits, cache and in-flight fetches
//! together, on the Redis backend of fleet quotas ([`crate::fleet`]).
//!
//! One [`OutboundFleet`] per process (per Redis) is handed to the layers:
//!
//! - [`OutboundLimitLayer::fleet`](super::OutboundLimitLayer::fleet): the outbound `rate` is
//!   one GCRA bucket in Redis for the whole fleet (the same arithmetic: a call reserves the
//!   next slot and waits for it), and `concurrency` is a fleet-wide count of **leases**
//!   (renewed every second, given back when the response ends; a dead replica's lapse
//!   within 3 s). While Redis does not answer, each replica keeps its **share**: the rate
//!   and concurrency divided by the replicas registered (the registry of fleet quotas,
//!   `fairgate_fleet_gateways`), so the fleet together stays within the limit.
//! - [`CacheLayer::shared`](super::CacheLayer::shared): the **shared cache**. A local miss
//!   reads Redis; a response one replica fetched serves the others (with `Age`), and lands
//!   in their local cache for the rest of its TTL. A miss in Redis takes the key's **lease**
//!   (fleet-wide coalescing): the one replica holding it fetches, the others wait until its
//!   outcome is published (Redis pub/sub, not a poll) or the lease lapses (then one of them
//!   takes over). An uncacheable answer is published as `pass`: every waiter calls at once
//!   and, for one lease, so does every newcomer, so no one queues behind another.
//!
//! Redis down: every call has the backend's budget (`timeout`) and feeds its breaker; a
//! call with no answer falls back to the local layers at once (the local cache, in-process
//! coalescing, the share of the limit), so no request fails because Redis does.
//!
//! An application configures it as the gateway's `outbound.fleet` block does (`redis: {url,
//! timeout, key_prefix}`, `name`, `lease`, `max_wait`):
//!
//! ```no_run
//! # async fn app() -> Result<(), fairgate_middleware::fleet::FleetError> {
//! use std::time::Duration;
//! use fairgate_middleware::outbound::*;
//! # let client = tower::service_fn(|_: http::Request<String>| async {
//! #     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
//! # });
//! let fleet = OutboundFleet::connect_url("redis://127.0.0.1:6379")?;
//! let client = tower::ServiceBuilder::new()
//!     .layer(
//!         CacheLayer::new(CacheConfig::default().ttl(Duration::from_secs(30)).lease(Duration::from_secs(2)))
//!             .shared(fleet.clone(), "quota-api"),
//!     )
//!     .layer(CoalesceLayer::new(CoalesceConfig::default()))
//!     .layer(RetryLayer::new(RetryConfig::default()))
//!     .layer(
//!         OutboundLimitLayer::new(LimitConfig::default().rate(8, Duration::from_secs(1), 1))
//!             .fleet(fleet, "quota-api"),
//!     )
//!     .service(client);
//! # drop(client);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fairgate_policies::model::RedisState;
use futures_util::StreamExt;
use tokio::sync::watch;

use crate::backend::redis::Fleet;
use crate::fleet::{FleetError, FleetHandle};

/// The connection, registry and notifications the fleet mode of the outbound layers shares.
/// Cheap to clone; the background tasks stop when the last clone drops.
#[derive(Clone)]
pub struct OutboundFleet {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) notifier: Arc<Notifier>,
    next_owner: AtomicU64,
    _handle: FleetHandle,
    pubsub: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.pubsub.abort();
    }
}

impl fmt::Debug for OutboundFleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundFleet")
            .field("url", &self.inner.fleet.target())
            .field("replicas", &self.replicas())
            .field("degraded", &self.degraded())
            .finish_non_exhaustive()
    }
}

impl OutboundFleet {
    /// Connects to the Redis of `settings` (the `state.redis` settings of fleet quotas:
    /// `url`, `timeout`, `key_prefix`; `mode`, `sync_interval` and `on_failure` do not apply
    /// here), registers this replica and subscribes to the lease notifications. Never waits
    /// for Redis: connections are made in the background.
    ///
    /// # Errors
    ///
    /// A url the redis client refuses, or `cluster` (pub/sub needs one server).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn connect(settings: &RedisState) -> Result<OutboundFleet, FleetError> {
        let fleet = Arc::new(Fleet::connect_outbound(settings)?);
        let url = settings.url.as_deref().unwrap_or_default();
        let client = redis::Client::open(url)
            .map_err(|e| FleetError::Url(format!("{}: {e}", fleet.target())))?;
        let notifier = Arc::new(Notifier::default());
        let pubsub = tokio::spawn(pubsub_loop(
            client,
            fleet.done_pattern(),
            Arc::clone(&notifier),
            settings.timeout.0.max(Duration::from_millis(100)),
        ));
        let handle = fleet.start_outbound_tasks();
        Ok(OutboundFleet {
            inner: Arc::new(Inner {
                fleet,
                notifier,
                next_owner: AtomicU64::new(1),
                _handle: handle,
                pubsub,
            }),
        })
    }

    /// [`OutboundFleet::connect`] to the Redis server at `url` with the defaults of
    /// `state.redis` (`timeout` 25 ms, `key_prefix` `fairgate`).
    ///
    /// # Errors
    ///
    /// A url the redis client refuses.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn connect_url(url: &str) -> Result<OutboundFleet, FleetError> {
        use fairgate_policies::model as m;
        OutboundFleet::connect(&RedisState {
            url: Some(url.to_owned()),
            cluster: Vec::new(),
            mode: m::FleetMode::default(),
            sync_interval: m::default_sync_interval(),
            timeout: m::default_redis_timeout(),
            on_failure: m::OnFailure::default(),
            key_prefix: m::default_key_prefix(),
        })
    }

    /// A handle that does not keep the fleet's tasks running (for an observer's own task).
    pub fn downgrade(&self) -> WeakOutboundFleet {
        WeakOutboundFleet(Arc::downgrade(&self.inner))
    }

    /// The replicas last seen registered in Redis (1 before the first answer).
    pub fn replicas(&self) -> u64 {
        self.inner.fleet.replicas()
    }

    /// True while the breaker is open (Redis unreachable: the layers use their share).
    pub fn degraded(&self) -> bool {
        self.inner.fleet.breaker().is_open()
    }

    /// True while the lease notifications' subscription is live.
    pub fn subscribed(&self) -> bool {
        self.inner.notifier.up.load(Ordering::Acquire)
    }

    /// Redis calls, errors and breaker state now.
    pub fn snapshot(&self) -> crate::backend::BackendSnapshot {
        self.inner.fleet.snapshot()
    }

    /// A fresh lease owner id (unique across the fleet).
    pub(crate) fn owner(&self) -> String {
        format!(
            "{}:{}",
            self.inner.fleet.member_id(),
            self.inner.next_owner.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// An [`OutboundFleet`] that does not keep it alive.
#[derive(Clone, Debug)]
pub struct WeakOutboundFleet(std::sync::Weak<Inner>);

impl WeakOutboundFleet {
    /// The fleet, while some layer still holds it.
    pub fn upgrade(&self) -> Option<OutboundFleet> {
        self.0.upgrade().map(|inner| OutboundFleet { inner })
    }
}

/// What a lease's outcome said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Done {
    /// The entry is in the shared cache.
    Stored,
    /// Uncacheable: call for yourself.
    Pass,
    /// Nothing to share: try again.
    Retry,
}

struct Slot {
    tx: watch::Sender<Option<Done>>,
    waiters: usize,
}

/// Delivers published lease outcomes to the local waiters of each key.
#[derive(Default)]
pub(crate) struct Notifier {
    slots: Mutex<HashMap<String, Slot>>,
    up: AtomicBool,
}

impl Notifier {
    /// Registers a waiter for `channel` (before asking for the lease, so that no outcome
    /// published after that is missed).
    pub(crate) fn watch(self: &Arc<Self>, channel: String) -> Watch {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots.entry(channel.clone()).or_insert_with(|| Slot {
            tx: watch::channel(None).0,
            waiters: 0,
        });
        slot.waiters += 1;
        let mut rx = slot.tx.subscribe();
        rx.mark_unchanged();
        Watch {
            notifier: Arc::clone(self),
            channel,
            rx,
        }
    }

    fn deliver(&self, channel: &str, done: Done) {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(channel) {
            slot.tx.send_replace(Some(done));
        }
    }
}

/// A waiter's registration for one key's outcomes; unregisters when dropped.
pub(crate) struct Watch {
    notifier: Arc<Notifier>,
    channel: String,
    rx: watch::Receiver<Option<Done>>,
}

impl Watch {
    /// The next outcome published after the last one seen, or `None` after `within`.
    pub(crate) async fn next(&mut self, within: Duration) -> Option<Done> {
        match tokio::time::timeout(within, self.rx.changed()).await {
            Ok(Ok(())) => *self.rx.borrow_and_update(),
            _ => None,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut slots = self
            .notifier
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get_mut(&self.channel) {
            slot.waiters -= 1;
            if slot.waiters == 0 {
                slots.remove(&self.channel);
            }
        }
    }
}

/// Keeps one pub/sub connection subscribed to every lease outcome of the prefix, delivering
/// each to the local waiters of its key; reconnects with backoff (50 ms doubling to 2 s).
async fn pubsub_loop(
    client: redis::Client,
    pattern: String,
    notifier: Arc<Notifier>,
    budget: Duration,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if let Ok(Ok(mut ps)) = tokio::time::timeout(budget, client.get_async_pubsub()).await {
            if let Ok(Ok(())) = tokio::time::timeout(budget, ps.psubscribe(&pattern)).await {
                notifier.up.store(true, Ordering::Release);
                backoff = Duration::from_millis(50);
                let mut messages = ps.into_on_message();
                while let Some(msg) = messages.next().await {
                    let done = match msg.get_payload_bytes() {
                        b"stored" => Done::Stored,
                        b"pass" => Done::Pass,
                        _ => Done::Retry,
                    };
                    notifier.deliver(msg.get_channel_name(), done);
                }
                notifier.up.store(false, Ordering::Release);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
