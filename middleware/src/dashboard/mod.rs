//! The live dashboard (feature `dashboard`): a page on the admin router (`GET /dashboard`)
//! and the history it draws, kept in this process in fixed memory.
//!
//! What it owns: a sampler task that every `step` reads what the engine and its metrics
//! already count (decision counters, shedding gauges, top clients, the backend's snapshot)
//! into rings of `points` samples; a ring of the latest decision events, for a client's
//! drill-down; the last reloads with their diffs and errors; the operator actions taken
//! from the page. Memory is bounded whatever the traffic: at most [`MAX_SERIES`] decision
//! series, [`MAX_CLIENTS`] client histories and [`RECENT`] decision events.
//!
//! What it must not touch: the request path beyond [`Observer::on_decision`], which only
//! copies the event into the recent ring when its lock is free (a contended event is
//! skipped and counted, never waited for). Counting is the metrics' job (`EngineMetrics`,
//! read here at each step), so the page and `/metrics` show the same numbers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fairgate_policies::store::ReloadOutcome;
use serde_json::{json, Value};

use crate::decision::{CompletionEvent, DecisionEvent, Observer, Priority};
use crate::engine::{ClientUsage, Engine};
use crate::identify::ClientKey;
use crate::observe::EngineMetrics;

/// Decision series (stage × decision × rule × plan) kept; more are summed into one `other`.
pub const MAX_SERIES: usize = 200;
/// Clients whose history is kept (the top clients of each sample, and those an operator
/// opened); the one not seen longest is dropped first.
pub const MAX_CLIENTS: usize = 64;
/// Decision events kept for drill-downs.
pub const RECENT: usize = 2048;
/// Reloads and operator actions kept.
const LOG: usize = 50;
/// Bandwidths per client history.
const CLIENT_BANDWIDTHS: usize = 8;
/// Top clients sampled each step.
const TOP: usize = 10;

/// How much history: one sample every `step`, `points` samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DashboardConfig {
    /// Time between samples (at least 1 s).
    pub step: Duration,
    /// Samples kept (1 ..= 7,200).
    pub points: usize,
}

impl Default for DashboardConfig {
    /// One hour at 5 s resolution.
    fn default() -> Self {
        DashboardConfig {
            step: Duration::from_secs(5),
            points: 720,
        }
    }
}

/// The dashboard of one engine: an [`Observer`] (attach it beside the metrics) and the
/// history behind `GET /dashboard/data`. Cheap to clone.
#[derive(Clone)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    engine: Arc<Engine>,
    metrics: Arc<EngineMetrics>,
    config: DashboardConfig,
    history: Mutex<History>,
    recent: Mutex<VecDeque<Recent>>,
    /// Decision events not kept because the ring was busy.
    recent_skipped: AtomicU64,
    reloads: Mutex<VecDeque<Value>>,
    actions: Mutex<VecDeque<Value>>,
}

/// A decision event, copied without allocating (names inline up to 110 bytes).
struct Recent {
    at_ms: u64,
    key: ClientKey,
    kind: &'static str,
    stage: &'static str,
    rule: Option<ClientKey>,
    plan: Option<ClientKey>,
    bandwidth: Option<ClientKey>,
    status: u16,
    priority: Priority,
}

/// A series' identity: (stage, decision, rule, plan).
type SeriesId = (&'static str, &'static str, Box<str>, Box<str>);

#[derive(Default)]
struct History {
    /// Wall time of each sample, ms since the Unix epoch.
    times: VecDeque<u64>,
    /// Decisions per second in each step, per series.
    series: BTreeMap<SeriesId, VecDeque<f64>>,
    /// The counters at the previous sample.
    last: HashMap<SeriesId, u64>,
    in_flight: VecDeque<f64>,
    limit: VecDeque<f64>,
    utilization: VecDeque<f64>,
    tracked_keys: VecDeque<f64>,
    near_limit: VecDeque<f64>,
    last_near_limit: Option<u64>,
    shed: [VecDeque<f64>; 4],
    last_shed: [Option<u64>; 4],
    redis_errors: VecDeque<f64>,
    last_redis_errors: Option<u64>,
    clients: HashMap<String, ClientHistory>,
    /// Clients an operator opened, kept in the history while they stay among the newest.
    top: Vec<ClientUsage>,
    samples: u64,
}

