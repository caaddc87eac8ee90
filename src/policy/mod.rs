//! A rule's policy: one run at a set time (R11-R13) or periodic schedules with a
//! retention (R14, R15, R22-R25); plus bandwidth windows (R29) in [`bandwidth`].
//!
//! Everything here is pure: times are the backup host's local wall clock, passed in
//! by the caller, so every rule is tested without a clock.
//!
//! - [`build_policy`] turns the CLI's `--once`, `--schedule` and `--retention` into a
//!   validated [`Policy`]; each refusal is one line naming the field and the R-id.
//! - [`Policy::next_runs`] lists upcoming runs. Two schedules firing at the same
//!   instant give one run, and a full beats an incremental or differential.
//! - A one-time policy has exactly one run, at its time, and it is a full (its
//!   first backup has no base anyway, R27). `next_runs` returns that time as it is,
//!   whatever `after` is: a time at or before now means "due now" (R13), and whether
//!   it already ran is the state store's business, not the policy's.

pub mod bandwidth;
pub mod calendar;
pub mod schedule;

use std::fmt;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};

use crate::error::{invalid, refused};
use crate::level::Level;

pub use schedule::{Period, Schedule};

/// Largest retention, in units of the period (R15).
pub const MAX_RETENTION: u32 = 64;
/// Most schedules one rule may have (R22).
pub const MAX_SCHEDULES: usize = 2;

/// The `--once` format, local time.
const ONCE_FORMAT: &str = "%Y-%m-%d %H:%M";

/// When a rule runs.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Policy {
    /// One full backup at a local wall-clock time (R11).
    Once {
        #[serde(with = "once_time")]
        at: NaiveDateTime,
    },
    /// One or two schedules sharing a period; `retention` in units of that period,
    /// `None` keeps everything (R15).
    Periodic {
        schedules: Vec<Schedule>,
        retention: Option<u32>,
    },
}

/// Validate the policy options of `rule add` / `rule edit` against `now` (local time).
pub fn build_policy(
    once: Option<&str>,
    schedules: &[String],
    retention: Option<u32>,
    now: NaiveDateTime,
) -> anyhow::Result<Policy> {
    match (once, schedules.is_empty()) {
        (Some(_), false) => Err(refused(
            "--once and --schedule exclude each other: a policy is one-time or periodic (R11, R14)",
        )),
        (None, true) => Err(refused(
            "a policy needs --once \"YYYY-MM-DD HH:MM\" or at least one --schedule (R11, R14)",
        )),
        (Some(text), true) => {
            if let Some(days) = retention {
                return Err(refused(format!(
                    "--retention {days} applies to periodic policies only, not to --once (R15)"
                )));
            }
            build_once(text, now)
        }
        (None, false) => build_periodic(schedules, retention),
    }
}

fn build_once(text: &str, now: NaiveDateTime) -> anyhow::Result<Policy> {
    let at = parse_once(text)?;
    if at.date() < now.date() {
        return Err(refused(format!(
            "invalid --once '{text}': the date is before today ({}); a one-time start may not lie in the past (R12)",
            now.date()
        )));
    }
    Ok(Policy::Once { at })
}

/// Parse `YYYY-MM-DD HH:MM` (a `T` between date and time is accepted too).
pub fn parse_once(text: &str) -> anyhow::Result<NaiveDateTime> {
    let normalised = text.trim().replacen('T', " ", 1);
    NaiveDateTime::parse_from_str(&normalised, ONCE_FORMAT).map_err(|_| {
        invalid(
            "--once",
            text,
            "allowed a local date and time 'YYYY-MM-DD HH:MM', e.g. '2026-12-24 22:00' (R11)",
        )
    })
}

fn build_periodic(specs: &[String], retention: Option<u32>) -> anyhow::Result<Policy> {
    if let Some(units) = retention {
        if units > MAX_RETENTION {
            return Err(invalid(
                "--retention",
                units,
                format!("allowed 0..={MAX_RETENTION}, in units of the period (R15)"),
            ));
        }
    }
    if specs.len() > MAX_SCHEDULES {
        return Err(refused(format!(
            "{} --schedule options given: at most {MAX_SCHEDULES} periodic schedules per rule (R22)",
            specs.len()
        )));
    }
    let schedules = specs
        .iter()
        .map(|spec| spec.parse())
        .collect::<anyhow::Result<Vec<Schedule>>>()?;
    check_combination(&schedules)?;
    Ok(Policy::Periodic {
        schedules,
        retention,
    })
}

