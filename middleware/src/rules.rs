//! Reactive rules: `deny`, `allow`, `limit`, `tag`, each in `enforce` or `shadow` mode,
//! evaluated in order over the compiled matcher.
//!
//! - `deny` rejects at once (stage `rule`, the rule's status).
//! - `allow` admits without quotas and stops rule evaluation; shedding still applies.
//! - `limit` checks a rule-scoped bucket (scope `rule:<name>`) keyed by the aggregated IP,
//!   the client key, a header value (missing: the empty value) or one global key; each
//!   matching request costs 1. With `estimator: sketch` the count lives in a fixed-memory
//!   count-min [`Sketch`] instead of exact buckets.
//! - `tag` sets the priority class and/or the plan, and evaluation goes on.
//!
//! With a state backend that shares state (Redis), a `limit` rule with exact buckets is
//! held fleet-wide like a plan bandwidth (same key layout, `<prefix>:{<key>}:t:rule:<name>`):
//! in `async` mode it decides locally and its admitted counts join the next exchange; in
//! `exact` mode an enforced rule's bucket joins the request's one remote check (on a Redis
//! Cluster, and for shadow rules, it is decided locally and exchanged as in `async` mode);
//! while Redis is unreachable it follows `on_failure` (`local`: local bucket scaled by 1/N,
//! `open`: `exact` skips it, `closed`: 503). A `sketch` rule always counts per gateway.
//!
//! A `shadow` rule never acts. A shadow `deny`, or a shadow `limit` whose bucket is empty,
//! is reported to the observer as `shadow_reject` and counted; a shadow `limit` still counts
//! the requests it would admit in its own bucket, so its would-reject count equals what
//! enforce mode would reject on the same traffic. Shadow `allow` and `tag` do nothing.
//! Every `limit` consumption (shadow or not) is given back if the request is rejected
//! later, as in enforce mode.

use std::ops::ControlFlow;

use fairgate_policies::compiled::{
    CompiledAction, CompiledBandwidth, CompiledPolicy, CompiledRule, PlanId, RequestView,
};
use fairgate_policies::model::{Estimator as EstimatorKind, LimitKey, Mode, Priority};

use crate::backend::{LazyRoute, Route, RuleBucket};
use crate::bucket::params;
use crate::clock::Nanos;
use crate::gcra::Verdict;
use crate::identify::{HeaderValues, LazyIpKey};
use crate::ledger::{Charge, Charges};
use crate::sketch::Sketch;
use crate::state::{Full, Store};

/// Request-local keys a `limit` rule can count by.
pub(crate) struct RuleKeys<'x> {
    pub(crate) ip_key: &'x LazyIpKey,
    pub(crate) client_key: &'x str,
    pub(crate) headers: &'x dyn HeaderValues,
}

/// What the rules decided for a request that goes on.
#[derive(Debug, Default)]
pub(crate) struct RulesOutcome {
    pub(crate) allowed: bool,
    /// The `allow` rule that admitted the request (index into the policy's rules).
    pub(crate) allow_rule: Option<usize>,
    pub(crate) priority: Option<Priority>,
    pub(crate) plan: Option<PlanId>,
    pub(crate) shadow_hits: u32,
}

/// Why the rules rejected.
#[derive(Debug)]
pub(crate) enum RuleReject<'x> {
    Deny {
        rule: &'x CompiledRule,
        status: u16,
    },
    Limit {
        rule: &'x CompiledRule,
        bandwidth: &'x CompiledBandwidth,
        /// The key the rule counts by.
        key: &'x str,
        wait: Nanos,
        /// The bucket's TAT (exact estimator) for the RateLimit numbers.
        tat: Option<Nanos>,
    },
    Full,
    /// An enforced rule's bucket lives in the state backend, which is degraded and fails
    /// closed (`on_failure: closed`).
    Unavailable,
}

/// What `limit` rules with exact buckets did with the state backend, for one request.
#[derive(Default)]
pub(crate) struct RulesShared<'x> {
    /// Buckets left to the remote check ([`Route::Remote`]).
    pub(crate) remote: Vec<RuleBucket>,
    /// Buckets charged locally, to report to the backend if the request is admitted.
    pub(crate) record: Vec<(&'x CompiledBandwidth, &'x str)>,
    /// A rule was decided (or skipped) while the backend is degraded.
    pub(crate) degraded: bool,
}

/// A shadow rule that would have rejected.
pub(crate) struct ShadowHit<'x> {
    pub(crate) rule: &'x CompiledRule,
    pub(crate) bandwidth: Option<(&'x CompiledBandwidth, Nanos)>,
    /// The priority class `tag` rules gave the request before this rule, if any.
    pub(crate) priority: Option<Priority>,
}

