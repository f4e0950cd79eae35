//! A pool's client: how a request reaches a target.
//!
//! HTTP/1.1 pools (`protocol: http1`, the default) use [`H1Pool`], our own pool of hyper
//! `client::conn::http1` connections; HTTP/2 pools (`h2c`, `h2`) use hyper-util's pooled
//! `Client` in HTTP/2-only mode (one connection per target carries every stream).
//!
//! Why our own HTTP/1.1 pool (issue #15): hyper-util's legacy `Client` is general — it parses
//! the request URI into a pool key and hashes it with SipHash, keeps one pool behind a lock for
//! every host, boxes its futures, and moves large futures between them. Measured with
//! callgrind (`benches/load/callgrind.sh hyper hyper-conn`), a minimal proxy on it costs ≈ 38k
//! instructions a request against ≈ 28k on `client::conn::http1` connections. Here a pool
//! knows its targets, so an idle connection is found by comparing the target's address in a
//! short list, under an uncontended lock (each per-core thread has its own pool).
//!
//! What it keeps of the legacy client's behaviour, which the proxy relies on:
//! - a connect failure is told from a failure after connecting ([`UpstreamError::is_connect`]):
//!   the proxy retries only the former on another target;
//! - a request that a pooled connection could not take (the upstream closed it while idle) is
//!   sent again on a new connection, as the legacy client's `retry_canceled_requests` does;
//! - `Host` from the target when the request has none; upgrades (`101`) through
//!   `with_upgrades`;
//! - at most `max_idle` idle connections per target, closed after `idle_timeout` idle (a sweep
//!   every `idle_timeout ÷ 2`, at least 1 s).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::uri::Authority;
use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::body::{BoxError, ProxyBody};
use crate::proxy::connector::Connector;

/// Why a request did not get a response head from its target.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// No connection could be made (refused, timed out, TLS handshake failed).
    Connect(BoxError),
    /// The connection failed after it was made (or the request's body failed).
    Request(hyper::Error),
    /// The HTTP/2 client's error.
    Pooled(hyper_util::client::legacy::Error),
}

impl UpstreamError {
    /// Whether no connection could be made: nothing of the request was sent.
    pub(crate) fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Connect(_) => true,
            UpstreamError::Request(_) => false,
            UpstreamError::Pooled(e) => e.is_connect(),
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "cannot connect: {e}"),
            UpstreamError::Request(e) => write!(f, "{e}"),
            UpstreamError::Pooled(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpstreamError::Connect(e) => Some(e.as_ref()),
            UpstreamError::Request(e) => Some(e),
            UpstreamError::Pooled(e) => Some(e),
        }
    }
}

/// A response body from a target: an HTTP/1.1 pool's (which checks its connection in when it
/// ends) or an HTTP/2 pool's.
pub(crate) type UpstreamBody = http_body_util::Either<CheckIn, Incoming>;

/// A pool's client (see the module docs).
pub(crate) enum PoolClient {
    /// HTTP/1.1: our own pool of connections.
    H1(H1Pool),
    /// HTTP/2: hyper-util's pooled client.
    H2(Box<Client<Connector, ProxyBody>>),
}

impl PoolClient {
    /// Sends `req` (its URI absolute: the target's scheme and authority, then the path) and
    /// waits for the response head.
    pub(crate) async fn request(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        match self {
            PoolClient::H1(pool) => pool.request(req).await,
            PoolClient::H2(client) => match client.request(req).await {
                Ok(res) => Ok(res.map(http_body_util::Either::Right)),
                Err(e) => Err(UpstreamError::Pooled(e)),
            },
        }
    }
}

/// An idle connection and when it became idle.
struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

/// The idle connections of one target, and the requests waiting for one.
struct TargetIdle {
    authority: Authority,
    conns: Vec<Idle>,
    /// Requests that found nothing idle, oldest first: a connection checked in goes to the
    /// first still waiting before the idle list.
    waiters: VecDeque<oneshot::Sender<SendRequest<ProxyBody>>>,
}

impl TargetIdle {
    fn new(authority: Authority) -> TargetIdle {
        TargetIdle {
            authority,
            conns: Vec::new(),
            waiters: VecDeque::new(),
        }
    }
}

/// Idle connections by target, shared by a pool and its sweeper.
#[derive(Default)]
struct IdleSet {
    targets: Vec<TargetIdle>,
    sweeping: bool,
}

/// A pool of HTTP/1.1 connections to a pool's targets (see the module docs).
pub(crate) struct H1Pool {
    connector: Connector,
    idle: Arc<Mutex<IdleSet>>,
    idle_timeout: Duration,
    max_idle: usize,
}

impl H1Pool {
    /// A pool opening its connections with `connector`.
    pub(crate) fn new(connector: Connector, idle_timeout: Duration, max_idle: usize) -> H1Pool {
        H1Pool {
            connector,
            idle: Arc::default(),
            idle_timeout,
            max_idle,
        }
    }

