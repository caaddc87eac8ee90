//! Retention as a pure plan (R15, R17-R21; PBS's `prune.rs` is the model):
//! a VM's points + the rule's retention + now → keep or remove for each point,
//! with the reason in words. Nothing here reads a clock or touches storage.
//!
//! - A point belongs to the local-time period that holds its start (its id).
//!   Retention N keeps every point of the current period and of the N calendar
//!   periods before it: days; weeks Monday to Sunday (R20); months; quarters.
//!   So 0 days keeps today, 1 day today and yesterday (R19).
//! - Never removed: the VM's newest point, its newest full (R21: the full
//!   today's incremental depends on), and points a running restore or recovery
//!   reads (`protected`).
//! - Everything else outside retention goes, incrementals a kept point names as
//!   its `base` included: every point has its own complete index, so a kept
//!   incremental keeps every chunk it needs, and removing yesterday's
//!   incremental "merges" it into today's by construction (R16, R21).
//! - Damaged points (unreadable manifest or index) follow retention by their id.
//! - Without retention (keep all) or for a one-time rule, everything is kept.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone};
use serde::Serialize;

use crate::level::Level;
use crate::policy::{Period, Policy};
use crate::repo::{parse_point_id, PointList};

/// What retention a rule's points have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Keep everything: the rule has no retention (`--retention all`).
    KeepAll,
    /// A one-time rule: its points are kept until forgotten.
    OneTime,
    /// Keep the current period and `count` periods before it (R15).
    Periods { period: Period, count: u32 },
}

impl Retention {
    /// The retention of a rule's offsite copy (`rule edit --copy-retention`):
    /// `count` periods of the rule's schedules; `None` keeps every copied point,
    /// and so does a one-time rule's copy.
    pub fn of_copy(policy: &Policy, count: Option<u32>) -> Retention {
        match (policy, policy.period(), count) {
            (Policy::Once { .. }, _, _) => Retention::OneTime,
            (_, Some(period), Some(count)) => Retention::Periods { period, count },
            _ => Retention::KeepAll,
        }
    }

    /// The retention a rule's policy gives.
    pub fn of(policy: &Policy) -> Retention {
        match (policy, policy.period()) {
            (Policy::Once { .. }, _) => Retention::OneTime,
            (
                Policy::Periodic {
                    retention: Some(count),
                    ..
                },
                Some(period),
            ) => Retention::Periods {
                period,
                count: *count,
            },
            _ => Retention::KeepAll,
        }
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Retention::KeepAll => f.write_str("keep all"),
            Retention::OneTime => f.write_str("one-time rule: keep until forgotten"),
            Retention::Periods { period, count } => {
                let unit = match period {
                    Period::Daily => "day",
                    Period::Weekly => "week",
                    Period::Monthly => "month",
                    Period::Quarterly => "quarter",
                };
                let s = if *count == 1 { "" } else { "s" };
                write!(f, "retention {count} {unit}{s}")
            }
        }
    }
}

/// Keep or remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Keep,
    Remove,
}

/// The plan for one point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mark {
    pub point: String,
    /// `None` for a damaged point (its manifest cannot be read).
    pub level: Option<Level>,
    pub action: Action,
    /// Why, in words: "newest full, base of the next incremental",
    /// "2026-11-30 is outside retention 0 days".
    pub reason: String,
}

