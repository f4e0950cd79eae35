//! Self-set caps: a client's own lower limits on bandwidths of its quota and on its
//! concurrency, set through the usage endpoint (`usage_endpoint.self_caps`) and kept in
//! `usage_endpoint.caps_file`.
//!
//! The engine holds the live set of caps ([`CapState`]); each policy generation's prepared
//! cache compiles them against that generation's plans and overrides ([`compile`]) into
//! capped copies of the bandwidth sets they touch, so the quota stage swaps a set for its
//! capped copy with one map lookup, only when some client has a cap ([`apply`]).
//!
//! A capped bandwidth keeps its bandwidth id (the same `Arc`), so the client's bucket carries
//! over: it is rescaled to the capped capacity keeping its fill fraction, exactly as a reload
//! that changes the bandwidth rescales it, and rescaled back when the cap is lifted. Setting a
//! cap therefore never refills a bucket. A cap is never above the quota: [`capped`] takes the
//! lower of the two, whatever the policy says after a reload.
//!
//! Bounds: at most `usage_endpoint.max_caps` clients hold a cap; writes are serialised and
//! limited to [`WRITES_PER_SECOND`] per process (burst [`WRITE_BURST`]), because each
//! distinct capped capacity takes a place in the state store's process-wide shape table and
//! each write rewrites the caps file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use ahash::RandomState;
use fairgate_policies::compiled::{CompiledBandwidth, CompiledPolicy};
use fairgate_policies::model::{BandwidthCap, ClientCap};
use fairgate_policies::units::Rate;

use crate::clock::Nanos;
use crate::quota::{self, Quota};

/// Accepted cap writes per second, per process.
pub(crate) const WRITES_PER_SECOND: u64 = 1;
/// Accepted cap writes in a burst.
pub(crate) const WRITE_BURST: u64 = 10;

/// The engine's live caps.
#[derive(Debug, Default)]
pub(crate) struct CapState {
    /// The `caps_file` (as written in the policy) the caps were read from.
    pub(crate) file: Option<String>,
    /// Client key → cap.
    pub(crate) by_key: Arc<BTreeMap<String, ClientCap>>,
    /// The write limiter's TAT (GCRA, [`WRITES_PER_SECOND`], burst [`WRITE_BURST`]).
    pub(crate) write_tat: Nanos,
}

impl CapState {
    /// The caps `pol` was loaded with.
    pub(crate) fn of(pol: &CompiledPolicy) -> CapState {
        CapState {
            file: caps_file(pol),
            by_key: Arc::clone(&pol.caps),
            write_tat: 0,
        }
    }

    /// Takes one write from the limiter at `now`, or says how long to wait.
    pub(crate) fn take_write(&mut self, now: Nanos) -> Result<(), Duration> {
        const T: Nanos = 1_000_000_000 / WRITES_PER_SECOND;
        let tat = self.write_tat.max(now);
        let allowed = now + T * WRITE_BURST;
        if tat + T > allowed {
            return Err(Duration::from_nanos(tat + T - allowed));
        }
        self.write_tat = tat + T;
        Ok(())
    }
}

/// The `caps_file` `pol` names.
pub(crate) fn caps_file(pol: &CompiledPolicy) -> Option<String> {
    pol.source
        .usage_endpoint
        .as_ref()
        .and_then(|u| u.caps_file.clone())
}

/// One client's caps compiled against a policy generation.
#[derive(Debug)]
pub(crate) struct Capped {
    /// (address of a bandwidth set of the policy, its capped copy).
    sets: Box<[(usize, Arc<[CompiledBandwidth]>)]>,
    /// The concurrency cap.
    concurrency: Option<u32>,
}

/// Client key → its compiled caps.
pub(crate) type CappedMap = HashMap<Arc<str>, Capped, RandomState>;

fn set_addr(set: &Arc<[CompiledBandwidth]>) -> usize {
    Arc::as_ptr(set).cast::<u8>() as usize
}

