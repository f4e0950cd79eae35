//! Adaptive growth: a client's quota grows while its business does (`growth:` on a plan or
//! an override), modelled on Google Cloud's quota adjuster and DynamoDB's on-demand ratchet.
//!
//! **Measure.** Each admit (not borrowed) of a client whose quota has `growth` adds its cost
//! to the client's count for the current window (`now / window`, on the engine's clock). When
//! the first admit of the next window finds the window before it complete, its usage is
//! `count × T_max / window` — admitted cost over what the tightest bandwidth of the quota
//! allows in a window (`T_max`: the longest emission interval of the set in effect, grown
//! or not). A client idle for a whole window starts over: a client that stops does not keep
//! growing.
//!
//! **Grow.** Usage at or above `threshold` is a step: the client's factor becomes
//! `(1 + step)^steps`, at most `max_factor`, unless (a) the quota is fixed or the client
//! holds a self-set cap, (b) the service shed a request within the last window, (c) the
//! steps taken within the last `max_rise.within` already reach `max_rise.factor`.
//!
//! **Apply.** A grown client's bandwidth sets are copies of its plan's (or override's) with
//! rate and burst × factor and the *same ids*, so its buckets carry over and are rescaled
//! keeping their fill fraction, as a reload does ([`crate::caps`] works the same way). The
//! copies are compiled per policy generation ([`GrownMap`], held by the engine's prepared
//! generation behind an `ArcSwap`): a decision pays one `is_empty` check when nobody grew.
//!
//! **Keep.** Steps (and the times of recent rises) are the client's growth; the base quota
//! is the policy's. A reload that changes the base quota keeps the steps: the client gets
//! the new base × its factor, bounded by the new `max_factor`. With `backend: local` the
//! growth is written to `state.growth_file` (JSON) by the pruner within 5 s of a change and
//! when the engine drops, and read back when an engine starts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ahash::RandomState;
use fairgate_policies::compiled::{CompiledBandwidth, CompiledGrowth, CompiledPolicy};
use fairgate_policies::units::Rate;

use crate::clock::Nanos;
use crate::quota;

/// Shards of the usage counters.
const SHARDS: usize = 16;

/// One shard of a per-client map.
type Shard<V> = Mutex<HashMap<Box<str>, V, RandomState>>;

/// One client's growth: how many steps it took and when its recent rises were.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClientGrowth {
    /// Steps taken (the factor is `(1 + step)^steps`, bounded).
    pub(crate) steps: u32,
    /// Engine times of the rises within the longest `max_rise.within` (in the file: Unix
    /// seconds, see [`persist`]).
    pub(crate) rises: Vec<Nanos>,
}

/// A client's usage count in one window.
#[derive(Debug, Clone, Copy)]
struct Count {
    window: u64,
    count: u64,
}

/// A step the engine should take: the window's usage reached the threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Due {
    /// The finished window's usage.
    pub(crate) usage: f64,
}

/// The usage counters: client key → count in its current window. Bounded by `max`.
#[derive(Debug)]
pub(crate) struct Counters {
    shards: Box<[Shard<Count>]>,
    hasher: RandomState,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(RandomState::new())))
                .collect(),
            hasher: RandomState::new(),
        }
    }
}

