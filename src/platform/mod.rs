//! Virtualization platforms: what the rest of vmbackup may ask of a hypervisor.
//!
//! A [`Platform`] lists VMs and their disks (inventory, R3/R36/R43) and hands out a
//! [`VmHandle`] for one VM, through which the backup engine takes a point-in-time,
//! changed-block-tracked view of all its disks at once ([`VmHandle::begin_backup`]),
//! ends it ([`VmHandle::finish_backup`]) and repairs what an interrupted run left
//! behind ([`VmHandle::cleanup`], R44).
//!
//! Only `qemu` exists today ([`qemu`]: QMP over unix sockets). libvirt and vSphere
//! drivers implement the same two traits.
//!
//! ## CBT contract (all drivers)
//! Changed-block tracking is relative to restore points, named by point id:
//! - After a committed point `P`, the VM tracks "changed since `P`" (for the next
//!   incremental) and, when `P` was the newest full `F`, "changed since `F`" (for
//!   differentials).
//! - `begin_backup` with level inc/diff and `base = Some(id)` exports, per disk, an
//!   NBD meta context whose dirty extents are exactly the blocks changed since `id`
//!   (a superset is allowed, never a subset). If the platform cannot prove that (no
//!   tracking since `id`, tracking lost or inconsistent, disk resized, CBT
//!   unsupported) it returns [`CbtUnavailable`] and changes nothing; the engine then
//!   asks again with level full (R26).
//! - Tracking for the new point starts atomically with the snapshot, so a write is
//!   either in the snapshot or tracked for the next point, never lost.
//! - `finish_backup(true)` makes the new point the tracking base; `finish_backup(false)`
//!   restores the state before `begin_backup` (changes since the old base keep being
//!   tracked, including those made during the failed run).
//! - `cleanup(latest_point, latest_full)` after a crash leaves tracking exactly as a
//!   `finish_backup` would have: relative to the newest committed point.

pub mod qemu;
pub mod qmp;
pub mod redact;

use std::path::PathBuf;

use serde::Serialize;

use crate::level::Level;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum NbdAddr {
    Unix { path: PathBuf },
    Tcp { host: String, port: u16 },
}

/// One VM as the platform reports it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct VmInfo {
    /// The VM's name (QEMU: `query-name`, else the QMP socket's file stem).
    pub name: String,
    /// Run state as the platform says it (`running`, `paused`, `prelaunch`, ...).
    pub status: String,
    /// Disks in device order.
    pub disks: Vec<DiskInfo>,
    /// Set when the VM could not be queried (e.g. its socket does not answer);
    /// the other fields are then empty. One bad VM never hides the others.
    pub error: Option<String>,
    /// What makes this VM the same VM whichever platform reaches it, so that it
    /// is in one rule only (R35): `qemu:<canonical path of its QMP socket>`; a
    /// libvirt driver would use `libvirt:<host>/<domain UUID>`. `None` in
    /// inventories cached before identities were recorded (refresh fills it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct DiskInfo {
    /// Stable name used in the repository and the CLI: the guest device id
    /// (`vda`) where there is one, else the block node name.
    pub name: String,
    /// The format node that holds the data (and the dirty bitmaps).
    pub node: String,
    /// Image file, when the node sits on a file.
    pub file: Option<String>,
    /// Image format (`qcow2`, `raw`, ...).
    pub format: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Whether CBT is possible (QEMU: persistent dirty bitmaps need qcow2).
    pub cbt: bool,
    /// Why a snapshot cannot cover this disk (shareable, passthrough/LUN,
    /// read-only removable media, ...), R43. `None` = coverable.
    pub uncoverable: Option<String>,
}

/// What the engine asks for when it starts a backup of one VM.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// Id of the point being made; drivers name their tracking state after it.
    pub new_point: String,
    /// Requested level. Full ignores `base`.
    pub level: Level,
    /// Inc: the newest committed point. Diff: the newest committed full.
    pub base: Option<String>,
    /// The newest committed full (drivers that keep a differential bitmap need it).
    pub latest_full: Option<String>,
    /// Keep tracking changes (false: CBT switched off or unsupported; a plain
    /// point-in-time export, every backup a full).
    pub track: bool,
    /// Freeze guest file systems while the snapshot is taken (R10).
    pub quiesce: bool,
    /// Exports may go through an NBD server the VM already runs on plain TCP
    /// (the rule's `--allow-plain-tcp-export`); otherwise such a backup is refused.
    pub allow_plain_tcp_export: bool,
    /// This VM's private scratch directory (0700, its name bounded in length):
    /// where the driver puts fleecing images and sockets.
    pub run_dir: PathBuf,
}

