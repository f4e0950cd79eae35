//! Engine behaviour under a manual clock: exact counts.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use fairgate_middleware::{
    CompletionEvent, Decision, DecisionEvent, DecisionKind, Observer, Outcome, Priority, Stage,
};

#[test]
fn burst_then_steady_rate() {
    let (e, clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: ['10/s burst 5']
default_plan: free
",
    );
    let r = Req::from("192.0.2.1");
    assert_eq!(admit_n(&e, &r, 20), 5, "the burst");
    // 10/s: one every 100 ms.
    for _ in 0..30 {
        clock.advance(ms(100));
        assert_eq!(admit_n(&e, &r, 3), 1, "steady rate");
    }
    // Rejections consumed nothing: after 500 ms idle the burst is exactly back.
    clock.advance(ms(500));
    assert_eq!(admit_n(&e, &r, 20), 5);
    // Another client has its own bucket.
    assert_eq!(admit_n(&e, &Req::from("192.0.2.2"), 20), 5);
}

/// A decision as seen: kind, stage, rule, bandwidth, status.
type Seen = (
    DecisionKind,
    Option<Stage>,
    Option<String>,
    Option<String>,
    u16,
);

/// Records observer events as owned values.
#[derive(Default)]
struct Recorder {
    decisions: Mutex<Vec<Seen>>,
    completions: Mutex<Vec<(String, u16, u64, u64)>>,
}

impl Observer for Recorder {
    fn on_decision(&self, e: &DecisionEvent<'_>) {
        self.decisions.lock().unwrap().push((
            e.kind,
            e.stage,
            e.rule.map(str::to_owned),
            e.bandwidth.map(str::to_owned),
            e.status,
        ));
    }
    fn on_complete(&self, e: &CompletionEvent<'_>) {
        self.completions.lock().unwrap().push((
            e.client_key.to_owned(),
            e.status,
            e.response_bytes,
            e.post_hoc_cost,
        ));
    }
}

fn rejection(d: Decision) -> fairgate_middleware::Rejection {
    match d {
        Decision::Reject(r) => r,
        Decision::Admit(a) => panic!("expected a rejection, got {a:?}"),
    }
}

fn ticket(d: Decision) -> fairgate_middleware::Ticket {
    match d {
        Decision::Admit(a) => a.ticket,
        Decision::Reject(r) => panic!("expected an admit, got {r:?}"),
    }
}

/// Rejections of one bucket are told to come back one after another, at its refill rate
/// (`retry_stagger`), never before its reset and at most `retry_stagger` later; a retry that
/// comes at its turn is admitted.
#[test]
fn rejections_of_one_bucket_are_told_successive_turns() {
    let (e, clock, _) = engine(
        "version: 1
plans:
  free: {bandwidths: ['3/h burst 3']}
default_plan: free
responses: {retry_stagger: 1h}
",
    );
    let r = Req::from("192.0.2.1");
    assert_eq!(admit_n(&e, &r, 3), 3);
    let told: Vec<u64> = (0..6)
        .map(|_| rejection(r.decide(&e)).retry_after.unwrap().as_secs())
        .collect();
    assert_eq!(
        told,
        [1200, 2400, 3600, 4800, 4800, 4800],
        "20 min apart, capped at +1h"
    );
    // Another client's bucket has its own turns.
    let other = Req::from("192.0.2.2");
    assert_eq!(admit_n(&e, &other, 3), 3);
    assert_eq!(
        rejection(other.decide(&e)).retry_after,
        Some(Duration::from_secs(1200))
    );
    // The first turn comes: that retry is admitted.
    clock.advance(Duration::from_secs(1200));
    assert_eq!(admit_n(&e, &r, 1), 1);
}

