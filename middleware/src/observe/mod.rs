//! What an operator sees of the engine's decisions, for the gateway and for an app that
//! embeds the layer alike: Prometheus metrics ([`EngineMetrics`], feature `metrics`) and the
//! JSONL decision log that `fairgate audit` reads ([`DecisionLog`], feature
//! `decision-log`). Both are engine [`Observer`](crate::Observer)s; a pair of observers is
//! one, so an app installs both with
//! `engine.set_observer(Arc::new((metrics, log)))`.
//!
//! This module only listens: it decides nothing and holds no quota state.

#[cfg(feature = "alerts")]
mod alerts;
#[cfg(feature = "decision-log")]
mod decision_log;
#[cfg(feature = "metrics")]
mod metrics;
#[cfg(feature = "admin")]
mod usage_json;

#[cfg(feature = "alerts")]
pub use alerts::{AlertConfig, AlertEvent, AlertMetrics, AlertWebhook};
#[cfg(feature = "decision-log")]
pub use decision_log::{
    tag_route, take_pending, ActionRecord, DecisionContext, DecisionLog, DecisionLogConfig,
    DecisionRecord, DecisionTarget, PendingAdmit,
};
#[cfg(feature = "metrics")]
pub use metrics::{encode, EngineMetrics, Format};
/// The prometheus-client crate whose `Registry` [`EngineMetrics::register`] takes.
#[cfg(feature = "metrics")]
pub use prometheus_client;
#[cfg(feature = "admin")]
pub(crate) use usage_json::usage_json;
