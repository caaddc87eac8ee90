//! What the world outside vmbackup learns when tasks end (R33): the Prometheus
//! textfile (`prometheus.rs`) and notifications by webhook or command
//! (`notify.rs`), as configured in system.conf.
//!
//! Whatever process ends a task (the runner's task threads, the reclaim of a
//! dead process's tasks, `verify`) calls [`Monitor`]; the metrics file is
//! rewritten at once from the state store, and notifications go out on
//! background threads after the task's slot is released. They never fail a
//! task: a problem is a warning. [`Monitor::finish`] waits for the ones in
//! flight, at most [`Monitor::bound`] (4 × `notify_timeout`, 40 s by default).

pub mod notify;
pub mod prometheus;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::config::Monitoring;
use crate::state::State;
use crate::task::LogLevel;
use notify::{Channels, Event, Group, Notification, Sent};

/// The rule setting that turns the webhook off for that rule.
pub const NOTIFY_URL_NONE: &str = "none";

/// Metrics and notifications of one process.
pub struct Monitor {
    cfg: Monitoring,
    /// The secret header, read once at start-up.
    header: Option<(String, String)>,
    state_path: PathBuf,
    /// Notifications still being sent.
    inflight: Arc<(Mutex<usize>, Condvar)>,
}

impl Monitor {
    /// A monitor for the settings of system.conf; reads the secret header file.
    pub fn new(cfg: &Monitoring, state_path: &Path) -> Result<Monitor> {
        let header = match &cfg.notify_header_file {
            Some(path) => Some(crate::config::read_header_file(path)?),
            None => None,
        };
        Ok(Monitor {
            cfg: cfg.clone(),
            header,
            state_path: state_path.to_path_buf(),
            inflight: Arc::new((Mutex::new(0), Condvar::new())),
        })
    }

    /// A monitor that writes no metrics and sends nothing.
    pub fn off(state_path: &Path) -> Monitor {
        Monitor {
            cfg: Monitoring::default(),
            header: None,
            state_path: state_path.to_path_buf(),
            inflight: Arc::new((Mutex::new(0), Condvar::new())),
        }
    }

    /// The longest [`Monitor::finish`] waits: 4 × `notify_timeout`.
    pub fn bound(&self) -> Duration {
        self.cfg.notify_timeout * 4
    }

    /// Rewrite the metrics file (when configured). A failure is a warning.
    pub fn refresh(&self, state: &State) {
        if let Some(path) = &self.cfg.prometheus_textfile {
            if let Err(e) = prometheus::write(state, path) {
                tracing::warn!("cannot write the metrics file: {e:#}");
            }
        }
    }

    /// Task `task` ended (its row holds its final state): rewrite the metrics,
    /// then notify `event` when `notify_on` asks for it.
    pub fn task_ended(&self, state: &State, task: i64, event: Option<Event>, exit_code: u8) {
        self.refresh(state);
        let Some(event) = event else { return };
        match state.task(task) {
            Ok(Some(row)) => {
                let n = Notification::of_task(event, &row, Some(exit_code));
                self.notify(state, n);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("cannot read task {task} to notify: {e:#}"),
        }
    }

    /// Send `n` in the background when `notify_on` selects its event.
    pub fn notify(&self, state: &State, n: Notification) {
        if !self.wanted(n.event) {
            return;
        }
        let Some(channels) = self.channels(state, n.rule.as_deref()) else {
            return;
        };
        {
            let (count, _) = &*self.inflight;
            *count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        }
        let inflight = self.inflight.clone();
        let state_path = self.state_path.clone();
        std::thread::spawn(move || {
            let results = notify::send(&n, &channels);
            report_failures(&n, &results, &state_path);
            let (count, done) = &*inflight;
            *count.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
            done.notify_all();
        });
    }

    /// Send `n` now, whatever `notify_on` says (`notify test`); one result per
    /// channel. `None` when no channel is configured for `rule`.
    pub fn send_now(&self, state: &State, n: &Notification) -> Option<Vec<(String, Sent)>> {
        let channels = self.channels(state, n.rule.as_deref())?;
        Some(notify::send(n, &channels))
    }

    /// Wait for notifications in flight, at most [`Monitor::bound`].
    pub fn finish(&self) {
        let deadline = Instant::now() + self.bound();
        let (count, done) = &*self.inflight;
        let mut n = count.lock().unwrap_or_else(PoisonError::into_inner);
        while *n > 0 {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!("{} notification(s) still unsent at exit", *n);
                return;
            }
            n = done
                .wait_timeout(n, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn wanted(&self, event: Event) -> bool {
        let on = self.cfg.notify_on;
        match event.group() {
            Group::Failure => on.failure,
            Group::Fallback => on.fallback,
            Group::Success => on.success,
            Group::Always => true,
        }
    }

    /// The webhook (the rule's own URL, else system.conf's; none when the rule
    /// says `none`) and the command; `None` when neither is set.
    fn channels(&self, state: &State, rule: Option<&str>) -> Option<Channels> {
        let rule_url = match rule {
            Some(r) => state.rule_notify_url(r).unwrap_or_else(|e| {
                tracing::warn!("cannot read the notify URL of rule '{r}': {e:#}");
                None
            }),
            None => None,
        };
        let url = match rule_url.as_deref() {
            Some(NOTIFY_URL_NONE) => None,
            Some(url) => Some(url.to_string()),
            None => self.cfg.notify_url.clone(),
        };
        if url.is_none() && self.cfg.notify_command.is_none() {
            return None;
        }
        Some(Channels {
            url,
            header: self.header.clone(),
            command: self.cfg.notify_command.clone(),
            timeout: self.cfg.notify_timeout,
        })
    }
}

/// A notification that could not be sent: a warning on stderr and, for a
/// task's event, a line in that task's log (R32).
fn report_failures(n: &Notification, results: &[(String, Sent)], state_path: &Path) {
    for (channel, result) in results {
        let Err(why) = result else { continue };
        let msg = format!(
            "the {} notification by {channel} failed: {why}",
            n.event.as_str()
        );
        tracing::warn!("{msg}");
        if let Some(task) = n.task {
            let logged =
                State::open(state_path).and_then(|mut s| s.log(task, LogLevel::Warn, &msg));
            if let Err(e) = logged {
                tracing::warn!("cannot log it on task {task}: {e:#}");
            }
        }
    }
}
