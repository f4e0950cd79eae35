//! An axum app behind fairgate's admission layer.
//!
//! ```text
//! cargo run -p fairgate-middleware --example axum_app -- [policy.yaml]
//! ```
//!
//! The policy path defaults to `examples/policy.yaml` at the repository root; if that file
//! does not exist, a small inline policy is used (5 requests burst, then 1/s, per client
//! IP or `x-api-key`). Serves on 127.0.0.1:3000; try
//! `for i in $(seq 8); do curl -si localhost:3000/ | head -1; done`.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::{routing::get, Router};
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
    let path = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/policy.yaml")
        });
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

    let app = Router::new()
        .route("/", get(|| async { "hello from behind fairgate\n" }))
        .layer(layer);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
