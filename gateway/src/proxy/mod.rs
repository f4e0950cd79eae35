//! The proxy service: the innermost service of the data-plane stack.
//!
//! It forwards a routed request to a target of its route's pool and streams both bodies.
//! Headers are rewritten the way a reverse proxy must:
//!
//! - hop-by-hop headers are removed both ways (`Connection` and every header it names,
//!   `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`) — except that an
//!   HTTP/1.1 upgrade request keeps `Connection: upgrade` + `Upgrade`, and a `101` answer to it
//!   keeps them on the way back;
//! - `X-Forwarded-For` gets the TCP peer appended, `X-Forwarded-Proto` is set to the scheme
//!   the client used, `Via: 1.1 fairgate` is appended (request and response);
//! - `X-Request-Id` is set by the tower-http layer in front and forwarded like any header.
//!
//! Failures answer `application/problem+json`: connect failure or broken upstream → 502,
//! no response head within the route timeout → 504, a streamed request body that outgrew
//! `limits.max_body` on the way → 413 (not an upstream error; see [`crate::server::body_limit::BodyLimit`]). A connect failure is retried once on
//! another target of the pool when there is one; the request body is reclaimed for that
//! (it cannot have been sent, since no connection existed).
//!
//! A pool with an `outbound:` block sends its requests through that pool's outbound stack
//! first (see [`crate::proxy::outbound`]); the stack's innermost service is this proxy's own
//! forwarding ([`Direct`]). A connect-failure 502 carries the
//! [`ConnectFailed`](fairgate_middleware::outbound::ConnectFailed) extension so the stack's
//! retry can tell it from an upstream's own 502.
//!
//! Upgrades (websocket): the upstream's `101` is passed back and only then both connections
//! are upgraded and spliced together; any other answer is an ordinary response, so no raw
//! tunnel exists without a `101`.

pub mod access;
pub mod admission;
pub(crate) mod connector;
pub mod echo;
pub mod outbound;
pub(crate) mod resolve;
pub mod routing;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::Service;

use crate::body::{self, BoxError, Guarded, ProxyBody};
use crate::control::metrics::{Metrics, UpstreamErrorKind, UpstreamMetrics};
use crate::problem;
use crate::proxy::routing::RouteMatch;
use crate::proxy::upstream::Pool;
use crate::server::ConnInfo;
use fairgate_middleware::observe::PendingAdmit;
use http_body_util::BodyExt as _;

static VIA: HeaderValue = HeaderValue::from_static("1.1 fairgate");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The proxy service. Cheap to clone.
///
/// A per-core thread (`runtime: thread_per_core`) serves a stack over its own proxy
/// ([`Proxy::for_core`]), which sends through that core's client of each pool; the
/// outbound stacks are shared by every core, so a request sent through one carries its
/// core along (`OnCore`) to the forwarding underneath.
#[derive(Clone)]
pub struct Proxy {
    upstreams: Arc<[(Arc<Pool>, UpstreamMetrics)]>,
    /// The outbound stacks of pools that have one, with their refusal status.
    outbound: Arc<[(Arc<Pool>, crate::proxy::outbound::Stack, StatusCode)]>,
    /// The per-core thread this proxy serves (`None`: any other thread).
    core: Option<usize>,
}

/// The per-core thread a request sent through an outbound stack came from, as a request
/// extension: the stack is shared, the client [`Direct`] uses is that core's.
#[derive(Debug, Clone, Copy)]
struct OnCore(usize);

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstreams", &self.upstreams)
            .field("outbound", &self.outbound.len())
            .field("core", &self.core)
            .finish()
    }
}

/// The proxy's own forwarding, without outbound stacks: the innermost service of each stack.
#[derive(Clone, Debug)]
pub struct Direct(Proxy);

