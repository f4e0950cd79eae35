//! Adaptive growth (issue 17, item 1), end to end with the real binary: a busy client's
//! quota grows step by step to its bound, a fixed client under the same load does not, the
//! grown quota is what `RateLimit-Policy` and the admin API show, it survives a restart
//! (`state.growth_file`), and an operator resets it.
//!
//! Windows are 1 s of real time; each client sends as fast as it can, so the admitted count
//! per window is its quota whatever the machine's load (the threshold is half of it).

use std::time::{Duration, Instant};

use fairgate_tests::{empty, Client, Gateway, Upstream};

const POLICY: &str = "version: 1
identify: {client_key: [{header: x-api-key}]}
plans:
  grow:
    bandwidths: ['20/s burst 20']
    growth: {threshold: 0.5, window: 1s, step: 0.5, max_factor: 2, max_rise: {factor: 4, within: 1s}}
default_plan: grow
clients: {f: {fixed: true}}
responses: {ratelimit_headers: always}
state: {growth_file: growth.json}
";

fn config(up: &Upstream) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams: {{u: {{targets: ['{}']}}}}
policy: policy.yaml
log: {{decisions: decisions.jsonl}}
",
        up.addr
    )
}

/// The `q` of the `grow-0` item of `RateLimit-Policy`.
fn q_of(policy: &str) -> Option<u64> {
    policy
        .split(',')
        .find(|i| i.trim().starts_with("\"grow-0\""))?
        .split(';')
        .find_map(|p| p.trim().strip_prefix("q="))?
        .parse()
        .ok()
}

async fn q_now(c: &Client, gw: &Gateway, key: &str) -> u64 {
    let r = c.get_with(&gw.url("/x"), &[("x-api-key", key)]).await;
    q_of(r.header("ratelimit-policy")).unwrap_or_else(|| panic!("{:?}", r.headers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_client_grows_to_its_bound_keeps_it_across_a_restart_and_an_operator_resets_it() {
    let up = Upstream::start().await;
    let dir = Gateway::tempdir();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).expect("policy");
    let mut gw = Gateway::start_in(dir.clone(), &config(&up));
    let c = Client::new();

    // Both clients send back to back; every quota seen is recorded, in order.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut seen_a, mut seen_f) = (vec![20u64], vec![20u64]);
    while Instant::now() < deadline && seen_a.last() != Some(&40) {
        for (key, seen) in [("a", &mut seen_a), ("f", &mut seen_f)] {
            let q = q_now(&c, &gw, key).await;
            if seen.last() != Some(&q) {
                seen.push(q);
            }
        }
    }
    assert_eq!(seen_a, vec![20, 30, 40], "×1.5 a window, bounded at ×2");
    assert_eq!(seen_f, vec![20], "a fixed quota never grows");

    // The admin API and the metrics say so; the decision log has the steps with their reason.
    let body = c.get(&gw.admin_url("/clients/a")).await.body;
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["growth"]["steps"], 2, "{v}");
    assert_eq!(v["growth"]["factor"], 2.0, "{v}");
    assert_eq!(v["bandwidths"][0]["quota"], 40, "{v}");
    let f: serde_json::Value =
        serde_json::from_slice(&c.get(&gw.admin_url("/clients/f")).await.body).expect("json");
    assert!(f["growth"].is_null(), "{f}");
    let metrics =
        String::from_utf8_lossy(&c.get(&gw.admin_url("/metrics")).await.body).into_owned();
    assert!(
        metrics.contains("fairgate_growth_total{plan=\"grow\",action=\"growth\"} 2"),
        "{metrics}"
    );

    // The growth file is written within the pruner's period; then a crash and a restart.
    let file = dir.path().join("growth.json");
    let written = fairgate_tests::eventually(Duration::from_secs(15), || async {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .contains("\"steps\": 2")
    })
    .await;
    assert!(
        written,
        "growth.json: {:?}",
        std::fs::read_to_string(&file).ok()
    );
    let log = std::fs::read_to_string(dir.path().join("decisions.jsonl")).unwrap_or_default();
    let steps: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"action\":\"growth\""))
        .collect();
    assert_eq!(steps.len(), 2, "{log}");
    assert!(
        steps[0].contains("\"client\":\"a\"") && steps[0].contains("\"usage\":"),
        "{}",
        steps[0]
    );
    gw.kill();
    let gw = Gateway::start_in(dir.clone(), &config(&up));
    assert_eq!(
        q_now(&c, &gw, "a").await,
        40,
        "the grown quota survives a restart"
    );

    // An operator resets it: the base quota again, and the file follows.
    let r = c
        .request("DELETE", &gw.admin_url("/clients/a/growth"), &[], empty())
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(q_now(&c, &gw, "a").await, 20);
    let again = c
        .request("DELETE", &gw.admin_url("/clients/a/growth"), &[], empty())
        .await;
    assert_eq!(again.status, 404);
    assert_eq!(std::fs::read_to_string(&file).expect("file").trim(), "{}");
}

