//! The Redis state backend: quotas that hold across every gateway of a fleet. What it does
//! (`async` and `exact` modes, keys, slack, Cluster, failures) is documented on
//! [`crate::fleet`], its public face, which also attaches it to an engine.
//!
//! One job per file: this one holds the [`Fleet`] itself (settings, counters, the route of
//! each decision, its [`StateBackend`] impl) and starts its background tasks; `conn.rs` the
//! connection and the call (budget, breaker, error logs), `breaker.rs` the breaker,
//! `scripts.rs` the Lua scripts (in `lua/`), `keys.rs` the key names, `batch.rs` the
//! consumption batch, `exchange.rs` `async` mode's exchange, `exact.rs` `exact` mode's
//! remote check, `lease.rs` the concurrency leases and `registry.rs` the registry of
//! gateways (heartbeat, fleet size).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fairgate_policies::compiled::CompiledBandwidth;
use fairgate_policies::model::{FleetMode, OnFailure, RedisState};
use redis::aio::ConnectionManager;
use redis::Script;

use crate::backend::{
    BackendSnapshot, CheckFuture, GrowthFuture, GrowthReport, ResetFuture, Route, RuleBucket,
    StateBackend,
};
use crate::clock::{Clock, TokioClock};
use crate::state::Store;

mod batch;
mod breaker;
mod conn;
mod exact;
mod exchange;
mod growth;
mod keys;
mod lease;
#[cfg(feature = "outbound")]
mod outbound;
#[cfg(feature = "outbound")]
pub(crate) use outbound::{Fetch, Reserve, Settle};
mod registry;
mod scripts;

pub use breaker::{Breaker, BREAKER_THRESHOLD, PROBES_PER_SEC};
pub(crate) use growth::GROWTH_REPORT_EVERY;

use batch::{Pending, RuleEntry, SHARDS};
use conn::{connect_cluster, exchange_budget, Conn};
use lease::Released;
use scripts::{EXACT_LUA, GROWTH_LUA, HEARTBEAT_LUA, RENEW_LUA, SYNC_LUA, SYNC_MANY_LUA};

/// Why the fleet backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The url is not usable by the redis client.
    #[error("state.redis.url: {0}")]
    Url(String),
    /// The cluster seed nodes are not usable by the redis cluster client.
    #[error("state.redis.cluster: {0}")]
    Cluster(String),
}

/// The Redis state backend attached to an engine. See the module docs of [`crate::fleet`].
pub struct Fleet {
    mode: FleetMode,
    on_failure: OnFailure,
    timeout: Duration,
    sync_interval: Duration,
    prefix: String,
    url_redacted: String,
    id: String,
    conn: Conn,
    breaker: Breaker,
    exact: Script,
    sync: Script,
    sync_many: Script,
    heartbeat: Script,
    renew: Script,
    growth: Script,
    /// Concurrency leases this gateway holds: id → client key.
    leases: Mutex<HashMap<u64, Box<str>>>,
    next_lease: AtomicU64,
    release_tx: tokio::sync::mpsc::UnboundedSender<Released>,
    release_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Released>>>,
    batch: [Mutex<HashMap<Box<str>, Pending>>; SHARDS],
    /// `limit` rules' batch: one entry per (rule, key) per interval.
    rule_batch: [Mutex<hashbrown::HashMap<RuleEntry, Pending, ahash::RandomState>>; SHARDS],
    batch_cap: usize,
    hasher: ahash::RandomState,
    gateways: AtomicU64,
    errors: AtomicU64,
    calls: AtomicU64,
    fm_admits: AtomicU64,
    fm_rejects: AtomicU64,
    syncs: AtomicU64,
    last_error_log: AtomicU64,
    last_key_error_log: AtomicU64,
    clock: Arc<dyn Clock>,
    /// The engine's clock in wall time: names the Redis key of a calendar period's count.
    pub(crate) wall: Arc<crate::clock::WallAnchor>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("url", &self.url_redacted)
            .field("mode", &self.mode)
            .field("on_failure", &self.on_failure)
            .field("degraded", &self.breaker.is_open())
            .finish_non_exhaustive()
    }
}

