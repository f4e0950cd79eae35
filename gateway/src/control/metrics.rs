//! The gateway's Prometheus metrics (prometheus-client), served on the admin port at
//! `/metrics` in the format the scraper asks for
//! ([`Format::negotiate`](fairgate_middleware::observe::Format::negotiate)).
//!
//! One registry holds the engine's series
//! ([`EngineMetrics`], the same an app that
//! embeds the layer registers) and the gateway's own: upstream latency and errors, the
//! outbound layers, and the connection limits. Label values are bounded by design; no label
//! ever carries a client key, IP or path. What mirrors state is refreshed at scrape time
//! ([`Metrics::encode_as`]), so the request path never touches it.

use std::sync::Arc;
use std::time::Duration;

use fairgate_middleware::observe::{encode, AlertMetrics, DecisionLog, EngineMetrics, Format};
use fairgate_middleware::outbound::{OutboundEvent, OutboundObserver};
use fairgate_middleware::Engine;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerResultLabels {
    listener: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The counters of [`crate::server::conn_limits`]: connections refused by the per-source cap
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

/// The certificate-reload series of one TLS listener (see [`crate::control::certs`]).
#[derive(Debug, Clone)]
pub struct CertificateMetrics {
    /// `fairgate_certificate_reloads_total{listener, result="ok"}`.
    pub ok: Counter,
    /// `fairgate_certificate_reloads_total{listener, result="error"}`.
    pub error: Counter,
    /// `fairgate_certificate_last_reload_success{listener}`.
    pub last_success: Gauge,
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
    /// The TLS handshake with the target failed: unknown CA, expired or wrong-name
    /// certificate, client certificate refused, no `h2` by ALPN (502).
    Tls,
}

impl UpstreamErrorKind {
    fn label(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::Body => "body",
            UpstreamErrorKind::Tls => "tls",
        }
    }
}

/// Pre-resolved metric handles of one upstream pool (no label lookup per request).
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    duration: Histogram,
    hash_moves: Counter,
    connect: Counter,
    timeout: Counter,
    protocol: Counter,
    body: Counter,
    tls: Counter,
}

impl UpstreamMetrics {
    /// Counts a request `consistent_hash`'s load bound sent off its key's target.
    pub fn hash_moved(&self) {
        self.hash_moves.inc();
    }

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
            UpstreamErrorKind::Tls => self.tls.inc(),
        };
    }

    /// The counter of response bodies that broke off (for a body wrapper to own).
    pub fn body_errors(&self) -> Counter {
        self.body.clone()
    }
}

/// All gateway metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    engine: Arc<EngineMetrics>,
    alerts: AlertMetrics,
    upstream_duration: Family<UpstreamLabels, Histogram>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    upstream_hash_moves: Family<UpstreamLabels, Counter>,
    upstream_in_flight: Family<UpstreamLabels, Gauge>,
    in_flight_readers: InFlightReaders,
    access_log_dropped: Counter,
    outbound: OutboundMetrics,
    clients: ClientCounters,
    certificate_reloads: Family<ListenerResultLabels, Counter>,
    certificate_last_reload_success: Family<ListenerLabels, Gauge>,
    upstream_targets: Family<UpstreamLabels, Gauge>,
    upstream_resolve_failures: Family<UpstreamLabels, Counter>,
}

/// What reads each pool's requests in flight when the metrics are encoded (the pools' own
/// per-target counters: the request path does nothing more for the gauge).
#[derive(Default)]
struct InFlightReaders(std::sync::Mutex<Vec<(Gauge, InFlightReader)>>);

type InFlightReader = Box<dyn Fn() -> u64 + Send + Sync>;

impl std::fmt::Debug for InFlightReaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |v| v.len());
        f.debug_struct("InFlightReaders")
            .field("pools", &n)
            .finish()
    }
}

impl InFlightReaders {
    fn refresh(&self) {
        if let Ok(readers) = self.0.lock() {
            for (gauge, read) in readers.iter() {
                gauge.set(i64::try_from(read()).unwrap_or(i64::MAX));
            }
        }
    }
}

