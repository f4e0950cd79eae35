//! The admission pipeline: identify → rules → per-client quota → shedding → admit.
//!
//! [`Engine::decide`] runs the stages in order over one snapshot of the compiled policy
//! (one `ArcSwap` load per decision; nothing is held across an `.await`, there is none).
//! Each stage that consumes something records it; when a later stage rejects, everything
//! recorded is given back (GCRA refund `TAT ← max(TAT − c·T, now)`, sketch counts
//! decremented, permits released), so a rejected request consumes nothing anywhere.
//!
//! Every decision event carries the request's priority class as known at that stage
//! (`normal`, or what a `tag` rule before it said, or `borrowed`), so shed requests are
//! counted under their own class.
//!
//! Burst sharing: a request over a plan bandwidth, while burst sharing is on and fewer than
//! `max(1, ⌊below_utilization × shed limit⌋)` requests are in flight, is admitted as
//! *borrowed*: priority class `borrowed` (the first shed after `sheddable`), marked on its
//! ticket, and it does **not** consume the client's bucket (the capacity it uses is the
//! service's spare, not the client's quota; charging it as debt would punish the client
//! later for capacity nobody else wanted). The concurrency quota is never borrowed.
//!
//! A state table full of keys with requests in flight rejects new keys at the shed stage
//! (status `shed_status`): never "admit untracked".
//!
//! Where quota state lives is the engine's [`StateBackend`] (module [`crate::backend`]),
//! which it only knows through that trait: the quota stage asks it for a [`Route`].
//! [`Embedded`] (the default) lets the local store decide alone; the Redis backend
//! ([`crate::fleet::start`]) decides here in `async` mode and while degraded, the cost being
//! recorded for the next exchange, while in `exact` mode the engine skips the local
//! bandwidths and [`Engine::begin`] returns a [`RemoteCheck`] holding the ticket, which the
//! adapter awaits (one remote check, within the backend's budget). Until a backend is
//! attached, [`Embedded`] is called statically: one `OnceLock` read per decision with a
//! quota, no virtual call, no allocation.
//!
//! Per policy generation the engine prepares a small cache (operation names, sketches,
//! shedding settings, the set of live bucket ids for pruning); it is rebuilt off the
//! common path the first time a decision sees a new generation.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ahash::RandomState;
use arc_swap::{ArcSwap, Guard};
use fairgate_policies::compiled::PlanId;
use fairgate_policies::compiled::{
    CompiledBandwidth, CompiledGrowth, CompiledIdentify, CompiledOperation, CompiledPolicy,
    RequestView,
};
use fairgate_policies::model::{ClientCap, HeaderMode, OnFailure, PostHoc, Priority};
use fairgate_policies::PolicyStore;

use crate::backend::{
    BackendSnapshot, Embedded, LazyRoute, Route, RuleBucket, StateBackend, Verdict,
};
use crate::caps::{self, CapState, CappedMap};
use crate::clock::{duration_to_nanos, Clock, MonotonicClock, Nanos};
use crate::concurrency::{PostHocCharge, PostHocUnit, Ticket, TicketShared};
use crate::decision::{
    Admitted, Decision, DecisionEvent, DecisionKind, GrowthEvent, Observer, QuotaUsage,
    RateLimitInfo, Rejection, RequestContext, Stage,
};
use crate::gcra;
use crate::growth::{self, ClientGrowth, GrowthState};
use crate::identify::{self, AsSource, ClientKey, HeaderValues};
use crate::ledger::{Charge, ChargeBuf, Charges};
use crate::quota::{self, Consumed, Permit};
use crate::rules::{self, RuleKeys, RuleReject, RulesOutcome, RulesShared, ShadowHit};
use crate::shed::{ShedConfig, Shedder};
use crate::sketch::Sketch;
use crate::state::{Entry, LiveScopes, Store, CLIENT_SCOPE};

/// The facts about one request the engine decides on; borrowed from the request.
pub struct RequestFacts<'a> {
    /// The TCP peer.
    pub peer: IpAddr,
    /// Method, upper case.
    pub method: &'a str,
    /// Host without port, lower case; empty when unknown.
    pub host: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// The raw query string, if any.
    pub query: Option<&'a str>,
    /// An operation the adapter already resolved (e.g. a gateway route).
    pub operation: Option<&'a str>,
    /// Header lookup.
    pub headers: &'a dyn HeaderValues,
}

/// One client's usage against its quota, for the admin API.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientUsage {
    /// The client key.
    pub key: String,
    /// The plan charged: an override's plan, else the most used of the plans the client
    /// has buckets in (`tag` rules choose plans per request), else the default plan.
    pub plan: Option<Arc<str>>,
    /// One entry per bandwidth of each plan shown (see [`Engine::client_usage`]).
    pub bandwidths: Vec<BandwidthUsage>,
    /// Requests in flight (tracked when the quota has a concurrency limit).
    pub in_flight: u64,
    /// The concurrency limit.
    pub concurrency_limit: Option<u32>,
    /// The client's self-set cap (usage endpoint), which the numbers above already apply.
    pub cap: Option<ClientCap>,
    /// The client's adaptive growth, which the numbers above already apply (`None`: its
    /// quota has not grown).
    pub growth: Option<Grown>,
}

/// A client's adaptive growth (`growth:`): its quota is the base quota × `factor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grown {
    /// Growth steps taken.
    pub steps: u32,
    /// The factor its bandwidths' rates and bursts are multiplied by.
    pub factor: f64,
}

impl ClientUsage {
    /// The highest used fraction over the bandwidths (0 = idle, 1 = empty bucket).
    pub fn usage(&self) -> f64 {
        self.bandwidths
            .iter()
            .map(|b| 1.0 - b.fill_fraction)
            .fold(0.0, f64::max)
    }
}

/// Usage of one bandwidth.
#[derive(Debug, Clone, PartialEq)]
pub struct BandwidthUsage {
    /// Bucket id.
    pub id: Arc<str>,
    /// The plan the bandwidth belongs to (`None` for an override's own bandwidths).
    pub plan: Option<Arc<str>>,
    /// RateLimit numbers now.
    pub ratelimit: RateLimitInfo,
    /// Fill fraction `f` (1 = full bucket, nothing used).
    pub fill_fraction: f64,
}

/// The admission engine. Cheap to share (`Arc<Engine>`); every clone of a layer built from
/// it shares its state.
///
/// Aligned to 128 bytes so that the `Arc`'s reference counts, written whenever a layer or
/// service holding the engine is cloned, sit on their own cache lines instead of the
/// read-mostly fields every decision loads.
#[repr(align(128))]
pub struct Engine {
    /// What the engine's tickets share with it: clock, state store, shedder, observer.
    shared: Arc<TicketShared>,
    store: PolicyStore,
    prepared: ArcSwap<Prepared>,
    /// Set by the store's reload listener: `prepared` may be behind the store. Lets a
    /// decision check one flag instead of loading the store's policy as well.
    stale: Arc<AtomicBool>,
    rebuild: Mutex<()>,
    hasher: RandomState,
    shadow_rejects: AtomicU64,
    /// The state backend, once one is attached ([`Engine::attach_backend`]).
    backend: OnceLock<Arc<dyn StateBackend>>,
    /// The backend until one is attached.
    embedded: Arc<dyn StateBackend>,
    /// The clients' self-set caps (module [`crate::caps`]). Lock order: `rebuild`, then this.
    caps: Mutex<CapState>,
    /// Serialises cap writes (file write, then publish).
    cap_writes: Mutex<()>,
    /// Grown clients (module [`crate::growth`]). Lock order: `rebuild`, `caps`, then this.
    growth: Mutex<GrowthState>,
    /// Usage counts of clients whose quota may grow.
    growth_counts: growth::Counters,
    /// With a backend that keeps growth for the fleet: admitted cost to report.
    growth_pending: growth::Pending,
    /// The engine time of the last shed rejection + 1 (0: none): growth waits a window.
    last_shed: AtomicU64,
    /// Set while the policy has a usage endpoint, or a reload may have added one: the
    /// adapter compares the request path only then.
    usage_armed: Arc<AtomicBool>,
}

/// Per-generation cache.
struct Prepared {
    policy: Arc<CompiledPolicy>,
    ops_by_name: HashMap<Arc<str>, usize, RandomState>,
    sketches: Box<[Option<Arc<Sketch>>]>,
    shed: Option<ShedConfig>,
    borrow_below: Option<f64>,
    /// Self-set caps compiled against this generation (empty without caps).
    capped: CappedMap,
    /// Grown clients' bandwidth sets under this generation (empty when nobody grew).
    grown: growth::GrownMap,
    /// The longest growth window of the policy (0: no growth anywhere).
    growth_window: Nanos,
    /// The usage endpoint, if the policy has one.
    usage: Option<UsageSettings>,
}

/// The usage endpoint's settings (`usage_endpoint`), for the adapter.
#[derive(Debug, Clone)]
pub(crate) struct UsageSettings {
    /// The path it answers on.
    pub(crate) path: Arc<str>,
    /// Whether clients may set their own caps.
    pub(crate) self_caps: bool,
    /// At most this many clients hold a cap.
    pub(crate) max_caps: u32,
}

/// Why a cap write was refused (see [`Engine::set_cap`]).
#[derive(Debug)]
pub(crate) enum CapError {
    /// `usage_endpoint.self_caps` is off.
    Off,
    /// There is no caps file to keep caps in (an inline policy).
    NoFile,
    /// The cap would raise a limit, or names a bandwidth the quota does not have.
    Invalid(String),
    /// `max_caps` clients hold a cap already.
    TooMany(u32),
    /// Too many writes: retry after this long.
    TooFast(Duration),
    /// The caps file could not be written.
    Io(String),
}

// === impl Engine ===

impl Engine {
    /// An engine over `store` with the production clock.
    pub fn new(store: PolicyStore) -> Arc<Engine> {
        Self::with_clock(store, Arc::new(MonotonicClock::new()))
    }

