//! Human units of the policy language: rates (`100/s`), durations (`250ms`), sizes (`64KiB`)
//! and CIDRs (`10.0.0.0/8`). Each parses from the string users write and serialises back to
//! the same canonical string, so a policy round-trips.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Serialize, Serializer};

// === Rate ===

/// A rate: `count` events per `period`, written `100/s`, `5/min`, `100000/day`, `3/10s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    count: u64,
    period_ns: u64,
}

impl Rate {
    /// `count` per `period`. Both must be non-zero.
    pub fn new(count: u64, period: Duration) -> Option<Rate> {
        let period_ns = u64::try_from(period.as_nanos()).ok()?;
        (count > 0 && period_ns > 0).then_some(Rate { count, period_ns })
    }

    /// Events per period.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The period.
    pub fn period(&self) -> Duration {
        Duration::from_nanos(self.period_ns)
    }

    /// The period in nanoseconds.
    pub fn period_ns(&self) -> u64 {
        self.period_ns
    }
}

/// Why a unit string did not parse. Lower-case messages, no full stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(pub Cow<'static, str>);

impl FromStr for Rate {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (count, per) = s.split_once('/').ok_or(UnitError(Cow::Borrowed(
            "expected a rate like `100/s`, `5/min` or `100000/day`",
        )))?;
        let count: u64 = count.trim().parse().map_err(|_| {
            UnitError(Cow::Owned(format!(
                "rate count `{}` is not a whole number",
                count.trim()
            )))
        })?;
        if count == 0 {
            return Err(UnitError(Cow::Borrowed("rate must be greater than zero")));
        }
        let per = per.trim();
        // `5/min` is `5/1min`.
        let period = if per.starts_with(|c: char| c.is_ascii_digit()) {
            parse_duration(per)?
        } else {
            parse_duration(&format!("1{per}"))?
        };
        if period.is_zero() {
            return Err(UnitError(Cow::Borrowed(
                "rate period must be greater than zero",
            )));
        }
        Rate::new(count, period).ok_or(UnitError(Cow::Borrowed("rate period is too long")))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = HumanDuration(self.period());
        let text = d.to_string();
        match text.strip_prefix('1') {
            // `1s` → `/s`, but `10s` stays `/10s`.
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_alphabetic()) => {
                write!(f, "{}/{}", self.count, rest)
            }
            _ => write!(f, "{}/{}", self.count, text),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Rate {
    fn schema_name() -> Cow<'static, str> {
        "Rate".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "events per period, e.g. `100/s`, `5/min`, `100000/day`, `3/10s`",
            "pattern": r"^\s*[0-9]+\s*/\s*[0-9]*\s*(ns|us|ms|s|sec|m|min|h|hour|d|day)\s*$"
        })
    }
}

// === HumanDuration ===

/// A duration written with a unit: `250ms`, `5s`, `2min`, `1h`, `1day`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Whole seconds.
    pub const fn from_secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }
}

/// Parses `250ms`, `5s`, `2min`, `1h`, `1d`. A bare number is an error (units are required).
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or(UnitError(Cow::Borrowed(
            "duration needs a unit: ns, us, ms, s, min, h or day",
        )))?;
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(UnitError(Cow::Owned(format!(
            "`{s}` is not a duration (expected e.g. `250ms`, `5s`)"
        ))));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| UnitError(Cow::Owned(format!("`{num}` is too large"))))?;
    let unit_ns: u64 = match unit.trim() {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" | "sec" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" | "hour" => 3_600_000_000_000,
        "d" | "day" => 86_400_000_000_000,
        other => {
            return Err(UnitError(Cow::Owned(format!(
                "unknown time unit `{other}` (use ns, us, ms, s, min, h or day)"
            ))))
        }
    };
    let ns = n
        .checked_mul(unit_ns)
        .ok_or(UnitError(Cow::Borrowed("duration is too large")))?;
    Ok(Duration::from_nanos(ns))
}

