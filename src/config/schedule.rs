//! When things run: a `schedule` or `full_fetch` is an interval (`"15m"`) or a 6-field
//! cron expression, seconds first (`"0 0 2 * * *"`), read in the configured `timezone`
//! (default UTC). Cron expressions are parsed by `croner`, the parser of
//! `tokio-cron-scheduler`, which fires them in the daemon; the checks here look ahead at
//! the occurrences the scheduler will produce.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// A schedule: every `Interval`, or at each occurrence of a cron expression.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// Every so long (with jitter in the daemon).
    Interval(Duration),
    /// At each occurrence of a cron expression in a time zone.
    Cron(Box<CronSchedule>),
}

/// A parsed cron expression and the time zone it is read in.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    /// The expression as written.
    pub expr: String,
    /// The time zone its hours and days are in.
    pub timezone: chrono_tz::Tz,
    cron: croner::Cron,
    /// The longest time between two occurrences, looked ahead over a year.
    longest_gap: Duration,
}

impl CronSchedule {
    /// The first occurrence strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.timezone), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }
}

impl Schedule {
    /// The longest time between two runs: what "overdue" is measured against.
    pub fn longest_gap(&self) -> Duration {
        match self {
            Schedule::Interval(d) => *d,
            Schedule::Cron(c) => c.longest_gap,
        }
    }

    /// Whether a run is due, the last one having been at `last`: an interval has passed,
    /// or a cron occurrence lies between `last` and `now`.
    pub fn due(&self, last: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        match self {
            Schedule::Interval(d) => chrono::Duration::from_std(*d).is_ok_and(|d| last + d <= now),
            Schedule::Cron(c) => c.next_after(last).is_some_and(|next| next <= now),
        }
    }

    /// The schedule as written.
    pub fn to_config_text(&self) -> String {
        match self {
            Schedule::Interval(d) => humantime::format_duration(*d).to_string(),
            Schedule::Cron(c) => c.expr.clone(),
        }
    }
}

/// Parses a time zone name (`"UTC"`, `"Europe/Berlin"`).
pub fn parse_timezone(text: &str) -> Result<chrono_tz::Tz, String> {
    text.trim().parse::<chrono_tz::Tz>().map_err(|_| {
        format!(
            "{text:?} is not a time zone; write an IANA name such as \"UTC\" or \"Europe/Berlin\""
        )
    })
}

/// Parses an interval or a 6-field cron expression and checks how often it fires: never
/// more often than every `min_gap`, and (when `max_gap` is given) never leaving more than
/// `max_gap` between two runs.
pub fn parse_schedule(
    text: &str,
    timezone: chrono_tz::Tz,
    min_gap: Duration,
    max_gap: Option<Duration>,
) -> Result<Schedule, String> {
    let t = text.trim();
    let fields = t.split_whitespace().count();
    if fields <= 1 {
        let d = humantime::parse_duration(t).map_err(|e| {
            format!("{t:?} is neither a duration ({e}; e.g. \"15m\") nor a 6-field cron expression (e.g. \"0 0 2 * * *\")")
        })?;
        if d < min_gap || max_gap.is_some_and(|m| d > m) {
            return Err(format!(
                "{t} is outside {}..={}",
                humantime::format_duration(min_gap),
                max_gap.map_or("any".to_owned(), |m| humantime::format_duration(m)
                    .to_string())
            ));
        }
        return Ok(Schedule::Interval(d));
    }
    if fields != 6 {
        return Err(format!(
            "{t:?} has {fields} fields; a cron schedule has 6, seconds first (\"0 0 2 * * *\" is 02:00 every day)"
        ));
    }
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(t)
        .map_err(|e| format!("{t:?} is not a cron expression: {e}"))?;
    let (shortest, longest) =
        gaps(&cron, timezone).ok_or_else(|| format!("{t:?} never fires within the next year"))?;
    if shortest < min_gap {
        return Err(format!(
            "{t:?} fires every {}; it may fire at most every {}",
            humantime::format_duration(shortest),
            humantime::format_duration(min_gap)
        ));
    }
    if let Some(m) = max_gap {
        if longest > m {
            return Err(format!(
                "{t:?} leaves up to {} between two runs; Apple's sync cursor expires after 7 days, so runs may be at most {} apart",
                humantime::format_duration(Duration::from_secs(longest.as_secs() / 3600 * 3600)),
                humantime::format_duration(m)
            ));
        }
    }
    Ok(Schedule::Cron(Box::new(CronSchedule {
        expr: t.to_owned(),
        timezone,
        cron,
        longest_gap: longest,
    })))
}

