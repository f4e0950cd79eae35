//! The keyed state store: one small entry per (scope, key), in bounded memory.
//!
//! A *scope* is a bandwidth id from the compiled policy (`plan:free/0`, `client:k/0`,
//! `rule:login`) or the fixed [`CLIENT_SCOPE`]; a *key* is a client key, an IP or a
//! header value. Each [`Entry`] holds a bucket's `TAT` as an `AtomicU64` updated by
//! compare-and-swap, the capacity `C` it was last computed with (so a reload can rescale it
//! lazily), and an in-flight counter.
//!
//! # Client entries
//! A client's per-client quota lives in one entry, (`CLIENT_SCOPE`, client key): its
//! concurrency counter plus up to [`SLOTS`] bandwidth buckets (*slots*), so the quota stage
//! of a decision is one hash and one lookup, not one per bandwidth plus one for the
//! counter. Each slot remembers which bandwidth id it holds (by the address of the id's
//! text, a pointer compare; ids are pinned by the store so an address is never reused) and,
//! like any bucket, the capacity it was computed with. After a reload the first request of
//! a key matches slots to the new generation's ids by text once (under the shard's write
//! lock), so usage carries over per bandwidth id and is rescaled lazily, exactly as with
//! separate entries; slots of ids the policy no longer has are freed by sweeps and prunes.
//! A quota's bandwidths beyond the first [`SLOTS`], and a bandwidth that finds every slot
//! in use by other live, non-full buckets (possible when `tag` rules move one client between
//! plans with many bandwidths), keep separate (bandwidth id, key) entries; a bandwidth
//! that already has such an entry keeps using it, so its state is never split. Rule limits
//! keep their own (rule bandwidth id, rule key) entries.
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
//! The debt of a client entry's slot is kept per (key, bandwidth id), so each bandwidth of
//! a returning client resumes from its own TAT.
//!
//! Memory: one entry is an `Arc` allocation of 192 bytes with keys up to 30 bytes
//! stored inline (longer keys add their own allocation), plus 8 bytes of table pointer and a
//! control byte at a load factor of at most 7/8: one entry per client for a plan of up to
//! four bandwidths with a concurrency limit (it used to take one entry per bandwidth plus
//! one for the counter, 112 bytes each). Measured by `tests/alloc.rs`, plus 8 bytes per
//! `max_keys` of evicted-debt table. `max_keys` bounds entries, so it now bounds clients
//! (plus rule-limit keys) rather than clients × (bandwidths + 1).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use ahash::RandomState;
use arc_swap::ArcSwap;
use hashbrown::HashTable;

use fairgate_policies::compiled::CompiledBandwidth;

use crate::clock::Nanos;
use crate::gcra::{self, Params, Verdict};

/// Every bandwidth id the store has seen, by the address of its text: (id, hash of the
/// text). Never shrinks, so a pinned address is never reused for another id. It grows with
/// the number of *distinct* ids, not with reloads: `PolicyStore` hands a reloaded policy the
/// previous generation's `Arc<str>` for every id text it keeps.
type Pinned = hashbrown::HashMap<usize, (Arc<str>, u64), RandomState>;

/// The table is full of entries that cannot be evicted (requests in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("state table is full")]
pub struct Full;

/// The scope of per-client entries: the concurrency counter plus the TATs of the client's
/// quota bandwidths in [`SLOTS`] slots (see the module docs). Not tied to a plan or a policy
/// generation: a reload keeps the live count and carries each slot over by bandwidth id.
pub const CLIENT_SCOPE: &str = "client";

/// Quota bandwidths kept inside a client's entry; a quota's bandwidths beyond these, and
/// bandwidths that find no free slot, live in their own (bandwidth id, key) entries.
pub const SLOTS: usize = 4;

/// Where each of the first [`SLOTS`] bandwidths of a quota lives in a client entry:
/// a slot index, or [`OVERFLOW`].
pub(crate) type SlotMap = [u8; SLOTS];

