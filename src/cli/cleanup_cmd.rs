//! `cleanup`: what killed runs left on VMs and in repositories (R44), now; with
//! `--redact`, secrets in manifests written before redaction existed.

use anyhow::Result;

use super::args::CleanupArgs;
use super::output::print_json;
use super::Ctx;
use crate::error::{exit_code_of, ExitCode};
use crate::lifecycle::rule_repository;
use crate::platform;
use crate::runner::recover::{cleanup_vm, redact_manifests, remove_stale_restores};

pub fn cleanup(ctx: &Ctx, a: CleanupArgs) -> Result<ExitCode> {
    let mut state = ctx.state()?;
    let rules = match &a.rule {
        Some(r) => vec![state.require_rule(r)?],
        None => state.rules()?,
    };
    let run_dir = ctx.run_dir()?;
    let io_timeout = ctx.system_config()?.io_timeout;
    let mut actions: Vec<serde_json::Value> = Vec::new();
    let mut worst = ExitCode::Ok;
    let names: Vec<String> = rules.iter().map(|r| r.name.clone()).collect();
    for d in remove_stale_restores(&mut state, None, Some(&names))? {
        if !ctx.json && !ctx.quiet {
            out!("{d}");
        }
        actions.push(action(None, None, None, Some(&d), None));
    }
    let mut repos = Vec::new();
    for rule in &rules {
        let prow = state.require_platform(&rule.settings.platform)?;
        let plat = platform::connect(&prow.spec, io_timeout)?;
        let repo = rule_repository(&state, rule)?;
        repos.extend(repo.clone());
        for v in &rule.vms {
            // A VM being backed up now is busy: said at once, without asking
            // its hypervisor (which may be the reason the task takes long).
            let res = match state.running_backup_of(&rule.name, &v.vm)? {
                Some(t) => Err(crate::error::busy(format!(
                    "VM '{}' is being backed up by task {} (pid {}): cleanup would take its snapshot away; run it once the task has ended (or 'vmbackup task cancel {}')",
                    v.vm,
                    t.id,
                    t.pid.unwrap_or_default(),
                    t.id
                ))),
                None => cleanup_vm(plat.as_ref(), repo.as_ref(), &prow.name, &v.vm, &run_dir),
            };
            match res {
                Ok(done) => {
                    for d in &done {
                        if !ctx.json && !ctx.quiet {
                            out!("{} {}: {d}", rule.name, v.vm);
                        }
                        actions.push(action(Some(&rule.name), Some(&v.vm), None, Some(d), None));
                    }
                }
                Err(e) => {
                    worst = worst.max(exit_code_of(&e));
                    eprintln!("vmbackup: cleanup {} {}: {e:#}", rule.name, v.vm);
                    let error = format!("{e:#}");
                    actions.push(action(
                        Some(&rule.name),
                        Some(&v.vm),
                        None,
                        None,
                        Some(&error),
                    ));
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
            actions.push(action(None, None, Some(repo.location()), Some(&d), None));
        }
        if a.redact {
            for d in redact_manifests(&repo)? {
                if !ctx.json && !ctx.quiet {
                    out!("{}: {d}", repo.location());
                }
                actions.push(action(None, None, Some(repo.location()), Some(&d), None));
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

/// One line of `cleanup --json`'s `actions`: every field present (docs/JSON.md).
fn action(
    rule: Option<&str>,
    vm: Option<&str>,
    repository: Option<&str>,
    action: Option<&str>,
    error: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "rule": rule, "vm": vm, "repository": repository, "action": action, "error": error,
    })
}
