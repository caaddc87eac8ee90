//! The repository on a backup target: content-addressed chunks, one complete
//! index per disk per point, and a manifest that commits each point, all kept
//! as objects of a [`Store`] (module `store`: the trait, and `LocalStore` for
//! a directory).
//!
//! docs/FORMAT.md specifies every object byte by byte and how each store
//! operation maps to a directory and to S3; this module implements it. Nothing
//! here (or above) touches files: a repository is a key prefix in a store.
//!
//! # Glossary
//!
//! - **chunk**: the bytes of one slot of a disk, stored once under its BLAKE3
//!   digest as `chunks/ab/cd/<hex>` (modules `chunk`, `chunk_store`).
//! - **slot**: a chunk-sized range of a disk; all zeros (not stored) or a chunk.
//! - **index**: a disk's slots at one point, `<disk>.idx` (module `index`).
//! - **point**: one backup of one VM, `vms/<vm-key>/<point-id>/`, committed by its
//!   `manifest.json` (modules `manifest`, `point`).
//! - **vm key**: `<platform>/<vm>`, encoded to be path-safe (module `names`).
//!
//! # Write order (what makes a crash harmless)
//!
//! chunks (deferred puts) → indexes → flush (every chunk durable) → lock check →
//! `manifest.json`. Readers go the other way: manifest, then indexes, then
//! chunks. A crash leaves at most a point without a manifest (ignored by
//! listing, removed by cleanup) and chunks nothing refers to (removed by GC).
//! Removing a point goes the other way too: manifest first.
//!
//! # Locking (module `lock`: lock objects in the store)
//!
//! | operation          | takes                                     |
//! |--------------------|-------------------------------------------|
//! | backup of VM x     | repository shared + VM x                  |
//! | cleanup of VM x    | repository shared + VM x                  |
//! | prune / forget of x| repository shared + VM x                  |
//! | verify             | repository shared                         |
//! | GC                 | repository exclusive                      |
//! | restore            | nothing: its points are protected by its task row (prune never removes them) and GC keeps every referenced object |
//!
//! All locks are non-blocking: a held lock is a busy error (exit 4); callers
//! that must wait (a backup meeting a GC) retry.

mod chunk;
mod chunk_store;
mod codec;
pub mod copy;
pub mod crypto;
mod delta;
mod format;
pub mod gc;
mod index;
mod lock;
mod manifest;
mod names;
mod point;
pub mod store;
pub mod target;
mod verify;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

pub use chunk::{decode_chunk, digest_hex, digest_of, parse_digest_hex, Digest};
pub use chunk_store::{digest_of_key, object_key, ChunkError, ChunkStore, Inserted};
pub use codec::Compression;
pub use crypto::{KeySource, Naming};
pub use delta::{decode_delta, Delta, Patch};
pub use format::{
    check_chunk_size, RepoConfig, CONFIG_FILE, FORMAT_VERSION, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};
pub use index::{DiskIndex, Slot, INDEX_ENTRY_LEN, INDEX_HEADER_LEN};
pub use lock::{live_locks, LockInfo, LockMode, RepoLock, VmLock};
pub use manifest::{Manifest, ManifestDisk, ManifestTotals, ManifestVm, PointStatus};
pub use names::{check_vm_key, encode_name, index_file_name, new_point_id, parse_point_id, vm_key};
pub use point::PointWriter;
pub use store::{sync_dir, LocalStore, ObjectInfo, Store, TargetSpec};
pub use verify::{Problem, ProblemKind, VerifyReport};

/// A valid full point's manifest (one disk `vda`), for unit tests anywhere.
#[cfg(test)]
pub(crate) use manifest::tests::sample as sample_manifest;

/// The manifest file name inside a point.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The key prefix of all VMs' points.
const VMS_PREFIX: &str = "vms/";
/// Staging leftovers older than this belong to killed writers.
pub const STAGING_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// An open repository. Cheap to clone; clones share the chunk store.
#[derive(Debug, Clone)]
pub struct Repository {
    /// The store, seen from the repository's prefix (decrypting, when encrypted).
    store: Arc<dyn Store>,
    /// The same objects as stored (key slots and config are read here).
    raw: Arc<dyn Store>,
    /// The master key's id of an encrypted repository.
    key_id: Option<String>,
    chunks: Arc<ChunkStore>,
    location: String,
}

/// A point whose manifest or an index cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedPoint {
    pub point: String,
    pub reason: String,
}

