//! `run-now`: back up a rule's VMs now, in this process, through the runner.

use anyhow::Result;

use super::args::{LevelArg, RunNowArgs};
use super::process::TaskSession;
use super::Ctx;
use crate::error::ExitCode;
use crate::level::Level;
use crate::runner::scheduler::copy_follow_up;
use crate::runner::{Job, TaskSpec};
use crate::task::TaskKind;

fn level_of(l: LevelArg) -> Level {
    match l {
        LevelArg::Full => Level::Full,
        LevelArg::Inc => Level::Inc,
        LevelArg::Diff => Level::Diff,
    }
}

pub fn run_now(ctx: &Ctx, a: RunNowArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rule = state.require_rule(&a.rule)?;
    let vms: Vec<String> = match &a.vm {
        Some(vm) => vec![rule.require_vm(vm)?.vm.clone()],
        None => rule.vms.iter().map(|v| v.vm.clone()).collect(),
    };
    state.require_platform(&rule.settings.platform)?;
    state.require_target(&rule.settings.target)?;
    drop(state);
    let session = TaskSession::start(ctx)?;
    let specs = vms
        .into_iter()
        .map(|vm| TaskSpec {
            rule: rule.clone(),
            vm,
            job: Job::Backup {
                level: level_of(a.level),
                slot: None,
                notes: Vec::new(),
            },
        })
        .collect::<Vec<TaskSpec>>();
    let mut results = session.runner.run_all(specs.clone())?;
    // Each completed backup's copy (`rule edit --copy-to`), after the backups.
    let mut copies = Vec::new();
    for r in &results {
        if let Some(spec) = specs
            .iter()
            .find(|s| s.vm == r.vm && r.kind == TaskKind::Backup)
        {
            let point = r.outcome.as_ref().and_then(|o| o.point());
            copies.extend(copy_follow_up(&session.runner, spec, r.status, point));
        }
    }
    results.extend(copies);
    let worst = session.exit_code(&results);
    if ctx.json {
        session.print_summary(Some(&rule.name), &results, worst);
    }
    session.finish();
    Ok(worst)
}
