//! Fleet-wide concurrency leases (`exact` mode): held while the ticket lives, renewed every
//! second, given back when it drops; a dead gateway's leases expire.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Fleet;

/// How long a concurrency lease lives without renewal.
pub(super) const LEASE_TTL_MS: u64 = 3_000;
/// How often held leases are renewed.
const LEASE_RENEW_EVERY: Duration = Duration::from_secs(1);

/// A lease given back: (client key, lease id).
pub(super) type Released = (Box<str>, u64);

impl Fleet {
    /// A fresh lease id (for [`Fleet::exact`]).
    pub(crate) fn new_lease_id(&self) -> u64 {
        self.next_lease.fetch_add(1, Ordering::Relaxed)
    }

    /// Records lease `id` of `client` as held (renewed until the guard drops).
    pub(crate) fn hold(self: &Arc<Self>, id: u64, client: &str) -> Lease {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, client.into());
        Lease {
            fleet: Arc::clone(self),
            id,
        }
    }

    pub(super) fn release(&self, id: u64) {
        let key = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(key) = key {
            // Unbounded: a drop never waits; the lease task gives it back to Redis.
            let _ = self.release_tx.send((key, id));
        }
    }

    /// Concurrency leases held now.
    pub fn leases_held(&self) -> usize {
        self.leases.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A fleet-wide concurrency lease; dropping it gives it back (the ticket holds it).
pub(crate) struct Lease {
    fleet: Arc<Fleet>,
    id: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.fleet.release(self.id);
    }
}

/// Gives released leases back and renews the held ones.
pub(super) async fn lease_loop(
    fleet: Arc<Fleet>,
    mut releases: tokio::sync::mpsc::UnboundedReceiver<Released>,
) {
    let mut tick = tokio::time::interval(LEASE_RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            released = releases.recv() => {
                let Some((key, id)) = released else {
                    return;
                };
                // While Redis is unreachable the lease simply expires.
                if fleet.breaker.allow() {
                    let mut conn = fleet.conn.clone();
                    let mut cmd = redis::cmd("ZREM");
                    cmd.arg(fleet.leases_key(&key)).arg(fleet.lease_member(id));
                    let _ = fleet.call(Some(&key), cmd.query_async::<i64>(&mut conn)).await;
                }
            }
            _ = tick.tick() => {
                let held: Vec<(u64, Box<str>)> = fleet
                    .leases
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|(id, k)| (*id, k.clone()))
                    .collect();
                if held.is_empty() || !fleet.breaker.allow() {
                    continue;
                }
                let calls = held.iter().map(|(id, key)| {
                    let mut inv = fleet.renew.prepare_invoke();
                    inv.key(fleet.leases_key(key))
                        .arg(fleet.lease_member(*id))
                        .arg(LEASE_TTL_MS);
                    let mut conn = fleet.conn.clone();
                    async move { inv.invoke_async::<i64>(&mut conn).await }
                });
                let all = futures_util::future::join_all(calls);
                let _ = fleet
                    .call(None, async { Ok::<_, redis::RedisError>(all.await) })
                    .await;
            }
        }
    }
}
