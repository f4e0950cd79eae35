//! The gateway config as the user writes it (`gateway.yaml`), after decoding.
//!
//! Every field is the YAML key of the same name; defaults are stated on each field and are
//! what [`Default`] (or the decoder, for absent keys) gives. `docs/gateway.md` documents the
//! same keys with a worked example; keep the two in step.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fairgate_middleware::outbound::KeyBy;
use fairgate_policies::units::Rate;
use http::header::HeaderName;
use http::{Method, StatusCode};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;

pub use crate::upstream_tls::UpstreamProtocol;

/// The whole gateway config file.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Data-plane listeners (`listen: 127.0.0.1:8080`, or a list of addresses and
    /// `{address, tls}` maps). Port 0 picks a free port.
    pub listen: Vec<ListenerConfig>,
    /// The admin API. Absent: no admin listener.
    pub admin: Option<AdminConfig>,
    /// Worker threads (default: number of cores): the multi-thread runtime's workers, or the
    /// number of per-core threads under `thread_per_core`.
    pub workers: Option<usize>,
    /// How the data plane uses threads (default `thread_per_core`).
    pub runtime: RuntimeModel,
    /// How long in-flight requests may run after SIGTERM/SIGINT (default 10s).
    pub shutdown_grace: Duration,
    /// Routes, first match wins.
    pub routes: Vec<RouteConfig>,
    /// Upstream pools by name.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Request limits.
    pub limits: Limits,
    /// Where the admission policy comes from.
    pub policy: PolicySource,
    /// Logging and the decision log.
    pub log: LogConfig,
    /// The usage-alert sender's limits (`alerts:`; the alerts themselves are the policy's).
    pub alerts: fairgate_middleware::observe::AlertConfig,
    /// How upstream target names are resolved (`resolver:`).
    pub resolver: ResolverConfig,
}

/// How upstream target names are resolved (`resolver:`; used only when a target is a name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverConfig {
    /// DNS servers to ask (UDP, then TCP for truncated answers). Absent: those of
    /// `/etc/resolv.conf` (with its search domains and options).
    pub nameservers: Option<Vec<SocketAddr>>,
    /// A name is not re-resolved sooner than this after an answer, whatever its TTL
    /// (default 1s); also the wait before retrying a name that did not resolve.
    pub min_ttl: Duration,
    /// A name is re-resolved at the latest this long after an answer, whatever its TTL
    /// (default 5m).
    pub max_ttl: Duration,
    /// Time for one resolution, every server and retry included (default 2s).
    pub timeout: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            nameservers: None,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            timeout: Duration::from_secs(2),
        }
    }
}

/// One data-plane listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Address to bind (`address:`, or the whole entry when it is a plain address).
    pub address: SocketAddr,
    /// TLS termination. Absent: plain HTTP/1.1 and h2c.
    pub tls: Option<TlsConfig>,
}

impl ListenerConfig {
    /// A plain-HTTP listener on `address`.
    pub fn plain(address: SocketAddr) -> ListenerConfig {
        ListenerConfig { address, tls: None }
    }
}

/// A listener's certificates (`tls: {cert, key}` for one, `tls: {certs: [{cert, key}, …]}`
/// for several), PEM files whose relative paths are relative to the gateway config file.
/// The certificate for a handshake is chosen by the client's SNI; the first is the default
/// (see [`crate::tls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// At least one certificate, in the configured order.
    pub certs: Vec<crate::tls::CertificateFiles>,
}

/// How the data plane uses threads. The default, `thread_per_core`, was measured to use less
/// CPU per request than `multi_thread` (see `docs/gateway.md`, "Runtime model").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RuntimeModel {
    /// One multi-thread tokio runtime with `workers` threads; every listener is one socket and
    /// tasks move between threads (work stealing).
    MultiThread,
    /// `workers` OS threads, each with a current-thread tokio runtime and its own
    /// `SO_REUSEPORT` socket per listen address; the kernel spreads connections over them and
    /// a connection stays on its thread. Admin API, reloads and health checks run on a
    /// separate control thread.
    #[default]
    ThreadPerCore,
}

