//! Calendar periods: a bandwidth that is a quota per day, week or month (issue #17),
//! counted from the period's start in UTC or in an IANA time zone and reset at the next
//! period's start.
//!
//! A day starts at local midnight (after a DST change the day is 23 or 25 hours long); a
//! week starts on Monday (ISO 8601); a month on its 1st. Zone rules come from `jiff` with
//! its bundled copy of the IANA time zone database, so a policy means the same on every
//! machine whatever `/usr/share/zoneinfo` holds.
//!
//! The request path never calls into `jiff`: [`CompiledPeriod::current`] keeps the period
//! it computed last as one packed `AtomicU64` (start and length in seconds) and answers
//! from it with two integer compares until the period ends. Only the first decision after
//! a period's end (once a day at most) computes the next one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use jiff::civil::Date;
use jiff::tz::TimeZone;

use crate::model::Period;

/// Seconds from the Unix epoch to 2000-01-01T00:00:00Z: the cache's origin, so that a
/// period's start fits 32 bits (until 2136).
const CACHE_EPOCH: i64 = 946_684_800;
const NS: u64 = 1_000_000_000;

/// A compiled calendar period: its unit, its time zone and the cached current period.
#[derive(Debug)]
pub struct CompiledPeriod {
    /// Day, week or month.
    pub unit: Period,
    /// The time zone's name as written (`UTC` when none was).
    pub time_zone: Arc<str>,
    zone: TimeZone,
    /// The last period computed: start (seconds since [`CACHE_EPOCH`]) in the high 32 bits,
    /// length in seconds in the low 32 bits; 0 before the first.
    cache: AtomicU64,
}

impl PartialEq for CompiledPeriod {
    fn eq(&self, other: &Self) -> bool {
        self.unit == other.unit && self.time_zone == other.time_zone
    }
}

impl Eq for CompiledPeriod {}

/// Why a time zone name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown time zone `{0}` (write an IANA name like `Europe/Paris`, or `UTC`)")]
pub struct UnknownTimeZone(pub String);

impl CompiledPeriod {
    /// `unit` in `time_zone` (an IANA name; `None` is UTC).
    pub fn new(unit: Period, time_zone: Option<&str>) -> Result<Self, UnknownTimeZone> {
        let (zone, name) = match time_zone {
            None => (TimeZone::UTC, "UTC"),
            Some(n) => (
                TimeZone::get(n).map_err(|_| UnknownTimeZone(n.to_owned()))?,
                n,
            ),
        };
        Ok(CompiledPeriod {
            unit,
            time_zone: Arc::from(name),
            zone,
            cache: AtomicU64::new(0),
        })
    }

    /// The period holding `unix_ns` (nanoseconds since the Unix epoch) as `[start, end)` in
    /// Unix nanoseconds. Two compares while the cached period holds it.
    #[inline]
    pub fn current(&self, unix_ns: u64) -> (u64, u64) {
        let packed = self.cache.load(Ordering::Relaxed);
        let start = (((packed >> 32) as i64 + CACHE_EPOCH) as u64).saturating_mul(NS);
        let end = start.saturating_add((packed & 0xffff_ffff).saturating_mul(NS));
        if packed != 0 && start <= unix_ns && unix_ns < end {
            return (start, end);
        }
        self.compute(unix_ns)
    }

    #[cold]
    fn compute(&self, unix_ns: u64) -> (u64, u64) {
        let secs = i64::try_from(unix_ns / NS).unwrap_or(i64::MAX);
        let (start, end) = self.bounds(secs);
        let packed = u64::try_from(start - CACHE_EPOCH)
            .ok()
            .filter(|s| *s <= u64::from(u32::MAX))
            .zip(u64::try_from(end - start).ok())
            .map_or(0, |(s, len)| (s << 32) | len.min(u64::from(u32::MAX)));
        self.cache.store(packed, Ordering::Relaxed);
        let ns = |s: i64| u64::try_from(s).unwrap_or(0).saturating_mul(NS);
        (ns(start), ns(end))
    }