    /// An engine with an injected clock (tests, simulations).
    pub fn with_clock(store: PolicyStore, clock: Arc<dyn Clock>) -> Arc<Engine> {
        // Registered before the first load, so no reload can slip between the two.
        let stale = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stale);
        // A reload may add the usage endpoint: the adapter compares paths until the next
        // generation is prepared (armed before `stale`, so the rebuild that clears `stale`
        // also settles `usage_armed`).
        let usage_armed = Arc::new(AtomicBool::new(true));
        let armed = Arc::clone(&usage_armed);
        store.on_reload(move |_| {
            armed.store(true, Ordering::Release);
            flag.store(true, Ordering::Release);
        });
        let policy = store.load_full();
        let state = Store::new(policy.state.max_keys);
        let shed = Shedder::default();
        let caps = CapState::of(&policy);
        let growth = growth_state(&store, clock.now());
        let prepared = Prepared::build(policy, None, &state, &shed, &caps.by_key, &growth.by_key);
        usage_armed.store(
            prepared.usage.is_some() || stale.load(Ordering::Acquire),
            Ordering::Release,
        );
        Arc::new(Engine {
            shared: Arc::new(TicketShared::new(clock, state, shed)),
            store,
            prepared: ArcSwap::from_pointee(prepared),
            stale,
            rebuild: Mutex::new(()),
            hasher: RandomState::new(),
            shadow_rejects: AtomicU64::new(0),
            backend: OnceLock::new(),
            embedded: Arc::new(Embedded),
            caps: Mutex::new(caps),
            cap_writes: Mutex::new(()),
            growth: Mutex::new(growth),
            growth_counts: growth::Counters::default(),
            growth_pending: growth::Pending::default(),
            last_shed: AtomicU64::new(0),
            usage_armed,
        })
    }

    /// The policy store this engine reads.
    pub fn store(&self) -> &PolicyStore {
        &self.store
    }

    /// Sets (replaces) the observer of decisions and completions.
    pub fn set_observer(&self, obs: Arc<dyn Observer>) {
        self.shared.observer.store(Some(Arc::new(obs)));
        self.shared.has_observer.store(true, Ordering::Release);
    }

    /// Keeps `handle` (e.g. a policy file watcher) alive as long as the engine.
    pub fn keep_alive(&self, handle: Box<dyn Send + Sync>) {
        self.shared
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }

    /// Requests in flight (admitted, not yet finished).
    pub fn in_flight(&self) -> u64 {
        self.shared.shed.in_flight()
    }

    /// The current global in-flight limit, if shedding is configured.
    pub fn shed_limit(&self) -> Option<u64> {
        self.shared.shed.limit()
    }

    /// The reject delay a shed rejection would wait now (the typical success latency,
    /// capped by `shedding.reject_delay.max`), and how many delayed rejections wait now.
    /// `None` when the policy has no reject delay.
    pub fn reject_delay(&self) -> Option<(Duration, u64)> {
        let prep = self.prepared();
        let (max, _) = prep.shed.as_ref()?.reject_delay?;
        let shed = &self.shared.shed;
        Some((shed.typical_latency().min(max), shed.waiting()))
    }

    /// Keys tracked by the state store (≤ `state.max_keys`).
    pub fn tracked_keys(&self) -> u64 {
        self.shared.state.len()
    }

    /// Times a shadow rule would have rejected a request.
    pub fn shadow_rejects(&self) -> u64 {
        self.shadow_rejects.load(Ordering::Relaxed)
    }

    /// Entries evicted from the state table while not full (their debt is remembered).
    pub fn evictions(&self) -> u64 {
        self.shared.state.evictions()
    }

    /// Drops state that carries no information (full buckets, nothing in flight) and state
    /// of bucket ids the policy no longer has. Bounded by `max_keys`; call it from a
    /// background task every few seconds (it also runs, per shard, whenever a shard fills).
    pub fn prune(&self) -> u64 {
        let prep = self.prepared();
        let now = self.shared.clock.now();
        if prep.growth_window > 0 {
            self.growth_counts.prune(now, prep.growth_window);
        }
        drop(prep);
        self.persist_growth();
        self.shared.state.prune(now)
    }

    /// Runs [`Engine::prune`] every `every` on the current tokio runtime until the engine
    /// is dropped (the task holds only a weak reference).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn` does).
    pub fn spawn_pruner(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(engine) => {
                        engine.prune();
                    }
                    None => return,
                }
            }
        })
    }

    /// The clock the engine reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.shared.clock
    }

    /// Tells the engine that its clock, as it reads now, stands at wall time `wall`: the
    /// calendar periods of quotas (`period: month`) are counted from there on, following
    /// the engine's own clock. The engine takes the system's wall time once when it is
    /// built; tests (and the gateway's `FAIRGATE_TEST_WALL_CLOCK`) move it here.
    pub fn set_wall_time(&self, wall: std::time::SystemTime) {
        self.shared.wall.set(self.shared.clock.now(), wall);
    }

    /// The clock's place in wall time, shared with a state backend that names calendar
    /// periods (the Redis keys of a period's count).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn wall_anchor(&self) -> &Arc<crate::clock::WallAnchor> {
        &self.shared.wall
    }

    /// Attaches the state backend that decides how quotas are decided (until then the
    /// engine runs on [`Embedded`]); false if one is attached already (the first stays).
    pub fn attach_backend(&self, backend: Arc<dyn StateBackend>) -> bool {
        self.backend.set(backend).is_ok()
    }

    /// The state backend: the attached one, else [`Embedded`].
    #[inline]
    pub fn backend(&self) -> &Arc<dyn StateBackend> {
        self.backend.get().unwrap_or(&self.embedded)
    }

    /// The state backend's counters, when it shares state (`None` for [`Embedded`]).
    pub fn backend_snapshot(&self) -> Option<BackendSnapshot> {
        self.backend().snapshot()
    }

    /// The state store (the fleet exchange charges it).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn state_store(&self) -> &Store {
        &self.shared.state
    }

    /// The current policy snapshot, preparing a new generation if the store moved on.
    fn prepared(&self) -> Guard<Arc<Prepared>> {
        let prep = self.prepared.load();
        // No reload since the last check: `prep` is current (a reload still publishing
        // its listener call is seen by the next decision).
        if !self.stale.load(Ordering::Acquire) {
            return prep;
        }
        // Cleared before the store is read: a reload after this sets it again. (A plain
        // load first: no write to a shared cache line on the common path.)
        self.stale.store(false, Ordering::Release);
        let cur = self.store.load();
        if Arc::ptr_eq(&prep.policy, &cur) {
            self.usage_armed
                .store(prep.usage.is_some(), Ordering::Release);
            return prep;
        }
        drop(prep);
        let _lock = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let prep = self.prepared.load();
        if Arc::ptr_eq(&prep.policy, &cur) {
            self.usage_armed
                .store(prep.usage.is_some(), Ordering::Release);
            return prep;
        }
        let caps = {
            let mut caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
            // Another caps file: its caps replace the live ones (the same file keeps them,
            // so a reload never loses a cap written since the file was last read).
            let file = caps::caps_file(&cur);
            if file != caps.file {
                caps.file = file;
                caps.by_key = Arc::clone(&cur.caps);
            }
            Arc::clone(&caps.by_key)
        };
        let grown = self.growth_snapshot();
        let next = Prepared::build(
            Arc::clone(&cur),
            Some(&prep),
            &self.shared.state,
            &self.shared.shed,
            &caps,
            &grown,
        );
        drop(prep);
        self.usage_armed
            .store(next.usage.is_some(), Ordering::Release);
        self.prepared.store(Arc::new(next));
        self.prepared.load()
    }

    /// Decides on one request. Never blocks, never panics on input.
    ///
    /// A synchronous caller cannot wait for a remote check: with a backend that decides
    /// remotely (Redis `exact` mode), this decides on the local store and shares the usage
    /// as `async` mode does. Use [`Engine::begin`] to get remote decisions.
    pub fn decide(&self, req: &RequestFacts<'_>) -> Decision {
        self.decide_inner(req, None, false)
    }

    /// Decides on one request, or, with a backend that decides remotely (Redis `exact`
    /// mode), returns the [`RemoteCheck`] to await (within the backend's budget).
    pub fn begin(&self, req: &RequestFacts<'_>) -> Begun {
        self.decide_inner(req, None, true)
    }

    /// [`Engine::begin`], with a context every event of the request carries (see
    /// [`RequestContext`]).
    pub(crate) fn begin_with(
        &self,
        req: &RequestFacts<'_>,
        context: Option<&RequestContext>,
    ) -> Begun {
        self.decide_inner(req, context, true)
    }

    /// The pipeline: one function per stage, each returning the rejection that ends the
    /// decision (`Err`) or what the next stage needs; every early return drops `charges`,
    /// which gives back what the stages before consumed.
    ///
    /// Generic over what the caller takes ([`Answer`]), so that each answer is written once,
    /// where the caller wants it, instead of being built as a [`Begun`] and moved out.
    fn decide_inner<A: Answer>(
        &self,
        req: &RequestFacts<'_>,
        context: Option<&RequestContext>,
        remote_ok: bool,
    ) -> A {
        let now = self.shared.clock.now();
        let prep = self.prepared();
        let pol: &CompiledPolicy = &prep.policy;

        // 1. Identify.
        let who = self.identify(pol, req);
        // Built here, not in `Identity`: the (empty) key cell is large, and a value put
        // in a struct is copied into it whole.
        let ip_key =
            identify::LazyIpKey::new(who.ip, pol.identify.ipv4_prefix, pol.identify.ipv6_prefix);
        let client_key = who.key(&pol.identify, &ip_key, &self.hasher);
        let ck = who.key_text(&client_key, pol.identify.max_key_length);
        let source = AsSource(req.headers);
        let mut view = RequestView {
            ip: who.ip,
            method: req.method,
            host: req.host,
            path: req.path,
            user_agent: req.headers.header("user-agent").unwrap_or(""),
            operation: req.operation,
            headers: &source,
        };
        let op = prep.operation(req.operation, &view);
        if let Some(op) = op {
            view.operation = Some(&op.name);
        }
        let cost = op.map_or(1, |o| o.cost);
        let op_name = view.operation;
        let observer = self
            .shared
            .has_observer
            .load(Ordering::Acquire)
            .then(|| self.shared.observer.load());
        let observer: Option<&Arc<dyn Observer>> = observer.as_ref().and_then(|o| o.as_deref());

        let mut d = Deciding {
            engine: self,
            now,
            client_key: &client_key,
            key: ck,
            op_name,
            cost,
            observer,
            context,
            headers: pol.responses.ratelimit_headers,
            priority: Priority::Normal,
        };
        let mut ledger = ChargeBuf::default();
        let mut charges = Charges::new(&self.shared.state, now, &mut ledger);

        // 2. Rules.
        let keys = RuleKeys {
            ip_key: &ip_key,
            client_key: ck,
            headers: req.headers,
        };
        // The state backend is asked at most once, by the first rule or quota needing it.
        let mut backend_route = LazyRoute::new(self.backend.get(), remote_ok);
        let mut rules_shared = RulesShared::default();
        let rules_out = match d.rules(
            &prep,
            &view,
            &keys,
            &mut charges,
            &mut backend_route,
            &mut rules_shared,
        ) {
            ControlFlow::Continue(o) => o,
            ControlFlow::Break(rejected) => return A::decided(rejected),
        };
        let shadow_hits = rules_out.shadow_hits;
        let allow_rule = rules_out.allow_rule.and_then(|i| pol.rules.get(i));

        // 3. Per-client quota.
        let q = prep.quota(ck, rules_out.plan);
        let plan_name = q.plan.map(|p| &p.name);
        let QuotaPassed {
            route,
            borrowed,
            ratelimit,
            mut permit,
        } = match d.quota(&prep, &q, &rules_out, &mut backend_route, &mut charges) {
            ControlFlow::Continue(passed) => passed,
            ControlFlow::Break(rejected) => return A::decided(rejected),
        };

        // 4. Per-client concurrency (unless the quota check took the permit on the way).
        if !rules_out.allowed && permit.is_none() {
            match d.concurrency(pol, &q, shadow_hits) {
                ControlFlow::Continue(p) => permit = p,
                ControlFlow::Break(rejected) => return A::decided(rejected),
            }
        }

        // 5. Global shedding.
        if let ControlFlow::Break(rejected) = d.shed(&prep, plan_name, &mut permit, shadow_hits) {
            return A::decided(rejected);
        }
        let priority = d.priority;

        // Admit.
        let post_hoc = match (op.and_then(|o| o.post_hoc.as_ref()), q.bandwidths) {
            (Some(ph), Some(bws)) if !rules_out.allowed => Some(PostHocCharge {
                unit: match ph {
                    PostHoc::Bytes(b) => PostHocUnit::Bytes(b.0.max(1)),
                    PostHoc::Duration(dur) => PostHocUnit::Nanos(duration_to_nanos(dur.0).max(1)),
                },
                bandwidths: Arc::clone(bws),
            }),
            _ => None,
        };
        for &(bw, key) in &rules_shared.record {
            self.backend().record_rule(key, bw);
        }
        if rules_shared.degraded && !matches!(route, Route::Degraded | Route::Admit) {
            self.backend().count_failure_admit();
        }
        // Counted here, before an exact-mode remote check: a request Redis then rejects is
        // counted too (its client is at its quota then, growing either way).
        if let (Some(g), Some(bws)) = (q.growth, q.bandwidths) {
            if !borrowed && !rules_out.allowed {
                self.count_growth(&prep, ck, g, bws, plan_name, cost, now);
            }
        }
        // Exact mode: the quota's bandwidths (when the route is remote) and the enforced
        // rules' buckets go to one remote check; what was decided here is kept.
        let remote_quota = q.bandwidths.filter(|_| route == Route::Remote);
        if remote_quota.is_some() || !rules_shared.remote.is_empty() {
            let remote_rules = std::mem::take(&mut rules_shared.remote).into_boxed_slice();
            let headers = d.headers;
            let ticket = Ticket::new(
                Arc::clone(&self.shared),
                client_key.clone(),
                permit,
                priority,
                borrowed,
                post_hoc,
            );
            charges.commit();
            return A::remote(RemoteCheck {
                shared: Arc::clone(&self.shared),
                backend: Arc::clone(self.backend()),
                admitted: Admitted { ticket, ratelimit },
                rules: remote_rules,
                bandwidths: remote_quota.map_or_else(|| Arc::from([]), Arc::clone),
                cost,
                concurrency: remote_quota.and(q.concurrency),
                client_key,
                plan: plan_name.cloned(),
                operation: op_name.map(Arc::from),
                context: context.cloned(),
                quota_status: pol.responses.quota_status,
                shed_retry_after: shed_retry_after(pol),
                retry_stagger: pol.responses.retry_stagger.0,
                headers,
                priority,
                shadow_hits,
            });
        }
        if let Some(bws) = q.bandwidths.filter(|_| route != Route::Local) {
            if matches!(route, Route::Shared | Route::Degraded) && !borrowed {
                self.backend().record(ck, bws, cost);
            }
            if matches!(route, Route::Degraded | Route::Admit) {
                self.backend().count_failure_admit();
            }
        }
        if let Some(obs) = observer {
            // Out of line: the event (and its usage) is built only with an observer, and
            // inlined here it made the frame of every decision larger (callgrind).
            d.observe_admit(
                obs,
                pol,
                &q,
                allow_rule,
                borrowed,
                ratelimit.as_ref(),
                !rules_out.allowed && route != Route::Admit,
            );
        }
        charges.commit();
        let ticket = Ticket::new(
            Arc::clone(&self.shared),
            client_key,
            permit,
            priority,
            borrowed,
            post_hoc,
        );
        A::decided(Decision::Admit(Admitted { ticket, ratelimit }))
    }

    /// Stage 1: who sent the request. The client's IP is the peer's, or the one trusted
    /// proxies forwarded; the client key is what the policy's extractors find (hashed when
    /// longer than `max_key_length`), else the IP aggregated to its prefix.
    #[inline(always)]
    fn identify<'r>(&self, pol: &CompiledPolicy, req: &RequestFacts<'r>) -> Identity<'r> {
        let id = &pol.identify;
        let ip = identify::client_ip(req.peer, req.headers, &|ip| id.trusted_proxies.contains(ip));
        let raw = identify::extract(&id.client_key, req.headers, req.query);
        Identity { ip, raw }
    }

    /// One client's usage against its quota. `None` when no plan applies to the client
    /// (no override, no `default_plan`) and it has no tracked state.
    ///
    /// The plan shown is the one the client's requests are charged to: an override's plan;
    /// else, because `tag` rules choose a plan per request, every plan the client has
    /// buckets in (each bandwidth names its plan; [`ClientUsage::plan`] is the most used
    /// one); else `default_plan`, with full buckets (a client with no state has used
    /// nothing).
    pub fn client_usage(&self, key: &str) -> Option<ClientUsage> {
        let prep = self.prepared();
        let now = self.shared.clock.now();
        self.usage_of(&prep, key, now)
    }

    /// Refills every quota bucket `key` has in this engine's state (each plan's and its
    /// override's bandwidths), as if it had sent nothing; its in-flight requests and the
    /// `limit` rules' buckets are left alone. Returns how many buckets were refilled.
    ///
    /// Local state only: with a fleet backend the buckets the fleet shares live there, and
    /// the caller must refuse (the admin API does).
    pub fn reset_client(&self, key: &str) -> usize {
        let prep = self.prepared();
        let pol = &prep.policy;
        let now = self.shared.clock.now();
        let state = &self.shared.state;
        let own = pol.client(key).and_then(|c| c.bandwidths.as_ref());
        let mut n = 0;
        for bw in pol
            .plans
            .iter()
            .flat_map(|p| p.bandwidths.iter())
            .chain(own.into_iter().flat_map(|b| b.iter()))
        {
            let refilled = state
                .with_client_slot(key, &bw.id, |b| b.refund(now, Nanos::MAX))
                .or_else(|| state.with_existing(&bw.id, key, |e| e.refund(now, Nanos::MAX)));
            n += usize::from(refilled.is_some());
        }
        n
    }

    fn usage_of(&self, prep: &Prepared, key: &str, now: Nanos) -> Option<ClientUsage> {
        let pol: &CompiledPolicy = &prep.policy;
        let sh = &*self.shared;
        let in_flight = sh
            .state
            .with_existing(CLIENT_SCOPE, key, |e| e.in_flight())
            .unwrap_or(0);
        let mut quotas: Vec<quota::Quota<'_>> = Vec::new();
        // An override decides the quota whatever `tag` rules say.
        if pol.client(key).is_none() {
            // The default plan first, so that it wins a tie for "most used".
            let order = pol
                .default_plan
                .into_iter()
                .chain((0..pol.plans.len()).filter(|&i| Some(i) != pol.default_plan));
            for i in order {
                let Some(plan) = pol.plans.get(i) else {
                    continue;
                };
                if plan.bandwidths.iter().any(|bw| self.has_bucket(key, bw)) {
                    quotas.push(prep.quota(key, Some(i)));
                }
            }
        }
        if quotas.is_empty() {
            quotas.push(prep.quota(key, None));
        }
        let mut bandwidths: Vec<BandwidthUsage> = Vec::new();
        let mut shown = quotas[0];
        let cap = self.client_cap(prep, key);
        let mut most = -1.0f64;
        for q in &quotas {
            // An override's own bandwidths belong to no plan.
            let plan = q
                .plan
                .filter(|p| q.bandwidths.is_some_and(|b| Arc::ptr_eq(b, &p.bandwidths)))
                .map(|p| Arc::clone(&p.name));
            let mut used = 0.0f64;
            for bw in q.bandwidths.map_or(&[][..], |b| &b[..]) {
                let tat = sh
                    .state
                    .with_client_slot(key, &bw.id, |b| b.peek(now, bw.c_ns))
                    .or_else(|| {
                        sh.state
                            .with_existing(&bw.id, key, |e| e.peek(now, bw.c_ns))
                    })
                    .unwrap_or(0);
                let wall = sh.wall.offset();
                let at = crate::bucket::bucket_now(bw, now, wall);
                let fill_fraction = gcra::fill_fraction(tat, at, crate::bucket::limit(bw));
                used = used.max(1.0 - fill_fraction);
                bandwidths.push(BandwidthUsage {
                    id: Arc::clone(&bw.id),
                    plan: plan.clone(),
                    ratelimit: quota::ratelimit_info(bw, q.bandwidths, tat, now, wall),
                    fill_fraction,
                });
            }
            if used > most {
                most = used;
                shown = *q;
            }
        }
        if shown.plan.is_none()
            && shown.bandwidths.is_none()
            && shown.concurrency.is_none()
            && in_flight == 0
        {
            return None;
        }
        Some(ClientUsage {
            key: key.to_owned(),
            plan: shown.plan.map(|p| Arc::clone(&p.name)),
            bandwidths,
            in_flight,
            concurrency_limit: shown.concurrency,
            growth: if cap.is_none() {
                self.grown_of(prep, key)
            } else {
                None
            },
            cap,
        })
    }

    // --- adaptive growth (module `growth`) ---

    /// Every grown client's growth (a copy, for a generation being built).
    fn growth_snapshot(&self) -> BTreeMap<String, ClientGrowth> {
        self.growth
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .clone()
    }

    /// Counts an admit of a client whose quota may grow; takes a step when the window
    /// before this one reached the threshold. Out of line: only growth's clients pay.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn count_growth(
        &self,
        prep: &Prepared,
        key: &str,
        g: &Arc<CompiledGrowth>,
        set: &[CompiledBandwidth],
        plan: Option<&Arc<str>>,
        cost: u64,
        now: Nanos,
    ) {
        let max = usize::try_from(prep.policy.state.max_keys).unwrap_or(usize::MAX);
        if self.backend().shares_growth() {
            // The fleet decides: reported within a second (`flush_growth`).
            self.growth_pending
                .add(key, cost, g, growth::t_max(set), plan, max);
            return;
        }
        let Some(due) = self
            .growth_counts
            .add(key, cost, now, g, growth::t_max(set), max)
        else {
            return;
        };
        self.grow(key, g, plan, due, now);
    }

    /// Takes one growth step for `key`, unless shedding or `max_rise` forbids it.
    #[cold]
    fn grow(
        &self,
        key: &str,
        g: &CompiledGrowth,
        plan: Option<&Arc<str>>,
        due: growth::Due,
        now: Nanos,
    ) {
        let last_shed = self.last_shed.load(Ordering::Relaxed);
        if last_shed != 0 && now.saturating_sub(last_shed - 1) < g.window_ns {
            tracing::info!(
                client = key,
                usage = due.usage,
                "quota not grown: the service shed requests within the window"
            );
            return;
        }
        let _lock = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let (steps, by_key) = {
            let mut gs = self.growth.lock().unwrap_or_else(|e| e.into_inner());
            let max =
                usize::try_from(self.prepared.load().policy.state.max_keys).unwrap_or(usize::MAX);
            if !gs.by_key.contains_key(key) && gs.by_key.len() >= max {
                return;
            }
            let cg = gs.by_key.entry(key.to_owned()).or_default();
            if !growth::may_rise(cg, g, now) {
                if cg.steps == 0 {
                    gs.by_key.remove(key);
                }
                return;
            }
            growth::rise(cg, now, g.within_ns);
            let steps = cg.steps;
            gs.dirty = true;
            (steps, gs.by_key.clone())
        };
        let caps = Arc::clone(&self.caps.lock().unwrap_or_else(|e| e.into_inner()).by_key);
        let cur = self.prepared.load_full();
        let rebuilt = Prepared::build(
            Arc::clone(&cur.policy),
            Some(&cur),
            &self.shared.state,
            &self.shared.shed,
            &caps,
            &by_key,
        );
        self.prepared.store(Arc::new(rebuilt));
        let factor = g.factor(steps);
        tracing::info!(
            client = key,
            plan = plan.map(|p| &**p),
            steps,
            factor,
            usage = due.usage,
            threshold = g.threshold,
            window_s = g.window_ns as f64 / 1e9,
            "quota grown"
        );
        self.notify_growth(&GrowthEvent {
            client_key: key,
            plan: plan.map(|p| &**p),
            action: "growth",
            steps,
            factor,
            usage: Some(due.usage),
            threshold: Some(g.threshold),
            window_secs: Some(g.window_ns as f64 / 1e9),
        });
    }

    fn notify_growth(&self, event: &GrowthEvent<'_>) {
        if self.shared.has_observer.load(Ordering::Acquire) {
            if let Some(obs) = self.shared.observer.load().as_deref() {
                obs.on_growth(event);
            }
        }
    }

    /// Reports the admitted cost of growing clients to a backend that keeps growth for the
    /// fleet, and applies the steps it answers (the report that took a step logs and counts
    /// it). Called every [`GROWTH_REPORT_EVERY`](crate::backend::redis::GROWTH_REPORT_EVERY)
    /// by the fleet's growth task.
    #[cfg(feature = "redis")]
    pub(crate) async fn flush_growth(&self) {
        let mut reports = self.growth_pending.drain();
        if reports.is_empty() {
            return;
        }
        let now = self.shared.clock.now();
        let last_shed = self.last_shed.load(Ordering::Relaxed);
        for r in &mut reports {
            r.shed = last_shed != 0 && now.saturating_sub(last_shed - 1) < r.growth.window_ns;
        }
        let backend = Arc::clone(self.backend());
        let answers = backend.report_growth(&reports).await;
        let mut changed = false;
        let mut stepped = Vec::new();
        {
            let max =
                usize::try_from(self.prepared.load().policy.state.max_keys).unwrap_or(usize::MAX);
            let mut gs = self.growth.lock().unwrap_or_else(|e| e.into_inner());
            for (r, a) in reports.iter().zip(answers) {
                let Some((steps, step)) = a else { continue };
                let known = gs.by_key.get(&*r.client).map_or(0, |g| g.steps);
                // At most `max_keys` grown clients are held here (Redis keeps them all).
                if known == 0 && steps > 0 && gs.by_key.len() >= max {
                    continue;
                }
                if known != steps {
                    changed = true;
                    if steps == 0 {
                        gs.by_key.remove(&*r.client);
                    } else {
                        gs.by_key.entry(r.client.to_string()).or_default().steps = steps;
                    }
                }
                if let Some(usage) = step {
                    stepped.push((r, steps, usage));
                }
            }
        }
        if changed {
            let _lock = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
            let by_key = self.growth_snapshot();
            let caps = Arc::clone(&self.caps.lock().unwrap_or_else(|e| e.into_inner()).by_key);
            let cur = self.prepared.load_full();
            let rebuilt = Prepared::build(
                Arc::clone(&cur.policy),
                Some(&cur),
                &self.shared.state,
                &self.shared.shed,
                &caps,
                &by_key,
            );
            self.prepared.store(Arc::new(rebuilt));
        }
        for (r, steps, usage) in stepped {
            let g = &r.growth;
            let factor = g.factor(steps);
            let plan = r.plan.as_deref();
            tracing::info!(
                client = &*r.client,
                plan,
                steps,
                factor,
                usage,
                threshold = g.threshold,
                window_s = g.window_ns as f64 / 1e9,
                "quota grown"
            );
            self.notify_growth(&GrowthEvent {
                client_key: &r.client,
                plan,
                action: "growth",
                steps,
                factor,
                usage: Some(usage),
                threshold: Some(g.threshold),
                window_secs: Some(g.window_ns as f64 / 1e9),
            });
        }
    }

    /// Whether clients' growth is the fleet's (kept in the state backend).
    pub fn growth_is_shared(&self) -> bool {
        self.backend().shares_growth()
    }

    /// Resets `key`'s growth in the state backend that keeps it for the fleet, then here.
    /// `None` when the backend could not be asked (nothing was reset).
    pub async fn reset_shared_growth(&self, key: &str) -> Option<u32> {
        let backend = Arc::clone(self.backend());
        let had = backend.reset_growth(key).await?;
        Some(had.max(self.reset_growth(key)))
    }

    /// `key`'s growth: steps taken and the factor its quota is grown by now (`None` when it
    /// has not grown, or its quota has no `growth` now).
    pub fn client_growth(&self, key: &str) -> Option<Grown> {
        let prep = self.prepared();
        self.grown_of(&prep, key)
    }

    fn grown_of(&self, prep: &Prepared, key: &str) -> Option<Grown> {
        if prep.growth_window == 0 {
            return None;
        }
        let steps = self
            .growth
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .get(key)
            .map_or(0, |g| g.steps);
        if steps == 0 {
            return None;
        }
        let q = quota::resolve(&prep.policy, key, None);
        let factor = q.growth.map_or(1.0, |g| g.factor(steps));
        Some(Grown { steps, factor })
    }

    /// Resets `key`'s growth (an operator's action): its quota is the policy's again, its
    /// usage count starts over. Returns the steps it had (0: nothing to reset).
    pub fn reset_growth(&self, key: &str) -> u32 {
        let _lock = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let (had, by_key) = {
            let mut gs = self.growth.lock().unwrap_or_else(|e| e.into_inner());
            let had = gs.by_key.remove(key).map_or(0, |g| g.steps);
            if had > 0 {
                gs.dirty = true;
            }
            (had, gs.by_key.clone())
        };
        self.growth_counts.forget(key);
        if had == 0 {
            return 0;
        }
        let caps = Arc::clone(&self.caps.lock().unwrap_or_else(|e| e.into_inner()).by_key);
        let cur = self.prepared.load_full();
        let rebuilt = Prepared::build(
            Arc::clone(&cur.policy),
            Some(&cur),
            &self.shared.state,
            &self.shared.shed,
            &caps,
            &by_key,
        );
        self.prepared.store(Arc::new(rebuilt));
        drop(_lock);
        self.persist_growth();
        self.notify_growth(&GrowthEvent {
            client_key: key,
            plan: None,
            action: "growth_reset",
            steps: 0,
            factor: 1.0,
            usage: None,
            threshold: None,
            window_secs: None,
        });
        had
    }

    /// Writes the growth file when growth changed since it was last written (the pruner
    /// calls this every few seconds; the engine's drop once more).
    fn persist_growth(&self) {
        let mut gs = self.growth.lock().unwrap_or_else(|e| e.into_inner());
        if !gs.dirty {
            return;
        }
        let Some(path) = gs.file.clone() else {
            gs.dirty = false;
            return;
        };
        match growth::persist(
            &path,
            &gs.by_key,
            self.shared.clock.now(),
            std::time::SystemTime::now(),
        ) {
            Ok(()) => gs.dirty = false,
            Err(e) => tracing::error!(
                file = %path.display(),
                error = %e,
                "cannot write the growth file; retried at the next prune"
            ),
        }
    }

    /// `key`'s self-set cap, when it has one in `prep`'s generation.
    fn client_cap(&self, prep: &Prepared, key: &str) -> Option<ClientCap> {
        if prep.capped.is_empty() {
            return None;
        }
        let caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
        caps.by_key.get(key).cloned()
    }

    // --- the usage endpoint (module `admission::usage`) ---

    /// Whether the adapter should compare request paths with the usage endpoint's (one
    /// relaxed load per request; false while the policy has no endpoint).
    #[inline]
    pub(crate) fn usage_armed(&self) -> bool {
        self.usage_armed.load(Ordering::Relaxed)
    }

    /// The usage endpoint's settings when `path` is its path.
    pub(crate) fn usage_endpoint_at(&self, path: &str) -> Option<UsageSettings> {
        let prep = self.prepared();
        prep.usage.as_ref().filter(|u| &*u.path == path).cloned()
    }

    /// The client key of a request, found exactly as [`Engine::decide`] finds it (the same
    /// extractors, trusted proxies and hashing); nothing is decided or counted.
    pub(crate) fn client_key_of(&self, req: &RequestFacts<'_>) -> String {
        let prep = self.prepared();
        let pol: &CompiledPolicy = &prep.policy;
        let who = self.identify(pol, req);
        let ip_key =
            identify::LazyIpKey::new(who.ip, pol.identify.ipv4_prefix, pol.identify.ipv6_prefix);
        let client_key = who.key(&pol.identify, &ip_key, &self.hasher);
        who.key_text(&client_key, pol.identify.max_key_length)
            .to_owned()
    }

    /// Whether the service has spare capacity a client over its quota could borrow now
    /// (burst sharing on and shedding utilisation below its threshold).
    pub(crate) fn spare_capacity(&self) -> bool {
        let prep = self.prepared();
        prep.borrow_below
            .is_some_and(|below| self.shared.shed.below_utilization(below))
    }

    /// Sets (`Some`) or lifts (`None`) `key`'s own cap: checked against its quota without
    /// caps (a cap may only lower a limit), bounded by `max_caps` and the write limiter,
    /// written to the caps file, then applied. Blocking (file I/O); `Ok(false)` when
    /// nothing changed.
    pub(crate) fn set_cap(&self, key: &str, cap: Option<ClientCap>) -> Result<bool, CapError> {
        let prep = self.prepared();
        let usage = prep
            .usage
            .as_ref()
            .filter(|u| u.self_caps)
            .ok_or(CapError::Off)?;
        let max_caps = usage.max_caps;
        let path = self.store.caps_path().ok_or(CapError::NoFile)?;
        if let Some(c) = &cap {
            self.check_cap(&prep.policy, key, c)?;
        }
        drop(prep);
        let _serial = self.cap_writes.lock().unwrap_or_else(|e| e.into_inner());
        let next = {
            let mut caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
            if caps.by_key.get(key) == cap.as_ref() {
                return Ok(false);
            }
            let mut next = (*caps.by_key).clone();
            match cap {
                Some(c) => {
                    if !next.contains_key(key) && next.len() >= max_caps as usize {
                        return Err(CapError::TooMany(max_caps));
                    }
                    next.insert(key.to_owned(), c);
                }
                None => {
                    next.remove(key);
                }
            }
            caps.take_write(self.shared.clock.now())
                .map_err(CapError::TooFast)?;
            next
        };
        caps::persist(&path, &next)
            .map_err(|e| CapError::Io(format!("cannot write `{}`: {e}", path.display())))?;
        let _lock = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let next = Arc::new(next);
        self.caps.lock().unwrap_or_else(|e| e.into_inner()).by_key = Arc::clone(&next);
        let cur = self.prepared.load_full();
        let grown = self.growth_snapshot();
        let rebuilt = Prepared::build(
            Arc::clone(&cur.policy),
            Some(&cur),
            &self.shared.state,
            &self.shared.shed,
            &next,
            &grown,
        );
        self.prepared.store(Arc::new(rebuilt));
        Ok(true)
    }

    /// Refuses a cap above `key`'s quota without caps (the plan an override or
    /// `default_plan` gives it, and every plan it has buckets in), or naming a bandwidth
    /// that quota does not have.
    fn check_cap(&self, pol: &CompiledPolicy, key: &str, cap: &ClientCap) -> Result<(), CapError> {
        let mut quotas = vec![quota::resolve(pol, key, None)];
        for (i, plan) in pol.plans.iter().enumerate() {
            if plan.bandwidths.iter().any(|bw| self.has_bucket(key, bw)) {
                quotas.push(quota::resolve(pol, key, Some(i)));
            }
        }
        for (name, c) in &cap.bandwidths {
            let mut found = false;
            for bw in quotas
                .iter()
                .flat_map(|q| q.bandwidths.map_or(&[][..], |b| &b[..]))
                .filter(|bw| &*bw.name == name.as_str())
            {
                found = true;
                if bw.period.is_some() && c.burst.is_some() {
                    return Err(CapError::Invalid(format!(
                        "bandwidth `{name}` is a quota per calendar period: cap its `quota`; \
                         it has no burst"
                    )));
                }
                let (q, w) = quota::quota_window(bw.rate);
                if c.quota > q || c.burst.is_some_and(|b| b > bw.burst) {
                    return Err(CapError::Invalid(format!(
                        "bandwidth `{name}` allows at most quota {q} per {w} s with burst {}; \
                         a cap can only lower it",
                        bw.burst
                    )));
                }
                if caps::capped(bw, c).is_none() {
                    return Err(CapError::Invalid(format!(
                        "bandwidth `{name}`: quota {} with burst {} cannot be represented",
                        c.quota,
                        c.burst.unwrap_or(bw.burst)
                    )));
                }
            }
            if !found {
                let names: Vec<&str> = quotas
                    .iter()
                    .flat_map(|q| q.bandwidths.map_or(&[][..], |b| &b[..]))
                    .map(|bw| &*bw.name)
                    .collect();
                return Err(CapError::Invalid(if names.is_empty() {
                    format!("no bandwidth `{name}`: your quota has no bandwidths")
                } else {
                    format!(
                        "no bandwidth `{name}` in your quota; its bandwidths are: {}",
                        names.join(", ")
                    )
                }));
            }
        }
        if let (Some(m), Some(limit)) = (
            cap.concurrency,
            quotas.iter().filter_map(|q| q.concurrency).min(),
        ) {
            if m > limit {
                return Err(CapError::Invalid(format!(
                    "concurrency allows at most {limit}; a cap can only lower it"
                )));
            }
        }
        Ok(())
    }

    /// Whether `key` has a bucket of `bw` (a slot of its client entry, or an entry of its
    /// own).
    fn has_bucket(&self, key: &str, bw: &CompiledBandwidth) -> bool {
        let state = &self.shared.state;
        state.with_client_slot(key, &bw.id, |_| ()).is_some()
            || state.with_existing(&bw.id, key, |_| ()).is_some()
    }

    /// The `n` clients using the largest fraction of a quota bucket right now. One pass
    /// over the tracked keys (≤ `max_keys`), keeping the top `n`.
    pub fn top_clients(&self, n: usize) -> Vec<ClientUsage> {
        if n == 0 {
            return Vec::new();
        }
        let prep = self.prepared();
        let now = self.shared.clock.now();
        // (used fraction, key) of quota buckets (plan and client scopes).
        let mut best: Vec<(f64, String)> = Vec::with_capacity(n + 1);
        self.shared.state.for_each(|e| {
            let scope = e.scope();
            if !(scope == CLIENT_SCOPE
                || scope.starts_with("plan:")
                || scope.starts_with("client:"))
            {
                return;
            }
            let mut used = 0.0f64;
            e.for_each_bucket(|tat, cap| {
                let cap = cap.max(1);
                used = used.max(tat.saturating_sub(now).min(cap) as f64 / cap as f64);
            });
            if used <= 0.0 {
                return;
            }
            if let Some(slot) = best.iter_mut().find(|(_, k)| k == e.key()) {
                slot.0 = slot.0.max(used);
                return;
            }
            if best.len() < n || best.last().is_some_and(|(u, _)| used > *u) {
                best.push((used, e.key().to_owned()));
                best.sort_by(|a, b| b.0.total_cmp(&a.0));
                best.truncate(n);
            }
        });
        best.into_iter()
            .filter_map(|(_, k)| self.usage_of(&prep, &k, now))
            .collect()
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("in_flight", &self.in_flight())
            .field("tracked_keys", &self.tracked_keys())
            .finish_non_exhaustive()
    }
}

