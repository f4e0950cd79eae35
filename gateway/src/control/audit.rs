//! `fairgate audit`: replays a decision log against an exact reference limiter.
//!
//! The log must be complete: written with `log: {audit: true}`, so every decision is a line
//! with `mono_ns` (the monotonic time of the decision) and nothing is sampled, summarised or
//! dropped. The policy gives each client's bandwidths (a client override's own bandwidths,
//! else the plan named on the line). The reference is its own exact GCRA, independent of the
//! engine's code: per (client, bandwidth) one theoretical arrival time in `u128` units of
//! `ns × count`, so `count / period` is kept as an exact fraction (the engine rounds the
//! emission interval down to whole ns). A request of cost `c` at `t` conforms iff
//! `max(TAT, t·n) + c·P − t·n ≤ b·P` on every bandwidth (`n` per `P` ns, burst `b`).
//!
//! Lines are replayed in `mono_ns` order. The reference follows what really happened: an
//! admitted request consumes its cost in the reference whether or not the reference agrees,
//! and a rejected one consumes nothing, so one disagreement does not cascade. Each
//! quota-relevant decision is judged:
//!
//! - an `admit` the reference would reject is **wrongly admitted** (its cost is
//!   over-admission on each bandwidth that would have rejected it);
//! - a `reject` at stage `quota` the reference would admit is **wrongly rejected**;
//! - the others are correctly admitted / rejected.
//!
//! `rule`, `concurrency` and `shed` rejections, `borrowed` admits (burst sharing admits over
//! quota on purpose and consumes nothing), `shadow_reject` lines and admits of clients with
//! no quota are counted but not judged. The log's stamp is read just after the engine read
//! its clock, so a decision is judged with a tolerance (default 1 ms): an admit is wrong
//! only if the reference would still reject it `tolerance` later, a rejection only if the
//! reference would already admit it `tolerance` earlier; decisions right only thanks to the
//! tolerance are counted as `borderline`.
//!
//! Over-admission is reported per client as the worst window: the period-long window (of
//! the bandwidth that was exceeded) holding the most wrongly admitted units, as a percentage
//! of the bandwidth's count per period.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use fairgate_policies::compiled::{CompiledAction, CompiledBandwidth, CompiledPolicy};
use fairgate_policies::{PolicyErrors, PolicyStore};
use serde::{Deserialize, Serialize};

/// The default judging tolerance (see the module docs).
pub const DEFAULT_TOLERANCE: Duration = Duration::from_millis(1);

/// Worst windows listed in a report.
const WORST_WINDOWS: usize = 10;

/// Clients listed in the text report (the JSON report lists every client).
const TEXT_CLIENTS: usize = 20;

/// Why an audit could not run.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A line of the log is not a complete decision line.
    #[error("{file}:{line}: {message}")]
    Line {
        /// The log file name.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The log cannot be read.
    #[error("{file}: cannot read the file: {source}")]
    Read {
        /// The log file name.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The policy is invalid (every error, one per line, as `file:line:column: …`).
    #[error("{0}")]
    Policy(PolicyErrors),
    /// The policy has a quota per calendar period, which the reference does not model (it
    /// needs the wall time of each decision, which the log's monotonic stamps do not give).
    #[error(
        "bandwidth `{0}` is a quota per calendar period: fairgate audit replays rate bandwidths only"
    )]
    CalendarPeriod(String),
}

/// Audit settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditOptions {
    /// Judging tolerance in ns (see the module docs).
    pub tolerance_ns: u64,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            tolerance_ns: DEFAULT_TOLERANCE.as_nanos() as u64,
        }
    }
}

