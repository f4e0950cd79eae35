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
//! The fields are a stable interface (the accuracy audit reads them); see `docs/gateway.md`.
//! Every `decision` line has every key, `null` when it does not apply:
//!
//! `{"time","type":"decision","client","route","operation","stage","rule","plan","limit",
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::config::{DecisionTarget, LogConfig};

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
    /// The bandwidth (limit) involved, e.g. `free/0`.
    pub limit: Option<String>,
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

/// Producer handle of the decision log. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DecisionLog {
    tx: Option<SyncSender<DecisionRecord>>,
    sample_admits: f64,
    dropped: Arc<AtomicU64>,
    budgets: Arc<Budgets>,
    audit: bool,
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
            budgets: Arc::new(Budgets::new(0)),
            audit: false,
        }
    }

    /// Starts the writer thread for `config`.
    pub fn start(config: &LogConfig) -> io::Result<DecisionLog> {
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
            budgets,
            audit,
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
        let Some(tx) = &self.tx else {
            return false;
        };
        if self.audit {
            return tx.send(record).is_ok();
        }
        match tx.try_send(record) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

struct Writer {
    budgets: Arc<Budgets>,
    rx: Receiver<DecisionRecord>,
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

    fn write(&mut self, record: DecisionRecord) {
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

/// Formats a time as RFC 3339 UTC with milliseconds: `2024-05-01T12:00:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let millis = d.subsec_millis();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
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
            limit: None,
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
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // 2024-02-29
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.789Z");
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
            "limit",
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

    #[test]
    fn admits_are_sampled() {
        let log = DecisionLog::with_writer(Box::new(io::sink()), 0.0, 3);
        assert!((0..1000).all(|_| !log.sample_admit()));
        let log = DecisionLog::with_writer(Box::new(io::sink()), 1.0, 3);
        assert!((0..1000).all(|_| log.sample_admit()));
        assert!(!DecisionLog::off().sample_admit());
    }
}