impl Counters {
    fn shard(&self, key: &str) -> &Shard<Count> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        &self.shards[i]
    }

    /// Adds `cost` to `key`'s window at `now`; when this opens a new window right after a
    /// complete one whose usage reached `g.threshold`, says a step is due. `t_max` is the
    /// longest emission interval (ns per unit) of the bandwidth set in effect. At most
    /// `max` clients are counted (a new one past it is not).
    pub(crate) fn add(
        &self,
        key: &str,
        cost: u64,
        now: Nanos,
        g: &CompiledGrowth,
        t_max: u64,
        max: usize,
    ) -> Option<Due> {
        let window = now / g.window_ns.max(1);
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = shard.get_mut(key) {
            let mut due = None;
            if c.window != window {
                if c.window + 1 == window {
                    let usage = c.count as f64 * t_max as f64 / g.window_ns as f64;
                    if usage + 1e-9 >= g.threshold {
                        due = Some(Due { usage });
                    }
                }
                c.window = window;
                c.count = 0;
            }
            c.count = c.count.saturating_add(cost);
            return due;
        }
        if shard.len() >= max.div_ceil(SHARDS) {
            return None;
        }
        shard.insert(
            Box::from(key),
            Count {
                window,
                count: cost,
            },
        );
        None
    }

    /// Drops the counts of clients idle for a whole window (`window_ns` of the longest
    /// growth window of the policy). Returns how many are left.
    pub(crate) fn prune(&self, now: Nanos, window_ns: u64) -> usize {
        let window = now / window_ns.max(1);
        let mut left = 0;
        for s in self.shards.iter() {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            s.retain(|_, c| c.window + 1 >= window);
            left += s.len();
        }
        left
    }

    /// Forgets `key`'s count (an operator reset its growth).
    pub(crate) fn forget(&self, key: &str) {
        self.shard(key)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// With a backend that keeps growth for the fleet: each client's admitted cost since the last
/// report (a report per second drains it). Bounded by `max` clients.
#[derive(Debug)]
pub(crate) struct Pending {
    shards: Box<[Shard<crate::backend::GrowthReport>]>,
    hasher: RandomState,
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(RandomState::new())))
                .collect(),
            hasher: RandomState::new(),
        }
    }
}

impl Pending {
    /// Adds `cost` to `key`'s report.
    pub(crate) fn add(
        &self,
        key: &str,
        cost: u64,
        growth: &Arc<CompiledGrowth>,
        t_max: u64,
        plan: Option<&Arc<str>>,
        max: usize,
    ) {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut shard = self.shards[i].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = shard.get_mut(key) {
            r.cost = r.cost.saturating_add(cost);
            r.t_max = t_max;
            return;
        }
        if shard.len() >= max.div_ceil(SHARDS) {
            return;
        }
        shard.insert(
            Box::from(key),
            crate::backend::GrowthReport {
                client: Box::from(key),
                cost,
                growth: Arc::clone(growth),
                t_max,
                plan: plan.cloned(),
                shed: false,
            },
        );
    }

    /// Takes every client's report.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn drain(&self) -> Vec<crate::backend::GrowthReport> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(s.drain().map(|(_, r)| r));
        }
        out
    }
}

/// The growth settings that apply to a client on a bandwidth set's plan: the override's,
/// else the plan's; none when the quota is fixed.
pub(crate) fn settings_for<'p>(
    pol: &'p CompiledPolicy,
    key: &str,
    plan: Option<&'p fairgate_policies::compiled::CompiledPlan>,
) -> Option<&'p Arc<CompiledGrowth>> {
    let over = pol.client(key);
    if over.is_some_and(|o| o.fixed) || plan.is_some_and(|p| p.fixed) {
        return None;
    }
    over.and_then(|o| o.growth.as_ref())
        .or(plan.and_then(|p| p.growth.as_ref()))
}

/// Whether a step may be taken now: below `max_steps`, and fewer than `rise_steps` rises
/// within the last `within_ns`.
pub(crate) fn may_rise(cg: &ClientGrowth, g: &CompiledGrowth, now: Nanos) -> bool {
    if cg.steps >= g.max_steps {
        return false;
    }
    let since = now.saturating_sub(g.within_ns);
    let recent = cg
        .rises
        .iter()
        .filter(|&&t| t > since || since == 0)
        .count();
    recent < g.rise_steps as usize
}

/// Takes one step at `now`; rises older than `keep_ns` are forgotten.
pub(crate) fn rise(cg: &mut ClientGrowth, now: Nanos, keep_ns: u64) {
    cg.steps += 1;
    let since = now.saturating_sub(keep_ns);
    cg.rises.retain(|&t| t > since);
    cg.rises.push(now);
}

/// One client's grown sets: (address of a bandwidth set of the policy, its grown copy).
pub(crate) type GrownSets = Box<[(usize, Arc<[CompiledBandwidth]>)]>;

