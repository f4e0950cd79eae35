//! `async` mode's exchange: every `sync_interval` the batch is charged to the fleet's
//! buckets in Redis and the local buckets are raised to them (see the module docs of
//! `crate::fleet`); under `on_failure: local` unshared usage is charged `(N − 1)×`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use fairgate_policies::compiled::CompiledBandwidth;
use fairgate_policies::model::{FleetMode, OnFailure};

use super::batch::Pending;
use super::conn::{exchange_budget, key_scoped, Conn};
use super::Fleet;
use crate::clock::Nanos;
use crate::gcra::Params;
use crate::state::{Store, OVERFLOW};

/// Keys exchanged under one call budget (async mode).
pub(super) const EXCHANGE_CHUNK: usize = 128;

/// Exchanges the batch every `sync_interval` while `engine` lives (`store_of` reaches its
/// local store; see [`Fleet::start_tasks`]).
pub(super) async fn sync_loop<E: Send + Sync + 'static>(
    fleet: Arc<Fleet>,
    engine: Weak<E>,
    store_of: fn(&E) -> &Store,
) {
    let mut tick = tokio::time::interval(fleet.sync_interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let batch = fleet.take_batch();
        if batch.is_empty() {
            continue;
        }
        let store = store_of(&engine);
        // Exact mode exchanges only `limit` rules' entries (shadow rules, rules on a
        // Cluster): its quotas are decided by Redis, its batch is for the degraded share.
        let (batch, local_only): (Vec<_>, Vec<_>) = match fleet.mode {
            FleetMode::Async => (batch, Vec::new()),
            FleetMode::Exact => batch.into_iter().partition(|(_, p)| p.rule),
        };
        let peers_share = fleet.breaker.is_open() && fleet.on_failure == OnFailure::Local;
        if peers_share && !local_only.is_empty() {
            charge_peers_share(&fleet, store, &local_only, fleet.clock.now());
        }
        if batch.is_empty() {
            continue;
        }
        if !fleet.breaker.allow() {
            if peers_share {
                charge_peers_share(&fleet, store, &batch, fleet.clock.now());
            }
            continue;
        }
        let round = exchange_batch(&fleet, store, &batch).await;
        if round.completed {
            fleet.syncs.fetch_add(1, Ordering::Relaxed);
        }
        if fleet.on_failure == OnFailure::Local && !round.unshared.is_empty() {
            let unshared = round.unshared.iter().filter_map(|&i| batch.get(i));
            charge_peers_share(&fleet, store, unshared, fleet.clock.now());
        }
    }
}

/// Degraded `local`: every key pays `(N − 1)×` its own consumption, so each gateway keeps
/// to `1/N` of the quota.
fn charge_peers_share<'b>(
    fleet: &Fleet,
    store: &Store,
    batch: impl IntoIterator<Item = &'b (Box<str>, Pending)>,
    now: Nanos,
) {
    let others = fleet.gateways.load(Ordering::Relaxed).saturating_sub(1);
    if others == 0 {
        return;
    }
    let wall = fleet.wall.offset();
    for (key, p) in batch {
        let units = p.units.saturating_mul(others);
        charge(store, key, p, (now, wall), |_| units);
    }
}

/// What one exchange round did.
struct Round {
    /// Every chunk got its answers (some keys may still have failed).
    completed: bool,
    /// Indices (in the batch) of the keys whose usage did not reach Redis.
    unshared: Vec<usize>,
}

