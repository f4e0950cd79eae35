//! The pure GCRA arithmetic, in integer nanoseconds.
//!
//! A bandwidth "r per P, burst b" has emission interval `T = P / r` and capacity `C = b·T`;
//! its whole state is one timestamp, the theoretical arrival time `TAT` (see PRODUCT.md,
//! "Semantics in numbers"). Every function here is a pure function of `(TAT, now, T, C)`, so
//! the state store can apply it inside a compare-and-swap loop and the tests can check it
//! against a textbook model.
//!
//! - Admit a request of cost `c` iff `max(TAT, now) + c·T − now ≤ C`; then
//!   `TAT ← max(TAT, now) + c·T`. A rejection changes nothing.
//! - Retry after `max(TAT, now) + c·T − C − now` (rounded up to whole seconds in headers,
//!   never 0 while rejected).
//! - Remaining `floor((C − (max(TAT, now) − now)) / T)`, 0 while in debt.
//! - Fill fraction `f = (C − (max(TAT, now) − now)) / C`; `TAT ≤ now` is a full bucket.
//! - Reload to a new capacity `C′`: keep `f`, `TAT ← now + (1 − f)·C′`.
//! - Post-hoc debt `d`: `TAT ← max(TAT, now) + d·T` (may pass `now + C`).
//! - Refund of `c`: `TAT ← max(TAT − c·T, now)`.
//!
//! governor implements the same algorithm, but it has no composite (all-or-nothing)
//! check across several buckets, no post-hoc debt, no state carried across parameter
//! changes and no bounded keyed store; that is why fairgate keeps its own few lines here.
//! Saturating arithmetic everywhere: absurd costs reject instead of wrapping.

use std::time::Duration;

use crate::clock::Nanos;

/// GCRA parameters of one bandwidth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Emission interval `T` in ns (≥ 1).
    pub t: Nanos,
    /// Capacity `C = burst · T` in ns (≥ T).
    pub c: Nanos,
}

impl Params {
    /// Parameters for `count` per `period_ns` with `burst`. `None` if they round to zero
    /// or overflow.
    pub fn new(count: u64, period_ns: Nanos, burst: u64) -> Option<Params> {
        let t = period_ns.checked_div(count)?;
        if t == 0 || burst == 0 {
            return None;
        }
        Some(Params {
            t,
            c: burst.checked_mul(t)?,
        })
    }

    /// The burst in cost units, `C / T`.
    pub fn burst(&self) -> u64 {
        self.c / self.t.max(1)
    }
}

/// The outcome of [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted; store this new TAT.
    Admit {
        /// The new theoretical arrival time.
        tat: Nanos,
    },
    /// Rejected; nothing changes. Retry after `wait` ns.
    Reject {
        /// `max(TAT, now) + c·T − C − now`, in ns, ≥ 1.
        wait: Nanos,
    },
}

/// Checks a request of `cost` units at `now` against a bucket at `tat`.
pub fn check(tat: Nanos, now: Nanos, p: Params, cost: u64) -> Verdict {
    let base = tat.max(now);
    let next = base.saturating_add(cost.saturating_mul(p.t));
    let used = next - now;
    if used <= p.c {
        Verdict::Admit { tat: next }
    } else {
        Verdict::Reject { wait: used - p.c }
    }
}

/// Units left now: `floor((C − (max(TAT, now) − now)) / T)`, 0 in debt.
pub fn remaining(tat: Nanos, now: Nanos, p: Params) -> u64 {
    let used = tat.saturating_sub(now);
    p.c.saturating_sub(used) / p.t.max(1)
}

/// Nanoseconds until the bucket is full again (`max(TAT, now) − now`).
pub fn until_full(tat: Nanos, now: Nanos) -> Nanos {
    tat.saturating_sub(now)
}

/// The fill fraction `f` in `[0, 1]`: 1 is a full (unused) bucket.
pub fn fill_fraction(tat: Nanos, now: Nanos, p: Params) -> f64 {
    let used = tat.saturating_sub(now).min(p.c);
    if p.c == 0 {
        return 1.0;
    }
    (p.c - used) as f64 / p.c as f64
}

/// Moves a bucket computed with capacity `old_c` to capacity `new_c`, keeping its fill
/// fraction: `TAT ← now + (1 − f)·C′`. Identical capacities keep `TAT` as it is (a rate
/// change with the same capacity keeps `f` too). Debt beyond `C` is clamped to an empty
/// bucket (`f` is defined on `[0, 1]`). The used part is rounded up: a reload never
/// hands out capacity.
pub fn rescale(tat: Nanos, now: Nanos, old_c: Nanos, new_c: Nanos) -> Nanos {
    if old_c == new_c || old_c == 0 {
        return tat;
    }
    let used = tat.saturating_sub(now).min(old_c) as u128;
    let scaled = (used * new_c as u128).div_ceil(old_c as u128);
    now.saturating_add(u64::try_from(scaled).unwrap_or(u64::MAX))
}

