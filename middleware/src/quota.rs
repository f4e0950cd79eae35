//! Per-client quotas: which plan applies, the all-or-nothing check of its bandwidths, and
//! the record of what a decision consumed so that a later rejection can give it back.
//!
//! Plan resolution: a per-client override (`clients`, the overrides file) wins, then a
//! `tag` rule's plan, then `default_plan`. An override's own bandwidths and concurrency
//! replace the plan's. A client with no plan has no per-client quota.
//!
//! The bandwidths are consumed one by one (a CAS each); when one rejects, the ones already
//! consumed are refunded (`TAT ← max(TAT − c·T, now)`), which restores them exactly when no
//! other request of the same key raced in between, so a rejected request consumes nothing.
//!
//! A calendar-period bandwidth (`{quota: N, period: month}`) is checked by the same
//! arithmetic at another time ([`bucket_now`]): its count `n` is kept as `TAT = end + n`
//! (`T` = 1 ns) against the end of the period holding now, so it takes part in the same
//! all-or-nothing check and the same refunds, and a TAT left by an earlier period reads as 0.

use std::sync::Arc;

use fairgate_policies::compiled::{
    ClientQuota, CompiledBandwidth, CompiledGrowth, CompiledPlan, CompiledPolicy, PlanId,
};
use fairgate_policies::units::Rate;

use crate::bucket::{bucket_now, limit, params};
use crate::clock::{Nanos, WallAnchor};
use crate::decision::RateLimitInfo;
use crate::gcra::{self, Params, Verdict};
use crate::ledger::{Charge, Charges};
use crate::state::{Entry, Full, SlotMap, Store, OVERFLOW};

/// The quota that applies to one request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Quota<'p> {
    pub(crate) plan: Option<&'p CompiledPlan>,
    pub(crate) bandwidths: Option<&'p Arc<[CompiledBandwidth]>>,
    pub(crate) concurrency: Option<u32>,
    /// Never borrowed past: the plan's or the override's `fixed`.
    pub(crate) fixed: bool,
    /// The client holds a self-set cap ([`crate::caps`]): it never borrows.
    pub(crate) capped: bool,
    /// Adaptive growth ([`crate::growth`]): the override's, else the plan's; `None` when
    /// fixed or capped.
    pub(crate) growth: Option<&'p Arc<CompiledGrowth>>,
}

/// Resolves the quota of `client_key` (override, then tagged plan, then default plan).
#[inline]
pub(crate) fn resolve<'p>(
    pol: &'p CompiledPolicy,
    client_key: &str,
    tagged: Option<PlanId>,
) -> Quota<'p> {
    // A lapsed override (`expires` passed) counts as none.
    let over: Option<&ClientQuota> = pol.client(client_key);
    let plan_id = over.and_then(|o| o.plan).or(tagged).or(pol.default_plan);
    let plan = plan_id.and_then(|i| pol.plans.get(i));
    let fixed = over.is_some_and(|o| o.fixed) || plan.is_some_and(|p| p.fixed);
    Quota {
        plan,
        bandwidths: over
            .and_then(|o| o.bandwidths.as_ref())
            .or(plan.map(|p| &p.bandwidths)),
        concurrency: over
            .and_then(|o| o.concurrency)
            .or(plan.and_then(|p| p.concurrency)),
        fixed,
        capped: false,
        growth: over
            .and_then(|o| o.growth.as_ref())
            .or(plan.and_then(|p| p.growth.as_ref()))
            .filter(|_| !fixed),
    }
}

/// The RateLimit numbers of `bw` for a bucket at `tat`; `all` is the client's whole quota
/// (`None` for a rule's `limit`), advertised with it.
///
/// A calendar period's `reset_secs` is the time to the period's end (its reset), whatever
/// is used; its window is the period's nominal length (a day, 7 days, 30 days).
pub(crate) fn ratelimit_info(
    bw: &CompiledBandwidth,
    all: Option<&Arc<[CompiledBandwidth]>>,
    tat: Nanos,
    now: Nanos,
    wall: u64,
) -> RateLimitInfo {
    let at = bucket_now(bw, now, wall);
    let (quota, window_secs) = quota_window(bw.rate);
    let reset = match bw.period {
        None => gcra::until_full(tat, now),
        Some(_) => at.saturating_sub(now),
    };
    RateLimitInfo {
        bandwidth: Arc::clone(&bw.name),
        quota,
        window_secs,
        burst: bw.burst,
        remaining: gcra::remaining(tat, at, limit(bw)),
        reset_secs: reset.div_ceil(1_000_000_000),
        bandwidths: all.cloned(),
    }
}

