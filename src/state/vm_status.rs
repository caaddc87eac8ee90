//! Per-VM counters kept beside the task history (R33): which failed tasks
//! `stats` has shown (the rest are "unviewed"), how many points the VM's
//! repository holds after the last task that changed them, and what the last
//! `verify` found. Everything `stats`, `rule list/show` and the Prometheus file
//! report comes from here and from the task rows, never from a repository scan.

use std::collections::BTreeMap;

use anyhow::Result;
use rusqlite::{params, OptionalExtension};

use super::State;
use crate::task::TaskState;

/// The counters of one VM of a rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmStatus {
    /// Failed or interrupted tasks that `stats` has not shown yet.
    pub unviewed_failures: u64,
    /// Points in the repository after the last backup (or prune) of this VM.
    pub points: Option<u64>,
    /// When `verify` last checked this VM (RFC 3339 UTC, as stored).
    pub last_verify: Option<String>,
    /// Points with missing or corrupt chunks found by that verify.
    pub damaged_points: Option<u64>,
}

/// Failed tasks of `rule` (of `vm` when given) newer than what was viewed, per VM.
const UNVIEWED_SQL: &str = "SELECT t.vm, COUNT(*) FROM tasks t
     LEFT JOIN vm_status s ON s.rule = t.rule AND s.vm = t.vm
     WHERE t.rule = ?1 AND (?2 IS NULL OR t.vm = ?2)
       AND t.state IN FAILURES AND t.id > COALESCE(s.failures_viewed_through, 0)
     GROUP BY t.vm";

fn unviewed_sql() -> String {
    UNVIEWED_SQL.replace("FAILURES", TaskState::FAILURE_SQL)
}

impl State {
    /// The counters of a rule's VM.
    pub fn vm_status(&self, rule: &str, vm: &str) -> Result<VmStatus> {
        let unviewed = self.unviewed_failures(rule, Some(vm))?;
        let row = self
            .conn()
            .query_row(
                "SELECT points, last_verify, damaged_points FROM vm_status WHERE rule = ?1 AND vm = ?2",
                params![rule, vm],
                |r| {
                    Ok((
                        r.get::<_, Option<i64>>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                    ))
                },
            )
            .optional()?;
        let (points, last_verify, damaged) = row.unwrap_or_default();
        Ok(VmStatus {
            unviewed_failures: unviewed.get(vm).copied().unwrap_or(0),
            points: points.map(|n| n as u64),
            last_verify,
            damaged_points: damaged.map(|n| n as u64),
        })
    }

    /// Unviewed failures per VM of `rule` (only `vm` when given); VMs with none
    /// are left out.
    pub fn unviewed_failures(&self, rule: &str, vm: Option<&str>) -> Result<BTreeMap<String, u64>> {
        let mut st = self.conn().prepare_cached(&unviewed_sql())?;
        let rows = st
            .query_map(params![rule, vm], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Read the unviewed failures of `rule` (only `vm` when given) and, unless
    /// `peek`, mark every task up to now as viewed, in one transaction: a failure
    /// recorded meanwhile is either counted here or stays unviewed (R33).
    pub fn take_unviewed_failures(
        &mut self,
        rule: &str,
        vm: Option<&str>,
        peek: bool,
    ) -> Result<BTreeMap<String, u64>> {
        let sql = unviewed_sql();
        self.write(|tx| {
            let counts: BTreeMap<String, u64> = {
                let mut st = tx.prepare(&sql)?;
                let rows = st
                    .query_map(params![rule, vm], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                rows
            };
            if !peek {
                tx.execute(
                    "INSERT INTO vm_status (rule, vm, failures_viewed_through)
                     SELECT rule, vm, MAX(id) FROM tasks WHERE rule = ?1 AND (?2 IS NULL OR vm = ?2)
                     GROUP BY vm
                     ON CONFLICT (rule, vm) DO UPDATE SET
                       failures_viewed_through = MAX(failures_viewed_through, excluded.failures_viewed_through)",
                    params![rule, vm],
                )?;
            }
            Ok(counts)
        })
    }

    /// The number of points a VM's repository holds now (after a backup or prune).
    pub fn set_vm_points(&mut self, rule: &str, vm: &str, points: u64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO vm_status (rule, vm, points) VALUES (?1, ?2, ?3)
                 ON CONFLICT (rule, vm) DO UPDATE SET points = excluded.points",
                params![rule, vm, points as i64],
            )?;
            Ok(())
        })
    }

    /// What a verify of a VM found: when, and how many points were damaged.
    pub fn record_verify(&mut self, rule: &str, vm: &str, at: &str, damaged: u64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO vm_status (rule, vm, last_verify, damaged_points) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (rule, vm) DO UPDATE SET
                   last_verify = excluded.last_verify, damaged_points = excluded.damaged_points",
                params![rule, vm, at, damaged as i64],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan of a statement: SQLite's `EXPLAIN QUERY PLAN` details, one line each.
    fn plan(state: &State, sql: &str, rule: &str, vm: Option<&str>) -> String {
        let mut st = state
            .conn()
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap();
        let rows = st
            .query_map(params![rule, vm], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap();
        rows.join("\n")
    }

    /// Unviewed failures are counted from the partial index of failed tasks
    /// (migration 11), whose list must be `TaskState::FAILURE_SQL`: were the two
    /// to differ, SQLite would read every task of the rule instead.
    #[test]
    fn unviewed_failures_read_the_failure_index() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("state.db")).unwrap();
        for vm in [None, Some("vm1")] {
            let p = plan(&state, &unviewed_sql(), "r", vm);
            assert!(p.contains("USING INDEX tasks_failures_by_rule"), "{p}");
        }
    }
}
