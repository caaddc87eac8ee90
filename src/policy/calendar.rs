//! The day and time-of-day notations shared by schedules and bandwidth windows.
//!
//! - Weekdays: `mon`, `mon-fri`, `sat,sun`, `mon,wed-fri`. Names are the three-letter
//!   English abbreviations, case-insensitive. A range may wrap past Sunday: `fri-mon`
//!   means Friday, Saturday, Sunday and Monday. The canonical form lists days from
//!   Monday to Sunday, runs of three or more as a range (`mon,fri-sun`).
//! - Days of the month: `1`, `1,15`, `last`, `1,15,last` (1..=31; `last` is the last
//!   day of each month).
//! - Times of day: `HH:MM` on a 24-hour clock (`1:30` is read as `01:30`); `24:00` only
//!   where an end of day is meant (a bandwidth window's end).
//!
//! Parsers here return `None` or a short reason; the callers build the one-line error
//! that names their field.

use std::fmt;

use chrono::{NaiveTime, Timelike, Weekday};

const WEEKDAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// What a weekday list may contain, for error messages.
pub const WEEKDAYS_ALLOWED: &str =
    "allowed weekdays mon..sun as a list or range, e.g. 'mon', 'mon-fri', 'sat,sun', 'mon,wed-fri'";

/// A set of weekdays; bit 0 is Monday, bit 6 Sunday.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeekdaySet(u8);

impl WeekdaySet {
    /// Parse a weekday list; `None` when any item is not a weekday or a range of them.
    pub fn parse(text: &str) -> Option<WeekdaySet> {
        let mut bits = 0u8;
        for item in text.split(',') {
            let item = item.trim().to_ascii_lowercase();
            match item.split_once('-') {
                Some((first, last)) => {
                    let (first, last) = (weekday_index(first)?, weekday_index(last)?);
                    let mut day = first;
                    loop {
                        bits |= 1 << day;
                        if day == last {
                            break;
                        }
                        day = (day + 1) % 7;
                    }
                }
                None => bits |= 1 << weekday_index(&item)?,
            }
        }
        Some(WeekdaySet(bits))
    }

    pub fn contains(self, day: Weekday) -> bool {
        self.0 & (1 << day.num_days_from_monday()) != 0
    }

    /// The weekdays both sets hold.
    pub fn intersection(self, other: WeekdaySet) -> WeekdaySet {
        WeekdaySet(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The cron day-of-week field: POSIX numbering, 0 = Sunday, 1 = Monday.
    pub fn cron_field(self) -> String {
        let numbers: Vec<String> = (0..7u32)
            .filter(|&cron_day| {
                let monday_based = (cron_day + 6) % 7;
                self.0 & (1 << monday_based) != 0
            })
            .map(|cron_day| cron_day.to_string())
            .collect();
        numbers.join(",")
    }
}

fn weekday_index(name: &str) -> Option<u8> {
    let name = name.trim();
    WEEKDAY_NAMES
        .iter()
        .position(|&n| n == name)
        .map(|i| i as u8)
}

impl fmt::Display for WeekdaySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let mut day = 0;
        while day < 7 {
            if self.0 & (1 << day) == 0 {
                day += 1;
                continue;
            }
            let start = day;
            while day + 1 < 7 && self.0 & (1 << (day + 1)) != 0 {
                day += 1;
            }
            match day - start {
                0 => parts.push(WEEKDAY_NAMES[start].to_string()),
                1 => parts.push(format!("{},{}", WEEKDAY_NAMES[start], WEEKDAY_NAMES[day])),
                _ => parts.push(format!("{}-{}", WEEKDAY_NAMES[start], WEEKDAY_NAMES[day])),
            }
            day += 1;
        }
        f.write_str(&parts.join(","))
    }
}

/// What a day-of-month list may contain, for error messages.
pub const MONTH_DAYS_ALLOWED: &str =
    "allowed days of the month 1..31 and 'last', comma-separated, e.g. '1', '1,15', 'last'";

/// A set of days of the month (1..=31) and whether the last day is included.
///
/// A day the month does not have (31 in April, 30 in February) does not fire in that
/// month, as in cron; `last` is what to use for "the end of every month".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MonthDays {
    /// Bit `d` set for day `d`; bit 0 is unused.
    days: u32,
    last: bool,
}

impl MonthDays {
    pub fn parse(text: &str) -> Option<MonthDays> {
        let mut set = MonthDays {
            days: 0,
            last: false,
        };
        for item in text.split(',') {
            let item = item.trim().to_ascii_lowercase();
            if item == "last" {
                set.last = true;
                continue;
            }
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let day: u32 = item.parse().ok()?;
            if !(1..=31).contains(&day) {
                return None;
            }
            set.days |= 1 << day;
        }
        Some(set)
    }

