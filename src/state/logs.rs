//! Reading task log lines (R32) and bounding how many are kept.
//!
//! Lines are written by `State::log` (state/tasks.rs). At most [`MAX_LOG_ROWS`]
//! lines are kept in all; when a task ends, the oldest lines beyond that go.

use anyhow::Result;
use rusqlite::{params, Transaction};
use serde::Serialize;

use super::State;
use crate::task::LogLevel;

/// The most log lines kept in the state store (documented in README.md).
pub const MAX_LOG_ROWS: i64 = 200_000;

/// One stored log line with the task it belongs to.
#[derive(Debug, Clone, Serialize)]
pub struct TaskLogLine {
    /// Position in the log (increasing); `logs --follow` continues after it.
    pub id: i64,
    pub task: i64,
    pub rule: String,
    pub vm: String,
    #[serde(rename = "time", serialize_with = "crate::timefmt::stored")]
    pub ts: String,
    pub level: LogLevel,
    pub message: String,
}

/// Which lines to read.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub rule: String,
    pub vm: Option<String>,
    pub task: Option<i64>,
    /// Only lines with a larger id.
    pub after: i64,
    /// Only lines written at or after this time (RFC 3339 UTC, milliseconds).
    pub since: Option<String>,
    /// Only the newest this many lines.
    pub last: Option<u32>,
}

/// Drop the oldest lines beyond [`MAX_LOG_ROWS`].
pub fn prune_logs(tx: &Transaction) -> Result<()> {
    tx.execute(
        "DELETE FROM task_logs WHERE id <= (SELECT MAX(id) FROM task_logs) - ?1",
        [MAX_LOG_ROWS],
    )?;
    Ok(())
}

impl State {
    /// Log lines of a rule's tasks, oldest first.
    pub fn rule_logs(&self, f: &LogFilter) -> Result<Vec<TaskLogLine>> {
        let mut st = self.conn().prepare(
            "SELECT l.id, l.task, t.rule, t.vm, l.ts, l.level, l.message
             FROM task_logs l JOIN tasks t ON t.id = l.task
             WHERE t.rule = ?1 AND (?2 IS NULL OR t.vm = ?2) AND (?3 IS NULL OR t.id = ?3)
               AND l.id > ?4 AND (?5 IS NULL OR l.ts >= ?5)
             ORDER BY l.id DESC LIMIT ?6",
        )?;
        let limit = f.last.map_or(-1, i64::from);
        let mut rows: Vec<TaskLogLine> = st
            .query_map(
                params![f.rule, f.vm, f.task, f.after, f.since, limit],
                |r| {
                    Ok(TaskLogLine {
                        id: r.get(0)?,
                        task: r.get(1)?,
                        rule: r.get(2)?,
                        vm: r.get(3)?,
                        ts: r.get(4)?,
                        level: r.get(5)?,
                        message: r.get(6)?,
                    })
                },
            )?
            .collect::<rusqlite::Result<_>>()?;
        rows.reverse();
        Ok(rows)
    }
}
