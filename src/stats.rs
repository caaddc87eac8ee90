//! Statistics of a rule's backups (R33, R34): successes, failures and skips per
//! local day and per month, from task rows alone (never a repository scan).
//!
//! Pure functions of the task rows and "today", so the bucketing is tested
//! without a clock; `vmbackup stats` reads "today" from the process clock
//! (the test clock in tests).

use chrono::{Datelike, Local, NaiveDate};
use serde::Serialize;

use crate::state::tasks::TaskRow;
use crate::task::{TaskKind, TaskState};

/// Which charts `stats` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// The last 7 days, per day.
    Week,
    /// The last 30 days, per day.
    Month,
    /// The last 12 months, per month.
    Year,
    /// All three.
    All,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Week => "week",
            Period::Month => "month",
            Period::Year => "year",
            Period::All => "all",
        }
    }

    pub fn shows_week(self) -> bool {
        matches!(self, Period::Week | Period::All)
    }

    pub fn shows_month(self) -> bool {
        matches!(self, Period::Month | Period::All)
    }

    pub fn shows_year(self) -> bool {
        matches!(self, Period::Year | Period::All)
    }

    /// The first local day the shown charts cover.
    pub fn first_day(self, today: NaiveDate) -> NaiveDate {
        if self.shows_year() {
            first_month(today, YEAR_MONTHS)
        } else if self.shows_month() {
            today - chrono::Days::new(MONTH_DAYS as u64 - 1)
        } else {
            today - chrono::Days::new(WEEK_DAYS as u64 - 1)
        }
    }
}

pub const WEEK_DAYS: usize = 7;
pub const MONTH_DAYS: usize = 30;
pub const YEAR_MONTHS: usize = 12;

/// Backups of one day or month, by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub succeeded: u64,
    pub failed: u64,
    pub skipped: u64,
}

impl Counts {
    fn add(&mut self, state: TaskState) {
        match state {
            TaskState::Completed => self.succeeded += 1,
            TaskState::Skipped => self.skipped += 1,
            s if s.is_failure() => self.failed += 1,
            _ => {}
        }
    }
}

/// One bar of a chart: a local day (`2026-12-03`) or month (`2026-12`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub label: String,
    pub counts: Counts,
}

/// The local day a task finished on; `None` while it has not.
fn finished_day(t: &TaskRow) -> Option<NaiveDate> {
    let at = crate::timefmt::parse(t.finished_at.as_deref()?)?;
    Some(at.with_timezone(&Local).date_naive())
}

fn backups(tasks: &[TaskRow]) -> impl Iterator<Item = (&TaskRow, NaiveDate)> {
    tasks
        .iter()
        .filter(|t| t.kind == TaskKind::Backup)
        .filter_map(|t| Some((t, finished_day(t)?)))
}

/// The last `days` local days up to `today`, oldest first.
pub fn daily(tasks: &[TaskRow], today: NaiveDate, days: usize) -> Vec<Bucket> {
    let first = today - chrono::Days::new(days as u64 - 1);
    let mut out: Vec<Bucket> = (0..days)
        .map(|i| Bucket {
            label: (first + chrono::Days::new(i as u64))
                .format("%Y-%m-%d")
                .to_string(),
            counts: Counts::default(),
        })
        .collect();
    for (t, day) in backups(tasks) {
        if day >= first && day <= today {
            out[(day - first).num_days() as usize].counts.add(t.state);
        }
    }
    out
}

/// The first day of the month `months - 1` months before `today`'s.
fn first_month(today: NaiveDate, months: usize) -> NaiveDate {
    let index = today.year() * 12 + today.month0() as i32 - (months as i32 - 1);
    NaiveDate::from_ymd_opt(index.div_euclid(12), index.rem_euclid(12) as u32 + 1, 1)
        .expect("the first of a month exists")
}

/// The last `months` calendar months up to `today`'s, oldest first.
pub fn monthly(tasks: &[TaskRow], today: NaiveDate, months: usize) -> Vec<Bucket> {
    let first = first_month(today, months);
    let index = |d: NaiveDate| d.year() * 12 + d.month0() as i32;
    let mut out: Vec<Bucket> = (0..months)
        .map(|i| {
            let m = index(first) + i as i32;
            Bucket {
                label: format!("{:04}-{:02}", m.div_euclid(12), m.rem_euclid(12) + 1),
                counts: Counts::default(),
            }
        })
        .collect();
    for (t, day) in backups(tasks) {
        let i = index(day) - index(first);
        if (0..months as i32).contains(&i) {
            out[i as usize].counts.add(t.state);
        }
    }
    out
}

