use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fairgate_policies::compiled::CompiledBandwidth;

use super::debt::{debt_for, debt_tag, store_debt, DEBT_TAT_MAX, MIXED};
use super::entry::{EntryKey, IN_FLIGHT, SINCE_PRUNE, SINCE_SWEEP};
use super::*;
use crate::clock::Nanos;
use crate::gcra::{Params, Verdict};

const S: u64 = 1_000_000_000;

fn scope(s: &str) -> Arc<str> {
    Arc::from(s)
}

#[test]
fn repeat_keys_share_one_entry() {
    let store = Store::new(100);
    let sc = scope("plan:free/0");
    let p = Params::new(1, S, 2).unwrap();
    let now = 10 * S;
    for _ in 0..2 {
        let v = store
            .with_entry(&sc, "k", now, p.c, |e| e.consume(now, p, 1))
            .unwrap();
        assert!(matches!(v, Verdict::Admit { .. }));
    }
    let v = store
        .with_entry(&sc, "k", now, p.c, |e| e.consume(now, p, 1))
        .unwrap();
    assert!(matches!(v, Verdict::Reject { .. }));
    assert_eq!(store.len(), 1);
    // Another scope with the same key is another bucket.
    let v = store
        .with_entry(&scope("plan:free/1"), "k", now, p.c, |e| {
            e.consume(now, p, 1)
        })
        .unwrap();
    assert!(matches!(v, Verdict::Admit { .. }));
    assert_eq!(store.len(), 2);
}

#[test]
fn full_entries_are_swept_first_and_evicted_entries_keep_their_debt() {
    let store = Store::new(8);
    assert_eq!(store.max_keys(), 8);
    let sc = scope("s");
    let p = Params::new(1, S, 1).unwrap();
    let mut now = 100 * S;
    // A heavy hitter empties its bucket.
    let heavy = |now| {
        store
            .with_entry(&sc, "heavy", now, p.c, |e| e.consume(now, p, 1))
            .unwrap()
    };
    assert!(matches!(heavy(now), Verdict::Admit { .. }));
    // A flood of new keys, each consuming: the table never grows past 8.
    for i in 0..10_000u64 {
        now += 1;
        let _ = store.with_entry(&sc, &format!("flood-{i}"), now, p.c, |e| {
            e.consume(now, p, 1)
        });
        assert!(store.len() <= 8);
        // The heavy hitter stays limited whether or not it is still tracked.
        assert!(matches!(heavy(now), Verdict::Reject { .. }), "at {i}");
    }
    assert!(store.evictions() > 0);
}

#[test]
fn in_flight_entries_are_never_evicted_and_a_full_table_refuses() {
    let store = Store::new(2);
    let sc: Arc<str> = Arc::from(CLIENT_SCOPE);
    let now = S;
    for k in ["a", "b"] {
        assert!(store
            .with_entry(&sc, k, now, 0, |e| e.try_acquire(1))
            .unwrap());
    }
    assert_eq!(
        store.with_entry(&sc, "c", now, 0, |e| e.try_acquire(1)),
        Err(Full)
    );
    assert_eq!(store.refused(), 1);
    store
        .with_existing(CLIENT_SCOPE, "a", |e| e.release())
        .unwrap();
    assert!(store
        .with_entry(&sc, "c", now, 0, |e| e.try_acquire(1))
        .unwrap());
    assert_eq!(store.len(), 2);
}

#[test]
fn prune_drops_idle_and_dead_scopes() {
    let store = Store::new(100);
    let p = Params::new(1, S, 5).unwrap();
    let now = 10 * S;
    let live = scope("live");
    let dead = scope("dead");
    store
        .with_entry(&live, "k", now, p.c, |e| e.consume(now, p, 1))
        .unwrap();
    store
        .with_entry(&dead, "k", now, p.c, |e| e.consume(now, p, 1))
        .unwrap();
    store.set_live_scopes(LiveScopes::new([Arc::clone(&live)]));
    assert_eq!(store.prune(now), 1);
    assert_eq!(store.len(), 1);
    assert_eq!(
        store.prune(now + 10 * S),
        1,
        "full again: nothing to remember"
    );
    assert!(store.is_empty());
    // A full entry that a request found since the last prune survives one prune.
    store
        .with_entry(&live, "k", now, p.c, |e| e.consume(now, p, 1))
        .unwrap();
    store.with_entry(&live, "k", now, p.c, |_| ()).unwrap();
    assert_eq!(store.prune(now + 10 * S), 0, "used since the last prune");
    assert_eq!(
        store.with_existing("live", "k", |e| e.touched()),
        Some(true),
        "a prune leaves the sweeps' CLOCK bit alone"
    );
    assert_eq!(store.prune(now + 10 * S), 1, "then idle");
}

