//! `restore --in-place`: a point written back into the VM's own disk images.
//!
//! Refused while any process holds an image open (a running QEMU does; `--force`
//! never skips this). The point is served by an in-process NBD server and
//! `qemu-img convert -n` writes it into each image (zero slots become zeros;
//! the image is resized to the point's size first; QEMU's image locks are
//! checked again by qemu-img). vmbackup's dirty bitmaps are removed from the
//! images: they tracked changes relative to points the disk no longer follows,
//! so the VM's next backup is a full, with the reason (`vm_resets`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::export::{serve_here, unix_uri};
use super::private_dir;
use crate::error::{busy, refused, Error};
use crate::repo::{vm_key, Manifest, Repository};
use crate::restore::{RestoreReport, RestoredDisk};
use crate::state::rules::RuleRow;
use crate::state::State;
use crate::task::progress::{LogLevel, Progress};

pub struct InPlaceRequest<'a> {
    pub state_path: &'a Path,
    /// The run directory: the point is served from a private directory in it.
    pub run_dir: &'a Path,
    pub repo: &'a Repository,
    pub rule: &'a RuleRow,
    pub vm: &'a str,
    pub point: &'a Manifest,
}

/// The VM's images (disk, file, format) as captured at backup.
fn images(point: &Manifest) -> Result<Vec<(String, PathBuf, String)>> {
    let mut out = Vec::new();
    for d in &point.disks {
        let info = point.vm_config["disks"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == d.name.as_str()));
        let file = info.and_then(|i| i["file"].as_str()).ok_or_else(|| {
            refused(format!(
                "point {}: disk '{}' has no image file on record; restore it with --to",
                point.point, d.name
            ))
        })?;
        let format = info
            .and_then(|i| i["format"].as_str())
            .unwrap_or("raw")
            .to_string();
        if format != "qcow2" && format != "raw" {
            return Err(refused(format!(
                "disk '{}' is a {format} image; in place restore writes qcow2 and raw only",
                d.name
            )));
        }
        out.push((d.name.clone(), PathBuf::from(file), format));
    }
    Ok(out)
}

/// Processes holding `path` open: `pid N (comm)`.
pub fn holders(path: &Path) -> Vec<String> {
    let Ok(target) = std::fs::canonicalize(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == target))
        {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    out
}

fn qemu_img(args: &[&str], what: &str) -> Result<String> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .context("cannot run qemu-img")?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn restore_in_place(
    req: &InPlaceRequest,
    progress: &dyn Progress,
    cancel: &AtomicBool,
    rt: &tokio::runtime::Handle,
) -> Result<RestoreReport> {
    let images = images(req.point)?;
    for (disk, file, _) in &images {
        if !file.exists() {
            return Err(refused(format!(
                "disk '{disk}': image {} does not exist",
                file.display()
            )));
        }
        let held = holders(file);
        if !held.is_empty() {
            return Err(busy(format!(
                "disk '{disk}': image {} is open in {}; stop the VM first (in-place restore never writes an image in use)",
                file.display(),
                held.join(", ")
            )));
        }
    }
    let key = vm_key(&req.rule.settings.platform, req.vm);
    let dir = req.run_dir.join(format!("in-place-{}", std::process::id()));
    private_dir(&dir)?;
    let (server, socket) = serve_here(req.repo, &key, req.vm, req.point, &dir, rt)?;
    let result = write_all(&images, req.point, &socket, progress, cancel);
    rt.block_on(server.stop());
    let _ = std::fs::remove_dir_all(&dir);
    let disks = result?;
    let reason = format!(
        "the disks were restored in place from point {}",
        req.point.point
    );
    State::open(req.state_path)?.set_vm_reset(&req.rule.name, req.vm, &reason)?;
    progress.log(
        LogLevel::Info,
        &format!("{reason}: vmbackup's bitmaps were removed; the next backup is a full"),
    );
    Ok(RestoreReport {
        point: req.point.point.clone(),
        disks,
        launch_script: None,
        new_vm: None,
        in_place: true,
    })
}

fn write_all(
    images: &[(String, PathBuf, String)],
    point: &Manifest,
    socket: &Path,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Vec<RestoredDisk>> {
    let mut out = Vec::new();
    for ((disk, file, format), d) in images.iter().zip(&point.disks) {
        let f = file.to_str().context("image path is not UTF-8")?;
        progress.disk_total(disk, d.size);
        let info: serde_json::Value = serde_json::from_str(&qemu_img(
            &["info", "--output=json", "-f", format, f],
            &format!("disk '{disk}'"),
        )?)?;
        if format == "qcow2" {
            let bitmaps = info["format-specific"]["data"]["bitmaps"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for b in bitmaps {
                let name = b["name"].as_str().unwrap_or_default();
                if name.starts_with(crate::platform::qemu::names::PREFIX) {
                    qemu_img(
                        &["bitmap", "--remove", f, name],
                        &format!("removing bitmap {name} of disk '{disk}'"),
                    )?;
                    progress.log(
                        LogLevel::Info,
                        &format!("disk {disk}: removed bitmap {name}"),
                    );
                }
            }
        }
        if info["virtual-size"].as_u64() != Some(d.size) {
            qemu_img(
                &[
                    "resize",
                    "-q",
                    "-f",
                    format,
                    "--shrink",
                    f,
                    &d.size.to_string(),
                ],
                &format!("resizing disk '{disk}'"),
            )?;
        }
        let mut child = Command::new("qemu-img")
            .args([
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                format.as_str(),
                &unix_uri(socket, disk),
                f,
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("cannot run qemu-img")?;
        loop {
            if cancel.load(Ordering::SeqCst) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Interrupted.into());
            }
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    bail!(
                        "writing point {} into {}: {}",
                        point.point,
                        file.display(),
                        err.trim()
                    );
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        progress.advance(disk, d.size);
        progress.log(
            LogLevel::Info,
            &format!(
                "disk {disk}: point {} written into {}",
                point.point,
                file.display()
            ),
        );
        out.push(RestoredDisk {
            disk: disk.clone(),
            path: file.clone(),
            size: d.size,
            bytes_written: d.size,
        });
    }
    Ok(out)
}
