//! A backup of one VM, start to finish (R7, R26, R27, R31, R44).
//!
//! ```text
//! preparing           open repo, lock the VM, drop incomplete points, clean up
//!                     platform leftovers of interrupted runs (R44)
//! backing up config   the VM's configuration goes into the manifest
//! querying changes    plan the level (plan.rs), snapshot every disk at once with
//!                     changed-block tracking (platform), falling back to full (R26/R27)
//! checking data       load the base point's indexes (link to the parent)
//! running             every disk through disk.rs in parallel
//! commit              indexes, then the manifest (the point exists from here on),
//!                     then the platform drops the old tracking state
//! ```
//! Any failure (or SIGINT/SIGTERM, via `cancel`) aborts the point and tells the
//! platform to restore its tracking state, so no change is ever lost.

pub mod disk;
pub mod extents;
pub mod plan;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use chrono::Utc;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::clock::Clock;
use crate::error::refused;
use crate::level::Level;
use crate::platform::{BackupRequest, CbtUnavailable, Note, Platform, Quiesce, Snapshot, VmHandle};
use crate::repo::{
    index_file_name, new_point_id, parse_point_id, vm_key, Manifest, ManifestDisk, ManifestTotals,
    ManifestVm, PointList, PointStatus, PointWriter, Repository, Slot, VmLock,
};
use crate::task::progress::{LogLevel, Phase, Progress};
use crate::task::stopwatch::Stopwatch;
use crate::task::throttle::Throttle;
use disk::{DiskPlan, Pipeline};
use plan::{FullInstead, LevelPlan, Tracking};

/// Everything a backup of one VM needs, resolved (no CLI types).
#[derive(Debug, Clone)]
pub struct BackupJob {
    /// Registered platform name (part of the VM's key in the repository).
    pub platform: String,
    pub vm: String,
    /// The rule's repository (see `lifecycle::repository_for_backup`).
    pub repo: Repository,
    pub requested: Level,
    pub auto_cbt: bool,
    pub cbt: bool,
    /// R10: freeze guest file systems around the snapshot.
    pub quiesce: Quiesce,
    /// The rule accepts exports through the VM's own plain-TCP NBD server.
    pub allow_plain_tcp_export: bool,
    /// Chunk size = system.conf `i2vp_transbuffer` (R39).
    pub chunk_size: u32,
    /// The run directory; the VM's own scratch directory inside it
    /// ([`scratch_dir`]) goes to the platform (fleecing images, sockets).
    pub run_dir: PathBuf,
    /// How long an NBD request may wait for its answer (system.conf `io_timeout`).
    pub io_timeout: std::time::Duration,
    /// Chunk buffers in flight, shared with the process's other backups
    /// (memory bound: permits × chunk size).
    pub buffers: Arc<Semaphore>,
    /// The wall clock point ids and manifest times are read from (the test
    /// clock in tests: retention and point ids share one timeline).
    pub clock: Clock,
    /// The rule's bandwidth windows, applied to source reads (R29).
    pub bandwidth: Arc<Throttle>,
    /// Why this VM's next backup must be a full whatever was asked (its disks
    /// were restored in place, so its tracking no longer follows its points).
    pub force_full: Option<String>,
}

/// What a finished backup produced.
#[derive(Debug, Clone, Serialize)]
pub struct BackupOutcome {
    pub point: String,
    pub level: Level,
    pub requested: Level,
    pub base: Option<String>,
    /// Why an inc/diff ran as a full.
    pub fallback: Option<String>,
    /// The full was planned by configuration (first backup, CBT off, raw disk):
    /// no warning, exit code 0. Otherwise a fallback is a warning (exit code 1).
    pub fallback_planned: bool,
    #[serde(serialize_with = "totals_json")]
    pub totals: ManifestTotals,
    /// Problems that did not fail the backup.
    pub warnings: Vec<String>,
    /// Points of this VM in the repository, this one included.
    pub point_count: u64,
}

/// A point's totals under the names of docs/JSON.md (counts end in `_count`);
/// the manifest keeps its own names (docs/FORMAT.md).
fn totals_json<S: serde::Serializer>(t: &ManifestTotals, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(
        &serde_json::json!({
            "size": t.size,
            "bytes_read": t.bytes_read,
            "bytes_written": t.bytes_written,
            "new_chunk_count": t.new_chunks,
            "reused_chunk_count": t.reused_chunks,
            "zero_slot_count": t.zero_slots,
        }),
        s,
    )
}

