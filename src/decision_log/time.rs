//! Record timestamps: RFC 3339 in UTC with microseconds, and back. Written
//! here because the trail needs only this one format.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `2026-11-24T10:31:27.123456Z`.
pub fn format_micros(us: u64) -> String {
    if us > LAST_4_DIGIT_YEAR_US {
        // Five-digit years (an expiry far out, say): not in the fixed buffer.
        let secs = us / 1_000_000;
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, d) = civil_from_days(days as i64);
        return format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
            rem / 3600,
            rem / 60 % 60,
            rem % 60,
            us % 1_000_000
        );
    }
    format_micros_into(us, &mut [0; TIME_LEN]).to_owned()
}

/// Length of a formatted timestamp (years 0000–9999).
pub const TIME_LEN: usize = 27;
/// 9999-12-31T23:59:59.999999Z.
const LAST_4_DIGIT_YEAR_US: u64 = 253_402_300_799_999_999;

/// [`format_micros`] into a caller's buffer: no allocation on the decision
/// path. Times past year 9999 print as its last microsecond.
pub fn format_micros_into(us: u64, buf: &mut [u8; TIME_LEN]) -> &str {
    let us = us.min(LAST_4_DIGIT_YEAR_US);
    let secs = us / 1_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y as u64);
    put(5, 2, u64::from(m));
    put(8, 2, u64::from(d));
    put(11, 2, rem / 3600);
    put(14, 2, rem / 60 % 60);
    put(17, 2, rem % 60);
    put(20, 6, us % 1_000_000);
    for (at, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ] {
        buf[at] = c;
    }
    // Only ASCII digits and separators were written.
    std::str::from_utf8(buf).unwrap_or_default()
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac]Z` (UTC only) into microseconds.
pub fn parse_micros(text: &str) -> Option<u64> {
    let t = text.strip_suffix('Z').or_else(|| text.strip_suffix('z'))?;
    let (date, clock) = t.split_once(['T', 't', ' '])?;
    let mut ymd = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, d) = (ymd.next()?.ok()?, ymd.next()?.ok()?, ymd.next()?.ok()?);
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut parts = hms.splitn(3, ':').map(str::parse::<u64>);
    let (hh, mm, ss) = (
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let micros: u64 = format!("{frac:0<6}").get(..6)?.parse().ok()?;
    let days = u64::try_from(days_from_civil(y, m, d)).ok()?;
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000 + micros)
}

// Proleptic Gregorian calendar conversions (H. Hinnant's algorithms).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_back() {
        assert_eq!(format_micros(0), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29 (a leap day) 12:34:56.789012
        let us = 1_709_210_096_789_012;
        assert_eq!(format_micros(us), "2024-02-29T12:34:56.789012Z");
        assert_eq!(parse_micros("2024-02-29T12:34:56.789012Z"), Some(us));
        assert_eq!(
            parse_micros("2024-02-29T12:34:56Z"),
            Some(us / 1_000_000 * 1_000_000)
        );
        for bad in ["2024-13-01T00:00:00Z", "2024-02-29T12:34:56", "yesterday"] {
            assert_eq!(parse_micros(bad), None, "{bad}");
        }
        let now = now_micros();
        assert_eq!(parse_micros(&format_micros(now)), Some(now));
        // 2000-02-29 (a century leap day), the last microsecond of 2099.
        for us in [1, 999_999, 951_782_400_000_000, 4_102_444_799_999_999] {
            assert_eq!(parse_micros(&format_micros(us)), Some(us), "{us}");
        }
        // Past year 9999: the String form keeps the date, the fixed one saturates.
        let far = LAST_4_DIGIT_YEAR_US + 86_400_000_000;
        assert_eq!(format_micros(far), "10000-01-01T23:59:59.999999Z");
        assert_eq!(
            format_micros_into(far, &mut [0; TIME_LEN]),
            "9999-12-31T23:59:59.999999Z"
        );
    }
}
