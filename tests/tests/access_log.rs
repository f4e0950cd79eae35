//! The access log (issue 19, item 5), with the real binary: one line per request — admitted,
//! rejected by admission, answered by the router — with the fields operators expect, in JSON
//! and in the Combined Log Format; SIGUSR1 reopens the file (rotation).

use std::time::Duration;

use fairgate_tests::{Client, Gateway, Upstream};

fn config(up: &Upstream, format: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
routes: [{{path_prefix: /x, upstream: u}}]
upstreams: {{u: {{targets: ['{}']}}}}
log: {{decisions: off, access: {{path: access.log, format: {format}}}}}
policy:
  version: 1
  identify: {{client_key: [{{header: x-api-key}}]}}
  plans: {{free: {{bandwidths: ['2/min burst 2']}}}}
  default_plan: free
",
        up.addr
    )
}

/// The file's lines once it has `n` of them (within a deadline).
async fn lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let read = || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<String>>()
    };
    let got =
        fairgate_tests::eventually(Duration::from_secs(10), || async { read().len() >= n }).await;
    let lines = read();
    assert!(got, "{} of {n} lines: {lines:?}", lines.len());
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_a_line_and_sigusr1_reopens_the_file() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, "json"));
    let c = Client::new();
    let key = [("x-api-key", "a"), ("x-request-id", "req-7")];
    let statuses = [
        c.get_with(&gw.url("/x?q=1"), &key).await.status.as_u16(),
        c.get_with(&gw.url("/x"), &key).await.status.as_u16(),
        c.get_with(&gw.url("/x"), &key).await.status.as_u16(),
        c.get_with(&gw.url("/nope"), &key).await.status.as_u16(),
    ];
    assert_eq!(statuses, [200, 200, 429, 404]);
    let path = gw.dir().join("access.log");
    let got: Vec<serde_json::Value> = lines(&path, 4)
        .await
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let field = |k: &str| got.iter().map(|v| v[k].clone()).collect::<Vec<_>>();
    assert_eq!(
        field("status"),
        [200, 200, 429, 404].map(serde_json::Value::from)
    );
    assert_eq!(
        field("stage"),
        [None, None, Some("quota"), None].map(|s| serde_json::json!(s))
    );
    assert_eq!(
        field("upstream"),
        [Some("u"), Some("u"), Some("u"), None].map(|s| serde_json::json!(s))
    );
    assert_eq!(got[0]["target"], "/x?q=1");
    assert_eq!(got[0]["method"], "GET");
    assert_eq!(got[0]["peer"], "127.0.0.1");
    assert_eq!(got[0]["version"], "HTTP/1.1");
    assert_eq!(got[0]["request_id"], "req-7");
    assert_eq!(got[0]["bytes"], 2, "the upstream's `ok`");
    assert!(got[2]["bytes"].as_u64().unwrap() > 0, "the problem body");
    assert!(got
        .iter()
        .all(|v| v["duration_ms"].as_f64().unwrap() >= 0.0));
    assert!(got[0]["time"].as_str().unwrap().ends_with('Z'));

    // Rotation: move the file away, SIGUSR1, and the next line starts a new file.
    std::fs::rename(&path, gw.dir().join("access.log.1")).unwrap();
    let kill = std::process::Command::new("kill")
        .args(["-USR1", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let reopened = fairgate_tests::eventually(Duration::from_secs(10), || async {
        gw.stderr().contains("access log reopened")
    })
    .await;
    assert!(reopened, "{}", gw.stderr());
    assert_eq!(c.get_with(&gw.url("/nope"), &key).await.status, 404);
    assert_eq!(lines(&path, 1).await.len(), 1);
    assert_eq!(lines(&gw.dir().join("access.log.1"), 4).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_combined_format_is_nginxs() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, "combined"));
    let r = Client::new()
        .get_with(
            &gw.url("/x/a"),
            &[("user-agent", "probe \"1\""), ("referer", "http://r/")],
        )
        .await;
    assert_eq!(r.status, 200);
    let line = lines(&gw.dir().join("access.log"), 1).await.remove(0);
    let (head, rest) = line.split_once(" [").expect("a CLF line");
    assert_eq!(head, "127.0.0.1 - -");
    let (_time, rest) = rest.split_once("] ").expect("the time");
    assert_eq!(
        rest,
        "\"GET /x/a HTTP/1.1\" 200 2 \"http://r/\" \"probe \\\"1\\\"\""
    );
}

#[test]
fn access_log_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let check = |cfg: &str| {
        let p = dir.path().join("gw.yaml");
        std::fs::write(&p, cfg).unwrap();
        let out = std::process::Command::new(fairgate_tests::fairgate_bin())
            .args(["check", "--gateway"])
            .arg(&p)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let base = "listen: 127.0.0.1:0\nroutes: [{upstream: u}]\nupstreams: {u: {targets: [builtin:echo]}}\npolicy: {version: 1}\n";
    let (code, out) = check(&format!(
        "{base}log: {{access: {{path: a.log, format: xml}}}}\n"
    ));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("log.access.format: unknown value `xml`"),
        "{out}"
    );
    let (code, out) = check(&format!("{base}log: {{access: stdout}}\n"));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("the decision log already writes to stdout"),
        "{out}"
    );
    let (code, out) = check(&format!(
        "{base}log: {{access: {{path: a.log, buffer: 0}}}}\n"
    ));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("log.access.buffer: must be at least 1"),
        "{out}"
    );
    let (code, out) = check(&format!("{base}log: {{decisions: off, access: stdout}}\n"));
    assert_eq!(code, Some(0), "{out}");
}
