//! The decision log: one JSON object per line, to stdout or a file, written by a dedicated
//! thread so the request path only does a non-blocking channel send.
//!
//! Every rejection is logged, but flooding is aggregated: at most `max_rejections_per_rule`
//! lines per rule (or per stage and plan, for quota rejections) per second; the rest of that
//! second becomes one `summary` line with the count. Admits are sampled at `sample_admits`.
//! The request path asks [`DecisionLog::admit_rejection`] before it builds a rejection's line:
//! past the per-key budget of the current window it only counts the rejection (one atomic
//! increment), so a flood costs no line building, channel traffic or writer work; the writer
//! owns the window, resets the budgets when it rolls and reports what they suppressed.
//! When the writer falls behind, lines are dropped, counted in
//! `fairgate_decision_log_dropped_total` and reported in a `dropped` summary line.
//!
//! [`DecisionLog`] is an [`Observer`]: install it on the engine (alone, or beside the
//! metrics as a pair, `(metrics, log)`) and it writes what the engine decides. In the gateway
//! a sampled admit's line waits for the response (status, latency) in the request's
//! [`DecisionContext`] ([`tag_route`], [`take_pending`]); a request without one (an app that
//! embeds the layer) has its sampled admits written at decision time, `status` and
//! `latency_ms` `null`.
//!
//! The fields are a stable interface (the accuracy audit reads them); see `docs/gateway.md`.
//! Every `decision` line has every key, `null` when it does not apply:
//!
//! `{"time","type":"decision","client","route","operation","stage","rule","plan","bandwidth",
//!   "cost","decision","retry_after","status","latency_ms"}`
//!
//! Rejections are written at decision time (`latency_ms` is `null`); a sampled admit is
//! written when its response ends, with the response status and the latency.
//!
//! **Audit mode** (`log: {audit: true}`, for `fairgate audit`): every decision is written
//! at decision time with one more key, `mono_ns` (the monotonic clock the engine reads, in
//! ns); admits are not sampled, rejections not summarised, and a full channel makes the
//! request path wait instead of dropping a line, so the log is complete and replayable.
//! Normal mode pays nothing for it (one `bool` test per decision).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::hash::{Hash, Hasher};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::Request;
use serde::Serialize;

use crate::clock::{rfc3339, Clock, MonotonicClock};
use crate::decision::{CompletionEvent, DecisionEvent, DecisionKind, Observer, RequestContext};

const CHANNEL_CAPACITY: usize = 16 * 1024;

/// One decision-log line.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DecisionRecord {
    /// RFC 3339 UTC time with milliseconds.
    pub time: String,
    /// Always `decision`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The client key (API key, or IP for keyless clients).
    pub client: String,
    /// The gateway route.
    pub route: Option<String>,
    /// The operation.
    pub operation: Option<String>,
    /// The rejecting stage (`rule`, `quota`, `concurrency`, `shed`), `null` for admits.
    pub stage: Option<&'static str>,
    /// The rule involved.
    pub rule: Option<String>,
    /// The client's plan.
    pub plan: Option<String>,
    /// The bandwidth involved: its `RateLimit-Policy` name, e.g. `free-0`.
    pub bandwidth: Option<String>,
    /// Cost in quota units.
    pub cost: u64,
    /// `admit`, `borrowed`, `reject` or `shadow_reject`.
    pub decision: &'static str,
    /// `Retry-After` seconds sent.
    pub retry_after: Option<u64>,
    /// The status answered (`null` when the request never reached the proxy).
    pub status: Option<u16>,
    /// Admits: milliseconds from the decision to the end of the response; `null` otherwise.
    pub latency_ms: Option<f64>,
    /// Audit mode only: the monotonic time of the decision in ns (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mono_ns: Option<u64>,
}

/// An operator action (set or clear an override, reset a client's buckets), logged as one
/// `{"type": "action", ...}` line beside the decisions it changes.
#[derive(Debug, Clone, Serialize)]
pub struct ActionRecord {
    /// RFC 3339 UTC time with milliseconds.
    pub time: String,
    /// Always `action`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// What was done: `override_set`, `override_clear`, `reset`, `growth`, `growth_reset`.
    pub action: String,
    /// The client key acted on.
    pub client: String,
    /// The action's parameters (the override set, the buckets refilled).
    pub detail: serde_json::Value,
}