/// Plan a VM's points (`list`, good and damaged) under `retention` at `now`
/// (its time zone is the one periods are counted in). `protected` maps a point
/// id to why it must stay (a running restore reads it). Marks come oldest first.
pub fn plan<Tz: TimeZone>(
    list: &PointList,
    retention: Retention,
    now: &DateTime<Tz>,
    protected: &BTreeMap<String, String>,
) -> Vec<Mark> {
    let (newest, newest_full) = crate::backup::chain_heads(&list.points);
    let newest = newest.map(|m| m.point.as_str());
    let newest_full = newest_full.map(|m| m.point.as_str());
    let today = now.date_naive();
    let mut marks: Vec<Mark> = list
        .points
        .iter()
        .map(|m| (m.point.as_str(), Some(m.level), None))
        .chain(
            list.damaged
                .iter()
                .map(|d| (d.point.as_str(), None, Some(d.reason.as_str()))),
        )
        .map(|(point, level, damage)| {
            let mut keep: Vec<String> = Vec::new();
            if let Some(why) = protected.get(point) {
                keep.push(why.clone());
            }
            if Some(point) == newest {
                keep.push("newest point".into());
            }
            if Some(point) == newest_full {
                keep.push("newest full, base of the next incremental (R21)".into());
            }
            let window = in_window(point, retention, &today, &now.timezone());
            let (action, reason) = match window {
                Window::Inside(why) => {
                    keep.push(why);
                    (Action::Keep, keep.join("; "))
                }
                Window::Outside(_) if !keep.is_empty() => (Action::Keep, keep.join("; ")),
                Window::Outside(why) => (Action::Remove, why),
            };
            let reason = match damage {
                Some(d) => format!("damaged ({d}); {reason}"),
                None => reason,
            };
            Mark {
                point: point.to_string(),
                level,
                action,
                reason,
            }
        })
        .collect();
    marks.sort_by(|a, b| a.point.cmp(&b.point));
    marks
}

enum Window {
    Inside(String),
    Outside(String),
}

/// Whether `point` lies in the retention window ending at `today` (in `tz`).
fn in_window<Tz: TimeZone>(
    point: &str,
    retention: Retention,
    today: &NaiveDate,
    tz: &Tz,
) -> Window {
    let (period, count) = match retention {
        Retention::KeepAll => return Window::Inside("retention keeps all points".into()),
        Retention::OneTime => {
            return Window::Inside("one-time rule: points are kept until forgotten".into())
        }
        Retention::Periods { period, count } => (period, count),
    };
    let Ok(start) = parse_point_id(point) else {
        // Not reachable for listed points; keeping is the safe answer.
        return Window::Inside("point id is not a time".into());
    };
    let day = start.with_timezone(tz).date_naive();
    let (now_i, i) = (index(today, period), index(&day, period));
    let name = describe(&day, period);
    if i >= now_i - i64::from(count) {
        let when = match now_i - i {
            0 => " (the current one)".to_string(),
            d if d < 0 => " (after now: is the clock behind?)".to_string(),
            _ => String::new(),
        };
        Window::Inside(format!("{name} is within {retention}{when}"))
    } else {
        Window::Outside(format!("{name} is outside {retention}"))
    }
}

/// Consecutive numbers for consecutive calendar periods.
fn index(day: &NaiveDate, period: Period) -> i64 {
    let days = i64::from(day.num_days_from_ce());
    match period {
        Period::Daily => days,
        // Weeks run Monday to Sunday (R20): number them by their Monday.
        Period::Weekly => (days - i64::from(day.weekday().num_days_from_monday())).div_euclid(7),
        Period::Monthly => i64::from(day.year()) * 12 + i64::from(day.month0()),
        Period::Quarterly => i64::from(day.year()) * 4 + i64::from(day.month0() / 3),
    }
}

