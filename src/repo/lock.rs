//! Per-VM writer lock: a non-blocking exclusive `flock` on `vms/<vm-key>/.lock`.
//!
//! The lock lives as long as the [`VmLock`] value (the kernel drops it when the
//! file is closed, also when the process dies), so a crash never leaves a stale
//! lock behind. The lock file itself is empty and never removed.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{flock, FlockOperation};
use rustix::io::Errno;

use crate::error::busy;

/// The lock file name inside a VM's directory.
pub const LOCK_FILE: &str = ".lock";

/// Proof that this process is the one writer of a VM's points.
#[derive(Debug)]
pub struct VmLock {
    repo_root: PathBuf,
    vm_key: String,
    path: PathBuf,
    _file: File,
}

impl VmLock {
    /// Take the lock of `vm_key` at `path`, or fail at once with a busy error.
    pub(crate) fn acquire(repo_root: &Path, vm_key: &str, path: PathBuf) -> Result<VmLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                return Err(busy(format!(
                    "another backup of VM '{vm_key}' is running (lock {})",
                    path.display()
                )))
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        Ok(VmLock {
            repo_root: repo_root.to_path_buf(),
            vm_key: vm_key.to_string(),
            path,
            _file: file,
        })
    }

    /// The VM key this lock covers.
    pub fn vm_key(&self) -> &str {
        &self.vm_key
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root of the repository the lock belongs to.
    pub(crate) fn repo_root(&self) -> &Path {
        &self.repo_root
    }
}
