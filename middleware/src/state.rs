//! The keyed state store: one small entry per (scope, key), in bounded memory.
//!
//! A *scope* is a bandwidth id from the compiled policy (`plan:free/0`, `client:k/0`,
//! `rule:login`) or the fixed [`CONCURRENCY_SCOPE`]; a *key* is a client key, an IP or a
//! header value. Each [`Entry`] holds the bucket's `TAT` as an `AtomicU64` updated by
//! compare-and-swap, the capacity `C` it was last computed with (so a reload can rescale it
//! lazily), and an in-flight counter (used by the concurrency scope).
//!
//! # Layout
//! `N` shards (a power of two, up to 64), each a `hashbrown::HashTable<Arc<Entry>>` behind a
//! `std::sync::RwLock`. The key is hashed once with a randomly seeded `ahash::RandomState`
//! (keys are client-controlled); some middle bits pick the shard and the table reuses the
//! same hash. A repeat key costs one shared (read) lock and one CAS, and allocates nothing;
//! only a new key takes the write lock and allocates its entry (lookup by borrowed
//! `&str` first, as governor's keyed dashmap state does). Departure from STYLE's "no locks":
//! readers of a shard do not block each other, writers are rare, and the lock keeps a sweep
//! from racing a concurrent increment of an entry it is about to drop.
//!
//! # Bounded memory and eviction
//! Each shard holds at most `ceil(max_keys / N)` entries rounded down so the total never
//! exceeds `max_keys` (see [`Store::set_max_keys`]). Inserting into a full shard first
//! *sweeps* it: entries whose bucket is full (`TAT ≤ now`) and that have nothing in flight
//! carry no information and are dropped, as are entries of scopes the current policy no
//! longer has. If that frees less than 1/8 of the shard, the entries *closest to full*
//! (lowest `TAT`, nothing in flight) are evicted until 1/8 is free, so the sweep's cost is
//! amortised over many inserts.
//!
//! An entry evicted while not full must not come back fresh: its `TAT` goes into a fixed
//! *evicted-debt table* (`max_keys` rounded up to a power of two of `AtomicU64`, indexed by
//! the key's hash, keeping the maximum). A new entry starts from that slot's TAT when it
//! is still in the future, clamped to `now + C` so that a hash collision can at worst cost
//! an innocent new key one empty bucket. So a heavy hitter pushed out by a flood of new keys
//! returns with its bucket as empty as it left it.
//!
//! When a shard is full of entries with requests in flight (nothing can be evicted), the
//! new key is refused ([`Full`]) and the engine rejects the request: a full table never means
//! "admit untracked".
//!
//! Memory: one entry is an `Arc` allocation of 112 bytes with keys up to 30 bytes stored
//! inline (longer keys add their own allocation), plus 8 bytes of table pointer and a control
//! byte at a load factor of at most 7/8. Measured by `tests/alloc.rs`: about 120–130 bytes
//! of heap per entry, plus 8 bytes per `max_keys` of evicted-debt table; 100,000 keys
//! ≈ 13 MiB.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use ahash::RandomState;
use arc_swap::ArcSwap;
use hashbrown::HashTable;

use crate::clock::Nanos;
use crate::gcra::{self, Params, Verdict};

/// The scope of per-client concurrency counters. Not tied to a plan or a policy
/// generation: a reload keeps the live count.
pub const CONCURRENCY_SCOPE: &str = "concurrency";

/// The table is full of entries that cannot be evicted (requests in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("state table is full")]
pub struct Full;

/// One tracked (scope, key).
#[derive(Debug)]
pub struct Entry {
    hash: u64,
    scope: Arc<str>,
    key: EntryKey,
    tat: AtomicU64,
    cap: AtomicU64,
    in_flight: AtomicU64,
}

/// Bytes of a key stored inside the entry itself (no second allocation, no second cache
/// miss on lookup): IPv4 keys, IPv6 /64 keys and typical API keys fit.
const INLINE_ENTRY_KEY: usize = 30;

/// An entry's key: inline when short, boxed otherwise.
#[derive(Debug)]
enum EntryKey {
    Inline {
        len: u8,
        buf: [u8; INLINE_ENTRY_KEY],
    },
    Boxed(Box<str>),
}