/// A VM's points: the good ones (oldest first) and the damaged ones.
#[derive(Debug, Clone, Default)]
pub struct PointList {
    pub points: Vec<Manifest>,
    pub damaged: Vec<DamagedPoint>,
}

impl PointList {
    /// Every point id, good or damaged, oldest first.
    pub fn all_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .points
            .iter()
            .map(|m| m.point.clone())
            .chain(self.damaged.iter().map(|d| d.point.clone()))
            .collect();
        ids.sort();
        ids
    }

    /// The damage of point `id`, if it is damaged.
    pub fn damage_of(&self, id: &str) -> Option<&DamagedPoint> {
        self.damaged.iter().find(|d| d.point == id)
    }
}

/// What a listing of one VM's keys says about each point id.
#[derive(Debug, Default)]
struct PointObjects {
    manifest: bool,
    /// Index object name → size.
    indexes: BTreeMap<String, u64>,
}

impl Repository {
    /// Open the existing repository at `path` of the target `spec`.
    pub fn open(spec: &TargetSpec, path: &str) -> Result<Repository> {
        Repository::open_in(spec.open()?, path)
    }

    /// Open the existing unencrypted repository under `path` of `store`
    /// (`""`: the whole store).
    pub fn open_in(store: Arc<dyn Store>, path: &str) -> Result<Repository> {
        Repository::open_keyed(store, path, None)
    }

    /// Open the existing repository under `path` of `store`, with `key` when
    /// the target is encrypted. An encrypted repository needs the key; a
    /// target that requires encryption refuses an unencrypted repository
    /// (it would otherwise take new backups in clear).
    pub fn open_keyed(
        store: Arc<dyn Store>,
        path: &str,
        key: Option<&KeySource>,
    ) -> Result<Repository> {
        let raw: Arc<dyn Store> = Arc::new(store::Prefixed::new(store, path)?);
        let location = raw.location();
        let Some(text) = raw.get(CONFIG_FILE)? else {
            bail!("{location} is not a vmbackup repository (no {CONFIG_FILE})");
        };
        let text =
            String::from_utf8(text).map_err(|_| anyhow!("{location}/{CONFIG_FILE} is not text"))?;
        let config = RepoConfig::parse(&text, &format!("{location}/{CONFIG_FILE}"))?;
        let (store, naming) = match (&config.key_id, key) {
            (None, None) => (raw.clone(), Naming::Plain),
            (Some(id), Some(key)) => {
                let master = Arc::new(crypto::unlock(raw.as_ref(), key, id)?);
                let naming = Naming::Keyed(master.name_key());
                let sealed: Arc<dyn Store> = Arc::new(crypto::Sealed::new(raw.clone(), master));
                (sealed, naming)
            }
            (Some(_), None) => bail!(
                "repository {location} is encrypted: register its target with --encrypt and the key (--key-file or --passphrase-file)"
            ),
            (None, Some(_)) => bail!(
                "repository {location} is not encrypted, but its target requires encryption; refusing to read or write it in clear"
            ),
        };
        Ok(Repository {
            chunks: Arc::new(ChunkStore::with_naming(store.clone(), raw.clone(), naming)),
            store,
            raw,
            key_id: config.key_id,
            location,
        })
    }

    /// True when a repository exists under `path` of `store`.
    pub fn exists_in(store: Arc<dyn Store>, path: &str) -> Result<bool> {
        store::Prefixed::new(store, path)?.exists(CONFIG_FILE)
    }

    /// Create the repository under `path` of `store` (or open it, when another
    /// process created it meanwhile). A prefix holding anything else is refused.
    pub fn create_in(store: Arc<dyn Store>, path: &str) -> Result<Repository> {
        Repository::create_keyed(store, path, None)
    }

    /// [`Repository::create_in`], encrypted with a new master key wrapped in a
    /// key slot for `key` when given (docs/FORMAT.md, "Encryption").
    pub fn create_keyed(
        store: Arc<dyn Store>,
        path: &str,
        key: Option<&KeySource>,
    ) -> Result<Repository> {
        let view = store::Prefixed::new(store.clone(), path)?;
        let location = view.location();
        if !view.exists(CONFIG_FILE)? {
            refuse_foreign_objects(&view)?;
            // The key slot before the config: a config always has its slot.
            // Two creators racing each write a slot; the config that wins
            // names its master key, and the other slot opens nothing of it.
            let config = match key {
                None => RepoConfig::current(),
                Some(key) => RepoConfig::encrypted(crypto::create_master(&view, key)?.id()),
            }
            .to_toml()?;
            // Several backups may create the same repository at once: the
            // config is the one object that makes it, and only one is written.
            view.put_if_absent(CONFIG_FILE, config.as_bytes())
                .with_context(|| format!("cannot create repository {location}"))?;
        }
        Repository::open_keyed(store, path, key)
    }

