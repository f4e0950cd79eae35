//! Routes: which upstream pool (and admission operation) a request goes to, and the
//! per-connection facts the rest of the stack reads from request extensions.
//!
//! [`RoutingLayer`] runs before admission: it answers `CONNECT` with 405 and unrouted
//! requests with 404 (neither reaches the engine or an upstream), and tags routed requests
//! with a [`RouteMatch`] (for the proxy), the route's operation name (for the engine) and
//! the route's decision context (for the decision log, see [`crate::proxy::admission`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::Either;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::ProxyBody;
use crate::problem;
use crate::proxy::upstream::Pool;

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    /// Route name (logs).
    pub name: Arc<str>,
    host: Option<Box<str>>,
    path_prefix: Box<str>,
    methods: Option<Box<[Method]>>,
    /// The pool requests go to.
    pub pool: Arc<Pool>,
    /// Operation name for the admission engine.
    pub operation: Option<Arc<str>>,
    /// Time to the upstream response head.
    pub timeout: Duration,
}

/// The route a request matched, as a request extension.
#[derive(Debug, Clone)]
pub struct RouteMatch(pub Arc<Route>);

// === impl Route ===

impl Route {
    /// Builds a route. `host` may be `*.example.com`.
    pub fn new(
        name: &str,
        host: Option<&str>,
        path_prefix: &str,
        methods: Option<Vec<Method>>,
        pool: Arc<Pool>,
        operation: Option<&str>,
        timeout: Option<Duration>,
    ) -> Route {
        let timeout = timeout.unwrap_or_else(|| pool.request_timeout());
        Route {
            name: Arc::from(name),
            host: host.map(|h| h.to_ascii_lowercase().into_boxed_str()),
            path_prefix: path_prefix.into(),
            methods: methods.map(Vec::into_boxed_slice),
            pool,
            operation: operation.map(Arc::from),
            timeout,
        }
    }

    fn matches(&self, method: &Method, host: &str, path: &str) -> bool {
        if let Some(methods) = &self.methods {
            if !methods.contains(method) {
                return false;
            }
        }
        if let Some(want) = &self.host {
            let ok = match want.strip_prefix("*.") {
                Some(suffix) => {
                    host.len() > suffix.len() + 1
                        && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                        && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                }
                None => host.eq_ignore_ascii_case(want),
            };
            if !ok {
                return false;
            }
        }
        path.starts_with(&*self.path_prefix)
    }
}

/// The host a request is for: the URI authority (HTTP/2, absolute-form) or `Host`, no port.
pub fn request_host<B>(req: &Request<B>) -> &str {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    strip_port(raw)
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or("");
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// All routes in order; the first match wins.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Box<[Arc<Route>]>,
}

impl RouteTable {
    /// Builds the table.
    pub fn new(routes: Vec<Route>) -> RouteTable {
        RouteTable {
            routes: routes.into_iter().map(Arc::new).collect(),
        }
    }

    /// Finds the route of a request.
    pub fn find<B>(&self, req: &Request<B>) -> Option<&Arc<Route>> {
        let host = request_host(req);
        let path = req.uri().path();
        self.routes
            .iter()
            .find(|r| r.matches(req.method(), host, path))
    }

    /// The routes.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

/// Layer that routes requests (see the module docs).
#[derive(Debug, Clone)]
pub struct RoutingLayer {
    table: Arc<RouteTable>,
}

impl RoutingLayer {
    /// Routes with `table`.
    pub fn new(table: Arc<RouteTable>) -> Self {
        RoutingLayer { table }
    }
}

impl<S> Layer<S> for RoutingLayer {
    type Service = Routing<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Routing {
            inner,
            table: self.table.clone(),
        }
    }
}

/// The service built by [`RoutingLayer`].
#[derive(Debug, Clone)]
pub struct Routing<S> {
    inner: S,
    table: Arc<RouteTable>,
}

impl<S, B, ResB> Service<Request<B>> for Routing<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
{
    type Response = Response<Either<ResB, ProxyBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if req.method() == Method::CONNECT {
            return ResponseFuture::reject(problem::response(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported",
            ));
        }
        let Some(route) = self.table.find(&req).cloned() else {
            return ResponseFuture::reject(problem::response(
                StatusCode::NOT_FOUND,
                "no route matches this request",
            ));
        };
        if let Some(op) = &route.operation {
            crate::proxy::admission::tag_operation(&mut req, op);
        }
        crate::proxy::admission::tag_route(&mut req, &route.name);
        req.extensions_mut().insert(RouteMatch(route));
        ResponseFuture::Inner {
            fut: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Future of [`Routing`]: the inner service's, or a ready rejection.
    // pin-project-lite cannot carry doc comments on variant fields.
    #[allow(missing_docs)]
    #[project = ResponseFutureProj]
    pub enum ResponseFuture<F> {
        /// Routed: the inner service's future.
        Inner { #[pin] fut: F },
        /// Answered here; the response is taken when polled.
        Reject { res: Option<Response<ProxyBody>> },
    }
}

impl<F> ResponseFuture<F> {
    fn reject(res: Response<ProxyBody>) -> Self {
        ResponseFuture::Reject { res: Some(res) }
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<Either<ResB, ProxyBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Inner { fut } => {
                fut.poll(cx).map(|r| r.map(|res| res.map(Either::Left)))
            }
            ResponseFutureProj::Reject { res } => {
                let res = res.take().expect("polled after completion");
                Poll::Ready(Ok(res.map(Either::Right)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Balance, UpstreamConfig};

    fn pool() -> Arc<Pool> {
        let cfg = UpstreamConfig {
            request_timeout: Duration::from_secs(7),
            ..UpstreamConfig::for_tests(Balance::RoundRobin)
        };
        Arc::new(Pool::new(
            "p",
            &cfg,
            vec![std::net::SocketAddr::from(([127, 0, 0, 1], 1))],
        ))
    }

    fn req(method: Method, host: &str, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", host)
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn first_matching_route_wins() {
        let table = RouteTable::new(vec![
            Route::new(
                "api-post",
                Some("api.example.com"),
                "/v1/",
                Some(vec![Method::POST]),
                pool(),
                Some("write"),
                None,
            ),
            Route::new(
                "wild",
                Some("*.example.com"),
                "/",
                None,
                pool(),
                None,
                Some(Duration::from_secs(2)),
            ),
            Route::new("any", None, "/static/", None, pool(), None, None),
        ]);
        let name = |r: &Request<()>| table.find(r).map(|r| r.name.to_string());
        assert_eq!(
            name(&req(Method::POST, "API.example.com:8080", "/v1/x")).as_deref(),
            Some("api-post")
        );
        assert_eq!(
            name(&req(Method::GET, "api.example.com", "/v1/x")).as_deref(),
            Some("wild")
        );
        assert_eq!(name(&req(Method::GET, "example.com", "/v1/x")), None);
        assert_eq!(
            name(&req(Method::GET, "other.org", "/static/a.css")).as_deref(),
            Some("any")
        );
        let r = table.find(&req(Method::GET, "a.example.com", "/")).unwrap();
        assert_eq!(r.timeout, Duration::from_secs(2));
        let r = table
            .find(&req(Method::POST, "api.example.com", "/v1/"))
            .unwrap();
        assert_eq!(r.timeout, Duration::from_secs(7));
        assert_eq!(r.operation.as_deref(), Some("write"));
    }

    #[test]
    fn host_ports_and_brackets_are_stripped() {
        assert_eq!(strip_port("example.com:80"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("example.com"), "example.com");
    }
}