    /// The period holding `unix_secs`, as `[start, end)` in Unix seconds.
    pub fn bounds(&self, unix_secs: i64) -> (i64, i64) {
        let fallback = (unix_secs, unix_secs.saturating_add(1));
        let Ok(ts) = jiff::Timestamp::from_second(unix_secs) else {
            return fallback;
        };
        let date = ts.to_zoned(self.zone.clone()).date();
        let first = match self.unit {
            Period::Day => Some(date),
            Period::Week => {
                let back = i64::from(date.weekday().to_monday_zero_offset());
                date.checked_sub(jiff::Span::new().days(back)).ok()
            }
            Period::Month => Some(date.first_of_month()),
        };
        let next = first.and_then(|d| {
            let step = match self.unit {
                Period::Day => jiff::Span::new().days(1),
                Period::Week => jiff::Span::new().days(7),
                Period::Month => jiff::Span::new().months(1),
            };
            d.checked_add(step).ok()
        });
        match (first, next) {
            (Some(a), Some(b)) => match (self.midnight(a), self.midnight(b)) {
                (Some(s), Some(e)) if s <= unix_secs && unix_secs < e => (s, e),
                _ => fallback,
            },
            _ => fallback,
        }
    }

    /// The first instant of `date` in the zone (local midnight, or the first time after it
    /// when a DST change skips midnight).
    fn midnight(&self, date: Date) -> Option<i64> {
        date.to_zoned(self.zone.clone())
            .ok()
            .map(|z| z.timestamp().as_second())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_second()
    }

    fn bounds(unit: Period, zone: Option<&str>, at: &str) -> (i64, i64) {
        CompiledPeriod::new(unit, zone).unwrap().bounds(secs(at))
    }

    #[test]
    fn months_run_from_the_first_to_the_first() {
        assert_eq!(
            bounds(Period::Month, None, "2026-02-14T10:00:00Z"),
            (secs("2026-02-01T00:00:00Z"), secs("2026-03-01T00:00:00Z"))
        );
        // The last second of January is January's; the next is February's.
        assert_eq!(
            bounds(Period::Month, None, "2026-01-31T23:59:59Z").1,
            secs("2026-02-01T00:00:00Z")
        );
        assert_eq!(
            bounds(Period::Month, None, "2026-02-01T00:00:00Z").0,
            secs("2026-02-01T00:00:00Z")
        );
    }

    #[test]
    fn weeks_start_on_monday() {
        // 2026-12-06 is a Sunday: its week began on Monday 2026-11-30.
        assert_eq!(
            bounds(Period::Week, None, "2026-12-06T23:00:00Z"),
            (secs("2026-11-30T00:00:00Z"), secs("2026-12-07T00:00:00Z"))
        );
    }

    #[test]
    fn a_zone_moves_the_start_to_local_midnight_and_dst_days_are_23_or_25_hours() {
        // Paris is UTC+1 in winter: its day starts at 23:00 UTC the day before.
        assert_eq!(
            bounds(Period::Day, Some("Europe/Paris"), "2026-01-15T22:59:59Z"),
            (secs("2026-01-14T23:00:00Z"), secs("2026-01-15T23:00:00Z"))
        );
        // 2026-03-29: clocks go forward in Paris, the day has 23 hours.
        let (s, e) = bounds(Period::Day, Some("Europe/Paris"), "2026-03-29T12:00:00Z");
        assert_eq!((s, e - s), (secs("2026-03-28T23:00:00Z"), 23 * 3600));
        // 2026-10-25: back, 25 hours.
        let (s, e) = bounds(Period::Day, Some("Europe/Paris"), "2026-10-25T12:00:00Z");
        assert_eq!((s, e - s), (secs("2026-10-24T22:00:00Z"), 25 * 3600));
        // A month in Paris starts at 23:00 UTC on the last day of the month before.
        assert_eq!(
            bounds(Period::Month, Some("Europe/Paris"), "2026-01-31T23:30:00Z").0,
            secs("2026-01-31T23:00:00Z")
        );
    }

    #[test]
    fn the_cache_answers_inside_the_period_and_moves_on_at_its_end() {
        let p = CompiledPeriod::new(Period::Day, None).unwrap();
        let ns = |s: &str| secs(s) as u64 * NS;
        let day = (ns("2026-05-01T00:00:00Z"), ns("2026-05-02T00:00:00Z"));
        assert_eq!(p.current(ns("2026-05-01T12:00:00Z")), day);
        assert_eq!(p.current(ns("2026-05-02T00:00:00Z") - 1), day);
        assert_eq!(
            p.current(ns("2026-05-02T00:00:00Z")),
            (ns("2026-05-02T00:00:00Z"), ns("2026-05-03T00:00:00Z"))
        );
        // An earlier time (another engine's clock) is computed, not served from the cache.
        assert_eq!(p.current(ns("2026-05-01T00:00:00Z")), day);
    }

    #[test]
    fn an_unknown_zone_is_refused() {
        assert_eq!(
            CompiledPeriod::new(Period::Day, Some("Europe/Pariss")).unwrap_err(),
            UnknownTimeZone("Europe/Pariss".into())
        );
    }
}
