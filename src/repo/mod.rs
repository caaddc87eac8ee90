//! The repository on a backup target: content-addressed chunks, one complete
//! index per disk per point, and a manifest that commits each point.
//!
//! docs/FORMAT.md specifies every file byte by byte; this module implements it.
//!
//! # Glossary
//!
//! - **chunk**: the bytes of one slot of a disk, stored once under its BLAKE3
//!   digest in `chunks/ab/cd/<hex>` (module `chunk`, `chunk_store`).
//! - **slot**: a chunk-sized range of a disk; all zeros (not stored) or a chunk.
//! - **index**: a disk's slots at one point, `<disk>.idx` (module `index`).
//! - **point**: one backup of one VM, `vms/<vm-key>/<point-id>/`, committed by its
//!   `manifest.json` (modules `manifest`, `point`).
//! - **vm key**: `<platform>/<vm>`, encoded to be path-safe (module `names`).
//!
//! # Write order (what makes a crash harmless)
//!
//! chunks (data fsynced before each name exists) → indexes (atomic writes) →
//! fsync of every chunk directory touched → `manifest.json` (atomic write). Readers
//! go the other way: manifest, then indexes, then chunks. A crash leaves at most
//! a point directory without a manifest (ignored by listing, removed by cleanup)
//! and chunks nothing refers to (removed by a future GC).
//!
//! # Locking
//!
//! | operation         | takes                                   | excludes                     |
//! |-------------------|-----------------------------------------|------------------------------|
//! | backup of VM x    | exclusive `flock` on `vms/<x>/.lock`    | backup, cleanup, prune of x  |
//! | cleanup of VM x   | exclusive `flock` on `vms/<x>/.lock`    | backup, cleanup, prune of x  |
//! | restore, verify   | nothing: read committed points only     | —                            |
//! | prune of x (later)| exclusive `flock` on `vms/<x>/.lock`    | backup, cleanup of x         |
//! | GC (later)        | must exclude every writer (repo lock)   | all backups, prune           |
//!
//! All locks are non-blocking: a held lock is a busy error (exit 4). Backups of
//! different VMs write into one chunk store at once; inserts need no lock. A
//! restore or verify racing with a prune of the same point may see it vanish and
//! fail loudly (never silently); prune and GC will take their own locks.

mod atomic;
mod chunk;
mod chunk_store;
mod delta;
mod format;
mod index;
mod lock;
mod manifest;
mod names;
mod point;
mod publisher;
mod verify;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

pub use atomic::{is_tmp_name, sync_dir, write_file, write_file_mode};
pub use chunk::{digest_hex, digest_of, parse_digest_hex, Digest};
pub use chunk_store::{ChunkError, ChunkStore, Inserted};
pub use delta::{Delta, Patch};
pub use format::{
    check_chunk_size, RepoConfig, CONFIG_FILE, FORMAT_VERSION, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};
pub use index::{DiskIndex, Slot};
pub use lock::VmLock;
pub use manifest::{Manifest, ManifestDisk, ManifestTotals, ManifestVm, PointStatus};
pub use names::{check_vm_key, encode_name, index_file_name, new_point_id, parse_point_id, vm_key};
pub use point::PointWriter;
pub use verify::{Problem, ProblemKind, VerifyReport};

/// The manifest file name inside a point directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The chunk store directory.
const CHUNKS_DIR: &str = "chunks";
/// The directory of all VMs' points.
const VMS_DIR: &str = "vms";
/// Entries a directory may hold before `init_or_open` makes it a repository.
const ALLOWED_IN_NEW_ROOT: [&str; 3] = [CHUNKS_DIR, VMS_DIR, "lost+found"];

/// An open repository. Cheap to clone; clones share the chunk store.
#[derive(Debug, Clone)]
pub struct Repository {
    root: PathBuf,
    chunks: Arc<ChunkStore>,
}

impl Repository {
    /// Open the repository at `root`, creating it first if `root` is absent or an
    /// empty directory. A non-empty directory that is not a repository is refused.
    pub fn init_or_open(root: &Path) -> Result<Repository> {
        if !root.join(CONFIG_FILE).exists() {
            init(root).with_context(|| format!("cannot create repository {}", root.display()))?;
        }
        Repository::open(root)
    }

