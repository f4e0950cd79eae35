//! The admin endpoints as an axum [`Router`], for the gateway's admin listener and for an
//! app that embeds the layer (feature `admin`): nest it behind the app's own auth, or give
//! it a bearer token.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/health` | 200 `ok` while serving (`degraded` while Redis is unreachable), 503 while draining (no token needed) |
//! | GET | `/status` | version, policy version and hash, last reload, uptime |
//! | GET | `/policy` | the active policy as JSON |
//! | POST | `/reload` | reload the policy now |
//! | GET | `/metrics` | Prometheus text 0.0.4, or OpenMetrics when `Accept` prefers it (when metrics are given) |
//! | GET | `/clients/top?n=20` | clients using the largest share of a quota |
//! | GET | `/clients/{key}` | one client's usage, remaining quota, limits, in flight, its self-set `cap` (the plan it is charged to; 404 when no plan applies and it has no state) |
//! | PUT | `/clients/{key}/override` | set a client's override (persisted, applied live; `expires_in: 1h` makes it lapse by itself) |
//! | DELETE | `/clients/{key}/override` | clear a client's override (persisted, applied live) |
//! | POST | `/clients/{key}/reset` | refill a client's quota buckets (local state only) |
//! | GET | `/dashboard` | the live dashboard page (feature `dashboard`; the page holds no data, every request it makes needs the token) |
//! | GET | `/dashboard/data` | what the dashboard draws, as JSON |
//! | GET | `/dashboard/clients/{key}` | one client's usage, history and recent decisions |
//!
//! Operator actions (override set or cleared, reset) are written to the process log and,
//! when the admin is given the decision log, as `action` lines in it.
//!
//! With a token configured, every endpoint but `/health` needs `Authorization: Bearer
//! <token>` (compared in constant time); otherwise 401. Mutating endpoints accept only
//! POST/PUT (405 otherwise). At most 16 admin requests run at once; more get 503, so a
//! flood of admin calls cannot starve the data plane.
//!
//! ```no_run
//! # fn run(layer: &fairgate_middleware::AdmissionLayer) {
//! use std::sync::Arc;
//! use fairgate_middleware::admin::Admin;
//! use fairgate_middleware::observe::EngineMetrics;
//! use fairgate_middleware::observe::prometheus_client::registry::Registry;
//!
//! let mut registry = Registry::default();
//! let metrics = EngineMetrics::register(&mut registry);
//! layer.engine().set_observer(metrics.clone());
//! let admin: axum::Router = Admin::new(layer.engine().clone())
//!     .token("s3cret")
//!     .metrics(Arc::new(registry), metrics)
//!     .router();
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use fairgate_policies::model::ClientOverride;
use fairgate_policies::yaml::{self, Node, NodeKind, ScalarStyle};
use fairgate_policies::{PolicyErrors, ReloadReport};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{Mutex, Semaphore};

use crate::clock::rfc3339;
use crate::engine::Engine;
use crate::observe::{usage_json, EngineMetrics, Format};

const MAX_CONCURRENT: usize = 16;
const MAX_TOP: usize = 1000;

/// A policy reload as `POST /reload` and override writes run it (blocking: file I/O and
/// compilation). The default re-reads the policy file ([`PolicyStore::reload`](fairgate_policies::PolicyStore::reload)).
pub type ReloadFn = Arc<dyn Fn() -> Result<ReloadReport, PolicyErrors> + Send + Sync>;

/// Encodes the metrics endpoint's body in a format (refreshing what it mirrors first).
pub type MetricsFn = Arc<dyn Fn(Format) -> String + Send + Sync>;