/// A rate as `q` units per `w` whole seconds (see [`RateLimitInfo`]): exact when the period
/// is whole seconds, else over the period rounded up, `q` rounded down.
pub(crate) fn quota_window(rate: Rate) -> (u64, u64) {
    const SEC: u64 = 1_000_000_000;
    let period = rate.period_ns();
    if period % SEC == 0 {
        return (rate.count(), period / SEC);
    }
    let w = period.div_ceil(SEC);
    let q = u128::from(rate.count()) * u128::from(w) * u128::from(SEC) / u128::from(period);
    (u64::try_from(q).unwrap_or(u64::MAX), w)
}

/// The concurrency permit a quota check took, if it got that far.
#[derive(Debug)]
pub(crate) enum Permit {
    /// Not tried (no limit, or left to the caller: see [`consume`]).
    NotTried,
    /// Taken: the client entry whose counter the ticket releases.
    Taken(Arc<Entry>),
    /// Refused: the limit is reached.
    Refused,
}

/// The outcome of consuming a plan's bandwidths.
#[derive(Debug)]
pub(crate) enum Consumed<'p> {
    /// All admitted; `tightest` is the most constraining bandwidth (fewest remaining)
    /// with its TAT after the charge.
    Admitted {
        tightest: Option<(&'p CompiledBandwidth, Nanos)>,
        permit: Permit,
    },
    /// `bandwidth` rejected (the earlier ones were rolled back).
    Rejected {
        bandwidth: &'p CompiledBandwidth,
        wait: Nanos,
        tat: Nanos,
    },
}

/// Fewest remaining so far: (bandwidth, TAT after the charge, remaining).
type Tightest<'p> = Option<(&'p CompiledBandwidth, Nanos, u64)>;

/// Checks and consumes `cost` on every bandwidth for `key`, all or nothing, then, when
/// all are admitted and `concurrency` is set, takes a permit of that limit: one lookup of
/// the client entry when every bandwidth lives in its slots. The permit is left to the
/// caller ([`Permit::NotTried`]) when some bandwidth lives in its own entry. `wall` places
/// the clock in wall time for calendar periods ([`bucket_now`]).
#[allow(clippy::too_many_arguments)] // the decision's own parts, passed through
pub(crate) fn consume<'x>(
    store: &Store,
    bandwidths: &'x [CompiledBandwidth],
    concurrency: Option<u32>,
    key: &'x str,
    cost: u64,
    now: Nanos,
    wall: &WallAnchor,
    charges: &mut Charges<'x, '_>,
) -> Result<Consumed<'x>, Full> {
    let start = charges.len();
    let mut tightest: Tightest<'x> = None;
    let (slotted, map) = store.with_client(key, now, bandwidths, |e, map| {
        let r = consume_slots(
            e,
            map,
            bandwidths,
            key,
            cost,
            (now, wall),
            charges,
            &mut tightest,
        );
        let r = match r {
            None => {
                let all_slotted =
                    bandwidths.len() <= map.len() && !map[..bandwidths.len()].contains(&OVERFLOW);
                let permit = match concurrency {
                    Some(limit) if all_slotted => {
                        if e.try_acquire(u64::from(limit)) {
                            Permit::Taken(Arc::clone(e))
                        } else {
                            Permit::Refused
                        }
                    }
                    _ => Permit::NotTried,
                };
                Ok(permit)
            }
            Some(rejected) => Err(rejected),
        };
        (r, *map)
    })?;
    let permit = match slotted {
        Ok(permit) => permit,
        Err(rejected) => return Ok(rejected),
    };
    // Bandwidths in their own entries (beyond the slots, or no free slot).
    for (i, bw) in bandwidths.iter().enumerate() {
        if map.get(i).is_some_and(|&s| s != OVERFLOW) {
            continue;
        }
        let p = params(bw);
        let (at, lim) = match bw.period {
            None => (now, p),
            Some(_) => (bucket_now(bw, now, wall.offset()), limit(bw)),
        };
        let result = store.with_entry(&bw.id, key, now, bw.c_ns, |e| match bw.period {
            None => e.consume(now, p, cost),
            Some(_) => e.consume_period(now, at, bw.c_ns, bw.burst, cost),
        });
        let verdict = match result {
            Ok(v) => v,
            Err(full) => {
                charges.rollback_from(start);
                return Err(full);
            }
        };
        match verdict {
            Verdict::Admit { tat } => {
                charges.push(Charge::Bucket {
                    scope: &bw.id,
                    key,
                    amount: cost.saturating_mul(p.t),
                });
                note_tightest(&mut tightest, bw, tat, at, lim);
            }
            Verdict::Reject { wait } => {
                charges.rollback_from(start);
                // The bucket as it stands, for the RateLimit numbers.
                let tat = store.with_existing(&bw.id, key, |e| e.tat()).unwrap_or(now);
                return Ok(Consumed::Rejected {
                    bandwidth: bw,
                    wait,
                    tat,
                });
            }
        }
    }
    Ok(Consumed::Admitted {
        tightest: tightest.map(|(bw, tat, _)| (bw, tat)),
        permit,
    })
}