struct ClientHistory {
    /// Index (in `History::samples` numbering) of the first point.
    first: u64,
    /// The sample at which the client was last top or opened.
    seen: u64,
    /// Used fraction per bandwidth id (`1 − fill`), aligned to `times` from `first`.
    bandwidths: BTreeMap<Arc<str>, VecDeque<f64>>,
    in_flight: VecDeque<f64>,
}

const PRIORITIES: [Priority; 4] = [
    Priority::Critical,
    Priority::Normal,
    Priority::Borrowed,
    Priority::Sheddable,
];

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn push(ring: &mut VecDeque<f64>, v: f64, cap: usize) {
    if ring.len() == cap {
        ring.pop_front();
    }
    ring.push_back(v);
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A counter's rate over one step, from its previous value (none: no rate yet, 0).
fn rate(now: u64, last: Option<u64>, step: Duration) -> f64 {
    match last {
        Some(l) if now >= l => (now - l) as f64 / step.as_secs_f64(),
        _ => 0.0,
    }
}

impl Dashboard {
    /// A dashboard of `engine`, reading `metrics` (which must observe the same engine),
    /// and recording its reloads from now on. Start the sampler with [`Dashboard::start`]
    /// and attach the dashboard as an observer for drill-downs.
    pub fn new(engine: Arc<Engine>, metrics: Arc<EngineMetrics>, config: DashboardConfig) -> Self {
        let config = DashboardConfig {
            step: config.step.max(Duration::from_secs(1)),
            points: config.points.clamp(1, 7_200),
        };
        // The counters now are the baseline: the first step shows what happens after it.
        let mut history = History::default();
        for c in metrics.decision_counts() {
            history
                .last
                .insert((c.stage, c.decision, c.rule, c.plan), c.value);
        }
        history.last_near_limit = Some(metrics.near_limit_count());
        for (i, p) in PRIORITIES.iter().enumerate() {
            history.last_shed[i] = Some(metrics.shed_count(*p));
        }
        history.last_redis_errors = engine.backend_snapshot().map(|s| s.errors);
        let inner = Arc::new(Inner {
            engine,
            metrics,
            config,
            history: Mutex::new(history),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            recent_skipped: AtomicU64::new(0),
            reloads: Mutex::new(VecDeque::new()),
            actions: Mutex::new(VecDeque::new()),
        });
        let weak = Arc::downgrade(&inner);
        inner.engine.store().on_reload(move |outcome| {
            if let Some(inner) = weak.upgrade() {
                inner.record_reload(outcome);
            }
        });
        Dashboard { inner }
    }

    /// The history's shape.
    pub fn config(&self) -> DashboardConfig {
        self.inner.config
    }

    /// Spawns the sampler on the current tokio runtime: one sample now, then one every
    /// `step`, until the last clone of the dashboard is dropped.
    pub fn start(&self) {
        let weak = Arc::downgrade(&self.inner);
        let step = self.inner.config.step;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(step);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                // Top clients scan the state table: off the async workers.
                let _ = tokio::task::spawn_blocking(move || inner.sample(now_ms())).await;
            }
        });
    }

    /// Takes one sample now (the sampler's step; also for tests).
    pub fn sample(&self) {
        self.inner.sample(now_ms());
    }

    /// Records an operator action (shown on the page; the caller logs it too).
    pub fn record_action(&self, action: &str, key: &str, detail: &Value) {
        let mut a = lock(&self.inner.actions);
        if a.len() == LOG {
            a.pop_front();
        }
        a.push_back(json!({
            "at_ms": now_ms(),
            "action": action,
            "key": key,
            "detail": detail.clone(),
        }));
    }

    /// Keeps `key`'s history from the next sample on (an operator opened it).
    pub fn watch(&self, key: &str) {
        let mut h = lock(&self.inner.history);
        let samples = h.samples;
        let first = samples;
        let cap = MAX_CLIENTS;
        if !h.clients.contains_key(key) {
            evict_clients(&mut h.clients, cap - 1);
            h.clients.insert(
                key.to_owned(),
                ClientHistory {
                    first,
                    seen: samples,
                    bandwidths: BTreeMap::new(),
                    in_flight: VecDeque::new(),
                },
            );
        } else if let Some(c) = h.clients.get_mut(key) {
            c.seen = samples;
        }
    }

    /// Everything the page draws, as JSON.
    pub fn data(&self) -> Value {
        let inner = &self.inner;
        let engine = &inner.engine;
        let h = lock(&inner.history);
        let series: Vec<Value> = h
            .series
            .iter()
            .map(|((stage, decision, rule, plan), values)| {
                json!({
                    "stage": stage,
                    "decision": decision,
                    "rule": &**rule,
                    "plan": &**plan,
                    "values": values,
                })
            })
            .collect();
        let shed: serde_json::Map<String, Value> = PRIORITIES
            .iter()
            .zip(&h.shed)
            .map(|(p, v)| (priority_name(*p).to_owned(), json!(v)))
            .collect();
        let policy = engine.store().load_full();
        let last = engine.store().last_reload();
        let backend = engine.backend_snapshot().map(|s| {
            json!({
                "degraded": s.degraded,
                "breaker": if s.degraded { "open" } else { "closed" },
                "gateways": s.gateways,
                "errors": s.errors,
                "calls": s.calls,
                "breaker_opens": s.breaker_opens,
                "failure_mode_admits": s.failure_mode_admits,
                "failure_mode_rejects": s.failure_mode_rejects,
                "syncs": s.syncs,
                "errors_per_second": &h.redis_errors,
            })
        });
        let in_flight = engine.in_flight();
        let limit = engine.shed_limit();
        let delay = engine.reject_delay();
        json!({
            "step_seconds": inner.config.step.as_secs_f64(),
            "points": inner.config.points,
            "times": &h.times,
            "decisions": series,
            "near_limit": &h.near_limit,
            "shedding": {
                "in_flight": &h.in_flight,
                "limit": &h.limit,
                "utilization": &h.utilization,
                "shed_per_second": shed,
                "now": {
                    "in_flight": in_flight,
                    "limit": limit,
                    "utilization": limit.filter(|l| *l > 0).map(|l| in_flight as f64 / l as f64),
                    "reject_delay_ms": delay.map(|(d, _)| d.as_secs_f64() * 1000.0),
                    "delayed_waiting": delay.map(|(_, w)| w),
                },
            },
            "tracked_keys": &h.tracked_keys,
            "top": h.top.iter().map(crate::observe::usage_json).collect::<Vec<_>>(),
            "policy": {
                "version": policy.version,
                "hash": policy.hash.to_hex(),
                "loaded_at": crate::clock::rfc3339(last.loaded_at),
                "reloads": lock(&inner.reloads).iter().rev().cloned().collect::<Vec<_>>(),
                "effective": serde_json::to_value(&*policy.source).unwrap_or(Value::Null),
            },
            "backend": backend,
            "actions": lock(&inner.actions).iter().rev().cloned().collect::<Vec<_>>(),
            "recent_skipped": inner.recent_skipped.load(Ordering::Relaxed),
        })
    }

    /// One client: its usage now, its history (when kept) and its recent decisions.
    /// `None` when the engine knows nothing of it and no history is kept.
    pub fn client(&self, key: &str) -> Option<Value> {
        let usage = self.inner.engine.client_usage(key);
        let h = lock(&self.inner.history);
        let history = h.clients.get(key).map(|c| {
            let skip = usize::try_from(c.first.saturating_sub(
                h.samples.saturating_sub(h.times.len() as u64),
            ))
            .unwrap_or(0);
            json!({
                "times": h.times.iter().skip(skip).collect::<Vec<_>>(),
                "bandwidths": c.bandwidths.iter().map(|(id, v)| (id.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "in_flight": &c.in_flight,
            })
        });
        drop(h);
        let recent: Vec<Value> = lock(&self.inner.recent)
            .iter()
            .rev()
            .filter(|r| r.key.as_str() == key)
            .take(100)
            .map(|r| {
                json!({
                    "at_ms": r.at_ms,
                    "decision": r.kind,
                    "stage": r.stage,
                    "rule": r.rule.as_ref().map(ClientKey::as_str),
                    "plan": r.plan.as_ref().map(ClientKey::as_str),
                    "bandwidth": r.bandwidth.as_ref().map(ClientKey::as_str),
                    "status": (r.status != 0).then_some(r.status),
                    "priority": priority_name(r.priority),
                })
            })
            .collect();
        if usage.is_none() && history.is_none() && recent.is_empty() {
            return None;
        }
        Some(json!({
            "key": key,
            "usage": usage.as_ref().map(crate::observe::usage_json),
            "history": history,
            "recent": recent,
        }))
    }
}

fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::Critical => "critical",
        Priority::Normal => "normal",
        Priority::Borrowed => "borrowed",
        Priority::Sheddable => "sheddable",
    }
}

