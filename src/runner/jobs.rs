//! Doing each kind of task once it holds its slot: resolve the rule into the
//! engine's request, record and display progress, and say what it produced.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;

use super::record::TaskRecorder;
use super::{Job, Outcome, RestoreTo, Runner, TaskSpec, BUFFERS_PER_TASK};
use crate::backup::{run_backup, BackupJob, BackupOutcome};
use crate::error::ExitCode;
use crate::lifecycle::rule_repository_with_points;
use crate::repo::{vm_key, Manifest};
use crate::restore::{restore_point, ImageFormat, RestoreReport, RestoreRequest};
use crate::state::State;
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
    /// The process that goes on with the task (it stays running): a recovery's
    /// background server.
    pub handoff: Option<u32>,
}

/// Run the job of `spec` as task `task`.
pub fn run(runner: &Runner, spec: &TaskSpec, task: i64, cancel: Arc<AtomicBool>) -> Result<Done> {
    match &spec.job {
        Job::Backup { level, .. } => backup(runner, spec, *level, task, cancel),
        Job::Restore { point, to } => restore(runner, spec, point, to, task, cancel),
        Job::Recover { point, opts } => {
            let (_, recorder) = recorder(runner, spec, task)?;
            let report = crate::recovery::start(
                &crate::recovery::StartRequest {
                    state_path: &runner.cfg.state_path,
                    rule: &spec.rule,
                    vm: &spec.vm,
                    point,
                    task,
                    opts,
                },
                &recorder,
            )?;
            Ok(Done {
                summary: report.summary(),
                handoff: Some(report.server_pid),
                outcome: Outcome::Recovery(report),
                code: ExitCode::Ok,
            })
        }
        Job::Migrate { recovery } => {
            let (state, _) = recorder(runner, spec, task)?;
            let rule = &spec.rule;
            let throttle = Arc::new(Throttle::new(
                rule.settings.bandwidth.clone(),
                runner.cfg.clock,
                cancel.clone(),
            ));
            let display = runner.events.display(task, spec, Some(throttle.clone()));
            let recorder = TaskRecorder::new(task, state, display, Some(throttle.clone()));
            let report = crate::recovery::mirror::migrate(
                &runner.cfg.state_path,
                *recovery,
                task,
                &throttle,
                &recorder,
                &cancel,
            )?;
            Ok(Done {
                summary: report.summary(),
                handoff: None,
                outcome: Outcome::Migration(report),
                code: ExitCode::Ok,
            })
        }
        Job::BootVerify { point, opts } => {
            let (state, recorder) = recorder(runner, spec, task)?;
            let report = crate::recovery::boot::verify_boot(
                &crate::recovery::boot::BootRequest {
                    state_path: &runner.cfg.state_path,
                    repo: &rule_repository_with_points(&state, &spec.rule)?,
                    rule: &spec.rule,
                    vm: &spec.vm,
                    point,
                    task,
                    opts,
                },
                &recorder,
                &cancel,
                &runner.rt,
            )?;
            Ok(Done {
                summary: report.summary(),
                handoff: None,
                outcome: Outcome::BootVerify(report),
                code: ExitCode::Ok,
            })
        }
    }
}

/// The state store and a recorder for a task whose progress has no throttle.
fn recorder(runner: &Runner, spec: &TaskSpec, task: i64) -> Result<(State, TaskRecorder)> {
    let state = State::open(&runner.cfg.state_path)?;
    let display = runner.events.display(task, spec, None);
    let recorder = TaskRecorder::new(task, State::open(&runner.cfg.state_path)?, display, None);
    Ok((state, recorder))
}

fn restore(
    runner: &Runner,
    spec: &TaskSpec,
    point: &Manifest,
    to: &RestoreTo,
    task: i64,
    cancel: Arc<AtomicBool>,
) -> Result<Done> {
    let (state, recorder) = recorder(runner, spec, task)?;
    let rule = &spec.rule;
    let repo = rule_repository_with_points(&state, rule)?;
    let key = vm_key(&rule.settings.platform, &spec.vm);
    let files = |dest: &Path, format: ImageFormat, force: bool| {
        let req = RestoreRequest {
            repo: &repo,
            vm_key: &key,
            point,
            dest,
            format,
            force,
            workers: RESTORE_WORKERS,
        };
        restore_point(&req, &recorder, &cancel)
    };
    let report = match to {
        RestoreTo::Files {
            dest,
            format,
            force,
        } => files(dest, *format, *force)?,
        RestoreTo::AsVm {
            dest,
            format,
            force,
            launch,
            start,
        } => {
            // Refuse a configuration that cannot be launched before writing disks.
            let plan = crate::recovery::as_vm::plan(point, dest, *format, launch)?;
            let mut report = files(dest, *format, *force)?;
            crate::recovery::as_vm::finish(&plan, &mut report, *start, &recorder)?;
            report
        }
        RestoreTo::InPlace => crate::recovery::in_place::restore_in_place(
            &crate::recovery::in_place::InPlaceRequest {
                state_path: &runner.cfg.state_path,
                repo: &repo,
                rule,
                vm: &spec.vm,
                point,
            },
            &recorder,
            &cancel,
            &runner.rt,
        )?,
    };
    Ok(Done {
        summary: restore_summary(&report),
        outcome: Outcome::Restore(report),
        code: ExitCode::Ok,
        handoff: None,
    })
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
    let plat = crate::platform::connect(&prow.kind, Path::new(&prow.qmp_dir))?;
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
        buffers: BUFFERS_PER_TASK,
        bandwidth: throttle.clone(),
        force_full: state.vm_reset(&rule.name, &spec.vm)?,
    };
    let display = runner.events.display(task, spec, Some(throttle.clone()));
    let recorder = Arc::new(TaskRecorder::new(task, state, display, Some(throttle)));
    let out = run_backup(&job, plat.as_ref(), recorder, cancel, &runner.rt)?;
    if out.level == crate::level::Level::Full {
        State::open(&runner.cfg.state_path)?.clear_vm_reset(&rule.name, &spec.vm)?;
    }
    let code = if out.fallback.is_some() || !out.warnings.is_empty() {
        ExitCode::Warning
    } else {
        ExitCode::Ok
    };
    Ok(Done {
        summary: vec![backup_summary(&out)],
        outcome: Outcome::Backup(out),
        code,
        handoff: None,
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
