//! What the engine tells an [`Observer`]: a [`DecisionEvent`] per decision (and per shadow
//! rule's would-be rejection), a [`CompletionEvent`] per finished request, and the values
//! both carry: the [`Stage`] that settled a decision, the [`RateLimitInfo`] numbers, the
//! request's [`RequestContext`]. Re-exported by [`crate::decision`]; a module of its own so
//! that a ticket can report its completion without depending on the decision that holds it.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fairgate_policies::compiled::{
    CompiledAlerts, CompiledBandwidth, CompiledPlan, CompiledPolicy,
};
use fairgate_policies::model::Priority;

use crate::clock::Nanos;
use crate::gcra;
use crate::state::Store;

/// The stage that rejected a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// A reactive rule (`deny`, or a rule-scoped `limit`).
    Rule,
    /// A plan bandwidth.
    Quota,
    /// The per-client concurrency quota.
    Concurrency,
    /// Global load shedding (also: the state table is full of in-flight keys).
    Shed,
    /// The state backend (Redis) holding the request's quota or rule limit is unavailable
    /// and fails closed (`state.redis.on_failure: closed`): 503, not a quota overrun.
    Backend,
}

impl Stage {
    /// Lower-case name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Stage::Rule => "rule",
            Stage::Quota => "quota",
            Stage::Concurrency => "concurrency",
            Stage::Shed => "shed",
            Stage::Backend => "backend",
        }
    }
}

/// The IETF RateLimit numbers of one bandwidth (draft-ietf-httpapi-ratelimit-headers),
/// and the bandwidths advertised with it.
///
/// A bandwidth "r per P, burst b" is advertised as its sustained rate, `q` units per `w`
/// seconds, plus its burst: `w` is `P` when `P` is whole seconds (`q` = r: `10/s` is
/// `q=10;w=1`, `100000/day` is `q=100000;w=86400`), else `P` rounded up to whole seconds
/// with `q` = r · w / P rounded down (`5/250ms` is `q=20;w=1`), so `q` never promises more
/// than the rate. `burst` is b, what a full bucket admits at once.
///
/// GCRA reading of the live numbers: `remaining` is `floor((C − (max(TAT, now) − now)) / T)`
/// (at most the burst: what may be sent now) and `reset_secs` the seconds until the bucket
/// is full again (rounded up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitInfo {
    /// The bandwidth's name (its `RateLimit-Policy` item name, e.g. `free-0`).
    pub bandwidth: Arc<str>,
    /// Quota units per window (`q`): the sustained rate.
    pub quota: u64,
    /// Window in seconds (`w`).
    pub window_secs: u64,
    /// Burst: units a full bucket admits at once.
    pub burst: u64,
    /// Units left.
    pub remaining: u64,
    /// Seconds until full.
    pub reset_secs: u64,
    /// Every bandwidth of the client's quota (this one among them), all advertised in
    /// `RateLimit-Policy`; `None` for a rule's `limit`, advertised alone.
    pub bandwidths: Option<Arc<[CompiledBandwidth]>>,
}

/// How a request completed, for [`Ticket::complete`](crate::Ticket::complete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Response status.
    pub status: u16,
    /// Response body bytes sent.
    pub response_bytes: u64,
    /// Time from decision to end of response.
    pub latency: Duration,
}

/// What happened to a request, as seen by an [`Observer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionKind {
    /// Admitted within quota.
    Admit,
    /// Admitted over quota through burst sharing.
    Borrowed,
    /// Rejected.
    Reject,
    /// A shadow rule would have rejected it (the request itself goes on).
    ShadowReject,
}

impl DecisionKind {
    /// Lower-case name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            DecisionKind::Admit => "admit",
            DecisionKind::Borrowed => "borrowed",
            DecisionKind::Reject => "reject",
            DecisionKind::ShadowReject => "shadow_reject",
        }
    }
}

