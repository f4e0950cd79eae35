//! Wiring: from a decoded config to a running gateway — policy store and engine, upstream
//! pools, the data-plane tower stack, listeners, the admin API, reload triggers and
//! graceful shutdown.
//!
//! The data-plane stack, outermost first (tower-http layers where they exist), under the
//! server's per-connection service (which marks credentials sensitive, tags the connection and
//! paces request bodies; see [`crate::server::serve`]):
//!
//! 1. [`RequestIdLayer`] (`X-Request-Id`, kept when the client sent one, copied onto the
//!    response),
//! 2. `Trace` (one span per request, at `debug`; only when the process log's level shows
//!    `tower_http` at `debug`),
//! 3. [`AccessLayer`] (the access log, when `log.access` is on),
//! 4. [`RoutingLayer`] (404 / 405 here, before admission; tags route and operation),
//! 5. [`BodyLimit`](crate::server::body_limit::BodyLimit) (413 over `limits.max_body`, also for streamed
//!    bodies),
//! 6. `AdmissionLayer` (the engine: 403 / 429 / 503),
//! 7. [`Proxy`].
//!
//! The listeners are served on the caller's runtime (`runtime: multi_thread`) or on per-core
//! threads started here (`runtime: thread_per_core`, see [`crate::server::runtime`]); everything else
//! runs on the caller's runtime.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fairgate_middleware::admin::Admin;
use fairgate_middleware::dashboard::Dashboard;
use fairgate_middleware::observe::{AlertWebhook, DecisionLog};
use fairgate_middleware::{AdmissionLayer, Engine, EngineBuilder};
use fairgate_policies::{PolicyErrors, PolicyStore};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceBuilder;

use crate::config::{LoadedConfig, PolicySource, RuntimeModel, TargetSpec};
use crate::control::access_log::AccessLog;
use crate::control::metrics::Metrics;
use crate::proxy::access::AccessLayer;
use crate::proxy::resolve::{Hickory, Lookup, Resolution, Written};
use crate::proxy::routing::{Route, RouteTable, RoutingLayer};
use crate::proxy::upstream::Pool;
use crate::proxy::Proxy;
use crate::server::body_limit::BodyLimitLayer;
use crate::server::conn_limits::ConnLimits;
use crate::server::debug_trace::DebugTraceLayer;
use crate::server::request_id::RequestIdLayer;
use crate::server::runtime::{self, ListenSpec, Workers};
use crate::server::{self, Sharing};
use crate::tls::{CertificateError, Tls};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The policy is invalid.
    #[error("{0}")]
    Policy(PolicyErrors),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} (the {listener} listener): {source}{hint}", hint = bind_hint(source, *sharing))]
    Bind {
        /// Which listener: `data` or `admin`.
        listener: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Whether it was to share the address (`--reuse-port`).
        sharing: Sharing,
        /// Why.
        source: std::io::Error,
    },
    /// The admin token file could not be read.
    #[error("cannot read the admin token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The admin token file is empty.
    #[error("the admin token file {0} is empty")]
    EmptyToken(String),
    /// A listener's TLS certificate or key cannot be used.
    #[error("cannot use the tls certificate of listener {addr}: {source}")]
    Tls {
        /// The listener's configured address.
        addr: SocketAddr,
        /// Why.
        source: CertificateError,
    },
    /// The `thread_per_core` threads could not be started (runtime, socket or thread).
    #[error("cannot start the per-core threads: {0}")]
    PerCore(#[source] std::io::Error),
    /// The engine cannot start what the policy asks for (e.g. the Redis backend).
    #[error("{0}")]
    Engine(#[from] fairgate_middleware::BuildError),
    /// An `outbound.fleet` block cannot start (its Redis url, or `redis: state` without a
    /// Redis backend in the policy).
    #[error("{0}")]
    OutboundFleet(String),
    /// Something else failed (echo upstream, decision log file).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Test only: `FAIRGATE_TEST_WALL_CLOCK=2026-01-31T23:00:00Z` places the engine's clock at
/// that wall time when the gateway starts (it moves on from there with the engine's own
/// clock), so that an end-to-end test sees a calendar period end without waiting for one.
/// Never set in production; logged as a warning when set, and a value that is not an RFC
/// 3339 UTC time refuses to start rather than be ignored.
fn test_wall_clock(engine: &Engine) -> Result<(), StartError> {
    let Ok(text) = std::env::var("FAIRGATE_TEST_WALL_CLOCK") else {
        return Ok(());
    };
    let at: fairgate_policies::units::Timestamp = text.parse().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("FAIRGATE_TEST_WALL_CLOCK: {e}"),
        )
    })?;
    engine.set_wall_time(at.to_system_time());
    tracing::warn!(
        wall_clock = %text,
        "FAIRGATE_TEST_WALL_CLOCK is set: calendar periods count from this time (tests only)"
    );
    Ok(())
}