fn shed_retry_after(pol: &CompiledPolicy) -> Duration {
    Duration::from_secs(
        pol.responses
            .shed_retry_after
            .0
            .as_nanos()
            .div_ceil(1_000_000_000)
            .max(1) as u64,
    )
}

/// The 503 of `on_failure: closed` while the state backend is unreachable.
fn backend_unavailable(
    pol: &CompiledPolicy,
    plan: Option<Arc<str>>,
    client_key: &ClientKey,
    shadow_hits: u32,
) -> Rejection {
    backend_unavailable_owned(plan, client_key, shed_retry_after(pol), shadow_hits)
}

/// What a decision hands its caller: a [`Decision`] (for [`Engine::decide`], which cannot
/// wait) or a [`Begun`].
trait Answer {
    fn decided(d: Decision) -> Self;
    fn remote(check: RemoteCheck) -> Self;
}

impl Answer for Decision {
    #[inline(always)]
    fn decided(d: Decision) -> Self {
        d
    }

    /// Not produced without `remote_ok`; admitting is what the local part decided.
    #[inline(always)]
    fn remote(check: RemoteCheck) -> Self {
        Decision::Admit(check.admitted)
    }
}

impl Answer for Begun {
    #[inline(always)]
    fn decided(d: Decision) -> Self {
        Begun::Decided(d)
    }

