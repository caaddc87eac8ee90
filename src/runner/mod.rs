//! The task runner: every backup goes through here, from `run-now`, `run-due` and
//! `daemon` alike (R28, R38, R41, R42, R44).
//!
//! ```text
//! admit (queued, or skipped R28) → slot lease (pending while none is free, R41)
//!   → running (R31 phases, percent, rate) → completed / failed / skipped / interrupted
//! ```
//! Each task runs on its own thread; the disk pipelines share one tokio runtime. A
//! heartbeat thread keeps this process's leases fresh and turns `task cancel`
//! requests (made by any process) into the task's cancel flag. The first
//! SIGINT/SIGTERM sets the runner's cancel flag: no new task starts, running ones
//! stop cleanly (bitmap merged back, exports removed) and end `interrupted`.

pub mod recover;
pub mod schedule;
pub mod scheduler;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::backup::progress::Progress;
use crate::backup::throttle::Throttle;
use crate::backup::{run_backup, BackupJob, BackupOutcome};
use crate::clock::Clock;
use crate::error::{exit_code_of, is_interrupted, ExitCode};
use crate::level::Level;
use crate::state::rules::RuleRow;
use crate::state::slots::{Admission, Limits, SlotAnswer};
use crate::state::State;
use crate::units::format_size;

/// Chunk buffers in flight per task: with `bk_tsk_thd` tasks this keeps memory
/// under 64 MiB + 3 × bk_tsk_thd × i2vp_transbuffer.
const BUFFERS_PER_TASK: usize = 3;
/// How often a pending task asks for a slot again.
const SLOT_RETRY: Duration = Duration::from_millis(500);
/// How often leases are refreshed and cancel requests read.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How soon a SIGINT/SIGTERM reaches the running tasks' cancel flags.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// The repository directory of a rule: target path / sub-directory (R5).
pub fn repo_root(state: &State, rule: &RuleRow) -> Result<PathBuf> {
    let target = state.require_target(&rule.settings.target)?;
    Ok(Path::new(&target.path).join(&rule.settings.subdir))
}

/// Builds the progress receiver of a task (terminal bars, JSON lines, state rows).
pub type ViewFactory =
    Arc<dyn Fn(i64, &str, Arc<Throttle>) -> Result<Arc<dyn Progress>> + Send + Sync>;

/// One backup to run.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub rule: RuleRow,
    pub vm: String,
    pub level: Level,
    /// The schedule slot (RFC 3339 UTC) this run is for; `None` for `run-now`.
    pub slot: Option<String>,
    /// What the scheduler noticed about this run (missed slots folded into it);
    /// written to the task's log once it has an id (R32).
    pub notes: Vec<String>,
}

/// How one task ended, as `run-now`/`run-due` print it (README "JSON output").
#[derive(Debug, Serialize)]
pub struct TaskResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub vm: String,
    pub task: i64,
    pub status: &'static str,
    pub exit_code: u8,
    #[serde(skip)]
    pub code: ExitCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<BackupOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Settings of a runner, resolved by the CLI.
pub struct RunnerConfig {
    pub state_path: PathBuf,
    pub run_dir: PathBuf,
    pub limits: Limits,
    pub chunk_size: u32,
    pub quiet: bool,
    pub json: bool,
    pub clock: Clock,
}

/// Runs tasks within the slot limits; shared by the threads it starts.
pub struct Runner {
    cfg: RunnerConfig,
    rt: tokio::runtime::Handle,
    cancel: Arc<AtomicBool>,
    views: ViewFactory,
    /// Cancel flags of this process's active tasks, by task id.
    flags: Mutex<HashMap<i64, Arc<AtomicBool>>>,
    stop_heartbeat: Arc<AtomicBool>,
}

impl Runner {
    /// A runner whose tasks stop when `cancel` is set; starts the heartbeat thread.
    pub fn start(
        cfg: RunnerConfig,
        rt: tokio::runtime::Handle,
        cancel: Arc<AtomicBool>,
        views: ViewFactory,
    ) -> Result<Arc<Runner>> {
        let runner = Arc::new(Runner {
            cfg,
            rt,
            cancel,
            views,
            flags: Mutex::new(HashMap::new()),
            stop_heartbeat: Arc::new(AtomicBool::new(false)),
        });
        let weak = Arc::downgrade(&runner);
        let stop = runner.stop_heartbeat.clone();
        let mut state = State::open(&runner.cfg.state_path)?;
        std::thread::spawn(move || {
            let mut last_beat: Option<std::time::Instant> = None;
            while !stop.load(Ordering::SeqCst) {
                let Some(r) = weak.upgrade() else { return };
                // Leases and `task cancel` requests once per HEARTBEAT; the
                // process-wide signal flag on every tick.
                let requested = if last_beat.is_none_or(|t| t.elapsed() >= HEARTBEAT) {
                    last_beat = Some(std::time::Instant::now());
                    state.heartbeat().unwrap_or_else(|e| {
                        eprintln!("vmbackup: warning: cannot refresh slot leases: {e:#}");
                        Vec::new()
                    })
                } else {
                    Vec::new()
                };
                r.forward_cancels(&requested);
                drop(r);
                std::thread::sleep(CANCEL_POLL);
            }
        });
        Ok(runner)
    }