/// What an "address in use" means, for the operator.
fn bind_hint(source: &std::io::Error, sharing: Sharing) -> &'static str {
    match (source.kind(), sharing) {
        (std::io::ErrorKind::AddrInUse, Sharing::Exclusive) => {
            "; another process listens there (to share the port with a running fairgate \
             during an upgrade, start this one with --reuse-port)"
        }
        (std::io::ErrorKind::AddrInUse, Sharing::Shared) => {
            "; the process listening there does not share it (SO_REUSEPORT)"
        }
        _ => "",
    }
}

/// How to start: what the command line adds to the config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// Whether the listeners (data and admin) may join sockets already listening on their
    /// addresses (`--reuse-port`, for a zero-downtime upgrade); by default an address
    /// something listens on is an error.
    pub sharing: Sharing,
}

/// A started gateway.
#[derive(Debug)]
pub struct Running {
    /// Bound data-plane addresses.
    pub data_addrs: Vec<SocketAddr>,
    /// Bound admin address.
    pub admin_addr: Option<SocketAddr>,
    /// The engine.
    pub engine: Arc<Engine>,
    stop: watch::Sender<bool>,
    servers: Servers,
    draining: Arc<AtomicBool>,
    grace: Duration,
}

/// Where the data-plane listeners are served.
#[derive(Debug)]
enum Servers {
    /// Tasks on the caller's runtime (`multi_thread`).
    Tasks(JoinSet<()>),
    /// Per-core threads (`thread_per_core`).
    PerCore(Workers),
}

/// Where the last policy file that loaded is kept: `.NAME.last-good` beside the file.
pub fn last_good_path(policy: &std::path::Path) -> std::path::PathBuf {
    let name = policy
        .file_name()
        .map_or_else(|| "policy".into(), |n| n.to_string_lossy().into_owned());
    policy.with_file_name(format!(".{name}.last-good"))
}

/// Starts everything `loaded` describes; returns once every listener is bound. Listeners
/// do not share their addresses (see [`start_with`]).
pub async fn start(loaded: LoadedConfig) -> Result<Running, StartError> {
    start_with(loaded, StartOptions::default()).await
}

