//! Task rows (one run of one kind of work for one VM) and their log lines (R31, R32).
//!
//! A task row is written when the task starts and updated as it moves through the
//! R31 phases; its final state is one of completed / failed / skipped /
//! interrupted. `pid` names the process running it, so a task whose process died
//! can be recognised (the runner reclaims such tasks).

use anyhow::Result;
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::State;
use crate::task::{LogLevel, TaskKind, TaskState};

/// Per rule, then per VM with a task: what listings show of its history.
/// Keyed by rule, then VM, so that a lookup borrows both names; boxed: a
/// listing holds ten thousand of them.
pub type VmSummaries =
    std::collections::HashMap<String, std::collections::HashMap<String, Box<VmSummary>>>;

/// A VM's newest task, its newest completed backup (R33; mostly the same task,
/// kept once) and its unviewed failures (R33).
#[derive(Debug, Clone)]
pub struct VmSummary {
    pub newest: TaskRow,
    /// The newest completed backup when it is not `newest`.
    older_backup: Option<Box<TaskRow>>,
    pub unviewed_failures: u64,
}

impl VmSummary {
    /// The newest completed backup, if the VM has one.
    pub fn backup(&self) -> Option<&TaskRow> {
        if self.newest.is_completed_backup() {
            Some(&self.newest)
        } else {
            self.older_backup.as_deref()
        }
    }
}

/// `state IN` this list: the task is active.
pub const ACTIVE_STATES: &str = TaskState::ACTIVE_SQL;

#[derive(Debug, Clone, Serialize)]
pub struct TaskRow {
    pub id: i64,
    pub kind: TaskKind,
    pub rule: String,
    pub vm: String,
    pub level: Option<String>,
    #[serde(rename = "status")]
    pub state: TaskState,
    pub phase: Option<String>,
    pub percent: f64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub point: Option<String>,
    pub message: Option<String>,
    pub pid: Option<i64>,
    #[serde(rename = "created", serialize_with = "crate::timefmt::stored")]
    pub created_at: String,
    #[serde(rename = "started", serialize_with = "crate::timefmt::stored_opt")]
    pub started_at: Option<String>,
    #[serde(rename = "finished", serialize_with = "crate::timefmt::stored_opt")]
    pub finished_at: Option<String>,
    /// Bytes per second over the last progress interval, while running (R30).
    #[serde(rename = "current_rate_bytes_per_sec")]
    pub rate: u64,
    /// The bandwidth window in force while running: `unlimited`, `20MiB/s`, `pause`.
    #[serde(rename = "limit")]
    pub bw_limit: Option<String>,
    /// Why a pending task waits (R41).
    pub waiting: Option<String>,
    /// A restore's destination directory.
    pub dest: Option<String>,
    /// A restore's private staging directory, while it may exist.
    pub staging: Option<String>,
    /// A completed backup: bytes read from the source.
    pub bytes_read: Option<u64>,
    /// A completed backup: bytes of new data written to the target.
    pub bytes_written: Option<u64>,
    /// A completed backup: the level its point was written as (after any fallback).
    pub run_level: Option<String>,
}

/// SQL condition on a `tasks` row: a completed backup. What "a VM's last
/// backup" means everywhere (listings, stats, retention); the test below
/// checks it against [`TaskRow::is_completed_backup`].
pub const COMPLETED_BACKUP_SQL: &str = "(kind = 'backup' AND state = 'completed')";

impl TaskRow {
    /// A completed backup (the Rust side of [`COMPLETED_BACKUP_SQL`]).
    pub fn is_completed_backup(&self) -> bool {
        self.kind == TaskKind::Backup && self.state == TaskState::Completed
    }
}

const COLS: &str = "id, kind, rule, vm, level, state, phase, percent, bytes_done, bytes_total, point, message, pid, created_at, started_at, finished_at, rate, bw_limit, waiting, dest, staging, bytes_read, bytes_written, run_level";

/// The number of columns in [`COLS`].
const COL_COUNT: usize = 24;