    /// Make `path` of `store` a copy of this repository, or open it when it is
    /// one already: the config and key slots are copied as they are, so the
    /// copy has the same master key and object names, and `key` (the
    /// destination target's) must open it. Anything else there is refused.
    pub fn create_copy(
        &self,
        store: Arc<dyn Store>,
        path: &str,
        key: Option<&KeySource>,
    ) -> Result<Repository> {
        match (&self.key_id, key) {
            (None, None) => {}
            (Some(id), Some(key)) => {
                crypto::unlock(self.raw.as_ref(), key, id).with_context(|| {
                    format!("the destination's {key} cannot open repository {}", self.location)
                })?;
            }
            (Some(_), None) => bail!(
                "repository {} is encrypted: its copy goes to a target registered with --encrypt and a key that opens it",
                self.location
            ),
            (None, Some(_)) => bail!(
                "repository {} is not encrypted, and the destination target requires encryption",
                self.location
            ),
        }
        let view = store::Prefixed::new(store.clone(), path)?;
        let location = view.location();
        if !view.exists(CONFIG_FILE)? {
            refuse_foreign_objects(&view)?;
            for slot in self.key_slots()? {
                view.put_if_absent(&slot.key(), &serde_json::to_vec_pretty(&slot)?)?;
            }
            let config = self
                .raw
                .get(CONFIG_FILE)?
                .with_context(|| format!("{} lost its {CONFIG_FILE}", self.location))?;
            view.put_if_absent(CONFIG_FILE, &config)
                .with_context(|| format!("cannot create repository {location}"))?;
        }
        let copy = Repository::open_keyed(store, path, key)?;
        if copy.key_id != self.key_id {
            bail!(
                "{location} is another repository (key id {}, not {}): it cannot hold a copy of {}",
                copy.key_id.as_deref().unwrap_or("none"),
                self.key_id.as_deref().unwrap_or("none"),
                self.location
            );
        }
        Ok(copy)
    }

    /// True when the repository is encrypted.
    pub fn encrypted(&self) -> bool {
        self.key_id.is_some()
    }

    /// The key slots of an encrypted repository (none otherwise).
    pub fn key_slots(&self) -> Result<Vec<crypto::KeySlot>> {
        crypto::read_slots(self.raw.as_ref())
    }

    /// Add a key slot for `new`, unwrapping the master key with `current`.
    pub fn add_key_slot(&self, current: &KeySource, new: &KeySource) -> Result<String> {
        let Some(id) = &self.key_id else {
            bail!("repository {} is not encrypted", self.location);
        };
        crypto::add_slot(self.raw.as_ref(), current, id, new)
    }

    /// Remove key slot `slot`; never the last one, nor one `current` opens
    /// (the key this host uses would stop working).
    pub fn remove_key_slot(&self, current: &KeySource, slot: &str) -> Result<bool> {
        let slots = self.key_slots()?;
        let Some(found) = slots.iter().find(|s| s.id == slot) else {
            return Ok(false);
        };
        if slots.len() == 1 {
            return Err(crate::error::refused(format!(
                "key slot {slot} is the last of repository {}: removing it would make every backup there unreadable",
                self.location
            )));
        }
        if found.opens(current)? {
            return Err(crate::error::refused(format!(
                "key slot {slot} of repository {} is the one the target's registered {current} opens; register another key first",
                self.location
            )));
        }
        self.raw.delete(&found.key())?;
        self.raw.flush()?;
        Ok(true)
    }

    /// Where the repository is, for messages (`/mnt/backup/web`).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// This repository with new chunk and delta objects encoded with
    /// `compression` (system.conf `compression`; objects already stored, in
    /// either form, are read as before).
    pub fn with_compression(mut self, compression: Compression) -> Repository {
        self.chunks = Arc::new(self.chunks.with_compression(compression));
        self
    }