/// What the writer thread is sent.
enum Queued {
    Decision(DecisionRecord),
    Action(ActionRecord),
}

#[derive(Debug, Serialize)]
struct SummaryRecord<'a> {
    time: String,
    #[serde(rename = "type")]
    kind: &'static str,
    /// The aggregation key: the rule, or `stage/plan`.
    key: &'a str,
    /// Lines not written in the last window.
    suppressed: u64,
    window_s: u64,
}

/// Where decision-log lines go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DecisionTarget {
    /// Standard output (the default).
    #[default]
    Stdout,
    /// Nowhere.
    Off,
    /// Appended to a file.
    File(PathBuf),
}

/// What [`DecisionLog::start`] writes, and where (the gateway's `log:` section).
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionLogConfig {
    /// Where lines go (`decisions`).
    pub decisions: DecisionTarget,
    /// Fraction of admits logged, 0–1 (`sample_admits`, default 0.01).
    pub sample_admits: f64,
    /// Rejection lines per aggregation key per second before the rest become one
    /// `summary` line (`max_rejections_per_rule`, default 10).
    pub max_rejections_per_rule: u32,
    /// Audit mode (`audit`): every decision, stamped with `mono_ns`, nothing dropped.
    pub audit: bool,
}

impl Default for DecisionLogConfig {
    fn default() -> Self {
        DecisionLogConfig {
            decisions: DecisionTarget::Stdout,
            sample_admits: 0.01,
            max_rejections_per_rule: 10,
            audit: false,
        }
    }
}

/// Producer handle of the decision log, and the engine [`Observer`] that writes it. Cheap
/// to clone.
#[derive(Clone)]
pub struct DecisionLog {
    tx: Option<SyncSender<Queued>>,
    sample_admits: f64,
    /// Lines dropped in the writer's current window (its `dropped` summary line).
    dropped: Arc<AtomicU64>,
    /// Lines dropped since start (`fairgate_decision_log_dropped_total`).
    dropped_total: Arc<AtomicU64>,
    budgets: Arc<Budgets>,
    audit: bool,
    /// The clock of audit-mode `mono_ns` stamps.
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for DecisionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionLog")
            .field("on", &self.tx.is_some())
            .field("sample_admits", &self.sample_admits)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

/// The aggregation key of a rejection's line, borrowed (lookups) or owned (map keys): the
/// rule, or the stage and plan.
trait KeyView {
    fn parts(&self) -> (Option<&str>, &str, &str);
}

impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.parts().hash(h);
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyView + '_ {}

#[derive(Debug, Clone, PartialEq, Eq)]
struct OwnedKey {
    rule: Option<Box<str>>,
    stage: Box<str>,
    plan: Box<str>,
}

impl KeyView for OwnedKey {
    fn parts(&self) -> (Option<&str>, &str, &str) {
        (self.rule.as_deref(), &self.stage, &self.plan)
    }
}

impl Hash for OwnedKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Must hash like `dyn KeyView`, which lookups use.
        self.parts().hash(h);
    }
}

impl<'a> Borrow<dyn KeyView + 'a> for OwnedKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

struct KeyRef<'a> {
    rule: Option<&'a str>,
    stage: &'a str,
    plan: &'a str,
}

impl KeyView for KeyRef<'_> {
    fn parts(&self) -> (Option<&str>, &str, &str) {
        (self.rule, self.stage, self.plan)
    }
}

/// One key's budget in the writer's current window.
#[derive(Debug)]
struct Budget {
    /// The key as summary lines show it: the rule, or `stage/plan`.
    name: String,
    /// Lines let through this window.
    written: AtomicU64,
    /// Rejections counted, not sent, this window.
    suppressed: AtomicU64,
}

