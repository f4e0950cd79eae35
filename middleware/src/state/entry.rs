//! One tracked (scope, key): its key, its in-flight count and CLOCK bits in one word, and
//! its buckets (a client entry's slots). See *Client entries* and *Memory* in the module
//! docs of [`crate::state`].

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use fairgate_policies::compiled::CompiledBandwidth;

use super::bucket::Bucket;
use super::scopes::{id_addr, Pinned, ScopeId, ShapeId, CLIENT_ID, FREE};
use super::{SlotMap, OVERFLOW, SLOTS};
use crate::clock::Nanos;
use crate::gcra::{Params, Verdict};

/// `Entry::flags` bit: a request found the entry since its shard's last sweep.
pub(super) const SINCE_SWEEP: u32 = 1 << 30;
/// `Entry::flags` bit: a request found the entry since the last [`Store::prune`](super::Store::prune).
pub(super) const SINCE_PRUNE: u32 = 1 << 31;
/// Both CLOCK bits.
pub(super) const TOUCHED: u32 = SINCE_SWEEP | SINCE_PRUNE;
/// `Entry::flags` bits of the in-flight count.
pub(super) const IN_FLIGHT: u32 = SINCE_SWEEP - 1;

/// One tracked (scope, key). 56 bytes (see the module docs, *Memory*).
#[derive(Debug)]
pub struct Entry {
    /// The TATs of a client entry's bandwidth slots; slot 0 is any other entry's own
    /// bucket. Each slot is a [`Bucket`]: its TAT here and its shape in `shapes`.
    tats: [AtomicU64; SLOTS],
    pub(super) key: EntryKey,
    /// The slots' shapes (see [`ShapeId`]): in a client entry, the bandwidth id a slot
    /// holds by the address of the id's text (`Arc<str>`) of the policy generation that
    /// last used it, 0 when free ([`FREE`]), and the slot's capacity. Every id ever used is
    /// pinned by the store ([`Store::pin_ids`](super::Store::pin_ids)), so an address is
    /// never reused for another id; after a reload the slot is matched by the id's text once
    /// and adopts the new address. Addresses change only under the shard's write lock, the
    /// capacity also on use (a lazy rescale). Slot 0 of a non-client entry is its own
    /// bucket (address 0).
    shapes: [AtomicU32; SLOTS],
    pub(super) scope: ScopeId,
    /// Requests in flight (the low 30 bits, [`IN_FLIGHT`]) and the two CLOCK bits:
    /// [`SINCE_SWEEP`] is set when a request finds the entry and cleared by every sweep of
    /// its shard (sweeps evict untouched entries first, so a flood of one-shot keys pushes
    /// out other one-shot keys, not the clients that keep coming back); [`SINCE_PRUNE`] is
    /// cleared by prunes instead, so that a periodic prune neither resets the CLOCK nor
    /// drops an idle entry still in use. The bits are set under the shard's shared lock and
    /// cleared under its exclusive lock; the count changes without a lock (a ticket's
    /// release), so every write is an atomic read-modify-write.
    pub(super) flags: AtomicU32,
}

/// Bytes of a key stored inside the entry itself (no second allocation, no second cache
/// miss on lookup): IPv4 keys, most IPv6 /64 keys (`2001:db8:1:2::/64`) and short API keys
/// fit; a longer key takes an allocation of its own length.
const INLINE_ENTRY_KEY: usize = 22;

/// An entry's key: inline when short, boxed otherwise. 24 bytes.
#[derive(Debug)]
pub(super) enum EntryKey {
    Inline {
        len: u8,
        buf: [u8; INLINE_ENTRY_KEY],
    },
    Boxed(Box<str>),
}

