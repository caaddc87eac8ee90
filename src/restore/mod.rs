//! Restore a point to image files, one per disk.
//!
//! Every chunk is read through `ChunkStore::get`, which verifies its digest, so a
//! corrupt or missing chunk fails the restore loudly, naming disk, slot and digest
//! (no silently wrong image). Raw output is sparse: zero slots and all-zero 4 KiB
//! blocks inside chunks are not written. A qcow2 image is converted from that raw
//! file with `qemu-img convert`. Output appears atomically: written as a hidden
//! `.partial` file, fsynced, renamed; on failure nothing is left behind.
//! Chunks are fetched and decompressed by several threads at once (PBS found
//! restores bound by serial chunk fetches).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::error::{invalid, Error};
use crate::repo::{encode_name, sync_dir, Manifest, PointList, Repository, Slot};
use crate::task::progress::Progress;

pub mod point_reader;
pub use point_reader::{PointReader, PointStore, Span, DEFAULT_CACHE_BYTES};

/// Output image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    fn ext(self) -> &'static str {
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
    /// Threads fetching chunks.
    pub workers: usize,
}

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
    /// `--as-vm`: the launch script written beside the disks.
    pub launch_script: Option<PathBuf>,
    /// `--as-vm --start`: the VM started from it.
    pub started: Option<crate::recovery::StartedVm>,
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
    let targets: Vec<(String, PathBuf)> = manifest
        .disks
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                req.dest
                    .join(format!("{}.{}", encode_name(&d.name), req.format.ext())),
            )
        })
        .collect();
    // Refuse before writing anything.
    for (_, path) in &targets {
        if path.exists() && !req.force {
            return Err(invalid(
                "--to",
                req.dest.display(),
                format!("{} exists; pass --force to overwrite", path.display()),
            ));
        }
    }
    fs::create_dir_all(req.dest)
        .with_context(|| format!("cannot create {}", req.dest.display()))?;
    // Every slot is read once: nothing to cache.
    let reader = PointReader::open(Arc::new(req.repo.clone()), req.vm_key, manifest, 0)?;
    let mut disks = Vec::new();
    for (n, (d, (_, path))) in manifest.disks.iter().zip(&targets).enumerate() {
        let written = restore_disk(req, &reader, n, path, progress, cancel)
            .with_context(|| format!("restore of point {} disk '{}'", manifest.point, d.name))?;
        disks.push(RestoredDisk {
            disk: d.name.clone(),
            path: path.clone(),
            size: reader.disk_index(n).disk_size,
            bytes_written: written,
        });
    }
    sync_dir(req.dest)?;
    Ok(RestoreReport {
        point: manifest.point.clone(),
        disks,
        launch_script: None,
        started: None,
        in_place: false,
    })
}

/// Removes the file at `path` on drop unless disarmed.
struct Partial(Option<PathBuf>);

impl Partial {
    /// The file became the final output: keep it.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

fn partial_path(final_path: &Path, suffix: &str) -> PathBuf {
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    final_path.with_file_name(format!(".{name}.partial-{}{suffix}", std::process::id()))
}

fn restore_disk(
    req: &RestoreRequest,
    reader: &PointReader,
    disk_no: usize,
    final_path: &Path,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<u64> {
    let index = reader.disk_index(disk_no);
    let disk = req.point.disks[disk_no].name.as_str();
    let raw_path = partial_path(final_path, ".raw");
    let raw_guard = Partial(Some(raw_path.clone()));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&raw_path)
        .with_context(|| format!("cannot create {}", raw_path.display()))?;
    file.set_len(index.disk_size)?;
    let chunk_slots: Vec<usize> = (0..index.slots.len())
        .filter(|&i| index.slots[i] != Slot::Zero)
        .collect();
    let total: u64 = chunk_slots.iter().map(|&i| index.slot_len(i) as u64).sum();
    progress.disk_total(disk, total);

    let next = AtomicUsize::new(0);
    let written = AtomicUsize::new(0);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..req.workers.max(1) {
            s.spawn(|| loop {
                if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&slot) = chunk_slots.get(k) else {
                    return;
                };
                let res = (|| -> Result<usize> {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(Error::Interrupted.into());
                    }
                    let data = reader.slot(disk_no, slot)?;
                    let n = write_sparse(&file, index.slot_offset(slot), &data)?;
                    progress.advance(disk, data.len() as u64);
                    Ok(n)
                })();
                match res {
                    Ok(n) => {
                        written.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(e);
                        }
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or(None) {
        return Err(e);
    }
    file.sync_all()?;
    drop(file);
    match req.format {
        ImageFormat::Raw => {
            fs::rename(&raw_path, final_path)?;
            raw_guard.keep();
        }
        ImageFormat::Qcow2 => {
            let qcow = partial_path(final_path, ".qcow2");
            let qcow_guard = Partial(Some(qcow.clone()));
            let out = Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw_path)
                .arg(&qcow)
                .output()
                .context("cannot run qemu-img (package qemu-utils)")?;
            if !out.status.success() {
                bail!(
                    "qemu-img convert failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            File::open(&qcow)?.sync_all()?;
            fs::rename(&qcow, final_path)?;
            qcow_guard.keep();
            drop(raw_guard); // the raw intermediate goes
        }
    }
    Ok(written.into_inner() as u64)
}

/// Write `data` at `offset`, skipping all-zero 4 KiB blocks (the file is sparse).
fn write_sparse(file: &File, offset: u64, data: &[u8]) -> Result<usize> {
    const BLOCK: usize = 4096;
    let mut written = 0;
    let mut i = 0;
    while i < data.len() {
        // Find the next run of non-zero blocks.
        while i < data.len() && crate::backup::disk::is_zero(&data[i..(i + BLOCK).min(data.len())])
        {
            i += BLOCK;
        }
        let start = i;
        while i < data.len() && !crate::backup::disk::is_zero(&data[i..(i + BLOCK).min(data.len())])
        {
            i += BLOCK;
        }
        let end = i.min(data.len());
        if end > start {
            file.write_all_at(&data[start..end], offset + start as u64)?;
            written += end - start;
        }
    }
    Ok(written)
}