/// The admin endpoints of one engine: configure, then build the [`router`](Self::router).
pub struct Admin {
    engine: Arc<Engine>,
    token: Option<String>,
    draining: Arc<AtomicBool>,
    reload: ReloadFn,
    metrics: Option<MetricsFn>,
    #[cfg(feature = "dashboard")]
    dashboard: Option<crate::dashboard::Dashboard>,
    #[cfg(feature = "decision-log")]
    log: Option<crate::observe::DecisionLog>,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("metrics", &self.metrics.is_some())
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// The admin endpoints of `engine`: no token, never draining, reloads re-read the
    /// policy file, no `/metrics`.
    pub fn new(engine: Arc<Engine>) -> Admin {
        let store = engine.store().clone();
        Admin {
            engine,
            token: None,
            draining: Arc::new(AtomicBool::new(false)),
            reload: Arc::new(move || store.reload()),
            metrics: None,
            #[cfg(feature = "dashboard")]
            dashboard: None,
            #[cfg(feature = "decision-log")]
            log: None,
        }
    }

    /// Serves the live dashboard of `dashboard` at `/dashboard` (start its sampler with
    /// [`Dashboard::start`](crate::dashboard::Dashboard::start); attach it to the engine
    /// as an observer for client drill-downs). Operator actions are shown on it.
    #[cfg(feature = "dashboard")]
    pub fn dashboard(mut self, dashboard: crate::dashboard::Dashboard) -> Admin {
        self.dashboard = Some(dashboard);
        self
    }

    /// Writes operator actions to `log` as `action` lines.
    #[cfg(feature = "decision-log")]
    pub fn decision_log(mut self, log: crate::observe::DecisionLog) -> Admin {
        self.log = Some(log);
        self
    }

    /// Requires `Authorization: Bearer <token>` on every endpoint but `/health`.
    pub fn token(mut self, token: impl Into<String>) -> Admin {
        self.token = Some(token.into());
        self
    }

    /// `/health` answers 503 `draining` once `draining` is set (at shutdown).
    pub fn draining(mut self, draining: Arc<AtomicBool>) -> Admin {
        self.draining = draining;
        self
    }

    /// How `POST /reload` and override writes reload the policy.
    pub fn reload(mut self, reload: ReloadFn) -> Admin {
        self.reload = reload;
        self
    }

    /// Serves `registry` at `/metrics`, refreshing `metrics` from the engine first.
    pub fn metrics(self, registry: Arc<Registry>, metrics: Arc<EngineMetrics>) -> Admin {
        let engine = self.engine.clone();
        self.metrics_with(Arc::new(move |format| {
            metrics.refresh(&engine);
            crate::observe::encode(&registry, format)
        }))
    }

    /// Serves what `encode` writes at `/metrics` (for a host with more to refresh).
    pub fn metrics_with(mut self, encode: MetricsFn) -> Admin {
        self.metrics = Some(encode);
        self
    }

    /// The router.
    pub fn router(self) -> Router {
        let has_metrics = self.metrics.is_some();
        let state = Arc::new(AdminState {
            engine: self.engine,
            reload: self.reload,
            metrics: self.metrics,
            token: self.token,
            draining: self.draining,
            started: Instant::now(),
            override_lock: Mutex::new(()),
            limit: Semaphore::new(MAX_CONCURRENT),
            #[cfg(feature = "dashboard")]
            dashboard: self.dashboard,
            #[cfg(feature = "decision-log")]
            log: self.log,
        });
        let mut router = Router::new()
            .route("/health", get(health))
            .route("/status", get(status))
            .route("/policy", get(policy))
            .route("/reload", post(reload))
            .route("/clients/top", get(top_clients))
            .route("/clients/{key}", get(client))
            .route(
                "/clients/{key}/override",
                axum::routing::put(set_override).delete(clear_override),
            )
            .route("/clients/{key}/reset", post(reset_client))
            .route("/clients/{key}/growth", delete(reset_growth));
        if has_metrics {
            router = router.route("/metrics", get(metrics));
        }
        #[cfg(feature = "dashboard")]
        if state.dashboard.is_some() {
            router = router
                .route("/dashboard", get(dashboard_page))
                .route("/dashboard/data", get(dashboard_data))
                .route("/dashboard/clients/{key}", get(dashboard_client));
        }
        router
            .layer(middleware::from_fn_with_state(state.clone(), guard))
            .with_state(state)
    }
}