/// Evaluates every matching rule in order. A rejection comes with the priority class
/// `tag` rules gave the request before the rejecting rule (for the rejection's event).
#[allow(clippy::too_many_arguments)]
pub(crate) fn evaluate<'x>(
    pol: &'x CompiledPolicy,
    sketches: &'x [Option<std::sync::Arc<Sketch>>],
    view: &RequestView<'_>,
    keys: &RuleKeys<'x>,
    store: &Store,
    now: Nanos,
    charges: &mut Charges<'x, '_>,
    on_shadow: &mut dyn FnMut(ShadowHit<'x>),
    route: &mut LazyRoute<'_>,
    shared: &mut RulesShared<'x>,
) -> Result<RulesOutcome, (RuleReject<'x>, Option<Priority>)> {
    let mut out = RulesOutcome::default();
    let mut reject: Option<RuleReject<'x>> = None;
    let rules: &'x [CompiledRule] = &pol.rules;
    pol.rule_set.for_each_match(view, |i: usize| {
        let Some(rule) = rules.get(i) else {
            return ControlFlow::Continue(());
        };
        let shadow = rule.mode == Mode::Shadow;
        match &rule.action {
            CompiledAction::Deny { status } => {
                if shadow {
                    out.shadow_hits += 1;
                    on_shadow(ShadowHit {
                        rule,
                        bandwidth: None,
                        priority: out.priority,
                    });
                } else {
                    reject = Some(RuleReject::Deny {
                        rule,
                        status: *status,
                    });
                    return ControlFlow::Break(());
                }
            }
            CompiledAction::Allow => {
                if !shadow {
                    out.allowed = true;
                    out.allow_rule = Some(i);
                    return ControlFlow::Break(());
                }
            }
            CompiledAction::Tag { priority, plan } => {
                if !shadow {
                    if priority.is_some() {
                        out.priority = *priority;
                    }
                    if plan.is_some() {
                        out.plan = *plan;
                    }
                }
            }
            CompiledAction::Limit {
                bandwidth,
                key,
                estimator,
            } => {
                let key: &'x str = match key {
                    LimitKey::Ip => keys.ip_key.get().as_str(),
                    LimitKey::Client => keys.client_key,
                    LimitKey::Header(name) => keys.headers.header(name).unwrap_or(""),
                    LimitKey::Global => "",
                };
                let sketch = match estimator {
                    EstimatorKind::Sketch => sketches.get(i).and_then(|s| s.as_deref()),
                    EstimatorKind::Exact => None,
                };
                let over: Option<(Nanos, Option<Nanos>)> = match sketch {
                    Some(s) => match s.check_and_count(now, key, 1) {
                        Ok(()) => {
                            charges.push(Charge::Sketch {
                                sketch: s,
                                key,
                                cost: 1,
                            });
                            None
                        }
                        Err(wait) => Some((wait, None)),
                    },
                    None => {
                        // Where the bucket lives: shadow rules never wait for Redis.
                        let route = match route.for_rule() {
                            Route::Remote if shadow => Route::Shared,
                            r => r,
                        };
                        match route {
                            Route::Local | Route::Shared => {}
                            Route::Degraded => shared.degraded = true,
                            Route::Remote => {
                                shared.remote.push(RuleBucket {
                                    rule: std::sync::Arc::clone(&rule.name),
                                    bandwidth: bandwidth.clone(),
                                    key: key.into(),
                                });
                                return ControlFlow::Continue(());
                            }
                            Route::Admit => {
                                shared.degraded = true;
                                return ControlFlow::Continue(());
                            }
                            Route::Reject if shadow => return ControlFlow::Continue(()),
                            Route::Reject => {
                                reject = Some(RuleReject::Unavailable);
                                return ControlFlow::Break(());
                            }
                        }
                        let p = params(bandwidth);
                        let r = store.with_entry(&bandwidth.id, key, now, bandwidth.c_ns, |e| {
                            (e.consume(now, p, 1), e.tat())
                        });
                        match r {
                            Err(Full) => {
                                reject = Some(RuleReject::Full);
                                return ControlFlow::Break(());
                            }
                            Ok((Verdict::Admit { .. }, _)) => {
                                charges.push(Charge::Bucket {
                                    scope: &bandwidth.id,
                                    key,
                                    amount: p.t,
                                });
                                if route != Route::Local {
                                    shared.record.push((bandwidth, key));
                                }
                                None
                            }
                            Ok((Verdict::Reject { wait }, tat)) => Some((wait, Some(tat))),
                        }
                    }
                };
                if let Some((wait, tat)) = over {
                    if shadow {
                        out.shadow_hits += 1;
                        on_shadow(ShadowHit {
                            rule,
                            bandwidth: Some((bandwidth, tat.unwrap_or(now))),
                            priority: out.priority,
                        });
                    } else {
                        reject = Some(RuleReject::Limit {
                            rule,
                            bandwidth,
                            key,
                            wait,
                            tat,
                        });
                        return ControlFlow::Break(());
                    }
                }
            }
        }
        ControlFlow::Continue(())
    });
    match reject {
        Some(r) => Err((r, out.priority)),
        None => Ok(out),
    }
}