    #[inline(always)]
    fn remote(check: RemoteCheck) -> Self {
        Begun::Remote(check)
    }
}

/// What [`Engine::begin`] returns.
// `Remote` (exact mode, about to wait for a network round trip) is the large one; boxing it
// would add an allocation to every exact decision to shrink the local ones' return value
// (tried: the local decision's instruction count did not change, BENCHMARKS.md).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Begun {
    /// The decision.
    Decided(Decision),
    /// Everything but the remote quota check passed; await [`RemoteCheck::resolve`].
    Remote(RemoteCheck),
}

/// A decision waiting for the state backend's remote check (Redis `exact` mode). It holds the request's ticket (in-flight
/// count, concurrency permit): dropping it, or a rejection, releases them.
pub struct RemoteCheck {
    shared: Arc<TicketShared>,
    backend: Arc<dyn StateBackend>,
    admitted: Admitted,
    /// `limit` rules' buckets checked first (their verdict indices come first).
    rules: Box<[RuleBucket]>,
    bandwidths: Arc<[CompiledBandwidth]>,
    cost: u64,
    concurrency: Option<u32>,
    client_key: ClientKey,
    plan: Option<Arc<str>>,
    operation: Option<Arc<str>>,
    /// The request's context, for the events of the resolved decision.
    context: Option<RequestContext>,
    quota_status: u16,
    shed_retry_after: Duration,
    retry_stagger: Duration,
    headers: HeaderMode,
    priority: Priority,
    shadow_hits: u32,
}