/// What the admin handlers share.
struct AdminState {
    engine: Arc<Engine>,
    reload: ReloadFn,
    metrics: Option<MetricsFn>,
    token: Option<String>,
    draining: Arc<AtomicBool>,
    started: Instant,
    /// Serialises override writes.
    override_lock: Mutex<()>,
    limit: Semaphore,
    #[cfg(feature = "dashboard")]
    dashboard: Option<crate::dashboard::Dashboard>,
    #[cfg(feature = "decision-log")]
    log: Option<crate::observe::DecisionLog>,
}

impl AdminState {
    /// Records an operator action: the process log, the decision log, the dashboard.
    fn record_action(&self, action: &str, key: &str, detail: Value) {
        tracing::info!(action, client = key, detail = %detail, "operator action");
        #[cfg(feature = "dashboard")]
        if let Some(d) = &self.dashboard {
            d.record_action(action, key, &detail);
        }
        #[cfg(feature = "decision-log")]
        if let Some(log) = &self.log {
            log.log_action(action, key, detail);
        }
        #[cfg(not(feature = "decision-log"))]
        let _ = detail;
    }
}

/// Caps concurrency and checks the bearer token.
async fn guard(State(state): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    let Ok(_permit) = state.limit.try_acquire() else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many concurrent admin requests",
        );
    };
    // `/health` and the dashboard's page (static, no data) need no token; everything the
    // page then fetches does.
    let open = matches!(req.uri().path(), "/health" | "/dashboard");
    if !open {
        if let Some(token) = &state.token {
            if !authorized(req.headers(), token) {
                let mut res = problem(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
                res.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return res;
            }
        }
    }
    next.run(req).await
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let Some(given) = value
        .as_bytes()
        .strip_prefix(b"Bearer ")
        .or_else(|| value.as_bytes().strip_prefix(b"bearer "))
    else {
        return false;
    };
    constant_time_eq(given, token.as_bytes())
}

/// Compares in time that depends only on the lengths, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

fn problem(status: StatusCode, detail: &str) -> Response {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut res = (status, Json(body)).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

fn errors_problem(status: StatusCode, detail: &str, errors: &PolicyErrors) -> Response {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
        "errors": errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
    });
    let mut res = (status, Json(body)).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

async fn health(State(state): State<Arc<AdminState>>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        // Redis down is `degraded`, not down: decisions go on under `on_failure`.
        match state.engine.backend_snapshot() {
            Some(s) if s.degraded => (StatusCode::OK, "degraded\n").into_response(),
            _ => (StatusCode::OK, "ok\n").into_response(),
        }
    }
}

async fn status(State(state): State<Arc<AdminState>>) -> Json<Value> {
    let last = state.engine.store().last_reload();
    let policy = state.engine.store().load_full();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "draining": state.draining.load(Ordering::Relaxed),
        "policy": {
            "version": policy.version,
            "hash": policy.hash.to_hex(),
            "loaded_at": rfc3339(last.loaded_at),
        },
        "last_reload": {
            "result": match (&last.last_attempt_at, last.last_ok()) {
                (None, _) => "none",
                (Some(_), true) => "ok",
                (Some(_), false) => "error",
            },
            "at": last.last_attempt_at.map(rfc3339),
            "errors": last
                .last_error
                .as_ref()
                .map(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>())
                .unwrap_or_default(),
            "succeeded": last.succeeded,
            "failed": last.failed,
        },
        "in_flight": state.engine.in_flight(),
        "shed_limit": state.engine.shed_limit(),
        "tracked_keys": state.engine.tracked_keys(),
    }))
}

async fn policy(State(state): State<Arc<AdminState>>) -> Response {
    let p = state.engine.store().load_full();
    match serde_json::to_value(&*p.source) {
        Ok(v) => Json(v).into_response(),
        Err(_) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot serialise the policy",
        ),
    }
}