    /// The repository at `root`, or `None` when no backup has created one yet.
    pub fn open_if_exists(root: &Path) -> Result<Option<Repository>> {
        if root.join(CONFIG_FILE).exists() {
            Repository::open(root).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Open the existing repository at `root`.
    pub fn open(root: &Path) -> Result<Repository> {
        if !root.is_dir() {
            bail!("repository {} does not exist", root.display());
        }
        let config_path = root.join(CONFIG_FILE);
        if !config_path.exists() {
            bail!(
                "{} is not a vmbackup repository (no {CONFIG_FILE})",
                root.display()
            );
        }
        RepoConfig::load(&config_path)?;
        for dir in [CHUNKS_DIR, VMS_DIR] {
            if !root.join(dir).is_dir() {
                bail!(
                    "repository {} is damaged: directory {dir}/ is missing",
                    root.display()
                );
            }
        }
        Ok(Repository {
            root: root.to_path_buf(),
            chunks: Arc::new(ChunkStore::new(root.join(CHUNKS_DIR))),
        })
    }

    /// The repository's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The chunk store (shared by all VMs).
    pub fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    /// Take the exclusive writer lock of a VM (backup, cleanup). Busy error (exit 4)
    /// when another process holds it.
    pub fn lock_vm(&self, vm_key: &str) -> Result<VmLock> {
        let dir = self.vm_dir(vm_key)?;
        if !dir.is_dir() {
            create_dirs_durably(&self.root.join(VMS_DIR), vm_key)?;
        }
        VmLock::acquire(&self.root, vm_key, dir.join(lock::LOCK_FILE))
    }

    /// The keys of all VMs with at least one committed point, sorted.
    pub fn list_vms(&self) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        for platform in list_dir_names(&self.root.join(VMS_DIR))? {
            for vm in list_dir_names(&self.root.join(VMS_DIR).join(&platform))? {
                let key = format!("{platform}/{vm}");
                if check_vm_key(&key).is_ok() && !self.committed_point_ids(&key)?.is_empty() {
                    keys.push(key);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// The manifests of a VM's committed points, oldest first.
    pub fn list_points(&self, vm_key: &str) -> Result<Vec<Manifest>> {
        self.committed_point_ids(vm_key)?
            .iter()
            .map(|point| self.load_manifest(vm_key, point))
            .collect()
    }

    /// Load one committed point's manifest; it must agree with where it lies.
    pub fn load_manifest(&self, vm_key: &str, point: &str) -> Result<Manifest> {
        let path = self.point_dir(vm_key, point)?.join(MANIFEST_FILE);
        let text = match fs::read_to_string(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                bail!("point {point} of VM '{vm_key}' does not exist (or is incomplete)")
            }
            other => other.with_context(|| format!("cannot read manifest {}", path.display()))?,
        };
        let manifest = Manifest::parse(&text, &path)?;
        let key = names::vm_key(&manifest.vm.platform, &manifest.vm.name);
        if manifest.point != point || key != vm_key {
            bail!(
                "manifest {} describes point {} of VM '{key}': it is misplaced",
                path.display(),
                manifest.point
            );
        }
        manifest
            .check()
            .with_context(|| format!("manifest {} is inconsistent", path.display()))?;
        Ok(manifest)
    }

    /// Load the index of `disk` at a point.
    pub fn load_index(&self, vm_key: &str, point: &str, disk: &str) -> Result<DiskIndex> {
        let path = self.point_dir(vm_key, point)?.join(index_file_name(disk));
        let bytes = fs::read(&path).with_context(|| {
            format!(
                "cannot read index of disk '{disk}' at point {point} ({})",
                path.display()
            )
        })?;
        format::check_magic(&bytes, &format::INDEX_MAGIC, &path)?;
        DiskIndex::decode(&bytes).with_context(|| {
            format!(
                "index of disk '{disk}' at point {point} ({}) is damaged",
                path.display()
            )
        })
    }

    /// Start writing a new point of the locked VM. The point id must be new.
    pub fn begin_point(&self, lock: &VmLock, point: &str) -> Result<PointWriter> {
        self.check_lock(lock)?;
        parse_point_id(point)?;
        let vm_dir = self.vm_dir(lock.vm_key())?;
        let dir = vm_dir.join(point);
        fs::create_dir(&dir).with_context(|| {
            format!(
                "cannot create point {point} of VM '{}' ({})",
                lock.vm_key(),
                dir.display()
            )
        })?;
        atomic::sync_dir(&vm_dir)?;
        Ok(PointWriter::new(
            lock.vm_key(),
            point,
            vm_dir,
            Arc::clone(&self.chunks),
        ))
    }

    /// Point directories of a VM without a manifest: crash leftovers.
    pub fn incomplete_points(&self, vm_key: &str) -> Result<Vec<PathBuf>> {
        let vm_dir = self.vm_dir(vm_key)?;
        Ok(point_dir_names(&vm_dir)?
            .into_iter()
            .map(|name| vm_dir.join(name))
            .filter(|dir| !dir.join(MANIFEST_FILE).exists())
            .collect())
    }

    /// Remove the locked VM's incomplete point directories; returns their ids.
    pub fn remove_incomplete_points(&self, lock: &VmLock) -> Result<Vec<String>> {
        self.check_lock(lock)?;
        let mut removed = Vec::new();
        for dir in self.incomplete_points(lock.vm_key())? {
            fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove incomplete point {}", dir.display()))?;
            if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
                removed.push(name.to_string());
            }
        }
        if !removed.is_empty() {
            atomic::sync_dir(&self.vm_dir(lock.vm_key())?)?;
        }
        Ok(removed)
    }

    /// Read and re-hash every chunk a point refers to.
    pub fn verify_point(&self, vm_key: &str, point: &str) -> Result<VerifyReport> {
        let manifest = self.load_manifest(vm_key, point)?;
        let indexes = manifest
            .disks
            .iter()
            .map(|disk| self.load_index(vm_key, point, &disk.name))
            .collect::<Result<Vec<_>>>()?;
        verify::verify_indexes(&self.chunks, &manifest, &indexes)
            .with_context(|| format!("cannot verify point {point} of VM '{vm_key}'"))
    }

    fn vm_dir(&self, vm_key: &str) -> Result<PathBuf> {
        check_vm_key(vm_key)?;
        Ok(self.root.join(VMS_DIR).join(vm_key))
    }

    fn point_dir(&self, vm_key: &str, point: &str) -> Result<PathBuf> {
        parse_point_id(point)?;
        Ok(self.vm_dir(vm_key)?.join(point))
    }

    fn committed_point_ids(&self, vm_key: &str) -> Result<Vec<String>> {
        let vm_dir = self.vm_dir(vm_key)?;
        let mut ids: Vec<String> = point_dir_names(&vm_dir)?
            .into_iter()
            .filter(|name| vm_dir.join(name).join(MANIFEST_FILE).exists())
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn check_lock(&self, lock: &VmLock) -> Result<()> {
        if lock.repo_root() != self.root {
            bail!(
                "the lock of VM '{}' belongs to repository {}, not {}",
                lock.vm_key(),
                lock.repo_root().display(),
                self.root.display()
            );
        }
        Ok(())
    }
}

/// Create the layout at `root`: directories first, the config file last.
fn init(root: &Path) -> Result<()> {
    fs::create_dir_all(root)
        .with_context(|| format!("cannot create directory {}", root.display()))?;
    if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
        atomic::sync_dir(parent)?;
    }
    // Backups of several VMs may create the same repository at once: one creates
    // it under an exclusive lock on the directory, the others then find it made.
    let dir = fs::File::open(root)
        .with_context(|| format!("cannot open directory {}", root.display()))?;
    rustix::fs::flock(&dir, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("cannot lock directory {}", root.display()))?;
    if root.join(CONFIG_FILE).exists() {
        return Ok(());
    }
    for name in list_dir_names_any(root)? {
        if !ALLOWED_IN_NEW_ROOT.contains(&name.as_str()) && !atomic::is_tmp_name(&name) {
            bail!(
                "{} is not empty and is not a vmbackup repository (found '{name}')",
                root.display()
            );
        }
    }
    for dir in [CHUNKS_DIR, VMS_DIR] {
        let path = root.join(dir);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create directory {}", path.display()))
            }
        }
    }
    atomic::sync_dir(root)?;
    let config = RepoConfig::current().to_toml()?;
    atomic::write_file(&root.join(CONFIG_FILE), config.as_bytes())
}

/// Create `base/<relative>` level by level, fsyncing each parent of a new directory.
fn create_dirs_durably(base: &Path, relative: &str) -> Result<()> {
    let mut dir = base.to_path_buf();
    for part in relative.split('/') {
        let parent = dir.clone();
        dir.push(part);
        match fs::create_dir(&dir) {
            Ok(()) => atomic::sync_dir(&parent)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create directory {}", dir.display()))
            }
        }
    }
    Ok(())
}

/// Names of the subdirectories of `dir` (none if `dir` does not exist), skipping
/// staging and hidden entries.
fn list_dir_names(dir: &Path) -> Result<Vec<String>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let is_dir = entry
            .file_type()
            .with_context(|| format!("cannot stat {}", entry.path().display()))?
            .is_dir();
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if is_dir && !name.starts_with('.') && !is_tmp_name(&name) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Names of every entry of `dir`.
fn list_dir_names_any(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// Subdirectories of a VM directory named like point ids, sorted (= oldest first).
fn point_dir_names(vm_dir: &Path) -> Result<Vec<String>> {
    Ok(list_dir_names(vm_dir)?
        .into_iter()
        .filter(|name| parse_point_id(name).is_ok())
        .collect())
}
