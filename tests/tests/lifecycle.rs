//! Process lifecycle and the admin plane through the real binary: graceful SIGTERM, admin
//! authentication, `fairgate check`, and the demo config.

use std::time::{Duration, Instant};

use fairgate_tests::{
    empty, eventually, listening_sockets, run_fairgate, Client, Gateway, Upstream,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let up = Upstream::start().await;
    let mut gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nruntime: multi_thread\nadmin: {{listen: 127.0.0.1:0}}\nshutdown_grace: 5s\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
        up.addr
    ));
    let c = Client::new();
    let url = gw.url("/slow?delay_ms=1000");
    let slow = tokio::spawn({
        let c = c.clone();
        async move { c.get(&url).await }
    });
    // Wait until the slow request is at the upstream, then SIGTERM.
    assert!(eventually(Duration::from_secs(5), || async { up.in_flight() == 1 }).await);
    gw.signal("TERM");
    // /health turns 503 while draining.
    let health = gw.admin_url("/health");
    let draining = eventually(Duration::from_secs(2), || {
        let c = c.clone();
        let health = health.clone();
        async move {
            let req = http::Request::get(&health).body(empty()).unwrap();
            matches!(c.try_send(req).await, Ok(r) if r.status == 503)
        }
    })
    .await;
    assert!(draining, "/health did not report draining");
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "the in-flight request must complete");
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("exited within the grace period");
    assert!(status.success(), "{status:?}\n{}", gw.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_per_core_serves_on_per_core_sockets_and_drains_on_sigterm() {
    let up = Upstream::start().await;
    let mut gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nruntime: thread_per_core\nworkers: 2\nadmin: {{listen: 127.0.0.1:0}}\nshutdown_grace: 5s\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
        up.addr
    ));
    // Two per-core threads, each with its own SO_REUSEPORT socket on the one data address
    // (port 0 was resolved once, not once per thread).
    // (A thread names itself once it runs, so poll.)
    let cores = || {
        gw.thread_names()
            .into_iter()
            .filter(|n| n.starts_with("fairgate-core-"))
            .collect::<Vec<String>>()
    };
    let named = eventually(Duration::from_secs(5), || async {
        cores() == ["fairgate-core-0", "fairgate-core-1"]
    })
    .await;
    assert!(named, "{:?}", gw.thread_names());
    assert_eq!(listening_sockets(gw.data), 2);

    // It serves, over many connections (spread by the kernel over both sockets).
    for i in 0..16 {
        let r = Client::new().get(&gw.url(&format!("/n/{i}"))).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(up.count(), 16);

    // Slow requests in flight on six connections, then SIGTERM: all of them finish.
    let slow: Vec<_> = (0..6)
        .map(|_| {
            let url = gw.url("/slow?delay_ms=1000");
            tokio::spawn(async move { Client::new().get(&url).await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || async { up.in_flight() == 6 }).await);
    gw.signal("TERM");
    let c = Client::new();
    let health = gw.admin_url("/health");
    let draining = eventually(Duration::from_secs(2), || {
        let c = c.clone();
        let health = health.clone();
        async move {
            let req = http::Request::get(&health).body(empty()).unwrap();
            matches!(c.try_send(req).await, Ok(r) if r.status == 503)
        }
    })
    .await;
    assert!(draining, "/health did not report draining");
    // The data sockets are closed while the in-flight requests still run.
    assert!(
        eventually(Duration::from_secs(2), || async {
            listening_sockets(gw.data) == 0
        })
        .await,
        "per-core listeners still open"
    );
    for s in slow {
        assert_eq!(
            s.await.unwrap().status,
            200,
            "an in-flight request must complete"
        );
    }
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("exited within the grace period");
    assert!(status.success(), "{status:?}\n{}", gw.stderr());
}

/// A request still running when `shutdown_grace` ends is cut off, and the process still
/// exits 0, promptly.
async fn grace_period_cuts_off_what_is_left(runtime: &str) {
    let up = Upstream::start().await;
    let mut gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nruntime: {runtime}\nworkers: 2\nshutdown_grace: 300ms\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
        up.addr
    ));
    let url = gw.url("/stuck?delay_ms=60000");
    let stuck = tokio::spawn(async move {
        let req = http::Request::get(&url).body(empty()).unwrap();
        Client::new().try_send(req).await
    });
    assert!(eventually(Duration::from_secs(5), || async { up.in_flight() == 1 }).await);
    gw.signal("TERM");
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("exited soon after the grace period");
    assert!(status.success(), "{status:?}\n{}", gw.stderr());
    // Cut off: the connection closes, or (when the upstream side is torn down first) the
    // gateway answers it with a 5xx of its own; never the upstream's 200, 60 s later.
    match stuck.await.unwrap() {
        Err(_) => {}
        Ok(r) => assert!(
            r.status.is_server_error(),
            "the stuck request must be cut off, got {} {:?}",
            r.status,
            r.text()
        ),
    }
    assert!(gw.stderr().contains("grace period over"), "{}", gw.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_cuts_off_what_is_left_multi_thread() {
    grace_period_cuts_off_what_is_left("multi_thread").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_cuts_off_what_is_left_thread_per_core() {
    grace_period_cuts_off_what_is_left("thread_per_core").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requires_the_token_and_post_for_mutations() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0, token: s3cret}}\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
        up.addr
    ));
    let c = Client::new();
    for path in ["/status", "/metrics", "/policy", "/clients/top"] {
        assert_eq!(
            c.get(&gw.admin_url(path)).await.status,
            401,
            "{path} without a token"
        );
        let r = c
            .get_with(&gw.admin_url(path), &[("authorization", "Bearer wrong")])
            .await;
        assert_eq!(r.status, 401, "{path} with a wrong token");
        let r = c
            .get_with(&gw.admin_url(path), &[("authorization", "Bearer s3cret")])
            .await;
        assert_eq!(r.status, 200, "{path} with the token");
    }
    let r = c
        .request("POST", &gw.admin_url("/reload"), &[], empty())
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), "Bearer");
    let r = c
        .get_with(
            &gw.admin_url("/reload"),
            &[("authorization", "Bearer s3cret")],
        )
        .await;
    assert_eq!(r.status, 405, "GET /reload");
    let r = c
        .request(
            "GET",
            &gw.admin_url("/clients/x/override"),
            &[("authorization", "Bearer s3cret")],
            empty(),
        )
        .await;
    assert_eq!(r.status, 405, "GET on the override endpoint");
    // /health needs no token.
    assert_eq!(c.get(&gw.admin_url("/health")).await.status, 200);
    // The token appears nowhere in what the admin API shows.
    let auth = [("authorization", "Bearer s3cret")];
    for path in ["/status", "/metrics", "/policy"] {
        assert!(
            !c.get_with(&gw.admin_url(path), &auth)
                .await
                .text()
                .contains("s3cret"),
            "{path}"
        );
    }
    assert!(!gw.stderr().contains("s3cret"));
    let top = c
        .get_with(&gw.admin_url("/clients/top?n=5"), &auth)
        .await
        .json();
    assert!(top["clients"].is_array());
}

