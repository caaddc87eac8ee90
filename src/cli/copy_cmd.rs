//! `vmbackup copy RULE --to TARGET`: an offsite copy of a rule's points
//! (`repo::copy`), run in this process.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;

use super::args::CopyArgs;
use super::output::print_json;
use super::Ctx;
use crate::error::{refused, ExitCode};
use crate::lifecycle::{copy_repository, rule_repository};
use crate::repo::copy::copy_vm;
use crate::repo::vm_key;
use crate::task::throttle::Throttle;

pub fn run(ctx: &Ctx, a: CopyArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rule = state.require_rule(&a.rule)?;
    if let Some(vm) = &a.vm {
        rule.require_vm(vm)?;
    }
    let source = rule_repository(&state, &rule)?.ok_or_else(|| {
        refused(format!(
            "rule '{}' has no restore points yet (no backup completed)",
            rule.name
        ))
    })?;
    let copy = copy_repository(&state, &rule, &source, &a.to)?;
    drop(state);
    let vms = match &a.vm {
        Some(vm) => vec![vm_key(&rule.settings.platform, vm)],
        None => source.list_vms()?,
    };
    // The rule's bandwidth windows pace the copy, as they pace its backups.
    let throttle = Throttle::new(
        rule.settings.bandwidth.clone(),
        crate::clock::Clock::process(),
        Arc::new(AtomicBool::new(false)),
    );
    let mut done = Vec::new();
    for key in &vms {
        let report = copy_vm(&source, &copy, key, a.point.as_deref(), &throttle)?;
        if !ctx.json && !ctx.quiet {
            out!(
                "{key}: {} point(s) copied, {} already there; {} object(s) sent ({} bytes), {} already there",
                report.points_copied.len(),
                report.points_present.len(),
                report.sent_count,
                report.sent_bytes,
                report.present_count
            );
        }
        let mut entry = serde_json::to_value(&report)?;
        entry["vm"] = key.as_str().into();
        done.push(entry);
    }
    if ctx.json {
        print_json(&serde_json::json!({
            "message": format!("rule '{}' copied to target '{}'", rule.name, a.to),
            "rule": rule.name,
            "target": a.to,
            "repository": copy.location(),
            "vms": done,
        }));
    }
    Ok(ExitCode::Ok)
}
