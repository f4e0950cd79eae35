//! Upstream pools: targets, load balancing, connection pooling and active health checks.
//!
//! Each pool owns one pooled hyper-util client (keep-alive connections per target) — plus one
//! per per-core thread under the `thread_per_core` runtime, so that a thread only reuses
//! connections its own runtime drives (see [`crate::server::runtime`]) — and picks a target per
//! request:
//!
//! - `p2c_ewma` (default): power of two choices over `(in_flight + 1) × peak-EWMA latency`.
//!   We keep our own small p2c instead of `tower::balance::p2c`: that one wants a `Discover`
//!   stream of ready services, whereas here the hyper client already pools connections per
//!   target and we need the chosen target's address for the retry-on-connect-failure and the
//!   health checks. Per-target state is three atomics, so picking takes no lock.
//! - `round_robin`: an atomic counter.
//! - `consistent_hash`: a ketama ring (`pingora-ketama`) over the targets, keyed by the client
//!   IP or a header; unhealthy targets are skipped by walking the ring.
//!
//! A pool speaks HTTP/1.1 by default, or HTTP/2 (`protocol: h2c`, prior knowledge; `h2`,
//! over TLS by ALPN: one connection per target carries many streams); with `tls:` its
//! connections are TLS (`proxy::connector`), health checks included.
//!
//! Targets that fail `unhealthy_after` consecutive health checks are skipped. When no target
//! is healthy, all are used again (a panic threshold, as Envoy does): a broken health check
//! must not take the whole pool down.
//!
//! The target set can change at run time (a target name re-resolved, see
//! `proxy/resolve.rs`): it is one [`TargetSet`] (the targets and their ring) behind an
//! `ArcSwap`, so a pick takes one `load` and no lock, and a change swaps the whole set (and,
//! with `tls`, the connector's server name per target). A target whose address stays keeps
//! its `Arc<Target>` (in-flight count, EWMA, health); a removed target lives on in the
//! [`InFlight`]s of the requests still using it.

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Guard};
use http::uri::{Authority, Scheme};
use http::{Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::body::{self, ProxyBody};
use crate::config::{Balance, HashKey, HealthCheck, UpstreamConfig, UpstreamProtocol, UpstreamTls};
use crate::proxy::connector::{Connector, TlsSettings};

/// A pool's pooled client.
pub(crate) type PoolClient = Client<Connector, ProxyBody>;

/// Weight of a new latency sample in the EWMA (peaks are taken at once).
const EWMA_ALPHA: f64 = 0.3;
/// Latency assumed for a target before its first response.
const INITIAL_EWMA_NS: u64 = 1_000_000;

/// One upstream target and its live statistics.
#[derive(Debug)]
pub struct Target {
    host: Arc<str>,
    addr: SocketAddr,
    authority: Authority,
    scheme: Scheme,
    in_flight: AtomicU64,
    ewma_ns: AtomicU64,
    healthy: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
}

// === impl Target ===

impl Target {
    fn new(host: Arc<str>, addr: SocketAddr, scheme: Scheme) -> Target {
        let authority = Authority::try_from(addr.to_string().as_str())
            .expect("a socket address is a valid authority");
        Target {
            host,
            addr,
            authority,
            scheme,
            in_flight: AtomicU64::new(0),
            ewma_ns: AtomicU64::new(INITIAL_EWMA_NS),
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
        }
    }

    /// The target's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The host the target was configured with: the name it was resolved from
    /// (`api.internal`), or the IP address as written.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether the last health checks passed.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Requests currently sent to this target.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn cost(&self) -> f64 {
        let ewma = self.ewma_ns.load(Ordering::Relaxed) as f64;
        ewma * (self.in_flight.load(Ordering::Relaxed) + 1) as f64
    }

    /// Feeds one response latency into the peak EWMA.
    fn observe(&self, latency: Duration) {
        let sample = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        let old = self.ewma_ns.load(Ordering::Relaxed);
        // Peak-sensitive: a slower sample replaces the average at once, faster ones decay in.
        let new = if sample > old {
            sample
        } else {
            (old as f64 * (1.0 - EWMA_ALPHA) + sample as f64 * EWMA_ALPHA) as u64
        };
        self.ewma_ns.store(new.max(1), Ordering::Relaxed);
    }

    /// Builds the URI of `path_and_query` on this target (`https` for a pool with TLS).
    pub fn uri(&self, path_and_query: Option<&http::uri::PathAndQuery>) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            path_and_query
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts).expect("scheme, authority and path make a valid uri")
    }
}

