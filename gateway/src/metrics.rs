//! Prometheus metrics (prometheus-client), served on the admin port at `/metrics` in the
//! format the scraper asks for ([`Format::negotiate`]): OpenMetrics 1.0.0 when its `Accept`
//! prefers it (Prometheus does), otherwise the Prometheus text format 0.0.4.
//!
//! Label values are bounded by design: stages, decisions, priorities and reload results are
//! fixed sets; rule, plan and upstream names come from the config and the policy. No label
//! ever carries a client key, IP or path. Gauges that mirror engine state (in flight, shed
//! limit, tracked keys, evictions) are refreshed when `/metrics` is scraped
//! ([`Metrics::refresh`]), so the request path never touches them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of `fairgate_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// Pipeline stage that decided (`rules`, `quota`, `shed`, `admit`…).
    pub stage: Arc<str>,
    /// `admit`, `reject`, `shadow_reject`…
    pub decision: Arc<str>,
    /// Rule name, empty when no rule decided.
    pub rule: Arc<str>,
    /// Plan name, empty when none applied.
    pub plan: Arc<str>,
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
struct UpstreamLabels {
    upstream: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    upstream: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The counters of [`crate::conn_limits`]: connections refused by the per-source cap
/// (`fairgate_connections_refused_total{reason="per_source"}`) and slow clients cut off
/// (`fairgate_slow_clients_total{kind="body"|"read"}`).
#[derive(Clone, Debug, Default)]
pub struct ClientCounters {
    /// Connections closed at accept: the source had `max_connections_per_source` open.
    pub refused_per_source: Counter,
    /// Request bodies failed for arriving slower than `body_min_rate`.
    pub slow_body: Counter,
    /// Connections closed because the client read nothing for `write_timeout`.
    pub slow_read: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

/// What kind of upstream failure happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// TCP connect failed or timed out (502).
    Connect,
    /// No response head within the timeout (504).
    Timeout,
    /// The connection broke or the response was malformed (502).
    Protocol,
    /// The response body broke off after its head was forwarded (the client's connection
    /// is closed, never presented as a complete response).
    Body,
}

impl UpstreamErrorKind {
    fn label(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::Body => "body",
        }
    }
}

/// Pre-resolved metric handles of one upstream pool (no label lookup per request).
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    duration: Histogram,
    connect: Counter,
    timeout: Counter,
    protocol: Counter,
    body: Counter,
}

impl UpstreamMetrics {
    /// Records the time to the response head.
    pub fn observe(&self, latency: Duration) {
        self.duration.observe(latency.as_secs_f64());
    }

    /// Counts one failure.
    pub fn error(&self, kind: UpstreamErrorKind) {
        match kind {
            UpstreamErrorKind::Connect => self.connect.inc(),
            UpstreamErrorKind::Timeout => self.timeout.inc(),
            UpstreamErrorKind::Protocol => self.protocol.inc(),
            UpstreamErrorKind::Body => self.body.inc(),
        };
    }

    /// The counter of response bodies that broke off (for a body wrapper to own).
    pub fn body_errors(&self) -> Counter {
        self.body.clone()
    }
}

/// Engine state mirrored into gauges at scrape time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineSnapshot {
    /// Requests in flight (global).
    pub in_flight: u64,
    /// Current shedding limit; 0 when there is none.
    pub shed_limit: u64,
    /// Tracked per-key states.
    pub tracked_keys: u64,
    /// Total evictions since start.
    pub evictions: u64,
}

/// All gateway metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<DecisionLabels, Counter>,
    shadow_rejects: Family<RuleLabels, Counter>,
    shed: Family<PriorityLabels, Counter>,
    in_flight: Gauge,
    shed_limit: Gauge,
    utilization: Gauge<f64, AtomicU64>,
    upstream_duration: Family<UpstreamLabels, Histogram>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    last_reload_success: Gauge,
    policy_version: Gauge,
    tracked_keys: Gauge,
    evictions: Counter,
    evictions_seen: AtomicU64,
    near_limit: Counter,
    decision_log_dropped: Counter,
    fleet: crate::fleet::FleetMetrics,
    outbound: crate::outbound::OutboundMetrics,
    clients: ClientCounters,
}

