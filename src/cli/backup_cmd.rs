//! `run-now`, `points`, `restore`, `verify`, `cleanup`: the engine's commands.
//!
//! Each resolves rule → platform, target, repository path, system.conf values,
//! then calls `backup::run_backup` / `restore::restore_point` / the repository.
//! Every backup or restore is a task row with log lines (R31, R32).

use std::path::Path;
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
use crate::lifecycle::rule_repository;
use crate::platform;
use crate::repo::vm_key;
use crate::restore::{restore_point, ImageFormat, RestoreRequest};
use crate::runner::recover::cleanup_vm;
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
    state.require_target(&rule.settings.target)?;
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
    level: Option<Level>,
    base: Option<String>,
    started: Option<String>,
    finished: Option<String>,
    disks: Vec<String>,
    size: u64,
    bytes_read: u64,
    bytes_written: u64,
    fallback_reason: Option<String>,
    /// `completed`, or `damaged` (manifest or an index unreadable, see `reason`).
    status: &'static str,
    reason: Option<String>,
}

pub fn points(ctx: &Ctx, a: PointsArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rule = state.require_rule(&a.rule)?;
    rule.require_vm(&a.vm)?;
    let key = vm_key(&rule.settings.platform, &a.vm);
    let list = match rule_repository(&state, &rule)? {
        Some(repo) => repo.list_points(&key)?,
        None => Default::default(),
    };
    let mut rows: Vec<PointRow> = list
        .points
        .iter()
        .map(|m| PointRow {
            point: m.point.clone(),
            level: Some(m.level),
            base: m.base.clone(),
            started: Some(m.started.to_rfc3339()),
            finished: Some(m.finished.to_rfc3339()),
            disks: m.disks.iter().map(|d| d.name.clone()).collect(),
            size: m.totals.size,
            bytes_read: m.totals.bytes_read,
            bytes_written: m.totals.bytes_written,
            fallback_reason: m.fallback_reason.clone(),
            status: "completed",
            reason: None,
        })
        .chain(list.damaged.iter().map(|d| PointRow {
            point: d.point.clone(),
            level: None,
            base: None,
            started: None,
            finished: None,
            disks: Vec::new(),
            size: 0,
            bytes_read: 0,
            bytes_written: 0,
            fallback_reason: None,
            status: "damaged",
            reason: Some(d.reason.clone()),
        }))
        .collect();
    rows.sort_by(|a, b| a.point.cmp(&b.point));
    if ctx.json {
        print_json(&rows);
        return Ok(ExitCode::Ok);
    }
    let mut t = Table::new(&[
        "POINT", "LEVEL", "BASE", "DISKS", "SIZE", "READ", "STORED", "STATUS",
    ]);
    for r in &rows {
        let status = match &r.reason {
            Some(why) => format!("{}: {why}", r.status),
            None => r.status.into(),
        };
        t.row(vec![
            r.point.clone(),
            r.level.map_or_else(|| "-".into(), |l| l.to_string()),
            r.base.clone().unwrap_or_else(|| "-".into()),
            r.disks.join(","),
            format_size(r.size),
            format_size(r.bytes_read),
            format_size(r.bytes_written),
            status,
        ]);
    }
    t.print();
    Ok(ExitCode::Ok)
}

pub fn restore(ctx: &Ctx, a: RestoreArgs) -> Result<ExitCode> {
    let mut state = ctx.state()?;
    let rule = state.require_rule(&a.rule)?;
    rule.require_vm(&a.vm)?;
    let repo = rule_repository(&state, &rule)?.ok_or_else(|| {
        crate::error::refused(format!(
            "rule '{}' has no restore points yet (no backup completed)",
            rule.name
        ))
    })?;
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
    /// `ok`, or `damaged`: objects missing, corrupt or quarantined, or the
    /// manifest or an index unreadable (`problems` says which).
    status: &'static str,
    chunks_checked: u64,
    /// Objects once quarantined and whole again (a later backup stored them).
    healed: u64,
    problems: Vec<String>,
}