/// Back up one VM, holding its lock (taken under the repository's shared lock:
/// see `repo::lock`). `rt` runs the disk pipelines; `cancel` aborts cleanly.
pub fn run_backup(
    job: &BackupJob,
    lock: &VmLock,
    platform: &dyn Platform,
    progress: Arc<dyn Progress>,
    cancel: Arc<AtomicBool>,
    rt: &tokio::runtime::Handle,
) -> Result<BackupOutcome> {
    progress.phase(Phase::Preparing);
    let mut watch = Stopwatch::start(format!("backup of VM '{}'", job.vm));
    let repo = &job.repo;
    let key = vm_key(&job.platform, &job.vm);
    if lock.vm_key() != key {
        anyhow::bail!(
            "the lock of VM '{}' does not cover VM '{key}'",
            lock.vm_key()
        );
    }
    let mut vm = platform
        .open_vm(&job.vm)
        .with_context(|| format!("VM '{}'", job.vm))?;
    vm.watch_cancel(cancel.clone());
    let info = vm.info()?;
    if let Some(err) = &info.error {
        anyhow::bail!("VM '{}' cannot be queried: {err}", job.vm);
    }
    if let Some(d) = info.disks.iter().find(|d| d.uncoverable.is_some()) {
        return Err(refused(format!(
            "VM '{}' disk '{}' cannot be covered by a snapshot: {} (R43)",
            job.vm,
            d.name,
            d.uncoverable.as_deref().unwrap_or_default()
        )));
    }
    watch.lap("open and query the VM");
    let scratch = scratch_dir(&job.run_dir, &job.platform, &job.vm)?;
    if let Some((uid, gid)) = vm.runs_as()? {
        scratch.hand_to(uid, gid)?;
    }
    let (listed, repaired) = repair_leftovers(repo, lock, vm.as_mut(), &scratch.path)?;
    let points = &listed.points;
    for a in &repaired {
        progress.log(
            LogLevel::Warn,
            &format!("cleaned up after an interrupted run: {a}"),
        );
    }
    watch.lap("list points, repair leftovers");
    // The newest id of any point, damaged ones too: a new id is after all.
    let ids = listed.all_ids();
    // Points of this VM in the repository (damaged ones too, as prune counts
    // them), the new one included.
    let point_count = ids.len() as u64 + 1;
    let latest = ids.last().cloned();
    let (latest_good, latest_full) = chain_heads(points);
    let old_heads = (
        latest_good.map(|p| p.point.clone()),
        latest_full.map(|p| p.point.clone()),
    );

    progress.phase(Phase::BackingUpConfig);
    let vm_config = vm.config()?;
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!(
            "VM '{}' configuration: {}",
            job.vm,
            crate::platform::redact::for_log(&vm_config)
        );
    }
    watch.lap("read the VM configuration");

    progress.phase(Phase::QueryingChanges);
    let tracking = plan::tracking(job.auto_cbt, job.cbt, &info.disks);
    let mut lp = plan::plan_level(
        job.requested,
        points,
        &info.disks,
        job.chunk_size,
        &tracking,
    );
    // A damaged point newer than the base: tracking may follow it, so an inc
    // or diff against an older point could miss changes. Read everything.
    if let Some(base) = lp.base.clone() {
        if let Some(d) = listed.damaged.iter().rfind(|d| d.point > base) {
            lp = LevelPlan {
                level: Level::Full,
                base: None,
                latest_full: lp.latest_full.clone(),
                fallback: Some(FullInstead {
                    reason: format!(
                        "point {} (newer than base {base}) is damaged ({}); this {} runs as a full",
                        d.point, d.reason, job.requested
                    ),
                    planned: false,
                }),
            };
        }
    }
    if let (Some(why), true) = (&job.force_full, lp.level != Level::Full) {
        lp = LevelPlan {
            level: Level::Full,
            base: None,
            latest_full: lp.latest_full.clone(),
            // Not planned by configuration: a warning (exit 1), as the branch of
            // a restore in place always was.
            fallback: Some(FullInstead {
                reason: format!("{why}; this {} runs as a full", job.requested),
                planned: false,
            }),
        };
    }
    let point = next_point_id(latest.as_deref(), job.clock.now().with_timezone(&Utc))?;
    let base_tracking = |base: &Option<String>| {
        base.as_ref()
            .and_then(|b| points.iter().find(|p| p.point == *b))
            .and_then(|p| p.tracking.clone())
    };
    let mut req = BackupRequest {
        new_point: point.clone(),
        level: lp.level,
        base: lp.base.clone(),
        base_tracking: base_tracking(&lp.base),
        latest_full: lp.latest_full.clone(),
        track: tracking == Tracking::On,
        quiesce: job.quiesce,
        allow_plain_tcp_export: job.allow_plain_tcp_export,
        run_dir: scratch.path.clone(),
    };
    let snapshot = match vm.begin_backup(&req) {
        Ok(s) => s,
        Err(e) if lp.level != Level::Full && e.downcast_ref::<CbtUnavailable>().is_some() => {
            let cu = e.downcast_ref::<CbtUnavailable>().expect("checked above");
            lp = LevelPlan {
                level: Level::Full,
                base: None,
                latest_full: lp.latest_full.clone(),
                fallback: Some(FullInstead::cbt_unavailable(job.requested, cu)),
            };
            req.level = Level::Full;
            req.base = None;
            req.base_tracking = None;
            vm.begin_backup(&req)?
        }
        Err(e) => return Err(e),
    };
    watch.lap("begin the snapshot (QMP transaction, fleecing, exports)");
    for note in &snapshot.notes {
        match note {
            Note::Info(m) => progress.log(LogLevel::Info, m),
            Note::Warn(m) => progress.log(LogLevel::Warn, m),
        }
    }
    if let Some(why) = &lp.fallback {
        let level = if why.planned {
            LogLevel::Info
        } else {
            LogLevel::Warn
        };
        progress.log(level, &why.reason);
    }
    progress.log(
        LogLevel::Info,
        &match (&lp.base, &lp.latest_full) {
            (Some(base), Some(full)) if base != full => format!(
                "point {point}: {} against point {base} (chain from full {full}), {} disk(s)",
                lp.level,
                snapshot.exports.len()
            ),
            (Some(base), _) => format!(
                "point {point}: {} against point {base}, {} disk(s)",
                lp.level,
                snapshot.exports.len()
            ),
            (None, _) => format!(
                "point {point}: {} of every allocated block, {} disk(s)",
                lp.level,
                snapshot.exports.len()
            ),
        },
    );
    progress.level(lp.level);

    let started = job.clock.now().with_timezone(&Utc);
    let stored = write_point(
        job,
        repo,
        lock,
        &key,
        &point,
        &mut lp,
        &snapshot,
        vm_config,
        progress.clone(),
        cancel,
        rt,
        started,
        &mut watch,
    );
    let mut warnings: Vec<String> = snapshot
        .notes
        .iter()
        .filter_map(|n| match n {
            Note::Warn(m) => Some(m.clone()),
            Note::Info(_) => None,
        })
        .collect();
    let totals = commit(
        vm.as_mut(),
        stored,
        old_heads,
        &job.run_dir,
        progress.as_ref(),
        &mut warnings,
        &mut watch,
    )?;
    watch.total();
    Ok(BackupOutcome {
        point,
        level: lp.level,
        requested: job.requested,
        base: lp.base,
        fallback_planned: lp.fallback.as_ref().is_some_and(|f| f.planned),
        fallback: lp.fallback.map(|f| f.reason),
        totals,
        warnings,
        point_count,
    })
}