/// Decision counts of one client, or of the whole log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Quota-judged admits the reference also admits.
    pub correctly_admitted: u64,
    /// Quota rejections the reference also rejects.
    pub correctly_rejected: u64,
    /// Admits the reference rejects.
    pub wrongly_admitted: u64,
    /// Quota rejections the reference admits.
    pub wrongly_rejected: u64,
    /// Cost units of the wrongly admitted requests.
    pub wrongly_admitted_units: u64,
    /// Cost units of every judged admit.
    pub admitted_units: u64,
    /// Judged correct only within the tolerance.
    pub borderline: u64,
    /// `borrowed` admits (burst sharing), not judged.
    pub borrowed: u64,
    /// Admits of clients without a quota, not judged.
    pub unlimited: u64,
    /// Rejections by a rule, not judged.
    pub rule_rejected: u64,
    /// Rejections by the concurrency quota, not judged.
    pub concurrency_rejected: u64,
    /// Rejections by global shedding, not judged.
    pub shed_rejected: u64,
    /// `shadow_reject` lines, not judged.
    pub shadow: u64,
}

impl Counts {
    /// Judged decisions.
    pub fn judged(&self) -> u64 {
        self.correctly_admitted
            + self.correctly_rejected
            + self.wrongly_admitted
            + self.wrongly_rejected
    }

    fn add(&mut self, o: &Counts) {
        self.correctly_admitted += o.correctly_admitted;
        self.correctly_rejected += o.correctly_rejected;
        self.wrongly_admitted += o.wrongly_admitted;
        self.wrongly_rejected += o.wrongly_rejected;
        self.wrongly_admitted_units += o.wrongly_admitted_units;
        self.admitted_units += o.admitted_units;
        self.borderline += o.borderline;
        self.borrowed += o.borrowed;
        self.unlimited += o.unlimited;
        self.rule_rejected += o.rule_rejected;
        self.concurrency_rejected += o.concurrency_rejected;
        self.shed_rejected += o.shed_rejected;
        self.shadow += o.shadow;
    }

    /// The rates of these counts.
    pub fn rates(&self) -> Rates {
        let ratio = |a: u64, b: u64| (a + b > 0).then(|| a as f64 / (a + b) as f64);
        Rates {
            correctly_admitted: ratio(self.correctly_admitted, self.wrongly_rejected),
            correctly_rejected: ratio(self.correctly_rejected, self.wrongly_admitted),
            wrongly_admitted: ratio(self.wrongly_admitted, self.correctly_rejected),
            wrongly_rejected: ratio(self.wrongly_rejected, self.correctly_admitted),
            over_admission_units: (self.admitted_units > 0)
                .then(|| self.wrongly_admitted_units as f64 / self.admitted_units as f64),
        }
    }
}

/// Rates over the judged decisions, as fractions in `[0, 1]` (`null` when undefined).
///
/// "Should admit" requests are the correctly admitted and the wrongly rejected; "should
/// reject" requests are the correctly rejected and the wrongly admitted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rates {
    /// Of the requests the reference admits, the share admitted (true-negative rate).
    pub correctly_admitted: Option<f64>,
    /// Of the requests the reference rejects, the share rejected (true-positive rate).
    pub correctly_rejected: Option<f64>,
    /// Of the requests the reference rejects, the share admitted (false-negative rate).
    pub wrongly_admitted: Option<f64>,
    /// Of the requests the reference admits, the share rejected (false-positive rate).
    pub wrongly_rejected: Option<f64>,
    /// Wrongly admitted units over all judged admitted units.
    pub over_admission_units: Option<f64>,
}

/// The period-long window of one bandwidth with the most over-admission.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Window {
    /// The client.
    pub client: String,
    /// The bandwidth's name (`RateLimit-Policy` name).
    pub bandwidth: String,
    /// The bandwidth as written, e.g. `10/s burst 5`.
    pub limit: String,
    /// Window start, ns after the log's first decision.
    pub start_ns: u64,
    /// Window length (the bandwidth's period) in ns.
    pub length_ns: u64,
    /// Wrongly admitted units in the window.
    pub over_units: u64,
    /// `over_units` as a percentage of the bandwidth's count per period.
    pub over_admission_pct: f64,
}

/// One client's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientReport {
    /// The client key.
    pub client: String,
    /// Its counts.
    pub counts: Counts,
    /// Its rates.
    pub rates: Rates,
    /// Its worst window's over-admission as a percentage of the limit (0 when none).
    pub over_admission_pct: f64,
    /// Its worst window, if it was ever wrongly admitted.
    pub worst_window: Option<Window>,
}

