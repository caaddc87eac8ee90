//! Restore a point to image files, one per disk.
//!
//! Every slot is read through a [`PointReader`] (the read path recovery serves
//! over NBD too), which verifies each chunk's digest, so a corrupt or missing
//! chunk fails the restore loudly, naming disk, slot and digest (no silently
//! wrong image). Raw output is sparse: zero slots and all-zero 4 KiB
//! blocks inside chunks are not written; and written with direct I/O where the
//! file system allows (`image_writer.rs`). A qcow2 image is converted from that raw
//! file with `qemu-img convert`. Chunks are fetched and decompressed by several
//! threads at once (PBS found restores bound by serial chunk fetches).
//!
//! Writing is safe in a destination others can write to (vmbackup runs as root):
//! images are made in a private staging directory and moved out with
//! `RENAME_NOREPLACE` (`staging.rs`), mode 0600 unless the request says otherwise;
//! on failure nothing is left behind, and what a killed restore leaves is found
//! through the staging path recorded with its task.

mod image_writer;
pub mod point_reader;
mod staging;

pub use point_reader::{PointReader, PointStore, Span, DEFAULT_CACHE_BYTES};
pub use staging::remove_stale as remove_stale_staging;

use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde::Serialize;

use self::image_writer::{ImageWriter, WriteMode};
use crate::error::{invalid, Error};
use crate::repo::{encode_name, Manifest, PointList, Repository, Slot};
use crate::task::progress::Progress;

/// Output image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The format's name (and file extension): `raw`, `qcow2`.
    pub fn ext(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// What to restore and where.
pub struct RestoreRequest<'a> {
    pub repo: &'a Repository,
    pub vm_key: &'a str,
    /// The point to restore (see [`select_point`]).
    pub point: &'a Manifest,
    pub dest: &'a Path,
    pub format: ImageFormat,
    pub force: bool,
    /// Mode of the image files ([`DEFAULT_MODE`] unless asked otherwise).
    pub mode: u32,
    /// Threads fetching chunks.
    pub workers: usize,
    /// Told the private staging directory as soon as it exists, before anything
    /// is written into it (the runner records it with the task, so what a killed
    /// restore leaves can be found).
    pub on_staging: &'a (dyn Fn(&Path) -> Result<()> + Sync),
}

/// Mode of restored images unless the request says otherwise: a disk holds
/// everything the VM holds (keys, password hashes).
pub const DEFAULT_MODE: u32 = 0o600;

/// One restored disk.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredDisk {
    pub disk: String,
    pub path: PathBuf,
    pub size: u64,
    /// Bytes of chunk data written (zeros excluded).
    pub bytes_written: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub point: String,
    pub disks: Vec<RestoredDisk>,
    /// The VM made on the restored images (`restore --as-vm`), else null:
    /// libvirt's new domain, or the VM of a qemu launch script (its identity is
    /// its QMP socket).
    pub new_vm: Option<crate::platform::DefinedVm>,
    /// `--as-vm` on a qemu platform: the launch script written beside the disks.
    pub launch_script: Option<PathBuf>,
    /// `--in-place`: the disks were written back into the VM's own images.
    pub in_place: bool,
}

/// Pick a point: `None` → the newest good point; otherwise that id, an error
/// when it is damaged, or a validation error listing the ids.
pub fn select_point(repo: &Repository, vm_key: &str, point: Option<&str>) -> Result<Manifest> {
    let list = repo.list_points(vm_key)?;
    match point {
        None => {
            list.points.into_iter().last().ok_or_else(|| {
                crate::error::refused(format!("VM '{vm_key}' has no restore points"))
            })
        }
        Some(id) => {
            let id = select_point_id(&list, id)?;
            list.points
                .into_iter()
                .find(|p| p.point == id)
                .ok_or_else(|| anyhow::anyhow!("point {id} is damaged"))
        }
    }
}

/// Check that `id` names a point of `list`: a damaged point is an error
/// (exit 3) with the reason; an unknown id a validation error listing the ids.
pub fn select_point_id(list: &PointList, id: &str) -> Result<String> {
    if let Some(d) = list.damage_of(id) {
        anyhow::bail!("point {id} is damaged: {}", d.reason);
    }
    if list.points.iter().any(|p| p.point == id) {
        return Ok(id.to_string());
    }
    let ids = list.all_ids();
    Err(invalid(
        "--point",
        id,
        format!(
            "no such point; points: {}",
            if ids.is_empty() {
                "(none)".into()
            } else {
                ids.join(", ")
            }
        ),
    ))
}

