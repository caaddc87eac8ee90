//! [`LocalStore`]: a [`Store`] in a directory (a local disk, NFS, a USB disk).
//!
//! A key is a relative path under the store's root directory. Every object is
//! written by the atomic procedure of `atomic.rs` (stage, fsync, rename,
//! directory fsync); deferred puts (chunk objects) stage at once, with direct
//! I/O where the file system takes it, and leave fsync + rename to the
//! background publisher (`publisher.rs`), and record the directory whose fsync
//! [`Store::flush`] owes. New directories are created level by level, each
//! parent fsynced, so a durable name never sits in a directory that is not.
//!
//! Files are created mode 0600 and directories 0700: VM disks hold secrets. The
//! root directory itself is the administrator's and is never created, changed
//! or removed; a missing root is an error (an unmounted target must not become
//! a new, empty one). Directories emptied by a delete are removed (an object
//! store has no directories either); a writer that loses such a race creates
//! the directory again.

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, File};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};

use super::atomic::{is_not_found, is_tmp_name, stage_parts, sync_dir, Publish, Staged, WriteVia};
use super::publisher::Publisher;
use super::{check_key, ObjectInfo, Store};

/// Mode of every directory the local store creates.
const DIR_MODE: u32 = 0o700;
/// How often a write retries when a concurrent delete removed its directory.
const DIR_RACE_RETRIES: usize = 20;

/// A store in a directory (module docs).
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    /// Directories holding names that are not durable yet (deferred puts,
    /// deletes, names seen by `exists`).
    dirs_to_sync: Mutex<BTreeSet<PathBuf>>,
    /// fsync + rename of deferred puts, in the background.
    publisher: Publisher,
    /// The file system refused a direct write here: later chunk objects go
    /// through the page cache at once instead of being refused again.
    direct_refused: AtomicBool,
}

impl LocalStore {
    /// The store rooted at the existing directory `root`.
    pub fn open(root: &Path) -> Result<LocalStore> {
        match fs::metadata(root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("{} is not a directory", root.display()),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                bail!("directory {} does not exist (not mounted?)", root.display())
            }
            Err(e) => return Err(e).with_context(|| format!("cannot reach {}", root.display())),
        }
        Ok(LocalStore {
            root: root.to_path_buf(),
            dirs_to_sync: Mutex::new(BTreeSet::new()),
            publisher: Publisher::default(),
            direct_refused: AtomicBool::new(false),
        })
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Stage `bytes` for `path`, creating its directories; retried when a
    /// concurrent delete removes an emptied directory in between (while the
    /// directories are made, or before the file is).
    fn stage(&self, path: &Path, parts: &[&[u8]], via: WriteVia) -> Result<Staged> {
        let mut attempt = 0;
        loop {
            let staged = self
                .create_parents(path)
                .and_then(|()| stage_parts(path, parts, via));
            match staged {
                Err(e) if is_not_found(&e) && attempt + 1 < DIR_RACE_RETRIES => attempt += 1,
                other => return other,
            }
        }
    }

