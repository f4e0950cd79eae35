//! The engine's Prometheus metrics (prometheus-client), registered in the host's
//! [`Registry`]: the gateway's, or an app's own.
//!
//! [`EngineMetrics`] is an [`Observer`]: installed on the engine it counts every decision
//! (`fairgate_requests_total`: each request once, by the decision that settled it),
//! shadow rule hits, shed requests by priority class and near-limit admits. Gauges and
//! counters that mirror engine state — in flight, the shedding limit, tracked keys,
//! evictions, policy reloads, the Redis backend, dropped decision-log lines — are refreshed
//! when metrics are scraped ([`EngineMetrics::refresh`]), so the request path never touches
//! them.
//!
//! Label values are bounded by design: stages, decisions, priorities and reload results are
//! fixed sets; rule and plan names come from the policy. No label ever carries a client key,
//! IP or path. [`Format`] and [`encode`] serve a registry in the format the scraper asks for
//! (OpenMetrics 1.0.0 when its `Accept` prefers it, otherwise Prometheus text 0.0.4).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::backend::BackendSnapshot;
use crate::decision::{CompletionEvent, DecisionEvent, DecisionKind, Observer, Priority, Stage};
use crate::engine::Engine;

/// Labels of `fairgate_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    stage: Arc<str>,
    decision: Arc<str>,
    rule: Arc<str>,
    plan: Arc<str>,
}

/// Labels of `fairgate_near_limit_total`: names from the policy, never a client key.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NearLimitLabels {
    plan: Arc<str>,
    bandwidth: Arc<str>,
}

