//! Per-VM counters kept beside the task history (R33): which failed tasks
//! `stats` has shown (the rest are "unviewed"), how many points the VM's
//! repository holds after the last task that changed them, and what the last
//! `verify` found. Everything `stats`, `rule list/show` and the Prometheus file
//! report comes from here and from the task rows, never from a repository scan.
//!
//! The row also holds what listings need of the VM's task history without
//! searching it: its newest task, its newest completed backup and its count of
//! unviewed failures. The schema's triggers keep those three (migration 12,
//! their one definition); nothing here writes them.

use std::collections::BTreeMap;

use anyhow::Result;
use rusqlite::{params, OptionalExtension};

use super::State;

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

/// Unviewed failures per VM of `rule` (only `vm` when given), VMs with none
/// left out: the counts the schema's triggers keep in `vm_status` (migration 12).
fn unviewed_of(
    conn: &rusqlite::Connection,
    rule: &str,
    vm: Option<&str>,
) -> Result<BTreeMap<String, u64>> {
    let mut st = conn.prepare_cached(
        "SELECT vm, unviewed_failures FROM vm_status
         WHERE rule = ?1 AND (?2 IS NULL OR vm = ?2) AND unviewed_failures > 0",
    )?;
    let rows = st
        .query_map(params![rule, vm], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

impl State {
    /// The counters of a rule's VM.
    pub fn vm_status(&self, rule: &str, vm: &str) -> Result<VmStatus> {
        let row = self
            .conn()
            .prepare_cached(
                "SELECT unviewed_failures, points, last_verify, damaged_points FROM vm_status
                 WHERE rule = ?1 AND vm = ?2",
            )?
            .query_row(params![rule, vm], |r| {
                Ok(VmStatus {
                    unviewed_failures: r.get::<_, i64>(0)? as u64,
                    points: r.get::<_, Option<i64>>(1)?.map(|n| n as u64),
                    last_verify: r.get(2)?,
                    damaged_points: r.get::<_, Option<i64>>(3)?.map(|n| n as u64),
                })
            })
            .optional()?;
        Ok(row.unwrap_or_default())
    }

    /// Unviewed failures per VM of `rule` (only `vm` when given); VMs with none
    /// are left out.
    pub fn unviewed_failures(&self, rule: &str, vm: Option<&str>) -> Result<BTreeMap<String, u64>> {
        unviewed_of(self.conn(), rule, vm)
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
        self.write(|tx| {
            let counts = unviewed_of(tx, rule, vm)?;
            if !peek {
                // Every VM with a task has its row, holding its newest task
                // (migration 12); the mark's trigger counts again from it.
                tx.execute(
                    "UPDATE vm_status SET
                       failures_viewed_through = MAX(failures_viewed_through, COALESCE(last_task, 0))
                     WHERE rule = ?1 AND (?2 IS NULL OR vm = ?2)",
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
    use proptest::prelude::*;

    use super::*;
    use crate::state::schema;
    use crate::state::tasks::COMPLETED_BACKUP_SQL;
    use crate::task::TaskState;

    const STATES: [&str; 7] = [
        "queued",
        "pending",
        "running",
        "completed",
        "failed",
        "skipped",
        "interrupted",
    ];
    const KINDS: [&str; 3] = ["backup", "restore", "prune"];
    const RULES: [&str; 2] = ["r1", "r2"];
    const VMS: [&str; 3] = ["a", "b", "c"];

    /// A change any writer of the state store could make.
    #[derive(Debug, Clone)]
    enum Change {
        Insert {
            rule: usize,
            vm: usize,
            kind: usize,
            state: usize,
        },
        SetState {
            pick: usize,
            state: usize,
        },
        Delete {
            pick: usize,
        },
        View {
            rule: usize,
            vm: Option<usize>,
        },
        Points {
            rule: usize,
            vm: usize,
        },
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            4 => (0..2usize, 0..3usize, 0..3usize, 0..7usize)
                .prop_map(|(rule, vm, kind, state)| Change::Insert { rule, vm, kind, state }),
            4 => (any::<usize>(), 0..7usize).prop_map(|(pick, state)| Change::SetState { pick, state }),
            1 => any::<usize>().prop_map(|pick| Change::Delete { pick }),
            1 => (0..2usize, proptest::option::of(0..3usize))
                .prop_map(|(rule, vm)| Change::View { rule, vm }),
            1 => (0..2usize, 0..3usize).prop_map(|(rule, vm)| Change::Points { rule, vm }),
        ]
    }

    /// The id of the `pick`th task (modulo their number), if there is one.
    fn pick_task(state: &State, pick: usize) -> Option<i64> {
        let ids: Vec<i64> = state
            .conn()
            .prepare("SELECT id FROM tasks ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        (!ids.is_empty()).then(|| ids[pick % ids.len()])
    }

    fn apply(state: &mut State, c: &Change) {
        let conn = state.conn();
        match *c {
            Change::Insert {
                rule,
                vm,
                kind,
                state: st,
            } => {
                conn.execute(
                    "INSERT INTO tasks (kind, rule, vm, state, created_at) VALUES (?1, ?2, ?3, ?4, 'now')",
                    params![KINDS[kind], RULES[rule], VMS[vm], STATES[st]],
                )
                .unwrap();
            }
            Change::SetState { pick, state: st } => {
                if let Some(id) = pick_task(state, pick) {
                    conn.execute(
                        "UPDATE tasks SET state = ?2 WHERE id = ?1",
                        params![id, STATES[st]],
                    )
                    .unwrap();
                }
            }
            Change::Delete { pick } => {
                if let Some(id) = pick_task(state, pick) {
                    conn.execute("DELETE FROM tasks WHERE id = ?1", [id])
                        .unwrap();
                }
            }
            Change::View { rule, vm } => {
                state
                    .take_unviewed_failures(RULES[rule], vm.map(|v| VMS[v]), false)
                    .unwrap();
            }
            Change::Points { rule, vm } => state.set_vm_points(RULES[rule], VMS[vm], 3).unwrap(),
        }
    }

    /// (last task, last completed backup, unviewed failures) of a VM as its
    /// `vm_status` row holds them, and as its task history says they are.
    type Three = (Option<i64>, Option<i64>, u64);

    fn kept_and_recomputed(state: &State, rule: &str, vm: &str) -> (Option<Three>, Three) {
        let conn = state.conn();
        let kept = conn
            .query_row(
                "SELECT last_task, last_backup, unviewed_failures FROM vm_status WHERE rule = ?1 AND vm = ?2",
                [rule, vm],
                |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)),
            )
            .optional()
            .unwrap();
        let mark: i64 = conn
            .query_row(
                "SELECT failures_viewed_through FROM vm_status WHERE rule = ?1 AND vm = ?2",
                [rule, vm],
                |r| r.get(0),
            )
            .optional()
            .unwrap()
            .unwrap_or(0);
        let one = |sql: &str| -> Option<i64> {
            conn.query_row(sql, params![rule, vm, mark], |r| r.get(0))
                .unwrap()
        };
        let recomputed = (
            one("SELECT MAX(id) FROM tasks WHERE rule = ?1 AND vm = ?2 AND ?3 = ?3"),
            one(&format!(
                "SELECT MAX(id) FROM tasks WHERE rule = ?1 AND vm = ?2 AND ?3 = ?3 AND {COMPLETED_BACKUP_SQL}"
            )),
            one(&format!(
                "SELECT COUNT(*) FROM tasks WHERE rule = ?1 AND vm = ?2 AND id > ?3 AND state IN {}",
                TaskState::FAILURE_SQL
            ))
            .unwrap_or(0) as u64,
        );
        (kept, recomputed)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The triggers of migration 12 keep each VM's newest task, newest
        /// completed backup and unviewed failures equal to what its task
        /// history says, whatever writes, state changes, deletes and views
        /// come in whatever order; every VM with a task has its row.
        #[test]
        fn the_kept_values_always_equal_the_history(changes in proptest::collection::vec(change(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut state = State::open(&dir.path().join("state.db")).unwrap();
            for c in &changes {
                apply(&mut state, c);
                for rule in RULES {
                    for vm in VMS {
                        let (kept, recomputed) = kept_and_recomputed(&state, rule, vm);
                        match kept {
                            Some(kept) => prop_assert_eq!(kept, recomputed, "{} {} after {:?}", rule, vm, c),
                            None => prop_assert_eq!(recomputed, (None, None, 0), "{} {}: no row", rule, vm),
                        }
                    }
                }
            }
        }
    }

    /// A state store written before migration 12 gets the three values of
    /// every VM with a task, including VMs whose failures were partly viewed.
    #[test]
    fn the_migration_fills_the_values_from_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            schema::migrate_to(&mut conn, 11).unwrap();
            let mut id = 0;
            for (rule, vm, kind, st) in [
                ("r1", "a", "backup", "completed"),
                ("r1", "a", "backup", "failed"),
                ("r1", "a", "restore", "completed"),
                ("r1", "a", "backup", "interrupted"),
                ("r1", "b", "backup", "failed"),
                ("r2", "a", "backup", "completed"),
                ("r2", "a", "backup", "running"),
            ] {
                id += 1;
                conn.execute(
                    "INSERT INTO tasks (id, kind, rule, vm, state, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'now')",
                    params![id, kind, rule, vm, st],
                )
                .unwrap();
            }
            // r1/a viewed through task 2: only task 4 is unviewed.
            conn.execute(
                "INSERT INTO vm_status (rule, vm, failures_viewed_through) VALUES ('r1', 'a', 2)",
                [],
            )
            .unwrap();
        }
        let state = State::open(&path).unwrap();
        let kept = |rule, vm| kept_and_recomputed(&state, rule, vm);
        assert_eq!(
            kept("r1", "a"),
            (Some((Some(4), Some(1), 1)), (Some(4), Some(1), 1))
        );
        assert_eq!(
            kept("r1", "b"),
            (Some((Some(5), None, 1)), (Some(5), None, 1))
        );
        assert_eq!(
            kept("r2", "a"),
            (Some((Some(7), Some(6), 0)), (Some(7), Some(6), 0))
        );
    }

    /// The triggers and the view spell "a failure" and "a completed backup"
    /// as the Rust side does (TaskState::FAILURE_SQL, COMPLETED_BACKUP_SQL):
    /// migration 12, which made them, and 13, which said the recount once.
    #[test]
    fn the_triggers_use_the_shared_definitions() {
        for version in [12, 13] {
            let sql = schema::migration(version);
            assert!(sql.contains(&format!("state IN {}", TaskState::FAILURE_SQL)));
            assert!(sql.contains(COMPLETED_BACKUP_SQL));
            let new_spelling = COMPLETED_BACKUP_SQL
                .replace("kind", "new.kind")
                .replace("state", "new.state");
            assert!(sql.contains(&new_spelling));
            assert!(
                !sql.contains("('failed', 'interrupted')"),
                "one spelling of the list"
            );
        }
    }

    /// The first statement of trigger `name` as migration 13 defines it, its
    /// `new.`/`old.` rule and VM as parameters ?1 and ?2.
    fn trigger_statement(name: &str) -> String {
        let sql = schema::migration(13);
        let at = sql.find(&format!("CREATE TRIGGER {name} ")).unwrap();
        let body = &sql[at + sql[at..].find("BEGIN").unwrap() + "BEGIN".len()..];
        body[..body.find(';').unwrap()]
            .replace("new.rule", "?1")
            .replace("old.rule", "?1")
            .replace("new.vm", "?2")
            .replace("old.vm", "?2")
    }

    fn plan_of(state: &State, sql: &str) -> String {
        let plan: Vec<String> = state
            .conn()
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(params!["r", "a"], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        plan.join("\n")
    }

    /// The view is evaluated for the one VM a trigger names, by key, never by
    /// a scan of vm_status or of the task history; a moved viewed mark counts
    /// from the mark on, a range of the partial index of failed tasks
    /// (migration 11). The statements are the triggers' own.
    #[test]
    fn the_recount_reads_one_vm_by_its_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("state.db")).unwrap();
        let viewed = plan_of(&state, &trigger_statement("vm_status_viewed"));
        assert!(
            viewed.contains("tasks_failures_by_rule (rule=? AND vm=? AND id>?)"),
            "{viewed}"
        );
        for name in [
            "vm_status_ins",
            "vm_status_viewed",
            "tasks_status_del",
            "tasks_status_move",
        ] {
            let plan = plan_of(&state, &trigger_statement(name));
            assert!(!plan.contains("SCAN"), "{name}: {plan}");
            assert!(plan.contains("SEARCH"), "{name}: {plan}");
        }
    }
}
