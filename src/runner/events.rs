//! What the runner tells the front end, which decides how to show it.
//!
//! The runner never prints: every task's progress goes to a display the front
//! end builds ([`Events::display`]), and what happens to tasks (waiting for a slot,
//! ended) and what the scheduler notices go through the other methods. The CLI
//! implements this with terminal bars, plain lines or JSON lines; tests and
//! embedders can use [`Quiet`].

use std::sync::Arc;

use super::{TaskResult, TaskSpec};
use crate::task::progress::{Progress, Silent};
use crate::task::throttle::Throttle;

/// Receiver of the runner's events. Called from several task threads at once.
pub trait Events: Send + Sync {
    /// The display of one task's progress. The runner records every event in the
    /// task's row and log itself, then hands it on to this display.
    fn display(
        &self,
        task: i64,
        spec: &TaskSpec,
        throttle: Option<Arc<Throttle>>,
    ) -> Arc<dyn Progress>;
    /// Task `task` waits for a slot (R41); called again when the reason changes.
    fn pending(&self, task: i64, spec: &TaskSpec, reason: &str);
    /// A task ended: completed, failed, skipped (R28) or interrupted.
    fn ended(&self, result: &TaskResult);
    /// Something the scheduler noticed (missed slots, the clock behind the last
    /// run) or a change of the daemon's state (started, next run at).
    fn note(&self, message: &str);
}

/// [`Events`] that shows nothing.
pub struct Quiet;

impl Events for Quiet {
    fn display(&self, _: i64, _: &TaskSpec, _: Option<Arc<Throttle>>) -> Arc<dyn Progress> {
        Arc::new(Silent)
    }
    fn pending(&self, _: i64, _: &TaskSpec, _: &str) {}
    fn ended(&self, _: &TaskResult) {}
    fn note(&self, _: &str) {}
}
