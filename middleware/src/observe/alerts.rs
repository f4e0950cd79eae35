//! Usage alerts (feature `alerts`): when a client's usage of a bandwidth — the used share
//! of its bucket, `1 − remaining / burst`, as an admit left it — reaches a threshold of the
//! `alerts` its override or plan names, [`AlertWebhook`] POSTs an alert event (JSON, see
//! [`AlertEvent`]) to that webhook, once per crossing: a threshold is re-armed when a later
//! decision finds usage back below it (or the bucket has refilled below the first threshold
//! by the time the crossing's state is swept).
//!
//! Off the request path: the observer only decides whether a threshold was crossed and puts
//! the event in a bounded queue (`try_send`; a full queue drops the event and counts it);
//! one background task delivers the queue in order, each event with up to
//! [`AlertConfig::attempts`] tries, each bounded by [`AlertConfig::timeout`], with
//! exponential backoff between them. A dead or silent receiver costs requests nothing: the
//! queue fills and further events are dropped, counted in `fairgate_alerts_total{result}`.
//!
//! Memory is bounded whatever the number of clients: the crossing state is one small entry
//! per (client, bandwidth) above its first threshold, in [`AlertConfig::max_crossings`]
//! entries at most (sharded); an entry whose bucket has refilled below the first threshold
//! is dropped to make room, and when every entry is still above its first threshold the new
//! crossing is dropped and counted (never sent twice: a crossing without state is not sent).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fairgate_policies::compiled::CompiledAlerts;
use fairgate_policies::PolicyStore;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::clock::{rfc3339, Nanos};
use crate::decision::{CompletionEvent, DecisionEvent, DecisionKind, Observer};

/// Limits of the alert sender.
#[derive(Debug, Clone)]
pub struct AlertConfig {
    /// Events waiting for delivery at most (default 1024); more are dropped and counted.
    pub queue: usize,
    /// (client, bandwidth) pairs above a threshold remembered at most (default 65,536).
    pub max_crossings: usize,
    /// Tries per event (default 4: the first and 3 retries).
    pub attempts: u32,
    /// Bound of one try, connect to response head (default 2 s).
    pub timeout: Duration,
    /// Wait before the first retry, doubled for each further one (default 250 ms).
    pub backoff: Duration,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            queue: 1024,
            max_crossings: 65_536,
            attempts: 4,
            timeout: Duration::from_secs(2),
            backoff: Duration::from_millis(250),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The `fairgate_alerts_*` series. Register once per registry; give a clone to
/// [`AlertWebhook::start`].
#[derive(Clone, Debug)]
pub struct AlertMetrics {
    sent: Counter,
    failed: Counter,
    dropped: Counter,
    queued: Gauge,
}

impl AlertMetrics {
    /// Creates `fairgate_alerts_total{result}` (`sent`: the receiver answered 2xx;
    /// `failed`: every try failed; `dropped`: the queue or the crossing state was full) and
    /// `fairgate_alerts_queued` (events waiting) in `registry`.
    pub fn register(registry: &mut Registry) -> AlertMetrics {
        let registry = registry.sub_registry_with_prefix("fairgate");
        let results = Family::<ResultLabels, Counter>::default();
        let m = AlertMetrics {
            sent: results.get_or_create_owned(&ResultLabels { result: "sent" }),
            failed: results.get_or_create_owned(&ResultLabels { result: "failed" }),
            dropped: results.get_or_create_owned(&ResultLabels { result: "dropped" }),
            queued: Gauge::default(),
        };
        registry.register(
            "alerts",
            "Usage alert events by result: sent, failed (every try), dropped (queue or crossing state full)",
            results,
        );
        registry.register(
            "alerts_queued",
            "Usage alert events waiting for delivery",
            m.queued.clone(),
        );
        m
    }
}

/// One alert event, the JSON body POSTed to the webhook.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AlertEvent {
    /// Always `"alert"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The client key.
    pub client: String,
    /// The client's plan (`null` for an override without one).
    pub plan: Option<String>,
    /// The bandwidth's name.
    pub bandwidth: String,
    /// The threshold crossed.
    pub threshold: f64,
    /// The bandwidth's usage after the admit that crossed it (`1 − remaining / burst`).
    pub usage: f64,
    /// Units left in the bucket.
    pub remaining: u64,
    /// The bandwidth's burst.
    pub burst: u64,
    /// When the admit was decided, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The version of the policy that named the alert.
    pub policy_version: u64,
    /// Where it goes (not in the body).
    #[serde(skip)]
    pub webhook: Arc<str>,
}

