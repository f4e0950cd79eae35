//! The in-repo open-loop load driver: fixed-rate request schedules, per-client source
//! addresses, and HdrHistogram latencies measured from each request's *scheduled* start.
//!
//! A [`LoadSpec`] says how many requests per second to start, for how long, from which
//! source address (`127.0.0.N`, so the gateway sees a distinct client) and how to build the
//! i-th request. [`run`] starts request `i` at `start + i / rate` whether or not earlier ones
//! have answered (open loop, as `oha -q` or wrk2 do): a slow server cannot slow the offered
//! load down, and because latency is measured from the scheduled start rather than the
//! moment the request was written, time a request spent waiting behind a late scheduler or
//! a full connection pool is counted too (no coordinated omission). At most
//! [`LoadSpec::max_in_flight`] requests run at once; a request due while that many are
//! running is not started and is counted as [`LoadReport::dropped`].
//!
//! [`run_all`] runs several specs at once (ten clients, a heavy hitter and its victims) and
//! returns one [`LoadReport`] per spec, in order. [`Origin`] is a cheap origin to aim the
//! gateway at: it counts instead of recording, and can be capped to a known capacity.
//!
//! ```no_run
//! # async fn demo(url: &str) {
//! use std::time::Duration;
//! use fairgate_tests::load::{run, LoadSpec};
//! let report = run(LoadSpec::get(url, 500, Duration::from_secs(5))).await;
//! assert_eq!(report.errors, 0);
//! println!("{} ok, p99 {:?}", report.count(200), report.p99());
//! # }
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::{empty, full, Client, TestBody};

/// How long one request may take before it is abandoned and counted as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Builds the i-th request of a run (0-based).
pub type MakeRequest = Arc<dyn Fn(u64) -> Request<TestBody> + Send + Sync>;

/// One open-loop load: `rate` requests per second for `duration`.
#[derive(Clone)]
pub struct LoadSpec {
    /// Requests started per second.
    pub rate: u32,
    /// How long requests are started for (the run then waits for those still running).
    pub duration: Duration,
    /// The most requests running at once; a request due while this many run is dropped.
    pub max_in_flight: usize,
    /// The client's source address (any address in `127.0.0.0/8`); `None`: the OS picks.
    pub source: Option<IpAddr>,
    /// The i-th request.
    pub make: MakeRequest,
}

impl std::fmt::Debug for LoadSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadSpec")
            .field("rate", &self.rate)
            .field("duration", &self.duration)
            .field("max_in_flight", &self.max_in_flight)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl LoadSpec {
    /// `GET url` at `rate` per second for `duration`, at most 256 in flight, from 127.0.0.1.
    pub fn get(url: &str, rate: u32, duration: Duration) -> LoadSpec {
        let url: Arc<str> = url.into();
        LoadSpec::new(
            rate,
            duration,
            Arc::new(move |_| Request::get(&*url).body(empty()).expect("request")),
        )
    }

    /// `GET url` with fixed headers.
    pub fn get_with(url: &str, headers: &[(&str, &str)], rate: u32, duration: Duration) -> Self {
        let url: Arc<str> = url.into();
        let headers: Arc<[(String, String)]> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        LoadSpec::new(
            rate,
            duration,
            Arc::new(move |_| {
                let mut b = Request::get(&*url);
                for (k, v) in headers.iter() {
                    b = b.header(k, v);
                }
                b.body(empty()).expect("request")
            }),
        )
    }

    /// Requests built by `make`, at `rate` per second for `duration`.
    pub fn new(rate: u32, duration: Duration, make: MakeRequest) -> LoadSpec {
        LoadSpec {
            rate,
            duration,
            max_in_flight: 256,
            source: None,
            make,
        }
    }

    /// The same load from source address `ip` (`"127.0.0.N"`).
    ///
    /// # Panics
    ///
    /// When `ip` is not an IP address.
    pub fn from_ip(mut self, ip: &str) -> LoadSpec {
        self.source = Some(ip.parse().expect("source ip"));
        self
    }

    /// The same load with another in-flight cap.
    pub fn max_in_flight(mut self, n: usize) -> LoadSpec {
        self.max_in_flight = n;
        self
    }

    /// Requests this spec schedules: `rate × duration`, rounded down.
    pub fn total(&self) -> u64 {
        (u128::from(self.rate) * self.duration.as_nanos() / 1_000_000_000) as u64
    }
}

