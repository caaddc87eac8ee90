//! `prune` and `forget`: removing points, by retention or by choice (R15-R21).
//!
//! The decisions are `lifecycle::retention`'s pure plan; `lifecycle::prune`
//! applies them under the repository's locks. Here: which rules, and output.

use anyhow::Result;
use serde::Serialize;

use super::args::{ForgetArgs, PruneArgs};
use super::output::print_json;
use super::Ctx;
use crate::clock::Clock;
use crate::error::ExitCode;
use crate::lifecycle::prune::{forget as forget_points, prune_rule, VmPrune};
use crate::lifecycle::retention::{Action, Mark};

#[derive(Serialize)]
struct PruneDoc<'a> {
    dry_run: bool,
    exit_code: u8,
    vms: &'a [VmPrune],
}

pub fn prune(ctx: &Ctx, a: PruneArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rules = match &a.rule {
        Some(r) => vec![state.require_rule(r)?],
        None => state.rules()?,
    };
    let now = Clock::process().now();
    let mut vms: Vec<VmPrune> = Vec::new();
    let mut worst = ExitCode::Ok;
    for rule in &rules {
        match prune_rule(&state, rule, a.vm.as_deref(), a.dry_run, &now) {
            Ok(plans) => {
                if plans.is_empty() && !ctx.json && !ctx.quiet {
                    out!("rule {}: no points yet", rule.name);
                }
                for p in plans {
                    worst = worst.max(p.code);
                    if !ctx.json {
                        print_vm(ctx, &p, a.dry_run);
                    }
                    vms.push(p);
                }
            }
            Err(e) => {
                worst = worst.max(crate::error::exit_code_of(&e));
                eprintln!("vmbackup: prune {}: {e:#}", rule.name);
            }
        }
    }
    if ctx.json {
        print_json(&PruneDoc {
            dry_run: a.dry_run,
            exit_code: worst.code(),
            vms: &vms,
        });
    } else if !ctx.quiet && !a.dry_run && vms.iter().any(|v| v.removals() > 0) {
        out!("the removed points' data is freed by garbage collection ('vmbackup gc')");
    }
    Ok(worst)
}

fn print_vm(ctx: &Ctx, p: &VmPrune, dry_run: bool) {
    if let Some(e) = &p.error {
        eprintln!("vmbackup: prune {} VM {}: {e}", p.rule, p.vm);
        return;
    }
    if ctx.quiet {
        return;
    }
    let what = if p.orphaned { "orphaned VM key" } else { "VM" };
    out!("rule {}, {what} {} ({}):", p.rule, p.vm, p.retention);
    for m in &p.points {
        out!("  {}", mark_line(m, dry_run));
    }
    let removed = p.removals();
    let verb = if dry_run {
        "would be removed"
    } else {
        "removed"
    };
    out!(
        "  {} point(s) kept, {removed} {verb}",
        p.points.len() - removed
    );
}

/// `20261130T130000Z inc   removed: 2026-11-30 is outside retention 0 days`.
fn mark_line(m: &Mark, dry_run: bool) -> String {
    let level = m.level.map_or("-".to_string(), |l| l.to_string());
    let action = match (m.action, dry_run) {
        (Action::Keep, _) => "kept",
        (Action::Remove, false) => "removed",
        (Action::Remove, true) => "would remove",
    };
    format!("{}  {level:<4}  {action}: {}", m.point, m.reason)
}

pub fn forget(ctx: &Ctx, a: ForgetArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rule = state.require_rule(&a.rule)?;
    let report = forget_points(&state, &rule, &a.vm, &a.point, a.dry_run)?;
    if ctx.json {
        print_json(&serde_json::json!({
            "dry_run": a.dry_run,
            "rule": report.rule,
            "vm": report.vm,
            "points": report.points,
            "notes": report.notes,
        }));
    } else if !ctx.quiet {
        for m in &report.points {
            out!("{}", mark_line(m, a.dry_run));
        }
        for n in &report.notes {
            out!("note: {n}");
        }
        if !a.dry_run {
            out!("the removed points' data is freed by garbage collection ('vmbackup gc')");
        }
    }
    Ok(ExitCode::Ok)
}