    /// The chunk store (shared by all VMs).
    pub fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    /// The repository's store (keys relative to the repository).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Take the repository lock shared (backup, prune, verify). Busy error
    /// (exit 4) while a GC holds it exclusively.
    pub fn lock_shared(&self, purpose: &str) -> Result<RepoLock> {
        RepoLock::acquire(&self.store, LockMode::Shared, purpose)
    }

    /// Take the repository lock exclusively (GC). Busy error while anyone
    /// holds any lock.
    pub fn lock_exclusive(&self, purpose: &str) -> Result<RepoLock> {
        RepoLock::acquire(&self.store, LockMode::Exclusive, purpose)
    }

    /// Take the lock of one VM's points under a repository lock. Busy error
    /// (exit 4) when another process holds it.
    pub fn lock_vm(&self, repo: &RepoLock, vm_key: &str, purpose: &str) -> Result<VmLock> {
        check_vm_key(vm_key)?;
        self.check_lock(repo.location(), vm_key)?;
        VmLock::acquire(&self.store, repo, vm_key, purpose)
    }

    /// The keys of all VMs with at least one point (good or damaged), sorted.
    pub fn list_vms(&self) -> Result<Vec<String>> {
        let mut keys = std::collections::BTreeSet::new();
        self.store.list(VMS_PREFIX, &mut |info| {
            let rest = &info.key[VMS_PREFIX.len()..];
            let parts: Vec<&str> = rest.split('/').collect();
            if let [platform, vm, point, MANIFEST_FILE] = parts[..] {
                let key = format!("{platform}/{vm}");
                if check_vm_key(&key).is_ok() && parse_point_id(point).is_ok() {
                    keys.insert(key);
                }
            }
            Ok(())
        })?;
        Ok(keys.into_iter().collect())
    }

    /// A VM's points, oldest first: good ones with their manifests, damaged
    /// ones (manifest unreadable, an index missing or of the wrong size) with
    /// the reason. Points without a manifest are not points (crash leftovers).
    pub fn list_points(&self, vm_key: &str) -> Result<PointList> {
        let mut list = PointList::default();
        for (point, objects) in self.point_objects(vm_key)? {
            if !objects.manifest {
                continue;
            }
            let checked = self
                .load_manifest(vm_key, &point)
                .and_then(|m| check_index_objects(&m, &objects).map(|()| m));
            match checked {
                Ok(m) => list.points.push(m),
                Err(e) => list.damaged.push(DamagedPoint {
                    point,
                    reason: format!("{e:#}"),
                }),
            }
        }
        Ok(list)
    }

    /// Load one committed point's manifest; it must agree with where it lies.
    pub fn load_manifest(&self, vm_key: &str, point: &str) -> Result<Manifest> {
        parse_point_id(point)?;
        let key = manifest_key(vm_key, point);
        let Some(bytes) = self.store.get(&key)? else {
            bail!("point {point} of VM '{vm_key}' does not exist (or is incomplete)");
        };
        let text =
            String::from_utf8(bytes).map_err(|_| anyhow!("manifest {key} is not UTF-8 text"))?;
        let manifest = Manifest::parse(&text, Path::new(&key))?;
        let found = names::vm_key(&manifest.vm.platform, &manifest.vm.name);
        if manifest.point != point || found != vm_key {
            bail!(
                "manifest {key} describes point {} of VM '{found}': it is misplaced",
                manifest.point
            );
        }
        manifest
            .check()
            .with_context(|| format!("manifest {key} is inconsistent"))?;
        Ok(manifest)
    }

    /// Load the index of `disk` at a point.
    pub fn load_index(&self, vm_key: &str, point: &str, disk: &str) -> Result<DiskIndex> {
        parse_point_id(point)?;
        let key = format!("{}{}", point_prefix(vm_key, point), index_file_name(disk));
        let bytes = self
            .store
            .get(&key)
            .with_context(|| format!("cannot read index of disk '{disk}' at point {point}"))?
            .with_context(|| {
                format!("index of disk '{disk}' at point {point} ({key}) is missing")
            })?;
        format::check_magic(&bytes, &format::INDEX_MAGIC, Path::new(&key))?;
        DiskIndex::decode(&bytes)
            .with_context(|| format!("index of disk '{disk}' at point {point} ({key}) is damaged"))
    }

