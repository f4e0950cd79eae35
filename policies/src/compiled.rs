//! The compiled policy: immutable, resolved to indices, shaped for the hot path.
//!
//! Stage two of three. A [`CompiledPolicy`] is built once per (re)load by [`crate::compile`], then
//! shared behind `ArcSwap` by [`crate::PolicyStore`]. Nothing here knows HTTP: the engine
//! describes a request through [`RequestView`].
//!
//! Invariants (established by validation, relied on by the engine):
//! - every bandwidth has `burst ≥ 1`, `t_ns ≥ 1`, `c_ns = burst · t_ns` without overflow;
//! - plan, rule and operation names are unique; every name reference resolved to an index;
//! - every regex compiled within the size limits.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::model::{self, Estimator, LimitKey, Mode, Policy, Priority, Responses, State};
use crate::units::Rate;

/// Index of a rule in [`CompiledPolicy::rules`].
pub type RuleId = usize;
/// Index of a plan in [`CompiledPolicy::plans`].
pub type PlanId = usize;
/// Index of an operation in [`CompiledPolicy::operations`].
pub type OperationId = usize;

/// A SHA-256 of the policy's canonical form (model serialised as JSON), so equal policies
/// written differently hash the same.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyHash(pub [u8; 32]);

impl PolicyHash {
    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        use std::fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

impl std::fmt::Debug for PolicyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PolicyHash({})", &self.to_hex()[..12])
    }
}

impl std::fmt::Display for PolicyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

pub use crate::request::{HeaderSource, RequestView};

/// The whole compiled policy.
#[derive(Debug)]
pub struct CompiledPolicy {
    /// Generation number assigned by the [`crate::PolicyStore`] when published (0 before).
    pub version: u64,
    /// Content hash of the canonical policy.
    pub hash: PolicyHash,
    /// The model it was compiled from (for the admin API and reload diffs).
    pub source: Arc<Policy>,
    /// Identification settings.
    pub identify: CompiledIdentify,
    /// Rules in evaluation order.
    pub rules: Arc<[CompiledRule]>,
    /// Fast matcher over all rule conditions.
    pub rule_set: crate::matcher::RuleSet,
    /// Plans; `plan_index` maps names to indices.
    pub plans: Arc<[CompiledPlan]>,
    /// Plan name → index.
    pub plan_index: HashMap<Arc<str>, PlanId>,
    /// The default plan, if any.
    pub default_plan: Option<PlanId>,
    /// Operations in match order.
    pub operations: Arc<[CompiledOperation]>,
    /// Operation name → index (the first operation of that name), for adapters that
    /// resolve the operation by name (a gateway route naming it).
    pub operation_index: HashMap<Arc<str>, OperationId>,
    /// Fast matcher over operation conditions, one per operation in order. An operation
    /// without `when` is compiled as `operation: [<its name>]`, so it matches exactly the
    /// requests routed to it by name; the first match is the request's operation.
    pub operation_set: crate::matcher::RuleSet,
    /// Per-client overrides (inline `clients` merged with the overrides file; the file wins).
    pub clients: HashMap<Arc<str>, ClientQuota>,
    /// The clients' self-set caps read from `usage_endpoint.caps_file` when this policy was
    /// loaded (empty without one). The engine keeps the live set: see
    /// `fairgate_middleware`'s usage endpoint.
    pub caps: Arc<BTreeMap<String, model::ClientCap>>,
    /// Borrowing threshold (utilisation fraction) when burst sharing is on.
    pub burst_sharing: Option<f64>,
    /// Global shedding, if configured.
    pub shedding: Option<model::Shedding>,
    /// Response settings.
    pub responses: Responses,
    /// State settings.
    pub state: State,
}

impl CompiledPolicy {
    /// `key`'s override, unless it has lapsed (`expires` passed).
    pub fn client(&self, key: &str) -> Option<&ClientQuota> {
        if self.clients.is_empty() {
            return None;
        }
        self.clients.get(key).filter(|c| !c.lapsed())
    }

    /// Every bandwidth of the policy: plans', client overrides' and `limit` rules'.
    pub fn bandwidths(&self) -> impl Iterator<Item = &CompiledBandwidth> + '_ {
        let plans = self.plans.iter().flat_map(|p| p.bandwidths.iter());
        let clients = self
            .clients
            .values()
            .flat_map(|c| c.bandwidths.iter().flat_map(|b| b.iter()));
        let rules = self.rules.iter().filter_map(|r| match &r.action {
            CompiledAction::Limit { bandwidth, .. } => Some(bandwidth),
            _ => None,
        });
        plans.chain(clients).chain(rules)
    }

    /// The plan with this name.
    pub fn plan(&self, name: &str) -> Option<&CompiledPlan> {
        self.plan_index.get(name).map(|&i| &self.plans[i])
    }
}