fn duration_histogram() -> Histogram {
    // 0.5 ms … ~33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

// === impl Metrics ===

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let engine = EngineMetrics::register(&mut registry);
        let alerts = AlertMetrics::register(&mut registry);
        let gateway = registry.sub_registry_with_prefix("fairgate");
        let upstream_duration = Family::<UpstreamLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        gateway.register(
            "upstream_duration_seconds",
            "Time to the upstream response head",
            upstream_duration.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        gateway.register(
            "upstream_errors",
            "Upstream failures by pool and kind (connect, timeout, protocol, tls, body)",
            upstream_errors.clone(),
        );
        let upstream_hash_moves = Family::<UpstreamLabels, Counter>::default();
        gateway.register(
            "upstream_hash_moves",
            "Requests consistent_hash's load bound (hash_balance_factor) sent off their key's target",
            upstream_hash_moves.clone(),
        );
        let upstream_in_flight = Family::<UpstreamLabels, Gauge>::default();
        gateway.register(
            "upstream_in_flight",
            "Requests sent to a pool's targets whose response has not ended",
            upstream_in_flight.clone(),
        );
        let access_log_dropped = Counter::default();
        gateway.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer's queue (log.access.buffer) was full",
            access_log_dropped.clone(),
        );
        let outbound = OutboundMetrics::register(gateway);
        let refused = Family::<ReasonLabels, Counter>::default();
        gateway.register(
            "connections_refused",
            "Connections closed right after accept, by reason (per_source)",
            refused.clone(),
        );
        let slow = Family::<KindLabels, Counter>::default();
        gateway.register(
            "slow_clients",
            "Slow clients cut off, by kind (body: request body under body_min_rate; read: nothing read for write_timeout)",
            slow.clone(),
        );
        let upstream_targets = Family::<UpstreamLabels, Gauge>::default();
        gateway.register(
            "upstream_targets",
            "Targets of an upstream pool now (every address of its target names counts)",
            upstream_targets.clone(),
        );
        let upstream_resolve_failures = Family::<UpstreamLabels, Counter>::default();
        gateway.register(
            "upstream_resolve_failures",
            "Resolutions of a pool's target names that failed (the name's last addresses were kept)",
            upstream_resolve_failures.clone(),
        );
        let certificate_reloads = Family::<ListenerResultLabels, Counter>::default();
        gateway.register(
            "certificate_reloads",
            "Reloads of a TLS listener's certificates by result (ok, error: the current ones were kept)",
            certificate_reloads.clone(),
        );
        let certificate_last_reload_success = Family::<ListenerLabels, Gauge>::default();
        gateway.register(
            "certificate_last_reload_success",
            "1 when the last reload of a TLS listener's certificates succeeded (or none was tried), 0 when it failed",
            certificate_last_reload_success.clone(),
        );
        let clients = ClientCounters {
            refused_per_source: refused.get_or_create_owned(&ReasonLabels {
                reason: "per_source",
            }),
            slow_body: slow.get_or_create_owned(&KindLabels { kind: "body" }),
            slow_read: slow.get_or_create_owned(&KindLabels { kind: "read" }),
        };
        Metrics {
            registry,
            engine,
            alerts,
            upstream_duration,
            upstream_errors,
            upstream_hash_moves,
            upstream_in_flight,
            in_flight_readers: InFlightReaders::default(),
            access_log_dropped,
            outbound,
            clients,
            certificate_reloads,
            certificate_last_reload_success,
            upstream_targets,
            upstream_resolve_failures,
        }
    }

    /// `fairgate_upstream_resolve_failures_total` and `fairgate_upstream_targets` of upstream
    /// pool `name` (creates them).
    pub fn upstream_resolution(&self, name: &Arc<str>) -> (Counter, Gauge) {
        let labels = UpstreamLabels {
            upstream: name.clone(),
        };
        (
            self.upstream_resolve_failures.get_or_create_owned(&labels),
            self.upstream_targets.get_or_create_owned(&labels),
        )
    }

    /// The certificate-reload series of the TLS listener bound at `listener` (creates them:
    /// both results at 0, last success 1).
    pub fn certificates(&self, listener: &str) -> CertificateMetrics {
        let result = |result| {
            self.certificate_reloads
                .get_or_create_owned(&ListenerResultLabels {
                    listener: listener.to_owned(),
                    result,
                })
        };
        let last_success =
            self.certificate_last_reload_success
                .get_or_create_owned(&ListenerLabels {
                    listener: listener.to_owned(),
                });
        last_success.set(1);
        CertificateMetrics {
            ok: result("ok"),
            error: result("error"),
            last_success,
        }
    }

    /// The engine's series: install them as (part of) the engine's observer.
    pub fn engine(&self) -> &Arc<EngineMetrics> {
        &self.engine
    }

    /// `fairgate_access_log_dropped_total`, for the access log.
    pub fn access_log_dropped(&self) -> Counter {
        self.access_log_dropped.clone()
    }

    /// The usage-alert series, for the alert sender.
    pub fn alerts(&self) -> &AlertMetrics {
        &self.alerts
    }

    /// The counters of the connection limits (see [`ClientCounters`]).
    pub fn client_counters(&self) -> ClientCounters {
        self.clients.clone()
    }

    /// The outbound-layer counters of upstream pool `name` (creates its series).
    pub fn outbound(&self, name: &Arc<str>) -> Arc<PoolObserver> {
        self.outbound.observer(name)
    }

    /// The fleet-mode gauges of upstream pool `name`: (replicas, degraded).
    pub fn outbound_fleet(&self, name: &Arc<str>) -> (Gauge, Gauge) {
        self.outbound.fleet(name)
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
            hash_moves: self
                .upstream_hash_moves
                .get_or_create_owned(&UpstreamLabels {
                    upstream: name.clone(),
                }),
            connect: err(UpstreamErrorKind::Connect),
            timeout: err(UpstreamErrorKind::Timeout),
            protocol: err(UpstreamErrorKind::Protocol),
            body: err(UpstreamErrorKind::Body),
            tls: err(UpstreamErrorKind::Tls),
        }
    }

    /// `fairgate_upstream_in_flight{upstream=name}`, read from `read` whenever the metrics
    /// are encoded.
    pub fn upstream_in_flight(
        &self,
        name: &Arc<str>,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        let gauge = self
            .upstream_in_flight
            .get_or_create_owned(&UpstreamLabels {
                upstream: name.clone(),
            });
        if let Ok(mut readers) = self.in_flight_readers.0.lock() {
            readers.push((gauge, Box::new(read)));
        }
    }

    /// Refreshes what mirrors `engine` and `log`, then encodes everything in `format`.
    pub fn encode_as(&self, format: Format, engine: &Engine, log: &DecisionLog) -> String {
        self.in_flight_readers.refresh();
        self.engine.refresh(engine);
        self.engine
            .refresh_decision_log_dropped(log.dropped_total());
        encode(&self.registry, format)
    }

    /// Encodes everything as it is now, in OpenMetrics 1.0.0 text.
    pub fn encode(&self) -> String {
        self.in_flight_readers.refresh();
        encode(&self.registry, Format::OpenMetrics)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

// === outbound ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutboundLabels {
    upstream: Arc<str>,
}