impl std::fmt::Debug for RemoteCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCheck")
            .field("client_key", &self.client_key)
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

// === impl RemoteCheck ===

impl RemoteCheck {
    /// Runs the backend's remote check (at most the backend's budget); on failure or
    /// timeout, decides by the backend's `on_failure`.
    pub async fn resolve(mut self) -> Decision {
        let lease = self.concurrency.map(|l| (l, self.backend.new_lease_id()));
        let verdict = self
            .backend
            .remote_check(
                self.client_key.as_str(),
                &self.rules,
                &self.bandwidths,
                self.cost,
                lease,
            )
            .await;
        let now = self.shared.clock.now();
        match verdict {
            Verdict::Admit => {
                if let Some((_, id)) = lease {
                    let guard = Arc::clone(&self.backend).hold_lease(id, self.client_key.as_str());
                    self.admitted.ticket.hold(guard);
                }
                self.admit()
            }
            Verdict::Busy => {
                let r = Rejection {
                    status: self.quota_status,
                    stage: Stage::Concurrency,
                    rule: None,
                    plan: self.plan.clone(),
                    bandwidth: None,
                    client_key: self.client_key.clone(),
                    retry_after: Some(Duration::from_secs(1)),
                    ratelimit: None,
                    delay: None,
                    delay_guard: None,
                    shadow_hits: self.shadow_hits,
                };
                self.finish_reject(r)
            }
            Verdict::Reject {
                index,
                wait,
                tat_ahead,
            } => {
                let tat = now.saturating_add(tat_ahead);
                match index.checked_sub(self.rules.len()) {
                    Some(index) => self.reject_quota(index, wait, tat, now),
                    None => self.reject_rule(index, wait, tat, now),
                }
            }
            Verdict::Unavailable => match self.backend.on_failure() {
                OnFailure::Open => {
                    self.backend.count_failure_admit();
                    self.admit()
                }
                OnFailure::Closed => {
                    self.backend.count_failure_reject();
                    let r = backend_unavailable_owned(
                        self.plan.clone(),
                        &self.client_key,
                        self.shed_retry_after,
                        self.shadow_hits,
                    );
                    self.finish_reject(r)
                }
                OnFailure::Local => self.local_fallback(now),
            },
        }
    }

