//! The tower adapter: [`AdmissionLayer`] wraps a service in [`Admission`], which asks the
//! engine in `call` and either runs the inner service or answers with a rejection.
//!
//! ```no_run
//! # async fn app() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{routing::get, Router};
//! use fairgate_middleware::AdmissionLayer;
//!
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(AdmissionLayer::from_policy_file("policy.yaml")?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(
//!     listener,
//!     app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
//! )
//! .await?;
//! # Ok(()) }
//! ```
//!
//! The peer address comes from a [`PeerAddr`] request extension (the gateway sets it) or
//! axum's `ConnectInfo<SocketAddr>` (feature `axum`, on by default). A request with neither
//! is attributed to the unspecified address `0.0.0.0` (all such requests share one bucket,
//! so a misconfigured app is limited as one client rather than not at all) and a warning is
//! logged once. The operation name comes from an [`Operation`] extension, if present. A
//! [`RequestContext`](crate::decision::RequestContext) extension, if present, is handed to
//! the engine's observer with every decision event of the request (the gateway carries its
//! route name and decision-log state in one).
//!
//! With `usage_endpoint` in the policy, the layer answers that one path itself (module
//! `usage`): the calling client's own quota and usage, and its self-set caps; see
//! `docs/clients.md`. Without it, a request pays one relaxed load of a flag for it.
//!
//! A rejected gRPC call (`content-type: application/grpc…`) is answered in gRPC's terms
//! ([`grpc`]): HTTP 200 with `grpc-status`, the same headers as metadata, no body.

mod body;
mod future;
pub mod grpc;
mod headers;
mod layer;
mod response;
mod service;
mod usage;

pub use body::{AdmissionBody, PendingCompletion};
pub use future::ResponseFuture;
pub use headers::HttpHeaders;
pub use layer::AdmissionLayer;
pub use response::{admitted_headers, rejection_response, BORROWED, RATELIMIT, RATELIMIT_POLICY};
pub use service::{Admission, Operation, PeerAddr};