#[test]
fn growth_settings_are_checked() {
    let dir = tempfile::tempdir().expect("dir");
    let check = |policy: &str| {
        let p = dir.path().join("p.yaml");
        std::fs::write(&p, policy).expect("write");
        let out = std::process::Command::new(fairgate_tests::fairgate_bin())
            .arg("check")
            .arg(&p)
            .output()
            .expect("fairgate check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let base = "version: 1\nplans:\n  p:\n    bandwidths: ['10/s']\n";
    let (code, out) = check(&format!(
        "{base}    growth: {{max_factor: 2}}\nstate: {{growth_file: g.json}}\n"
    ));
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = check(&format!("{base}    growth: {{max_factor: 2}}\n"));
    assert_eq!(code, Some(1));
    assert!(out.contains("`growth` needs `state.growth_file`"), "{out}");
    let (code, out) = check(&format!(
        "{base}    fixed: true\n    growth: {{max_factor: 2}}\nstate: {{growth_file: g.json}}\n"
    ));
    assert_eq!(code, Some(1));
    assert!(
        out.contains("p.yaml:6:13: plans.p.growth: a fixed quota is never grown"),
        "{out}"
    );
    let (code, out) = check(&format!(
        "{base}    growth: {{max_factor: 1, step: 0, window: 0s}}\nstate: {{growth_file: g.json}}\n"
    ));
    assert_eq!(code, Some(1));
    assert!(
        out.contains("plans.p.growth.max_factor: 1 is out of range"),
        "{out}"
    );
    assert!(
        out.contains("plans.p.growth.step: 0 is out of range"),
        "{out}"
    );
    assert!(
        out.contains("plans.p.growth.window: 0s is out of range"),
        "{out}"
    );
    let (code, out) = check(&format!(
        "{base}    growth: {{max_factor: 2, step: 0.5, max_rise: {{factor: 1.2}}}}\nstate: {{growth_file: g.json}}\n"
    ));
    assert_eq!(code, Some(1));
    assert!(
        out.contains("`max_rise.factor` 1.2 is below one step"),
        "{out}"
    );
}

/// With `backend: redis` growth is the fleet's: two gateways each see half of a client's
/// traffic (usage ≈ 0.5 each, under the 0.7 threshold), the fleet sees all of it (≈ 1), so
/// the client grows, once per window for the fleet, on both gateways; its steps live in Redis
/// and survive both gateways' restart; an operator's reset clears them for the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_growth_is_the_fleets_and_survives_every_gateways_restart() {
    use fairgate_tests::redis::{fleet_config, wait_fleet, RedisServer};

    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let cfg = fleet_config(&up, &redis.url(), "async", "local", "20/s burst 20")
        .replace(
            "plans: {free: {bandwidths: ['20/s burst 20']}}",
            "plans:\n    free:\n      bandwidths: ['20/s burst 20']\n      growth: {threshold: 0.7, window: 1s, step: 0.5, max_factor: 2, max_rise: {factor: 4, within: 1s}}",
        )
        .replace(
            "  default_plan: free\n",
            "  default_plan: free\n  responses: {ratelimit_headers: always}\n",
        );
    assert!(cfg.contains("growth:"), "{cfg}");
    let q_of = |policy: &str| -> Option<u64> {
        policy
            .split(';')
            .find_map(|p| p.trim().strip_prefix("q="))?
            .parse()
            .ok()
    };
    let q_at = |gw: &Gateway| {
        let url = gw.url("/x");
        async move {
            let r = Client::new().get_with(&url, &[("x-api-key", "a")]).await;
            q_of(r.header("ratelimit-policy")).unwrap_or_else(|| panic!("{:?}", r.headers))
        }
    };
    let gws = vec![Gateway::start(&cfg), Gateway::start(&cfg)];
    wait_fleet(&gws).await;

    let deadline = Instant::now() + Duration::from_secs(40);
    let mut seen = vec![20u64];
    while Instant::now() < deadline && seen.last() != Some(&40) {
        for gw in &gws {
            let q = q_at(gw).await;
            if seen.last() != Some(&q) && !seen.contains(&q) {
                seen.push(q);
            }
        }
    }
    assert_eq!(
        seen,
        vec![20, 30, 40],
        "×1.5 a window for the fleet, bounded at ×2"
    );
    // Both gateways apply it (the other learns it from its next report).
    for gw in &gws {
        let ok =
            fairgate_tests::eventually(Duration::from_secs(5), || async { q_at(gw).await == 40 })
                .await;
        assert!(ok, "every gateway applies the fleet's growth");
    }
    assert_eq!(
        redis
            .cli(&["--raw", "HGET", "fairgate:{a}:growth", "steps"])
            .trim(),
        "2"
    );
    // One step logged per step for the fleet (by the gateway whose report took it).
    let steps: usize = gws
        .iter()
        .map(|g| g.stderr().matches("quota grown").count())
        .sum();
    assert_eq!(steps, 2);

    // Both gateways restart: the fleet's growth is still there (learnt at the first report).
    drop(gws);
    let gws = vec![Gateway::start(&cfg), Gateway::start(&cfg)];
    wait_fleet(&gws).await;
    let ok = fairgate_tests::eventually(Duration::from_secs(5), || async {
        q_at(&gws[0]).await == 40
    })
    .await;
    assert!(ok, "the grown quota survives the restart of every gateway");

    // An operator resets it: gone from Redis, base quota here at once.
    let r = Client::new()
        .request(
            "DELETE",
            &gws[0].admin_url("/clients/a/growth"),
            &[],
            empty(),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        redis
            .cli(&["--raw", "EXISTS", "fairgate:{a}:growth"])
            .trim(),
        "0"
    );
    assert_eq!(q_at(&gws[0]).await, 20);
}

#[test]
fn a_growth_file_is_refused_with_redis() {
    let dir = tempfile::tempdir().expect("dir");
    let p = dir.path().join("p.yaml");
    std::fs::write(
        &p,
        "version: 1\nplans: {p: {bandwidths: ['10/s'], growth: {max_factor: 2}}}\nstate:\n  backend: redis\n  redis: {url: 'redis://127.0.0.1:1'}\n  growth_file: g.json\n",
    )
    .expect("write");
    let out = std::process::Command::new(fairgate_tests::fairgate_bin())
        .arg("check")
        .arg(&p)
        .output()
        .expect("fairgate check");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("state.growth_file: `growth_file` is for `backend: local`"),
        "{text}"
    );
}