/// The admin listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Listen address (default `127.0.0.1:9090`). Non-loopback needs `allow_remote` and a token.
    pub listen: SocketAddr,
    /// Bearer token required on every admin endpoint except `/health`.
    pub token: Option<String>,
    /// Read the token from this file instead (trailing whitespace trimmed).
    pub token_file: Option<PathBuf>,
    /// Permit a non-loopback `listen` (default false; a token is then mandatory).
    pub allow_remote: bool,
    /// The live dashboard at `/dashboard` and the history it keeps (default: on, one hour
    /// at 5 s); `None` with `dashboard: false`.
    pub dashboard: Option<fairgate_middleware::dashboard::DashboardConfig>,
}

/// One route.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Name used in logs (default `route<index>`).
    pub name: String,
    /// Host to match (exact, or `*.example.com`), case-insensitive, port ignored. Absent: any.
    pub host: Option<String>,
    /// Path prefix to match (default `/`).
    pub path_prefix: String,
    /// Methods to match. Absent: any.
    pub methods: Option<Vec<Method>>,
    /// The upstream pool to send to.
    pub upstream: String,
    /// The operation name handed to the admission engine (quota cost, rules).
    pub operation: Option<String>,
    /// Time to the upstream's response head; overrides the pool's `request_timeout`.
    pub timeout: Option<Duration>,
}

/// One upstream pool.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Targets: `ip:port`, `name:port` or `builtin:echo`.
    pub targets: Vec<TargetSpec>,
    /// How a target is picked per request (default `p2c_ewma`).
    pub balance: Balance,
    /// Key of `consistent_hash` (default `client`).
    pub hash_key: HashKey,
    /// Bounded load for `consistent_hash`: no target takes a request while its in-flight
    /// count would pass this factor × the pool's average (`1.25` for `125%`); a key whose
    /// target is full moves to the next target on the ring. Absent: unbounded.
    pub hash_balance_factor: Option<f64>,
    /// Active health checks. Absent: every target is always considered healthy.
    pub health_check: Option<HealthCheck>,
    /// TCP connect timeout (default 1s).
    pub connect_timeout: Duration,
    /// Time to the response head (default 30s); a route's `timeout` overrides it.
    pub request_timeout: Duration,
    /// How long an idle keep-alive connection to a target stays open (default 90s).
    pub idle_timeout: Duration,
    /// Most idle keep-alive connections kept per target (default 1024; 0: none are kept).
    pub max_idle: usize,
    /// Outbound layers towards the pool (coalesce, cache, rate/concurrency, retry); see
    /// [`crate::proxy::outbound`]. Absent: requests go straight to the pool.
    pub outbound: Option<OutboundConfig>,
    /// How the pool's connections speak HTTP: `http1` (default), `h2c` (HTTP/2 with prior
    /// knowledge, no TLS) or `h2` (HTTP/2 over TLS, agreed by ALPN).
    pub protocol: UpstreamProtocol,
    /// TLS to the targets. Absent: plain TCP.
    pub tls: Option<UpstreamTls>,
}

#[cfg(test)]
impl UpstreamConfig {
    /// The tests' pool: no targets, `balance`, keyed by peer, HTTP/1.1, 1 s to connect, 5 s
    /// to the response head, 90 s idle, 1,024 idle connections; no health check, outbound
    /// layers or TLS.
    pub(crate) fn for_tests(balance: Balance) -> UpstreamConfig {
        UpstreamConfig {
            targets: Vec::new(),
            balance,
            hash_key: HashKey::Peer,
            hash_balance_factor: None,
            health_check: None,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(90),
            max_idle: 1024,
            outbound: None,
            protocol: UpstreamProtocol::Http1,
            tls: None,
        }
    }
}