/// Client key → its grown sets, for one policy generation.
pub(crate) type GrownMap = HashMap<Arc<str>, GrownSets, RandomState>;

pub(crate) fn set_addr(set: &Arc<[CompiledBandwidth]>) -> usize {
    Arc::as_ptr(set).cast::<u8>() as usize
}

/// `key`'s grown sets under `pol`: every bandwidth set it could be charged to (each plan's,
/// its override's own) whose growth settings give a factor above 1 for `steps`.
pub(crate) fn compile_one(pol: &CompiledPolicy, key: &str, steps: u32) -> GrownSets {
    if steps == 0 {
        return Box::new([]);
    }
    let mut sets = Vec::new();
    let over = pol.client(key);
    for plan in pol.plans.iter() {
        if let Some(g) = settings_for(pol, key, Some(plan)) {
            if let Some(set) = grown_set(&plan.bandwidths, g.factor(steps)) {
                sets.push((set_addr(&plan.bandwidths), set));
            }
        }
    }
    if let Some(own) = over.and_then(|o| o.bandwidths.as_ref()) {
        let plan = over.and_then(|o| o.plan).and_then(|i| pol.plans.get(i));
        if let Some(g) = settings_for(pol, key, plan) {
            if let Some(set) = grown_set(own, g.factor(steps)) {
                sets.push((set_addr(own), set));
            }
        }
    }
    sets.into()
}

/// Every grown client's sets under `pol`.
pub(crate) fn compile(pol: &CompiledPolicy, by_key: &BTreeMap<String, ClientGrowth>) -> GrownMap {
    let mut out = GrownMap::with_hasher(RandomState::new());
    for (key, cg) in by_key {
        let sets = compile_one(pol, key, cg.steps);
        if !sets.is_empty() {
            out.insert(Arc::from(key.as_str()), sets);
        }
    }
    out
}

fn grown_set(set: &Arc<[CompiledBandwidth]>, factor: f64) -> Option<Arc<[CompiledBandwidth]>> {
    if factor <= 1.0 || set.is_empty() {
        return None;
    }
    Some(set.iter().map(|b| grown(b, factor)).collect())
}

/// `bw` × `factor`: `⌊q × factor⌋` per the same window `w` as its `RateLimit-Policy` item,
/// burst `⌊burst × factor⌋`; the same id and name, so the bucket carries over. `bw` itself
/// when the grown bucket cannot be represented.
pub(crate) fn grown(bw: &CompiledBandwidth, factor: f64) -> CompiledBandwidth {
    let scale = |v: u64| -> u64 {
        let g = (v as f64 * factor).floor();
        if g >= u64::MAX as f64 {
            u64::MAX
        } else {
            (g as u64).max(v)
        }
    };
    // A calendar period's quota grows for the period (same id, period and state capacity, so
    // the period's count carries over as it is), as a cap lowers it.
    if let Some(period) = &bw.period {
        let mut out = bw.clone();
        out.burst = scale(bw.burst);
        return match Rate::new(out.burst, period.unit.nominal()) {
            Some(rate) => {
                out.rate = rate;
                out
            }
            None => bw.clone(),
        };
    }
    let (q, w) = quota::quota_window(bw.rate);
    let Some(rate) = Rate::new(scale(q), Duration::from_secs(w)) else {
        return bw.clone();
    };
    // Never slower than the base quota, whatever the rounding of `w` did.
    if rate.period_ns() / rate.count().max(1) > bw.t_ns {
        return bw.clone();
    }
    CompiledBandwidth::new(
        Arc::clone(&bw.id),
        Arc::clone(&bw.name),
        rate,
        scale(bw.burst),
    )
    .unwrap_or_else(|| bw.clone())
}

/// `set` swapped for its grown copy in `sets`, if it has one.
#[inline]
pub(crate) fn apply<'p>(
    set: &'p Arc<[CompiledBandwidth]>,
    sets: &'p GrownSets,
) -> &'p Arc<[CompiledBandwidth]> {
    let addr = set_addr(set);
    sets.iter()
        .find(|(a, _)| *a == addr)
        .map_or(set, |(_, g)| g)
}