/// The crossing state of one (client, bandwidth).
#[derive(Debug, Clone, Copy)]
struct Crossed {
    /// Thresholds reached (1 = the first).
    level: usize,
    /// When the bucket will have refilled below the first threshold, absent requests: the
    /// entry means nothing after it.
    stale_at: Nanos,
}

/// Sharded, bounded crossing state, keyed by a 64-bit hash of (client key, bandwidth id),
/// with a per-process random seed: two pairs would share a state only at odds of 2⁻⁶⁴ (a
/// missed or repeated alert), and an entry costs no allocation of its own.
struct Crossings {
    shards: Box<[Mutex<HashMap<u64, Crossed>>]>,
    per_shard: usize,
    live: AtomicUsize,
    hasher: ahash::RandomState,
}

const SHARDS: usize = 16;

/// Sends usage alerts (see the module docs). An engine [`Observer`]: install it with the
/// others, e.g. `engine.set_observer(Arc::new((metrics, alerts)))`.
pub struct AlertWebhook {
    store: PolicyStore,
    queue: mpsc::Sender<AlertEvent>,
    crossings: Crossings,
    metrics: AlertMetrics,
}

impl std::fmt::Debug for AlertWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertWebhook")
            .field("live", &self.crossings.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl AlertWebhook {
    /// Starts the sender task on the current Tokio runtime; `store` gives events their
    /// policy version.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn start(store: PolicyStore, config: AlertConfig, metrics: AlertMetrics) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        tokio::spawn(deliver(rx, config.clone(), metrics.clone()));
        Self::with_queue(store, &config, metrics, tx)
    }

    /// The observer half, queueing into `tx`.
    fn with_queue(
        store: PolicyStore,
        config: &AlertConfig,
        metrics: AlertMetrics,
        tx: mpsc::Sender<AlertEvent>,
    ) -> Arc<Self> {
        let per_shard = config.max_crossings.div_ceil(SHARDS).max(1);
        Arc::new(AlertWebhook {
            store,
            queue: tx,
            crossings: Crossings {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                per_shard,
                live: AtomicUsize::new(0),
                hasher: ahash::RandomState::new(),
            },
            metrics,
        })
    }

    fn enqueue(&self, event: AlertEvent) {
        match self.queue.try_send(event) {
            Ok(()) => {
                self.metrics.queued.inc();
            }
            Err(_) => {
                self.metrics.dropped.inc();
            }
        }
    }
}

impl Observer for AlertWebhook {
    fn on_decision(&self, e: &DecisionEvent<'_>) {
        if !matches!(e.kind, DecisionKind::Admit | DecisionKind::Borrowed) {
            return;
        }
        let Some(usage) = &e.usage else { return };
        let Some(alerts) = usage.alerts() else { return };
        let now = usage.now();
        for b in usage.bandwidths() {
            let bw = b.bandwidth;
            let level = alerts.level(bw.burst - b.remaining, bw.burst);
            let c = &self.crossings;
            if level == 0 && c.live.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let hash = c.hasher.hash_one((e.client_key, &*bw.id));
            let shard = &c.shards[(hash as usize) % SHARDS];
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            let prev = map.get(&hash).map_or(0, |x| x.level);
            if level == 0 {
                if map.remove(&hash).is_some() {
                    c.live.fetch_sub(1, Ordering::Relaxed);
                }
                continue;
            }
            let entry = Crossed {
                level,
                stale_at: stale_at(alerts, bw, now, b.remaining),
            };
            if prev == 0 && map.len() >= c.per_shard {
                let before = map.len();
                map.retain(|_, x| x.stale_at > now);
                c.live.fetch_sub(before - map.len(), Ordering::Relaxed);
                if map.len() >= c.per_shard {
                    // No room to remember it: not sent, so never sent twice.
                    self.metrics.dropped.inc();
                    continue;
                }
            }
            if map.insert(hash, entry).is_none() {
                c.live.fetch_add(1, Ordering::Relaxed);
            }
            drop(map);
            if level <= prev {
                continue;
            }
            let time = rfc3339(SystemTime::now());
            for &threshold in &alerts.thresholds[prev..level] {
                self.enqueue(AlertEvent {
                    kind: "alert",
                    client: e.client_key.to_owned(),
                    plan: e.plan.map(str::to_owned),
                    bandwidth: bw.name.to_string(),
                    threshold,
                    usage: b.usage,
                    remaining: b.remaining,
                    burst: bw.burst,
                    time: time.clone(),
                    policy_version: self.store.version(),
                    webhook: Arc::clone(&alerts.webhook),
                });
            }
        }
    }

