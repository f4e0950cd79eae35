//! Redis key names. A client's TAT keys and lease set share its `{<key>}` hash tag (one
//! Cluster slot per client); the registry of gateways has its own.

use fairgate_policies::compiled::CompiledBandwidth;

use super::Fleet;
use crate::clock::Nanos;

impl Fleet {
    pub(super) fn key(&self, client: &str, kind: &str, bw: &CompiledBandwidth) -> String {
        let mut name = String::new();
        self.write_key(&mut name, client, kind, bw);
        name
    }

    /// Writes [`Fleet::key`] into `name` (cleared first), reusing its allocation.
    pub(super) fn write_key(
        &self,
        name: &mut String,
        client: &str,
        kind: &str,
        bw: &CompiledBandwidth,
    ) {
        name.clear();
        for part in [&*self.prefix, ":{", client, "}:", kind, ":", &*bw.id] {
            name.push_str(part);
        }
    }

    /// Writes the key of bandwidth `bw` of `client` at engine time `now` into `name`: a GCRA
    /// bucket's TAT key (`…:t:<id>`), or the count of the calendar period holding `now`
    /// (`…:p:<id>:<start, Unix seconds>`: a new period is a new key, the old one expires).
    pub(super) fn write_bandwidth_key(
        &self,
        name: &mut String,
        client: &str,
        bw: &CompiledBandwidth,
        now: Nanos,
    ) {
        match &bw.period {
            None => self.write_key(name, client, "t", bw),
            Some(p) => {
                self.write_key(name, client, "p", bw);
                let (start, _) = p.current(now.saturating_add(self.wall.offset()));
                name.push(':');
                name.push_str(&(start / 1_000_000_000).to_string());
            }
        }
    }

    /// [`Fleet::write_bandwidth_key`] into a new string.
    pub(super) fn bandwidth_key(&self, client: &str, bw: &CompiledBandwidth, now: Nanos) -> String {
        let mut name = String::new();
        self.write_bandwidth_key(&mut name, client, bw, now);
        name
    }

    /// The T argument of bandwidth `bw` for the scripts at engine time `now`: its `T` in ns,
    /// or for a calendar period −(milliseconds to the period's end, rounded up), which the
    /// scripts read as "a count that expires then".
    pub(super) fn t_arg(&self, bw: &CompiledBandwidth, now: Nanos) -> i64 {
        match &bw.period {
            None => i64::try_from(bw.t_ns).unwrap_or(i64::MAX),
            Some(p) => {
                let wall = self.wall.offset();
                let (_, end) = p.current(now.saturating_add(wall));
                let ms = end
                    .saturating_sub(now.saturating_add(wall))
                    .div_ceil(1_000_000);
                -i64::try_from(ms.max(1)).unwrap_or(i64::MAX)
            }
        }
    }

    /// The registry of gateways (one sorted set, with its own hash tag).
    pub(super) fn registry_key(&self) -> String {
        format!("{}:{{gateways}}", self.prefix)
    }

    pub(super) fn leases_key(&self, client: &str) -> String {
        format!("{}:{{{client}}}:leases", self.prefix)
    }

    pub(super) fn lease_member(&self, lease: u64) -> String {
        format!("{}:{lease}", self.id)
    }
}
