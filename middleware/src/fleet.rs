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
//!   up to [`EXCHANGE_CHUNK`] clients (a call per client cost the gateway about one call per
//!   request when most clients send one request per interval); on a Cluster, whose clients
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
//! path, at least [`EXCHANGE_MIN_BUDGET`]: Redis's own expire cycle can take 25 ms). A
//! [`Breaker`] opens after [`BREAKER_THRESHOLD`] consecutive failures; while open, Redis sees at most
//! [`PROBES_PER_SEC`] probes per second and the first success closes it. While it is open
//! decisions follow `on_failure`: `local` keeps deciding locally and charges each key
//! `(N − 1)×` its own consumption as debt, which scales every local limit by `1/N`, N being
//! the gateways last seen registered in Redis (each gateway refreshes a heartbeat every
//! second with a 3 s lease); `open` admits what the local limits admit (exact mode: skips
//! the quota and exact rule limits) and counts it; `closed` rejects requests that have a
//! quota bandwidth or an enforced exact rule limit with 503 (stage `backend`); requests with
//! neither never ask Redis.
//! Transitions are logged once each and counted ([`BackendSnapshot`]); error lines are rate
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fairgate_policies::compiled::CompiledBandwidth;
use fairgate_policies::model::{Backend, FleetMode, OnFailure, RedisState};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Script, Value};

use crate::backend::{BackendSnapshot, CheckFuture, Route, RuleBucket, StateBackend, Verdict};
use crate::clock::{Clock, Nanos, TokioClock};
use crate::engine::Engine;
use crate::gcra::Params;
use crate::state::{Store, OVERFLOW};

/// Consecutive failed calls that open the breaker.
pub const BREAKER_THRESHOLD: u32 = 10;
/// Calls a second an open breaker lets through as probes.
pub const PROBES_PER_SEC: u64 = 5;
/// How often a gateway renews its registration.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long a registration lasts without renewal.
const HEARTBEAT_TTL_MS: u64 = 3_000;
/// How long a concurrency lease lives without renewal.
const LEASE_TTL_MS: u64 = 3_000;
/// How often held leases are renewed.
const LEASE_RENEW_EVERY: Duration = Duration::from_secs(1);
/// Keys exchanged under one call budget (async mode).
const EXCHANGE_CHUNK: usize = 128;

/// The least budget of an `async` exchange call. An exchange is off the request path, so
/// it need not fit a request's `timeout`, and redis-server's own housekeeping can hold it
/// longer: its slow active-expire cycle may run for up to 25 ms (measured with
/// `latency-monitor-threshold` under the load harness, where every bucket key expires 1 s
/// after its TAT), which failed chunks, and lost their interval's usage, at the 25 ms
/// default `timeout`.
const EXCHANGE_MIN_BUDGET: Duration = Duration::from_millis(50);

/// The budget of an `async` exchange call for a `timeout`: at least [`EXCHANGE_MIN_BUDGET`].
/// Also the connections' own response limit, so that they fit the longest call; each call
/// keeps its own budget on top (`Fleet::call`, the exchanges).
fn exchange_budget(timeout: Duration) -> Duration {
    timeout.max(EXCHANGE_MIN_BUDGET)
}

/// Batch shards (a decision locks one, briefly).
const SHARDS: usize = 16;

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

/// The connection every call goes through: one server's multiplexed `ConnectionManager`, or
/// a Redis Cluster's multiplexed async connection (routing each command by its first key).
/// Both are cheap `Arc` clones.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Is this error reply about one client's keys (rather than about the backend)?
fn key_scoped(e: &redis::RedisError) -> bool {
    e.code() == Some("WRONGTYPE")
}

// === Breaker ===

/// A consecutive-failures breaker with rate-limited probes, on an injected clock.
#[derive(Debug)]
pub struct Breaker {
    clock: Arc<dyn Clock>,
    threshold: u32,
    probe_every: Nanos,
    failures: AtomicU32,
    open: AtomicBool,
    next_probe: AtomicU64,
    opens: AtomicU64,
}

impl Breaker {
    /// A closed breaker opening after `threshold` consecutive failures and letting
    /// `probes_per_sec` calls a second through while open.
    pub fn new(clock: Arc<dyn Clock>, threshold: u32, probes_per_sec: u64) -> Breaker {
        Breaker {
            clock,
            threshold: threshold.max(1),
            probe_every: 1_000_000_000 / probes_per_sec.max(1),
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            next_probe: AtomicU64::new(0),
            opens: AtomicU64::new(0),
        }
    }

