//! How tasks look from a terminal, a log file or a script (R30, R31):
//!
//! - a terminal (stderr is a TTY): one `MultiProgress` per process, so tasks
//!   running side by side each keep a live bar per disk with VM/disk, phase,
//!   percent, bytes, rate, elapsed time and ETA;
//! - stderr not a terminal (cron, systemd, `2>log`): a line per disk every 10%
//!   or 30 s, `web01/vda 40% 1.2GiB of 3.0GiB 210MiB/s eta 9s`, so a stuck
//!   backup can be told from a slow one;
//! - `--json`: JSON lines on stdout (docs/JSON.md, "Events");
//! - `-q`: warnings and errors only.
//!
//! Results go to stdout. What a task records in the state store is the
//! runner's business (`runner::record`); this only shows.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use serde_json::{json, Value};

use super::diag::stderr_line;
use crate::level::Level;
use crate::runner::{duration_text, Events, TaskResult, TaskSpec};
use crate::task::progress::{LogLevel, Phase, Progress};
use crate::task::throttle::Throttle;
use crate::task::TaskState;
use crate::units::format_size;

/// JSON progress lines are written at most this often.
const JSON_EVERY: Duration = Duration::from_secs(1);
/// Without a terminal, a disk's progress line comes at least this often...
const LINE_EVERY: Duration = Duration::from_secs(30);
/// ...and at every this many percent.
const LINE_STEP: u64 = 10;

/// How this process shows tasks.
#[derive(Clone)]
enum Mode {
    Json,
    Bars(MultiProgress),
    Lines,
}

/// The CLI's [`Events`]: what tasks do, shown on stderr/stdout.
pub struct CliEvents {
    mode: Mode,
    quiet: bool,
    /// `-v`: info lines of task logs are shown too.
    verbose: bool,
}

impl CliEvents {
    pub fn new(json: bool, quiet: bool, verbose: bool) -> CliEvents {
        let mode = if json {
            Mode::Json
        } else if std::io::stderr().is_terminal() && !quiet {
            Mode::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        } else {
            Mode::Lines
        };
        CliEvents {
            mode,
            quiet,
            verbose,
        }
    }
}

/// A line for stderr: above the bars when there are any, else stamped.
fn err_line(mode: &Mode, line: &str) {
    match mode {
        Mode::Bars(mb) => {
            let _ = mb.println(format!("vmbackup: {line}"));
        }
        _ => stderr_line(line),
    }
}

/// One JSON-lines event, with its type and time (docs/JSON.md, "Events").
fn event(kind: &str, fields: Value) -> String {
    let mut v = json!({ "type": kind, "time": crate::timefmt::json_time(chrono::Utc::now()) });
    if let (Some(o), Value::Object(f)) = (v.as_object_mut(), fields) {
        o.extend(f);
    }
    v.to_string()
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
            rule: spec.rule.name.clone(),
            vm: spec.vm.clone(),
            mode: self.mode.clone(),
            quiet: self.quiet,
            verbose: self.verbose,
            throttle,
            started: Instant::now(),
            inner: Mutex::new(Inner {
                disks: BTreeMap::new(),
                phase: Phase::Preparing,
                last_emit: Instant::now(),
                last_done: 0,
            }),
        })
    }

    fn pending(&self, task: i64, spec: &TaskSpec, reason: &str) {
        match &self.mode {
            Mode::Json => out!(
                "{}",
                event(
                    "pending",
                    json!({ "task": task, "rule": spec.rule.name, "vm": spec.vm, "waiting": reason })
                )
            ),
            mode if !self.quiet => err_line(
                mode,
                &format!("task {task} ({}): pending: {reason}", spec.vm),
            ),
            _ => {}
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
                // With --json, the summary at the end carries every result.
                if self.quiet || matches!(self.mode, Mode::Json) {
                    return;
                }
                let timing = match (r.started, r.duration_seconds) {
                    (Some(s), Some(d)) => format!(
                        "; started {}, took {}, {}/s",
                        crate::timefmt::human_time(s),
                        duration_text(d),
                        format_size(r.rate_bytes_per_sec.unwrap_or(0))
                    ),
                    _ => String::new(),
                };
                let n = r.summary.len();
                let print = || {
                    for (i, line) in r.summary.iter().enumerate() {
                        let tail = if i + 1 == n { timing.as_str() } else { "" };
                        out!("{who}: {line}{tail}");
                    }
                };
                // stdout and the bars may share the terminal: clear the bars
                // while printing, then draw them again.
                match &self.mode {
                    Mode::Bars(mb) => mb.suspend(print),
                    _ => print(),
                }
            }
            status => {
                // The R28 reason already starts with "skipped: ...".
                let msg = r.error.as_deref().unwrap_or_default();
                if msg.starts_with(status.as_str()) {
                    err_line(&self.mode, &format!("{who}: {msg}"));
                } else {
                    err_line(&self.mode, &format!("{who}: {status}: {msg}"));
                }
            }
        }
    }

    fn note(&self, message: &str) {
        match &self.mode {
            Mode::Json => out!("{}", event("note", json!({ "message": message }))),
            mode => err_line(mode, message),
        }
    }
}

