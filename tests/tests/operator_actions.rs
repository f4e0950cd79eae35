//! Operator actions through the admin API of the real binary (issue 16, item 1): a
//! time-boxed override that lapses by itself, clearing an override, resetting a client's
//! buckets; each action in the process log and as an `action` line of the decision log.

use std::time::Duration;

use fairgate_tests::{empty, eventually, full, Client, Gateway, Upstream};
use serde_json::Value;

const POLICY: &str = "version: 1
identify: {client_key: [{header: x-api-key}]}
overrides_file: overrides.yaml
default_plan: free
plans:
  free: {bandwidths: ['2/min burst 2']}
  pro: {bandwidths: ['1000/min burst 1000']}
";

fn config(upstream: &Upstream) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
policy: policy.yaml
log: {{decisions: decisions.jsonl, sample_admits: 0}}
",
        upstream.addr
    )
}

async fn send(c: &Client, gw: &Gateway, key: &str) -> u16 {
    c.get_with(&gw.url("/x"), &[("x-api-key", key)])
        .await
        .status
        .as_u16()
}

async fn admin(c: &Client, gw: &Gateway, method: &str, path: &str, body: &str) -> (u16, Value) {
    let body = if body.is_empty() {
        empty()
    } else {
        full(body.to_owned())
    };
    let r = c
        .request(
            method,
            &gw.admin_url(path),
            &[("content-type", "application/json")],
            body,
        )
        .await;
    let status = r.status.as_u16();
    let json = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (status, json)
}

/// The `action` lines of the decision log.
fn actions(gw: &Gateway) -> Vec<Value> {
    std::fs::read_to_string(gw.dir().join("decisions.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "action")
        .collect()
}

#[tokio::test]
async fn a_time_boxed_override_lapses_by_itself_and_actions_are_logged() {
    let upstream = Upstream::start().await;
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let gw = Gateway::start_in(dir, &config(&upstream));
    let c = Client::new();
    assert_eq!(send(&c, &gw, "k").await, 200);
    assert_eq!(send(&c, &gw, "k").await, 200);
    assert_eq!(send(&c, &gw, "k").await, 429, "free: 2 a minute");

    // Bad expiries are refused and change nothing.
    for bad in [
        r#"{"plan": "pro", "expires_in": "soon"}"#,
        r#"{"plan": "pro", "expires_in": "0s"}"#,
        r#"{"plan": "pro", "expires": "2026-02-30T00:00:00Z"}"#,
        r#"{"expires_in": "1h"}"#,
    ] {
        let (status, body) = admin(&c, &gw, "PUT", "/clients/k/override", bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body.to_string().contains("expires") || body.to_string().contains("sets nothing"),
            "{body}"
        );
    }
    assert_eq!(send(&c, &gw, "k").await, 429);

    // On `pro` for three seconds.
    let (status, body) = admin(
        &c,
        &gw,
        "PUT",
        "/clients/k/override",
        r#"{"plan": "pro", "expires_in": "3s"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["plan"], "pro");
    assert_eq!(
        send(&c, &gw, "k").await,
        200,
        "the override applies at once"
    );
    let file = std::fs::read_to_string(gw.dir().join("overrides.yaml")).unwrap();
    assert!(
        file.contains("\"expires\""),
        "persisted with its expiry: {file}"
    );
    // Then back on `free`, whose bucket is still empty: no reload, no restart needed.
    let lapsed = eventually(Duration::from_secs(10), || async {
        send(&c, &gw, "k").await == 429
    })
    .await;
    assert!(lapsed, "the override lapsed by itself");
    let (_, usage) = admin(&c, &gw, "GET", "/clients/k", "").await;
    assert_eq!(usage["plan"], "free");

    // Reset: k's bucket is full again.
    let (status, body) = admin(&c, &gw, "POST", "/clients/k/reset", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["buckets"], 2, "free's and pro's (used while on pro)");
    assert_eq!(send(&c, &gw, "k").await, 200);
    assert_eq!(send(&c, &gw, "k").await, 200);
    assert_eq!(send(&c, &gw, "k").await, 429);
    let (status, _) = admin(&c, &gw, "POST", "/clients/nobody/reset", "").await;
    assert_eq!(status, 404, "a client with no bucket");

    // Clear: set without expiry, then cleared; clearing again is a 404.
    let (status, _) = admin(&c, &gw, "PUT", "/clients/k/override", r#"{"plan": "pro"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(send(&c, &gw, "k").await, 200);
    let (status, body) = admin(&c, &gw, "DELETE", "/clients/k/override", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(send(&c, &gw, "k").await, 429, "back on free");
    let (status, _) = admin(&c, &gw, "DELETE", "/clients/k/override", "").await;
    assert_eq!(status, 404);

    // Every action: the process log and the decision log, in order.
    let stderr = gw.stderr();
    assert_eq!(stderr.matches("operator action").count(), 4, "{stderr}");
    let logged = eventually(Duration::from_secs(5), || async { actions(&gw).len() == 4 }).await;
    let lines = actions(&gw);
    assert!(logged, "{lines:?}");
    let kinds: Vec<&str> = lines
        .iter()
        .map(|l| l["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["override_set", "reset", "override_set", "override_clear"]
    );
    assert!(lines.iter().all(|l| l["client"] == "k"));
    assert_eq!(lines[0]["detail"]["plan"], "pro");
    assert!(lines[0]["detail"]["expires"].is_string());
}