/// What `verify` found in one rule.
#[derive(Serialize)]
struct VerifyRule {
    rule: String,
    /// `checked`, `no points yet`, or `failed` (`error` says why).
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn verify(ctx: &Ctx, a: VerifyArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rules = match &a.rule {
        Some(r) => vec![state.require_rule(r)?],
        None => state.rules()?,
    };
    let mut items = Vec::new();
    let mut summary = Vec::new();
    for rule in &rules {
        let vms: Vec<String> = match &a.vm {
            Some(vm) => vec![rule.require_vm(vm)?.vm.clone()],
            None => rule.vms.iter().map(|v| v.vm.clone()).collect(),
        };
        let checked = (|| -> Result<bool> {
            let Some(repo) = rule_repository(&state, rule)? else {
                return Ok(false);
            };
            let _lock = repo.lock_shared("verify")?;
            let quarantined = repo.chunks().quarantined()?;
            for vm in &vms {
                let key = vm_key(&rule.settings.platform, vm);
                let list = repo.list_points(&key)?;
                let ids = match &a.point {
                    // A damaged point is verified (and reported) like any other.
                    Some(p) if list.all_ids().contains(p) => vec![p.clone()],
                    Some(p) => vec![crate::restore::select_point_id(&list, p)?],
                    None => list.all_ids(),
                };
                for p in ids {
                    let item = verify_one(&repo, rule, vm, &key, &p, &quarantined)?;
                    print_verify_item(ctx, &item);
                    items.push(item);
                }
            }
            Ok(true)
        })();
        let (status, error) = match checked {
            Ok(true) => ("checked", None),
            Ok(false) => {
                if !ctx.json && !ctx.quiet {
                    out!("{}: no points yet", rule.name);
                }
                ("no points yet", None)
            }
            Err(e) => {
                eprintln!("vmbackup: verify {}: {e:#}", rule.name);
                ("failed", Some(format!("{e:#}")))
            }
        };
        summary.push(VerifyRule {
            rule: rule.name.clone(),
            status,
            error,
        });
    }
    let bad = items.iter().filter(|i| i.status != "ok").count();
    let failed = summary.iter().filter(|r| r.error.is_some()).count();
    if ctx.json {
        print_json(&serde_json::json!({
            "rules": summary,
            "points": items,
            "points_with_problems": bad,
        }));
    }
    if bad > 0 {
        eprintln!("vmbackup: verify: {bad} point(s) are damaged (missing, corrupt or quarantined objects, or an unreadable manifest or index)");
    }
    Ok(if bad > 0 || failed > 0 {
        ExitCode::Failed
    } else {
        ExitCode::Ok
    })
}

/// Verify one point; a point whose manifest or index cannot be read is damaged.
fn verify_one(
    repo: &crate::repo::Repository,
    rule: &crate::state::rules::RuleRow,
    vm: &str,
    key: &str,
    point: &str,
    quarantined: &std::collections::HashSet<crate::repo::Digest>,
) -> Result<VerifyItem> {
    let r = repo.verify_point(key, point, quarantined)?;
    let problems: Vec<String> = r
        .damaged
        .iter()
        .cloned()
        .chain(r.problems.iter().map(|x| x.to_string()))
        .collect();
    Ok(VerifyItem {
        rule: rule.name.clone(),
        vm: vm.to_string(),
        point: point.to_string(),
        status: if r.is_ok() { "ok" } else { "damaged" },
        chunks_checked: r.chunks_checked,
        healed: r.healed,
        problems,
    })
}

fn print_verify_item(ctx: &Ctx, item: &VerifyItem) {
    if ctx.json || (ctx.quiet && item.problems.is_empty()) {
        return;
    }
    let verdict = match (item.problems.len(), item.healed) {
        (0, 0) => "ok".to_string(),
        (0, n) => format!("ok, healed ({n} object(s) stored again by a later backup)"),
        (n, _) => format!("DAMAGED, {n} problem(s)"),
    };
    out!(
        "{} {} {}: {} object(s) checked, {verdict}",
        item.rule,
        item.vm,
        item.point,
        item.chunks_checked
    );
    for pr in &item.problems {
        out!("  {pr}");
    }
}

pub fn cleanup(ctx: &Ctx, a: CleanupArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rules = match &a.rule {
        Some(r) => vec![state.require_rule(r)?],
        None => state.rules()?,
    };
    let mut actions: Vec<serde_json::Value> = Vec::new();
    let mut worst = ExitCode::Ok;
    let mut repos = Vec::new();
    for rule in &rules {
        let prow = state.require_platform(&rule.settings.platform)?;
        let plat = platform::connect(&prow.kind, Path::new(&prow.qmp_dir))?;
        let repo = rule_repository(&state, rule)?;
        repos.extend(repo.clone());
        for v in &rule.vms {
            let res = cleanup_vm(
                plat.as_ref(),
                repo.as_ref(),
                &prow.name,
                &v.vm,
                &ctx.run_dir(),
            );
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
    // Staging files of writers killed between staging and publishing an
    // object, once per repository (rules may share one).
    repos.sort_by(|a, b| a.location().cmp(b.location()));
    repos.dedup_by(|a, b| a.location() == b.location());
    for repo in repos {
        for p in repo.remove_stale_partials()? {
            let d = format!("removed stale {p}");
            if !ctx.json && !ctx.quiet {
                out!("{}: {d}", repo.location());
            }
            actions.push(serde_json::json!({ "repository": repo.location(), "action": d }));
        }
    }
    if ctx.json {
        print_json(&serde_json::json!({ "actions": actions, "exit_code": worst.code() }));
    } else if actions.is_empty() && !ctx.quiet {
        out!("nothing to clean up");
    }
    Ok(worst)
}
