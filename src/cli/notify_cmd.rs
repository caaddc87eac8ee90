//! `notify test`: send a sample notification on every channel system.conf (or
//! a rule) configures, and say what each did.

use anyhow::Result;
use serde_json::json;

use super::args::NotifyCmd;
use super::output::print_json;
use super::Ctx;
use crate::error::{refused, ExitCode};
use crate::monitor::notify::{Event, Notification};

pub fn run(ctx: &Ctx, cmd: NotifyCmd) -> Result<ExitCode> {
    let NotifyCmd::Test { rule } = cmd;
    let state = ctx.state()?;
    if let Some(r) = &rule {
        state.require_rule(r)?;
    }
    let monitor = ctx.monitor()?;
    let mut n = Notification::new(Event::Test);
    n.rule = rule.clone();
    n.error = Some("a test notification from 'vmbackup notify test'".into());
    let Some(results) = monitor.send_now(&state, &n) else {
        return Err(refused(match &rule {
            Some(r) => format!("no notification channel for rule '{r}': set notify_url or notify_command in {} (or 'vmbackup rule edit {r} --notify-url URL')", ctx.config_path.display()),
            None => format!("no notification channel: set notify_url or notify_command in {}", ctx.config_path.display()),
        }));
    };
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if ctx.json {
        let deliveries: Vec<serde_json::Value> = results
            .iter()
            .map(|(channel, r)| {
                json!({
                    "channel": channel,
                    "sent": r.is_ok(),
                    "detail": r.as_ref().ok(),
                    "error": r.as_ref().err(),
                })
            })
            .collect();
        print_json(&json!({
            "message": format!("test notification: {} of {} channel(s) sent", results.len() - failed, results.len()),
            "rule": rule,
            "deliveries": deliveries,
        }));
    } else {
        for (channel, r) in &results {
            match r {
                Ok(detail) => out!("{channel}: sent ({detail})"),
                Err(why) => out!("{channel}: FAILED: {why}"),
            }
        }
    }
    Ok(if failed > 0 {
        ExitCode::Failed
    } else {
        ExitCode::Ok
    })
}
