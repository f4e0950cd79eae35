//! Global load shedding: an in-flight limit (static or adaptive), priority-class
//! thresholds, and reject-delay bookkeeping.
//!
//! A request of class `c` is admitted only while `in_flight < threshold(c) × limit`
//! (defaults: critical 1.0, normal 0.9, borrowed 0.7, sheddable 0.5), so lower classes are
//! shed first and critical traffic keeps the last 10 % to itself. The check increments the
//! global in-flight counter first and undoes it when over, so two racing requests cannot
//! both take the last slot.
//!
//! # Adaptive limits
//! Fed by `Ticket::complete` with each request's latency; deterministic for a given
//! sequence of samples (no clock of its own):
//! - **gradient**: `new = limit × clamp(minRTT / RTT, 0.5, 1) + √limit` (the square root is
//!   the queue allowance), smoothed as `limit ← 0.8·limit + 0.2·new`, clamped to
//!   `[min, max]`. `RTT` is an exponential average of samples (α = 0.1); `minRTT` is the
//!   lowest sample and is re-probed every [`MIN_RTT_PROBE`] samples (reset to the current
//!   average) so a permanently slower backend is not mistaken for overload forever.
//! - **aimd**: a sample over `target_latency` multiplies the limit by 0.9; otherwise each
//!   window of `limit` good samples adds 1.
//!
//! The limiter state sits behind a `Mutex` taken with `try_lock`: a sample that finds it
//! busy is dropped (sampling, not accounting), so completions never wait on each other.
//!
//! # Reject delay
//! A shed rejection may wait about the typical success latency (an exponential average,
//! α = 1/8, of successful completions, status < 500) capped at `reject_delay.max`, so a node
//! that fails fast does not look attractive to least-connections balancers. At most
//! `max_waiting` delayed rejections wait at once; beyond that they answer at once. The
//! waiting count is held by a [`DelayGuard`] inside the rejection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fairgate_policies::model::{AdaptiveAlgorithm, Priority, ShedLimit, Shedding};

use crate::clock::{duration_to_nanos, Nanos};
use crate::decision::DelayGuard;

/// Samples between re-probes of the gradient limiter's minimum RTT.
pub const MIN_RTT_PROBE: u64 = 500;

/// Shedding settings of one policy generation, in the form the hot path wants.
#[derive(Debug, Clone, PartialEq)]
pub struct ShedConfig {
    /// Thresholds by class: critical, normal, borrowed, sheddable.
    pub thresholds: [f64; 4],
    /// Reject delay cap and the most delayed rejections waiting at once.
    pub reject_delay: Option<(Duration, u64)>,
    /// The limit.
    pub limit: ShedLimit,
}

impl ShedConfig {
    /// From the policy model.
    pub fn from_model(s: &Shedding) -> Self {
        let t = &s.thresholds;
        ShedConfig {
            thresholds: [t.critical, t.normal, t.borrowed, t.sheddable],
            reject_delay: s
                .reject_delay
                .as_ref()
                .map(|d| (d.max.0, u64::from(d.max_waiting))),
            limit: s.limit.clone(),
        }
    }

    /// The threshold of class `p`.
    pub fn threshold(&self, p: Priority) -> f64 {
        self.thresholds[class_index(p)]
    }
}

fn class_index(p: Priority) -> usize {
    match p {
        Priority::Critical => 0,
        Priority::Normal => 1,
        Priority::Borrowed => 2,
        Priority::Sheddable => 3,
    }
}

/// In-flight accounting and the (adaptive) limit. One per engine, across reloads.
#[derive(Debug)]
pub struct Shedder {
    in_flight: Padded,
    /// Current limit; 0 = no limit configured.
    limit: AtomicU64,
    adaptive: Mutex<Adaptive>,
    typical_latency: AtomicU64,
    waiting: Arc<AtomicU64>,
}

/// A counter written by every request, alone on its cache lines.
#[repr(align(128))]
#[derive(Debug)]
struct Padded(AtomicU64);

