//! The embedded backend: the engine's own in-process store decides every quota, alone.

use std::sync::Arc;

use fairgate_policies::compiled::CompiledBandwidth;
use fairgate_policies::model::OnFailure;

use super::{BackendSnapshot, CheckFuture, Route, RuleBucket, StateBackend, Verdict};

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