impl Budget {
    fn spend(&self, max: u64) -> bool {
        if self.written.fetch_add(1, Ordering::Relaxed) < max {
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Per-key line budgets, shared by the producers and the writer. Keys are bounded (rules,
/// and stage × plan), so the copy-on-write map stays small.
#[derive(Debug)]
struct Budgets {
    max_per_key: u64,
    map: ArcSwap<HashMap<OwnedKey, Arc<Budget>>>,
}

impl Budgets {
    fn new(max_per_key: u64) -> Budgets {
        Budgets {
            max_per_key,
            map: ArcSwap::default(),
        }
    }

    /// Spends one line of `key`'s budget; false (and counted) when it is spent.
    fn spend(&self, key: &KeyRef<'_>) -> bool {
        if let Some(b) = self.map.load().get(key as &dyn KeyView) {
            return b.spend(self.max_per_key);
        }
        self.insert(key).spend(self.max_per_key)
    }

    fn insert(&self, key: &KeyRef<'_>) -> Arc<Budget> {
        let owned = OwnedKey {
            rule: key.rule.map(Box::from),
            stage: Box::from(key.stage),
            plan: Box::from(key.plan),
        };
        let fresh = Arc::new(Budget {
            name: aggregation_key(key.rule, Some(key.stage), Some(key.plan)),
            written: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        });
        self.map.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.entry(owned.clone()).or_insert_with(|| fresh.clone());
            m
        });
        // Whichever budget won the race is the one in the map.
        self.map
            .load()
            .get(key as &dyn KeyView)
            .cloned()
            .unwrap_or(fresh)
    }

    /// Starts a new window: every budget is refilled; returns what each suppressed.
    fn roll(&self) -> Vec<(String, u64)> {
        let map = self.map.load();
        let mut out = Vec::new();
        for b in map.values() {
            b.written.store(0, Ordering::Relaxed);
            let n = b.suppressed.swap(0, Ordering::Relaxed);
            if n > 0 {
                out.push((b.name.clone(), n));
            }
        }
        out
    }
}

/// The aggregation key of a rejection: the rule, or `stage/plan`.
fn aggregation_key(rule: Option<&str>, stage: Option<&str>, plan: Option<&str>) -> String {
    match rule {
        Some(rule) => rule.to_owned(),
        None => format!("{}/{}", stage.unwrap_or(""), plan.unwrap_or("")),
    }
}

// === impl DecisionLog ===

impl DecisionLog {
    /// A log that writes nothing.
    pub fn off() -> DecisionLog {
        DecisionLog {
            tx: None,
            sample_admits: 0.0,
            dropped: Arc::new(AtomicU64::new(0)),
            dropped_total: Arc::new(AtomicU64::new(0)),
            budgets: Arc::new(Budgets::new(0)),
            audit: false,
            clock: Arc::new(MonotonicClock::new()),
        }
    }

    /// Stamps audit-mode lines with `clock` (pass `Engine::clock()`, so `mono_ns` is the
    /// engine's time). Without it they are stamped with a [`MonotonicClock`] of their own
    /// (the same `CLOCK_MONOTONIC`, another origin).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> DecisionLog {
        self.clock = clock;
        self
    }

    /// Lines dropped since start because the writer fell behind.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    /// The shared count behind [`dropped_total`](Self::dropped_total).
    #[cfg(feature = "metrics")]
    pub(crate) fn dropped_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.dropped_total)
    }

    /// Starts the writer thread for `config`.
    pub fn start(config: &DecisionLogConfig) -> io::Result<DecisionLog> {
        let out: Box<dyn Write + Send> = match &config.decisions {
            DecisionTarget::Off => return Ok(DecisionLog::off()),
            DecisionTarget::Stdout => Box::new(io::stdout()),
            DecisionTarget::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
            ),
        };
        if config.audit {
            return Ok(Self::audit_writer(out));
        }
        Ok(Self::with_writer(
            out,
            config.sample_admits,
            config.max_rejections_per_rule,
        ))
    }

    /// Starts the writer thread of a complete (audit-mode) log over any writer: nothing is
    /// sampled, summarised or dropped; see the module docs.
    pub fn audit_writer(out: Box<dyn Write + Send>) -> DecisionLog {
        Self::spawn(out, 1.0, u64::MAX, true)
    }

    /// Starts the writer thread over any writer (tests).
    pub fn with_writer(
        out: Box<dyn Write + Send>,
        sample_admits: f64,
        max_per_rule: u32,
    ) -> DecisionLog {
        Self::spawn(out, sample_admits, u64::from(max_per_rule), false)
    }

    fn spawn(
        out: Box<dyn Write + Send>,
        sample_admits: f64,
        max_per_rule: u64,
        audit: bool,
    ) -> DecisionLog {
        let (tx, rx) = sync_channel(CHANNEL_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let budgets = Arc::new(Budgets::new(max_per_rule));
        let writer = Writer {
            budgets: budgets.clone(),
            rx,
            out: BufWriter::with_capacity(64 * 1024, out),
            max_per_rule,
            window_start: Instant::now(),
            counts: HashMap::new(),
            dropped: dropped.clone(),
        };
        std::thread::Builder::new()
            .name("fairgate-decision-log".into())
            .spawn(move || writer.run())
            .map(|_| ())
            .unwrap_or_else(
                |e| tracing::error!(error = %e, "cannot start the decision-log writer"),
            );
        DecisionLog {
            tx: Some(tx),
            sample_admits,
            dropped,
            dropped_total: Arc::new(AtomicU64::new(0)),
            budgets,
            audit,
            clock: Arc::new(MonotonicClock::new()),
        }
    }

    /// True in audit mode (complete log with `mono_ns`).
    pub fn is_audit(&self) -> bool {
        self.audit
    }

    /// Whether this admit should be logged (a fresh sample per call).
    pub fn sample_admit(&self) -> bool {
        self.tx.is_some()
            && self.sample_admits > 0.0
            && (self.sample_admits >= 1.0 || fastrand::f64() < self.sample_admits)
    }

    /// Whether a rejection's line (`reject` or `shadow_reject`) should be built and
    /// [`log`](Self::log)ged: false when the log is off, and false — the rejection is then
    /// counted in its key's `summary` line — once its key (the rule, or the stage and plan)
    /// has had `max_rejections_per_rule` lines in the current one-second window. Ask before
    /// building the line: past the budget this is one map lookup and an atomic increment.
    pub fn admit_rejection(
        &self,
        rule: Option<&str>,
        stage: Option<&str>,
        plan: Option<&str>,
    ) -> bool {
        // The same key as the writer's: a rule's lines share one budget whatever the plan.
        let key = match rule {
            Some(_) => KeyRef {
                rule,
                stage: "",
                plan: "",
            },
            None => KeyRef {
                rule,
                stage: stage.unwrap_or(""),
                plan: plan.unwrap_or(""),
            },
        };
        self.tx.is_some() && self.budgets.spend(&key)
    }

    /// True when lines are written at all.
    pub fn is_on(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one line; never blocks, except in audit mode, where a full channel waits for
    /// the writer rather than lose a line. Returns false when it was dropped.
    pub fn log(&self, record: DecisionRecord) -> bool {
        self.send(Queued::Decision(record))
    }

    /// Writes an operator action's line (never sampled; dropped and counted only when
    /// the writer is behind, like a decision).
    pub fn log_action(&self, action: &str, client: &str, detail: serde_json::Value) -> bool {
        self.send(Queued::Action(ActionRecord {
            time: rfc3339(SystemTime::now()),
            kind: "action",
            action: action.to_owned(),
            client: client.to_owned(),
            detail,
        }))
    }

    fn send(&self, line: Queued) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        if self.audit {
            return tx.send(line).is_ok();
        }
        match tx.try_send(line) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped_total.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

struct Writer {
    budgets: Arc<Budgets>,
    rx: Receiver<Queued>,
    out: BufWriter<Box<dyn Write + Send>>,
    max_per_rule: u64,
    window_start: Instant,
    /// Aggregation key → (lines this window, suppressed this window).
    counts: HashMap<String, (u64, u64)>,
    dropped: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self) {
        loop {
            let until_rollover = Duration::from_secs(1).saturating_sub(self.window_start.elapsed());
            match self
                .rx
                .recv_timeout(until_rollover.max(Duration::from_millis(1)))
            {
                Ok(record) => {
                    self.maybe_roll();
                    self.write(record);
                    // Drain what is queued, then flush once.
                    while let Ok(record) = self.rx.try_recv() {
                        self.maybe_roll();
                        self.write(record);
                    }
                    let _ = self.out.flush();
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.maybe_roll();
                    let _ = self.out.flush();
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.roll();
                    let _ = self.out.flush();
                    return;
                }
            }
        }
    }

    fn maybe_roll(&mut self) {
        if self.window_start.elapsed() >= Duration::from_secs(1) {
            self.roll();
        }
    }

    fn roll(&mut self) {
        let time = rfc3339(SystemTime::now());
        // What the request path counted without sending joins what was suppressed here.
        for (key, n) in self.budgets.roll() {
            self.counts.entry(key).or_insert((0, 0)).1 += n;
        }
        let mut keys: Vec<_> = self
            .counts
            .iter()
            .filter(|(_, (_, suppressed))| *suppressed > 0)
            .map(|(k, (_, s))| (k.clone(), *s))
            .collect();
        keys.sort();
        for (key, suppressed) in keys {
            self.write_line(&SummaryRecord {
                time: time.clone(),
                kind: "summary",
                key: &key,
                suppressed,
                window_s: 1,
            });
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            self.write_line(&SummaryRecord {
                time,
                kind: "dropped",
                key: "",
                suppressed: dropped,
                window_s: 1,
            });
        }
        self.counts.clear();
        self.window_start = Instant::now();
    }

    fn write(&mut self, line: Queued) {
        let record = match line {
            Queued::Decision(r) => r,
            Queued::Action(a) => return self.write_line(&a),
        };
        if record.decision == "reject" || record.decision == "shadow_reject" {
            let key = aggregation_key(record.rule.as_deref(), record.stage, record.plan.as_deref());
            let entry = self.counts.entry(key).or_insert((0, 0));
            if entry.0 >= self.max_per_rule {
                entry.1 += 1;
                return;
            }
            entry.0 += 1;
        }
        self.write_line(&record);
    }

    fn write_line<T: Serialize>(&mut self, value: &T) {
        if serde_json::to_writer(&mut self.out, value).is_ok() {
            let _ = self.out.write_all(b"\n");
        }
    }
}

// === the engine observer ===

/// Tags `req` with a [`DecisionContext`] for `route`: the decision log names the route, and
/// a sampled admit's line waits in it for the response ([`take_pending`]).
pub fn tag_route<B>(req: &mut Request<B>, route: &Arc<str>) {
    req.extensions_mut()
        .insert(RequestContext::new(DecisionContext {
            route: route.clone(),
            pending: Mutex::new(None),
        }));
}

/// Takes the sampled admit of `req`, if its decision left one (call it when the request is
/// handed on: admission has decided by then), to [`finish`](PendingAdmit::finish) when the
/// response ends.
pub fn take_pending<B>(req: &Request<B>) -> Option<PendingAdmit> {
    req.extensions()
        .get::<RequestContext>()?
        .get::<DecisionContext>()?
        .take()
}

/// What the decision log needs of one request, carried in its [`RequestContext`]: the
/// route, and a slot for a sampled admit's line until the response ends. A line nobody took
/// is written, without a status, when the context is dropped with the request.
#[derive(Debug)]
pub struct DecisionContext {
    /// The route the request matched.
    route: Arc<str>,
    /// A sampled admit's line, until it is taken.
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

impl DecisionLog {
    /// Audit mode: every decision's line, written now, stamped with the clock.
    fn log_audit(&self, e: &DecisionEvent<'_>) {
        let mono_ns = self.clock.now();
        let mut record = record_of(e);
        record.mono_ns = Some(mono_ns);
        self.log(record);
    }

    /// Logs a rejection's line, built only when the log is on and the line is within its
    /// key's budget (a flood is only counted, for the summary line).
    fn log_rejection(&self, e: &DecisionEvent<'_>) {
        if self.admit_rejection(e.rule, e.stage.map(|s| s.as_str()), e.plan) {
            self.log(record_of(e));
        }
    }
}

/// The line of decision event `e`.
fn record_of(e: &DecisionEvent<'_>) -> DecisionRecord {
    DecisionRecord {
        time: rfc3339(SystemTime::now()),
        kind: "decision",
        client: e.client_key.to_owned(),
        route: decision_context(e).map(|c| c.route.to_string()),
        operation: e.operation.map(str::to_owned),
        stage: e.stage.map(|s| s.as_str()),
        rule: e.rule.map(str::to_owned),
        plan: e.plan.map(str::to_owned),
        bandwidth: e
            .ratelimit
            .map(|l| l.bandwidth.to_string())
            .or_else(|| e.bandwidth.map(str::to_owned)),
        cost: e.cost,
        decision: e.kind.as_str(),
        retry_after: e.retry_after.map(|d| d.as_secs()),
        status: (e.status != 0).then_some(e.status),
        latency_ms: None,
        mono_ns: None,
    }
}

/// The decision-log context of the event's request, if it has one.
fn decision_context<'a>(e: &DecisionEvent<'a>) -> Option<&'a DecisionContext> {
    e.context?.get::<DecisionContext>()
}

