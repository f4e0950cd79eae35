//! The caller's side held for the fleet (features `redis` + `outbound`): the calls
//! [`crate::outbound::fleet`] makes, on this backend's connection, breaker and registry.
//!
//! - the outbound rate: one GCRA bucket per limit in `<prefix>:{out:<name>}:t`, reserved by
//!   [`RESERVE_LUA`] (the local outbound limit's arithmetic, on Redis time);
//! - the outbound concurrency: the fleet-wide concurrency leases of `exact` mode
//!   ([`Fleet::exact`] with no bandwidth) in `<prefix>:{out:<name>}:leases`, renewed and
//!   released by the same lease task, so a dead replica's leases expire within 3 s;
//! - the shared cache: entries in `<prefix>:out:c:<key>` (with `PX` = their TTL), the lease of
//!   the replica fetching a key in `<prefix>:out:l:<key>`, a pass marker (the key answered
//!   uncacheably) in `<prefix>:out:p:<key>`, and each lease's outcome published on
//!   `<prefix>:out:done:<key>`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};

use redis::Script;

use super::scripts::{CACHE_FETCH_LUA, CACHE_RENEW_LUA, CACHE_SETTLE_LUA, RESERVE_LUA};
use super::{registry, Fleet, FleetError, FleetHandle};
use crate::backend::Verdict;
use crate::clock::{Nanos, TokioClock};
use fairgate_policies::model::RedisState;

static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(RESERVE_LUA));
static CACHE_FETCH: LazyLock<Script> = LazyLock::new(|| Script::new(CACHE_FETCH_LUA));
static CACHE_RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(CACHE_RENEW_LUA));
static CACHE_SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(CACHE_SETTLE_LUA));

/// The answer of [`Fleet::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reserve {
    /// A slot is reserved: go after waiting this long (ns).
    Reserved(Nanos),
    /// The wait (ns) would pass the limit: nothing reserved.
    Refused(Nanos),
}

/// The answer of [`Fleet::cache_fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fetch {
    /// The entry and its remaining TTL in ms.
    Hit(Vec<u8>, u64),
    /// The key answers uncacheably now: call for yourself.
    Pass,
    /// This caller holds the lease: it fetches and settles.
    Lead,
    /// Another replica holds the lease for this much longer (ms).
    Follow(u64),
}

/// What the lease holder settles with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle<'a> {
    /// The entry, for `ttl_ms`.
    Stored(&'a [u8], u64),
    /// Uncacheable: followers and newcomers call for themselves for `ttl_ms`.
    Pass(u64),
    /// No answer to share (an error): followers try again.
    Retry,
}

impl Fleet {
    /// A backend for the outbound layers: one server's `url` only (their notifications use
    /// pub/sub on one server). No connection is made yet.
    pub(crate) fn connect_outbound(settings: &RedisState) -> Result<Fleet, FleetError> {
        if settings.url.is_none() {
            return Err(FleetError::Cluster(
                "the outbound fleet needs one server's `url`: Redis Cluster is not supported"
                    .to_owned(),
            ));
        }
        Fleet::connect(settings, Arc::new(TokioClock::new()), 1024)
    }