/// The base point's index of every disk of the snapshot (`None` each for a full).
fn load_bases(
    repo: &Repository,
    key: &str,
    lp: &LevelPlan,
    snapshot: &Snapshot,
) -> Result<Vec<Option<crate::repo::DiskIndex>>> {
    snapshot
        .exports
        .iter()
        .map(|export| match &lp.base {
            Some(b) => repo
                .load_index(key, b, &export.disk.name)
                .with_context(|| format!("base point {b} cannot be used"))
                .map(Some),
            None => Ok(None),
        })
        .collect()
}

/// End the platform view and commit (see the CBT contract in `platform`): data
/// stored → the platform hands over the new point's tracking token → manifest →
/// the platform drops tracking no future backup needs. A failure before the
/// manifest leaves the tracking state relative to the old newest point.
fn commit(
    vm: &mut dyn VmHandle,
    stored: Result<(PointWriter<'_>, Manifest)>,
    old_heads: (Option<String>, Option<String>),
    run_dir: &Path,
    progress: &dyn Progress,
    warnings: &mut Vec<String>,
    watch: &mut Stopwatch,
) -> Result<ManifestTotals> {
    let (writer, mut manifest) = match stored {
        Ok(stored) => stored,
        Err(err) => {
            if let Err(e) = vm.finish_backup(false) {
                progress.log(LogLevel::Error, &format!("ending the snapshot after a failure failed too: {e:#}; run 'vmbackup cleanup'"));
            }
            return Err(err);
        }
    };
    match vm.finish_backup(true) {
        Ok(token) => manifest.tracking = token,
        Err(e) => {
            let w = format!("ending the snapshot failed: {e:#}; the point is kept, 'vmbackup cleanup' repairs the VM");
            progress.log(LogLevel::Warn, &w);
            warnings.push(w);
        }
    }
    watch.lap("end the snapshot");
    let settle = |vm: &mut dyn VmHandle, latest: Option<&str>, full: Option<&str>| {
        vm.cleanup(latest, full, run_dir).map(|r| r.actions)
    };
    if let Err(err) = writer.commit(&manifest) {
        let (latest, full) = old_heads;
        if let Err(e) = settle(vm, latest.as_deref(), full.as_deref()) {
            progress.log(LogLevel::Error, &format!("restoring changed-block tracking after the failed commit failed too: {e:#}; run 'vmbackup cleanup'"));
        }
        return Err(err);
    }
    watch.lap("commit the point (manifest, fsyncs)");
    let full = match manifest.level {
        Level::Full => Some(manifest.point.as_str()),
        _ => manifest.full.as_deref(),
    };
    if let Err(e) = settle(vm, Some(&manifest.point), full) {
        let w = format!("the point is committed, but dropping superseded changed-block tracking failed: {e:#}; the next run or 'vmbackup cleanup' repeats it");
        progress.log(LogLevel::Warn, &w);
        warnings.push(w);
    }
    watch.lap("drop superseded tracking");
    Ok(manifest.totals)
}

/// The newest point and the newest full among committed points (oldest first):
/// what a VM's changed-block tracking is relative to.
pub fn chain_heads(points: &[Manifest]) -> (Option<&Manifest>, Option<&Manifest>) {
    (
        points.last(),
        points.iter().rev().find(|p| p.level == Level::Full),
    )
}

/// The private scratch directory of one VM inside the run directory, created
/// (0700) if missing, removed again when it is dropped empty (a non-empty one
/// holds what a failed teardown left; the next cleanup of the VM removes it).
/// Its name is a hash of platform and VM name: unique per VM (names that differ
/// only in odd characters do not collide) and 16 characters long whatever the VM
/// is called, so the NBD socket in it always fits a unix socket path (README
/// "Files" has the limit on the state directory's length). One backup or cleanup
/// at a time uses it: the VM's repository lock is held.
pub fn scratch_dir(run_dir: &Path, platform: &str, vm: &str) -> Result<ScratchDir> {
    let mut h = blake3::Hasher::new();
    h.update(platform.as_bytes());
    h.update(&[0]);
    h.update(vm.as_bytes());
    let name: String = h.finalize().as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = run_dir.join(name);
    // Only vmbackup creates entries in the run directory: one owned by another
    // user was handed to a hypervisor running as that user; take it back.
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::MetadataExt;
        let me = rustix::process::geteuid().as_raw();
        if meta.is_dir() && meta.uid() != me {
            std::os::unix::fs::chown(&path, Some(me), Some(rustix::process::getegid().as_raw()))
                .with_context(|| format!("cannot take back {}", path.display()))?;
        }
    }
    crate::private_dir::ensure(&path, "scratch directory")?;
    Ok(ScratchDir { path })
}