/// Bytes read per byte written: dedup and compression together. `None` when
/// nothing was written.
pub fn ratio(bytes_read: u64, bytes_written: u64) -> Option<f64> {
    (bytes_written > 0).then(|| (bytes_read as f64 / bytes_written as f64 * 10.0).round() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: i64, kind: TaskKind, state: TaskState, finished: &str) -> TaskRow {
        TaskRow {
            id,
            kind,
            rule: "r".into(),
            vm: "v".into(),
            level: None,
            state,
            phase: None,
            percent: 0.0,
            bytes_done: 0,
            bytes_total: 0,
            point: None,
            message: None,
            pid: None,
            created_at: finished.into(),
            started_at: None,
            finished_at: Some(finished.into()),
            rate: 0,
            bw_limit: None,
            waiting: None,
            dest: None,
            staging: None,
            bytes_read: None,
            bytes_written: None,
            run_level: None,
        }
    }

    /// Noon, local time, `days_ago` days before `today`, as stored (UTC).
    fn local_noon(today: NaiveDate, days_ago: u64) -> String {
        let day = today - chrono::Days::new(days_ago);
        let at = crate::policy::schedule::place_in_zone(&Local, day.and_hms_opt(12, 0, 0).unwrap())
            .unwrap();
        crate::timefmt::json_time(at.with_timezone(&chrono::Utc))
    }

    #[test]
    fn r33_days_and_months_count_backups_by_outcome() {
        let today = NaiveDate::from_ymd_opt(2026, 3, 10).unwrap();
        let tasks = vec![
            task(
                1,
                TaskKind::Backup,
                TaskState::Completed,
                &local_noon(today, 0),
            ),
            task(
                2,
                TaskKind::Backup,
                TaskState::Failed,
                &local_noon(today, 0),
            ),
            task(
                3,
                TaskKind::Backup,
                TaskState::Interrupted,
                &local_noon(today, 6),
            ),
            task(
                4,
                TaskKind::Backup,
                TaskState::Skipped,
                &local_noon(today, 7),
            ),
            task(
                5,
                TaskKind::Backup,
                TaskState::Completed,
                &local_noon(today, 29),
            ),
            task(
                6,
                TaskKind::Backup,
                TaskState::Completed,
                &local_noon(today, 40),
            ),
            task(
                7,
                TaskKind::Backup,
                TaskState::Completed,
                &local_noon(today, 400),
            ),
            // A restore is not a backup.
            task(
                8,
                TaskKind::Restore,
                TaskState::Failed,
                &local_noon(today, 0),
            ),
        ];
        let week = daily(&tasks, today, WEEK_DAYS);
        assert_eq!(week.len(), 7);
        assert_eq!(week[0].label, "2026-03-04");
        assert_eq!(week[6].label, "2026-03-10");
        assert_eq!(
            week[6].counts,
            Counts {
                succeeded: 1,
                failed: 1,
                skipped: 0
            }
        );
        assert_eq!(week[0].counts.failed, 1, "interrupted counts as failed");
        let sum = |b: &[Bucket]| {
            b.iter().fold(Counts::default(), |mut a, x| {
                a.succeeded += x.counts.succeeded;
                a.failed += x.counts.failed;
                a.skipped += x.counts.skipped;
                a
            })
        };
        assert_eq!(
            sum(&week),
            Counts {
                succeeded: 1,
                failed: 2,
                skipped: 0
            }
        );
        let month = daily(&tasks, today, MONTH_DAYS);
        assert_eq!(month[0].label, "2026-02-09");
        assert_eq!(
            sum(&month),
            Counts {
                succeeded: 2,
                failed: 2,
                skipped: 1
            }
        );
        let year = monthly(&tasks, today, YEAR_MONTHS);
        assert_eq!(year[0].label, "2025-04");
        assert_eq!(year[11].label, "2026-03");
        assert_eq!(
            sum(&year),
            Counts {
                succeeded: 3,
                failed: 2,
                skipped: 1
            }
        );
        assert_eq!(year[10].counts.succeeded, 1, "29 days ago is in February");
        assert_eq!(year[9].counts.succeeded, 1, "40 days ago is in January");
    }

    #[test]
    fn months_wrap_over_the_year_and_periods_start_where_their_charts_do() {
        let today = NaiveDate::from_ymd_opt(2026, 1, 31).unwrap();
        assert_eq!(
            first_month(today, 12),
            NaiveDate::from_ymd_opt(2025, 2, 1).unwrap()
        );
        assert_eq!(
            first_month(today, 1),
            NaiveDate::from_ymd_opt(2026, 1, 1).unwrap()
        );
        assert_eq!(
            Period::Week.first_day(today),
            NaiveDate::from_ymd_opt(2026, 1, 25).unwrap()
        );
        assert_eq!(
            Period::Month.first_day(today),
            NaiveDate::from_ymd_opt(2026, 1, 2).unwrap()
        );
        assert_eq!(Period::All.first_day(today), first_month(today, 12));
        assert_eq!(ratio(100, 25), Some(4.0));
        assert_eq!(ratio(100, 0), None);
    }
}
