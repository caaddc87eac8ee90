//! Backup of a running domain: a pull-mode `virDomainBackupBegin` that creates the
//! new point's checkpoint and exports every disk over NBD on a unix socket.
//!
//! QEMU (libvirt's unprivileged user on a real host) must create the socket and the
//! scratch (fleecing) files, so they live in a private directory per run,
//! `/var/tmp/vmbackup-<UUID>-<RANDOM>`, mode 0700, owned by the domain's QEMU user
//! (its DAC label); root, and so vmbackup, reads the socket. libvirt removes the
//! scratch files and the socket when the job ends; vmbackup removes the directory.
//!
//! finish: the job is aborted (that is how a pull-mode backup ends) and waited for.
//! Stored → the new checkpoint stays and its token is returned. Not stored → the
//! new checkpoint is deleted (libvirt merges its bitmaps into the older ones, so
//! the changes made during the failed run stay tracked).

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::checkpoints;
use super::ffi::Domain;
use super::quiesce;
use super::xml::{self, BackupDisk};
use crate::level::Level;
use crate::platform::{
    BackupRequest, ChangedBlocks, DiskExport, NbdAddr, Snapshot, TrackingToken, VmInfo,
};

/// Where the per-run socket directories are created (sticky, world-writable: the
/// directory is created exclusively and checked).
const SOCKET_PARENT: &str = "/var/tmp";

/// How long an aborted job may take to disappear.
const JOB_END_TIMEOUT: Duration = Duration::from_secs(60);

/// An open pull-mode backup.
pub struct View {
    dir: PathBuf,
    new_checkpoint: Option<String>,
}

pub fn begin(
    dom: &Domain,
    uuid: &str,
    info: &VmInfo,
    req: &BackupRequest,
) -> Result<(View, Snapshot)> {
    let name = dom.name();
    if dom.backup_xml().is_some() {
        bail!("domain '{name}' already runs a backup job (another tool's?); wait for it to end");
    }
    let mut notes = Vec::new();
    let incremental = match req.level {
        Level::Full => None,
        Level::Inc | Level::Diff => {
            let base = req.base.as_deref().unwrap_or("?");
            let disk = info.disks.first().map(|d| d.name.as_str()).unwrap_or("");
            Some(checkpoints::ensure(
                dom,
                disk,
                base,
                req.base_tracking.as_ref(),
                &mut notes,
            )?)
        }
    };
    let live = dom.xml(0)?;
    let all_disks = xml::domain_disks(&live)?;
    let ours = |target: &str| info.disks.iter().any(|d| d.name == target);
    let track = req.track && info.disks.iter().all(|d| d.cbt);
    let new_checkpoint = track.then(|| checkpoints::name(&req.new_point));
    let checkpoint_xml = new_checkpoint.as_ref().map(|n| {
        let disks: Vec<(&str, bool)> = all_disks
            .iter()
            .map(|d| (d.target.as_str(), ours(&d.target)))
            .collect();
        xml::checkpoint_xml(n, &disks)
    });

    let dir = private_dir(uuid, xml::dac_owner(&live)?)?;
    let socket = dir.join("nbd.sock");
    let scratch: Vec<(String, PathBuf)> = info
        .disks
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                dir.join(format!("{}.scratch", file_safe(&d.name))),
            )
        })
        .collect();
    let backup_disks: Vec<BackupDisk> = all_disks
        .iter()
        .map(|d| BackupDisk {
            target: &d.target,
            scratch: scratch
                .iter()
                .find(|(t, _)| *t == d.target)
                .map(|(_, p)| p.as_path()),
        })
        .collect();
    let backup_xml = xml::backup_xml(&socket, &backup_disks, incremental.as_deref());

    let view = View {
        dir,
        new_checkpoint: None,
    };
    let frozen = match quiesce::freeze(dom, uuid, req.quiesce, &req.run_dir) {
        Ok(f) => f,
        Err(e) => {
            remove_dir(&view.dir);
            return Err(e);
        }
    };
    let begun = dom.backup_begin(&backup_xml, checkpoint_xml.as_deref());
    let thawed = if frozen.is_frozen() {
        quiesce::thaw(dom, uuid, &req.run_dir)
    } else {
        Ok(())
    };
    if let Err(e) = begun {
        remove_dir(&view.dir);
        return Err(match thawed {
            Ok(()) => e,
            Err(t) => e.context(format!("thawing the guest failed too: {t:#}")),
        });
    }
    let view = View {
        new_checkpoint,
        ..view
    };
    let snapshot = (|| -> Result<Snapshot> {
        thawed.context("thaw the guest after the checkpoint")?;
        let job = dom
            .backup_xml()
            .context("libvirt reports no backup job right after starting one")?;
        let (_, job_disks) = xml::backup_job(&job)?;
        let mut exports = Vec::new();
        for d in &info.disks {
            let jd = job_disks
                .iter()
                .find(|j| j.target == d.name)
                .with_context(|| format!("the backup job does not export disk {}", d.name))?;
            let changes = match (&incremental, &jd.bitmap) {
                (None, _) => None,
                (Some(_), Some(b)) => {
                    Some(ChangedBlocks::MetaContext(format!("qemu:dirty-bitmap:{b}")))
                }
                (Some(_), None) => bail!("the incremental job exports no bitmap for {}", d.name),
            };
            exports.push(DiskExport {
                disk: d.clone(),
                addr: NbdAddr::Unix {
                    path: socket.clone(),
                },
                export: jd.export.clone(),
                changes,
            });
        }
        let mut all_notes: Vec<_> = notes.into_iter().map(crate::platform::Note::Info).collect();
        all_notes.extend(frozen.note());
        Ok(Snapshot {
            exports,
            notes: all_notes,
        })
    })();
    match snapshot {
        Ok(s) => Ok((view, s)),
        Err(e) => match finish(dom, view, false) {
            Ok(_) => Err(e),
            Err(u) => Err(e.context(format!("undo also failed: {u:#}"))),
        },
    }
}

