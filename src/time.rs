//! Timestamps: milliseconds since the Unix epoch, UTC. Every time in an event is one of these, so
//! the disk encoding is a plain integer and the wire encoding is RFC 3339 with milliseconds.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// Milliseconds since 1970-01-01T00:00:00Z.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        Timestamp(Utc::now().timestamp_millis())
    }

    pub fn from_datetime(dt: DateTime<Utc>) -> Self {
        Timestamp(dt.timestamp_millis())
    }

    pub fn to_datetime(self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.0)
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// RFC 3339, UTC, milliseconds, `Z` suffix: `2026-11-21T10:00:00.123Z`.
    pub fn to_rfc3339(self) -> String {
        self.to_datetime()
            .to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    /// Appends the RFC 3339 form (as `to_rfc3339`) without allocating; years 0–9999 take a
    /// fast path, others go through chrono.
    pub fn write_rfc3339(self, out: &mut Vec<u8>) {
        let ms = self.0.rem_euclid(1000);
        let secs = self.0.div_euclid(1000);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        if !(0..=9999).contains(&y) {
            out.extend_from_slice(self.to_rfc3339().as_bytes());
            return;
        }
        let mut buf = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, v: i64, width: usize| {
            let mut v = v;
            for i in (0..width).rev() {
                buf[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, y, 4);
        put(5, m, 2);
        put(8, d, 2);
        put(11, sod / 3600, 2);
        put(14, sod % 3600 / 60, 2);
        put(17, sod % 60, 2);
        put(20, ms, 3);
        out.extend_from_slice(&buf);
    }

    /// Parses any RFC 3339 time (any offset) into UTC milliseconds, rounded down: right for an
    /// upper bound (`until`, `as_of`: an event at .123 is at or before .1235).
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|dt| Timestamp(dt.with_timezone(&Utc).timestamp_millis()))
    }

    /// `parse_rfc3339` rounded up to the next millisecond when the time has finer digits: for a
    /// lower bound (`since`), an event at .123 is before .1235 and must not be included.
    pub fn parse_rfc3339_ceil(s: &str) -> Option<Self> {
        let dt = DateTime::parse_from_rfc3339(s).ok()?;
        let ms = dt.with_timezone(&Utc).timestamp_millis();
        let finer = dt.timestamp_subsec_nanos() % 1_000_000 != 0;
        Some(Timestamp(if finer { ms.checked_add(1)? } else { ms }))
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_rfc3339_equals_chrono() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut samples = vec![
            0i64,
            -1,
            1,
            951_782_400_000,
            253_402_300_799_999,
            -62_135_596_800_000,
        ];
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            samples.push((x % 300_000_000_000_000) as i64 - 62_000_000_000_000);
        }
        for ms in samples {
            let t = Timestamp(ms);
            let mut out = Vec::new();
            t.write_rfc3339(&mut out);
            assert_eq!(String::from_utf8(out).unwrap(), t.to_rfc3339(), "{ms}");
        }
    }

    #[test]
    fn rfc3339_round_trip_with_millis() {
        let t = Timestamp(1_763_719_200_123);
        let s = t.to_rfc3339();
        assert_eq!(s, "2025-11-21T10:00:00.123Z");
        assert_eq!(Timestamp::parse_rfc3339(&s), Some(t));
        assert_eq!(
            Timestamp::parse_rfc3339("2025-11-21T11:00:00.123+01:00"),
            Some(t)
        );
        assert_eq!(Timestamp::parse_rfc3339("yesterday"), None);
        // A lower bound with finer digits than the millisecond rounds up; an exact one does not.
        let at = |s: &str| Timestamp::parse_rfc3339(s).unwrap();
        assert_eq!(
            Timestamp::parse_rfc3339_ceil("2025-11-21T10:00:00.1235Z"),
            Some(at("2025-11-21T10:00:00.124Z"))
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2025-11-21T10:00:00.1235Z"),
            Some(at("2025-11-21T10:00:00.123Z"))
        );
        assert_eq!(
            Timestamp::parse_rfc3339_ceil("2025-11-21T11:00:00.123+01:00"),
            Some(at("2025-11-21T10:00:00.123Z"))
        );
        assert_eq!(Timestamp::parse_rfc3339_ceil("tomorrow"), None);
    }
}