    /// True while open.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// May a call go to Redis now? Always while closed; while open, one probe per
    /// probe interval (the caller that gets `true` must report the outcome).
    pub fn allow(&self) -> bool {
        if !self.is_open() {
            return true;
        }
        let now = self.clock.now();
        let next = self.next_probe.load(Ordering::Acquire);
        now >= next
            && self
                .next_probe
                .compare_exchange(
                    next,
                    now + self.probe_every,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// Reports a successful call; true when this closed the breaker.
    pub fn on_success(&self) -> bool {
        self.failures.store(0, Ordering::Release);
        self.open.swap(false, Ordering::AcqRel)
    }

    /// Reports a failed call; true when this opened the breaker.
    pub fn on_failure(&self) -> bool {
        let n = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if n < self.threshold || self.is_open() {
            return false;
        }
        self.next_probe
            .store(self.clock.now() + self.probe_every, Ordering::Release);
        let opened = !self.open.swap(true, Ordering::AcqRel);
        if opened {
            self.opens.fetch_add(1, Ordering::Relaxed);
        }
        opened
    }

    /// Times it opened.
    pub fn opens(&self) -> u64 {
        self.opens.load(Ordering::Relaxed)
    }
}

// === scripts ===

/// Exact mode: GCRA over every bucket (a `limit` rule's, a quota bandwidth's), all or
/// nothing, on Redis time (µs), and a concurrency lease when a limit is given.
/// KEYS: one TAT key per bucket, then the lease set. ARGV: n (buckets), then per bucket T
/// and C (integer ns, as every script takes them; the script works in µs) and its cost,
/// then the concurrency limit (0: none), the lease id, the lease ttl (ms).
/// Returns `{1}` when admitted, `{0, i, wait_us, tat_minus_now_us}` when bucket `i`
/// (1-based) rejects, `{2}` when the concurrency limit is reached.
const EXACT_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local n = tonumber(ARGV[1])
local limit = tonumber(ARGV[2 + 3 * n])
local leases = KEYS[n + 1]
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
  if redis.call('ZCARD', leases) >= limit then return {2} end
end
local tats = {}
for i = 1, n do
  local T = tonumber(ARGV[3 * i - 1]) / 1000
  local C = tonumber(ARGV[3 * i]) / 1000
  local cost = tonumber(ARGV[3 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if not tat then return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' does not hold a number') end
  if tat < now then tat = now end
  local new = tat + cost * T
  if new - now > C then
    return {0, i, math.ceil(new - C - now), math.floor(tat - now)}
  end
  tats[i] = new
end
for i = 1, n do
  redis.call('SET', KEYS[i], tostring(tats[i]), 'PX', math.ceil((tats[i] - now) / 1000) + 1000)
end
if limit > 0 then
  local ttl = tonumber(ARGV[4 + 3 * n])
  redis.call('ZADD', leases, now_ms + ttl, ARGV[3 + 3 * n])
  redis.call('PEXPIRE', leases, ttl * 2)
end
return {1}
"#;

/// Renews a lease that is still there. KEYS: the lease set. ARGV: lease id, ttl (ms).
const RENEW_LUA: &str = r#"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
"#;

/// Async mode: charges this gateway's batch to the fleet bucket of each bandwidth and
/// answers how far ahead of now each TAT is (µs). KEYS: one TAT key per bandwidth.
/// ARGV: units, then T (integer ns) per bandwidth.
const SYNC_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local units = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local T = tonumber(ARGV[1 + i]) / 1000
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if not tat then return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' does not hold a number') end
  if tat < now then tat = now end
  if units > 0 then
    tat = tat + units * T
    redis.call('SET', KEYS[i], tostring(tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
  out[i] = math.floor(tat - now)
end
return out
"#;

/// Async mode on one Redis server: [`SYNC_LUA`] for many clients in one call, so a round
/// costs one call per chunk of [`EXCHANGE_CHUNK`] clients instead of one per client.
/// KEYS: every client's TAT keys, client after client. ARGV: per client, its number of
/// bandwidths n, its units, then T (integer ns) per bandwidth. Answer: per client a status
/// (0, or 1 when one of its keys holds something else than a number: that client only) then
/// n values (µs ahead of now; zeros after a status 1). Not for Redis Cluster: the clients'
/// keys live in different slots there.
const SYNC_MANY_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local a, k = 1, 1
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  local units = tonumber(ARGV[a + 1])
  local tats = {}
  local bad = false
  for i = 1, n do
    local ok, v = pcall(redis.call, 'GET', KEYS[k + i - 1])
    local tat = nil
    if ok then tat = tonumber(v or now) end
    if not tat then bad = true end
    tats[i] = tat
  end
  if bad then
    out[#out + 1] = 1
    for i = 1, n do out[#out + 1] = 0 end
  else
    out[#out + 1] = 0
    for i = 1, n do
      local T = tonumber(ARGV[a + 1 + i]) / 1000
      local tat = tats[i]
      if tat < now then tat = now end
      if units > 0 then
        tat = tat + units * T
        redis.call('SET', KEYS[k + i - 1], tostring(tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
      end
      out[#out + 1] = math.floor(tat - now)
    end
  end
  a = a + 2 + n
  k = k + n
end
return out
"#;

/// Registers this gateway until now + ttl and counts the registered ones.
/// KEYS: the registry zset (`<prefix>:{gateways}`: its own hash tag). ARGV: gateway id, ttl ms.
const HEARTBEAT_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"#;

// === Fleet ===

/// A lease given back: (client key, lease id).
type Released = (Box<str>, u64);

/// One consumption batch entry: a client's quota bandwidths, or one `limit` rule's bucket
/// (`rule`: then `bandwidths` is the rule's one bandwidth and the entry's key the rule's).
struct Pending {
    bandwidths: Arc<[CompiledBandwidth]>,
    units: u64,
    rule: bool,
}

/// A `limit` rule's batch entry: (bandwidth id `rule:<name>`, key).
type RuleEntry = (Arc<str>, Box<str>);

/// Looks a [`RuleEntry`] up without building one (hashes as the tuple does).
#[derive(Hash)]
struct RuleEntryRef<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<RuleEntry> for RuleEntryRef<'_> {
    fn equivalent(&self, key: &RuleEntry) -> bool {
        *key.0 == *self.0 && *key.1 == *self.1
    }
}

/// The Redis state backend attached to an engine. See the module docs.
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
}

impl Drop for FleetHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

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
    let fleet = Arc::new(Fleet::connect(
        settings,
        Arc::clone(engine.clock()),
        policy.state.max_keys,
    )?);
    if !engine.attach_backend(Arc::clone(&fleet) as Arc<dyn crate::backend::StateBackend>) {
        tracing::warn!("a fleet backend is already attached to this engine");
    }
    let releases = fleet
        .release_rx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let mut tasks = vec![
        tokio::spawn(heartbeat_loop(Arc::clone(&fleet))),
        tokio::spawn(sync_loop(Arc::clone(&fleet), Arc::downgrade(engine))),
    ];
    if let Some(rx) = releases {
        tasks.push(tokio::spawn(lease_loop(Arc::clone(&fleet), rx)));
    }
    tracing::info!(
        url = %fleet.url_redacted,
        mode = ?fleet.mode,
        on_failure = ?fleet.on_failure,
        "fleet-wide quotas on redis"
    );
    Ok(Some(FleetHandle { fleet, tasks }))
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

    /// Adds `cost` to `key`'s batch entry (async mode, and degraded local decisions).
    pub(crate) fn record(&self, key: &str, bandwidths: &Arc<[CompiledBandwidth]>, cost: u64) {
        let shard = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut map = self.batch[shard].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get_mut(key) {
            p.units = p.units.saturating_add(cost);
            if !Arc::ptr_eq(&p.bandwidths, bandwidths) {
                p.bandwidths = Arc::clone(bandwidths);
            }
            return;
        }
        if map.len() < self.batch_cap {
            map.insert(
                key.into(),
                Pending {
                    bandwidths: Arc::clone(bandwidths),
                    units: cost,
                    rule: false,
                },
            );
        }
    }

    /// Adds 1 to the batch entry of `limit` rule `bandwidth` for `key` (async mode, degraded
    /// local decisions, shadow rules and rules on a Cluster in exact mode).
    pub(crate) fn record_rule(&self, key: &str, bandwidth: &CompiledBandwidth) {
        let probe = RuleEntryRef(&bandwidth.id, key);
        let shard = (self.hasher.hash_one(&probe) as usize) % SHARDS;
        let mut map = self.rule_batch[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get_mut(&probe) {
            p.units = p.units.saturating_add(1);
            return;
        }
        if map.len() < self.batch_cap {
            map.insert(
                (Arc::clone(&bandwidth.id), key.into()),
                Pending {
                    bandwidths: Arc::from([bandwidth.clone()]),
                    units: 1,
                    rule: true,
                },
            );
        }
    }

    /// Exact mode checks `limit` rules' buckets in the same script as the quota on one
    /// server; a Cluster cannot (a rule's key and a client's keys are in different slots),
    /// so there rules are decided locally and exchanged as in `async` mode.
    pub(crate) fn remote_rules(&self) -> bool {
        matches!(self.conn, Conn::Single(_))
    }

    fn take_batch(&self) -> Vec<(Box<str>, Pending)> {
        let mut out = Vec::new();
        for shard in &self.batch {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            // Drained, not replaced: the map keeps its table for the next interval, so the
            // request path does not grow a new one every interval. A table far larger than
            // this interval needed (after a burst of new keys) is shrunk.
            let len = map.len();
            out.extend(map.drain());
            if map.capacity() > 64 && map.capacity() > len.saturating_mul(4) {
                map.shrink_to(len.saturating_mul(2));
            }
        }
        for shard in &self.rule_batch {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            let len = map.len();
            out.extend(map.drain().map(|((_, key), p)| (key, p)));
            if map.capacity() > 64 && map.capacity() > len.saturating_mul(4) {
                map.shrink_to(len.saturating_mul(2));
            }
        }
        out
    }

    fn key(&self, client: &str, kind: &str, bw: &CompiledBandwidth) -> String {
        let mut name = String::new();
        self.write_key(&mut name, client, kind, bw);
        name
    }

    /// Writes [`Fleet::key`] into `name` (cleared first), reusing its allocation.
    fn write_key(&self, name: &mut String, client: &str, kind: &str, bw: &CompiledBandwidth) {
        name.clear();
        for part in [&*self.prefix, ":{", client, "}:", kind, ":", &*bw.id] {
            name.push_str(part);
        }
    }

    /// The registry of gateways (one sorted set, with its own hash tag).
    fn registry_key(&self) -> String {
        format!("{}:{{gateways}}", self.prefix)
    }

    /// Runs one call under the budget and reports it to the breaker. `client`: whose keys
    /// the call touches, if one client's (a key-scoped error reply names it and leaves the
    /// breaker alone; see the module docs).
    async fn call<T>(
        &self,
        client: Option<&str>,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => {
                self.succeeded();
                Some(v)
            }
            Ok(Err(e)) if key_scoped(&e) => {
                self.key_failed(client.unwrap_or(""), &e);
                None
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string(), 1);
                None
            }
            Err(_) => {
                self.failed(&format!("no answer within {:?}", self.timeout), 1);
                None
            }
        }
    }

    /// A call succeeded: closes the breaker.
    fn succeeded(&self) {
        if self.breaker.on_success() {
            tracing::info!(url = %self.url_redacted, "redis is back: fleet-wide decisions again");
        }
    }

    /// Counts a key-scoped error reply (logged at most once a second, with the key); the
    /// breaker does not move: Redis answered.
    fn key_failed(&self, client: &str, e: &dyn std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let now = self.breaker.clock.now();
        let last = self.last_key_error_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1_000_000_000
            && self
                .last_key_error_log
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                url = %self.url_redacted,
                key = %format_args!("{}:{{{client}}}", self.prefix),
                on_failure = ?self.on_failure,
                error = %e,
                "redis refused a client's keys: its decisions follow on_failure until the key is fixed"
            );
        }
    }

    /// Counts `errors` failures of one call (timeout, connection, error replies about the
    /// backend), logs it at most once a second, and feeds the breaker once.
    fn failed(&self, err: &str, errors: u64) {
        self.errors.fetch_add(errors, Ordering::Relaxed);
        let now = self.breaker.clock.now();
        let last = self.last_error_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1_000_000_000
            && self
                .last_error_log
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(url = %self.url_redacted, error = %err, "redis call failed");
        }
        if self.breaker.on_failure() {
            tracing::warn!(
                url = %self.url_redacted,
                on_failure = ?self.on_failure,
                "redis unreachable: breaker open, deciding with on_failure"
            );
        }
    }

    /// Exact mode: one script over every rule bucket (cost 1 each) and bandwidth (cost
    /// `cost`), plus a concurrency lease of id `lease` when `concurrency` is set. The
    /// verdict's index counts the rule buckets first. [`Verdict::Unavailable`] on failure or
    /// timeout.
    pub(crate) async fn exact(
        &self,
        client: &str,
        rules: &[RuleBucket],
        bandwidths: &[CompiledBandwidth],
        cost: u64,
        concurrency: Option<(u32, u64)>,
    ) -> Verdict {
        let mut inv = self.exact.prepare_invoke();
        for r in rules {
            inv.key(self.key(&r.key, "t", &r.bandwidth));
        }
        for bw in bandwidths {
            inv.key(self.key(client, "t", bw));
        }
        inv.key(self.leases_key(client));
        inv.arg(rules.len() + bandwidths.len());
        for r in rules {
            inv.arg(r.bandwidth.t_ns).arg(r.bandwidth.c_ns).arg(1u64);
        }
        for bw in bandwidths {
            inv.arg(bw.t_ns).arg(bw.c_ns).arg(cost);
        }
        let (limit, lease) = concurrency.unwrap_or((0, 0));
        inv.arg(limit)
            .arg(self.lease_member(lease))
            .arg(LEASE_TTL_MS);
        let mut conn = self.conn.clone();
        let Some(reply): Option<Vec<i64>> =
            self.call(Some(client), inv.invoke_async(&mut conn)).await
        else {
            return Verdict::Unavailable;
        };
        let us =
            |v: Option<&i64>| v.map_or(0, |&v| u64::try_from(v).unwrap_or(0).saturating_mul(1000));
        match reply.first() {
            Some(1) => Verdict::Admit,
            Some(2) => Verdict::Busy,
            Some(0) => Verdict::Reject {
                index: reply
                    .get(1)
                    .and_then(|&i| usize::try_from(i).ok())
                    .unwrap_or(1)
                    .saturating_sub(1),
                wait: us(reply.get(2)).max(1),
                tat_ahead: us(reply.get(3)),
            },
            _ => Verdict::Unavailable,
        }
    }

    fn leases_key(&self, client: &str) -> String {
        format!("{}:{{{client}}}:leases", self.prefix)
    }

    fn lease_member(&self, lease: u64) -> String {
        format!("{}:{lease}", self.id)
    }

    /// A fresh lease id (for [`Fleet::exact`]).
    pub(crate) fn new_lease_id(&self) -> u64 {
        self.next_lease.fetch_add(1, Ordering::Relaxed)
    }

    /// Records lease `id` of `client` as held (renewed until the guard drops).
    pub(crate) fn hold(self: &Arc<Self>, id: u64, client: &str) -> Lease {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, client.into());
        Lease {
            fleet: Arc::clone(self),
            id,
        }
    }

    fn release(&self, id: u64) {
        let key = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(key) = key {
            // Unbounded: a drop never waits; the lease task gives it back to Redis.
            let _ = self.release_tx.send((key, id));
        }
    }

    /// Concurrency leases held now.
    pub fn leases_held(&self) -> usize {
        self.leases.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Renews this gateway's registration and learns the fleet size.
    async fn beat(&self) {
        if !self.breaker.allow() {
            return;
        }
        let mut conn = self.conn.clone();
        let mut inv = self.heartbeat.prepare_invoke();
        inv.key(self.registry_key())
            .arg(&self.id)
            .arg(HEARTBEAT_TTL_MS);
        if let Some(n) = self.call(None, inv.invoke_async::<u64>(&mut conn)).await {
            let old = self.gateways.swap(n.max(1), Ordering::Relaxed);
            if old != n.max(1) {
                tracing::info!(gateways = n, "fleet size changed");
            }
        }
    }
}

/// The cluster connection for `seeds`: made in the background (never waits here), with the
/// same budgets as the single-server `ConnectionManager`.
fn connect_cluster(
    seeds: &[String],
    timeout: Duration,
    redacted: &str,
) -> Result<ClusterConnection, FleetError> {
    let connect_timeout = timeout.max(Duration::from_millis(100));
    let client = redis::cluster::ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .connection_timeout(connect_timeout)
        .response_timeout(exchange_budget(timeout))
        .retries(3)
        .min_retry_wait(50)
        .max_retry_wait(2_000)
        .build()
        .map_err(|e| FleetError::Cluster(format!("{redacted}: {e}")))?;
    let config = redis::cluster::ClusterConfig::new()
        .set_connection_timeout(connect_timeout)
        .set_response_timeout(exchange_budget(timeout));
    Ok(client.get_pending_async_connection_with_config(config))
}

// === background tasks ===

/// A fleet-wide concurrency lease; dropping it gives it back (the ticket holds it).
pub(crate) struct Lease {
    fleet: Arc<Fleet>,
    id: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.fleet.release(self.id);
    }
}

/// Gives released leases back and renews the held ones.
async fn lease_loop(
    fleet: Arc<Fleet>,
    mut releases: tokio::sync::mpsc::UnboundedReceiver<Released>,
) {
    let mut tick = tokio::time::interval(LEASE_RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            released = releases.recv() => {
                let Some((key, id)) = released else {
                    return;
                };
                // While Redis is unreachable the lease simply expires.
                if fleet.breaker.allow() {
                    let mut conn = fleet.conn.clone();
                    let mut cmd = redis::cmd("ZREM");
                    cmd.arg(fleet.leases_key(&key)).arg(fleet.lease_member(id));
                    let _ = fleet.call(Some(&key), cmd.query_async::<i64>(&mut conn)).await;
                }
            }
            _ = tick.tick() => {
                let held: Vec<(u64, Box<str>)> = fleet
                    .leases
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|(id, k)| (*id, k.clone()))
                    .collect();
                if held.is_empty() || !fleet.breaker.allow() {
                    continue;
                }
                let calls = held.iter().map(|(id, key)| {
                    let mut inv = fleet.renew.prepare_invoke();
                    inv.key(fleet.leases_key(key))
                        .arg(fleet.lease_member(*id))
                        .arg(LEASE_TTL_MS);
                    let mut conn = fleet.conn.clone();
                    async move { inv.invoke_async::<i64>(&mut conn).await }
                });
                let all = futures_util::future::join_all(calls);
                let _ = fleet
                    .call(None, async { Ok::<_, redis::RedisError>(all.await) })
                    .await;
            }
        }
    }
}