/// A pool's `tls:` block, with its rustls client config built when the file was decoded.
#[derive(Clone)]
pub struct UpstreamTls {
    /// The roots' PEM file (`ca`). Absent: the system trust store.
    pub ca: Option<PathBuf>,
    /// The name every target's certificate is checked against, and the SNI (`server_name`).
    /// Absent: the target's host (see [`crate::upstream_tls::server_name`]).
    pub server_name: Option<ServerName<'static>>,
    /// The client certificate chain and its key (`cert`, `key`), for upstreams that ask.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The rustls client config of these settings and the pool's protocol (its ALPN).
    pub config: Arc<ClientConfig>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("ca", &self.ca)
            .field("server_name", &self.server_name)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

/// An upstream target as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// A plain-HTTP target at an IP address.
    Addr(SocketAddr),
    /// A host name and port (`api.internal:8080`): every address the name resolves to is a
    /// target, re-resolved as its answer's TTL says (see `proxy/resolve.rs`).
    Name {
        /// The host name, lowercase, without a trailing dot.
        host: String,
        /// The port.
        port: u16,
    },
    /// The in-process demo upstream (see [`crate::proxy::echo`]).
    Echo,
}

/// Target selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Power of two choices over in-flight × peak-EWMA latency.
    #[default]
    P2cEwma,
    /// Strict rotation.
    RoundRobin,
    /// Ketama consistent hashing (pingora-ketama) of `hash_key`.
    ConsistentHash,
}

/// What `consistent_hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HashKey {
    /// The TCP peer's IP address (`peer`).
    #[default]
    Peer,
    /// The value of this request header (missing: the empty string).
    Header(HeaderName),
}

/// Active health checks.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// Time between checks (default 5s).
    pub interval: Duration,
    /// Path to `GET` (default `/health`); 2xx and 3xx are healthy.
    pub path: String,
    /// Timeout of one check (default 1s).
    pub timeout: Duration,
    /// Consecutive failures before a target is taken out (default 3).
    pub unhealthy_after: u32,
    /// Consecutive successes before it is put back (default 1).
    pub healthy_after: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(5),
            path: "/health".to_owned(),
            timeout: Duration::from_secs(1),
            unhealthy_after: 3,
            healthy_after: 1,
        }
    }
}

/// `limits.max_connections_per_source: off`: no cap (connections are still counted per
/// source, so the table is bounded by the open connections).
pub const NO_SOURCE_CAP: NonZeroU32 = NonZeroU32::MAX;

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request head in bytes (default 64KiB, at least 8KiB); larger gets 431.
    pub max_header_bytes: usize,
    /// Most request headers (default 100); more gets 431.
    pub max_headers: usize,
    /// Largest request body (default 10MiB); larger gets 413.
    pub max_body: u64,
    /// Time allowed to receive a request head (default 10s); then the connection closes.
    pub header_read_timeout: Duration,
    /// Time allowed for a TLS handshake (default 10s); then the connection closes.
    pub handshake_timeout: Duration,
    /// HTTP/2 connection limits (`limits.http2:`).
    pub http2: Http2Limits,
    /// At most this many open connections from one source (an IPv4 address or an IPv6 /64);
    /// one more is closed right after `accept` (see [`crate::server::conn_limits`]). Default `off`
    /// ([`NO_SOURCE_CAP`]): behind a load balancer every client shares its address.
    pub max_connections_per_source: NonZeroU32,
    /// The slowest a request body may arrive (default 10KiB per 10s; `off`: no minimum);
    /// slower fails the request with 408 (see [`crate::server::conn_limits`]).
    pub body_min_rate: Option<BodyMinRate>,
    /// How long the client may accept no response bytes while the gateway has some to
    /// write (default 30s); then the connection closes.
    pub write_timeout: Duration,
}

