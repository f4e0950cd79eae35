//! Upstream targets by name: `api.internal:8080` is resolved at start and re-resolved as its
//! answer's TTL says, and every address it resolves to is a target of the pool.
//!
//! - **When.** A name is resolved again when its answer's TTL runs out, but never sooner
//!   than `resolver.min_ttl` (default 1 s) nor later than `resolver.max_ttl` (default 5 min)
//!   after the answer.
//! - **A name that stops resolving** (NXDOMAIN, no address, no answer within
//!   `resolver.timeout`) keeps its last good addresses: a DNS outage never empties a pool.
//!   The first failure is logged (`warn`, "upstream name does not resolve; keeping its last
//!   addresses"), every failure counts in `fairgate_upstream_resolve_failures_total{upstream}`,
//!   it is tried again every `min_ttl`, and the recovery is logged (`info`).
//! - **At start** every name is resolved once before the gateway listens. A name that does
//!   not resolve then does not stop the start (as Envoy's `STRICT_DNS` clusters start and
//!   wait): it contributes no target until it resolves, and a pool with no target answers
//!   502 `no upstream target available`. It is logged and counted as above.
//! - **Changes** replace the pool's target set at once ([`Pool::set_targets`]): targets that
//!   stay keep their state, `consistent_hash` rebuilds its ring, health checks follow the
//!   new set, requests in flight to a removed target finish. `fairgate_upstream_targets
//!   {upstream}` is the pool's target count.
//!
//! The resolver is hickory-resolver (Tokio), which gives each answer's TTL (the system's
//! `getaddrinfo` does not), with `/etc/resolv.conf`'s servers, search domains and options, or
//! `resolver.nameservers`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig as HickoryConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use crate::config::ResolverConfig;
use crate::proxy::upstream::Pool;

/// What one resolution answers: the addresses and how long they are valid (the TTL).
pub(crate) type Answer = Result<(Vec<IpAddr>, Duration), String>;

/// Resolves a host name (hickory in the gateway; a script in unit tests).
pub(crate) trait Lookup: Send + Sync + 'static {
    /// Resolves `host` (a name, not an address).
    fn lookup(&self, host: &str) -> Pin<Box<dyn Future<Output = Answer> + Send + '_>>;
}

/// The gateway's [`Lookup`]: hickory-resolver on Tokio.
#[derive(Clone)]
pub(crate) struct Hickory {
    resolver: TokioResolver,
}

impl std::fmt::Debug for Hickory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hickory").finish_non_exhaustive()
    }
}

impl Hickory {
    /// A resolver asking `config.nameservers` (UDP, and TCP for truncated answers), or those
    /// of `/etc/resolv.conf`, with `config.timeout` for a whole resolution.
    pub(crate) fn new(config: &ResolverConfig) -> std::io::Result<Hickory> {
        let provider = TokioConnectionProvider::default();
        let mut builder = match &config.nameservers {
            Some(servers) => {
                let mut group = Vec::new();
                for addr in servers {
                    for protocol in [Protocol::Udp, Protocol::Tcp] {
                        let mut ns = NameServerConfig::new(*addr, protocol);
                        ns.trust_negative_responses = true;
                        group.push(ns);
                    }
                }
                let hickory = HickoryConfig::from_parts(None, Vec::new(), group);
                TokioResolver::builder_with_config(hickory, provider)
            }
            None => TokioResolver::builder(provider).map_err(|e| {
                std::io::Error::other(format!("cannot read the system's resolver config: {e}"))
            })?,
        };
        let opts = builder.options_mut();
        opts.timeout = config.timeout;
        opts.attempts = 1;
        // The cache never keeps an answer past our own re-resolution.
        opts.positive_max_ttl = Some(config.max_ttl);
        opts.negative_max_ttl = Some(config.min_ttl);
        Ok(Hickory {
            resolver: builder.build(),
        })
    }
}

