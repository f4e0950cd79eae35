//! An axum app behind fairgate's admission layer.
//!
//! ```text
//! cargo run -p fairgate-middleware --example axum_app -- [POLICY [LISTEN_ADDR]]
//! ```
//!
//! `POLICY` defaults to `examples/policy.yaml` at the repository root; if that file does not
//! exist, a small inline policy is used (5 requests burst, then 1/s, per client IP or
//! `x-api-key`). `LISTEN_ADDR` defaults to `127.0.0.1:3000` (`127.0.0.1:0` picks a free
//! port); the app prints `listening on http://ADDR` once it serves, so several replicas can
//! run side by side — with a policy whose `state.backend` is `redis` they share one quota,
//! exactly as a fleet of gateways does. Try
//! `for i in $(seq 8); do curl -si localhost:3000/ | head -1; done`.
//!
//! What an operator of the gateway gets, the app gets too (features `metrics`,
//! `decision-log`, `admin`):
//! - with `FAIRGATE_ADMIN_TOKEN` set, the admin endpoints are nested at `/admin` (outside
//!   admission), behind that bearer token: `/admin/metrics` (the engine's series in the
//!   app's Prometheus registry), `/admin/status`, `/admin/clients/top`,
//!   `/admin/clients/{key}`, `PUT /admin/clients/{key}/override`, `POST /admin/reload`…
//!   Try `curl -s -H 'authorization: Bearer TOKEN' localhost:3000/admin/metrics`;
//! - with `FAIRGATE_DECISION_LOG=FILE`, the decision log is appended to `FILE` (JSON
//!   lines); with `FAIRGATE_DECISION_LOG_AUDIT=1` it is complete, for
//!   `fairgate audit FILE --policy POLICY`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::{routing::get, Router};
use fairgate_middleware::admin::Admin;
use fairgate_middleware::observe::prometheus_client::registry::Registry;
use fairgate_middleware::observe::{DecisionLog, DecisionLogConfig, DecisionTarget, EngineMetrics};
use fairgate_middleware::AdmissionLayer;
use fairgate_policies::PolicyStore;

const INLINE_POLICY: &str = "version: 1
identify:
  client_key: [{header: x-api-key}]
plans:
  free:
    bandwidths: ['1/s burst 5']
default_plan: free
responses:
  ratelimit_headers: always
";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let path = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/policy.yaml")
    });
    let listen: SocketAddr = match args.next() {
        Some(a) => a
            .to_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("LISTEN_ADDR {a:?} is not an address like 127.0.0.1:3000"))?,
        None => SocketAddr::from(([127, 0, 0, 1], 3000)),
    };
    // The layer starts what the policy asks for, as the gateway does: the state backend
    // (Redis included), pruning, and the file watcher.
    let layer = if path.exists() {
        println!("policy: {} (watched for changes)", path.display());
        AdmissionLayer::from_policy_file(&path)?
    } else {
        println!(
            "policy: {} not found, using the inline example policy",
            path.display()
        );
        AdmissionLayer::from_store(PolicyStore::from_yaml_str(INLINE_POLICY, "inline.yaml")?)?
    };

    let engine = layer.engine().clone();

    // Metrics in the app's own registry (the app would register its own series beside).
    let mut registry = Registry::default();
    let metrics = EngineMetrics::register(&mut registry);
    // The decision log, when asked for.
    let log = match std::env::var_os("FAIRGATE_DECISION_LOG") {
        Some(file) => {
            let config = DecisionLogConfig {
                decisions: DecisionTarget::File(file.into()),
                audit: std::env::var("FAIRGATE_DECISION_LOG_AUDIT").is_ok_and(|v| v == "1"),
                ..DecisionLogConfig::default()
            };
            DecisionLog::start(&config)?.with_clock(engine.clock().clone())
        }
        None => DecisionLog::off(),
    };
    // Its dropped lines are counted in the metrics; both see every decision.
    metrics.watch_decision_log(&log);
    engine.set_observer(Arc::new((metrics.clone(), log)));

    let mut app = Router::new()
        .route("/", get(|| async { "hello from behind fairgate\n" }))
        .layer(layer);
    // Added after `.layer`, so admission does not apply to the admin endpoints.
    match std::env::var("FAIRGATE_ADMIN_TOKEN") {
        Ok(token) if !token.is_empty() => {
            let admin = Admin::new(engine)
                .token(token)
                .metrics(Arc::new(registry), metrics)
                .router();
            app = app.nest("/admin", admin);
            println!("admin: /admin (bearer token from FAIRGATE_ADMIN_TOKEN)");
        }
        _ => println!("admin: off (set FAIRGATE_ADMIN_TOKEN to serve /admin)"),
    }

    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