/// The longest emission interval of `set` (ns per unit): the bandwidth a window's count is
/// measured against.
pub(crate) fn t_max(set: &[CompiledBandwidth]) -> u64 {
    set.iter()
        .map(|b| match b.period {
            // A calendar period's pace: its quota over the period's nominal length (its
            // `t_ns` is the state's encoding, not a pace).
            Some(_) => b.rate.period_ns() / b.rate.count().max(1),
            None => b.t_ns,
        })
        .max()
        .unwrap_or(0)
}

// --- the growth file ---

/// Writes every client's growth to `path` atomically, as JSON
/// `{"client": {"steps": 2, "rises": [unix seconds, ...]}}`; engine times become Unix seconds
/// (`now` is the engine's time at the wall clock's `wall`).
pub(crate) fn persist(
    path: &Path,
    by_key: &BTreeMap<String, ClientGrowth>,
    now: Nanos,
    wall: SystemTime,
) -> std::io::Result<()> {
    let wall_s = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let stored: serde_json::Map<String, serde_json::Value> = by_key
        .iter()
        .filter(|(_, g)| g.steps > 0)
        .map(|(k, g)| {
            let rises: Vec<u64> = g
                .rises
                .iter()
                .map(|&t| wall_s.saturating_sub(now.saturating_sub(t) / 1_000_000_000))
                .collect();
            (
                k.clone(),
                serde_json::json!({"steps": g.steps, "rises": rises}),
            )
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&stored).map_err(std::io::Error::other)?;
    text.push('\n');
    crate::caps::write_atomically(path, &text)
}

/// Reads the growth file at `path` (absent: no growth); Unix seconds become engine times
/// relative to `now` at `wall` (a rise before the engine's origin is put at its origin).
pub(crate) fn load(
    path: &Path,
    now: Nanos,
    wall: SystemTime,
) -> Result<BTreeMap<String, ClientGrowth>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("cannot read `{}`: {e}", path.display())),
    };
    let bad = |why: String| format!("`{}` is not a growth file: {why}", path.display());
    let stored: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let wall_s = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut out = BTreeMap::new();
    for (k, v) in stored {
        let steps = v
            .get("steps")
            .and_then(serde_json::Value::as_u64)
            .and_then(|s| u32::try_from(s).ok())
            .ok_or_else(|| bad(format!("`{k}` has no whole `steps`")))?;
        let rises = match v.get("rises") {
            None => Vec::new(),
            Some(r) => r
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(serde_json::Value::as_u64)
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| bad(format!("`{k}`: `rises` is not a list of Unix seconds")))?,
        };
        let rises = rises
            .iter()
            .map(|&u| now.saturating_sub(wall_s.saturating_sub(u).saturating_mul(1_000_000_000)))
            .collect();
        out.insert(k, ClientGrowth { steps, rises });
    }
    Ok(out)
}

/// The engine's live growth: every grown client's steps, where they are kept, and whether
/// the file is behind.
#[derive(Debug, Default)]
pub(crate) struct GrowthState {
    /// The growth file (resolved), with `backend: local`.
    pub(crate) file: Option<PathBuf>,
    /// Client key → growth (steps > 0 only).
    pub(crate) by_key: BTreeMap<String, ClientGrowth>,
    /// Changed since the file was last written.
    pub(crate) dirty: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use fairgate_policies::model;

    fn settings(window_s: u64, step: f64, max: f64, rise: f64, within_s: u64) -> CompiledGrowth {
        CompiledGrowth::new(&model::Growth {
            threshold: 0.8,
            window: fairgate_policies::units::HumanDuration(Duration::from_secs(window_s)),
            step,
            max_factor: max,
            max_rise: model::MaxRise {
                factor: rise,
                within: fairgate_policies::units::HumanDuration(Duration::from_secs(within_s)),
            },
        })
    }

