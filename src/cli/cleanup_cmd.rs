//! `cleanup`: what killed runs left on VMs and in repositories (R44), now.

use anyhow::Result;

use super::args::CleanupArgs;
use super::output::print_json;
use super::Ctx;
use crate::error::{exit_code_of, ExitCode};
use crate::platform;
use crate::repo::Repository;
use crate::runner::recover::cleanup_vm;
use crate::runner::repo_root;

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