    /// Create the missing directories between the root and `path`'s parent,
    /// fsyncing each new directory's parent.
    fn create_parents(&self, path: &Path) -> Result<()> {
        let parent = parent_of(path)?;
        if parent.is_dir() {
            return Ok(());
        }
        let relative = parent.strip_prefix(&self.root).with_context(|| {
            format!(
                "{} is outside the store {}",
                path.display(),
                self.root.display()
            )
        })?;
        let mut dir = self.root.clone();
        for part in relative.components() {
            let up = dir.clone();
            dir.push(part);
            match DirBuilder::new().mode(DIR_MODE).create(&dir) {
                Ok(()) => sync_dir(&up)?,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot create directory {}", dir.display()))
                }
            }
        }
        Ok(())
    }

    fn publish_now(&self, key: &str, bytes: &[u8], how: Publish) -> Result<bool> {
        let path = self.path_of(key)?;
        let placed = self
            .stage(&path, &[bytes], WriteVia::PageCache)?
            .publish(how)?;
        match sync_dir(parent_of(&path)?) {
            Ok(()) => Ok(placed),
            // A concurrent delete removed the object, then its emptied
            // directory, after the publish: nothing is left to make durable.
            Err(e) if is_not_found(&e) => Ok(placed),
            Err(e) => Err(e),
        }
    }

    fn record_dir(&self, dir: &Path) {
        self.dirs_to_sync
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dir.to_path_buf());
    }

    /// The key of a path under the root, if it is a valid key.
    fn key_of(&self, path: &Path) -> Option<String> {
        let rel = path.strip_prefix(&self.root).ok()?.to_str()?;
        check_key(rel).ok()?;
        Some(rel.to_string())
    }

    /// Visit every regular file under the directories that may hold keys
    /// starting with `prefix`; `each` gets the path, its name and metadata.
    fn walk(
        &self,
        prefix: &str,
        each: &mut dyn FnMut(&Path, &str, &fs::Metadata) -> Result<()>,
    ) -> Result<()> {
        let start = match prefix.rfind('/') {
            Some(i) => self.root.join(&prefix[..i]),
            None => self.root.clone(),
        };
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                    continue
                }
                Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
            };
            let mut names = Vec::new();
            for entry in entries {
                let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
            names.sort();
            let mut subdirs = Vec::new();
            for name in names {
                if name.starts_with('.') {
                    continue;
                }
                let path = dir.join(&name);
                let meta = match fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot stat {}", path.display()))
                    }
                };
                let rel = path
                    .strip_prefix(&self.root)
                    .ok()
                    .and_then(Path::to_str)
                    .unwrap_or_default()
                    .to_string();
                if meta.is_dir() {
                    let as_prefix = format!("{rel}/");
                    if as_prefix.starts_with(prefix) || prefix.starts_with(&as_prefix) {
                        subdirs.push(path);
                    }
                } else if meta.is_file() && rel.starts_with(prefix) {
                    each(&path, &name, &meta)?;
                }
            }
            // Depth first, in name order.
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }
}

impl Store for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path_of(key)?;
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let mut read = || -> std::io::Result<Vec<u8>> {
            // Chunk objects go into reused buffers (crate::buffers).
            let size = file.metadata()?.len() as usize;
            let mut bytes = crate::buffers::take(size);
            file.read_to_end(&mut bytes)?;
            Ok(bytes)
        };
        read()
            .map(Some)
            .with_context(|| format!("cannot read {}", path.display()))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Option<Vec<u8>>> {
        let path = self.path_of(key)?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let size = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?
            .len();
        let n = size.saturating_sub(offset).min(len) as usize;
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, offset)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Some(buf))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path_of(key)?;
        if self.publisher.is_pending(&path) {
            return Ok(true);
        }
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => {
                // Another writer may have renamed it in without its directory
                // fsync yet: whoever relies on it makes the name durable.
                self.record_dir(parent_of(&path)?);
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot stat {}", path.display())),
        }
    }

    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        self.publish_now(key, bytes, Publish::IfAbsent)
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.publish_now(key, bytes, Publish::Replace).map(|_| ())
    }

    fn put_if_absent_deferred(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.put_if_absent_deferred_parts(key, &[&bytes])
    }

    fn put_if_absent_deferred_parts(&self, key: &str, parts: &[&[u8]]) -> Result<()> {
        let path = self.path_of(key)?;
        let via = if self.direct_refused.load(Ordering::Relaxed) {
            WriteVia::PageCache
        } else {
            WriteVia::Direct
        };
        let staged = self.stage(&path, parts, via)?;
        if via == WriteVia::Direct && staged.written_via() == WriteVia::PageCache {
            self.direct_refused.store(true, Ordering::Relaxed);
        }
        self.record_dir(parent_of(&path)?);
        self.publisher.submit(staged)
    }

    fn flush(&self) -> Result<()> {
        // Every staged object must have its name before the names are made durable.
        self.publisher.flush()?;
        // Hold the set while syncing: a concurrent caller returns only once the
        // directories it needs are durable.
        let mut pending = self
            .dirs_to_sync
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for dir in pending.iter() {
            match sync_dir(dir) {
                Ok(()) => {}
                // Emptied and removed since: nothing in it needs to be durable.
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }
        pending.clear();
        Ok(())
    }

    fn list(&self, prefix: &str, each: &mut dyn FnMut(ObjectInfo) -> Result<()>) -> Result<()> {
        self.walk(prefix, &mut |path, name, meta| {
            if is_tmp_name(name) {
                return Ok(());
            }
            let Some(key) = self.key_of(path) else {
                return Ok(());
            };
            each(ObjectInfo {
                key,
                size: meta.len(),
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            })
        })
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("cannot delete {}", path.display())),
        }
        // Remove directories the delete emptied, up to (never including) the root.
        let mut dir = parent_of(&path)?.to_path_buf();
        while dir != self.root && fs::remove_dir(&dir).is_ok() {
            dir = parent_of(&dir)?.to_path_buf();
        }
        self.record_dir(&dir);
        Ok(())
    }

    fn remove_stale_partials(&self, prefix: &str, min_age: Duration) -> Result<Vec<String>> {
        let now = SystemTime::now();
        let mut removed = Vec::new();
        self.walk(prefix, &mut |path, name, meta| {
            let old = meta
                .modified()
                .is_ok_and(|m| now.duration_since(m).is_ok_and(|age| age >= min_age));
            if !is_tmp_name(name) || !old {
                return Ok(());
            }
            match fs::remove_file(path) {
                Ok(()) => removed.push(format!("staging file {}", path.display())),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()))
                }
            }
            Ok(())
        })?;
        Ok(removed)
    }
}