/// [`start`] with `options`.
pub async fn start_with(
    loaded: LoadedConfig,
    options: StartOptions,
) -> Result<Running, StartError> {
    let LoadedConfig {
        config,
        inline_policy,
    } = loaded;
    let metrics = Arc::new(Metrics::new());
    let log = DecisionLog::start(&config.log.decision_log())?;
    let access_log = match &config.log.access {
        Some(a) => {
            let access = AccessLog::start(a, metrics.access_log_dropped())?;
            let reopen = access.clone();
            server::on_sigusr1(move || {
                reopen.reopen();
                async {}
            });
            Some(access)
        }
        None => None,
    };

    // Policy and engine.
    let store = match (&config.policy, inline_policy) {
        (PolicySource::File(path), _) => {
            // A last-known-good copy beside the policy file: a restart with a broken file
            // serves the last policy that loaded instead of staying down (SCENARIOS F9).
            let snapshot = last_good_path(path);
            let (store, file_errors) = PolicyStore::from_file_with_snapshot(path, &snapshot)
                .map_err(StartError::Policy)?;
            if let Some(errors) = file_errors {
                tracing::error!(
                    policy = %path.display(),
                    snapshot = %snapshot.display(),
                    "the policy file does not load; serving its last-known-good snapshot until it is fixed:\n{errors}"
                );
            }
            store
        }
        (PolicySource::Inline { config_file }, Some(p)) => {
            PolicyStore::from_policy(p).map_err(|e| {
                StartError::Policy(crate::config::decode::locate_inline(
                    e,
                    &config_file.display().to_string(),
                ))
            })?
        }
        (PolicySource::Inline { config_file }, None) => {
            return Err(StartError::Policy(PolicyErrors::unlocated(
                config_file.display().to_string(),
                "policy: no inline policy was decoded",
            )))
        }
    };
    // The engine and everything its policy asks for (state backend, pruning, file
    // watching) start exactly as they do for an app that embeds the layer.
    let mut builder = EngineBuilder::new(store.clone());
    if let PolicySource::File(path) = &config.policy {
        builder = builder.watch_file(path, fairgate_policies::watch::DEFAULT_DEBOUNCE);
    }
    let engine = builder.start()?;
    test_wall_clock(&engine)?;
    // Audit-mode stamps are the engine's clock, so the audit replays the engine's time.
    let log = log.with_clock(engine.clock().clone());
    // Usage alerts: the sender runs whether or not the policy names alerts now (a reload
    // may add them); idle, it is one parked task.
    let alerts = AlertWebhook::start(
        store.clone(),
        config.alerts.clone(),
        metrics.alerts().clone(),
    );
    let observers = ((metrics.engine().clone(), log.clone()), alerts);
    // The dashboard (with the admin listener) also sees every decision, for drill-downs.
    let dashboard = config
        .admin
        .as_ref()
        .and_then(|a| a.dashboard)
        .map(|c| Dashboard::new(engine.clone(), metrics.engine().clone(), c));
    match &dashboard {
        Some(d) => {
            d.start();
            engine.set_observer(Arc::new((observers, d.clone())));
        }
        None => engine.set_observer(Arc::new(observers)),
    }
    let reload = crate::control::reload::reloader(store.clone(), config.policy.clone());
    {
        let reload = reload.clone();
        server::on_sighup(move || {
            let reload = reload.clone();
            async move {
                tracing::info!("SIGHUP: reloading the policy");
                let _ = tokio::task::spawn_blocking(move || reload()).await;
            }
        });
    }
    // Upstreams.
    let needs_echo = config
        .upstreams
        .values()
        .any(|u| u.targets.contains(&TargetSpec::Echo));
    let echo_addr = if needs_echo {
        Some(crate::proxy::echo::start().await?)
    } else {
        None
    };
    let per_core = match config.runtime {
        RuntimeModel::MultiThread => 0,
        RuntimeModel::ThreadPerCore => config.workers.unwrap_or_else(runtime::default_workers),
    };
    let mut pools = Vec::new();
    let mut by_name = std::collections::HashMap::new();
    // Target names: resolved once here, before anything listens, then as their TTLs say.
    let any_name = config.upstreams.values().any(|u| {
        u.targets
            .iter()
            .any(|t| matches!(t, TargetSpec::Name { .. }))
    });
    let lookup: Option<Arc<dyn Lookup>> = if any_name {
        Some(Arc::new(Hickory::new(&config.resolver)?))
    } else {
        None
    };
    for (name, u) in &config.upstreams {
        let written: Vec<Written> = u
            .targets
            .iter()
            .filter_map(|t| match t {
                TargetSpec::Addr(a) => Some(Written::Addr(*a)),
                TargetSpec::Echo => echo_addr.map(Written::Addr),
                TargetSpec::Name { host, port } => Some(Written::Name {
                    host: Arc::from(host.as_str()),
                    port: *port,
                }),
            })
            .collect();
        let addrs = written
            .iter()
            .filter_map(|w| match w {
                Written::Addr(a) => Some(*a),
                Written::Name { .. } => None,
            })
            .collect();
        let pool = Arc::new(Pool::new(name, u, addrs).with_per_core_clients(per_core));
        let (failures, targets) = metrics.upstream_resolution(pool.name());
        targets.set(i64::try_from(pool.targets().len()).unwrap_or(i64::MAX));
        if let Some(lookup) = lookup
            .as_ref()
            .filter(|_| written.iter().any(|w| matches!(w, Written::Name { .. })))
        {
            let mut resolution = Resolution::new(
                pool.clone(),
                written,
                lookup.clone(),
                &config.resolver,
                failures,
                targets,
            );
            resolution.resolve_due().await;
            tokio::spawn(resolution.run());
        }
        if u.health_check.is_some() {
            tokio::spawn(pool.clone().run_health_checks());
        }
        by_name.insert(name.clone(), pool.clone());
        pools.push(pool);
    }
    let routes = config
        .routes
        .iter()
        .filter_map(|r| {
            let pool = by_name.get(&r.upstream)?.clone();
            Some(Route::new(
                &r.name,
                r.host.as_deref(),
                &r.path_prefix,
                r.methods.clone(),
                pool,
                r.operation.as_deref(),
                r.timeout,
            ))
        })
        .collect();
    let table = Arc::new(RouteTable::new(routes));

    // The data-plane stack, over `proxy` (each per-core thread has its own); the layers'
    // state (request-id counter, routes, engine) is shared by every stack.
    let max_body = usize::try_from(config.limits.max_body).unwrap_or(usize::MAX);
    let request_ids = RequestIdLayer::new(fastrand::u32(..));
    // tower-http's per-request span, only when the process log shows it (read once, here).
    let trace = DebugTraceLayer::new();
    let stack = |proxy: Proxy| {
        ServiceBuilder::new()
            .layer(request_ids.clone())
            .layer(trace.clone())
            .layer(AccessLayer::new(access_log.clone(), table.clone()))
            .layer(RoutingLayer::new(table.clone()))
            .layer(BodyLimitLayer::new(max_body))
            .layer(AdmissionLayer::new(engine.clone()))
            .service(proxy)
    };
    let fleets = outbound_fleets(&config, &store)?;
    let proxy = Proxy::with_fleets(&pools, &metrics, &fleets);

    // Listeners: load certificates and bind everything before serving anything. These
    // sockets resolve port 0; under thread_per_core they are the first thread's, and the
    // other threads bind the resolved addresses.
    let mut listeners = Vec::new();
    let mut specs = Vec::new();
    for l in &config.listen {
        let tls = match &l.tls {
            None => None,
            Some(t) => Some(
                Tls::load(t.certs.clone(), config.limits.handshake_timeout).map_err(|source| {
                    StartError::Tls {
                        addr: l.address,
                        source,
                    }
                })?,
            ),
        };
        let bind_error = |source| StartError::Bind {
            listener: "data",
            addr: l.address,
            sharing: options.sharing,
            source,
        };
        let socket = server::bind_std(l.address, options.sharing).map_err(bind_error)?;
        let addr = socket.local_addr().map_err(bind_error)?;
        listeners.push(socket);
        specs.push(ListenSpec { addr, tls });
    }
    let data_addrs: Vec<SocketAddr> = specs.iter().map(|s| s.addr).collect();
    // Certificate reloads: the files are watched, and SIGHUP reloads them with the policy.
    let tls_listeners: Vec<(SocketAddr, Tls)> = specs
        .iter()
        .filter_map(|s| Some((s.addr, s.tls.clone()?)))
        .collect();
    if !tls_listeners.is_empty() {
        let certs = crate::control::certs::CertReload::new(tls_listeners, &metrics);
        certs.watch()?;
        server::on_sighup(move || {
            let certs = certs.clone();
            async move {
                tracing::info!("SIGHUP: reloading the listeners' certificates");
                let _ = tokio::task::spawn_blocking(move || certs.reload_all()).await;
            }
        });
    }
    let draining = Arc::new(AtomicBool::new(false));
    let admin_addr = match &config.admin {
        None => None,
        Some(a) => {
            let token = match (&a.token, &a.token_file) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(path)) => {
                    let t =
                        std::fs::read_to_string(path).map_err(|source| StartError::TokenFile {
                            path: path.display().to_string(),
                            source,
                        })?;
                    let t = t.trim().to_owned();
                    if t.is_empty() {
                        return Err(StartError::EmptyToken(path.display().to_string()));
                    }
                    Some(t)
                }
                (None, None) => None,
            };
            let listener =
                server::bind(a.listen, options.sharing).map_err(|source| StartError::Bind {
                    listener: "admin",
                    addr: a.listen,
                    sharing: options.sharing,
                    source,
                })?;
            let addr = listener.local_addr()?;
            let mut admin = Admin::new(engine.clone())
                .draining(draining.clone())
                .reload(reload.clone())
                .metrics_with({
                    let (metrics, engine, log) = (metrics.clone(), engine.clone(), log.clone());
                    Arc::new(move |format| metrics.encode_as(format, &engine, &log))
                });
            if let Some(token) = token {
                admin = admin.token(token);
            }
            admin = admin.decision_log(log.clone());
            if let Some(d) = dashboard.clone() {
                admin = admin.dashboard(d);
            }
            let router = admin.router();
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!(error = %e, "admin server failed");
                }
            });
            Some(addr)
        }
    };

    let builder = Arc::new(server::http_builder(&config.limits));
    // One per-source table for every listener and thread.
    let conn_limits = ConnLimits::new(&config.limits, metrics.client_counters());
    let (stop, stop_rx) = watch::channel(false);
    let servers = match config.runtime {
        RuntimeModel::MultiThread => {
            let stack = stack(proxy);
            let mut servers = JoinSet::new();
            for (socket, spec) in listeners.into_iter().zip(specs) {
                let listener = tokio::net::TcpListener::from_std(socket)?;
                servers.spawn(server::serve(
                    listener,
                    stack.clone(),
                    builder.clone(),
                    spec.tls,
                    conn_limits.clone(),
                    stop_rx.clone(),
                ));
            }
            Servers::Tasks(servers)
        }
        RuntimeModel::ThreadPerCore => {
            let workers = Workers::start(
                per_core,
                &specs,
                listeners,
                |core| stack(proxy.for_core(core)),
                builder,
                &conn_limits,
                &stop_rx,
            )
            .map_err(StartError::PerCore)?;
            tracing::info!(
                threads = workers.len(),
                "thread_per_core: serving on per-core threads"
            );
            Servers::PerCore(workers)
        }
    };
    Ok(Running {
        data_addrs,
        admin_addr,
        engine,
        stop,
        servers,
        draining,
        grace: config.shutdown_grace,
    })
}