/// One task's display.
struct TaskView {
    task: i64,
    rule: String,
    vm: String,
    mode: Mode,
    quiet: bool,
    verbose: bool,
    /// The task's bandwidth windows: the limit in force is shown with the rate (R29).
    throttle: Option<Arc<Throttle>>,
    started: Instant,
    inner: Mutex<Inner>,
}

struct Inner {
    disks: BTreeMap<String, Disk>,
    phase: Phase,
    last_emit: Instant,
    /// Bytes done at `last_emit`, for the current rate (R30).
    last_done: u64,
}

/// One disk's progress.
struct Disk {
    total: u64,
    done: u64,
    started: Instant,
    bar: Option<ProgressBar>,
    /// Without a terminal: the percent step and time of the last line.
    last_step: u64,
    last_line: Instant,
}

impl Disk {
    fn percent(&self) -> u64 {
        self.done
            .saturating_mul(100)
            .checked_div(self.total)
            .unwrap_or(100)
    }
}

/// `eta 9s`, or `eta -` before anything was read.
fn eta_key(state: &ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = if state.pos() == 0 || state.len().is_some_and(|l| state.pos() >= l) {
        write!(w, "-")
    } else {
        write!(w, "{}", eta_text(state.eta().as_secs_f64()))
    };
}

/// An ETA in whole seconds, rounded up: `9s`, `2m 5s`.
fn eta_text(secs: f64) -> String {
    let s = secs.ceil().max(1.0) as u64;
    if s < 60 {
        format!("{s}s")
    } else {
        duration_text(s as f64)
    }
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>16} {msg:<10} [{bar:24}] {percent:>3}% {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {elapsed:>4} eta {myeta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .with_key("myeta", eta_key)
    .progress_chars("=> ")
}

impl TaskView {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A JSON progress line when a second has passed (or `force`).
    fn emit_json(&self, inner: &mut Inner, force: bool) {
        let since = inner.last_emit.elapsed();
        if !matches!(self.mode, Mode::Json) || (!force && since < JSON_EVERY) {
            return;
        }
        inner.last_emit = Instant::now();
        let (total, done) = inner
            .disks
            .values()
            .fold((0, 0), |(t, d), x| (t + x.total, d + x.done));
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
        out!(
            "{}",
            event(
                "progress",
                json!({
                    "task": self.task, "rule": self.rule, "vm": self.vm,
                    "bytes_done": done, "bytes_total": total,
                    "percent": if total == 0 { 100.0 } else { (done as f64 * 1000.0 / total as f64).round() / 10.0 },
                    "rate_bytes_per_sec": rate.round() as u64, "eta_seconds": eta,
                    "current_rate_bytes_per_sec": current, "limit": limit,
                })
            )
        );
    }

    /// Without a terminal: `web01/vda 40% 1.2GiB of 3.0GiB 210MiB/s eta 9s`
    /// when the disk crossed another 10% or 30 s passed (or `force`).
    fn emit_line(&self, name: &str, d: &mut Disk, force: bool) {
        if !matches!(self.mode, Mode::Lines) || self.quiet {
            return;
        }
        let step = d.percent() / LINE_STEP;
        if !force && step <= d.last_step && d.last_line.elapsed() < LINE_EVERY {
            return;
        }
        d.last_step = step;
        d.last_line = Instant::now();
        let secs = d.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            d.done as f64 / secs
        } else {
            0.0
        };
        let eta = if d.done >= d.total {
            "done".to_string()
        } else if rate > 0.0 {
            format!("eta {}", eta_text((d.total - d.done) as f64 / rate))
        } else {
            "eta -".to_string()
        };
        let limit = match self.throttle.as_ref().and_then(|t| t.limit_now()) {
            Some(l) => format!(" (limit {l})"),
            None => String::new(),
        };
        stderr_line(&format!(
            "{}/{name} {}% {} of {} {}/s{limit} {eta}",
            self.vm,
            d.percent(),
            format_size(d.done),
            format_size(d.total),
            format_size(rate as u64),
        ));
    }
}

