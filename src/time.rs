//! Calendar arithmetic for the two places fm writes dates: a message's `sent-at` header and the
//! validity dates of TLS certificates. A date crate would be more than these few lines need;
//! the algorithms are Howard Hinnant's, valid for the whole proleptic Gregorian calendar.

/// Seconds since the Unix epoch, now (0 for a clock before 1970).
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Days since 1970-01-01 of a date.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month, day) of a day count since 1970-01-01: the inverse of
/// [`days_from_civil`].
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `unix` as (date, hours, minutes, seconds) in UTC.
fn parts(unix: i64) -> ((i64, i64, i64), i64, i64, i64) {
    let secs = unix.rem_euclid(86_400);
    (
        civil_from_days(unix.div_euclid(86_400)),
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
    )
}

/// ISO-8601 in UTC with a `+00:00` offset, as fedora-messaging writes `sent-at`:
/// `2019-07-30T19:12:22+00:00`.
pub fn iso8601(unix: i64) -> String {
    let ((y, m, d), hh, mm, ss) = parts(unix);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}+00:00")
}

/// For people: `2020-01-02 00:00:00 UTC`.
pub fn human(unix: i64) -> String {
    let ((y, m, d), hh, mm, ss) = parts(unix);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_and_format_both_ways() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2020, 1, 2) * 86_400, 1_577_923_200);
        for days in [
            -800_000, -719_468, -1, 0, 59, 11_016, 11_017, 18_263, 20_605, 2_000_000,
        ] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(iso8601(0), "1970-01-01T00:00:00+00:00");
        assert_eq!(iso8601(1_542_535_901), "2018-11-18T10:11:41+00:00");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00+00:00");
        assert_eq!(human(1_577_923_200), "2020-01-02 00:00:00 UTC");
        assert_eq!(human(-1), "1969-12-31 23:59:59 UTC");
    }
}