async fn reload(State(state): State<Arc<AdminState>>) -> Response {
    let reload = state.reload.clone();
    let result = match tokio::task::spawn_blocking(move || reload()).await {
        Ok(r) => r,
        Err(_) => Err(PolicyErrors::unlocated("policy", "the reload task failed")),
    };
    match result {
        Ok(r) => Json(json!({
            "result": "ok",
            "unchanged": r.unchanged,
            "version": r.version,
            "previous_version": r.previous_version,
            "hash": r.hash.to_hex(),
            "rules_added": r.rules_added,
            "rules_removed": r.rules_removed,
            "rules_modified": r.rules_modified,
            "plans_added": r.plans_added,
            "plans_removed": r.plans_removed,
            "plans_modified": r.plans_modified,
        }))
        .into_response(),
        Err(e) => errors_problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the policy is invalid; the previous policy stays active",
            &e,
        ),
    }
}

async fn metrics(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    let Some(encode) = state.metrics.clone() else {
        return problem(StatusCode::NOT_FOUND, "no metrics are served here");
    };
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    let mut res = encode(format).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    res.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept"));
    res
}

#[derive(Deserialize)]
struct TopQuery {
    n: Option<usize>,
}

async fn top_clients(State(state): State<Arc<AdminState>>, Query(q): Query<TopQuery>) -> Response {
    let n = q.n.unwrap_or(20).min(MAX_TOP);
    let engine = state.engine.clone();
    let top = tokio::task::spawn_blocking(move || engine.top_clients(n)).await;
    match top {
        Ok(top) => Json(json!({ "clients": top.iter().map(usage_json).collect::<Vec<_>>() }))
            .into_response(),
        Err(_) => problem(StatusCode::INTERNAL_SERVER_ERROR, "listing clients failed"),
    }
}

async fn client(State(state): State<Arc<AdminState>>, Path(key): Path<String>) -> Response {
    match state.engine.client_usage(&key) {
        Some(u) => Json(usage_json(&u)).into_response(),
        None => problem(
            StatusCode::NOT_FOUND,
            "no plan applies to this client and it has no state",
        ),
    }
}

async fn set_override(
    State(state): State<Arc<AdminState>>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    let Some(overrides_path) = state.engine.store().overrides_path() else {
        return problem(
            StatusCode::CONFLICT,
            "the policy has no `overrides_file` (and must be loaded from a file) to persist overrides in",
        );
    };
    let policy = state.engine.store().load_full();
    let parsed = match parse_override(&key, &body, &policy.source) {
        Ok(o) => o,
        Err(e) => return errors_problem(StatusCode::BAD_REQUEST, "invalid override", &e),
    };
    let detail = serde_json::to_value(&parsed).unwrap_or(Value::Null);
    let _serial = state.override_lock.lock().await;
    let reload = state.reload.clone();
    let key2 = key.clone();
    let written = tokio::task::spawn_blocking(move || {
        write_override(&overrides_path, &key2, Some(parsed))?;
        reload()
    })
    .await;
    match written {
        Ok(Ok(_)) => {
            state.record_action("override_set", &key, detail);
            let usage = state.engine.client_usage(&key);
            Json(json!({
                "result": "ok",
                "key": key,
                "usage": usage.as_ref().map(usage_json),
            }))
            .into_response()
        }
        Ok(Err(e)) => errors_problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the override could not be applied; the previous policy stays active",
            &e,
        ),
        Err(_) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the override task failed",
        ),
    }
}

/// Decodes one client's override from a JSON or YAML body, checked against `policy`.
fn parse_override(
    key: &str,
    body: &[u8],
    policy: &fairgate_policies::Policy,
) -> Result<ClientOverride, PolicyErrors> {
    const FILE: &str = "request body";
    let text = fairgate_policies::decode::source_from_bytes(body, FILE, &yaml::Limits::default())?;
    let node = yaml::parse(text, FILE, &yaml::Limits::default())?;
    if !matches!(node.kind, NodeKind::Map(_)) {
        return Err(PolicyErrors::unlocated(
            FILE,
            "expected a mapping like `{plan: pro}` or `{bandwidths: [...], concurrency: 10}`",
        ));
    }
    let node = with_expiry(node)?;
    let mark = node.mark;
    let root = Node {
        kind: NodeKind::Map(vec![(
            Node {
                kind: NodeKind::Scalar(key.to_owned(), ScalarStyle::DoubleQuoted),
                mark,
            },
            node,
        )]),
        mark,
    };
    let mut map = fairgate_policies::decode::decode_overrides(&root, FILE, Some(policy))?;
    map.remove(key)
        .ok_or_else(|| PolicyErrors::unlocated(FILE, "the override is empty"))
}