impl Lookup for Hickory {
    fn lookup(&self, host: &str) -> Pin<Box<dyn Future<Output = Answer> + Send + '_>> {
        let host = host.to_owned();
        Box::pin(async move {
            match self.resolver.lookup_ip(host.as_str()).await {
                Ok(answer) => {
                    let ttl = answer
                        .valid_until()
                        .saturating_duration_since(std::time::Instant::now());
                    Ok((answer.iter().collect(), ttl))
                }
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

/// A pool's targets as written: addresses and names, in order.
#[derive(Debug, Clone)]
pub(crate) enum Written {
    /// An address (or `builtin:echo`'s), its own host.
    Addr(SocketAddr),
    /// A name and port.
    Name {
        /// The name.
        host: Arc<str>,
        /// The port.
        port: u16,
    },
}

/// One name's state.
#[derive(Debug)]
struct Name {
    host: Arc<str>,
    port: u16,
    /// The last good addresses.
    addrs: Vec<SocketAddr>,
    /// When to resolve it next.
    due: Instant,
    /// Whether the last resolution failed (the failure was logged).
    failing: bool,
}

/// Keeps one pool's named targets resolved.
pub(crate) struct Resolution {
    pool: Arc<Pool>,
    written: Vec<Written>,
    names: Vec<Name>,
    lookup: Arc<dyn Lookup>,
    min_ttl: Duration,
    max_ttl: Duration,
    failures: Counter,
    targets: Gauge,
}

impl std::fmt::Debug for Resolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolution")
            .field("pool", self.pool.name())
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl Resolution {
    /// The resolution of `pool`'s targets `written`; `failures` and `targets` are its
    /// `fairgate_upstream_resolve_failures_total` and `fairgate_upstream_targets`.
    pub(crate) fn new(
        pool: Arc<Pool>,
        written: Vec<Written>,
        lookup: Arc<dyn Lookup>,
        config: &ResolverConfig,
        failures: Counter,
        targets: Gauge,
    ) -> Resolution {
        let now = Instant::now();
        let names = written
            .iter()
            .filter_map(|w| match w {
                Written::Name { host, port } => Some(Name {
                    host: host.clone(),
                    port: *port,
                    addrs: Vec::new(),
                    due: now,
                    failing: false,
                }),
                Written::Addr(_) => None,
            })
            .collect();
        Resolution {
            pool,
            written,
            names,
            lookup,
            min_ttl: config.min_ttl,
            max_ttl: config.max_ttl.max(config.min_ttl),
            failures,
            targets,
        }
    }

    /// Resolves every name that is due, then installs the pool's target set.
    pub(crate) async fn resolve_due(&mut self) {
        let now = Instant::now();
        for name in self.names.iter_mut().filter(|n| n.due <= now) {
            let answer = self.lookup.lookup(&name.host).await;
            let upstream = self.pool.name();
            match answer {
                Ok((ips, ttl)) if !ips.is_empty() => {
                    let mut addrs: Vec<SocketAddr> = ips
                        .iter()
                        .map(|ip| SocketAddr::new(*ip, name.port))
                        .collect();
                    addrs.sort_unstable();
                    addrs.dedup();
                    if name.failing {
                        tracing::info!(%upstream, name = %name.host, addresses = addrs.len(), "upstream name resolves again");
                    }
                    name.failing = false;
                    name.addrs = addrs;
                    name.due = Instant::now() + ttl.clamp(self.min_ttl, self.max_ttl);
                }
                failed => {
                    let error = match failed {
                        Err(e) => e,
                        Ok(_) => "the answer has no address".to_owned(),
                    };
                    self.failures.inc();
                    if !name.failing {
                        tracing::warn!(
                            %upstream,
                            name = %name.host,
                            kept = name.addrs.len(),
                            %error,
                            "upstream name does not resolve; keeping its last addresses"
                        );
                    }
                    name.failing = true;
                    name.due = Instant::now() + self.min_ttl;
                }
            }
        }
        self.install();
    }

    /// Puts the written addresses and every name's last good addresses in the pool, in the
    /// written order.
    fn install(&self) {
        let mut targets: Vec<(Arc<str>, SocketAddr)> = Vec::new();
        let mut names = self.names.iter();
        for w in &self.written {
            match w {
                Written::Addr(a) => targets.push((Arc::from(a.ip().to_string()), *a)),
                Written::Name { .. } => {
                    let name = names.next().expect("one state per name");
                    targets.extend(name.addrs.iter().map(|a| (name.host.clone(), *a)));
                }
            }
        }
        if self.pool.set_targets(&targets) {
            let addrs: Vec<String> = self
                .pool
                .targets()
                .iter()
                .map(|t| t.addr().to_string())
                .collect();
            tracing::info!(upstream = %self.pool.name(), targets = ?addrs, "upstream targets changed");
        }
        self.targets
            .set(i64::try_from(self.pool.targets().len()).unwrap_or(i64::MAX));
    }

    /// When the next name is due (`None` without names).
    fn next_due(&self) -> Option<Instant> {
        self.names.iter().map(|n| n.due).min()
    }

    /// Re-resolves the names as they fall due, forever.
    pub(crate) async fn run(mut self) {
        while let Some(due) = self.next_due() {
            tokio::time::sleep_until(due).await;
            self.resolve_due().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Balance, UpstreamConfig};
    use std::sync::Mutex;

    /// Answers from a script, and records when it was asked.
    struct Script {
        answers: Mutex<Vec<Answer>>,
        asked: Mutex<Vec<Duration>>,
        start: Instant,
        count: tokio::sync::watch::Sender<usize>,
    }

    impl Script {
        fn new(answers: Vec<Answer>) -> Script {
            Script {
                answers: Mutex::new(answers),
                asked: Mutex::new(Vec::new()),
                start: Instant::now(),
                count: tokio::sync::watch::Sender::new(0),
            }
        }

        /// Waits until the `n`th question has been answered and its answer installed.
        async fn asked(&self, n: usize) {
            let mut rx = self.count.subscribe();
            rx.wait_for(|&k| k >= n).await.unwrap();
            // The resolution installs the answer before it sleeps again.
            tokio::task::yield_now().await;
        }
    }

    impl Lookup for Script {
        fn lookup(&self, _: &str) -> Pin<Box<dyn Future<Output = Answer> + Send + '_>> {
            self.asked.lock().unwrap().push(self.start.elapsed());
            let mut answers = self.answers.lock().unwrap();
            let answer = if answers.is_empty() {
                Err("no more answers".to_owned())
            } else {
                answers.remove(0)
            };
            Box::pin(async move {
                self.count.send_modify(|k| *k += 1);
                answer
            })
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn pool(balance: Balance) -> Arc<Pool> {
        let config = UpstreamConfig {
            max_idle: 1,
            ..UpstreamConfig::for_tests(balance)
        };
        Arc::new(Pool::new("p", &config, Vec::new()))
    }

    fn addrs(pool: &Pool) -> Vec<(String, SocketAddr)> {
        pool.targets()
            .iter()
            .map(|t| (t.host().to_owned(), t.addr()))
            .collect()
    }

    fn resolution(pool: &Arc<Pool>, script: &Arc<Script>) -> (Resolution, Counter, Gauge) {
        let (failures, targets) = (Counter::default(), Gauge::default());
        let config = ResolverConfig {
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            ..ResolverConfig::default()
        };
        let r = Resolution::new(
            pool.clone(),
            vec![
                Written::Addr("127.0.0.1:9000".parse().unwrap()),
                Written::Name {
                    host: Arc::from("api.internal"),
                    port: 8080,
                },
            ],
            script.clone(),
            &config,
            failures.clone(),
            targets.clone(),
        );
        (r, failures, targets)
    }

    /// Re-resolution follows the TTL within [min_ttl, max_ttl]; a failure keeps the last
    /// addresses and retries after min_ttl; a target that stays keeps its state.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn re_resolves_by_ttl_within_bounds_and_keeps_the_last_good_answer() {
        let script = Arc::new(Script::new(vec![
            Ok((vec![ip(1), ip(2)], Duration::from_secs(30))),
            Ok((vec![ip(2), ip(3)], Duration::ZERO)),
            Err("timed out".to_owned()),
            Ok((vec![], Duration::from_secs(5))),
            Ok((vec![ip(3)], Duration::from_secs(86_400))),
        ]));
        let pool = pool(Balance::ConsistentHash);
        let (r, failures, targets) = resolution(&pool, &script);
        let task = tokio::spawn(r.run());
        let sa = |last: u8| SocketAddr::new(ip(last), 8080);
        let lit: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let now = || addrs(&pool).iter().map(|a| a.1).collect::<Vec<_>>();
        script.asked(1).await;
        assert_eq!(
            addrs(&pool),
            [
                ("127.0.0.1".to_owned(), lit),
                ("api.internal".to_owned(), sa(1)),
                ("api.internal".to_owned(), sa(2))
            ]
        );
        assert_eq!(targets.get(), 3);
        let kept = pool.targets()[2].clone();
        let gone = pool.targets()[1].clone();
        // A request in flight on the target that the next answer removes.
        let held = crate::proxy::upstream::InFlight::holding(gone.clone());
        script.asked(2).await;
        assert_eq!(now(), [lit, sa(2), sa(3)]);
        assert!(
            Arc::ptr_eq(&kept, &pool.targets()[1]),
            "10.0.0.2 keeps its state"
        );
        // The removed target's request is still counted until it ends.
        assert_eq!(gone.in_flight(), 1);
        drop(held);
        assert_eq!(gone.in_flight(), 0);
        // TTL 0: again after min_ttl (1 s); it fails twice (an error, then no address):
        // kept, counted, retried after 1 s each time.
        script.asked(4).await;
        assert_eq!(failures.get(), 2);
        assert_eq!(now(), [lit, sa(2), sa(3)], "the last good addresses stay");
        script.asked(5).await;
        assert_eq!(now(), [lit, sa(3)]);
        assert_eq!(targets.get(), 2);
        // A day's TTL is capped at max_ttl (300 s): the sixth question comes then.
        script.asked(6).await;
        let asked = script.asked.lock().unwrap().clone();
        assert_eq!(
            asked,
            [0, 30, 31, 32, 33, 333].map(Duration::from_secs),
            "when the name was resolved"
        );
        assert_eq!(failures.get(), 3, "the script's end is a failure too");
        task.abort();
    }
}
