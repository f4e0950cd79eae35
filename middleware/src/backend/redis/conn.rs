//! The connection every call goes through (one server or a Cluster), and the call itself:
//! under its budget, reported to the breaker, errors counted and logged at most once a
//! second.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::Value;

use super::{Fleet, FleetError};

/// The least budget of an `async` exchange call. An exchange is off the request path, so
/// it need not fit a request's `timeout`, and redis-server's own housekeeping can hold it
/// longer: its slow active-expire cycle may run for up to 25 ms (measured with
/// `latency-monitor-threshold` under the load harness, where every bucket key expires 1 s
/// after its TAT), which failed chunks, and lost their interval's usage, at the 25 ms
/// default `timeout`.
const EXCHANGE_MIN_BUDGET: Duration = Duration::from_millis(50);

/// The budget of an `async` exchange call for a `timeout`: at least [`EXCHANGE_MIN_BUDGET`].
/// Also the connections' own response limit, so that they fit the longest call; each call
/// keeps its own budget on top (`Fleet::call`, the exchanges).
pub(super) fn exchange_budget(timeout: Duration) -> Duration {
    timeout.max(EXCHANGE_MIN_BUDGET)
}

/// The connection every call goes through: one server's multiplexed `ConnectionManager`, or
/// a Redis Cluster's multiplexed async connection (routing each command by its first key).
/// Both are cheap `Arc` clones.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Is this error reply about one client's keys (rather than about the backend)?
pub(super) fn key_scoped(e: &redis::RedisError) -> bool {
    e.code() == Some("WRONGTYPE")
}

/// The cluster connection for `seeds`: made in the background (never waits here), with the
/// same budgets as the single-server `ConnectionManager`.
pub(super) fn connect_cluster(
    seeds: &[String],
    timeout: Duration,
    redacted: &str,
) -> Result<ClusterConnection, FleetError> {
    let connect_timeout = timeout.max(Duration::from_millis(100));
    let client = redis::cluster::ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .connection_timeout(connect_timeout)
        .response_timeout(exchange_budget(timeout))
        .retries(3)
        .min_retry_wait(50)
        .max_retry_wait(2_000)
        .build()
        .map_err(|e| FleetError::Cluster(format!("{redacted}: {e}")))?;
    let config = redis::cluster::ClusterConfig::new()
        .set_connection_timeout(connect_timeout)
        .set_response_timeout(exchange_budget(timeout));
    Ok(client.get_pending_async_connection_with_config(config))
}

impl Fleet {
    /// Runs one call under the budget and reports it to the breaker. `client`: whose keys
    /// the call touches, if one client's (a key-scoped error reply names it and leaves the
    /// breaker alone; see the module docs).
    pub(super) async fn call<T>(
        &self,
        client: Option<&str>,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => {
                self.succeeded();
                Some(v)
            }
            Ok(Err(e)) if key_scoped(&e) => {
                self.key_failed(client.unwrap_or(""), &e);
                None
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string(), 1);
                None
            }
            Err(_) => {
                self.failed(&format!("no answer within {:?}", self.timeout), 1);
                None
            }
        }
    }

    /// A call succeeded: closes the breaker.
    pub(super) fn succeeded(&self) {
        if self.breaker.on_success() {
            tracing::info!(url = %self.url_redacted, "redis is back: fleet-wide decisions again");
        }
    }

    /// Counts a key-scoped error reply (logged at most once a second, with the key); the
    /// breaker does not move: Redis answered.
    pub(super) fn key_failed(&self, client: &str, e: &dyn std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let now = self.breaker.clock.now();
        let last = self.last_key_error_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1_000_000_000
            && self
                .last_key_error_log
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                url = %self.url_redacted,
                key = %format_args!("{}:{{{client}}}", self.prefix),
                on_failure = ?self.on_failure,
                error = %e,
                "redis refused a client's keys: its decisions follow on_failure until the key is fixed"
            );
        }
    }

    /// Counts `errors` failures of one call (timeout, connection, error replies about the
    /// backend), logs it at most once a second, and feeds the breaker once.
    pub(super) fn failed(&self, err: &str, errors: u64) {
        self.errors.fetch_add(errors, Ordering::Relaxed);
        let now = self.breaker.clock.now();
        let last = self.last_error_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1_000_000_000
            && self
                .last_error_log
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(url = %self.url_redacted, error = %err, "redis call failed");
        }
        if self.breaker.on_failure() {
            tracing::warn!(
                url = %self.url_redacted,
                on_failure = ?self.on_failure,
                "redis unreachable: breaker open, deciding with on_failure"
            );
        }
    }
}