/// Counts a request against a target until dropped, then feeds its latency to the EWMA.
#[derive(Debug)]
pub struct InFlight {
    target: Arc<Target>,
    started: Instant,
    head_latency: Option<Duration>,
    moved: bool,
}

impl InFlight {
    fn new(target: Arc<Target>, moved: bool) -> InFlight {
        target.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            target,
            started: Instant::now(),
            head_latency: None,
            moved,
        }
    }

    /// A request on `target` (for tests of the target set).
    #[cfg(test)]
    pub(crate) fn holding(target: Arc<Target>) -> InFlight {
        InFlight::new(target, false)
    }

    /// Whether `consistent_hash`'s load bound moved this request off its key's target.
    pub fn moved(&self) -> bool {
        self.moved
    }

    /// Records that the response head arrived now (the latency fed to the EWMA).
    pub fn head_received(&mut self) -> Duration {
        let latency = self.started.elapsed();
        self.head_latency = Some(latency);
        latency
    }

    /// The target this request went to.
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.target.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(latency) = self.head_latency {
            self.target.observe(latency);
        }
    }
}

/// A pool's targets at one time, and their ketama ring under `consistent_hash`. Derefs to
/// the targets.
pub struct TargetSet {
    targets: Box<[Arc<Target>]>,
    ring: Option<pingora_ketama::Continuum>,
}

impl TargetSet {
    fn new(targets: Box<[Arc<Target>]>, balance: Balance) -> TargetSet {
        let ring = (balance == Balance::ConsistentHash).then(|| {
            let buckets: Vec<_> = targets
                .iter()
                .map(|t| pingora_ketama::Bucket::new(t.addr, 1))
                .collect();
            pingora_ketama::Continuum::new(&buckets)
        });
        TargetSet { targets, ring }
    }
}

impl Deref for TargetSet {
    type Target = [Arc<Target>];

    fn deref(&self) -> &[Arc<Target>] {
        &self.targets
    }
}

impl std::fmt::Debug for TargetSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.targets.iter()).finish()
    }
}

/// An upstream pool.
pub struct Pool {
    name: Arc<str>,
    set: ArcSwap<TargetSet>,
    balance: Balance,
    hash_key: HashKey,
    hash_balance_factor: Option<f64>,
    next: AtomicUsize,
    /// Used by every thread except per-core threads (and by health checks).
    client: PoolClient,
    /// One per per-core thread: `per_core[i]` for thread `i`.
    per_core: Box<[PoolClient]>,
    client_settings: ClientSettings,
    protocol: UpstreamProtocol,
    request_timeout: Duration,
    health_check: Option<HealthCheck>,
    outbound: Option<crate::config::OutboundConfig>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("targets", &self.set.load())
            .field("balance", &self.balance)
            .finish_non_exhaustive()
    }
}

// === impl Pool ===

