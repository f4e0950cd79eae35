use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use fairgate_policies::PolicyStore;

use super::*;
use crate::decision::{Decision, Stage};
use crate::engine::{Begun, Engine, RequestFacts};
use crate::ManualClock;

const S: u64 = 1_000_000_000;

/// 10/s burst 5 per client, 2 in flight; `/health` bypasses the quota.
const POLICY: &str = "version: 1
plans:
  free:
    bandwidths: ['10/s burst 5']
    concurrency: 2
default_plan: free
rules:
  - name: health
    when: {path: /health}
    action: allow
";

fn engine() -> (Arc<Engine>, Arc<ManualClock>) {
    let store = PolicyStore::from_yaml_str(POLICY, "test.yaml").expect("policy");
    let clock = ManualClock::new(1000 * S);
    (Engine::with_clock(store, clock.clone()), clock)
}

fn facts(peer: &IpAddr, path: &'static str) -> RequestFacts<'static> {
    RequestFacts {
        peer: *peer,
        method: "GET",
        host: "example.test",
        path,
        query: None,
        operation: None,
        headers: &(),
    }
}

fn ip(n: u8) -> IpAddr {
    IpAddr::from([192, 0, 2, n])
}

/// A decision as comparable values: admitted, stage, status, retry-after, bandwidth.
type Seen = (bool, Option<Stage>, u16, Option<Duration>, Option<String>);

fn seen(d: &Decision) -> Seen {
    match d {
        Decision::Admit(_) => (true, None, 0, None, None),
        Decision::Reject(r) => (
            false,
            Some(r.stage),
            r.status,
            r.retry_after,
            r.bandwidth.as_deref().map(str::to_owned),
        ),
    }
}

/// A scripted run over three clients: bursts, rejections, held tickets, time passing.
fn script(engine: &Engine, clock: &ManualClock) -> Vec<Seen> {
    let mut out = Vec::new();
    let mut held = Vec::new();
    for round in 0..6u8 {
        for n in 1..=3u8 {
            for i in 0..4u8 {
                let path = if i == 3 { "/health" } else { "/" };
                let d = engine.decide(&facts(&ip(n), path));
                out.push(seen(&d));
                // Some tickets stay in flight across rounds (the concurrency quota).
                if (round + n + i) % 5 == 0 {
                    held.push(d);
                }
            }
        }
        if round % 2 == 1 {
            held.clear();
        }
        clock.advance(Duration::from_millis(150));
    }
    out
}

#[test]
fn embedded_attached_explicitly_decides_as_the_default() {
    let (default, c1) = engine();
    let (explicit, c2) = engine();
    assert!(explicit.attach_backend(Arc::new(Embedded)));
    assert_eq!(explicit.backend().route(true), Route::Local);
    let a = script(&default, &c1);
    let b = script(&explicit, &c2);
    assert_eq!(a, b);
    // The run exercised admits and both kinds of quota rejection.
    assert!(a.iter().any(|s| s.0));
    assert!(a.iter().any(|s| s.1 == Some(Stage::Quota)));
    assert!(a.iter().any(|s| s.1 == Some(Stage::Concurrency)));
    assert_eq!(default.backend_snapshot(), None);
    assert_eq!(explicit.backend_snapshot(), None);
    assert_eq!(default.in_flight(), 0);
    assert_eq!(explicit.in_flight(), 0);
}

#[test]
fn the_first_backend_attached_stays() {
    let (e, _) = engine();
    assert!(e.attach_backend(Arc::new(Fixed::new(Route::Reject))));
    assert!(!e.attach_backend(Arc::new(Embedded)));
    assert_eq!(e.backend().route(false), Route::Reject);
}

/// A remote check as asked: client, cost, lease.
type Checked = (String, u64, Option<(u32, u64)>);

/// An in-test backend: routes every request the same way, answers remote checks with
/// a fixed verdict, and counts every call the engine makes.
#[derive(Debug)]
struct Fixed {
    route: Route,
    verdict: Verdict,
    on_failure: OnFailure,
    routed: Mutex<Vec<bool>>,
    recorded: Mutex<Vec<(String, usize, u64)>>,
    checked: Mutex<Vec<Checked>>,
    leases_held: Arc<AtomicU64>,
    leases_released: Arc<AtomicU64>,
    fm_admits: AtomicU64,
    fm_rejects: AtomicU64,
}

impl Fixed {
    fn new(route: Route) -> Fixed {
        Fixed {
            route,
            verdict: Verdict::Admit,
            on_failure: OnFailure::Closed,
            routed: Mutex::default(),
            recorded: Mutex::default(),
            checked: Mutex::default(),
            leases_held: Arc::default(),
            leases_released: Arc::default(),
            fm_admits: AtomicU64::new(0),
            fm_rejects: AtomicU64::new(0),
        }
    }

    fn verdict(mut self, v: Verdict) -> Fixed {
        self.verdict = v;
        self
    }

    fn on_failure(mut self, f: OnFailure) -> Fixed {
        self.on_failure = f;
        self
    }
}

/// A lease guard counting its release.
struct Released(Arc<AtomicU64>);

impl Drop for Released {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl StateBackend for Fixed {
    fn route(&self, remote_ok: bool) -> Route {
        self.routed.lock().unwrap().push(remote_ok);
        self.route
    }

    fn record(&self, client: &str, bandwidths: &Arc<[CompiledBandwidth]>, cost: u64) {
        self.recorded
            .lock()
            .unwrap()
            .push((client.to_owned(), bandwidths.len(), cost));
    }

    fn record_rule(&self, _key: &str, _bandwidth: &CompiledBandwidth) {}

    fn remote_rules(&self) -> bool {
        true
    }

    fn remote_check<'a>(
        &'a self,
        client: &'a str,
        _rules: &'a [RuleBucket],
        _bandwidths: &'a [CompiledBandwidth],
        cost: u64,
        lease: Option<(u32, u64)>,
    ) -> CheckFuture<'a> {
        self.checked
            .lock()
            .unwrap()
            .push((client.to_owned(), cost, lease));
        Box::pin(std::future::ready(self.verdict))
    }

    fn on_failure(&self) -> OnFailure {
        self.on_failure
    }

    fn new_lease_id(&self) -> u64 {
        42
    }

    fn hold_lease(self: Arc<Self>, id: u64, _client: &str) -> Box<dyn Send + Sync> {
        assert_eq!(id, 42);
        self.leases_held.fetch_add(1, Ordering::Relaxed);
        Box::new(Released(Arc::clone(&self.leases_released)))
    }

    fn count_failure_admit(&self) {
        self.fm_admits.fetch_add(1, Ordering::Relaxed);
    }

    fn count_failure_reject(&self) {
        self.fm_rejects.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Option<BackendSnapshot> {
        Some(BackendSnapshot {
            failure_mode_admits: self.fm_admits.load(Ordering::Relaxed),
            failure_mode_rejects: self.fm_rejects.load(Ordering::Relaxed),
            ..BackendSnapshot::default()
        })
    }
}

fn with(backend: Fixed) -> (Arc<Engine>, Arc<Fixed>) {
    let (e, _) = engine();
    let b = Arc::new(backend);
    assert!(e.attach_backend(Arc::clone(&b) as Arc<dyn StateBackend>));
    (e, b)
}

#[test]
fn a_backend_routing_reject_rejects_every_quota_request_with_503() {
    let (e, b) = with(Fixed::new(Route::Reject));
    for _ in 0..3 {
        let s = seen(&e.decide(&facts(&ip(1), "/")));
        assert_eq!((s.0, s.1, s.2), (false, Some(Stage::Backend), 503));
    }
    // `allow` bypasses the quota: the backend is not asked.
    assert!(e.decide(&facts(&ip(1), "/health")).is_admit());
    assert_eq!(*b.routed.lock().unwrap(), [false; 3]);
    let snap = e.backend_snapshot().expect("snapshot through the trait");
    assert_eq!(
        (snap.failure_mode_rejects, snap.failure_mode_admits),
        (3, 0)
    );
    assert_eq!(e.backend_snapshot(), Some(snap));
    assert!(b.recorded.lock().unwrap().is_empty());
    assert_eq!(e.in_flight(), 0, "a rejection holds nothing");
}

#[test]
fn a_backend_routing_admit_skips_the_local_bandwidths() {
    let (e, b) = with(Fixed::new(Route::Admit));
    // Far beyond the local burst of 5: all admitted, each counted as a failure admit.
    for _ in 0..20 {
        assert!(e.decide(&facts(&ip(1), "/")).is_admit());
    }
    assert_eq!(b.fm_admits.load(Ordering::Relaxed), 20);
    assert!(b.recorded.lock().unwrap().is_empty());
    // The concurrency quota is still the local store's.
    let t1 = e.decide(&facts(&ip(1), "/"));
    let t2 = e.decide(&facts(&ip(1), "/"));
    let s = seen(&e.decide(&facts(&ip(1), "/")));
    assert_eq!((s.0, s.1), (false, Some(Stage::Concurrency)));
    drop((t1, t2));
}

#[test]
fn shared_and_degraded_routes_decide_locally_and_record_admitted_cost() {
    for route in [Route::Shared, Route::Degraded] {
        let (e, b) = with(Fixed::new(route));
        let admitted = (0..20)
            .filter(|_| e.decide(&facts(&ip(7), "/")).is_admit())
            .count();
        assert_eq!(admitted, 5, "{route:?}: the local burst decides");
        let rec = b.recorded.lock().unwrap().clone();
        assert_eq!(rec, vec![("192.0.2.7".to_owned(), 1, 1); 5], "{route:?}");
        let fm = if route == Route::Degraded { 5 } else { 0 };
        assert_eq!(b.fm_admits.load(Ordering::Relaxed), fm, "{route:?}");
    }
}

fn remote(e: &Engine, path: &'static str) -> crate::engine::RemoteCheck {
    match e.begin(&facts(&ip(9), path)) {
        Begun::Remote(check) => check,
        Begun::Decided(d) => panic!("expected a remote check, got {:?}", seen(&d)),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_remote_route_defers_the_quota_to_the_backends_check() {
    // Admit: the lease taken by the check is held by the ticket until it drops.
    let (e, b) = with(Fixed::new(Route::Remote));
    for _ in 0..10 {
        let d = remote(&e, "/").resolve().await;
        assert!(d.is_admit(), "the local burst of 5 is not consulted");
    }
    assert_eq!(b.checked.lock().unwrap().len(), 10);
    assert_eq!(
        b.checked.lock().unwrap()[0],
        ("192.0.2.9".to_owned(), 1, Some((2, 42)))
    );
    assert_eq!(b.leases_held.load(Ordering::Relaxed), 10);
    assert_eq!(b.leases_released.load(Ordering::Relaxed), 10);
    let d = remote(&e, "/").resolve().await;
    assert_eq!(b.leases_released.load(Ordering::Relaxed), 10);
    drop(d);
    assert_eq!(b.leases_released.load(Ordering::Relaxed), 11);
    // A synchronous caller cannot wait: the backend is asked with `remote_ok: false`.
    assert!(e.decide(&facts(&ip(9), "/health")).is_admit());
    let _ = e.decide(&facts(&ip(9), "/"));
    assert_eq!(b.routed.lock().unwrap().last(), Some(&false));
    assert_eq!(e.in_flight(), 0);

    // Reject: a 429 naming the bandwidth, retry-after from the verdict's wait.
    let (e, _) = with(Fixed::new(Route::Remote).verdict(Verdict::Reject {
        index: 0,
        wait: 2 * S + 1,
        tat_ahead: S,
    }));
    let s = seen(&remote(&e, "/").resolve().await);
    assert_eq!(
        s,
        (
            false,
            Some(Stage::Quota),
            429,
            Some(Duration::from_secs(3)),
            Some(s.4.clone().expect("a bandwidth"))
        )
    );
    assert_eq!(e.in_flight(), 0, "the rejection released the ticket");

    // Busy: the concurrency limit.
    let (e, _) = with(Fixed::new(Route::Remote).verdict(Verdict::Busy));
    let s = seen(&remote(&e, "/").resolve().await);
    assert_eq!((s.0, s.1, s.2), (false, Some(Stage::Concurrency), 429));

    // Unavailable: the backend's `on_failure` decides.
    let (e, b) = with(
        Fixed::new(Route::Remote)
            .verdict(Verdict::Unavailable)
            .on_failure(OnFailure::Closed),
    );
    let s = seen(&remote(&e, "/").resolve().await);
    assert_eq!((s.0, s.2), (false, 503));
    assert_eq!(b.fm_rejects.load(Ordering::Relaxed), 1);
    let (e, b) = with(
        Fixed::new(Route::Remote)
            .verdict(Verdict::Unavailable)
            .on_failure(OnFailure::Open),
    );
    assert!(remote(&e, "/").resolve().await.is_admit());
    assert_eq!(b.fm_admits.load(Ordering::Relaxed), 1);
    let (e, b) = with(
        Fixed::new(Route::Remote)
            .verdict(Verdict::Unavailable)
            .on_failure(OnFailure::Local),
    );
    let admitted = {
        let mut n = 0;
        for _ in 0..8 {
            n += usize::from(remote(&e, "/").resolve().await.is_admit());
        }
        n
    };
    assert_eq!(admitted, 5, "local fallback: the local burst decides");
    assert_eq!(b.recorded.lock().unwrap().len(), 5);
    assert_eq!(b.leases_held.load(Ordering::Relaxed), 0);
}