/// Compiles `caps` against `pol`: for each capped client, a capped copy of every bandwidth
/// set (each plan's, and its override's) that has a bandwidth it caps.
pub(crate) fn compile(pol: &CompiledPolicy, caps: &BTreeMap<String, ClientCap>) -> CappedMap {
    let mut out = CappedMap::with_capacity_and_hasher(caps.len(), RandomState::new());
    for (key, cap) in caps {
        let mut sets = Vec::new();
        if !cap.bandwidths.is_empty() {
            let own = pol
                .clients
                .get(key.as_str())
                .and_then(|c| c.bandwidths.as_ref());
            for set in pol.plans.iter().map(|p| &p.bandwidths).chain(own) {
                if !set.iter().any(|b| cap.bandwidths.contains_key(&*b.name)) {
                    continue;
                }
                let capped: Vec<CompiledBandwidth> = set
                    .iter()
                    .map(|b| match cap.bandwidths.get(&*b.name) {
                        Some(c) => capped(b, c).unwrap_or_else(|| b.clone()),
                        None => b.clone(),
                    })
                    .collect();
                sets.push((set_addr(set), Arc::from(capped)));
            }
        }
        out.insert(
            Arc::from(key.as_str()),
            Capped {
                sets: sets.into(),
                concurrency: cap.concurrency,
            },
        );
    }
    out
}

/// `bw` held to `cap`: `min(cap.quota, q)` per the same window `w` as its `RateLimit-Policy`
/// item, burst `cap.burst` or the burst scaled by `quota / q`, never above `bw.burst`.
/// The same id and name, so the bucket carries over. `None` when the bucket cannot be
/// represented (the caller refuses such a cap).
///
/// A calendar period's cap lowers its quota for the period (same id, period and capacity,
/// so the period's count carries over as it is).
pub(crate) fn capped(bw: &CompiledBandwidth, cap: &BandwidthCap) -> Option<CompiledBandwidth> {
    if let Some(period) = &bw.period {
        let mut out = bw.clone();
        out.burst = cap.quota.clamp(1, bw.burst);
        out.rate = Rate::new(out.burst, period.unit.nominal())?;
        return Some(out);
    }
    let (q, w) = quota::quota_window(bw.rate);
    let quota = cap.quota.clamp(1, q.max(1));
    let scaled = (u128::from(bw.burst) * u128::from(quota) / u128::from(q.max(1))).max(1);
    let burst = cap
        .burst
        .unwrap_or(u64::try_from(scaled).unwrap_or(u64::MAX))
        .clamp(1, bw.burst);
    if quota == q && burst == bw.burst {
        return Some(bw.clone());
    }
    let rate = Rate::new(quota, Duration::from_secs(w))?;
    // Never faster than the quota, whatever the rounding of `w` did.
    if rate.period_ns() / quota < bw.t_ns {
        return Some(bw.clone());
    }
    CompiledBandwidth::new(Arc::clone(&bw.id), Arc::clone(&bw.name), rate, burst)
}

/// `q` with `capped`'s caps applied.
#[inline]
pub(crate) fn apply<'p>(q: Quota<'p>, capped: &'p Capped) -> Quota<'p> {
    let bandwidths = q.bandwidths.map(|set| {
        let addr = set_addr(set);
        capped
            .sets
            .iter()
            .find(|(a, _)| *a == addr)
            .map_or(set, |(_, c)| c)
    });
    let concurrency = match (q.concurrency, capped.concurrency) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Quota {
        plan: q.plan,
        bandwidths,
        concurrency,
        fixed: q.fixed,
        capped: true,
        // A client that capped itself chose its limit: it is not grown.
        growth: None,
    }
}

/// Writes every cap to `path` (atomically: temporary file + rename). The file is JSON,
/// which the policy store reads back as YAML.
pub(crate) fn persist(path: &Path, caps: &BTreeMap<String, ClientCap>) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(caps).map_err(std::io::Error::other)?;
    text.push('\n');
    write_atomically(path, &text)
}

