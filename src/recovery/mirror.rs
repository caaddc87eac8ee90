//! Instant recovery's migration: QEMU mirrors each disk of the running
//! recovered VM (overlay + export) to a new qcow2 image, then pivots to it
//! (`blockdev-mirror` sync=full, `block-job-complete`). Progress, bandwidth
//! windows (R29: `block-job-set-speed`, `pause` pauses the job) and logs are a
//! task's like a backup's; it takes a slot (R38).
//!
//! The mirror jobs live in QEMU, not in the process driving them: if that
//! process dies, the VM keeps running on its overlays and the jobs go on;
//! the driver talks to the VM's QMP socket in short sessions (QEMU serves one
//! QMP client at a time: a held session would lock the sysadmin out);
//! `recover resume` attaches to them (or starts them again) and finishes;
//! `recover abort` cancels them and removes the partial images. When the pivot
//! is done the old overlay nodes are deleted, the server stops, and the VM's
//! QMP socket moves into the platform's directory under its new name.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::launch;
use crate::error::Error;
use crate::platform::qmp::{is_qmp_error, Qmp};
use crate::policy::bandwidth::Limit;
use crate::repo::encode_name;
use crate::state::recoveries::{RecoveryMode, RecoveryRow, RecoveryStage};
use crate::state::slots::{now_millis_text, pid_alive};
use crate::state::State;
use crate::task::progress::{LogLevel, Progress};
use crate::task::throttle::Throttle;
use crate::task::TaskState;

/// How often jobs are polled.
const POLL: Duration = Duration::from_millis(300);
/// How long the pivot of all disks may take.
const PIVOT_TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished migration produced.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    pub recovery: i64,
    pub point: String,
    /// The VM's name; its QMP socket is now in the platform's directory.
    pub vm: String,
    pub qmp: PathBuf,
    pub images: Vec<MigratedDisk>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigratedDisk {
    pub disk: String,
    pub path: PathBuf,
    pub size: u64,
}

impl MigrationReport {
    pub fn summary(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .images
            .iter()
            .map(|d| format!("disk {} migrated to {}", d.disk, d.path.display()))
            .collect();
        out.push(format!(
            "VM '{}' runs on its new images; its QMP socket is {}",
            self.vm,
            self.qmp.display()
        ));
        out
    }
}

fn job_id(disk: &str) -> String {
    format!("vmbackup-mirror-{}", encode_name(disk))
}

fn target_node(disk: &str) -> String {
    format!("vmbackup-migrated-{}", encode_name(disk))
}

/// A short QMP session with the recovered VM.
fn session(qmp: &Path) -> Result<Qmp> {
    Qmp::connect(qmp).context("the recovered VM's QMP socket")
}