/// One request of a run: when it was due, what it got, how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Its scheduled start, from the start of the run.
    pub offset: Duration,
    /// The response status; 0 for a transport error or a timeout.
    pub status: u16,
    /// From the scheduled start to the end of the response body (or the error).
    pub latency: Duration,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Requests started.
    pub sent: u64,
    /// Requests due but not started because `max_in_flight` were running.
    pub dropped: u64,
    /// Requests that ended in a transport error or [`REQUEST_TIMEOUT`].
    pub errors: u64,
    /// Responses by status.
    pub by_status: BTreeMap<u16, u64>,
    /// 429 and 503 responses that carried no `Retry-After`.
    pub rejections_without_retry_after: u64,
    /// Wall time from the first scheduled start to the last answer.
    pub elapsed: Duration,
    latency: Histogram<u64>,
    latency_by_status: BTreeMap<u16, Histogram<u64>>,
    timeline: Vec<Sample>,
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl LoadReport {
    fn new() -> LoadReport {
        LoadReport {
            sent: 0,
            dropped: 0,
            errors: 0,
            by_status: BTreeMap::new(),
            rejections_without_retry_after: 0,
            elapsed: Duration::ZERO,
            latency: histogram(),
            latency_by_status: BTreeMap::new(),
            timeline: Vec::new(),
        }
    }

    fn record(&mut self, s: Sample, retry_after: bool) {
        self.timeline.push(s);
        if s.status == 0 {
            self.errors += 1;
            return;
        }
        *self.by_status.entry(s.status).or_default() += 1;
        if matches!(s.status, 429 | 503) && !retry_after {
            self.rejections_without_retry_after += 1;
        }
        let us = micros(s.latency);
        self.latency.saturating_record(us);
        self.latency_by_status
            .entry(s.status)
            .or_insert_with(histogram)
            .saturating_record(us);
    }

    /// Responses with `status`.
    pub fn count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Responses with a 2xx status.
    pub fn successes(&self) -> u64 {
        self.by_status.range(200..300).map(|(_, n)| n).sum()
    }

    /// Responses of any status (`sent − errors`).
    pub fn responses(&self) -> u64 {
        self.by_status.values().sum()
    }

    /// Requests due: `sent + dropped`.
    pub fn scheduled(&self) -> u64 {
        self.sent + self.dropped
    }

    /// Median latency over every response.
    pub fn p50(&self) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(0.50))
    }

    /// 99th percentile latency over every response.
    pub fn p99(&self) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(0.99))
    }

    /// Latency at quantile `q` (0..=1) over every response.
    pub fn quantile(&self, q: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(q))
    }

    /// Highest latency over every response.
    pub fn max(&self) -> Duration {
        Duration::from_micros(self.latency.max())
    }

    /// 99th percentile latency of the responses with `status` (zero when there were none).
    pub fn p99_of(&self, status: u16) -> Duration {
        self.quantile_of(status, 0.99)
    }

    /// Latency at quantile `q` of the responses with `status` (zero when there were none).
    pub fn quantile_of(&self, status: u16, q: f64) -> Duration {
        self.latency_by_status
            .get(&status)
            .map_or(Duration::ZERO, |h| {
                Duration::from_micros(h.value_at_quantile(q))
            })
    }

    /// 2xx responses / requests started (1.0 when nothing was started).
    pub fn success_ratio(&self) -> f64 {
        if self.sent == 0 {
            return 1.0;
        }
        self.successes() as f64 / self.sent as f64
    }

    /// Every started request, in completion order.
    pub fn timeline(&self) -> &[Sample] {
        &self.timeline
    }

    /// Responses per status among requests scheduled in `[from, to)` of the run.
    pub fn window(&self, from: Duration, to: Duration) -> BTreeMap<u16, u64> {
        let mut out = BTreeMap::new();
        for s in self
            .timeline
            .iter()
            .filter(|s| s.offset >= from && s.offset < to)
        {
            *out.entry(s.status).or_default() += 1;
        }
        out
    }

    /// The `q` quantile of latency per second of the run (by when requests were due), one
    /// entry per second that has requests, in order. Comparing two runs second by second
    /// (and taking the median) tells a steady cost from one stall of a shared machine.
    pub fn quantile_by_second(&self, q: f64) -> Vec<Duration> {
        let mut by: BTreeMap<u64, Vec<Duration>> = BTreeMap::new();
        for s in &self.timeline {
            by.entry(s.offset.as_secs()).or_default().push(s.latency);
        }
        by.into_values()
            .map(|mut v| {
                v.sort_unstable();
                let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
                v[i]
            })
            .collect()
    }

    /// How many requests took longer than `threshold`, by second of the run (when they
    /// were due): tells a stall of the machine (one or two seconds) from a steady cost.
    pub fn slow_by_second(&self, threshold: Duration) -> BTreeMap<u64, u64> {
        let mut out = BTreeMap::new();
        for s in self.timeline.iter().filter(|s| s.latency > threshold) {
            *out.entry(s.offset.as_secs()).or_default() += 1;
        }
        out
    }

    /// A one-line summary for test output.
    pub fn summary(&self) -> String {
        format!(
            "sent={} dropped={} errors={} statuses={:?} p50={:?} p99={:?} max={:?} elapsed={:?}",
            self.sent,
            self.dropped,
            self.errors,
            self.by_status,
            self.p50(),
            self.p99(),
            self.max(),
            self.elapsed
        )
    }
}