/// The bandwidth lives in its own (bandwidth id, key) entry.
pub(crate) const OVERFLOW: u8 = u8::MAX;

/// One tracked (scope, key).
#[derive(Debug)]
pub struct Entry {
    hash: u64,
    scope: Arc<str>,
    key: EntryKey,
    bucket: Bucket,
    in_flight: AtomicU64,
    slots: [Slot; SLOTS],
}

/// One GCRA bucket: its TAT, and the capacity the TAT was last computed with (so a reload
/// can rescale it lazily).
#[derive(Debug, Default)]
pub(crate) struct Bucket {
    tat: AtomicU64,
    cap: AtomicU64,
}

/// A bandwidth slot of a client entry. `addr` is the address of the bandwidth id's text
/// (`Arc<str>`) of the policy generation that last used the slot, 0 when free: a pointer
/// compare on the hot path. Every id ever used is pinned by the store ([`Store::pin_ids`]),
/// so an address is never reused for another id; after a reload the slot is matched by the
/// id's text once and adopts the new address. Addresses change only under the shard's
/// write lock.
#[derive(Debug, Default)]
struct Slot {
    addr: AtomicUsize,
    bucket: Bucket,
}

fn id_addr(id: &Arc<str>) -> usize {
    id.as_ptr() as usize
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

// === impl Bucket ===

impl Bucket {
    fn new(tat: Nanos, cap: Nanos) -> Self {
        Bucket {
            tat: AtomicU64::new(tat),
            cap: AtomicU64::new(cap),
        }
    }

    /// The current theoretical arrival time.
    pub(crate) fn tat(&self) -> Nanos {
        self.tat.load(Ordering::Acquire)
    }

    /// The capacity the TAT was last computed with.
    pub(crate) fn capacity(&self) -> Nanos {
        self.cap.load(Ordering::Acquire)
    }

    /// Resets the bucket (slot reuse; under the shard's write lock).
    fn reset(&self, tat: Nanos, cap: Nanos) {
        self.tat.store(tat, Ordering::Release);
        self.cap.store(cap, Ordering::Release);
    }

    /// Rescales to capacity `c` if the bucket was computed with another (lazy reload).
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
    pub(crate) fn consume(&self, now: Nanos, p: Params, cost: u64) -> Verdict {
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
    pub(crate) fn refund(&self, now: Nanos, amount_ns: Nanos) {
        self.update(|tat| Some(gcra::refund(tat, now, amount_ns)));
    }

    /// Charges post-hoc debt.
    pub(crate) fn charge_debt(&self, now: Nanos, p: Params, units: u64) {
        self.sync_capacity(now, p.c);
        self.update(|tat| Some(gcra::debt(tat, now, p, units)));
    }

    /// The TAT as seen with capacity `c` (rescaled if needed), without consuming.
    pub(crate) fn peek(&self, now: Nanos, c: Nanos) -> Nanos {
        self.sync_capacity(now, c);
        self.tat()
    }
}

// === impl Entry ===

impl Entry {
    /// The key.
    pub fn key(&self) -> &str {
        self.key.as_str()
    }

    /// The scope (bandwidth id or [`CLIENT_SCOPE`]).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The current theoretical arrival time (the entry's own bucket; see
    /// [`Entry::for_each_bucket`] for a client entry's slots).
    pub fn tat(&self) -> Nanos {
        self.bucket.tat()
    }

    /// The capacity the TAT was last computed with.
    pub fn capacity(&self) -> Nanos {
        self.bucket.capacity()
    }

    /// Requests in flight (client scope).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Calls `f(tat, capacity)` for every bucket in use: the entry's own, or the used slots
    /// of a client entry.
    pub fn for_each_bucket(&self, mut f: impl FnMut(Nanos, Nanos)) {
        if self.is_client() {
            for s in &self.slots {
                if s.addr.load(Ordering::Acquire) != 0 {
                    f(s.bucket.tat(), s.bucket.capacity());
                }
            }
        } else {
            f(self.tat(), self.capacity());
        }
    }

    fn new(hash: u64, scope: Arc<str>, key: &str, tat: Nanos, cap: Nanos) -> Self {
        Entry {
            hash,
            scope,
            key: EntryKey::new(key),
            bucket: Bucket::new(tat, cap),
            in_flight: AtomicU64::new(0),
            slots: Default::default(),
        }
    }

    fn is_client(&self) -> bool {
        *self.scope == *CLIENT_SCOPE
    }

    /// Slot `i` of a client entry (an index from a [`SlotMap`]).
    pub(crate) fn slot(&self, i: u8) -> &Bucket {
        &self.slots[usize::from(i) % SLOTS].bucket
    }

    /// GCRA check-and-consume of `cost` at `now` on the entry's own bucket.
    pub fn consume(&self, now: Nanos, p: Params, cost: u64) -> Verdict {
        self.bucket.consume(now, p, cost)
    }

    /// Returns `amount_ns` of consumption on the entry's own bucket (never below `now`).
    pub fn refund(&self, now: Nanos, amount_ns: Nanos) {
        self.bucket.refund(now, amount_ns);
    }

    /// Charges post-hoc debt on the entry's own bucket.
    pub fn charge_debt(&self, now: Nanos, p: Params, units: u64) {
        self.bucket.charge_debt(now, p, units);
    }

    /// The TAT of the entry's own bucket as seen with capacity `c` (rescaled if needed).
    pub fn peek(&self, now: Nanos, c: Nanos) -> Nanos {
        self.bucket.peek(now, c)
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

    /// The latest TAT over the entry's buckets.
    fn max_tat(&self) -> Nanos {
        let mut max = self.tat();
        for s in &self.slots {
            max = max.max(s.bucket.tat());
        }
        max
    }

    /// Nothing to remember: every bucket full and nothing in flight.
    fn is_idle(&self, now: Nanos) -> bool {
        self.in_flight() == 0 && self.max_tat() <= now
    }

    /// The slots of `ids` found by address alone (the hot path), or `None`.
    fn map_fast(&self, ids: &[CompiledBandwidth]) -> Option<SlotMap> {
        let mut map = [OVERFLOW; SLOTS];
        for (m, bw) in map.iter_mut().zip(ids) {
            let addr = id_addr(&bw.id);
            *m = self
                .slots
                .iter()
                .position(|s| s.addr.load(Ordering::Relaxed) == addr)? as u8;
        }
        Some(map)
    }

    /// The slot holding bandwidth `id`, by address or else by text; read-only.
    fn find_slot(&self, id: &Arc<str>, pinned: &Pinned) -> Option<&Bucket> {
        let addr = id_addr(id);
        let by_addr = self
            .slots
            .iter()
            .find(|s| s.addr.load(Ordering::Relaxed) == addr);
        by_addr
            .or_else(|| {
                self.slots.iter().find(|s| {
                    let a = s.addr.load(Ordering::Relaxed);
                    a != 0 && pinned.get(&a).is_some_and(|(t, _)| **t == **id)
                })
            })
            .map(|s| &s.bucket)
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
        !self.known || scope == CLIENT_SCOPE || self.scopes.contains(scope)
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
    pinned: RwLock<Pinned>,
    client_scope: Arc<str>,
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
            pinned: RwLock::new(Pinned::with_hasher(RandomState::new())),
            client_scope: Arc::from(CLIENT_SCOPE),
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

    /// Pins bandwidth ids so that client entries can hold them in slots (call it for every
    /// policy generation, before its bandwidths reach the store).
    pub fn pin_ids<'a>(&self, ids: impl IntoIterator<Item = &'a Arc<str>>) {
        let mut pinned = self.pinned.write().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            pinned
                .entry(id_addr(id))
                .or_insert_with(|| (Arc::clone(id), self.hasher.hash_one(&**id)));
        }
    }

    fn pinned(&self) -> std::sync::RwLockReadGuard<'_, Pinned> {
        self.pinned.read().unwrap_or_else(|e| e.into_inner())
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

    /// The evicted-debt slot of bandwidth `id_hash` in the client entry of `hash`.
    fn client_debt_slot(&self, hash: u64, id_hash: u64) -> &AtomicU64 {
        self.debt_slot(hash ^ id_hash.rotate_left(17))
    }

    /// Remembers the debt of an entry being evicted.
    fn remember_debt(&self, e: &Entry, pinned: &Pinned) {
        if e.is_client() {
            for s in &e.slots {
                let addr = s.addr.load(Ordering::Relaxed);
                if let Some((_, id_hash)) = pinned.get(&addr) {
                    self.client_debt_slot(e.hash, *id_hash)
                        .fetch_max(s.bucket.tat(), Ordering::Relaxed);
                }
            }
        } else {
            self.debt_slot(e.hash).fetch_max(e.tat(), Ordering::Relaxed);
        }
    }

    /// Frees the slots of ids the policy no longer has (under the shard's write lock).
    fn clear_dead_slots(e: &Entry, live: &LiveScopes, pinned: &Pinned) {
        if !e.is_client() || !live.known {
            return;
        }
        for s in &e.slots {
            let addr = s.addr.load(Ordering::Relaxed);
            if addr == 0 {
                continue;
            }
            let dead = pinned.get(&addr).is_none_or(|(id, _)| !live.contains(id));
            if dead {
                s.addr.store(0, Ordering::Release);
                s.bucket.reset(0, 0);
            }
        }
    }

    /// True when a sweep or prune may drop the entry.
    fn droppable(e: &Entry, now: Nanos, live: &LiveScopes, pinned: &Pinned) -> bool {
        Self::clear_dead_slots(e, live, pinned);
        e.in_flight() == 0 && (e.max_tat() <= now || !live.contains(&e.scope))
    }

    /// Runs `f` on the client entry of `key` (its concurrency counter and the slots of
    /// `bandwidths`, see [`SlotMap`]), inserting the entry or claiming slots first if
    /// needed. The hot path is one hash, one shared lock and one pointer compare per
    /// bandwidth. `f` runs while the shard is locked.
    pub(crate) fn with_client<R>(
        &self,
        key: &str,
        now: Nanos,
        bandwidths: &[CompiledBandwidth],
        f: impl FnOnce(&Arc<Entry>, &SlotMap) -> R,
    ) -> Result<R, Full> {
        let scope = &self.client_scope;
        let hash = self.hash(scope, key);
        let shard = self.shard(hash);
        let eq = |e: &Arc<Entry>| e.hash == hash && e.key.is(key) && *e.scope == **scope;
        let mine = &bandwidths[..bandwidths.len().min(SLOTS)];
        {
            let table = shard.table.read().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = table.find(hash, eq) {
                if let Some(map) = e.map_fast(mine) {
                    return Ok(f(e, &map));
                }
            }
        }
        // Slow path: a new key, a new policy generation, or a bandwidth without a slot.
        // Bandwidths that already live in their own entries stay there (checked before
        // taking the write lock: never two shard locks at once).
        let mut own = [false; SLOTS];
        for (o, bw) in own.iter_mut().zip(mine) {
            *o = self.with_existing(&bw.id, key, |_| ()).is_some();
        }
        let mut table = shard.table.write().unwrap_or_else(|e| e.into_inner());
        let found = table.find(hash, eq).map(Arc::clone);
        let entry = match found {
            Some(e) => e,
            None => {
                let cap = self.per_shard.load(Ordering::Relaxed);
                if table.len() >= cap {
                    self.sweep(&mut table, now, cap);
                    if table.len() >= cap {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                        return Err(Full);
                    }
                }
                let e = Arc::new(Entry::new(hash, Arc::clone(scope), key, 0, 0));
                table.insert_unique(hash, Arc::clone(&e), |e| e.hash);
                self.len.fetch_add(1, Ordering::Relaxed);
                e
            }
        };
        let map = self.claim_slots(&entry, mine, &own, now);
        Ok(f(&entry, &map))
    }

    /// Finds or claims a slot for each of `bandwidths` (under the shard's write lock).
    fn claim_slots(
        &self,
        e: &Entry,
        bandwidths: &[CompiledBandwidth],
        own: &[bool; SLOTS],
        now: Nanos,
    ) -> SlotMap {
        let pinned = self.pinned();
        let live = self.live.load();
        let mut map = [OVERFLOW; SLOTS];
        let wanted = |addr: usize| bandwidths.iter().any(|b| id_addr(&b.id) == addr);
        let text = |addr: usize| pinned.get(&addr).map(|(t, _)| &**t);
        for (i, bw) in bandwidths.iter().enumerate() {
            let addr = id_addr(&bw.id);
            let slots = &e.slots;
            let at = |a: usize| {
                slots
                    .iter()
                    .position(|s| s.addr.load(Ordering::Relaxed) == a)
            };
            if let Some(s) = at(addr) {
                map[i] = s as u8;
                continue;
            }
            // The same id from an older generation: adopt the new address (the capacity is
            // rescaled lazily on use).
            let same = slots.iter().position(|s| {
                let a = s.addr.load(Ordering::Relaxed);
                a != 0 && !wanted(a) && text(a) == Some(&*bw.id)
            });
            if let Some(s) = same {
                slots[s].addr.store(addr, Ordering::Release);
                map[i] = s as u8;
                continue;
            }
            if own[i] {
                continue;
            }
            // A free slot, or one whose bucket carries no information (full, or its id
            // is gone from the policy) and that this quota does not use.
            let free = slots.iter().position(|s| {
                let a = s.addr.load(Ordering::Relaxed);
                a == 0
                    || (!wanted(a)
                        && (s.bucket.tat() <= now || text(a).is_none_or(|t| !live.contains(t))))
            });
            let Some(s) = free else { continue };
            let Some((_, id_hash)) = pinned.get(&addr) else {
                continue;
            };
            let owed = self
                .client_debt_slot(e.hash, *id_hash)
                .load(Ordering::Relaxed);
            let tat = if owed > now {
                owed.min(now.saturating_add(bw.c_ns))
            } else {
                0
            };
            slots[s].bucket.reset(tat, bw.c_ns);
            slots[s].addr.store(addr, Ordering::Release);
            map[i] = s as u8;
        }
        map
    }

    /// Runs `f` on the bucket of bandwidth `id` in the existing client entry of `key`, if
    /// it has one (read-only: matches an older generation's slot by text). Never inserts.
    pub(crate) fn with_client_slot<R>(
        &self,
        key: &str,
        id: &Arc<str>,
        f: impl FnOnce(&Bucket) -> R,
    ) -> Option<R> {
        let pinned = self.pinned();
        self.with_existing(CLIENT_SCOPE, key, |e| e.find_slot(id, &pinned).map(f))
            .flatten()
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
        let entry = Arc::new(Entry::new(hash, Arc::clone(scope), key, tat, c));
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
        let pinned = self.pinned();
        table.retain(|e| !Self::droppable(e, now, &live, &pinned));
        let target = cap - (cap / 8).max(1);
        if table.len() > target {
            let excess = table.len() - target;
            let mut tats: Vec<Nanos> = table
                .iter()
                .filter(|e| e.in_flight() == 0)
                .map(|e| e.max_tat())
                .collect();
            if !tats.is_empty() {
                let k = excess.min(tats.len()) - 1;
                let (_, &mut threshold, _) = tats.select_nth_unstable(k);
                let mut budget = excess;
                table.retain(|e| {
                    if budget == 0 || e.in_flight() != 0 || e.max_tat() > threshold {
                        return true;
                    }
                    budget -= 1;
                    self.remember_debt(e, &pinned);
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
        let pinned = self.pinned();
        let mut removed = 0u64;
        for shard in self.shards.iter() {
            let mut table = shard.table.write().unwrap_or_else(|e| e.into_inner());
            let before = table.len();
            table.retain(|e| !Self::droppable(e, now, &live, &pinned));
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
        let sc: Arc<str> = Arc::from(CLIENT_SCOPE);
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
            .with_existing(CLIENT_SCOPE, "a", |e| e.release())
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

    fn bandwidth(id: &str, per_sec: u64, burst: u64) -> CompiledBandwidth {
        let rate = fairgate_policies::units::Rate::new(per_sec, std::time::Duration::from_secs(1))
            .unwrap();
        CompiledBandwidth::new(Arc::from(id), Arc::from(id), rate, burst).unwrap()
    }

    fn consume_client(store: &Store, key: &str, now: Nanos, bws: &[CompiledBandwidth]) -> bool {
        store
            .with_client(key, now, bws, |e, map| {
                bws.iter().zip(map).all(|(bw, &s)| {
                    s != OVERFLOW
                        && matches!(
                            e.slot(s).consume(
                                now,
                                Params {
                                    t: bw.t_ns,
                                    c: bw.c_ns
                                },
                                1
                            ),
                            Verdict::Admit { .. }
                        )
                })
            })
            .unwrap()
    }

    #[test]
    fn entries_stay_small() {
        // The figure in the module docs.
        assert_eq!(std::mem::size_of::<Entry>(), ENTRY_BYTES - 16);
    }

    /// An `Arc<Entry>` allocation: the entry plus the two reference counts.
    const ENTRY_BYTES: usize = 192;

    #[test]
    fn client_slots_carry_over_a_new_generation_by_id_and_free_dead_ids() {
        let store = Store::new(100);
        let now = 10 * S;
        let gen1 = [bandwidth("plan:p/0", 1, 2), bandwidth("plan:p/1", 1, 5)];
        store.pin_ids(gen1.iter().map(|b| &b.id));
        assert!(consume_client(&store, "k", now, &gen1));
        assert!(consume_client(&store, "k", now, &gen1));
        assert!(!consume_client(&store, "k", now, &gen1), "burst 2 used up");
        assert_eq!(store.len(), 1, "one entry for the client");
        // A new generation: same ids, new `Arc`s, listed in another order.
        let gen2 = [bandwidth("plan:p/1", 1, 5), bandwidth("plan:p/0", 1, 2)];
        store.pin_ids(gen2.iter().map(|b| &b.id));
        let tat = |id: &Arc<str>| store.with_client_slot("k", id, |b| b.tat()).unwrap();
        assert_eq!(
            tat(&gen2[1].id),
            now + 2 * S,
            "found by text before any use"
        );
        assert!(
            !consume_client(&store, "k", now, &gen2),
            "usage carried over"
        );
        // Dropping `plan:p/1` from the policy frees its slot on prune.
        store.set_live_scopes(LiveScopes::new([Arc::clone(&gen2[1].id)]));
        store.prune(now);
        assert!(store.with_client_slot("k", &gen2[0].id, |_| ()).is_none());
        assert!(store.with_client_slot("k", &gen2[1].id, |_| ()).is_some());
    }

    #[test]
    fn evicted_client_entries_keep_each_bandwidths_debt() {
        let store = Store::new(8);
        let bws = [bandwidth("plan:p/0", 1, 1), bandwidth("plan:p/1", 1, 100)];
        store.pin_ids(bws.iter().map(|b| &b.id));
        let mut now = 100 * S;
        assert!(consume_client(&store, "heavy", now, &bws));
        for i in 0..1000u64 {
            now += 1;
            let _ = consume_client(&store, &format!("flood-{i}"), now, &bws);
            assert!(store.len() <= 8);
            assert!(!consume_client(&store, "heavy", now, &bws), "at {i}");
        }
        assert!(store.evictions() > 0);
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