impl Progress for TaskView {
    fn phase(&self, phase: Phase) {
        let mut inner = self.inner();
        inner.phase = phase;
        match &self.mode {
            Mode::Json => out!(
                "{}",
                event(
                    "phase",
                    json!({ "task": self.task, "rule": self.rule, "vm": self.vm, "phase": phase.as_str() })
                )
            ),
            Mode::Bars(_) => {
                for d in inner.disks.values() {
                    if let Some(b) = &d.bar {
                        b.set_message(phase.as_str());
                    }
                }
            }
            Mode::Lines if !self.quiet => {
                stderr_line(&format!("{}: {}", self.vm, phase.as_str()));
            }
            Mode::Lines => {}
        }
    }

    fn level(&self, level: Level) {
        if matches!(self.mode, Mode::Json) {
            out!(
                "{}",
                event(
                    "level",
                    json!({ "task": self.task, "rule": self.rule, "vm": self.vm, "level": level })
                )
            );
        }
    }

    fn disk_total(&self, disk: &str, total: u64) {
        let mut inner = self.inner();
        let bar = match &self.mode {
            Mode::Bars(mb) => {
                let bar = mb.add(ProgressBar::new(total));
                bar.set_style(bar_style());
                bar.set_prefix(format!("{}/{disk}", self.vm));
                bar.set_message(inner.phase.as_str());
                Some(bar)
            }
            _ => None,
        };
        let mut d = Disk {
            total,
            done: 0,
            started: Instant::now(),
            bar,
            last_step: 0,
            last_line: Instant::now(),
        };
        self.emit_line(disk, &mut d, true);
        inner.disks.insert(disk.to_string(), d);
        self.emit_json(&mut inner, true);
    }

    fn advance(&self, disk: &str, bytes: u64) {
        let mut inner = self.inner();
        if let Some(mut d) = inner.disks.remove(disk) {
            d.done += bytes;
            if let Some(b) = &d.bar {
                b.inc(bytes);
            }
            self.emit_line(disk, &mut d, false);
            inner.disks.insert(disk.to_string(), d);
        }
        self.emit_json(&mut inner, false);
    }

    fn log(&self, level: LogLevel, message: &str) {
        match &self.mode {
            Mode::Json => out!(
                "{}",
                event(
                    "log",
                    json!({ "task": self.task, "rule": self.rule, "vm": self.vm, "level": level.as_str(), "message": message })
                )
            ),
            mode => {
                let shown = match level {
                    LogLevel::Info => self.verbose,
                    _ => true,
                };
                if shown {
                    err_line(mode, &format!("{}: {}: {message}", self.vm, level.as_str()));
                }
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
        for d in inner.disks.values() {
            if let Some(b) = &d.bar {
                b.finish_and_clear();
            }
        }
    }
}