async fn heartbeat_loop(fleet: Arc<Fleet>) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        fleet.beat().await;
    }
}

async fn sync_loop(fleet: Arc<Fleet>, engine: std::sync::Weak<Engine>) {
    let mut tick = tokio::time::interval(fleet.sync_interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let batch = fleet.take_batch();
        if batch.is_empty() {
            continue;
        }
        let store = engine.state_store();
        // Exact mode exchanges only `limit` rules' entries (shadow rules, rules on a
        // Cluster): its quotas are decided by Redis, its batch is for the degraded share.
        let (batch, local_only): (Vec<_>, Vec<_>) = match fleet.mode {
            FleetMode::Async => (batch, Vec::new()),
            FleetMode::Exact => batch.into_iter().partition(|(_, p)| p.rule),
        };
        let peers_share = fleet.breaker.is_open() && fleet.on_failure == OnFailure::Local;
        if peers_share && !local_only.is_empty() {
            charge_peers_share(&fleet, store, &local_only, fleet.clock.now());
        }
        if batch.is_empty() {
            continue;
        }
        if !fleet.breaker.allow() {
            if peers_share {
                charge_peers_share(&fleet, store, &batch, fleet.clock.now());
            }
            continue;
        }
        let round = exchange_batch(&fleet, store, &batch).await;
        if round.completed {
            fleet.syncs.fetch_add(1, Ordering::Relaxed);
        }
        if fleet.on_failure == OnFailure::Local && !round.unshared.is_empty() {
            let unshared = round.unshared.iter().filter_map(|&i| batch.get(i));
            charge_peers_share(&fleet, store, unshared, fleet.clock.now());
        }
    }
}

