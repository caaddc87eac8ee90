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
use crate::monitor::Monitor;
use crate::runner::{Runner, RunnerConfig, TaskResult};
use crate::state::slots::Limits;

/// A flag set by the first SIGINT/SIGTERM; the second one exits at once (130).
fn cancel_on_signals(rt: &tokio::runtime::Runtime) -> Arc<AtomicBool> {
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
                super::diag::stderr_line(
                    "interrupted: stopping cleanly (send the signal again to exit at once)",
                );
                flag.store(true, Ordering::SeqCst);
            } else {
                std::process::exit(ExitCode::Interrupted.code() as i32);
            }
        }
    });
    cancel
}

/// What a command that runs tasks sets up: the monitor (metrics,
/// notifications), the reclaim of dead processes' tasks (R44), the runtime, the
/// signal handlers and the runner with the CLI's events.
pub struct TaskSession {
    /// The runtime the runner's disk pipelines run on (kept alive here).
    _rt: tokio::runtime::Runtime,
    pub cancel: Arc<AtomicBool>,
    pub runner: Arc<Runner>,
    pub monitor: Arc<Monitor>,
    /// When this command began running tasks (the summary's `started`).
    started: chrono::DateTime<chrono::Utc>,
}

impl TaskSession {
    pub fn start(ctx: &Ctx) -> Result<TaskSession> {
        Self::start_with(
            ctx,
            Arc::new(CliEvents::new(ctx.json, ctx.quiet, ctx.verbose > 0)),
        )
    }

    /// [`TaskSession::start`] with the front end's events chosen by the caller
    /// (`recover` and `verify --boot` show no events on stdout under `--json`).
    pub fn start_with(ctx: &Ctx, events: Arc<dyn crate::runner::Events>) -> Result<TaskSession> {
        let started = chrono::Utc::now();
        let cfg = ctx.system_config()?;
        let monitor = Arc::new(Monitor::new(&cfg.monitoring, &ctx.state_path)?);
        reclaim_dead(ctx, cfg.io_timeout, &monitor)?;
        let rt = runtime()?;
        let cancel = cancel_on_signals(&rt);
        let runner = Runner::start(
            RunnerConfig {
                state_path: ctx.state_path.clone(),
                run_dir: ctx.run_dir()?,
                io_timeout: cfg.io_timeout,
                limits: Limits {
                    global: cfg.bk_tsk_thd,
                    per_host: cfg.max_threads_per_host,
                },
                chunk_size: cfg.i2vp_transbuffer as u32,
                compression: cfg.compression,
                clock: Clock::process(),
                monitor: monitor.clone(),
            },
            rt.handle().clone(),
            cancel.clone(),
            events,
        )?;
        Ok(TaskSession {
            _rt: rt,
            cancel,
            runner,
            monitor,
            started,
        })
    }

    /// The last JSON line of `run-now`, `run-due` and `restore` (docs/JSON.md,
    /// "Summary"): every task's result, with the command's start, end and
    /// duration.
    pub fn print_summary(&self, rule: Option<&str>, results: &[TaskResult], code: ExitCode) {
        self.print_group_summary(rule, results, &[], code)
    }

    /// [`TaskSession::print_summary`] of a group restore or recovery (`--all`,
    /// R34): `missing` are the VMs without a point, not restored.
    pub fn print_group_summary(
        &self,
        rule: Option<&str>,
        results: &[TaskResult],
        missing: &[String],
        code: ExitCode,
    ) {
        let finished = chrono::Utc::now();
        out!(
            "{}",
            serde_json::json!({
                "type": "summary",
                "time": crate::timefmt::json_time(finished),
                "rule": rule,
                "exit_code": code.code(),
                "started": crate::timefmt::json_time(self.started),
                "finished": crate::timefmt::json_time(finished),
                "duration_seconds": crate::timefmt::seconds_between(self.started, finished),
                "tasks": results,
                "vms_without_point": missing,
            })
        );
    }

    /// A SIGINT/SIGTERM arrived.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// The worst exit code of `results`, 130 when a signal arrived.
    pub fn exit_code(&self, results: &[TaskResult]) -> ExitCode {
        worst_of(results, self.cancelled())
    }

    /// Wait for notifications still being sent (bounded by the monitor).
    pub fn finish(self) {
        self.monitor.finish();
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Reclaim what dead processes left behind (R44), for a command that runs no
/// task of its own (`recover abort`).
pub fn reclaim_dead_now(ctx: &Ctx) -> Result<()> {
    let monitor = ctx.monitor()?;
    reclaim_dead(ctx, ctx.system_config()?.io_timeout, &monitor)?;
    monitor.finish();
    Ok(())
}

/// Reclaim what dead processes left behind (R44), reporting on stderr.
fn reclaim_dead(ctx: &Ctx, io_timeout: std::time::Duration, monitor: &Monitor) -> Result<()> {
    let mut state = ctx.state()?;
    for line in crate::runner::recover::reclaim(&mut state, &ctx.run_dir()?, io_timeout, monitor)? {
        super::diag::stderr_line(&line);
    }
    Ok(())
}

/// The worst exit code of a set of task results.
fn worst_of(results: &[TaskResult], cancelled: bool) -> ExitCode {
    let worst = results.iter().map(|r| r.code).max().unwrap_or(ExitCode::Ok);
    if cancelled {
        worst.max(ExitCode::Interrupted)
    } else {
        worst
    }
}