/// A VM's scratch directory, in use (see [`scratch_dir`]).
#[derive(Debug)]
pub struct ScratchDir {
    pub path: PathBuf,
}

impl ScratchDir {
    /// Hand the directory to the hypervisor's user (`VmHandle::runs_as`) when it
    /// is not ours: that user owns it (still 0700) and gets search permission
    /// (`o+x`, not read) on the run and state directories above, so it reaches
    /// this directory and nothing else.
    pub fn hand_to(&self, uid: u32, gid: u32) -> Result<()> {
        if uid == rustix::process::geteuid().as_raw() {
            return Ok(());
        }
        use std::os::unix::fs::PermissionsExt;
        for dir in self.path.ancestors().skip(1).take(2) {
            let mode = std::fs::metadata(dir)
                .with_context(|| format!("cannot stat {}", dir.display()))?
                .permissions()
                .mode();
            if mode & 0o001 == 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001))
                    .with_context(|| format!("cannot open {} to QEMU's user", dir.display()))?;
            }
        }
        std::os::unix::fs::chown(&self.path, Some(uid), Some(gid))
            .with_context(|| format!("cannot hand {} to uid {uid}", self.path.display()))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Fails (and keeps it) unless empty.
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Repair what an interrupted run left (R44), under the VM's repository lock:
/// drop incomplete points, then let the platform remove its leftovers (scratch
/// files in the VM's `scratch` directory among them) and reconcile tracking
/// with the newest good point and full (damaged points are left alone). Returns
/// the VM's points and one line per repair.
pub fn repair_leftovers(
    repo: &Repository,
    lock: &VmLock,
    vm: &mut dyn VmHandle,
    scratch: &Path,
) -> Result<(PointList, Vec<String>)> {
    let mut done: Vec<String> = repo
        .remove_incomplete_points(lock)?
        .into_iter()
        .map(|p| format!("removed incomplete point {p}"))
        .collect();
    let points = repo.list_points(lock.vm_key())?;
    let (latest, latest_full) = chain_heads(&points.points);
    let report = vm.cleanup(
        latest.map(|p| p.point.as_str()),
        latest_full.map(|p| p.point.as_str()),
        scratch,
    )?;
    done.extend(report.actions);
    Ok((points, done))
}

