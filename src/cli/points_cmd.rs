//! `points` and `verify`: what a rule's repository holds, and whether it is whole.

use anyhow::Result;
use serde::Serialize;

use super::args::{PointsArgs, VerifyArgs};
use super::output::{print_json, Table};
use super::Ctx;
use crate::error::ExitCode;
use crate::level::Level;
use crate::lifecycle::repository::{found_repository, parse_platform_vm};
use crate::lifecycle::{restore_repository, rule_repository};
use crate::monitor::notify::{Event, Notification};
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
    #[serde(with = "crate::timefmt::json_opt")]
    started: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(with = "crate::timefmt::json_opt")]
    finished: Option<chrono::DateTime<chrono::Utc>>,
    disks: Vec<String>,
    size: u64,
    bytes_read: u64,
    bytes_written: u64,
    /// Why an inc/diff ran as a full.
    fallback: Option<String>,
    /// `completed`, or `damaged` (manifest or an index unreadable, see `error`).
    status: &'static str,
    error: Option<String>,
}

pub fn points(ctx: &Ctx, a: PointsArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    if let Some(target) = &a.target {
        // No rule in the state (a new host): the repository that holds the
        // VM's points on the target, found from its layout.
        let shown = a.vm.as_deref().unwrap_or_default();
        let (platform, vm) = parse_platform_vm(shown)?;
        let (_, repo) = found_repository(&state, target, &platform, &vm, a.path.as_deref())?;
        let mut rows = Vec::new();
        point_rows(
            &repo.list_points(&vm_key(&platform, &vm))?,
            shown,
            false,
            &mut rows,
        );
        return print_points(ctx, &rows, false);
    }
    let rule = state.require_rule(a.rule.as_deref().unwrap_or_default())?;
    let vms: Vec<String> = match &a.vm {
        Some(vm) => vec![rule.require_vm(vm)?.vm.clone()],
        None => rule.vms.iter().map(|v| v.vm.clone()).collect(),
    };
    let mut rows = Vec::new();
    let repo = match &a.from {
        Some(from) => Some(restore_repository(&state, &rule, Some(from))?),
        None => rule_repository(&state, &rule)?,
    };
    if let Some(repo) = repo {
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
    print_points(ctx, &rows, a.vm.is_none())
}

/// `points` output: JSON, or a table (with a VM column when `vm_column`).
fn print_points(ctx: &Ctx, rows: &[PointRow], vm_column: bool) -> Result<ExitCode> {
    if ctx.json {
        print_json(&rows);
        return Ok(ExitCode::Ok);
    }
    let mut header = vec![
        "POINT", "LEVEL", "BASE", "DISKS", "SIZE", "READ", "STORED", "STATUS",
    ];
    if vm_column {
        header.insert(0, "VM");
    }
    let mut t = Table::new(&header);
    for r in rows {
        let status = match &r.error {
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
        if vm_column {
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
            started: Some(m.started),
            finished: Some(m.finished),
            disks: m.disks.iter().map(|d| d.name.clone()).collect(),
            size: m.totals.size,
            bytes_read: m.totals.bytes_read,
            bytes_written: m.totals.bytes_written,
            fallback: m.fallback_reason.clone(),
            status: "completed",
            error: None,
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
            fallback: None,
            status: "damaged",
            error: Some(d.reason.clone()),
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
    /// Chunk and delta objects checked.
    checked_count: u64,
    /// Objects once quarantined and whole again (a later backup stored them).
    healed_count: u64,
    problems: Vec<String>,
}

/// What `verify` found in one rule.
#[derive(Serialize)]
struct VerifyRule {
    rule: String,
    /// `checked`, `no points yet`, or `failed` (`error` says why).
    status: &'static str,
    error: Option<String>,
}

/// One VM's verify: its damaged points (point, first problem), and whether
/// every point was checked (only then is the count of damaged points known).
struct VmVerified {
    rule: String,
    vm: String,
    damaged: Vec<(String, String)>,
    all_points: bool,
}

pub fn verify(ctx: &Ctx, a: VerifyArgs) -> Result<ExitCode> {
    if a.boot {
        return verify_boot(ctx, a);
    }
    let mut state = ctx.state()?;
    let monitor = ctx.monitor()?;
    let mut verified: Vec<VmVerified> = Vec::new();
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
                let mut damaged = Vec::new();
                for p in ids {
                    let item = verify_one(&repo, rule, vm, &key, &p, &quarantined)?;
                    print_verify_item(ctx, &item);
                    if item.status != "ok" {
                        let first = item.problems.first().cloned().unwrap_or_default();
                        damaged.push((item.point.clone(), first));
                    }
                    items.push(item);
                }
                verified.push(VmVerified {
                    rule: rule.name.clone(),
                    vm: vm.clone(),
                    damaged,
                    all_points: a.point.is_none(),
                });
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
    report_to_monitor(&mut state, &monitor, &verified)?;
    let bad = items.iter().filter(|i| i.status != "ok").count();
    let failed = summary.iter().filter(|r| r.error.is_some()).count();
    if ctx.json {
        print_json(&serde_json::json!({
            "rules": summary,
            "points": items,
            "damaged_count": bad,
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

/// Record what verify found (for `stats` and the metrics: last verify, damaged
/// points, R33) and notify `damaged` for each VM with damage.
fn report_to_monitor(
    state: &mut crate::state::State,
    monitor: &crate::monitor::Monitor,
    verified: &[VmVerified],
) -> Result<()> {
    let now = crate::timefmt::json_time(chrono::Utc::now());
    for v in verified {
        if v.all_points {
            state.record_verify(&v.rule, &v.vm, &now, v.damaged.len() as u64)?;
        }
        if let Some((point, problem)) = v.damaged.first() {
            let mut n = Notification::new(Event::Damaged);
            n.rule = Some(v.rule.clone());
            n.vm = Some(v.vm.clone());
            n.kind = Some("verify".into());
            n.point = Some(point.clone());
            n.error = Some(format!(
                "{} point(s) damaged; first: point {point}: {problem}",
                v.damaged.len()
            ));
            n.exit_code = Some(ExitCode::Failed.code());
            monitor.notify(state, n);
        }
    }
    monitor.refresh(state);
    monitor.finish();
    Ok(())
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
        checked_count: r.chunks_checked,
        healed_count: r.healed,
        problems,
    })
}

fn print_verify_item(ctx: &Ctx, item: &VerifyItem) {
    if ctx.json || (ctx.quiet && item.problems.is_empty()) {
        return;
    }
    let verdict = match (item.problems.len(), item.healed_count) {
        (0, 0) => "ok".to_string(),
        (0, n) => format!("ok, healed ({n} object(s) stored again by a later backup)"),
        (n, _) => format!("DAMAGED, {n} problem(s)"),
    };
    out!(
        "{} {} {}: {} object(s) checked, {verdict}",
        item.rule,
        item.vm,
        item.point,
        item.checked_count
    );
    for pr in &item.problems {
        out!("  {pr}");
    }
}

/// `verify --boot`: boot the chosen point of each VM (a boot verification task
/// each, no slot: it is a transient recovery) and judge it.
fn verify_boot(ctx: &Ctx, a: VerifyArgs) -> Result<ExitCode> {
    use crate::runner::{Job, TaskSpec};
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
    let session = super::process::TaskSession::start(ctx)?;
    let results = session.runner.run_all(specs)?;
    let code = super::restore_cmd::conclude(ctx, &session, &rule.name, &results, &[]);
    session.finish();
    Ok(code)
}
