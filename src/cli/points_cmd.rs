//! `points` and `verify`: what a rule's repository holds, and whether it is whole.

use anyhow::Result;
use serde::Serialize;

use super::args::{PointsArgs, VerifyArgs};
use super::output::{print_json, Table};
use super::Ctx;
use crate::error::ExitCode;
use crate::level::Level;
use crate::lifecycle::rule_repository;
use crate::repo::vm_key;
use crate::units::format_size;

/// Point summary for `points`.
#[derive(Serialize)]
struct PointRow {
    /// The VM's name, or for an orphaned VM key the key (`<platform>/<vm>`).
    vm: String,
    /// True for points of a VM key no rule owns (removable by `forget`).
    orphaned: bool,
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
    let vms: Vec<String> = match &a.vm {
        Some(vm) => vec![rule.require_vm(vm)?.vm.clone()],
        None => rule.vms.iter().map(|v| v.vm.clone()).collect(),
    };
    let mut rows = Vec::new();
    if let Some(repo) = rule_repository(&state, &rule)? {
        let mut keys: Vec<(String, String, bool)> = vms
            .iter()
            .map(|vm| (vm.clone(), vm_key(&rule.settings.platform, vm), false))
            .collect();
        if a.vm.is_none() {
            for key in crate::lifecycle::prune::orphaned_keys(&state, &rule, &repo)? {
                keys.push((key.clone(), key, true));
            }
        }
        for (vm, key, orphaned) in keys {
            point_rows(&repo.list_points(&key)?, &vm, orphaned, &mut rows);
        }
    }
    if ctx.json {
        print_json(&rows);
        return Ok(ExitCode::Ok);
    }
    let mut header = vec![
        "POINT", "LEVEL", "BASE", "DISKS", "SIZE", "READ", "STORED", "STATUS",
    ];
    if a.vm.is_none() {
        header.insert(0, "VM");
    }
    let mut t = Table::new(&header);
    for r in &rows {
        let status = match &r.reason {
            Some(why) => format!("{}: {why}", r.status),
            None if r.orphaned => format!("{} (orphaned: no rule owns this VM)", r.status),
            None => r.status.into(),
        };
        let mut cells = vec![
            r.point.clone(),
            r.level.map_or_else(|| "-".into(), |l| l.to_string()),
            r.base.clone().unwrap_or_else(|| "-".into()),
            r.disks.join(","),
            format_size(r.size),
            format_size(r.bytes_read),
            format_size(r.bytes_written),
            status,
        ];
        if a.vm.is_none() {
            cells.insert(0, r.vm.clone());
        }
        t.row(cells);
    }
    t.print();
    Ok(ExitCode::Ok)
}

/// One row per point of `list`, good and damaged, oldest first.
fn point_rows(list: &crate::repo::PointList, vm: &str, orphaned: bool, rows: &mut Vec<PointRow>) {
    let mut mine: Vec<PointRow> = list
        .points
        .iter()
        .map(|m| PointRow {
            vm: vm.to_string(),
            orphaned,
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
            vm: vm.to_string(),
            orphaned,
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
    mine.sort_by(|a, b| a.point.cmp(&b.point));
    rows.extend(mine);
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
    if a.boot {
        return verify_boot(ctx, a);
    }
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

/// `verify --boot`: boot the chosen point of each VM (a boot verification task
/// each, no slot: it is a transient recovery) and judge it.
fn verify_boot(ctx: &Ctx, a: VerifyArgs) -> Result<ExitCode> {
    let started = chrono::Utc::now();
    use crate::runner::{Job, TaskSpec};
    use std::sync::atomic::Ordering;
    let state = ctx.state()?;
    let rule = state.require_rule(a.rule.as_deref().unwrap_or_default())?;
    let repo = crate::lifecycle::rule_repository_with_points(&state, &rule)?;
    let vms: Vec<String> = match &a.vm {
        Some(vm) => vec![rule.require_vm(vm)?.vm.clone()],
        None => rule.vms.iter().map(|v| v.vm.clone()).collect(),
    };
    let opts = crate::recovery::boot::BootOptions {
        expect: a.expect.clone(),
        timeout: std::time::Duration::from_secs(a.timeout.max(1)),
        accel: a.accel.into(),
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
    let cancelled = cancel.load(Ordering::SeqCst);
    Ok(super::restore_cmd::conclude(
        ctx,
        &rule.name,
        &results,
        &[],
        cancelled,
        started,
    ))
}
