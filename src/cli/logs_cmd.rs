//! `logs RULE [--vm VM] [--task ID] [--since WHEN] [-n N] [--follow]`: task log
//! lines from the state store (R32). Plain lines are `TIME LEVEL task N VM:
//! message` (local time with its offset, no colour); `--json` prints one JSON
//! object per line (docs/JSON.md).

use std::time::Duration;

use anyhow::Result;
use chrono::Utc;

use super::args::LogsArgs;
use super::Ctx;
use crate::error::{invalid, ExitCode};
use crate::state::logs::LogFilter;

/// How often `--follow` looks for new lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

pub fn logs(ctx: &Ctx, a: LogsArgs) -> Result<ExitCode> {
    let state = ctx.state()?;
    let rule = state.require_rule(&a.rule)?;
    if let Some(vm) = &a.vm {
        rule.require_vm(vm)?;
    }
    if let Some(id) = a.task {
        let Some(task) = state.task(id)? else {
            return Err(invalid(
                "--task",
                id,
                "no such task; see 'vmbackup task list --all'",
            ));
        };
        if task.rule != rule.name || a.vm.as_ref().is_some_and(|vm| *vm != task.vm) {
            return Err(invalid(
                "--task",
                id,
                format!(
                    "task {id} belongs to rule '{}' VM '{}', not to rule '{}'{}",
                    task.rule,
                    task.vm,
                    rule.name,
                    a.vm.as_ref()
                        .map(|v| format!(" VM '{v}'"))
                        .unwrap_or_default()
                ),
            ));
        }
    }
    let since = a.since.as_deref().map(parse_since).transpose()?;
    let mut filter = LogFilter {
        rule: rule.name.clone(),
        vm: a.vm.clone(),
        task: a.task,
        after: 0,
        since,
        last: a.lines,
    };
    let mut printed = 0usize;
    loop {
        for l in state.rule_logs(&filter)? {
            if ctx.json {
                out!("{}", serde_json::to_string(&l)?);
            } else {
                out!(
                    "{} {:<5} task {} {}: {}",
                    crate::timefmt::human_of_stored(&l.ts),
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
        // After the first read, every new line.
        filter.last = None;
        std::thread::sleep(FOLLOW_EVERY);
    }
    if printed == 0 && !ctx.json && !ctx.quiet {
        eprintln!("vmbackup: no log lines for rule '{}'", rule.name);
    }
    Ok(ExitCode::Ok)
}

/// `--since`: an RFC 3339 time, or a duration before now (`30m`, `2h`, `1d`).
fn parse_since(text: &str) -> Result<String> {
    if let Some(t) = crate::timefmt::parse(text) {
        return Ok(crate::timefmt::json_time(t));
    }
    match humantime::parse_duration(text.trim()) {
        Ok(d) => {
            let ago = chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
            let at = Utc::now()
                .checked_sub_signed(ago)
                .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
            Ok(crate::timefmt::json_time(at))
        }
        Err(_) => Err(invalid(
            "--since",
            text,
            "allowed an RFC 3339 time (2026-12-03T08:00:00Z) or a duration ago (30m, 2h, 1d)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_and_durations() {
        assert_eq!(
            parse_since("2026-12-03T09:00:00+01:00").unwrap(),
            "2026-12-03T08:00:00.000Z"
        );
        let two_hours = crate::timefmt::parse(&parse_since("2h").unwrap()).unwrap();
        let off = Utc::now() - two_hours;
        assert!((off.num_seconds() - 7200).abs() <= 5, "{off}");
        assert!(parse_since("yesterday-ish").is_err());
    }
}
