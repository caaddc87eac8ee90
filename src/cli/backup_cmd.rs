//! `run-now`, `points`, `restore`, `verify`, `cleanup`: the engine's commands.
//!
//! Each resolves rule → platform, target, repository path, system.conf values,
//! then calls `backup::run_backup` / `restore::restore_point` / the repository.
//! Every backup or restore is a task row with log lines (R31, R32).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::Serialize;

use super::args::{
    CleanupArgs, ImageFormat as ImageArg, LevelArg, PointsArgs, RestoreArgs, RunNowArgs, VerifyArgs,
};
use super::output::{print_json, Table};
use super::progress_view::TaskView;
use super::Ctx;
use crate::backup::progress::Progress;
use crate::clock::Clock;
use crate::error::{exit_code_of, is_interrupted, ExitCode};
use crate::level::Level;
use crate::platform;
use crate::repo::{vm_key, Repository};
use crate::restore::{restore_point, ImageFormat, RestoreRequest};
use crate::runner::recover::cleanup_vm;
use crate::runner::repo_root;
use crate::runner::{Runner, RunnerConfig, TaskResult, TaskSpec, ViewFactory};
use crate::state::slots::{Admission, Limits};
use crate::state::State;
use crate::units::format_size;

/// A flag set by the first SIGINT/SIGTERM; the second one exits at once (130).
pub fn cancel_on_signals(rt: &tokio::runtime::Runtime) -> Arc<AtomicBool> {
    use tokio::signal::unix::{signal, SignalKind};
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // Install the handlers now, before any work starts: registered later (inside
    // the task), an early signal would still kill the process the default way.
    let _in_runtime = rt.enter();
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("vmbackup: warning: cannot install SIGINT/SIGTERM handlers");
        return cancel;
    };
    rt.spawn(async move {
        for n in 0.. {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                eprintln!("vmbackup: interrupted: stopping cleanly (send the signal again to exit at once)");
                flag.store(true, Ordering::SeqCst);
            } else {
                std::process::exit(ExitCode::Interrupted.code() as i32);
            }
        }
    });
    cancel
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn level_of(l: LevelArg) -> Level {
    match l {
        LevelArg::Full => Level::Full,
        LevelArg::Inc => Level::Inc,
        LevelArg::Diff => Level::Diff,
    }
}

/// A runner for this command: limits from system.conf, progress through [`TaskView`].
pub fn make_runner(
    ctx: &Ctx,
    rt: &tokio::runtime::Runtime,
    cancel: Arc<AtomicBool>,
) -> Result<Arc<Runner>> {
    let cfg = ctx.system_config()?;
    let json = ctx.json;
    let quiet = ctx.quiet;
    let state_path = ctx.state_path.clone();
    let views: ViewFactory = Arc::new(move |task, vm, throttle| {
        let state = State::open(&state_path)?;
        let view = TaskView::new(task, vm, state, json, quiet).with_throttle(throttle);
        Ok(Arc::new(view) as Arc<dyn Progress>)
    });
    Runner::start(
        RunnerConfig {
            state_path: ctx.state_path.clone(),
            run_dir: ctx.run_dir(),
            limits: Limits {
                global: cfg.bk_tsk_thd,
                per_host: cfg.max_threads_per_host,
            },
            chunk_size: cfg.i2vp_transbuffer as u32,
            quiet: ctx.quiet,
            json: ctx.json,
            clock: Clock::process(),
        },
        rt.handle().clone(),
        cancel,
        views,
    )
}

/// Reclaim what dead processes left behind (R44), reporting on stderr.
pub fn reclaim_dead(ctx: &Ctx) -> Result<()> {
    let mut state = ctx.state()?;
    for line in crate::runner::recover::reclaim(&mut state, &ctx.run_dir())? {
        eprintln!("vmbackup: {line}");
    }
    Ok(())
}

/// The worst exit code of a set of task results.
pub fn worst_of(results: &[TaskResult], cancelled: bool) -> ExitCode {
    let worst = results.iter().map(|r| r.code).max().unwrap_or(ExitCode::Ok);
    if cancelled {
        worst.max(ExitCode::Interrupted)
    } else {
        worst
    }
}

pub fn run_now(ctx: &Ctx, a: RunNowArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rule = state.require_rule(&a.rule)?;
    let vms: Vec<String> = match &a.vm {
        Some(vm) => vec![rule.require_vm(vm)?.vm.clone()],
        None => rule.vms.iter().map(|v| v.vm.clone()).collect(),
    };
    state.require_platform(&rule.settings.platform)?;
    repo_root(&state, &rule)?;
    drop(state);
    reclaim_dead(ctx)?;
    let rt = runtime()?;
    let cancel = cancel_on_signals(&rt);
    let runner = make_runner(ctx, &rt, cancel.clone())?;
    let specs = vms
        .into_iter()
        .map(|vm| TaskSpec {
            rule: rule.clone(),
            vm,
            level: level_of(a.level),
            slot: None,
            notes: Vec::new(),
        })
        .collect();
    let results = runner.run_all(specs)?;
    let worst = worst_of(&results, cancel.load(Ordering::SeqCst));
    if ctx.json {
        let vms: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.remove("rule");
                }
                v
            })
            .collect();
        out!(
            "{}",
            serde_json::json!({ "type": "summary", "rule": rule.name, "exit_code": worst.code(), "vms": vms })
        );
    }
    Ok(worst)
}

