//! Where quota state lives: the [`StateBackend`] trait the engine decides through.
//!
//! The engine always keeps its own in-process store (GCRA buckets, in-flight counts); a
//! state backend says how a request's **quota** is decided against it. The engine holds one
//! `Arc<dyn StateBackend>` ([`Engine::backend`], default [`Embedded`]) and only talks to it
//! through this trait, so it does not know which backend it has:
//!
//! - [`Embedded`] (the default): the local store decides, alone. Every method is trivial
//!   and nothing is allocated; [`StateBackend::route`] answers [`Route::Local`].
//! - the Redis backend (`fleet::Fleet`, with the `redis` feature; started by
//!   [`crate::EngineBuilder`]):
//!   `async` mode still decides on the local store ([`Route::Shared`]: memory speed, no
//!   network wait on the request) and [`StateBackend::record`]s each admitted cost for the
//!   next exchange, which pulls every gateway's buckets down to the fleet's consumption;
//!   `exact` mode answers [`Route::Remote`] and the engine awaits
//!   [`StateBackend::remote_check`] (one all-or-nothing script) through
//!   [`crate::engine::RemoteCheck`]; a degraded backend answers by its `on_failure`
//!   setting ([`Route::Degraded`], [`Route::Admit`], [`Route::Reject`]).
//!
//! `limit` rules with exact buckets go through the same backend (its route asked at
//! most once per decision, by the first rule or quota that needs it): `Route::Shared` and
//! `Route::Degraded` decide on the local bucket and [`StateBackend::record_rule`] the
//! admitted count, [`Route::Remote`] adds the rule's [`RuleBucket`] to the remote check
//! (the same all-or-nothing script as the quota), [`Route::Admit`] skips the rule and
//! [`Route::Reject`] answers 503. A request with neither a quota bandwidth nor such a rule
//! never asks the backend, so it is never affected by its failures.
//!
//! A third backend implements the same contract: a cheap, non-blocking
//! [`route`](StateBackend::route) (it runs on every decision that has quota bandwidths), a
//! [`record`](StateBackend::record) that never waits, and, if it can decide remotely, a
//! [`remote_check`](StateBackend::remote_check) that finishes within its own budget and
//! answers [`Verdict::Unavailable`] rather than hang.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fairgate_policies::compiled::CompiledBandwidth;
use fairgate_policies::model::OnFailure;

use crate::clock::Nanos;

#[cfg(doc)]
use crate::engine::Engine;

/// The counters and state of a backend that shares state (for metrics and `/health`);
/// a backend fills the fields that apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendSnapshot {
    /// True while the backend is unreachable (decisions follow `on_failure`).
    pub degraded: bool,
    /// Failed or timed-out calls to the backend.
    pub errors: u64,
    /// Calls made to the backend.
    pub calls: u64,
    /// Times the breaker opened.
    pub breaker_opens: u64,
    /// Requests admitted under `on_failure` while degraded.
    pub failure_mode_admits: u64,
    /// Requests rejected under `on_failure: closed` while degraded.
    pub failure_mode_rejects: u64,
    /// Gateways (or app replicas) registered with the backend when last seen (1 until
    /// the first heartbeat).
    pub gateways: u64,
    /// Usage exchanges completed (async mode).
    pub syncs: u64,
}

/// The future of [`StateBackend::remote_check`].
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>;

/// A `limit` rule's bucket checked by a remote check: the rule's bandwidth and the key the
/// rule counts by (the aggregated IP, the client key, a header value, or `""` for
/// `key: global`). Each matching request costs 1.
#[derive(Debug, Clone)]
pub struct RuleBucket {
    /// The rule's name.
    pub rule: Arc<str>,
    /// The rule's bandwidth (`id` is `rule:<name>`).
    pub bandwidth: CompiledBandwidth,
    /// The key counted by.
    pub key: Box<str>,
}

/// The backend's [`Route`] for one decision, asked at most once (the first `limit` rule or
/// quota that needs it): a request that needs neither never asks, and an open breaker's
/// probe is not spent twice on one request.
pub(crate) struct LazyRoute<'a> {
    backend: Option<&'a Arc<dyn StateBackend>>,
    remote_ok: bool,
    got: Option<Route>,
}

impl<'a> LazyRoute<'a> {
    /// `backend`: the attached backend (`None`: [`Embedded`], called statically).
    #[inline]
    pub(crate) fn new(backend: Option<&'a Arc<dyn StateBackend>>, remote_ok: bool) -> Self {
        LazyRoute {
            backend,
            remote_ok,
            got: None,
        }
    }

    /// The route, asking the backend on the first call.
    #[inline]
    pub(crate) fn get(&mut self) -> Route {
        if let Some(r) = self.got {
            return r;
        }
        let r = match self.backend {
            Some(b) => b.route(self.remote_ok),
            None => Embedded.route(self.remote_ok),
        };
        self.got = Some(r);
        r
    }

    /// The route for an enforced `limit` rule: as [`LazyRoute::get`], except that a
    /// backend that cannot check rule buckets remotely ([`StateBackend::remote_rules`])
    /// decides them locally and shares them ([`Route::Shared`]).
    #[inline]
    pub(crate) fn for_rule(&mut self) -> Route {
        match self.get() {
            Route::Remote if !self.backend.is_some_and(|b| b.remote_rules()) => Route::Shared,
            r => r,
        }
    }
}