impl Service<Request<ProxyBody>> for Direct {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let mut this = self.0.clone();
        if let Some(&OnCore(core)) = req.extensions().get::<OnCore>() {
            this.core = Some(core);
        }
        let grpc = is_grpc(&req);
        Box::pin(async move { Ok(this.forward(req, None, grpc).await) })
    }
}

// === impl Proxy ===

impl Proxy {
    /// A proxy over `pools`, recording into `metrics`.
    ///
    /// Pools with an `outbound:` block get their stack here; a cache `warm_up` list is
    /// fetched in the background when a tokio runtime is running.
    pub fn new(pools: &[Arc<Pool>], metrics: &Metrics) -> Proxy {
        Proxy::with_fleets(pools, metrics, &std::collections::HashMap::new())
    }

    /// [`Proxy::new`], with the `OutboundFleet` of each pool whose `outbound:` block has
    /// `fleet:` (by pool name; see [`crate::app`]).
    pub fn with_fleets(
        pools: &[Arc<Pool>],
        metrics: &Metrics,
        fleets: &std::collections::HashMap<String, fairgate_middleware::outbound::OutboundFleet>,
    ) -> Proxy {
        for pool in pools {
            // The gauge reads the targets' own counters (a weak handle: no pool is kept
            // alive by the metrics).
            let weak = Arc::downgrade(pool);
            metrics.upstream_in_flight(pool.name(), move || {
                weak.upgrade()
                    .map_or(0, |p| p.targets().iter().map(|t| t.in_flight()).sum())
            });
        }
        let direct = Proxy {
            upstreams: pools
                .iter()
                .map(|p| (p.clone(), metrics.upstream(p.name())))
                .collect(),
            outbound: Arc::new([]),
            core: None,
        };
        let mut outbound = Vec::new();
        for pool in pools {
            let Some(config) = pool.outbound() else {
                continue;
            };
            if let (Some(f), Ok(rt)) = (
                fleets.get(&**pool.name()),
                tokio::runtime::Handle::try_current(),
            ) {
                // The pool's fleet gauges, refreshed every second while its stack lives.
                let (replicas, degraded) = metrics.outbound_fleet(pool.name());
                let weak = f.downgrade();
                rt.spawn(async move {
                    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        let Some(f) = weak.upgrade() else { return };
                        replicas.set(i64::try_from(f.replicas()).unwrap_or(i64::MAX));
                        degraded.set(i64::from(f.degraded()));
                    }
                });
            }
            let fleet = fleets.get(&**pool.name()).map(|f| {
                let name = config
                    .fleet
                    .as_ref()
                    .and_then(|s| s.name.as_deref())
                    .unwrap_or(pool.name());
                (f, name)
            });
            let stack = crate::proxy::outbound::build_stack(
                config,
                metrics.outbound(pool.name()),
                fleet,
                Direct(direct.clone()),
            );
            let warm = config.cache.as_ref().is_some_and(|c| !c.warm_up.is_empty());
            if let (true, Ok(rt)) = (warm, tokio::runtime::Handle::try_current()) {
                let (config, stack, pool) = (config.clone(), stack.clone(), pool.clone());
                rt.spawn(async move {
                    let route = Arc::new(crate::proxy::routing::Route::new(
                        "warm_up",
                        None,
                        "/",
                        None,
                        pool.clone(),
                        None,
                        None,
                    ));
                    crate::proxy::outbound::warm_up(&config, pool.name(), stack, |req| {
                        req.extensions_mut().insert(RouteMatch(route.clone()));
                    })
                    .await;
                });
            }
            outbound.push((pool.clone(), stack, config.throttle_status));
        }
        Proxy {
            upstreams: direct.upstreams,
            outbound: outbound.into(),
            core: None,
        }
    }

    /// This proxy for per-core thread `core`: it sends through that core's client of each
    /// pool (see [`Pool::with_per_core_clients`]).
    pub fn for_core(&self, core: usize) -> Proxy {
        Proxy {
            core: Some(core),
            ..self.clone()
        }
    }

    /// The outbound stack of the request's pool, if it has one (never for upgrades).
    fn outbound_of<B>(
        &self,
        req: &Request<B>,
    ) -> Option<(crate::proxy::outbound::Stack, StatusCode)> {
        if self.outbound.is_empty() {
            return None;
        }
        let RouteMatch(route) = req.extensions().get::<RouteMatch>()?;
        let (_, stack, status) = self
            .outbound
            .iter()
            .find(|(p, _, _)| Arc::ptr_eq(p, &route.pool))?;
        if is_upgrade_request(req) {
            return None;
        }
        Some((stack.clone(), *status))
    }

    fn metrics_of(&self, pool: &Arc<Pool>) -> Option<&UpstreamMetrics> {
        self.upstreams
            .iter()
            .find(|(p, _)| Arc::ptr_eq(p, pool))
            .map(|(_, m)| m)
    }

    /// Forwards `req` (`grpc`: it is a gRPC call, looked up once by the caller).
    async fn forward<B>(
        self,
        mut req: Request<B>,
        pending: Option<PendingAdmit>,
        grpc: bool,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if let Some((mut stack, throttle_status)) = self.outbound_of(&req) {
            if let Some(core) = self.core {
                req.extensions_mut().insert(OnCore(core));
            }
            let res = match crate::proxy::outbound::call(&mut stack, req.map(body::boxed)).await {
                Ok(res) => res,
                Err(e) => crate::proxy::outbound::error_response(&e, throttle_status),
            };
            return match pending {
                Some(p) => {
                    let status = res.status().as_u16();
                    res.map(|b| body::boxed(Guarded::new(b, LogOnEnd(Some((p, status))))))
                }
                None => res,
            };
        }
        let (res, in_flight) = self.forward_inner(req, grpc).await;
        match (pending, in_flight) {
            (Some(p), Some(in_flight)) => {
                let status = res.status().as_u16();
                res.map(|b| body::boxed(Guarded::new(b, (in_flight, LogOnEnd(Some((p, status)))))))
            }
            (Some(p), None) => {
                p.finish(Some(res.status().as_u16()));
                res
            }
            (None, Some(in_flight)) => res.map(|b| body::boxed(Guarded::new(b, in_flight))),
            (None, None) => res,
        }
    }

    /// Forwards; returns the response and, when an upstream answered, its in-flight guard
    /// (to be held until the response body ends).
    async fn forward_inner<B>(
        self,
        mut req: Request<B>,
        grpc: bool,
    ) -> (
        Response<ProxyBody>,
        Option<crate::proxy::upstream::InFlight>,
    )
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let Some(RouteMatch(route)) = req.extensions_mut().remove::<RouteMatch>() else {
            return (
                problem::response(StatusCode::NOT_FOUND, "no route matches this request"),
                None,
            );
        };
        let pool = &route.pool;
        let metrics = self.metrics_of(pool).cloned();
        let conn = req.extensions().get::<ConnInfo>().copied();
        let client_upgrade = is_upgrade_request(&req).then(|| hyper::upgrade::on(&mut req));

        let h2 = pool.protocol().is_h2();
        if !h2 && grpc {
            tracing::debug!(upstream = %pool.name(), "a gRPC call to an HTTP/1.1 pool: refused");
            return (
                problem::response(
                    StatusCode::NOT_IMPLEMENTED,
                    "the route's upstream pool speaks HTTP/1.1; gRPC needs `protocol: h2c` or `h2`",
                ),
                None,
            );
        }
        let hash_key = hash_key(pool, &req, conn);
        // gRPC (and any h2 peer reading trailers) needs `te: trailers`, the one `TE` value
        // HTTP/2 allows; it is hop-by-hop otherwise.
        let te_trailers = h2 && te_has_trailers(req.headers());
        let (mut parts, body) = req.into_parts();
        prepare_request_headers(&mut parts, conn, client_upgrade.is_some());
        if te_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }

        let deadline = Instant::now() + route.timeout;
        let retryable = pool.targets().len() > 1;
        let mut body = Some(body::boxed(body));
        let mut exclude = None;
        loop {
            let Some(mut in_flight) = pool.pick(hash_key.as_bytes(), exclude.as_ref()) else {
                return (
                    problem::response(StatusCode::BAD_GATEWAY, "no upstream target available"),
                    None,
                );
            };
            if in_flight.moved() {
                if let Some(m) = &metrics {
                    m.hash_moved();
                }
            }
            let uri = in_flight.target().uri(parts.uri.path_and_query());
            let (send_body, reclaim) = match body.take() {
                Some(b) if retryable && exclude.is_none() => {
                    let (tx, rx) = oneshot::channel();
                    (body::boxed(Reclaim::new(b, tx)), Some(rx))
                }
                Some(b) => (b, None),
                None => (body::empty(), None),
            };
            let mut up = Request::new(send_body);
            *up.method_mut() = parts.method.clone();
            *up.uri_mut() = uri;
            *up.version_mut() = if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };
            *up.headers_mut() = if reclaim.is_some() {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };

            let sent = tokio::time::timeout_at(deadline, pool.client(self.core).request(up)).await;
            match sent {
                Ok(Ok(res)) => {
                    let latency = in_flight.head_received();
                    if let Some(m) = &metrics {
                        m.observe(latency);
                    }
                    return finish_response(res, in_flight, client_upgrade, metrics.as_ref());
                }
                Ok(Err(e)) if e.is_connect() => {
                    // A failed TLS handshake (unknown CA, expired, wrong name, refused client
                    // certificate) is a connect failure of its own kind, with its reason.
                    let tls = crate::proxy::connector::tls_failure(&e);
                    if let Some(m) = &metrics {
                        m.error(if tls.is_some() {
                            UpstreamErrorKind::Tls
                        } else {
                            UpstreamErrorKind::Connect
                        });
                    }
                    match tls {
                        Some(reason) => {
                            tracing::warn!(upstream = %pool.name(), target = %in_flight.target().addr(), error = %reason, "upstream tls handshake failed");
                        }
                        None => {
                            tracing::warn!(upstream = %pool.name(), target = %in_flight.target().addr(), error = %e, "upstream connect failed");
                        }
                    }
                    if let Some(b) = reclaim.and_then(|mut rx| rx.try_recv().ok()) {
                        body = Some(b);
                        exclude = Some(in_flight.target().clone());
                        continue;
                    }
                    let mut res =
                        problem::response(StatusCode::BAD_GATEWAY, "upstream connection failed");
                    res.extensions_mut()
                        .insert(fairgate_middleware::outbound::ConnectFailed);
                    return (res, None);
                }
                // The client's body was too slow (see `crate::server::conn_limits`): the upstream
                // request is aborted, the client is at fault.
                Ok(Err(e)) if crate::server::conn_limits::is_slow_body(&e) => {
                    tracing::debug!(upstream = %pool.name(), error = %e, "request body too slow");
                    return (
                        problem::response(
                            StatusCode::REQUEST_TIMEOUT,
                            "the request body arrived too slowly",
                        ),
                        None,
                    );
                }
                // The client's body outgrew `limits.max_body` on the way (a streamed body:
                // one with a length over the limit never gets here): the client is at fault.
                Ok(Err(e)) if crate::server::body_limit::is_too_large(&e) => {
                    tracing::debug!(upstream = %pool.name(), error = %e, "request body too large");
                    return (crate::server::body_limit::too_large(), None);
                }
                Ok(Err(e)) => {
                    let tls = crate::proxy::connector::tls_failure(&e);
                    if let Some(m) = &metrics {
                        m.error(if tls.is_some() {
                            UpstreamErrorKind::Tls
                        } else {
                            UpstreamErrorKind::Protocol
                        });
                    }
                    match tls {
                        Some(reason) => {
                            tracing::warn!(upstream = %pool.name(), target = %in_flight.target().addr(), error = %reason, "upstream tls handshake failed");
                        }
                        None => {
                            tracing::warn!(upstream = %pool.name(), target = %in_flight.target().addr(), error = %e, "upstream request failed");
                        }
                    }
                    return (
                        problem::response(StatusCode::BAD_GATEWAY, "upstream request failed"),
                        None,
                    );
                }
                Err(_elapsed) => {
                    if let Some(m) = &metrics {
                        m.error(UpstreamErrorKind::Timeout);
                    }
                    tracing::warn!(upstream = %pool.name(), target = %in_flight.target().addr(), route = %route.name, "upstream timed out");
                    return (
                        problem::response(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream did not answer in time",
                        ),
                        None,
                    );
                }
            }
        }
    }
}