fn bandwidth(id: &str, per_sec: u64, burst: u64) -> CompiledBandwidth {
    let rate =
        fairgate_policies::units::Rate::new(per_sec, std::time::Duration::from_secs(1)).unwrap();
    CompiledBandwidth::new(Arc::from(id), Arc::from(id), rate, burst).unwrap()
}

fn consume_client(store: &Store, key: &str, now: Nanos, bws: &[CompiledBandwidth]) -> bool {
    store
        .with_client(key, now, bws, |e, map| {
            bws.iter().zip(map).all(|(bw, &s)| {
                s != OVERFLOW
                    && matches!(
                        e.slot(s).consume(
                            now,
                            Params {
                                t: bw.t_ns,
                                c: bw.c_ns
                            },
                            1
                        ),
                        Verdict::Admit { .. }
                    )
            })
        })
        .unwrap()
}

#[test]
fn entries_stay_small() {
    // The figure in the module docs.
    assert_eq!(std::mem::size_of::<Entry>(), ENTRY_BYTES - 16);
    assert_eq!(std::mem::size_of::<EntryKey>(), 24);
}

/// An `Arc<Entry>` allocation: the entry plus the two reference counts.
const ENTRY_BYTES: usize = 72;

#[test]
fn client_slots_carry_over_a_new_generation_by_id_and_free_dead_ids() {
    let store = Store::new(100);
    let now = 10 * S;
    let gen1 = [bandwidth("plan:p/0", 1, 2), bandwidth("plan:p/1", 1, 5)];
    store.pin_ids(gen1.iter().map(|b| &b.id));
    assert!(consume_client(&store, "k", now, &gen1));
    assert!(consume_client(&store, "k", now, &gen1));
    assert!(!consume_client(&store, "k", now, &gen1), "burst 2 used up");
    assert_eq!(store.len(), 1, "one entry for the client");
    // A new generation: same ids, new `Arc`s, listed in another order.
    let gen2 = [bandwidth("plan:p/1", 1, 5), bandwidth("plan:p/0", 1, 2)];
    store.pin_ids(gen2.iter().map(|b| &b.id));
    let tat = |id: &Arc<str>| store.with_client_slot("k", id, |b| b.tat()).unwrap();
    assert_eq!(
        tat(&gen2[1].id),
        now + 2 * S,
        "found by text before any use"
    );
    assert!(
        !consume_client(&store, "k", now, &gen2),
        "usage carried over"
    );
    // Dropping `plan:p/1` from the policy frees its slot on prune.
    store.set_live_scopes(LiveScopes::new([Arc::clone(&gen2[1].id)]));
    store.prune(now);
    assert!(store.with_client_slot("k", &gen2[0].id, |_| ()).is_none());
    assert!(store.with_client_slot("k", &gen2[1].id, |_| ()).is_some());
}

#[test]
fn evicted_client_entries_keep_each_bandwidths_debt() {
    let store = Store::new(8);
    let bws = [bandwidth("plan:p/0", 1, 1), bandwidth("plan:p/1", 1, 100)];
    store.pin_ids(bws.iter().map(|b| &b.id));
    let mut now = 100 * S;
    assert!(consume_client(&store, "heavy", now, &bws));
    for i in 0..1000u64 {
        now += 1;
        let _ = consume_client(&store, &format!("flood-{i}"), now, &bws);
        assert!(store.len() <= 8);
        assert!(!consume_client(&store, "heavy", now, &bws), "at {i}");
    }
    assert!(store.evictions() > 0);
}

