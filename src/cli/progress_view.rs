//! How a running task looks from outside (R30, R31, R32): progress bars on a
//! terminal, JSON lines with `--json`, plain log lines otherwise, and the task's
//! row and log lines in the state store (at most one progress write per second).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use std::sync::Arc;

use crate::backup::progress::{LogLevel, Phase, Progress};
use crate::backup::throttle::Throttle;
use crate::level::Level;
use crate::state::State;

/// Progress of one task, reported to the terminal/stdout and the state store.
pub struct TaskView {
    task: i64,
    vm: String,
    json: bool,
    quiet: bool,
    state: Mutex<State>,
    inner: Mutex<Inner>,
    bars: Option<MultiProgress>,
    started: Instant,
    /// The task's bandwidth windows: the limit in force is shown with the rate (R29).
    throttle: Option<Arc<Throttle>>,
}

struct Inner {
    disks: BTreeMap<String, (u64, u64)>,
    bars: BTreeMap<String, ProgressBar>,
    last_emit: Instant,
    /// Bytes done at `last_emit`, for the current rate (R30).
    last_done: u64,
}

impl TaskView {
    pub fn new(task: i64, vm: &str, state: State, json: bool, quiet: bool) -> TaskView {
        let tty = std::io::stderr().is_terminal() && !json && !quiet;
        TaskView {
            task,
            vm: vm.to_string(),
            json,
            quiet,
            state: Mutex::new(state),
            inner: Mutex::new(Inner {
                disks: BTreeMap::new(),
                bars: BTreeMap::new(),
                last_emit: Instant::now(),
                last_done: 0,
            }),
            bars: tty.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            started: Instant::now(),
            throttle: None,
        }
    }

    /// Report the bandwidth limit in force from these windows.
    pub fn with_throttle(mut self, throttle: Arc<Throttle>) -> TaskView {
        self.throttle = Some(throttle);
        self
    }

    /// The limit in force now: `unlimited`, `20MiB/s` or `pause`.
    fn limit_text(&self) -> String {
        match self.throttle.as_ref().and_then(|t| t.limit_now()) {
            Some(l) => l.to_string(),
            None => "unlimited".into(),
        }
    }

    /// Run `f` on the state store (errors become warnings: progress is best effort).
    pub fn with_state(&self, f: impl FnOnce(&mut State) -> anyhow::Result<()>) {
        if let Ok(mut s) = self.state.lock() {
            if let Err(e) = f(&mut s) {
                eprintln!(
                    "vmbackup: warning: cannot record task {} progress: {e:#}",
                    self.task
                );
            }
        }
    }

    fn totals(inner: &Inner) -> (u64, u64) {
        inner
            .disks
            .values()
            .fold((0, 0), |(t, d), (tt, dd)| (t + tt, d + dd))
    }

    fn emit(&self, inner: &mut Inner, force: bool) {
        let since = inner.last_emit.elapsed();
        if !force && since < Duration::from_secs(1) {
            return;
        }
        inner.last_emit = Instant::now();
        let (total, done) = Self::totals(inner);
        let current = if since.as_secs_f64() > 0.0 {
            (done.saturating_sub(inner.last_done) as f64 / since.as_secs_f64()).round() as u64
        } else {
            0
        };
        inner.last_done = done;
        let limit = self.limit_text();
        self.with_state(|s| {
            s.set_task_progress(self.task, done, total)?;
            s.set_task_rate(self.task, current, &limit)
        });
        if self.json {
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
}

impl Progress for TaskView {
    fn phase(&self, phase: Phase) {
        self.with_state(|s| s.set_task_phase(self.task, phase.as_str()));
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
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
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
        self.emit(&mut inner, true);
    }

    fn advance(&self, disk: &str, bytes: u64) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if let Some(e) = inner.disks.get_mut(disk) {
            e.1 += bytes;
        }
        if let Some(b) = inner.bars.get(disk) {
            b.inc(bytes);
        }
        self.emit(&mut inner, false);
    }

    fn log(&self, level: LogLevel, message: &str) {
        self.with_state(|s| s.log(self.task, level.as_str(), message));
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
        if let Ok(mut inner) = self.inner.lock() {
            self.emit(&mut inner, true);
            for b in inner.bars.values() {
                b.finish_and_clear();
            }
        }
    }
}