/// Migrate recovery `id` (a running instant recovery) as task `task`.
pub fn migrate(
    state_path: &Path,
    id: i64,
    task: i64,
    throttle: &Throttle,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<MigrationReport> {
    let mut state = State::open(state_path)?;
    let mut row = state.require_recovery(id)?;
    check_migratable(&row)?;
    let target_dir = PathBuf::from(row.target_dir.as_deref().context("no target directory")?);
    let qmp_path = PathBuf::from(row.vm_qmp.as_deref().context("the recovery runs no VM")?);
    let mut qmp = session(&qmp_path)?;
    row.stage = RecoveryStage::Migrating;
    row.migration_task = Some(task);
    state.update_recovery(&row)?;
    progress.log(
        LogLevel::Info,
        &format!("migrating recovery {id} to {}", target_dir.display()),
    );

    let running = jobs(&mut qmp)?;
    for i in 0..row.disks.len() {
        let d = row.disks[i].clone();
        let node = d
            .node
            .clone()
            .context("the recovered VM has no node for a disk")?;
        let job = job_id(&d.disk);
        if running.contains_key(&job) {
            progress.log(
                LogLevel::Info,
                &format!(
                    "disk {}: the mirror job is still running; attaching",
                    d.disk
                ),
            );
            continue;
        }
        let path = target_dir.join(format!("{}.qcow2", encode_name(&d.disk)));
        let tnode = target_node(&d.disk);
        delete_node(&mut qmp, &tnode)?;
        if path.exists() {
            if d.target.as_deref() == Some(path.to_str().unwrap_or_default()) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            } else {
                return Err(crate::error::invalid(
                    "--to",
                    target_dir.display(),
                    format!("{} exists", path.display()),
                ));
            }
        }
        create_image(&path, d.size)?;
        row.disks[i].target = Some(path.display().to_string());
        state.update_recovery(&row)?;
        qmp.execute(
            "blockdev-add",
            json!({ "driver": "qcow2", "node-name": tnode, "file": { "driver": "file", "filename": path } }),
        )?;
        // The bandwidth window in force applies from the first byte (a pause
        // window: as slow as QEMU goes until `follow` pauses the job).
        let speed = match throttle.limit_now() {
            Some(Limit::Rate(r)) => r,
            Some(Limit::Pause) => 1,
            None => 0,
        };
        qmp.execute(
            "blockdev-mirror",
            json!({ "job-id": job, "device": node, "target": tnode, "sync": "full", "speed": speed }),
        )?;
        progress.log(
            LogLevel::Info,
            &format!("disk {}: mirroring to {}", d.disk, path.display()),
        );
    }

    drop(qmp);
    let res = follow(&qmp_path, &row, throttle, progress, cancel);
    let mut qmp = session(&qmp_path)?;
    if let Err(e) = res {
        if crate::error::is_interrupted(&e) {
            let actions = cleanup_jobs(&mut qmp, &mut row)?;
            row.stage = RecoveryStage::Serving;
            state.update_recovery(&row)?;
            progress.log(
                LogLevel::Warn,
                &format!("migration cancelled: {}", actions.join("; ")),
            );
        }
        return Err(e);
    }
    for d in &row.disks {
        qmp.execute("block-job-complete", json!({ "device": job_id(&d.disk) }))?;
    }
    drop(qmp);
    let t = Instant::now();
    while row.disks.iter().any(|d| {
        session(&qmp_path)
            .and_then(|mut q| jobs(&mut q))
            .map(|j| j.contains_key(&job_id(&d.disk)))
            .unwrap_or(true)
    }) {
        if t.elapsed() > PIVOT_TIMEOUT {
            bail!(
                "the mirror jobs did not finish their pivot within {} s",
                PIVOT_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(POLL);
    }
    let mut qmp = session(&qmp_path)?;
    check_pivot(&mut qmp, &row)?;
    for d in &row.disks {
        if let Some(node) = &d.node {
            if let Err(e) = qmp.execute("blockdev-del", json!({ "node-name": node })) {
                progress.log(
                    LogLevel::Warn,
                    &format!("cannot delete the old overlay node {node}: {e:#}"),
                );
            }
        }
    }
    progress.log(LogLevel::Info, "pivot done: the VM runs on its new images");
    drop(qmp);
    finish(&mut state, &mut row, progress)
}

/// Refuse what cannot be migrated, with the reason.
fn check_migratable(row: &RecoveryRow) -> Result<()> {
    if row.mode != RecoveryMode::Instant {
        return Err(crate::error::refused(format!(
            "recovery {} is a transient recovery: only an instant recovery ('recover --instant --to DIR') migrates",
            row.id
        )));
    }
    match row.stage {
        RecoveryStage::Serving | RecoveryStage::Migrating => {}
        other => {
            return Err(crate::error::refused(format!(
                "recovery {} is {other}",
                row.id
            )))
        }
    }
    if !row.vm_pid.is_some_and(pid_alive) {
        bail!("the VM of recovery {} is not running", row.id);
    }
    Ok(())
}

/// Our mirror jobs in QEMU: id → (offset, len, ready, paused).
fn jobs(qmp: &mut Qmp) -> Result<BTreeMap<String, (u64, u64, bool, bool)>> {
    let list = qmp.execute("query-block-jobs", Value::Null)?;
    Ok(list
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|j| {
                    let id = j["device"].as_str()?.to_string();
                    id.starts_with("vmbackup-mirror-").then(|| {
                        (
                            id,
                            (
                                j["offset"].as_u64().unwrap_or(0),
                                j["len"].as_u64().unwrap_or(0),
                                j["ready"].as_bool().unwrap_or(false),
                                j["paused"].as_bool().unwrap_or(false),
                            ),
                        )
                    })
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Follow the jobs until all are ready: progress, bandwidth windows, cancel.
fn follow(
    qmp_path: &Path,
    row: &RecoveryRow,
    throttle: &Throttle,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<()> {
    let mut done: BTreeMap<String, u64> = BTreeMap::new();
    let mut limit_set: Option<Option<Limit>> = None;
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(Error::Interrupted.into());
        }
        let mut qmp = session(qmp_path)?;
        let now = jobs(&mut qmp)?;
        let limit = throttle.limit_now();
        if limit_set != Some(limit) {
            for d in &row.disks {
                let job = job_id(&d.disk);
                match limit {
                    Some(Limit::Pause) => {
                        let _ = qmp.execute("block-job-pause", json!({ "device": job }));
                    }
                    other => {
                        let speed = match other {
                            Some(Limit::Rate(r)) => r,
                            _ => 0,
                        };
                        qmp.execute(
                            "block-job-set-speed",
                            json!({ "device": job, "speed": speed }),
                        )?;
                        let _ = qmp.execute("block-job-resume", json!({ "device": job }));
                    }
                }
            }
            progress.log(
                LogLevel::Info,
                &format!(
                    "bandwidth: {}",
                    limit
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "unlimited".into())
                ),
            );
            limit_set = Some(limit);
        }
        let mut all_ready = true;
        for d in &row.disks {
            let Some(&(offset, len, ready, _)) = now.get(&job_id(&d.disk)) else {
                bail!(
                    "the mirror job of disk '{}' ended before it was ready (see the VM's log)",
                    d.disk
                );
            };
            let prev = done.entry(d.disk.clone()).or_insert_with(|| {
                progress.disk_total(&d.disk, len);
                0
            });
            if offset > *prev {
                progress.advance(&d.disk, offset - *prev);
                *prev = offset;
            }
            all_ready &= ready;
        }
        if all_ready {
            return Ok(());
        }
        drop(qmp);
        std::thread::sleep(POLL);
    }
}

/// The guest devices now sit on the new images.
fn check_pivot(qmp: &mut Qmp, row: &RecoveryRow) -> Result<()> {
    let blocks = qmp.execute("query-block", Value::Null)?;
    let roots: Vec<String> = blocks
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["inserted"]["node-name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for d in &row.disks {
        if !roots.contains(&target_node(&d.disk)) {
            bail!(
                "disk '{}' did not pivot to its new image (devices sit on {roots:?})",
                d.disk
            );
        }
    }
    Ok(())
}

/// After the pivot: stop serving, end the recovery task, clean the overlays,
/// and put the VM's QMP socket into the platform's directory.
fn finish(
    state: &mut State,
    row: &mut RecoveryRow,
    progress: &dyn Progress,
) -> Result<MigrationReport> {
    let recovery_task = state.task(row.task)?.filter(|t| t.state.is_active());
    if recovery_task.is_some() {
        state.hand_over_task(row.task, std::process::id(), "stopping")?;
    }
    if let Some(pid) = row
        .server_pid
        .filter(|p| launch::pid_runs(*p, "recover-serve"))
    {
        launch::signal(pid, rustix::process::Signal::Term);
        launch::wait_gone(pid, Duration::from_secs(10));
    }
    for d in &row.disks {
        let _ = std::fs::remove_file(&d.overlay);
    }
    let name = row
        .vm_name
        .clone()
        .unwrap_or_else(|| format!("recovered-{}", row.id));
    let old = PathBuf::from(row.vm_qmp.clone().unwrap_or_default());
    let qmp_dir = row
        .qmp_dir
        .clone()
        .map(PathBuf::from)
        .unwrap_or_else(|| old.parent().unwrap_or(Path::new(".")).to_path_buf());
    let new = qmp_dir.join(format!("{}.qmp", encode_name(&name)));
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        &old,
        rustix::fs::CWD,
        &new,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .with_context(|| {
        format!(
            "cannot move the VM's QMP socket {} to {}",
            old.display(),
            new.display()
        )
    })?;
    let _ = std::fs::remove_dir_all(&row.dir);
    row.vm_qmp = Some(new.display().to_string());
    row.stage = RecoveryStage::Migrated;
    row.finished = Some(now_millis_text());
    state.update_recovery(row)?;
    if recovery_task.is_some() {
        state.end_task(
            row.task,
            TaskState::Completed,
            Some(&row.point),
            Some("migrated: the export is closed"),
        )?;
    }
    progress.log(
        LogLevel::Info,
        &format!("QMP socket of VM '{name}' is {}", new.display()),
    );
    Ok(MigrationReport {
        recovery: row.id,
        point: row.point.clone(),
        vm: name,
        qmp: new,
        images: row
            .disks
            .iter()
            .map(|d| MigratedDisk {
                disk: d.disk.clone(),
                path: PathBuf::from(d.target.clone().unwrap_or_default()),
                size: d.size,
            })
            .collect(),
    })
}

/// Cancel our mirror jobs, delete their target nodes, remove the partial images.
fn cleanup_jobs(qmp: &mut Qmp, row: &mut RecoveryRow) -> Result<Vec<String>> {
    let mut actions = Vec::new();
    for d in &row.disks {
        let job = job_id(&d.disk);
        match qmp.execute("block-job-cancel", json!({ "device": job, "force": true })) {
            Ok(_) => actions.push(format!("cancelled the mirror job of disk {}", d.disk)),
            Err(e) if is_qmp_error(&e, "not found") || is_qmp_error(&e, "DeviceNotActive") => {}
            Err(e) => return Err(e),
        }
    }
    let t = Instant::now();
    while !jobs(qmp)?.is_empty() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(POLL);
    }
    for d in row.disks.iter_mut() {
        delete_node(qmp, &target_node(&d.disk))?;
        if let Some(t) = d.target.take() {
            if std::fs::remove_file(&t).is_ok() {
                actions.push(format!("removed the partial image {t}"));
            }
        }
    }
    Ok(actions)
}

/// Delete a node if it exists.
fn delete_node(qmp: &mut Qmp, node: &str) -> Result<()> {
    match qmp.execute("blockdev-del", json!({ "node-name": node })) {
        Ok(_) => Ok(()),
        Err(e) if is_qmp_error(&e, "Failed to find node") || is_qmp_error(&e, "not found") => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn create_image(path: &Path, size: u64) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .output()
        .context("cannot run qemu-img")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(path);
        bail!(
            "cannot create {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `recover abort`: stop a migration (asking its process to stop first), cancel
/// the mirror jobs and remove the partial images; the VM keeps running as a
/// transient recovery until `recover stop`.
pub fn abort(state_path: &Path, id: i64) -> Result<Vec<String>> {
    let mut state = State::open(state_path)?;
    let mut row = state.require_recovery(id)?;
    if row.stage != RecoveryStage::Migrating {
        return Err(crate::error::refused(format!(
            "recovery {id} is not migrating (it is {})",
            row.stage
        )));
    }
    let mut actions = Vec::new();
    if let Some(t) = row
        .migration_task
        .map(|t| state.task(t))
        .transpose()?
        .flatten()
        .filter(|t| t.state.is_active())
    {
        state.request_cancel(t.id)?;
        let start = Instant::now();
        // Its process aborts the jobs itself; a dead one leaves them to us.
        while state
            .task(t.id)?
            .is_some_and(|t| t.state.is_active() && t.pid.is_some_and(pid_alive))
        {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("migration task {} does not stop", t.id);
            }
            std::thread::sleep(POLL);
        }
        actions.push(format!("stopped migration task {}", t.id));
        row = state.require_recovery(id)?;
    }
    let mut qmp = Qmp::connect(Path::new(
        row.vm_qmp.as_deref().context("the recovery runs no VM")?,
    ))?;
    actions.extend(cleanup_jobs(&mut qmp, &mut row)?);
    row.stage = RecoveryStage::Serving;
    row.mode = RecoveryMode::Transient;
    state.update_recovery(&row)?;
    Ok(actions)
}
