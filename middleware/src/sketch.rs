//! [`Sketch`]: the fixed-memory sliding-window counter behind `limit` rules with
//! `estimator: sketch` (two pingora-limits count-min sketches). Counts per process only.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};

use fairgate_policies::compiled::CompiledBandwidth;
use pingora_limits::estimator::Estimator;

use crate::clock::Nanos;

/// A fixed-memory sliding-window counter for `limit` rules with `estimator: sketch`
/// (two pingora-limits count-min sketches, current and previous window).
///
/// The window is the bandwidth's capacity `C` (the time a full burst takes to refill) and
/// the limit its burst: a key is admitted while `previous × (1 − elapsed/C) + current + cost
/// ≤ burst`. A count-min sketch may over-count (collisions), never under-count, so the
/// error is towards rejecting; memory is fixed whatever the number of keys.
pub struct Sketch {
    window_ns: Nanos,
    limit: u64,
    est: [Estimator; 2],
    window: AtomicU64,
    /// The parameters it was built for, to reuse it across reloads.
    pub(crate) built_for: (Nanos, Nanos),
}

/// Rows of each count-min sketch.
const SKETCH_HASHES: usize = 4;
/// Columns of each row.
const SKETCH_SLOTS: usize = 4096;

impl Sketch {
    /// A sketch for `bw`.
    pub fn new(bw: &CompiledBandwidth) -> Self {
        Sketch {
            window_ns: bw.c_ns.max(1),
            limit: bw.burst,
            est: [
                Estimator::new(SKETCH_HASHES, SKETCH_SLOTS),
                Estimator::new(SKETCH_HASHES, SKETCH_SLOTS),
            ],
            window: AtomicU64::new(0),
            built_for: (bw.t_ns, bw.c_ns),
        }
    }

    /// Moves to the window of `now`; returns (current, previous, weight of previous).
    fn at(&self, now: Nanos) -> (&Estimator, &Estimator, f64) {
        let w = now / self.window_ns;
        let stored = self.window.load(Ordering::Acquire);
        if w > stored
            && self
                .window
                .compare_exchange(stored, w, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // The slot of `w` held window `w − 2` (or older): clear it. If more than one
            // window passed, the previous one is stale too.
            self.est[(w % 2) as usize].reset();
            if w > stored + 1 {
                self.est[((w + 1) % 2) as usize].reset();
            }
        }
        let elapsed = (now % self.window_ns) as f64 / self.window_ns as f64;
        (
            &self.est[(w % 2) as usize],
            &self.est[((w + 1) % 2) as usize],
            1.0 - elapsed,
        )
    }

    fn estimate<K: Hash + Copy>(&self, now: Nanos, key: K) -> (f64, &Estimator) {
        let (cur, prev, weight) = self.at(now);
        let est = prev.get(key).max(0) as f64 * weight + cur.get(key).max(0) as f64;
        (est, cur)
    }

    /// Counts `cost` for `key` if it fits; otherwise `Err(wait)` (until the next window).
    pub fn check_and_count(&self, now: Nanos, key: &str, cost: u64) -> Result<(), Nanos> {
        let (est, cur) = self.estimate(now, key);
        if est + cost as f64 <= self.limit as f64 {
            cur.incr(key, isize::try_from(cost).unwrap_or(isize::MAX));
            Ok(())
        } else {
            Err((self.window_ns - now % self.window_ns).max(1))
        }
    }

    /// Takes back a count made at (about) `now`.
    pub fn uncount(&self, now: Nanos, key: &str, cost: u64) {
        let (cur, _, _) = self.at(now);
        cur.decr(key, isize::try_from(cost).unwrap_or(isize::MAX));
    }
}

impl std::fmt::Debug for Sketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sketch")
            .field("window_ns", &self.window_ns)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fairgate_policies::units::Rate;
    use std::sync::Arc;
    use std::time::Duration;

    const S: u64 = 1_000_000_000;

    #[test]
    fn sketch_limits_per_key_per_window() {
        let bw = CompiledBandwidth::new(
            Arc::from("rule:r"),
            Arc::from("r"),
            Rate::new(5, Duration::from_secs(60)).unwrap(),
            5,
        )
        .unwrap();
        let s = Sketch::new(&bw);
        let now = 600 * S; // the start of a window
        for _ in 0..5 {
            assert!(s.check_and_count(now, "a", 1).is_ok());
        }
        assert!(s.check_and_count(now, "a", 1).is_err());
        assert!(
            s.check_and_count(now, "b", 1).is_ok(),
            "other keys unaffected"
        );
        s.uncount(now, "a", 1);
        assert!(s.check_and_count(now, "a", 1).is_ok(), "uncount gives back");
        // Half-way through the next window, half of the previous still counts.
        let later = now + 90 * S;
        for _ in 0..2 {
            assert!(s.check_and_count(later, "a", 1).is_ok());
        }
        assert!(s.check_and_count(later, "a", 1).is_err());
        // Two windows on, everything is forgotten.
        let much_later = now + 300 * S;
        for _ in 0..5 {
            assert!(s.check_and_count(much_later, "a", 1).is_ok());
        }
    }
}
