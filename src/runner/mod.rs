//! The task runner: every task goes through here — backups from `run-now`,
//! `run-due` and `daemon`, restores from `restore` (R28, R38, R41, R42, R44).
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
//!
//! What a task does is its [`Job`] (`jobs.rs` runs each kind); what it records
//! in the state store is `record.rs`; what is shown is up to the front end's
//! [`Events`] (the runner never prints).

pub mod events;
mod jobs;
pub mod record;
pub mod recover;
pub mod schedule;
pub mod scheduler;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::backup::BackupOutcome;
use crate::clock::Clock;
use crate::error::{exit_code_of, is_interrupted, ExitCode};
use crate::level::Level;
use crate::monitor::notify::Event;
use crate::monitor::Monitor;
use crate::recovery::boot::{BootOptions, BootReport};
use crate::recovery::cmdline::LaunchOptions;
use crate::recovery::mirror::MigrationReport;
use crate::recovery::{RecoverOptions, RecoveryReport};
use crate::repo::{Compression, Manifest};
use crate::restore::{ImageFormat, RestoreReport};
use crate::state::rules::RuleRow;
use crate::state::slots::{Admission, Limits, SlotAnswer};
use crate::state::tasks::TaskRow;
use crate::state::State;
use crate::task::{LogLevel, TaskKind, TaskState};
pub use events::Events;

/// Chunk buffers in flight per task slot: a process holds `bk_tsk_thd` × this,
/// shared by its backups, which keeps memory under 64 MiB + 3 × bk_tsk_thd ×
/// i2vp_transbuffer; one backup takes at most `backup::disk::task_slots` of them
/// (one per core compressing, two reading).
const BUFFERS_PER_TASK: usize = 3;
/// How often a task waiting for a lock tries again.
const LOCK_RETRY: Duration = Duration::from_secs(1);
/// How often a pending task asks for a slot again.
const SLOT_RETRY: Duration = Duration::from_millis(500);
/// How often leases are refreshed and cancel requests read.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How soon a SIGINT/SIGTERM reaches the running tasks' cancel flags.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// One task to run: what, for which VM of which rule.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub rule: RuleRow,
    pub vm: String,
    pub job: Job,
}

/// The work of a task, one variant per [`TaskKind`].
#[derive(Debug, Clone)]
pub enum Job {
    Backup {
        level: Level,
        /// The schedule slot (RFC 3339 UTC) this run is for; `None` for `run-now`.
        slot: Option<String>,
        /// What the scheduler noticed about this run (missed slots folded into
        /// it); written to the task's log once it has an id (R32).
        notes: Vec<String>,
    },
    Restore {
        /// The point, chosen (and so validated) before the task was admitted.
        point: Box<Manifest>,
        to: RestoreTo,
        /// Read the rule's copy on this target instead of its own repository.
        from: Option<String>,
    },
    /// Serve a point and (maybe) start a VM on overlays of it; the task goes on
    /// in a background server process (transient recovery, the start of an
    /// instant recovery).
    Recover {
        point: Box<Manifest>,
        opts: RecoverOptions,
    },
    /// Move a running instant recovery's disks to production storage.
    Migrate { recovery: i64 },
    /// Boot a point on overlays and judge it (verify --boot).
    BootVerify {
        point: Box<Manifest>,
        opts: BootOptions,
    },
    /// Apply the rule's retention to the VM's points now (R17: the scheduler
    /// submits it after the VM's last scheduled backup of the day).
    Prune,
    /// Garbage-collect the rule's repository if the last collection is a day
    /// old and its lock is free at once (`vm` is empty: a repository task).
    Gc,
    /// Copy `point` of the VM (and the points it builds on, if missing) to the
    /// rule's copy target `to`, then prune the copy with the rule's copy
    /// retention (`rule edit --copy-to`).
    Copy { point: String, to: String },
}

/// Where a restore writes.
#[derive(Debug, Clone)]
pub enum RestoreTo {
    /// One image file per disk in `dest`.
    Files {
        dest: PathBuf,
        format: ImageFormat,
        force: bool,
        /// Mode of the image files (`restore::DEFAULT_MODE` unless asked otherwise).
        mode: u32,
    },
    /// Image files plus a launch script from the captured configuration.
    AsVm {
        dest: PathBuf,
        format: ImageFormat,
        force: bool,
        mode: u32,
        launch: LaunchOptions,
        start: bool,
    },
    /// Back into the VM's own disk images.
    InPlace,
}