    /// Start writing a new point of the locked VM. The point id must be new.
    pub fn begin_point<'a>(&self, lock: &'a VmLock, point: &str) -> Result<PointWriter<'a>> {
        self.check_lock(lock.location(), lock.vm_key())?;
        parse_point_id(point)?;
        let prefix = point_prefix(lock.vm_key(), point);
        if let Some(found) = first_key(self.store.as_ref(), &prefix)? {
            bail!(
                "cannot create point {point} of VM '{}': it exists already ({found})",
                lock.vm_key()
            );
        }
        Ok(PointWriter::new(
            lock,
            point,
            self.store.clone(),
            Arc::clone(&self.chunks),
        ))
    }

    /// Ids of a VM's points without a manifest: crash leftovers.
    pub fn incomplete_points(&self, vm_key: &str) -> Result<Vec<String>> {
        Ok(self
            .point_objects(vm_key)?
            .into_iter()
            .filter(|(_, o)| !o.manifest)
            .map(|(id, _)| id)
            .collect())
    }

    /// Remove the locked VM's incomplete points; returns their ids.
    pub fn remove_incomplete_points(&self, lock: &VmLock) -> Result<Vec<String>> {
        self.check_lock(lock.location(), lock.vm_key())?;
        let ids = self.incomplete_points(lock.vm_key())?;
        for id in &ids {
            delete_prefix(self.store.as_ref(), &point_prefix(lock.vm_key(), id))
                .with_context(|| format!("cannot remove incomplete point {id}"))?;
        }
        Ok(ids)
    }

    /// Remove a point of the locked VM (good or damaged): its manifest first,
    /// so the point stops existing at once, then its indexes. Its chunks stay
    /// until GC finds no other point refers to them.
    pub fn remove_point(&self, lock: &VmLock, point: &str) -> Result<()> {
        self.check_lock(lock.location(), lock.vm_key())?;
        parse_point_id(point)?;
        lock.check()?;
        let key = manifest_key(lock.vm_key(), point);
        self.store
            .delete(&key)
            .and_then(|()| self.store.flush())
            .and_then(|()| delete_prefix(self.store.as_ref(), &point_prefix(lock.vm_key(), point)))
            .with_context(|| format!("cannot remove point {point} of VM '{}'", lock.vm_key()))
    }

    /// Read and re-hash every chunk a point refers to (corrupt ones are
    /// quarantined). `quarantined`: [`ChunkStore::quarantined`], read once.
    /// A manifest or index that cannot be read makes the point damaged (in the
    /// report); an object that cannot be read (I/O) is an error.
    pub fn verify_point(
        &self,
        vm_key: &str,
        point: &str,
        quarantined: &HashSet<Digest>,
    ) -> Result<VerifyReport> {
        let loaded = self.load_manifest(vm_key, point).and_then(|manifest| {
            let indexes = manifest
                .disks
                .iter()
                .map(|disk| self.load_index(vm_key, point, &disk.name))
                .collect::<Result<Vec<_>>>()?;
            Ok((manifest, indexes))
        });
        let (manifest, indexes) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                return Ok(VerifyReport {
                    damaged: Some(format!("{e:#}")),
                    ..VerifyReport::default()
                })
            }
        };
        verify::verify_indexes(&self.chunks, &manifest, &indexes, quarantined)
            .with_context(|| format!("cannot verify point {point} of VM '{vm_key}'"))
    }

    /// Remove staging leftovers of killed writers at least [`STAGING_MAX_AGE`]
    /// old (a live writer publishes its staged objects within seconds; removing
    /// a live one could only fail that writer, never corrupt the repository).
    pub fn remove_stale_partials(&self) -> Result<Vec<String>> {
        self.store.remove_stale_partials("", STAGING_MAX_AGE)
    }

    /// Delete every object of the repository (its config last). Needs the
    /// repository locked exclusively; the lock itself goes when it is dropped.
    pub fn destroy(&self, lock: &RepoLock) -> Result<u64> {
        self.check_lock(lock.location(), "")?;
        if lock.mode() != LockMode::Exclusive {
            bail!(
                "removing repository {} needs its exclusive lock",
                self.location
            );
        }
        lock.check()?;
        let mut keys = Vec::new();
        self.store.list("", &mut |info| {
            if info.key != CONFIG_FILE && !info.key.starts_with(lock::LOCKS_PREFIX) {
                keys.push(info.key);
            }
            Ok(())
        })?;
        for key in &keys {
            self.store.delete(key)?;
        }
        self.store.flush()?;
        self.store.delete(CONFIG_FILE)?;
        self.store.flush()?;
        Ok(keys.len() as u64 + 1)
    }

    fn point_objects(&self, vm_key: &str) -> Result<BTreeMap<String, PointObjects>> {
        check_vm_key(vm_key)?;
        let prefix = format!("{VMS_PREFIX}{vm_key}/");
        let mut points: BTreeMap<String, PointObjects> = BTreeMap::new();
        self.store.list(&prefix, &mut |info| {
            let rest = &info.key[prefix.len()..];
            if let Some((point, name)) = rest.split_once('/') {
                if parse_point_id(point).is_ok() && !name.contains('/') {
                    let entry = points.entry(point.to_string()).or_default();
                    if name == MANIFEST_FILE {
                        entry.manifest = true;
                    } else {
                        entry.indexes.insert(name.to_string(), info.size);
                    }
                }
            }
            Ok(())
        })?;
        Ok(points)
    }

    /// Replace the manifest of a committed point of the locked VM with `manifest`
    /// (same VM, same point): `cleanup --redact`. Atomic: readers see the old or
    /// the new manifest.
    pub fn rewrite_manifest(&self, lock: &VmLock, manifest: &Manifest) -> Result<()> {
        self.check_lock(lock.location(), lock.vm_key())?;
        let key = manifest_key(lock.vm_key(), &manifest.point);
        let found = names::vm_key(&manifest.vm.platform, &manifest.vm.name);
        if found != lock.vm_key() || !self.store.exists(&key)? {
            bail!(
                "point {} of VM '{}' has no manifest to rewrite",
                manifest.point,
                lock.vm_key()
            );
        }
        manifest.check()?;
        self.store.put(&key, &manifest.to_json()?)
    }

    fn check_lock(&self, location: &str, what: &str) -> Result<()> {
        if location != self.location {
            bail!(
                "the lock of '{what}' belongs to repository {location}, not {}",
                self.location
            );
        }
        Ok(())
    }
}

