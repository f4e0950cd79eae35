//! Time for the engine: a monotonic clock in integer nanoseconds, injected.
//!
//! The engine never reads wall time. Production uses [`MonotonicClock`], which reads
//! `std::time::Instant` against an origin taken once when the clock is built (building
//! clocks per request is what made rejections expensive in other limiters). Tests use
//! [`ManualClock`] and move time by hand, so every bucket computation is exact and
//! repeatable. Adapters whose tests run under `tokio::time::pause` can use [`TokioClock`],
//! which follows tokio's (pausable) clock.
//!
//! Cost, measured with the `clock` group of `benches/benches/engine.rs` on the 2-core
//! development VM: 31 ns per [`MonotonicClock::now`] on a quiet machine (55 ns while other
//! builds loaded both cores); `Instant::now()` is a vDSO `clock_gettime(CLOCK_MONOTONIC)`
//! here, no trap to the hypervisor. The engine reads it once per decision and once per
//! completion.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Nanoseconds since a clock's origin.
pub type Nanos = u64;

/// A monotonic time source in nanoseconds since an origin chosen by the clock.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time. Never decreases.
    fn now(&self) -> Nanos;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Nanos {
        (**self).now()
    }
}

/// Converts a [`Duration`] to nanoseconds, saturating at `u64::MAX` (≈ 584 years).
pub fn duration_to_nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

// === impl MonotonicClock ===

/// The production clock: `Instant` since the moment the clock was built.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        MonotonicClock {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Nanos {
        // Offset by one second so that "time zero" never coincides with a fresh bucket's
        // TAT of 0: a fresh key is then plainly full (TAT ≤ now) from the first request on.
        duration_to_nanos(self.origin.elapsed()).saturating_add(1_000_000_000)
    }
}

// === impl ManualClock ===

/// A clock that only moves when told to; for deterministic tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `start` nanoseconds.
    pub fn new(start: Nanos) -> Arc<Self> {
        Arc::new(ManualClock {
            now: AtomicU64::new(start),
        })
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(duration_to_nanos(by), Ordering::SeqCst);
    }

    /// Moves the clock forward by `ns` nanoseconds.
    pub fn advance_ns(&self, ns: Nanos) {
        self.now.fetch_add(ns, Ordering::SeqCst);
    }

    /// Sets the clock to `ns`, which must not be earlier than the current time (the
    /// clock is monotonic; an earlier value is ignored).
    pub fn set(&self, ns: Nanos) {
        self.now.fetch_max(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        self.now.load(Ordering::SeqCst)
    }
}

// === impl TokioClock ===

/// Tokio's clock (`tokio::time::Instant`), which stands still under `tokio::time::pause`
/// and moves with `tokio::time::advance`: lets adapter tests drive the engine and the
/// reject-delay timer with one virtual time.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose origin is tokio's now.
    pub fn new() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Nanos {
        duration_to_nanos(self.origin.elapsed()).saturating_add(1_000_000_000)
    }
}

// === impl WallAnchor ===

/// Where an engine's clock stands in wall time, for calendar periods: Unix nanoseconds
/// are the clock's nanoseconds plus one offset, taken from `SystemTime` once when the
/// engine is built (a decision never reads wall time; a wall-clock step, e.g. by NTP, is
/// not followed). Tests move it with [`Engine::set_wall_time`](crate::Engine::set_wall_time).
#[derive(Debug)]
pub(crate) struct WallAnchor(AtomicU64);

impl WallAnchor {
    /// `clock`'s now is the system's wall time now.
    pub(crate) fn new(clock: &dyn Clock) -> Self {
        let a = WallAnchor(AtomicU64::new(0));
        a.set(clock.now(), SystemTime::now());
        a
    }

    /// The clock reading `now` is the wall time `wall`.
    pub(crate) fn set(&self, now: Nanos, wall: SystemTime) {
        let unix = wall.duration_since(UNIX_EPOCH).map_or(0, duration_to_nanos);
        self.0.store(unix.saturating_sub(now), Ordering::Relaxed);
    }

    /// Unix nanoseconds minus the clock's nanoseconds.
    #[inline]
    pub(crate) fn offset(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A time's UTC calendar date and time of day (proleptic Gregorian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilTime {
    /// Year.
    pub year: i64,
    /// Month, 1–12.
    pub month: u32,
    /// Day of the month, 1–31.
    pub day: u32,
    /// Hour, 0–23.
    pub hour: u32,
    /// Minute, 0–59.
    pub minute: u32,
    /// Second, 0–59.
    pub second: u32,
    /// Millisecond, 0–999.
    pub millis: u32,
}

/// `t` in UTC (a time before 1970 is read as 1970-01-01T00:00:00Z).
pub fn civil_utc(t: SystemTime) -> CivilTime {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = (secs % 86_400) as u32;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    CivilTime {
        year: if month <= 2 { y + 1 } else { y },
        month,
        day,
        hour: rem / 3600,
        minute: (rem % 3600) / 60,
        second: rem % 60,
        millis: d.subsec_millis(),
    }
}

/// Formats a time as RFC 3339 UTC with milliseconds: `2024-05-01T12:00:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let c = civil_utc(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second, c.millis
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // 2024-02-29
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.789Z");
    }

    #[test]
    fn manual_clock_moves_only_forward() {
        let c = ManualClock::new(10);
        c.advance(Duration::from_nanos(5));
        assert_eq!(c.now(), 15);
        c.set(3);
        assert_eq!(c.now(), 15);
        c.set(100);
        assert_eq!(c.now(), 100);
    }

    #[test]
    fn monotonic_clock_never_decreases() {
        let c = MonotonicClock::new();
        let mut last = c.now();
        for _ in 0..1000 {
            let n = c.now();
            assert!(n >= last);
            last = n;
        }
    }
}
