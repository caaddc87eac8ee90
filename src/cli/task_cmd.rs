//! `task list` and `task cancel` (R41): what runs, what waits and why.

use anyhow::Result;

use super::args::TaskCmd;
use super::output::{print_json, Table};
use super::Ctx;
use crate::error::ExitCode;
use crate::task::TaskState;
use crate::units::format_size;

pub fn run(ctx: &Ctx, cmd: TaskCmd) -> Result<ExitCode> {
    match cmd {
        TaskCmd::List { all } => list(ctx, all),
        TaskCmd::Cancel { id } => {
            let task = ctx.state()?.request_cancel(id)?;
            let msg = format!(
                "task {id} ({} rule '{}' VM '{}'): cancel requested; it stops cleanly and ends interrupted",
                task.kind, task.rule, task.vm
            );
            super::output::print_done(ctx.json, ctx.quiet, &msg, serde_json::json!({ "task": id }));
            Ok(ExitCode::Ok)
        }
    }
}

fn list(ctx: &Ctx, all: bool) -> Result<ExitCode> {
    let mut state = ctx.state()?;
    // A listing never shows a dead process's task as running.
    let monitor = ctx.monitor()?;
    crate::runner::recover::reclaim_tasks(&mut state, &monitor)?;
    monitor.finish();
    let tasks = state.tasks(!all, if all { 100 } else { 10_000 })?;
    if ctx.json {
        print_json(&tasks);
        return Ok(ExitCode::Ok);
    }
    let mut t = Table::new(&[
        "ID",
        "KIND",
        "RULE",
        "VM",
        "LEVEL",
        "STATE",
        "ELAPSED",
        "PHASE",
        "PERCENT",
        "RATE",
        "LIMIT",
        "WAITING FOR",
    ]);
    for r in &tasks {
        let running = r.state == TaskState::Running;
        t.row(vec![
            r.id.to_string(),
            r.kind.to_string(),
            r.rule.clone(),
            r.vm.clone(),
            r.level.clone().unwrap_or_else(|| "-".into()),
            r.state.to_string(),
            elapsed(r),
            r.phase.clone().unwrap_or_else(|| "-".into()),
            format!("{:.0}%", r.percent),
            if running {
                format!("{}/s", format_size(r.rate))
            } else {
                "-".into()
            },
            if running {
                r.bw_limit.clone().unwrap_or_else(|| "unlimited".into())
            } else {
                "-".into()
            },
            r.waiting
                .clone()
                .or_else(|| (!running).then(|| r.message.clone()).flatten())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    if tasks.is_empty() && !ctx.quiet {
        out!("no {}tasks", if all { "" } else { "pending or running " });
        return Ok(ExitCode::Ok);
    }
    t.print();
    Ok(ExitCode::Ok)
}

/// How long a task has been around (running or waiting) or took, e.g. `3m 12s`.
fn elapsed(r: &crate::state::tasks::TaskRow) -> String {
    use chrono::{DateTime, Utc};
    let parse = |t: &str| {
        DateTime::parse_from_rfc3339(t)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    };
    let Some(start) = r
        .started_at
        .as_deref()
        .or(Some(r.created_at.as_str()))
        .and_then(parse)
    else {
        return "-".into();
    };
    let end = r
        .finished_at
        .as_deref()
        .and_then(parse)
        .unwrap_or_else(Utc::now);
    let secs = (end - start).num_seconds().max(0) as u64;
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}
