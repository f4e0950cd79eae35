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
//! keep their own (rule bandwidth id, rule key) entries. [`SLOTS`] is 2, the usual plan
//! (a rate and a daily quota): it is what keeps an entry within 128 bytes (see *Memory*).
//!
//! # Layout
//! `N` shards (a power of two, up to 64), each a `hashbrown::HashTable<Arc<Entry>>` behind a
//! `std::sync::RwLock`. The key is hashed once with a randomly seeded `ahash::RandomState`
//! (keys are client-controlled); some middle bits pick the shard and the table reuses the
//! same hash. The hash is not stored in the entry: a table that grows, and an eviction that
//! records debt, hash the entry's (scope, key) again (under the shard's write lock). An
//! entry names its scope by a `u32` index into the store's append-only scope table (index 0
//! is [`CLIENT_SCOPE`], so a client lookup compares one integer); the table is read without
//! a lock. A repeat key costs one shared (read) lock and one CAS, and allocates nothing;
//! only a new key takes the write lock and allocates its entry (lookup by borrowed
//! `&str` first, as governor's keyed dashmap state does). Departure from STYLE's "no locks":
//! readers of a shard do not block each other, writers are rare, and the lock keeps a sweep
//! from racing a concurrent increment of an entry it is about to drop.
//!
//! # Bounded memory and eviction
//! Each shard holds at most `ceil(max_keys / N)` entries rounded down so the total never
//! exceeds `max_keys` (see [`Store::set_max_keys`]). Inserting into a full shard first
//! *sweeps* it: entries whose bucket is full (`TAT ≤ now`), that have nothing in flight and
//! that no request found since the shard's last sweep carry no information and are
//! dropped, as are entries of scopes the current policy no longer has (a full entry still
//! in use is kept: dropping it would send its client's next request through the
//! evicted-debt table below, where a `MIXED` slot could start it empty). If that frees
//! less than 1/8 of the shard, entries are evicted until 1/8 is free, so the sweep's cost
//! is amortised over many inserts. The eviction order is a
//! second-chance (CLOCK) order: every entry has a `touched` bit, set (relaxed, and only
//! when clear, so a hot entry's cache line is not dirtied per request) when a request finds
//! the entry and cleared for every survivor by each sweep; a new entry starts untouched.
//! (A second bit does the same for [`Store::prune`], which drops an idle entry only once a
//! whole prune period passed without requests, and leaves the sweeps' bit alone.)
//! Entries *not touched* since the last sweep go first, closest to full (lowest `TAT`)
//! among them; only then touched ones, closest to full first. Entries with requests in
//! flight are never evicted. So a flood of one-shot keys (spoofed `X-Forwarded-For`, each
//! seen once) evicts its own kind, not the clients that keep coming back, even when those
//! are closer to full than the flood's keys. The bits cost no memory: they are the top two
//! bits of the 32-bit in-flight counter's word (the count keeps 30 bits).
//!
//! An entry evicted while not full must not come back fresh: its `TAT` goes into a fixed
//! *evicted-debt table* (`max_keys` rounded up to a power of two of `AtomicU64`, at least
//! 1,024, indexed by the low bits of the key's hash). Each slot packs a 16-bit *tag* (the
//! high bits of the same hash) with the TAT in microseconds (rounded up, 48 bits,
//! saturating). Storing into an empty or expired slot, or one with the same tag, keeps
//! (own tag, max TAT); storing into a slot with another key's live debt marks it `MIXED`
//! with the max, so a stored debt is never lost. A new entry starts from its slot's TAT
//! only when the slot is live and carries its tag or `MIXED`, clamped to `now + C`; a slot
//! holding another tag's debt was never this key's and costs it nothing. So a heavy hitter
//! pushed out by a flood of new keys returns with its bucket as empty as it left it, and a
//! collision costs an innocent new key at most one empty bucket, only when the slot is
//! `MIXED` (or on a 1-in-65,535 tag collision).
//!
//! When a shard is full of entries with requests in flight (nothing can be evicted), the
//! new key is refused ([`Full`]) and the engine rejects the request: a full table never means
//! "admit untracked".
//!
//! The debt of a client entry's slot is kept per (key, bandwidth id), so each bandwidth of
//! a returning client resumes from its own TAT.
//!
//! # Memory
//! An [`Entry`] is 88 bytes: 2 slots of 24 (id address, TAT, capacity; a non-client
//! entry's own bucket is slot 0), a 32-byte key (keys up to 30 bytes inline, longer keys
//! add their own allocation), the `u32` scope index and the `u32` in-flight/CLOCK word. Its
//! `Arc` allocation is 104 bytes. The table adds 8 bytes of pointer and a control byte per
//! bucket at a load factor between 7/16 and 7/8 (≈ 10–21 bytes per key). One client with a
//! plan of up to two bandwidths and a concurrency limit takes one entry: 119 bytes per key
//! at 20,000 keys and 123 at 1,000,000 as `tests/alloc.rs` measures it (bytes live in the
//! allocator after inserting the keys, divided by the keys). A plan's third and fourth
//! bandwidths take an overflow entry each. The evicted-debt table is allocated up front:
//! 8 bytes per `max_keys` (rounded up to a power of two), whether or not keys are tracked.
//! `max_keys` bounds entries, so it bounds clients (plus rule-limit keys and overflow
//! entries) rather than clients × (bandwidths + 1).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

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

