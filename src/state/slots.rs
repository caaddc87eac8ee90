//! Task admission and slot leases (R28, R38, R41, R42, R44).
//!
//! A task row is queued (or recorded as skipped when its rule+VM already has an
//! active task, R28), then takes a lease in `slot_leases` before it runs. Leases are
//! counted and taken inside one IMMEDIATE transaction, so the daemon, `run-due` and
//! `run-now` together never hold more than `bk_tsk_thd` leases, nor more than
//! `Max_ThreadNum_PerHost` for one platform. A task that cannot get a slot is
//! `pending` with the reason in `waiting`.
//!
//! Each lease names its process and carries a heartbeat. A lease whose process is
//! gone (or whose heartbeat is older than [`STALE_AFTER_SECS`]) is reclaimed: its
//! task becomes `interrupted`, and the caller runs the engine's cleanup for that VM.

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension, Transaction};

use super::tasks::{TaskRow, ACTIVE_STATES};
use super::State;
use crate::error::refused;
use crate::task::{TaskKind, TaskState};

/// A lease whose heartbeat is this old is taken to belong to a hung process.
pub const STALE_AFTER_SECS: i64 = 120;

/// The slot limits (system.conf).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `bk_tsk_thd` (R38).
    pub global: u32,
    /// `Max_ThreadNum_PerHost` (R42).
    pub per_host: u32,
}

/// What queueing a task did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Queued(i64),
    /// Recorded as skipped (R28): `task` is the skipped row, `reason` says why.
    Skipped {
        task: i64,
        reason: String,
    },
}

/// What asking for a slot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotAnswer {
    Granted,
    /// No slot free: the task is pending for this reason.
    Wait(String),
    /// Someone asked to cancel the task while it waited.
    Cancelled,
}

/// A task whose process died, taken back by [`State::reclaim_dead`].
#[derive(Debug, Clone)]
pub struct Reclaimed {
    pub task: TaskRow,
    /// It was running: the VM may hold snapshot/bitmap/export leftovers (R44).
    pub needs_cleanup: bool,
}

/// Now, RFC 3339 UTC with milliseconds (task start/end times are compared).
pub fn now_millis_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Whether process `pid` exists (a zombie counts as existing).
pub fn pid_alive(pid: i64) -> bool {
    if pid == std::process::id() as i64 {
        return true;
    }
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::test_kill_process(p) {
        Ok(()) => true,
        Err(e) => e != rustix::io::Errno::SRCH,
    }
}

