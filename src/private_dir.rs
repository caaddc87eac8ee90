//! Directories only vmbackup's user may look into: the state directory, the run
//! directory and each VM's scratch directory in it.
//!
//! vmbackup runs as root and these hold the state database, fleecing images (a
//! VM's disk as of the snapshot) and NBD sockets that serve disk data. A missing
//! directory is created 0700. An existing one must belong to this user and must
//! not be writable by anyone else (someone who can write there can plant a
//! symlink or a socket): that is refused with an error naming it. One that others
//! can read (list) is tightened to 0700. Search permission alone (`0711`) is left
//! as it is: it lets a hypervisor that runs as another user reach its VM's scratch
//! directory below, and nothing else (README "Files").

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};

use crate::error::refused;

/// Make sure `dir` exists and is private to this user (see the module docs).
/// `what` names it in messages (`state directory`, `run directory`).
pub fn ensure(dir: &Path, what: &str) -> Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {what} {}", dir.display()))?;
    }
    let meta =
        std::fs::metadata(dir).with_context(|| format!("cannot stat {what} {}", dir.display()))?;
    if !meta.is_dir() {
        return Err(refused(format!(
            "{what} {} is not a directory",
            dir.display()
        )));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(refused(format!(
            "{what} {} belongs to uid {}, not to this user (uid {me}): refusing to keep state or scratch files there",
            dir.display(),
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(refused(format!(
            "{what} {} can be written by others (mode {mode:04o}): refusing to keep state or scratch files there; run 'chmod go-w {}' or choose another directory",
            dir.display(),
            dir.display()
        )));
    }
    if mode & 0o044 != 0 {
        let tightened = mode & !0o077;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(tightened))
            .with_context(|| format!("cannot make {what} {} private", dir.display()))?;
        tracing::info!(
            "{what} {} was readable by others (mode {mode:04o}); now {tightened:04o}",
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{exit_code_of, ExitCode};

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn created_tightened_or_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let new = tmp.path().join("a/b");
        ensure(&new, "run directory").unwrap();
        assert_eq!(mode(&new), 0o700);
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure(&new, "run directory").unwrap();
        assert_eq!(mode(&new), 0o700);
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o711)).unwrap();
        ensure(&new, "run directory").unwrap();
        assert_eq!(mode(&new), 0o711, "search permission alone stays");
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o775)).unwrap();
        let err = ensure(&new, "run directory").unwrap_err();
        assert_eq!(exit_code_of(&err), ExitCode::Usage);
        assert!(
            err.to_string().contains("can be written by others"),
            "{err}"
        );
        let file = tmp.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(ensure(&file, "state directory").is_err());
    }
}