/// Labels of `fairgate_growth_total`: the plan and what happened, never a client key.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrowthLabels {
    plan: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PriorityLabels {
    priority: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RedisStateLabels {
    state: &'static str,
}

/// A counter mirroring a monotonic engine total (refreshed at scrape time).
#[derive(Debug, Default)]
struct Mirror {
    counter: Counter,
    seen: AtomicU64,
}

impl Mirror {
    fn set(&self, total: u64) {
        let seen = self.seen.swap(total, Ordering::Relaxed);
        if total > seen {
            self.counter.inc_by(total - seen);
        }
    }
}

fn gauge_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The engine's metrics (see the module docs). Register once per registry with
/// [`register`](Self::register), install as the engine's observer (alone or in a pair with
/// the decision log), and call [`refresh`](Self::refresh) before encoding.
#[derive(Debug)]
pub struct EngineMetrics {
    requests: Family<DecisionLabels, Counter>,
    shadow_rejects: Family<RuleLabels, Counter>,
    shed: Family<PriorityLabels, Counter>,
    in_flight: Gauge,
    shed_limit: Gauge,
    utilization: Gauge<f64, AtomicU64>,
    reloads: Family<ReloadLabels, Counter>,
    reloads_ok: Mirror,
    reloads_error: Mirror,
    last_reload_success: Gauge,
    policy_version: Gauge,
    tracked_keys: Gauge,
    evictions: Mirror,
    near_limit: Family<NearLimitLabels, Counter>,
    growth: Family<GrowthLabels, Counter>,
    decision_log_dropped: Mirror,
    /// The watched decision log's drop count, mirrored by `refresh`.
    #[cfg(feature = "decision-log")]
    watched_log: std::sync::OnceLock<Arc<AtomicU64>>,
    redis: RedisMetrics,
    /// `fairgate_requests_total`, pre-resolved per label set.
    counters: DecisionCounters,
    /// `fairgate_shadow_rejects_total`, pre-resolved per rule.
    shadow: DecisionCounters,
    /// `fairgate_near_limit_total`, pre-resolved per plan and bandwidth (the bandwidth's
    /// name in the `rule` part of the key).
    near: DecisionCounters,
}

/// The `fairgate_redis_*` series (present, at zero, without a Redis backend).
#[derive(Debug)]
struct RedisMetrics {
    errors: Mirror,
    calls: Mirror,
    breaker_opens: Mirror,
    failure_mode_admits: Mirror,
    failure_mode_rejects: Mirror,
    syncs: Mirror,
    state: Family<RedisStateLabels, Gauge>,
    gateways: Gauge,
}

impl EngineMetrics {
    /// Creates the engine's series in `registry`, every name prefixed `fairgate_` (the
    /// registry's own prefix, if any, goes before it).
    pub fn register(registry: &mut Registry) -> Arc<EngineMetrics> {
        let registry = registry.sub_registry_with_prefix("fairgate");
        let reloads = Family::<ReloadLabels, Counter>::default();
        // Both series exist before the first reload; the mirrors count into them.
        let reload_mirror = |result| Mirror {
            counter: reloads.get_or_create_owned(&ReloadLabels { result }),
            seen: AtomicU64::new(0),
        };
        let m = EngineMetrics {
            requests: Family::default(),
            shadow_rejects: Family::default(),
            shed: Family::default(),
            in_flight: Gauge::default(),
            shed_limit: Gauge::default(),
            utilization: Gauge::default(),
            reloads_ok: reload_mirror("ok"),
            reloads_error: reload_mirror("error"),
            reloads,
            last_reload_success: Gauge::default(),
            policy_version: Gauge::default(),
            tracked_keys: Gauge::default(),
            evictions: Mirror::default(),
            near_limit: Family::default(),
            growth: Family::default(),
            decision_log_dropped: Mirror::default(),
            #[cfg(feature = "decision-log")]
            watched_log: std::sync::OnceLock::new(),
            redis: RedisMetrics {
                errors: Mirror::default(),
                calls: Mirror::default(),
                breaker_opens: Mirror::default(),
                failure_mode_admits: Mirror::default(),
                failure_mode_rejects: Mirror::default(),
                syncs: Mirror::default(),
                state: Family::default(),
                gateways: Gauge::default(),
            },
            counters: DecisionCounters::default(),
            shadow: DecisionCounters::default(),
            near: DecisionCounters::default(),
        };
        registry.register(
            "requests",
            "Requests by the admission decision that settled them (one per request): stage, decision, rule and plan",
            m.requests.clone(),
        );
        registry.register(
            "shadow_rejects",
            "Shadow rules that would have rejected a request that went on, by rule",
            m.shadow_rejects.clone(),
        );
        registry.register("shed", "Requests shed by priority class", m.shed.clone());
        registry.register(
            "in_flight",
            "Requests in flight (admitted, not finished)",
            m.in_flight.clone(),
        );
        registry.register(
            "shed_limit",
            "Current global in-flight limit (0: none)",
            m.shed_limit.clone(),
        );
        registry.register(
            "utilization",
            "In flight divided by the shedding limit",
            m.utilization.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy reloads by result",
            m.reloads.clone(),
        );
        registry.register(
            "policy_last_reload_success",
            "1 when the last policy reload succeeded, 0 when it failed",
            m.last_reload_success.clone(),
        );
        registry.register(
            "policy_version",
            "Version of the active policy",
            m.policy_version.clone(),
        );
        registry.register(
            "tracked_keys",
            "Per-key states held by the engine",
            m.tracked_keys.clone(),
        );
        registry.register(
            "evictions",
            "Per-key states evicted to stay under max_keys",
            m.evictions.counter.clone(),
        );
        registry.register(
            "near_limit",
            "Admits that left a client's quota bandwidth under 20% of its burst, by plan and bandwidth",
            m.near_limit.clone(),
        );
        registry.register(
            "growth",
            "Adaptive growth: quota steps taken (action growth) and operator resets (action growth_reset), by plan",
            m.growth.clone(),
        );
        registry.register(
            "decision_log_dropped",
            "Decision-log lines dropped because the writer fell behind",
            m.decision_log_dropped.counter.clone(),
        );
        let r = &m.redis;
        let counters = [
            (
                "redis_errors",
                "Redis calls that failed or timed out",
                &r.errors,
            ),
            ("redis_calls", "Redis calls (scripts) made", &r.calls),
            (
                "redis_breaker_opens",
                "Times the Redis breaker opened",
                &r.breaker_opens,
            ),
            (
                "redis_failure_mode_admits",
                "Requests admitted under on_failure while Redis was unreachable",
                &r.failure_mode_admits,
            ),
            (
                "redis_failure_mode_rejects",
                "Requests rejected (503) under on_failure: closed while Redis was unreachable",
                &r.failure_mode_rejects,
            ),
            (
                "redis_syncs",
                "Usage exchanges with Redis (async mode)",
                &r.syncs,
            ),
        ];
        for (name, help, mirror) in counters {
            registry.register(name, help, mirror.counter.clone());
        }
        registry.register(
            "redis_state",
            "1 for the current state of the Redis backend (up or degraded)",
            r.state.clone(),
        );
        registry.register(
            "fleet_gateways",
            "Gateways registered in Redis when last seen",
            r.gateways.clone(),
        );
        m.last_reload_success.set(1);
        Arc::new(m)
    }

    /// Mirrors `engine`'s state into the gauges and counters: in flight, the shedding
    /// limit, tracked keys, evictions, the policy store's reloads and version, and the
    /// Redis backend's counters. Call it when metrics are scraped.
    pub fn refresh(&self, engine: &Engine) {
        let in_flight = engine.in_flight();
        let shed_limit = engine.shed_limit().unwrap_or(0);
        self.in_flight.set(gauge_of(in_flight));
        self.shed_limit.set(gauge_of(shed_limit));
        self.utilization.set(if shed_limit == 0 {
            0.0
        } else {
            in_flight as f64 / shed_limit as f64
        });
        self.tracked_keys.set(gauge_of(engine.tracked_keys()));
        self.evictions.set(engine.evictions());
        // Every plan bandwidth's near-limit series exists (at 0) before its first count.
        for plan in engine.store().load().plans.iter() {
            for bw in plan.bandwidths.iter() {
                let labels = NearLimitLabels {
                    plan: Arc::clone(&plan.name),
                    bandwidth: Arc::clone(&bw.name),
                };
                let _ = self.near_limit.get_or_create(&labels);
            }
        }
        let reloads = engine.store().last_reload();
        self.reloads_ok.set(reloads.succeeded);
        self.reloads_error.set(reloads.failed);
        self.last_reload_success.set(i64::from(reloads.last_ok()));
        self.policy_version.set(gauge_of(reloads.version));
        if let Some(s) = engine.backend_snapshot() {
            self.refresh_backend(&s);
        }
        #[cfg(feature = "decision-log")]
        if let Some(dropped) = self.watched_log.get() {
            self.decision_log_dropped
                .set(dropped.load(Ordering::Relaxed));
        }
    }

    /// Makes [`refresh`](Self::refresh) mirror `log`'s count of dropped lines into
    /// `fairgate_decision_log_dropped_total` (one log per metrics; a second call is
    /// ignored and returns false).
    #[cfg(feature = "decision-log")]
    pub fn watch_decision_log(&self, log: &crate::observe::DecisionLog) -> bool {
        self.watched_log.set(log.dropped_counter()).is_ok()
    }

    /// Mirrors the decision log's count of dropped lines (see
    /// `DecisionLog::dropped_total`, feature `decision-log`).
    pub fn refresh_decision_log_dropped(&self, total: u64) {
        self.decision_log_dropped.set(total);
    }

    fn refresh_backend(&self, s: &BackendSnapshot) {
        let r = &self.redis;
        r.errors.set(s.errors);
        r.calls.set(s.calls);
        r.breaker_opens.set(s.breaker_opens);
        r.failure_mode_admits.set(s.failure_mode_admits);
        r.failure_mode_rejects.set(s.failure_mode_rejects);
        r.syncs.set(s.syncs);
        r.state
            .get_or_create(&RedisStateLabels { state: "up" })
            .set(i64::from(!s.degraded));
        r.state
            .get_or_create(&RedisStateLabels { state: "degraded" })
            .set(i64::from(s.degraded));
        r.gateways.set(gauge_of(s.gateways));
    }
}

/// One decision counter's value, for the dashboard's history.
#[cfg(feature = "dashboard")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecisionCount {
    pub(crate) stage: &'static str,
    pub(crate) decision: &'static str,
    pub(crate) rule: Box<str>,
    pub(crate) plan: Box<str>,
    pub(crate) value: u64,
}