#[test]
fn a_hot_client_survives_a_flood_of_one_shot_keys_with_its_bucket_intact() {
    // One shard of 64: a sweep every 8 inserts once full.
    let store = Store::new(64);
    let normal = [bandwidth("plan:normal/0", 1, 10)];
    // One-shot keys on a slow plan: their buckets stay far from full for a minute,
    // so they are *further* from full than the half-used hot client.
    let slow = [bandwidth("plan:slow/0", 1, 5)];
    let slow = [CompiledBandwidth::new(
        Arc::clone(&slow[0].id),
        Arc::clone(&slow[0].id),
        fairgate_policies::units::Rate::new(1, std::time::Duration::from_secs(60)).unwrap(),
        5,
    )
    .unwrap()];
    store.pin_ids(normal.iter().chain(&slow).map(|b| &b.id));
    let mut now = 100 * S;
    for _ in 0..5 {
        assert!(consume_client(&store, "hot", now, &normal));
    }
    let tat = |store: &Store, now| {
        store
            .with_client("hot", now, &normal, |e, map| e.slot(map[0]).tat())
            .unwrap()
    };
    let half_used = tat(&store, now);
    assert_eq!(half_used, now + 5 * S);
    for i in 0..10_000u64 {
        now += 1_000;
        // A spoofed key may find its debt slot taken (MIXED): then it starts empty.
        let _ = consume_client(&store, &format!("spoof-{i}"), now, &slow);
        assert!(store.len() <= 64);
        if i % 4 == 0 {
            assert!(
                store.with_existing(CLIENT_SCOPE, "hot", |_| ()).is_some(),
                "hot client evicted at {i}"
            );
            assert_eq!(tat(&store, now), half_used, "bucket changed at {i}");
        }
    }
    assert!(store.evictions() > 9_000, "{}", store.evictions());
    // Everything touched (no one-shot keys left to evict): the closest to full go,
    // in-flight entries stay, and the table stays bounded.
    let store = Store::new(8);
    let sc = scope("s");
    let p = Params::new(1, S, 10).unwrap();
    let now = 100 * S;
    for i in 0..16u64 {
        let k = format!("k{i}");
        store
            .with_entry(&sc, &k, now, p.c, |e| e.consume(now, p, 1 + i % 3))
            .unwrap();
        store.with_entry(&sc, &k, now, p.c, |_| ()).unwrap();
        assert!(store.len() <= 8);
    }
    assert!(store.evictions() > 0);
}

#[test]
fn a_debt_slot_charges_only_its_own_key_unless_mixed() {
    let slot = AtomicU64::new(0);
    let now = 100 * S;
    // Same slot index (low bits), different tags (high bits).
    let (a, b, c) = (1u64 << 48 | 7, 2u64 << 48 | 7, 3u64 << 48 | 7);
    assert_eq!(debt_for(&slot, a, now), 0, "empty");
    // Rounded up to whole microseconds.
    store_debt(&slot, a, now + 10 * S + 1, now);
    assert_eq!(debt_for(&slot, a, now), now + 10 * S + 1_000);
    assert_eq!(
        debt_for(&slot, b, now),
        0,
        "another key's debt is not charged"
    );
    // Nothing owed: nothing stored.
    store_debt(&slot, b, now, now);
    assert_eq!(debt_for(&slot, a, now), now + 10 * S + 1_000);
    // A second live debt of another tag: MIXED with the max, charged to both.
    store_debt(&slot, b, now + 5 * S, now);
    assert_eq!(debt_for(&slot, a, now), now + 10 * S + 1_000);
    assert_eq!(debt_for(&slot, b, now), now + 10 * S + 1_000);
    assert_eq!(
        debt_for(&slot, c, now),
        now + 10 * S + 1_000,
        "MIXED charges any key (clamped by callers)"
    );
    // Expired: the next writer owns the slot again.
    let later = now + 11 * S;
    assert_eq!(debt_for(&slot, a, later), 0);
    store_debt(&slot, c, later + S, later);
    assert_eq!(debt_for(&slot, c, later), later + S);
    assert_eq!(debt_for(&slot, a, later), 0);
    // The same tag keeps the max.
    store_debt(&slot, c, later + 1, later);
    assert_eq!(debt_for(&slot, c, later), later + S);
    // Saturates instead of wrapping.
    let far = AtomicU64::new(0);
    store_debt(&far, a, u64::MAX, now);
    assert_eq!(debt_for(&far, a, now), DEBT_TAT_MAX * 1_000);
    // A hash whose tag bits are all ones is not mistaken for MIXED.
    let top = u64::MAX;
    assert_eq!(debt_tag(top), MIXED - 1);
}