impl Pool {
    /// Builds a pool over target addresses (`builtin:echo` already replaced by the echo
    /// server's address), each its own host; names are added later (`set_targets`).
    pub fn new(name: &str, config: &UpstreamConfig, addrs: Vec<SocketAddr>) -> Pool {
        let scheme = if config.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let targets: Box<[Arc<Target>]> = addrs
            .iter()
            .map(|a| {
                Arc::new(Target::new(
                    Arc::from(a.ip().to_string()),
                    *a,
                    scheme.clone(),
                ))
            })
            .collect();
        let client_settings = ClientSettings::new(config, &targets);
        let client = new_client(&client_settings);
        Pool {
            name: Arc::from(name),
            set: ArcSwap::from_pointee(TargetSet::new(targets, config.balance)),
            balance: config.balance,
            hash_key: config.hash_key.clone(),
            hash_balance_factor: config.hash_balance_factor,
            next: AtomicUsize::new(0),
            client,
            per_core: Box::new([]),
            client_settings,
            protocol: config.protocol,
            request_timeout: config.request_timeout,
            health_check: config.health_check.clone(),
            outbound: config.outbound.clone(),
        }
    }

    /// The pool's name (a bounded metric label).
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The current targets (a snapshot: a re-resolution may replace them while it is held;
    /// do not hold it across an `.await`).
    pub fn targets(&self) -> Guard<Arc<TargetSet>> {
        self.set.load()
    }

    /// Replaces the target set with `targets` (host, address), in that order; an address
    /// listed twice is one target (the first host). A target whose address was already in
    /// the set is kept as it is (in flight, EWMA, health); the ring is rebuilt, and with
    /// `tls` the connector learns the new targets' server names. Answers whether the set
    /// changed.
    pub(crate) fn set_targets(&self, targets: &[(Arc<str>, SocketAddr)]) -> bool {
        let old = self.set.load_full();
        let scheme = old
            .first()
            .map(|t| t.scheme.clone())
            .unwrap_or_else(|| self.client_settings.scheme());
        let mut new: Vec<Arc<Target>> = Vec::with_capacity(targets.len());
        for (host, addr) in targets {
            if new.iter().any(|t| t.addr == *addr) {
                continue;
            }
            let kept = old.iter().find(|t| t.addr == *addr).cloned();
            new.push(
                kept.unwrap_or_else(|| Arc::new(Target::new(host.clone(), *addr, scheme.clone()))),
            );
        }
        let same =
            new.len() == old.len() && new.iter().zip(old.iter()).all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            // Names first: a request may pick a new target as soon as the set is stored.
            self.client_settings.learn_names(&new, &old);
            self.set
                .store(Arc::new(TargetSet::new(new.into(), self.balance)));
        }
        !same
    }

    /// The default time to the response head.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The pool's outbound layers, if configured (built by the proxy).
    pub fn outbound(&self) -> Option<&crate::config::OutboundConfig> {
        self.outbound.as_ref()
    }

    /// Gives the pool one more client for each of `threads` per-core threads
    /// (`thread_per_core`); see the module docs.
    pub fn with_per_core_clients(mut self, threads: usize) -> Pool {
        self.per_core = (0..threads)
            .map(|_| new_client(&self.client_settings))
            .collect();
        self
    }

    /// The pooled client of per-core thread `core` (its own), or the shared one (`None`: not
    /// a per-core thread, or a core the pool has no client for).
    pub(crate) fn client(&self, core: Option<usize>) -> &PoolClient {
        core.and_then(|i| self.per_core.get(i))
            .unwrap_or(&self.client)
    }

    /// How the pool's connections speak HTTP.
    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    /// The header `consistent_hash` uses, if any.
    pub fn hash_header(&self) -> Option<&http::HeaderName> {
        match (&self.balance, &self.hash_key) {
            (Balance::ConsistentHash, HashKey::Header(h)) => Some(h),
            _ => None,
        }
    }

