//! An axum `GET /` app served on one current-thread runtime, with or without an admission
//! layer: the "tower layer in an axum app" contenders of the load harness
//! (`benches/load/run.sh --contenders axum`).
//!
//! Usage: `axum_app LISTEN_ADDR MODE [POLICY_FILE]` where `MODE` is
//! - `bare`: no middleware, the baseline;
//! - `fairgate POLICY_FILE`: `fairgate_middleware::AdmissionLayer` built from the policy file;
//! - `governor`: `tower_governor` keyed by the `x-api-key` header, as the anchor (1000/s with a
//!   burst of 2000 per key, the same as the harness's full policy, so never hit by the harness).
//!
//! Every variant serves `into_make_service_with_connect_info::<SocketAddr>()`, so the peer
//! address is there for whichever layer wants it, and the baseline pays the same for it.

use std::net::SocketAddr;
use std::process::ExitCode;

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

/// tower_governor key: the `x-api-key` header, owned (as any header-keyed extractor must be,
/// since governor's keyed state stores the key).
#[derive(Debug, Clone, Copy)]
struct ApiKey;

impl KeyExtractor for ApiKey {
    type Key = String;

    fn extract<T>(&self, req: &axum::http::Request<T>) -> Result<String, GovernorError> {
        req.headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: axum_app LISTEN_ADDR (bare | fairgate POLICY_FILE | governor)";
    let Some(Ok(listen)) = args.get(1).map(|a| a.parse::<SocketAddr>()) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let app = Router::new().route("/", get(|| async { "ok\n" }));
    let app = match (args.get(2).map(String::as_str), args.get(3)) {
        (Some("bare"), None) => app,
        (Some("fairgate"), Some(policy)) => {
            match fairgate_middleware::AdmissionLayer::from_policy_file(policy) {
                Ok(layer) => app.layer(layer),
                Err(e) => {
                    eprintln!("axum_app: cannot load {policy}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        (Some("governor"), None) => {
            let Some(config) = GovernorConfigBuilder::default()
                .per_millisecond(1)
                .burst_size(2000)
                .key_extractor(ApiKey)
                .finish()
            else {
                eprintln!("axum_app: invalid governor quota");
                return ExitCode::FAILURE;
            };
            app.layer(GovernorLayer::new(config))
        }
        _ => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("axum_app: cannot build the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("axum_app: {e}");
            ExitCode::FAILURE
        }
    }
}
