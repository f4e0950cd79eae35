//! Fleet-wide state on Redis: quotas that hold across every gateway of a fleet.
//!
//! The engine keeps deciding on its own state store; a [`Fleet`] attached to it (with
//! [`start`]) makes that store agree with the other gateways through Redis, in one of two
//! modes (`state.redis.mode`):
//!
//! - **`async`** (default): decisions stay local, at memory speed. Each admitted request's
//!   cost is added to a per-key batch (one entry per client key per interval, so a hot key
//!   costs Redis one update per interval, not one per request). Every `sync_interval` each
//!   key of the batch is exchanged with Redis by a script — on one server one call carries
//!   up to 128 clients (`EXCHANGE_CHUNK`; a call per client cost the gateway about one call
//!   per request when most clients send one request per interval); on a Cluster, whose clients
//!   live in different slots, one call per client. The script adds the batch's cost to the
//!   fleet's GCRA bucket of each bandwidth (`TAT ← max(TAT, now) + units·T` on Redis time,
//!   key `<prefix>:{<key>}:t:<bandwidth id>`, the same key exact mode uses) and answers how
//!   far ahead of now that TAT is; the local bucket is then raised to at least that
//!   (`TAT_local ← max(TAT_local, now_local + ahead)`). Every gateway's bucket thus holds the
//!   whole fleet's consumption, and N gateways converge on one global quota. **Slack:** the
//!   fleet may admit up to one extra local bucket's worth per gateway per interval before
//!   the next exchange pulls it down, so over a window W the fleet admits at most
//!   `rate × W + burst + N × (burst_left + rate × sync_interval)`, where `burst_left` is what
//!   was left in the fleet bucket at the last exchange (0 under sustained overload); after
//!   Redis loses its data (restart), one more burst.
//! - **`exact`**: the request waits (within `timeout`) for one Lua script that checks and
//!   updates every bandwidth of the quota all-or-nothing, with the same GCRA as the local
//!   store (`TAT` per key and bandwidth in `<prefix>:{<key>}:t:<bandwidth id>`, in µs of
//!   Redis `TIME`, so clocks of the gateways do not matter). A concurrency quota is also
//!   held fleet-wide: the same script takes a **lease** in `<prefix>:{<key>}:leases` (a
//!   sorted set scored by expiry) when fewer than the limit are live; the gateway renews its
//!   leases every second (3 s lease), and the ticket's drop releases its lease, so a dead
//!   gateway's leases expire within 3 s. Each gateway also keeps its local in-flight count.
//!   In `async` mode concurrency quotas stay per gateway.
//!
//! Keys are hash-tagged per client (`{<key>}`), so a client's bandwidths share one slot.
//!
//! **`limit` rules** with exact buckets are held the same way, their bucket at
//! `<prefix>:{<rule key>}:t:rule:<name>` (the rule key: aggregated IP, client key, header
//! value, or empty for `key: global`): `async` mode batches and exchanges them per (rule, key)
//! like a client's quota; `exact` mode puts an enforced rule's bucket in the request's one
//! script ([`crate::backend::RuleBucket`]), except on a Cluster (other slot) and for shadow
//! rules, which are decided locally and exchanged as in `async` mode.
//!
//! **Redis Cluster.** `state.redis.cluster` (seed nodes) instead of `url` connects with the
//! `redis` crate's async cluster client, behind the same [`redis::aio::ConnectionLike`]
//! handle, so every call site is the same. Each script touches the keys of one slot only:
//! a client's TAT keys and lease set share the `{<key>}` tag, the registry of gateways is
//! `<prefix>:{gateways}` (one key), and a lease renewal or release touches one lease set.
//! Different clients land on different slots, so the load spreads over the masters. The
//! cluster client connects in the background at start (a gateway starts while the cluster
//! is down), follows `MOVED`/`ASK` and reconnects lost nodes with exponential backoff; each
//! call keeps the same budget and feeds the same breaker as with one server.
//!
//! **Failures.** Every call has the `timeout` budget (an `async` exchange, off the request
//! path, at least 50 ms, `EXCHANGE_MIN_BUDGET`: Redis's own expire cycle can take 25 ms). A
//! [`Breaker`] opens after [`BREAKER_THRESHOLD`] consecutive failures; while open, Redis sees at most
//! [`PROBES_PER_SEC`] probes per second and the first success closes it. While it is open
//! decisions follow `on_failure`: `local` keeps deciding locally and charges each key
//! `(N − 1)×` its own consumption as debt, which scales every local limit by `1/N`, N being
//! the gateways last seen registered in Redis (each gateway refreshes a heartbeat every
//! second with a 3 s lease); `open` admits what the local limits admit (exact mode: skips
//! the quota and exact rule limits) and counts it; `closed` rejects requests that have a
//! quota bandwidth or an enforced exact rule limit with 503 (stage `backend`); requests with
//! neither never ask Redis.
//! Transitions are logged once each and counted ([`BackendSnapshot`](crate::backend::BackendSnapshot)); error lines are rate
//! limited to one a second.
//!
//! **Error replies.** A Redis error reply counts in `errors` like a timeout. Most (`OOM
//! command not allowed` once `maxmemory` is reached, `LOADING`, `READONLY`, `CLUSTERDOWN`,
//! …) say the backend cannot serve: they feed the breaker, so under a full Redis the fleet
//! goes degraded and follows `on_failure` until writes succeed again. A `WRONGTYPE` reply
//! (something else sits at one of a client's keys, or a TAT key does not hold a number) is
//! about **that client's keys only**: it is counted and logged with the key (at most one such
//! line a second) but does not move the breaker, so one bad key never degrades the fleet.
//! That client's decisions follow `on_failure` meanwhile: in `exact` mode each of its
//! requests is decided by `on_failure` (`closed` → 503, `open` → admitted and counted,
//! `local` → local limits); in `async` mode its usage is not shared, and under `local` its
//! local limits are scaled by `1/N` as while degraded (under `open` and `closed` it keeps
//! its local limits: async decisions never wait for Redis). The key is not repaired
//! automatically: deleting it restores fleet-wide decisions for the client. The connection is a multiplexed `ConnectionManager` created
//! lazily: a gateway starts while Redis is down, and reconnects with jittered exponential
//! backoff. No caller ever waits on a connection pool.
//!
//! The backend's code lives in `backend/redis/`; this module is its public face and
//! attaches it to an engine ([`start`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fairgate_policies::model::Backend;