#[test]
fn composite_bandwidths_are_all_or_nothing() {
    let (e, _clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: ['100/s burst 10', '3/h burst 3']
default_plan: free
responses: {retry_stagger: off}
",
    );
    let r = Req::from("192.0.2.1");
    assert_eq!(admit_n(&e, &r, 3), 3);
    for _ in 0..10 {
        let rej = rejection(r.decide(&e));
        assert_eq!(rej.stage, Stage::Quota);
        assert_eq!(rej.bandwidth.as_deref(), Some("free-1"));
        assert_eq!(rej.status, 429);
        // 3/h: the next unit in 20 min.
        assert_eq!(rej.retry_after, Some(Duration::from_secs(1200)));
    }
    let usage = e.client_usage("192.0.2.1").unwrap();
    assert_eq!(usage.plan.as_deref(), Some("free"));
    assert_eq!(
        usage.bandwidths[0].ratelimit.remaining, 7,
        "rejections took nothing from free-0"
    );
    assert_eq!(usage.bandwidths[1].ratelimit.remaining, 0);
}

#[test]
fn operation_cost_and_post_hoc_debt() {
    let (e, clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: ['10/s burst 10']
default_plan: free
operations:
  - name: export
    when: {path: {prefix: /export}}
    cost: 5
  - name: download
    when: {path: {prefix: /download}}
    post_hoc: {bytes: 1000}
",
    );
    let export = Req::from("192.0.2.1").path("/export/all");
    assert_eq!(admit_n(&e, &export, 5), 2, "10 units, 5 each");
    clock.advance(ms(499));
    assert!(!admit(&e, &export), "4.99 units back: not enough");
    clock.advance(ms(1));
    assert!(admit(&e, &export), "5 units back");
    // The operation can be named by the adapter instead of matched.
    clock.advance(Duration::from_secs(1));
    let named = Req::from("192.0.2.1").op("export");
    assert_eq!(admit_n(&e, &named, 5), 2);

    // Post-hoc: 25,000 bytes at 1 unit per 1000 bytes is 25 units of debt.
    let rec = Arc::new(Recorder::default());
    e.set_observer(rec.clone());
    let c = Req::from("192.0.2.9").path("/download/x");
    let t = ticket(c.decide(&e));
    t.complete(Outcome {
        status: 200,
        response_bytes: 25_999,
        latency: ms(5),
    });
    assert_eq!(
        rec.completions.lock().unwrap()[0].3,
        25,
        "floor(25999 / 1000)"
    );
    // Used: 1 up front + 25 debt = 26 units = 2.6 s, capacity 1 s: one more unit fits
    // once 2.6 + 0.1 − waited ≤ 1, i.e. after 1.7 s.
    let rej = rejection(c.decide(&e));
    assert_eq!(rej.retry_after, Some(Duration::from_secs(2)));
    clock.advance(ms(1699));
    assert!(!admit(&e, &c));
    clock.advance(ms(1));
    assert!(admit(&e, &c), "debt repaid");
    assert!(!admit(&e, &c));
}

#[test]
fn concurrency_permits_are_released_exactly_once_and_survive_reload() {
    let policy = |n: u32| {
        format!(
            "version: 1
plans:
  p:
    concurrency: {n}
default_plan: p
"
        )
    };
    let (e, _clock, store) = engine(&policy(2));
    let r = Req::from("192.0.2.1");
    let t1 = ticket(r.decide(&e));
    let t2 = ticket(r.decide(&e));
    let rej = rejection(r.decide(&e));
    assert_eq!((rej.stage, rej.status), (Stage::Concurrency, 429));
    assert_eq!(e.in_flight(), 2);
    assert!(admit(&e, &Req::from("192.0.2.2")), "per client");
    drop(t1);
    assert_eq!(e.in_flight(), 1);
    let t3 = ticket(r.decide(&e));
    // Lower the limit to 1 with 2 in flight: nothing new until in flight < 1.
    store.reload_from_str(&policy(1), "test.yaml").unwrap();
    assert!(!admit(&e, &r));
    drop(t2);
    assert!(!admit(&e, &r), "still 1 in flight");
    t3.complete(Outcome {
        status: 200,
        response_bytes: 0,
        latency: ms(1),
    });
    assert_eq!(e.client_usage("192.0.2.1").unwrap().in_flight, 0);
    let t4 = ticket(r.decide(&e));
    assert!(!admit(&e, &r));
    drop(t4);
    assert_eq!(e.in_flight(), 0);
}