/// A period for people: `2026-11-30`, `the week of Mon 2026-11-30`, `2026-11`, `2026-Q4`.
fn describe(day: &NaiveDate, period: Period) -> String {
    match period {
        Period::Daily => day.format("%Y-%m-%d").to_string(),
        Period::Weekly => {
            let monday = *day - chrono::Days::new(u64::from(day.weekday().num_days_from_monday()));
            format!("the week of Mon {}", monday.format("%Y-%m-%d"))
        }
        Period::Monthly => day.format("%Y-%m").to_string(),
        Period::Quarterly => format!("{}-Q{}", day.year(), day.month0() / 3 + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{DamagedPoint, Manifest};
    use chrono::Utc;

    /// A point at UTC `id` (the tests run their clock in UTC).
    fn point(id: &str, level: Level, base: Option<&str>, full: Option<&str>) -> Manifest {
        let mut m = crate::repo::sample_manifest("lab", "web01", id);
        m.level = level;
        m.base = base.map(String::from);
        m.full = full.map(String::from);
        m
    }

    fn at(text: &str) -> DateTime<Utc> {
        parse_point_id(text).unwrap()
    }

    fn days(n: u32) -> Retention {
        Retention::Periods {
            period: Period::Daily,
            count: n,
        }
    }

    fn kept(marks: &[Mark]) -> Vec<&str> {
        marks
            .iter()
            .filter(|m| m.action == Action::Keep)
            .map(|m| m.point.as_str())
            .collect()
    }

    fn list(points: Vec<Manifest>) -> PointList {
        PointList {
            points,
            damaged: Vec::new(),
        }
    }

    const F1: &str = "20261130T010000Z";
    const I1: &str = "20261130T130000Z";
    const I2: &str = "20261201T010000Z";

    /// R21: retention 0 days, full + incremental. After day 2's incremental,
    /// day 1's incremental goes, the full it depends on stays.
    #[test]
    fn r21_day_two_incremental_keeps_the_full_and_drops_day_one_incrementals() {
        let pts = list(vec![
            point(F1, Level::Full, None, None),
            point(I1, Level::Inc, Some(F1), Some(F1)),
            point(I2, Level::Inc, Some(I1), Some(F1)),
        ]);
        let marks = plan(&pts, days(0), &at("20261201T020000Z"), &BTreeMap::new());
        assert_eq!(kept(&marks), [F1, I2]);
        assert_eq!(
            marks[0].reason,
            "newest full, base of the next incremental (R21)"
        );
        assert_eq!(marks[1].action, Action::Remove);
        assert_eq!(
            marks[1].reason, "2026-11-30 is outside retention 0 days",
            "the base of a kept incremental goes (R16: it restores on its own)"
        );
        assert_eq!(
            marks[2].reason,
            "newest point; 2026-12-01 is within retention 0 days (the current one)"
        );
    }

    /// R19: 0 days keeps today only, 1 day keeps today and yesterday.
    #[test]
    fn r19_zero_days_keeps_today_one_day_keeps_yesterday_too() {
        let pts = list(vec![
            point("20261129T010000Z", Level::Full, None, None),
            point("20261129T230000Z", Level::Full, None, None),
            point("20261130T000000Z", Level::Full, None, None),
            point("20261130T235959Z", Level::Full, None, None),
            point("20261201T000000Z", Level::Full, None, None),
        ]);
        let now = at("20261201T120000Z");
        let zero = plan(&pts, days(0), &now, &BTreeMap::new());
        assert_eq!(kept(&zero), ["20261201T000000Z"]);
        let one = plan(&pts, days(1), &now, &BTreeMap::new());
        assert_eq!(
            kept(&one),
            ["20261130T000000Z", "20261130T235959Z", "20261201T000000Z"]
        );
    }

    /// R20: weeks run Monday to Sunday. 2026-11-30 is a Monday.
    #[test]
    fn r20_zero_weeks_keeps_this_week_from_monday() {
        let weeks = |n| Retention::Periods {
            period: Period::Weekly,
            count: n,
        };
        let pts = list(vec![
            point("20261122T120000Z", Level::Full, None, None), // Sunday, week before last
            point("20261129T235959Z", Level::Full, None, None), // Sunday: last week
            point("20261130T000000Z", Level::Full, None, None), // Monday: this week
            point("20261203T000000Z", Level::Full, None, None), // Thursday
        ]);
        let sunday_night = at("20261206T235959Z");
        let marks = plan(&pts, weeks(0), &sunday_night, &BTreeMap::new());
        assert_eq!(kept(&marks), ["20261130T000000Z", "20261203T000000Z"]);
        assert_eq!(
            marks[1].reason,
            "the week of Mon 2026-11-23 is outside retention 0 weeks"
        );
        let marks = plan(&pts, weeks(1), &sunday_night, &BTreeMap::new());
        assert_eq!(kept(&marks).len(), 3);
        // Monday: a new week starts, the previous one is out of 0 weeks.
        let monday = at("20261207T000000Z");
        let marks = plan(&pts, weeks(0), &monday, &BTreeMap::new());
        assert_eq!(kept(&marks), ["20261203T000000Z"], "the newest point stays");
    }

    #[test]
    fn months_and_quarters_turn_at_their_edges() {
        let months = |n| Retention::Periods {
            period: Period::Monthly,
            count: n,
        };
        let quarters = |n| Retention::Periods {
            period: Period::Quarterly,
            count: n,
        };
        let pts = list(vec![
            point("20260630T235959Z", Level::Full, None, None),
            point("20260701T000000Z", Level::Full, None, None),
            point("20260930T235959Z", Level::Full, None, None),
            point("20261001T000000Z", Level::Full, None, None),
            point("20261231T235959Z", Level::Full, None, None),
        ]);
        let new_year = at("20270101T000000Z");
        let marks = plan(&pts, months(0), &new_year, &BTreeMap::new());
        assert_eq!(kept(&marks), ["20261231T235959Z"]);
        let marks = plan(&pts, months(3), &new_year, &BTreeMap::new());
        assert_eq!(kept(&marks), ["20261001T000000Z", "20261231T235959Z"]);
        let marks = plan(&pts, quarters(1), &new_year, &BTreeMap::new());
        assert_eq!(kept(&marks), ["20261001T000000Z", "20261231T235959Z"]);
        assert_eq!(marks[2].reason, "2026-Q3 is outside retention 1 quarter");
        let marks = plan(&pts, quarters(2), &new_year, &BTreeMap::new());
        assert_eq!(
            kept(&marks),
            [
                "20260701T000000Z",
                "20260930T235959Z",
                "20261001T000000Z",
                "20261231T235959Z"
            ]
        );
    }

    /// Periods are the local calendar's: a point just after midnight local
    /// time is "today" even when UTC still says yesterday.
    #[test]
    fn periods_are_counted_in_local_time() {
        let tz: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
        // 23:30 UTC on Nov 30 is 00:30 on Dec 1 in Berlin.
        let pts = list(vec![
            point("20261130T223000Z", Level::Full, None, None),
            point("20261130T233000Z", Level::Full, None, None),
        ]);
        let now = at("20261201T100000Z").with_timezone(&tz);
        let marks = plan(&pts, days(0), &now, &BTreeMap::new());
        assert_eq!(kept(&marks), ["20261130T233000Z"]);
        assert_eq!(marks[0].reason, "2026-11-30 is outside retention 0 days");
    }

    #[test]
    fn protected_damaged_and_keep_all_points() {
        let mut pts = list(vec![
            point(F1, Level::Full, None, None),
            point(I1, Level::Inc, Some(F1), Some(F1)),
            point(I2, Level::Inc, Some(I1), Some(F1)),
        ]);
        pts.damaged.push(DamagedPoint {
            point: "20261130T150000Z".into(),
            reason: "index of disk 'vda' is missing".into(),
        });
        let now = at("20261201T020000Z");
        let protected = BTreeMap::from([(I1.to_string(), "read by restore task 7".to_string())]);
        let marks = plan(&pts, days(0), &now, &protected);
        assert_eq!(kept(&marks), [F1, I1, I2]);
        assert_eq!(marks[1].reason, "read by restore task 7");
        assert_eq!(marks[2].point, "20261130T150000Z");
        assert_eq!(marks[2].level, None);
        assert_eq!(marks[2].action, Action::Remove);
        assert!(marks[2]
            .reason
            .starts_with("damaged (index of disk 'vda' is missing); "));

        for r in [Retention::KeepAll, Retention::OneTime] {
            assert_eq!(kept(&plan(&pts, r, &now, &BTreeMap::new())).len(), 4);
        }
    }

    #[test]
    fn retention_follows_the_policy() {
        let p: Policy = crate::policy::build_policy(
            None,
            &["full weekly on sun at 01:00".to_string()],
            Some(2),
            chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            Retention::of(&p),
            Retention::Periods {
                period: Period::Weekly,
                count: 2
            }
        );
        assert_eq!(Retention::of(&p).to_string(), "retention 2 weeks");
        assert_eq!(days(1).to_string(), "retention 1 day");
    }
}