/// One disk's point-in-time export.
#[derive(Debug, Clone)]
pub struct DiskExport {
    pub disk: DiskInfo,
    pub addr: NbdAddr,
    /// NBD export name.
    pub export: String,
    /// Meta context holding the changed extents for inc/diff
    /// (e.g. `qemu:dirty-bitmap:vmbackup-inc-20261124T120000Z`); `None` for full.
    pub dirty_context: Option<String>,
}

/// An open point-in-time view of all disks of a VM.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub exports: Vec<DiskExport>,
}

/// The platform cannot serve an inc/diff relative to the requested base (R26).
/// Returned (inside anyhow) by `begin_backup`; nothing was changed.
#[derive(Debug, thiserror::Error)]
#[error("changed-block tracking unavailable for disk '{disk}': {reason}")]
pub struct CbtUnavailable {
    pub disk: String,
    pub reason: String,
}

/// What `cleanup` found and removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CleanupReport {
    /// One line per thing removed or repaired, for the log.
    pub actions: Vec<String>,
}

/// A virtualization host or manager.
pub trait Platform: Send + Sync {
    /// Every VM with its disks. A VM that cannot be queried has `error` set.
    fn inventory(&self) -> anyhow::Result<Vec<VmInfo>>;
    /// Open one VM by name for backup work.
    fn open_vm(&self, vm: &str) -> anyhow::Result<Box<dyn VmHandle>>;
}

/// One VM, opened for backup work. Dropping it does not clean up: call
/// `finish_backup` or `cleanup`.
pub trait VmHandle: Send {
    /// Fresh inventory of this VM.
    fn info(&mut self) -> anyhow::Result<VmInfo>;
    /// The VM's configuration as the platform describes it (stored in each
    /// point's manifest, R31 "backing up VM configuration").
    fn config(&mut self) -> anyhow::Result<serde_json::Value>;
    /// Freeze one consistent view of all disks and export it (see module docs).
    fn begin_backup(&mut self, req: &BackupRequest) -> anyhow::Result<Snapshot>;
    /// End the view; `committed` says whether the point was committed.
    fn finish_backup(&mut self, committed: bool) -> anyhow::Result<()>;
    /// Once `cancel` is set, stop waiting for the hypervisor soon (a few
    /// seconds: enough to tear the view down on a healthy one), so a cancelled
    /// task on a stuck hypervisor ends at once; its leftovers are repaired by the
    /// next `cleanup`. The default (a driver that never blocks long) does nothing.
    fn watch_cancel(&mut self, _cancel: std::sync::Arc<std::sync::atomic::AtomicBool>) {}
    /// What identifies the running VM itself (qemu: its QEMU process, however
    /// many monitors reach it), so that two rules never back it up at once.
    /// `None` when the driver cannot tell.
    fn running_identity(&mut self) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
    /// Remove leftovers of interrupted runs and reconcile tracking with the newest
    /// committed point / full (R44). Idempotent; safe when nothing is left over.
    fn cleanup(
        &mut self,
        latest_point: Option<&str>,
        latest_full: Option<&str>,
        run_dir: &std::path::Path,
    ) -> anyhow::Result<CleanupReport>;
}

/// Connect to a registered platform from its stored kind and parameters; every
/// request to it waits at most `io_timeout` (system.conf) for its answer.
pub fn connect(
    kind: &str,
    qmp_dir: &std::path::Path,
    io_timeout: std::time::Duration,
) -> anyhow::Result<Box<dyn Platform>> {
    match kind {
        "qemu" => Ok(Box::new(
            qemu::QemuPlatform::new(qmp_dir.to_path_buf()).with_timeout(io_timeout),
        )),
        other => Err(crate::error::invalid(
            "platform type",
            other,
            "allowed: qemu",
        )),
    }
}

/// Whether a platform type can freeze guest file systems around its snapshot
/// (R10). None can yet: QEMU's guest agent listens on a socket of its own, which
/// the `qemu` driver does not reach, so its snapshots are crash-consistent. Rules
/// asking for quiesced snapshots are refused rather than silently not quiesced.
pub fn can_quiesce(_kind: &str) -> bool {
    false
}