/// The audit's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Decision lines read.
    pub decisions: u64,
    /// Time from the first to the last decision, ns.
    pub span_ns: u64,
    /// The judging tolerance, ns.
    pub tolerance_ns: u64,
    /// Every client together.
    pub overall: Counts,
    /// Overall rates.
    pub rates: Rates,
    /// The worst client's over-admission as a percentage of the limit.
    pub over_admission_pct: f64,
    /// Per client, the most wrongly judged first.
    pub clients: Vec<ClientReport>,
    /// The worst windows over every client, worst first (at most 10).
    pub worst_windows: Vec<Window>,
    /// What the audit could not account for (e.g. `allow` rules or post-hoc costs).
    pub notes: Vec<String>,
}

/// One decision line, as far as the audit reads it.
#[derive(Debug, Deserialize)]
struct Line {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    stage: Option<String>,
    #[serde(default)]
    plan: Option<String>,
    #[serde(default)]
    cost: Option<u64>,
    #[serde(default)]
    decision: Option<String>,
    #[serde(default)]
    mono_ns: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Admit,
    Borrowed,
    Reject(Stage),
    Shadow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Quota,
    Rule,
    Concurrency,
    Shed,
}

#[derive(Debug)]
struct Event {
    t: u64,
    line: usize,
    client: usize,
    plan: Option<String>,
    cost: u64,
    kind: Kind,
}

/// One reference bucket: `n` per `p` ns, burst `b`; `tat` in units of `ns × n`.
#[derive(Debug, Clone)]
struct Bucket {
    n: u128,
    p: u128,
    b: u128,
    tat: u128,
}

impl Bucket {
    fn new(bw: &CompiledBandwidth) -> Bucket {
        Bucket {
            n: u128::from(bw.rate.count()),
            p: u128::from(bw.rate.period_ns()),
            b: u128::from(bw.burst),
            tat: 0,
        }
    }

    /// Whether a request of `cost` at `t` ns conforms.
    fn conforms(&self, t: u64, cost: u64) -> bool {
        let now = u128::from(t) * self.n;
        let next = self.tat.max(now) + u128::from(cost) * self.p;
        next - now <= self.b * self.p
    }

    fn consume(&mut self, t: u64, cost: u64) {
        let now = u128::from(t) * self.n;
        self.tat = self.tat.max(now) + u128::from(cost) * self.p;
    }
}

/// Per (client, bandwidth): the bucket and the wrongly admitted `(t, units)`.
#[derive(Debug)]
struct Track {
    id: Arc<str>,
    bucket: Bucket,
    bandwidth: Arc<str>,
    limit: String,
    over: Vec<(u64, u64)>,
}

impl Track {
    fn new(bw: &CompiledBandwidth) -> Track {
        Track {
            id: Arc::clone(&bw.id),
            bucket: Bucket::new(bw),
            bandwidth: Arc::clone(&bw.name),
            limit: format!("{} burst {}", bw.rate, bw.burst),
            over: Vec::new(),
        }
    }
}

