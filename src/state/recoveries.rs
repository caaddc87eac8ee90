//! Recoveries (issue 11, R32): a restore point served by a background NBD
//! server of vmbackup's, maybe with a VM running on overlays of it, maybe being
//! migrated to production storage. A recovery outlives the command that started
//! it, so what `recover list/stop/resume/abort` need is kept here; its task rows
//! (kind `recovery`, `migration`) carry the phases, logs and the served point.
//! Also: VMs whose next backup must be a full (`vm_resets`, after an in-place
//! restore), with the reason.

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::slots::now_millis_text;
use super::State;

/// How a recovery runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryMode {
    /// Served and (maybe) running on overlays; nothing migrated (瞬时恢复).
    Transient,
    /// Started as transient, its data moving to production storage (即时恢复).
    Instant,
}

/// Where a recovery is in its life (its tasks have their own `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryStage {
    /// The server serves the point; a VM may run on overlays.
    Serving,
    /// A migration (mirror) is under way or was interrupted.
    Migrating,
    /// The VM runs on its new images; the export is closed.
    Migrated,
    /// Stopped: VM, server and (unless kept) overlays are gone.
    Stopped,
}

macro_rules! words {
    ($ty:ident { $($v:ident = $w:literal),* $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$v => $w),* }
            }
        }
        impl std::str::FromStr for $ty {
            type Err = anyhow::Error;
            fn from_str(s: &str) -> Result<Self> {
                match s { $($w => Ok($ty::$v),)* other => anyhow::bail!("unknown {} '{other}'", stringify!($ty)) }
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
    };
}
words!(RecoveryMode { Transient = "transient", Instant = "instant" });
words!(RecoveryStage { Serving = "serving", Migrating = "migrating", Migrated = "migrated", Stopped = "stopped" });

/// One disk of a recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveredDisk {
    pub disk: String,
    /// NBD export name (the disk's name).
    pub export: String,
    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub uri: String,
    pub size: u64,
    /// The qcow2 overlay taking the VM's writes.
    pub overlay: String,
    /// The block node of the overlay in the recovered VM (when started).
    pub node: Option<String>,
    /// Instant recovery: the image the disk is migrated to.
    pub target: Option<String>,
}

/// A recovery as stored.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryRow {
    pub id: i64,
    pub task: i64,
    pub rule: String,
    pub vm: String,
    pub point: String,
    pub mode: RecoveryMode,
    pub stage: RecoveryStage,
    pub dir: String,
    pub socket: String,
    pub server_pid: Option<i64>,
    pub vm_name: Option<String>,
    pub vm_pid: Option<i64>,
    pub vm_qmp: Option<String>,
    pub disks: Vec<RecoveredDisk>,
    pub target_dir: Option<String>,
    pub qmp_dir: Option<String>,
    /// Instant recovery: the migration task that mirrors (or last mirrored) it.
    pub migration_task: Option<i64>,
    #[serde(serialize_with = "crate::timefmt::stored")]
    pub created: String,
    #[serde(serialize_with = "crate::timefmt::stored_opt")]
    pub finished: Option<String>,
}

const COLS: &str = "id, task, rule, vm, point, mode, stage, dir, socket, server_pid, vm_name, vm_pid, vm_qmp, disks, target_dir, qmp_dir, migration_task, created, finished";

fn from_row(r: &rusqlite::Row) -> rusqlite::Result<RecoveryRow> {
    let word = |i: usize| -> rusqlite::Result<String> { r.get(i) };
    let parse_err = |i: usize, e: anyhow::Error| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    let disks: String = r.get(13)?;
    Ok(RecoveryRow {
        id: r.get(0)?,
        task: r.get(1)?,
        rule: r.get(2)?,
        vm: r.get(3)?,
        point: r.get(4)?,
        mode: word(5)?.parse().map_err(|e| parse_err(5, e))?,
        stage: word(6)?.parse().map_err(|e| parse_err(6, e))?,
        dir: r.get(7)?,
        socket: r.get(8)?,
        server_pid: r.get(9)?,
        vm_name: r.get(10)?,
        vm_pid: r.get(11)?,
        vm_qmp: r.get(12)?,
        disks: serde_json::from_str(&disks).map_err(|e| parse_err(13, e.into()))?,
        target_dir: r.get(14)?,
        qmp_dir: r.get(15)?,
        migration_task: r.get(16)?,
        created: r.get(17)?,
        finished: r.get(18)?,
    })
}