    #[test]
    fn factors_step_and_stop_at_the_bound() {
        let g = settings(60, 0.25, 2.0, 2.0, 600);
        assert_eq!(g.max_steps, 4, "1.25^3 < 2 ≤ 1.25^4");
        assert_eq!(g.rise_steps, 3, "1.25^3 ≤ 2 < 1.25^4");
        assert_eq!(g.factor(0), 1.0);
        assert_eq!(g.factor(1), 1.25);
        assert_eq!(g.factor(4), 2.0, "clamped");
        assert_eq!(g.factor(9), 2.0);
    }

    #[test]
    fn a_full_window_at_the_threshold_is_due_and_an_idle_one_is_not() {
        let g = settings(10, 0.1, 2.0, 2.0, 60);
        let s = 1_000_000_000u64;
        let c = Counters::default();
        // 10/s quota: T = 0.1 s; 80 in a 10 s window is usage 0.8.
        let t = s / 10;
        for i in 0..80 {
            assert_eq!(c.add("a", 1, i * s / 8, &g, t, 100), None);
        }
        assert_eq!(c.add("a", 1, 10 * s, &g, t, 100), Some(Due { usage: 0.8 }));
        // 79 in the next window: below.
        for i in 0..78 {
            assert_eq!(c.add("a", 1, 10 * s + i * s / 8, &g, t, 100), None);
        }
        assert_eq!(c.add("a", 1, 20 * s, &g, t, 100), None, "79 of 100: 0.79");
        // Busy, then idle for a whole window: the busy window is not counted.
        for i in 0..99 {
            c.add("a", 1, 20 * s + i * s / 10, &g, t, 100);
        }
        assert_eq!(
            c.add("a", 1, 40 * s, &g, t, 100),
            None,
            "a window idle between"
        );
        assert_eq!(c.prune(60 * s, 10 * s), 0, "idle clients are forgotten");
    }

    #[test]
    fn counting_is_bounded() {
        let g = settings(10, 0.1, 2.0, 2.0, 60);
        let c = Counters::default();
        for i in 0..1000 {
            c.add(&format!("k{i}"), 1, 0, &g, 1, 32);
        }
        assert!(c.prune(0, 10) <= 32);
    }

    #[test]
    fn rises_are_limited_within_the_period() {
        let g = settings(60, 0.25, 4.0, 2.0, 1800);
        let s = 1_000_000_000u64;
        let mut cg = ClientGrowth::default();
        let mut now = 10_000 * s;
        for _ in 0..3 {
            assert!(may_rise(&cg, &g, now));
            rise(&mut cg, now, g.within_ns);
            now += 60 * s;
        }
        assert!(
            !may_rise(&cg, &g, now),
            "×1.25³ ≈ 1.95 within 30 min: a 4th is over ×2"
        );
        now += 1800 * s;
        assert!(may_rise(&cg, &g, now));
    }

    #[test]
    fn a_grown_bandwidth_keeps_its_id_and_window() {
        let rate: Rate = "100/min".parse().expect("rate");
        let b =
            CompiledBandwidth::new(Arc::from("plan:p/0"), Arc::from("p-0"), rate, 10).expect("bw");
        let g = grown(&b, 1.5);
        assert!(Arc::ptr_eq(&g.id, &b.id));
        assert_eq!(quota::quota_window(g.rate), (150, 60));
        assert_eq!(g.burst, 15);
    }

    #[test]
    fn a_calendar_periods_quota_grows_and_keeps_its_state() {
        use fairgate_policies::model::Period;
        use fairgate_policies::period::CompiledPeriod;
        let b = CompiledBandwidth::per_period(
            Arc::from("plan:p/0@month"),
            Arc::from("p-0"),
            1000,
            CompiledPeriod::new(Period::Month, None).expect("utc"),
        )
        .expect("bw");
        let g = grown(&b, 1.5);
        assert_eq!(g.burst, 1500);
        assert_eq!((g.t_ns, g.c_ns, &g.period), (b.t_ns, b.c_ns, &b.period));
        // Its pace for usage: 1000 per nominal month.
        assert_eq!(t_max(std::slice::from_ref(&b)), b.rate.period_ns() / 1000);
    }

