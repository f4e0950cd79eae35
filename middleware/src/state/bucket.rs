//! One GCRA bucket in atomics: its TAT and the capacity it was computed with, rescaled
//! lazily after a reload (see the module docs of [`crate::state`]).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::clock::Nanos;
use crate::gcra::{self, Params, Verdict};

/// One GCRA bucket: its TAT, and the capacity the TAT was last computed with (so a reload
/// can rescale it lazily).
#[derive(Debug, Default)]
pub(crate) struct Bucket {
    tat: AtomicU64,
    cap: AtomicU64,
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
    pub(super) fn reset(&self, tat: Nanos, cap: Nanos) {
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
