//! Per-VM counters kept beside the task history (R33): which failed tasks
//! `stats` has shown (the rest are "unviewed"), how many points the VM's
//! repository holds after the last task that changed them, and what the last
//! `verify` found. Everything `stats`, `rule list/show` and the Prometheus file
//! report comes from here and from the task rows, never from a repository scan.

use std::collections::{BTreeMap, HashMap};

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

/// The unviewed failures of the VM `x.rule`, `x.vm` (R33): its failed tasks
/// newer than the last one `stats` showed. One definition for every query
/// below; SQLite reads it as a range of the partial index of failed tasks,
/// from the viewed mark on (migration 11).
const UNVIEWED_OF_X: &str = "(SELECT COUNT(*) FROM tasks t
       WHERE t.rule = x.rule AND t.vm = x.vm AND t.state IN FAILURES
         AND t.id > COALESCE((SELECT s.failures_viewed_through FROM vm_status s
                              WHERE s.rule = x.rule AND s.vm = x.vm), 0))";

/// Per VM of rule ?1 with a failed task (only VM ?2 when not null): its
/// unviewed failures, when any.
fn unviewed_sql() -> String {
    format!(
        "SELECT vm, n FROM (SELECT x.vm, {UNVIEWED_OF_X} AS n FROM (
           SELECT DISTINCT rule, vm FROM tasks
           WHERE rule = ?1 AND (?2 IS NULL OR vm = ?2) AND state IN FAILURES) x)
         WHERE n > 0"
    )
    .replace("FAILURES", TaskState::FAILURE_SQL)
}

/// Per VM of every rule: its unviewed failures, when any.
fn unviewed_of_rule_vms_sql() -> String {
    format!(
        "SELECT rule, vm, n FROM (SELECT x.rule, x.vm, {UNVIEWED_OF_X} AS n FROM rule_vms x)
         WHERE n > 0"
    )
    .replace("FAILURES", TaskState::FAILURE_SQL)
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

    /// Unviewed failures of every VM of every rule, keyed by (rule, VM) (one
    /// statement for listings); VMs with none are left out.
    pub fn unviewed_failures_of_rule_vms(&self) -> Result<HashMap<(String, String), u64>> {
        let mut st = self.conn().prepare_cached(&unviewed_of_rule_vms_sql())?;
        let rows = st
            .query_map([], |r| {
                Ok(((r.get(0)?, r.get(1)?), r.get::<_, i64>(2)? as u64))
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
    fn plan(state: &State, sql: &str, params: &[&dyn rusqlite::ToSql]) -> String {
        let mut st = state
            .conn()
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap();
        let rows = st
            .query_map(params, |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap();
        rows.join("\n")
    }

    /// Unviewed failures are counted from the partial index of failed tasks
    /// (migration 11), from the viewed mark on; its list must be
    /// `TaskState::FAILURE_SQL`: were the two to differ, SQLite would read
    /// every task of the VM instead.
    #[test]
    fn unviewed_failures_read_the_failure_index() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("state.db")).unwrap();
        // A range of the index from the mark on (SQLite names the key id or rowid).
        let range = |p: &str| {
            p.contains("tasks_failures_by_rule (rule=? AND vm=? AND ") && p.contains("id>?)")
        };
        for vm in [None, Some("vm1")] {
            let p = plan(&state, &unviewed_sql(), params!["r", vm]);
            assert!(range(&p), "{p}");
        }
        let p = plan(&state, &unviewed_of_rule_vms_sql(), params![]);
        assert!(range(&p), "{p}");
    }
}
