//! Doing each kind of task: first the locks it needs in the repository (taken
//! in `prepare`, waited for as `pending`), then, once it holds its slot, the
//! work: resolve the rule into the engine's request, record and display
//! progress, and say what it produced.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::record::TaskRecorder;
use super::{Job, Outcome, RestoreTo, Runner, TaskSpec};
use crate::backup::{run_backup, BackupJob, BackupOutcome};
use crate::error::ExitCode;
use crate::lifecycle::rule_repository_with_points;
use crate::platform::{NewVm, PlatformSpec};
use crate::repo::{vm_key, Manifest, RepoLock, Repository, VmLock};
use crate::restore::{restore_point, ImageFormat, RestoreReport, RestoreRequest};
use crate::state::State;
use crate::task::progress::{LogLevel, Progress};
use crate::task::throttle::Throttle;
use crate::units::format_size;

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

/// What a task holds in the repository before it starts.
#[derive(Default)]
pub struct Held {
    /// The rule's repository (`None` for restores and GC, which open their own,
    /// and for a prune of a rule with no repository yet).
    repo: Option<Repository>,
    repo_lock: Option<RepoLock>,
    vm_lock: Option<VmLock>,
    /// A copy's source: the rule's repository and its shared lock (`repo`,
    /// `repo_lock` and `vm_lock` are then the copy's).
    src: Option<(Repository, RepoLock)>,
}

/// Take what the job of `spec` needs before its slot, waiting while it is busy:
/// a backup and a prune hold the repository's shared lock and the VM's lock
/// (a backup that meets a running GC waits as `pending`, never fails).
pub fn prepare(
    runner: &Runner,
    spec: &TaskSpec,
    task: i64,
    cancel: &AtomicBool,
    state: &mut State,
) -> Result<Held> {
    let rule = &spec.rule;
    let purpose = spec.job.kind().as_str();
    let mut src = None;
    let repo = match &spec.job {
        Job::Backup { .. } => Some(crate::lifecycle::repository_for_backup(state, rule)?),
        Job::Prune => crate::lifecycle::rule_repository(state, rule)?,
        Job::Copy { to, .. } => {
            let source = crate::lifecycle::rule_repository(state, rule)?.ok_or_else(|| {
                anyhow::anyhow!("rule '{}' has no repository to copy from", rule.name)
            })?;
            let lock = runner
                .wait_while_busy(state, task, spec, cancel, || source.lock_shared(purpose))?;
            let copy = crate::lifecycle::copy_repository(state, rule, &source, to)?;
            src = Some((source, lock));
            Some(copy)
        }
        Job::Restore { .. }
        | Job::Gc
        | Job::Recover { .. }
        | Job::Migrate { .. }
        | Job::BootVerify { .. } => None,
    };
    let Some(repo) = repo else {
        return Ok(Held::default());
    };
    let repo_lock =
        runner.wait_while_busy(state, task, spec, cancel, || repo.lock_shared(purpose))?;
    let key = vm_key(&rule.settings.platform, &spec.vm);
    let vm_lock = runner.wait_while_busy(state, task, spec, cancel, || {
        repo.lock_vm(&repo_lock, &key, purpose)
    })?;
    Ok(Held {
        repo: Some(repo),
        repo_lock: Some(repo_lock),
        vm_lock: Some(vm_lock),
        src,
    })
}