#[test]
fn check_reports_a_summary_or_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "version: 1\nplans: {free: {bandwidths: ['10/s burst 20']}}\ndefault_plan: free\n",
    )
    .unwrap();
    let (code, out, err) = run_fairgate(&["check", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("free"), "{out}");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "version: 1\nplanz: {}\ndefault_plan: nope\n").unwrap();
    let (code, out, err) = run_fairgate(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.len() >= 2, "every error, one per line: {err}");
    assert!(lines.iter().all(|l| l.contains("bad.yaml:")), "{err}");
    assert!(err.contains("bad.yaml:2:1: planz: unknown field"), "{err}");
    assert!(err.contains("bad.yaml:3:"), "{err}");

    let gw_bad = dir.path().join("gw.yaml");
    std::fs::write(&gw_bad, "listen: nowhere\nroutes: []\nupstreams: {}\n").unwrap();
    let (code, _, err) = run_fairgate(&["check", "--gateway", gw_bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("gw.yaml:1:9: listen:"), "{err}");

    let (code, _, err) =
        run_fairgate(&["check", dir.path().join("missing.yaml").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("missing.yaml"), "{err}");

    let (code, out, _) = run_fairgate(&["schema"]);
    assert_eq!(code, 0);
    let schema: serde_json::Value = serde_json::from_str(&out).expect("schema is JSON");
    assert!(schema.is_object());
    let (code, out, _) = run_fairgate(&["version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("fairgate "), "{out}");
    let (code, _, _) = run_fairgate(&["run", "--config", "/nonexistent/gw.yaml"]);
    assert_eq!(code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_config_serves_with_nothing_else_running() {
    // examples/gateway.yaml, on ephemeral ports.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = std::fs::read_to_string(root.join("examples/gateway.yaml")).unwrap();
    let policy = std::fs::read_to_string(root.join("examples/gateway-policy.yaml")).unwrap();
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("gateway-policy.yaml"), policy).unwrap();
    let config = example
        .replace("listen: 127.0.0.1:8080", "listen: 127.0.0.1:0")
        .replace("listen: 127.0.0.1:9090", "listen: 127.0.0.1:0");
    let gw = Gateway::start_in(dir, &config);
    let c = Client::new();
    let r = c.get(&gw.url("/hello")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/hello");
    assert!(
        r.header("ratelimit-policy")
            .contains("\"free-0\";q=5;w=1;fairgate-burst=10"),
        "{:?}",
        r.headers
    );
    let started = Instant::now();
    let mut codes = Vec::new();
    for _ in 0..15 {
        codes.push(c.get(&gw.url("/")).await.status.as_u16());
    }
    assert!(
        codes.contains(&429) || started.elapsed() > Duration::from_secs(1),
        "{codes:?}"
    );
    assert_eq!(
        c.get_with(&gw.url("/"), &[("user-agent", "badbot")])
            .await
            .status,
        403
    );
    let pro = [("x-api-key", "demo-pro-key")];
    assert_eq!(
        c.get_with(&gw.url("/status/418"), &pro)
            .await
            .status
            .as_u16(),
        418
    );
    assert_eq!(c.get(&gw.admin_url("/health")).await.status, 200);
}

/// The gateway opts out of transparent huge pages (its allocator marks its memory
/// `MADV_HUGEPAGE`, and `khugepaged` collapsing those pages paused the whole process for
/// 100–230 ms in the overload scenarios): the kernel reports THP off for the running process.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_runs_without_transparent_huge_pages() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0\nroutes: [{{upstream: u}}]\nupstreams: {{u: {{targets: ['{}']}}}}\nlog: {{decisions: off}}\n",
        up.addr
    ));
    assert_eq!(Client::new().get(&gw.url("/")).await.status, 200);
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).expect("/proc");
    let thp = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("THP_enabled in /proc/PID/status (Linux ≥ 5.0)");
    assert_eq!(thp.split_whitespace().nth(1), Some("0"), "{thp}");
}