/// A minimum request-body rate: at least `bytes` bytes in every `per` window the gateway
/// spends waiting for the body (`limits.body_min_rate: {bytes: 10KiB, per: 10s}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyMinRate {
    /// Bytes each window must deliver (at least 1).
    pub bytes: u64,
    /// The window (greater than zero).
    pub per: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body: 10 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            http2: Http2Limits::default(),
            max_connections_per_source: NO_SOURCE_CAP,
            body_min_rate: Some(BodyMinRate {
                bytes: 10 * 1024,
                per: Duration::from_secs(10),
            }),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Where the policy is.
#[derive(Debug, Clone)]
pub enum PolicySource {
    /// A policy file (relative paths are relative to the gateway config file).
    File(PathBuf),
    /// A policy written inline under `policy:`; reloads re-read the gateway config file
    /// and take its `policy` section.
    Inline {
        /// The gateway config file it is in.
        config_file: PathBuf,
    },
}

/// Logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Where decision-log lines go (default `stdout`).
    pub decisions: DecisionTarget,
    /// Fraction of admitted requests logged, in [0, 1] (default 0.01).
    pub sample_admits: f64,
    /// Rejection lines per rule per second before they are summarised (default 10).
    pub max_rejections_per_rule: u32,
    /// Complete mode for `fairgate audit` (default false): every decision is written, at
    /// decision time, with a monotonic `mono_ns`; nothing is sampled, summarised or dropped
    /// (a full channel blocks the request instead). `sample_admits` and
    /// `max_rejections_per_rule` are then ignored.
    pub audit: bool,
    /// Process log format on stderr (default `pretty`).
    pub format: LogFormat,
    /// Process log filter, `tracing` env-filter syntax (default `info`; `RUST_LOG` wins).
    pub level: String,
    /// The access log: one line per request (absent: off).
    pub access: Option<AccessLogConfig>,
}

/// The access log (`log.access`): one line per request, written off the request path.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    /// Where lines go: a file (relative to the gateway config file), or stdout.
    pub target: AccessTarget,
    /// Line format (default `json`).
    pub format: AccessFormat,
    /// Lines queued for the writer at most; a line past it is dropped and counted
    /// (default 10,000).
    pub buffer: usize,
}

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessTarget {
    /// Standard output.
    Stdout,
    /// A file, appended to; reopened on SIGUSR1 (rotation).
    File(PathBuf),
}

/// An access-log line's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessFormat {
    /// One JSON object per line.
    Json,
    /// The Common Log Format (NCSA).
    Common,
    /// The Combined Log Format (Common plus referer and user agent).
    Combined,
}

impl Default for LogConfig {
    fn default() -> Self {
        // The decision log's defaults are the middleware's, stated once.
        let d = fairgate_middleware::observe::DecisionLogConfig::default();
        LogConfig {
            decisions: d.decisions,
            sample_admits: d.sample_admits,
            max_rejections_per_rule: d.max_rejections_per_rule,
            audit: d.audit,
            format: LogFormat::Pretty,
            level: "info".to_owned(),
            access: None,
        }
    }
}

pub use fairgate_middleware::observe::DecisionTarget;

impl LogConfig {
    /// The decision log's part of this section.
    pub fn decision_log(&self) -> fairgate_middleware::observe::DecisionLogConfig {
        fairgate_middleware::observe::DecisionLogConfig {
            decisions: self.decisions.clone(),
            sample_admits: self.sample_admits,
            max_rejections_per_rule: self.max_rejections_per_rule,
            audit: self.audit,
        }
    }
}