/// The outbound counters, one family each, labelled by upstream.
#[derive(Debug, Clone)]
pub struct OutboundMetrics {
    coalesced: Family<OutboundLabels, Counter>,
    cache_hits: Family<OutboundLabels, Counter>,
    cache_misses: Family<OutboundLabels, Counter>,
    throttled: Family<OutboundLabels, Counter>,
    retries: Family<OutboundLabels, Counter>,
    budget_exhausted: Family<OutboundLabels, Counter>,
    coalesce_waiting: Family<OutboundLabels, Gauge>,
    fleet_replicas: Family<OutboundLabels, Gauge>,
    fleet_degraded: Family<OutboundLabels, Gauge>,
}

impl OutboundMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> OutboundMetrics {
        let m = OutboundMetrics {
            coalesced: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            throttled: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            coalesce_waiting: Family::default(),
            fleet_replicas: Family::default(),
            fleet_degraded: Family::default(),
        };
        registry.register(
            "outbound_coalesced",
            "Requests answered by an identical concurrent call's response",
            m.coalesced.clone(),
        );
        registry.register(
            "outbound_cache_hits",
            "Requests answered from the outbound cache",
            m.cache_hits.clone(),
        );
        registry.register(
            "outbound_cache_misses",
            "Cacheable requests not found in the outbound cache",
            m.cache_misses.clone(),
        );
        registry.register(
            "outbound_throttled",
            "Requests refused locally by the outbound limit or adaptive throttling",
            m.throttled.clone(),
        );
        registry.register(
            "outbound_retries",
            "Requests sent to the upstream again",
            m.retries.clone(),
        );
        registry.register(
            "outbound_retry_budget_exhausted",
            "Retries not sent because the retry budget was empty",
            m.budget_exhausted.clone(),
        );
        registry.register(
            "outbound_coalesce_waiting",
            "Requests waiting right now for an identical concurrent call's response",
            m.coalesce_waiting.clone(),
        );
        registry.register(
            "outbound_fleet_replicas",
            "Fleet mode: the replicas registered in the pool's Redis as last seen (the divisor of the share)",
            m.fleet_replicas.clone(),
        );
        registry.register(
            "outbound_fleet_degraded",
            "Fleet mode: 1 while the pool's Redis does not answer (its limits fall back to the share)",
            m.fleet_degraded.clone(),
        );
        m
    }

    /// The fleet-mode gauges of upstream `name`: (replicas, degraded).
    pub fn fleet(&self, name: &Arc<str>) -> (Gauge, Gauge) {
        let l = OutboundLabels {
            upstream: name.clone(),
        };
        (
            self.fleet_replicas.get_or_create_owned(&l),
            self.fleet_degraded.get_or_create_owned(&l),
        )
    }

    /// The observer of upstream `name` (its series are created now, at zero).
    pub fn observer(&self, name: &Arc<str>) -> Arc<PoolObserver> {
        let l = OutboundLabels {
            upstream: name.clone(),
        };
        Arc::new(PoolObserver {
            coalesced: self.coalesced.get_or_create_owned(&l),
            cache_hits: self.cache_hits.get_or_create_owned(&l),
            cache_misses: self.cache_misses.get_or_create_owned(&l),
            throttled: self.throttled.get_or_create_owned(&l),
            retries: self.retries.get_or_create_owned(&l),
            budget_exhausted: self.budget_exhausted.get_or_create_owned(&l),
            coalesce_waiting: self.coalesce_waiting.get_or_create_owned(&l),
        })
    }
}

