//! Sums over the task history, per rule and VM: what `stats` shows as all-time
//! totals and what the Prometheus file exports (R33). One query serves both, so
//! the two can never count differently.
//!
//! Backups are counted by outcome: `succeeded` (completed), `failed` (failed or
//! interrupted) and `skipped` (R28); bytes come from completed backups.
//! `failures` counts failed and interrupted tasks of every kind (a failed
//! restore is news too), as the unviewed-failure counter does.

use std::collections::BTreeMap;

use anyhow::Result;
use rusqlite::params;

use super::tasks::COMPLETED_BACKUP_SQL;
use super::State;
use crate::task::{TaskKind, TaskState};

/// The sums for one VM of one rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Figures {
    pub succeeded: u64,
    pub failed: u64,
    pub skipped: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Failed or interrupted tasks of every kind.
    pub failures: u64,
    /// Tasks of any kind running now.
    pub running: u64,
    /// The newest completed backup: when it started and finished (stored text).
    pub last_backup: Option<(Option<String>, String)>,
}

impl State {
    /// [`Figures`] per (rule, VM) for the tasks of `rule` (every rule when `None`)
    /// and `vm` (every VM when `None`).
    pub fn figures(
        &self,
        rule: Option<&str>,
        vm: Option<&str>,
    ) -> Result<BTreeMap<(String, String), Figures>> {
        // Only the filters that apply: `?1 IS NULL OR rule = ?1` would keep
        // SQLite from using the (rule, vm) index and scan every task.
        let scope = match (rule.is_some(), vm.is_some()) {
            (true, true) => "rule = ?1 AND vm = ?2",
            (true, false) => "rule = ?1 AND ?2 IS NULL",
            (false, true) => "?1 IS NULL AND vm = ?2",
            (false, false) => "?1 IS NULL AND ?2 IS NULL",
        };
        let sql = format!(
            "SELECT rule, vm,
               SUM({completed}),
               SUM(kind = ?3 AND state IN {failures}),
               SUM(kind = ?3 AND state = ?4),
               SUM(CASE WHEN {completed} THEN COALESCE(bytes_read, 0) ELSE 0 END),
               SUM(CASE WHEN {completed} THEN COALESCE(bytes_written, 0) ELSE 0 END),
               SUM(state IN {failures}),
               SUM(state = ?5)
             FROM tasks WHERE {scope}
             GROUP BY rule, vm",
            failures = TaskState::FAILURE_SQL,
            completed = COMPLETED_BACKUP_SQL,
        );
        let mut out = BTreeMap::new();
        let mut st = self.conn().prepare(&sql)?;
        let rows = st.query_map(
            params![
                rule,
                vm,
                TaskKind::Backup,
                TaskState::Skipped,
                TaskState::Running
            ],
            |r| {
                let n = |i: usize| r.get::<_, Option<i64>>(i).map(|v| v.unwrap_or(0) as u64);
                Ok((
                    (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                    Figures {
                        succeeded: n(2)?,
                        failed: n(3)?,
                        skipped: n(4)?,
                        bytes_read: n(5)?,
                        bytes_written: n(6)?,
                        failures: n(7)?,
                        running: n(8)?,
                        last_backup: None,
                    },
                ))
            },
        )?;
        for row in rows {
            let (key, f) = row?;
            out.insert(key, f);
        }
        // Each VM's newest completed backup, as its vm_status row names it
        // (kept by the schema's triggers, migration 12).
        let mut st = self.conn().prepare(&format!(
            "SELECT s.rule, s.vm, t.started_at, t.finished_at
             FROM (SELECT rule, vm, last_backup FROM vm_status WHERE {scope}) s
             JOIN tasks t ON t.id = s.last_backup"
        ))?;
        let rows = st.query_map(params![rule, vm], |r| {
            Ok((
                (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        for row in rows {
            let (key, started, finished) = row?;
            if let (Some(f), Some(finished)) = (out.get_mut(&key), finished) {
                f.last_backup = Some((started, finished));
            }
        }
        Ok(out)
    }
}