/// Drops the clients seen longest ago until at most `keep` remain.
fn evict_clients(clients: &mut HashMap<String, ClientHistory>, keep: usize) {
    while clients.len() > keep {
        let Some(oldest) = clients
            .iter()
            .min_by_key(|(_, c)| c.seen)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        clients.remove(&oldest);
    }
}

impl Inner {
    fn record_reload(&self, outcome: &ReloadOutcome) {
        let entry = match outcome {
            ReloadOutcome::Reloaded(r) => json!({
                "at_ms": now_ms(),
                "result": "ok",
                "unchanged": r.unchanged,
                "version": r.version,
                "previous_version": r.previous_version,
                "rules_added": r.rules_added,
                "rules_removed": r.rules_removed,
                "rules_modified": r.rules_modified,
                "plans_added": r.plans_added,
                "plans_removed": r.plans_removed,
                "plans_modified": r.plans_modified,
            }),
            ReloadOutcome::Failed(e) => json!({
                "at_ms": now_ms(),
                "result": "error",
                "errors": e.iter().map(ToString::to_string).collect::<Vec<_>>(),
            }),
        };
        let mut r = lock(&self.reloads);
        if r.len() == LOG {
            r.pop_front();
        }
        r.push_back(entry);
    }

    fn sample(&self, at_ms: u64) {
        let cap = self.config.points;
        let step = self.config.step;
        let engine = &self.engine;
        let counts = self.metrics.decision_counts();
        let top = engine.top_clients(TOP);
        let mut h = lock(&self.history);
        let h = &mut *h;
        if h.times.len() == cap {
            h.times.pop_front();
        }
        h.times.push_back(at_ms);
        let len = h.times.len();

        // Decision series: the rate of each counter over the step.
        for c in counts {
            let mut id: SeriesId = (c.stage, c.decision, c.rule, c.plan);
            // Counters appear with their first decision, from 0; what was counted before the
            // dashboard existed is in the baseline `new` took.
            let last = h.last.insert(id.clone(), c.value).or(Some(0));
            let v = rate(c.value, last, step);
            if !h.series.contains_key(&id) && h.series.len() >= MAX_SERIES {
                id = ("other", c.decision, "".into(), "".into());
            }
            let ring = h.series.entry(id).or_insert_with(|| {
                let mut r = VecDeque::with_capacity(cap);
                r.resize(len.saturating_sub(1), 0.0);
                r
            });
            if ring.len() >= len {
                // Several counters summed into `other` this step.
                if let Some(x) = ring.back_mut() {
                    *x += v;
                }
            } else {
                push(ring, v, cap);
            }
        }
        for ring in h.series.values_mut() {
            while ring.len() < len {
                push(ring, 0.0, cap);
            }
        }

        let in_flight = engine.in_flight();
        let limit = engine.shed_limit().unwrap_or(0);
        push(&mut h.in_flight, in_flight as f64, cap);
        push(&mut h.limit, limit as f64, cap);
        push(
            &mut h.utilization,
            if limit == 0 {
                0.0
            } else {
                in_flight as f64 / limit as f64
            },
            cap,
        );
        push(&mut h.tracked_keys, engine.tracked_keys() as f64, cap);
        let near = self.metrics.near_limit_count();
        push(&mut h.near_limit, rate(near, h.last_near_limit, step), cap);
        h.last_near_limit = Some(near);
        for (i, p) in PRIORITIES.iter().enumerate() {
            let n = self.metrics.shed_count(*p);
            push(&mut h.shed[i], rate(n, h.last_shed[i], step), cap);
            h.last_shed[i] = Some(n);
        }
        if let Some(s) = engine.backend_snapshot() {
            push(
                &mut h.redis_errors,
                rate(s.errors, h.last_redis_errors, step),
                cap,
            );
            h.last_redis_errors = Some(s.errors);
        }

        // Client histories: this sample's top clients, and those an operator opened.
        let sample = h.samples;
        for u in &top {
            if let Some(c) = h.clients.get_mut(&u.key) {
                c.seen = sample;
            } else {
                evict_clients(&mut h.clients, MAX_CLIENTS - 1);
                h.clients.insert(
                    u.key.clone(),
                    ClientHistory {
                        first: sample,
                        seen: sample,
                        bandwidths: BTreeMap::new(),
                        in_flight: VecDeque::new(),
                    },
                );
            }
        }
        let keys: Vec<String> = h.clients.keys().cloned().collect();
        for key in keys {
            let usage = match top.iter().find(|u| u.key == key) {
                Some(u) => Some(u.clone()),
                None => engine.client_usage(&key),
            };
            let Some(c) = h.clients.get_mut(&key) else {
                continue;
            };
            let points = usize::try_from(sample + 1 - c.first.min(sample + 1))
                .unwrap_or(usize::MAX)
                .min(cap);
            if let Some(u) = usage {
                for b in u.bandwidths.iter().take(CLIENT_BANDWIDTHS) {
                    if !c.bandwidths.contains_key(&b.id) && c.bandwidths.len() >= CLIENT_BANDWIDTHS
                    {
                        continue;
                    }
                    let ring = c.bandwidths.entry(Arc::clone(&b.id)).or_default();
                    while ring.len() + 1 < points {
                        push(ring, 0.0, cap);
                    }
                    push(ring, 1.0 - b.fill_fraction, cap);
                }
                push(&mut c.in_flight, u.in_flight as f64, cap);
            } else {
                push(&mut c.in_flight, 0.0, cap);
            }
            for ring in c.bandwidths.values_mut() {
                while ring.len() < c.in_flight.len() {
                    push(ring, 0.0, cap);
                }
            }
        }
        h.top = top;
        h.samples += 1;
    }
}

impl Observer for Dashboard {
    fn on_decision(&self, e: &DecisionEvent<'_>) {
        // Never wait on the request path: a busy ring skips this event.
        let Ok(mut ring) = self.inner.recent.try_lock() else {
            self.inner.recent_skipped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if ring.len() == RECENT {
            ring.pop_front();
        }
        ring.push_back(Recent {
            at_ms: now_ms(),
            key: ClientKey::new(e.client_key),
            kind: e.kind.as_str(),
            stage: e.stage.map_or("", |s| s.as_str()),
            rule: e.rule.map(ClientKey::new),
            plan: e.plan.map(ClientKey::new),
            bandwidth: e.bandwidth.map(ClientKey::new),
            status: e.status,
            priority: e.priority,
        });
    }

    fn on_complete(&self, _e: &CompletionEvent<'_>) {}
}

/// The page: one HTML file with its script and style inline, no external asset.
pub(crate) const PAGE: &str = include_str!("page.html");

#[cfg(test)]
mod tests;