/// Degraded `local`: every key pays `(N − 1)×` its own consumption, so each gateway keeps
/// to `1/N` of the quota.
fn charge_peers_share<'b>(
    fleet: &Fleet,
    store: &Store,
    batch: impl IntoIterator<Item = &'b (Box<str>, Pending)>,
    now: Nanos,
) {
    let others = fleet.gateways.load(Ordering::Relaxed).saturating_sub(1);
    if others == 0 {
        return;
    }
    for (key, p) in batch {
        let units = p.units.saturating_mul(others);
        charge(store, key, p, now, |_| units);
    }
}

/// What one exchange round did.
struct Round {
    /// Every chunk got its answers (some keys may still have failed).
    completed: bool,
    /// Indices (in the batch) of the keys whose usage did not reach Redis.
    unshared: Vec<usize>,
}

/// One exchange: charge the batch to the fleet buckets, raise the local ones to them.
/// Keys go in chunks of [`EXCHANGE_CHUNK`], each pipelined on the one connection under its
/// own call budget, so a round with many keys is not one call over budget. Each key's
/// script answers on its own: a key-scoped error reply (`WRONGTYPE`) leaves that key
/// unshared and the breaker alone; any other error reply (`OOM`…) or a timeout is a failed
/// call for the breaker, and the rest of the round is then skipped (unshared).
async fn exchange_batch(fleet: &Fleet, store: &Store, batch: &[(Box<str>, Pending)]) -> Round {
    if matches!(fleet.conn, Conn::Single(_)) {
        return exchange_batch_one_call_per_chunk(fleet, store, batch).await;
    }
    let mut unshared = Vec::new();
    for (c, chunk) in batch.chunks(EXCHANGE_CHUNK).enumerate() {
        let base = c * EXCHANGE_CHUNK;
        let calls = chunk.iter().map(|(key, p)| {
            let mut inv = fleet.sync.prepare_invoke();
            for bw in p.bandwidths.iter() {
                inv.key(fleet.key(key, "t", bw));
            }
            inv.arg(p.units);
            for bw in p.bandwidths.iter() {
                inv.arg(bw.t_ns);
            }
            let mut conn = fleet.conn.clone();
            async move { inv.invoke_async::<Vec<i64>>(&mut conn).await }
        });
        let all = futures_util::future::join_all(calls);
        fleet.calls.fetch_add(1, Ordering::Relaxed);
        let Ok(results) = tokio::time::timeout(exchange_budget(fleet.timeout), all).await else {
            fleet.failed(
                &format!("no answer within {:?}", exchange_budget(fleet.timeout)),
                1,
            );
            unshared.extend(base..batch.len());
            return Round {
                completed: false,
                unshared,
            };
        };
        let now = fleet.clock.now();
        let mut backend_error = None;
        for (i, ((key, p), result)) in chunk.iter().zip(results).enumerate() {
            match result {
                Ok(ahead_us) => raise(store, key, p, now, |i| {
                    ahead_us
                        .get(i)
                        .map_or(0, |&us| u64::try_from(us).unwrap_or(0).saturating_mul(1000))
                }),
                Err(e) if key_scoped(&e) => {
                    fleet.key_failed(key, &e);
                    unshared.push(base + i);
                }
                Err(e) => {
                    unshared.push(base + i);
                    let (_, n) = backend_error.get_or_insert((e, 0u64));
                    *n += 1;
                }
            }
        }
        match backend_error {
            Some((e, n)) => {
                // Counted once per key; the breaker hears of it once per chunk.
                fleet.failed(&e.to_string(), n);
                unshared.extend(base + chunk.len()..batch.len());
                return Round {
                    completed: false,
                    unshared,
                };
            }
            None => fleet.succeeded(),
        }
    }
    Round {
        completed: true,
        unshared,
    }
}

