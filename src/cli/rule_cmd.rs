//! `vmbackup rule ...`: backup rules (R1-R37). Policies are validated by
//! `crate::policy`; admission of VMs (R1-R4, R35, R43) by `crate::state::rules`.

use anyhow::Result;
use chrono::Local;
use serde::Serialize;

use super::args::{
    OnOff, PolicyArgs, QuiesceArg, RetentionArg, RuleAddArgs, RuleCmd, RuleEditArgs,
};
use super::output::{print_json, yes_no, Table};
use super::Ctx;
use crate::error::{invalid, refused, ExitCode};
use crate::platform::Quiesce;
use crate::policy::bandwidth::{validate_windows, Window};
use crate::policy::{build_policy, Policy};
use crate::state::rules::{RuleRow, RuleSettings};
use crate::state::State;
use crate::task::TaskState;

pub fn run(ctx: &Ctx, cmd: RuleCmd) -> Result<ExitCode> {
    match cmd {
        RuleCmd::Add(a) => add(ctx, a),
        RuleCmd::Edit(a) => edit(ctx, a),
        RuleCmd::AddVm { name, vm } => {
            ctx.state()?.add_rule_vms(&name, &vm)?;
            done(ctx, &format!("rule '{name}': added {}", vm.join(", ")));
            Ok(ExitCode::Ok)
        }
        RuleCmd::Start { name, vm } => set_state(ctx, &name, vm.as_deref(), "started"),
        RuleCmd::Stop { name, vm } => set_state(ctx, &name, vm.as_deref(), "stopped"),
        RuleCmd::Remove { name, vm } => {
            ctx.state()?.remove_rule(&name, vm.as_deref())?;
            match vm {
                Some(vm) => done(ctx, &format!("VM '{vm}' removed from rule '{name}'")),
                None => done(ctx, &format!("rule '{name}' removed")),
            }
            Ok(ExitCode::Ok)
        }
        RuleCmd::List => list(ctx),
        RuleCmd::Show { name } => show(ctx, &name),
    }
}

fn done(ctx: &Ctx, msg: &str) {
    if ctx.json {
        print_json(&serde_json::json!({ "ok": msg }));
    } else if !ctx.quiet {
        out!("{msg}");
    }
}

fn set_state(ctx: &Ctx, name: &str, vm: Option<&str>, to: &str) -> Result<ExitCode> {
    ctx.state()?.set_rule_vm_state(name, vm, to)?;
    match vm {
        Some(vm) => done(ctx, &format!("rule '{name}' VM '{vm}' {to}")),
        None => done(ctx, &format!("rule '{name}' {to}")),
    }
    Ok(ExitCode::Ok)
}

fn parse_windows(specs: &[String]) -> Result<Vec<Window>> {
    let windows = specs
        .iter()
        .map(|s| s.parse::<Window>())
        .collect::<Result<Vec<_>>>()?;
    validate_windows(&windows)?;
    Ok(windows)
}

fn add(ctx: &Ctx, a: RuleAddArgs) -> Result<ExitCode> {
    let now = Local::now().naive_local();
    let policy = build_policy(
        a.policy.once.as_deref(),
        &a.policy.schedule,
        a.policy.retention.and_then(retention_units),
        now,
    )?;
    let bandwidth = parse_windows(&a.policy.bandwidth)?;
    let subdir = a.path.clone().unwrap_or_else(|| a.name.clone());
    let settings = RuleSettings {
        platform: a.platform,
        target: a.target,
        subdir,
        auto_cbt: !a.no_auto_cbt,
        cbt: a.cbt.is_none_or(|c| c == OnOff::On),
        lan_free: a.lan_free,
        delete_data: a.delete_data,
        quiesce: match a.quiesce {
            None => Quiesce::Off,
            Some(QuiesceArg::Require) => Quiesce::Require,
            Some(QuiesceArg::Try) => Quiesce::Try,
        },
        allow_plain_tcp_export: a.allow_plain_tcp_export,
        policy,
        bandwidth,
    };
    ctx.state()?.add_rule(&a.name, &settings, &a.vm)?;
    done(
        ctx,
        &format!("rule '{}' added with {} VM(s)", a.name, a.vm.len()),
    );
    Ok(ExitCode::Ok)
}

/// `--retention all` → keep all (`None`); `--retention N` → N periods.
fn retention_units(r: RetentionArg) -> Option<u32> {
    match r {
        RetentionArg::All => None,
        RetentionArg::Periods(n) => Some(n),
    }
}

