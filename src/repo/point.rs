//! Writing one point: indexes first, then chunk directory fsyncs, manifest last.
//!
//! A [`PointWriter`] owns a fresh point directory. Dropping it without
//! [`PointWriter::commit`] removes the directory (best effort); a crash leaves it
//! without a manifest, where listing ignores it and cleanup removes it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::atomic;
use super::chunk_store::ChunkStore;
use super::index::DiskIndex;
use super::manifest::{Manifest, PointStatus};
use super::names::{index_file_name, vm_key};
use super::MANIFEST_FILE;

/// An uncommitted point being written.
#[derive(Debug)]
pub struct PointWriter {
    vm_key: String,
    point: String,
    dir: PathBuf,
    vm_dir: PathBuf,
    chunks: Arc<ChunkStore>,
    /// Disks whose index has been written, with its disk size and chunk size.
    disks: BTreeMap<String, (u64, u32)>,
    /// Set once committed or aborted: Drop then leaves the directory alone.
    done: bool,
}

impl PointWriter {
    pub(crate) fn new(
        vm_key: &str,
        point: &str,
        vm_dir: PathBuf,
        chunks: Arc<ChunkStore>,
    ) -> PointWriter {
        PointWriter {
            vm_key: vm_key.to_string(),
            point: point.to_string(),
            dir: vm_dir.join(point),
            vm_dir,
            chunks,
            disks: BTreeMap::new(),
            done: false,
        }
    }

    /// The point directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The point id.
    pub fn point(&self) -> &str {
        &self.point
    }

    /// Write the complete index of `disk` (atomically and durably).
    pub fn write_index(&mut self, disk: &str, index: &DiskIndex) -> Result<()> {
        let path = self.dir.join(index_file_name(disk));
        let bytes = index
            .encode()
            .with_context(|| format!("cannot write index of disk '{disk}'"))?;
        atomic::write_file(&path, &bytes)
            .with_context(|| format!("cannot write index of disk '{disk}'"))?;
        self.disks
            .insert(disk.to_string(), (index.disk_size, index.chunk_size));
        Ok(())
    }

    /// Publish the point: check `manifest` against what was written and against
    /// the repository (its base and full must still exist), make every chunk
    /// name durable, then rename the manifest in. Only then does the point exist.
    pub fn commit(mut self, manifest: &Manifest) -> Result<()> {
        self.check_manifest(manifest)
            .with_context(|| format!("refusing to commit point {}", self.point))?;
        self.chunks
            .sync_dirs()
            .with_context(|| format!("cannot commit point {}", self.point))?;
        let bytes = manifest.to_json()?;
        atomic::write_file(&self.dir.join(MANIFEST_FILE), &bytes)
            .with_context(|| format!("cannot commit point {}", self.point))?;
        self.done = true;
        Ok(())
    }

    /// Give the point up and remove its directory.
    pub fn abort(mut self) -> Result<()> {
        self.done = true;
        fs::remove_dir_all(&self.dir)
            .with_context(|| format!("cannot remove aborted point {}", self.dir.display()))?;
        atomic::sync_dir(&self.vm_dir)
    }

    fn check_manifest(&self, manifest: &Manifest) -> Result<()> {
        manifest.check()?;
        if manifest.point != self.point {
            bail!("manifest names point {}", manifest.point);
        }
        let key = vm_key(&manifest.vm.platform, &manifest.vm.name);
        if key != self.vm_key {
            bail!(
                "manifest is for VM '{key}', the writer for '{}'",
                self.vm_key
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
            if !self.vm_dir.join(dep).join(MANIFEST_FILE).is_file() {
                bail!("base point {dep} was removed during the backup; chunks might be missing");
            }
        }
        Ok(())
    }
}

impl Drop for PointWriter {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: cleanup removes what is left (it has no manifest).
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
