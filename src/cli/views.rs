//! Views of state rows that several commands print the same way (`rule list`,
//! `rule show`, `stats`): a VM's last successful backup with its age.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::state::tasks::TaskRow;
use crate::timefmt;

/// A VM's newest completed backup (R33): never a restore, never a failed run.
#[derive(Debug, Clone, Serialize)]
pub struct LastBackup {
    pub task: i64,
    pub point: Option<String>,
    /// The level the point was written as.
    pub level: Option<String>,
    #[serde(serialize_with = "timefmt::stored_opt")]
    pub started: Option<String>,
    #[serde(serialize_with = "timefmt::stored")]
    pub finished: String,
    /// Seconds from `finished` to now.
    pub age_seconds: f64,
    /// `finished` parsed (`None`: unparsable, shown as stored).
    #[serde(skip)]
    finished_at: Option<DateTime<Utc>>,
}

impl LastBackup {
    /// The view of a completed backup task row, its age counted to `now`.
    pub fn of(row: &TaskRow, now: DateTime<Utc>) -> Option<LastBackup> {
        let finished = row.finished_at.clone()?;
        let finished_at = timefmt::parse(&finished);
        Some(LastBackup {
            task: row.id,
            point: row.point.clone(),
            level: row.run_level.clone().or_else(|| row.level.clone()),
            started: row.started_at.clone(),
            age_seconds: finished_at.map_or(0.0, |f| timefmt::seconds_between(f, now)),
            finished,
            finished_at,
        })
    }

    /// `2026-12-03 01:00:12 +01:00 (8h 29m ago)`.
    pub fn human(&self) -> String {
        let when = match self.finished_at {
            Some(t) => timefmt::human_time(t),
            None => self.finished.clone(),
        };
        format!("{when} ({} ago)", age_text(self.age_seconds))
    }
}

/// A rough age for people: `45s`, `12m`, `8h 29m`, `3d 4h`.
pub fn age_text(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_for_people() {
        assert_eq!(age_text(5.2), "5s");
        assert_eq!(age_text(125.0), "2m");
        assert_eq!(age_text(8.0 * 3600.0 + 29.0 * 60.0), "8h 29m");
        assert_eq!(age_text(3.0 * 86400.0 + 4.0 * 3600.0), "3d 4h");
    }
}