/// Run the job of `spec` as task `task`, holding what `prepare` took.
pub fn run(
    runner: &Runner,
    spec: &TaskSpec,
    task: i64,
    cancel: Arc<AtomicBool>,
    held: Held,
) -> Result<Done> {
    match &spec.job {
        Job::Backup { level, .. } => backup(runner, spec, *level, task, cancel, held),
        Job::Prune => prune(runner, spec, held),
        Job::Gc => gc(runner, spec),
        Job::Copy { point, to } => copy(runner, spec, task, point, to, cancel, held),
        Job::Restore { point, to, from } => {
            restore(runner, spec, point, to, from.as_deref(), task, cancel)
        }
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
            let state = State::open(&runner.cfg.state_path)?;
            let throttle = Arc::new(Throttle::new(
                spec.rule.settings.bandwidth.clone(),
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

/// A restore to image files (in a private staging directory first, recorded
/// with the task), as a new VM, or into the VM's own images.
fn restore(
    runner: &Runner,
    spec: &TaskSpec,
    point: &Manifest,
    to: &RestoreTo,
    from: Option<&str>,
    task: i64,
    cancel: Arc<AtomicBool>,
) -> Result<Done> {
    let (state, recorder) = recorder(runner, spec, task)?;
    let rule = &spec.rule;
    let repo = crate::lifecycle::restore_repository(&state, rule, from)?;
    let key = vm_key(&rule.settings.platform, &spec.vm);
    let files = |dest: &Path, format: ImageFormat, force: bool, mode: u32| {
        restore_files(
            runner, &repo, &key, point, dest, format, force, mode, task, &recorder, &cancel,
        )
    };
    let report = match to {
        RestoreTo::Files {
            dest,
            format,
            force,
            mode,
        } => files(dest, *format, *force, *mode)?,
        RestoreTo::AsVm {
            dest,
            format,
            force,
            mode,
            launch,
            start,
        } => {
            let prow = state.require_platform(&rule.settings.platform)?;
            match &prow.spec {
                PlatformSpec::Qemu { .. } => {
                    // Refuse a configuration that cannot be launched before writing disks.
                    let plan = crate::recovery::as_vm::plan(point, dest, *format, launch)?;
                    let mut report = files(dest, *format, *force, *mode)?;
                    crate::recovery::as_vm::finish(&plan, &mut report, *start, &recorder)?;
                    report
                }
                PlatformSpec::Libvirt { .. } => {
                    let mut report = files(dest, *format, *force, *mode)?;
                    let name = launch.name.as_deref().context("--as-vm needs a name")?;
                    let new = NewVm {
                        name,
                        config: &point.vm_config,
                        disks: report
                            .disks
                            .iter()
                            .map(|d| (d.disk.clone(), d.path.clone(), format.ext()))
                            .collect(),
                        start: *start,
                    };
                    let defined = crate::platform::connect(&prow.spec, runner.cfg.io_timeout)?
                        .define_vm(&new)
                        .with_context(|| {
                            format!("define VM '{name}' on platform '{}'", prow.name)
                        })?;
                    report.new_vm = Some(defined);
                    report
                }
            }
        }
        RestoreTo::InPlace => crate::recovery::in_place::restore_in_place(
            &crate::recovery::in_place::InPlaceRequest {
                state_path: &runner.cfg.state_path,
                run_dir: &runner.cfg.run_dir,
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

/// The disks of `point` as image files in `dest`, through a private staging
/// directory recorded with the task (what a killed restore left is removed first).
#[allow(clippy::too_many_arguments)]
fn restore_files(
    runner: &Runner,
    repo: &Repository,
    key: &str,
    point: &Manifest,
    dest: &Path,
    format: ImageFormat,
    force: bool,
    mode: u32,
    task: i64,
    recorder: &TaskRecorder,
    cancel: &AtomicBool,
) -> Result<RestoreReport> {
    let mut state = State::open(&runner.cfg.state_path)?;
    for line in super::recover::remove_stale_restores(&mut state, Some(dest), None)? {
        recorder.log(LogLevel::Info, &line);
    }
    let row = std::sync::Mutex::new(state);
    let recorded = std::sync::Mutex::new(None::<std::path::PathBuf>);
    let on_staging = |staging: &Path| -> Result<()> {
        let dest = staging.parent().unwrap_or(staging).to_string_lossy();
        let mut state = row
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.set_task_staging(task, &dest, Some(&staging.to_string_lossy()))?;
        *recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(staging.to_path_buf());
        Ok(())
    };
    let req = RestoreRequest {
        repo,
        vm_key: key,
        point,
        dest,
        format,
        force,
        mode,
        workers: crate::backup::disk::cpu_count(),
        on_staging: &on_staging,
    };
    let result = restore_point(&req, recorder, cancel);
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
    result
}

fn backup(
    runner: &Runner,
    spec: &TaskSpec,
    level: crate::level::Level,
    task: i64,
    cancel: Arc<AtomicBool>,
    held: Held,
) -> Result<Done> {
    let (Some(repo), Some(_repo_lock), Some(vm_lock)) = (held.repo, held.repo_lock, held.vm_lock)
    else {
        anyhow::bail!("a backup needs its repository and locks");
    };
    let state = State::open(&runner.cfg.state_path)?;
    let rule = &spec.rule;
    let prow = state.require_platform(&rule.settings.platform)?;
    let plat = crate::platform::connect(&prow.spec, runner.cfg.io_timeout)?;
    let throttle = Arc::new(Throttle::new(
        rule.settings.bandwidth.clone(),
        runner.cfg.clock,
        cancel.clone(),
    ));
    let job = BackupJob {
        platform: prow.name.clone(),
        vm: spec.vm.clone(),
        repo: repo.with_compression(runner.cfg.compression),
        requested: level,
        auto_cbt: rule.settings.auto_cbt,
        cbt: rule.settings.cbt,
        quiesce: rule.settings.quiesce,
        allow_plain_tcp_export: rule.settings.allow_plain_tcp_export,
        chunk_size: runner.cfg.chunk_size,
        run_dir: runner.cfg.run_dir.clone(),
        io_timeout: runner.cfg.io_timeout,
        buffers: runner.buffers.clone(),
        clock: runner.cfg.clock,
        bandwidth: throttle.clone(),
        force_full: state.vm_reset(&rule.name, &spec.vm)?,
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
    let out = run_backup(&job, &vm_lock, plat.as_ref(), recorder, cancel, &runner.rt)?;
    if out.level == crate::level::Level::Full {
        State::open(&runner.cfg.state_path)?.clear_vm_reset(&rule.name, &spec.vm)?;
    }
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
        handoff: None,
    })
}

/// Apply the rule's retention to the VM (R17); the scheduler checked R18.
fn prune(runner: &Runner, spec: &TaskSpec, held: Held) -> Result<Done> {
    let rule = &spec.rule;
    let state = State::open(&runner.cfg.state_path)?;
    let retention = crate::lifecycle::retention::Retention::of(&rule.settings.policy);
    let mut report = crate::lifecycle::prune::VmPrune {
        rule: rule.name.clone(),
        vm: spec.vm.clone(),
        orphaned: false,
        retention: retention.to_string(),
        points: Vec::new(),
        error: None,
        code: ExitCode::Ok,
    };
    if let (Some(repo), Some(vm_lock)) = (&held.repo, &held.vm_lock) {
        let protected = state.points_in_use(&rule.name, &spec.vm)?;
        let now = runner.cfg.clock.now();
        report.points =
            crate::lifecycle::prune::prune_vm_locked(repo, vm_lock, retention, &now, &protected)?;
    }
    drop(held);
    let mut summary = Vec::new();
    for m in report
        .points
        .iter()
        .filter(|m| m.action == crate::lifecycle::retention::Action::Remove)
    {
        summary.push(format!("removed point {}: {}", m.point, m.reason));
    }
    let removed = summary.len();
    summary.push(format!(
        "{retention}: {} point(s) kept, {removed} removed",
        report.points.len() - removed
    ));
    Ok(Done {
        summary,
        outcome: Outcome::Prune(report),
        code: ExitCode::Ok,
        handoff: None,
    })
}

/// Copy the new point to the rule's copy target, then apply the copy's
/// retention to the VM's points there.
fn copy(
    runner: &Runner,
    spec: &TaskSpec,
    task: i64,
    point: &str,
    to: &str,
    cancel: Arc<AtomicBool>,
    held: Held,
) -> Result<Done> {
    let (Some(dst), Some(vm_lock), Some((src, _src_lock))) = (&held.repo, &held.vm_lock, &held.src)
    else {
        anyhow::bail!("a copy needs both repositories and their locks");
    };
    let rule = &spec.rule;
    // The rule's bandwidth windows pace the copy; a cancel stops it.
    let throttle = Throttle::new(rule.settings.bandwidth.clone(), runner.cfg.clock, cancel);
    let report = crate::repo::copy::copy_vm_locked(src, dst, vm_lock, Some(point), &throttle)
        .with_context(|| format!("copy to target '{to}'"))?;
    // What it sent, as the task's bytes (task list, its rate).
    let mut state = State::open(&runner.cfg.state_path)?;
    if let Err(e) = state.set_task_progress(task, report.sent_bytes, report.sent_bytes) {
        tracing::warn!("cannot record what copy task {task} sent: {e:#}");
    }
    let retention =
        crate::lifecycle::retention::Retention::of_copy(&rule.settings.policy, rule.copy_retention);
    let protected = state.points_in_use(&rule.name, &spec.vm)?;
    let now = runner.cfg.clock.now();
    let marks = crate::lifecycle::prune::prune_vm_locked(dst, vm_lock, retention, &now, &protected)
        .with_context(|| format!("prune the copy on target '{to}'"))?;
    drop(held);
    let pruned: Vec<String> = marks
        .iter()
        .filter(|m| m.action == crate::lifecycle::retention::Action::Remove)
        .map(|m| m.point.clone())
        .collect();
    let mut summary = vec![format!(
        "copied {} point(s) to target '{to}' ({} there already): {} object(s) sent ({}), {} there already",
        report.points_copied.len(),
        report.points_present.len(),
        report.sent_count,
        format_size(report.sent_bytes),
        report.present_count
    )];
    for p in &pruned {
        summary.push(format!(
            "removed point {p} from the copy: outside its {retention}"
        ));
    }
    Ok(Done {
        summary,
        outcome: Outcome::Copy(super::CopyOutcome {
            to: to.to_string(),
            point: point.to_string(),
            report,
            retention: retention.to_string(),
            pruned,
        }),
        code: ExitCode::Ok,
        handoff: None,
    })
}

/// Collect the rule's repository if due: the last collection is a day old and
/// its lock is free at once (a busy lock defers it to the next run).
fn gc(runner: &Runner, spec: &TaskSpec) -> Result<Done> {
    let state = State::open(&runner.cfg.state_path)?;
    let Some(repo) = crate::lifecycle::rule_repository(&state, &spec.rule)? else {
        return Ok(Done {
            summary: vec!["no repository yet".into()],
            outcome: Outcome::Gc(crate::lifecycle::gc::RepoGc::not_run(
                &spec.rule,
                "no repository yet",
            )),
            code: ExitCode::Ok,
            handoff: None,
        });
    };
    drop(state);
    let now = runner.cfg.clock.now().with_timezone(&chrono::Utc);
    let entry = match crate::lifecycle::gc::gc_if_due(&repo, now)? {
        Some(mut entry) => {
            entry.target = spec.rule.settings.target.clone();
            entry.rules = vec![spec.rule.name.clone()];
            entry
        }
        None => crate::lifecycle::gc::RepoGc::not_run(
            &spec.rule,
            "not due: the last garbage collection is less than a day old",
        ),
    };
    if entry.status == crate::task::TaskState::Failed {
        anyhow::bail!(
            "{}",
            entry
                .error
                .clone()
                .unwrap_or_else(|| "garbage collection failed".into())
        );
    }
    let summary = vec![match (&entry.report, &entry.error) {
        (Some(r), _) => format!(
            "garbage collection of {}: removed {} object(s) ({}), kept {}",
            entry.location,
            r.objects_removed,
            format_size(r.bytes_freed),
            r.objects_kept
        ),
        (None, Some(why)) => format!("garbage collection of {}: {why}", entry.location),
        (None, None) => format!("garbage collection of {}", entry.location),
    }];
    Ok(Done {
        summary,
        outcome: Outcome::Gc(entry),
        code: ExitCode::Ok,
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
    let mut lines: Vec<String> = report
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
        .collect();
    if let Some(script) = &report.launch_script {
        lines.push(format!("launch script {}", script.display()));
    }
    if let Some(vm) = &report.new_vm {
        lines.push(format!(
            "{} VM '{}' on the restored images{}",
            if report.launch_script.is_some() {
                "made"
            } else {
                "defined"
            },
            vm.name,
            if vm.started { ", started" } else { "" }
        ));
    }
    lines
}
