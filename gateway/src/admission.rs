//! The gateway's side of admission: tagging requests for the engine (peer address, operation,
//! route), and the engine [`Observer`] that feeds metrics and the decision log.
//!
//! What the observer needs of one request travels with the request, not with the thread
//! that happens to run it: [`RoutingLayer`](crate::routing::RoutingLayer) puts a
//! [`DecisionContext`] (the route name, and a slot for a sampled admit's line) in the
//! request's [`RequestContext`] extension ([`tag_route`]), and the engine hands that context
//! to the observer with every decision event of the request — also when the decision is
//! finished later, in the response future (Redis `exact` mode). A sampled admit's line is
//! parked in the context; the proxy takes it from the request it forwards ([`take_pending`])
//! and writes it when the response ends, with the status and latency. A line nobody took
//! (the request never reached the proxy) is written, without a status, when the context is
//! dropped with the request.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use fairgate_middleware::decision::RequestContext;
use fairgate_middleware::{
    Clock, CompletionEvent, DecisionEvent, DecisionKind, MonotonicClock, Observer, Operation,
    PeerAddr,
};
use http::Request;
use prometheus_client::metrics::counter::Counter;

use crate::decision_log::{rfc3339, DecisionLog, DecisionRecord};
use crate::metrics::{DecisionLabels, Metrics};

/// Inserts the engine's [`PeerAddr`] extension.
pub fn tag_peer<B>(req: &mut Request<B>, peer: SocketAddr) {
    req.extensions_mut().insert(PeerAddr(peer));
}

/// Inserts the engine's [`Operation`] extension (a route's operation name).
pub fn tag_operation<B>(req: &mut Request<B>, op: &Arc<str>) {
    req.extensions_mut().insert(Operation(op.clone()));
}

/// Tags a routed request with its [`DecisionContext`] (see the module docs).
pub fn tag_route<B>(req: &mut Request<B>, route: &Arc<str>) {
    req.extensions_mut()
        .insert(RequestContext::new(DecisionContext {
            route: route.clone(),
            pending: Mutex::new(None),
        }));
}

/// Takes the sampled admit of `req`, if its decision left one (the proxy calls this when
/// it starts forwarding: admission has decided by then).
pub fn take_pending<B>(req: &Request<B>) -> Option<PendingAdmit> {
    req.extensions()
        .get::<RequestContext>()?
        .get::<DecisionContext>()?
        .take()
}

/// What the decision log needs of one request, carried in its [`RequestContext`].
#[derive(Debug)]
pub struct DecisionContext {
    /// The route the request matched.
    route: Arc<str>,
    /// A sampled admit's line, until the proxy takes it.
    pending: Mutex<Option<PendingAdmit>>,
}

impl DecisionContext {
    fn park(&self, p: PendingAdmit) {
        let old = lock(&self.pending).replace(p);
        if let Some(old) = old {
            // One admit per request; a second would be an engine bug: log both anyway.
            old.finish(None);
        }
    }

    fn take(&self) -> Option<PendingAdmit> {
        lock(&self.pending).take()
    }
}

impl Drop for DecisionContext {
    fn drop(&mut self) {
        let pending = self
            .pending
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(p) = pending {
            p.finish(None);
        }
    }
}

/// Locks `m`, also when a panic poisoned it (the slot holds no invariant).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A sampled admit whose decision-log line waits for the response (status, latency).
#[derive(Debug)]
pub struct PendingAdmit {
    record: DecisionRecord,
    log: DecisionLog,
    started: Instant,
}

impl PendingAdmit {
    /// Writes the line now, with the response status (`None`: unknown).
    pub fn finish(mut self, status: Option<u16>) {
        self.record.status = status;
        self.record.latency_ms = Some(self.started.elapsed().as_secs_f64() * 1000.0);
        self.log.log(self.record);
    }
}

/// The pre-resolved `fairgate_requests_total` counters, one per label set seen, so counting a
/// decision is one hash lookup over borrowed names and an atomic increment: no allocation,
/// no lock, no lookup in the metric family. Label sets are bounded (stages, decisions, and
/// the rule and plan names of the config and policy); a new set is resolved once, through
/// the family, and added copy-on-write.
#[derive(Debug, Default)]
struct DecisionCounters {
    map: ArcSwap<HashMap<OwnedLabels, Counter>>,
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
    /// Counts one request's decision in `fairgate_requests_total`.
    fn count(&self, metrics: &Metrics, labels: &LabelRef<'_>) {
        self.count_with(labels, || {
            metrics.decision_counter(&DecisionLabels {
                stage: Arc::from(labels.stage),
                decision: Arc::from(labels.decision),
                rule: Arc::from(labels.rule),
                plan: Arc::from(labels.plan),
            })
        });
    }

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

/// The engine observer: metrics for every decision, decision-log lines for rejections and
/// sampled admits.
#[derive(Debug)]
pub struct GatewayObserver {
    metrics: Arc<Metrics>,
    log: DecisionLog,
    /// `fairgate_requests_total`: each request once, by the decision that settled it.
    counters: DecisionCounters,
    /// `fairgate_shadow_rejects_total`: shadow rule hits (keyed by rule only), apart from
    /// the requests they did not stop, so that `fairgate_requests_total` counts each
    /// request once.
    shadow: DecisionCounters,
    /// The clock of audit-mode `mono_ns` stamps.
    clock: Arc<dyn Clock>,
}

impl GatewayObserver {
    /// An observer writing to `metrics` and `log`. Audit-mode lines are stamped with a
    /// [`MonotonicClock`] (the engine's clock type: the same `CLOCK_MONOTONIC`, its own
    /// origin, so differences between stamps are the engine's); [`with_clock`](Self::with_clock)
    /// makes it the engine's own clock.
    pub fn new(metrics: Arc<Metrics>, log: DecisionLog) -> GatewayObserver {
        GatewayObserver {
            metrics,
            log,
            counters: DecisionCounters::default(),
            shadow: DecisionCounters::default(),
            clock: Arc::new(MonotonicClock::new()),
        }
    }