#[test]
fn burst_sharing_admits_while_spare_and_stops_at_below_utilization() {
    let (e, _clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: ['1/min burst 1']
default_plan: free
burst_sharing: {enabled: true, below_utilization: 0.7}
shedding:
  limit: {static: 10}
",
    );
    let greedy = Req::from("192.0.2.1");
    let mut held = vec![ticket(greedy.decide(&e))];
    assert!(!held[0].borrowed());
    // Over quota, but the service is idle: borrowed, until utilisation reaches 0.7.
    for i in 1..7 {
        let t = ticket(greedy.decide(&e));
        assert!(t.borrowed(), "request {i}");
        assert_eq!(t.priority(), Priority::Borrowed);
        held.push(t);
    }
    assert_eq!(e.in_flight(), 7);
    let rej = rejection(greedy.decide(&e));
    assert_eq!(rej.stage, Stage::Quota, "no more borrowing at 70 %");
    // Other clients within quota still get in, up to the normal threshold (0.9 × 10).
    for i in 0..2 {
        assert!(!ticket(Req::from(&format!("192.0.2.{}", 10 + i)).decide(&e)).borrowed());
    }
    // Borrowed tickets did not consume the greedy client's bucket.
    let usage = e.client_usage("192.0.2.1").unwrap();
    assert_eq!(usage.bandwidths[0].ratelimit.remaining, 0);
}

#[test]
fn shedding_follows_priority_classes() {
    let (e, _clock, _) = engine(
        "version: 1
rules:
  - name: critical
    when: {headers: [{name: x-class, value: critical}]}
    action: {tag: {priority: critical}}
  - name: batch
    when: {headers: [{name: x-class, value: batch}]}
    action: {tag: {priority: sheddable}}
shedding:
  limit: {static: 10}
",
    );
    let batch = Req::from("192.0.2.1").header("x-class", "batch");
    let normal = Req::from("192.0.2.2");
    let critical = Req::from("192.0.2.3").header("x-class", "critical");
    let mut held = Vec::new();
    let mut take = |r: &Req| match r.decide(&e) {
        Decision::Admit(a) => {
            held.push(a.ticket);
            true
        }
        Decision::Reject(rej) => {
            assert_eq!((rej.stage, rej.status), (Stage::Shed, 503));
            assert_eq!(rej.retry_after, Some(Duration::from_secs(1)));
            false
        }
    };
    let count = |take: &mut dyn FnMut(&Req) -> bool, r: &Req| (0..20).filter(|_| take(r)).count();
    assert_eq!(count(&mut take, &batch), 5, "sheddable up to 0.5");
    assert_eq!(count(&mut take, &normal), 4, "normal up to 0.9");
    assert_eq!(count(&mut take, &critical), 1, "critical up to 1.0");
    assert_eq!(e.in_flight(), 10);
    assert_eq!(e.shed_limit(), Some(10));
    drop(held);
    assert_eq!(e.in_flight(), 0);
}

#[test]
fn shed_after_quota_refunds_the_quota() {
    let (e, _clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: ['1/min burst 3']
default_plan: free
shedding:
  limit: {static: 1}
",
    );
    let other = ticket(Req::from("192.0.2.9").decide(&e));
    let r = Req::from("192.0.2.1");
    for _ in 0..10 {
        assert_eq!(rejection(r.decide(&e)).stage, Stage::Shed);
    }
    drop(other);
    assert_eq!(admit_n(&e, &r, 10), 3, "the whole burst is still there");
}

#[test]
fn reject_delay_tracks_success_latency() {
    let (e, _clock, _) = engine(
        "version: 1
shedding:
  limit: {static: 1}
  reject_delay: {max: 50ms, max_waiting: 1}
",
    );
    let r = Req::from("192.0.2.1");
    let t = ticket(r.decide(&e));
    let rej = rejection(r.decide(&e));
    assert_eq!(rej.delay, None, "no latency known yet");
    t.complete(Outcome {
        status: 200,
        response_bytes: 0,
        latency: ms(30),
    });
    let _t = ticket(r.decide(&e));
    let first = rejection(r.decide(&e));
    assert_eq!(first.delay, Some(ms(30)));
    let second = rejection(r.decide(&e));
    assert_eq!(second.delay, None, "max_waiting = 1");
    drop(first);
    assert_eq!(rejection(r.decide(&e)).delay, Some(ms(30)));
}