fn duration_histogram() -> Histogram {
    // 0.5 ms … ~33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

// === impl Metrics ===

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fairgate");
        let requests = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by the admission decision that settled them (one per request): stage, decision, rule and plan",
            requests.clone(),
        );
        let shadow_rejects = Family::<RuleLabels, Counter>::default();
        registry.register(
            "shadow_rejects",
            "Shadow rules that would have rejected a request that went on, by rule",
            shadow_rejects.clone(),
        );
        let shed = Family::<PriorityLabels, Counter>::default();
        registry.register("shed", "Requests shed by priority class", shed.clone());
        let in_flight = Gauge::default();
        registry.register(
            "in_flight",
            "Requests in flight (admitted, not finished)",
            in_flight.clone(),
        );
        let shed_limit = Gauge::default();
        registry.register(
            "shed_limit",
            "Current global in-flight limit (0: none)",
            shed_limit.clone(),
        );
        let utilization = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "utilization",
            "In flight divided by the shedding limit",
            utilization.clone(),
        );
        let upstream_duration = Family::<UpstreamLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "upstream_duration_seconds",
            "Time to the upstream response head",
            upstream_duration.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by pool and kind (connect, timeout, protocol, body)",
            upstream_errors.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads by result",
            reloads.clone(),
        );
        let last_reload_success = Gauge::default();
        registry.register(
            "policy_last_reload_success",
            "1 when the last policy reload succeeded, 0 when it failed",
            last_reload_success.clone(),
        );
        let policy_version = Gauge::default();
        registry.register(
            "policy_version",
            "Version of the active policy",
            policy_version.clone(),
        );
        let tracked_keys = Gauge::default();
        registry.register(
            "tracked_keys",
            "Per-key states held by the engine",
            tracked_keys.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "evictions",
            "Per-key states evicted to stay under max_keys",
            evictions.clone(),
        );
        let near_limit = Counter::default();
        registry.register(
            "near_limit",
            "Admits that left a client under 20% of a quota",
            near_limit.clone(),
        );
        let decision_log_dropped = Counter::default();
        registry.register(
            "decision_log_dropped",
            "Decision-log lines dropped because the writer fell behind",
            decision_log_dropped.clone(),
        );
        let fleet = crate::fleet::FleetMetrics::register(&mut registry);
        let outbound = crate::outbound::OutboundMetrics::register(&mut registry);
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed right after accept, by reason (per_source)",
            refused.clone(),
        );
        let slow = Family::<KindLabels, Counter>::default();
        registry.register(
            "slow_clients",
            "Slow clients cut off, by kind (body: request body under body_min_rate; read: nothing read for write_timeout)",
            slow.clone(),
        );
        let clients = ClientCounters {
            refused_per_source: refused.get_or_create_owned(&ReasonLabels {
                reason: "per_source",
            }),
            slow_body: slow.get_or_create_owned(&KindLabels { kind: "body" }),
            slow_read: slow.get_or_create_owned(&KindLabels { kind: "read" }),
        };
        last_reload_success.set(1);
        // Make the reload series visible before the first reload.
        let _ = reloads.get_or_create_owned(&ReloadLabels { result: "ok" });
        let _ = reloads.get_or_create_owned(&ReloadLabels { result: "error" });
        Metrics {
            registry,
            requests,
            shadow_rejects,
            shed,
            in_flight,
            shed_limit,
            utilization,
            upstream_duration,
            upstream_errors,
            reloads,
            last_reload_success,
            policy_version,
            tracked_keys,
            evictions,
            evictions_seen: AtomicU64::new(0),
            near_limit,
            decision_log_dropped,
            fleet,
            outbound,
            clients,
        }
    }

    /// The counters of the connection limits (see [`ClientCounters`]).
    pub fn client_counters(&self) -> ClientCounters {
        self.clients.clone()
    }

    /// The outbound-layer counters of upstream pool `name` (creates its series).
    pub fn outbound(&self, name: &Arc<str>) -> Arc<crate::outbound::PoolObserver> {
        self.outbound.observer(name)
    }

    /// Mirrors the Redis backend's counters and state (called at scrape time).
    pub fn refresh_fleet(&self, s: Option<fairgate_middleware::backend::BackendSnapshot>) {
        self.fleet.refresh(s);
    }

    /// Handles for one upstream pool (creates its series).
    pub fn upstream(&self, name: &Arc<str>) -> UpstreamMetrics {
        let err = |kind: UpstreamErrorKind| {
            self.upstream_errors
                .get_or_create_owned(&UpstreamErrorLabels {
                    upstream: name.clone(),
                    kind: kind.label(),
                })
        };
        UpstreamMetrics {
            duration: self.upstream_duration.get_or_create_owned(&UpstreamLabels {
                upstream: name.clone(),
            }),
            connect: err(UpstreamErrorKind::Connect),
            timeout: err(UpstreamErrorKind::Timeout),
            protocol: err(UpstreamErrorKind::Protocol),
            body: err(UpstreamErrorKind::Body),
        }
    }

    /// Counts one admission decision.
    pub fn decision(&self, labels: &DecisionLabels) {
        self.requests.get_or_create(labels).inc();
    }

    /// The `fairgate_requests_total` counter of one label set, to be held and incremented
    /// without a label lookup per request (it stays part of the family).
    pub fn decision_counter(&self, labels: &DecisionLabels) -> Counter {
        self.requests.get_or_create(labels).clone()
    }

    /// The `fairgate_shadow_rejects_total` counter of shadow rule `rule`, to be held and
    /// incremented without a label lookup per request (it stays part of the family).
    pub fn shadow_reject_counter(&self, rule: &str) -> Counter {
        self.shadow_rejects
            .get_or_create(&RuleLabels {
                rule: Arc::from(rule),
            })
            .clone()
    }

    /// Counts one shed request (`priority`: `critical`, `normal`, `borrowed`, `sheddable`).
    pub fn shed(&self, priority: &'static str) {
        self.shed.get_or_create(&PriorityLabels { priority }).inc();
    }

    /// Counts an admit that left the client under 20% of a quota.
    pub fn near_limit(&self) {
        self.near_limit.inc();
    }

    /// Counts a dropped decision-log line.
    pub fn decision_log_dropped(&self, n: u64) {
        self.decision_log_dropped.inc_by(n);
    }

    /// Records a policy reload.
    pub fn reload(&self, ok: bool, version: u64) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
        self.last_reload_success.set(i64::from(ok));
        if ok {
            self.set_policy_version(version);
        }
    }

    /// Sets the active policy version.
    pub fn set_policy_version(&self, version: u64) {
        self.policy_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    /// Mirrors engine state into the gauges (called at scrape time).
    pub fn refresh(&self, s: EngineSnapshot) {
        self.in_flight
            .set(i64::try_from(s.in_flight).unwrap_or(i64::MAX));
        self.shed_limit
            .set(i64::try_from(s.shed_limit).unwrap_or(i64::MAX));
        let utilization = if s.shed_limit == 0 {
            0.0
        } else {
            s.in_flight as f64 / s.shed_limit as f64
        };
        self.utilization.set(utilization);
        self.tracked_keys
            .set(i64::try_from(s.tracked_keys).unwrap_or(i64::MAX));
        let seen = self.evictions_seen.swap(s.evictions, Ordering::Relaxed);
        if s.evictions > seen {
            self.evictions.inc_by(s.evictions - seen);
        }
    }

    /// Encodes everything in OpenMetrics 1.0.0 text (what prometheus-client writes).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Encodes everything in `format`.
    pub fn encode_as(&self, format: Format) -> String {
        let openmetrics = self.encode();
        match format {
            Format::OpenMetrics => openmetrics,
            Format::Text => openmetrics_to_text(&openmetrics),
        }
    }
}