impl FromStr for HumanDuration {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(HumanDuration)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = u64::try_from(self.0.as_nanos()).unwrap_or(u64::MAX);
        const UNITS: [(u64, &str); 7] = [
            (86_400_000_000_000, "day"),
            (3_600_000_000_000, "h"),
            (60_000_000_000, "min"),
            (1_000_000_000, "s"),
            (1_000_000, "ms"),
            (1_000, "us"),
            (1, "ns"),
        ];
        for (size, name) in UNITS {
            if ns >= size && ns % size == 0 {
                return write!(f, "{}{}", ns / size, name);
            }
        }
        write!(f, "0s")
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "a duration with a unit, e.g. `250ms`, `5s`, `2min`",
            "pattern": r"^\s*[0-9]+\s*(ns|us|ms|s|sec|m|min|h|hour|d|day)\s*$"
        })
    }
}

// === Timestamp ===

/// A point in time written in RFC 3339 UTC, whole seconds: `2026-12-06T09:30:00Z` (an
/// override's `expires`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    secs: u64,
}

impl Timestamp {
    /// The time `secs` seconds after the Unix epoch.
    pub const fn from_unix_secs(secs: u64) -> Self {
        Timestamp { secs }
    }

    /// `t`, truncated to whole seconds (times before the epoch are the epoch).
    pub fn from_system_time(t: std::time::SystemTime) -> Self {
        let secs = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Timestamp { secs }
    }

    /// Seconds since the Unix epoch.
    pub const fn unix_secs(&self) -> u64 {
        self.secs
    }

    /// As a [`SystemTime`](std::time::SystemTime).
    pub fn to_system_time(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(self.secs)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number since 1970-01-01 (Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl FromStr for Timestamp {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            UnitError(Cow::Owned(format!(
                "`{s}` is not a UTC time like `2026-12-06T09:30:00Z`"
            )))
        };
        let b = s.trim().as_bytes();
        if b.len() != 20
            || b[4] != b'-'
            || b[7] != b'-'
            || !matches!(b[10], b'T' | b't')
            || b[13] != b':'
            || b[16] != b':'
            || !matches!(b[19], b'Z' | b'z')
        {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| -> Result<u32, UnitError> {
            let t = &b[r];
            if t.iter().all(u8::is_ascii_digit) {
                Ok(t.iter().fold(0, |n, c| n * 10 + u32::from(c - b'0')))
            } else {
                Err(bad())
            }
        };
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let days_in = match mo {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return Err(bad()),
        };
        if y < 1970 || d == 0 || d > days_in || h > 23 || mi > 59 || se > 59 {
            return Err(bad());
        }
        let days = days_from_civil(i64::from(y), mo, d);
        let secs = days * 86_400 + i64::from(h * 3600 + mi * 60 + se);
        u64::try_from(secs)
            .map(Timestamp::from_unix_secs)
            .map_err(|_| bad())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = i64::try_from(self.secs / 86_400).unwrap_or(i64::MAX / 2);
        let rem = self.secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Timestamp {
    fn schema_name() -> Cow<'static, str> {
        "Timestamp".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "a UTC time in RFC 3339, whole seconds, e.g. `2026-12-06T09:30:00Z`",
            "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}[Zz]$"
        })
    }
}

// === ByteSize ===

/// A size in bytes: `512`, `64KiB`, `1MiB`, `10kB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            UnitError(Cow::Owned(format!(
                "`{s}` is not a size (expected e.g. `512`, `64KiB`, `1MiB`)"
            )))
        })?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "kB" | "KB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(UnitError(Cow::Owned(format!(
                    "unknown size unit `{other}` (use B, kB, KiB, MB, MiB, GB or GiB)"
                ))))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or(UnitError(Cow::Borrowed("size is too large")))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (size, name) in UNITS {
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{}", self.0 / size, name);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": ["string", "integer"],
            "description": "a size in bytes, e.g. `512`, `64KiB`, `1MiB`"
        })
    }
}

// === Cidr ===

/// An IP network. Host bits must be zero (`10.0.0.1/8` is an error); a bare address is a
/// host route (`/32` or `/128`). IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is stored as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(pub ipnet::IpNet);