/// Point summary for `points`.
#[derive(Serialize)]
struct PointRow {
    point: String,
    level: Level,
    base: Option<String>,
    started: String,
    finished: String,
    disks: Vec<String>,
    size: u64,
    bytes_read: u64,
    bytes_written: u64,
    fallback_reason: Option<String>,
    status: &'static str,
}

pub fn points(ctx: &Ctx, a: PointsArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rule = state.require_rule(&a.rule)?;
    rule.require_vm(&a.vm)?;
    let root = repo_root(&state, &rule)?;
    let key = vm_key(&rule.settings.platform, &a.vm);
    let points = match Repository::open_if_exists(&root)? {
        Some(repo) => repo.list_points(&key)?,
        None => Vec::new(),
    };
    let rows: Vec<PointRow> = points
        .iter()
        .map(|m| PointRow {
            point: m.point.clone(),
            level: m.level,
            base: m.base.clone(),
            started: m.started.to_rfc3339(),
            finished: m.finished.to_rfc3339(),
            disks: m.disks.iter().map(|d| d.name.clone()).collect(),
            size: m.totals.size,
            bytes_read: m.totals.bytes_read,
            bytes_written: m.totals.bytes_written,
            fallback_reason: m.fallback_reason.clone(),
            status: "completed",
        })
        .collect();
    if ctx.json {
        print_json(&rows);
        return Ok(ExitCode::Ok);
    }
    let mut t = Table::new(&[
        "POINT", "LEVEL", "BASE", "DISKS", "SIZE", "READ", "STORED", "STATUS",
    ]);
    for r in &rows {
        t.row(vec![
            r.point.clone(),
            r.level.to_string(),
            r.base.clone().unwrap_or_else(|| "-".into()),
            r.disks.join(","),
            format_size(r.size),
            format_size(r.bytes_read),
            format_size(r.bytes_written),
            r.status.into(),
        ]);
    }
    t.print();
    Ok(ExitCode::Ok)
}

pub fn restore(ctx: &Ctx, a: RestoreArgs) -> Result<ExitCode> {
    let mut state = ctx.state()?;
    let rule = state.require_rule(&a.rule)?;
    rule.require_vm(&a.vm)?;
    let root = repo_root(&state, &rule)?;
    let repo = Repository::open(&root).with_context(|| format!("rule '{}'", rule.name))?;
    let key = vm_key(&rule.settings.platform, &a.vm);
    let point = (a.point != "latest").then_some(a.point.as_str());
    // Chosen (and so validated) before a task is recorded: bad input changes nothing.
    let manifest = crate::restore::select_point(&repo, &key, point)?;
    let task = match state.admit_task("restore", &rule.name, &a.vm, None, None)? {
        Some(Admission::Queued(task)) => task,
        _ => anyhow::bail!(
            "rule '{}' VM '{}': the restore task was not admitted",
            rule.name,
            a.vm
        ),
    };
    reclaim_dead(ctx)?;
    let rt = runtime()?;
    let signals = cancel_on_signals(&rt);
    // Restores take slots too (R38); the flag also follows `task cancel`.
    let runner = make_runner(ctx, &rt, signals)?;
    let cancel = match runner.take_slot_for(&mut state, task, &rule.settings.platform) {
        Ok(flag) => flag,
        Err(err) => {
            let status = if is_interrupted(&err) {
                "interrupted"
            } else {
                "failed"
            };
            state.end_task(task, status, None, Some(&format!("{err:#}")))?;
            return Err(err);
        }
    };
    let view = TaskView::new(task, &a.vm, state, ctx.json, ctx.quiet);
    let req = RestoreRequest {
        repo: &repo,
        vm_key: &key,
        point: &manifest,
        dest: &a.to,
        format: match a.format {
            ImageArg::Raw => ImageFormat::Raw,
            ImageArg::Qcow2 => ImageFormat::Qcow2,
        },
        force: a.force,
        workers: 4,
    };
    match restore_point(&req, &view, &cancel) {
        Ok(report) => {
            view.with_state(|s| s.end_task(task, "completed", Some(&report.point), None));
            if ctx.json {
                out!(
                    "{}",
                    serde_json::json!({ "type": "summary", "task": task, "restore": report })
                );
            } else if !ctx.quiet {
                for d in &report.disks {
                    out!(
                        "{}: point {} disk {} -> {} ({})",
                        a.vm,
                        report.point,
                        d.disk,
                        d.path.display(),
                        format_size(d.size)
                    );
                }
            }
            Ok(ExitCode::Ok)
        }
        Err(err) => {
            let status = if is_interrupted(&err) {
                "interrupted"
            } else {
                "failed"
            };
            view.with_state(|s| s.end_task(task, status, None, Some(&format!("{err:#}"))));
            Err(err)
        }
    }
}