/// Turns an override body's `expires_in: <duration>` (from now) into `expires: <UTC time>`,
/// the form the overrides file keeps.
fn with_expiry(mut node: Node) -> Result<Node, PolicyErrors> {
    const FILE: &str = "request body";
    let NodeKind::Map(entries) = &mut node.kind else {
        return Ok(node);
    };
    let Some(i) = entries
        .iter()
        .position(|(k, _)| matches!(&k.kind, NodeKind::Scalar(s, _) if s == "expires_in"))
    else {
        return Ok(node);
    };
    if entries
        .iter()
        .any(|(k, _)| matches!(&k.kind, NodeKind::Scalar(s, _) if s == "expires"))
    {
        return Err(PolicyErrors::unlocated(
            FILE,
            "give `expires` (a UTC time) or `expires_in` (a duration), not both",
        ));
    }
    let (key, value) = entries.remove(i);
    let text = match &value.kind {
        NodeKind::Scalar(t, _) => t.clone(),
        _ => String::new(),
    };
    let d = fairgate_policies::units::parse_duration(&text).map_err(|e| {
        PolicyErrors::unlocated(
            FILE,
            format!("`expires_in`: {} (expected a duration like `1h`)", e.0),
        )
    })?;
    if d.is_zero() {
        return Err(PolicyErrors::unlocated(
            FILE,
            "`expires_in` must be longer than 0s",
        ));
    }
    let at =
        // Rounded up to whole seconds: never shorter than asked.
        fairgate_policies::units::Timestamp::from_system_time(
            std::time::SystemTime::now() + d + std::time::Duration::from_nanos(999_999_999),
        );
    entries.push((
        Node {
            kind: NodeKind::Scalar("expires".to_owned(), ScalarStyle::Plain),
            mark: key.mark,
        },
        Node {
            kind: NodeKind::Scalar(at.to_string(), ScalarStyle::Plain),
            mark: value.mark,
        },
    ));
    Ok(node)
}

#[cfg(feature = "dashboard")]
async fn dashboard_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        crate::dashboard::PAGE,
    )
        .into_response()
}

#[cfg(feature = "dashboard")]
async fn dashboard_data(State(state): State<Arc<AdminState>>) -> Response {
    let Some(d) = state.dashboard.clone() else {
        return problem(StatusCode::NOT_FOUND, "no dashboard");
    };
    match tokio::task::spawn_blocking(move || d.data()).await {
        Ok(v) => Json(v).into_response(),
        Err(_) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the dashboard task failed",
        ),
    }
}

#[cfg(feature = "dashboard")]
async fn dashboard_client(
    State(state): State<Arc<AdminState>>,
    Path(key): Path<String>,
) -> Response {
    let Some(d) = state.dashboard.clone() else {
        return problem(StatusCode::NOT_FOUND, "no dashboard");
    };
    d.watch(&key);
    match tokio::task::spawn_blocking(move || d.client(&key)).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "no plan applies to this client and it has no state",
        ),
        Err(_) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the dashboard task failed",
        ),
    }
}

/// Clears a client's override: removed from the overrides file, applied live.
async fn clear_override(State(state): State<Arc<AdminState>>, Path(key): Path<String>) -> Response {
    let Some(overrides_path) = state.engine.store().overrides_path() else {
        return problem(
            StatusCode::CONFLICT,
            "the policy has no `overrides_file` (and must be loaded from a file) to keep overrides in",
        );
    };
    let _serial = state.override_lock.lock().await;
    let reload = state.reload.clone();
    let key2 = key.clone();
    let written = tokio::task::spawn_blocking(move || {
        let existed = write_override(&overrides_path, &key2, None)?;
        if existed {
            reload()?;
        }
        Ok::<_, PolicyErrors>(existed)
    })
    .await;
    match written {
        Ok(Ok(true)) => {
            state.record_action("override_clear", &key, Value::Null);
            Json(json!({ "result": "ok", "key": key })).into_response()
        }
        Ok(Ok(false)) => problem(
            StatusCode::NOT_FOUND,
            "this client has no override in the overrides file",
        ),
        Ok(Err(e)) => errors_problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the override could not be cleared; the previous policy stays active",
            &e,
        ),
        Err(_) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the override task failed",
        ),
    }
}

