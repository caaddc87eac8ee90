//! `logs RULE [--vm VM] [--task ID] [--follow]`: task log lines from the state
//! store (R32). Plain lines are `TIMESTAMP LEVEL task N VM: message`, journald
//! friendly (no colour); `--json` prints one JSON object per line.

use std::time::Duration;

use anyhow::Result;

use super::args::LogsArgs;
use super::Ctx;
use crate::error::ExitCode;
use crate::state::logs::LogFilter;

/// How often `--follow` looks for new lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

pub fn logs(ctx: &Ctx, a: LogsArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rule = state.require_rule(&a.rule)?;
    if let Some(vm) = &a.vm {
        rule.require_vm(vm)?;
    }
    let mut filter = LogFilter {
        rule: rule.name.clone(),
        vm: a.vm.clone(),
        task: a.task,
        after: 0,
    };
    let mut printed = 0usize;
    loop {
        for l in state.rule_logs(&filter)? {
            if ctx.json {
                out!("{}", serde_json::to_string(&l)?);
            } else {
                out!(
                    "{} {:<5} task {} {}: {}",
                    l.ts,
                    l.level,
                    l.task,
                    l.vm,
                    l.message
                );
            }
            filter.after = l.id;
            printed += 1;
        }
        if !a.follow {
            break;
        }
        std::thread::sleep(FOLLOW_EVERY);
    }
    if printed == 0 && !ctx.json && !ctx.quiet {
        eprintln!("vmbackup: no log lines for rule '{}'", rule.name);
    }
    Ok(ExitCode::Ok)
}