impl State {
    /// Record a new recovery started by task `task` (its id is the task's).
    pub fn add_recovery(&mut self, row: &RecoveryRow) -> Result<()> {
        let disks = serde_json::to_string(&row.disks)?;
        self.write(|tx| {
            tx.execute(
                &format!("INSERT INTO recoveries ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"),
                params![
                    row.id, row.task, row.rule, row.vm, row.point, row.mode.as_str(), row.stage.as_str(),
                    row.dir, row.socket, row.server_pid, row.vm_name, row.vm_pid, row.vm_qmp, disks,
                    row.target_dir, row.qmp_dir, row.migration_task, row.created, row.finished
                ],
            )?;
            Ok(())
        })
        .with_context(|| format!("cannot record recovery {}", row.id))
    }

    /// Store every changeable field of `row`.
    pub fn update_recovery(&mut self, row: &RecoveryRow) -> Result<()> {
        let disks = serde_json::to_string(&row.disks)?;
        self.write(|tx| {
            tx.execute(
                "UPDATE recoveries SET task = ?2, mode = ?3, stage = ?4, server_pid = ?5, vm_name = ?6,
                 vm_pid = ?7, vm_qmp = ?8, disks = ?9, target_dir = ?10, qmp_dir = ?11, migration_task = ?12,
                 finished = ?13 WHERE id = ?1",
                params![
                    row.id, row.task, row.mode.as_str(), row.stage.as_str(), row.server_pid, row.vm_name,
                    row.vm_pid, row.vm_qmp, disks, row.target_dir, row.qmp_dir, row.migration_task,
                    row.finished
                ],
            )?;
            Ok(())
        })
        .with_context(|| format!("cannot record recovery {}", row.id))
    }

    pub fn recovery(&self, id: i64) -> Result<Option<RecoveryRow>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLS} FROM recoveries WHERE id = ?1"),
                [id],
                from_row,
            )
            .optional()?)
    }

    /// A recovery by id, or a validation error listing the recoveries not stopped.
    pub fn require_recovery(&self, id: i64) -> Result<RecoveryRow> {
        match self.recovery(id)? {
            Some(r) => Ok(r),
            None => {
                let ids: Vec<String> = self
                    .recoveries(false)?
                    .iter()
                    .map(|r| r.id.to_string())
                    .collect();
                Err(crate::error::invalid(
                    "recovery",
                    id,
                    format!(
                        "no such recovery; recoveries: {}",
                        if ids.is_empty() {
                            "(none)".into()
                        } else {
                            ids.join(", ")
                        }
                    ),
                ))
            }
        }
    }

    /// Recoveries, newest first; `all` includes stopped ones.
    pub fn recoveries(&self, all: bool) -> Result<Vec<RecoveryRow>> {
        let filter = if all { "" } else { "WHERE stage != 'stopped'" };
        let mut st = self.conn().prepare(&format!(
            "SELECT {COLS} FROM recoveries {filter} ORDER BY id DESC"
        ))?;
        let rows = st
            .query_map([], from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Points of a rule's VM that recoveries serve or will serve again (serving
    /// or migrating, whether or not their server runs now: `recover resume`
    /// restarts it), with why. Prune and forget keep them (`points_in_use`).
    pub fn points_served(&self, rule: &str, vm: &str) -> Result<Vec<(String, String)>> {
        let mut st = self.conn().prepare(
            "SELECT id, stage, point FROM recoveries WHERE rule = ?1 AND vm = ?2
             AND stage IN ('serving', 'migrating') ORDER BY id",
        )?;
        let rows = st
            .query_map([rule, vm], |r| {
                let (id, stage, point): (i64, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
                Ok((
                    point,
                    format!("served by recovery {id} ({stage}; 'vmbackup recover stop {id}' releases it)"),
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Mark a VM so that its next backup runs as a full, with `reason` (R26).
    pub fn set_vm_reset(&mut self, rule: &str, vm: &str, reason: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO vm_resets (rule, vm, reason, created) VALUES (?1, ?2, ?3, ?4)",
                params![rule, vm, reason, now_millis_text()],
            )?;
            Ok(())
        })
    }

    /// Why the VM's next backup must be a full, if it must.
    pub fn vm_reset(&self, rule: &str, vm: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT reason FROM vm_resets WHERE rule = ?1 AND vm = ?2",
                [rule, vm],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// A full backup of the VM was committed: the reset has done its work.
    pub fn clear_vm_reset(&mut self, rule: &str, vm: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM vm_resets WHERE rule = ?1 AND vm = ?2",
                [rule, vm],
            )?;
            Ok(())
        })
    }
}
