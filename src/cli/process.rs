//! What every command that runs tasks shares: the async runtime, signal
//! handling (first SIGINT/SIGTERM stops cleanly, the second exits at once), the
//! runner with the CLI's events, reclaiming what dead processes left (R44), and
//! the exit code of several tasks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::progress_view::CliEvents;
use super::Ctx;
use crate::clock::Clock;
use crate::error::ExitCode;
use crate::runner::{Runner, RunnerConfig, TaskResult};
use crate::state::slots::Limits;

/// A flag set by the first SIGINT/SIGTERM; the second one exits at once (130).
pub fn cancel_on_signals(rt: &tokio::runtime::Runtime) -> Arc<AtomicBool> {
    use tokio::signal::unix::{signal, SignalKind};
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // Install the handlers now, before any work starts: registered later (inside
    // the task), an early signal would still kill the process the default way.
    let _in_runtime = rt.enter();
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("vmbackup: warning: cannot install SIGINT/SIGTERM handlers");
        return cancel;
    };
    rt.spawn(async move {
        for n in 0.. {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                eprintln!("vmbackup: interrupted: stopping cleanly (send the signal again to exit at once)");
                flag.store(true, Ordering::SeqCst);
            } else {
                std::process::exit(ExitCode::Interrupted.code() as i32);
            }
        }
    });
    cancel
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A runner for this command: limits from system.conf, tasks shown through
/// [`CliEvents`].
pub fn make_runner(
    ctx: &Ctx,
    rt: &tokio::runtime::Runtime,
    cancel: Arc<AtomicBool>,
) -> Result<Arc<Runner>> {
    make_runner_with(
        ctx,
        rt,
        cancel,
        Arc::new(CliEvents::new(ctx.json, ctx.quiet)),
    )
}

/// [`make_runner`] with the front end's events chosen by the caller.
pub fn make_runner_with(
    ctx: &Ctx,
    rt: &tokio::runtime::Runtime,
    cancel: Arc<AtomicBool>,
    events: Arc<dyn crate::runner::Events>,
) -> Result<Arc<Runner>> {
    let cfg = ctx.system_config()?;
    Runner::start(
        RunnerConfig {
            state_path: ctx.state_path.clone(),
            run_dir: ctx.run_dir()?,
            io_timeout: cfg.io_timeout,
            limits: Limits {
                global: cfg.bk_tsk_thd,
                per_host: cfg.max_threads_per_host,
            },
            chunk_size: cfg.i2vp_transbuffer as u32,
            clock: Clock::process(),
        },
        rt.handle().clone(),
        cancel,
        events,
    )
}

/// Reclaim what dead processes left behind (R44), reporting on stderr.
pub fn reclaim_dead(ctx: &Ctx) -> Result<()> {
    let mut state = ctx.state()?;
    let io_timeout = ctx.system_config()?.io_timeout;
    for line in crate::runner::recover::reclaim(&mut state, &ctx.run_dir()?, io_timeout)? {
        eprintln!("vmbackup: {line}");
    }
    Ok(())
}

/// The worst exit code of a set of task results.
pub fn worst_of(results: &[TaskResult], cancelled: bool) -> ExitCode {
    let worst = results.iter().map(|r| r.code).max().unwrap_or(ExitCode::Ok);
    if cancelled {
        worst.max(ExitCode::Interrupted)
    } else {
        worst
    }
}
