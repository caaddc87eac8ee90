//! `daemon` and `run-due`: rules run by themselves (R11-R14, R28).
//!
//! Both reclaim what dead processes left (R44), then hand due runs to the runner.
//! `run-due` exits with the worst code of its tasks (0 when nothing was due);
//! `daemon` runs until SIGINT/SIGTERM, then stops its tasks cleanly and exits 130.

use anyhow::Result;

use super::diag::stderr_line;
use super::process::TaskSession;
use super::Ctx;
use crate::error::ExitCode;
use crate::runner::{scheduler, TaskResult};

pub fn run_due(ctx: &Ctx) -> Result<ExitCode> {
    ctx.state()?;
    let session = TaskSession::start(ctx)?;
    let results = scheduler::run_due(&session.runner)?;
    let worst = session.exit_code(&results);
    if ctx.json {
        session.print_summary(None, &results, worst);
    } else if results.is_empty() && !ctx.quiet {
        out!("nothing due");
    }
    session.finish();
    Ok(worst)
}

pub fn daemon(ctx: &Ctx) -> Result<ExitCode> {
    ctx.state()?;
    let session = TaskSession::start(ctx)?;
    stderr_line(&format!("daemon started (pid {})", std::process::id()));
    sd_notify("READY=1");
    let json = ctx.json;
    let report = move |r: &TaskResult| {
        if json {
            out!(
                "{}",
                serde_json::json!({
                    "type": "task_end",
                    "time": crate::timefmt::json_time(chrono::Utc::now()),
                    "result": r,
                })
            );
        } else {
            stderr_line(&format!(
                "task {} rule '{}' VM '{}': {}",
                r.task,
                r.rule.as_deref().unwrap_or(""),
                r.vm,
                r.status
            ));
        }
    };
    let ended = scheduler::daemon(&session.runner, &report);
    sd_notify("STOPPING=1");
    session.finish();
    ended?;
    stderr_line("daemon stopped");
    Ok(ExitCode::Interrupted)
}

/// Tell systemd how the daemon is doing (`Type=notify` in
/// etc/systemd/vmbackup.service): a datagram to `$NOTIFY_SOCKET`, a path or an
/// abstract name (`@...`). Without that variable (not started by systemd), nothing.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let addr = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&target),
    };
    let sent = UnixDatagram::unbound()
        .and_then(|sock| addr.and_then(|a| sock.send_to_addr(state.as_bytes(), &a)));
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd at {target}: {e}");
    }
}