/// One decision (or one shadow rule's would-be rejection).
#[derive(Debug, Clone, Copy)]
pub struct DecisionEvent<'a> {
    /// The client key.
    pub client_key: &'a str,
    /// The resolved operation, if any.
    pub operation: Option<&'a str>,
    /// What happened.
    pub kind: DecisionKind,
    /// The rejecting stage (for rejections and shadow rejections).
    pub stage: Option<Stage>,
    /// The rule involved.
    pub rule: Option<&'a str>,
    /// The client's plan.
    pub plan: Option<&'a str>,
    /// The bandwidth involved.
    pub bandwidth: Option<&'a str>,
    /// The request's cost in quota units.
    pub cost: u64,
    /// Priority class used for shedding.
    pub priority: Priority,
    /// `Retry-After` sent.
    pub retry_after: Option<Duration>,
    /// Status answered (0 when admitted: the upstream decides).
    pub status: u16,
    /// The limit involved, if a bandwidth.
    pub ratelimit: Option<&'a RateLimitInfo>,
    /// How far an admit left each of the client's quota bandwidths, whatever
    /// `ratelimit_headers` says: filled for admits decided on local state (not for a
    /// Redis `exact`-mode check, nor a request an `allow` rule admitted).
    pub usage: Option<QuotaUsage<'a>>,
    /// The request's [`RequestContext`], when the adapter was given one.
    pub context: Option<&'a RequestContext>,
}

/// The client's quota bandwidths as an admit left them: [`DecisionEvent::usage`].
#[derive(Clone, Copy)]
pub struct QuotaUsage<'a> {
    pub(crate) policy: &'a CompiledPolicy,
    pub(crate) store: &'a Store,
    pub(crate) client_key: &'a str,
    pub(crate) plan: Option<&'a CompiledPlan>,
    pub(crate) bandwidths: &'a [CompiledBandwidth],
    pub(crate) now: Nanos,
    /// The clock's place in wall time (calendar periods; read only for one).
    pub(crate) wall: &'a crate::clock::WallAnchor,
}

impl<'a> QuotaUsage<'a> {
    /// Each bandwidth of the client's quota, read from the state table when asked: the
    /// engine records nothing for it, so an engine without observers pays nothing (a
    /// request of the same client decided meanwhile may already show). A bandwidth without
    /// a bucket is left out.
    pub fn bandwidths(&self) -> impl Iterator<Item = BandwidthUse<'a>> + 'a {
        let (store, key, now, anchor) = (self.store, self.client_key, self.now, self.wall);
        self.bandwidths.iter().filter_map(move |bw| {
            let tat = store
                .with_client_slot(key, &bw.id, |b| b.peek(now, bw.c_ns))
                .or_else(|| store.with_existing(&bw.id, key, |e| e.peek(now, bw.c_ns)))?;
            let at = match bw.period {
                None => now,
                Some(_) => crate::bucket::bucket_now(bw, now, anchor.offset()),
            };
            let remaining = gcra::remaining(tat, at, crate::bucket::limit(bw)).min(bw.burst);
            Some(BandwidthUse {
                bandwidth: bw,
                remaining,
                usage: 1.0 - remaining as f64 / bw.burst as f64,
            })
        })
    }

    /// The client's plan (an override's plan, if it names one).
    pub fn plan(&self) -> Option<&'a CompiledPlan> {
        self.plan
    }

    /// The usage alerts that apply: the client's override's, else its plan's. Looked up
    /// when asked (one map lookup when the policy has overrides), not by the engine.
    pub fn alerts(&self) -> Option<&'a CompiledAlerts> {
        let over = if self.policy.clients.is_empty() {
            None
        } else {
            self.policy
                .clients
                .get(self.client_key)
                .and_then(|o| o.alerts.as_deref())
        };
        over.or_else(|| self.plan.and_then(|p| p.alerts.as_deref()))
    }

    /// The engine's time of the decision (the clock the TATs are on).
    pub fn now(&self) -> Nanos {
        self.now
    }
}

impl fmt::Debug for QuotaUsage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.bandwidths()).finish()
    }
}