    /// Degraded `local`: decides on the local store, shares the usage for the `1/N` share.
    fn local_fallback(self, now: Nanos) -> Decision {
        let store = &self.shared.state;
        let key = self.client_key.as_str();
        let mut ledger = ChargeBuf::default();
        let mut charges = Charges::new(store, now, &mut ledger);
        // The rules' buckets first, as the rules stage would have.
        for (i, r) in self.rules.iter().enumerate() {
            let p = crate::bucket::params(&r.bandwidth);
            let got = store.with_entry(&r.bandwidth.id, &r.key, now, r.bandwidth.c_ns, |e| {
                (e.consume(now, p, 1), e.tat())
            });
            match got {
                Ok((gcra::Verdict::Admit { .. }, _)) => charges.push(Charge::Bucket {
                    scope: &r.bandwidth.id,
                    key: &r.key,
                    amount: p.t,
                }),
                Ok((gcra::Verdict::Reject { wait }, tat)) => {
                    charges.refund();
                    return self.reject_rule(i, wait, tat, now);
                }
                Err(_) => {
                    let r = backend_unavailable_owned(
                        self.plan.clone(),
                        &self.client_key,
                        self.shed_retry_after,
                        self.shadow_hits,
                    );
                    charges.refund();
                    return self.finish_reject(r);
                }
            }
        }
        let out = if self.bandwidths.is_empty() {
            Ok(Consumed::Admitted {
                tightest: None,
                permit: quota::Permit::NotTried,
            })
        } else {
            quota::consume(
                store,
                &self.bandwidths,
                None,
                key,
                self.cost,
                now,
                &self.shared.wall,
                &mut charges,
            )
        };
        match out {
            Ok(Consumed::Admitted { .. }) => {
                for r in &self.rules {
                    self.backend.record_rule(&r.key, &r.bandwidth);
                }
                if !self.bandwidths.is_empty() {
                    self.backend.record(key, &self.bandwidths, self.cost);
                }
                self.backend.count_failure_admit();
                charges.commit();
                self.admit()
            }
            Ok(Consumed::Rejected {
                bandwidth,
                wait,
                tat,
            }) => {
                let index = self
                    .bandwidths
                    .iter()
                    .position(|b| std::ptr::eq(b, bandwidth))
                    .unwrap_or(0);
                charges.refund();
                self.reject_quota(index, wait, tat, now)
            }
            Err(_) => {
                let r = backend_unavailable_owned(
                    self.plan.clone(),
                    &self.client_key,
                    self.shed_retry_after,
                    self.shadow_hits,
                );
                charges.refund();
                self.finish_reject(r)
            }
        }
    }

    fn admit(self) -> Decision {
        self.emit(DecisionKind::Admit, None, None, None, 0, None);
        Decision::Admit(self.admitted)
    }

    fn reject_quota(self, index: usize, wait: Nanos, tat: Nanos, now: Nanos) -> Decision {
        let bw = self.bandwidths.get(index).or(self.bandwidths.first());
        let wall = self.shared.wall.offset();
        // Clients rejected together are told to come back one after another (not at a
        // calendar period's reset: see `Decider::quota`).
        let wait = bw.filter(|bw| bw.period.is_none()).map_or(wait, |bw| {
            self.shared.stagger.wait(
                &bw.id,
                self.client_key.as_str(),
                crate::bucket::params(bw),
                self.cost,
                tat,
                now,
                wait,
                self.retry_stagger,
            )
        });
        let retry_after = gcra::retry_after(wait);
        let info = bw.filter(|_| self.headers != HeaderMode::Never).map(|bw| {
            let mut info = quota::ratelimit_info(bw, Some(&self.bandwidths), tat, now, wall);
            info.reset_secs = info.reset_secs.max(retry_after.as_secs());
            info
        });
        let r = Rejection {
            status: self.quota_status,
            stage: Stage::Quota,
            rule: None,
            plan: self.plan.clone(),
            bandwidth: bw.map(|b| Arc::clone(&b.name)),
            client_key: self.client_key.clone(),
            retry_after: Some(retry_after),
            ratelimit: info,
            delay: None,
            delay_guard: None,
            shadow_hits: self.shadow_hits,
        };
        self.finish_reject(r)
    }

    /// Rule bucket `index` rejected (a 429 of stage `rule`, as the rules stage answers).
    fn reject_rule(self, index: usize, wait: Nanos, tat: Nanos, now: Nanos) -> Decision {
        let Some(bucket) = self.rules.get(index) else {
            return self.reject_quota(0, wait, tat, now);
        };
        let info = (self.headers != HeaderMode::Never)
            .then(|| quota::ratelimit_info(&bucket.bandwidth, None, tat, now, 0));
        let r = Rejection {
            status: self.quota_status,
            stage: Stage::Rule,
            rule: Some(Arc::clone(&bucket.rule)),
            plan: None,
            bandwidth: Some(Arc::clone(&bucket.bandwidth.name)),
            client_key: self.client_key.clone(),
            retry_after: Some(gcra::retry_after(wait)),
            ratelimit: info,
            delay: None,
            delay_guard: None,
            shadow_hits: self.shadow_hits,
        };
        self.finish_reject(r)
    }

    fn finish_reject(self, r: Rejection) -> Decision {
        self.emit(
            DecisionKind::Reject,
            Some(r.stage),
            r.bandwidth.as_deref(),
            r.retry_after,
            r.status,
            r.ratelimit.as_ref(),
        );
        // Dropping the ticket gives back the in-flight count and the permit.
        drop(self.admitted);
        Decision::Reject(r)
    }

    fn emit(
        &self,
        kind: DecisionKind,
        stage: Option<Stage>,
        bandwidth: Option<&str>,
        retry_after: Option<Duration>,
        status: u16,
        limit: Option<&RateLimitInfo>,
    ) {
        if !self.shared.has_observer.load(Ordering::Acquire) {
            return;
        }
        if let Some(obs) = &*self.shared.observer.load() {
            obs.on_decision(&DecisionEvent {
                client_key: self.client_key.as_str(),
                operation: self.operation.as_deref(),
                kind,
                stage,
                rule: None,
                plan: self.plan.as_deref(),
                bandwidth,
                cost: self.cost,
                priority: self.priority,
                retry_after,
                status,
                ratelimit: limit,
                usage: None,
                context: self.context.as_ref(),
            });
        }
    }
}

fn backend_unavailable_owned(
    plan: Option<Arc<str>>,
    client_key: &ClientKey,
    retry_after: Duration,
    shadow_hits: u32,
) -> Rejection {
    Rejection {
        status: 503,
        stage: Stage::Backend,
        rule: None,
        plan,
        bandwidth: None,
        client_key: client_key.clone(),
        retry_after: Some(retry_after),
        ratelimit: None,
        delay: None,
        delay_guard: None,
        shadow_hits,
    }
}

/// Who sent a request (stage 1, [`Engine::identify`]).
struct Identity<'r> {
    /// The client's IP: the peer's, or the one trusted proxies forwarded.
    ip: IpAddr,
    /// The key as the request carries it, when an extractor found one.
    raw: Option<&'r str>,
}

impl<'r> Identity<'r> {
    /// The client key: the extracted one (hashed when longer than `max_key_length`), else
    /// the aggregated IP. Kept apart from `Identity` so that it is built where it stays.
    #[inline(always)]
    fn key(
        &self,
        id: &CompiledIdentify,
        ip_key: &identify::LazyIpKey,
        hasher: &RandomState,
    ) -> ClientKey {
        match self.raw {
            Some(v) => identify::bounded_key(v, id.max_key_length, hasher),
            None => ip_key.get().clone(),
        }
    }

    /// The client key's text: the request's own when it is the key (no UTF-8
    /// re-validation of the copy).
    fn key_text<'s>(&'s self, key: &'s ClientKey, max_key_length: usize) -> &'s str {
        match self.raw {
            Some(v) if v.len() <= max_key_length => v,
            _ => key.as_str(),
        }
    }
}

/// What the quota stage passes on.
struct QuotaPassed {
    /// How the state backend decides this request's quota.
    route: Route,
    /// Admitted over quota by burst sharing.
    borrowed: bool,
    /// The RateLimit numbers of an admitted response (`ratelimit_headers: always`).
    ratelimit: Option<RateLimitInfo>,
    /// The concurrency permit, when the quota check took it on the way.
    permit: Option<Arc<Entry>>,
}

/// Per-decision context for building rejections and events.
struct Deciding<'d> {
    engine: &'d Engine,
    now: Nanos,
    client_key: &'d ClientKey,
    /// The client key's text (the request's own when it is the key).
    key: &'d str,
    op_name: Option<&'d str>,
    cost: u64,
    observer: Option<&'d Arc<dyn Observer>>,
    /// The request's context, carried by every event.
    context: Option<&'d RequestContext>,
    headers: HeaderMode,
    /// The request's priority class as known so far (`normal` until a `tag` rule or
    /// burst sharing says otherwise): what a rejection event reports.
    priority: Priority,
}

