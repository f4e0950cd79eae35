//! The breaker every Redis call reports to: consecutive failures open it, then a few probes
//! a second go through until one succeeds.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::clock::{Clock, Nanos};

/// Consecutive failed calls that open the breaker.
pub const BREAKER_THRESHOLD: u32 = 10;
/// Calls a second an open breaker lets through as probes.
pub const PROBES_PER_SEC: u64 = 5;

/// A consecutive-failures breaker with rate-limited probes, on an injected clock.
#[derive(Debug)]
pub struct Breaker {
    pub(super) clock: Arc<dyn Clock>,
    threshold: u32,
    probe_every: Nanos,
    failures: AtomicU32,
    open: AtomicBool,
    next_probe: AtomicU64,
    opens: AtomicU64,
}

impl Breaker {
    /// A closed breaker opening after `threshold` consecutive failures and letting
    /// `probes_per_sec` calls a second through while open.
    pub fn new(clock: Arc<dyn Clock>, threshold: u32, probes_per_sec: u64) -> Breaker {
        Breaker {
            clock,
            threshold: threshold.max(1),
            probe_every: 1_000_000_000 / probes_per_sec.max(1),
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            next_probe: AtomicU64::new(0),
            opens: AtomicU64::new(0),
        }
    }

    /// True while open.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// May a call go to Redis now? Always while closed; while open, one probe per
    /// probe interval (the caller that gets `true` must report the outcome).
    pub fn allow(&self) -> bool {
        if !self.is_open() {
            return true;
        }
        let now = self.clock.now();
        let next = self.next_probe.load(Ordering::Acquire);
        now >= next
            && self
                .next_probe
                .compare_exchange(
                    next,
                    now + self.probe_every,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// Reports a successful call; true when this closed the breaker.
    pub fn on_success(&self) -> bool {
        self.failures.store(0, Ordering::Release);
        self.open.swap(false, Ordering::AcqRel)
    }

    /// Reports a failed call; true when this opened the breaker.
    pub fn on_failure(&self) -> bool {
        let n = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if n < self.threshold || self.is_open() {
            return false;
        }
        self.next_probe
            .store(self.clock.now() + self.probe_every, Ordering::Release);
        let opened = !self.open.swap(true, Ordering::AcqRel);
        if opened {
            self.opens.fetch_add(1, Ordering::Relaxed);
        }
        opened
    }

    /// Times it opened.
    pub fn opens(&self) -> u64 {
        self.opens.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::TokioClock;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn breaker_opens_after_threshold_probes_rate_limited_and_closes_on_success() {
        let b = Breaker::new(Arc::new(TokioClock::new()), 20, 5);
        for _ in 0..19 {
            assert!(!b.on_failure());
            assert!(b.allow());
        }
        assert!(b.on_failure(), "the 20th consecutive failure opens it");
        assert!(b.is_open());
        assert_eq!(b.opens(), 1);
        // Open: no call until the probe interval (200 ms) has passed.
        assert!(!b.allow());
        let mut probes = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(1)).await;
            if b.allow() {
                probes += 1;
                assert!(!b.on_failure(), "a failed probe keeps it open, not reopens");
            }
        }
        assert_eq!(probes, 5, "≤ 5 probes in one second");
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(b.allow());
        assert!(b.on_success(), "a successful probe closes it");
        assert!(!b.is_open());
        assert!(b.allow());
        assert!(!b.on_success(), "closing is reported once");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_success_resets_the_consecutive_count() {
        let b = Breaker::new(Arc::new(TokioClock::new()), 3, 5);
        assert!(!b.on_failure());
        assert!(!b.on_failure());
        b.on_success();
        assert!(!b.on_failure());
        assert!(!b.on_failure());
        assert!(b.on_failure());
    }
}