/// `Entry::flags` bit: a request found the entry since its shard's last sweep.
const SINCE_SWEEP: u32 = 1 << 30;
/// `Entry::flags` bit: a request found the entry since the last [`Store::prune`].
const SINCE_PRUNE: u32 = 1 << 31;
/// Both CLOCK bits.
const TOUCHED: u32 = SINCE_SWEEP | SINCE_PRUNE;
/// `Entry::flags` bits of the in-flight count.
const IN_FLIGHT: u32 = SINCE_SWEEP - 1;

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
pub const SLOTS: usize = 2;

/// Where each of the first [`SLOTS`] bandwidths of a quota lives in a client entry:
/// a slot index, or [`OVERFLOW`].
pub(crate) type SlotMap = [u8; SLOTS];

/// The bandwidth lives in its own (bandwidth id, key) entry.
pub(crate) const OVERFLOW: u8 = u8::MAX;

/// Index of a scope in the store's scope table; [`CLIENT_ID`] is [`CLIENT_SCOPE`].
type ScopeId = u32;

/// The scope id of [`CLIENT_SCOPE`].
const CLIENT_ID: ScopeId = 0;

/// One tracked (scope, key). 88 bytes (see the module docs, *Memory*).
#[derive(Debug)]
pub struct Entry {
    /// A client entry's bandwidth slots; slot 0 is any other entry's own bucket.
    slots: [Slot; SLOTS],
    key: EntryKey,
    scope: ScopeId,
    /// Requests in flight (the low 30 bits, [`IN_FLIGHT`]) and the two CLOCK bits:
    /// [`SINCE_SWEEP`] is set when a request finds the entry and cleared by every sweep of
    /// its shard (sweeps evict untouched entries first, so a flood of one-shot keys pushes
    /// out other one-shot keys, not the clients that keep coming back); [`SINCE_PRUNE`] is
    /// cleared by prunes instead, so that a periodic prune neither resets the CLOCK nor
    /// drops an idle entry still in use. The bits are set under the shard's shared lock and
    /// cleared under its exclusive lock; the count changes without a lock (a ticket's
    /// release), so every write is an atomic read-modify-write.
    flags: AtomicU32,
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
/// write lock. Slot 0 of a non-client entry is its own bucket (`addr` stays 0).
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

/// An entry's key: inline when short, boxed otherwise. 32 bytes.
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

// === Scope table ===

/// Scope texts per chunk of the scope table.
const SCOPE_CHUNK: usize = 1024;
/// Chunks of the scope table: at most 1,048,576 distinct scopes per store.
const SCOPE_CHUNKS: usize = 1024;

/// [`SCOPE_CHUNK`] scope texts, each set once.
type ScopeChunk = Box<[OnceLock<Arc<str>>]>;

/// Every scope the store has held an entry of, by [`ScopeId`]: append-only, so an id is
/// never reused and a reader needs no lock (two acquire loads). Chunks are allocated as
/// they fill. Like the pinned ids, it grows with the number of *distinct* scope texts.
struct Scopes {
    chunks: Box<[OnceLock<ScopeChunk>]>,
    /// Scope text → id, for interning (a new entry) only.
    ids: RwLock<hashbrown::HashMap<Arc<str>, ScopeId, RandomState>>,
}

impl std::fmt::Debug for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.ids.read().map_or(0, |ids| ids.len());
        f.debug_struct("Scopes").field("len", &n).finish()
    }
}

impl Scopes {
    fn new(client: &Arc<str>) -> Self {
        let scopes = Scopes {
            chunks: (0..SCOPE_CHUNKS).map(|_| OnceLock::new()).collect(),
            ids: RwLock::new(hashbrown::HashMap::with_hasher(RandomState::new())),
        };
        let interned = scopes.intern(client);
        debug_assert_eq!(interned, Some(CLIENT_ID));
        scopes
    }

    /// The text of scope `id`.
    fn get(&self, id: ScopeId) -> Option<&Arc<str>> {
        let id = id as usize;
        self.chunks.get(id / SCOPE_CHUNK)?.get()?[id % SCOPE_CHUNK].get()
    }

    /// True when scope `id` is `scope`.
    fn is(&self, id: ScopeId, scope: &str) -> bool {
        self.get(id).is_some_and(|s| **s == *scope)
    }