/// Audits the decision log `text` (named `file` in errors) against `policy`.
pub fn audit(
    text: &str,
    file: &str,
    policy: &CompiledPolicy,
    opts: AuditOptions,
) -> Result<Report, AuditError> {
    // Refused rather than judged wrong: a period's reset would read as over-admission.
    if let Some(bw) = policy.bandwidths().find(|b| b.period.is_some()) {
        return Err(AuditError::CalendarPeriod(bw.id.to_string()));
    }
    let mut clients: Vec<String> = Vec::new();
    let mut client_ids: HashMap<String, usize> = HashMap::new();
    let mut events = parse(text, file, &mut clients, &mut client_ids)?;
    // Stable: equal stamps keep the file's order.
    events.sort_by_key(|e| e.t);
    let origin = events.first().map_or(0, |e| e.t);
    let span_ns = events.last().map_or(0, |e| e.t - origin);

    let mut counts = vec![Counts::default(); clients.len()];
    // Per client, one track per bandwidth it was judged on.
    let mut tracks: Vec<Vec<Track>> = (0..clients.len()).map(|_| Vec::new()).collect();
    let tol = opts.tolerance_ns;
    for e in &events {
        let c = &mut counts[e.client];
        let bandwidths = match e.kind {
            Kind::Admit | Kind::Reject(Stage::Quota) => {
                bandwidths(policy, &clients[e.client], e.plan.as_deref()).ok_or_else(|| {
                    AuditError::Line {
                        file: file.to_owned(),
                        line: e.line,
                        message: format!(
                            "plan `{}` is not in the policy",
                            e.plan.as_deref().unwrap_or("")
                        ),
                    }
                })?
            }
            Kind::Borrowed => {
                c.borrowed += 1;
                continue;
            }
            Kind::Shadow => {
                c.shadow += 1;
                continue;
            }
            Kind::Reject(Stage::Rule) => {
                c.rule_rejected += 1;
                continue;
            }
            Kind::Reject(Stage::Concurrency) => {
                c.concurrency_rejected += 1;
                continue;
            }
            Kind::Reject(Stage::Shed) => {
                c.shed_rejected += 1;
                continue;
            }
        };
        if bandwidths.is_empty() {
            match e.kind {
                Kind::Admit => c.unlimited += 1,
                // A quota rejection without a quota: nothing could admit it less.
                _ => c.wrongly_rejected += 1,
            }
            continue;
        }
        // The client's tracks of these bandwidths, created on first use.
        let ct = &mut tracks[e.client];
        let idx: Vec<usize> = bandwidths
            .iter()
            .map(|bw| match ct.iter().position(|t| t.id == bw.id) {
                Some(i) => i,
                None => {
                    ct.push(Track::new(bw));
                    ct.len() - 1
                }
            })
            .collect();
        let all = |ct: &[Track], t: u64| idx.iter().all(|&i| ct[i].bucket.conforms(t, e.cost));
        match e.kind {
            Kind::Admit => {
                c.admitted_units += e.cost;
                let late = e.t.saturating_add(tol);
                if all(&ct[..], e.t) {
                    c.correctly_admitted += 1;
                } else if all(&ct[..], late) {
                    c.correctly_admitted += 1;
                    c.borderline += 1;
                } else {
                    c.wrongly_admitted += 1;
                    c.wrongly_admitted_units += e.cost;
                    for &i in &idx {
                        if !ct[i].bucket.conforms(late, e.cost) {
                            ct[i].over.push((e.t - origin, e.cost));
                        }
                    }
                }
                for &i in &idx {
                    ct[i].bucket.consume(e.t, e.cost);
                }
            }
            _ => {
                if !all(&ct[..], e.t) {
                    c.correctly_rejected += 1;
                } else if !all(&ct[..], e.t.saturating_sub(tol)) {
                    c.correctly_rejected += 1;
                    c.borderline += 1;
                } else {
                    c.wrongly_rejected += 1;
                }
            }
        }
    }

    // Worst windows per client.
    let mut worst: Vec<Option<Window>> = vec![None; clients.len()];
    for (client, track) in tracks
        .iter()
        .enumerate()
        .flat_map(|(c, ts)| ts.iter().map(move |t| (c, t)))
    {
        let Some(w) = worst_window(&clients[client], track) else {
            continue;
        };
        let slot = &mut worst[client];
        if slot
            .as_ref()
            .is_none_or(|s| w.over_admission_pct > s.over_admission_pct)
        {
            *slot = Some(w);
        }
    }

    let mut overall = Counts::default();
    let mut reports: Vec<ClientReport> = Vec::with_capacity(clients.len());
    for ((client, counts), worst_window) in clients.into_iter().zip(counts).zip(worst) {
        overall.add(&counts);
        reports.push(ClientReport {
            client,
            rates: counts.rates(),
            counts,
            over_admission_pct: worst_window.as_ref().map_or(0.0, |w| w.over_admission_pct),
            worst_window,
        });
    }
    reports.sort_by(|a, b| {
        let wrong = |r: &ClientReport| r.counts.wrongly_admitted + r.counts.wrongly_rejected;
        wrong(b)
            .cmp(&wrong(a))
            .then(b.counts.judged().cmp(&a.counts.judged()))
            .then(a.client.cmp(&b.client))
    });
    let mut worst_windows: Vec<Window> = reports
        .iter()
        .filter_map(|r| r.worst_window.clone())
        .collect();
    worst_windows.sort_by(|a, b| {
        b.over_admission_pct
            .total_cmp(&a.over_admission_pct)
            .then(a.client.cmp(&b.client))
    });
    worst_windows.truncate(WORST_WINDOWS);
    let over_admission_pct = worst_windows.first().map_or(0.0, |w| w.over_admission_pct);
    Ok(Report {
        decisions: events.len() as u64,
        span_ns,
        tolerance_ns: tol,
        rates: overall.rates(),
        overall,
        over_admission_pct,
        clients: reports,
        worst_windows,
        notes: notes(policy),
    })
}