/// Refills a client's quota buckets (local state only).
async fn reset_client(State(state): State<Arc<AdminState>>, Path(key): Path<String>) -> Response {
    if state.engine.backend_snapshot().is_some() {
        return problem(
            StatusCode::CONFLICT,
            "the fleet's buckets live in the state backend (Redis); a reset of one gateway's \
             local state would not reset them, so it is refused",
        );
    }
    let refilled = state.engine.reset_client(&key);
    if refilled == 0 {
        return problem(
            StatusCode::NOT_FOUND,
            "this client has no quota bucket to reset",
        );
    }
    state.record_action("reset", &key, json!({ "buckets": refilled }));
    Json(json!({ "result": "ok", "key": key, "buckets": refilled })).into_response()
}

/// Resets `key`'s adaptive growth: its quota is the policy's base quota again.
async fn reset_growth(State(state): State<Arc<AdminState>>, Path(key): Path<String>) -> Response {
    let engine = Arc::clone(&state.engine);
    let had = if engine.growth_is_shared() {
        // The fleet's growth lives in the state backend: reset there, then here.
        match engine.reset_shared_growth(&key).await {
            Some(had) => had,
            None => return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the state backend keeping the fleet's growth did not answer; nothing was reset",
            ),
        }
    } else {
        let k = key.clone();
        // Blocking: the growth file is rewritten.
        match tokio::task::spawn_blocking(move || engine.reset_growth(&k)).await {
            Ok(had) => had,
            Err(_) => {
                return problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the growth reset did not complete",
                )
            }
        }
    };
    if had == 0 {
        return problem(StatusCode::NOT_FOUND, "this client's quota has not grown");
    }
    state.record_action("growth_reset", &key, json!({ "steps": had }));
    Json(json!({ "result": "ok", "key": key, "steps": had })).into_response()
}

/// Sets (`Some`) or removes (`None`) `key`'s override in the overrides file (atomically:
/// temp file + rename), dropping entries that have lapsed. The file is JSON, which is also
/// YAML. Returns whether `key` had an entry before.
fn write_override(
    path: &PathBuf,
    key: &str,
    o: Option<ClientOverride>,
) -> Result<bool, PolicyErrors> {
    let name = path.display().to_string();
    let mut all: BTreeMap<String, ClientOverride> = match std::fs::read_to_string(path) {
        Ok(text) => fairgate_policies::decode::parse_overrides(&text, &name)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            return Err(PolicyErrors::unlocated(
                &name,
                format!("cannot read the file: {e}"),
            ))
        }
    };
    let now = fairgate_policies::units::Timestamp::from_system_time(std::time::SystemTime::now());
    all.retain(|_, v| v.expires.is_none_or(|t| t > now));
    let removing = o.is_none();
    let existed = match o {
        Some(o) => all.insert(key.to_owned(), o).is_some(),
        None => all.remove(key).is_some(),
    };
    if removing && !existed {
        return Ok(false);
    }
    let mut text = serde_json::to_string_pretty(&all)
        .map_err(|e| PolicyErrors::unlocated(&name, format!("cannot serialise overrides: {e}")))?;
    text.push('\n');
    crate::caps::write_atomically(path, &text)
        .map_err(|e| PolicyErrors::unlocated(&name, format!("cannot write the file: {e}")))?;
    Ok(existed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_bytes() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn bearer_tokens_are_checked() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "t0k"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t0k"),
        );
        assert!(authorized(&h, "t0k"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t0K"),
        );
        assert!(!authorized(&h, "t0k"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic t0k"));
        assert!(!authorized(&h, "t0k"));
    }
}
