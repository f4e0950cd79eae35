//! The evicted-debt table: what an entry evicted while not full still owed, so that its
//! key does not come back with a fresh bucket. See *Bounded memory and eviction* in the
//! module docs of [`crate::state`].

use std::sync::atomic::{AtomicU64, Ordering};

use super::store::Store;
use crate::clock::Nanos;

// === Evicted-debt slots ===
//
// One `AtomicU64` per slot packs a 16-bit tag (the high bits of the hash of the key that
// owns the debt) with the debt's TAT in whole microseconds, rounded up and saturating at 48
// bits (≈ 8.9 years of clock). Tag `MIXED` means "keys of different tags wrote here while
// their debts were live"; the slot then holds the largest of them.

/// Tag of a slot that holds the maximum debt of several keys.
pub(super) const MIXED: u16 = u16::MAX;
const DEBT_TAT_BITS: u32 = 48;
pub(super) const DEBT_TAT_MAX: u64 = (1 << DEBT_TAT_BITS) - 1;

/// The hash that picks the evicted-debt slot of bandwidth `id_hash` in the client entry
/// of `hash`.
pub(super) fn client_debt_hash(hash: u64, id_hash: u64) -> u64 {
    hash ^ id_hash.rotate_left(17)
}

/// The tag of `hash` (its high 16 bits; the slot index uses the low bits). Never `MIXED`.
pub(super) fn debt_tag(hash: u64) -> u16 {
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
pub(super) fn store_debt(slot: &AtomicU64, hash: u64, tat: Nanos, now: Nanos) {
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
pub(super) fn debt_for(slot: &AtomicU64, hash: u64, now: Nanos) -> Nanos {
    let (tag, tat) = unpack_debt(slot.load(Ordering::Relaxed));
    if tat > now && (tag == debt_tag(hash) || tag == MIXED) {
        tat
    } else {
        0
    }
}

impl Store {
    pub(super) fn debt_slot(&self, hash: u64) -> &AtomicU64 {
        &self.evicted[(hash as usize) & (self.evicted.len() - 1)]
    }
}
