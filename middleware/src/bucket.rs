//! How a compiled bandwidth is kept as GCRA state: its parameters, and the time its state is
//! read at (a calendar period's end). Below `quota`, `event` and `concurrency`, which all read
//! buckets, so that none of them imports another (no module cycle).

use fairgate_policies::compiled::CompiledBandwidth;

use crate::clock::Nanos;
use crate::gcra::Params;

/// GCRA parameters of a compiled bandwidth: what its state is kept with (for a calendar
/// period `T` = 1 ns and the capacity every period shares, see [`limit`]).
#[inline]
pub(crate) fn params(bw: &CompiledBandwidth) -> Params {
    Params {
        t: bw.t_ns,
        c: bw.c_ns,
    }
}

/// The parameters a bandwidth admits by: [`params`], or for a calendar period `T` = 1 ns
/// and `C` = its quota.
#[inline]
pub(crate) fn limit(bw: &CompiledBandwidth) -> Params {
    match bw.period {
        None => params(bw),
        Some(_) => Params { t: 1, c: bw.burst },
    }
}

/// The time a bandwidth's state is read at: `now` for a GCRA bucket; for a calendar period
/// the end of the period holding `now`, on the engine's clock (`wall` is the clock's
/// offset to Unix time, [`crate::clock::WallAnchor`]). A period's count `n` is kept as
/// `TAT = end + n`, so at this time GCRA admits iff `n + cost ≤ quota` and leaves
/// `quota − n`; a TAT of an earlier period (at most its end + quota, and a quota is at most
/// 10¹² ns, less than any period) reads as 0. Two compares while the period lasts.
#[inline]
pub(crate) fn bucket_now(bw: &CompiledBandwidth, now: Nanos, wall: u64) -> Nanos {
    match &bw.period {
        None => now,
        Some(p) => p.current(now.saturating_add(wall)).1.saturating_sub(wall),
    }
}
