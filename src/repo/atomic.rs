//! Atomic, durable file publication: the only way the repository creates a final path.
//!
//! A file is staged as `<name>.tmp-<pid>-<random>` in the directory of its final
//! name, written, fsynced, renamed over the final name, and then the directory is
//! fsynced so the rename itself survives a crash. A reader therefore sees either no
//! file or the complete file, never a torn one. Staging files left by a crash keep
//! the `.tmp-` infix so cleanup can recognise them (docs/FORMAT.md, "Staging files").

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

/// The infix every staging file name carries.
pub const TMP_INFIX: &str = ".tmp-";

/// Write `bytes` to `path` atomically and durably (tmp, fsync, rename, fsync dir).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write(path, bytes, None)
}

/// [`write_file`] with the file's permission bits set to exactly `mode`, whatever
/// the umask (e.g. 0644 for a file another user's service reads).
pub fn write_file_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write(path, bytes, Some(mode))
}

fn write(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<()> {
    let tmp = tmp_path(path)?;
    let staged = stage(&tmp, bytes, mode).and_then(|()| {
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    });
    if staged.is_err() {
        // Best effort: the error that matters is the one being returned.
        let _ = fs::remove_file(&tmp);
    }
    staged?;
    sync_dir(parent_of(path)?)
}

/// fsync a directory, making renames and creations inside it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))
}

/// A file written under its staging name, not yet durable nor published.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
}

/// Write `bytes` under a staging name next to `path`, without fsync. Call
/// [`Staged::publish`] (fsync, rename) to make it appear under `path`.
pub fn stage_file(path: &Path, bytes: &[u8]) -> Result<Staged> {
    let tmp = tmp_path(path)?;
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))
        .and_then(|mut f| {
            f.write_all(bytes)
                .with_context(|| format!("cannot write {}", tmp.display()))
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Staged {
        tmp,
        path: path.to_path_buf(),
    })
}

impl Staged {
    /// The final name the file will have.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// fsync the staged data, then rename it to its final name (the directory
    /// fsync is the caller's). On failure the staging file is removed.
    pub fn publish(self) -> Result<()> {
        let done = File::open(&self.tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot fsync {}", self.tmp.display()))
            .and_then(|()| {
                fs::rename(&self.tmp, &self.path).with_context(|| {
                    format!(
                        "cannot rename {} to {}",
                        self.tmp.display(),
                        self.path.display()
                    )
                })
            });
        if done.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        done
    }
}

/// True when `name` is a staging file name (see [`TMP_INFIX`]).
pub fn is_tmp_name(name: &str) -> bool {
    name.contains(TMP_INFIX)
}

fn stage(tmp: &Path, bytes: &[u8], mode: Option<u32>) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Some(mode) = mode {
        file.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
    }
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))
}

fn parent_of(path: &Path) -> Result<&Path> {
    path.parent()
        .with_context(|| format!("path {} has no parent directory", path.display()))
}

fn tmp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("path {} has no file name", path.display()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(
        "{TMP_INFIX}{}-{:016x}",
        std::process::id(),
        unique_u64()
    ));
    Ok(path.with_file_name(tmp_name))
}

/// A value unique within this process and unpredictable across processes
/// (std's per-instance random hash keys, mixed with a counter).
fn unique_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_file_replaces_content_and_leaves_no_tmp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        write_file(&path, b"first").unwrap();
        write_file(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["manifest.json".to_string()]);
    }

    #[test]
    fn failed_write_leaves_neither_final_nor_tmp_file() {
        let dir = tempfile::tempdir().unwrap();
        // The final name is an existing non-empty directory: rename must fail.
        let path = dir.path().join("taken");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"x").unwrap();
        let err = write_file(&path, b"data").unwrap_err();
        assert!(format!("{err:#}").contains("cannot rename"), "{err:#}");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["taken".to_string()]);
    }

    #[test]
    fn write_file_mode_sets_exact_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.prom");
        write_file_mode(&path, b"x 1\n", 0o644).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(fs::read(&path).unwrap(), b"x 1\n");
    }

    #[test]
    fn tmp_names_are_unique_and_recognised() {
        let a = tmp_path(Path::new("/r/x.idx")).unwrap();
        let b = tmp_path(Path::new("/r/x.idx")).unwrap();
        assert_ne!(a, b);
        assert!(is_tmp_name(a.file_name().unwrap().to_str().unwrap()));
        assert!(!is_tmp_name("x.idx"));
    }
}
