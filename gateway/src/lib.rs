//! fairgate's reverse-proxy gateway: the `fairgate` binary.
//!
//! A request runs through one tower stack — the request id, tower-http's trace (at `debug`
//! only), the access log, routing, the body limit, `fairgate_middleware::AdmissionLayer`, then the
//! [`proxy`] service — served by hyper 1 over HTTP/1.1 and h2c on one port, or HTTP/1.1 and
//! HTTP/2 (ALPN) over TLS when a listener has a certificate. The engine is
//! the same one an axum app embeds, so the edge and the embedded forms share one code path.
//!
//! Modules, grouped by concern (no import cycles between them; `.ci/module-cycles.py`):
//! - [`server`]: what faces clients — listeners, HTTP/1 and HTTP/2 serving, graceful
//!   shutdown, the runtime models ([`server::runtime`]), connection limits and slow clients
//!   ([`server::conn_limits`]), ambiguous framing refused on the raw bytes
//!   ([`server::framing`]), `X-Request-Id` ([`server::request_id`]), `limits.max_body`
//!   ([`server::body_limit`]);
//! - [`proxy`]: what faces upstreams — the proxy service, routing ([`proxy::routing`]),
//!   upstream pools, balancing and health checks ([`proxy::upstream`]), the outbound layers
//!   ([`proxy::outbound`]), the built-in demo upstream ([`proxy::echo`]), and the request
//!   tags admission reads ([`proxy::admission`]);
//! - [`control`]: what faces operators — the metrics registry ([`control::metrics`]),
//!   reloads ([`control::reload`]), the process log ([`control::logging`]) and
//!   `fairgate audit` ([`control::audit`]); the admin API and the decision log are
//!   `fairgate_middleware`'s, the same an app that embeds the layer serves;
//! - [`config`] (the `gateway.yaml` model and decoder), [`tls`] (certificates and ALPN),
//!   [`upstream_tls`] (a pool's TLS client config and server name), [`body`] and [`problem`] (shared body types, problem+json), [`app`] (wiring) and
//!   [`cli`].
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

pub mod app;
pub mod body;
pub mod cli;
pub mod config;
pub mod control;
pub mod problem;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod upstream_tls;