/// Restore every disk of the chosen point into `dest`.
pub fn restore_point(
    req: &RestoreRequest,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<RestoreReport> {
    let manifest = req.point;
    let names: Vec<String> = manifest
        .disks
        .iter()
        .map(|d| format!("{}.{}", encode_name(&d.name), req.format.ext()))
        .collect();
    // Refuse before writing anything. lstat: a symlink there (even a dangling
    // one) is something that exists.
    for name in &names {
        let path = req.dest.join(name);
        if std::fs::symlink_metadata(&path).is_ok() && !req.force {
            return Err(invalid(
                "--to",
                req.dest.display(),
                format!("{} exists; pass --force to overwrite", path.display()),
            ));
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(req.dest)
        .with_context(|| format!("cannot create {}", req.dest.display()))?;
    let dest = req
        .dest
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", req.dest.display()))?;
    let mut staging = staging::Staging::create(&dest)?;
    (req.on_staging)(&staging.path())?;
    // Every slot is read once: nothing to cache.
    let reader = PointReader::open(Arc::new(req.repo.clone()), req.vm_key, manifest, 0)?;
    let mut disks = Vec::new();
    for (n, (d, name)) in manifest.disks.iter().zip(&names).enumerate() {
        let (path, written) = restore_disk(req, &mut staging, &reader, n, name, progress, cancel)
            .with_context(|| {
            format!("restore of point {} disk '{}'", manifest.point, d.name)
        })?;
        disks.push(RestoredDisk {
            disk: d.name.clone(),
            path,
            size: reader.disk_index(n).disk_size,
            bytes_written: written,
        });
    }
    staging.sync_dest()?;
    Ok(RestoreReport {
        point: manifest.point.clone(),
        disks,
        new_vm: None,
        launch_script: None,
        in_place: false,
    })
}

/// Write one disk's image into the staging directory, then move it out as
/// `final_name`. Returns its path and the bytes of chunk data written.
fn restore_disk(
    req: &RestoreRequest,
    staging: &mut staging::Staging,
    reader: &PointReader,
    disk_no: usize,
    final_name: &str,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<(PathBuf, u64)> {
    let raw_name = format!("{final_name}.raw");
    let file = staging.create_file(&raw_name)?;
    file.set_len(reader.disk_index(disk_no).disk_size)
        .with_context(|| format!("cannot size {raw_name}"))?;
    let written = write_slots(req, reader, disk_no, &file, progress, cancel)?;
    drop(file);
    let image = match req.format {
        ImageFormat::Raw => raw_name,
        ImageFormat::Qcow2 => {
            let qcow = format!("{final_name}.qcow2");
            // qemu-img gets paths through our open staging directory: nothing it
            // opens can have been planted by someone else.
            let out = Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(staging.child_path(&raw_name))
                .arg(staging.child_path(&qcow))
                .output()
                .context("cannot run qemu-img (package qemu-utils)")?;
            if !out.status.success() {
                bail!(
                    "qemu-img convert failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            staging.remove(&raw_name); // the raw intermediate goes
            qcow
        }
    };
    staging.finish_file(&image, req.mode)?;
    let path = staging.publish(&image, final_name, req.force)?;
    Ok((path, written))
}

/// Fetch and verify every stored slot of `index` on `req.workers` threads, and
/// write them into `file` from this thread alone: one writer, so no thread waits
/// on the file's inode lock while another copies into the page cache (a restore
/// profile showed 16% of its time spinning there with four writers). A bounded
/// queue holds at most `workers` decoded slots. Returns the bytes written (zeros
/// excluded).
fn write_slots(
    req: &RestoreRequest,
    reader: &PointReader,
    disk_no: usize,
    file: &File,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<u64> {
    let index = reader.disk_index(disk_no);
    let disk = req.point.disks[disk_no].name.as_str();
    let chunk_slots: Vec<usize> = (0..index.slots.len())
        .filter(|&i| index.slots[i] != Slot::Zero)
        .collect();
    let total: u64 = chunk_slots.iter().map(|&i| index.slot_len(i) as u64).sum();
    progress.disk_total(disk, total);

    let workers = req.workers.max(1);
    let next = AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, Bytes)>>(workers);
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (tx, next, chunk_slots) = (tx.clone(), &next, &chunk_slots);
            s.spawn(move || loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&slot) = chunk_slots.get(k) else {
                    return;
                };
                let res = if cancel.load(Ordering::Relaxed) {
                    Err(Error::Interrupted.into())
                } else {
                    reader
                        .slot(disk_no, slot)
                        .with_context(|| format!("slot {slot}"))
                };
                let failed = res.is_err();
                // A closed queue means the writer stopped (it failed): stop too.
                if tx.send(res.map(|data| (slot, data))).is_err() || failed {
                    return;
                }
            });
        }
        drop(tx);
        // Returning drops the queue, which stops the workers at their next send.
        let mut buf = Vec::new();
        let mut writer = ImageWriter::new(file, WriteMode::Direct, &mut buf);
        let mut written = 0u64;
        for item in rx {
            let (slot, data) = item?;
            written += writer
                .write(index.slot_offset(slot), &data)
                .with_context(|| format!("slot {slot}"))? as u64;
            progress.advance(disk, data.len() as u64);
            if data.is_unique() {
                crate::buffers::give(Vec::from(data));
            }
        }
        tracing::debug!(disk, mode = ?writer.mode(), "image written");
        writer
            .finish(index.disk_size)
            .context("cannot cut the image to the disk's size")?;
        Ok(written)
    })
}
