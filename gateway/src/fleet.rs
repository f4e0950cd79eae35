//! Wiring of the fleet-wide (Redis) state backend into the gateway.
//!
//! The backend itself lives in `fairgate_middleware::fleet` and is started with the engine by
//! `fairgate_middleware::EngineBuilder` (when the policy says `state.backend: redis`); here
//! the gateway reports it: `/health` answers `degraded` (still 200) while Redis is
//! unreachable, and `/metrics` carries the `fairgate_redis_*` series.

use fairgate_middleware::Engine;

/// `ok`, or `degraded` while the fleet backend cannot reach Redis.
pub fn health(engine: &Engine) -> &'static str {
    match engine.backend_snapshot() {
        Some(s) if s.degraded => "degraded",
        _ => "ok",
    }
}

// === metrics ===

use std::sync::atomic::{AtomicU64, Ordering};

use fairgate_middleware::backend::BackendSnapshot;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of `fairgate_redis_state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedisStateLabels {
    /// `up` or `degraded`.
    pub state: &'static str,
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

/// The `fairgate_redis_*` series (present, at zero, without a Redis backend).
#[derive(Debug)]
pub struct FleetMetrics {
    errors: Mirror,
    calls: Mirror,
    breaker_opens: Mirror,
    failure_mode_admits: Mirror,
    failure_mode_rejects: Mirror,
    syncs: Mirror,
    state: Family<RedisStateLabels, Gauge>,
    gateways: Gauge,
}

impl FleetMetrics {
    /// Creates the series in `registry`.
    pub fn register(registry: &mut Registry) -> FleetMetrics {
        let m = FleetMetrics {
            errors: Mirror::default(),
            calls: Mirror::default(),
            breaker_opens: Mirror::default(),
            failure_mode_admits: Mirror::default(),
            failure_mode_rejects: Mirror::default(),
            syncs: Mirror::default(),
            state: Family::default(),
            gateways: Gauge::default(),
        };
        let counters = [
            (
                "redis_errors",
                "Redis calls that failed or timed out",
                &m.errors,
            ),
            ("redis_calls", "Redis calls (scripts) made", &m.calls),
            (
                "redis_breaker_opens",
                "Times the Redis breaker opened",
                &m.breaker_opens,
            ),
            (
                "redis_failure_mode_admits",
                "Requests admitted under on_failure while Redis was unreachable",
                &m.failure_mode_admits,
            ),
            (
                "redis_failure_mode_rejects",
                "Requests rejected (503) under on_failure: closed while Redis was unreachable",
                &m.failure_mode_rejects,
            ),
            (
                "redis_syncs",
                "Usage exchanges with Redis (async mode)",
                &m.syncs,
            ),
        ];
        for (name, help, mirror) in counters {
            registry.register(name, help, mirror.counter.clone());
        }
        registry.register(
            "redis_state",
            "1 for the current state of the Redis backend (up or degraded)",
            m.state.clone(),
        );
        registry.register(
            "fleet_gateways",
            "Gateways registered in Redis when last seen",
            m.gateways.clone(),
        );
        m
    }

    /// Mirrors the backend's counters (no-op without a backend).
    pub fn refresh(&self, s: Option<BackendSnapshot>) {
        let Some(s) = s else {
            return;
        };
        self.errors.set(s.errors);
        self.calls.set(s.calls);
        self.breaker_opens.set(s.breaker_opens);
        self.failure_mode_admits.set(s.failure_mode_admits);
        self.failure_mode_rejects.set(s.failure_mode_rejects);
        self.syncs.set(s.syncs);
        self.state
            .get_or_create(&RedisStateLabels { state: "up" })
            .set(i64::from(!s.degraded));
        self.state
            .get_or_create(&RedisStateLabels { state: "degraded" })
            .set(i64::from(s.degraded));
        self.gateways
            .set(i64::try_from(s.gateways).unwrap_or(i64::MAX));
    }
}