/// An exposition format of `/metrics`.
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

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_family_with_bounded_labels() {
        let m = Metrics::new();
        let up = m.upstream(&Arc::from("api"));
        up.observe(Duration::from_millis(3));
        up.error(UpstreamErrorKind::Timeout);
        m.decision(&DecisionLabels {
            stage: "quota".into(),
            decision: "reject".into(),
            rule: "".into(),
            plan: "free".into(),
        });
        m.shed("sheddable");
        m.reload(false, 0);
        m.refresh(EngineSnapshot {
            in_flight: 5,
            shed_limit: 10,
            tracked_keys: 3,
            evictions: 7,
        });
        m.refresh(EngineSnapshot {
            in_flight: 5,
            shed_limit: 10,
            tracked_keys: 3,
            evictions: 9,
        });
        let text = m.encode();
        for needle in [
            r#"fairgate_requests_total{stage="quota",decision="reject",rule="",plan="free"} 1"#,
            r#"fairgate_shed_total{priority="sheddable"} 1"#,
            "fairgate_in_flight 5",
            "fairgate_shed_limit 10",
            "fairgate_utilization 0.5",
            r#"fairgate_upstream_duration_seconds_count{upstream="api"} 1"#,
            r#"fairgate_upstream_errors_total{upstream="api",kind="timeout"} 1"#,
            r#"fairgate_policy_reloads_total{result="error"} 1"#,
            "fairgate_policy_last_reload_success 0",
            "fairgate_tracked_keys 3",
            "fairgate_evictions_total 9",
            "fairgate_near_limit_total 0",
            r#"fairgate_connections_refused_total{reason="per_source"} 0"#,
            r#"fairgate_slow_clients_total{kind="body"} 0"#,
            r#"fairgate_slow_clients_total{kind="read"} 0"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
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
        let m = Metrics::new();
        m.shed("critical");
        m.upstream(&Arc::from("api"))
            .observe(Duration::from_millis(2));
        let om = m.encode();
        assert!(om.contains("# TYPE fairgate_shed counter\n"));
        assert!(om.ends_with("# EOF\n"));
        let text = m.encode_as(Format::Text);
        assert!(text.contains("# HELP fairgate_shed_total Requests shed by priority class.\n"));
        assert!(text.contains("# TYPE fairgate_shed_total counter\n"));
        assert!(text.contains("# TYPE fairgate_in_flight gauge\n"));
        assert!(text.contains("# TYPE fairgate_upstream_duration_seconds histogram\n"));
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