impl FromStr for Cidr {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let net = if s.contains('/') {
            let net: ipnet::IpNet = s.parse().map_err(|_| {
                UnitError(Cow::Owned(format!(
                    "`{s}` is not a CIDR (expected e.g. `10.0.0.0/8` or `2001:db8::/32`)"
                )))
            })?;
            if net.trunc() != net {
                return Err(UnitError(Cow::Owned(format!(
                    "`{s}` has host bits set (did you mean `{}`?)",
                    net.trunc()
                ))));
            }
            net
        } else {
            let ip: IpAddr = s.parse().map_err(|_| {
                UnitError(Cow::Owned(format!("`{s}` is not an IP address or CIDR")))
            })?;
            ipnet::IpNet::from(ip)
        };
        Ok(Cidr(canonical(net)))
    }
}

/// Folds `::ffff:0:0/96`-mapped networks to IPv4.
fn canonical(net: ipnet::IpNet) -> ipnet::IpNet {
    if let ipnet::IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return ipnet::IpNet::V4(n);
                }
            }
        }
    }
    net
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Cidr {
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "an IP address or CIDR, e.g. `10.0.0.0/8`, `2001:db8::/32`, `192.0.2.7`"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_seconds_and_round_trip() {
        let t: Timestamp = "2026-12-06T09:30:00Z".parse().unwrap();
        assert_eq!(t.unix_secs(), 1_796_549_400);
        assert_eq!(t.to_string(), "2026-12-06T09:30:00Z");
        let leap: Timestamp = "2024-02-29T23:59:59Z".parse().unwrap();
        assert_eq!(leap.to_string(), "2024-02-29T23:59:59Z");
        assert_eq!(
            Timestamp::from_unix_secs(0).to_string(),
            "1970-01-01T00:00:00Z"
        );
        for secs in [1, 86_399, 86_400, 951_782_400, 4_102_444_800, 3_999_999_999] {
            let t = Timestamp::from_unix_secs(secs);
            assert_eq!(t.to_string().parse::<Timestamp>().unwrap(), t, "{t}");
        }
        for bad in [
            "2026-02-30T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-12-06T24:00:00Z",
            "2026-12-06T09:60:00Z",
            "2026-12-06T09:30:00",
            "2026-12-06T09:30:00+01:00",
            "2026-12-06 09:30:00Z",
            "1969-12-31T23:59:59Z",
            "2026-13-01T00:00:00Z",
            "2026-12-06T09:30:00.5Z",
            "tomorrow",
        ] {
            let e = bad.parse::<Timestamp>().unwrap_err();
            assert!(e.0.contains("UTC time"), "{bad}: {}", e.0);
        }
    }

    #[test]
    fn rates_parse_and_print_canonically() {
        for (text, count, secs, canon) in [
            ("100/s", 100, 1, "100/s"),
            ("5/min", 5, 60, "5/min"),
            ("100000/day", 100000, 86400, "100000/day"),
            ("3/10s", 3, 10, "3/10s"),
            (" 7 / h ", 7, 3600, "7/h"),
        ] {
            let r: Rate = text.parse().unwrap();
            assert_eq!(r.count(), count, "{text}");
            assert_eq!(r.period(), Duration::from_secs(secs), "{text}");
            assert_eq!(r.to_string(), canon);
            assert_eq!(canon.parse::<Rate>().unwrap(), r);
        }
    }

    #[test]
    fn bad_rates_are_errors() {
        for bad in [
            "0/s",
            "-1/s",
            "1/0s",
            "abc",
            "10",
            "10/fortnight",
            "1e30/s",
            "NaN/s",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5").is_err());
        assert_eq!(HumanDuration::from_secs(90).to_string(), "90s");
        assert_eq!("64KiB".parse::<ByteSize>().unwrap(), ByteSize(65536));
        assert_eq!(ByteSize(1 << 20).to_string(), "1MiB");
        assert!("1 parsec".parse::<ByteSize>().is_err());
    }

    #[test]
    fn cidrs_reject_host_bits_and_fold_mapped_v4() {
        assert!("10.0.0.1/8".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::/129".parse::<Cidr>().is_err());
        assert!("256.1.1.1/8".parse::<Cidr>().is_err());
        assert!("1.2.3".parse::<Cidr>().is_err());
        let c: Cidr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(c.to_string(), "192.0.2.7/32");
        let c: Cidr = "2001:db8::/32".parse().unwrap();
        assert_eq!(c.to_string(), "2001:db8::/32");
    }
}