#[test]
fn capacity_change_rescales_once() {
    let store = Store::new(10);
    let sc = scope("s");
    let p = Params::new(1, S, 10).unwrap();
    let now = 100 * S;
    store
        .with_entry(&sc, "k", now, p.c, |e| e.consume(now, p, 5))
        .unwrap();
    let p2 = Params::new(1, S, 20).unwrap();
    let tat = store
        .with_existing("s", "k", |e| e.peek(now, p2.c))
        .unwrap();
    assert_eq!(tat, now + 10 * S, "half used stays half used");
    let tat = store
        .with_existing("s", "k", |e| e.peek(now, p2.c))
        .unwrap();
    assert_eq!(tat, now + 10 * S);
}

#[test]
fn clock_bits_and_the_in_flight_count_share_a_word_without_mixing() {
    let store = Store::new(100);
    let sc: Arc<str> = Arc::from(CLIENT_SCOPE);
    let e = store.with_entry(&sc, "k", S, 0, Arc::clone).unwrap();
    assert!(!e.touched(), "a new entry starts untouched");
    assert!(e.try_acquire(3) && e.try_acquire(3) && e.try_acquire(3));
    assert!(!e.try_acquire(3), "limit reached");
    e.touch();
    assert!(e.touched() && e.touched_since(SINCE_PRUNE));
    assert_eq!(e.in_flight(), 3, "touching leaves the count alone");
    {
        let shard = store.shard(store.hash(CLIENT_SCOPE, "k"));
        // No request runs in this test: a shared lock stands in for the sweep's.
        Store::clear_touched(&shard.table.read().unwrap(), SINCE_SWEEP);
    }
    assert!(!e.touched() && e.touched_since(SINCE_PRUNE));
    assert_eq!(e.in_flight(), 3, "clearing a bit leaves the count alone");
    for _ in 0..5 {
        e.release();
    }
    assert_eq!(e.in_flight(), 0, "release saturates at zero");
    assert!(
        e.touched_since(SINCE_PRUNE),
        "and does not borrow from the bits"
    );
    // A limit above the count's 30 bits admits up to the count's maximum.
    e.flags.fetch_add(IN_FLIGHT - 1, Ordering::Relaxed);
    assert!(e.try_acquire(u64::MAX));
    assert!(
        !e.try_acquire(u64::MAX),
        "the count never carries into the bits"
    );
    assert_eq!(e.in_flight(), u64::from(IN_FLIGHT));
    assert!(e.touched_since(SINCE_PRUNE));
}

#[test]
fn bandwidths_beyond_the_slots_overflow_to_their_own_entries() {
    let store = Store::new(100);
    let bws = [
        bandwidth("plan:p/0", 1, 5),
        bandwidth("plan:p/1", 1, 5),
        bandwidth("plan:p/2", 1, 5),
    ];
    store.pin_ids(bws.iter().map(|b| &b.id));
    let map = store.with_client("k", S, &bws, |_, map| *map).unwrap();
    assert_eq!(map, [0, 1], "the first SLOTS bandwidths are slotted");
    assert_eq!(store.len(), 1);
    // The engine keeps the third in a (bandwidth id, key) entry.
    let p = Params::new(1, S, 5).unwrap();
    store
        .with_entry(&bws[2].id, "k", S, p.c, |e| e.consume(S, p, 1))
        .unwrap();
    assert_eq!(store.len(), 2);
    assert_eq!(
        store.with_existing(&bws[2].id, "k", |e| e.tat()),
        Some(S + S)
    );
    assert!(store.with_client_slot("k", &bws[2].id, |_| ()).is_none());
}