impl std::ops::Deref for Padded {
    type Target = AtomicU64;
    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

#[derive(Debug, Default)]
struct Adaptive {
    algorithm: Option<AdaptiveAlgorithm>,
    min: f64,
    max: f64,
    target_ns: Nanos,
    limit: f64,
    min_rtt: f64,
    rtt: f64,
    samples: u64,
    window: u64,
}

impl Default for Shedder {
    fn default() -> Self {
        Shedder {
            in_flight: Padded(AtomicU64::new(0)),
            limit: AtomicU64::new(0),
            adaptive: Mutex::new(Adaptive::default()),
            typical_latency: AtomicU64::new(0),
            waiting: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Shedder {
    /// Applies a policy's shedding settings. An adaptive limit that stays adaptive keeps
    /// its learned value (clamped to the new bounds).
    pub fn configure(&self, cfg: Option<&ShedConfig>) {
        let mut a = self.adaptive.lock().unwrap_or_else(|e| e.into_inner());
        match cfg.map(|c| &c.limit) {
            None => {
                a.algorithm = None;
                self.limit.store(0, Ordering::Release);
            }
            Some(ShedLimit::Static(n)) => {
                a.algorithm = None;
                self.limit.store(u64::from(*n).max(1), Ordering::Release);
            }
            Some(ShedLimit::Adaptive(ad)) => {
                let (min, max) = (
                    f64::from(ad.min.max(1)),
                    f64::from(ad.max.max(ad.min).max(1)),
                );
                let was_adaptive = a.algorithm.is_some();
                a.algorithm = Some(ad.algorithm);
                a.min = min;
                a.max = max;
                a.target_ns = ad.target_latency.map_or(0, |d| duration_to_nanos(d.0));
                a.limit = if was_adaptive {
                    a.limit.clamp(min, max)
                } else {
                    f64::from(ad.initial.unwrap_or(ad.min)).clamp(min, max)
                };
                self.limit.store(a.limit as u64, Ordering::Release);
            }
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The current limit, if shedding is configured.
    pub fn limit(&self) -> Option<u64> {
        match self.limit.load(Ordering::Acquire) {
            0 => None,
            n => Some(n),
        }
    }

    /// True while utilisation (`in_flight / limit`) is below `fraction`. False without a
    /// limit.
    pub fn below_utilization(&self, fraction: f64) -> bool {
        match self.limit() {
            Some(l) => (self.in_flight() as f64) < fraction * l as f64,
            None => false,
        }
    }

    /// Counts a request in flight if its class fits; `false` (nothing counted) when shed.
    pub fn try_enter(&self, priority: Priority, cfg: Option<&ShedConfig>) -> bool {
        let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if let (Some(cfg), Some(limit)) = (cfg, self.limit()) {
            let allowed = cfg.threshold(priority) * limit as f64;
            if (prev as f64) >= allowed {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                return false;
            }
        }
        true
    }

    /// Ends a request counted by [`Shedder::try_enter`].
    pub fn exit(&self) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Feeds one completed request.
    pub fn on_complete(&self, latency: Duration, status: u16) {
        let ns = duration_to_nanos(latency);
        if status < 500 {
            let old = self.typical_latency.load(Ordering::Relaxed);
            let new = if old == 0 { ns } else { old - old / 8 + ns / 8 };
            self.typical_latency.store(new.max(1), Ordering::Relaxed);
        }
        let Ok(mut a) = self.adaptive.try_lock() else {
            return;
        };
        let Some(algorithm) = a.algorithm else {
            return;
        };
        let sample = ns.max(1) as f64;
        match algorithm {
            AdaptiveAlgorithm::Gradient => {
                a.samples += 1;
                a.rtt = if a.rtt == 0.0 {
                    sample
                } else {
                    0.9 * a.rtt + 0.1 * sample
                };
                if a.min_rtt == 0.0 || sample < a.min_rtt {
                    a.min_rtt = sample;
                }
                if a.samples % MIN_RTT_PROBE == 0 {
                    a.min_rtt = a.rtt;
                }
                let gradient = (a.min_rtt / a.rtt).clamp(0.5, 1.0);
                let new = a.limit * gradient + a.limit.sqrt();
                a.limit = (0.8 * a.limit + 0.2 * new).clamp(a.min, a.max);
            }
            AdaptiveAlgorithm::Aimd => {
                if a.target_ns > 0 && ns > a.target_ns {
                    a.limit = (a.limit * 0.9).clamp(a.min, a.max);
                    a.window = 0;
                } else {
                    a.window += 1;
                    if a.window as f64 >= a.limit.floor() {
                        a.limit = (a.limit + 1.0).clamp(a.min, a.max);
                        a.window = 0;
                    }
                }
            }
        }
        self.limit.store((a.limit as u64).max(1), Ordering::Release);
    }

    /// The typical success latency (0 before any sample).
    pub fn typical_latency(&self) -> Duration {
        Duration::from_nanos(self.typical_latency.load(Ordering::Relaxed))
    }

    /// The delay for a shed rejection under `cfg`, with its guard; `None` when delays
    /// are off, no latency is known yet, or `max_waiting` rejections already wait.
    pub fn reject_delay(&self, cfg: Option<&ShedConfig>) -> Option<(Duration, DelayGuard)> {
        let (max, max_waiting) = cfg?.reject_delay?;
        let typical = self.typical_latency();
        if typical.is_zero() || max.is_zero() {
            return None;
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some((typical.min(max), DelayGuard::new(Arc::clone(&self.waiting))))
    }

    /// Delayed rejections waiting now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fairgate_policies::model::{AdaptiveLimit, ClassThresholds, HumanDuration, RejectDelay};

    fn cfg(limit: ShedLimit) -> ShedConfig {
        ShedConfig::from_model(&Shedding {
            limit,
            thresholds: ClassThresholds::default(),
            reject_delay: Some(RejectDelay {
                max: HumanDuration(Duration::from_millis(50)),
                max_waiting: 2,
            }),
        })
    }

    #[test]
    fn classes_are_shed_in_priority_order() {
        let s = Shedder::default();
        let c = cfg(ShedLimit::Static(10));
        s.configure(Some(&c));
        // Sheddable fits below 5, borrowed below 7, normal below 9, critical below 10.
        let mut admitted = [0u32; 4];
        for (i, p) in [
            Priority::Sheddable,
            Priority::Borrowed,
            Priority::Normal,
            Priority::Critical,
        ]
        .into_iter()
        .enumerate()
        {
            while s.try_enter(p, Some(&c)) {
                admitted[i] += 1;
            }
        }
        assert_eq!(admitted, [5, 2, 2, 1]);
        assert_eq!(s.in_flight(), 10);
        s.exit();
        assert!(!s.try_enter(Priority::Normal, Some(&c)));
        assert!(s.try_enter(Priority::Critical, Some(&c)));
    }

    #[test]
    fn aimd_backs_off_and_grows() {
        let s = Shedder::default();
        let c = cfg(ShedLimit::Adaptive(AdaptiveLimit {
            algorithm: AdaptiveAlgorithm::Aimd,
            min: 2,
            max: 100,
            initial: Some(20),
            target_latency: Some(HumanDuration(Duration::from_millis(100))),
        }));
        s.configure(Some(&c));
        assert_eq!(s.limit(), Some(20));
        s.on_complete(Duration::from_millis(500), 200);
        assert_eq!(s.limit(), Some(18));
        for _ in 0..18 {
            s.on_complete(Duration::from_millis(10), 200);
        }
        assert_eq!(s.limit(), Some(19));
        for _ in 0..100 {
            s.on_complete(Duration::from_secs(1), 200);
        }
        assert_eq!(s.limit(), Some(2), "clamped to min");
    }

    #[test]
    fn gradient_shrinks_under_latency_and_recovers() {
        let s = Shedder::default();
        let c = cfg(ShedLimit::Adaptive(AdaptiveLimit {
            algorithm: AdaptiveAlgorithm::Gradient,
            min: 5,
            max: 200,
            initial: Some(50),
            target_latency: None,
        }));
        s.configure(Some(&c));
        for _ in 0..20 {
            s.on_complete(Duration::from_millis(10), 200);
        }
        let grown = s.limit().unwrap();
        assert!(grown > 50, "steady latency grows the limit: {grown}");
        for _ in 0..50 {
            s.on_complete(Duration::from_millis(100), 200);
        }
        let shrunk = s.limit().unwrap();
        assert!(shrunk < grown, "{shrunk} < {grown}");
        // Same sequence, same result: deterministic.
        let t = Shedder::default();
        t.configure(Some(&c));
        for _ in 0..20 {
            t.on_complete(Duration::from_millis(10), 200);
        }
        for _ in 0..50 {
            t.on_complete(Duration::from_millis(100), 200);
        }
        assert_eq!(t.limit(), Some(shrunk));
    }

    #[test]
    fn reject_delay_follows_success_latency_and_caps_waiters() {
        let s = Shedder::default();
        let c = cfg(ShedLimit::Static(1));
        s.configure(Some(&c));
        assert!(s.reject_delay(Some(&c)).is_none(), "no latency known yet");
        s.on_complete(Duration::from_millis(20), 200);
        let (d1, g1) = s.reject_delay(Some(&c)).unwrap();
        assert_eq!(d1, Duration::from_millis(20));
        s.on_complete(Duration::from_secs(10), 200);
        let (d2, _g2) = s.reject_delay(Some(&c)).unwrap();
        assert_eq!(d2, Duration::from_millis(50), "capped at max");
        assert!(s.reject_delay(Some(&c)).is_none(), "max_waiting = 2");
        drop(g1);
        assert_eq!(s.waiting(), 1);
        assert!(s.reject_delay(Some(&c)).is_some());
    }
}