#[derive(Serialize)]
struct VerifyItem {
    rule: String,
    vm: String,
    point: String,
    chunks_checked: u64,
    problems: Vec<String>,
}

pub fn verify(ctx: &Ctx, a: VerifyArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rules = match &a.rule {
        Some(r) => vec![state.require_rule(r)?],
        None => state.rules()?,
    };
    let mut items = Vec::new();
    for rule in &rules {
        let vms: Vec<String> = match &a.vm {
            Some(vm) => vec![rule.require_vm(vm)?.vm.clone()],
            None => rule.vms.iter().map(|v| v.vm.clone()).collect(),
        };
        let root = repo_root(&state, rule)?;
        let Some(repo) = Repository::open_if_exists(&root)? else {
            continue;
        };
        for vm in vms {
            let key = vm_key(&rule.settings.platform, &vm);
            let points: Vec<String> = match &a.point {
                Some(p) => vec![crate::restore::select_point(&repo, &key, Some(p))?.point],
                None => repo
                    .list_points(&key)?
                    .into_iter()
                    .map(|m| m.point)
                    .collect(),
            };
            for p in points {
                let report = repo.verify_point(&key, &p)?;
                let item = VerifyItem {
                    rule: rule.name.clone(),
                    vm: vm.clone(),
                    point: p.clone(),
                    chunks_checked: report.chunks_checked,
                    problems: report.problems.iter().map(|x| x.to_string()).collect(),
                };
                if !ctx.json && (!ctx.quiet || !item.problems.is_empty()) {
                    let verdict = if item.problems.is_empty() {
                        "ok".to_string()
                    } else {
                        format!("{} PROBLEM(S)", item.problems.len())
                    };
                    out!(
                        "{} {} {}: {} chunks checked, {verdict}",
                        item.rule,
                        item.vm,
                        item.point,
                        item.chunks_checked
                    );
                    for pr in &item.problems {
                        out!("  {pr}");
                    }
                }
                items.push(item);
            }
        }
    }
    let bad = items.iter().filter(|i| !i.problems.is_empty()).count();
    if ctx.json {
        print_json(&serde_json::json!({ "points": items, "points_with_problems": bad }));
    }
    if bad > 0 {
        eprintln!("vmbackup: verify: {bad} point(s) have missing or corrupt chunks");
        return Ok(ExitCode::Failed);
    }
    Ok(ExitCode::Ok)
}

/// Staging files at least this old are leftovers of killed writers (a running
/// backup publishes its staged chunks within seconds).
const STALE_STAGING: std::time::Duration = std::time::Duration::from_secs(3600);

pub fn cleanup(ctx: &Ctx, a: CleanupArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rules = match &a.rule {
        Some(r) => vec![state.require_rule(r)?],
        None => state.rules()?,
    };
    let mut actions: Vec<serde_json::Value> = Vec::new();
    let mut worst = ExitCode::Ok;
    for rule in &rules {
        let prow = state.require_platform(&rule.settings.platform)?;
        let plat = platform::connect(&prow.spec)?;
        let root = repo_root(&state, rule)?;
        for v in &rule.vms {
            let res = cleanup_vm(plat.as_ref(), &root, &prow.name, &v.vm, &ctx.run_dir());
            match res {
                Ok(done) => {
                    for d in &done {
                        if !ctx.json && !ctx.quiet {
                            out!("{} {}: {d}", rule.name, v.vm);
                        }
                        actions.push(
                            serde_json::json!({ "rule": rule.name, "vm": v.vm, "action": d }),
                        );
                    }
                }
                Err(e) => {
                    worst = worst.max(exit_code_of(&e));
                    eprintln!("vmbackup: cleanup {} {}: {e:#}", rule.name, v.vm);
                    actions.push(serde_json::json!({ "rule": rule.name, "vm": v.vm, "error": format!("{e:#}") }));
                }
            }
        }
    }
    // Staging files of writers killed between staging and publishing a chunk,
    // once per repository (rules may share one).
    let mut roots: Vec<std::path::PathBuf> = rules
        .iter()
        .map(|r| repo_root(&state, r))
        .collect::<Result<_>>()?;
    roots.sort();
    roots.dedup();
    for root in roots {
        if let Some(repo) = Repository::open_if_exists(&root)? {
            for p in repo.chunks().remove_stale_staging(STALE_STAGING)? {
                let d = format!("removed stale staging file {}", p.display());
                if !ctx.json && !ctx.quiet {
                    out!("{}: {d}", root.display());
                }
                actions.push(serde_json::json!({ "repository": root, "action": d }));
            }
        }
    }
    if ctx.json {
        print_json(&serde_json::json!({ "actions": actions, "exit_code": worst.code() }));
    } else if actions.is_empty() && !ctx.quiet {
        out!("nothing to clean up");
    }
    Ok(worst)
}