/// Replaces `path` with `text` atomically (a temporary file beside it, then a rename), so a
/// reader (the policy store's watcher) sees the old file or the new one, never a part. Shared
/// by the caps file and the admin API's overrides file.
pub(crate) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let stamp = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = path.with_extension(format!("tmp.{}.{stamp}", std::process::id()));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bw(rate: &str, burst: u64) -> CompiledBandwidth {
        let rate: Rate = rate.parse().expect("rate");
        CompiledBandwidth::new(Arc::from("plan:free/0"), Arc::from("free-0"), rate, burst)
            .expect("bandwidth")
    }

    #[test]
    fn a_cap_lowers_the_quota_and_scales_the_burst() {
        let b = bw("10/min", 20);
        let c = capped(
            &b,
            &BandwidthCap {
                quota: 5,
                burst: None,
            },
        )
        .expect("capped");
        assert_eq!(quota::quota_window(c.rate), (5, 60));
        assert_eq!(c.burst, 10);
        assert!(Arc::ptr_eq(&c.id, &b.id), "the bucket carries over by id");
        let c = capped(
            &b,
            &BandwidthCap {
                quota: 5,
                burst: Some(3),
            },
        )
        .expect("capped");
        assert_eq!(c.burst, 3);
    }

    #[test]
    fn a_cap_lowers_a_calendar_periods_quota_and_keeps_its_state() {
        use fairgate_policies::model::Period;
        use fairgate_policies::period::CompiledPeriod;
        let b = CompiledBandwidth::per_period(
            Arc::from("plan:free/0@month"),
            Arc::from("monthly"),
            1000,
            CompiledPeriod::new(Period::Month, None).expect("utc"),
        )
        .expect("bandwidth");
        let cap = |quota| BandwidthCap { quota, burst: None };
        let c = capped(&b, &cap(300)).expect("capped");
        assert_eq!((c.burst, c.rate.count()), (300, 300));
        // The same id, period and state capacity: the month's count carries over.
        assert!(Arc::ptr_eq(&c.id, &b.id));
        assert_eq!((c.t_ns, c.c_ns, &c.period), (b.t_ns, b.c_ns, &b.period));
        assert_eq!(
            capped(&b, &cap(5000)).expect("capped").burst,
            1000,
            "never raised"
        );
    }

    #[test]
    fn a_cap_never_raises() {
        let b = bw("10/min", 20);
        let c = capped(
            &b,
            &BandwidthCap {
                quota: 50,
                burst: Some(100),
            },
        )
        .expect("capped");
        assert_eq!(c, b);
    }

    /// A client that capped itself is refused at its cap even while the service has spare
    /// capacity that an uncapped client over the same quota borrows; lifting the cap (the
    /// caps file rewritten each time) lets it borrow again.
    #[test]
    fn a_capped_client_never_borrows_and_the_file_follows() {
        use crate::decision::Decision;
        use crate::engine::{Engine, RequestFacts};
        use fairgate_policies::PolicyStore;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.yaml");
        std::fs::write(
            &path,
            "version: 1
plans: {free: {bandwidths: ['2/h burst 2']}}
default_plan: free
burst_sharing: {enabled: true, below_utilization: 0.9}
shedding: {limit: 100}
usage_endpoint: {path: /quota, self_caps: true, caps_file: caps.json}
",
        )
        .expect("write");
        let engine = Engine::new(PolicyStore::from_file(&path).expect("policy"));
        let decide = |ip: &str| {
            engine.decide(&RequestFacts {
                peer: ip.parse().expect("ip"),
                method: "GET",
                host: "",
                path: "/",
                query: None,
                operation: None,
                headers: &(),
            })
        };
        let borrowed = |d: &Decision| match d {
            Decision::Admit(a) => Some(a.ticket.borrowed()),
            Decision::Reject(_) => None,
        };
        let cap = ClientCap {
            bandwidths: BTreeMap::from([(
                "free-0".to_owned(),
                BandwidthCap {
                    quota: 1,
                    burst: None,
                },
            )]),
            concurrency: None,
        };
        assert!(matches!(engine.set_cap("10.0.0.1", Some(cap)), Ok(true)));
        let file = std::fs::read_to_string(dir.path().join("caps.json")).expect("caps.json");
        assert!(file.contains("\"10.0.0.1\""), "{file}");

        assert_eq!(borrowed(&decide("10.0.0.1")), Some(false));
        assert_eq!(borrowed(&decide("10.0.0.1")), None, "held to its cap of 1");
        assert_eq!(borrowed(&decide("10.0.0.2")), Some(false));
        assert_eq!(borrowed(&decide("10.0.0.2")), Some(false));
        assert_eq!(
            borrowed(&decide("10.0.0.2")),
            Some(true),
            "over quota, uncapped: borrows"
        );

        assert!(matches!(engine.set_cap("10.0.0.1", None), Ok(true)));
        assert!(matches!(engine.set_cap("10.0.0.1", None), Ok(false)));
        let file = std::fs::read_to_string(dir.path().join("caps.json")).expect("caps.json");
        assert_eq!(file.trim(), "{}");
        assert_eq!(
            borrowed(&decide("10.0.0.1")),
            Some(true),
            "lifted: its bucket is still empty, and it borrows"
        );
    }

    #[test]
    fn writes_are_limited() {
        let mut s = CapState::default();
        for _ in 0..WRITE_BURST {
            assert!(s.take_write(0).is_ok());
        }
        assert_eq!(s.take_write(0), Err(Duration::from_secs(1)));
        assert!(s.take_write(1_000_000_000).is_ok());
    }
}
