//! The registry of gateways: each renews its registration every second and learns the
//! fleet size N (the `1/N` share while degraded under `on_failure: local`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Fleet;

/// How often a gateway renews its registration.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long a registration lasts without renewal.
const HEARTBEAT_TTL_MS: u64 = 3_000;

impl Fleet {
    /// Renews this gateway's registration and learns the fleet size.
    async fn beat(&self) {
        if !self.breaker.allow() {
            return;
        }
        let mut conn = self.conn.clone();
        let mut inv = self.heartbeat.prepare_invoke();
        inv.key(self.registry_key())
            .arg(&self.id)
            .arg(HEARTBEAT_TTL_MS);
        if let Some(n) = self.call(None, inv.invoke_async::<u64>(&mut conn)).await {
            let old = self.gateways.swap(n.max(1), Ordering::Relaxed);
            if old != n.max(1) {
                tracing::info!(gateways = n, "fleet size changed");
            }
        }
    }
}

pub(super) async fn heartbeat_loop(fleet: Arc<Fleet>) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        fleet.beat().await;
    }
}
