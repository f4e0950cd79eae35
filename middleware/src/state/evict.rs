//! Freeing room: sweeps of a full shard, second-chance (CLOCK) eviction that remembers
//! the evicted debt, and prunes. See *Bounded memory and eviction* in the module docs of
//! [`crate::state`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fairgate_policies::compiled::PERIOD_CAPACITY;
use hashbrown::HashTable;

use super::debt::{client_debt_hash, store_debt};
use super::entry::{Entry, SINCE_PRUNE, SINCE_SWEEP};
use super::scopes::{LiveScopes, Pinned, FREE};
use super::store::Store;
use crate::clock::Nanos;

impl Store {
    /// Remembers the debt of an entry being evicted. A calendar period's count is not a
    /// debt (its TAT is the period's end plus the count) and is not remembered: an evicted
    /// client starts its period's count again from 0.
    fn remember_debt(&self, e: &Entry, pinned: &Pinned, now: Nanos) {
        let hash = self.entry_hash(e);
        if e.is_client() {
            for b in e.buckets() {
                if b.capacity() == PERIOD_CAPACITY {
                    continue;
                }
                if let Some((_, id_hash)) = pinned.get(&b.addr()) {
                    let h = client_debt_hash(hash, *id_hash);
                    store_debt(self.debt_slot(h), h, b.tat(), now);
                }
            }
        } else if e.capacity() != PERIOD_CAPACITY {
            store_debt(self.debt_slot(hash), hash, e.tat(), now);
        }
    }

    /// Frees the slots of ids the policy no longer has (under the shard's write lock).
    fn clear_dead_slots(e: &Entry, live: &LiveScopes, pinned: &Pinned) {
        if !e.is_client() || !live.known {
            return;
        }
        for b in e.buckets() {
            let addr = b.addr();
            if addr == 0 {
                continue;
            }
            let dead = pinned.get(&addr).is_none_or(|(id, _)| !live.contains(id));
            if dead {
                b.reset(0, FREE);
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
    pub(super) fn clear_touched(table: &HashTable<Arc<Entry>>, bit: u32) {
        for e in table.iter() {
            if e.flags.load(Ordering::Relaxed) & bit != 0 {
                e.flags.fetch_and(!bit, Ordering::Relaxed);
            }
        }
    }

    /// Frees room in a full shard: drops idle and dead entries, then evicts until 1/8 of
    /// the shard is free: entries not touched since the last sweep first, closest to full
    /// among them, and only then touched ones (closest to full first). Entries with requests
    /// in flight are never evicted. Finally clears every survivor's `touched` bit, so an
    /// entry keeps its second chance only if a request finds it again before the next sweep.
    pub(super) fn sweep(&self, table: &mut HashTable<Arc<Entry>>, now: Nanos, cap: usize) {
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
    /// `SINCE_PRUNE` bits (not the sweeps' CLOCK bits). Bounded by the number of entries; run it
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
}