    #[test]
    fn the_file_round_trips_in_wall_time() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("growth.json");
        let s = 1_000_000_000u64;
        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let by_key = BTreeMap::from([(
            "a".to_owned(),
            ClientGrowth {
                steps: 2,
                rises: vec![100 * s, 160 * s],
            },
        )]);
        persist(&path, &by_key, 200 * s, wall).expect("persist");
        // Another engine, started 1000 s later with its clock at 5 s.
        let back = load(&path, 5 * s, wall + Duration::from_secs(1000)).expect("load");
        assert_eq!(back["a"].steps, 2);
        assert_eq!(back["a"].rises, vec![0, 0], "before this engine's origin");
        assert!(load(&dir.path().join("none.json"), 0, wall)
            .expect("absent")
            .is_empty());
        std::fs::write(&path, "{oops").expect("write");
        assert!(load(&path, 0, wall)
            .unwrap_err()
            .contains("is not a growth file"));
    }
}

#[cfg(test)]
mod engine_tests {
    use std::sync::Arc;

    use fairgate_policies::PolicyStore;

    use crate::clock::ManualClock;
    use crate::decision::Decision;
    use crate::engine::{Engine, RequestFacts};

    const S: u64 = 1_000_000_000;

    const POLICY: &str = "version: 1
identify: {client_key: [{header: x-key}]}
plans:
  growing:
    bandwidths: ['10/s burst 10']
    growth: {threshold: 0.8, window: 10s, step: 25%, max_factor: 2, max_rise: {factor: 2, within: 60s}}
  fixed: {bandwidths: ['10/s burst 10'], fixed: true}
default_plan: growing
clients: {f: {plan: fixed}}
state: {growth_file: growth.json}
";

    fn engine(dir: &std::path::Path, clock: &Arc<ManualClock>) -> Arc<Engine> {
        let path = dir.join("policy.yaml");
        if !path.exists() {
            std::fs::write(&path, POLICY.replace("25%", "0.25")).expect("write");
        }
        Engine::with_clock(
            PolicyStore::from_file(&path).expect("policy"),
            clock.clone(),
        )
    }