    pub fn config(&self) -> &RunnerConfig {
        &self.cfg
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Take a slot for a task this process runs itself (a restore, R38): the
    /// returned flag is set on SIGINT/SIGTERM or `task cancel`.
    pub fn take_slot_for(
        &self,
        state: &mut State,
        task: i64,
        platform: &str,
    ) -> Result<Arc<AtomicBool>> {
        let flag = Arc::new(AtomicBool::new(self.cancelled()));
        if let Ok(mut flags) = self.flags.lock() {
            flags.insert(task, flag.clone());
        }
        self.wait_for_slot(state, task, platform, &flag)?;
        Ok(flag)
    }

    fn forward_cancels(&self, requested: &[i64]) {
        let all = self.cancelled();
        if let Ok(flags) = self.flags.lock() {
            for (id, flag) in flags.iter() {
                if all || requested.contains(id) {
                    flag.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// Admit every spec, then run the admitted ones concurrently (within the
    /// limits) and wait for all. Results are in the order of `specs`.
    pub fn run_all(self: &Arc<Self>, specs: Vec<TaskSpec>) -> Result<Vec<TaskResult>> {
        let mut started: Vec<Result<JoinHandle<TaskResult>, TaskResult>> = Vec::new();
        for spec in specs {
            match self.submit(spec)? {
                Some(s) => started.push(s),
                None => continue,
            }
        }
        let mut out = Vec::new();
        for s in started {
            out.push(match s {
                Ok(handle) => join(handle),
                Err(skipped) => skipped,
            });
        }
        Ok(out)
    }

    /// Admit one task and start its thread. `Err(result)` when it was skipped
    /// (R28); `None` when its schedule slot was already taken by another process.
    pub fn submit(
        self: &Arc<Self>,
        spec: TaskSpec,
    ) -> Result<Option<Result<JoinHandle<TaskResult>, TaskResult>>> {
        let mut state = State::open(&self.cfg.state_path)?;
        let admission = state.admit_task(
            "backup",
            &spec.rule.name,
            &spec.vm,
            Some(spec.level.as_str()),
            spec.slot.as_deref(),
        )?;
        if let Some(Admission::Skipped { task, .. } | Admission::Queued(task)) = &admission {
            for note in &spec.notes {
                state.log(*task, "warn", note)?;
            }
        }
        match admission {
            None => Ok(None),
            Some(Admission::Skipped { task, reason }) => {
                if !self.cfg.json {
                    eprintln!("vmbackup: {}: {reason}", spec.vm);
                }
                Ok(Some(Err(TaskResult {
                    rule: Some(spec.rule.name.clone()),
                    vm: spec.vm,
                    task,
                    status: "skipped",
                    exit_code: ExitCode::Busy.code(),
                    code: ExitCode::Busy,
                    outcome: None,
                    error: Some(reason),
                })))
            }
            Some(Admission::Queued(task)) => {
                let flag = Arc::new(AtomicBool::new(self.cancelled()));
                if let Ok(mut flags) = self.flags.lock() {
                    flags.insert(task, flag.clone());
                }
                let me = self.clone();
                let handle = std::thread::spawn(move || {
                    let r = me.run_task(&spec, task, flag, state);
                    if let Ok(mut flags) = me.flags.lock() {
                        flags.remove(&task);
                    }
                    r
                });
                Ok(Some(Ok(handle)))
            }
        }
    }

    /// Wait for a slot (pending, R41), then back up, then record the end.
    fn run_task(
        &self,
        spec: &TaskSpec,
        task: i64,
        flag: Arc<AtomicBool>,
        mut state: State,
    ) -> TaskResult {
        let res = self
            .wait_for_slot(&mut state, task, &spec.rule.settings.platform, &flag)
            .and_then(|()| self.backup(spec, task, flag));
        let (status, code, outcome, error) = match res {
            Ok(out) => {
                let code = if out.fallback.is_some() || !out.warnings.is_empty() {
                    ExitCode::Warning
                } else {
                    ExitCode::Ok
                };
                let msg = format!(
                    "{} point {} (requested {}), read {}, stored {}",
                    out.level,
                    out.point,
                    out.requested,
                    format_size(out.totals.bytes_read),
                    format_size(out.totals.bytes_written)
                );
                record(&mut state, task, "info", &msg);
                if let Err(e) =
                    state.end_task(task, "completed", Some(&out.point), out.fallback.as_deref())
                {
                    eprintln!("vmbackup: warning: cannot record the end of task {task}: {e:#}");
                }
                if !self.cfg.json && !self.cfg.quiet {
                    crate::cli::output::stdout_line(format_args!("{}: {msg}", spec.vm));
                }
                ("completed", code, Some(out), None)
            }
            Err(err) => {
                let code = exit_code_of(&err);
                let status = if is_interrupted(&err) {
                    "interrupted"
                } else if code == ExitCode::Busy {
                    "skipped"
                } else {
                    "failed"
                };
                let msg = format!("{err:#}");
                record(&mut state, task, "error", &msg);
                if let Err(e) = state.end_task(task, status, None, Some(&msg)) {
                    eprintln!("vmbackup: warning: cannot record the end of task {task}: {e:#}");
                }
                eprintln!("vmbackup: {}: {status}: {msg}", spec.vm);
                (status, code, None, Some(msg))
            }
        };
        TaskResult {
            rule: Some(spec.rule.name.clone()),
            vm: spec.vm.clone(),
            task,
            status,
            exit_code: code.code(),
            code,
            outcome,
            error,
        }
    }

    fn wait_for_slot(
        &self,
        state: &mut State,
        task: i64,
        platform: &str,
        flag: &AtomicBool,
    ) -> Result<()> {
        let mut told = None;
        loop {
            if flag.load(Ordering::SeqCst) || self.cancelled() {
                return Err(crate::error::Error::Interrupted.into());
            }
            match state.try_take_slot(task, platform, self.cfg.limits)? {
                SlotAnswer::Granted => return Ok(()),
                SlotAnswer::Cancelled => return Err(crate::error::Error::Interrupted.into()),
                SlotAnswer::Wait(reason) => {
                    if told.as_ref() != Some(&reason) {
                        record(state, task, "info", &reason);
                        if !self.cfg.json && !self.cfg.quiet {
                            eprintln!("vmbackup: task {task}: pending: {reason}");
                        }
                        told = Some(reason);
                    }
                }
            }
            std::thread::sleep(SLOT_RETRY);
        }
    }

    fn backup(&self, spec: &TaskSpec, task: i64, flag: Arc<AtomicBool>) -> Result<BackupOutcome> {
        let state = State::open(&self.cfg.state_path)?;
        let rule = &spec.rule;
        let prow = state.require_platform(&rule.settings.platform)?;
        let plat = crate::platform::connect(&prow.spec)?;
        let throttle = Arc::new(Throttle::new(
            rule.settings.bandwidth.clone(),
            self.cfg.clock,
            flag.clone(),
        ));
        let job = BackupJob {
            platform: prow.name.clone(),
            vm: spec.vm.clone(),
            repo_root: repo_root(&state, rule)?,
            requested: spec.level,
            auto_cbt: rule.settings.auto_cbt,
            cbt: rule.settings.cbt,
            quiesce: rule.settings.quiesce,
            chunk_size: self.cfg.chunk_size,
            run_dir: self.cfg.run_dir.clone(),
            buffers: BUFFERS_PER_TASK,
            bandwidth: throttle.clone(),
        };
        drop(state);
        let view = (self.views)(task, &spec.vm, throttle)?;
        run_backup(&job, plat.as_ref(), view, flag, &self.rt)
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stop_heartbeat.store(true, Ordering::SeqCst);
    }
}

/// Join a task thread; a panic becomes a failed result.
pub fn join(handle: JoinHandle<TaskResult>) -> TaskResult {
    handle.join().unwrap_or_else(|_| TaskResult {
        rule: None,
        vm: String::new(),
        task: 0,
        status: "failed",
        exit_code: ExitCode::Failed.code(),
        code: ExitCode::Failed,
        outcome: None,
        error: Some("task thread panicked".into()),
    })
}

fn record(state: &mut State, task: i64, level: &str, msg: &str) {
    if let Err(e) = state.log(task, level, msg) {
        eprintln!("vmbackup: warning: cannot record a log line of task {task}: {e:#}");
    }
}