/// Keeps the fleet's background tasks (exchange, heartbeat) running; dropping it stops them.
#[derive(Debug)]
pub struct FleetHandle {
    fleet: Arc<Fleet>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FleetHandle {
    /// The backend.
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Keeps `task` running as long as the handle (stopped with the others).
    pub(crate) fn keep(&mut self, task: tokio::task::JoinHandle<()>) {
        self.tasks.push(task);
    }
}

impl Drop for FleetHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Fleet {
    /// A backend for `settings` (no connection made yet; with `cluster`, the cluster client
    /// starts connecting in the background).
    ///
    /// # Panics
    ///
    /// With `cluster`, outside a tokio runtime (its connection task is spawned).
    pub fn connect(
        settings: &RedisState,
        clock: Arc<dyn Clock>,
        max_keys: u64,
    ) -> Result<Fleet, FleetError> {
        let url_redacted = settings.target_redacted();
        let timeout = settings.timeout.0;
        let conn = match &settings.url {
            Some(url) => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| FleetError::Url(format!("{url_redacted}: {e}")))?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout.max(Duration::from_millis(100))))
                    .set_response_timeout(Some(exchange_budget(timeout)))
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(2))
                    .set_number_of_retries(3);
                let conn = ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| FleetError::Url(format!("{url_redacted}: {e}")))?;
                Conn::Single(conn)
            }
            None => Conn::Cluster(connect_cluster(&settings.cluster, timeout, &url_redacted)?),
        };
        let id = format!(
            "{:x}-{:x}",
            std::process::id(),
            ahash::RandomState::new().hash_one(clock.now())
        );
        let (release_tx, release_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Fleet {
            mode: settings.mode,
            on_failure: settings.on_failure,
            timeout,
            sync_interval: settings.sync_interval.0,
            prefix: settings.key_prefix.clone(),
            url_redacted,
            id,
            conn,
            // Real (tokio) time, whatever clock the engine's buckets read: probes and log
            // limits are about the wall, not about the quota's time.
            breaker: Breaker::new(
                Arc::new(TokioClock::new()),
                BREAKER_THRESHOLD,
                PROBES_PER_SEC,
            ),
            exact: Script::new(EXACT_LUA),
            sync: Script::new(SYNC_LUA),
            sync_many: Script::new(SYNC_MANY_LUA),
            heartbeat: Script::new(HEARTBEAT_LUA),
            renew: Script::new(RENEW_LUA),
            growth: Script::new(GROWTH_LUA),
            leases: Mutex::new(HashMap::new()),
            next_lease: AtomicU64::new(1),
            release_tx,
            release_rx: Mutex::new(Some(release_rx)),
            batch: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            rule_batch: std::array::from_fn(|_| {
                Mutex::new(hashbrown::HashMap::with_hasher(ahash::RandomState::new()))
            }),
            batch_cap: usize::try_from(max_keys / SHARDS as u64 + 1).unwrap_or(usize::MAX),
            hasher: ahash::RandomState::new(),
            gateways: AtomicU64::new(1),
            errors: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            fm_admits: AtomicU64::new(0),
            fm_rejects: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            last_error_log: AtomicU64::new(0),
            last_key_error_log: AtomicU64::new(0),
            wall: Arc::new(crate::clock::WallAnchor::new(&*clock)),
            clock,
        })
    }

    /// Counters and state now.
    pub fn snapshot(&self) -> BackendSnapshot {
        BackendSnapshot {
            degraded: self.breaker.is_open(),
            errors: self.errors.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            breaker_opens: self.breaker.opens(),
            failure_mode_admits: self.fm_admits.load(Ordering::Relaxed),
            failure_mode_rejects: self.fm_rejects.load(Ordering::Relaxed),
            gateways: self.gateways.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
        }
    }

    /// The breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// How the next decision uses the fleet. `remote_ok`: the caller can await Redis.
    pub(crate) fn route(&self, remote_ok: bool) -> Route {
        let exact = self.mode == FleetMode::Exact && remote_ok;
        if !self.breaker.is_open() {
            return if exact { Route::Remote } else { Route::Shared };
        }
        if exact && self.breaker.allow() {
            return Route::Remote;
        }
        match self.on_failure {
            OnFailure::Local => Route::Degraded,
            OnFailure::Open if exact => Route::Admit,
            OnFailure::Open => Route::Degraded,
            OnFailure::Closed => Route::Reject,
        }
    }

    pub(crate) fn on_failure_mode(&self) -> OnFailure {
        self.on_failure
    }

    pub(crate) fn count_failure_admit(&self) {
        self.fm_admits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_failure_reject(&self) {
        self.fm_rejects.fetch_add(1, Ordering::Relaxed);
    }

    /// Exact mode checks `limit` rules' buckets in the same script as the quota on one
    /// server; a Cluster cannot (a rule's key and a client's keys are in different slots),
    /// so there rules are decided locally and exchanged as in `async` mode.
    pub(crate) fn remote_rules(&self) -> bool {
        matches!(self.conn, Conn::Single(_))
    }

    /// Starts the background tasks on the current tokio runtime: the heartbeat, the lease
    /// renewals and releases, and the exchange, which raises the local store of `engine`
    /// (reached with `store_of`) and ends when the engine is gone. Generic over the engine
    /// so that the backend does not depend on it ([`crate::fleet::start`] passes
    /// `Engine::state_store`). Dropping the handle stops every task.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn` does).
    pub(crate) fn start_tasks<E: Send + Sync + 'static>(
        self: &Arc<Self>,
        engine: Weak<E>,
        store_of: fn(&E) -> &Store,
    ) -> FleetHandle {
        let releases = self
            .release_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut tasks = vec![
            tokio::spawn(registry::heartbeat_loop(Arc::clone(self))),
            tokio::spawn(exchange::sync_loop(Arc::clone(self), engine, store_of)),
        ];
        if let Some(rx) = releases {
            tasks.push(tokio::spawn(lease::lease_loop(Arc::clone(self), rx)));
        }
        tracing::info!(
            url = %self.url_redacted,
            mode = ?self.mode,
            on_failure = ?self.on_failure,
            "fleet-wide quotas on redis"
        );
        FleetHandle {
            fleet: Arc::clone(self),
            tasks,
        }
    }
}