#[cfg(feature = "dashboard")]
impl EngineMetrics {
    /// Every `fairgate_requests_total` and `fairgate_shadow_rejects_total` series seen so
    /// far (shadow rejects as decision `shadow_reject`, stage `rule`), read without a lock.
    pub(crate) fn decision_counts(&self) -> Vec<DecisionCount> {
        let mut out = Vec::new();
        for (map, _) in [(&self.counters, ()), (&self.shadow, ())] {
            for (k, c) in map.map.load().iter() {
                out.push(DecisionCount {
                    stage: k.stage,
                    decision: k.decision,
                    rule: k.rule.clone(),
                    plan: k.plan.clone(),
                    value: c.get(),
                });
            }
        }
        out
    }

    /// `fairgate_shed_total` of `priority` (0 until it first sheds one).
    pub(crate) fn shed_count(&self, priority: Priority) -> u64 {
        self.shed
            .get(&PriorityLabels {
                priority: priority_name(priority),
            })
            .map_or(0, |c| c.get())
    }

    /// `fairgate_near_limit_total`, summed over its plans and bandwidths.
    pub(crate) fn near_limit_count(&self) -> u64 {
        self.near.map.load().values().map(Counter::get).sum()
    }
}

impl Observer for EngineMetrics {
    fn on_decision(&self, e: &DecisionEvent<'_>) {
        if e.kind == DecisionKind::ShadowReject {
            // Not the request's decision: the request goes on to one.
            let rule = e.rule.unwrap_or("");
            let labels = LabelRef {
                stage: "rule",
                decision: "shadow_reject",
                rule,
                plan: "",
            };
            self.shadow.count_with(&labels, || {
                self.shadow_rejects
                    .get_or_create(&RuleLabels {
                        rule: Arc::from(rule),
                    })
                    .clone()
            });
            return;
        }
        let labels = LabelRef {
            stage: e.stage.map_or("none", |s| s.as_str()),
            decision: e.kind.as_str(),
            rule: e.rule.unwrap_or(""),
            plan: e.plan.unwrap_or(""),
        };
        self.counters.count_with(&labels, || {
            self.requests
                .get_or_create(&DecisionLabels {
                    stage: Arc::from(labels.stage),
                    decision: Arc::from(labels.decision),
                    rule: Arc::from(labels.rule),
                    plan: Arc::from(labels.plan),
                })
                .clone()
        });
        match e.kind {
            DecisionKind::Reject if e.stage == Some(Stage::Shed) => {
                self.shed
                    .get_or_create(&PriorityLabels {
                        priority: priority_name(e.priority),
                    })
                    .inc();
            }
            DecisionKind::Admit | DecisionKind::Borrowed => {
                let Some(usage) = &e.usage else { return };
                let plan = e.plan.unwrap_or("");
                for b in usage.bandwidths() {
                    // Under 20% of the bucket (its burst) left after this admit.
                    if b.remaining.saturating_mul(5) >= b.bandwidth.burst {
                        continue;
                    }
                    let labels = LabelRef {
                        stage: "",
                        decision: "",
                        rule: &b.bandwidth.name,
                        plan,
                    };
                    self.near.count_with(&labels, || {
                        self.near_limit
                            .get_or_create(&NearLimitLabels {
                                plan: Arc::from(plan),
                                bandwidth: Arc::clone(&b.bandwidth.name),
                            })
                            .clone()
                    });
                }
            }
            _ => {}
        }
    }