const TRUSTED: &str = "version: 1
identify:
  trusted_proxies: [127.0.0.2/32]
plans:
  free:
    bandwidths: ['1/min burst 5']
default_plan: free
";

#[test]
fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let (e, _clock, _) = engine(TRUSTED);
    let admitted = (0..50)
        .filter(|i| {
            let r = Req::from("127.0.0.3").header("x-forwarded-for", &format!("198.51.100.{i}"));
            admit(&e, &r)
        })
        .count();
    assert_eq!(admitted, 5, "one bucket: the peer's");
    // From the trusted proxy, each forwarded client has its own bucket.
    let admitted = (0..50)
        .filter(|i| {
            let r = Req::from("127.0.0.2").header("x-forwarded-for", &format!("198.51.100.{i}"));
            admit(&e, &r)
        })
        .count();
    assert_eq!(admitted, 50);
    let r = Req::from("127.0.0.2").header("x-forwarded-for", "198.51.100.7, 192.0.2.1");
    assert_eq!(ticket(r.decide(&e)).client_key(), "192.0.2.1");
}

#[test]
fn ipv6_clients_are_aggregated_to_their_64() {
    let (e, _clock, _) = engine(TRUSTED);
    let admitted = (0..100u32)
        .filter(|i| {
            let ip = format!("2001:db8:1:2:{:x}:{:x}::{:x}", i * 7, i * 13, i);
            let r = Req::from("127.0.0.2").header("x-forwarded-for", &ip);
            admit(&e, &r)
        })
        .count();
    assert_eq!(admitted, 5, "one /64, one bucket");
    let other = Req::from("127.0.0.2").header("x-forwarded-for", "2001:db8:1:3::1");
    let t = ticket(other.decide(&e));
    assert_eq!(t.client_key(), "2001:db8:1:3::/64");
    // Direct IPv4 peers keep /32 keys.
    assert_eq!(
        ticket(Req::from("192.0.2.1").decide(&e)).client_key(),
        "192.0.2.1"
    );
}

#[test]
fn rules_deny_allow_limit_and_tag() {
    let (e, _clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: ['1/min burst 1']
  pro:
    bandwidths: ['1/min burst 3']
default_plan: free
rules:
  - name: bad-bots
    when: {user_agent: {contains: badbot}}
    action: {deny: {status: 418}}
  - name: health
    when: {path: /health}
    action: allow
  - name: login
    when: {path: /login, method: [POST]}
    action: {limit: {rate: 5/min, key: ip}}
  - name: partners
    when: {headers: [{name: x-partner, present: true}]}
    action: {tag: {plan: pro}}
",
    );
    let bot = Req::from("192.0.2.1").header("user-agent", "Mozilla badbot/1.0");
    let rej = rejection(bot.decide(&e));
    assert_eq!(
        (rej.stage, rej.status, rej.rule.as_deref()),
        (Stage::Rule, 418, Some("bad-bots"))
    );
    assert_eq!(rej.retry_after, None);

    let health = Req::from("192.0.2.2").path("/health");
    assert_eq!(admit_n(&e, &health, 10), 10, "allow bypasses the quota");

    let login = Req::from("192.0.2.3").path("/login").method("POST");
    // The plan allows 1; the login rule 5/min per IP; the plan rejects first.
    assert!(admit(&e, &login));
    let rej = rejection(login.decide(&e));
    assert_eq!(rej.stage, Stage::Quota);

    let partner = Req::from("192.0.2.4").header("x-partner", "1");
    assert_eq!(admit_n(&e, &partner, 10), 3, "tagged onto pro");
}