/// `rule edit`: every policy flag left out keeps its value (sysadmin review B2).
fn edit(ctx: &Ctx, a: RuleEditArgs) -> Result<ExitCode> {
    let PolicyArgs {
        once,
        schedule,
        retention,
        bandwidth,
    } = &a.policy;
    if once.is_none()
        && schedule.is_empty()
        && retention.is_none()
        && bandwidth.is_empty()
        && !a.clear_bandwidth
    {
        return Err(refused(
            "rule edit: nothing to change; give --once, --schedule, --retention, --bandwidth or --clear-bandwidth (R34)",
        ));
    }
    let mut state = ctx.state()?;
    let rule = state.require_rule(&a.name)?;
    let now = Local::now().naive_local();
    let (current_specs, current_retention) = match &rule.settings.policy {
        Policy::Periodic {
            schedules,
            retention,
        } => (
            schedules.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            *retention,
        ),
        Policy::Once { .. } => (Vec::new(), None),
    };
    let new_retention = match retention {
        Some(r) => retention_units(*r),
        None => current_retention,
    };
    let policy = if once.is_some() {
        build_policy(once.as_deref(), &[], None, now)?
    } else if !schedule.is_empty() {
        build_policy(None, schedule, new_retention, now)?
    } else if let Some(r) = retention {
        // Only the retention changes: re-validate it with the rule's schedules.
        if current_specs.is_empty() {
            let shown = match r {
                RetentionArg::All => "all".to_string(),
                RetentionArg::Periods(n) => n.to_string(),
            };
            return Err(invalid(
                "--retention",
                shown,
                "applies to periodic policies only; this rule runs once (R15)",
            ));
        }
        build_policy(None, &current_specs, new_retention, now)?
    } else {
        rule.settings.policy.clone()
    };
    let windows = if a.clear_bandwidth {
        Vec::new()
    } else if bandwidth.is_empty() {
        rule.settings.bandwidth.clone()
    } else {
        parse_windows(bandwidth)?
    };
    state.edit_rule_policy(&a.name, &policy, &windows)?;
    let msg = format!("rule '{}' updated", a.name);
    // What the next prune would remove under the new policy (when it changed).
    let removable = if policy == rule.settings.policy {
        None
    } else {
        let edited = state.require_rule(&a.name)?;
        let now = crate::clock::Clock::process().now();
        match crate::lifecycle::prune::prune_rule(&state, &edited, None, true, &now) {
            Ok(plans) => Some(plans.iter().map(|p| p.removals()).sum::<usize>()),
            Err(e) => {
                eprintln!("vmbackup: cannot tell what the next prune removes: {e:#}");
                None
            }
        }
    };
    if ctx.json {
        print_json(&serde_json::json!({
            "message": msg,
            "rule": a.name,
            "prune_would_remove_count": removable,
        }));
    } else if !ctx.quiet {
        out!("{msg}");
        if let Some(n) = removable.filter(|n| *n > 0) {
            out!(
                "the next prune removes {n} point(s) outside the new retention ('vmbackup prune {} --dry-run' lists them)",
                a.name
            );
        }
    }
    Ok(ExitCode::Ok)
}

/// A VM's R31 state as `rule show` reports it.
fn vm_state(state: &State, rule: &RuleRow, vm: &str, stored: &str) -> Result<String> {
    if let Some(t) = state.last_task(&rule.name, vm)? {
        if t.state == TaskState::Running {
            return Ok(match t.phase.as_deref() {
                Some("running") | None => format!(
                    "running {:.0}% {}/s ({})",
                    t.percent,
                    crate::units::format_size(t.rate),
                    t.bw_limit.as_deref().unwrap_or("unlimited")
                ),
                Some(p) => p.to_string(),
            });
        }
        if matches!(t.state, TaskState::Pending | TaskState::Queued) {
            return Ok(t.state.to_string());
        }
    }
    // R31 unknown: the platform or the target (with its marker) cannot be reached.
    let reachable = state.platform(&rule.settings.platform)?.is_some_and(|p| {
        crate::platform::connect(&p.spec, crate::platform::qmp::DEFAULT_TIMEOUT)
            .and_then(|p| p.reachable())
            .is_ok()
    }) && state
        .target(&rule.settings.target)?
        .is_some_and(|t| crate::lifecycle::open_target(&t).is_ok());
    if !reachable && stored != "stopped" {
        return Ok("unknown".into());
    }
    Ok(match stored {
        "started" => "idle".into(),
        other => other.into(),
    })
}

