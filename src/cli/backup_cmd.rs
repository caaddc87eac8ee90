//! `run-now`: back up a rule's VMs now, in this process, through the runner.

use std::sync::atomic::Ordering;

use anyhow::Result;

use super::args::{LevelArg, RunNowArgs};
use super::process::{cancel_on_signals, make_runner, reclaim_dead, runtime, worst_of};
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
    reclaim_dead(ctx)?;
    let rt = runtime()?;
    let cancel = cancel_on_signals(&rt);
    let runner = make_runner(ctx, &rt, cancel.clone())?;
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
    let results = runner.run_all(specs)?;
    let worst = worst_of(&results, cancel.load(Ordering::SeqCst));
    if ctx.json {
        let vms: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.remove("rule");
                }
                v
            })
            .collect();
        out!(
            "{}",
            serde_json::json!({ "type": "summary", "rule": rule.name, "exit_code": worst.code(), "vms": vms })
        );
    }
    Ok(worst)
}