impl Job {
    pub fn kind(&self) -> TaskKind {
        match self {
            Job::Backup { .. } => TaskKind::Backup,
            Job::Restore { .. } => TaskKind::Restore,
            Job::Recover { .. } => TaskKind::Recovery,
            Job::Migrate { .. } => TaskKind::Migration,
            Job::BootVerify { .. } => TaskKind::BootVerify,
            Job::Prune => TaskKind::Prune,
            Job::Gc => TaskKind::Gc,
            Job::Copy { .. } => TaskKind::Copy,
        }
    }

    /// The point a task reads (stored in its row from admission on: prune and
    /// forget leave it alone while the task is active, queued or pending; a copy
    /// waiting for its slot still finds its point).
    fn reads_point(&self) -> Option<&str> {
        match self {
            Job::Restore { point, .. }
            | Job::Recover { point, .. }
            | Job::BootVerify { point, .. } => Some(&point.point),
            Job::Copy { point, .. } => Some(point),
            Job::Backup { .. } | Job::Migrate { .. } | Job::Prune | Job::Gc => None,
        }
    }

    /// The level a backup asks for (stored in the task row).
    fn level(&self) -> Option<Level> {
        match self {
            Job::Backup { level, .. } => Some(*level),
            _ => None,
        }
    }
}

/// What a completed task produced.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Outcome {
    Backup(BackupOutcome),
    Restore(RestoreReport),
    Recovery(RecoveryReport),
    Migration(MigrationReport),
    BootVerify(BootReport),
    Prune(crate::lifecycle::prune::VmPrune),
    Gc(crate::lifecycle::gc::RepoGc),
    Copy(CopyOutcome),
}

/// What a copy task did (docs/JSON.md, "CopyOutcome").
#[derive(Debug, Serialize)]
pub struct CopyOutcome {
    /// The target that holds the copy.
    pub to: String,
    /// The point copied.
    pub point: String,
    #[serde(flatten)]
    pub report: crate::repo::copy::CopyReport,
    /// The copy's retention, in words.
    pub retention: String,
    /// Points removed from the copy by its retention, oldest first.
    pub pruned: Vec<String>,
}

impl Outcome {
    /// The point a task wrote (backup) or read (restore, recovery, migration,
    /// boot verification).
    pub fn point(&self) -> Option<&str> {
        match self {
            Outcome::Backup(o) => Some(&o.point),
            Outcome::Restore(r) => Some(&r.point),
            Outcome::Recovery(r) => Some(&r.point),
            Outcome::Migration(m) => Some(&m.point),
            Outcome::BootVerify(b) => Some(&b.point),
            Outcome::Copy(c) => Some(&c.point),
            Outcome::Prune(_) | Outcome::Gc(_) => None,
        }
    }
}

/// How one task ended, as `run-now`, `run-due` and `restore` print it
/// (docs/JSON.md, "Task results").
#[derive(Debug, Serialize)]
pub struct TaskResult {
    pub rule: Option<String>,
    pub vm: String,
    pub task: i64,
    pub kind: TaskKind,
    pub status: TaskState,
    pub exit_code: u8,
    #[serde(skip)]
    pub code: ExitCode,
    /// When the task started running (it held a slot); `None` if it never did.
    #[serde(with = "crate::timefmt::json_opt")]
    pub started: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(with = "crate::timefmt::json_opt")]
    pub finished: Option<chrono::DateTime<chrono::Utc>>,
    /// From `started` to `finished`.
    pub duration_seconds: Option<f64>,
    /// Bytes read (from the VM for a backup, from the repository for a
    /// restore) per second of `duration_seconds`.
    pub rate_bytes_per_sec: Option<u64>,
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
    /// What the task did, in lines for people (also in the task's log).
    #[serde(skip)]
    pub summary: Vec<String>,
}

/// How a task ended, before its times are read back.
struct Ended {
    status: TaskState,
    code: ExitCode,
    outcome: Option<Outcome>,
    error: Option<String>,
    summary: Vec<String>,
}

