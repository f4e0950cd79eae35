//! `fairgate audit`: the reference replay on hand-built logs (exact counts and
//! percentages), on a log written by the real engine and observer in audit mode under a
//! manual clock, and the command line's exit codes and `file:line` errors.

use std::io::{self, Write};
use std::net::IpAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fairgate_gateway::control::audit::{audit, AuditError, AuditOptions, Report};
use fairgate_gateway::control::metrics::Metrics;
use fairgate_middleware::observe::DecisionLog;
use fairgate_middleware::{Engine, ManualClock, RequestFacts};
use fairgate_policies::compiled::CompiledPolicy;
use fairgate_policies::decode::parse_policy;
use fairgate_policies::PolicyStore;

const SEC: u64 = 1_000_000_000;

const POLICY: &str = "version: 1
plans:
  free: {bandwidths: ['10/s burst 10']}
  thirds: {bandwidths: ['3/s burst 1']}
  two: {bandwidths: [{rate: 10/s, burst: 5, name: short}, {rate: 20/min, burst: 20, name: long}]}
default_plan: free
rules:
  - {name: no-admin, when: {path: {prefix: [/admin]}}, action: deny}
";

fn store(yaml: &str) -> PolicyStore {
    PolicyStore::from_policy(parse_policy(yaml, "policy.yaml").expect("policy")).expect("compile")
}

fn policy() -> Arc<CompiledPolicy> {
    store(POLICY).load_full()
}

fn exact() -> AuditOptions {
    AuditOptions { tolerance_ns: 0 }
}

fn line(client: &str, plan: &str, decision: &str, stage: Option<&str>, t: u64) -> String {
    serde_json::json!({
        "time": "2026-11-23T00:00:00.000Z", "type": "decision", "client": client,
        "route": "route0", "operation": null, "stage": stage, "rule": null, "plan": plan,
        "bandwidth": null, "cost": 1, "decision": decision, "retry_after": null, "status": null,
        "latency_ms": null, "mono_ns": t,
    })
    .to_string()
}

fn run(lines: &[String], opts: AuditOptions) -> Report {
    audit(&lines.join("\n"), "d.jsonl", &policy(), opts).expect("audit")
}

#[test]
fn a_perfect_limiter_has_no_wrong_decisions() {
    // 10/s burst 10, one request every 50 ms for 3 s from t = 1 s, judged by hand: a
    // full bucket of 10, then one unit back every 100 ms.
    let mut lines = Vec::new();
    let mut tat = 0u64;
    let (mut admits, mut rejects) = (0, 0);
    for i in 0..60u64 {
        let t = SEC + i * 50_000_000;
        if tat.max(t) + 100_000_000 - t <= SEC {
            tat = tat.max(t) + 100_000_000;
            admits += 1;
            lines.push(line("k1", "free", "admit", None, t));
        } else {
            rejects += 1;
            lines.push(line("k1", "free", "reject", Some("quota"), t));
        }
    }
    let r = run(&lines, exact());
    assert_eq!(r.decisions, 60);
    assert_eq!(r.overall.correctly_admitted, admits);
    assert_eq!(r.overall.correctly_rejected, rejects);
    assert_eq!(r.overall.wrongly_admitted, 0);
    assert_eq!(r.overall.wrongly_rejected, 0);
    assert_eq!(r.overall.borderline, 0);
    assert_eq!(r.rates.wrongly_admitted, Some(0.0));
    assert_eq!(r.over_admission_pct, 0.0);
    assert!(r.worst_windows.is_empty());
    assert_eq!(r.clients.len(), 1);
    assert!(admits > 10 && rejects > 10, "{admits} {rejects}");
}