    /// The id of `scope`, interning it first if new; `None` when the table is full.
    fn intern(&self, scope: &Arc<str>) -> Option<ScopeId> {
        if let Some(&id) = self
            .ids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&**scope)
        {
            return Some(id);
        }
        let mut ids = self.ids.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = ids.get(&**scope) {
            return Some(id);
        }
        let next = ids.len();
        let chunk = self.chunks.get(next / SCOPE_CHUNK)?.get_or_init(|| {
            (0..SCOPE_CHUNK)
                .map(|_| OnceLock::new())
                .collect::<ScopeChunk>()
        });
        let id = ScopeId::try_from(next).ok()?;
        // Written only here, under the write lock, at a fresh index.
        let _ = chunk[next % SCOPE_CHUNK].set(Arc::clone(scope));
        ids.insert(Arc::clone(scope), id);
        Some(id)
    }
}

// === impl Bucket ===

impl Bucket {
    /// The current theoretical arrival time.
    pub(crate) fn tat(&self) -> Nanos {
        self.tat.load(Ordering::Acquire)
    }

    /// The capacity the TAT was last computed with.
    pub(crate) fn capacity(&self) -> Nanos {
        self.cap.load(Ordering::Acquire)
    }

    /// Resets the bucket (a new entry, or slot reuse; under the shard's write lock).
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

    /// The own bucket of a non-client entry.
    fn bucket(&self) -> &Bucket {
        &self.slots[0].bucket
    }

    /// The current theoretical arrival time (the entry's own bucket; see
    /// [`Entry::for_each_bucket`] for a client entry's slots).
    pub fn tat(&self) -> Nanos {
        self.bucket().tat()
    }

    /// The capacity the TAT was last computed with.
    pub fn capacity(&self) -> Nanos {
        self.bucket().capacity()
    }

    /// Requests in flight (client scope).
    pub fn in_flight(&self) -> u64 {
        u64::from(self.flags.load(Ordering::Acquire) & IN_FLIGHT)
    }

    /// Marks the entry as recently used (see [`Entry::touched`]). Writes only when a bit
    /// is clear, so a hot entry's cache line is not written on every request.
    fn touch(&self) {
        if self.flags.load(Ordering::Relaxed) & TOUCHED != TOUCHED {
            self.flags.fetch_or(TOUCHED, Ordering::Relaxed);
        }
    }

    /// True when a request found the entry since its shard's last sweep.
    pub fn touched(&self) -> bool {
        self.touched_since(SINCE_SWEEP)
    }

    fn touched_since(&self, bit: u32) -> bool {
        self.flags.load(Ordering::Relaxed) & bit != 0
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

    fn new(scope: ScopeId, key: &str, tat: Nanos, cap: Nanos) -> Self {
        let e = Entry {
            slots: Default::default(),
            key: EntryKey::new(key),
            scope,
            // A new entry starts untouched: a key seen once is the first to go.
            flags: AtomicU32::new(0),
        };
        e.bucket().reset(tat, cap);
        e
    }

    fn is_client(&self) -> bool {
        self.scope == CLIENT_ID
    }

    /// Slot `i` of a client entry (an index from a [`SlotMap`]).
    pub(crate) fn slot(&self, i: u8) -> &Bucket {
        &self.slots[usize::from(i) % SLOTS].bucket
    }

    /// GCRA check-and-consume of `cost` at `now` on the entry's own bucket.
    pub fn consume(&self, now: Nanos, p: Params, cost: u64) -> Verdict {
        self.bucket().consume(now, p, cost)
    }

    /// Returns `amount_ns` of consumption on the entry's own bucket (never below `now`).
    pub fn refund(&self, now: Nanos, amount_ns: Nanos) {
        self.bucket().refund(now, amount_ns);
    }

    /// Charges post-hoc debt on the entry's own bucket.
    pub fn charge_debt(&self, now: Nanos, p: Params, units: u64) {
        self.bucket().charge_debt(now, p, units);
    }

    /// The TAT of the entry's own bucket as seen with capacity `c` (rescaled if needed).
    pub fn peek(&self, now: Nanos, c: Nanos) -> Nanos {
        self.bucket().peek(now, c)
    }

    /// Takes a concurrency permit if fewer than `limit` are in flight (the count keeps 30
    /// bits: a limit above 2³⁰ − 1 admits at most that many).
    pub fn try_acquire(&self, limit: u64) -> bool {
        self.flags
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let n = v & IN_FLIGHT;
                (u64::from(n) < limit && n < IN_FLIGHT).then_some(v + 1)
            })
            .is_ok()
    }

    /// Returns a permit taken by [`Entry::try_acquire`].
    pub fn release(&self) {
        // Saturating: a release without an acquire is a bug, but must not wrap (into the
        // CLOCK bits).
        let _ = self
            .flags
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & IN_FLIGHT != 0).then(|| v - 1)
            });
    }

    /// The latest TAT over the entry's buckets.
    fn max_tat(&self) -> Nanos {
        let mut max = 0;
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

    /// The slot holding bandwidth `id` by address, or else by text (taking the pinned-id
    /// lock only then); read-only.
    fn find_slot(&self, id: &Arc<str>, pinned: &RwLock<Pinned>) -> Option<&Bucket> {
        let addr = id_addr(id);
        if let Some(s) = self
            .slots
            .iter()
            .find(|s| s.addr.load(Ordering::Relaxed) == addr)
        {
            return Some(&s.bucket);
        }
        let pinned = pinned.read().unwrap_or_else(|e| e.into_inner());
        self.slots
            .iter()
            .find(|s| {
                let a = s.addr.load(Ordering::Relaxed);
                a != 0 && pinned.get(&a).is_some_and(|(t, _)| **t == **id)
            })
            .map(|s| &s.bucket)
    }
}