/// The shortest and longest gap between occurrences over the coming year (at most
/// 100,000 occurrences, enough to see every weekday pattern of a frequent schedule).
fn gaps(cron: &croner::Cron, tz: chrono_tz::Tz) -> Option<(Duration, Duration)> {
    let start = Utc::now().with_timezone(&tz);
    let horizon = start + chrono::Duration::days(400);
    let mut prev = cron.find_next_occurrence(&start, false).ok()?;
    let (mut shortest, mut longest) = (Duration::MAX, Duration::ZERO);
    for next in cron.clone().iter_after(prev).take(100_000) {
        let gap = (next - prev).to_std().unwrap_or_default();
        shortest = shortest.min(gap);
        longest = longest.max(gap);
        prev = next;
        if prev > horizon {
            break;
        }
    }
    // One occurrence a year or less: the gap is at least the horizon.
    if longest == Duration::ZERO {
        return Some((Duration::MAX, Duration::from_secs(400 * 86_400)));
    }
    // A frequent schedule uses up the occurrences above within days; a gap later in the
    // year (`*/10 * * 1-20 * *` leaves ten days each month) is found by asking, from every
    // hour of the horizon, how long until the next occurrence (exact to within the hour).
    let mut t = start;
    while t < horizon {
        match cron.find_next_occurrence(&t, false) {
            Ok(next) => longest = longest.max((next - t).to_std().unwrap_or_default()),
            Err(_) => return Some((shortest, Duration::from_secs(400 * 86_400))),
        }
        t += chrono::Duration::hours(1);
    }
    Some((shortest, longest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(10);
    const SIX_DAYS: Option<Duration> = Some(Duration::from_secs(6 * 86_400));

    fn parse(t: &str) -> Result<Schedule, String> {
        parse_schedule(t, chrono_tz::UTC, MIN, SIX_DAYS)
    }

    #[test]
    fn intervals_and_cron_expressions_are_both_schedules() {
        assert!(matches!(parse("15m"), Ok(Schedule::Interval(d)) if d == Duration::from_secs(900)));
        match parse("0 0 2 * * *").unwrap() {
            Schedule::Cron(c) => assert_eq!(c.longest_gap, Duration::from_secs(86_400)),
            other => panic!("{other:?}"),
        }
        // Weekdays only: the weekend gap is under six days.
        assert_eq!(
            parse("0 30 9 * * Mon-Fri").unwrap().longest_gap(),
            Duration::from_secs(3 * 86_400)
        );
    }

    #[test]
    fn a_cron_schedule_that_could_let_the_cursor_expire_is_refused() {
        let err = parse("0 0 2 * * Sun").unwrap_err();
        assert!(err.contains("7 days") && err.contains("7days"), "{err}");
        assert!(parse("0 0 0 1 * *").is_err(), "monthly");
        // Frequent on some days, absent on others: the gap beyond the first occurrences
        // is found whatever the day the config is loaded.
        assert!(parse("*/10 * * 1-20 * *")
            .unwrap_err()
            .contains("between two runs"));
        assert!(parse("* * * * * *").unwrap_err().contains("every 1s"));
        assert!(parse("0 0 2 * *").unwrap_err().contains("6, seconds first"));
        assert!(parse("0 0 25 * * *").is_err(), "hour 25");
        assert!(parse("soon").unwrap_err().contains("neither a duration"));
        // A weekly full re-fetch has no upper bound.
        assert!(parse_schedule("0 0 3 * * Sun", chrono_tz::UTC, MIN, None).is_ok());
    }

    #[test]
    fn due_means_an_interval_passed_or_an_occurrence_lies_between() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let weekly = Schedule::Interval(Duration::from_secs(7 * 86_400));
        assert!(!weekly.due(t("2026-11-01T00:00:00Z"), t("2026-11-07T23:59:59Z")));
        assert!(weekly.due(t("2026-11-01T00:00:00Z"), t("2026-11-08T00:00:00Z")));
        // Sundays 03:00 in Berlin (UTC+1 in November): 02:00 UTC.
        let berlin = parse_timezone("Europe/Berlin").unwrap();
        let sundays = parse_schedule("0 0 3 * * Sun", berlin, MIN, None).unwrap();
        let last = t("2026-11-22T02:00:00Z");
        assert!(!sundays.due(last, t("2026-11-29T01:59:59Z")));
        assert!(sundays.due(last, t("2026-11-29T02:00:00Z")));
        assert!(parse_timezone("Mars/Olympus").is_err());
    }
}