/// [`exchange_batch`] on one Redis server: each chunk is one [`SYNC_MANY_LUA`] call (the
/// same per-key semantics: a key holding something else leaves that client unshared and the
/// breaker alone; an error reply or a timeout fails the call for the breaker). A client-side
/// call costs the gateway far more CPU than the few keys it carries, and with many distinct
/// clients per interval a call per client was about one call per request (BENCHMARKS.md,
/// "Gateway throughput per state backend").
async fn exchange_batch_one_call_per_chunk(
    fleet: &Fleet,
    store: &Store,
    batch: &[(Box<str>, Pending)],
) -> Round {
    let mut unshared = Vec::new();
    // One reusable buffer for the key names: each is copied into the command's own
    // contiguous argument buffer, so a chunk allocates no per-key or per-argument strings
    // (redis's `ScriptInvocation` keeps a `Vec<u8>` per argument: that and the key strings
    // were most of this function's cost, see docs/architecture.md).
    let mut name = String::with_capacity(fleet.prefix.len() + 64);
    for (c, chunk) in batch.chunks(EXCHANGE_CHUNK).enumerate() {
        let base = c * EXCHANGE_CHUNK;
        let keys: usize = chunk.iter().map(|(_, p)| p.bandwidths.len()).sum();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(fleet.sync_many.get_hash()).arg(keys);
        for (key, p) in chunk {
            for bw in p.bandwidths.iter() {
                fleet.write_key(&mut name, key, "t", bw);
                cmd.arg(name.as_bytes());
            }
        }
        for (_, p) in chunk {
            cmd.arg(p.bandwidths.len()).arg(p.units);
            for bw in p.bandwidths.iter() {
                cmd.arg(bw.t_ns);
            }
        }
        let mut conn = fleet.conn.clone();
        fleet.calls.fetch_add(1, Ordering::Relaxed);
        let answer = tokio::time::timeout(exchange_budget(fleet.timeout), async {
            match cmd.query_async::<Vec<i64>>(&mut conn).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    fleet.sync_many.load_async(&mut conn).await?;
                    cmd.query_async::<Vec<i64>>(&mut conn).await
                }
                other => other,
            }
        })
        .await;
        let values = match answer {
            Err(_) => {
                fleet.failed(
                    &format!("no answer within {:?}", exchange_budget(fleet.timeout)),
                    1,
                );
                unshared.extend(base..batch.len());
                return Round {
                    completed: false,
                    unshared,
                };
            }
            Ok(Err(e)) => {
                fleet.failed(&e.to_string(), chunk.len() as u64);
                unshared.extend(base..batch.len());
                return Round {
                    completed: false,
                    unshared,
                };
            }
            Ok(Ok(values)) => values,
        };
        let expected: usize = chunk.iter().map(|(_, p)| 1 + p.bandwidths.len()).sum();
        if values.len() != expected {
            fleet.failed(
                &format!("sync answered {} values, expected {expected}", values.len()),
                chunk.len() as u64,
            );
            unshared.extend(base..batch.len());
            return Round {
                completed: false,
                unshared,
            };
        }
        let now = fleet.clock.now();
        let mut at = 0;
        for (i, (key, p)) in chunk.iter().enumerate() {
            let n = p.bandwidths.len();
            let (status, ahead_us) = (values[at], &values[at + 1..at + 1 + n]);
            at += 1 + n;
            if status == 0 {
                raise(store, key, p, now, |i| {
                    ahead_us
                        .get(i)
                        .map_or(0, |&us| u64::try_from(us).unwrap_or(0).saturating_mul(1000))
                });
            } else {
                fleet.key_failed(
                    key,
                    &"WRONGTYPE a limiter key holds something else than a number",
                );
                unshared.push(base + i);
            }
        }
        fleet.succeeded();
    }
    Round {
        completed: true,
        unshared,
    }
}

