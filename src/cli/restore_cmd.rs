//! `restore`: a restore point back to image files, as a task of the runner
//! (it takes a slot, R38, and can be cancelled like a backup).

use anyhow::Result;

use super::args::{ImageFormat as ImageArg, RestoreArgs};
use super::process::TaskSession;
use super::Ctx;
use crate::error::{invalid, ExitCode};
use crate::lifecycle::repository::{found_repository, parse_platform_vm};
use crate::lifecycle::restore_repository;
use crate::repo::vm_key;
use crate::restore::ImageFormat;
use crate::runner::{Job, TaskSpec};
use crate::state::rules::RuleRow;

pub fn restore(ctx: &Ctx, a: RestoreArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let (rule, repo, vm) = match &a.target {
        // No rule in the state (a new host): the repository that holds the
        // VM's points on the target, found from its layout.
        Some(target) => {
            let (platform, vm) = parse_platform_vm(&a.vm)?;
            let (path, repo) = found_repository(&state, target, &platform, &vm, a.path.as_deref())?;
            (RuleRow::found(target, &path, &platform), repo, vm)
        }
        None => {
            let name = a.rule.as_deref().unwrap_or_default();
            let rule = state.require_rule(name)?;
            rule.require_vm(&a.vm)?;
            let repo = restore_repository(&state, &rule, a.from.as_deref())?;
            (rule, repo, a.vm.clone())
        }
    };
    let key = vm_key(&rule.settings.platform, &vm);
    let point = (a.point != "latest").then_some(a.point.as_str());
    // Chosen (and so validated) before a task is recorded: bad input changes nothing.
    let manifest = crate::restore::select_point(&repo, &key, point)?;
    if let Some(name) = &a.as_vm {
        crate::state::check_name("--as-vm", name)?;
        let prow = state.require_platform(&rule.settings.platform)?;
        if let Some(why) = prow.spec.why_no_new_vm(&manifest.vm_config) {
            return Err(invalid(
                "--as-vm",
                name,
                format!("platform '{}': {why}", prow.name),
            ));
        }
        let taken = crate::platform::connect(&prow.spec, ctx.system_config()?.io_timeout)?
            .inventory()?
            .iter()
            .any(|v| v.name == *name);
        if taken {
            return Err(invalid(
                "--as-vm",
                name,
                format!(
                    "platform '{}' has a VM of this name; pick a new name",
                    prow.name
                ),
            ));
        }
    }
    drop(state);
    let session = TaskSession::start(ctx)?;
    let spec = TaskSpec {
        rule: rule.clone(),
        vm,
        job: Job::Restore {
            point: Box::new(manifest),
            dest: a.to.clone(),
            format: match a.format {
                ImageArg::Raw => ImageFormat::Raw,
                ImageArg::Qcow2 => ImageFormat::Qcow2,
            },
            force: a.force,
            mode: a.mode,
            as_vm: a.as_vm.clone().map(|n| (n, a.start)),
            from: a.from.clone(),
        },
    };
    let results = session.runner.run_all(vec![spec])?;
    let worst = session.exit_code(&results);
    if ctx.json {
        session.print_summary(Some(&rule.name), &results, worst);
    }
    session.finish();
    Ok(worst)
}