#[allow(clippy::too_many_arguments)]
fn write_point<'a>(
    job: &BackupJob,
    repo: &Repository,
    lock: &'a VmLock,
    key: &str,
    point: &str,
    lp: &mut LevelPlan,
    snapshot: &Snapshot,
    vm_config: serde_json::Value,
    progress: Arc<dyn Progress>,
    cancel: Arc<AtomicBool>,
    rt: &tokio::runtime::Handle,
    started: chrono::DateTime<Utc>,
    watch: &mut Stopwatch,
) -> Result<(PointWriter<'a>, Manifest)> {
    progress.phase(Phase::CheckingData);
    let bases = match load_bases(repo, key, lp, snapshot) {
        Ok(bases) => bases,
        Err(e) => {
            // The base is damaged: skip it, read every allocated block.
            let why = format!("{e:#}; this {} reads the whole disk, as a full", lp.level);
            progress.log(LogLevel::Warn, &why);
            *lp = LevelPlan {
                level: Level::Full,
                base: None,
                latest_full: lp.latest_full.clone(),
                fallback: Some(FullInstead {
                    reason: why,
                    planned: false,
                }),
            };
            snapshot.exports.iter().map(|_| None).collect()
        }
    };
    // Slots whose base names a quarantined object are read again from the VM,
    // so the new point is whole, and (same content, same name) so are the
    // older points that named it.
    let quarantined = match bases.iter().any(Option::is_some) {
        true => repo.chunks().quarantined_missing()?,
        false => Default::default(),
    };
    let mut plans = Vec::new();
    for (export, base) in snapshot.exports.iter().zip(bases) {
        let reread = match &base {
            Some(index) if !quarantined.is_empty() => {
                disk::slots_naming(repo.chunks(), index, &quarantined)?
            }
            _ => Vec::new(),
        };
        if !reread.is_empty() {
            progress.log(
                LogLevel::Warn,
                &format!(
                    "disk '{}': {} slot(s) name quarantined objects; they are read again from the VM",
                    export.disk.name,
                    reread.len()
                ),
            );
        }
        plans.push(DiskPlan {
            export: export.clone(),
            base,
            reread,
            chunk_size: job.chunk_size,
        });
    }
    let mut writer = repo.begin_point(lock, point)?;
    watch.lap("load base indexes, begin the point");

    progress.phase(Phase::Running);
    let pipe = Pipeline {
        repo: Arc::new(repo.clone()),
        permits: Arc::new(Semaphore::new(disk::task_slots())),
        buffers: job.buffers.clone(),
        progress: progress.clone(),
        cancel,
        throttle: job.bandwidth.clone(),
        io_timeout: job.io_timeout,
    };
    let results = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (i, plan) in plans.into_iter().enumerate() {
            let pipe = pipe.clone();
            set.spawn(async move { (i, disk::backup_disk(plan, pipe).await) });
        }
        let mut out = Vec::new();
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined.context("disk task panicked")?;
            out.push((i, r?));
        }
        out.sort_by_key(|(i, _)| *i);
        anyhow::Ok(out)
    })?;
    watch.lap("read and store the data");

    let mut disks = Vec::new();
    for ((_, (index, stats)), export) in results.into_iter().zip(&snapshot.exports) {
        let name = &export.disk.name;
        writer.write_index(name, &index)?;
        let chunk_slots = index.slots.iter().filter(|s| **s != Slot::Zero).count() as u64;
        progress.log(
            LogLevel::Info,
            &disk_line(name, lp.level, index.disk_size, &stats, chunk_slots),
        );
        disks.push(ManifestDisk {
            name: name.clone(),
            size: index.disk_size,
            chunk_size: index.chunk_size,
            index: index_file_name(name),
            bytes_read: stats.bytes_read,
            bytes_written: stats.bytes_written,
            new_chunks: stats.new_chunks,
            reused_chunks: chunk_slots.saturating_sub(stats.new_chunks),
            zero_slots: index.zero_slots(),
        });
    }
    watch.lap("write the indexes");
    let totals = ManifestTotals::of(&disks);
    let (base, full) = match lp.level {
        Level::Full => (None, None),
        _ => (lp.base.clone(), lp.latest_full.clone()),
    };
    let manifest = Manifest {
        format: crate::repo::FORMAT_VERSION,
        vm: ManifestVm {
            platform: job.platform.clone(),
            name: job.vm.clone(),
        },
        point: point.to_string(),
        level: lp.level,
        base,
        full,
        status: PointStatus::Completed,
        started,
        finished: job.clock.now().with_timezone(&Utc),
        fallback_reason: lp.fallback.as_ref().map(|f| f.reason.clone()),
        vm_config,
        tracking: None,
        disks,
        totals,
    };
    Ok((writer, manifest))
}