/// The bandwidths of `client` on `plan`: its override's own, else the plan's. `None` when
/// the plan is not in the policy; empty when the client has no quota.
fn bandwidths<'p>(
    policy: &'p CompiledPolicy,
    client: &str,
    plan: Option<&str>,
) -> Option<&'p [CompiledBandwidth]> {
    if let Some(own) = policy
        .clients
        .get(client)
        .and_then(|o| o.bandwidths.as_ref())
    {
        return Some(own);
    }
    match plan {
        None => Some(&[]),
        Some(name) => policy.plan(name).map(|p| &*p.bandwidths),
    }
}

/// The period-long window of `track` with the most wrongly admitted units.
fn worst_window(client: &str, track: &Track) -> Option<Window> {
    let period = u64::try_from(track.bucket.p).unwrap_or(u64::MAX);
    let count = track.bucket.n as f64;
    let over = &track.over;
    let (mut best, mut best_start) = (0u64, 0u64);
    let (mut sum, mut lo) = (0u64, 0usize);
    // `over` is in time order; a window starts at a wrongly admitted request.
    for hi in 0..over.len() {
        sum += over[hi].1;
        while over[hi].0 - over[lo].0 >= period {
            sum -= over[lo].1;
            lo += 1;
        }
        if sum > best {
            best = sum;
            best_start = over[lo].0;
        }
    }
    (best > 0).then(|| Window {
        client: client.to_owned(),
        bandwidth: track.bandwidth.to_string(),
        limit: track.limit.clone(),
        start_ns: best_start,
        length_ns: period,
        over_units: best,
        over_admission_pct: best as f64 / count * 100.0,
    })
}

/// What the log cannot show for this policy.
fn notes(policy: &CompiledPolicy) -> Vec<String> {
    let mut notes = Vec::new();
    if policy
        .rules
        .iter()
        .any(|r| matches!(r.action, CompiledAction::Allow))
    {
        notes.push(
            "the policy has `allow` rules: their admits bypass the quota but the log does not \
             mark them, so the reference charges them"
                .to_owned(),
        );
    }
    if policy.operations.iter().any(|o| o.post_hoc.is_some()) {
        notes.push(
            "the policy has post-hoc costs: they are charged when responses end and are not \
             in the log, so the reference does not charge them"
                .to_owned(),
        );
    }
    notes
}

