//! Concurrency: the [`Ticket`] an admitted request holds, and what its end releases.
//!
//! A ticket owns up to two permits: the client's in-flight counter (an entry of the state
//! store's concurrency scope, when the client's plan has a concurrency quota) and one unit
//! of the global in-flight count used by shedding. Dropping the ticket, whether the response
//! finished, failed, or the future was dropped because the client went away, releases both
//! exactly once: `Drop` runs once, and `complete` consumes the ticket.
//!
//! The per-client counter is not tied to a policy generation: a reload that changes or
//! keeps the limit sees the same live count (a lowered limit admits nothing new until the
//! count is under it), and a ticket from an older policy releases the very counter it took.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use fairgate_policies::compiled::CompiledBandwidth;
use fairgate_policies::model::Priority;

use crate::clock::Clock;
use crate::event::{CompletionEvent, Observer, Outcome};
use crate::gcra::Params;
use crate::identify::ClientKey;
use crate::shed::Shedder;
use crate::state::{Entry, Store, OVERFLOW};

/// What every ticket of an engine shares with it: where a ticket's end releases into (the
/// client entries of the state store, the shedder's global in-flight count), what it
/// reports to (the observer) and the clock its post-hoc debt is charged at. The engine
/// ([`crate::Engine`]) owns it in an `Arc`; each ticket, and each remote check, holds a
/// clone.
///
/// Aligned to 128 bytes so that the `Arc`'s reference counts, written by every ticket,
/// sit on their own cache lines instead of the read-mostly fields every decision loads.
#[repr(align(128))]
pub(crate) struct TicketShared {
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) state: Store,
    pub(crate) shed: Shedder,
    pub(crate) observer: ArcSwapOption<Arc<dyn Observer>>,
    /// Set once an observer is set: until then a decision skips loading `observer`.
    pub(crate) has_observer: AtomicBool,
    /// Handles kept alive as long as the engine and its tickets
    /// ([`Engine::keep_alive`](crate::Engine::keep_alive)): a backend's tasks (the Redis
    /// lease releases) keep serving tickets that outlive the engine.
    pub(crate) kept: Mutex<Vec<Box<dyn Send + Sync>>>,
    /// Promises of staggered retries (`responses.retry_stagger`).
    pub(crate) stagger: crate::stagger::Stagger,
    /// The clock's place in wall time (calendar periods).
    pub(crate) wall: Arc<crate::clock::WallAnchor>,
}

impl TicketShared {
    /// Shares `state` and `shed`, read with `clock`, with no observer and nothing kept.
    pub(crate) fn new(clock: Arc<dyn Clock>, state: Store, shed: Shedder) -> Self {
        TicketShared {
            wall: Arc::new(crate::clock::WallAnchor::new(&*clock)),
            clock,
            state,
            shed,
            observer: ArcSwapOption::empty(),
            has_observer: AtomicBool::new(false),
            kept: Mutex::new(Vec::new()),
            stagger: crate::stagger::Stagger::new(),
        }
    }
}

/// How post-hoc cost is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PostHocUnit {
    /// One unit per this many response bytes.
    Bytes(u64),
    /// One unit per this many nanoseconds of latency.
    Nanos(u64),
}

/// What to charge after the response.
#[derive(Debug, Clone)]
pub(crate) struct PostHocCharge {
    pub(crate) unit: PostHocUnit,
    pub(crate) bandwidths: Arc<[CompiledBandwidth]>,
}

/// RAII guard of an admitted request. See the module docs.
pub struct Ticket {
    shared: Arc<TicketShared>,
    client: ClientKey,
    permit: Option<Arc<Entry>>,
    priority: Priority,
    borrowed: bool,
    post_hoc: Option<PostHocCharge>,
    /// A fleet-wide concurrency lease (exact mode), given back when the ticket drops.
    lease: Option<Box<dyn Send + Sync>>,
}

// === impl Ticket ===

impl Ticket {
    pub(crate) fn new(
        shared: Arc<TicketShared>,
        client: ClientKey,
        permit: Option<Arc<Entry>>,
        priority: Priority,
        borrowed: bool,
        post_hoc: Option<PostHocCharge>,
    ) -> Self {
        Ticket {
            shared,
            client,
            permit,
            priority,
            borrowed,
            post_hoc,
            lease: None,
        }
    }

    /// Keeps `guard` (a fleet lease) until the ticket drops.
    pub(crate) fn hold(&mut self, guard: Box<dyn Send + Sync>) {
        self.lease = Some(guard);
    }

    /// The client key the request was counted under.
    pub fn client_key(&self) -> &str {
        self.client.as_str()
    }

    /// True when admitted over quota through burst sharing.
    pub fn borrowed(&self) -> bool {
        self.borrowed
    }

    /// The priority class the request was admitted in.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// Ends the request: charges post-hoc cost (`floor(bytes / unit)` or
    /// `floor(latency / unit)` units as debt on every bandwidth of the plan), feeds the
    /// adaptive limiter and the reject-delay latency, tells the observer, then releases the
    /// permits.
    pub fn complete(self, outcome: Outcome) {
        let units = match &self.post_hoc {
            Some(ph) => {
                let units = match ph.unit {
                    PostHocUnit::Bytes(b) => outcome.response_bytes / b.max(1),
                    PostHocUnit::Nanos(n) => {
                        u64::try_from(outcome.latency.as_nanos() / u128::from(n.max(1)))
                            .unwrap_or(u64::MAX)
                    }
                };
                if units > 0 {
                    self.charge(ph, units);
                }
                units
            }
            None => 0,
        };
        self.shared
            .shed
            .on_complete(outcome.latency, outcome.status);
        if let Some(obs) = &*self.shared.observer.load() {
            obs.on_complete(&CompletionEvent {
                client_key: self.client.as_str(),
                status: outcome.status,
                latency: outcome.latency,
                response_bytes: outcome.response_bytes,
                post_hoc_cost: units,
                borrowed: self.borrowed,
            });
        }
        // Drop releases the permits.
    }

    fn charge(&self, ph: &PostHocCharge, units: u64) {
        let now = self.shared.clock.now();
        let key = self.client.as_str();
        let state = &self.shared.state;
        let params = |bw: &CompiledBandwidth| Params {
            t: bw.t_ns,
            c: bw.c_ns,
        };
        // A calendar period's debt counts in the period holding now (charged at its end).
        let wall = self.shared.wall.offset();
        let at = |bw: &CompiledBandwidth| crate::bucket::bucket_now(bw, now, wall);
        // A full table cannot take new debt; the client is then at worst as it was.
        let Ok(map) = state.with_client(key, now, &ph.bandwidths, |e, map| {
            for (bw, &s) in ph.bandwidths.iter().zip(map) {
                if s != OVERFLOW {
                    e.slot(s).charge_debt(at(bw), params(bw), units);
                }
            }
            *map
        }) else {
            return;
        };
        for (i, bw) in ph.bandwidths.iter().enumerate() {
            if map.get(i).is_none_or(|&s| s == OVERFLOW) {
                let _ = state.with_entry(&bw.id, key, now, bw.c_ns, |e| {
                    e.charge_debt(at(bw), params(bw), units)
                });
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            permit.release();
        }
        self.shared.shed.exit();
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("client_key", &self.client)
            .field("priority", &self.priority)
            .field("borrowed", &self.borrowed)
            .finish_non_exhaustive()
    }
}