#[test]
fn rule_limits_count_per_key_and_roll_back() {
    let (e, _clock, _) = engine(
        "version: 1
rules:
  - name: login
    when: {path: /login}
    action: {limit: {rate: 5/min, key: ip}}
  - name: by-tenant
    when: {path: {prefix: /t}}
    action: {limit: {rate: 2/min, key: {header: x-tenant}}}
  - name: sketchy
    when: {path: /s}
    action: {limit: {rate: 3/min, estimator: sketch}}
",
    );
    let login = Req::from("192.0.2.1").path("/login");
    assert_eq!(admit_n(&e, &login, 10), 5);
    let rej = rejection(login.decide(&e));
    assert_eq!(
        (rej.stage, rej.status, rej.rule.as_deref()),
        (Stage::Rule, 429, Some("login"))
    );
    let info = rej.ratelimit.unwrap();
    assert_eq!((info.quota, info.window_secs, info.remaining), (5, 60, 0));
    assert_eq!(admit_n(&e, &Req::from("192.0.2.2").path("/login"), 10), 5);
    let t = |tenant: &str| Req::from("192.0.2.5").path("/t").header("x-tenant", tenant);
    assert_eq!(admit_n(&e, &t("a"), 5), 2);
    assert_eq!(admit_n(&e, &t("b"), 5), 2);
    assert_eq!(
        admit_n(&e, &Req::from("192.0.2.6").path("/s"), 5),
        3,
        "sketch"
    );
}

#[test]
fn shadow_rules_report_but_never_reject() {
    let yaml = |mode: &str| {
        format!(
            "version: 1
rules:
  - name: bad-bots
    mode: {mode}
    when: {{user_agent: {{contains: badbot}}}}
    action: deny
  - name: login
    mode: {mode}
    when: {{path: /login}}
    action: {{limit: {{rate: 3/min}}}}
"
        )
    };
    let (shadow, _c1, _) = engine(&yaml("shadow"));
    let (enforce, _c2, _) = engine(&yaml("enforce"));
    let rec = Arc::new(Recorder::default());
    shadow.set_observer(rec.clone());
    let bot = Req::from("192.0.2.1").header("user-agent", "badbot");
    assert_eq!(admit_n(&shadow, &bot, 4), 4);
    assert_eq!(admit_n(&enforce, &bot, 4), 0);
    let login = Req::from("192.0.2.2").path("/login");
    let shadow_admits = admit_n(&shadow, &login, 10);
    let enforce_admits = admit_n(&enforce, &login, 10);
    assert_eq!(shadow_admits, 10);
    assert_eq!(enforce_admits, 3);
    assert_eq!(
        shadow.shadow_rejects(),
        4 + 7,
        "would-reject count matches enforce mode"
    );
    let events = rec.decisions.lock().unwrap();
    let shadow_events: Vec<_> = events
        .iter()
        .filter(|e| e.0 == DecisionKind::ShadowReject)
        .collect();
    assert_eq!(shadow_events.len(), 11);
    assert_eq!(shadow_events[0].2.as_deref(), Some("bad-bots"));
    assert_eq!(shadow_events[10].2.as_deref(), Some("login"));
    assert_eq!(shadow_events[10].3.as_deref(), Some("login"));
}

#[test]
fn reload_keeps_usage_rescales_changes_and_drops_removed() {
    let yaml = |burst: u32, extra: bool| {
        let extra = if extra { ", '1000/day burst 1000'" } else { "" };
        format!(
            "version: 1
plans:
  free:
    bandwidths: ['1/s burst {burst}'{extra}]
default_plan: free
"
        )
    };
    let (e, clock, store) = engine(&yaml(10, true));
    let r = Req::from("192.0.2.1");
    assert_eq!(admit_n(&e, &r, 4), 4);
    // Identical parameters: no fresh burst.
    store.reload_from_str(&yaml(10, true), "test.yaml").unwrap();
    assert_eq!(
        e.client_usage("192.0.2.1").unwrap().bandwidths[0]
            .ratelimit
            .remaining,
        6
    );
    // Burst 10 → 20: fill fraction 0.6 kept, so 12 left.
    store.reload_from_str(&yaml(20, true), "test.yaml").unwrap();
    let u = e.client_usage("192.0.2.1").unwrap();
    assert_eq!(u.bandwidths[0].ratelimit.remaining, 12);
    assert!((u.bandwidths[0].fill_fraction - 0.6).abs() < 1e-9);
    assert_eq!(admit_n(&e, &r, 30), 12);
    let daily = |e: &fairgate_middleware::Engine| {
        e.client_usage("192.0.2.1").unwrap().bandwidths[1]
            .ratelimit
            .remaining
    };
    assert_eq!(daily(&e), 1000 - 16);
    // One entry per client: its concurrency counter and both bandwidths' buckets.
    assert_eq!(e.tracked_keys(), 1);
    // Removing the daily bandwidth drops its state on the next prune: added back, it
    // starts full.
    store
        .reload_from_str(&yaml(20, false), "test.yaml")
        .unwrap();
    e.prune();
    assert_eq!(e.tracked_keys(), 1, "the other bandwidth is still in use");
    store.reload_from_str(&yaml(20, true), "test.yaml").unwrap();
    assert_eq!(daily(&e), 1000);
    clock.advance(Duration::from_secs(60));
    e.prune();
    assert_eq!(e.tracked_keys(), 0, "full buckets carry no information");
}