    fn on_complete(&self, _e: &CompletionEvent<'_>) {}

    fn on_growth(&self, e: &crate::decision::GrowthEvent<'_>) {
        self.growth
            .get_or_create(&GrowthLabels {
                plan: e.plan.unwrap_or("").to_owned(),
                action: e.action.to_owned(),
            })
            .inc();
    }
}

/// The `priority` label of a class.
fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::Critical => "critical",
        Priority::Normal => "normal",
        Priority::Borrowed => "borrowed",
        Priority::Sheddable => "sheddable",
    }
}

/// Pre-resolved counters of one family, one per label set seen, so counting a decision is
/// one hash lookup over borrowed names and an atomic increment: no allocation, no lock, no
/// lookup in the metric family. Label sets are bounded (stages, decisions, and the rule and
/// plan names of the policy); a new set is resolved once, through the family, and added
/// copy-on-write.
#[derive(Debug, Default)]
struct DecisionCounters {
    // aHash, not SipHash: the keys are the policy's own names (no flooding to resist), and
    // SipHash over four names was ≈ 400 instructions a decision.
    map: ArcSwap<HashMap<OwnedLabels, Counter, ahash::RandomState>>,
}

/// The names of one label set, borrowed (for lookups) or owned (as map keys).
trait LabelView {
    fn parts(&self) -> (&str, &str, &str, &str);
}