/// One exchange: charge the batch to the fleet buckets, raise the local ones to them.
/// Keys go in chunks of [`EXCHANGE_CHUNK`], each pipelined on the one connection under its
/// own call budget, so a round with many keys is not one call over budget. Each key's
/// script answers on its own: a key-scoped error reply (`WRONGTYPE`) leaves that key
/// unshared and the breaker alone; any other error reply (`OOM`…) or a timeout is a failed
/// call for the breaker, and the rest of the round is then skipped (unshared).
async fn exchange_batch(fleet: &Fleet, store: &Store, batch: &[(Box<str>, Pending)]) -> Round {
    if matches!(fleet.conn, Conn::Single(_)) {
        return exchange_batch_one_call_per_chunk(fleet, store, batch).await;
    }
    let mut unshared = Vec::new();
    for (c, chunk) in batch.chunks(EXCHANGE_CHUNK).enumerate() {
        let base = c * EXCHANGE_CHUNK;
        let sent_at = fleet.clock.now();
        let calls = chunk.iter().map(|(key, p)| {
            let mut inv = fleet.sync.prepare_invoke();
            for bw in p.bandwidths.iter() {
                inv.key(fleet.bandwidth_key(key, bw, sent_at));
            }
            inv.arg(p.units);
            for bw in p.bandwidths.iter() {
                inv.arg(fleet.t_arg(bw, sent_at));
            }
            let mut conn = fleet.conn.clone();
            async move { inv.invoke_async::<Vec<i64>>(&mut conn).await }
        });
        let all = futures_util::future::join_all(calls);
        fleet.calls.fetch_add(1, Ordering::Relaxed);
        let Ok(results) = tokio::time::timeout(exchange_budget(fleet.timeout), all).await else {
            fleet.failed(
                &format!("no answer within {:?}", exchange_budget(fleet.timeout)),
                1,
            );
            unshared.extend(base..batch.len());
            return Round {
                completed: false,
                unshared,
            };
        };
        let now = fleet.clock.now();
        let mut backend_error = None;
        for (i, ((key, p), result)) in chunk.iter().zip(results).enumerate() {
            match result {
                Ok(values) => raise(store, key, p, (now, fleet.wall.offset()), |i| {
                    values.get(i).map_or(0, |&v| u64::try_from(v).unwrap_or(0))
                }),
                Err(e) if key_scoped(&e) => {
                    fleet.key_failed(key, &e);
                    unshared.push(base + i);
                }
                Err(e) => {
                    unshared.push(base + i);
                    let (_, n) = backend_error.get_or_insert((e, 0u64));
                    *n += 1;
                }
            }
        }
        match backend_error {
            Some((e, n)) => {
                // Counted once per key; the breaker hears of it once per chunk.
                fleet.failed(&e.to_string(), n);
                unshared.extend(base + chunk.len()..batch.len());
                return Round {
                    completed: false,
                    unshared,
                };
            }
            None => fleet.succeeded(),
        }
    }
    Round {
        completed: true,
        unshared,
    }
}

/// [`exchange_batch`] on one Redis server: each chunk is one [`SYNC_MANY_LUA`](super::scripts::SYNC_MANY_LUA) call (the
/// same per-key semantics: a key holding something else leaves that client unshared and the
/// breaker alone; an error reply or a timeout fails the call for the breaker). A client-side
/// call costs the gateway far more CPU than the few keys it carries, and with many distinct
/// clients per interval a call per client was about one call per request (BENCHMARKS.md,
/// "Gateway throughput per state backend").
async fn exchange_batch_one_call_per_chunk(
    fleet: &Fleet,
    store: &Store,
    batch: &[(Box<str>, Pending)],
) -> Round {
    let mut unshared = Vec::new();
    // One reusable buffer for the key names: each is copied into the command's own
    // contiguous argument buffer, so a chunk allocates no per-key or per-argument strings
    // (redis's `ScriptInvocation` keeps a `Vec<u8>` per argument: that and the key strings
    // were most of this function's cost, see docs/architecture.md).
    let mut name = String::with_capacity(fleet.prefix.len() + 64);
    for (c, chunk) in batch.chunks(EXCHANGE_CHUNK).enumerate() {
        let base = c * EXCHANGE_CHUNK;
        let keys: usize = chunk.iter().map(|(_, p)| p.bandwidths.len()).sum();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(fleet.sync_many.get_hash()).arg(keys);
        let sent_at = fleet.clock.now();
        for (key, p) in chunk {
            for bw in p.bandwidths.iter() {
                fleet.write_bandwidth_key(&mut name, key, bw, sent_at);
                cmd.arg(name.as_bytes());
            }
        }
        for (_, p) in chunk {
            cmd.arg(p.bandwidths.len()).arg(p.units);
            for bw in p.bandwidths.iter() {
                cmd.arg(fleet.t_arg(bw, sent_at));
            }
        }
        let mut conn = fleet.conn.clone();
        fleet.calls.fetch_add(1, Ordering::Relaxed);
        let answer = tokio::time::timeout(exchange_budget(fleet.timeout), async {
            match cmd.query_async::<Vec<i64>>(&mut conn).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    fleet.sync_many.load_async(&mut conn).await?;
                    cmd.query_async::<Vec<i64>>(&mut conn).await
                }
                other => other,
            }
        })
        .await;
        let values = match answer {
            Err(_) => {
                fleet.failed(
                    &format!("no answer within {:?}", exchange_budget(fleet.timeout)),
                    1,
                );
                unshared.extend(base..batch.len());
                return Round {
                    completed: false,
                    unshared,
                };
            }
            Ok(Err(e)) => {
                fleet.failed(&e.to_string(), chunk.len() as u64);
                unshared.extend(base..batch.len());
                return Round {
                    completed: false,
                    unshared,
                };
            }
            Ok(Ok(values)) => values,
        };
        let expected: usize = chunk.iter().map(|(_, p)| 1 + p.bandwidths.len()).sum();
        if values.len() != expected {
            fleet.failed(
                &format!("sync answered {} values, expected {expected}", values.len()),
                chunk.len() as u64,
            );
            unshared.extend(base..batch.len());
            return Round {
                completed: false,
                unshared,
            };
        }
        let now = fleet.clock.now();
        let mut at = 0;
        for (i, (key, p)) in chunk.iter().enumerate() {
            let n = p.bandwidths.len();
            let (status, ahead_us) = (values[at], &values[at + 1..at + 1 + n]);
            at += 1 + n;
            if status == 0 {
                raise(store, key, p, (now, fleet.wall.offset()), |i| {
                    ahead_us
                        .get(i)
                        .map_or(0, |&v| u64::try_from(v).unwrap_or(0))
                });
            } else {
                fleet.key_failed(
                    key,
                    &"WRONGTYPE a limiter key holds something else than a number",
                );
                unshared.push(base + i);
            }
        }
        fleet.succeeded();
    }
    Round {
        completed: true,
        unshared,
    }
}