/// [`COLS`] of the table aliased `alias` (`t.id, t.kind, ...`).
fn cols_of(alias: &str) -> String {
    COLS.split(", ")
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn from_row(r: &rusqlite::Row) -> rusqlite::Result<TaskRow> {
    from_row_at(r, 0)
}

/// The task whose [`COLS`] start at column `base` of `r`.
fn from_row_at(r: &rusqlite::Row, base: usize) -> rusqlite::Result<TaskRow> {
    Ok(TaskRow {
        id: r.get(base)?,
        kind: r.get(base + 1)?,
        rule: r.get(base + 2)?,
        vm: r.get(base + 3)?,
        level: r.get(base + 4)?,
        state: r.get(base + 5)?,
        phase: r.get(base + 6)?,
        percent: r.get(base + 7)?,
        bytes_done: r.get::<_, i64>(base + 8)? as u64,
        bytes_total: r.get::<_, i64>(base + 9)? as u64,
        point: r.get(base + 10)?,
        message: r.get(base + 11)?,
        pid: r.get(base + 12)?,
        created_at: r.get(base + 13)?,
        started_at: r.get(base + 14)?,
        finished_at: r.get(base + 15)?,
        rate: r.get::<_, i64>(base + 16)? as u64,
        bw_limit: r.get(base + 17)?,
        waiting: r.get(base + 18)?,
        dest: r.get(base + 19)?,
        staging: r.get(base + 20)?,
        bytes_read: r.get::<_, Option<i64>>(base + 21)?.map(|n| n as u64),
        bytes_written: r.get::<_, Option<i64>>(base + 22)?.map(|n| n as u64),
        run_level: r.get(base + 23)?,
    })
}

/// One stored log line.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    pub task: i64,
    pub ts: String,
    pub level: LogLevel,
    pub message: String,
}