impl Hash for dyn LabelView + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.parts().hash(h);
    }
}

impl PartialEq for dyn LabelView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn LabelView + '_ {}

/// A label set as a map key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OwnedLabels {
    stage: &'static str,
    decision: &'static str,
    rule: Box<str>,
    plan: Box<str>,
}

impl LabelView for OwnedLabels {
    fn parts(&self) -> (&str, &str, &str, &str) {
        (self.stage, self.decision, &self.rule, &self.plan)
    }
}

impl Hash for OwnedLabels {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Must hash like `dyn LabelView`, which lookups use.
        self.parts().hash(h);
    }
}

impl<'a> Borrow<dyn LabelView + 'a> for OwnedLabels {
    fn borrow(&self) -> &(dyn LabelView + 'a) {
        self
    }
}

/// A label set of one decision, borrowed from the event.
struct LabelRef<'a> {
    stage: &'static str,
    decision: &'static str,
    rule: &'a str,
    plan: &'a str,
}

impl LabelView for LabelRef<'_> {
    fn parts(&self) -> (&str, &str, &str, &str) {
        (self.stage, self.decision, self.rule, self.plan)
    }
}

impl DecisionCounters {
    /// Increments the counter of `labels`, resolving it with `resolve` the first time.
    fn count_with(&self, labels: &LabelRef<'_>, resolve: impl FnOnce() -> Counter) {
        if let Some(c) = self.map.load().get(labels as &dyn LabelView) {
            c.inc();
            return;
        }
        let counter = resolve();
        counter.inc();
        let key = OwnedLabels {
            stage: labels.stage,
            decision: labels.decision,
            rule: Box::from(labels.rule),
            plan: Box::from(labels.plan),
        };
        self.map.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.entry(key.clone()).or_insert_with(|| counter.clone());
            m
        });
    }
}

/// An exposition format of a metrics endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0 text.
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (the default).
    Text,
}

impl Format {
    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format to answer a request with `Accept` header `accept` in, as Prometheus'
    /// own exporters choose: the acceptable media range with the highest `q` (the first
    /// listed on a tie) among `application/openmetrics-text` (version 1.0.0 or none) and
    /// `text/plain` (version 0.0.4 or none); ranges naming other types or versions
    /// (protobuf, OpenMetrics 0.0.1, text 1.0.0) are skipped. Without an acceptable one
    /// (no header, `*/*`), the 0.0.4 text.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let mut best: Option<(f32, Format)> = None;
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            let mut q = 1.0_f32;
            let mut version = None;
            for param in parts {
                let Some((k, v)) = param.split_once('=') else {
                    continue;
                };
                let v = v.trim().trim_matches('"');
                if k.trim().eq_ignore_ascii_case("q") {
                    q = v.parse().unwrap_or(0.0);
                } else if k.trim().eq_ignore_ascii_case("version") {
                    version = Some(v);
                }
            }
            let format = if media.eq_ignore_ascii_case("application/openmetrics-text")
                && matches!(version, None | Some("1.0.0"))
            {
                Format::OpenMetrics
            } else if media.eq_ignore_ascii_case("text/plain")
                && matches!(version, None | Some("0.0.4"))
            {
                Format::Text
            } else {
                continue;
            };
            if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
                best = Some((q, format));
            }
        }
        best.map_or(Format::Text, |(_, f)| f)
    }
}