fn active_task_of(tx: &Transaction, rule: &str, vm: &str) -> Result<Option<(i64, TaskState)>> {
    Ok(tx
        .query_row(
            &format!(
                "SELECT id, state FROM tasks WHERE rule = ?1 AND vm = ?2 AND kind = ?3
                 AND state IN {ACTIVE_STATES} ORDER BY id LIMIT 1"
            ),
            params![rule, vm, TaskKind::Backup],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

impl State {
    /// Queue a task for this process, unless (for a kind that
    /// [skips](TaskKind::skips_when_active)) its rule+VM already has a queued,
    /// pending or running backup: then record a skipped row instead (R28).
    /// `slot` (a schedule's instant, RFC 3339) is recorded in `schedule_runs` in the
    /// same transaction, so a slot is admitted at most once across processes; an
    /// already recorded slot returns `None`. `point` is the point a task reads
    /// (restore, recovery, boot verification): recorded from admission on, so prune and forget leave it alone.
    pub fn admit_task(
        &mut self,
        kind: TaskKind,
        rule: &str,
        vm: &str,
        level: Option<&str>,
        point: Option<&str>,
        slot: Option<&str>,
    ) -> Result<Option<Admission>> {
        let pid = std::process::id() as i64;
        self.write(|tx| {
            if let Some(slot) = slot {
                let seen: Option<i64> = tx
                    .query_row(
                        "SELECT 1 FROM schedule_runs WHERE rule = ?1 AND vm = ?2 AND slot = ?3",
                        params![rule, vm, slot],
                        |r| r.get(0),
                    )
                    .optional()?;
                if seen.is_some() {
                    return Ok(None);
                }
            }
            let now = now_millis_text();
            let busy = if kind.skips_when_active() {
                active_task_of(tx, rule, vm)?
            } else {
                None
            };
            let admission = match busy {
                Some((other, other_state)) => {
                    let reason = format!(
                        "skipped: task {other} of rule '{rule}' VM '{vm}' is still {other_state} (R28)"
                    );
                    tx.execute(
                        "INSERT INTO tasks (kind, rule, vm, level, state, message, pid, created_at, finished_at)
                         VALUES (?1, ?2, ?3, ?4, 'skipped', ?5, ?6, ?7, ?7)",
                        params![kind, rule, vm, level, reason, pid, now],
                    )?;
                    let task = tx.last_insert_rowid();
                    tx.execute(
                        "INSERT INTO task_logs (task, ts, level, message) VALUES (?1, ?2, 'warn', ?3)",
                        params![task, now_millis_text(), reason],
                    )?;
                    Admission::Skipped { task, reason }
                }
                None => {
                    tx.execute(
                        "INSERT INTO tasks (kind, rule, vm, level, state, pid, created_at, point)
                         VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7)",
                        params![kind, rule, vm, level, pid, now, point],
                    )?;
                    Admission::Queued(tx.last_insert_rowid())
                }
            };
            if let Some(slot) = slot {
                let (task, outcome) = match &admission {
                    Admission::Queued(t) => (*t, "queued"),
                    Admission::Skipped { task, .. } => (*task, "skipped"),
                };
                tx.execute(
                    "INSERT INTO schedule_runs (rule, vm, slot, level, task, outcome, recorded_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![rule, vm, slot, level.unwrap_or("full"), task, outcome, now],
                )?;
            }
            Ok(Some(admission))
        })
    }

    /// Mark a task pending, with why it waits (a lock held by someone else).
    pub fn set_task_waiting(&mut self, task: i64, reason: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE tasks SET state = 'pending', waiting = ?2 WHERE id = ?1",
                params![task, reason],
            )?;
            Ok(())
        })
    }

    /// A task that takes no slot (prune, GC) starts running.
    pub fn set_task_running(&mut self, task: i64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE tasks SET state = 'running', waiting = NULL, started_at = ?2 WHERE id = ?1",
                params![task, now_millis_text()],
            )?;
            Ok(())
        })
    }

    /// Take a global and a per-platform slot for `task`, or mark it pending (R41).
    pub fn try_take_slot(
        &mut self,
        task: i64,
        platform: &str,
        limits: Limits,
    ) -> Result<SlotAnswer> {
        let pid = std::process::id() as i64;
        self.write(|tx| {
            let cancel: i64 = tx.query_row(
                "SELECT cancel_requested FROM tasks WHERE id = ?1",
                [task],
                |r| r.get(0),
            )?;
            if cancel != 0 {
                return Ok(SlotAnswer::Cancelled);
            }
            let global: u32 = tx.query_row("SELECT COUNT(*) FROM slot_leases", [], |r| r.get(0))?;
            let host: u32 = tx.query_row(
                "SELECT COUNT(*) FROM slot_leases WHERE platform = ?1",
                [platform],
                |r| r.get(0),
            )?;
            let reason = if global >= limits.global {
                Some(format!(
                    "waiting for a slot: {global} of {} tasks running (bk_tsk_thd)",
                    limits.global
                ))
            } else if host >= limits.per_host {
                Some(format!(
                    "waiting for a slot on platform '{platform}': {host} of {} running (Max_ThreadNum_PerHost)",
                    limits.per_host
                ))
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    tx.execute(
                        "UPDATE tasks SET state = 'pending', waiting = ?2 WHERE id = ?1",
                        params![task, reason],
                    )?;
                    Ok(SlotAnswer::Wait(reason))
                }
                None => {
                    tx.execute(
                        "INSERT INTO slot_leases (task, pid, platform, heartbeat) VALUES (?1, ?2, ?3, ?4)",
                        params![task, pid, platform, unix_now()],
                    )?;
                    tx.execute(
                        "UPDATE tasks SET state = 'running', phase = 'preparing', waiting = NULL,
                         started_at = ?2 WHERE id = ?1",
                        params![task, now_millis_text()],
                    )?;
                    Ok(SlotAnswer::Granted)
                }
            }
        })
    }

    /// Hand a running task to process `pid` (a background server that goes on
    /// with it, or a command taking it over to stop it): its slot, if any, is
    /// released; it stays running, in `phase`.
    pub fn hand_over_task(&mut self, task: i64, pid: u32, phase: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM slot_leases WHERE task = ?1", [task])?;
            tx.execute(
                "UPDATE tasks SET pid = ?2, phase = ?3, rate = 0 WHERE id = ?1",
                params![task, pid, phase],
            )?;
            Ok(())
        })
    }

    /// Finish a task and release its slot in one step; `state` is a final state.
    pub fn end_task(
        &mut self,
        task: i64,
        state: TaskState,
        point: Option<&str>,
        message: Option<&str>,
    ) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM slot_leases WHERE task = ?1", [task])?;
            tx.execute(
                "UPDATE tasks SET state = ?2, phase = NULL, waiting = NULL, rate = 0,
                 point = COALESCE(?3, point), message = ?4, finished_at = ?5,
                 percent = CASE WHEN ?2 = 'completed' THEN 100 ELSE percent END WHERE id = ?1",
                params![task, state, point, message, now_millis_text()],
            )?;
            super::logs::prune_logs(tx)?;
            Ok(())
        })
    }

    /// Refresh this process's lease heartbeats; returns the ids of its active tasks
    /// someone asked to cancel.
    pub fn heartbeat(&mut self) -> Result<Vec<i64>> {
        let pid = std::process::id() as i64;
        self.write(|tx| {
            tx.execute(
                "UPDATE slot_leases SET heartbeat = ?2 WHERE pid = ?1",
                params![pid, unix_now()],
            )?;
            let mut st = tx.prepare(&format!(
                "SELECT id FROM tasks WHERE pid = ?1 AND cancel_requested = 1 AND state IN {ACTIVE_STATES}"
            ))?;
            let ids = st
                .query_map([pid], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            Ok(ids)
        })
    }

    /// Take back the leases and active tasks of processes that are gone: their tasks
    /// become interrupted. The caller cleans up the VMs of those that were running.
    pub fn reclaim_dead(&mut self) -> Result<Vec<Reclaimed>> {
        let stale_before = unix_now() - STALE_AFTER_SECS;
        let found = self.write(|tx| {
            // Two halves, each on an index (an OR across the join would scan
            // every task ever run): active tasks, and tasks holding a lease.
            let mut st = tx.prepare(&format!(
                "SELECT t.id, t.pid, t.state, l.heartbeat FROM tasks t
                 LEFT JOIN slot_leases l ON l.task = t.id
                 WHERE t.state IN {ACTIVE_STATES}
                 UNION
                 SELECT t.id, t.pid, t.state, l.heartbeat FROM slot_leases l
                 JOIN tasks t ON t.id = l.task"
            ))?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, TaskState>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut gone = Vec::new();
            for (id, pid, state, heartbeat) in rows {
                let dead = !pid.is_some_and(pid_alive);
                let stale = heartbeat.is_some_and(|h| h < stale_before)
                    && pid != Some(std::process::id() as i64);
                if !(dead || stale) {
                    continue;
                }
                let why = match (pid, stale && !dead) {
                    (Some(p), true) => format!("interrupted: the process running it (pid {p}) stopped sending heartbeats; its slot was reclaimed"),
                    (Some(p), false) => format!("interrupted: the process running it (pid {p}) is gone; its slot was reclaimed"),
                    (None, _) => "interrupted: no process runs it".to_string(),
                };
                tx.execute("DELETE FROM slot_leases WHERE task = ?1", [id])?;
                tx.execute(
                    "UPDATE tasks SET state = 'interrupted', phase = NULL, waiting = NULL, rate = 0,
                     message = ?2, finished_at = ?3 WHERE id = ?1 AND state IN ('queued','pending','running')",
                    params![id, why, now_millis_text()],
                )?;
                tx.execute(
                    "INSERT INTO task_logs (task, ts, level, message) VALUES (?1, ?2, 'warn', ?3)",
                    params![id, now_millis_text(), why],
                )?;
                gone.push((id, state == TaskState::Running));
            }
            Ok(gone)
        })?;
        let mut out = Vec::new();
        for (id, was_running) in found {
            if let Some(task) = self.task(id)? {
                out.push(Reclaimed {
                    needs_cleanup: was_running && task.kind.touches_the_vm(),
                    task,
                });
            }
        }
        Ok(out)
    }

    /// Ask the process running task `id` to stop it cleanly. A task whose process
    /// is gone is marked interrupted here.
    pub fn request_cancel(&mut self, id: i64) -> Result<TaskRow> {
        let task = self.task(id)?.ok_or_else(|| {
            crate::error::invalid("task", id, "no such task; see 'vmbackup task list --all'")
        })?;
        if !task.state.is_active() {
            return Err(refused(format!(
                "task {id} is already {}; only queued, pending or running tasks can be cancelled",
                task.state
            )));
        }
        self.write(|tx| {
            tx.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = ?1", [id])?;
            Ok(())
        })
        .with_context(|| format!("task {id}"))?;
        Ok(task)
    }

    /// Live rate and the bandwidth limit in force of a running task (R29, R30).
    pub fn set_task_rate(&mut self, id: i64, rate: u64, limit: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE tasks SET rate = ?2, bw_limit = ?3 WHERE id = ?1",
                params![id, rate as i64, limit],
            )?;
            Ok(())
        })
    }

    /// Bumped by every change to rules or their VMs (a trigger in the schema).
    pub fn config_generation(&self) -> Result<i64> {
        Ok(self.conn().query_row(
            "SELECT value FROM meta WHERE key = 'config_generation'",
            [],
            |r| r.get(0),
        )?)
    }

    /// The newest recorded schedule slot of a rule's VM (RFC 3339 UTC).
    pub fn last_schedule_slot(&self, rule: &str, vm: &str) -> Result<Option<String>> {
        Ok(self.conn().query_row(
            "SELECT MAX(slot) FROM schedule_runs WHERE rule = ?1 AND vm = ?2",
            params![rule, vm],
            |r| r.get(0),
        )?)
    }

    /// Whether this exact slot was recorded.
    pub fn schedule_slot_recorded(&self, rule: &str, vm: &str, slot: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM schedule_runs WHERE rule = ?1 AND vm = ?2 AND slot = ?3",
                params![rule, vm, slot],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .is_some())
    }
}