/// Raises bandwidth `i` of `key`'s entry `p` to `TAT ≥ now + ahead(i)`.
fn raise(store: &Store, key: &str, p: &Pending, now: Nanos, ahead: impl Fn(usize) -> Nanos) {
    let bandwidths = &*p.bandwidths;
    let missing = |i: usize, tat: Nanos, t: Nanos| {
        let want = now.saturating_add(ahead(i));
        want.saturating_sub(tat.max(now)) / t.max(1)
    };
    if p.rule {
        // A rule's bucket is its own entry (scope `rule:<name>`), not a client's slot.
        for (i, bw) in bandwidths.iter().enumerate() {
            let _ = store.with_entry(&bw.id, key, now, bw.c_ns, |e| {
                let units = missing(i, e.peek(now, bw.c_ns), bw.t_ns);
                if units > 0 {
                    e.charge_debt(now, params(bw), units);
                }
            });
        }
        return;
    }
    let _ = store
        .with_client(key, now, bandwidths, |e, map| {
            for (i, (bw, &s)) in bandwidths.iter().zip(map).enumerate() {
                if s == OVERFLOW {
                    continue;
                }
                let b = e.slot(s);
                let units = missing(i, b.peek(now, bw.c_ns), bw.t_ns);
                if units > 0 {
                    b.charge_debt(now, params(bw), units);
                }
            }
            *map
        })
        .map(|map| {
            for (i, bw) in bandwidths.iter().enumerate() {
                if map.get(i).is_none_or(|&s| s == OVERFLOW) {
                    let _ = store.with_entry(&bw.id, key, now, bw.c_ns, |e| {
                        let units = missing(i, e.peek(now, bw.c_ns), bw.t_ns);
                        if units > 0 {
                            e.charge_debt(now, params(bw), units);
                        }
                    });
                }
            }
        });
}