impl<B> Service<Request<B>> for Proxy
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    // The proxy awaits the pool, the upstream and a timer; a boxed async block keeps it
    // readable. The admission rejections in front of it allocate nothing.
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        // Admission has decided; a sampled admit's log line waits for the response.
        let pending = crate::proxy::admission::take_pending(&req);
        let grpc = is_grpc(&req);
        Box::pin(async move {
            let res = this.forward(req, pending, grpc).await;
            Ok(if grpc { problem::grpc_form(res) } else { res })
        })
    }
}

fn hash_key<B>(pool: &Pool, req: &Request<B>, conn: Option<ConnInfo>) -> String {
    if let Some(h) = pool.hash_header() {
        return req
            .headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
    }
    if pool.targets().len() < 2 {
        return String::new();
    }
    conn.map(|c| c.peer.ip().to_string()).unwrap_or_default()
}

fn finish_response(
    mut res: Response<hyper::body::Incoming>,
    in_flight: crate::proxy::upstream::InFlight,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    metrics: Option<&UpstreamMetrics>,
) -> (
    Response<ProxyBody>,
    Option<crate::proxy::upstream::InFlight>,
) {
    let upgraded = res.status() == StatusCode::SWITCHING_PROTOCOLS;
    if upgraded {
        let Some(client_upgrade) = client_upgrade else {
            if let Some(m) = metrics {
                m.error(UpstreamErrorKind::Protocol);
            }
            return (
                problem::response(
                    StatusCode::BAD_GATEWAY,
                    "upstream switched protocols unasked",
                ),
                None,
            );
        };
        let upstream_upgrade = hyper::upgrade::on(&mut res);
        tokio::spawn(async move {
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        });
    }
    strip_hop_by_hop(res.headers_mut(), upgraded);
    res.headers_mut().append(header::VIA, VIA.clone());
    let res = match metrics {
        // A body that breaks off after the head was sent (upstream reset mid-body) is an
        // upstream failure too; the client's connection is then closed by hyper.
        Some(m) => {
            let errors = m.body_errors();
            res.map(|b| {
                body::boxed(b.map_err(move |e| {
                    errors.inc();
                    e
                }))
            })
        }
        None => res.map(body::boxed),
    };
    (res, Some(in_flight))
}