impl EntryKey {
    fn new(key: &str) -> Self {
        if key.len() <= INLINE_ENTRY_KEY {
            let mut buf = [0u8; INLINE_ENTRY_KEY];
            buf[..key.len()].copy_from_slice(key.as_bytes());
            EntryKey::Inline {
                len: key.len() as u8,
                buf,
            }
        } else {
            EntryKey::Boxed(key.into())
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            EntryKey::Inline { len, buf } => &buf[..*len as usize],
            EntryKey::Boxed(b) => b.as_bytes(),
        }
    }

    fn is(&self, key: &str) -> bool {
        self.bytes() == key.as_bytes()
    }

    fn as_str(&self) -> &str {
        // Only ever built from a `&str`.
        std::str::from_utf8(self.bytes()).unwrap_or("")
    }
}

// === impl Entry ===

impl Entry {
    /// The key.
    pub fn key(&self) -> &str {
        self.key.as_str()
    }

    /// The scope (bandwidth id or [`CONCURRENCY_SCOPE`]).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The current theoretical arrival time.
    pub fn tat(&self) -> Nanos {
        self.tat.load(Ordering::Acquire)
    }

    /// The capacity the TAT was last computed with.
    pub fn capacity(&self) -> Nanos {
        self.cap.load(Ordering::Acquire)
    }

    /// Requests in flight (concurrency scope).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Rescales to capacity `c` if the entry was computed with another (lazy reload).
    fn sync_capacity(&self, now: Nanos, c: Nanos) {
        let old = self.cap.load(Ordering::Acquire);
        if old == c {
            return;
        }
        // Only the thread that moves `cap` rescales, so a bucket is rescaled once per change.
        if self
            .cap
            .compare_exchange(old, c, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.update(|tat| Some(gcra::rescale(tat, now, old, c)));
        }
    }