/// Counts one pool's outbound events into its pre-resolved counters.
#[derive(Debug)]
pub struct PoolObserver {
    coalesced: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    throttled: Counter,
    retries: Counter,
    budget_exhausted: Counter,
    coalesce_waiting: Gauge,
}

impl OutboundObserver for PoolObserver {
    fn event(&self, event: OutboundEvent) {
        let c = match event {
            OutboundEvent::Coalesced => &self.coalesced,
            OutboundEvent::CacheHit => &self.cache_hits,
            OutboundEvent::CacheMiss => &self.cache_misses,
            OutboundEvent::Throttled(_) => &self.throttled,
            OutboundEvent::Retry => &self.retries,
            OutboundEvent::RetryBudgetExhausted => &self.budget_exhausted,
            OutboundEvent::CoalesceWaitStarted => {
                self.coalesce_waiting.inc();
                return;
            }
            OutboundEvent::CoalesceWaitEnded => {
                self.coalesce_waiting.dec();
                return;
            }
        };
        c.inc();
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
        let text = m.encode();
        for needle in [
            "fairgate_in_flight 0",
            "fairgate_shed_limit 0",
            r#"fairgate_upstream_duration_seconds_count{upstream="api"} 1"#,
            r#"fairgate_upstream_errors_total{upstream="api",kind="timeout"} 1"#,
            r#"fairgate_policy_reloads_total{result="error"} 0"#,
            r#"fairgate_alerts_total{result="dropped"} 0"#,
            "fairgate_alerts_queued 0",
            r#"fairgate_connections_refused_total{reason="per_source"} 0"#,
            r#"fairgate_slow_clients_total{kind="body"} 0"#,
            r#"fairgate_slow_clients_total{kind="read"} 0"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        let text = encode(&m.registry, Format::Text);
        assert!(text.contains("# TYPE fairgate_upstream_duration_seconds histogram\n"));
    }

    #[test]
    fn metrics_are_labelled_by_upstream() {
        // As `crate::control::metrics` builds it.
        let mut reg = Registry::with_prefix("fairgate");
        let m = OutboundMetrics::register(&mut reg);
        let o = m.observer(&Arc::from("api"));
        o.event(OutboundEvent::Coalesced);
        o.event(OutboundEvent::Coalesced);
        o.event(OutboundEvent::Throttled(
            fairgate_middleware::outbound::ThrottleReason::QueueFull,
        ));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("fairgate_outbound_coalesced_total{upstream=\"api\"} 2"),
            "{text}"
        );
        assert!(text.contains("fairgate_outbound_throttled_total{upstream=\"api\"} 1"));
        assert!(text.contains("fairgate_outbound_retry_budget_exhausted_total{upstream=\"api\"} 0"));
    }
}
