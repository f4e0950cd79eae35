//! The Lua scripts, one file each under `lua/`; each constant says what its script takes
//! and answers. A file holds exactly the text the script had inline, leading newline
//! included, so its SHA1 (`EVALSHA`) and the line numbers in Redis's error replies are
//! those of the inline script.

/// Exact mode: GCRA over every bucket (a `limit` rule's, a quota bandwidth's), all or
/// nothing, on Redis time (µs), and a concurrency lease when a limit is given.
/// KEYS: one TAT key per bucket, then the lease set. ARGV: n (buckets), then per bucket T
/// and C (integer ns, as every script takes them; the script works in µs) and its cost,
/// then the concurrency limit (0: none), the lease id, the lease ttl (ms). A calendar
/// period's count is passed as T = −(ms to the period's end), C = its quota: its key holds
/// the count and expires at the period's end; a rejection by it answers the wait to the
/// period's end (µs) and the count.
/// Returns `{1}` when admitted, `{0, i, wait_us, tat_minus_now_us}` when bucket `i`
/// (1-based) rejects, `{2}` when the concurrency limit is reached.
pub(super) const EXACT_LUA: &str = include_str!("lua/exact.lua");

/// Renews a lease that is still there. KEYS: the lease set. ARGV: lease id, ttl (ms).
pub(super) const RENEW_LUA: &str = include_str!("lua/renew.lua");

/// Async mode: charges this gateway's batch to the fleet bucket of each bandwidth and
/// answers how far ahead of now each TAT is (µs). KEYS: one TAT key per bandwidth.
/// ARGV: units, then T (integer ns) per bandwidth. A calendar period's count is passed as
/// T = −(ms to the period's end) and answered as the count itself (its key expires at the
/// period's end).
pub(super) const SYNC_LUA: &str = include_str!("lua/sync.lua");

/// Async mode on one Redis server: [`SYNC_LUA`] for many clients in one call, so a round
/// costs one call per chunk of [`EXCHANGE_CHUNK`](super::exchange::EXCHANGE_CHUNK) clients instead of one per client.
/// KEYS: every client's TAT keys, client after client. ARGV: per client, its number of
/// bandwidths n, its units, then T (integer ns) per bandwidth. Answer: per client a status
/// (0, or 1 when one of its keys holds something else than a number: that client only) then
/// n values (µs ahead of now, or a calendar period's count as for [`SYNC_LUA`]; zeros after
/// a status 1). Not for Redis Cluster: the clients'
/// keys live in different slots there.
pub(super) const SYNC_MANY_LUA: &str = include_str!("lua/sync_many.lua");

/// Adaptive growth for the fleet: adds this gateway's admitted cost to the client's count of
/// the current window (on Redis time, ms) and, when the window before it is complete, takes a
/// step if its usage reached the threshold (the same rules as the engine's local growth).
/// KEYS: the client's growth hash. ARGV: cost, window (ms), threshold, the tightest emission
/// interval of the set in effect (ns), max steps, rise steps, `max_rise.within` (ms), 1 when
/// this gateway shed within the window; or ARGV `reset` alone (deletes it).
/// Returns `{steps, stepped}`: `stepped` is the step's usage × 10⁶ when this call took a step,
/// else −1.
pub(super) const GROWTH_LUA: &str = include_str!("lua/growth.lua");

/// Registers this gateway until now + ttl and counts the registered ones.
/// KEYS: the registry zset (`<prefix>:{gateways}`: its own hash tag). ARGV: gateway id, ttl ms.
pub(super) const HEARTBEAT_LUA: &str = include_str!("lua/heartbeat.lua");

/// Outbound rate held for the fleet: reserves the next slot of a GCRA bucket (`TAT ←
/// max(TAT, now) + T`, the same arithmetic as the local outbound limit) unless the wait for
/// it, `TAT − C − now`, would pass the limit; answers `{1, wait µs}` (reserved) or `{0, wait
/// µs}` (not reserved). KEYS: the TAT key. ARGV: T, C, the longest wait (integer ns).
#[cfg(feature = "outbound")]
pub(super) const RESERVE_LUA: &str = include_str!("lua/reserve.lua");

/// The shared cache's lookup and lease in one call: `{1, entry, pttl}` (a hit), `{2}` (the
/// key answers uncacheably now: call for yourself), `{3}` (this caller took the lease: it
/// fetches) or `{0, lease pttl}` (another holds the lease: wait for its notification).
/// KEYS: entry, lease, pass marker. ARGV: lease owner, lease ms.
#[cfg(feature = "outbound")]
pub(super) const CACHE_FETCH_LUA: &str = include_str!("lua/cache_fetch.lua");

/// The lease holder's outcome: `stored` writes the entry, `pass` the pass marker, `retry`
/// nothing; then the lease is released if still the caller's and the outcome published.
/// KEYS: entry, lease, pass marker. ARGV: owner, outcome, entry, ttl ms, channel.
#[cfg(feature = "outbound")]
pub(super) const CACHE_SETTLE_LUA: &str = include_str!("lua/cache_settle.lua");

/// Extends the shared cache's lease while its holder still fetches. KEYS: the lease.
/// ARGV: owner, lease ms.
#[cfg(feature = "outbound")]
pub(super) const CACHE_RENEW_LUA: &str = include_str!("lua/cache_renew.lua");