    /// Applies `f` to the TAT in a CAS loop; `None` leaves it unchanged.
    fn update(&self, mut f: impl FnMut(Nanos) -> Option<Nanos>) -> Option<Nanos> {
        let mut cur = self.tat.load(Ordering::Acquire);
        loop {
            let next = f(cur)?;
            match self
                .tat
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(next),
                Err(actual) => cur = actual,
            }
        }
    }

    /// GCRA check-and-consume of `cost` at `now`.
    pub fn consume(&self, now: Nanos, p: Params, cost: u64) -> Verdict {
        self.sync_capacity(now, p.c);
        let mut verdict = Verdict::Reject { wait: 1 };
        self.update(|tat| {
            verdict = gcra::check(tat, now, p, cost);
            match verdict {
                Verdict::Admit { tat } => Some(tat),
                Verdict::Reject { .. } => None,
            }
        });
        verdict
    }

    /// Returns `amount_ns` of consumption (never below `now`).
    pub fn refund(&self, now: Nanos, amount_ns: Nanos) {
        self.update(|tat| Some(gcra::refund(tat, now, amount_ns)));
    }

    /// Charges post-hoc debt.
    pub fn charge_debt(&self, now: Nanos, p: Params, units: u64) {
        self.sync_capacity(now, p.c);
        self.update(|tat| Some(gcra::debt(tat, now, p, units)));
    }

    /// The TAT as seen with capacity `c` (rescaled if needed), without consuming.
    pub fn peek(&self, now: Nanos, c: Nanos) -> Nanos {
        self.sync_capacity(now, c);
        self.tat()
    }

    /// Takes a concurrency permit if fewer than `limit` are in flight.
    pub fn try_acquire(&self, limit: u64) -> bool {
        let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if prev >= limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Returns a permit taken by [`Entry::try_acquire`].
    pub fn release(&self) {
        // Saturating: a release without an acquire is a bug, but must not wrap to u64::MAX.
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Nothing to remember: bucket full and nothing in flight.
    fn is_idle(&self, now: Nanos) -> bool {
        self.in_flight() == 0 && self.tat() <= now
    }
}

/// Which scopes the current policy still has; entries of other scopes are dropped by
/// sweeps.
#[derive(Debug, Default)]
pub struct LiveScopes {
    scopes: hashbrown::HashSet<Arc<str>, RandomState>,
    /// `false` before the engine has seen a policy: then every scope is live.
    known: bool,
}

impl LiveScopes {
    /// The scopes of one policy generation.
    pub fn new(scopes: impl IntoIterator<Item = Arc<str>>) -> Self {
        let mut set = hashbrown::HashSet::with_hasher(RandomState::new());
        set.extend(scopes);
        LiveScopes {
            scopes: set,
            known: true,
        }
    }

    fn contains(&self, scope: &str) -> bool {
        !self.known || scope == CONCURRENCY_SCOPE || self.scopes.contains(scope)
    }
}

#[repr(align(64))]
#[derive(Debug, Default)]
struct Shard {
    table: RwLock<HashTable<Arc<Entry>>>,
}

/// The sharded, bounded keyed store. See the module docs.
#[derive(Debug)]
pub struct Store {
    shards: Box<[Shard]>,
    shard_mask: u64,
    hasher: RandomState,
    per_shard: AtomicUsize,
    len: AtomicU64,
    evicted: Box<[AtomicU64]>,
    live: ArcSwap<LiveScopes>,
    evictions: AtomicU64,
    refused: AtomicU64,
}

const MAX_SHARDS: usize = 64;
/// Shards are only split while each still holds at least this many keys.
const MIN_PER_SHARD: u64 = 256;

impl Store {
    /// A store for at most `max_keys` entries (at least 1).
    pub fn new(max_keys: u64) -> Self {
        let max_keys = max_keys.max(1);
        let mut n = 1usize;
        while n < MAX_SHARDS && (n as u64 * 2) * MIN_PER_SHARD <= max_keys {
            n *= 2;
        }
        let debt_slots = usize::try_from(max_keys)
            .unwrap_or(usize::MAX)
            .clamp(1024, 1 << 24)
            .next_power_of_two();
        let store = Store {
            shards: (0..n).map(|_| Shard::default()).collect(),
            shard_mask: n as u64 - 1,
            hasher: RandomState::new(),
            per_shard: AtomicUsize::new(1),
            len: AtomicU64::new(0),
            evicted: (0..debt_slots).map(|_| AtomicU64::new(0)).collect(),
            live: ArcSwap::from_pointee(LiveScopes::default()),
            evictions: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        };
        store.set_max_keys(max_keys);
        store
    }

    /// Changes the bound (e.g. after a reload). Shrinking takes effect as shards sweep.
    pub fn set_max_keys(&self, max_keys: u64) {
        let per = (max_keys.max(1) / self.shards.len() as u64).max(1);
        self.per_shard.store(
            usize::try_from(per).unwrap_or(usize::MAX),
            Ordering::Relaxed,
        );
    }

    /// The current bound on tracked keys (≤ the configured `max_keys`).
    pub fn max_keys(&self) -> u64 {
        self.per_shard.load(Ordering::Relaxed) as u64 * self.shards.len() as u64
    }

    /// Publishes the scopes of the current policy.
    pub fn set_live_scopes(&self, live: LiveScopes) {
        self.live.store(Arc::new(live));
    }

    /// Entries tracked now.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    /// True when nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries evicted while not full (their TAT went to the evicted-debt table).
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// New keys refused because a shard was full of in-flight entries.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn hash(&self, scope: &str, key: &str) -> u64 {
        self.hasher.hash_one((scope, key))
    }

    fn shard(&self, hash: u64) -> &Shard {
        // Middle bits: hashbrown uses the low bits for the position and the top 7 bits as
        // the control byte, so taking either for the shard would weaken the table's hash.
        &self.shards[((hash >> 32) & self.shard_mask) as usize]
    }

    fn debt_slot(&self, hash: u64) -> &AtomicU64 {
        &self.evicted[(hash as usize) & (self.evicted.len() - 1)]
    }

    /// Runs `f` on the existing entry, if any. Never inserts.
    pub fn with_existing<R>(
        &self,
        scope: &str,
        key: &str,
        f: impl FnOnce(&Arc<Entry>) -> R,
    ) -> Option<R> {
        let hash = self.hash(scope, key);
        let table = self
            .shard(hash)
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner());
        table
            .find(hash, |e| {
                e.hash == hash && e.key.is(key) && *e.scope == *scope
            })
            .map(f)
    }

    /// Runs `f` on the entry for (scope, key), inserting it first if missing. `c` is the
    /// capacity a new entry starts with (and the clamp for its evicted debt). `f` runs
    /// while the shard is locked, so a sweep cannot drop the entry under it.
    pub fn with_entry<R>(
        &self,
        scope: &Arc<str>,
        key: &str,
        now: Nanos,
        c: Nanos,
        f: impl FnOnce(&Arc<Entry>) -> R,
    ) -> Result<R, Full> {
        let hash = self.hash(scope, key);
        let shard = self.shard(hash);
        let eq = |e: &Arc<Entry>| e.hash == hash && e.key.is(key) && *e.scope == **scope;
        {
            let table = shard.table.read().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = table.find(hash, eq) {
                return Ok(f(e));
            }
        }
        let mut table = shard.table.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = table.find(hash, eq) {
            return Ok(f(e));
        }
        let cap = self.per_shard.load(Ordering::Relaxed);
        if table.len() >= cap {
            self.sweep(&mut table, now, cap);
            if table.len() >= cap {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(Full);
            }
        }
        let owed = self.debt_slot(hash).load(Ordering::Relaxed);
        let tat = if owed > now {
            owed.min(now.saturating_add(c))
        } else {
            0
        };
        let entry = Arc::new(Entry {
            hash,
            scope: Arc::clone(scope),
            key: EntryKey::new(key),
            tat: AtomicU64::new(tat),
            cap: AtomicU64::new(c),
            in_flight: AtomicU64::new(0),
        });
        let r = f(&entry);
        table.insert_unique(hash, entry, |e| e.hash);
        self.len.fetch_add(1, Ordering::Relaxed);
        Ok(r)
    }

    /// Frees room in a full shard: drops idle and dead entries, then evicts the entries
    /// closest to full until 1/8 of the shard is free.
    fn sweep(&self, table: &mut HashTable<Arc<Entry>>, now: Nanos, cap: usize) {
        let before = table.len();
        let live = self.live.load();
        table.retain(|e| !(e.in_flight() == 0 && (e.tat() <= now || !live.contains(&e.scope))));
        let target = cap - (cap / 8).max(1);
        if table.len() > target {
            let excess = table.len() - target;
            let mut tats: Vec<Nanos> = table
                .iter()
                .filter(|e| e.in_flight() == 0)
                .map(|e| e.tat())
                .collect();
            if !tats.is_empty() {
                let k = excess.min(tats.len()) - 1;
                let (_, &mut threshold, _) = tats.select_nth_unstable(k);
                let mut budget = excess;
                table.retain(|e| {
                    if budget == 0 || e.in_flight() != 0 || e.tat() > threshold {
                        return true;
                    }
                    budget -= 1;
                    self.debt_slot(e.hash).fetch_max(e.tat(), Ordering::Relaxed);
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    false
                });
            }
        }
        let removed = before - table.len();
        self.len.fetch_sub(removed as u64, Ordering::Relaxed);
    }

    /// Drops every entry that carries no information (full bucket, nothing in flight) or
    /// belongs to a scope the policy no longer has. Bounded by the number of entries; run it
    /// from a background task or after a reload. Returns how many were dropped.
    pub fn prune(&self, now: Nanos) -> u64 {
        let live = self.live.load();
        let mut removed = 0u64;
        for shard in self.shards.iter() {
            let mut table = shard.table.write().unwrap_or_else(|e| e.into_inner());
            let before = table.len();
            table.retain(|e| !(e.in_flight() == 0 && (e.tat() <= now || !live.contains(&e.scope))));
            removed += (before - table.len()) as u64;
        }
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Visits every entry (shard by shard, each under its read lock).
    pub fn for_each(&self, mut f: impl FnMut(&Entry)) {
        for shard in self.shards.iter() {
            let table = shard.table.read().unwrap_or_else(|e| e.into_inner());
            for e in table.iter() {
                f(e);
            }
        }
    }

    /// True while the store remembers nothing about (scope, key) or it is idle.
    pub fn is_idle(&self, scope: &str, key: &str, now: Nanos) -> bool {
        self.with_existing(scope, key, |e| e.is_idle(now))
            .unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn scope(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn repeat_keys_share_one_entry() {
        let store = Store::new(100);
        let sc = scope("plan:free/0");
        let p = Params::new(1, S, 2).unwrap();
        let now = 10 * S;
        for _ in 0..2 {
            let v = store
                .with_entry(&sc, "k", now, p.c, |e| e.consume(now, p, 1))
                .unwrap();
            assert!(matches!(v, Verdict::Admit { .. }));
        }
        let v = store
            .with_entry(&sc, "k", now, p.c, |e| e.consume(now, p, 1))
            .unwrap();
        assert!(matches!(v, Verdict::Reject { .. }));
        assert_eq!(store.len(), 1);
        // Another scope with the same key is another bucket.
        let v = store
            .with_entry(&scope("plan:free/1"), "k", now, p.c, |e| {
                e.consume(now, p, 1)
            })
            .unwrap();
        assert!(matches!(v, Verdict::Admit { .. }));
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn full_entries_are_swept_first_and_evicted_entries_keep_their_debt() {
        let store = Store::new(8);
        assert_eq!(store.max_keys(), 8);
        let sc = scope("s");
        let p = Params::new(1, S, 1).unwrap();
        let mut now = 100 * S;
        // A heavy hitter empties its bucket.
        let heavy = |now| {
            store
                .with_entry(&sc, "heavy", now, p.c, |e| e.consume(now, p, 1))
                .unwrap()
        };
        assert!(matches!(heavy(now), Verdict::Admit { .. }));
        // A flood of new keys, each consuming: the table never grows past 8.
        for i in 0..10_000u64 {
            now += 1;
            let _ = store.with_entry(&sc, &format!("flood-{i}"), now, p.c, |e| {
                e.consume(now, p, 1)
            });
            assert!(store.len() <= 8);
            // The heavy hitter stays limited whether or not it is still tracked.
            assert!(matches!(heavy(now), Verdict::Reject { .. }), "at {i}");
        }
        assert!(store.evictions() > 0);
    }

    #[test]
    fn in_flight_entries_are_never_evicted_and_a_full_table_refuses() {
        let store = Store::new(2);
        let sc: Arc<str> = Arc::from(CONCURRENCY_SCOPE);
        let now = S;
        for k in ["a", "b"] {
            assert!(store
                .with_entry(&sc, k, now, 0, |e| e.try_acquire(1))
                .unwrap());
        }
        assert_eq!(
            store.with_entry(&sc, "c", now, 0, |e| e.try_acquire(1)),
            Err(Full)
        );
        assert_eq!(store.refused(), 1);
        store
            .with_existing(CONCURRENCY_SCOPE, "a", |e| e.release())
            .unwrap();
        assert!(store
            .with_entry(&sc, "c", now, 0, |e| e.try_acquire(1))
            .unwrap());
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn prune_drops_idle_and_dead_scopes() {
        let store = Store::new(100);
        let p = Params::new(1, S, 5).unwrap();
        let now = 10 * S;
        let live = scope("live");
        let dead = scope("dead");
        store
            .with_entry(&live, "k", now, p.c, |e| e.consume(now, p, 1))
            .unwrap();
        store
            .with_entry(&dead, "k", now, p.c, |e| e.consume(now, p, 1))
            .unwrap();
        store.set_live_scopes(LiveScopes::new([Arc::clone(&live)]));
        assert_eq!(store.prune(now), 1);
        assert_eq!(store.len(), 1);
        assert_eq!(
            store.prune(now + 10 * S),
            1,
            "full again: nothing to remember"
        );
        assert!(store.is_empty());
    }

    #[test]
    fn capacity_change_rescales_once() {
        let store = Store::new(10);
        let sc = scope("s");
        let p = Params::new(1, S, 10).unwrap();
        let now = 100 * S;
        store
            .with_entry(&sc, "k", now, p.c, |e| e.consume(now, p, 5))
            .unwrap();
        let p2 = Params::new(1, S, 20).unwrap();
        let tat = store
            .with_existing("s", "k", |e| e.peek(now, p2.c))
            .unwrap();
        assert_eq!(tat, now + 10 * S, "half used stays half used");
        let tat = store
            .with_existing("s", "k", |e| e.peek(now, p2.c))
            .unwrap();
        assert_eq!(tat, now + 10 * S);
    }
}