fn list(ctx: &Ctx) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rules = state.rules()?;
    if ctx.json {
        print_json(&rules);
        return Ok(ExitCode::Ok);
    }
    let mut t = Table::new(&["NAME", "PLATFORM", "TARGET", "VMS", "POLICY"]);
    for r in &rules {
        let vms: Vec<String> = r
            .vms
            .iter()
            .map(|v| format!("{}({})", v.vm, v.state))
            .collect();
        t.row(vec![
            r.name.clone(),
            r.settings.platform.clone(),
            r.settings.target.clone(),
            vms.join(","),
            r.settings.policy.to_string(),
        ]);
    }
    t.print();
    Ok(ExitCode::Ok)
}

#[derive(Serialize)]
struct ScheduleView {
    spec: String,
    cron: Vec<String>,
}

#[derive(Serialize)]
struct NextRun {
    at: String,
    level: String,
}

#[derive(Serialize)]
struct VmView {
    vm: String,
    state: String,
    last_task: Option<crate::state::tasks::TaskRow>,
}

fn show(ctx: &Ctx, name: &str) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rule = state.require_rule(name)?;
    let s = &rule.settings;
    let schedules: Vec<ScheduleView> = match &s.policy {
        Policy::Periodic { schedules, .. } => schedules
            .iter()
            .map(|sc| ScheduleView {
                spec: sc.to_string(),
                cron: sc.cron_exprs(),
            })
            .collect(),
        Policy::Once { .. } => Vec::new(),
    };
    let now = Local::now().naive_local();
    let next: Vec<NextRun> = s
        .policy
        .next_runs(now, 5)
        .into_iter()
        .map(|(at, level)| NextRun {
            at: at.format("%Y-%m-%d %H:%M").to_string(),
            level: level.to_string(),
        })
        .collect();
    let vms: Vec<VmView> = rule
        .vms
        .iter()
        .map(|v| {
            Ok(VmView {
                vm: v.vm.clone(),
                state: vm_state(&state, &rule, &v.vm, &v.state)?,
                last_task: state.last_task(&rule.name, &v.vm)?,
            })
        })
        .collect::<Result<_>>()?;
    if ctx.json {
        let mut v = serde_json::to_value(&rule)?;
        v["policy_text"] = serde_json::json!(s.policy.to_string());
        v["schedules"] = serde_json::to_value(&schedules)?;
        v["next_runs"] = serde_json::to_value(&next)?;
        v["vms"] = serde_json::to_value(&vms)?;
        print_json(&v);
        return Ok(ExitCode::Ok);
    }
    out!("name:         {}", rule.name);
    out!("platform:     {}", s.platform);
    out!("target:       {} (sub-directory {})", s.target, s.subdir);
    let cbt = if s.auto_cbt {
        "auto (when the VM supports it)".to_string()
    } else {
        yes_no(s.cbt)
    };
    out!("quick backup: {cbt}");
    out!("lan-free:     {}", yes_no(s.lan_free));
    out!("delete data:  {}", yes_no(s.delete_data));
    out!("quiesce:      {}", s.quiesce);
    if s.allow_plain_tcp_export {
        out!("exports:      plain TCP allowed (--allow-plain-tcp-export)");
    }
    out!("policy:       {}", s.policy);
    for sc in &schedules {
        out!("  {}  =>  cron {}", sc.spec, sc.cron.join(" | "));
    }
    if s.bandwidth.is_empty() {
        out!("bandwidth:    unlimited");
    } else {
        for (i, w) in s.bandwidth.iter().enumerate() {
            out!(
                "{}{w}",
                if i == 0 {
                    "bandwidth:    "
                } else {
                    "              "
                }
            );
        }
    }
    out!("next runs:");
    if next.is_empty() {
        out!("  (none)");
    }
    for n in &next {
        out!("  {}  {}", n.at, n.level);
    }
    out!();
    let mut t = Table::new(&["VM", "STATE", "LAST TASK", "RESULT", "POINT"]);
    for v in &vms {
        let (when, result, point) = match &v.last_task {
            Some(t) => (
                t.started_at.clone().unwrap_or_default(),
                t.state.to_string(),
                t.point.clone().unwrap_or_default(),
            ),
            None => (String::new(), String::new(), String::new()),
        };
        t.row(vec![v.vm.clone(), v.state.clone(), when, result, point]);
    }
    t.print();
    Ok(ExitCode::Ok)
}