    /// Picks a target for a request, skipping `exclude` (the target a retry is moving away
    /// from). `hash` is the consistent-hash key (ignored by the other strategies).
    pub fn pick(&self, hash: &[u8], exclude: Option<&Arc<Target>>) -> Option<InFlight> {
        let set = self.set.load();
        let targets = &set.targets;
        let excluded = |t: &Arc<Target>| exclude.is_some_and(|e| Arc::ptr_eq(e, t));
        let any_healthy = targets.iter().any(|t| t.is_healthy() && !excluded(t));
        // Panic threshold: with no healthy target left, consider them all.
        let usable = |t: &Arc<Target>| !excluded(t) && (!any_healthy || t.is_healthy());
        let n = targets.len();
        let mut moved = false;
        let chosen = match self.balance {
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &targets[(start + i) % n])
                    .find(|t| usable(t))
            }
            Balance::ConsistentHash => {
                let ring = set
                    .ring
                    .as_ref()
                    .expect("consistent_hash pools have a ring");
                let on_ring = || {
                    ring.node_iter(hash)
                        .take(n * 8)
                        .filter_map(|addr| targets.iter().find(|t| t.addr == *addr))
                        .filter(|t| usable(t))
                };
                let home = on_ring()
                    .next()
                    .or_else(|| targets.iter().find(|t| usable(t)));
                match (self.hash_balance_factor, home) {
                    (Some(factor), Some(h)) => {
                        // Bounded load (Mirrokni et al.; HAProxy's `hash-balance-factor`):
                        // a target takes the request while its in-flight count stays within
                        // `factor` × the average, counting this request.
                        let usable_n = targets.iter().filter(|t| usable(t)).count().max(1);
                        let total: u64 = targets.iter().map(|t| t.in_flight()).sum();
                        let bound = (factor * (total + 1) as f64 / usable_n as f64).ceil() as u64;
                        let fits = |t: &&Arc<Target>| t.in_flight() < bound;
                        if fits(&h) {
                            Some(h)
                        } else {
                            moved = true;
                            on_ring().find(fits).or_else(|| {
                                targets
                                    .iter()
                                    .filter(|t| usable(t))
                                    .min_by_key(|t| t.in_flight())
                            })
                        }
                    }
                    (_, home) => home,
                }
            }
            Balance::P2cEwma => {
                let candidates = targets.iter().filter(|t| usable(t)).count();
                match candidates {
                    0 => None,
                    1 => targets.iter().find(|t| usable(t)),
                    c => {
                        let a = fastrand::usize(..c);
                        let mut b = fastrand::usize(..c - 1);
                        if b >= a {
                            b += 1;
                        }
                        let mut usable_targets = targets.iter().filter(|t| usable(t));
                        let (first, second) = if a < b { (a, b) } else { (b, a) };
                        let x = usable_targets.nth(first);
                        let y = usable_targets.nth(second - first - 1);
                        match (x, y) {
                            (Some(x), Some(y)) => Some(if x.cost() <= y.cost() { x } else { y }),
                            (x, y) => x.or(y),
                        }
                    }
                }
            }
        };
        chosen.map(|t| InFlight::new(t.clone(), moved))
    }

    /// Runs active health checks forever (spawned when the pool has `health_check`).
    pub async fn run_health_checks(self: Arc<Self>) {
        let Some(check) = self.health_check.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(check.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // The set of this round: targets added meanwhile are probed from the next one.
            let set = self.set.load_full();
            for target in set.iter() {
                let ok = self.probe(target, &check).await;
                self.record_probe(target, ok, &check);
            }
        }
    }

    async fn probe(&self, target: &Target, check: &HealthCheck) -> bool {
        let pq = http::uri::PathAndQuery::try_from(check.path.as_str()).ok();
        let req = Request::get(target.uri(pq.as_ref()))
            .header(http::header::USER_AGENT, "fairgate-health-check")
            .body(body::empty());
        let Ok(req) = req else {
            return false;
        };
        match tokio::time::timeout(check.timeout, self.client(None).request(req)).await {
            Ok(Ok(res)) => {
                let s = res.status();
                s.is_success() || s.is_redirection()
            }
            _ => false,
        }
    }

    fn record_probe(&self, target: &Target, ok: bool, check: &HealthCheck) {
        if ok {
            target.failures.store(0, Ordering::Relaxed);
            let s = target.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !target.is_healthy() && s >= check.healthy_after {
                target.healthy.store(true, Ordering::Relaxed);
                tracing::info!(upstream = %self.name, target = %target.addr, "upstream target healthy again");
            }
        } else {
            target.successes.store(0, Ordering::Relaxed);
            let f = target.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if target.is_healthy() && f >= check.unhealthy_after {
                target.healthy.store(false, Ordering::Relaxed);
                tracing::warn!(upstream = %self.name, target = %target.addr, failures = f, "upstream target unhealthy");
            }
        }
    }
}

