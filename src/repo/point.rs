//! Writing one point: indexes first, then a flush of every chunk it relies on,
//! manifest last.
//!
//! A [`PointWriter`] owns a fresh point (`vms/<vm-key>/<point-id>/`). Dropping it
//! without [`PointWriter::commit`] deletes what it wrote (best effort); a crash
//! leaves objects without a manifest, which listing ignores and cleanup removes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::chunk_store::ChunkStore;
use super::index::DiskIndex;
use super::manifest::{Manifest, PointStatus};
use super::names::{index_file_name, vm_key};
use super::store::Store;
use super::{delete_prefix, manifest_key, point_prefix, VmLock};

/// An uncommitted point being written.
#[derive(Debug)]
pub struct PointWriter<'a> {
    lock: &'a VmLock,
    point: String,
    store: Arc<dyn Store>,
    chunks: Arc<ChunkStore>,
    /// Disks whose index has been written, with its disk size and chunk size.
    disks: BTreeMap<String, (u64, u32)>,
    /// Set once committed or aborted: Drop then leaves the objects alone.
    done: bool,
}

impl<'a> PointWriter<'a> {
    pub(crate) fn new(
        lock: &'a VmLock,
        point: &str,
        store: Arc<dyn Store>,
        chunks: Arc<ChunkStore>,
    ) -> PointWriter<'a> {
        PointWriter {
            lock,
            point: point.to_string(),
            store,
            chunks,
            disks: BTreeMap::new(),
            done: false,
        }
    }

    /// The point id.
    pub fn point(&self) -> &str {
        &self.point
    }

    fn vm_key(&self) -> &str {
        self.lock.vm_key()
    }

    /// Write the complete index of `disk` (atomically and durably).
    pub fn write_index(&mut self, disk: &str, index: &DiskIndex) -> Result<()> {
        let key = format!(
            "{}{}",
            point_prefix(self.vm_key(), &self.point),
            index_file_name(disk)
        );
        let bytes = index
            .encode()
            .with_context(|| format!("cannot write index of disk '{disk}'"))?;
        self.store
            .put(&key, &bytes)
            .with_context(|| format!("cannot write index of disk '{disk}'"))?;
        self.disks
            .insert(disk.to_string(), (index.disk_size, index.chunk_size));
        Ok(())
    }

    /// Publish the point: check `manifest` against what was written and against
    /// the repository (its base and full must still exist), make every chunk
    /// name durable, check the locks are still ours, then write the manifest.
    /// Only then does the point exist.
    pub fn commit(mut self, manifest: &Manifest) -> Result<()> {
        self.check_manifest(manifest)
            .with_context(|| format!("refusing to commit point {}", self.point))?;
        self.chunks
            .flush()
            .with_context(|| format!("cannot commit point {}", self.point))?;
        self.lock
            .check()
            .with_context(|| format!("cannot commit point {}", self.point))?;
        let bytes = manifest.to_json()?;
        let key = manifest_key(self.vm_key(), &self.point);
        if !self
            .store
            .put_if_absent(&key, &bytes)
            .with_context(|| format!("cannot commit point {}", self.point))?
        {
            bail!("cannot commit point {}: it exists already", self.point);
        }
        self.done = true;
        Ok(())
    }

    /// Give the point up and delete what was written.
    pub fn abort(mut self) -> Result<()> {
        self.done = true;
        delete_prefix(
            self.store.as_ref(),
            &point_prefix(self.vm_key(), &self.point),
        )
        .with_context(|| format!("cannot remove aborted point {}", self.point))
    }

    fn check_manifest(&self, manifest: &Manifest) -> Result<()> {
        manifest.check()?;
        if manifest.point != self.point {
            bail!("manifest names point {}", manifest.point);
        }
        let key = vm_key(&manifest.vm.platform, &manifest.vm.name);
        if key != self.vm_key() {
            bail!(
                "manifest is for VM '{key}', the writer for '{}'",
                self.vm_key()
            );
        }
        if manifest.status != PointStatus::Completed {
            bail!("manifest status is not completed");
        }
        let listed: BTreeSet<&String> = manifest.disks.iter().map(|d| &d.name).collect();
        let written: BTreeSet<&String> = self.disks.keys().collect();
        if listed != written {
            bail!("manifest lists disks {listed:?}, indexes were written for {written:?}");
        }
        for disk in &manifest.disks {
            if self.disks.get(&disk.name) != Some(&(disk.size, disk.chunk_size)) {
                bail!(
                    "disk '{}': manifest size/chunk size differ from its index",
                    disk.name
                );
            }
        }
        for dep in [&manifest.base, &manifest.full].into_iter().flatten() {
            if !self.store.exists(&manifest_key(self.vm_key(), dep))? {
                bail!("base point {dep} was removed during the backup; chunks might be missing");
            }
        }
        Ok(())
    }
}

impl Drop for PointWriter<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: cleanup removes what is left (it has no manifest).
            let _ = delete_prefix(
                self.store.as_ref(),
                &point_prefix(self.vm_key(), &self.point),
            );
        }
    }
}