/// An entry with its scope's text, as [`Store::for_each`] visits it. Derefs to the
/// [`Entry`].
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    entry: &'a Entry,
    scope: &'a str,
}

impl EntryRef<'_> {
    /// The scope (bandwidth id or [`CLIENT_SCOPE`]).
    pub fn scope(&self) -> &str {
        self.scope
    }
}

impl std::ops::Deref for EntryRef<'_> {
    type Target = Entry;

    fn deref(&self) -> &Entry {
        self.entry
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
    scopes: Scopes,
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
        let client_scope: Arc<str> = Arc::from(CLIENT_SCOPE);
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
            scopes: Scopes::new(&client_scope),
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

    /// The pinned ids, for reading. Lock order: a shard's table lock (if any) first, then
    /// this one; `pin_ids` takes only this one.
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

    /// The text of an entry's scope ("" if unknown, which cannot happen: ids come from
    /// [`Scopes::intern`]).
    fn scope_of(&self, e: &Entry) -> &str {
        if e.is_client() {
            CLIENT_SCOPE
        } else {
            self.scopes.get(e.scope).map_or("", |s| &**s)
        }
    }

    /// The hash of an entry's (scope, key), as its lookups compute it (the entry does not
    /// store it).
    fn entry_hash(&self, e: &Entry) -> u64 {
        self.hash(self.scope_of(e), e.key.as_str())
    }

    /// True when `e` is the entry of (`scope`, `key`).
    fn is_entry(&self, e: &Entry, scope: &str, key: &str) -> bool {
        e.key.is(key)
            && if e.is_client() {
                scope == CLIENT_SCOPE
            } else {
                self.scopes.is(e.scope, scope)
            }
    }

    fn shard(&self, hash: u64) -> &Shard {
        // Middle bits: hashbrown uses the low bits for the position and the top 7 bits as
        // the control byte, so taking either for the shard would weaken the table's hash.
        &self.shards[((hash >> 32) & self.shard_mask) as usize]
    }

    fn debt_slot(&self, hash: u64) -> &AtomicU64 {
        &self.evicted[(hash as usize) & (self.evicted.len() - 1)]
    }

    /// Inserts a new entry (under the shard's write lock; the table may grow, which hashes
    /// every entry again).
    fn insert(&self, table: &mut HashTable<Arc<Entry>>, hash: u64, e: Arc<Entry>) {
        table.insert_unique(hash, e, |e| self.entry_hash(e));
        self.len.fetch_add(1, Ordering::Relaxed);
    }

    /// Remembers the debt of an entry being evicted.
    fn remember_debt(&self, e: &Entry, pinned: &Pinned, now: Nanos) {
        let hash = self.entry_hash(e);
        if e.is_client() {
            for s in &e.slots {
                let addr = s.addr.load(Ordering::Relaxed);
                if let Some((_, id_hash)) = pinned.get(&addr) {
                    let h = client_debt_hash(hash, *id_hash);
                    store_debt(self.debt_slot(h), h, s.bucket.tat(), now);
                }
            }
        } else {
            store_debt(self.debt_slot(hash), hash, e.tat(), now);
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

    /// True when a sweep or prune may drop the entry: nothing in flight, and its scope is
    /// gone from the policy or it is idle (every bucket full) and no request found it since
    /// the last sweep or prune. A recently used idle entry is kept: dropping it would make
    /// the client's next request insert a new entry, which reads the evicted-debt table and,
    /// under a flood that filled the table with `MIXED` slots, could start empty.
    fn droppable(
        &self,
        e: &Entry,
        now: Nanos,
        live: &LiveScopes,
        pinned: &Pinned,
        bit: u32,
    ) -> bool {
        Self::clear_dead_slots(e, live, pinned);
        e.in_flight() == 0
            && (!live.contains(self.scope_of(e)) || (!e.touched_since(bit) && e.max_tat() <= now))
    }

    /// Clears `bit` ([`SINCE_SWEEP`] or [`SINCE_PRUNE`]) of every entry of a table (under
    /// the shard's write lock: no request can set it meanwhile).
    fn clear_touched(table: &HashTable<Arc<Entry>>, bit: u32) {
        for e in table.iter() {
            if e.flags.load(Ordering::Relaxed) & bit != 0 {
                e.flags.fetch_and(!bit, Ordering::Relaxed);
            }
        }
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
        let hash = self.hash(CLIENT_SCOPE, key);
        let shard = self.shard(hash);
        let eq = |e: &Arc<Entry>| e.scope == CLIENT_ID && e.key.is(key);
        let mine = &bandwidths[..bandwidths.len().min(SLOTS)];
        {
            let table = shard.table.read().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = table.find(hash, eq) {
                e.touch();
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
            Some(e) => {
                e.touch();
                e
            }
            None => {
                let cap = self.per_shard.load(Ordering::Relaxed);
                if table.len() >= cap {
                    self.sweep(&mut table, now, cap);
                    if table.len() >= cap {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                        return Err(Full);
                    }
                }
                let e = Arc::new(Entry::new(CLIENT_ID, key, 0, 0));
                self.insert(&mut table, hash, Arc::clone(&e));
                e
            }
        };
        let map = self.claim_slots(&entry, hash, mine, &own, now);
        Ok(f(&entry, &map))
    }

    /// Finds or claims a slot for each of `bandwidths` in the client entry `e` of `hash`
    /// (under the shard's write lock).
    fn claim_slots(
        &self,
        e: &Entry,
        hash: u64,
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
            let debt_hash = client_debt_hash(hash, *id_hash);
            let owed = debt_for(self.debt_slot(debt_hash), debt_hash, now);
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
        // The shard's lock first, then (only when the address does not match) the
        // pinned ids', the order every other path takes them in.
        self.with_existing(CLIENT_SCOPE, key, |e| e.find_slot(id, &self.pinned).map(f))
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
        table.find(hash, |e| self.is_entry(e, scope, key)).map(f)
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
        let eq = |e: &Arc<Entry>| self.is_entry(e, scope, key);
        {
            let table = shard.table.read().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = table.find(hash, eq) {
                e.touch();
                return Ok(f(e));
            }
        }
        let mut table = shard.table.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = table.find(hash, eq) {
            e.touch();
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
        // A scope table full of a million distinct scopes cannot track a new one either.
        let Some(scope_id) = self.scopes.intern(scope) else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Full);
        };
        let owed = debt_for(self.debt_slot(hash), hash, now);
        let tat = if owed > now {
            owed.min(now.saturating_add(c))
        } else {
            0
        };
        let entry = Arc::new(Entry::new(scope_id, key, tat, c));
        let r = f(&entry);
        self.insert(&mut table, hash, entry);
        Ok(r)
    }

    /// Frees room in a full shard: drops idle and dead entries, then evicts until 1/8 of
    /// the shard is free: entries not touched since the last sweep first, closest to full
    /// among them, and only then touched ones (closest to full first). Entries with requests
    /// in flight are never evicted. Finally clears every survivor's `touched` bit, so an
    /// entry keeps its second chance only if a request finds it again before the next sweep.
    fn sweep(&self, table: &mut HashTable<Arc<Entry>>, now: Nanos, cap: usize) {
        let before = table.len();
        let live = self.live.load();
        let pinned = self.pinned();
        table.retain(|e| !self.droppable(e, now, &live, &pinned, SINCE_SWEEP));
        let target = cap - (cap / 8).max(1);
        if table.len() > target {
            let excess = table.len() - target;
            // Eviction order: (touched, latest TAT), smallest first. The write lock is held,
            // so no request can touch or consume while the order is computed and applied.
            let rank = |e: &Entry| (e.touched(), e.max_tat());
            let mut ranks: Vec<(bool, Nanos)> = table
                .iter()
                .filter(|e| e.in_flight() == 0)
                .map(|e| rank(e))
                .collect();
            if !ranks.is_empty() {
                let k = excess.min(ranks.len()) - 1;
                let (_, &mut threshold, _) = ranks.select_nth_unstable(k);
                let mut budget = excess;
                table.retain(|e| {
                    if budget == 0 || e.in_flight() != 0 || rank(e) > threshold {
                        return true;
                    }
                    budget -= 1;
                    self.remember_debt(e, &pinned, now);
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    false
                });
            }
        }
        Self::clear_touched(table, SINCE_SWEEP);
        let removed = before - table.len();
        self.len.fetch_sub(removed as u64, Ordering::Relaxed);
    }

    /// Drops every entry that carries no information (full bucket, nothing in flight, no
    /// request since the last sweep or prune: a recently used one goes at the next prune)
    /// or belongs to a scope the policy no longer has, then clears the entries'
    /// [`SINCE_PRUNE`] bits (not the sweeps' CLOCK bits). Bounded by the number of entries; run it
    /// from a background task or after a reload. Returns how many were dropped.
    pub fn prune(&self, now: Nanos) -> u64 {
        let live = self.live.load();
        let mut removed = 0u64;
        for shard in self.shards.iter() {
            let mut table = shard.table.write().unwrap_or_else(|e| e.into_inner());
            // Every path takes a shard's lock before the pinned ids' (never the other way
            // round), so a reload's `pin_ids` waiting for the latter cannot deadlock them.
            let pinned = self.pinned();
            let before = table.len();
            table.retain(|e| !self.droppable(e, now, &live, &pinned, SINCE_PRUNE));
            Self::clear_touched(&table, SINCE_PRUNE);
            removed += (before - table.len()) as u64;
        }
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Visits every entry with its scope's text (shard by shard, each under its read
    /// lock).
    pub fn for_each(&self, mut f: impl FnMut(&EntryRef<'_>)) {
        for shard in self.shards.iter() {
            let table = shard.table.read().unwrap_or_else(|e| e.into_inner());
            for e in table.iter() {
                f(&EntryRef {
                    entry: e,
                    scope: self.scope_of(e),
                });
            }
        }
    }

    /// True while the store remembers nothing about (scope, key) or it is idle.
    pub fn is_idle(&self, scope: &str, key: &str, now: Nanos) -> bool {
        self.with_existing(scope, key, |e| e.is_idle(now))
            .unwrap_or(true)
    }
}

// === Evicted-debt slots ===
//
// One `AtomicU64` per slot packs a 16-bit tag (the high bits of the hash of the key that
// owns the debt) with the debt's TAT in whole microseconds, rounded up and saturating at 48
// bits (≈ 8.9 years of clock). Tag `MIXED` means "keys of different tags wrote here while
// their debts were live"; the slot then holds the largest of them.

/// Tag of a slot that holds the maximum debt of several keys.
const MIXED: u16 = u16::MAX;
const DEBT_TAT_BITS: u32 = 48;
const DEBT_TAT_MAX: u64 = (1 << DEBT_TAT_BITS) - 1;

/// The hash that picks the evicted-debt slot of bandwidth `id_hash` in the client entry
/// of `hash`.
fn client_debt_hash(hash: u64, id_hash: u64) -> u64 {
    hash ^ id_hash.rotate_left(17)
}

/// The tag of `hash` (its high 16 bits; the slot index uses the low bits). Never `MIXED`.
fn debt_tag(hash: u64) -> u16 {
    ((hash >> 48) as u16).min(MIXED - 1)
}

fn pack_debt(tag: u16, tat_us: u64) -> u64 {
    (u64::from(tag) << DEBT_TAT_BITS) | tat_us.min(DEBT_TAT_MAX)
}

/// (tag, TAT in ns) of a packed slot; the TAT is 0 for an empty slot.
fn unpack_debt(v: u64) -> (u16, Nanos) {
    let tag = (v >> DEBT_TAT_BITS) as u16;
    (tag, (v & DEBT_TAT_MAX).saturating_mul(1_000))
}

/// Records that the key of `hash` owes until `tat`. An empty or expired slot, or one with
/// the same tag, takes (own tag, max); a live debt of another tag is never overwritten
/// without marking the slot `MIXED` (keeping the max), so every key whose debt was stored
/// here still reads at least its own debt. Nothing is recorded when nothing is owed.
fn store_debt(slot: &AtomicU64, hash: u64, tat: Nanos, now: Nanos) {
    if tat <= now {
        return;
    }
    let tag = debt_tag(hash);
    let tat_us = tat.div_ceil(1_000).min(DEBT_TAT_MAX);
    let mut cur = slot.load(Ordering::Relaxed);
    loop {
        let (cur_tag, cur_tat) = unpack_debt(cur);
        let cur_us = cur_tat / 1_000;
        let next = if cur_tat <= now {
            pack_debt(tag, tat_us)
        } else if cur_tag == tag {
            pack_debt(tag, tat_us.max(cur_us))
        } else {
            pack_debt(MIXED, tat_us.max(cur_us))
        };
        if next == cur {
            return;
        }
        match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

/// The debt the key of `hash` may owe according to its slot: the slot's TAT when it is
/// live and has the key's tag or `MIXED`, else 0 (a live debt of another tag was never
/// this key's: [`store_debt`] would have marked the slot `MIXED`). Callers clamp it to one
/// empty bucket.
fn debt_for(slot: &AtomicU64, hash: u64, now: Nanos) -> Nanos {
    let (tag, tat) = unpack_debt(slot.load(Ordering::Relaxed));
    if tat > now && (tag == debt_tag(hash) || tag == MIXED) {
        tat
    } else {
        0
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
        // A full entry that a request found since the last prune survives one prune.
        store
            .with_entry(&live, "k", now, p.c, |e| e.consume(now, p, 1))
            .unwrap();
        store.with_entry(&live, "k", now, p.c, |_| ()).unwrap();
        assert_eq!(store.prune(now + 10 * S), 0, "used since the last prune");
        assert_eq!(
            store.with_existing("live", "k", |e| e.touched()),
            Some(true),
            "a prune leaves the sweeps' CLOCK bit alone"
        );
        assert_eq!(store.prune(now + 10 * S), 1, "then idle");
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
        assert_eq!(std::mem::size_of::<EntryKey>(), 32);
    }

    /// An `Arc<Entry>` allocation: the entry plus the two reference counts.
    const ENTRY_BYTES: usize = 104;

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
    fn a_hot_client_survives_a_flood_of_one_shot_keys_with_its_bucket_intact() {
        // One shard of 64: a sweep every 8 inserts once full.
        let store = Store::new(64);
        let normal = [bandwidth("plan:normal/0", 1, 10)];
        // One-shot keys on a slow plan: their buckets stay far from full for a minute,
        // so they are *further* from full than the half-used hot client.
        let slow = [bandwidth("plan:slow/0", 1, 5)];
        let slow = [CompiledBandwidth::new(
            Arc::clone(&slow[0].id),
            Arc::clone(&slow[0].id),
            fairgate_policies::units::Rate::new(1, std::time::Duration::from_secs(60)).unwrap(),
            5,
        )
        .unwrap()];
        store.pin_ids(normal.iter().chain(&slow).map(|b| &b.id));
        let mut now = 100 * S;
        for _ in 0..5 {
            assert!(consume_client(&store, "hot", now, &normal));
        }
        let tat = |store: &Store, now| {
            store
                .with_client("hot", now, &normal, |e, map| e.slot(map[0]).tat())
                .unwrap()
        };
        let half_used = tat(&store, now);
        assert_eq!(half_used, now + 5 * S);
        for i in 0..10_000u64 {
            now += 1_000;
            // A spoofed key may find its debt slot taken (MIXED): then it starts empty.
            let _ = consume_client(&store, &format!("spoof-{i}"), now, &slow);
            assert!(store.len() <= 64);
            if i % 4 == 0 {
                assert!(
                    store.with_existing(CLIENT_SCOPE, "hot", |_| ()).is_some(),
                    "hot client evicted at {i}"
                );
                assert_eq!(tat(&store, now), half_used, "bucket changed at {i}");
            }
        }
        assert!(store.evictions() > 9_000, "{}", store.evictions());
        // Everything touched (no one-shot keys left to evict): the closest to full go,
        // in-flight entries stay, and the table stays bounded.
        let store = Store::new(8);
        let sc = scope("s");
        let p = Params::new(1, S, 10).unwrap();
        let now = 100 * S;
        for i in 0..16u64 {
            let k = format!("k{i}");
            store
                .with_entry(&sc, &k, now, p.c, |e| e.consume(now, p, 1 + i % 3))
                .unwrap();
            store.with_entry(&sc, &k, now, p.c, |_| ()).unwrap();
            assert!(store.len() <= 8);
        }
        assert!(store.evictions() > 0);
    }

    #[test]
    fn a_debt_slot_charges_only_its_own_key_unless_mixed() {
        let slot = AtomicU64::new(0);
        let now = 100 * S;
        // Same slot index (low bits), different tags (high bits).
        let (a, b, c) = (1u64 << 48 | 7, 2u64 << 48 | 7, 3u64 << 48 | 7);
        assert_eq!(debt_for(&slot, a, now), 0, "empty");
        // Rounded up to whole microseconds.
        store_debt(&slot, a, now + 10 * S + 1, now);
        assert_eq!(debt_for(&slot, a, now), now + 10 * S + 1_000);
        assert_eq!(
            debt_for(&slot, b, now),
            0,
            "another key's debt is not charged"
        );
        // Nothing owed: nothing stored.
        store_debt(&slot, b, now, now);
        assert_eq!(debt_for(&slot, a, now), now + 10 * S + 1_000);
        // A second live debt of another tag: MIXED with the max, charged to both.
        store_debt(&slot, b, now + 5 * S, now);
        assert_eq!(debt_for(&slot, a, now), now + 10 * S + 1_000);
        assert_eq!(debt_for(&slot, b, now), now + 10 * S + 1_000);
        assert_eq!(
            debt_for(&slot, c, now),
            now + 10 * S + 1_000,
            "MIXED charges any key (clamped by callers)"
        );
        // Expired: the next writer owns the slot again.
        let later = now + 11 * S;
        assert_eq!(debt_for(&slot, a, later), 0);
        store_debt(&slot, c, later + S, later);
        assert_eq!(debt_for(&slot, c, later), later + S);
        assert_eq!(debt_for(&slot, a, later), 0);
        // The same tag keeps the max.
        store_debt(&slot, c, later + 1, later);
        assert_eq!(debt_for(&slot, c, later), later + S);
        // Saturates instead of wrapping.
        let far = AtomicU64::new(0);
        store_debt(&far, a, u64::MAX, now);
        assert_eq!(debt_for(&far, a, now), DEBT_TAT_MAX * 1_000);
        // A hash whose tag bits are all ones is not mistaken for MIXED.
        let top = u64::MAX;
        assert_eq!(debt_tag(top), MIXED - 1);
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

    #[test]
    fn clock_bits_and_the_in_flight_count_share_a_word_without_mixing() {
        let store = Store::new(100);
        let sc: Arc<str> = Arc::from(CLIENT_SCOPE);
        let e = store.with_entry(&sc, "k", S, 0, Arc::clone).unwrap();
        assert!(!e.touched(), "a new entry starts untouched");
        assert!(e.try_acquire(3) && e.try_acquire(3) && e.try_acquire(3));
        assert!(!e.try_acquire(3), "limit reached");
        e.touch();
        assert!(e.touched() && e.touched_since(SINCE_PRUNE));
        assert_eq!(e.in_flight(), 3, "touching leaves the count alone");
        {
            let shard = store.shard(store.hash(CLIENT_SCOPE, "k"));
            // No request runs in this test: a shared lock stands in for the sweep's.
            Store::clear_touched(&shard.table.read().unwrap(), SINCE_SWEEP);
        }
        assert!(!e.touched() && e.touched_since(SINCE_PRUNE));
        assert_eq!(e.in_flight(), 3, "clearing a bit leaves the count alone");
        for _ in 0..5 {
            e.release();
        }
        assert_eq!(e.in_flight(), 0, "release saturates at zero");
        assert!(
            e.touched_since(SINCE_PRUNE),
            "and does not borrow from the bits"
        );
        // A limit above the count's 30 bits admits up to the count's maximum.
        e.flags.fetch_add(IN_FLIGHT - 1, Ordering::Relaxed);
        assert!(e.try_acquire(u64::MAX));
        assert!(
            !e.try_acquire(u64::MAX),
            "the count never carries into the bits"
        );
        assert_eq!(e.in_flight(), u64::from(IN_FLIGHT));
        assert!(e.touched_since(SINCE_PRUNE));
    }

    #[test]
    fn bandwidths_beyond_the_slots_overflow_to_their_own_entries() {
        let store = Store::new(100);
        let bws = [
            bandwidth("plan:p/0", 1, 5),
            bandwidth("plan:p/1", 1, 5),
            bandwidth("plan:p/2", 1, 5),
        ];
        store.pin_ids(bws.iter().map(|b| &b.id));
        let map = store.with_client("k", S, &bws, |_, map| *map).unwrap();
        assert_eq!(map, [0, 1], "the first SLOTS bandwidths are slotted");
        assert_eq!(store.len(), 1);
        // The engine keeps the third in a (bandwidth id, key) entry.
        let p = Params::new(1, S, 5).unwrap();
        store
            .with_entry(&bws[2].id, "k", S, p.c, |e| e.consume(S, p, 1))
            .unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(
            store.with_existing(&bws[2].id, "k", |e| e.tat()),
            Some(S + S)
        );
        assert!(store.with_client_slot("k", &bws[2].id, |_| ()).is_none());
    }

    #[test]
    fn entries_are_found_after_their_tables_grow_and_scopes_are_told_apart() {
        let store = Store::new(1_000_000);
        let p = Params::new(1, S, 10).unwrap();
        let now = 100 * S;
        let scopes = [scope("rule:a"), scope("rule:b")];
        for i in 0..20_000u64 {
            let key = format!("k{i}");
            for (n, sc) in scopes.iter().enumerate() {
                store
                    .with_entry(sc, &key, now, p.c, |e| e.consume(now, p, 1 + n as u64))
                    .unwrap();
            }
            store.with_client(&key, now, &[], |_, _| ()).unwrap();
        }
        assert_eq!(store.len(), 60_000);
        for i in (0..20_000u64).step_by(97) {
            let key = format!("k{i}");
            assert_eq!(
                store.with_existing("rule:a", &key, |e| e.tat()),
                Some(now + S)
            );
            assert_eq!(
                store.with_existing("rule:b", &key, |e| e.tat()),
                Some(now + 2 * S)
            );
            assert!(store
                .with_existing(CLIENT_SCOPE, &key, |e| e.is_client())
                .unwrap());
            assert!(store.with_existing("rule:c", &key, |_| ()).is_none());
        }
        let mut seen = [0u64; 3];
        store.for_each(|e| match e.scope() {
            "rule:a" => seen[0] += 1,
            "rule:b" => seen[1] += 1,
            CLIENT_SCOPE => seen[2] += 1,
            other => panic!("unexpected scope {other}"),
        });
        assert_eq!(seen, [20_000; 3]);
        // A scope id is interned once per text, whatever `Arc` it comes in.
        assert_eq!(store.scopes.intern(&scope("rule:a")), Some(1));
        assert_eq!(store.scopes.intern(&scope("rule:b")), Some(2));
    }
}