/// The name `target`'s certificate is checked against (and the SNI, for a DNS name): the
/// pool's `server_name`, else the target's host — the name it was resolved from (sent as
/// SNI), or its IP address, checked against the certificate's IP SANs (no SNI is sent for an
/// IP). The one place that chooses it.
pub(crate) fn server_name(tls: &UpstreamTls, target: &Target) -> ServerName<'static> {
    match &tls.server_name {
        Some(name) => name.clone(),
        None => match target.host.parse::<std::net::IpAddr>() {
            Ok(_) => ServerName::IpAddress(target.addr.ip().into()),
            Err(_) => ServerName::try_from(target.host.to_string())
                .unwrap_or_else(|_| ServerName::IpAddress(target.addr.ip().into())),
        },
    }
}

/// How a pool's clients connect and keep connections.
#[derive(Clone)]
struct ClientSettings {
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    protocol: UpstreamProtocol,
    tls: Option<TlsSettings>,
    /// The pool's `tls` block (to name new targets).
    upstream_tls: Option<UpstreamTls>,
}

impl ClientSettings {
    fn new(c: &UpstreamConfig, targets: &[Arc<Target>]) -> Self {
        let tls = c.tls.as_ref().map(|tls| TlsSettings {
            connector: TlsConnector::from(tls.config.clone()),
            names: Arc::new(ArcSwap::from_pointee(
                targets
                    .iter()
                    .map(|t| (t.authority.clone(), server_name(tls, t)))
                    .collect(),
            )),
            require_h2: c.protocol == UpstreamProtocol::H2,
        });
        ClientSettings {
            connect_timeout: c.connect_timeout,
            idle_timeout: c.idle_timeout,
            max_idle: c.max_idle,
            protocol: c.protocol,
            tls,
            upstream_tls: c.tls.clone(),
        }
    }

    /// The scheme of the pool's target URIs.
    fn scheme(&self) -> Scheme {
        if self.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        }
    }

    /// Tells the connector (every client's: they share the table) the server name of each
    /// of `targets`, and keeps those of the `previous` set's (a request that picked one of
    /// them just before the change may still connect), so the table holds two sets at most.
    fn learn_names(&self, targets: &[Arc<Target>], previous: &[Arc<Target>]) {
        if let (Some(settings), Some(tls)) = (&self.tls, &self.upstream_tls) {
            let mut names: Vec<(Authority, ServerName<'static>)> = Vec::new();
            for t in targets.iter().chain(previous) {
                if !names.iter().any(|(a, _)| *a == t.authority) {
                    names.push((t.authority.clone(), server_name(tls, t)));
                }
            }
            settings.names.store(Arc::new(names));
        }
    }
}