/// A disk's line in the task's log (R32): size, what the plan read (changed
/// bytes for an inc/diff), what was read and stored, and how much was new.
fn disk_line(
    name: &str,
    level: Level,
    size: u64,
    stats: &disk::DiskStats,
    chunk_slots: u64,
) -> String {
    use crate::units::format_size;
    let planned = match level {
        Level::Full => format!("{} allocated", format_size(stats.to_read)),
        _ => format!(
            "{} changed ({} of it now zeros)",
            format_size(stats.to_read + stats.zeroed),
            format_size(stats.zeroed)
        ),
    };
    format!(
        "disk {name}: size {}, {planned}; read {}, stored {} ({} new chunk(s), {} reused)",
        format_size(size),
        format_size(stats.bytes_read),
        format_size(stats.bytes_written),
        stats.new_chunks,
        chunk_slots.saturating_sub(stats.new_chunks)
    )
}

/// A point id for now, strictly after the newest existing point. Ids have
/// one-second resolution, so two backups within one second get consecutive ids.
fn next_point_id(latest: Option<&str>, now: chrono::DateTime<Utc>) -> Result<String> {
    let now = new_point_id(now);
    match latest {
        Some(l) if now.as_str() <= l => Ok(new_point_id(
            parse_point_id(l)? + chrono::Duration::seconds(1),
        )),
        _ => Ok(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_ids_increase_even_within_one_second() {
        let now = Utc::now();
        let a = next_point_id(None, now).unwrap();
        let b = next_point_id(Some(&a), now).unwrap();
        let c = next_point_id(Some(&b), now).unwrap();
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(
            next_point_id(Some("20000101T000000Z"), now).unwrap().len(),
            a.len()
        );
    }
}
