//! What the engine answers: [`Decision`], with an [`Admitted`] request's [`Ticket`] or a
//! [`Rejection`] carrying everything a response needs, and (re-exported from `event.rs`) the
//! [`Observer`] events.
//!
//! A rejection is a decision, not an error: it says which stage rejected, which rule,
//! plan and bandwidth, the status to answer with, when to retry and the RateLimit numbers.
//! Turning it into HTTP is the adapter's job (`crate::admission` renders it, in `admission::response`).

use std::sync::Arc;
use std::time::Duration;

pub use fairgate_policies::model::Priority;

pub use crate::concurrency::Ticket;
pub use crate::event::{
    BandwidthUse, CompletionEvent, DecisionEvent, DecisionKind, GrowthEvent, Observer, Outcome,
    QuotaUsage, RateLimitInfo, RequestContext, Stage,
};
pub use crate::identify::ClientKey;
pub use crate::shed::DelayGuard;

/// The engine's answer for one request.
#[derive(Debug)]
pub enum Decision {
    /// Go on; hold the ticket until the response is done.
    Admit(Admitted),
    /// Answer with this rejection.
    Reject(Rejection),
}

impl Decision {
    /// True for [`Decision::Admit`].
    pub fn is_admit(&self) -> bool {
        matches!(self, Decision::Admit(_))
    }

    /// The rejection, if any.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Decision::Reject(r) => Some(r),
            Decision::Admit(_) => None,
        }
    }
}

/// An admitted request.
#[derive(Debug)]
pub struct Admitted {
    /// RAII guard: dropping it releases the concurrency permits; `complete` also charges
    /// post-hoc cost and feeds the adaptive limiter.
    pub ticket: Ticket,
    /// The most constraining bandwidth's numbers, when `ratelimit_headers: always`.
    pub ratelimit: Option<RateLimitInfo>,
}

/// Why a request was rejected, with what the response needs.
#[derive(Debug)]
pub struct Rejection {
    /// Status to answer with (from the policy).
    pub status: u16,
    /// The stage that rejected.
    pub stage: Stage,
    /// The rule, for rule rejections.
    pub rule: Option<Arc<str>>,
    /// The client's plan, for quota and concurrency rejections.
    pub plan: Option<Arc<str>>,
    /// The bandwidth name (`RateLimit-Policy` name) that was exceeded.
    pub bandwidth: Option<Arc<str>>,
    /// The client key.
    pub client_key: ClientKey,
    /// When to retry: whole seconds, never zero. `None` for `deny`.
    pub retry_after: Option<Duration>,
    /// RateLimit numbers of the exceeded bandwidth (unless headers are `never`).
    pub ratelimit: Option<RateLimitInfo>,
    /// Reject-delay hint: wait this long before answering (shed rejections only).
    pub delay: Option<Duration>,
    /// Held while a delayed rejection waits; drop it when the response is sent.
    pub delay_guard: Option<DelayGuard>,
    /// Shadow rules that would have rejected this request.
    pub shadow_hits: u32,
}
