//! What every driver's quiesce (R10) shares: the outcome of a freeze attempt, the
//! marker that says "vmbackup froze this guest" and a test hook.
//!
//! A driver freezes guest file systems through the guest agent right before its
//! snapshot and thaws them right after. Before freezing it creates a marker file
//! in the run directory; after thawing it removes it. A run killed in between
//! leaves the marker, and the next run of the VM, `vmbackup cleanup` or the reclaim
//! of the dead task thaws the guest (and only guests with a marker: a freeze by
//! someone else is never undone).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

use super::{Note, Quiesce};

/// What came of a freeze attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeOutcome {
    /// Quiesce was not asked for, or does not apply (a shut-off VM).
    NotAsked,
    /// This many guest file systems were frozen.
    Frozen(u32),
    /// `--quiesce=try` and the guest agent did not answer: crash-consistent.
    Skipped(String),
}

impl FreezeOutcome {
    /// The guest agent did not answer: `require` fails naming the fix, `try`
    /// continues crash-consistent with a warning.
    pub fn no_agent(mode: Quiesce, vm: &str, why: &str, fix: &str) -> Result<FreezeOutcome> {
        match mode {
            Quiesce::Off => Ok(FreezeOutcome::NotAsked),
            Quiesce::Require => Err(anyhow!(
                "VM '{vm}': cannot quiesce, the guest agent did not answer ({why}): {fix}; \
                 or set the rule to --quiesce=try for crash-consistent backups when it cannot"
            )),
            Quiesce::Try => Ok(FreezeOutcome::Skipped(format!(
                "VM '{vm}': the guest agent did not answer ({why}); this point is \
                 crash-consistent, not quiesced"
            ))),
        }
    }

    pub fn is_frozen(&self) -> bool {
        matches!(self, FreezeOutcome::Frozen(_))
    }

    /// The task log line for it.
    pub fn note(&self) -> Option<Note> {
        match self {
            FreezeOutcome::NotAsked => None,
            FreezeOutcome::Frozen(n) => Some(Note::Info(format!(
                "quiesced: froze {n} guest file system(s) while the snapshot was taken"
            ))),
            FreezeOutcome::Skipped(w) => Some(Note::Warn(w.clone())),
        }
    }
}

/// The "vmbackup froze this guest" marker files, in the run directory.
pub mod freeze_marker {
    use super::*;

    /// The marker of guest `id` (a domain UUID, a VM name).
    pub fn path(run_dir: &Path, id: &str) -> PathBuf {
        let safe: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        run_dir.join(format!("vmbackup-frozen-{safe}"))
    }

    /// Record that guest `id` is about to be frozen.
    pub fn create(run_dir: &Path, id: &str) -> Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let p = path(run_dir, id);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&p)
            .with_context(|| format!("cannot create {}", p.display()))?;
        Ok(p)
    }

    pub fn remove(p: &Path) -> Result<()> {
        match std::fs::remove_file(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("remove {}", p.display())),
        }
    }
}

/// Test hook: with `VMBACKUP_TEST_HOLD_FROZEN=FILE`, a driver that has just frozen
/// a guest creates FILE and waits (up to 10 minutes) so a test can look at the
/// frozen guest and kill vmbackup there. Never set outside tests.
pub fn hold_frozen_for_tests() {
    let Some(file) = std::env::var_os("VMBACKUP_TEST_HOLD_FROZEN") else {
        return;
    };
    let _ = std::fs::write(&file, b"frozen\n");
    std::thread::sleep(std::time::Duration::from_secs(600));
}
