//! Doing each kind of task once it holds its slot: resolve the rule into the
//! engine's request, record and display progress, and say what it produced.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::record::TaskRecorder;
use super::{Job, Outcome, Runner, TaskSpec, BUFFERS_PER_TASK};
use crate::backup::{run_backup, BackupJob, BackupOutcome};
use crate::error::ExitCode;
use crate::repo::vm_key;
use crate::restore::{restore_point, RestoreReport, RestoreRequest};
use crate::state::State;
use crate::task::progress::{LogLevel, Progress};
use crate::task::throttle::Throttle;
use crate::units::format_size;

/// Threads fetching chunks for one restore.
const RESTORE_WORKERS: usize = 4;

/// What a job that completed produced.
pub struct Done {
    pub outcome: Outcome,
    /// `Warning` when it completed with warnings (a fallback to full, R26/R27).
    pub code: ExitCode,
    /// Lines for people, also written to the task's log.
    pub summary: Vec<String>,
}

/// Run the job of `spec` as task `task`.
pub fn run(runner: &Runner, spec: &TaskSpec, task: i64, cancel: Arc<AtomicBool>) -> Result<Done> {
    match &spec.job {
        Job::Backup { level, .. } => backup(runner, spec, *level, task, cancel),
        Job::Restore {
            point,
            dest,
            format,
            force,
            mode,
        } => {
            let mut state = State::open(&runner.cfg.state_path)?;
            // What killed restores into this destination left goes first.
            let removed = super::recover::remove_stale_restores(&mut state, Some(dest), None)?;
            let rule = &spec.rule;
            let repo = crate::lifecycle::rule_repository(&state, rule)?
                .with_context(|| format!("rule '{}' has no repository yet", rule.name))?;
            let display = runner.events.display(task, spec, None);
            let recorder = TaskRecorder::new(task, state, display, None);
            for line in &removed {
                recorder.log(LogLevel::Info, line);
            }
            let key = vm_key(&rule.settings.platform, &spec.vm);
            let row = std::sync::Mutex::new(State::open(&runner.cfg.state_path)?);
            let recorded = std::sync::Mutex::new(None::<std::path::PathBuf>);
            let on_staging = |staging: &Path| -> Result<()> {
                let dest = staging.parent().unwrap_or(staging).to_string_lossy();
                let mut state = row
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                state.set_task_staging(task, &dest, Some(&staging.to_string_lossy()))?;
                *recorded
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(staging.to_path_buf());
                Ok(())
            };
            let req = RestoreRequest {
                repo: &repo,
                vm_key: &key,
                point,
                dest,
                format: *format,
                force: *force,
                mode: *mode,
                workers: RESTORE_WORKERS,
                on_staging: &on_staging,
            };
            let result = restore_point(&req, &recorder, &cancel);
            // The staging directory is gone once restore_point returns (unless its
            // removal failed: then the record stays for cleanup).
            let staging = recorded
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(staging) = staging.filter(|s| !s.exists()) {
                let dest = staging.parent().unwrap_or(&staging).to_string_lossy();
                let mut state = row
                    .into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Err(e) = state.set_task_staging(task, &dest, None) {
                    tracing::warn!("cannot record the end of restore task {task}: {e:#}");
                }
            }
            let report = result?;
            Ok(Done {
                summary: restore_summary(&report),
                outcome: Outcome::Restore(report),
                code: ExitCode::Ok,
            })
        }
    }
}

fn backup(
    runner: &Runner,
    spec: &TaskSpec,
    level: crate::level::Level,
    task: i64,
    cancel: Arc<AtomicBool>,
) -> Result<Done> {
    let state = State::open(&runner.cfg.state_path)?;
    let rule = &spec.rule;
    let prow = state.require_platform(&rule.settings.platform)?;
    let plat =
        crate::platform::connect(&prow.kind, Path::new(&prow.qmp_dir), runner.cfg.io_timeout)?;
    let throttle = Arc::new(Throttle::new(
        rule.settings.bandwidth.clone(),
        runner.cfg.clock,
        cancel.clone(),
    ));
    let job = BackupJob {
        platform: prow.name.clone(),
        vm: spec.vm.clone(),
        repo: crate::lifecycle::repository_for_backup(&state, rule)?,
        requested: level,
        auto_cbt: rule.settings.auto_cbt,
        cbt: rule.settings.cbt,
        quiesce: rule.settings.quiesce,
        chunk_size: runner.cfg.chunk_size,
        run_dir: runner.cfg.run_dir.clone(),
        io_timeout: runner.cfg.io_timeout,
        buffers: BUFFERS_PER_TASK,
        bandwidth: throttle.clone(),
    };
    // One running VM, one backup at a time, whichever rule and platform reach it.
    let running = plat
        .open_vm(&spec.vm)
        .and_then(|mut vm| vm.running_identity())
        .with_context(|| format!("VM '{}'", spec.vm))?;
    let mut state = state;
    if let Some(identity) = running {
        state.claim_running_vm(task, &spec.vm, &identity)?;
    }
    let display = runner.events.display(task, spec, Some(throttle.clone()));
    let recorder = Arc::new(TaskRecorder::new(task, state, display, Some(throttle)));
    let out = run_backup(&job, plat.as_ref(), recorder, cancel, &runner.rt)?;
    let unexpected_full = out.fallback.is_some() && !out.fallback_planned;
    let code = if unexpected_full || !out.warnings.is_empty() {
        ExitCode::Warning
    } else {
        ExitCode::Ok
    };
    Ok(Done {
        summary: vec![backup_summary(&out)],
        outcome: Outcome::Backup(out),
        code,
    })
}

/// `inc point 20261124T120000Z (requested inc), read 70MiB, stored 30MiB`.
fn backup_summary(out: &BackupOutcome) -> String {
    format!(
        "{} point {} (requested {}), read {}, stored {}",
        out.level,
        out.point,
        out.requested,
        format_size(out.totals.bytes_read),
        format_size(out.totals.bytes_written)
    )
}

/// `point 20261124T120000Z disk vda -> /srv/restore/vda.raw (20GiB)`, one per disk.
fn restore_summary(report: &RestoreReport) -> Vec<String> {
    report
        .disks
        .iter()
        .map(|d| {
            format!(
                "point {} disk {} -> {} ({})",
                report.point,
                d.disk,
                d.path.display(),
                format_size(d.size)
            )
        })
        .collect()
}
