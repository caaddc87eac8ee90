//! Bandwidth windows (R29): `DAYS HH:MM-HH:MM LIMIT`, e.g. `mon-fri 08:00-18:00 20MiB/s`
//! or `sat,sun 00:00-24:00 pause`.
//!
//! - DAYS are weekdays as in weekly schedules (`mon-fri`, `sat,sun`, wrapping `fri-mon`).
//! - The window covers `[start, end)` on each of those days; `end` must be after `start`
//!   and may be `24:00`. A window does not cross midnight: write `22:00-06:00` as two
//!   windows, `mon-fri 22:00-24:00 ...` and `tue-sat 00:00-06:00 ...`.
//! - LIMIT is a rate (`20MiB/s`, `512K/s`; binary units) or `pause`, the seed's limit
//!   0 (`0` is accepted as a synonym): nothing is transferred, the task stays alive and
//!   its progress holds.
//! - Outside every window the transfer is unlimited. Windows that share a weekday and
//!   whose times intersect are refused, naming both.

use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, Duration, NaiveDateTime, NaiveTime, Timelike};

use super::calendar::{format_minute_of_day, parse_minute_of_day, WeekdaySet, WEEKDAYS_ALLOWED};
use crate::error::{invalid, refused};
use crate::units::{parse_rate, GIB, KIB, MIB};

const GRAMMAR: &str =
    "expected 'DAYS HH:MM-HH:MM RATE|pause', e.g. 'mon-fri 08:00-18:00 20MiB/s' (R29)";

/// The transfer limit inside a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// At most this many bytes per second.
    Rate(u64),
    /// No transfer; the task waits (R29's limit 0).
    Pause,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Rate(bytes) => write!(f, "{}/s", exact_size(*bytes)),
            Limit::Pause => f.write_str("pause"),
        }
    }
}

/// A size in the largest binary unit that divides it exactly, so it parses back.
fn exact_size(bytes: u64) -> String {
    for (mult, name) in [
        (GIB * 1024, "TiB"),
        (GIB, "GiB"),
        (MIB, "MiB"),
        (KIB, "KiB"),
    ] {
        if bytes % mult == 0 {
            return format!("{}{name}", bytes / mult);
        }
    }
    format!("{bytes}B")
}

/// One bandwidth window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub days: WeekdaySet,
    /// Minutes since midnight, 0..=1439.
    pub start: u32,
    /// Minutes since midnight, `start + 1..=1440`.
    pub end: u32,
    pub limit: Limit,
}

impl Window {
    /// Whether `at` falls inside this window.
    fn covers(&self, at: NaiveDateTime) -> bool {
        let second = at.time().num_seconds_from_midnight();
        self.days.contains(at.weekday()) && self.start * 60 <= second && second < self.end * 60
    }
}

impl FromStr for Window {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> anyhow::Result<Window> {
        let bad = |why: &str| invalid("--bandwidth", spec, format!("{why}; {GRAMMAR}"));
        let words: Vec<&str> = spec.split_whitespace().collect();
        let [days, times, limit] = words.as_slice() else {
            return Err(bad("expected three parts"));
        };
        let days = WeekdaySet::parse(days)
            .ok_or_else(|| bad(&format!("days '{days}' not understood, {WEEKDAYS_ALLOWED}")))?;
        let (start, end) = times
            .split_once('-')
            .and_then(|(s, e)| {
                Some((
                    parse_minute_of_day(s, false)?,
                    parse_minute_of_day(e, true)?,
                ))
            })
            .ok_or_else(|| {
                bad(&format!(
                    "times '{times}' not understood, allowed HH:MM-HH:MM from 00:00 to 24:00"
                ))
            })?;
        if end <= start {
            return Err(bad(&format!(
                "times '{times}' end at or before they start; a window may not cross midnight, split it at 24:00"
            )));
        }
        let limit = match limit.to_ascii_lowercase().as_str() {
            "pause" | "0" | "0/s" => Limit::Pause,
            _ => Limit::Rate(parse_rate(limit).ok_or_else(|| {
                bad(&format!("limit '{limit}' not understood, allowed a rate such as 20MiB/s or 512K/s, or 'pause'"))
            })?),
        };
        Ok(Window {
            days,
            start,
            end,
            limit,
        })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}-{} {}",
            self.days,
            format_minute_of_day(self.start),
            format_minute_of_day(self.end),
            self.limit
        )
    }
}

