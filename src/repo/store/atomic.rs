//! Atomic, durable file publication for [`super::LocalStore`]: the only way it
//! creates a final name.
//!
//! A file is staged as `<name>.tmp-<pid>-<random>` in the directory of its final
//! name (created `O_EXCL`, mode 0600), written (chunk objects with direct I/O,
//! [`WriteVia`]), fsynced, renamed to the final
//! name, and then the directory is fsynced so the rename itself survives a
//! crash. A reader therefore sees either no file or the complete file, never a
//! torn one. Staging files left by a crash keep the `.tmp-` infix so cleanup can
//! recognise them (docs/FORMAT.md, "Staging files").
//!
//! Put-if-absent renames with `RENAME_NOREPLACE`; on file systems without it
//! (some network and FAT-family file systems) it checks, then renames. That
//! fallback can replace an object created in between by another writer, which
//! is harmless for every user of put-if-absent: objects named by their content,
//! and names made unique under a lock (docs/FORMAT.md, "Store operations").

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use rustix::fs::{renameat_with, RenameFlags, CWD};
use rustix::io::Errno;

use crate::direct_io;

/// The infix every staging file name carries.
pub const TMP_INFIX: &str = ".tmp-";

/// Mode of every file the local store creates (the target may be shared).
pub const FILE_MODE: u32 = 0o600;

/// fsync a directory, making renames and creations inside it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))
}

/// How a staged file takes its final name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// Replace whatever has the name.
    Replace,
    /// Leave an existing file alone (the staged one is discarded).
    IfAbsent,
}

/// How a staged file's data is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteVia {
    /// Through the page cache (small files, read again soon: manifests,
    /// indexes, locks).
    PageCache,
    /// With `O_DIRECT` where the file system takes it (chunk objects: written
    /// once, not read back by the backup; `crate::direct_io`).
    Direct,
}

/// A file written under its staging name, not yet durable nor published.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    /// How its data was written: `PageCache` when `Direct` was asked for and
    /// the file system refused it.
    via: WriteVia,
}

/// Write `bytes` under a staging name next to `path`, without fsync. Call
/// [`Staged::publish`] (fsync, rename) to make it appear under `path`.
#[cfg(test)]
pub fn stage_file(path: &Path, bytes: &[u8]) -> Result<Staged> {
    stage_parts(path, &[bytes], WriteVia::PageCache)
}

/// Write the concatenation of `parts` under a staging name next to `path`
/// (no joined copy: `direct_io::write_file`), without
/// fsync. Call [`Staged::publish`] (fsync, rename) to make it appear under `path`.
pub fn stage_parts(path: &Path, parts: &[&[u8]], via: WriteVia) -> Result<Staged> {
    let tmp = tmp_path(path)?;
    // O_DIRECT is set after the open, not asked of it: a file system that
    // refuses it at open (ramfs; tmpfs before Linux 6.6) has created the file
    // by then, so a second open of the new name would fail.
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&tmp)
        .and_then(|f| direct_io::write_file(&f, parts, via == WriteVia::Direct))
        .map(|direct| {
            if direct {
                WriteVia::Direct
            } else {
                WriteVia::PageCache
            }
        })
        .with_context(|| format!("cannot write {}", tmp.display()));
    match written {
        Ok(via) => Ok(Staged {
            tmp,
            path: path.to_path_buf(),
            via,
        }),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

impl Staged {
    /// How the data was written (`PageCache` also when `Direct` was refused).
    pub fn written_via(&self) -> WriteVia {
        self.via
    }

    /// The final name the file will have.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// fsync the staged data, then give it its final name (the directory fsync
    /// is the caller's). True when the file now has the name; false when
    /// `IfAbsent` found the name taken. The staging file never outlives this call.
    pub fn publish(self, how: Publish) -> Result<bool> {
        let done = File::open(&self.tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot fsync {}", self.tmp.display()))
            .and_then(|()| self.rename(how));
        if !matches!(done, Ok(true)) {
            let _ = fs::remove_file(&self.tmp);
        }
        done
    }

    fn rename(&self, how: Publish) -> Result<bool> {
        let context = || {
            format!(
                "cannot rename {} to {}",
                self.tmp.display(),
                self.path.display()
            )
        };
        if how == Publish::IfAbsent {
            match renameat_with(CWD, &self.tmp, CWD, &self.path, RenameFlags::NOREPLACE) {
                Ok(()) => return Ok(true),
                Err(Errno::EXIST) => return Ok(false),
                Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                    // No RENAME_NOREPLACE here: check, then rename (module docs).
                    if fs::symlink_metadata(&self.path).is_ok() {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(std::io::Error::from(e)).with_context(context),
            }
        }
        fs::rename(&self.tmp, &self.path).with_context(context)?;
        Ok(true)
    }
}

/// True when `name` is a staging file name (see [`TMP_INFIX`]).
pub fn is_tmp_name(name: &str) -> bool {
    name.contains(TMP_INFIX)
}

/// True for "the directory (or a parent) is not there": a concurrent delete
/// removed an empty directory, and the writer should create it again.
pub fn is_not_found(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == ErrorKind::NotFound)
    })
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
pub fn unique_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn publish_replaces_or_keeps_and_leaves_no_tmp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        assert!(stage_file(&path, b"first")
            .unwrap()
            .publish(Publish::IfAbsent)
            .unwrap());
        assert!(!stage_file(&path, b"other")
            .unwrap()
            .publish(Publish::IfAbsent)
            .unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert!(stage_file(&path, b"second")
            .unwrap()
            .publish(Publish::Replace)
            .unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(names(dir.path()), vec!["manifest.json".to_string()]);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn failed_publish_leaves_neither_final_nor_tmp_file() {
        let dir = tempfile::tempdir().unwrap();
        // The final name is an existing non-empty directory: rename must fail.
        let path = dir.path().join("taken");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"x").unwrap();
        let err = stage_file(&path, b"data")
            .unwrap()
            .publish(Publish::Replace)
            .unwrap_err();
        assert!(format!("{err:#}").contains("cannot rename"), "{err:#}");
        assert_eq!(names(dir.path()), vec!["taken".to_string()]);
    }

    /// A chunk object staged with direct I/O (header and payload as two parts,
    /// a length that is not a block multiple) publishes exactly its bytes,
    /// mode 0600, on a file system that takes O_DIRECT (the checkout's), on
    /// one that may not (the temporary directory's) and on one that refuses it
    /// at open (ramfs: the file is written through the page cache).
    #[test]
    fn direct_staging_publishes_exactly_the_parts() {
        let here = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let refusing = direct_io::RefusingDir::new();
        let header = [7u8; 60];
        let payload: Vec<u8> = (0..(3 << 20) + 123).map(|i| (i % 253) as u8).collect();
        for dir in [here.path(), tmp.path(), refusing.path()] {
            let path = dir.join("chunk");
            let direct_here = direct_io::takes_direct(dir);
            let staged = stage_parts(&path, &[&header, &payload], WriteVia::Direct).unwrap();
            let expected = if direct_here {
                WriteVia::Direct
            } else {
                WriteVia::PageCache
            };
            assert_eq!(staged.written_via(), expected);
            staged.publish(Publish::IfAbsent).unwrap();
            let got = fs::read(&path).unwrap();
            assert_eq!(got.len(), header.len() + payload.len());
            assert!(got[..60] == header && got[60..] == payload[..]);
            assert_eq!(names(dir), vec!["chunk".to_string()]);
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
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