pub use crate::backend::redis::{
    Breaker, Fleet, FleetError, FleetHandle, BREAKER_THRESHOLD, PROBES_PER_SEC,
};
use crate::backend::StateBackend;
use crate::engine::Engine;

/// Attaches the Redis backend to `engine` when its policy says `state.backend: redis`,
/// and starts its background tasks on the current tokio runtime. `Ok(None)` for the local
/// backend. Never waits for Redis: the connection is made lazily. The backend settings are
/// read once; a reload that changes them is logged and needs a restart.
///
/// # Panics
///
/// Outside a tokio runtime (as `tokio::spawn` does).
pub fn start(engine: &Arc<Engine>) -> Result<Option<FleetHandle>, FleetError> {
    let policy = engine.store().load_full();
    let initial = policy.state.clone();
    let weak = Arc::downgrade(engine);
    let warned = AtomicBool::new(false);
    engine.store().on_reload(move |_| {
        let Some(engine) = weak.upgrade() else {
            return;
        };
        let now = &engine.store().load().state;
        if (now.backend != initial.backend || now.redis != initial.redis)
            && !warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!("state.backend or state.redis changed: restart to apply it");
        }
    });
    let Some(settings) = policy
        .state
        .redis
        .as_ref()
        .filter(|_| policy.state.backend == Backend::Redis)
    else {
        return Ok(None);
    };
    let mut fleet = Fleet::connect(settings, Arc::clone(engine.clock()), policy.state.max_keys)?;
    // Calendar periods are named by the engine's wall time (which a test may move).
    fleet.wall = Arc::clone(engine.wall_anchor());
    let fleet = Arc::new(fleet);
    if !engine.attach_backend(Arc::clone(&fleet) as Arc<dyn StateBackend>) {
        tracing::warn!("a fleet backend is already attached to this engine");
    }
    let mut handle = fleet.start_tasks(Arc::downgrade(engine), Engine::state_store);
    // Adaptive growth is the fleet's: report growing clients' usage every second.
    let weak = Arc::downgrade(engine);
    handle.keep(tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::backend::redis::GROWTH_REPORT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(engine) = weak.upgrade() else {
                return;
            };
            engine.flush_growth().await;
        }
    }));
    Ok(Some(handle))
}
