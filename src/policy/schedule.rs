//! One periodic schedule (R14): `<full|inc|diff> <daily|weekly|monthly|quarterly>
//! [on DAYS] at HH:MM[,HH:MM...]`, compiled to 5-field cron expressions.
//!
//! - `daily` takes no `on`; `weekly`, `monthly` and `quarterly` require it.
//! - weekly DAYS are weekdays (`mon-fri`, `sat,sun`; ranges may wrap, `fri-mon`).
//! - monthly DAYS are days of the month (`1`, `1,15`, `last`). A day the month lacks
//!   (31 in April, 29 in a common February) is skipped that month, as cron does: use
//!   `last` for "the end of every month".
//! - quarterly DAYS are days of the quarter's first month (January, April, July,
//!   October), in the monthly forms.
//!
//! Occurrences come from the `croner` crate (POSIX weekdays: 0 and 7 are Sunday),
//! evaluated on local wall-clock time and then placed in the caller's time zone:
//! - a time inside a spring-forward gap (02:30 in Europe/Berlin on the last Sunday of
//!   March) runs **once, at the first instant after the gap** (03:00 local);
//! - a time in the repeated hour of a fall-back day runs **once, at its first
//!   occurrence** (the summer-time one), never twice.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};
use croner::Cron;

use super::calendar::{
    format_time_of_day, parse_time_of_day, MonthDays, WeekdaySet, MONTH_DAYS_ALLOWED,
    WEEKDAYS_ALLOWED,
};
use crate::error::invalid;
use crate::level::Level;

const GRAMMAR: &str =
    "expected '<full|inc|diff> <daily|weekly|monthly|quarterly> [on DAYS] at HH:MM[,HH:MM...]' (R14)";

/// The period type a schedule repeats on (R14); all schedules of a rule share one (R25).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    Quarterly,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Quarterly => "quarterly",
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// On which days a schedule fires; the variant is the period type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Days {
    Daily,
    Weekly(WeekdaySet),
    Monthly(MonthDays),
    /// Days of January, April, July and October.
    Quarterly(MonthDays),
}

impl Days {
    pub fn period(self) -> Period {
        match self {
            Days::Daily => Period::Daily,
            Days::Weekly(_) => Period::Weekly,
            Days::Monthly(_) => Period::Monthly,
            Days::Quarterly(_) => Period::Quarterly,
        }
    }

    /// The cron `dom month dow` fields.
    fn cron_date_fields(self) -> String {
        match self {
            Days::Daily => "* * *".to_string(),
            Days::Weekly(days) => format!("* * {}", days.cron_field()),
            Days::Monthly(days) => format!("{} * *", days.cron_field()),
            Days::Quarterly(days) => format!("{} 1,4,7,10 *", days.cron_field()),
        }
    }
}

/// One periodic schedule: a level, the days and the times of day it runs at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Schedule {
    pub level: Level,
    pub days: Days,
    /// Sorted, without duplicates, whole minutes.
    pub times: Vec<NaiveTime>,
}

impl Schedule {
    pub fn period(&self) -> Period {
        self.days.period()
    }

    /// The 5-field cron expressions (`min hour dom month dow`) whose union is this
    /// schedule. Times are grouped so that each expression's minute × hour product is
    /// exactly a subset of the times: `01:00,13:00` is one expression, `01:00,13:30` two.
    pub fn cron_exprs(&self) -> Vec<String> {
        // hours per minute, then minutes sharing the same hour set merged.
        let mut hours_by_minute: Vec<(u32, Vec<u32>)> = Vec::new();
        for time in &self.times {
            match hours_by_minute
                .iter_mut()
                .find(|(m, _)| *m == time.minute())
            {
                Some((_, hours)) => hours.push(time.hour()),
                None => hours_by_minute.push((time.minute(), vec![time.hour()])),
            }
        }
        let mut groups: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
        for (minute, mut hours) in hours_by_minute {
            hours.sort_unstable();
            match groups.iter_mut().find(|(h, _)| *h == hours) {
                Some((_, minutes)) => minutes.push(minute),
                None => groups.push((hours, vec![minute])),
            }
        }
        let dates = self.days.cron_date_fields();
        groups
            .into_iter()
            .map(|(hours, mut minutes)| {
                minutes.sort_unstable();
                format!("{} {} {dates}", join(&minutes), join(&hours))
            })
            .collect()
    }

