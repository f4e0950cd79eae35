//! Redis key names. A client's TAT keys and lease set share its `{<key>}` hash tag (one
//! Cluster slot per client); the registry of gateways has its own.

use fairgate_policies::compiled::CompiledBandwidth;

use super::Fleet;

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
