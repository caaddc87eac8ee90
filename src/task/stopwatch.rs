//! Per-step timings of a task, logged at debug level (`-v`): where the fixed
//! costs of a run go (opening the VM, the snapshot's QMP transaction and
//! fleecing, the data, the fsyncs of the commit, ending the snapshot), so they
//! can be measured (scripts/bench.sh keeps them) and cut.

use std::time::Instant;

/// Times consecutive steps of one task.
pub struct Stopwatch {
    what: String,
    start: Instant,
    last: Instant,
}

impl Stopwatch {
    /// Start timing the steps of `what` (e.g. "backup of VM 'web1'").
    pub fn start(what: impl Into<String>) -> Stopwatch {
        let now = Instant::now();
        Stopwatch {
            what: what.into(),
            start: now,
            last: now,
        }
    }

    /// Log how long `step` took since the previous step (or the start).
    pub fn lap(&mut self, step: &str) {
        let now = Instant::now();
        tracing::debug!(
            "{}: step '{step}' took {:.1} ms",
            self.what,
            now.duration_since(self.last).as_secs_f64() * 1e3
        );
        self.last = now;
    }

    /// Log the time since the start.
    pub fn total(&self) {
        tracing::debug!(
            "{}: took {:.1} ms in all",
            self.what,
            self.start.elapsed().as_secs_f64() * 1e3
        );
    }
}