/// A pooled keep-alive client; its connection tasks run on the runtime that opens them.
/// HTTP/2 pools (`h2c`, `h2`) speak only HTTP/2: a connection per target carries every
/// stream (up to the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`).
fn new_client(s: &ClientSettings) -> PoolClient {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(s.connect_timeout));
    tcp.set_keepalive(Some(Duration::from_secs(60)));
    let connector = Connector::new(tcp, s.tls.clone(), s.connect_timeout);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(s.idle_timeout)
        .pool_max_idle_per_host(s.max_idle)
        .http2_only(s.protocol.is_h2())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .build(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(balance: Balance) -> UpstreamConfig {
        UpstreamConfig {
            request_timeout: Duration::from_secs(1),
            ..UpstreamConfig::for_tests(balance)
        }
    }

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 10_000 + i)))
            .collect()
    }

    #[tokio::test]
    async fn round_robin_rotates_and_skips_unhealthy() {
        let pool = Pool::new("p", &config(Balance::RoundRobin), addrs(3));
        let picks: Vec<u16> = (0..6)
            .map(|_| pool.pick(b"", None).unwrap().target().addr().port())
            .collect();
        assert_eq!(picks, [10_000, 10_001, 10_002, 10_000, 10_001, 10_002]);
        pool.targets()[1].healthy.store(false, Ordering::Relaxed);
        let picks: Vec<u16> = (0..4)
            .map(|_| pool.pick(b"", None).unwrap().target().addr().port())
            .collect();
        assert!(!picks.contains(&10_001));
    }

    #[tokio::test]
    async fn no_healthy_target_falls_back_to_all() {
        let pool = Pool::new("p", &config(Balance::P2cEwma), addrs(2));
        for t in pool.targets().iter() {
            t.healthy.store(false, Ordering::Relaxed);
        }
        assert!(pool.pick(b"", None).is_some());
    }

    #[tokio::test]
    async fn exclude_moves_a_retry_elsewhere() {
        for balance in [
            Balance::P2cEwma,
            Balance::RoundRobin,
            Balance::ConsistentHash,
        ] {
            let pool = Pool::new("p", &config(balance), addrs(2));
            let first = pool.pick(b"k", None).unwrap();
            let second = pool.pick(b"k", Some(first.target())).unwrap();
            assert_ne!(first.target().addr(), second.target().addr(), "{balance:?}");
            // A one-target pool has nowhere else to go.
            let single = Pool::new("s", &config(balance), addrs(1));
            let only = single.pick(b"k", None).unwrap();
            assert!(single.pick(b"k", Some(only.target())).is_none());
        }
    }

    #[tokio::test]
    async fn p2c_prefers_the_less_loaded_target() {
        let pool = Pool::new("p", &config(Balance::P2cEwma), addrs(2));
        // Hold many requests on the first target: with two targets p2c always compares both.
        let held: Vec<_> = (0..50)
            .map(|_| InFlight::new(pool.targets()[0].clone(), false))
            .collect();
        for _ in 0..20 {
            assert_eq!(pool.pick(b"", None).unwrap().target().addr().port(), 10_001);
        }
        drop(held);
        assert_eq!(pool.targets()[0].in_flight(), 0);
    }

    /// A hot key stays on its target while the target has room (in flight below 125 % of
    /// the average, counting the new request), then spills to the next targets on the ring;
    /// without a bound it all lands on one target.
    #[tokio::test]
    async fn a_load_bound_moves_a_hot_key_off_its_full_target() {
        let mut cfg = config(Balance::ConsistentHash);
        cfg.hash_balance_factor = Some(1.25);
        let bounded = Pool::new("p", &cfg, addrs(4));
        let unbounded = Pool::new("p", &config(Balance::ConsistentHash), addrs(4));
        let hold = |pool: &Pool| -> Vec<InFlight> {
            (0..40).map(|_| pool.pick(b"hot", None).unwrap()).collect()
        };
        let held = hold(&unbounded);
        let home = held[0].target().addr();
        assert!(held.iter().all(|f| f.target().addr() == home && !f.moved()));
        let held = hold(&bounded);
        let home = held[0].target().addr();
        assert!(
            !held[0].moved(),
            "the first request goes to the key's own target"
        );
        let per_target = |addr| held.iter().filter(|f| f.target().addr() == addr).count();
        for t in bounded.targets().iter() {
            // The bound for the 40th request: ⌈1.25 × 40 / 4⌉ = 13.
            assert!(
                per_target(t.addr()) <= 13,
                "{} took {}",
                t.addr(),
                per_target(t.addr())
            );
        }
        assert_eq!(
            per_target(home),
            13,
            "it keeps its own target while there is room"
        );
        assert_eq!(held.iter().filter(|f| f.moved()).count(), 40 - 13);
        drop(held);
        let again = bounded.pick(b"hot", None).unwrap();
        assert_eq!(
            again.target().addr(),
            home,
            "back home once the load is gone"
        );
    }

    #[tokio::test]
    async fn consistent_hash_is_stable_per_key() {
        let pool = Pool::new("p", &config(Balance::ConsistentHash), addrs(4));
        for key in ["alice", "bob", "carol"] {
            let a = pool.pick(key.as_bytes(), None).unwrap().target().addr();
            for _ in 0..10 {
                assert_eq!(pool.pick(key.as_bytes(), None).unwrap().target().addr(), a);
            }
        }
    }

    /// A new set keeps the targets that stay (same `Arc`, same state), drops duplicates,
    /// and `consistent_hash` picks from the new ring only.
    #[tokio::test]
    async fn a_new_target_set_keeps_what_stays_and_rebuilds_the_ring() {
        let pool = Pool::new("p", &config(Balance::ConsistentHash), addrs(3));
        let stays = pool.targets()[1].clone();
        stays.healthy.store(false, Ordering::Relaxed);
        let gone = pool.pick(b"k", None).unwrap();
        let host: Arc<str> = Arc::from("api.internal");
        let new = |port: u16| (host.clone(), SocketAddr::from(([127, 0, 0, 1], port)));
        assert!(pool.set_targets(&[new(10_001), new(10_005), new(10_001)]));
        let set = pool.targets();
        let ports: Vec<u16> = set.iter().map(|t| t.addr().port()).collect();
        assert_eq!(ports, [10_001, 10_005]);
        assert!(Arc::ptr_eq(&set[0], &stays) && !set[0].is_healthy());
        assert_eq!(set[0].host(), "127.0.0.1", "a kept target keeps its host");
        assert_eq!(set[1].host(), "api.internal");
        for key in 0..50u32 {
            let t = pool.pick(&key.to_be_bytes(), None).unwrap();
            assert!(matches!(t.target().addr().port(), 10_001 | 10_005));
        }
        // The same set again is no change.
        assert!(!pool.set_targets(&[new(10_001), new(10_005)]));
        // A request on a removed target ends normally.
        drop(gone);
    }

    #[test]
    fn per_core_threads_use_their_own_client() {
        let pool = Pool::new("p", &config(Balance::RoundRobin), addrs(1)).with_per_core_clients(2);
        let is = |a: &PoolClient, b: &PoolClient| std::ptr::eq(a, b);
        // Not a per-core thread (multi_thread workers, the control runtime).
        assert!(is(pool.client(None), &pool.client));
        assert!(is(pool.client(Some(0)), &pool.per_core[0]));
        assert!(is(pool.client(Some(1)), &pool.per_core[1]));
        // A core the pool has no client for falls back to the shared one.
        assert!(is(pool.client(Some(2)), &pool.client));
    }

    #[test]
    fn ewma_takes_peaks_and_decays() {
        let t = Target::new(Arc::from("127.0.0.1"), addrs(1)[0], Scheme::HTTP);
        t.observe(Duration::from_millis(100));
        assert_eq!(t.ewma_ns.load(Ordering::Relaxed), 100_000_000);
        t.observe(Duration::from_millis(10));
        let after = t.ewma_ns.load(Ordering::Relaxed);
        assert!(after < 100_000_000 && after > 10_000_000);
    }

    #[tokio::test]
    async fn health_checks_flip_after_thresholds() {
        let mut c = config(Balance::RoundRobin);
        c.health_check = Some(HealthCheck {
            unhealthy_after: 2,
            healthy_after: 2,
            ..HealthCheck::default()
        });
        let pool = Pool::new("p", &c, addrs(1));
        let check = c.health_check.unwrap();
        let set = pool.targets();
        let t = &set[0];
        pool.record_probe(t, false, &check);
        assert!(t.is_healthy());
        pool.record_probe(t, false, &check);
        assert!(!t.is_healthy());
        pool.record_probe(t, true, &check);
        assert!(!t.is_healthy());
        pool.record_probe(t, true, &check);
        assert!(t.is_healthy());
    }
}
