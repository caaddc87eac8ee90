//! What a task is, for every part of the program: its kind, its state, the
//! engine's progress events (`progress`), the bandwidth throttle that paces
//! its reads (`throttle`) and its per-step timings (`stopwatch`).
//!
//! A task is one run of one kind of work for one VM of a rule (SPEC "Task"):
//! the runner (`crate::runner`) executes every kind through one path (admission,
//! slot, progress, log, end), the state store (`crate::state::tasks`) keeps its
//! row. Kinds and states are stored as the lowercase words of [`TaskKind::as_str`]
//! and [`TaskState::as_str`]; nothing else spells them.

pub mod progress;
pub mod stopwatch;
pub mod throttle;

use std::fmt;
use std::str::FromStr;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

/// What a task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// A full, incremental or differential backup of one VM.
    Backup,
    /// A restore point written back: to image files, as a new VM, or in place.
    Restore,
    /// A restore point served over NBD by a background server of vmbackup's, a
    /// VM running on it with its writes in overlays (transient recovery); the
    /// task stays running, owned by the server process, until `recover stop`.
    Recovery,
    /// The data of an instant recovery moved to production storage while the VM
    /// runs (QEMU's mirror job), ending with the pivot to the new images.
    Migration,
    /// A point booted from a transient recovery and judged by its guest agent or
    /// its serial console.
    BootVerify,
    /// Retention applied to one VM's points after its last scheduled backup
    /// of the day (R17).
    Prune,
    /// Garbage collection of a rule's repository (at most once a day).
    Gc,
    /// A new point copied to the rule's copy target (`rule edit --copy-to`)
    /// after its backup, then the copy pruned with its own retention.
    Copy,
}

impl TaskKind {
    pub const ALL: [TaskKind; 8] = [
        TaskKind::Backup,
        TaskKind::Restore,
        TaskKind::Recovery,
        TaskKind::Migration,
        TaskKind::BootVerify,
        TaskKind::Prune,
        TaskKind::Gc,
        TaskKind::Copy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Backup => "backup",
            TaskKind::Restore => "restore",
            TaskKind::Recovery => "recovery",
            TaskKind::Migration => "migration",
            TaskKind::BootVerify => "boot-verify",
            TaskKind::Prune => "prune",
            TaskKind::Gc => "gc",
            TaskKind::Copy => "copy",
        }
    }

    /// Whether the task takes a global and a per-host slot before it runs (R38:
    /// backups, restores and migrations count, and a copy moves a point's data
    /// like them; transient recovery does not, and neither does a boot
    /// verification, which is one; prune and GC move no VM data).
    pub fn takes_slot(self) -> bool {
        matches!(
            self,
            TaskKind::Backup | TaskKind::Restore | TaskKind::Migration | TaskKind::Copy
        )
    }

    /// Whether an active task of this kind keeps its rule from being removed
    /// (R37): it reads the rule's points or runs a VM from one.
    pub fn holds_rule(self) -> bool {
        matches!(
            self,
            TaskKind::Restore | TaskKind::Recovery | TaskKind::Migration | TaskKind::BootVerify
        )
    }

    /// The kinds that [hold a rule](TaskKind::holds_rule), as an SQL list.
    pub fn holding_rule_sql() -> String {
        let words: Vec<String> = TaskKind::ALL
            .iter()
            .filter(|k| k.holds_rule())
            .map(|k| format!("'{k}'"))
            .collect();
        format!("({})", words.join(","))
    }

    /// Whether a second task of this kind for the same rule and VM is skipped
    /// while one is active (R28: only scheduled work can pile up).
    pub fn skips_when_active(self) -> bool {
        matches!(self, TaskKind::Backup)
    }

    /// Whether a task of this kind, once interrupted, may have left snapshot,
    /// bitmap or export state on the VM (R44: the reclaim cleans the VM).
    pub fn touches_the_vm(self) -> bool {
        matches!(self, TaskKind::Backup)
    }
}

/// Where a task is in its life. `Queued`, `Pending` and `Running` are active;
/// the others are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Admitted, not yet asking for a slot.
    Queued,
    /// Waiting for a slot (R41); the task row says why.
    Pending,
    /// Holding a slot; the row carries the R31 phase and progress.
    Running,
    Completed,
    Failed,
    /// Not run because another task of the same rule and VM was active (R28),
    /// or a lock was held.
    Skipped,
    /// Stopped by a signal, `task cancel`, or the death of its process.
    Interrupted,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Queued,
        TaskState::Pending,
        TaskState::Running,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Skipped,
        TaskState::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Skipped => "skipped",
            TaskState::Interrupted => "interrupted",
        }
    }

    pub fn is_active(self) -> bool {
        matches!(
            self,
            TaskState::Queued | TaskState::Pending | TaskState::Running
        )
    }

    /// The active states as an SQL list, for `state IN ...` (a test checks it
    /// against [`TaskState::is_active`]).
    pub const ACTIVE_SQL: &'static str = "('queued','pending','running')";

    /// A task that ended without doing its work: it failed, or it was
    /// interrupted (a signal, `task cancel`, its process died). Stats count these
    /// as failures and `stats` reports the unviewed ones (R33). A skip (R28) is
    /// counted apart.
    pub fn is_failure(self) -> bool {
        matches!(self, TaskState::Failed | TaskState::Interrupted)
    }

    /// The failure states as an SQL list (a test checks it against
    /// [`TaskState::is_failure`]).
    pub const FAILURE_SQL: &'static str = "('failed','interrupted')";
}

/// Parse one of the words `as_str` gives (state store columns, CLI filters).
macro_rules! word_enum {
    ($ty:ident, $what:literal) => {
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $ty::ALL
                    .iter()
                    .copied()
                    .find(|k| k.as_str() == s)
                    .ok_or_else(|| {
                        let all: Vec<&str> = $ty::ALL.iter().map(|k| k.as_str()).collect();
                        format!("unknown {} '{s}' (known: {})", $what, all.join(", "))
                    })
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value
                    .as_str()?
                    .parse()
                    .map_err(|e: String| FromSqlError::Other(e.into()))
            }
        }
    };
}

word_enum!(TaskKind, "task kind");
word_enum!(TaskState, "task state");
word_enum!(LogLevel, "log level");

pub use progress::LogLevel;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_unknown_words_are_named() {
        for k in TaskKind::ALL {
            assert_eq!(k.as_str().parse::<TaskKind>().unwrap(), k);
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::json!(k.as_str())
            );
        }
        assert_eq!(
            TaskKind::holding_rule_sql(),
            "('restore','recovery','migration','boot-verify')"
        );
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        for l in LogLevel::ALL {
            assert_eq!(l.as_str().parse::<LogLevel>().unwrap(), l);
        }
        let err = "paused".parse::<TaskState>().unwrap_err();
        assert!(
            err.contains("paused") && err.contains("interrupted"),
            "{err}"
        );
        let active: Vec<String> = TaskState::ALL
            .iter()
            .filter(|s| s.is_active())
            .map(|s| format!("'{s}'"))
            .collect();
        assert_eq!(TaskState::ACTIVE_SQL, format!("({})", active.join(",")));
        let failures: Vec<String> = TaskState::ALL
            .iter()
            .filter(|s| s.is_failure())
            .map(|s| format!("'{s}'"))
            .collect();
        assert_eq!(TaskState::FAILURE_SQL, format!("({})", failures.join(",")));
    }
}