#[test]
fn an_over_admitting_log_gives_exact_counts_and_percentages() {
    // k1 gets 25 admits at one instant on 10/s burst 10: 15 too many. k2 is rejected once
    // on a full bucket (wrongly), then admitted 10 times at one instant (correctly).
    let mut lines = Vec::new();
    for _ in 0..25 {
        lines.push(line("k1", "free", "admit", None, SEC));
    }
    lines.push(line("k2", "free", "reject", Some("quota"), SEC));
    for _ in 0..10 {
        lines.push(line("k2", "free", "admit", None, SEC + 1));
    }
    // Not judged: a rule rejection, a shed rejection, a borrowed admit.
    lines.push(line("k3", "free", "reject", Some("rule"), SEC));
    lines.push(line("k3", "free", "reject", Some("shed"), SEC));
    lines.push(line("k3", "free", "borrowed", None, SEC));
    let r = run(&lines, exact());
    let o = &r.overall;
    assert_eq!(o.correctly_admitted, 20);
    assert_eq!(o.wrongly_admitted, 15);
    assert_eq!(o.wrongly_admitted_units, 15);
    assert_eq!(o.wrongly_rejected, 1);
    assert_eq!(o.correctly_rejected, 0);
    assert_eq!((o.rule_rejected, o.shed_rejected, o.borrowed), (1, 1, 1));
    assert_eq!(o.judged(), 36);
    // Of 15 requests that should have been rejected, all were admitted.
    assert_eq!(r.rates.wrongly_admitted, Some(1.0));
    assert_eq!(r.rates.wrongly_rejected, Some(1.0 / 21.0));
    assert_eq!(r.rates.over_admission_units, Some(15.0 / 35.0));
    // The worst window: 15 units over a limit of 10 per second.
    assert_eq!(r.over_admission_pct, 150.0);
    let w = &r.worst_windows[0];
    assert_eq!(
        (w.client.as_str(), w.bandwidth.as_str(), w.over_units),
        ("k1", "free-0", 15)
    );
    assert_eq!((w.start_ns, w.length_ns), (0, SEC));
    assert_eq!(r.clients[0].client, "k1");
    assert_eq!(r.clients[0].counts.wrongly_admitted, 15);
    let k2 = r.clients.iter().find(|c| c.client == "k2").unwrap();
    assert_eq!(
        (k2.counts.wrongly_rejected, k2.counts.correctly_admitted),
        (1, 10)
    );
    let text = r.to_string();
    assert!(text.contains("wrongly admitted   15 (100.00%)"), "{text}");
    assert!(text.contains("150.00% of the limit"), "{text}");
}

#[test]
fn the_worst_window_is_one_period_long_and_every_bandwidth_is_checked() {
    // Plan `two`: 10/s burst 5 and 20/min burst 20. 5 admits at t, 5 more 100 ms apart
    // (within 10/s), then 12 more spaced at 100 ms: the short bandwidth agrees, the long
    // one (20 per minute) is exceeded after the 20th.
    let mut lines = Vec::new();
    let mut t = SEC;
    for _ in 0..5 {
        lines.push(line("k", "two", "admit", None, t));
    }
    for _ in 0..17 {
        t += 100_000_000;
        lines.push(line("k", "two", "admit", None, t));
    }
    let r = run(&lines, exact());
    assert_eq!(r.overall.correctly_admitted, 20);
    assert_eq!(r.overall.wrongly_admitted, 2);
    let w = &r.worst_windows[0];
    assert_eq!(w.bandwidth, "long");
    assert_eq!(w.over_units, 2);
    assert_eq!(w.length_ns, 60 * SEC);
    assert_eq!(w.over_admission_pct, 10.0);
}