/// End the job (see module docs); every step is tried, the error lists what failed.
pub fn finish(dom: &Domain, view: View, stored: bool) -> Result<Option<TrackingToken>> {
    let mut failed = Vec::new();
    if let Err(e) = end_job(dom) {
        failed.push(format!("{e:#}"));
    }
    remove_dir(&view.dir);
    let mut token = None;
    if let Some(name) = &view.new_checkpoint {
        match dom.checkpoint(name) {
            Ok(Some(cp)) if stored => match checkpoints::token(&cp) {
                Ok(t) => token = Some(t),
                Err(e) => failed.push(format!("{e:#}")),
            },
            Ok(Some(cp)) => {
                if let Err(e) = cp.delete() {
                    failed.push(format!("{e:#}"));
                }
            }
            Ok(None) if stored => failed.push(format!("checkpoint {name} vanished")),
            Ok(None) => {}
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if failed.is_empty() {
        Ok(token)
    } else {
        bail!(
            "domain '{}': ending the backup failed ({}); run cleanup",
            dom.name(),
            failed.join("; ")
        )
    }
}

/// Abort the domain's backup job and wait until libvirt reports none.
fn end_job(dom: &Domain) -> Result<()> {
    if dom.backup_xml().is_none() {
        return Ok(());
    }
    if let Err(e) = dom.abort_job() {
        if dom.backup_xml().is_some() {
            return Err(e);
        }
    }
    let t = Instant::now();
    while dom.backup_xml().is_some() {
        if t.elapsed() > JOB_END_TIMEOUT {
            bail!("the backup job did not end within {JOB_END_TIMEOUT:?} of being aborted");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// After a crash: end a backup job of ours (its socket is in one of our
/// directories) and remove our directories of this domain.
pub fn remove_leftovers(dom: &Domain, uuid: &str, actions: &mut Vec<String>) -> Result<()> {
    let prefix = format!("{SOCKET_PARENT}/vmbackup-{uuid}-");
    if let Some(job) = dom.backup_xml() {
        let (socket, _) = xml::backup_job(&job)?;
        if socket.as_deref().is_some_and(|s| s.starts_with(&prefix)) {
            end_job(dom)?;
            actions.push("ended the backup job of an interrupted run".into());
        }
    }
    let entries =
        std::fs::read_dir(SOCKET_PARENT).with_context(|| format!("list {SOCKET_PARENT}"))?;
    for e in entries.flatten() {
        let path = e.path();
        let ours =
            path.to_string_lossy().starts_with(&prefix) && e.file_type().is_ok_and(|t| t.is_dir());
        if ours {
            remove_dir(&path);
            actions.push(format!("removed {}", path.display()));
        }
    }
    Ok(())
}

/// A new private directory for one run's socket and scratch files, owned by the
/// QEMU user `owner` (uid, gid) when QEMU does not run as root.
fn private_dir(uuid: &str, owner: Option<(u32, u32)>) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let dir = PathBuf::from(format!("{SOCKET_PARENT}/vmbackup-{uuid}-{random:016x}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    if let Some((uid, gid)) = owner {
        // SAFETY: uid/gid come from libvirt's DAC label of this domain.
        let (u, g) = unsafe {
            (
                rustix::fs::Uid::from_raw(uid),
                rustix::fs::Gid::from_raw(gid),
            )
        };
        rustix::fs::chown(&dir, Some(u), Some(g))
            .with_context(|| format!("cannot hand {} to QEMU's user {uid}", dir.display()))?;
    }
    Ok(dir)
}

fn remove_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