impl Observer for DecisionLog {
    fn on_decision(&self, e: &DecisionEvent<'_>) {
        if self.tx.is_none() {
            return;
        }
        match e.kind {
            DecisionKind::Reject | DecisionKind::ShadowReject if self.audit => self.log_audit(e),
            DecisionKind::Reject | DecisionKind::ShadowReject => self.log_rejection(e),
            DecisionKind::Admit | DecisionKind::Borrowed => {
                if self.audit {
                    self.log_audit(e);
                } else if self.sample_admit() {
                    let record = record_of(e);
                    match decision_context(e) {
                        // Tagged by the host: finish the line when the response ends.
                        Some(c) => c.park(PendingAdmit {
                            record,
                            log: self.clone(),
                            started: Instant::now(),
                        }),
                        None => {
                            self.log(record);
                        }
                    }
                }
            }
        }
    }

    fn on_complete(&self, _e: &CompletionEvent<'_>) {}

    /// A growth step is an action line (`action: growth`, with its reason) beside the
    /// operator's actions. A reset is an operator's action: the admin API logs it.
    fn on_growth(&self, e: &crate::decision::GrowthEvent<'_>) {
        if e.action != "growth" {
            return;
        }
        self.log_action(
            e.action,
            e.client_key,
            serde_json::json!({
                "plan": e.plan,
                "steps": e.steps,
                "factor": e.factor,
                "usage": e.usage,
                "threshold": e.threshold,
                "window_s": e.window_secs,
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn record(decision: &'static str, rule: Option<&str>) -> DecisionRecord {
        DecisionRecord {
            time: rfc3339(SystemTime::now()),
            kind: "decision",
            client: "k1".into(),
            route: Some("api".into()),
            operation: None,
            stage: Some("rule"),
            rule: rule.map(Into::into),
            plan: None,
            bandwidth: None,
            cost: 1,
            decision,
            retry_after: None,
            status: Some(403),
            latency_ms: Some(0.1),
            mono_ns: None,
        }
    }

    /// Waits until the writer thread has ended after the log was dropped: it owns the only
    /// other handle of `buf` and flushes before dropping it, so then every line is in.
    fn wait_writer_done(buf: &Shared) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Arc::strong_count(&buf.0) > 1 {
            assert!(Instant::now() < deadline, "the writer thread never ended");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn lines(buf: &Shared) -> Vec<serde_json::Value> {
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn floods_are_aggregated_per_rule_and_every_field_is_present() {
        let buf = Shared::default();
        let log = DecisionLog::with_writer(Box::new(buf.clone()), 0.0, 3);
        for _ in 0..50 {
            assert!(log.log(record("reject", Some("bad-bot"))));
        }
        assert!(log.log(record("reject", Some("other"))));
        drop(log);
        wait_writer_done(&buf);
        let l = lines(&buf);
        let bad: Vec<_> = l.iter().filter(|v| v["rule"] == "bad-bot").collect();
        assert_eq!(bad.len(), 3);
        assert_eq!(l.iter().filter(|v| v["rule"] == "other").count(), 1);
        let summary = l
            .iter()
            .find(|v| v["type"] == "summary")
            .expect("summary line");
        assert_eq!(summary["key"], "bad-bot");
        assert_eq!(summary["suppressed"], 47);
        let keys: Vec<&String> = bad[0].as_object().unwrap().keys().collect();
        for k in [
            "time",
            "type",
            "client",
            "route",
            "operation",
            "stage",
            "rule",
            "plan",
            "bandwidth",
            "cost",
            "decision",
            "retry_after",
            "status",
            "latency_ms",
        ] {
            assert!(keys.iter().any(|x| x.as_str() == k), "missing {k}");
        }
    }

    #[test]
    fn rejections_past_the_budget_are_counted_not_sent() {
        let buf = Shared::default();
        let log = DecisionLog::with_writer(Box::new(buf.clone()), 0.0, 3);
        let sent = (0..50)
            .filter(|_| log.admit_rejection(Some("bad-bot"), Some("rule"), None))
            .inspect(|_| {
                log.log(record("reject", Some("bad-bot")));
            })
            .count();
        assert_eq!(sent, 3);
        // A rule's budget is shared whatever the plan; quota rejections are keyed by
        // stage and plan.
        assert!(!log.admit_rejection(Some("bad-bot"), Some("rule"), Some("pro")));
        assert!(log.admit_rejection(None, Some("quota"), Some("free")));
        assert!(log.admit_rejection(None, Some("quota"), Some("pro")));
        assert!(!DecisionLog::off().admit_rejection(Some("bad-bot"), None, None));
        drop(log);
        wait_writer_done(&buf);
        let l = lines(&buf);
        assert_eq!(l.iter().filter(|v| v["rule"] == "bad-bot").count(), 3);
        let summary = l
            .iter()
            .find(|v| v["type"] == "summary")
            .expect("summary line");
        assert_eq!(summary["key"], "bad-bot");
        assert_eq!(summary["suppressed"], 48);
    }

    #[test]
    fn audit_mode_writes_every_line_with_its_stamp_and_no_summary() {
        let buf = Shared::default();
        let log = DecisionLog::audit_writer(Box::new(buf.clone()));
        assert!(log.is_audit());
        assert!((0..1000).all(|_| log.sample_admit()));
        // Far past any per-rule budget, and past the channel's capacity: nothing is lost.
        let n = CHANNEL_CAPACITY + 500;
        for i in 0..n {
            assert!(log.admit_rejection(Some("bad-bot"), Some("rule"), None));
            let mut r = record("reject", Some("bad-bot"));
            r.mono_ns = Some(i as u64);
            assert!(log.log(r));
        }
        drop(log);
        wait_writer_done(&buf);
        let l = lines(&buf);
        assert_eq!(l.len(), n);
        assert!(l.iter().all(|v| v["type"] == "decision"));
        assert_eq!(l[n - 1]["mono_ns"], (n - 1) as u64);
        // Normal mode has no `mono_ns` key at all.
        assert!(!serde_json::to_string(&record("reject", None))
            .unwrap()
            .contains("mono_ns"));
    }

    /// A writer whose first flush waits for the test: tells it when it started waiting.
    struct Stuck {
        started: std::sync::mpsc::Sender<()>,
        release: Arc<Mutex<()>>,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            let _ = self.started.send(());
            drop(self.release.lock().unwrap());
            Ok(())
        }
    }

    #[test]
    fn lines_past_a_stuck_writer_are_dropped_and_counted() {
        let release = Arc::new(Mutex::new(()));
        let held = release.lock().unwrap();
        let (started, flushing) = std::sync::mpsc::channel();
        let log = DecisionLog::with_writer(
            Box::new(Stuck {
                started,
                release: release.clone(),
            }),
            0.0,
            3,
        );
        assert!(log.log(record("reject", Some("r"))));
        // The writer took that line and is stuck flushing it: the channel fills, then drops.
        // (Or, on a machine slow enough for its first wait to time out, it is stuck
        // flushing nothing and that line is still queued.)
        flushing.recv().unwrap();
        let accepted = (0..2 * CHANNEL_CAPACITY)
            .take_while(|_| log.log(record("reject", Some("r"))))
            .count();
        assert!(
            (CHANNEL_CAPACITY - 1..=CHANNEL_CAPACITY).contains(&accepted),
            "{accepted}"
        );
        for _ in 0..10 {
            assert!(!log.log(record("reject", Some("r"))));
        }
        assert_eq!(log.dropped_total(), 11);
        #[cfg(feature = "metrics")]
        {
            // Metrics that watch the log report the drops at the next scrape.
            let mut registry = prometheus_client::registry::Registry::default();
            let metrics = crate::observe::EngineMetrics::register(&mut registry);
            assert!(metrics.watch_decision_log(&log));
            assert!(
                !metrics.watch_decision_log(&DecisionLog::off()),
                "one log per metrics"
            );
            let policy = "version: 1\nidentify: {}\n";
            let store = fairgate_policies::PolicyStore::from_yaml_str(policy, "p.yaml").unwrap();
            metrics.refresh(&crate::Engine::new(store));
            let text = crate::observe::encode(&registry, crate::observe::Format::OpenMetrics);
            assert!(
                text.contains("fairgate_decision_log_dropped_total 11"),
                "{text}"
            );
        }
        drop(held);
    }

    #[test]
    fn admits_are_sampled() {
        let log = DecisionLog::with_writer(Box::new(io::sink()), 0.0, 3);
        assert!((0..1000).all(|_| !log.sample_admit()));
        let log = DecisionLog::with_writer(Box::new(io::sink()), 1.0, 3);
        assert!((0..1000).all(|_| log.sample_admit()));
        assert!(!DecisionLog::off().sample_admit());
    }
}