/// Writes a sampled admit's decision-log line when the response body ends (or the client
/// goes away).
struct LogOnEnd(Option<(PendingAdmit, u16)>);

impl Drop for LogOnEnd {
    fn drop(&mut self) {
        if let Some((p, status)) = self.0.take() {
            p.finish(Some(status));
        }
    }
}

/// Whether a request is a gRPC call (`content-type: application/grpc…`).
fn is_grpc<B>(req: &Request<B>) -> bool {
    fairgate_middleware::admission::grpc::is_grpc(req.headers())
}

/// Whether `TE` lists `trailers`.
fn te_has_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        })
}

/// True for an HTTP/1.1 request asking to switch protocols (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The hop-by-hop headers removed by name; `Connection` (first) also names others.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `name`'s index in [`HOP_BY_HOP`]: one `match` on the name's text (a switch on its length,
/// then one comparison) instead of nine `HeaderName` comparisons per header (≈ 800
/// instructions a proxied request in the profile).
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-authenticate" => Some(2),
        "proxy-authorization" => Some(3),
        "proxy-connection" => Some(4),
        "te" => Some(5),
        "trailer" => Some(6),
        "transfer-encoding" => Some(7),
        "upgrade" => Some(8),
        _ => None,
    }
}

/// Removes hop-by-hop headers. With `keep_upgrade`, `Upgrade` and `Connection: upgrade` stay.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds which are there: most messages carry none or one
    // (`Connection: keep-alive`), and a removal is a hash lookup each.
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present[i] = true;
        }
    }
    if present[0] {
        // Headers named in `Connection` are hop-by-hop too. The values are cheap clones
        // (shared bytes); only a second `Connection` line makes a `Vec`.
        let mut values = headers.get_all(header::CONNECTION).iter();
        let first = values.next().cloned();
        let more: Vec<HeaderValue> = values.cloned().collect();
        headers.remove(header::CONNECTION);
        for v in first.iter().chain(&more) {
            let Ok(v) = v.to_str() else { continue };
            for token in v.split(',').map(str::trim) {
                if keep_upgrade && token.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                // Looked up by `&str`: no name is allocated; an invalid one matches nothing.
                headers.remove(token);
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate().skip(1) {
        if present[i] && !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn prepare_request_headers(
    parts: &mut http::request::Parts,
    conn: Option<ConnInfo>,
    upgrade: bool,
) {
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, upgrade);
    // HTTP/2 clients send `:authority`, not `Host`; HTTP/1 upstreams need `Host`.
    if !headers.contains_key(header::HOST) {
        if let Some(auth) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                headers.insert(header::HOST, v);
            }
        }
    }
    if let Some(conn) = conn {
        append_forwarded_for(headers, conn.peer.ip());
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(conn.scheme),
        );
    }
    headers.append(header::VIA, VIA.clone());
}