    /// The first run strictly after `after`, in `after`'s time zone; `None` only when
    /// there is none before the year 5000.
    pub fn next_after<Tz: TimeZone>(&self, after: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        self.cron_exprs()
            .iter()
            .filter_map(|expr| next_of_expr(expr, after))
            .min()
    }
}

fn join(numbers: &[u32]) -> String {
    let parts: Vec<String> = numbers.iter().map(u32::to_string).collect();
    parts.join(",")
}

/// Next occurrence of one cron expression strictly after `after`. Croner walks local
/// wall-clock time (evaluated as UTC, which has no DST); the result is then placed in
/// the zone: gap → first instant after the gap, repeated hour → its first occurrence.
fn next_of_expr<Tz: TimeZone>(expr: &str, after: &DateTime<Tz>) -> Option<DateTime<Tz>> {
    let cron = Cron::new(expr)
        .parse()
        .expect("schedule compiles to a valid cron expression");
    let zone = after.timezone();
    let mut from = after.naive_local();
    loop {
        let wall = cron
            .find_next_occurrence(&Utc.from_utc_datetime(&from), false)
            .ok()?
            .naive_utc();
        let instant = place_in_zone(&zone, wall)?;
        if instant > *after {
            return Some(instant);
        }
        // A repeated-hour time whose first occurrence is already past: it ran.
        from = wall;
    }
}

/// A local wall-clock time as an instant of `zone`: the earlier one when the time
/// occurs twice, the first valid instant after the gap when it does not occur.
pub fn place_in_zone<Tz: TimeZone>(zone: &Tz, wall: NaiveDateTime) -> Option<DateTime<Tz>> {
    match zone.from_local_datetime(&wall) {
        LocalResult::Single(at) => Some(at),
        LocalResult::Ambiguous(earlier, _) => Some(earlier),
        LocalResult::None => {
            // Gaps are whole minutes in every real zone; search at most a day.
            let start = wall.with_second(0)?.with_nanosecond(0)?;
            (1..=24 * 60).find_map(|minutes| {
                match zone.from_local_datetime(&(start + Duration::minutes(minutes))) {
                    LocalResult::Single(at) => Some(at),
                    LocalResult::Ambiguous(earlier, _) => Some(earlier),
                    LocalResult::None => None,
                }
            })
        }
    }
}

impl FromStr for Schedule {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> anyhow::Result<Schedule> {
        let bad = |why: &str| invalid("--schedule", spec, format!("{why}; {GRAMMAR}"));
        let lower = spec.trim().to_ascii_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        let [level, period, rest @ ..] = words.as_slice() else {
            return Err(bad("too short"));
        };
        let level: Level = level
            .parse()
            .map_err(|_| bad(&format!("unknown level '{level}'")))?;
        let Some(at_pos) = rest.iter().position(|w| *w == "at") else {
            return Err(bad("missing 'at HH:MM'"));
        };
        let (on_words, time_words) = (&rest[..at_pos], &rest[at_pos + 1..]);
        let days_text = match on_words {
            [] => None,
            ["on", days @ ..] if !days.is_empty() => Some(days.concat()),
            _ => return Err(bad("expected 'on DAYS' or 'at' after the period")),
        };
        let days = match (*period, days_text) {
            ("daily", None) => Days::Daily,
            ("daily", Some(_)) => return Err(bad("daily takes no 'on DAYS'")),
            ("weekly" | "monthly" | "quarterly", None) => {
                return Err(bad(&format!("{period} needs 'on DAYS'")))
            }
            ("weekly", Some(text)) => Days::Weekly(WeekdaySet::parse(&text).ok_or_else(|| {
                bad(&format!(
                    "weekly days '{text}' not understood, {WEEKDAYS_ALLOWED}"
                ))
            })?),
            ("monthly" | "quarterly", Some(text)) => {
                let month_days = MonthDays::parse(&text).ok_or_else(|| {
                    bad(&format!(
                        "{period} days '{text}' not understood, {MONTH_DAYS_ALLOWED}"
                    ))
                })?;
                if *period == "monthly" {
                    Days::Monthly(month_days)
                } else {
                    Days::Quarterly(month_days)
                }
            }
            _ => return Err(bad(&format!("unknown period '{period}'"))),
        };
        let times_text = time_words.concat();
        if times_text.is_empty() {
            return Err(bad("missing times after 'at'"));
        }
        let mut times = Vec::new();
        for item in times_text.split(',') {
            let time = parse_time_of_day(item).ok_or_else(|| {
                bad(&format!(
                    "time '{item}' not understood, allowed HH:MM from 00:00 to 23:59"
                ))
            })?;
            times.push(time);
        }
        times.sort_unstable();
        times.dedup();
        Ok(Schedule { level, days, times })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.level, self.period())?;
        match self.days {
            Days::Daily => {}
            Days::Weekly(days) => write!(f, " on {days}")?,
            Days::Monthly(days) | Days::Quarterly(days) => write!(f, " on {days}")?,
        }
        let times: Vec<String> = self.times.iter().map(|t| format_time_of_day(*t)).collect();
        write!(f, " at {}", times.join(","))
    }
}