    async fn request(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let Some(authority) = req.uri().authority().cloned() else {
            return Err(UpstreamError::Connect("the request has no target".into()));
        };
        let target = std::mem::take(req.uri_mut());
        // Origin form on the wire; `Host` from the target when the client sent none.
        *req.uri_mut() = match target.path_and_query() {
            Some(pq) => Uri::from(pq.clone()),
            None => Uri::from_static("/"),
        };
        if !req.headers().contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        let mut sender = match self.checkout(&authority) {
            Some(s) => s,
            // Boxed: waiting and connecting are rare; inline, their futures would be moved
            // with every request's future.
            None => Box::pin(self.wait_or_connect(&authority, &target)).await?,
        };
        let mut fresh = false;
        loop {
            match sender.try_send_request(req).await {
                Ok(res) => {
                    let back = Back {
                        sender: Some(sender),
                        authority,
                        pool: Arc::downgrade(&self.idle),
                        max_idle: self.max_idle,
                    };
                    // Checked in when the body has ended.
                    return Ok(res.map(|body| {
                        http_body_util::Either::Left(CheckIn {
                            inner: body,
                            back: Some(back),
                        })
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the pooled connection was closing. Once more, on a new one.
                    Some(unsent) if !fresh => {
                        req = unsent;
                        sender = Box::pin(self.connect(&target)).await?;
                        fresh = true;
                    }
                    _ => return Err(UpstreamError::Request(e.into_error())),
                },
            }
        }
    }

    /// An idle connection to `authority` ready for a request, if there is one.
    fn checkout(&self, authority: &Authority) -> Option<SendRequest<ProxyBody>> {
        loop {
            let popped = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.targets
                    .iter_mut()
                    .find(|t| t.authority == *authority)
                    .and_then(|t| t.conns.pop())
            };
            let Idle { mut sender, since } = popped?;
            if sender.is_closed() || since.elapsed() >= self.idle_timeout {
                continue;
            }
            // Checked in when its last response body ended: normally ready. One that is not
            // (still sending a request body its upstream answered early) is never waited for
            // here: it goes back to the idle list once ready, as hyper-util's pool does, and
            // this request takes another connection.
            match futures_util::FutureExt::now_or_never(sender.ready()) {
                Some(Ok(())) => return Some(sender),
                Some(Err(_)) => continue,
                None => {
                    let back = Back {
                        sender: None,
                        authority: authority.clone(),
                        pool: Arc::downgrade(&self.idle),
                        max_idle: self.max_idle,
                    };
                    tokio::spawn(async move {
                        let mut back = back;
                        if sender.ready().await.is_ok() {
                            back.sender = Some(sender);
                            back.check_in();
                        }
                    });
                }
            }
        }
    }

    /// Nothing idle: connects, and meanwhile waits for a connection another request checks
    /// in; takes whichever comes first (as hyper-util's pool does). A connection made after
    /// the request was served is checked in; one checked in after it connected goes to the
    /// next waiter or the idle list. Without the race, a stall of the machine that piles
    /// requests up turns into a storm of new connections the upstream must accept, each
    /// request waiting for its own, while the connections of those before come free.
    async fn wait_or_connect(
        &self,
        authority: &Authority,
        target: &Uri,
    ) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        let (tx, mut rx) = oneshot::channel();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let t = match idle.targets.iter().position(|t| t.authority == *authority) {
                Some(i) => &mut idle.targets[i],
                None => {
                    idle.targets.push(TargetIdle::new(authority.clone()));
                    idle.targets.last_mut().expect("just pushed")
                }
            };
            t.waiters.retain(|w| !w.is_closed());
            t.waiters.push_back(tx);
        }
        let mut connect = Box::pin(self.connect(target));
        tokio::select! {
            biased;
            checked_in = &mut rx => match checked_in {
                Ok(sender) => {
                    // The connect goes on: its connection is checked in when made.
                    let back = Back {
                        sender: None,
                        authority: authority.clone(),
                        pool: Arc::downgrade(&self.idle),
                        max_idle: self.max_idle,
                    };
                    tokio::spawn(async move {
                        let mut back = back;
                        if let Ok(s) = connect.await {
                            back.sender = Some(s);
                            back.check_in();
                        }
                    });
                    Ok(sender)
                }
                // The pool is gone: only the connect is left.
                Err(_) => connect.await,
            },
            connected = &mut connect => {
                rx.close();
                // Checked in between the connect's end and `close`: handed on.
                if let Ok(sender) = rx.try_recv() {
                    let mut back = Back {
                        sender: Some(sender),
                        authority: authority.clone(),
                        pool: Arc::downgrade(&self.idle),
                        max_idle: self.max_idle,
                    };
                    back.check_in();
                }
                connected
            }
        }
    }