impl TaskResult {
    /// The result of task `task` of `spec`, its times and rate read from its
    /// (ended) row.
    fn of(spec: &TaskSpec, row: Option<&TaskRow>, task: i64, end: Ended) -> TaskResult {
        let Ended {
            status,
            code,
            outcome,
            error,
            summary,
        } = end;
        let time = |t: Option<&String>| t.and_then(|t| crate::timefmt::parse(t));
        let started = time(row.and_then(|r| r.started_at.as_ref()));
        let finished = time(row.and_then(|r| r.finished_at.as_ref()));
        let duration = match (started, finished) {
            (Some(s), Some(f)) => Some(crate::timefmt::seconds_between(s, f)),
            _ => None,
        };
        let rate = match (duration, row) {
            (Some(d), Some(r)) if d > 0.0 => Some((r.bytes_done as f64 / d).round() as u64),
            _ => None,
        };
        TaskResult {
            rule: Some(spec.rule.name.clone()),
            vm: spec.vm.clone(),
            task,
            kind: spec.job.kind(),
            status,
            exit_code: code.code(),
            code,
            started,
            finished,
            duration_seconds: duration,
            rate_bytes_per_sec: rate,
            outcome,
            error,
            summary,
        }
    }
}

/// Settings of a runner, resolved by the CLI.
pub struct RunnerConfig {
    pub state_path: PathBuf,
    pub run_dir: PathBuf,
    /// How long a QMP command, NBD request or libvirt call may wait for its answer.
    pub io_timeout: Duration,
    pub limits: Limits,
    pub chunk_size: u32,
    /// How backups store new chunks (system.conf `compression`).
    pub compression: Compression,
    pub clock: Clock,
    /// Metrics and notifications of tasks that end (system.conf monitoring).
    pub monitor: Arc<Monitor>,
}

/// Runs tasks within the slot limits; shared by the threads it starts.
pub struct Runner {
    cfg: RunnerConfig,
    rt: tokio::runtime::Handle,
    cancel: Arc<AtomicBool>,
    events: Arc<dyn Events>,
    /// Cancel flags of this process's active tasks, by task id.
    flags: Mutex<HashMap<i64, Arc<AtomicBool>>>,
    stop_heartbeat: Arc<AtomicBool>,
    /// Chunk buffers of this process's backups ([`BUFFERS_PER_TASK`]).
    buffers: Arc<tokio::sync::Semaphore>,
}