/// Charges post-hoc debt of `units`: `TAT ← max(TAT, now) + units·T`. Starting from
/// `max(TAT, now)` rather than `TAT` keeps a charge against a full bucket from vanishing
/// into the idle time before it.
pub fn debt(tat: Nanos, now: Nanos, p: Params, units: u64) -> Nanos {
    tat.max(now).saturating_add(units.saturating_mul(p.t))
}

/// Gives back `amount_ns` of consumption: `TAT ← max(TAT − amount, now)`, never below
/// `now` (a refund cannot create more than a full bucket).
pub fn refund(tat: Nanos, now: Nanos, amount_ns: Nanos) -> Nanos {
    tat.saturating_sub(amount_ns).max(now)
}

/// Whole seconds, rounded up, at least 1: the `Retry-After` of a rejection that waits
/// `wait` ns.
pub fn retry_after_secs(wait: Nanos) -> u64 {
    wait.div_ceil(1_000_000_000).max(1)
}

/// [`retry_after_secs`] as a `Duration`.
pub fn retry_after(wait: Nanos) -> Duration {
    Duration::from_secs(retry_after_secs(wait))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn p(count: u64, period: u64, burst: u64) -> Params {
        Params::new(count, period, burst).unwrap()
    }

    #[test]
    fn burst_then_steady_rate() {
        // 10/s burst 5: T = 100ms, C = 500ms.
        let p = p(10, S, 5);
        let now = 10 * S;
        let mut tat = 0;
        for i in 0..5 {
            match check(tat, now, p, 1) {
                Verdict::Admit { tat: t } => tat = t,
                v => panic!("request {i} rejected: {v:?}"),
            }
        }
        assert_eq!(remaining(tat, now, p), 0);
        assert_eq!(
            check(tat, now, p, 1),
            Verdict::Reject { wait: S / 10 },
            "the 6th waits exactly T"
        );
        // After T one more fits.
        assert!(matches!(
            check(tat, now + S / 10, p, 1),
            Verdict::Admit { .. }
        ));
        assert!(matches!(
            check(tat, now + S / 10 - 1, p, 1),
            Verdict::Reject { wait: 1 }
        ));
    }

    #[test]
    fn cost_counts_as_several_units_and_oversized_cost_never_fits() {
        let p = p(10, S, 5);
        let now = S;
        assert!(matches!(check(0, now, p, 5), Verdict::Admit { tat } if tat == now + 5 * p.t));
        assert_eq!(check(0, now, p, 6), Verdict::Reject { wait: p.t });
        assert!(matches!(check(0, now, p, u64::MAX), Verdict::Reject { .. }));
    }

    #[test]
    fn remaining_and_fill_fraction() {
        let p = p(10, S, 10);
        let now = 5 * S;
        assert_eq!(remaining(0, now, p), 10);
        assert_eq!(fill_fraction(0, now, p), 1.0);
        let tat = now + 3 * p.t + 1;
        assert_eq!(remaining(tat, now, p), 6, "floor of 6.99…");
        assert_eq!(remaining(now + 2 * p.c, now, p), 0, "debt has nothing left");
        assert_eq!(fill_fraction(now + p.c, now, p), 0.0);
        assert_eq!(fill_fraction(now + p.c / 2, now, p), 0.5);
    }

    #[test]
    fn rescale_keeps_the_fill_fraction() {
        let now = 100 * S;
        // Half used at C = 2s → half used at C′ = 10s.
        assert_eq!(rescale(now + S, now, 2 * S, 10 * S), now + 5 * S);
        // Identical capacity keeps TAT, even a full bucket's old TAT.
        assert_eq!(rescale(3, now, 2 * S, 2 * S), 3);
        // A full bucket stays full.
        assert_eq!(rescale(3, now, 2 * S, 10 * S), now);
        // Debt clamps to empty.
        assert_eq!(rescale(now + 5 * S, now, 2 * S, 4 * S), now + 4 * S);
        // Rounding goes towards "used".
        assert_eq!(rescale(now + 1, now, 3, 2), now + 1);
    }

    #[test]
    fn debt_and_refund() {
        let p = p(10, S, 5);
        let now = 10 * S;
        assert_eq!(
            debt(0, now, p, 3),
            now + 3 * p.t,
            "debt against a full bucket"
        );
        let deep = debt(now + p.c, now, p, 10);
        assert!(deep > now + p.c, "debt may pass now + C");
        assert!(matches!(check(deep, now, p, 1), Verdict::Reject { .. }));
        assert_eq!(refund(now + 2 * p.t, now, p.t), now + p.t);
        assert_eq!(refund(now + p.t, now, 5 * p.t), now, "never below now");
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(S), 1);
        assert_eq!(retry_after_secs(S + 1), 2);
        assert_eq!(retry_after_secs(0), 1);
    }
}