impl serde::Serialize for Window {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Window {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Refuse windows that share a weekday and intersect in time.
pub fn validate_windows(windows: &[Window]) -> anyhow::Result<()> {
    for (i, a) in windows.iter().enumerate() {
        for b in &windows[i + 1..] {
            let shared = a.days.intersection(b.days);
            if !shared.is_empty() && a.start < b.end && b.start < a.end {
                return Err(refused(format!(
                    "bandwidth windows '{a}' and '{b}' overlap on {shared}: one limit per moment (R29)"
                )));
            }
        }
    }
    Ok(())
}

/// The limit in force at `at` (local wall clock); `None` = unlimited.
pub fn limit_at(windows: &[Window], at: NaiveDateTime) -> Option<Limit> {
    windows.iter().find(|w| w.covers(at)).map(|w| w.limit)
}

/// The first instant after `at` at which [`limit_at`] changes; `None` when it never
/// does (no windows, or one limit around the clock).
pub fn next_change(windows: &[Window], at: NaiveDateTime) -> Option<NaiveDateTime> {
    let now = limit_at(windows, at);
    let mut boundaries: Vec<NaiveDateTime> = Vec::new();
    // Windows repeat weekly: a change, if any, comes within eight days.
    for offset in 0..=8 {
        let day = at.date() + Duration::days(offset);
        for window in windows.iter().filter(|w| w.days.contains(day.weekday())) {
            for minute in [window.start, window.end] {
                let midnight = day.and_time(NaiveTime::MIN);
                boundaries.push(midnight + Duration::minutes(i64::from(minute)));
            }
        }
    }
    boundaries.sort_unstable();
    boundaries
        .into_iter()
        .filter(|&b| b > at)
        .find(|&b| limit_at(windows, b) != now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(spec: &str) -> Window {
        spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"))
    }

    fn wall(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M").expect(text)
    }

    #[test]
    fn r29_windows_parse_and_print_canonically() {
        for (input, canonical) in [
            ("mon-fri 08:00-18:00 20MiB/s", "mon-fri 08:00-18:00 20MiB/s"),
            ("sat,sun 00:00-24:00 pause", "sat,sun 00:00-24:00 pause"),
            ("Sun,Sat 0:00-24:00 0", "sat,sun 00:00-24:00 pause"),
            ("mon 8:00-9:30 512K/s", "mon 08:00-09:30 512KiB/s"),
            (
                "fri-mon 01:00-02:00 1536/s",
                "mon,fri-sun 01:00-02:00 1536B/s",
            ),
            ("tue 01:00-02:00 2048K/s", "tue 01:00-02:00 2MiB/s"),
        ] {
            let w = window(input);
            assert_eq!(w.to_string(), canonical, "{input}");
            assert_eq!(window(canonical), w, "{canonical}");
        }
        let w = window("mon-fri 08:00-18:00 20MiB/s");
        assert_eq!(w.limit, Limit::Rate(20 * MIB));
        assert_eq!((w.start, w.end), (8 * 60, 18 * 60));
    }

    #[test]
    fn r29_serde_stores_the_canonical_string() {
        let w = window("sat,sun 00:00-24:00 pause");
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(json, "\"sat,sun 00:00-24:00 pause\"");
        assert_eq!(serde_json::from_str::<Window>(&json).unwrap(), w);
    }

    #[test]
    fn r29_bad_windows_refused_naming_the_value() {
        for (spec, reason) in [
            ("mon-fri 08:00-18:00", "expected three parts"),
            ("monday 08:00-18:00 1M/s", "days 'monday' not understood"),
            ("mon 08:00 1M/s", "times '08:00' not understood"),
            ("mon 24:00-24:00 1M/s", "times '24:00-24:00' not understood"),
            ("mon 08:00-25:00 1M/s", "times '08:00-25:00' not understood"),
            ("mon 18:00-08:00 1M/s", "may not cross midnight"),
            ("mon 08:00-08:00 1M/s", "end at or before they start"),
            ("mon 08:00-18:00 fast", "limit 'fast' not understood"),
            ("mon 08:00-18:00 -1M/s", "limit '-1M/s' not understood"),
        ] {
            let err = spec.parse::<Window>().unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("invalid --bandwidth '{spec}': ")),
                "{msg}"
            );
            assert!(
                msg.contains(reason) && msg.contains("(R29)"),
                "{spec}: {msg}"
            );
            assert_eq!(
                crate::error::exit_code_of(&err),
                crate::error::ExitCode::Usage
            );
        }
    }