fn parse(
    text: &str,
    file: &str,
    clients: &mut Vec<String>,
    ids: &mut HashMap<String, usize>,
) -> Result<Vec<Event>, AuditError> {
    let mut events = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |message: String| AuditError::Line {
            file: file.to_owned(),
            line,
            message,
        };
        if raw.trim().is_empty() {
            continue;
        }
        let l: Line =
            serde_json::from_str(raw).map_err(|e| err(format!("not a decision-log line: {e}")))?;
        match l.kind.as_str() {
            "decision" => {}
            "summary" | "dropped" => {
                return Err(err(format!(
                    "a `{}` line: this log is sampled or summarised, not complete; write it \
                     with `log: {{audit: true}}`",
                    l.kind
                )))
            }
            "action" => {
                return Err(err(
                    "an action line (an operator's override or reset, or a client's quota \
                     growth) changes the limits from here on; the audit checks one policy: \
                     audit the lines before it"
                        .to_owned(),
                ))
            }
            other => return Err(err(format!("unknown line type `{other}`"))),
        }
        let t = l.mono_ns.ok_or_else(|| {
            err("no `mono_ns`: write the log with `log: {audit: true}`".to_owned())
        })?;
        let client = l.client.ok_or_else(|| err("no `client`".to_owned()))?;
        let kind = match (l.decision.as_deref(), l.stage.as_deref()) {
            (Some("admit"), _) => Kind::Admit,
            (Some("borrowed"), _) => Kind::Borrowed,
            (Some("shadow_reject"), _) => Kind::Shadow,
            (Some("reject"), Some("quota")) => Kind::Reject(Stage::Quota),
            (Some("reject"), Some("rule")) => Kind::Reject(Stage::Rule),
            (Some("reject"), Some("concurrency")) => Kind::Reject(Stage::Concurrency),
            // An unavailable state backend is reduced capacity, counted with the sheds.
            (Some("reject"), Some("shed" | "backend")) => Kind::Reject(Stage::Shed),
            (Some("reject"), s) => {
                return Err(err(format!(
                    "a rejection with an unknown stage `{}`",
                    s.unwrap_or("null")
                )))
            }
            (d, _) => return Err(err(format!("unknown decision `{}`", d.unwrap_or("null")))),
        };
        let id = match ids.get(&client) {
            Some(&id) => id,
            None => {
                clients.push(client.clone());
                ids.insert(client, clients.len() - 1);
                clients.len() - 1
            }
        };
        events.push(Event {
            t,
            line,
            client: id,
            plan: l.plan,
            cost: l.cost.unwrap_or(1),
            kind,
        });
    }
    Ok(events)
}

// === reports ===

fn pct(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{:.2}%", r * 100.0))
}

fn secs(ns: u64) -> String {
    format!("{:.3}s", ns as f64 / 1e9)
}

