//! One GCRA bucket in atomics: its TAT and its shape (the bandwidth id it holds and the
//! capacity the TAT was computed with), rescaled lazily after a reload (see the module docs
//! of [`crate::state`]).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::scopes::{shapes, ShapeId};
use crate::clock::Nanos;
use crate::gcra::{self, Params, Verdict};

/// One GCRA bucket of an entry: its TAT, and its shape: the capacity the TAT was last
/// computed with (so a reload can rescale it lazily) and, in a client entry's slot, the
/// bandwidth id it holds. A view of two of the entry's atomics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket<'a> {
    tat: &'a AtomicU64,
    shape: &'a AtomicU32,
}

// === impl Bucket ===

impl<'a> Bucket<'a> {
    pub(super) fn new(tat: &'a AtomicU64, shape: &'a AtomicU32) -> Self {
        Bucket { tat, shape }
    }

    /// The current theoretical arrival time.
    pub(crate) fn tat(&self) -> Nanos {
        self.tat.load(Ordering::Acquire)
    }

    /// The capacity the TAT was last computed with.
    pub(crate) fn capacity(&self) -> Nanos {
        shapes().get(self.shape.load(Ordering::Acquire)).1
    }

    /// The address of the bandwidth id the slot holds (0: free, or a non-client entry's
    /// own bucket).
    #[inline]
    pub(super) fn addr(&self) -> usize {
        shapes().get(self.shape.load(Ordering::Acquire)).0
    }

    /// Resets the bucket (a new entry, or slot reuse; under the shard's write lock).
    pub(super) fn reset(&self, tat: Nanos, shape: ShapeId) {
        self.tat.store(tat, Ordering::Release);
        self.shape.store(shape, Ordering::Release);
    }

    /// Gives the bucket another shape without touching its TAT (a new generation's
    /// address for the same id; under the shard's write lock).
    pub(super) fn set_shape(&self, shape: ShapeId) {
        self.shape.store(shape, Ordering::Release);
    }

    /// Rescales to capacity `c` if the bucket was computed with another (lazy reload).
    /// `false` only when the shape table is full (a million distinct (id, capacity)
    /// pairs): then the bucket keeps its old capacity.
    #[inline]
    fn sync_capacity(&self, now: Nanos, c: Nanos) -> bool {
        let old = self.shape.load(Ordering::Acquire);
        let (addr, old_c) = shapes().get(old);
        old_c == c || self.rescale(now, old, addr, old_c, c)
    }

    /// [`Bucket::sync_capacity`] after a change: moves the shape from `old` (`addr`,
    /// `old_c`) to (`addr`, `c`).
    #[cold]
    fn rescale(&self, now: Nanos, old: ShapeId, addr: usize, old_c: Nanos, c: Nanos) -> bool {
        let Some(next) = shapes().intern(addr, c) else {
            return false;
        };
        // Only the thread that moves the shape rescales, so a bucket is rescaled once per
        // change.
        if self
            .shape
            .compare_exchange(old, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.update(|tat| Some(gcra::rescale(tat, now, old_c, c)));
        }
        true
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

    /// GCRA check-and-consume of `cost` at `now`. Refused (as a full table refuses a new
    /// key) when the bucket cannot take capacity `p.c` (the shape table is full).
    pub(crate) fn consume(&self, now: Nanos, p: Params, cost: u64) -> Verdict {
        let mut verdict = Verdict::Reject { wait: 1 };
        if !self.sync_capacity(now, p.c) {
            return verdict;
        }
        self.update(|tat| {
            verdict = gcra::check(tat, now, p, cost);
            match verdict {
                Verdict::Admit { tat } => Some(tat),
                Verdict::Reject { .. } => None,
            }
        });
        verdict
    }

    /// A calendar period's check-and-consume of `cost` against `quota` (see
    /// [`crate::bucket::bucket_now`]): GCRA with `T = 1 ns`, `C = quota` at `end`, the
    /// period's end. The bucket keeps capacity `shape_c` (the same for every quota, so a
    /// quota change keeps the count). A rejection waits until `end`, the period's reset.
    pub(crate) fn consume_period(
        &self,
        now: Nanos,
        end: Nanos,
        shape_c: Nanos,
        quota: u64,
        cost: u64,
    ) -> Verdict {
        let mut verdict = Verdict::Reject { wait: 1 };
        if !self.sync_capacity(end, shape_c) {
            return verdict;
        }
        let p = Params { t: 1, c: quota };
        self.update(|tat| {
            verdict = gcra::check(tat, end, p, cost);
            match verdict {
                Verdict::Admit { tat } => Some(tat),
                Verdict::Reject { .. } => None,
            }
        });
        match verdict {
            Verdict::Reject { .. } => Verdict::Reject {
                wait: end.saturating_sub(now).max(1),
            },
            admit => admit,
        }
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
