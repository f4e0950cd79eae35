//! One client's usage as JSON, as the admin API and the dashboard show it.

use serde_json::{json, Value};

use crate::engine::ClientUsage;

/// `u` as the admin API's `/clients/{key}` answers it.
pub(crate) fn usage_json(u: &ClientUsage) -> Value {
    json!({
        "key": u.key,
        "plan": u.plan.as_deref(),
        "usage": u.usage(),
        "in_flight": u.in_flight,
        "concurrency_limit": u.concurrency_limit,
        "cap": u.cap.as_ref(),
        "growth": u.growth.map(|g| json!({"steps": g.steps, "factor": g.factor})),
        "bandwidths": u.bandwidths.iter().map(|b| json!({
            "id": &*b.id,
            "plan": b.plan.as_deref(),
            "name": &*b.ratelimit.bandwidth,
            "quota": b.ratelimit.quota,
            "window_seconds": b.ratelimit.window_secs,
            "burst": b.ratelimit.burst,
            "remaining": b.ratelimit.remaining,
            "reset_seconds": b.ratelimit.reset_secs,
            "fill_fraction": b.fill_fraction,
        })).collect::<Vec<_>>(),
    })
}