/// Raises bandwidth `i` of `key`'s entry `p` to what the fleet answered, `value(i)`: a
/// bucket to `TAT ≥ now + value(i)` µs, a calendar period to a count of at least `value(i)`
/// (`TAT ≥ end + value(i)`, see [`crate::bucket::bucket_now`]; `wall` places `now`).
fn raise(
    store: &Store,
    key: &str,
    p: &Pending,
    (now, wall): (Nanos, u64),
    value: impl Fn(usize) -> u64,
) {
    let bandwidths = &*p.bandwidths;
    // The units bandwidth `i` lacks, and the time its debt is charged at.
    let missing = |i: usize, bw: &CompiledBandwidth, tat: Nanos| {
        let at = crate::bucket::bucket_now(bw, now, wall);
        let ahead = match bw.period {
            None => value(i).saturating_mul(1000),
            Some(_) => value(i),
        };
        let want = at.saturating_add(ahead);
        (want.saturating_sub(tat.max(at)) / bw.t_ns.max(1), at)
    };
    if p.rule {
        // A rule's bucket is its own entry (scope `rule:<name>`), not a client's slot.
        for (i, bw) in bandwidths.iter().enumerate() {
            let _ = store.with_entry(&bw.id, key, now, bw.c_ns, |e| {
                let (units, at) = missing(i, bw, e.peek(now, bw.c_ns));
                if units > 0 {
                    e.charge_debt(at, params(bw), units);
                }
            });
        }
        return;
    }
    let _ = store
        .with_client(key, now, bandwidths, |e, map| {
            for (i, (bw, &s)) in bandwidths.iter().zip(map).enumerate() {
                if s == OVERFLOW {
                    continue;
                }
                let b = e.slot(s);
                let (units, at) = missing(i, bw, b.peek(now, bw.c_ns));
                if units > 0 {
                    b.charge_debt(at, params(bw), units);
                }
            }
            *map
        })
        .map(|map| {
            for (i, bw) in bandwidths.iter().enumerate() {
                if map.get(i).is_none_or(|&s| s == OVERFLOW) {
                    let _ = store.with_entry(&bw.id, key, now, bw.c_ns, |e| {
                        let (units, at) = missing(i, bw, e.peek(now, bw.c_ns));
                        if units > 0 {
                            e.charge_debt(at, params(bw), units);
                        }
                    });
                }
            }
        });
}

fn params(bw: &CompiledBandwidth) -> Params {
    Params {
        t: bw.t_ns,
        c: bw.c_ns,
    }
}

/// Charges `units(i)` of debt to bandwidth `i` of `key`'s entry `p` (a calendar period's
/// at its end, so that it counts in the period, see [`crate::bucket::bucket_now`]).
fn charge(
    store: &Store,
    key: &str,
    p: &Pending,
    (now, wall): (Nanos, u64),
    units: impl Fn(usize) -> u64,
) {
    let bandwidths = &*p.bandwidths;
    let at = |bw: &CompiledBandwidth| crate::bucket::bucket_now(bw, now, wall);
    if p.rule {
        for (i, bw) in bandwidths.iter().enumerate() {
            let u = units(i);
            if u > 0 {
                let _ = store.with_entry(&bw.id, key, now, bw.c_ns, |e| {
                    e.charge_debt(at(bw), params(bw), u)
                });
            }
        }
        return;
    }
    // A full table cannot take new debt; the key is then at worst as it was.
    let Ok(map) = store.with_client(key, now, bandwidths, |e, map| {
        for (i, (bw, &s)) in bandwidths.iter().zip(map).enumerate() {
            let u = units(i);
            if s != OVERFLOW && u > 0 {
                e.slot(s).charge_debt(at(bw), params(bw), u);
            }
        }
        *map
    }) else {
        return;
    };
    for (i, bw) in bandwidths.iter().enumerate() {
        let u = units(i);
        if u > 0 && map.get(i).is_none_or(|&s| s == OVERFLOW) {
            let _ = store.with_entry(&bw.id, key, now, bw.c_ns, |e| {
                e.charge_debt(at(bw), params(bw), u)
            });
        }
    }
}