impl EntryKey {
    pub(super) fn new(key: &str) -> Self {
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

    pub(super) fn is(&self, key: &str) -> bool {
        self.bytes() == key.as_bytes()
    }

    pub(super) fn as_str(&self) -> &str {
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

    /// The own bucket of a non-client entry.
    pub(super) fn bucket(&self) -> Bucket<'_> {
        self.slot(0)
    }

    /// Every slot's bucket (a non-client entry uses slot 0 only).
    pub(super) fn buckets(&self) -> impl Iterator<Item = Bucket<'_>> {
        self.tats
            .iter()
            .zip(&self.shapes)
            .map(|(t, s)| Bucket::new(t, s))
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
    pub(super) fn touch(&self) {
        if self.flags.load(Ordering::Relaxed) & TOUCHED != TOUCHED {
            self.flags.fetch_or(TOUCHED, Ordering::Relaxed);
        }
    }

    /// True when a request found the entry since its shard's last sweep.
    pub fn touched(&self) -> bool {
        self.touched_since(SINCE_SWEEP)
    }

    pub(super) fn touched_since(&self, bit: u32) -> bool {
        self.flags.load(Ordering::Relaxed) & bit != 0
    }

    /// Calls `f(tat, capacity)` for every bucket in use: the entry's own, or the used slots
    /// of a client entry.
    pub fn for_each_bucket(&self, mut f: impl FnMut(Nanos, Nanos)) {
        if self.is_client() {
            for b in self.buckets() {
                if b.addr() != 0 {
                    f(b.tat(), b.capacity());
                }
            }
        } else {
            f(self.tat(), self.capacity());
        }
    }

    /// A new entry whose own bucket (slot 0) starts at `tat` with `shape`; a client entry
    /// passes (0, [`FREE`]): its slots are claimed as bandwidths use them.
    pub(super) fn new(scope: ScopeId, key: &str, tat: Nanos, shape: ShapeId) -> Self {
        Entry {
            tats: [AtomicU64::new(tat), AtomicU64::new(0)],
            key: EntryKey::new(key),
            shapes: [AtomicU32::new(shape), AtomicU32::new(FREE)],
            scope,
            // A new entry starts untouched: a key seen once is the first to go.
            flags: AtomicU32::new(0),
        }
    }

    pub(super) fn is_client(&self) -> bool {
        self.scope == CLIENT_ID
    }

    /// Slot `i` of a client entry (an index from a [`SlotMap`]).
    pub(crate) fn slot(&self, i: u8) -> Bucket<'_> {
        let i = usize::from(i) % SLOTS;
        Bucket::new(&self.tats[i], &self.shapes[i])
    }

    /// GCRA check-and-consume of `cost` at `now` on the entry's own bucket.
    pub fn consume(&self, now: Nanos, p: Params, cost: u64) -> Verdict {
        self.bucket().consume(now, p, cost)
    }

    /// A calendar period's check-and-consume on the entry's own bucket (see
    /// `Bucket::consume_period`).
    pub(crate) fn consume_period(
        &self,
        now: Nanos,
        end: Nanos,
        shape_c: Nanos,
        quota: u64,
        cost: u64,
    ) -> Verdict {
        self.bucket().consume_period(now, end, shape_c, quota, cost)
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
    pub(super) fn max_tat(&self) -> Nanos {
        let mut max = 0;
        for t in &self.tats {
            max = max.max(t.load(Ordering::Acquire));
        }
        max
    }

    /// Nothing to remember: every bucket full and nothing in flight.
    pub(super) fn is_idle(&self, now: Nanos) -> bool {
        self.in_flight() == 0 && self.max_tat() <= now
    }

    /// The slots of `ids` found by address alone (the hot path), or `None`.
    #[inline]
    pub(super) fn map_fast(&self, ids: &[CompiledBandwidth]) -> Option<SlotMap> {
        let mut map = [OVERFLOW; SLOTS];
        if ids.is_empty() {
            return Some(map);
        }
        let mut addrs = [0usize; SLOTS];
        for (a, b) in addrs.iter_mut().zip(self.buckets()) {
            *a = b.addr();
        }
        for (m, bw) in map.iter_mut().zip(ids) {
            let addr = id_addr(&bw.id);
            *m = addrs.iter().position(|&a| a == addr)? as u8;
        }
        Some(map)
    }

    /// The slot holding bandwidth `id` by address, or else by text (taking the pinned-id
    /// lock only then); read-only.
    pub(super) fn find_slot(&self, id: &Arc<str>, pinned: &RwLock<Pinned>) -> Option<Bucket<'_>> {
        let addr = id_addr(id);
        if let Some(b) = self.buckets().find(|b| b.addr() == addr) {
            return Some(b);
        }
        let pinned = pinned.read().unwrap_or_else(|e| e.into_inner());
        self.buckets().find(|b| {
            let a = b.addr();
            a != 0 && pinned.get(&a).is_some_and(|(t, _)| **t == **id)
        })
    }
}

/// An entry with its scope's text, as [`Store::for_each`](super::Store::for_each) visits it. Derefs to the
/// [`Entry`].
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    pub(super) entry: &'a Entry,
    pub(super) scope: &'a str,
}

impl EntryRef<'_> {
    /// The scope (bandwidth id or [`CLIENT_SCOPE`](super::CLIENT_SCOPE)).
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
