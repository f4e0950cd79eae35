//! Staggered retries (`responses.retry_stagger`): clients rejected together by one bucket are
//! told to come back one after another, at the bucket's refill rate, instead of all at its
//! reset — so the retries that obey `Retry-After` find room.
//!
//! Each bucket that rejects keeps a *promise*: the TAT its bucket would have if every client
//! told to retry so far came back and was admitted (a GCRA of the promises). A rejected request
//! is told `max(its own wait, promise − C − now)`, never earlier than the bucket's own reset and
//! at most `max` later, and advances the promise by its cost. The promises live in a table of
//! fixed size shared by every bucket (no state per client): a slot taken by another bucket
//! starts that bucket's promise afresh, so a collision only makes a retry less spread, never
//! earlier. Only rejections touch it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Nanos;
use crate::gcra::Params;

/// Slots in the promise table (a power of two).
const SLOTS: usize = 4096;

/// The promise table.
pub(crate) struct Stagger {
    hasher: ahash::RandomState,
    /// Per slot: the owner's hash, then its promised TAT.
    slots: Box<[(AtomicU64, AtomicU64)]>,
}

impl std::fmt::Debug for Stagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stagger")
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl Stagger {
    pub(crate) fn new() -> Self {
        Stagger {
            hasher: ahash::RandomState::new(),
            slots: (0..SLOTS)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
        }
    }

    /// The wait to tell a request that bucket (`scope`, `key`) rejected at `now`: its own
    /// `wait` (the bucket's reset for it), spread after the requests told before it, at most
    /// `max` more. `tat` is the bucket's TAT, `cost` the request's.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn wait(
        &self,
        scope: &str,
        key: &str,
        p: Params,
        cost: u64,
        tat: Nanos,
        now: Nanos,
        wait: Nanos,
        max: Duration,
    ) -> Nanos {
        if max.is_zero() {
            return wait;
        }
        let h = self.hasher.hash_one((scope, key)) | 1;
        let (owner, promise) = &self.slots[(h as usize) & (SLOTS - 1)];
        let step = p.t.saturating_mul(cost.max(1));
        let base = tat.max(now);
        let mut cur = if owner.swap(h, Ordering::AcqRel) == h {
            promise.load(Ordering::Acquire)
        } else {
            0
        };
        // Advance the promise by this request's cost from where it is (or from the bucket's
        // TAT, when the promises are behind it: nobody is waiting then).
        let promised = loop {
            let from = cur.max(base);
            let next = from.saturating_add(step);
            match promise.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break next,
                Err(actual) => cur = actual,
            }
        };
        // The request fits once the bucket's TAT is at most `now + C − step`.
        let turn = promised.saturating_sub(p.c).saturating_sub(now);
        let max = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        turn.clamp(wait, wait.saturating_add(max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    #[test]
    fn a_herd_is_told_to_come_back_at_the_refill_rate() {
        let s = Stagger::new();
        // 1 per second, burst 1: full at TAT = now + 1 s.
        let p = Params { t: S, c: S };
        let now = 100 * S;
        let tat = now + S;
        let waits: Vec<Nanos> = (0..5)
            .map(|_| s.wait("b", "k", p, 1, tat, now, S, Duration::from_secs(60)))
            .collect();
        assert_eq!(waits, [S, 2 * S, 3 * S, 4 * S, 5 * S]);
        // Another bucket starts its own queue.
        assert_eq!(
            s.wait("b", "other", p, 1, tat, now, S, Duration::from_secs(60)),
            S
        );
    }

    #[test]
    fn never_earlier_than_the_reset_and_at_most_max_later() {
        let s = Stagger::new();
        let p = Params { t: S, c: S };
        let now = 100 * S;
        for i in 0..100 {
            let w = s.wait("b", "k", p, 1, now + S, now, S, Duration::from_secs(10));
            assert!((S..=11 * S).contains(&w), "{i}: {w}");
        }
        // Off: the reset.
        assert_eq!(s.wait("b", "k", p, 1, now + S, now, S, Duration::ZERO), S);
        // Once the bucket's own TAT is past every promise, the queue starts from it.
        let later = now + 1000 * S;
        assert_eq!(
            s.wait("b", "k", p, 1, later + S, later, S, Duration::from_secs(10)),
            S
        );
    }
}