    /// Starts the registry heartbeat and the lease task (no exchange: no engine).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub(crate) fn start_outbound_tasks(self: &Arc<Self>) -> FleetHandle {
        let releases = self
            .release_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut tasks = vec![tokio::spawn(registry::heartbeat_loop(Arc::clone(self)))];
        if let Some(rx) = releases {
            tasks.push(tokio::spawn(super::lease::lease_loop(Arc::clone(self), rx)));
        }
        tracing::info!(url = %self.url_redacted, "fleet-wide outbound layers on redis");
        FleetHandle {
            fleet: Arc::clone(self),
            tasks,
        }
    }

    /// The replicas last seen registered (1 before the first heartbeat answered).
    pub(crate) fn replicas(&self) -> u64 {
        self.gateways.load(Ordering::Relaxed).max(1)
    }

    /// This replica's id in the registry.
    pub(crate) fn member_id(&self) -> &str {
        &self.id
    }

    /// Where Redis is, passwords hidden.
    pub(crate) fn target(&self) -> &str {
        &self.url_redacted
    }

    /// Reserves a slot of the fleet's outbound rate `name` (`t`, `c` in ns) if its wait is
    /// at most `max_wait` ns. `None`: Redis did not answer (or the breaker is open).
    pub(crate) async fn reserve(
        &self,
        name: &str,
        t: Nanos,
        c: Nanos,
        max_wait: Nanos,
    ) -> Option<Reserve> {
        if !self.breaker.allow() {
            return None;
        }
        let client = format!("out:{name}");
        let mut inv = RESERVE.prepare_invoke();
        inv.key(format!("{}:{{{client}}}:t", self.prefix))
            .arg(t)
            .arg(c)
            .arg(max_wait);
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = self
            .call(Some(&client), inv.invoke_async(&mut conn))
            .await?;
        let wait = reply
            .get(1)
            .map_or(0, |&us| u64::try_from(us).unwrap_or(0).saturating_mul(1000));
        match reply.first() {
            Some(1) => Some(Reserve::Reserved(wait)),
            Some(0) => Some(Reserve::Refused(wait.max(1))),
            _ => None,
        }
    }

    /// Takes one of `limit` fleet-wide concurrency leases of `name`: `Some(Ok(lease))`
    /// (held, renewed, given back when dropped), `Some(Err(()))` when `limit` are live,
    /// `None` when Redis did not answer.
    pub(crate) async fn outbound_lease(
        self: &Arc<Self>,
        name: &str,
        limit: u32,
    ) -> Option<Result<Box<dyn Send + Sync>, ()>> {
        if !self.breaker.allow() {
            return None;
        }
        let client = format!("out:{name}");
        let id = self.new_lease_id();
        match self.exact(&client, &[], &[], 0, Some((limit, id))).await {
            Verdict::Admit => Some(Ok(Box::new(self.hold(id, &client)))),
            Verdict::Busy => Some(Err(())),
            _ => None,
        }
    }

    fn cache_keys(&self, key: &str) -> [String; 3] {
        [
            format!("{}:out:c:{key}", self.prefix),
            format!("{}:out:l:{key}", self.prefix),
            format!("{}:out:p:{key}", self.prefix),
        ]
    }

    /// The channel a lease's outcome for `key` is published on.
    pub(crate) fn done_channel(&self, key: &str) -> String {
        format!("{}:out:done:{key}", self.prefix)
    }

    /// The pattern of every [`Fleet::done_channel`].
    pub(crate) fn done_pattern(&self) -> String {
        format!("{}:out:done:*", self.prefix)
    }

    /// Looks `key` up in the shared cache and, on a miss, takes its lease for `lease_ms` as
    /// `owner` unless another replica holds it. `None`: Redis did not answer.
    pub(crate) async fn cache_fetch(&self, key: &str, owner: &str, lease_ms: u64) -> Option<Fetch> {
        if !self.breaker.allow() {
            return None;
        }
        let mut inv = CACHE_FETCH.prepare_invoke();
        for k in self.cache_keys(key) {
            inv.key(k);
        }
        inv.arg(owner).arg(lease_ms.max(1));
        let mut conn = self.conn.clone();
        let reply: Vec<redis::Value> = self
            .call(Some("out:cache"), inv.invoke_async(&mut conn))
            .await?;
        let int = |v: Option<&redis::Value>| match v {
            Some(redis::Value::Int(i)) => Some(*i),
            _ => None,
        };
        match int(reply.first())? {
            1 => {
                let entry = match reply.get(1)? {
                    redis::Value::BulkString(b) => b.clone(),
                    _ => return None,
                };
                let pttl = u64::try_from(int(reply.get(2))?).ok()?;
                Some(Fetch::Hit(entry, pttl))
            }
            2 => Some(Fetch::Pass),
            3 => Some(Fetch::Lead),
            0 => Some(Fetch::Follow(
                u64::try_from(int(reply.get(1)).unwrap_or(0)).unwrap_or(0),
            )),
            _ => None,
        }
    }

    /// Settles `owner`'s lease of `key`: stores the entry or the pass marker, releases the
    /// lease and publishes the outcome. False when Redis did not answer.
    pub(crate) async fn cache_settle(&self, key: &str, owner: &str, settle: Settle<'_>) -> bool {
        if !self.breaker.allow() {
            return false;
        }
        let (outcome, entry, ttl) = match settle {
            Settle::Stored(entry, ttl) => ("stored", entry, ttl),
            Settle::Pass(ttl) => ("pass", &[][..], ttl),
            Settle::Retry => ("retry", &[][..], 0),
        };
        let mut inv = CACHE_SETTLE.prepare_invoke();
        for k in self.cache_keys(key) {
            inv.key(k);
        }
        inv.arg(owner)
            .arg(outcome)
            .arg(entry)
            .arg(ttl.max(1))
            .arg(self.done_channel(key));
        let mut conn = self.conn.clone();
        self.call(Some("out:cache"), inv.invoke_async::<i64>(&mut conn))
            .await
            .is_some()
    }

    /// Extends `owner`'s lease of `key` by `lease_ms` while it still fetches.
    pub(crate) async fn cache_renew(&self, key: &str, owner: &str, lease_ms: u64) {
        if !self.breaker.allow() {
            return;
        }
        let mut inv = CACHE_RENEW.prepare_invoke();
        inv.key(format!("{}:out:l:{key}", self.prefix))
            .arg(owner)
            .arg(lease_ms.max(1));
        let mut conn = self.conn.clone();
        let _ = self
            .call(Some("out:cache"), inv.invoke_async::<i64>(&mut conn))
            .await;
    }
}