/// Process log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// HTTP/2 connection limits (`limits.http2:`), applied to hyper's HTTP/2 server on every
/// listener (h2c and h2 over TLS). The defaults are the hardened ones: they bound what one
/// connection can make the gateway do against rapid-reset, reset-provoking and stream-flood
/// attacks (CVE-2023-44487, RUSTSEC-2024-0003). See `docs/gateway.md`, "HTTP/2 limits".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Limits {
    /// Streams a client may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`, default
    /// 100, 1..=10000); a stream beyond it is refused with `REFUSED_STREAM`.
    pub max_concurrent_streams: u32,
    /// Largest decoded header list of one request (`SETTINGS_MAX_HEADER_LIST_SIZE`, 1KiB..16MiB).
    /// Absent (the default): `limits.max_header_bytes`, see
    /// [`Http2Limits::header_list_size`].
    pub max_header_list_size: Option<u32>,
    /// Streams the client may reset before the gateway has accepted them; one more and the
    /// connection gets `GOAWAY(ENHANCE_YOUR_CALM)` (default 20, h2's; 1..=10000).
    pub max_pending_accept_reset_streams: usize,
    /// Streams the gateway may reset because the client misbehaved on them; one more and the
    /// connection gets `GOAWAY` (default 1024, hyper's; 1..=1000000).
    pub max_local_error_reset_streams: usize,
    /// Interval of the gateway's keep-alive PINGs. Absent (the default): no PINGs.
    pub keep_alive_interval: Option<Duration>,
    /// Time a keep-alive PING may go unanswered before the connection is closed (absent:
    /// hyper's 20s; only with `keep_alive_interval`).
    pub keep_alive_timeout: Option<Duration>,
    /// Initial flow-control window of each stream (`SETTINGS_INITIAL_WINDOW_SIZE`, 1KiB..1GiB).
    /// Absent (the default): hyper's 1MiB.
    pub initial_stream_window: Option<u32>,
    /// Initial flow-control window of the connection (64KiB..1GiB). Absent (the default):
    /// hyper's 1MiB.
    pub initial_connection_window: Option<u32>,
    /// Response bytes buffered per stream for a client that does not read (1KiB..1GiB).
    /// Absent (the default): hyper's (about 400KiB).
    pub max_send_buf_size: Option<u32>,
}

impl Http2Limits {
    /// The header-list limit to advertise: [`Http2Limits::max_header_list_size`], else
    /// `max_header_bytes` (saturated to `u32`).
    pub fn header_list_size(&self, max_header_bytes: usize) -> u32 {
        self.max_header_list_size
            .unwrap_or_else(|| u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
    }
}

impl Default for Http2Limits {
    fn default() -> Self {
        Http2Limits {
            max_concurrent_streams: 100,
            max_header_list_size: None,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
            keep_alive_interval: None,
            keep_alive_timeout: None,
            initial_stream_window: None,
            initial_connection_window: None,
            max_send_buf_size: None,
        }
    }
}

// === outbound ===

/// A pool's `outbound:` block. Absent keys: that layer is off.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundConfig {
    /// Coalesce identical concurrent `GET`/`HEAD` requests (`coalesce: true` or a map).
    pub coalesce: Option<CoalesceSettings>,
    /// Cache responses of `GET`/`HEAD` requests.
    pub cache: Option<CacheSettings>,
    /// Outbound rate (`100/s`, or `{rate: 100/s, burst: 20, key: {header: x-region}}`).
    pub rate: Option<RateSettings>,
    /// Most requests in flight to the pool (per key when `rate.key` is a header).
    pub concurrency: Option<u32>,
    /// The wait queue in front of `rate` and `concurrency` (default `{max: 1000, timeout: 2s}`).
    pub queue: QueueSettings,
    /// Retries on upstream 429/503 and connect failures.
    pub retry: Option<RetrySettings>,
    /// Status of a request refused locally (default 503; 429 also accepted).
    pub throttle_status: StatusCode,
    /// Fleet mode: `rate`, `concurrency` and `cache` held for every gateway on one Redis.
    pub fleet: Option<FleetSettings>,
}

/// `fleet:` settings of an `outbound:` block.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSettings {
    /// Which Redis.
    pub redis: FleetRedis,
    /// The limits' and cache's name in Redis (default: the pool's name).
    pub name: Option<String>,
    /// How long the gateway fetching a key holds its lease (default 2s).
    pub lease: Duration,
    /// The longest a request waits for another gateway's fetch (default 5s).
    pub max_wait: Duration,
}

