//! `prune` and `forget`: removing points, by retention or by choice (R15-R21);
//! `gc`: freeing what no point refers to.
//!
//! The decisions are `lifecycle::retention`'s pure plan; `lifecycle::prune`
//! applies them under the repository's locks. Here: which rules, and output.

use anyhow::Result;
use serde::Serialize;

use super::args::{ForgetArgs, GcArgs, PruneArgs};
use super::output::print_json;
use super::Ctx;
use crate::clock::Clock;
use crate::error::ExitCode;
use crate::lifecycle::gc::{gc as collect, RepoGc, Selection};
use crate::lifecycle::prune::{forget as forget_points, prune_rule, VmPrune};
use crate::lifecycle::retention::{Action, Mark};
use crate::units::format_size;

#[derive(Serialize)]
struct PruneDoc<'a> {
    dry_run: bool,
    exit_code: u8,
    vms: &'a [VmPrune],
}

pub fn prune(ctx: &Ctx, a: PruneArgs) -> Result<ExitCode> {
    let mut state = ctx.state()?;
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
                    if !a.dry_run {
                        crate::runner::record_points_left(&mut state, &p);
                    }
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
    let mut state = ctx.state()?;
    let rule = state.require_rule(&a.rule)?;
    let report = forget_points(&state, &rule, &a.vm, &a.point, a.dry_run)?;
    let removed = report
        .points
        .iter()
        .filter(|m| m.action == Action::Remove)
        .count() as u64;
    if !a.dry_run && removed > 0 {
        // Stats and metrics count the VM's points (R33).
        if let Some(n) = state.vm_status(&rule.name, &a.vm)?.points {
            state.set_vm_points(&rule.name, &a.vm, n.saturating_sub(removed))?;
        }
    }
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

pub fn gc(ctx: &Ctx, a: GcArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let selection = match (a.rule, a.target) {
        (Some(r), _) => Selection::Rule(r),
        (None, Some(t)) => Selection::Target(t),
        (None, None) => Selection::All,
    };
    let now = Clock::process().now().with_timezone(&chrono::Utc);
    let repos = collect(&state, &selection, a.dry_run, now)?;
    let worst = repos.iter().map(|r| r.code).max().unwrap_or(ExitCode::Ok);
    if ctx.json {
        print_json(&serde_json::json!({
            "dry_run": a.dry_run,
            "exit_code": worst.code(),
            "repositories": repos,
        }));
        return Ok(worst);
    }
    for r in &repos {
        print_gc(ctx, r);
    }
    if repos.is_empty() && !ctx.quiet {
        out!("no repositories");
    }
    Ok(worst)
}

fn print_gc(ctx: &Ctx, r: &RepoGc) {
    let name = format!("repository {} (rules {})", r.location, r.rules.join(", "));
    match (&r.report, &r.error) {
        (Some(g), _) if !ctx.quiet => {
            let verb = if g.dry_run { "would remove" } else { "removed" };
            out!(
                "{name}: {verb} {} object(s) ({}), kept {} of {} referenced; {} staging file(s) removed",
                g.objects_removed,
                format_size(g.bytes_freed),
                g.objects_kept,
                g.referenced_count,
                g.staging_removed
            );
            if g.missing_count > 0 {
                out!(
                    "{name}: {} referenced object(s) are missing ('vmbackup verify' says which points they damage)",
                    g.missing_count
                );
            }
        }
        (Some(_), _) => {}
        (None, Some(e)) => eprintln!("vmbackup: gc {name}: {e}"),
        (None, None) => {}
    }
}
