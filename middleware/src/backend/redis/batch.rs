//! The consumption batch of `async` mode (and of degraded local decisions): admitted cost
//! per client key, and per (`limit` rule, key), until the next exchange.

use std::sync::Arc;

use fairgate_policies::compiled::CompiledBandwidth;

use super::Fleet;

/// Batch shards (a decision locks one, briefly).
pub(super) const SHARDS: usize = 16;

/// One consumption batch entry: a client's quota bandwidths, or one `limit` rule's bucket
/// (`rule`: then `bandwidths` is the rule's one bandwidth and the entry's key the rule's).
pub(super) struct Pending {
    pub(super) bandwidths: Arc<[CompiledBandwidth]>,
    pub(super) units: u64,
    pub(super) rule: bool,
}

/// A `limit` rule's batch entry: (bandwidth id `rule:<name>`, key).
pub(super) type RuleEntry = (Arc<str>, Box<str>);

/// Looks a [`RuleEntry`] up without building one (hashes as the tuple does).
#[derive(Hash)]
struct RuleEntryRef<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<RuleEntry> for RuleEntryRef<'_> {
    fn equivalent(&self, key: &RuleEntry) -> bool {
        *key.0 == *self.0 && *key.1 == *self.1
    }
}

impl Fleet {
    /// Adds `cost` to `key`'s batch entry (async mode, and degraded local decisions).
    pub(crate) fn record(&self, key: &str, bandwidths: &Arc<[CompiledBandwidth]>, cost: u64) {
        let shard = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut map = self.batch[shard].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get_mut(key) {
            p.units = p.units.saturating_add(cost);
            if !Arc::ptr_eq(&p.bandwidths, bandwidths) {
                p.bandwidths = Arc::clone(bandwidths);
            }
            return;
        }
        if map.len() < self.batch_cap {
            map.insert(
                key.into(),
                Pending {
                    bandwidths: Arc::clone(bandwidths),
                    units: cost,
                    rule: false,
                },
            );
        }
    }

    /// Adds 1 to the batch entry of `limit` rule `bandwidth` for `key` (async mode, degraded
    /// local decisions, shadow rules and rules on a Cluster in exact mode).
    pub(crate) fn record_rule(&self, key: &str, bandwidth: &CompiledBandwidth) {
        let probe = RuleEntryRef(&bandwidth.id, key);
        let shard = (self.hasher.hash_one(&probe) as usize) % SHARDS;
        let mut map = self.rule_batch[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get_mut(&probe) {
            p.units = p.units.saturating_add(1);
            return;
        }
        if map.len() < self.batch_cap {
            map.insert(
                (Arc::clone(&bandwidth.id), key.into()),
                Pending {
                    bandwidths: Arc::from([bandwidth.clone()]),
                    units: 1,
                    rule: true,
                },
            );
        }
    }

    pub(super) fn take_batch(&self) -> Vec<(Box<str>, Pending)> {
        let mut out = Vec::new();
        for shard in &self.batch {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            // Drained, not replaced: the map keeps its table for the next interval, so the
            // request path does not grow a new one every interval. A table far larger than
            // this interval needed (after a burst of new keys) is shrunk.
            let len = map.len();
            out.extend(map.drain());
            if map.capacity() > 64 && map.capacity() > len.saturating_mul(4) {
                map.shrink_to(len.saturating_mul(2));
            }
        }
        for shard in &self.rule_batch {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            let len = map.len();
            out.extend(map.drain().map(|((_, key), p)| (key, p)));
            if map.capacity() > 64 && map.capacity() > len.saturating_mul(4) {
                map.shrink_to(len.saturating_mul(2));
            }
        }
        out
    }
}