    fn on_complete(&self, _e: &CompletionEvent<'_>) {}
}

/// When a bucket left with `remaining` units at `now` refills below the first threshold
/// (absent further requests): the first time its remaining count reaches a level-0 value.
fn stale_at(
    alerts: &CompiledAlerts,
    bw: &fairgate_policies::compiled::CompiledBandwidth,
    now: Nanos,
    remaining: u64,
) -> Nanos {
    // The fewest remaining units at level 0 (≤ burst: the first threshold is > 0): from
    // the formula, then a step either way for the float rounding `level` allows for.
    let burst = bw.burst;
    let t0 = alerts.thresholds.first().copied().unwrap_or(1.0);
    let mut need = ((burst as f64 * (1.0 - t0)) as u64 + 1).clamp(remaining, burst);
    while need > remaining && alerts.level(burst - (need - 1), burst) == 0 {
        need -= 1;
    }
    while need < burst && alerts.level(burst - need, burst) > 0 {
        need += 1;
    }
    // remaining(t) = (C − (TAT − t)) / T grows by one unit per T.
    now.saturating_add((need - remaining).saturating_mul(bw.t_ns))
}

/// The sender task: delivers queued events in order until every sender is gone.
async fn deliver(mut rx: mpsc::Receiver<AlertEvent>, config: AlertConfig, m: AlertMetrics) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    while let Some(event) = rx.recv().await {
        m.queued.dec();
        let body = Bytes::from(serde_json::to_vec(&event).unwrap_or_default());
        let mut wait = config.backoff;
        let mut delivered = false;
        for attempt in 0..config.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
            }
            let req = http::Request::post(&*event.webhook)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::USER_AGENT, "fairgate-alerts")
                .body(Full::new(body.clone()));
            let Ok(req) = req else { break };
            match tokio::time::timeout(config.timeout, client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(Ok(resp)) => tracing::debug!(
                    webhook = %event.webhook, status = resp.status().as_u16(), attempt,
                    "alert webhook refused the event"
                ),
                Ok(Err(err)) => tracing::debug!(
                    webhook = %event.webhook, %err, attempt, "alert webhook unreachable"
                ),
                Err(_) => tracing::debug!(
                    webhook = %event.webhook, attempt, "alert webhook timed out"
                ),
            }
        }
        if delivered {
            m.sent.inc();
        } else {
            m.failed.inc();
            tracing::warn!(
                webhook = %event.webhook,
                client = %event.client,
                bandwidth = %event.bandwidth,
                threshold = event.threshold,
                "usage alert not delivered after {} tries",
                config.attempts.max(1)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::decision::Decision;
    use crate::engine::{Engine, RequestFacts};

    const S: Nanos = 1_000_000_000;

    fn policy(clients: &str) -> String {
        format!(
            "version: 1
default_plan: free
plans:
  free:
    bandwidths: [{{rate: 10/s, burst: 10, name: b}}]
    alerts: {{thresholds: [0.8, 1.0], webhook: 'http://127.0.0.1:9/hook'}}
{clients}"
        )
    }

    struct Rig {
        engine: Arc<Engine>,
        clock: Arc<ManualClock>,
        rx: mpsc::Receiver<AlertEvent>,
        alerts: Arc<AlertWebhook>,
        registry: Registry,
    }

    fn rig(policy: &str, config: AlertConfig) -> Rig {
        let store = PolicyStore::from_yaml_str(policy, "p.yaml").expect("policy");
        let clock = ManualClock::new(1000 * S);
        let engine = Engine::with_clock(store.clone(), clock.clone());
        let mut registry = Registry::default();
        let metrics = AlertMetrics::register(&mut registry);
        let (tx, rx) = mpsc::channel(config.queue);
        let alerts = AlertWebhook::with_queue(store, &config, metrics, tx);
        engine.set_observer(alerts.clone());
        Rig {
            engine,
            clock,
            rx,
            alerts,
            registry,
        }
    }

    fn admit(engine: &Engine, n: u8) -> bool {
        let facts = RequestFacts {
            peer: std::net::IpAddr::from([192, 0, 2, n]),
            method: "GET",
            host: "example.test",
            path: "/",
            query: None,
            operation: None,
            headers: &(),
        };
        matches!(engine.decide(&facts), Decision::Admit(_))
    }

    fn drain(rx: &mut mpsc::Receiver<AlertEvent>) -> Vec<(String, f64, u64)> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push((e.client, e.threshold, e.remaining));
        }
        out
    }

    fn text(r: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, r).expect("encode");
        s
    }

    #[test]
    fn one_event_per_crossing_rearmed_when_usage_falls_back() {
        let mut r = rig(&policy(""), AlertConfig::default());
        for _ in 0..7 {
            assert!(admit(&r.engine, 1));
        }
        assert_eq!(drain(&mut r.rx), []);
        assert!(admit(&r.engine, 1)); // 8 of 10 used: 0.8
        assert_eq!(drain(&mut r.rx), [("192.0.2.1".to_owned(), 0.8, 2)]);
        assert!(admit(&r.engine, 1));
        assert_eq!(drain(&mut r.rx), []);
        assert!(admit(&r.engine, 1)); // 10 of 10: 1.0
        assert_eq!(drain(&mut r.rx), [("192.0.2.1".to_owned(), 1.0, 0)]);
        assert!(!admit(&r.engine, 1)); // a rejection is no crossing
        assert_eq!(drain(&mut r.rx), []);
        // 0.5 s refills 5: the next admit leaves 4 (usage 0.6), re-arming both.
        r.clock.advance(Duration::from_millis(500));
        assert!(admit(&r.engine, 1));
        assert_eq!(drain(&mut r.rx), []);
        assert!(admit(&r.engine, 1));
        assert!(admit(&r.engine, 1)); // 2 left: 0.8 again
        assert_eq!(drain(&mut r.rx), [("192.0.2.1".to_owned(), 0.8, 2)]);
        // Another client crosses on its own.
        for _ in 0..10 {
            assert!(admit(&r.engine, 2));
        }
        assert_eq!(
            drain(&mut r.rx),
            [
                ("192.0.2.2".to_owned(), 0.8, 2),
                ("192.0.2.2".to_owned(), 1.0, 0)
            ]
        );
        let t = text(&r.registry);
        assert!(t.contains("fairgate_alerts_queued 5"), "{t}");
    }

    #[test]
    fn an_override_names_its_own_thresholds_and_a_client_without_alerts_sends_none() {
        let clients = "clients:
  192.0.2.1: {alerts: {thresholds: [0.5], webhook: 'http://127.0.0.1:9/other'}}
  192.0.2.2: {plan: bare}
";
        let p = policy(clients).replace(
            "clients:",
            "  bare: {bandwidths: [{rate: 10/s, burst: 10}]}\nclients:",
        );
        let mut r = rig(&p, AlertConfig::default());
        for _ in 0..10 {
            assert!(admit(&r.engine, 1));
            assert!(admit(&r.engine, 2));
        }
        let events: Vec<AlertEvent> = std::iter::from_fn(|| r.rx.try_recv().ok()).collect();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].threshold, 0.5);
        assert_eq!(&*events[0].webhook, "http://127.0.0.1:9/other");
        assert_eq!(events[0].policy_version, 1);
        let json = serde_json::to_value(&events[0]).expect("json");
        assert_eq!(json["type"], "alert");
        assert_eq!(json["plan"], "free");
        assert_eq!(json["bandwidth"], "b");
        assert_eq!(json["usage"], 0.5);
        assert!(json.get("webhook").is_none());
    }

    #[test]
    fn a_full_queue_drops_events_and_counts_them_without_blocking() {
        let config = AlertConfig {
            queue: 2,
            ..AlertConfig::default()
        };
        let mut r = rig(&policy(""), config);
        for n in 1..=5 {
            for _ in 0..8 {
                assert!(admit(&r.engine, n));
            }
        }
        assert_eq!(drain(&mut r.rx).len(), 2);
        let t = text(&r.registry);
        assert!(
            t.contains(r#"fairgate_alerts_total{result="dropped"} 3"#),
            "{t}"
        );
    }

    #[test]
    fn crossing_state_is_bounded_and_stale_entries_make_room() {
        let config = AlertConfig {
            max_crossings: SHARDS, // one entry per shard
            ..AlertConfig::default()
        };
        let mut r = rig(&policy(""), config);
        for n in 1..=200u8 {
            for _ in 0..8 {
                assert!(admit(&r.engine, n));
            }
        }
        let live = r.alerts.crossings.live.load(Ordering::Relaxed);
        assert!((1..=SHARDS).contains(&live), "{live}");
        let sent = drain(&mut r.rx).len();
        let t = text(&r.registry);
        let dropped = 200 - sent;
        assert!(
            t.contains(&format!(
                r#"fairgate_alerts_total{{result="dropped"}} {dropped}"#
            )),
            "{t}"
        );
        assert_eq!(sent, live, "one event per remembered crossing");
        // A second later every bucket has refilled: the stale entries make room.
        r.clock.advance(Duration::from_secs(1));
        for _ in 0..8 {
            assert!(admit(&r.engine, 201));
        }
        assert_eq!(drain(&mut r.rx), [("192.0.2.201".to_owned(), 0.8, 2)]);
    }
}