/// Compiled identification settings.
#[derive(Debug, Clone)]
pub struct CompiledIdentify {
    /// Trusted proxy networks.
    pub trusted_proxies: crate::matcher::IpSet,
    /// IPv4 aggregation prefix.
    pub ipv4_prefix: u8,
    /// IPv6 aggregation prefix.
    pub ipv6_prefix: u8,
    /// Extractors in order. Header names are lower case.
    pub client_key: Arc<[model::KeyExtractor]>,
    /// Keys longer than this are hashed.
    pub max_key_length: usize,
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    /// Unique name.
    pub name: Arc<str>,
    /// Enforce or shadow.
    pub mode: Mode,
    /// The action.
    pub action: CompiledAction,
}

/// A compiled rule action.
#[derive(Debug, Clone)]
pub enum CompiledAction {
    /// Reject with this status.
    Deny {
        /// Status code.
        status: u16,
    },
    /// Admit, bypassing quotas.
    Allow,
    /// Rule-scoped limit.
    Limit {
        /// The bucket parameters; `id` is `rule:<name>`.
        bandwidth: CompiledBandwidth,
        /// What it is counted per.
        key: LimitKey,
        /// Exact buckets or a sketch.
        estimator: Estimator,
    },
    /// Tag the request.
    Tag {
        /// Priority class to set.
        priority: Option<Priority>,
        /// Plan to use.
        plan: Option<PlanId>,
    },
}

/// A bandwidth in GCRA terms (see PRODUCT.md "Semantics in numbers").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledBandwidth {
    /// Stable identity of this bucket across reloads: `plan:<plan>/<index or name>`,
    /// `client:<key>/<index or name>` or `rule:<name>`. State is carried across a reload by id.
    pub id: Arc<str>,
    /// Name for `RateLimit-Policy` and metrics: the `name` written in the policy, else
    /// `<plan>-<index>` (plans), `client-<index>` (overrides) or the rule name (`limit`).
    pub name: Arc<str>,
    /// The rate as written.
    pub rate: Rate,
    /// Burst in cost units, ≥ 1.
    pub burst: u64,
    /// Emission interval `T = period / count`, in ns, ≥ 1.
    pub t_ns: u64,
    /// Capacity `C = burst · T`, in ns. For a calendar-period bandwidth
    /// [`PERIOD_CAPACITY`], the same for every quota (see [`CompiledBandwidth::per_period`]).
    pub c_ns: u64,
    /// A quota per calendar period: `burst` units from each period's start. `None` for a
    /// GCRA bandwidth.
    pub period: Option<Arc<crate::period::CompiledPeriod>>,
}

/// The capacity every calendar-period bandwidth's state is kept with: one value for all
/// quotas, so that a reload that changes a period's quota keeps the period's count as it is
/// (a capacity change would rescale it keeping the used fraction, as a GCRA bucket's is).
pub const PERIOD_CAPACITY: u64 = 1 << 62;

impl CompiledBandwidth {
    /// Builds the GCRA parameters. `None` when they overflow or round to zero
    /// (validation reports those cases; compile never sees them).
    pub fn new(id: Arc<str>, name: Arc<str>, rate: Rate, burst: u64) -> Option<Self> {
        let t_ns = rate.period_ns() / rate.count();
        if t_ns == 0 || burst == 0 {
            return None;
        }
        let c_ns = burst.checked_mul(t_ns)?;
        Some(CompiledBandwidth {
            id,
            name,
            rate,
            burst,
            t_ns,
            c_ns,
            period: None,
        })
    }

    /// A quota of `quota` units per calendar `period`. Its state is a count in the engine's
    /// nanoseconds (`T` = 1 ns, a count `n` is `TAT = end + n` against the period's end), kept
    /// with capacity [`PERIOD_CAPACITY`]; `burst` is the quota.
    pub fn per_period(
        id: Arc<str>,
        name: Arc<str>,
        quota: u64,
        period: crate::period::CompiledPeriod,
    ) -> Option<Self> {
        let rate = Rate::new(quota, period.unit.nominal())?;
        Some(CompiledBandwidth {
            id,
            name,
            rate,
            burst: quota,
            t_ns: 1,
            c_ns: PERIOD_CAPACITY,
            period: Some(Arc::new(period)),
        })
    }
}

/// A compiled plan.
#[derive(Debug, Clone)]
pub struct CompiledPlan {
    /// Plan name.
    pub name: Arc<str>,
    /// All must admit.
    pub bandwidths: Arc<[CompiledBandwidth]>,
    /// Max in flight per client.
    pub concurrency: Option<u32>,
    /// Never borrowed past (`fixed: true`).
    pub fixed: bool,
    /// Usage alerts of the plan's clients.
    pub alerts: Option<Arc<CompiledAlerts>>,
    /// Adaptive growth of the plan's clients' quotas.
    pub growth: Option<Arc<CompiledGrowth>>,
}

