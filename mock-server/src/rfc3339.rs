//! RFC 3339 UTC timestamps with second precision and a `Z` (`2017-10-16T01:55:30Z`), the only
//! form Apple's device records use (docs/apple-dep-api.md §4.2). Hand-written because generating a million
//! devices formats three million of them and chrono's general formatter is the slow part.

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn push_2(out: &mut String, n: u32) {
    out.push(char::from(b'0' + (n / 10) as u8));
    out.push(char::from(b'0' + (n % 10) as u8));
}

/// Appends `secs` (Unix time) as `YYYY-MM-DDTHH:MM:SSZ`; years are clamped to 0000–9999.
pub(crate) fn push(out: &mut String, secs: i64) {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    let year = year.clamp(0, 9999) as u32;
    push_2(out, year / 100);
    push_2(out, year % 100);
    out.push('-');
    push_2(out, month);
    out.push('-');
    push_2(out, day);
    out.push('T');
    push_2(out, sod / 3600);
    out.push(':');
    push_2(out, sod / 60 % 60);
    out.push(':');
    push_2(out, sod % 60);
    out.push('Z');
}

/// Appends `ms` (Unix milliseconds) as `YYYY-MM-DDTHH:MM:SS.mmmZ`, the form the Apple School
/// and Business Manager API uses.
pub(crate) fn push_millis(out: &mut String, ms: i64) {
    push(out, ms.div_euclid(1000));
    out.pop();
    let frac = ms.rem_euclid(1000) as u32;
    out.push('.');
    out.push(char::from(b'0' + (frac / 100) as u8));
    push_2(out, frac % 100);
    out.push('Z');
}

/// `ms` (Unix milliseconds) as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
#[cfg(test)]
pub(crate) fn format_millis(ms: i64) -> String {
    let mut s = String::with_capacity(24);
    push_millis(&mut s, ms);
    s
}

/// `secs` (Unix time) as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn format(secs: i64) -> String {
    let mut s = String::with_capacity(20);
    push(&mut s, secs);
    s
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, SecondsFormat};

    #[test]
    fn agrees_with_chrono_across_centuries_and_leap_days() {
        let mut t: i64 = -2_208_988_800; // 1900-01-01
        while t < 7_258_118_400 {
            // 2200-01-01
            let expected = DateTime::from_timestamp(t, 0)
                .unwrap()
                .to_rfc3339_opts(SecondsFormat::Secs, true);
            assert_eq!(super::format(t), expected);
            t += 86_400 * 7 + 3_607;
        }
        assert_eq!(super::format(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::format(1_536_427_698), "2018-09-08T17:28:18Z");
        assert_eq!(
            super::format_millis(1_536_427_698_046),
            "2018-09-08T17:28:18.046Z"
        );
        assert_eq!(super::format_millis(-1), "1969-12-31T23:59:59.999Z");
    }
}