fn params(bw: &CompiledBandwidth) -> Params {
    Params {
        t: bw.t_ns,
        c: bw.c_ns,
    }
}

/// Charges `units(i)` of debt to bandwidth `i` of `key`'s entry `p`.
fn charge(store: &Store, key: &str, p: &Pending, now: Nanos, units: impl Fn(usize) -> u64) {
    let bandwidths = &*p.bandwidths;
    if p.rule {
        for (i, bw) in bandwidths.iter().enumerate() {
            let u = units(i);
            if u > 0 {
                let _ = store.with_entry(&bw.id, key, now, bw.c_ns, |e| {
                    e.charge_debt(now, params(bw), u)
                });
            }
        }
        return;
    }
    // A full table cannot take new debt; the key is then at worst as it was.
    let Ok(map) = store.with_client(key, now, bandwidths, |e, map| {
        for (i, (bw, &s)) in bandwidths.iter().zip(map).enumerate() {
            let u = units(i);
            if s != OVERFLOW && u > 0 {
                e.slot(s).charge_debt(now, params(bw), u);
            }
        }
        *map
    }) else {
        return;
    };
    for (i, bw) in bandwidths.iter().enumerate() {
        let u = units(i);
        if u > 0 && map.get(i).is_none_or(|&s| s == OVERFLOW) {
            let _ = store.with_entry(&bw.id, key, now, bw.c_ns, |e| {
                e.charge_debt(now, params(bw), u)
            });
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn breaker_opens_after_threshold_probes_rate_limited_and_closes_on_success() {
        let b = Breaker::new(Arc::new(TokioClock::new()), 20, 5);
        for _ in 0..19 {
            assert!(!b.on_failure());
            assert!(b.allow());
        }
        assert!(b.on_failure(), "the 20th consecutive failure opens it");
        assert!(b.is_open());
        assert_eq!(b.opens(), 1);
        // Open: no call until the probe interval (200 ms) has passed.
        assert!(!b.allow());
        let mut probes = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(1)).await;
            if b.allow() {
                probes += 1;
                assert!(!b.on_failure(), "a failed probe keeps it open, not reopens");
            }
        }
        assert_eq!(probes, 5, "≤ 5 probes in one second");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(b.allow());
        assert!(b.on_success(), "a successful probe closes it");
        assert!(!b.is_open());
        assert!(b.allow());
        assert!(!b.on_success(), "closing is reported once");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_success_resets_the_consecutive_count() {
        let b = Breaker::new(Arc::new(TokioClock::new()), 3, 5);
        assert!(!b.on_failure());
        assert!(!b.on_failure());
        b.on_success();
        assert!(!b.on_failure());
        assert!(!b.on_failure());
        assert!(b.on_failure());
    }
}