/// Adaptive growth ([`model::Growth`]) in the engine's units.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledGrowth {
    /// Usage over a window at or above which the quota grows, in (0, 1].
    pub threshold: f64,
    /// The window, ns.
    pub window_ns: u64,
    /// One step multiplies the factor by `1 + step`.
    pub step: f64,
    /// The factor's bound.
    pub max_factor: f64,
    /// Steps to reach `max_factor` (the last one is clamped to it).
    pub max_steps: u32,
    /// Steps allowed within any `within_ns` (`max_rise`).
    pub rise_steps: u32,
    /// `max_rise.within`, ns.
    pub within_ns: u64,
}

impl CompiledGrowth {
    /// Compiles validated growth settings.
    pub fn new(g: &model::Growth) -> CompiledGrowth {
        let ln_step = (1.0 + g.step).ln();
        // A tolerance so that e.g. ×1.25 twice reaches a bound of 1.5625 in two steps.
        let max_steps = ((g.max_factor.ln() / ln_step) - 1e-9).ceil().max(1.0) as u32;
        let rise_steps = ((g.max_rise.factor.ln() / ln_step) + 1e-9).floor().max(1.0) as u32;
        CompiledGrowth {
            threshold: g.threshold,
            window_ns: u64::try_from(g.window.0.as_nanos()).unwrap_or(u64::MAX),
            step: g.step,
            max_factor: g.max_factor,
            max_steps,
            rise_steps,
            within_ns: u64::try_from(g.max_rise.within.0.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// The growth factor after `steps` steps: `(1 + step)^steps`, at most `max_factor`.
    pub fn factor(&self, steps: u32) -> f64 {
        let steps = steps.min(self.max_steps);
        (1.0 + self.step)
            .powi(i32::try_from(steps).unwrap_or(i32::MAX))
            .min(self.max_factor)
    }
}

/// Usage alerts ([`model::Alerts`]): a client's crossing of a threshold of a bandwidth's
/// usage is POSTed to `webhook`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledAlerts {
    /// Usage thresholds, each in (0, 1], ascending.
    pub thresholds: Arc<[f64]>,
    /// `http://host[:port][/path]`.
    pub webhook: Arc<str>,
}

impl CompiledAlerts {
    /// Compiles validated alerts.
    pub fn new(a: &model::Alerts) -> CompiledAlerts {
        CompiledAlerts {
            thresholds: Arc::from(a.thresholds.as_slice()),
            webhook: Arc::from(a.webhook.as_str()),
        }
    }

    /// How many thresholds `usage` (a used share in [0, 1]) has reached: 0 below the first.
    /// Compared in units of the bucket so that `usage` 8/10 reaches 0.8 exactly.
    pub fn level(&self, used: u64, burst: u64) -> usize {
        let used = used as f64;
        let burst = burst as f64;
        self.thresholds
            .iter()
            .take_while(|&&t| used + 1e-9 >= t * burst)
            .count()
    }
}

/// A compiled operation.
#[derive(Debug, Clone)]
pub struct CompiledOperation {
    /// Name.
    pub name: Arc<str>,
    /// Up-front cost.
    pub cost: u64,
    /// Post-hoc cost.
    pub post_hoc: Option<model::PostHoc>,
}

/// What an override resolves to.
#[derive(Debug, Clone)]
pub struct ClientQuota {
    /// The plan the client is on (its own bandwidths/concurrency below replace the plan's).
    pub plan: Option<PlanId>,
    /// Own bandwidths (ids `client:<key>/…`), replacing the plan's when `Some`.
    pub bandwidths: Option<Arc<[CompiledBandwidth]>>,
    /// Own concurrency, replacing the plan's when `Some`.
    pub concurrency: Option<u32>,
    /// Own usage alerts, replacing the plan's when `Some`.
    pub alerts: Option<Arc<CompiledAlerts>>,
    /// When the override lapses (`expires`); from then on it is ignored.
    pub expires_at: Option<std::time::SystemTime>,
    /// Never borrowed past (`fixed: true`), whatever the plan says.
    pub fixed: bool,
    /// Own adaptive growth, replacing the plan's when `Some`.
    pub growth: Option<Arc<CompiledGrowth>>,
}

impl ClientQuota {
    /// True once the override has lapsed (reads the wall clock only when it can).
    pub fn lapsed(&self) -> bool {
        self.expires_at
            .is_some_and(|t| std::time::SystemTime::now() >= t)
    }
}
