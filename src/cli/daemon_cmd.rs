//! `daemon` and `run-due`: rules run by themselves (R11-R14, R28).
//!
//! Both reclaim what dead processes left (R44), then hand due runs to the runner.
//! `run-due` exits with the worst code of its tasks (0 when nothing was due);
//! `daemon` runs until SIGINT/SIGTERM, then stops its tasks cleanly and exits 130.

use std::sync::atomic::Ordering;

use anyhow::Result;

use super::backup_cmd::{cancel_on_signals, make_runner, reclaim_dead, runtime, worst_of};
use super::Ctx;
use crate::error::ExitCode;
use crate::runner::{scheduler, TaskResult};

pub fn run_due(ctx: &Ctx) -> Result<ExitCode> {
    ctx.state()?;
    reclaim_dead(ctx)?;
    let rt = runtime()?;
    let cancel = cancel_on_signals(&rt);
    let runner = make_runner(ctx, &rt, cancel.clone())?;
    let results = scheduler::run_due(&runner)?;
    let worst = worst_of(&results, cancel.load(Ordering::SeqCst));
    if ctx.json {
        out!(
            "{}",
            serde_json::json!({ "type": "summary", "exit_code": worst.code(), "tasks": results })
        );
    } else if results.is_empty() && !ctx.quiet {
        out!("nothing due");
    }
    Ok(worst)
}

pub fn daemon(ctx: &Ctx) -> Result<ExitCode> {
    ctx.state()?;
    reclaim_dead(ctx)?;
    let rt = runtime()?;
    let cancel = cancel_on_signals(&rt);
    let runner = make_runner(ctx, &rt, cancel.clone())?;
    eprintln!("vmbackup: daemon started (pid {})", std::process::id());
    let json = ctx.json;
    let report = move |r: &TaskResult| {
        if json {
            out!("{}", serde_json::json!({ "type": "task_end", "result": r }));
        } else {
            eprintln!(
                "vmbackup: task {} rule '{}' VM '{}': {}",
                r.task,
                r.rule.as_deref().unwrap_or(""),
                r.vm,
                r.status
            );
        }
    };
    scheduler::daemon(&runner, &report)?;
    eprintln!("vmbackup: daemon stopped");
    Ok(ExitCode::Interrupted)
}