impl fmt::Display for Report {
    /// The human-readable report.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.overall;
        let r = &self.rates;
        writeln!(
            f,
            "decisions: {} over {} (tolerance {}µs)",
            self.decisions,
            secs(self.span_ns),
            self.tolerance_ns / 1000
        )?;
        writeln!(
            f,
            "judged against the exact reference: {} ({} borderline); not judged: {} rule, {} \
             concurrency, {} shed rejections, {} borrowed, {} without quota, {} shadow",
            o.judged(),
            o.borderline,
            o.rule_rejected,
            o.concurrency_rejected,
            o.shed_rejected,
            o.borrowed,
            o.unlimited,
            o.shadow
        )?;
        writeln!(
            f,
            "correctly admitted {} ({}), correctly rejected {} ({})",
            o.correctly_admitted,
            pct(r.correctly_admitted),
            o.correctly_rejected,
            pct(r.correctly_rejected)
        )?;
        writeln!(
            f,
            "wrongly admitted   {} ({}), wrongly rejected   {} ({})",
            o.wrongly_admitted,
            pct(r.wrongly_admitted),
            o.wrongly_rejected,
            pct(r.wrongly_rejected)
        )?;
        writeln!(
            f,
            "over-admission: {} of {} admitted units ({}); worst window {:.2}% of the limit",
            o.wrongly_admitted_units,
            o.admitted_units,
            pct(r.over_admission_units),
            self.over_admission_pct
        )?;
        writeln!(f)?;
        let mut table = String::new();
        let _ = writeln!(
            table,
            "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            "client", "ok admit", "ok reject", "bad admit", "bad rejct", "unjudged", "over-adm"
        );
        for c in self.clients.iter().take(TEXT_CLIENTS) {
            let k = &c.counts;
            let _ = writeln!(
                table,
                "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9.2}%",
                truncate(&c.client, 24),
                k.correctly_admitted,
                k.correctly_rejected,
                k.wrongly_admitted,
                k.wrongly_rejected,
                k.judged_not(),
                c.over_admission_pct
            );
        }
        f.write_str(&table)?;
        if self.clients.len() > TEXT_CLIENTS {
            writeln!(
                f,
                "… {} more clients (--json lists every client)",
                self.clients.len() - TEXT_CLIENTS
            )?;
        }
        writeln!(f)?;
        if self.worst_windows.is_empty() {
            writeln!(f, "worst windows: none (no request was wrongly admitted)")?;
        } else {
            writeln!(f, "worst windows:")?;
            for w in &self.worst_windows {
                writeln!(
                    f,
                    "  {} {} ({}): {} units over in [+{}, +{}) = {:.2}% of the limit",
                    w.client,
                    w.bandwidth,
                    w.limit,
                    w.over_units,
                    secs(w.start_ns),
                    secs(w.start_ns.saturating_add(w.length_ns)),
                    w.over_admission_pct
                )?;
            }
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

impl Counts {
    fn judged_not(&self) -> u64 {
        self.borrowed
            + self.unlimited
            + self.rule_rejected
            + self.concurrency_rejected
            + self.shed_rejected
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// Reads the policy file (with its overrides) and the log, and audits.
pub fn audit_files(log: &Path, policy: &Path, opts: AuditOptions) -> Result<Report, AuditError> {
    let store = PolicyStore::from_file(policy).map_err(AuditError::Policy)?;
    let compiled = store.load_full();
    let file = log.display().to_string();
    let text = std::fs::read_to_string(log).map_err(|source| AuditError::Read {
        file: file.clone(),
        source,
    })?;
    audit(&text, &file, &compiled, opts)
}

/// `fairgate audit`: prints the report (exit 0) or the error (exit 1).
pub fn run(log: &Path, policy: &Path, json: bool, opts: AuditOptions) -> ExitCode {
    match audit_files(log, policy, opts) {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: cannot print the report: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print!("{report}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_with_a_calendar_period_is_refused_not_misjudged() {
        let store = PolicyStore::from_yaml_str(
            "version: 1\nplans: {p: {bandwidths: ['1/s', {quota: 5, period: day}]}}\n",
            "p.yaml",
        )
        .unwrap();
        let err = audit("", "log", &store.load_full(), AuditOptions::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bandwidth `plan:p/1@day` is a quota per calendar period: fairgate audit replays rate bandwidths only"
        );
    }

    fn bucket(n: u64, period_ns: u64, burst: u64) -> Bucket {
        Bucket {
            n: n.into(),
            p: period_ns.into(),
            b: burst.into(),
            tat: 0,
        }
    }

    #[test]
    fn the_reference_bucket_is_exact_for_rates_that_do_not_divide() {
        // 3 per second, burst 1: exactly one every 333_333_333.33… ns.
        let mut b = bucket(3, 1_000_000_000, 1);
        let t0 = 1_000_000_000;
        assert!(b.conforms(t0, 1));
        b.consume(t0, 1);
        // The engine's truncated T (333_333_333 ns) would admit here; the exact one not.
        assert!(!b.conforms(t0 + 333_333_333, 1));
        assert!(b.conforms(t0 + 333_333_334, 1));
    }

    #[test]
    fn burst_and_cost_follow_the_textbook_gcra() {
        let mut b = bucket(10, 1_000_000_000, 5);
        let t = 5_000_000_000;
        for _ in 0..5 {
            assert!(b.conforms(t, 1));
            b.consume(t, 1);
        }
        assert!(!b.conforms(t, 1));
        // One unit back every 100 ms.
        assert!(b.conforms(t + 100_000_000, 1));
        assert!(!b.conforms(t + 100_000_000, 2));
        assert!(b.conforms(t + 200_000_000, 2));
        // A cost above the burst never conforms.
        assert!(!b.conforms(u64::MAX, 6));
    }
}