impl<'d> Deciding<'d> {
    /// Tells `obs` of an admit; `local` when its quota was decided here, on local state
    /// (not remotely, not by an `allow` rule), so that the event carries its usage.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)] // one call site, the admit's own parts
    fn observe_admit(
        &self,
        obs: &Arc<dyn Observer>,
        pol: &CompiledPolicy,
        q: &quota::Quota<'_>,
        allow_rule: Option<&fairgate_policies::compiled::CompiledRule>,
        borrowed: bool,
        ratelimit: Option<&RateLimitInfo>,
        local: bool,
    ) {
        obs.on_decision(&DecisionEvent {
            client_key: self.key,
            operation: self.op_name,
            kind: if borrowed {
                DecisionKind::Borrowed
            } else {
                DecisionKind::Admit
            },
            // An `allow` rule settled it: no plan was involved.
            stage: allow_rule.map(|_| Stage::Rule),
            rule: allow_rule.map(|r| &*r.name),
            plan: if allow_rule.is_some() {
                None
            } else {
                q.plan.map(|p| &*p.name)
            },
            bandwidth: ratelimit.map(|r| &*r.bandwidth),
            cost: self.cost,
            priority: self.priority,
            retry_after: None,
            status: 0,
            ratelimit,
            usage: q.bandwidths.filter(|_| local).map(|bws| QuotaUsage {
                policy: pol,
                store: &self.engine.shared.state,
                client_key: self.key,
                plan: q.plan,
                bandwidths: bws,
                now: self.now,
                wall: &self.engine.shared.wall,
            }),
            context: self.context,
        });
    }

    /// Stage 2: every matching rule in order (`deny`, `allow`, `limit`, `tag`; a shadow
    /// rule's would-be rejection is counted and reported). A rejection keeps the priority
    /// class `tag` rules gave the request before the rejecting rule.
    #[inline(always)]
    fn rules(
        &mut self,
        prep: &'d Prepared,
        view: &RequestView<'_>,
        keys: &RuleKeys<'d>,
        charges: &mut Charges<'d, '_>,
        route: &mut LazyRoute<'_>,
        shared: &mut RulesShared<'d>,
    ) -> ControlFlow<Decision, RulesOutcome> {
        let pol: &'d CompiledPolicy = &prep.policy;
        let (engine, now, ck, op_name, cost) =
            (self.engine, self.now, self.key, self.op_name, self.cost);
        let (observer, context) = (self.observer, self.context);
        let mut on_shadow = |hit: ShadowHit<'_>| {
            engine.shadow_rejects.fetch_add(1, Ordering::Relaxed);
            if let Some(obs) = observer {
                let info = hit
                    .bandwidth
                    .map(|(bw, tat)| quota::ratelimit_info(bw, None, tat, now, 0));
                obs.on_decision(&DecisionEvent {
                    client_key: ck,
                    operation: op_name,
                    kind: DecisionKind::ShadowReject,
                    stage: Some(Stage::Rule),
                    rule: Some(&hit.rule.name),
                    plan: None,
                    bandwidth: hit.bandwidth.map(|(bw, _)| &*bw.name),
                    cost,
                    priority: hit.priority.unwrap_or(Priority::Normal),
                    retry_after: None,
                    status: 0,
                    ratelimit: info.as_ref(),
                    usage: None,
                    context,
                });
            }
        };
        match rules::evaluate(
            pol,
            &prep.sketches,
            view,
            keys,
            &engine.shared.state,
            now,
            charges,
            &mut on_shadow,
            route,
            shared,
        ) {
            Ok(o) => {
                self.priority = o.priority.unwrap_or(Priority::Normal);
                ControlFlow::Continue(o)
            }
            Err((r, tagged)) => {
                self.priority = tagged.unwrap_or(Priority::Normal);
                ControlFlow::Break(self.reject_rule(pol, prep, r))
            }
        }
    }

    /// Stage 3: the client's quota bandwidths, all or nothing, on the route the state
    /// backend gives (not for a request an `allow` rule admitted). Over quota, with burst
    /// sharing on and capacity to spare, the request goes on as `borrowed`. The check
    /// takes the concurrency permit on the way when it can (one lookup of the client's
    /// entry for both).
    #[inline(always)]
    fn quota(
        &mut self,
        prep: &Prepared,
        q: &quota::Quota<'d>,
        rules_out: &RulesOutcome,
        backend_route: &mut LazyRoute<'_>,
        charges: &mut Charges<'d, '_>,
    ) -> ControlFlow<Decision, QuotaPassed> {
        let pol: &CompiledPolicy = &prep.policy;
        let (engine, now, ck, cost) = (self.engine, self.now, self.key, self.cost);
        let shadow_hits = rules_out.shadow_hits;
        let plan_name = q.plan.map(|p| &p.name);
        // The state backend routes requests that have quota bandwidths: a request without
        // (no plan, `bandwidths: []`, `allow`) is not affected by the backend's failures.
        let route = if !rules_out.allowed && q.bandwidths.is_some_and(|b| !b.is_empty()) {
            backend_route.get()
        } else {
            Route::Local
        };
        let mut passed = QuotaPassed {
            route,
            borrowed: false,
            ratelimit: None,
            permit: None,
        };
        if route == Route::Reject {
            engine.backend().count_failure_reject();
            return ControlFlow::Break(self.reject(backend_unavailable(
                pol,
                plan_name.cloned(),
                self.client_key,
                shadow_hits,
            )));
        }
        // A remote check decides the bandwidths; failing open skips them.
        let local_quota = !matches!(route, Route::Remote | Route::Admit);
        let Some(bws) = q.bandwidths.filter(|_| !rules_out.allowed && local_quota) else {
            return ControlFlow::Continue(passed);
        };
        let wall = &engine.shared.wall;
        match quota::consume(
            &engine.shared.state,
            bws,
            q.concurrency,
            ck,
            cost,
            now,
            wall,
            charges,
        ) {
            Err(_) => ControlFlow::Break(self.reject_full(pol, plan_name, shadow_hits)),
            Ok(Consumed::Admitted { tightest, permit }) => {
                match permit {
                    Permit::NotTried => {}
                    Permit::Taken(p) => passed.permit = Some(p),
                    Permit::Refused => {
                        return ControlFlow::Break(self.reject_concurrency(
                            pol,
                            plan_name,
                            shadow_hits,
                        ));
                    }
                }
                if self.headers == HeaderMode::Always {
                    passed.ratelimit = tightest.map(|(bw, tat)| {
                        quota::ratelimit_info(bw, Some(bws), tat, now, wall.offset())
                    });
                }
                ControlFlow::Continue(passed)
            }
            Ok(Consumed::Rejected {
                bandwidth,
                wait,
                tat,
            }) => {
                // A fixed quota (cost control) is never borrowed past, nor is a client that
                // capped itself (it asked not to use more).
                let can_borrow = !q.fixed
                    && !q.capped
                    && prep
                        .borrow_below
                        .is_some_and(|below| engine.shared.shed.below_utilization(below));
                if !can_borrow {
                    // Clients rejected together are told to come back one after another.
                    // Not at a calendar period's reset: `wait` is the time to the period's
                    // end, and the stagger spreads by emission intervals, which a period
                    // does not have.
                    let stagger = bandwidth.period.is_none();
                    let wait = if !stagger {
                        wait
                    } else {
                        engine.shared.stagger.wait(
                            &bandwidth.id,
                            self.key,
                            crate::bucket::params(bandwidth),
                            self.cost,
                            tat,
                            now,
                            wait,
                            pol.responses.retry_stagger.0,
                        )
                    };
                    let retry_after = gcra::retry_after(wait);
                    let info = (self.headers != HeaderMode::Never).then(|| {
                        let mut info =
                            quota::ratelimit_info(bandwidth, Some(bws), tat, now, wall.offset());
                        // `t` says no earlier than `Retry-After`.
                        info.reset_secs = info.reset_secs.max(retry_after.as_secs());
                        info
                    });
                    return ControlFlow::Break(self.reject(Rejection {
                        status: pol.responses.quota_status,
                        stage: Stage::Quota,
                        rule: None,
                        plan: plan_name.cloned(),
                        bandwidth: Some(Arc::clone(&bandwidth.name)),
                        client_key: self.client_key.clone(),
                        retry_after: Some(retry_after),
                        ratelimit: info,
                        delay: None,
                        delay_guard: None,
                        shadow_hits,
                    }));
                }
                passed.borrowed = true;
                self.priority = Priority::Borrowed;
                // Over quota: the exceeded bandwidth (nothing left), sent as a rejection's
                // are (unless `never`): the client must see that it is over its quota.
                if self.headers != HeaderMode::Never {
                    passed.ratelimit = Some(quota::ratelimit_info(
                        bandwidth,
                        Some(bws),
                        tat,
                        now,
                        wall.offset(),
                    ));
                }
                ControlFlow::Continue(passed)
            }
        }
    }

    /// Stage 4: the client's concurrency permit, when its quota has a limit (never
    /// borrowed).
    #[inline(always)]
    fn concurrency(
        &mut self,
        pol: &CompiledPolicy,
        q: &quota::Quota<'_>,
        shadow_hits: u32,
    ) -> ControlFlow<Decision, Option<Arc<Entry>>> {
        let Some(limit) = q.concurrency else {
            return ControlFlow::Continue(None);
        };
        let got = self
            .engine
            .shared
            .state
            .with_client(self.key, self.now, &[], |e, _| {
                e.try_acquire(u64::from(limit)).then(|| Arc::clone(e))
            });
        let plan_name = q.plan.map(|p| &p.name);
        match got {
            Ok(Some(p)) => ControlFlow::Continue(Some(p)),
            Ok(None) => ControlFlow::Break(self.reject_concurrency(pol, plan_name, shadow_hits)),
            Err(_) => ControlFlow::Break(self.reject_full(pol, plan_name, shadow_hits)),
        }
    }

    /// Stage 5: global shedding by priority class. A shed request gives its concurrency
    /// permit back at once; its answer may wait the reject delay.
    #[inline(always)]
    fn shed(
        &mut self,
        prep: &Prepared,
        plan: Option<&Arc<str>>,
        permit: &mut Option<Arc<Entry>>,
        shadow_hits: u32,
    ) -> ControlFlow<Decision, ()> {
        let engine = self.engine;
        let shed = &engine.shared.shed;
        if shed.try_enter(self.priority, prep.shed.as_ref()) {
            return ControlFlow::Continue(());
        }
        if let Some(p) = permit.take() {
            p.release();
        }
        engine
            .last_shed
            .store(self.now.saturating_add(1), Ordering::Relaxed);
        let (delay, delay_guard) = match shed.reject_delay(prep.shed.as_ref()) {
            Some((d, g)) => (Some(d), Some(g)),
            None => (None, None),
        };
        let pol: &CompiledPolicy = &prep.policy;
        ControlFlow::Break(self.reject(Rejection {
            status: pol.responses.shed_status,
            stage: Stage::Shed,
            rule: None,
            plan: plan.cloned(),
            bandwidth: None,
            client_key: self.client_key.clone(),
            retry_after: Some(shed_retry_after(pol)),
            ratelimit: None,
            delay,
            delay_guard,
            shadow_hits,
        }))
    }

    fn reject(&mut self, r: Rejection) -> Decision {
        if let Some(obs) = self.observer {
            obs.on_decision(&DecisionEvent {
                client_key: self.client_key.as_str(),
                operation: self.op_name,
                kind: DecisionKind::Reject,
                stage: Some(r.stage),
                rule: r.rule.as_deref(),
                plan: r.plan.as_deref(),
                bandwidth: r.bandwidth.as_deref(),
                cost: self.cost,
                priority: self.priority,
                retry_after: r.retry_after,
                status: r.status,
                ratelimit: r.ratelimit.as_ref(),
                usage: None,
                context: self.context,
            });
        }
        Decision::Reject(r)
    }

    fn reject_concurrency(
        &mut self,
        pol: &CompiledPolicy,
        plan: Option<&Arc<str>>,
        shadow_hits: u32,
    ) -> Decision {
        self.reject(Rejection {
            status: pol.responses.quota_status,
            stage: Stage::Concurrency,
            rule: None,
            plan: plan.cloned(),
            bandwidth: None,
            client_key: self.client_key.clone(),
            retry_after: Some(Duration::from_secs(1)),
            ratelimit: None,
            delay: None,
            delay_guard: None,
            shadow_hits,
        })
    }

    fn reject_full(
        &mut self,
        pol: &CompiledPolicy,
        plan: Option<&Arc<str>>,
        shadow_hits: u32,
    ) -> Decision {
        tracing::warn!(
            tracked = self.engine.shared.state.len(),
            "state table full of in-flight keys; rejecting a new key"
        );
        self.reject(Rejection {
            status: pol.responses.shed_status,
            stage: Stage::Shed,
            rule: None,
            plan: plan.cloned(),
            bandwidth: None,
            client_key: self.client_key.clone(),
            retry_after: Some(shed_retry_after(pol)),
            ratelimit: None,
            delay: None,
            delay_guard: None,
            shadow_hits,
        })
    }

    fn reject_rule(
        &mut self,
        pol: &CompiledPolicy,
        _prep: &Prepared,
        r: RuleReject<'_>,
    ) -> Decision {
        match r {
            RuleReject::Deny { rule, status } => self.reject(Rejection {
                status,
                stage: Stage::Rule,
                rule: Some(Arc::clone(&rule.name)),
                plan: None,
                bandwidth: None,
                client_key: self.client_key.clone(),
                retry_after: None,
                ratelimit: None,
                delay: None,
                delay_guard: None,
                shadow_hits: 0,
            }),
            RuleReject::Limit {
                rule,
                bandwidth,
                key,
                wait,
                tat,
            } => {
                // Staggered like a quota's rejections (the sketch estimator has no TAT:
                // its rejections are told their own wait).
                let wait = match tat {
                    Some(tat) => self.engine.shared.stagger.wait(
                        &bandwidth.id,
                        key,
                        crate::bucket::params(bandwidth),
                        1,
                        tat,
                        self.now,
                        wait,
                        pol.responses.retry_stagger.0,
                    ),
                    None => wait,
                };
                let retry_after = gcra::retry_after(wait);
                let info = (self.headers != HeaderMode::Never).then(|| {
                    let mut info = quota::ratelimit_info(
                        bandwidth,
                        None,
                        tat.unwrap_or(self.now),
                        self.now,
                        0,
                    );
                    info.reset_secs = info.reset_secs.max(retry_after.as_secs());
                    info
                });
                self.reject(Rejection {
                    status: pol.responses.quota_status,
                    stage: Stage::Rule,
                    rule: Some(Arc::clone(&rule.name)),
                    plan: None,
                    bandwidth: Some(Arc::clone(&bandwidth.name)),
                    client_key: self.client_key.clone(),
                    retry_after: Some(retry_after),
                    ratelimit: info,
                    delay: None,
                    delay_guard: None,
                    shadow_hits: 0,
                })
            }
            RuleReject::Full => self.reject_full(pol, None, 0),
            RuleReject::Unavailable => {
                self.engine.backend().count_failure_reject();
                self.reject(backend_unavailable(pol, None, self.client_key, 0))
            }
        }
    }
}