/// Every index a manifest lists must exist with the size its geometry gives.
fn check_index_objects(m: &Manifest, objects: &PointObjects) -> Result<()> {
    for disk in &m.disks {
        let Some(&size) = objects.indexes.get(&disk.index) else {
            bail!("index of disk '{}' ({}) is missing", disk.name, disk.index);
        };
        if disk.chunk_size == 0 {
            bail!("disk '{}' has chunk size 0", disk.name);
        }
        let slots = disk.size.div_ceil(u64::from(disk.chunk_size));
        let expected = INDEX_HEADER_LEN as u64 + INDEX_ENTRY_LEN as u64 * slots;
        if size != expected {
            bail!(
                "index of disk '{}' is {size} bytes, its geometry needs {expected} (torn or damaged)",
                disk.name
            );
        }
    }
    Ok(())
}

/// `vms/<vm-key>/<point>/`.
fn point_prefix(vm_key: &str, point: &str) -> String {
    format!("{VMS_PREFIX}{vm_key}/{point}/")
}

/// `vms/<vm-key>/<point>/manifest.json`.
fn manifest_key(vm_key: &str, point: &str) -> String {
    format!("{}{MANIFEST_FILE}", point_prefix(vm_key, point))
}

/// The first key under `prefix`, if any (the listing stops there).
/// A repository is created only under a prefix that holds nothing but, at
/// most, the config and key slots (of a creator racing this one).
fn refuse_foreign_objects(view: &dyn Store) -> Result<()> {
    if let Some(found) = first_key(view, "")? {
        if found != CONFIG_FILE && !found.starts_with(crypto::KEYS_PREFIX) {
            bail!(
                "{} is not empty and is not a vmbackup repository (found '{found}')",
                view.location()
            );
        }
    }
    Ok(())
}

fn first_key(store: &dyn Store, prefix: &str) -> Result<Option<String>> {
    const FOUND: &str = "first key found";
    let mut found = None;
    let listed = store.list(prefix, &mut |info| {
        found = Some(info.key);
        Err(anyhow!(FOUND))
    });
    match listed {
        Err(e) if found.is_some() && e.to_string() == FOUND => Ok(found),
        other => other.map(|()| None),
    }
}

/// Delete every object under `prefix`, then flush.
fn delete_prefix(store: &dyn Store, prefix: &str) -> Result<()> {
    let mut keys = Vec::new();
    store.list(prefix, &mut |info| {
        keys.push(info.key);
        Ok(())
    })?;
    for key in keys {
        store.delete(&key)?;
    }
    store.flush()
}