/// A `Write` the test can read back.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs `steps` (ns to advance before each request, and the path) through the real engine
/// with a manual clock and an audit-mode observer; returns the log.
fn engine_log(yaml: &str, steps: &[(u64, &str)]) -> String {
    let clock = ManualClock::new(SEC);
    let engine = Engine::with_clock(store(yaml), clock.clone());
    let buf = Shared::default();
    let log = DecisionLog::audit_writer(Box::new(buf.clone())).with_clock(clock.clone());
    engine.set_observer(Arc::new((Metrics::new().engine().clone(), log)));
    let peer: IpAddr = "192.0.2.7".parse().unwrap();
    for &(advance, path) in steps {
        clock.advance_ns(advance);
        let facts = RequestFacts {
            peer,
            method: "GET",
            host: "",
            path,
            query: None,
            operation: None,
            headers: &(),
        };
        drop(engine.decide(&facts));
    }
    // The writer thread ends, flushing, when the engine (and its observer's sender) is gone;
    // it holds the only other handle of `buf`, so wait for that handle to go.
    drop(engine);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Arc::strong_count(&buf.0) > 1 {
        assert!(
            Instant::now() < deadline,
            "the decision-log writer never ended"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let bytes = buf.0.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn the_engine_in_audit_mode_writes_a_complete_log_the_audit_agrees_with() {
    // 400 requests, 30 ms apart, on 10/s burst 10 (which divides evenly), and an admin
    // path every 7th request (a rule rejection).
    let steps: Vec<(u64, &str)> = (0..400)
        .map(|i| (30_000_000, if i % 7 == 0 { "/admin" } else { "/" }))
        .collect();
    let text = engine_log(POLICY, &steps);
    assert_eq!(text.lines().count(), 400, "every decision is written");
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["mono_ns"].as_u64().is_some(), "{l}");
    }
    let r = audit(&text, "engine.jsonl", &policy(), exact()).unwrap();
    let o = &r.overall;
    assert_eq!(o.rule_rejected, 58);
    assert_eq!(o.wrongly_admitted + o.wrongly_rejected, 0, "{r}");
    assert_eq!(o.borderline, 0);
    assert!(o.correctly_rejected > 50, "{r}");
    assert_eq!(o.judged(), 342);
}

#[test]
fn the_engine_rounding_of_3_per_second_is_caught_exactly_and_borderline_within_1ms() {
    // 3/s burst 1: the engine's emission interval is 333_333_333 ns (rounded down), the
    // exact one 333_333_333.3… ns. Requests exactly 333_333_333 ns apart are all admitted
    // by the engine; the exact reference would reject every one after the first.
    let yaml = "version: 1\nplans: {thirds: {bandwidths: ['3/s burst 1']}}\ndefault_plan: thirds\n";
    let steps: Vec<(u64, &str)> = (0..30).map(|_| (333_333_333, "/")).collect();
    let text = engine_log(yaml, &steps);
    let pol = store(yaml).load_full();
    let r = audit(&text, "engine.jsonl", &pol, exact()).unwrap();
    assert_eq!(r.overall.correctly_admitted, 1);
    assert_eq!(r.overall.wrongly_admitted, 29);
    // 29 units in total, but spread: 4 in a 1 s window (3 emission intervals of the
    // engine are 999_999_999 ns), against 3 per second.
    assert_eq!(r.worst_windows[0].over_units, 4);
    let r = audit(&text, "engine.jsonl", &pol, AuditOptions::default()).unwrap();
    assert_eq!(r.overall.correctly_admitted, 30);
    assert_eq!(r.overall.wrongly_admitted, 0);
    assert_eq!(r.overall.borderline, 29);
}

#[test]
fn incomplete_or_broken_logs_are_errors_with_file_and_line() {
    let pol = policy();
    let err = |text: &str| match audit(text, "d.jsonl", &pol, exact()) {
        Err(e @ AuditError::Line { .. }) => e.to_string(),
        other => panic!("expected a line error, got {other:?}"),
    };
    let ok = line("k", "free", "admit", None, SEC);
    let e = err(&format!("{ok}\n{ok}\n{{not json"));
    assert!(e.starts_with("d.jsonl:3: not a decision-log line"), "{e}");
    let e = err(&format!(
        "{ok}\n{{\"time\":\"x\",\"type\":\"summary\",\"key\":\"free\",\"suppressed\":3,\"window_s\":1}}"
    ));
    assert!(e.starts_with("d.jsonl:2: a `summary` line"), "{e}");
    assert!(e.contains("audit: true"), "{e}");
    let e = err(&ok.replace(",\"mono_ns\":1000000000", ""));
    assert!(e.starts_with("d.jsonl:1: no `mono_ns`"), "{e}");
    let e = err(&line("k", "gold", "admit", None, SEC));
    assert_eq!(e, "d.jsonl:1: plan `gold` is not in the policy");
    // Blank lines are fine; an empty log is an empty report.
    let r = audit("\n\n", "d.jsonl", &pol, exact()).unwrap();
    assert_eq!(r.decisions, 0);
}

fn fairgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fairgate"))
        .args(args)
        .output()
        .expect("run fairgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_command_reports_and_exits_0_or_names_the_bad_line_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let log = dir.path().join("d.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| line("k1", "free", "admit", None, SEC + i))
        .collect();
    std::fs::write(&log, lines.join("\n")).unwrap();
    let (p, l) = (policy.to_str().unwrap(), log.to_str().unwrap());

    let (code, out, err) = fairgate(&["audit", l, "--policy", p]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrongly admitted   2 (100.00%)"), "{out}");
    assert!(out.contains("worst windows:"), "{out}");

    let (code, out, err) = fairgate(&["audit", l, "--policy", p, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json report");
    assert_eq!(v["overall"]["wrongly_admitted"], 2);
    assert_eq!(v["overall"]["correctly_admitted"], 10);
    assert_eq!(v["over_admission_pct"], 20.0);

    std::fs::write(&log, format!("{}\nnot json\n", lines[0])).unwrap();
    let (code, _, err) = fairgate(&["audit", l, "--policy", p]);
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("{l}:2: ")), "{err}");

    std::fs::write(
        &policy,
        "version: 1\nplans: {free: {bandwidths: ['ten/s']}}\n",
    )
    .unwrap();
    let (code, _, err) = fairgate(&["audit", l, "--policy", p]);
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("{p}:2:")), "{err}");

    std::fs::write(&policy, POLICY).unwrap();
    let (code, _, err) = fairgate(&["audit", "/nonexistent/d.jsonl", "--policy", p]);
    assert_eq!(code, 1, "{err}");
}