impl Running {
    /// The machine-readable startup line: `fairgate listening data=ADDR[,ADDR] admin=ADDR|none`.
    pub fn listening_line(&self) -> String {
        let data: Vec<String> = self.data_addrs.iter().map(ToString::to_string).collect();
        let admin = self
            .admin_addr
            .map_or_else(|| "none".to_owned(), |a| a.to_string());
        format!("fairgate listening data={} admin={admin}", data.join(","))
    }

    /// Stops accepting, lets in-flight requests finish within the grace period, and returns.
    /// `/health` answers 503 from the moment this is called.
    pub async fn shutdown(self) {
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.stop.send(true);
        let grace = self.grace;
        let drained = match self.servers {
            Servers::Tasks(mut servers) => {
                let drained = tokio::time::timeout(grace, async {
                    while servers.join_next().await.is_some() {}
                })
                .await
                .is_ok();
                if !drained {
                    servers.abort_all();
                }
                drained
            }
            Servers::PerCore(workers) => workers.drain(grace).await,
        };
        if drained {
            tracing::info!("drained; exiting");
        } else {
            tracing::warn!(
                grace_s = grace.as_secs_f64(),
                "grace period over; closing the remaining connections"
            );
        }
    }
}

/// One `OutboundFleet` per Redis the pools' `outbound.fleet` blocks name (pools naming the
/// same settings share it: one connection, one registration), by pool name.
fn outbound_fleets(
    config: &crate::config::GatewayConfig,
    store: &PolicyStore,
) -> Result<
    std::collections::HashMap<String, fairgate_middleware::outbound::OutboundFleet>,
    StartError,