/// Appends `ip` to `X-Forwarded-For`, merging several header lines into one list.
fn append_forwarded_for(headers: &mut HeaderMap, ip: std::net::IpAddr) {
    if let std::net::IpAddr::V4(v4) = ip {
        if !headers.contains_key(&X_FORWARDED_FOR) {
            // The common case, the peer alone: no string, no formatting machinery.
            let mut buf = [0u8; 15];
            let n = write_ipv4(&mut buf, v4);
            if let Ok(v) = HeaderValue::from_bytes(&buf[..n]) {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
            return;
        }
    }
    let mut list = String::new();
    for v in headers.get_all(&X_FORWARDED_FOR).iter() {
        if let Ok(s) = v.to_str() {
            let s = s.trim();
            if !s.is_empty() {
                list.push_str(s);
                list.push_str(", ");
            }
        }
    }
    use std::fmt::Write;
    let _ = write!(list, "{ip}");
    if let Ok(v) = HeaderValue::from_str(&list) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
}

/// Writes `ip` in dotted-decimal form into `buf`; returns the length.
fn write_ipv4(buf: &mut [u8; 15], ip: std::net::Ipv4Addr) -> usize {
    let mut n = 0;
    for (i, o) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if o >= 100 {
            buf[n] = b'0' + o / 100;
            n += 1;
        }
        if o >= 10 {
            buf[n] = b'0' + (o / 10) % 10;
            n += 1;
        }
        buf[n] = b'0' + o % 10;
        n += 1;
    }
    n
}