/// `at` is the bandwidth's [`bucket_now`], `p` its [`limit`].
fn note_tightest<'p>(
    tightest: &mut Tightest<'p>,
    bw: &'p CompiledBandwidth,
    tat: Nanos,
    at: Nanos,
    p: Params,
) {
    let left = gcra::remaining(tat, at, p);
    if tightest.is_none_or(|(_, _, l)| left < l) {
        *tightest = Some((bw, tat, left));
    }
}

/// Consumes on the slotted bandwidths of a client entry; on a rejection, refunds what it
/// consumed here and returns the rejection.
#[allow(clippy::too_many_arguments)] // one call site; the parts are the decision's own
#[inline]
fn consume_slots<'x>(
    e: &Entry,
    map: &SlotMap,
    bandwidths: &'x [CompiledBandwidth],
    key: &'x str,
    cost: u64,
    (now, wall): (Nanos, &WallAnchor),
    charges: &mut Charges<'x, '_>,
    tightest: &mut Tightest<'x>,
) -> Option<Consumed<'x>> {
    for (i, (bw, &slot)) in bandwidths.iter().zip(map).enumerate() {
        if slot == OVERFLOW {
            continue;
        }
        let bucket = e.slot(slot);
        // The offset to wall time is read only for a calendar period.
        let (verdict, at, p) = match bw.period {
            None => {
                let p = params(bw);
                (bucket.consume(now, p, cost), now, p)
            }
            Some(_) => {
                let at = bucket_now(bw, now, wall.offset());
                let v = bucket.consume_period(now, at, bw.c_ns, bw.burst, cost);
                (v, at, limit(bw))
            }
        };
        match verdict {
            Verdict::Admit { tat } => note_tightest(tightest, bw, tat, at, p),
            Verdict::Reject { wait } => {
                for (earlier, &s) in bandwidths[..i].iter().zip(map) {
                    if s != OVERFLOW {
                        e.slot(s).refund(now, cost.saturating_mul(earlier.t_ns));
                    }
                }
                return Some(Consumed::Rejected {
                    bandwidth: bw,
                    wait,
                    tat: bucket.tat(),
                });
            }
        }
    }
    for (bw, &slot) in bandwidths.iter().zip(map) {
        if slot != OVERFLOW {
            charges.push(Charge::Slot {
                id: &bw.id,
                key,
                amount: cost.saturating_mul(bw.t_ns),
            });
        }
    }
    None
}
