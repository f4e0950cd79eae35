//! The sharded, bounded table and its lookups. See *Layout* in the module docs of
//! [`crate::state`].

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use ahash::RandomState;
use arc_swap::ArcSwap;
use hashbrown::HashTable;

use fairgate_policies::compiled::CompiledBandwidth;

use super::bucket::Bucket;
use super::debt::{client_debt_hash, debt_for};
use super::entry::{Entry, EntryRef};
use super::scopes::{id_addr, shapes, LiveScopes, Pinned, Scopes, CLIENT_ID, FREE};
use super::{Full, SlotMap, CLIENT_SCOPE, OVERFLOW, SLOTS};
use crate::clock::Nanos;

#[repr(align(64))]
#[derive(Debug, Default)]
pub(super) struct Shard {
    pub(super) table: RwLock<HashTable<Arc<Entry>>>,
}

/// The sharded, bounded keyed store. See the module docs.
#[derive(Debug)]
pub struct Store {
    pub(super) shards: Box<[Shard]>,
    pub(super) shard_mask: u64,
    pub(super) hasher: RandomState,
    /// `hasher`'s hasher after hashing [`CLIENT_SCOPE`]: a client key's hash continues
    /// from it ([`Store::client_hash`]).
    client_hasher: ahash::AHasher,
    pub(super) per_shard: AtomicUsize,
    pub(super) len: AtomicU64,
    pub(super) evicted: Box<[AtomicU64]>,
    pub(super) live: ArcSwap<LiveScopes>,
    pub(super) evictions: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) pinned: RwLock<Pinned>,
    pub(super) scopes: Scopes,
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
        let hasher = RandomState::new();
        let mut client_hasher = hasher.build_hasher();
        CLIENT_SCOPE.hash(&mut client_hasher);
        let store = Store {
            shards: (0..n).map(|_| Shard::default()).collect(),
            shard_mask: n as u64 - 1,
            hasher,
            client_hasher,
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
    pub(super) fn pinned(&self) -> std::sync::RwLockReadGuard<'_, Pinned> {
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

    pub(super) fn hash(&self, scope: &str, key: &str) -> u64 {
        self.hasher.hash_one((scope, key))
    }

    /// `hash(CLIENT_SCOPE, key)`, without hashing the scope's text again.
    pub(super) fn client_hash(&self, key: &str) -> u64 {
        let mut h = self.client_hasher.clone();
        key.hash(&mut h);
        h.finish()
    }

    /// The text of an entry's scope ("" if unknown, which cannot happen: ids come from
    /// [`Scopes::intern`]).
    pub(super) fn scope_of(&self, e: &Entry) -> &str {
        if e.is_client() {
            CLIENT_SCOPE
        } else {
            self.scopes.get(e.scope).map_or("", |s| &**s)
        }
    }

    /// The hash of an entry's (scope, key), as its lookups compute it (the entry does not
    /// store it).
    pub(super) fn entry_hash(&self, e: &Entry) -> u64 {
        if e.is_client() {
            self.client_hash(e.key.as_str())
        } else {
            self.hash(self.scope_of(e), e.key.as_str())
        }
    }

    /// True when `e` is the entry of (`scope`, `key`).
    pub(super) fn is_entry(&self, e: &Entry, scope: &str, key: &str) -> bool {
        e.key.is(key)
            && if e.is_client() {
                scope == CLIENT_SCOPE
            } else {
                self.scopes.is(e.scope, scope)
            }
    }

    pub(super) fn shard(&self, hash: u64) -> &Shard {
        // Middle bits: hashbrown uses the low bits for the position and the top 7 bits as
        // the control byte, so taking either for the shard would weaken the table's hash.
        &self.shards[((hash >> 32) & self.shard_mask) as usize]
    }

    /// Inserts a new entry (under the shard's write lock; the table may grow, which hashes
    /// every entry again).
    pub(super) fn insert(&self, table: &mut HashTable<Arc<Entry>>, hash: u64, e: Arc<Entry>) {
        table.insert_unique(hash, e, |e| self.entry_hash(e));
        self.len.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `f` on the client entry of `key` (its concurrency counter and the slots of
    /// `bandwidths`, see [`SlotMap`]), inserting the entry or claiming slots first if
    /// needed. The hot path is one hash, one shared lock and, per bandwidth, one compare
    /// with the slots' id addresses (read from their shapes). `f` runs while the shard is
    /// locked.
    #[inline]
    pub(crate) fn with_client<R>(
        &self,
        key: &str,
        now: Nanos,
        bandwidths: &[CompiledBandwidth],
        f: impl FnOnce(&Arc<Entry>, &SlotMap) -> R,
    ) -> Result<R, Full> {
        let hash = self.client_hash(key);
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
                let e = Arc::new(Entry::new(CLIENT_ID, key, 0, FREE));
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
            let at = |a: usize| e.buckets().position(|b| b.addr() == a);
            if let Some(s) = at(addr) {
                map[i] = s as u8;
                continue;
            }
            // The same id from an older generation: adopt the new address (the capacity is
            // rescaled lazily on use).
            let same = e.buckets().position(|b| {
                let a = b.addr();
                a != 0 && !wanted(a) && text(a) == Some(&*bw.id)
            });
            if let Some(s) = same {
                let b = e.slot(s as u8);
                let Some(shape) = shapes().intern(addr, b.capacity()) else {
                    continue;
                };
                b.set_shape(shape);
                map[i] = s as u8;
                continue;
            }
            if own[i] {
                continue;
            }
            // A free slot, or one whose bucket carries no information (full, or its id
            // is gone from the policy) and that this quota does not use.
            let free = e.buckets().position(|b| {
                let a = b.addr();
                a == 0
                    || (!wanted(a) && (b.tat() <= now || text(a).is_none_or(|t| !live.contains(t))))
            });
            let Some(s) = free else { continue };
            let Some((_, id_hash)) = pinned.get(&addr) else {
                continue;
            };
            let Some(shape) = shapes().intern(addr, bw.c_ns) else {
                continue;
            };
            let debt_hash = client_debt_hash(hash, *id_hash);
            let owed = debt_for(self.debt_slot(debt_hash), debt_hash, now);
            let tat = if owed > now {
                owed.min(now.saturating_add(bw.c_ns))
            } else {
                0
            };
            e.slot(s as u8).reset(tat, shape);
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
        f: impl FnOnce(&Bucket<'_>) -> R,
    ) -> Option<R> {
        // The shard's lock first, then (only when the address does not match) the
        // pinned ids', the order every other path takes them in.
        self.with_existing(CLIENT_SCOPE, key, |e| {
            e.find_slot(id, &self.pinned).map(|b| f(&b))
        })
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
        // Likewise a shape table full of a million distinct (id, capacity) pairs.
        let Some(shape) = shapes().intern(0, c) else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Full);
        };
        let owed = debt_for(self.debt_slot(hash), hash, now);
        let tat = if owed > now {
            owed.min(now.saturating_add(c))
        } else {
            0
        };
        let entry = Arc::new(Entry::new(scope_id, key, tat, shape));
        let r = f(&entry);
        self.insert(&mut table, hash, entry);
        Ok(r)
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