/// Where a fleet-mode `outbound:` block keeps its state.
#[derive(Debug, Clone, PartialEq)]
pub enum FleetRedis {
    /// `redis: state`: the policy's `state.redis` (url, timeout, key_prefix).
    State,
    /// `redis: {url, timeout, key_prefix}`.
    Own(fairgate_policies::model::RedisState),
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            fleet: None,
            coalesce: None,
            cache: None,
            rate: None,
            concurrency: None,
            queue: QueueSettings::default(),
            retry: None,
            throttle_status: StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// `coalesce:` settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CoalesceSettings {
    /// More request headers in the key.
    pub headers: Vec<HeaderName>,
    /// Largest shared response body (default 1MiB).
    pub max_body: Option<u64>,
}

/// `cache:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    /// TTL of paths no `routes` entry matches (default 1s).
    pub ttl: Duration,
    /// TTL per path prefix (longest wins).
    pub routes: Vec<(String, Duration)>,
    /// Most entries (default 10000).
    pub max_entries: u64,
    /// Most bytes (default 64MiB).
    pub max_bytes: u64,
    /// Largest body stored (default 1MiB).
    pub max_entry_bytes: u64,
    /// Let responses' `Cache-Control` keep them out or shorten their TTL (default false).
    pub honour_cache_control: bool,
    /// More request headers in the key.
    pub vary: Vec<HeaderName>,
    /// Paths fetched with `GET` at start.
    pub warm_up: Vec<String>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            ttl: Duration::from_secs(1),
            routes: Vec::new(),
            max_entries: 10_000,
            max_bytes: 64 << 20,
            max_entry_bytes: 1 << 20,
            honour_cache_control: false,
            vary: Vec::new(),
            warm_up: Vec::new(),
        }
    }
}

/// `rate:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RateSettings {
    /// The rate.
    pub rate: Rate,
    /// Burst (default: the rate's count).
    pub burst: Option<u64>,
    /// What the rate and concurrency are kept per (default the whole pool).
    pub key: KeyBy,
}

/// `queue:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    /// Most waiting requests (default 1000).
    pub max: u64,
    /// Longest wait (default 2s).
    pub timeout: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            max: 1000,
            timeout: Duration::from_secs(2),
        }
    }
}

/// `retry:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    /// Statuses retried (default 429 and 503).
    pub statuses: Vec<StatusCode>,
    /// Retry connect failures (default true; `connect` in `on`).
    pub connect: bool,
    /// Attempts in all (default 3).
    pub max_attempts: u32,
    /// Backoff base (default 50ms).
    pub base: Duration,
    /// Backoff cap (default 2s).
    pub max_backoff: Duration,
    /// Longest `Retry-After` waited for (default 10s).
    pub max_retry_after: Duration,
    /// Retries as a fraction of requests (default 0.1, written `10%`).
    pub budget: f32,
    /// Retries allowed per second regardless (default 10).
    pub min_per_sec: u32,
    /// Retry non-idempotent methods with an empty body too (default false).
    pub non_idempotent: bool,
    /// Client-side adaptive throttling.
    pub adaptive: Option<AdaptiveSettings>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            statuses: vec![
                StatusCode::TOO_MANY_REQUESTS,
                StatusCode::SERVICE_UNAVAILABLE,
            ],
            connect: true,
            max_attempts: 3,
            base: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(10),
            budget: 0.1,
            min_per_sec: 10,
            non_idempotent: false,
            adaptive: None,
        }
    }
}

/// `retry.adaptive:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveSettings {
    /// The multiplier `K` (default 2).
    pub k: f64,
    /// The window (default 60s).
    pub window: Duration,
}

impl Default for AdaptiveSettings {
    fn default() -> Self {
        AdaptiveSettings {
            k: 2.0,
            window: Duration::from_secs(60),
        }
    }
}
