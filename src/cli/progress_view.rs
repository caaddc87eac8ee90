//! How tasks look from a terminal or a script (R30, R31): progress bars on a
//! terminal (one set per process, so tasks running side by side each keep a
//! live bar), JSON lines with `--json`, plain lines otherwise. What a task
//! records in the state store is the runner's business (`runner::record`); this
//! only shows.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::level::Level;
use crate::runner::{Events, TaskResult, TaskSpec};
use crate::task::progress::{LogLevel, Phase, Progress};
use crate::task::throttle::Throttle;
use crate::task::TaskState;

/// JSON progress lines are written at most this often.
const JSON_EVERY: Duration = Duration::from_secs(1);

/// The CLI's [`Events`]: what tasks do, shown on stderr/stdout.
pub struct CliEvents {
    json: bool,
    quiet: bool,
    /// Every task's bars, when stderr is a terminal.
    bars: Option<MultiProgress>,
}

impl CliEvents {
    pub fn new(json: bool, quiet: bool) -> CliEvents {
        let tty = std::io::stderr().is_terminal() && !json && !quiet;
        CliEvents {
            json,
            quiet,
            bars: tty.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// A line for stderr, above the bars when there are any.
    fn err_line(&self, line: String) {
        match &self.bars {
            Some(mb) => {
                let _ = mb.println(line);
            }
            None => eprintln!("{line}"),
        }
    }
}

impl Events for CliEvents {
    fn display(
        &self,
        task: i64,
        spec: &TaskSpec,
        throttle: Option<Arc<Throttle>>,
    ) -> Arc<dyn Progress> {
        Arc::new(TaskView {
            task,
            vm: spec.vm.clone(),
            json: self.json,
            quiet: self.quiet,
            bars: self.bars.clone(),
            throttle,
            started: Instant::now(),
            inner: Mutex::new(Inner {
                disks: BTreeMap::new(),
                bars: BTreeMap::new(),
                last_emit: Instant::now(),
                last_done: 0,
            }),
        })
    }

    fn pending(&self, task: i64, _spec: &TaskSpec, reason: &str) {
        if !self.json && !self.quiet {
            self.err_line(format!("vmbackup: task {task}: pending: {reason}"));
        }
    }

    fn ended(&self, r: &TaskResult) {
        // A repository task (GC) has no VM: name its rule.
        let who = match (&r.vm, &r.rule) {
            (vm, Some(rule)) if vm.is_empty() => format!("rule {rule}"),
            (vm, _) => vm.clone(),
        };
        match r.status {
            // Running: handed to a background process that goes on with it.
            TaskState::Completed | TaskState::Running => {
                if !self.json && !self.quiet {
                    for line in &r.summary {
                        out!("{who}: {line}");
                    }
                }
            }
            status => {
                // The R28 reason already starts with "skipped: ...".
                let msg = r.error.as_deref().unwrap_or_default();
                if msg.starts_with(status.as_str()) {
                    self.err_line(format!("vmbackup: {who}: {msg}"));
                } else {
                    self.err_line(format!("vmbackup: {who}: {status}: {msg}"));
                }
            }
        }
    }

    fn note(&self, message: &str) {
        self.err_line(format!("vmbackup: {message}"));
    }
}

/// One task's display.
struct TaskView {
    task: i64,
    vm: String,
    json: bool,
    quiet: bool,
    bars: Option<MultiProgress>,
    /// The task's bandwidth windows: the limit in force is shown with the rate (R29).
    throttle: Option<Arc<Throttle>>,
    started: Instant,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Per disk: (bytes to read, bytes read).
    disks: BTreeMap<String, (u64, u64)>,
    bars: BTreeMap<String, ProgressBar>,
    last_emit: Instant,
    /// Bytes done at `last_emit`, for the current rate (R30).
    last_done: u64,
}

impl TaskView {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A JSON progress line when a second has passed (or `force`).
    fn emit_json(&self, inner: &mut Inner, force: bool) {
        let since = inner.last_emit.elapsed();
        if !self.json || (!force && since < JSON_EVERY) {
            return;
        }
        inner.last_emit = Instant::now();
        let (total, done) = inner
            .disks
            .values()
            .fold((0, 0), |(t, d), (tt, dd)| (t + tt, d + dd));
        let current = if since.as_secs_f64() > 0.0 {
            (done.saturating_sub(inner.last_done) as f64 / since.as_secs_f64()).round() as u64
        } else {
            0
        };
        inner.last_done = done;
        let limit = match self.throttle.as_ref().and_then(|t| t.limit_now()) {
            Some(l) => l.to_string(),
            None => "unlimited".into(),
        };
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 && total > done {
            Some(((total - done) as f64 / rate).round() as u64)
        } else {
            None
        };
        let line = serde_json::json!({
            "type": "progress", "task": self.task, "vm": self.vm,
            "bytes_done": done, "bytes_total": total,
            "percent": if total == 0 { 100.0 } else { (done as f64 * 1000.0 / total as f64).round() / 10.0 },
            "rate_bytes_per_sec": rate.round() as u64, "eta_seconds": eta,
            "current_rate_bytes_per_sec": current, "limit": limit,
        });
        out!("{line}");
    }
}

impl Progress for TaskView {
    fn phase(&self, phase: Phase) {
        if self.json {
            out!(
                "{}",
                serde_json::json!({ "type": "phase", "task": self.task, "vm": self.vm, "phase": phase.as_str() })
            );
        } else if !self.quiet && self.bars.is_none() {
            eprintln!("vmbackup: {}: {}", self.vm, phase.as_str());
        }
    }

    fn level(&self, level: Level) {
        if self.json {
            out!(
                "{}",
                serde_json::json!({ "type": "level", "task": self.task, "vm": self.vm, "level": level })
            );
        }
    }

    fn disk_total(&self, disk: &str, total: u64) {
        let mut inner = self.inner();
        inner.disks.insert(disk.to_string(), (total, 0));
        if let Some(mb) = &self.bars {
            let bar = mb.add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>16} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{}/{disk}", self.vm));
            inner.bars.insert(disk.to_string(), bar);
        }
        self.emit_json(&mut inner, true);
    }

    fn advance(&self, disk: &str, bytes: u64) {
        let mut inner = self.inner();
        if let Some(e) = inner.disks.get_mut(disk) {
            e.1 += bytes;
        }
        if let Some(b) = inner.bars.get(disk) {
            b.inc(bytes);
        }
        self.emit_json(&mut inner, false);
    }

    fn log(&self, level: LogLevel, message: &str) {
        if self.json {
            out!(
                "{}",
                serde_json::json!({ "type": "log", "task": self.task, "vm": self.vm, "level": level.as_str(), "message": message })
            );
        } else if !self.quiet || level != LogLevel::Info {
            let line = format!("vmbackup: {}: {}: {message}", self.vm, level.as_str());
            match &self.bars {
                Some(mb) => {
                    let _ = mb.println(line);
                }
                None => eprintln!("{line}"),
            }
        }
    }
}

impl Drop for TaskView {
    fn drop(&mut self) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if !inner.disks.is_empty() {
            self.emit_json(&mut inner, true);
        }
        for b in inner.bars.values() {
            b.finish_and_clear();
        }
    }
}