/// A request body that hands itself back through `tx` if it is dropped before ever being
/// polled — which is what happens when the upstream connection could not be made.
struct Reclaim {
    body: Option<ProxyBody>,
    polled: bool,
    tx: Option<oneshot::Sender<ProxyBody>>,
}

impl Reclaim {
    fn new(body: ProxyBody, tx: oneshot::Sender<ProxyBody>) -> Reclaim {
        Reclaim {
            body: Some(body),
            polled: false,
            tx: Some(tx),
        }
    }
}

impl Body for Reclaim {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.polled = true;
        match self.body.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Reclaim {
    fn drop(&mut self) {
        if !self.polled {
            if let (Some(tx), Some(body)) = (self.tx.take(), self.body.take()) {
                let _ = tx.send(body);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// The `match` finds every name of the list at its index, and no other name.
    #[test]
    fn hop_by_hop_index_matches_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        for other in [
            "host",
            "x-api-key",
            "content-length",
            "tee",
            "upgrades",
            "keep-alive2",
        ] {
            assert_eq!(
                hop_by_hop_index(&HeaderName::from_static(other)),
                None,
                "{other}"
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-api-key", HeaderValue::from_static("k"));
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-api-key"));
    }

    /// A per-core proxy sends through its core's client of the pool, whatever thread runs
    /// it: three proxies on one thread (cores 0 and 1, and the shared one) open three
    /// upstream connections, one per client.
    #[tokio::test]
    async fn a_per_core_proxy_uses_its_cores_client() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use hyper_util::rt::TokioExecutor;
        use hyper_util::server::conn::auto;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let server = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(crate::proxy::echo::handle);
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let cfg = crate::config::UpstreamConfig {
            max_idle: 16,
            ..crate::config::UpstreamConfig::for_tests(crate::config::Balance::RoundRobin)
        };
        let pool = Arc::new(Pool::new("p", &cfg, vec![addr]).with_per_core_clients(2));
        let route = Arc::new(crate::proxy::routing::Route::new(
            "r",
            None,
            "/",
            None,
            pool.clone(),
            None,
            None,
        ));
        let proxy = Proxy::new(&[pool], &Metrics::new());
        for p in [proxy.for_core(0), proxy.for_core(1), proxy] {
            let mut req = Request::new(body::empty());
            *req.uri_mut() = "/".parse().unwrap();
            req.extensions_mut().insert(RouteMatch(route.clone()));
            let res = p.forward(req, None, false).await;
            assert_eq!(res.status(), StatusCode::OK);
            res.into_body().collect().await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        server.abort();
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRAILER, HeaderValue::from_static("x"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("basic x"),
        );
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn upgrade_headers_survive_an_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarded_for_appends_the_peer_to_one_list() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("198.51.100.2, 192.0.2.3"),
        );
        append_forwarded_for(&mut h, "127.0.0.1".parse().unwrap());
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(
            h["x-forwarded-for"],
            "192.0.2.1, 198.51.100.2, 192.0.2.3, 127.0.0.1"
        );
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "::1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "::1");
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "10.200.9.99",
            "1.20.100.0",
        ] {
            let mut h = HeaderMap::new();
            append_forwarded_for(&mut h, ip.parse().unwrap());
            assert_eq!(h["x-forwarded-for"], ip);
        }
    }

    #[tokio::test]
    async fn an_unpolled_body_is_handed_back() {
        let (tx, mut rx) = oneshot::channel();
        let b = Reclaim::new(
            body::boxed(http_body_util::Full::new(Bytes::from("abc"))),
            tx,
        );
        drop(b);
        let back = rx.try_recv().expect("body returned");
        assert_eq!(back.collect().await.unwrap().to_bytes(), "abc");

        let (tx, mut rx) = oneshot::channel();
        let mut b = Reclaim::new(
            body::boxed(http_body_util::Full::new(Bytes::from("abc"))),
            tx,
        );
        let _ = b.frame().await;
        drop(b);
        assert!(rx.try_recv().is_err(), "a polled body is never replayed");
    }
}