// === impl Prepared ===

impl Prepared {
    /// The request's operation: the one the adapter named, else the first whose matcher
    /// the request matches.
    fn operation(&self, named: Option<&str>, view: &RequestView<'_>) -> Option<&CompiledOperation> {
        let pol = &self.policy;
        let i = match named {
            Some(name) => self.ops_by_name.get(name).copied(),
            None if pol.operations.is_empty() => None,
            None => pol.operation_set.first_match(view, 0),
        }?;
        pol.operations.get(i)
    }

    /// The quota of `key` (see [`quota::resolve`]), held to its self-set cap if it has one.
    #[inline(always)]
    fn quota(&self, key: &str, tagged: Option<PlanId>) -> quota::Quota<'_> {
        let mut q = quota::resolve(&self.policy, key, tagged);
        if !self.capped.is_empty() {
            // A capped client is not grown: its cap applies to its base quota.
            if let Some(c) = self.capped.get(key) {
                return caps::apply(q, c);
            }
        }
        if !self.grown.is_empty() {
            if let (Some(sets), Some(set)) = (self.grown.get(key), q.bandwidths) {
                q.bandwidths = Some(growth::apply(set, sets));
            }
        }
        q
    }

    fn build(
        policy: Arc<CompiledPolicy>,
        old: Option<&Prepared>,
        state: &Store,
        shed: &Shedder,
        caps: &BTreeMap<String, ClientCap>,
        grown: &BTreeMap<String, ClientGrowth>,
    ) -> Prepared {
        let mut ops_by_name = HashMap::with_hasher(RandomState::new());
        for (i, op) in policy.operations.iter().enumerate() {
            ops_by_name.entry(Arc::clone(&op.name)).or_insert(i);
        }
        let sketches = policy
            .rules
            .iter()
            .map(|rule| match &rule.action {
                fairgate_policies::compiled::CompiledAction::Limit {
                    bandwidth,
                    estimator: fairgate_policies::model::Estimator::Sketch,
                    ..
                } => Some(reuse_sketch(old, &rule.name, bandwidth)),
                _ => None,
            })
            .collect();
        let mut scopes: Vec<Arc<str>> = Vec::new();
        for rule in policy.rules.iter() {
            if let fairgate_policies::compiled::CompiledAction::Limit { bandwidth, .. } =
                &rule.action
            {
                scopes.push(Arc::clone(&bandwidth.id));
            }
        }
        for plan in policy.plans.iter() {
            scopes.extend(plan.bandwidths.iter().map(|b| Arc::clone(&b.id)));
        }
        for cq in policy.clients.values() {
            if let Some(bws) = &cq.bandwidths {
                scopes.extend(bws.iter().map(|b| Arc::clone(&b.id)));
            }
        }
        state.pin_ids(scopes.iter());
        state.set_live_scopes(LiveScopes::new(scopes));
        state.set_max_keys(policy.state.max_keys);
        let shed_cfg = policy.shedding.as_ref().map(ShedConfig::from_model);
        if old.is_none_or(|o| o.shed != shed_cfg) {
            shed.configure(shed_cfg.as_ref());
        }
        let borrow_below = policy.burst_sharing.filter(|_| shed_cfg.is_some());
        let capped = caps::compile(&policy, caps);
        let grown = growth::compile(&policy, grown);
        let growth_window = policy
            .plans
            .iter()
            .filter_map(|p| p.growth.as_ref())
            .chain(policy.clients.values().filter_map(|c| c.growth.as_ref()))
            .map(|g| g.window_ns)
            .max()
            .unwrap_or(0);
        let usage = policy
            .source
            .usage_endpoint
            .as_ref()
            .map(|u| UsageSettings {
                path: Arc::from(u.path.as_str()),
                self_caps: u.self_caps,
                max_caps: u.max_caps,
            });
        Prepared {
            policy,
            ops_by_name,
            sketches,
            shed: shed_cfg,
            borrow_below,
            capped,
            grown,
            growth_window,
            usage,
        }
    }
}

/// The growth an engine starts with: read from the policy's growth file (absent: none). A
/// file that cannot be read is set aside (renamed `*.unreadable`) and reported, so that it
/// is neither lost nor silently overwritten.
fn growth_state(store: &PolicyStore, now: Nanos) -> GrowthState {
    let file = store.growth_path();
    let mut by_key = BTreeMap::new();
    if let Some(path) = &file {
        match growth::load(path, now, std::time::SystemTime::now()) {
            Ok(g) => by_key = g,
            Err(e) => {
                let aside = path.with_extension("unreadable");
                let moved = std::fs::rename(path, &aside).is_ok();
                tracing::error!(
                    error = %e,
                    set_aside = moved.then(|| aside.display().to_string()),
                    "the growth file cannot be read: clients start at their base quota"
                );
            }
        }
    }
    GrowthState {
        file,
        by_key,
        dirty: false,
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.persist_growth();
    }
}

/// A rule's sketch carries over a reload when the rule keeps its name and parameters.
fn reuse_sketch(
    old: Option<&Prepared>,
    name: &str,
    bw: &fairgate_policies::compiled::CompiledBandwidth,
) -> Arc<Sketch> {
    old.and_then(|o| {
        o.policy
            .rules
            .iter()
            .position(|r| &*r.name == name)
            .and_then(|i| o.sketches.get(i))
            .and_then(Option::as_ref)
            .filter(|s| s.built_for == (bw.t_ns, bw.c_ns))
            .cloned()
    })
    .unwrap_or_else(|| Arc::new(Sketch::new(bw)))
}
