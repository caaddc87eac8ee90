//! `points` and `verify`: what a rule's repository holds, and whether it is whole.

use anyhow::Result;
use serde::Serialize;

use super::args::{PointsArgs, VerifyArgs};
use super::output::{print_json, Table};
use super::Ctx;
use crate::error::ExitCode;
use crate::level::Level;
use crate::repo::{vm_key, Repository};
use crate::runner::repo_root;
use crate::units::format_size;

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

#[derive(Serialize)]
struct VerifyItem {
    rule: String,
    vm: String,
    point: String,
    chunks_checked: u64,
    problems: Vec<String>,
}

pub fn verify(ctx: &Ctx, a: VerifyArgs) -> Result<ExitCode> {
    if a.boot {
        return verify_boot(ctx, a);
    }
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

/// `verify --boot`: boot the chosen point of each VM (a boot verification task
/// each, no slot: it is a transient recovery) and judge it.
fn verify_boot(ctx: &Ctx, a: VerifyArgs) -> Result<ExitCode> {
    use crate::runner::{Job, TaskSpec};
    use std::sync::atomic::Ordering;
    let state = ctx.state()?;
    let rule = state.require_rule(a.rule.as_deref().unwrap_or_default())?;
    let root = repo_root(&state, &rule)?;
    let repo = Repository::open(&root)?;
    let vms: Vec<String> = match &a.vm {
        Some(vm) => vec![rule.require_vm(vm)?.vm.clone()],
        None => rule.vms.iter().map(|v| v.vm.clone()).collect(),
    };
    let opts = crate::recovery::boot::BootOptions {
        expect: a.expect.clone(),
        timeout: std::time::Duration::from_secs(a.timeout.max(1)),
    };
    let mut specs = Vec::new();
    for vm in vms {
        let key = vm_key(&rule.settings.platform, &vm);
        let point = crate::restore::select_point(&repo, &key, a.point.as_deref())?;
        // Refused now (exit 2) when the VM can be judged neither way.
        crate::recovery::boot::judge_for(&point, a.expect.as_deref())?;
        specs.push(TaskSpec {
            rule: rule.clone(),
            vm,
            job: Job::BootVerify {
                point: Box::new(point),
                opts: opts.clone(),
            },
        });
    }
    drop(state);
    super::process::reclaim_dead(ctx)?;
    let rt = super::process::runtime()?;
    let cancel = super::process::cancel_on_signals(&rt);
    let runner = super::process::make_runner(ctx, &rt, cancel.clone())?;
    let results = runner.run_all(specs)?;
    let worst = super::process::worst_of(&results, cancel.load(Ordering::SeqCst));
    if ctx.json {
        super::restore_cmd::print_summary(&rule.name, worst, &results, &[]);
    }
    Ok(worst)
}