/// How the engine decides one request's quota bandwidths (see [`StateBackend::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The local store decides; the backend needs nothing more ([`Embedded`]).
    Local,
    /// The local store decides and each admitted cost is reported with
    /// [`StateBackend::record`] (Redis `async` mode, and `exact` mode for a caller that
    /// cannot wait).
    Shared,
    /// The backend is degraded: the local store decides, the admitted cost is reported
    /// with [`StateBackend::record`] and counted with
    /// [`StateBackend::count_failure_admit`].
    Degraded,
    /// The backend decides: the engine skips the local bandwidths and the caller awaits
    /// [`StateBackend::remote_check`].
    Remote,
    /// Degraded, failing open: the quota bandwidths are skipped and the admission counted
    /// with [`StateBackend::count_failure_admit`].
    Admit,
    /// Degraded, failing closed: the request is rejected with 503 and counted with
    /// [`StateBackend::count_failure_reject`].
    Reject,
}

/// What a remote check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every bandwidth admitted and was charged (and the lease, if one was asked for,
    /// taken: the engine then calls [`StateBackend::hold_lease`]).
    Admit,
    /// The concurrency limit is reached.
    Busy,
    /// Bandwidth `index` (of the slice checked) rejects.
    Reject {
        /// Index of the rejecting bandwidth.
        index: usize,
        /// How long until the cost would fit, in ns.
        wait: Nanos,
        /// How far the bandwidth's TAT is ahead of now, in ns.
        tat_ahead: Nanos,
    },
    /// No answer (failure, timeout): the engine decides by [`StateBackend::on_failure`].
    Unavailable,
}

/// Where quota state lives, as the engine sees it. See the module docs.
///
/// Every method but [`remote_check`](StateBackend::remote_check) is called on the
/// decision path and must neither block nor wait.
pub trait StateBackend: Send + Sync + std::fmt::Debug + 'static {
    /// How to decide the quota of the request at hand (called once per decision that has
    /// quota bandwidths). `remote_ok`: the caller can await a [`Route::Remote`] check.
    fn route(&self, remote_ok: bool) -> Route;

    /// Reports `cost` admitted on the local store for `client` over `bandwidths`
    /// ([`Route::Shared`], [`Route::Degraded`]).
    fn record(&self, client: &str, bandwidths: &Arc<[CompiledBandwidth]>, cost: u64);

    /// Reports 1 admitted on the local bucket of `limit` rule `bandwidth` for `key`
    /// ([`Route::Shared`], [`Route::Degraded`]).
    fn record_rule(&self, key: &str, bandwidth: &CompiledBandwidth);

    /// Can [`StateBackend::remote_check`] take [`RuleBucket`]s? (Not on a Redis Cluster: a
    /// rule's key and a client's keys live in different slots, and the check is one script.)
    fn remote_rules(&self) -> bool;

    /// [`Route::Remote`]: checks and charges every rule bucket (cost 1 each) and every
    /// bandwidth (cost `cost`) all-or-nothing, taking a concurrency lease `(limit, lease
    /// id)` when one is given. Finishes within the backend's own budget;
    /// [`Verdict::Unavailable`] on failure. A [`Verdict::Reject`] index counts the rule
    /// buckets first, then the bandwidths.
    fn remote_check<'a>(
        &'a self,
        client: &'a str,
        rules: &'a [RuleBucket],
        bandwidths: &'a [CompiledBandwidth],
        cost: u64,
        lease: Option<(u32, u64)>,
    ) -> CheckFuture<'a>;

    /// How to decide when a remote check is [`Verdict::Unavailable`].
    fn on_failure(&self) -> OnFailure;

    /// A fresh lease id for [`StateBackend::remote_check`].
    fn new_lease_id(&self) -> u64;

    /// Records lease `id` of `client`, taken by an admitted remote check, as held; the
    /// returned guard (kept by the request's ticket) gives it back when dropped.
    fn hold_lease(self: Arc<Self>, id: u64, client: &str) -> Box<dyn Send + Sync>;

    /// Counts a request admitted while degraded.
    fn count_failure_admit(&self);

    /// Counts a request rejected while degraded.
    fn count_failure_reject(&self);

    /// The backend's counters; `None` when it shares nothing ([`Embedded`]).
    fn snapshot(&self) -> Option<BackendSnapshot>;
}

/// The default backend: the engine's in-process store decides every quota, alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Embedded;

impl StateBackend for Embedded {
    #[inline]
    fn route(&self, _remote_ok: bool) -> Route {
        Route::Local
    }

    #[inline]
    fn record(&self, _client: &str, _bandwidths: &Arc<[CompiledBandwidth]>, _cost: u64) {}

    #[inline]
    fn record_rule(&self, _key: &str, _bandwidth: &CompiledBandwidth) {}

    fn remote_rules(&self) -> bool {
        false
    }

    /// Never routed to; answers [`Verdict::Unavailable`], so the engine decides locally.
    fn remote_check<'a>(
        &'a self,
        _client: &'a str,
        _rules: &'a [RuleBucket],
        _bandwidths: &'a [CompiledBandwidth],
        _cost: u64,
        _lease: Option<(u32, u64)>,
    ) -> CheckFuture<'a> {
        Box::pin(std::future::ready(Verdict::Unavailable))
    }

    fn on_failure(&self) -> OnFailure {
        OnFailure::Local
    }

    fn new_lease_id(&self) -> u64 {
        0
    }

    fn hold_lease(self: Arc<Self>, _id: u64, _client: &str) -> Box<dyn Send + Sync> {
        Box::new(())
    }

    #[inline]
    fn count_failure_admit(&self) {}

    #[inline]
    fn count_failure_reject(&self) {}

    fn snapshot(&self) -> Option<BackendSnapshot> {
        None
    }
}

#[cfg(test)]
mod tests {
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
}