    struct Key<'a>(&'a str);

    impl fairgate_policies::compiled::HeaderSource for Key<'_> {
        fn header(&self, name: &str) -> Option<&str> {
            (name == "x-key").then_some(self.0)
        }
    }

    impl crate::identify::HeaderValues for Key<'_> {}

    fn send(engine: &Engine, key: &str) -> bool {
        let headers = Key(key);
        matches!(
            engine.decide(&RequestFacts {
                peer: "10.0.0.1".parse().expect("ip"),
                method: "GET",
                host: "",
                path: "/",
                query: None,
                operation: None,
                headers: &headers,
            }),
            Decision::Admit(_)
        )
    }

    fn quota(engine: &Engine, key: &str) -> u64 {
        engine.client_usage(key).expect("usage").bandwidths[0]
            .ratelimit
            .quota
    }

    /// One 10 s window from `start`: each key at its share of its quota now, evenly spread
    /// (interleaved by time, as the clock only moves forward).
    fn window(engine: &Engine, clock: &ManualClock, keys: &[(&str, f64)], start: u64) {
        let mut sends: Vec<(u64, &str)> = Vec::new();
        for &(key, share) in keys {
            let n = (quota(engine, key) as f64 * 10.0 * share) as u64;
            sends.extend((0..n).map(|i| (start + i * 10 * S / n, key)));
        }
        sends.sort_unstable();
        for (at, key) in sends {
            clock.set(at);
            assert!(send(engine, key), "{key} under its quota is admitted");
        }
    }

    #[test]
    fn a_busy_client_grows_step_by_step_to_its_bound_and_keeps_it_across_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let clock = ManualClock::new(0);
        let e = engine(dir.path(), &clock);
        let mut seen = vec![quota(&e, "a")];
        let mut t = 0;
        for _ in 0..6 {
            window(&e, &clock, &[("a", 0.9), ("f", 0.9)], t);
            t += 10 * S;
            clock.set(t);
            // The first admit of the next window takes the step.
            assert!(send(&e, "a") && send(&e, "f"));
            seen.push(quota(&e, "a"));
        }
        // ×1.25 per busy window: 12, 15, then ×2 within 60 s stops it (1.25³ ≈ 1.95 ≤ 2 <
        // 1.25⁴), and the bound is ×2 = 20.
        assert_eq!(seen, vec![10, 12, 15, 19, 19, 19, 19], "{seen:?}");
        assert_eq!(quota(&e, "f"), 10, "a fixed quota never grows");
        assert_eq!(
            e.client_growth("a"),
            Some(crate::engine::Grown {
                steps: 3,
                factor: 1.953125
            })
        );
        assert_eq!(e.client_growth("f"), None);
        // After `within`, the last step to the bound.
        t += 60 * S;
        window(&e, &clock, &[("a", 0.9)], t);
        t += 10 * S;
        clock.set(t);
        assert!(send(&e, "a"));
        assert_eq!(quota(&e, "a"), 20);
        // A client that stops does not keep growing: idle windows, then one request.
        t += 100 * S;
        clock.set(t);
        assert!(send(&e, "a"));
        assert_eq!(
            e.client_growth("a"),
            Some(crate::engine::Grown {
                steps: 4,
                factor: 2.0
            })
        );

        // A reload that changes the base quota keeps the steps: new base × factor.
        std::fs::write(
            dir.path().join("policy.yaml"),
            POLICY.replace("25%", "0.25").replace(
                "bandwidths: ['10/s burst 10']\n    growth",
                "bandwidths: ['30/s burst 30']\n    growth",
            ),
        )
        .expect("write");
        e.store().reload().expect("reload");
        assert_eq!(quota(&e, "a"), 60, "30/s × 2");
        std::fs::write(
            dir.path().join("policy.yaml"),
            POLICY.replace("25%", "0.25"),
        )
        .expect("write");
        e.store().reload().expect("reload");
        assert_eq!(quota(&e, "a"), 20);

        // A restart (a new engine on the same files) keeps the grown quota.
        drop(e);
        let file = std::fs::read_to_string(dir.path().join("growth.json")).expect("file");
        assert!(file.contains("\"steps\": 4"), "{file}");
        let clock = ManualClock::new(0);
        let e = engine(dir.path(), &clock);
        assert_eq!(quota(&e, "a"), 20);
        // An operator reset: the base quota again, and the file follows.
        assert_eq!(e.reset_growth("a"), 4);
        assert_eq!(quota(&e, "a"), 10);
        assert_eq!(e.reset_growth("a"), 0);
        let file = std::fs::read_to_string(dir.path().join("growth.json")).expect("file");
        assert_eq!(file.trim(), "{}");
    }

    #[test]
    fn a_client_below_the_threshold_or_while_shedding_does_not_grow() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join("policy.yaml"),
            POLICY.replace("25%", "0.25") + "shedding: {limit: 1}\n",
        )
        .expect("write");
        let clock = ManualClock::new(0);
        let e = engine(dir.path(), &clock);
        window(&e, &clock, &[("a", 0.7)], 0);
        clock.set(10 * S);
        assert!(send(&e, "a"));
        assert_eq!(quota(&e, "a"), 10, "70 % of the quota: below the threshold");

        // A busy window in which the service shed a request: no step at its end.
        clock.set(10 * S + 1);
        let held = {
            let headers = Key("b");
            e.decide(&RequestFacts {
                peer: "10.0.0.1".parse().expect("ip"),
                method: "GET",
                host: "",
                path: "/",
                query: None,
                operation: None,
                headers: &headers,
            })
        };
        assert!(matches!(held, Decision::Admit(_)));
        assert!(!send(&e, "a"), "shed: one in flight is the limit");
        drop(held);
        window(&e, &clock, &[("a", 0.9)], 10 * S + 2);
        clock.set(20 * S);
        assert!(send(&e, "a"));
        assert_eq!(quota(&e, "a"), 10, "shed within the window: not grown");
        // The next busy window, without shedding, grows it.
        window(&e, &clock, &[("a", 0.9)], 20 * S + 1);
        clock.set(30 * S);
        assert!(send(&e, "a"));
        assert_eq!(quota(&e, "a"), 12);
    }
}