/// Runs one open-loop load and waits for every started request to end.
pub async fn run(spec: LoadSpec) -> LoadReport {
    run_at(spec, Instant::now()).await
}

/// Runs every spec concurrently (all scheduled from one common start); one report per spec,
/// in order.
pub async fn run_all(specs: Vec<LoadSpec>) -> Vec<LoadReport> {
    // A little head room so every client's first request is due at the same instant.
    let start = Instant::now() + Duration::from_millis(20);
    let handles: Vec<_> = specs
        .into_iter()
        .map(|s| tokio::spawn(run_at(s, start)))
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("load task"));
    }
    out
}

struct Shared {
    report: Mutex<LoadReport>,
    in_flight: AtomicUsize,
}

async fn run_at(spec: LoadSpec, start: Instant) -> LoadReport {
    let client = match spec.source {
        Some(ip) => Client::from_ip(&ip.to_string()),
        None => Client::new(),
    };
    let total = spec.total();
    let shared = Arc::new(Shared {
        report: Mutex::new(LoadReport::new()),
        in_flight: AtomicUsize::new(0),
    });
    let interval_ns = 1_000_000_000f64 / f64::from(spec.rate.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0u64;
    while i < total {
        let due = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
        tokio::time::sleep_until(due).await;
        // Start everything that is due by now (the timer wheel ticks in milliseconds).
        let now = Instant::now();
        while i < total {
            let due = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
            if due > now {
                break;
            }
            if shared.in_flight.load(Ordering::Acquire) >= spec.max_in_flight {
                shared.report.lock().unwrap().dropped += 1;
            } else {
                shared.in_flight.fetch_add(1, Ordering::AcqRel);
                let req = (spec.make)(i);
                let client = client.clone();
                let shared = shared.clone();
                tasks.spawn(async move {
                    let res = tokio::time::timeout(REQUEST_TIMEOUT, client.try_send(req)).await;
                    let latency = due.elapsed();
                    let (status, retry_after) = match res {
                        Ok(Ok(reply)) => (
                            reply.status.as_u16(),
                            reply.headers.contains_key(http::header::RETRY_AFTER),
                        ),
                        _ => (0, false),
                    };
                    shared.in_flight.fetch_sub(1, Ordering::AcqRel);
                    let sample = Sample {
                        offset: due.duration_since(start),
                        status,
                        latency,
                    };
                    let mut r = shared.report.lock().unwrap();
                    r.sent += 1;
                    r.record(sample, retry_after);
                });
            }
            i += 1;
        }
        // Reap finished tasks so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut report = std::mem::replace(&mut *shared.report.lock().unwrap(), LoadReport::new());
    report.elapsed = start.elapsed();
    report
}

// === Origin ===

/// A minimal origin for load runs on `127.0.0.1:0`: answers `200 ok`, counts what it
/// served, and can cap how many requests it works on at once (the rest wait in line, as a
/// thread pool would) with a fixed service time, so its capacity is `slots / service`.
/// Unlike the harness [`crate::Upstream`] it records nothing per request, so it stays cheap
/// for hundreds of thousands of requests.
#[derive(Clone, Debug)]
pub struct Origin {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters.
    pub stats: Arc<OriginStats>,
}

/// What an [`Origin`] (or any in-test handler) counts.
#[derive(Debug, Default)]
pub struct OriginStats {
    /// Each request's work time, µs.
    service_us: AtomicU64,
    served: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl OriginStats {
    /// Counts one request in flight until the guard drops (also when its future is dropped
    /// because the client went away).
    pub fn enter(self: &Arc<Self>) -> Working {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Working(self.clone())
    }

    /// Requests answered.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// Changes each request's work time from now on.
    pub fn set_service(&self, service: Duration) {
        self.service_us.store(
            u64::try_from(service.as_micros()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    /// Each request's work time.
    pub fn service(&self) -> Duration {
        Duration::from_micros(self.service_us.load(Ordering::SeqCst))
    }

    /// Requests being worked on now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests worked on at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

/// One request in flight at an [`OriginStats`]; dropping it ends the request.
#[derive(Debug)]
pub struct Working(Arc<OriginStats>);

impl Drop for Working {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Origin {
    /// Starts an origin on the current runtime. `slots`: requests worked on at once (0: no
    /// cap); `service`: each request's work time (zero: answer at once; see
    /// [`OriginStats::set_service`] to change it later).
    pub async fn start(slots: usize, service: Duration) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("addr");
        let stats = Arc::new(OriginStats::default());
        stats.set_service(service);
        let sem = (slots > 0).then(|| Arc::new(tokio::sync::Semaphore::new(slots)));
        let st = stats.clone();
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                let sem = sem.clone();
                let builder = builder.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let st = st.clone();
                        let sem = sem.clone();
                        async move {
                            let _permit = match &sem {
                                Some(s) => Some(s.clone().acquire_owned().await.expect("open")),
                                None => None,
                            };
                            let working = st.enter();
                            let service = st.service();
                            if !service.is_zero() {
                                tokio::time::sleep(service).await;
                            }
                            drop(working);
                            st.served.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(Response::new(full(Bytes::from_static(b"ok"))))
                        }
                    });
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Origin { addr, stats }
    }

    /// Requests answered.
    pub fn served(&self) -> u64 {
        self.stats.served()
    }

    /// The most requests worked on at once.
    pub fn max_in_flight(&self) -> usize {
        self.stats.max_in_flight()
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counts_statuses_quantiles_and_missing_retry_after() {
        let mut r = LoadReport::new();
        for i in 0..100u64 {
            r.sent += 1;
            let status = if i < 90 { 200 } else { 429 };
            r.record(
                Sample {
                    offset: Duration::from_millis(i),
                    status,
                    latency: Duration::from_millis(i + 1),
                },
                i != 99,
            );
        }
        r.sent += 1;
        r.record(
            Sample {
                offset: Duration::from_millis(100),
                status: 0,
                latency: Duration::from_secs(1),
            },
            false,
        );
        assert_eq!(r.count(200), 90);
        assert_eq!(r.count(429), 10);
        assert_eq!(r.errors, 1);
        assert_eq!(r.responses(), 100);
        assert_eq!(r.rejections_without_retry_after, 1);
        assert!((r.success_ratio() - 90.0 / 101.0).abs() < 1e-9);
        let p50 = r.p50().as_micros();
        assert!((49_900..=50_100).contains(&p50), "{p50}");
        let p99_429 = r.p99_of(429).as_micros();
        assert!((99_900..=100_100).contains(&p99_429), "{p99_429}");
        assert_eq!(r.p99_of(500), Duration::ZERO);
        let w = r.window(Duration::ZERO, Duration::from_millis(10));
        assert_eq!(w.get(&200), Some(&10));
    }

    #[test]
    fn spec_total_is_rate_times_duration() {
        let s = LoadSpec::get("http://127.0.0.1:1/", 250, Duration::from_millis(1500));
        assert_eq!(s.total(), 375);
        assert_eq!(s.max_in_flight, 256);
        let s = s.from_ip("127.0.0.7").max_in_flight(3);
        assert_eq!(s.source, Some("127.0.0.7".parse().unwrap()));
        assert_eq!(s.max_in_flight, 3);
    }
}