/// R23, R25 and R24 across the (at most two) schedules of a rule.
fn check_combination(schedules: &[Schedule]) -> anyhow::Result<()> {
    let [first, second] = schedules else {
        return Ok(());
    };
    if first.period() != second.period() {
        return Err(refused(format!(
            "schedules '{first}' and '{second}' have different periods ({} and {}): all schedules of a rule share one period (R25)",
            first.period(),
            second.period()
        )));
    }
    let levels = [first.level, second.level];
    if levels.contains(&Level::Inc) && levels.contains(&Level::Diff) {
        return Err(refused(format!(
            "schedules '{first}' and '{second}' mix incremental and differential: use one or the other (R23)"
        )));
    }
    let full = schedules.iter().find(|s| s.level == Level::Full);
    let partial = schedules.iter().find(|s| s.level != Level::Full);
    if let (Some(full), Some(partial)) = (full, partial) {
        if full.period() != Period::Daily && partial.times != full.times {
            return Err(refused(format!(
                "schedule '{partial}' must run at the full's times, as in '{full}': {} {} and {} schedules share their run times (R24)",
                full.period(),
                partial.level,
                full.level
            )));
        }
    }
    Ok(())
}

impl Policy {
    /// The period type of a periodic policy; `None` for a one-time one.
    pub fn period(&self) -> Option<Period> {
        match self {
            Policy::Once { .. } => None,
            Policy::Periodic { schedules, .. } => schedules.first().map(Schedule::period),
        }
    }

    /// The next `n` runs after `after`, on local wall-clock time without DST (see the
    /// module doc for one-time policies).
    pub fn next_runs(&self, after: NaiveDateTime, n: usize) -> Vec<(NaiveDateTime, Level)> {
        self.next_runs_tz(&Utc.from_utc_datetime(&after), n)
            .into_iter()
            .map(|(at, level)| (at.naive_utc(), level))
            .collect()
    }

    /// The next `n` runs after `after` in its time zone (use `chrono::Local` in the
    /// runner). A time in a spring-forward gap runs once after the gap; a time in a
    /// fall-back repeated hour runs once, at its first occurrence.
    pub fn next_runs_tz<Tz: TimeZone>(
        &self,
        after: &DateTime<Tz>,
        n: usize,
    ) -> Vec<(DateTime<Tz>, Level)> {
        match self {
            Policy::Once { at } => schedule::place_in_zone(&after.timezone(), *at)
                .map(|at| (at, Level::Full))
                .into_iter()
                .take(n)
                .collect(),
            Policy::Periodic { schedules, .. } => {
                let mut runs: Vec<(DateTime<Tz>, Level)> = Vec::new();
                let mut cursor = after.clone();
                while runs.len() < n {
                    let Some(run) = next_run(schedules, &cursor) else {
                        break;
                    };
                    cursor = run.0.clone();
                    runs.push(run);
                }
                runs
            }
        }
    }
}

/// The earliest run of any schedule after `after`; at a tie the stronger level wins.
fn next_run<Tz: TimeZone>(
    schedules: &[Schedule],
    after: &DateTime<Tz>,
) -> Option<(DateTime<Tz>, Level)> {
    let mut best: Option<(DateTime<Tz>, Level)> = None;
    for schedule in schedules {
        let Some(at) = schedule.next_after(after) else {
            continue;
        };
        best = match best {
            Some((best_at, best_level)) if best_at < at => Some((best_at, best_level)),
            Some((best_at, best_level)) if best_at == at => {
                Some((at, stronger(best_level, schedule.level)))
            }
            _ => Some((at, schedule.level)),
        };
    }
    best
}

/// Full beats differential beats incremental (R23 keeps the last two apart).
fn stronger(a: Level, b: Level) -> Level {
    let rank = |level| match level {
        Level::Full => 2,
        Level::Diff => 1,
        Level::Inc => 0,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Once { at } => write!(f, "once at {}", at.format(ONCE_FORMAT)),
            Policy::Periodic {
                schedules,
                retention,
            } => {
                let specs: Vec<String> = schedules.iter().map(Schedule::to_string).collect();
                f.write_str(&specs.join("; "))?;
                match (retention, self.period()) {
                    (Some(units), Some(period)) => write!(f, "; retention {units} ({period})"),
                    _ => f.write_str("; retention: keep all"),
                }
            }
        }
    }
}

/// `Policy::Once::at` as `YYYY-MM-DD HH:MM` (chrono's serde feature is not enabled).
mod once_time {
    use chrono::NaiveDateTime;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &NaiveDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&at.format(super::ONCE_FORMAT))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveDateTime, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_once(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