impl State {
    /// Move a running task to R31 phase `phase`.
    pub fn set_task_phase(&mut self, id: i64, phase: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE tasks SET phase = ?2 WHERE id = ?1",
                params![id, phase],
            )?;
            Ok(())
        })
    }

    /// Record progress of a running task.
    pub fn set_task_progress(&mut self, id: i64, done: u64, total: u64) -> Result<()> {
        let pct = if total == 0 {
            0.0
        } else {
            (done as f64 * 100.0 / total as f64).min(100.0)
        };
        self.write(|tx| {
            tx.execute(
                // A last update may arrive after the task ended: it keeps its final state.
                "UPDATE tasks SET phase = CASE WHEN state = 'running' THEN 'running' ELSE phase END,
                 bytes_done = ?2, bytes_total = ?3, percent = ?4 WHERE id = ?1",
                params![id, done as i64, total as i64, pct],
            )?;
            Ok(())
        })
    }

    /// Record where a restore writes: its destination and private staging
    /// directory (`None` once the staging directory is gone).
    pub fn set_task_staging(&mut self, id: i64, dest: &str, staging: Option<&str>) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE tasks SET dest = ?2, staging = ?3 WHERE id = ?1",
                params![id, dest, staging],
            )?;
            Ok(())
        })
    }

    /// The backup task of a rule's VM that a live process runs now, if any.
    pub fn running_backup_of(&self, rule: &str, vm: &str) -> Result<Option<TaskRow>> {
        let mut st = self.conn().prepare(&format!(
            "SELECT {COLS} FROM tasks WHERE kind = ?1 AND rule = ?2 AND vm = ?3
             AND state IN {ACTIVE_STATES} ORDER BY id"
        ))?;
        let rows: Vec<TaskRow> = st
            .query_map(params![TaskKind::Backup, rule, vm], from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows
            .into_iter()
            .find(|t| t.pid.is_some_and(super::slots::pid_alive)))
    }

    /// Record that backup task `id` of rule `rule` works on the running VM
    /// `identity` (`VmHandle::running_identity`), unless another active task of a
    /// live process already does: then an error naming that task and its rule
    /// (exit 3). Two rules reaching one QEMU through two platforms never back it
    /// up at once (R35).
    pub fn claim_running_vm(&mut self, id: i64, vm: &str, identity: &str) -> Result<()> {
        self.write(|tx| {
            let mut st = tx.prepare(&format!(
                "SELECT id, rule, vm, pid FROM tasks WHERE vm_identity = ?1 AND id != ?2
                 AND state IN {ACTIVE_STATES} ORDER BY id"
            ))?;
            let others = st
                .query_map(params![identity, id], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            if let Some((other, rule, as_vm, _)) = others
                .into_iter()
                .find(|(_, _, _, pid)| pid.is_some_and(super::slots::pid_alive))
            {
                anyhow::bail!(
                    "VM '{vm}' is being backed up right now by task {other} of rule '{rule}' (as VM '{as_vm}': the same QEMU process, reached through another platform); refusing a second backup of it at once (R35)"
                );
            }
            tx.execute(
                "UPDATE tasks SET vm_identity = ?2 WHERE id = ?1",
                params![id, identity],
            )?;
            Ok(())
        })
    }

    /// Restores with a staging directory recorded that no process runs any more
    /// (they ended, or their process died), optionally only those into `dest`.
    pub fn ended_restores_with_staging(&self, dest: Option<&str>) -> Result<Vec<TaskRow>> {
        let mut st = self.conn().prepare(&format!(
            "SELECT {COLS} FROM tasks WHERE kind = ?1 AND staging IS NOT NULL
             AND (?2 IS NULL OR dest = ?2) ORDER BY id"
        ))?;
        let rows: Vec<TaskRow> = st
            .query_map(params![TaskKind::Restore, dest], from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows
            .into_iter()
            .filter(|t| !t.state.is_active() || !t.pid.is_some_and(super::slots::pid_alive))
            .collect())
    }

    pub fn task(&self, id: i64) -> Result<Option<TaskRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLS} FROM tasks WHERE id = ?1"),
                [id],
                from_row,
            )
            .optional()?)
    }

    /// Tasks, newest first; `active_only` keeps queued/pending/running.
    pub fn tasks(&self, active_only: bool, limit: u32) -> Result<Vec<TaskRow>> {
        let filter = if active_only {
            format!("WHERE state IN {ACTIVE_STATES}")
        } else {
            String::new()
        };
        let mut st = self.conn().prepare(&format!(
            "SELECT {COLS} FROM tasks {filter} ORDER BY id DESC LIMIT ?1"
        ))?;
        let rows = st
            .query_map([limit], from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// What a completed backup produced (stats and metrics read it, R33).
    pub fn record_backup(
        &mut self,
        id: i64,
        run_level: &str,
        bytes_read: u64,
        bytes_written: u64,
    ) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE tasks SET run_level = ?2, bytes_read = ?3, bytes_written = ?4 WHERE id = ?1",
                params![id, run_level, bytes_read as i64, bytes_written as i64],
            )?;
            Ok(())
        })
    }

    /// Per VM of `rule` (of every rule when `None`), keyed by rule, then VM: its
    /// newest task, its newest completed backup (as [`State::last_backup`]
    /// finds it) and its unviewed failures. VMs with no task are left out. One
    /// statement for all VMs: listings ask this of every rule. All three come
    /// through the VM's `vm_status` row (kept by the schema's triggers,
    /// migration 12), not from a search of its history; the backup is read
    /// only where it is not the newest task.
    pub fn vm_summaries(&self, rule: Option<&str>) -> Result<VmSummaries> {
        let filter = if rule.is_some() {
            "WHERE v.rule = ?1"
        } else {
            ""
        };
        let (t_cols, b_cols) = (cols_of("t"), cols_of("b"));
        let mut st = self.conn().prepare_cached(&format!(
            "SELECT {t_cols}, {b_cols}, s.unviewed_failures FROM rule_vms v
             JOIN vm_status s ON s.rule = v.rule AND s.vm = v.vm
             JOIN tasks t ON t.id = s.last_task
             LEFT JOIN tasks b ON b.id = s.last_backup AND s.last_backup <> s.last_task
             {filter}"
        ))?;
        let summary = |r: &rusqlite::Row| {
            let newest = from_row_at(r, 0)?;
            let older_backup = match r.get::<_, Option<i64>>(COL_COUNT)? {
                Some(_) => Some(Box::new(from_row_at(r, COL_COUNT)?)),
                None => None,
            };
            let unviewed_failures = r.get::<_, i64>(2 * COL_COUNT)? as u64;
            Ok(Box::new(VmSummary {
                newest,
                older_backup,
                unviewed_failures,
            }))
        };
        let rows = match rule {
            Some(rule) => st.query_map(params![rule], summary)?,
            None => st.query_map([], summary)?,
        };
        let mut out = VmSummaries::new();
        for summary in rows {
            let summary = summary?;
            let (rule, vm) = (&summary.newest.rule, summary.newest.vm.clone());
            if let Some(vms) = out.get_mut(rule) {
                vms.insert(vm, summary);
            } else {
                out.insert(rule.clone(), [(vm, summary)].into());
            }
        }
        Ok(out)
    }

    /// The newest completed backup of a rule's VM: its last successful backup
    /// (a restore or a failed run is not one), found through its `vm_status` row.
    pub fn last_backup(&self, rule: &str, vm: &str) -> Result<Option<TaskRow>> {
        // Cached: `stats` asks this for every VM of a rule.
        Ok(self
            .conn()
            .prepare_cached(&format!(
                "SELECT {COLS} FROM tasks
                 WHERE id = (SELECT last_backup FROM vm_status WHERE rule = ?1 AND vm = ?2)"
            ))?
            .query_row(params![rule, vm], from_row)
            .optional()?)
    }

    /// Tasks of a rule (one VM's with `vm`) that finished at or after `since`
    /// (RFC 3339 UTC; `None`: all), newest first.
    pub fn finished_tasks(
        &self,
        rule: &str,
        vm: Option<&str>,
        since: Option<&str>,
    ) -> Result<Vec<TaskRow>> {
        let mut st = self.conn().prepare(&format!(
            "SELECT {COLS} FROM tasks WHERE rule = ?1 AND (?2 IS NULL OR vm = ?2)
             AND finished_at IS NOT NULL AND (?3 IS NULL OR finished_at >= ?3)
             ORDER BY id DESC"
        ))?;
        let rows = st
            .query_map(params![rule, vm, since], from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// True when a backup of `rule` completed that was created at or after
    /// `since` (RFC 3339 UTC; compared as times, the stored texts differ in
    /// precision): the rule's repository must then exist.
    pub fn has_completed_backup(&self, rule: &str, since: &str) -> Result<bool> {
        Ok(self.conn().query_row(
            &format!(
                "SELECT COUNT(*) > 0 FROM tasks WHERE {COMPLETED_BACKUP_SQL}
                 AND rule = ?1 AND julianday(created_at) >= julianday(?2)"
            ),
            [rule, since],
            |r| r.get(0),
        )?)
    }

    /// Why retention must not run for a VM now, if it must not: its newest
    /// backup that ran (skipped ones did not) failed or was interrupted (R18).
    pub fn prune_blocked(&self, rule: &str, vm: &str) -> Result<Option<String>> {
        let newest: Option<(i64, TaskState)> = self
            .conn()
            .query_row(
                &format!(
                    "SELECT id, state FROM tasks WHERE kind = 'backup' AND rule = ?1 AND vm = ?2
                     AND state NOT IN {ACTIVE_STATES} AND state != 'skipped' ORDER BY id DESC LIMIT 1"
                ),
                [rule, vm],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match newest {
            Some((id, state)) if matches!(state, TaskState::Failed | TaskState::Interrupted) => Some(format!(
                "the newest backup of VM '{vm}' (task {id}) {state}: nothing expired is pruned until a backup completes (R18)"
            )),
            _ => None,
        })
    }

    /// Points of a rule's VM that active tasks read (restores, recoveries), with
    /// why, e.g. "read by restore task 12 (running)", and points a recovery
    /// serves even while its server is down (`State::points_served`): prune and
    /// forget keep them.
    pub fn points_in_use(
        &self,
        rule: &str,
        vm: &str,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        let mut st = self.conn().prepare(&format!(
            "SELECT id, kind, state, point FROM tasks WHERE rule = ?1 AND vm = ?2
             AND kind != 'backup' AND point IS NOT NULL AND state IN {ACTIVE_STATES}"
        ))?;
        let rows = st
            .query_map([rule, vm], |r| {
                let (id, kind, state, point): (i64, TaskKind, TaskState, String) =
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
                Ok((
                    point,
                    format!("read by {} task {id} ({})", kind.as_str(), state.as_str()),
                ))
            })?
            .collect::<rusqlite::Result<std::collections::BTreeMap<String, String>>>()?;
        let mut rows = rows;
        for (point, why) in self.points_served(rule, vm)? {
            rows.entry(point).or_insert(why);
        }
        Ok(rows)
    }

    /// Append a log line to a task (R32).
    pub fn log(&mut self, task: i64, level: LogLevel, message: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO task_logs (task, ts, level, message) VALUES (?1, ?2, ?3, ?4)",
                params![task, super::slots::now_millis_text(), level, message],
            )?;
            Ok(())
        })
    }

    pub fn task_logs(&self, task: i64) -> Result<Vec<LogLine>> {
        let mut st = self.conn().prepare(
            "SELECT task, ts, level, message FROM task_logs WHERE task = ?1 ORDER BY id",
        )?;
        let rows = st
            .query_map([task], |r| {
                Ok(LogLine {
                    task: r.get(0)?,
                    ts: r.get(1)?,
                    level: r.get(2)?,
                    message: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SQL and the Rust spelling of "a completed backup" name the same kind
    /// and state words (the words the store writes).
    #[test]
    fn completed_backup_sql_matches_the_rust_check() {
        assert_eq!(
            COMPLETED_BACKUP_SQL,
            format!(
                "(kind = '{}' AND state = '{}')",
                TaskKind::Backup.as_str(),
                TaskState::Completed.as_str()
            )
        );
    }

    /// Rows read two tasks side by side (`vm_summaries`) at the offset COL_COUNT.
    #[test]
    fn col_count_is_the_number_of_columns() {
        assert_eq!(COLS.split(", ").count(), COL_COUNT);
        assert!(cols_of("b").starts_with("b.id, b.kind, "));
    }
}