#[test]
fn a_full_table_of_in_flight_keys_refuses_new_keys() {
    let (e, _clock, _) = engine(
        "version: 1
plans:
  p:
    concurrency: 5
default_plan: p
state: {max_keys: 4}
",
    );
    let held: Vec<_> = (1..=4)
        .map(|i| ticket(Req::from(&format!("192.0.2.{i}")).decide(&e)))
        .collect();
    let rej = rejection(Req::from("192.0.2.99").decide(&e));
    assert_eq!((rej.stage, rej.status), (Stage::Shed, 503));
    drop(held);
    assert!(admit(&e, &Req::from("192.0.2.99")));
}

#[test]
fn ratelimit_numbers_on_admit_when_always() {
    let (e, _clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: ['10/s burst 10', '100/min burst 3']
default_plan: free
responses: {ratelimit_headers: always}
",
    );
    let r = Req::from("192.0.2.1");
    let Decision::Admit(a) = r.decide(&e) else {
        panic!()
    };
    let info = a.ratelimit.unwrap();
    assert_eq!(&*info.bandwidth, "free-1", "the tightest bandwidth");
    assert_eq!(
        (info.quota, info.window_secs, info.burst, info.remaining),
        (100, 60, 3, 2),
        "the rate as q per w, the burst apart"
    );
    let all = info.bandwidths.as_deref().expect("the whole plan");
    assert_eq!(
        all.iter().map(|b| &*b.name).collect::<Vec<_>>(),
        ["free-0", "free-1"]
    );
}

#[test]
fn observer_sees_admits_and_rejections() {
    let (e, _clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: ['1/min burst 1']
default_plan: free
",
    );
    let rec = Arc::new(Recorder::default());
    e.set_observer(rec.clone());
    let r = Req::from("192.0.2.1");
    let t = ticket(r.decide(&e));
    let _ = r.decide(&e);
    t.complete(Outcome {
        status: 204,
        response_bytes: 7,
        latency: ms(3),
    });
    let d = rec.decisions.lock().unwrap();
    assert_eq!(d[0].0, DecisionKind::Admit);
    assert_eq!(
        d[1],
        (
            DecisionKind::Reject,
            Some(Stage::Quota),
            None,
            Some("free-0".into()),
            429
        )
    );
    assert_eq!(
        rec.completions.lock().unwrap()[0],
        ("192.0.2.1".into(), 204, 7, 0)
    );
}

#[test]
fn top_clients_by_usage() {
    let (e, _clock, _) = engine(
        "version: 1
plans:
  free:
    bandwidths: ['1/min burst 10']
default_plan: free
",
    );
    for (ip, n) in [("192.0.2.1", 2), ("192.0.2.2", 9), ("192.0.2.3", 5)] {
        admit_n(&e, &Req::from(ip), n);
    }
    let top = e.top_clients(2);
    let keys: Vec<&str> = top.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["192.0.2.2", "192.0.2.3"]);
    assert!((top[0].usage() - 0.9).abs() < 1e-9);
}