    #[test]
    fn r29_overlapping_windows_refused_naming_both() {
        let a = window("mon-fri 08:00-18:00 20MiB/s");
        let b = window("fri,sat 17:00-20:00 pause");
        let msg = validate_windows(&[a, b]).unwrap_err().to_string();
        assert_eq!(
            msg,
            "bandwidth windows 'mon-fri 08:00-18:00 20MiB/s' and 'fri,sat 17:00-20:00 pause' overlap on fri: one limit per moment (R29)"
        );
        // Touching windows and disjoint days are fine.
        let c = window("mon-fri 18:00-24:00 pause");
        let d = window("sat,sun 08:00-18:00 1MiB/s");
        validate_windows(&[a, c, d]).unwrap();
        validate_windows(&[]).unwrap();
    }

    #[test]
    fn r29_limit_at_follows_windows() {
        let windows = [
            window("mon-fri 08:00-18:00 20MiB/s"),
            window("sat,sun 00:00-24:00 pause"),
        ];
        // 2026-05-04 is a Monday.
        assert_eq!(limit_at(&windows, wall("2026-05-04 07:59")), None);
        assert_eq!(
            limit_at(&windows, wall("2026-05-04 08:00")),
            Some(Limit::Rate(20 * MIB))
        );
        assert_eq!(
            limit_at(&windows, wall("2026-05-04 17:59")),
            Some(Limit::Rate(20 * MIB))
        );
        assert_eq!(limit_at(&windows, wall("2026-05-04 18:00")), None);
        assert_eq!(
            limit_at(&windows, wall("2026-05-09 00:00")),
            Some(Limit::Pause)
        );
        assert_eq!(
            limit_at(&windows, wall("2026-05-10 23:59")),
            Some(Limit::Pause)
        );
        assert_eq!(limit_at(&windows, wall("2026-05-11 00:00")), None);
        let last_second = wall("2026-05-04 17:59") + Duration::seconds(59);
        assert_eq!(limit_at(&windows, last_second), Some(Limit::Rate(20 * MIB)));
    }

    #[test]
    fn r29_next_change_finds_window_edges() {
        let windows = [
            window("mon-fri 08:00-18:00 20MiB/s"),
            window("sat,sun 00:00-24:00 pause"),
        ];
        let next = |at: &str| next_change(&windows, wall(at));
        assert_eq!(next("2026-05-04 07:00"), Some(wall("2026-05-04 08:00")));
        assert_eq!(next("2026-05-04 08:00"), Some(wall("2026-05-04 18:00")));
        assert_eq!(next("2026-05-04 18:00"), Some(wall("2026-05-05 08:00")));
        assert_eq!(next("2026-05-08 18:00"), Some(wall("2026-05-09 00:00")));
        // The pause runs through the weekend: Saturday's midnight is no change.
        assert_eq!(next("2026-05-09 00:00"), Some(wall("2026-05-11 00:00")));
        assert_eq!(next("2026-05-11 00:00"), Some(wall("2026-05-11 08:00")));
    }

    #[test]
    fn r29_next_change_none_when_nothing_changes() {
        assert_eq!(next_change(&[], wall("2026-05-04 07:00")), None);
        let always = [window("mon-sun 00:00-24:00 10MiB/s")];
        assert_eq!(next_change(&always, wall("2026-05-04 07:00")), None);
    }

    #[test]
    fn r29_next_change_a_week_ahead() {
        let windows = [window("wed 10:00-11:00 pause")];
        // Wednesday 2026-05-06 at 10:30 inside; at 11:00 outside until next Wednesday.
        assert_eq!(
            next_change(&windows, wall("2026-05-06 11:00")),
            Some(wall("2026-05-13 10:00"))
        );
    }
}
