//! `run-now`: back up a rule's VMs now, in this process, through the runner.

use anyhow::Result;

use super::args::{LevelArg, RunNowArgs};
use super::process::TaskSession;
use super::Ctx;
use crate::error::ExitCode;
use crate::level::Level;
use crate::runner::{Job, TaskSpec};

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
        .collect();
    let results = session.runner.run_all(specs)?;
    let worst = session.exit_code(&results);
    if ctx.json {
        session.print_summary(Some(&rule.name), &results, worst);
    }
    session.finish();
    Ok(worst)
}
