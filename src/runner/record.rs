//! A running task's record in the state store (R30, R31, R32): its phase, its
//! progress and current rate with the bandwidth limit in force (at most one write
//! a second), and its log lines. Every event is then handed on to the display the
//! front end gave, so what is shown and what is stored cannot drift apart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::level::Level;
use crate::state::State;
use crate::task::progress::{LogLevel, Phase, Progress};
use crate::task::throttle::Throttle;

/// Progress rows are written at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Records one task's events, then forwards them to `display`.
pub struct TaskRecorder {
    task: i64,
    state: Mutex<State>,
    display: Arc<dyn Progress>,
    /// The task's bandwidth windows: the limit in force is stored with the rate (R29).
    throttle: Option<Arc<Throttle>>,
    totals: Mutex<Totals>,
}

struct Totals {
    /// Per disk: (bytes to read, bytes read).
    disks: BTreeMap<String, (u64, u64)>,
    last_write: Instant,
    /// Bytes done at `last_write`, for the current rate (R30).
    last_done: u64,
}

impl TaskRecorder {
    pub fn new(
        task: i64,
        state: State,
        display: Arc<dyn Progress>,
        throttle: Option<Arc<Throttle>>,
    ) -> TaskRecorder {
        TaskRecorder {
            task,
            state: Mutex::new(state),
            display,
            throttle,
            totals: Mutex::new(Totals {
                disks: BTreeMap::new(),
                last_write: Instant::now(),
                last_done: 0,
            }),
        }
    }

    /// Run `f` on the state store. Recording is best effort: a failure is a
    /// warning, never the task's failure.
    pub fn with_state(&self, f: impl FnOnce(&mut State) -> anyhow::Result<()>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = f(&mut state) {
            tracing::warn!("cannot record the progress of task {}: {e:#}", self.task);
        }
    }

    /// Write the progress row when a second has passed (or `force`).
    fn write_progress(&self, totals: &mut Totals, force: bool) {
        let since = totals.last_write.elapsed();
        if !force && since < PROGRESS_EVERY {
            return;
        }
        totals.last_write = Instant::now();
        let (total, done) = totals
            .disks
            .values()
            .fold((0, 0), |(t, d), (tt, dd)| (t + tt, d + dd));
        let rate = if since.as_secs_f64() > 0.0 {
            (done.saturating_sub(totals.last_done) as f64 / since.as_secs_f64()).round() as u64
        } else {
            0
        };
        totals.last_done = done;
        let limit = match self.throttle.as_ref().and_then(|t| t.limit_now()) {
            Some(l) => l.to_string(),
            None => "unlimited".into(),
        };
        self.with_state(|s| {
            s.set_task_progress(self.task, done, total)?;
            s.set_task_rate(self.task, rate, &limit)
        });
    }

    fn totals(&self) -> std::sync::MutexGuard<'_, Totals> {
        self.totals.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Progress for TaskRecorder {
    fn phase(&self, phase: Phase) {
        // Every phase is a line of the task's story (R32); the display shows
        // phases its own way.
        self.with_state(|s| {
            s.set_task_phase(self.task, phase.as_str())?;
            s.log(
                self.task,
                LogLevel::Info,
                &format!("phase: {}", phase.as_str()),
            )
        });
        self.display.phase(phase);
    }

    fn level(&self, level: Level) {
        self.display.level(level);
    }

    fn disk_total(&self, disk: &str, total: u64) {
        {
            let mut totals = self.totals();
            totals.disks.insert(disk.to_string(), (total, 0));
            self.write_progress(&mut totals, true);
        }
        self.display.disk_total(disk, total);
    }

    fn advance(&self, disk: &str, bytes: u64) {
        {
            let mut totals = self.totals();
            if let Some(d) = totals.disks.get_mut(disk) {
                d.1 += bytes;
            }
            self.write_progress(&mut totals, false);
        }
        self.display.advance(disk, bytes);
    }

    fn log(&self, level: LogLevel, message: &str) {
        self.with_state(|s| s.log(self.task, level, message));
        self.display.log(level, message);
    }
}

impl Drop for TaskRecorder {
    fn drop(&mut self) {
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        if !totals.disks.is_empty() {
            self.write_progress(&mut totals, true);
        }
    }
}