    /// The cron day-of-month field; `last` becomes croner's `L`.
    pub fn cron_field(self) -> String {
        let mut parts: Vec<String> = (1..=31u32)
            .filter(|d| self.days & (1 << d) != 0)
            .map(|d| d.to_string())
            .collect();
        if self.last {
            parts.push("L".to_string());
        }
        parts.join(",")
    }
}

impl fmt::Display for MonthDays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = self.cron_field();
        f.write_str(&field.replace('L', "last"))
    }
}

/// Parse `HH:MM` (hour 0..=23, minute 0..=59; one-digit hours accepted).
pub fn parse_time_of_day(text: &str) -> Option<NaiveTime> {
    let (hour, minute) = parse_hh_mm(text)?;
    NaiveTime::from_hms_opt(hour, minute, 0)
}

/// Parse `HH:MM` as minutes since midnight, allowing `24:00` (= 1440) when `allow_end`.
pub fn parse_minute_of_day(text: &str, allow_end: bool) -> Option<u32> {
    let (hour, minute) = parse_hh_mm(text)?;
    if allow_end && hour == 24 && minute == 0 {
        return Some(24 * 60);
    }
    (hour < 24 && minute < 60).then_some(hour * 60 + minute)
}

fn parse_hh_mm(text: &str) -> Option<(u32, u32)> {
    let (hour, minute) = text.trim().split_once(':')?;
    let digits = |s: &str, lengths: &[usize]| {
        lengths.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(hour, &[1, 2]) || !digits(minute, &[2]) {
        return None;
    }
    Some((hour.parse().ok()?, minute.parse().ok()?))
}

/// `HH:MM` for a time of day.
pub fn format_time_of_day(time: NaiveTime) -> String {
    format!("{:02}:{:02}", time.hour(), time.minute())
}

/// `HH:MM` for minutes since midnight (1440 prints as `24:00`).
pub fn format_minute_of_day(minute: u32) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days(text: &str) -> String {
        WeekdaySet::parse(text).expect(text).to_string()
    }

    #[test]
    fn weekday_lists_and_ranges_canonicalise() {
        assert_eq!(days("mon"), "mon");
        assert_eq!(days("mon-fri"), "mon-fri");
        assert_eq!(days("sat,sun"), "sat,sun");
        assert_eq!(days("mon,wed-fri"), "mon,wed-fri");
        assert_eq!(days("Fri,MON,tue"), "mon,tue,fri");
        assert_eq!(days("mon-sun"), "mon-sun");
        assert_eq!(days("sun-sun"), "sun");
    }

    #[test]
    fn weekday_range_may_wrap_past_sunday() {
        let set = WeekdaySet::parse("fri-mon").unwrap();
        assert_eq!(set.to_string(), "mon,fri-sun");
        assert!(set.contains(Weekday::Sat) && set.contains(Weekday::Mon));
        assert!(!set.contains(Weekday::Tue) && !set.contains(Weekday::Thu));
    }

    #[test]
    fn weekday_garbage_rejected() {
        for bad in ["", "monday", "mon-", "mon,,tue", "1", "mon-xyz", "mon fri"] {
            assert_eq!(WeekdaySet::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn weekday_cron_field_is_posix_numbered() {
        assert_eq!(
            WeekdaySet::parse("mon-fri").unwrap().cron_field(),
            "1,2,3,4,5"
        );
        assert_eq!(WeekdaySet::parse("sat,sun").unwrap().cron_field(), "0,6");
        assert_eq!(WeekdaySet::parse("sun").unwrap().cron_field(), "0");
    }

    #[test]
    fn month_days_parse_and_print() {
        let set = MonthDays::parse("15,1,last").unwrap();
        assert_eq!(set.to_string(), "1,15,last");
        assert_eq!(set.cron_field(), "1,15,L");
        assert_eq!(MonthDays::parse("31").unwrap().cron_field(), "31");
        for bad in ["0", "32", "", "1,", "first", "-1", "1-5", "+3"] {
            assert_eq!(MonthDays::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn times_of_day() {
        assert_eq!(parse_time_of_day("1:30"), NaiveTime::from_hms_opt(1, 30, 0));
        assert_eq!(
            format_time_of_day(parse_time_of_day("23:59").unwrap()),
            "23:59"
        );
        for bad in ["24:00", "12:60", "12", "12:5", "123:00", "ab:cd", " :00"] {
            assert_eq!(parse_time_of_day(bad), None, "{bad}");
        }
        assert_eq!(parse_minute_of_day("24:00", true), Some(1440));
        assert_eq!(parse_minute_of_day("24:00", false), None);
        assert_eq!(parse_minute_of_day("24:01", true), None);
        assert_eq!(format_minute_of_day(1440), "24:00");
        assert_eq!(format_minute_of_day(8 * 60 + 5), "08:05");
    }
}