    /// A new connection to `target` (the future owns what it needs: it may finish in a task
    /// of its own, see [`H1Pool::wait_or_connect`]).
    fn connect(
        &self,
        target: &Uri,
    ) -> impl Future<Output = Result<SendRequest<ProxyBody>, UpstreamError>> + Send + 'static {
        self.start_sweeper();
        let connecting = self.connector.clone().oneshot(target.clone());
        async move {
            let io = connecting.await.map_err(UpstreamError::Connect)?;
            let (sender, conn) = hyper::client::conn::http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| UpstreamError::Connect(e.into()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            });
            Ok(sender)
        }
    }

    /// Starts the task closing idle connections past `idle_timeout`, once, on the runtime of
    /// the first connection (a per-core pool's own thread).
    fn start_sweeper(&self) {
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.sweeping {
                return;
            }
            idle.sweeping = true;
        }
        let weak = Arc::downgrade(&self.idle);
        let timeout = self.idle_timeout;
        let every = (timeout / 2).max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(idle) = weak.upgrade() else { return };
                // Dropped outside the lock: a dropped sender ends its connection's task.
                let mut closing = Vec::new();
                {
                    let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
                    for t in &mut idle.targets {
                        // Oldest first: they were pushed in the order they went idle.
                        let stale = t
                            .conns
                            .iter()
                            .take_while(|c| c.since.elapsed() >= timeout || c.sender.is_closed())
                            .count();
                        closing.extend(t.conns.drain(..stale));
                        t.conns.retain(|c| !c.sender.is_closed());
                        t.waiters.retain(|w| !w.is_closed());
                    }
                    // Targets with nothing idle and no one waiting go (a re-resolved name's
                    // old addresses).
                    idle.targets
                        .retain(|t| !t.conns.is_empty() || !t.waiters.is_empty());
                }
                drop(closing);
            }
        });
    }
}

/// What a response body carries to give its connection back.
struct Back {
    sender: Option<SendRequest<ProxyBody>>,
    authority: Authority,
    pool: Weak<Mutex<IdleSet>>,
    max_idle: usize,
}

impl Back {
    /// Gives the connection to the first request waiting for one of its target, else to the
    /// idle list (at most `max_idle`). A waiter gets only a connection ready for a request:
    /// one that is not yet (its task has not seen the last response's end) is checked in
    /// again once it is, from a task.
    fn check_in(&mut self) {
        let Some(mut sender) = self.sender.take() else {
            return;
        };
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        let since = Instant::now();
        let mut idle = pool.lock().unwrap_or_else(|e| e.into_inner());
        let target = match idle
            .targets
            .iter()
            .position(|t| t.authority == self.authority)
        {
            Some(i) => &mut idle.targets[i],
            None => {
                idle.targets.push(TargetIdle::new(self.authority.clone()));
                idle.targets.last_mut().expect("just pushed")
            }
        };
        target.waiters.retain(|w| !w.is_closed());
        if !target.waiters.is_empty() {
            if !sender.is_ready() {
                drop(idle);
                // A body dropped outside a runtime (at exit): nothing to wait on.
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let mut back = Back {
                    sender: None,
                    authority: self.authority.clone(),
                    pool: self.pool.clone(),
                    max_idle: self.max_idle,
                };
                rt.spawn(async move {
                    if sender.ready().await.is_ok() {
                        back.sender = Some(sender);
                        back.check_in();
                    }
                });
                return;
            }
            while let Some(w) = target.waiters.pop_front() {
                match w.send(sender) {
                    Ok(()) => return,
                    Err(s) => sender = s,
                }
            }
        }
        if target.conns.len() < self.max_idle {
            target.conns.push(Idle { sender, since });
        }
    }
}

/// A response body that checks its connection in once it has ended (a body dropped before
/// its end leaves the connection to close: it may still carry unread bytes).
pub(crate) struct CheckIn {
    inner: Incoming,
    back: Option<Back>,
}

