//! Admission control for HTTP services: fairgate's engine and its tower layer.
//!
//! Every request passes one pipeline, driven by a hot-reloadable YAML policy
//! (`fairgate-policies`): **identify** the client (trusted-proxy aware, IPv6 aggregated to
//! a prefix), **rules** (deny / allow / limit / tag, each enforceable or shadow),
//! **per-client quota** (plan bandwidths checked all-or-nothing with operation cost, a
//! concurrency quota, post-hoc cost as debt, burst sharing), **global shedding** by priority
//! class under a static or adaptive in-flight limit, then **admit** with a [`Ticket`] whose
//! drop releases everything it holds.
//!
//! The engine ([`Engine`], modules [`clock`], [`gcra`], [`state`], [`identify`],
//! [`shed`], [`decision`]) knows nothing of HTTP: buckets are GCRA timestamps in
//! atomics, in a sharded store bounded by `state.max_keys`, read with an injected monotonic
//! clock. The [`admission`] module adapts it to tower and `http`; the gateway crate runs the
//! same engine.
//!
//! Adding it to an axum app is three lines:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! # use axum::{routing::get, Router};
//! let layer = fairgate_middleware::AdmissionLayer::from_policy_file("policy.yaml")?;
//! let app = Router::new().route("/", get(|| async { "ok" })).layer(layer);
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await?;
//! # Ok(()) }
//! ```

#[cfg(feature = "admin")]
pub mod admin;
pub mod admission;
pub mod backend;
mod bucket;
pub mod builder;
mod caps;
pub mod clock;
pub mod concurrency;
#[cfg(feature = "dashboard")]
pub mod dashboard;
pub mod decision;
pub mod engine;
mod event;
#[cfg(feature = "redis")]
pub mod fleet;
pub mod gcra;
mod growth;
pub mod identify;
mod ledger;
#[cfg(any(feature = "metrics", feature = "decision-log"))]
pub mod observe;
#[cfg(feature = "outbound")]
pub mod outbound;
pub mod quota;
pub mod rules;
pub mod shed;
pub mod sketch;
mod stagger;
pub mod state;

pub use admission::{
    Admission, AdmissionBody, AdmissionLayer, HttpHeaders, Operation, PeerAddr, ResponseFuture,
};
pub use builder::{BuildError, EngineBuilder};
pub use clock::{Clock, ManualClock, MonotonicClock, Nanos, TokioClock};
pub use decision::{
    Admitted, BandwidthUse, ClientKey, CompletionEvent, Decision, DecisionEvent, DecisionKind,
    DelayGuard, GrowthEvent, Observer, Outcome, Priority, QuotaUsage, RateLimitInfo, Rejection,
    RequestContext, Stage, Ticket,
};
pub use engine::{BandwidthUsage, ClientUsage, Engine, Grown, RequestFacts};
pub use identify::HeaderValues;