> {
    use crate::config::FleetRedis;
    use fairgate_middleware::outbound::OutboundFleet;
    let state = store.load().state.clone();
    let mut made: Vec<(fairgate_policies::model::RedisState, OutboundFleet)> = Vec::new();
    let mut by_pool = std::collections::HashMap::new();
    for (name, u) in &config.upstreams {
        let Some(f) = u.outbound.as_ref().and_then(|o| o.fleet.as_ref()) else {
            continue;
        };
        let settings = match &f.redis {
            FleetRedis::Own(s) => s.clone(),
            FleetRedis::State => state
                .redis
                .clone()
                .filter(|_| state.backend == fairgate_policies::model::Backend::Redis)
                .ok_or_else(|| {
                    StartError::OutboundFleet(format!(
                        "upstreams.{name}.outbound.fleet.redis: `state` names the policy's \
                         `state.redis`, and the policy has no `state.backend: redis`"
                    ))
                })?,
        };
        let fleet = match made.iter().find(|(s, _)| *s == settings) {
            Some((_, f)) => f.clone(),
            None => {
                let f = OutboundFleet::connect(&settings).map_err(|e| {
                    StartError::OutboundFleet(format!("upstreams.{name}.outbound.fleet: {e}"))
                })?;
                made.push((settings, f.clone()));
                f
            }
        };
        by_pool.insert(name.clone(), fleet);
    }
    Ok(by_pool)
}