    /// Stamps audit-mode lines with `clock` (pass `Engine::clock()`).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> GatewayObserver {
        self.clock = clock;
        self
    }

    /// Audit mode: every decision's line, written now, stamped with the clock.
    fn log_audit(&self, e: &DecisionEvent<'_>) {
        let mono_ns = self.clock.now();
        let mut record = self.record(e);
        record.mono_ns = Some(mono_ns);
        self.log.log(record);
    }

    /// Logs a rejection's line, built only when the log is on and the line is within its
    /// key's budget (a flood is only counted, for the summary line).
    fn log_rejection(&self, e: &DecisionEvent<'_>) {
        if self
            .log
            .admit_rejection(e.rule, e.stage.map(|s| s.as_str()), e.plan)
        {
            self.log.log(self.record(e));
        }
    }

    fn record(&self, e: &DecisionEvent<'_>) -> DecisionRecord {
        DecisionRecord {
            time: rfc3339(SystemTime::now()),
            kind: "decision",
            client: e.client_key.to_owned(),
            route: decision_context(e).map(|c| c.route.to_string()),
            operation: e.operation.map(str::to_owned),
            stage: e.stage.map(|s| s.as_str()),
            rule: e.rule.map(str::to_owned),
            plan: e.plan.map(str::to_owned),
            limit: e
                .limit
                .map(|l| l.policy.to_string())
                .or_else(|| e.bandwidth.map(str::to_owned)),
            cost: e.cost,
            decision: e.kind.as_str(),
            retry_after: e.retry_after.map(|d| d.as_secs()),
            status: (e.status != 0).then_some(e.status),
            latency_ms: None,
            mono_ns: None,
        }
    }
}

impl Observer for GatewayObserver {
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
            self.shadow
                .count_with(&labels, || self.metrics.shadow_reject_counter(rule));
        } else {
            self.counters.count(
                &self.metrics,
                &LabelRef {
                    stage: e.stage.map_or("none", |s| s.as_str()),
                    decision: e.kind.as_str(),
                    rule: e.rule.unwrap_or(""),
                    plan: e.plan.unwrap_or(""),
                },
            );
        }
        let audit = self.log.is_audit();
        match e.kind {
            DecisionKind::Reject => {
                if e.stage == Some(fairgate_middleware::Stage::Shed) {
                    self.metrics.shed(priority_name(e.priority));
                }
                if audit {
                    self.log_audit(e);
                } else {
                    self.log_rejection(e);
                }
            }
            DecisionKind::ShadowReject if audit => self.log_audit(e),
            DecisionKind::ShadowReject => {
                self.log_rejection(e);
            }
            DecisionKind::Admit | DecisionKind::Borrowed => {
                if let Some(l) = e.limit {
                    // Under 20% of the bucket (its burst) left after this admit.
                    if l.burst > 0 && l.remaining.saturating_mul(5) < l.burst {
                        self.metrics.near_limit();
                    }
                }
                if audit {
                    self.log_audit(e);
                } else if self.log.sample_admit() {
                    let record = self.record(e);
                    match decision_context(e) {
                        // In the gateway stack: finish the line when the response ends.
                        Some(c) => c.park(PendingAdmit {
                            record,
                            log: self.log.clone(),
                            started: Instant::now(),
                        }),
                        None => {
                            self.log.log(record);
                        }
                    }
                }
            }
        }
    }

    fn on_complete(&self, _e: &CompletionEvent<'_>) {}
}

/// The gateway's context of the event's request, if it has one.
fn decision_context<'a>(e: &DecisionEvent<'a>) -> Option<&'a DecisionContext> {
    e.context?.get::<DecisionContext>()
}

fn priority_name(p: fairgate_middleware::Priority) -> &'static str {
    use fairgate_middleware::Priority;
    match p {
        Priority::Critical => "critical",
        Priority::Normal => "normal",
        Priority::Borrowed => "borrowed",
        Priority::Sheddable => "sheddable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_counters_count_into_the_family() {
        let metrics = Metrics::new();
        let counters = DecisionCounters::default();
        let labels = |rule| LabelRef {
            stage: "rules",
            decision: "reject",
            rule,
            plan: "",
        };
        counters.count(&metrics, &labels("bad-bot"));
        counters.count(&metrics, &labels("bad-bot"));
        counters.count(&metrics, &labels("other"));
        assert_eq!(counters.map.load().len(), 2);
        let text = metrics.encode();
        assert!(text.contains(
            r#"fairgate_requests_total{stage="rules",decision="reject",rule="bad-bot",plan=""} 2"#
        ));
        assert!(text.contains(
            r#"fairgate_requests_total{stage="rules",decision="reject",rule="other",plan=""} 1"#
        ));
    }
}