/// One bandwidth of a [`QuotaUsage`].
#[derive(Debug, Clone, Copy)]
pub struct BandwidthUse<'a> {
    /// The bandwidth (its `name` labels metrics; its `id` keys state).
    pub bandwidth: &'a CompiledBandwidth,
    /// Units left in the bucket (at most the burst).
    pub remaining: u64,
    /// The used share of the bucket, `1 − remaining / burst`: 0 is a full bucket, 1 an
    /// empty one.
    pub usage: f64,
}

/// A per-request value for the [`Observer`]: the adapter hands it to the engine with the
/// request (the tower adapter takes it from a `RequestContext` request extension), and every
/// [`DecisionEvent`] of that request carries it, including those of a decision finished
/// later, elsewhere (a Redis `exact`-mode check resolved in the response future). Opaque to
/// the engine: an observer reads its own type back with [`get`](Self::get). Cheap to clone
/// (one `Arc`).
#[derive(Clone)]
pub struct RequestContext(Arc<dyn Any + Send + Sync>);

impl RequestContext {
    /// Wraps `value`.
    pub fn new<T: Any + Send + Sync>(value: T) -> RequestContext {
        RequestContext(Arc::new(value))
    }

    /// The value, if it is a `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

impl fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestContext").finish_non_exhaustive()
    }
}

/// One completed request.
#[derive(Debug, Clone, Copy)]
pub struct CompletionEvent<'a> {
    /// The client key.
    pub client_key: &'a str,
    /// Response status.
    pub status: u16,
    /// Latency.
    pub latency: Duration,
    /// Response body bytes.
    pub response_bytes: u64,
    /// Post-hoc units charged on every bandwidth of the plan.
    pub post_hoc_cost: u64,
    /// Whether the request was admitted by burst sharing.
    pub borrowed: bool,
}

/// A client's quota grew, or an operator reset its growth (adaptive growth, `growth:`).
#[derive(Debug, Clone, Copy)]
pub struct GrowthEvent<'a> {
    /// The client key.
    pub client_key: &'a str,
    /// The plan the client was charged to when it grew (`None` for a reset).
    pub plan: Option<&'a str>,
    /// `growth` (a step) or `growth_reset` (an operator's reset).
    pub action: &'a str,
    /// Steps taken now (0 after a reset).
    pub steps: u32,
    /// The growth factor now (1 after a reset).
    pub factor: f64,
    /// Why: the finished window's usage that reached the threshold (`None` for a reset).
    pub usage: Option<f64>,
    /// The threshold and window it was measured against (`None` for a reset).
    pub threshold: Option<f64>,
    /// The window, seconds.
    pub window_secs: Option<f64>,
}

/// Receives decisions and completions (metrics, decision log). Called inline: keep it
/// cheap and non-blocking.
pub trait Observer: Send + Sync {
    /// A decision was made (also once per shadow rule that would have rejected).
    fn on_decision(&self, event: &DecisionEvent<'_>);
    /// A ticket completed.
    fn on_complete(&self, event: &CompletionEvent<'_>);
    /// A client's quota grew or its growth was reset (rare; default: ignored).
    fn on_growth(&self, event: &GrowthEvent<'_>) {
        let _ = event;
    }
}

/// Two observers are one: both see every event, `A` first.
impl<A: Observer, B: Observer> Observer for (A, B) {
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        self.0.on_decision(event);
        self.1.on_decision(event);
    }

    fn on_complete(&self, event: &CompletionEvent<'_>) {
        self.0.on_complete(event);
        self.1.on_complete(event);
    }

    fn on_growth(&self, event: &GrowthEvent<'_>) {
        self.0.on_growth(event);
        self.1.on_growth(event);
    }
}

impl<T: Observer + ?Sized> Observer for Arc<T> {
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        (**self).on_decision(event);
    }

    fn on_complete(&self, event: &CompletionEvent<'_>) {
        (**self).on_complete(event);
    }

    fn on_growth(&self, event: &GrowthEvent<'_>) {
        (**self).on_growth(event);
    }
}