#[test]
fn entries_are_found_after_their_tables_grow_and_scopes_are_told_apart() {
    let store = Store::new(1_000_000);
    let p = Params::new(1, S, 10).unwrap();
    let now = 100 * S;
    let scopes = [scope("rule:a"), scope("rule:b")];
    for i in 0..20_000u64 {
        let key = format!("k{i}");
        for (n, sc) in scopes.iter().enumerate() {
            store
                .with_entry(sc, &key, now, p.c, |e| e.consume(now, p, 1 + n as u64))
                .unwrap();
        }
        store.with_client(&key, now, &[], |_, _| ()).unwrap();
    }
    assert_eq!(store.len(), 60_000);
    for i in (0..20_000u64).step_by(97) {
        let key = format!("k{i}");
        assert_eq!(
            store.with_existing("rule:a", &key, |e| e.tat()),
            Some(now + S)
        );
        assert_eq!(
            store.with_existing("rule:b", &key, |e| e.tat()),
            Some(now + 2 * S)
        );
        assert!(store
            .with_existing(CLIENT_SCOPE, &key, |e| e.is_client())
            .unwrap());
        assert!(store.with_existing("rule:c", &key, |_| ()).is_none());
    }
    let mut seen = [0u64; 3];
    store.for_each(|e| match e.scope() {
        "rule:a" => seen[0] += 1,
        "rule:b" => seen[1] += 1,
        CLIENT_SCOPE => seen[2] += 1,
        other => panic!("unexpected scope {other}"),
    });
    assert_eq!(seen, [20_000; 3]);
    // A scope id is interned once per text, whatever `Arc` it comes in.
    assert_eq!(store.scopes.intern(&scope("rule:a")), Some(1));
    assert_eq!(store.scopes.intern(&scope("rule:b")), Some(2));
}

#[test]
fn a_client_keys_hash_is_the_hash_of_its_scope_and_key() {
    let store = Store::new(100);
    for key in ["", "k", "key-0000000000000001", &"x".repeat(100)] {
        assert_eq!(store.client_hash(key), store.hash(CLIENT_SCOPE, key));
    }
}

#[test]
fn shapes_are_interned_once_and_free_is_zero() {
    use super::scopes::{shapes, FREE};
    let t = shapes();
    assert_eq!(t.intern(0, 0), Some(FREE));
    assert_eq!(t.get(FREE), (0, 0));
    let a = t.intern(0xdead_beef, 7 * S).unwrap();
    assert_ne!(a, FREE);
    assert_eq!(t.intern(0xdead_beef, 7 * S), Some(a));
    assert_eq!(t.get(a), (0xdead_beef, 7 * S));
    let b = t.intern(0xdead_beef, 8 * S).unwrap();
    assert_ne!(a, b);
    assert_eq!(t.get(b), (0xdead_beef, 8 * S));
}

#[test]
fn a_client_slot_is_rescaled_once_when_its_capacity_changes() {
    let store = Store::new(100);
    let now = 10 * S;
    // Burst 4 at 1/s: C = 4 s. Two requests leave the bucket half full.
    let gen1 = [bandwidth("plan:p/0", 1, 4)];
    store.pin_ids(gen1.iter().map(|b| &b.id));
    assert!(consume_client(&store, "k", now, &gen1));
    assert!(consume_client(&store, "k", now, &gen1));
    let tat = |bw: &CompiledBandwidth| {
        store
            .with_client_slot("k", &bw.id, |b| (b.tat(), b.capacity()))
            .unwrap()
    };
    assert_eq!(tat(&gen1[0]), (now + 2 * S, 4 * S));
    // The same id (same `Arc`) with burst 8: half full is 4 s of 8.
    let gen2 = [CompiledBandwidth::new(
        Arc::clone(&gen1[0].id),
        Arc::clone(&gen1[0].id),
        gen1[0].rate,
        8,
    )
    .unwrap()];
    let peeked = store
        .with_client_slot("k", &gen2[0].id, |b| b.peek(now, gen2[0].c_ns))
        .unwrap();
    assert_eq!(peeked, now + 4 * S);
    assert_eq!(tat(&gen2[0]), (now + 4 * S, 8 * S), "rescaled once");
    assert_eq!(
        store
            .with_client_slot("k", &gen2[0].id, |b| b.peek(now, gen2[0].c_ns))
            .unwrap(),
        now + 4 * S
    );
}