fn parent_of(path: &Path) -> Result<&Path> {
    path.parent()
        .with_context(|| format!("path {} has no parent directory", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        (dir, s)
    }

    fn keys(s: &dyn Store, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        s.list(prefix, &mut |i| {
            out.push(i.key);
            Ok(())
        })
        .unwrap();
        out
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_missing_root_is_an_error_never_created() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nas");
        let err = LocalStore::open(&gone).unwrap_err().to_string();
        assert!(err.contains("not mounted?"), "{err}");
        assert!(!gone.exists());
    }

    /// What only a directory has: private modes, and no way out of the root.
    /// The contract every store keeps is checked in tests/repo_format.rs.
    #[test]
    fn objects_are_private_and_keys_stay_under_the_root() {
        let (dir, s) = store();
        let root_mode = mode(dir.path());
        assert!(s
            .put_if_absent("r/chunks/ab/cd/x1", b"hello world")
            .unwrap());
        s.put("r/config", b"b").unwrap();
        assert_eq!(mode(&dir.path().join("r/chunks/ab/cd/x1")), 0o600);
        assert_eq!(mode(&dir.path().join("r/config")), 0o600);
        for d in ["r", "r/chunks", "r/chunks/ab", "r/chunks/ab/cd"] {
            assert_eq!(mode(&dir.path().join(d)), 0o700, "{d}");
        }
        assert_eq!(mode(dir.path()), root_mode, "the root is the admin's");
        assert!(s.get("../etc/passwd").is_err());
    }

    #[test]
    fn deferred_puts_are_visible_at_once_here_and_durable_after_flush() {
        let (_dir, s) = store();
        s.put_if_absent_deferred("c/aa/bb/k", b"v".to_vec())
            .unwrap();
        assert!(s.exists("c/aa/bb/k").unwrap());
        s.flush().unwrap();
        assert_eq!(s.get("c/aa/bb/k").unwrap().unwrap(), b"v");
        assert_eq!(keys(&s, "c/"), vec!["c/aa/bb/k".to_string()]);
    }

    /// A deferred put remembers a refusal of direct writes exactly when the
    /// file system refuses them: on the checkout's file system (which takes
    /// them here) and on ramfs (which refuses them at open). Once one is
    /// remembered the next put goes through the page cache with the same bytes.
    #[test]
    fn a_refused_direct_write_is_remembered_for_the_store() {
        let here = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let refusing = crate::direct_io::RefusingDir::new();
        for dir in [here.path(), refusing.path()] {
            let s = LocalStore::open(dir).unwrap();
            let direct_here = crate::direct_io::takes_direct(dir);
            let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
            s.put_if_absent_deferred("c/aa/bb/one", data.clone())
                .unwrap();
            s.flush().unwrap();
            assert_eq!(
                s.direct_refused.load(Ordering::Relaxed),
                !direct_here,
                "{}",
                dir.display()
            );
            s.direct_refused.store(true, Ordering::Relaxed);
            s.put_if_absent_deferred("c/aa/bb/two", data.clone())
                .unwrap();
            s.flush().unwrap();
            for k in ["c/aa/bb/one", "c/aa/bb/two"] {
                assert_eq!(s.get(k).unwrap().unwrap(), data, "{k}");
            }
        }
    }

    #[test]
    fn list_filters_by_prefix_and_hides_staging_and_hidden_files() {
        let (dir, s) = store();
        for k in ["vms/a/1/m", "vms/a/2/m", "vms/ab/1/m", "chunks/00/00/z"] {
            s.put(k, b"x").unwrap();
        }
        fs::write(dir.path().join("vms/a/1/m.tmp-1-2"), b"partial").unwrap();
        fs::write(dir.path().join("vms/a/.lock"), b"").unwrap();
        assert_eq!(keys(&s, "vms/a/"), vec!["vms/a/1/m", "vms/a/2/m"]);
        assert_eq!(
            keys(&s, "vms/a"),
            vec!["vms/a/1/m", "vms/a/2/m", "vms/ab/1/m"]
        );
        assert_eq!(keys(&s, "").len(), 4);
        assert!(keys(&s, "nothing/").is_empty());
    }

    #[test]
    fn delete_removes_emptied_directories_but_never_the_root() {
        let (dir, s) = store();
        s.put("r/vms/p/v/1/a", b"x").unwrap();
        s.put("r/vms/p/v/2/a", b"x").unwrap();
        s.delete("r/vms/p/v/1/a").unwrap();
        assert!(!dir.path().join("r/vms/p/v/1").exists());
        assert!(dir.path().join("r/vms/p/v/2").exists());
        s.delete("r/vms/p/v/2/a").unwrap();
        s.delete("r/vms/p/v/2/a").unwrap();
        assert!(!dir.path().join("r").exists());
        assert!(dir.path().is_dir());
        s.flush().unwrap();
    }

    #[test]
    fn stale_staging_files_are_removed_young_ones_kept() {
        let (dir, s) = store();
        s.put("r/chunks/aa/bb/k", b"published").unwrap();
        let leaf = dir.path().join("r/chunks/aa/bb");
        let stale = leaf.join("deadbeef.tmp-1-0000000000000001");
        let young = leaf.join("deadbeef.tmp-1-0000000000000002");
        fs::write(&stale, b"x").unwrap();
        fs::write(&young, b"y").unwrap();
        let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 3600);
        File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        let removed = s
            .remove_stale_partials("r/chunks/", Duration::from_secs(3600))
            .unwrap();
        assert_eq!(removed.len(), 1, "{removed:?}");
        assert!(!stale.exists() && young.exists());
        assert_eq!(s.get("r/chunks/aa/bb/k").unwrap().unwrap(), b"published");
    }

    /// Puts (immediate and deferred) into directories that concurrent deletes
    /// keep emptying and removing: a directory can vanish while a put makes
    /// the directories, before it stages its file, or after it publishes (then
    /// the delete removed the object too). No put fails.
    #[test]
    fn writers_survive_concurrent_deletes_of_their_directories() {
        let (_dir, s) = store();
        let s = Arc::new(s);
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let key = format!("d/x/{}", i % 2);
                        if w == 0 {
                            s.put(&key, b"v").unwrap();
                        } else {
                            s.put_if_absent_deferred(&key, b"v".to_vec()).unwrap();
                        }
                    }
                    s.flush().unwrap();
                })
            })
            .collect();
        for _ in 0..2000 {
            s.delete("d/x/0").unwrap();
            s.delete("d/x/1").unwrap();
        }
        for w in writers {
            w.join().unwrap();
        }
    }
}