impl Runner {
    /// A runner whose tasks stop when `cancel` is set; starts the heartbeat thread.
    pub fn start(
        cfg: RunnerConfig,
        rt: tokio::runtime::Handle,
        cancel: Arc<AtomicBool>,
        events: Arc<dyn Events>,
    ) -> Result<Arc<Runner>> {
        let buffers = BUFFERS_PER_TASK * cfg.limits.global.max(1) as usize;
        let runner = Arc::new(Runner {
            buffers: Arc::new(tokio::sync::Semaphore::new(buffers)),
            cfg,
            rt,
            cancel,
            events,
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
                        tracing::warn!("cannot refresh slot leases: {e:#}");
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

    /// The front end's receiver of events.
    pub fn events(&self) -> &dyn Events {
        self.events.as_ref()
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
        let (slot, notes) = match &spec.job {
            Job::Backup { slot, notes, .. } => (slot.as_deref(), notes.as_slice()),
            _ => (None, &[][..]),
        };
        let admission = state.admit_task(
            spec.job.kind(),
            &spec.rule.name,
            &spec.vm,
            spec.job.level().map(Level::as_str),
            spec.job.reads_point(),
            slot,
        )?;
        if let Some(Admission::Skipped { task, .. } | Admission::Queued(task)) = &admission {
            for note in notes {
                state.log(*task, LogLevel::Warn, note)?;
            }
        }
        if let Some(Admission::Skipped { task, .. }) = &admission {
            self.cfg
                .monitor
                .task_ended(&state, *task, Some(Event::Skipped), ExitCode::Busy.code());
        }
        match admission {
            None => Ok(None),
            Some(Admission::Skipped { task, reason }) => {
                let row = state.task(task)?;
                let skipped = TaskResult::of(
                    &spec,
                    row.as_ref(),
                    task,
                    Ended {
                        status: TaskState::Skipped,
                        code: ExitCode::Busy,
                        outcome: None,
                        error: Some(reason),
                        summary: Vec::new(),
                    },
                );
                self.events.ended(&skipped);
                Ok(Some(Err(skipped)))
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

    /// Take the job's locks and a slot, waiting (pending, R41) for both, then
    /// do the job, then record the end.
    fn run_task(
        &self,
        spec: &TaskSpec,
        task: i64,
        flag: Arc<AtomicBool>,
        mut state: State,
    ) -> TaskResult {
        let res = jobs::prepare(self, spec, task, &flag, &mut state).and_then(|held| {
            if spec.job.kind().takes_slot() {
                self.wait_for_slot(&mut state, task, spec, &flag)?;
            } else {
                state.set_task_running(task)?;
            }
            record(&mut state, task, LogLevel::Info, &start_line(spec));
            jobs::run(self, spec, task, flag, held)
        });
        let mut handoff = None;
        let (status, code, outcome, error, summary) = match res {
            Ok(done) => {
                for line in &done.summary {
                    record(&mut state, task, LogLevel::Info, line);
                }
                if let Outcome::Backup(o) = &done.outcome {
                    let figures = state
                        .record_backup(
                            task,
                            o.level.as_str(),
                            o.totals.bytes_read,
                            o.totals.bytes_written,
                        )
                        .and_then(|()| {
                            state.set_vm_points(&spec.rule.name, &spec.vm, o.point_count)
                        });
                    if let Err(e) = figures {
                        tracing::warn!("cannot record what task {task} wrote: {e:#}");
                    }
                }
                if let Outcome::Prune(p) = &done.outcome {
                    record_points_left(&mut state, p);
                }
                handoff = done.handoff;
                (
                    // Running: the task goes on in another process (a background server).
                    if handoff.is_some() {
                        TaskState::Running
                    } else {
                        TaskState::Completed
                    },
                    done.code,
                    Some(done.outcome),
                    None,
                    done.summary,
                )
            }
            Err(err) => {
                let code = exit_code_of(&err);
                let status = if is_interrupted(&err) {
                    TaskState::Interrupted
                } else if code == ExitCode::Busy {
                    TaskState::Skipped
                } else {
                    TaskState::Failed
                };
                let msg = format!("{err:#}");
                record(&mut state, task, LogLevel::Error, &msg);
                (status, code, None, Some(msg), Vec::new())
            }
        };
        if let Some(pid) = handoff {
            record(
                &mut state,
                task,
                LogLevel::Info,
                &format!("task goes on in the background server (pid {pid})"),
            );
            if let Err(e) = state.hand_over_task(task, pid, "serving") {
                tracing::warn!("cannot hand task {task} over to pid {pid}: {e:#}");
            }
        } else {
            let last = end_line(&state, task, status);
            record(&mut state, task, LogLevel::Info, &last);
            let (point, note) = match &outcome {
                Some(Outcome::Backup(o)) => (Some(o.point.as_str()), o.fallback.as_deref()),
                Some(o) => (o.point(), None),
                None => (None, error.as_deref()),
            };
            if let Err(e) = state.end_task(task, status, point, note) {
                tracing::warn!("cannot record the end of task {task}: {e:#}");
            }
        }
        let row = state.task(task).ok().flatten();
        let result = TaskResult::of(
            spec,
            row.as_ref(),
            task,
            Ended {
                status,
                code,
                outcome,
                error,
                summary,
            },
        );
        let unexpected_full = matches!(
            &result.outcome,
            Some(Outcome::Backup(o)) if o.fallback.is_some() && !o.fallback_planned
        );
        self.cfg.monitor.task_ended(
            &state,
            task,
            Event::of_end(result.status, unexpected_full),
            result.exit_code,
        );
        self.events.ended(&result);
        result
    }

    /// Retry `attempt` while it fails busy (a lock someone else holds): the
    /// task is pending meanwhile, with the reason (R41). Cancel stops the wait.
    fn wait_while_busy<T>(
        &self,
        state: &mut State,
        task: i64,
        spec: &TaskSpec,
        flag: &AtomicBool,
        mut attempt: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let mut told: Option<String> = None;
        loop {
            if flag.load(Ordering::SeqCst) || self.cancelled() {
                return Err(crate::error::Error::Interrupted.into());
            }
            match attempt() {
                Err(e) if exit_code_of(&e) == ExitCode::Busy => {
                    let reason = format!("waiting: {e:#}");
                    if told.as_ref() != Some(&reason) {
                        state.set_task_waiting(task, &reason)?;
                        record(state, task, LogLevel::Info, &reason);
                        self.events.pending(task, spec, &reason);
                        told = Some(reason);
                    }
                }
                other => return other,
            }
            std::thread::sleep(LOCK_RETRY);
        }
    }

    fn wait_for_slot(
        &self,
        state: &mut State,
        task: i64,
        spec: &TaskSpec,
        flag: &AtomicBool,
    ) -> Result<()> {
        let platform = &spec.rule.settings.platform;
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
                        record(state, task, LogLevel::Info, &reason);
                        self.events.pending(task, spec, &reason);
                        told = Some(reason);
                    }
                }
            }
            std::thread::sleep(SLOT_RETRY);
        }
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
        kind: TaskKind::Backup,
        status: TaskState::Failed,
        exit_code: ExitCode::Failed.code(),
        code: ExitCode::Failed,
        started: None,
        finished: None,
        duration_seconds: None,
        rate_bytes_per_sec: None,
        outcome: None,
        error: Some("task thread panicked".into()),
        summary: Vec::new(),
    })
}

/// The first line of a task's log once it holds its slot (R32): what it was
/// asked to do.
fn start_line(spec: &TaskSpec) -> String {
    match &spec.job {
        Job::Backup { level, slot, .. } => match slot {
            Some(slot) => format!(
                "backup started: level {level} requested by the schedule slot {}",
                crate::timefmt::json_of_stored(slot)
            ),
            None => format!("backup started: level {level} requested (run now)"),
        },
        Job::Restore { point, to, from } => {
            let format_word = |format: &ImageFormat| {
                serde_json::to_value(format)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            };
            let whither = match to {
                RestoreTo::Files { dest, format, .. } => {
                    format!("to {} as {}", dest.display(), format_word(format))
                }
                RestoreTo::AsVm {
                    dest,
                    format,
                    launch,
                    ..
                } => format!(
                    "to {} as {}, as a new VM{}",
                    dest.display(),
                    format_word(format),
                    launch
                        .name
                        .as_deref()
                        .map(|n| format!(" '{n}'"))
                        .unwrap_or_default()
                ),
                RestoreTo::InPlace => "into the VM's own images (in place)".to_string(),
            };
            format!(
                "restore started: point {} ({} disk(s)){} {whither}",
                point.point,
                point.disks.len(),
                from.as_deref()
                    .map(|t| format!(" of the copy on target '{t}'"))
                    .unwrap_or_default(),
            )
        }
        Job::Recover { point, opts } => format!(
            "recovery started: point {} ({} disk(s)) served, {} recovery{}",
            point.point,
            point.disks.len(),
            opts.mode,
            if opts.start {
                ", VM started on overlays"
            } else {
                ""
            }
        ),
        Job::Migrate { recovery } => {
            format!("migration started: recovery {recovery}'s disks to their new images")
        }
        Job::BootVerify { point, opts } => format!(
            "boot verification started: point {} booted without network, judged by {}",
            point.point,
            if opts.expect.is_some() {
                "its serial console"
            } else {
                "its guest agent"
            }
        ),
        Job::Prune => "prune started: points outside the rule's retention".to_string(),
        Job::Gc => "garbage collection started: objects no point refers to".to_string(),
        Job::Copy { point, to } => {
            format!("copy started: point {point} to target '{to}', then the copy's retention")
        }
    }
}

/// The last line of a task's log (R32): how it ended, how long it took and how
/// fast it read, from its row (start time, bytes done).
fn end_line(state: &State, task: i64, status: TaskState) -> String {
    let row = state.task(task).ok().flatten();
    let started = row
        .as_ref()
        .and_then(|r| r.started_at.as_deref())
        .and_then(crate::timefmt::parse);
    let Some(started) = started else {
        return format!("task {status} before it started");
    };
    let secs = crate::timefmt::seconds_between(started, chrono::Utc::now());
    let done = row.map_or(0, |r| r.bytes_done);
    format!(
        "task {status} after {}: {} read at {}/s",
        duration_text(secs),
        crate::units::format_size(done),
        crate::units::format_size(if secs > 0.0 {
            (done as f64 / secs) as u64
        } else {
            0
        })
    )
}

/// `3.2s`, `2m 5s`, `1h 2m`.
pub fn duration_text(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        format!("{}m {}s", secs as u64 / 60, secs as u64 % 60)
    } else {
        format!("{}h {}m", secs as u64 / 3600, secs as u64 % 3600 / 60)
    }
}

/// After a prune, how many points its VM keeps (stats and metrics, R33).
pub fn record_points_left(state: &mut State, p: &crate::lifecycle::prune::VmPrune) {
    if p.error.is_some() || p.orphaned {
        return;
    }
    if let Err(e) = state.set_vm_points(&p.rule, &p.vm, p.kept() as u64) {
        tracing::warn!("cannot record the points of VM '{}': {e:#}", p.vm);
    }
}

fn record(state: &mut State, task: i64, level: LogLevel, msg: &str) {
    if let Err(e) = state.log(task, level, msg) {
        tracing::warn!("cannot record a log line of task {task}: {e:#}");
    }
}