// === the StateBackend ===

/// The Redis backend behind the engine's [`StateBackend`] trait.
impl StateBackend for Fleet {
    fn route(&self, remote_ok: bool) -> Route {
        Fleet::route(self, remote_ok)
    }

    fn record(&self, client: &str, bandwidths: &Arc<[CompiledBandwidth]>, cost: u64) {
        Fleet::record(self, client, bandwidths, cost);
    }

    fn record_rule(&self, key: &str, bandwidth: &CompiledBandwidth) {
        Fleet::record_rule(self, key, bandwidth);
    }

    fn remote_rules(&self) -> bool {
        Fleet::remote_rules(self)
    }

    fn remote_check<'a>(
        &'a self,
        client: &'a str,
        rules: &'a [RuleBucket],
        bandwidths: &'a [CompiledBandwidth],
        cost: u64,
        lease: Option<(u32, u64)>,
    ) -> CheckFuture<'a> {
        Box::pin(self.exact(client, rules, bandwidths, cost, lease))
    }

    fn on_failure(&self) -> OnFailure {
        self.on_failure_mode()
    }

    fn new_lease_id(&self) -> u64 {
        Fleet::new_lease_id(self)
    }

    fn hold_lease(self: Arc<Self>, id: u64, client: &str) -> Box<dyn Send + Sync> {
        Box::new(self.hold(id, client))
    }

    fn count_failure_admit(&self) {
        Fleet::count_failure_admit(self);
    }

    fn count_failure_reject(&self) {
        Fleet::count_failure_reject(self);
    }

    fn snapshot(&self) -> Option<BackendSnapshot> {
        Some(Fleet::snapshot(self))
    }

    fn shares_growth(&self) -> bool {
        true
    }

    fn report_growth<'a>(&'a self, reports: &'a [GrowthReport]) -> GrowthFuture<'a> {
        Box::pin(Fleet::report_growth(self, reports))
    }

    fn reset_growth<'a>(&'a self, client: &'a str) -> ResetFuture<'a> {
        Box::pin(Fleet::reset_growth(self, client))
    }
}
