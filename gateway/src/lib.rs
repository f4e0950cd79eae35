//! fairgate's reverse-proxy gateway: the `fairgate` binary.
//!
//! A request runs through one tower stack — tower-http layers (trace, body limit, sensitive
//! headers), the request id, routing, `fairgate_middleware::AdmissionLayer`, then the
//! [`proxy`] service — served by hyper 1 over HTTP/1.1 and h2c on one port, or HTTP/1.1 and
//! HTTP/2 (ALPN) over TLS when a listener has a certificate. The engine is
//! the same one an axum app embeds, so the edge and the embedded forms share one code path.
//!
//! Modules: [`config`] (the `gateway.yaml` model and decoder), [`app`] (wiring), [`server`]
//! (listeners, limits, graceful shutdown), [`routing`], [`proxy`], [`upstream`] (pools,
//! balancing, health checks), [`echo`] (the built-in demo upstream), [`admission`] (request
//! tags), [`metrics`] (the engine's series beside the gateway's own), [`reload`] (SIGHUP and
//! `POST /reload`), [`request_id`] (`X-Request-Id`), [`logging`], [`cli`], [`tls`] (TLS
//! termination with rustls and ALPN `h2`), [`runtime`] (`multi_thread` or `thread_per_core`),
//! [`framing`] (ambiguous HTTP/1 framing refused on the raw bytes), [`outbound`] (coalescing,
//! caching, outbound limits and retries towards an upstream pool) and [`audit`] (`fairgate audit`: a decision log replayed against an exact
//! reference limiter).
//!
//! It must not hold admission logic of its own: every admit/reject decision is the engine's
//! (`fairgate_middleware`), so the embedded layer and the gateway decide alike.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let loaded = fairgate_gateway::config::load(std::path::Path::new("gateway.yaml"))?;
//! let running = fairgate_gateway::app::start(loaded).await?;
//! println!("{}", running.listening_line());
//! running.shutdown().await;
//! # Ok(()) }
//! ```

pub mod admission;
pub mod app;
pub mod audit;
pub mod body;
pub mod cli;
pub mod config;
pub mod conn_limits;
pub mod echo;
pub mod framing;
pub mod logging;
pub mod metrics;
pub mod outbound;
pub mod problem;
pub mod proxy;
pub mod reload;
pub mod request_id;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod tls;
pub mod upstream;