/// Encodes `registry` in `format`.
pub fn encode(registry: &Registry, format: Format) -> String {
    let mut out = String::with_capacity(8 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    match format {
        Format::OpenMetrics => out,
        Format::Text => openmetrics_to_text(&out),
    }
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4. The samples are
/// the same; the metadata differs: a 0.0.4 `TYPE`/`HELP` line names the sample (a counter
/// family `x` has the sample `x_total`, an info family `x` the gauge sample `x_info`),
/// `unknown` is `untyped`, and there are no `UNIT` lines and no `# EOF`.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // prometheus-client writes `HELP` before `TYPE`; the name is known at `TYPE`.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').map_or("", |(_, text)| text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, kind) = match kind {
                "counter" if !name.ends_with("_total") => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            // Writing into a String cannot fail.
            if let Some(text) = help.take() {
                let _ = writeln!(out, "# HELP {name}{suffix} {text}");
            }
            let _ = writeln!(out, "# TYPE {name}{suffix} {kind}");
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_count_into_their_families() {
        let mut registry = Registry::default();
        let m = EngineMetrics::register(&mut registry);
        let labels = |rule| LabelRef {
            stage: "rule",
            decision: "reject",
            rule,
            plan: "",
        };
        let resolve = |rule: &str| {
            m.requests
                .get_or_create(&DecisionLabels {
                    stage: "rule".into(),
                    decision: "reject".into(),
                    rule: rule.into(),
                    plan: "".into(),
                })
                .clone()
        };
        m.counters
            .count_with(&labels("bad-bot"), || resolve("bad-bot"));
        m.counters
            .count_with(&labels("bad-bot"), || resolve("bad-bot"));
        m.counters.count_with(&labels("other"), || resolve("other"));
        assert_eq!(m.counters.map.load().len(), 2);
        let text = encode(&registry, Format::OpenMetrics);
        for needle in [
            r#"fairgate_requests_total{stage="rule",decision="reject",rule="bad-bot",plan=""} 2"#,
            r#"fairgate_requests_total{stage="rule",decision="reject",rule="other",plan=""} 1"#,
            r#"fairgate_policy_reloads_total{result="ok"} 0"#,
            r#"fairgate_policy_reloads_total{result="error"} 0"#,
            "fairgate_policy_last_reload_success 1",
            "fairgate_decision_log_dropped_total 0",
            "fairgate_redis_calls_total 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        m.refresh_decision_log_dropped(3);
        m.refresh_decision_log_dropped(5);
        assert!(encode(&registry, Format::Text).contains("fairgate_decision_log_dropped_total 5\n"));
    }

    /// Near-limit admits are counted per plan and bandwidth whatever `ratelimit_headers`
    /// says (here its default, `on_reject`, under which admits carry no RateLimit numbers).
    #[test]
    fn near_limit_admits_count_by_plan_and_bandwidth_without_ratelimit_headers() {
        use crate::clock::ManualClock;
        use crate::decision::Decision;
        use crate::engine::RequestFacts;
        use fairgate_policies::PolicyStore;

        let policy = "version: 1
default_plan: free
plans:
  free:
    bandwidths:
      - {rate: 10/s, burst: 10, name: burst}
      - {rate: 100/h, name: hourly}
";
        let store = PolicyStore::from_yaml_str(policy, "p.yaml").expect("policy");
        let engine = Engine::with_clock(store, ManualClock::new(1_000_000_000_000));
        let mut registry = Registry::default();
        let m = EngineMetrics::register(&mut registry);
        engine.set_observer(m);
        let facts = RequestFacts {
            peer: std::net::IpAddr::from([192, 0, 2, 1]),
            method: "GET",
            host: "example.test",
            path: "/",
            query: None,
            operation: None,
            headers: &(),
        };
        let near = |text: &str, bw: &str| -> Option<u64> {
            let prefix = format!("fairgate_near_limit_total{{plan=\"free\",bandwidth=\"{bw}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .map(|v| v.parse().expect("count"))
        };
        // Eight admits leave 2 of 10: not under 20%.
        for _ in 0..8 {
            assert!(matches!(engine.decide(&facts), Decision::Admit(_)));
        }
        let text = encode(&registry, Format::Text);
        assert_eq!(near(&text, "burst"), None, "{text}");
        // The 9th and 10th leave 1 and 0; the hourly bandwidth (100) is far from its limit.
        for _ in 0..2 {
            assert!(matches!(engine.decide(&facts), Decision::Admit(_)));
        }
        let text = encode(&registry, Format::Text);
        assert_eq!(near(&text, "burst"), Some(2), "{text}");
        assert_eq!(near(&text, "hourly"), None, "{text}");
        // A rejection is not a near-limit admit.
        assert!(matches!(engine.decide(&facts), Decision::Reject(_)));
        assert_eq!(near(&encode(&registry, Format::Text), "burst"), Some(2));
    }

    #[test]
    fn negotiates_like_prometheus() {
        // Prometheus 2.x's scrape `Accept`.
        let prom2 = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom2)), Format::OpenMetrics);
        // Prometheus 3.x: protobuf first, which is skipped.
        let prom3 = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.6,application/openmetrics-text;version=1.0.0;escaping=underscores;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=underscores;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom3)), Format::OpenMetrics);
        // Prometheus with `scrape_protocols: [PrometheusText0.0.4]`.
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4;q=0.5,*/*;q=0.1")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some(
                "text/plain; version=0.0.4, application/openmetrics-text; version=1.0.0; q=0.5"
            )),
            Format::Text
        );
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; q=0")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;version=0.0.1")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("APPLICATION/OpenMetrics-Text")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn text_format_names_the_samples_in_its_metadata() {
        let mut registry = Registry::default();
        let m = EngineMetrics::register(&mut registry);
        m.shed
            .get_or_create(&PriorityLabels {
                priority: "critical",
            })
            .inc();
        let om = encode(&registry, Format::OpenMetrics);
        assert!(om.contains("# TYPE fairgate_shed counter\n"));
        assert!(om.ends_with("# EOF\n"));
        let text = encode(&registry, Format::Text);
        assert!(text.contains("# HELP fairgate_shed_total Requests shed by priority class.\n"));
        assert!(text.contains("# TYPE fairgate_shed_total counter\n"));
        assert!(text.contains("# TYPE fairgate_in_flight gauge\n"));
        assert!(text.contains("fairgate_shed_total{priority=\"critical\"} 1\n"));
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("# UNIT"));
        // Every sample line is kept as it was.
        let samples = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&om), samples(&text));
    }

    #[test]
    fn text_format_rewrites_info_unknown_and_units() {
        let om = "# HELP build Build.\n# TYPE build info\nbuild_info{v=\"1\"} 1\n# HELP odd Odd.\n# TYPE odd unknown\nodd 3\n# HELP t_seconds T.\n# TYPE t_seconds counter\n# UNIT t_seconds seconds\nt_seconds_total 2\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{v=\"1\"} 1\n# HELP odd Odd.\n# TYPE odd untyped\nodd 3\n# HELP t_seconds_total T.\n# TYPE t_seconds_total counter\nt_seconds_total 2\n"
        );
    }
}
