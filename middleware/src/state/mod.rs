//! The keyed state store: one small entry per (scope, key), in bounded memory.
//!
//! A *scope* is a bandwidth id from the compiled policy (`plan:free/0`, `client:k/0`,
//! `rule:login`) or the fixed [`CLIENT_SCOPE`]; a *key* is a client key, an IP or a
//! header value. Each [`Entry`] holds a bucket's `TAT` as an `AtomicU64` updated by
//! compare-and-swap, the capacity `C` it was last computed with (so a reload can rescale it
//! lazily; by a `u32` *shape*, see *Memory*), and an in-flight counter.
//!
//! # Client entries
//! A client's per-client quota lives in one entry, (`CLIENT_SCOPE`, client key): its
//! concurrency counter plus up to [`SLOTS`] bandwidth buckets (*slots*), so the quota stage
//! of a decision is one hash and one lookup, not one per bandwidth plus one for the
//! counter. Each slot remembers which bandwidth id it holds (by the address of the id's
//! text, compared as a number; ids are pinned by the store so an address is never reused)
//! and, like any bucket, the capacity it was computed with. After a reload the first request of
//! a key matches slots to the new generation's ids by text once (under the shard's write
//! lock), so usage carries over per bandwidth id and is rescaled lazily, exactly as with
//! separate entries; slots of ids the policy no longer has are freed by sweeps and prunes.
//! A quota's bandwidths beyond the first [`SLOTS`], and a bandwidth that finds every slot
//! in use by other live, non-full buckets (possible when `tag` rules move one client between
//! plans with many bandwidths), keep separate (bandwidth id, key) entries; a bandwidth
//! that already has such an entry keeps using it, so its state is never split. Rule limits
//! keep their own (rule bandwidth id, rule key) entries. [`SLOTS`] is 2, the usual plan
//! (a rate and a daily quota): it is what keeps an entry within 96 bytes (see *Memory*).
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
//! An [`Entry`] is 56 bytes: the 2 slots' TATs (`AtomicU64` each; a non-client entry's own
//! bucket is slot 0), a 24-byte key (keys up to 22 bytes inline, longer keys add an
//! allocation of their own length), the 2 slots' *shapes* (`u32` each), the `u32` scope
//! index and the `u32` in-flight/CLOCK word. A shape is an index into a process-wide,
//! append-only table of (bandwidth id address, capacity) pairs (`scopes.rs`): a slot names
//! the id it holds and the capacity its TAT was computed with by one `u32` instead of a
//! pointer and a `u64`. Reading it costs one acquire load and an indexed load from a static
//! (the first 1,024 shapes live in the static itself); a new pair (a new id, or a reload
//! that changes a capacity) is interned once, under the table's lock. A slot matches a
//! bandwidth by the shape's address, and a bucket whose shape has another capacity is
//! rescaled by the thread that moves its shape, exactly as it was when the capacity itself
//! sat in the bucket. The table holds at most 1,048,576 distinct pairs; a new entry or slot
//! that would need more is refused ([`Full`]) like a new scope in a full scope table.
//!
//! The entry's `Arc` allocation is 72 bytes (the entry and two reference counts). The table
//! adds 8 bytes of pointer and a control byte per bucket at a load factor between 7/16 and
//! 7/8 (≈ 10–21 bytes per key). One client with a plan of up to two bandwidths and a
//! concurrency limit takes one entry: 86.8 bytes per key at 20,000 keys and 90.9 at
//! 1,000,000 as `tests/alloc.rs` measures it (bytes live in the allocator after inserting
//! the keys, divided by the keys; keys of 20 bytes). A plan's third and fourth bandwidths
//! take an overflow entry each. The evicted-debt table is allocated up front: 8 bytes per
//! `max_keys` (rounded up to a power of two), whether or not keys are tracked. `max_keys`
//! bounds entries, so it bounds clients (plus rule-limit keys and overflow entries) rather
//! than clients × (bandwidths + 1).
//!
//! # Files
//! [`Store`] (`store.rs`) is the sharded table and its lookups; an [`Entry`] (`entry.rs`)
//! holds a key, its in-flight count with the CLOCK bits, and its buckets (`bucket.rs`: the
//! GCRA bucket in atomics); `scopes.rs` holds the names entries refer to (the scope table,
//! the pinned bandwidth ids, the live scopes); `evict.rs` frees room (sweeps, eviction,
//! prunes) and `debt.rs` is the evicted-debt table.

mod bucket;
mod debt;
mod entry;
mod evict;
mod scopes;
mod store;

pub use entry::{Entry, EntryRef};
pub use scopes::LiveScopes;
pub use store::Store;

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

#[cfg(test)]
mod tests;
