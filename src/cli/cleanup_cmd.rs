//! `cleanup`: what killed runs left on VMs and in repositories (R44), now.

use std::path::Path;

use anyhow::Result;

use super::args::CleanupArgs;
use super::output::print_json;
use super::Ctx;
use crate::error::{exit_code_of, ExitCode};
use crate::lifecycle::rule_repository;
use crate::platform;
use crate::runner::recover::cleanup_vm;

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