impl http_body::Body for CheckIn {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let out = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None) = out {
            if let Some(mut back) = self.back.take() {
                back.check_in();
            }
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CheckIn {
    fn drop(&mut self) {
        if let Some(back) = &mut self.back {
            if http_body::Body::is_end_stream(&self.inner) {
                back.check_in();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt as _;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioIo;

    use super::*;
    use crate::body;

    /// An upstream on 127.0.0.1 counting the connections it accepted and those that ended;
    /// `/close` answers with `Connection: close`.
    struct Upstream {
        addr: std::net::SocketAddr,
        accepted: Arc<AtomicUsize>,
        ended: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Upstream {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn upstream() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (a, e) = (accepted.clone(), ended.clone());
        let task = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                let e = e.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let mut res = Response::new(http_body_util::Full::new(bytes::Bytes::from(
                            req.uri().path().to_owned(),
                        )));
                        if req.uri().path() == "/close" {
                            res.headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        }
                        Ok::<_, std::convert::Infallible>(res)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    e.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Upstream {
            addr,
            accepted,
            ended,
            task,
        }
    }

    fn pool(idle_timeout: Duration, max_idle: usize) -> H1Pool {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(Duration::from_secs(1)));
        H1Pool::new(
            Connector::new(tcp, None, Duration::from_secs(1)),
            idle_timeout,
            max_idle,
        )
    }

    async fn get(pool: &H1Pool, addr: std::net::SocketAddr, path: &str) -> String {
        let uri: Uri = format!("http://{addr}{path}").parse().unwrap();
        let req = Request::get(uri).body(body::empty()).unwrap();
        let res = pool.request(req).await.expect("response");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection_and_send_the_origin_form() {
        let up = upstream().await;
        let pool = pool(Duration::from_secs(90), 16);
        for i in 0..5 {
            assert_eq!(
                get(&pool, up.addr, &format!("/r{i}?q=1")).await,
                format!("/r{i}")
            );
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_closed_connection_is_not_reused_and_max_idle_bounds_what_is_kept() {
        let up = upstream().await;
        let pool_ = pool(Duration::from_secs(90), 16);
        assert_eq!(get(&pool_, up.addr, "/close").await, "/close");
        assert_eq!(get(&pool_, up.addr, "/a").await, "/a");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);

        let up = upstream().await;
        let none_kept = pool(Duration::from_secs(90), 0);
        for _ in 0..3 {
            get(&none_kept, up.addr, "/").await;
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let up = upstream().await;
        let pool = pool(Duration::from_secs(1), 16);
        get(&pool, up.addr, "/").await;
        assert_eq!(up.ended.load(Ordering::SeqCst), 0);
        // The sweep runs every second; the connection idles for 1 s before it may go.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while up.ended.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the idle connection was never closed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A later request opens a new connection.
        get(&pool, up.addr, "/").await;
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    }

    /// A request that finds nothing idle takes the connection another request checks in
    /// while its own connect is still pending, as hyper-util's pool does.
    #[tokio::test]
    async fn a_waiting_request_takes_a_connection_checked_in_before_its_connect_completes() {
        // An upstream that accepts one connection and no more, with an accept queue of one:
        // once a second connection fills the queue, a third connect stays pending (its SYN
        // is dropped).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let listener = socket.listen(0).unwrap();
        let release = Arc::new(tokio::sync::Notify::new());
        let held = release.clone();
        let (accepted_tx, accepted) = oneshot::channel();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            accepted_tx.send(()).unwrap();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let held = held.clone();
                async move {
                    if req.uri().path() == "/hold" {
                        held.notified().await;
                    }
                    let body = bytes::Bytes::from(req.uri().path().to_owned());
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        body,
                    )))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            // The listener stays open (nothing more accepted) until the test ends.
            std::future::pending::<()>().await;
            drop(listener);
        });
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(Duration::from_secs(60)));
        let pool = Arc::new(H1Pool::new(
            Connector::new(tcp, None, Duration::from_secs(60)),
            Duration::from_secs(90),
            16,
        ));
        let first = tokio::spawn({
            let pool = pool.clone();
            async move { get(&pool, addr, "/hold").await }
        });
        let waiting = |n: usize| {
            let pool = pool.clone();
            async move {
                // Bounded: a pool that never waits gets here too, then fails below.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while tokio::time::Instant::now() < deadline {
                    let open = pool
                        .idle
                        .lock()
                        .unwrap()
                        .targets
                        .iter()
                        .flat_map(|t| &t.waiters)
                        .filter(|w| !w.is_closed())
                        .count();
                    let busy = open == n;
                    if busy {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        // The first request's connection is the one accepted; then the queue is filled.
        accepted.await.unwrap();
        let _filler = std::net::TcpStream::connect(addr).unwrap();
        let second = tokio::spawn({
            let pool = pool.clone();
            async move { get(&pool, addr, "/second").await }
        });
        waiting(1).await;
        release.notify_one();
        assert_eq!(first.await.unwrap(), "/hold");
        let second = tokio::time::timeout(Duration::from_secs(20), second)
            .await
            .expect("the second request waited for its own connect instead of the one freed")
            .unwrap();
        assert_eq!(second, "/second");
        server.abort();
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = pool(Duration::from_secs(90), 16);
        let uri: Uri = format!("http://{addr}/").parse().unwrap();
        match pool
            .request(Request::get(uri).body(body::empty()).unwrap())
            .await
        {
            Err(err) => assert!(err.is_connect(), "{err}"),
            Ok(res) => panic!("nothing listens there, yet {}", res.status()),
        }
    }
}
