//! The gateway's side of admission: tagging requests for the engine (operation, route; the
//! server tags the peer address).
//!
//! The route travels with the request, not with the thread that happens to run it:
//! [`RoutingLayer`](crate::proxy::routing::RoutingLayer) tags the request with a decision-log
//! context ([`tag_route`]), which the engine hands to its observers with every decision
//! event of the request — also when the decision is finished later, in the response future
//! (Redis `exact` mode). A sampled admit's line is parked there; the proxy takes it
//! ([`take_pending`]) and writes it when the response ends, with the status and latency.

use std::sync::Arc;

pub use fairgate_middleware::observe::{tag_route, take_pending};
use fairgate_middleware::Operation;
use http::Request;

/// Inserts the engine's [`Operation`] extension (a route's operation name).
pub fn tag_operation<B>(req: &mut Request<B>, op: &Arc<str>) {
    req.extensions_mut().insert(Operation(op.clone()));
}
