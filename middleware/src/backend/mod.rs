//! Where quota state lives: the [`StateBackend`] trait the engine decides through.
//!
//! The engine always keeps its own in-process store (GCRA buckets, in-flight counts); a
//! state backend says how a request's **quota** is decided against it. The engine holds one
//! `Arc<dyn StateBackend>` ([`Engine::backend`](crate::Engine::backend), default
//! [`Embedded`]) and only talks to it through this trait, so it does not know which backend
//! it has. Each backend has its own file or folder here: `embedded.rs`, `redis/`.
//!
//! - [`Embedded`] (the default): the local store decides, alone. Every method is trivial
//!   and nothing is allocated; [`StateBackend::route`] answers [`Route::Local`].
//! - the Redis backend (`backend/redis/`, public as `crate::fleet`, with the `redis`
//!   feature; started by [`crate::EngineBuilder`]):
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

use fairgate_policies::compiled::{CompiledBandwidth, CompiledGrowth};
use fairgate_policies::model::OnFailure;

use crate::clock::Nanos;

mod embedded;
#[cfg(feature = "redis")]
pub(crate) mod redis;

pub use embedded::Embedded;

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

    /// Whether clients' adaptive growth is the fleet's: counted, decided and kept in the
    /// backend ([`StateBackend::report_growth`]) instead of in this process.
    fn shares_growth(&self) -> bool {
        false
    }

    /// Adds each client's admitted cost to the fleet's count and takes the steps that are
    /// due (see [`GrowthFuture`]).
    fn report_growth<'a>(&'a self, reports: &'a [GrowthReport]) -> GrowthFuture<'a> {
        let n = reports.len();
        Box::pin(async move { vec![None; n] })
    }

    /// Resets `client`'s growth for the fleet.
    fn reset_growth<'a>(&'a self, client: &'a str) -> ResetFuture<'a> {
        let _ = client;
        Box::pin(async { Some(0) })
    }
}

/// One client's admitted cost since the last report, for a backend that keeps adaptive
/// growth for the fleet ([`StateBackend::report_growth`]).
#[derive(Debug, Clone)]
pub struct GrowthReport {
    /// The client key.
    pub client: Box<str>,
    /// Admitted cost since the last report.
    pub cost: u64,
    /// The growth settings of the client's quota.
    pub growth: Arc<CompiledGrowth>,
    /// The longest emission interval (ns per unit) of the bandwidth set in effect.
    pub t_max: u64,
    /// The plan charged (for the event of a step).
    pub plan: Option<Arc<str>>,
    /// This gateway shed a request within the growth window.
    pub shed: bool,
}

/// What the backend says of each reported client, in order: `None` when it could not be
/// asked; else its steps, and the usage that made this report take a step (if it did).
pub type GrowthFuture<'a> =
    Pin<Box<dyn Future<Output = Vec<Option<(u32, Option<f64>)>>> + Send + 'a>>;

/// A growth reset's answer: the steps the client had, `None` when the backend could not be
/// asked.
pub type ResetFuture<'a> = Pin<Box<dyn Future<Output = Option<u32>> + Send + 'a>>;

#[cfg(test)]
mod tests;