impl serde::Serialize for Schedule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;
    use chrono_tz::Europe::Berlin;

    fn schedule(spec: &str) -> Schedule {
        spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"))
    }

    fn wall(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M").expect(text)
    }

    /// The next `n` runs after `start`, as local wall-clock strings.
    fn runs(spec: &str, start: &str, n: usize) -> Vec<String> {
        let s = schedule(spec);
        let mut at = Utc.from_utc_datetime(&wall(start));
        let mut out = Vec::new();
        for _ in 0..n {
            at = s.next_after(&at).expect("a next run");
            out.push(at.format("%Y-%m-%d %a %H:%M").to_string());
        }
        out
    }

    #[test]
    fn r14_canonical_form_round_trips() {
        for (input, canonical) in [
            ("full daily at 01:00", "full daily at 01:00"),
            ("INC Daily at 13:30,1:00", "inc daily at 01:00,13:30"),
            ("incremental daily at 01:00, 01:00", "inc daily at 01:00"),
            (
                "full weekly on sat, sun at 02:00",
                "full weekly on sat,sun at 02:00",
            ),
            (
                "diff weekly on fri-mon at 02:00",
                "diff weekly on mon,fri-sun at 02:00",
            ),
            (
                "full monthly on last,1 at 03:00",
                "full monthly on 1,last at 03:00",
            ),
            (
                "full quarterly on 15 at 04:05",
                "full quarterly on 15 at 04:05",
            ),
        ] {
            let s = schedule(input);
            assert_eq!(s.to_string(), canonical, "{input}");
            assert_eq!(schedule(canonical), s, "{canonical}");
        }
    }

    #[test]
    fn r14_serde_stores_the_canonical_string() {
        let s = schedule("full weekly on mon-fri at 01:00");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"full weekly on mon-fri at 01:00\"");
        assert_eq!(serde_json::from_str::<Schedule>(&json).unwrap(), s);
        assert!(serde_json::from_str::<Schedule>("\"full hourly at 01:00\"").is_err());
    }

    #[test]
    fn r14_bad_specs_refused_with_one_line_naming_the_value() {
        for (spec, reason) in [
            ("full", "too short"),
            ("full daily", "missing 'at HH:MM'"),
            ("weekly full at 01:00", "unknown level 'weekly'"),
            ("full hourly at 01:00", "unknown period 'hourly'"),
            ("full daily on mon at 01:00", "daily takes no 'on DAYS'"),
            ("full weekly at 01:00", "weekly needs 'on DAYS'"),
            ("full monthly at 01:00", "monthly needs 'on DAYS'"),
            ("full quarterly at 01:00", "quarterly needs 'on DAYS'"),
            ("full weekly on at 01:00", "expected 'on DAYS' or 'at'"),
            (
                "full weekly on moon at 01:00",
                "weekly days 'moon' not understood",
            ),
            (
                "full monthly on 32 at 01:00",
                "monthly days '32' not understood",
            ),
            (
                "full monthly on mon at 01:00",
                "monthly days 'mon' not understood",
            ),
            ("full daily at 24:00", "time '24:00' not understood"),
            ("full daily at", "missing times after 'at'"),
            ("full daily at 01:00,", "time '' not understood"),
        ] {
            let err = spec.parse::<Schedule>().unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("invalid --schedule '{spec}': ")),
                "{msg}"
            );
            assert!(msg.contains(reason), "{spec}: {msg}");
            assert!(msg.contains("(R14)") && !msg.contains('\n'), "{msg}");
            assert_eq!(
                crate::error::exit_code_of(&err),
                crate::error::ExitCode::Usage
            );
        }
    }

    #[test]
    fn r14_cron_expressions() {
        let exprs = |spec: &str| schedule(spec).cron_exprs();
        assert_eq!(exprs("full daily at 01:00"), ["0 1 * * *"]);
        assert_eq!(exprs("full daily at 01:00,13:00"), ["0 1,13 * * *"]);
        assert_eq!(
            exprs("full daily at 01:00,13:30"),
            ["0 1 * * *", "30 13 * * *"]
        );
        assert_eq!(exprs("full daily at 01:00,01:30"), ["0,30 1 * * *"]);
        assert_eq!(
            exprs("full daily at 01:00,01:30,13:00"),
            ["0 1,13 * * *", "30 1 * * *"]
        );
        assert_eq!(
            exprs("inc weekly on mon-fri at 02:15"),
            ["15 2 * * 1,2,3,4,5"]
        );
        assert_eq!(exprs("inc weekly on sun at 02:15"), ["15 2 * * 0"]);
        assert_eq!(exprs("full monthly on 1,last at 03:00"), ["0 3 1,L * *"]);
        assert_eq!(exprs("full quarterly on 1 at 03:00"), ["0 3 1 1,4,7,10 *"]);
    }

    #[test]
    fn r14_cron_exprs_cover_exactly_the_times() {
        // Every minute of a day: it matches iff it is one of the listed times.
        let s = schedule("full daily at 01:00,01:30,13:00,13:45,22:45");
        let crons: Vec<Cron> = s
            .cron_exprs()
            .iter()
            .map(|e| Cron::new(e).parse().unwrap())
            .collect();
        let day = NaiveDate::from_ymd_opt(2026, 5, 4).unwrap();
        for minute in 0..24 * 60 {
            let t = NaiveTime::from_hms_opt(minute / 60, minute % 60, 0).unwrap();
            let at = Utc.from_utc_datetime(&day.and_time(t));
            let fires = crons.iter().any(|c| c.is_time_matching(&at).unwrap());
            assert_eq!(fires, s.times.contains(&t), "{t}");
        }
    }

    #[test]
    fn r14_daily_several_times() {
        assert_eq!(
            runs("full daily at 13:30,01:00", "2026-03-10 01:00", 4),
            [
                "2026-03-10 Tue 13:30",
                "2026-03-11 Wed 01:00",
                "2026-03-11 Wed 13:30",
                "2026-03-12 Thu 01:00",
            ]
        );
    }

    #[test]
    fn r14_next_after_is_strictly_after() {
        let s = schedule("full daily at 01:00");
        let at = Utc.from_utc_datetime(&wall("2026-03-10 01:00"));
        assert_eq!(
            s.next_after(&at).unwrap().naive_utc(),
            wall("2026-03-11 01:00")
        );
        let before = at - Duration::seconds(1);
        assert_eq!(s.next_after(&before).unwrap(), at);
    }

    #[test]
    fn r14_weekly_uses_posix_weekdays() {
        // 2026-03-13 is a Friday.
        assert_eq!(
            runs("inc weekly on mon-fri at 02:00", "2026-03-13 03:00", 3),
            [
                "2026-03-16 Mon 02:00",
                "2026-03-17 Tue 02:00",
                "2026-03-18 Wed 02:00"
            ]
        );
        assert_eq!(
            runs(
                "full weekly on sat,sun at 02:00,14:00",
                "2026-03-13 03:00",
                5
            ),
            [
                "2026-03-14 Sat 02:00",
                "2026-03-14 Sat 14:00",
                "2026-03-15 Sun 02:00",
                "2026-03-15 Sun 14:00",
                "2026-03-21 Sat 02:00",
            ]
        );
        assert_eq!(
            runs("full weekly on fri-mon at 02:00", "2026-03-12 03:00", 5),
            [
                "2026-03-13 Fri 02:00",
                "2026-03-14 Sat 02:00",
                "2026-03-15 Sun 02:00",
                "2026-03-16 Mon 02:00",
                "2026-03-20 Fri 02:00",
            ]
        );
    }

    #[test]
    fn r14_monthly_last_follows_month_ends_and_leap_years() {
        assert_eq!(
            runs("full monthly on last at 23:00", "2024-01-15 00:00", 4),
            [
                "2024-01-31 Wed 23:00",
                "2024-02-29 Thu 23:00",
                "2024-03-31 Sun 23:00",
                "2024-04-30 Tue 23:00",
            ]
        );
        assert_eq!(
            runs("full monthly on last at 23:00", "2025-02-01 00:00", 1),
            ["2025-02-28 Fri 23:00"]
        );
    }

    #[test]
    fn r14_monthly_day_31_skips_short_months_like_cron() {
        assert_eq!(
            runs("full monthly on 31 at 01:00", "2026-01-31 02:00", 3),
            [
                "2026-03-31 Tue 01:00",
                "2026-05-31 Sun 01:00",
                "2026-07-31 Fri 01:00"
            ]
        );
    }

    #[test]
    fn r14_monthly_feb_29_only_in_leap_years() {
        assert_eq!(
            runs("full monthly on 29 at 01:00", "2027-01-30 00:00", 2),
            ["2027-03-29 Mon 01:00", "2027-04-29 Thu 01:00"]
        );
        assert_eq!(
            runs("full monthly on 29 at 01:00", "2028-01-30 00:00", 1),
            ["2028-02-29 Tue 01:00"]
        );
    }

    #[test]
    fn r14_monthly_several_days_and_times() {
        assert_eq!(
            runs("diff monthly on 1,15 at 06:00,18:00", "2026-02-14 12:00", 5),
            [
                "2026-02-15 Sun 06:00",
                "2026-02-15 Sun 18:00",
                "2026-03-01 Sun 06:00",
                "2026-03-01 Sun 18:00",
                "2026-03-15 Sun 06:00",
            ]
        );
    }

    #[test]
    fn r14_quarterly_runs_in_the_quarters_first_month() {
        assert_eq!(
            runs("full quarterly on 1,last at 05:00", "2026-02-10 00:00", 5),
            [
                "2026-04-01 Wed 05:00",
                "2026-04-30 Thu 05:00",
                "2026-07-01 Wed 05:00",
                "2026-07-31 Fri 05:00",
                "2026-10-01 Thu 05:00",
            ]
        );
        assert_eq!(
            runs("full quarterly on 31 at 05:00", "2026-01-31 06:00", 3),
            [
                "2026-07-31 Fri 05:00",
                "2026-10-31 Sat 05:00",
                "2027-01-31 Sun 05:00"
            ]
        );
    }

    #[test]
    fn dst_spring_forward_gap_runs_once_after_the_gap() {
        // Europe/Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST.
        let s = schedule("full daily at 02:30");
        let start = Berlin.with_ymd_and_hms(2026, 3, 28, 12, 0, 0).unwrap();
        let first = s.next_after(&start).unwrap();
        assert_eq!(
            first,
            Berlin.with_ymd_and_hms(2026, 3, 29, 3, 0, 0).unwrap()
        );
        let second = s.next_after(&first).unwrap();
        assert_eq!(
            second,
            Berlin.with_ymd_and_hms(2026, 3, 30, 2, 30, 0).unwrap()
        );
    }

    #[test]
    fn dst_fall_back_repeated_hour_runs_once() {
        // Europe/Berlin, 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
        let s = schedule("full daily at 02:30");
        let start = Berlin.with_ymd_and_hms(2026, 10, 24, 12, 0, 0).unwrap();
        let first = s.next_after(&start).unwrap();
        assert_eq!(first.to_rfc3339(), "2026-10-25T02:30:00+02:00");
        let second = s.next_after(&first).unwrap();
        assert_eq!(second.to_rfc3339(), "2026-10-26T02:30:00+01:00");
        // Waking in the second 02:10 (CET), after the first 02:30 has passed: not again.
        let in_second_hour = first + Duration::minutes(40);
        assert_eq!(in_second_hour.to_rfc3339(), "2026-10-25T02:10:00+01:00");
        assert_eq!(s.next_after(&in_second_hour).unwrap(), second);
    }
}
