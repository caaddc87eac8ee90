//! Virtualization platforms: what the rest of vmbackup may ask of a hypervisor.
//!
//! A [`Platform`] lists VMs and their disks (inventory, R3/R36/R43) and hands out a
//! [`VmHandle`] for one VM, through which the backup engine takes a point-in-time,
//! changed-block-tracked view of all its disks at once ([`VmHandle::begin_backup`]),
//! ends it ([`VmHandle::finish_backup`]) and repairs what an interrupted run left
//! behind ([`VmHandle::cleanup`], R44).
//!
//! A registered platform is a [`PlatformSpec`] (its type and connection
//! parameters, stored as one JSON value); [`connect`] turns it into a [`Platform`].
//! Drivers: [`qemu`] (QMP over unix sockets) and [`libvirt`] (libvirt's C API).
//! A vSphere driver is one more [`PlatformSpec`] variant and module.
//!
//! ## CBT contract (all drivers)
//! Changed-block tracking is relative to restore points, named by point id:
//! - After a committed point `P`, the VM tracks "changed since `P`" (for the next
//!   incremental) and, when `P` was the newest full `F`, "changed since `F`" (for
//!   differentials).
//! - `begin_backup` with level inc/diff and `base = Some(id)` gives, per disk, the
//!   blocks changed since `id` ([`ChangedBlocks`]: an NBD meta context on the export,
//!   or a list of extents) — a superset is allowed, never a subset. The base point's
//!   tracking token (below) comes back in `BackupRequest::base_tracking`. If the
//!   platform cannot prove that (no
//!   tracking since `id`, tracking lost or inconsistent, disk resized, CBT
//!   unsupported) it returns [`CbtUnavailable`] and changes nothing; the engine then
//!   asks again with level full (R26).
//! - Tracking for the new point starts atomically with the snapshot, so a write is
//!   either in the snapshot or tracked for the next point, never lost.
//! - `finish_backup(true)` is called once the point's data and indexes are stored,
//!   *before* its manifest: it ends the view, keeps the new point's tracking AND the
//!   old base's, and returns the new point's tracking token (an opaque JSON value the
//!   engine stores in the manifest, e.g. libvirt's checkpoint). Tracking moves only
//!   after the commit: the engine then calls `cleanup(new point, newest full)`, which
//!   drops what no future backup needs. If the manifest cannot be written, the engine
//!   calls `cleanup(old newest point, old newest full)`, which folds the new point's
//!   tracking back into the old base's.
//! - `finish_backup(false)` restores the state before `begin_backup` (changes since
//!   the old base keep being tracked, including those made during the failed run).
//! - `cleanup(latest_point, latest_full)` after a crash leaves tracking exactly as a
//!   committed or failed run would have: relative to the newest committed point.

pub mod libvirt;
pub mod qemu;
pub mod qmp;
pub mod quiesce;
pub mod redact;
pub mod spec;

use std::path::PathBuf;

use serde::Serialize;

pub use quiesce::{freeze_marker, hold_frozen_for_tests, FreezeOutcome};
pub use spec::{PlatformKind, PlatformSpec};

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
    /// is in one rule only (R35): `qemu:<canonical path of its QMP socket>`; libvirt:
    /// `libvirt:<host>/<domain UUID>`. `None` in
    /// inventories cached before identities were recorded (refresh fills it).
    #[serde(default)]
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
    /// The base point's tracking token (what `finish_backup` returned for it).
    pub base_tracking: Option<TrackingToken>,
    /// Freeze guest file systems while the snapshot is taken (R10).
    pub quiesce: Quiesce,
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
    /// The blocks changed since the base point, for inc/diff; `None` for full.
    pub changes: Option<ChangedBlocks>,
}

/// How a platform hands over the blocks changed since the base point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangedBlocks {
    /// An NBD meta context of the export whose flag bit 1 marks changed blocks
    /// (QEMU: `qemu:dirty-bitmap:NAME`).
    MetaContext(String),
    /// Changed byte ranges `(offset, length)`, as a platform API lists them
    /// (vSphere's `QueryChangedDiskAreas`).
    Extents(Vec<(u64, u64)>),
}

impl ChangedBlocks {
    /// The meta context to negotiate on the export, if the changes come that way.
    pub fn meta_context(&self) -> Option<&str> {
        match self {
            ChangedBlocks::MetaContext(c) => Some(c),
            ChangedBlocks::Extents(_) => None,
        }
    }
}

/// A platform's record of where a point's changed-block tracking starts, returned
/// by `finish_backup`, stored in the point's manifest (`tracking`) and handed back
/// as `BackupRequest::base_tracking`. Opaque to the engine and the repository
/// (libvirt: the checkpoint's name and XML; vSphere: per-disk `changeId`s).
pub type TrackingToken = serde_json::Value;

/// Whether to freeze guest file systems around the snapshot (R10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quiesce {
    /// Crash-consistent snapshots.
    #[default]
    Off,
    /// Freeze through the guest agent; fail the backup when that is impossible.
    Require,
    /// Freeze when the guest agent answers; else crash-consistent, with a warning.
    Try,
}

impl std::fmt::Display for Quiesce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quiesce::Off => "off",
            Quiesce::Require => "require",
            Quiesce::Try => "try",
        })
    }
}

/// A line the driver wants in the task log (e.g. "froze 2 guest file systems").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    Info(String),
    Warn(String),
}

/// An open point-in-time view of all disks of a VM.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub exports: Vec<DiskExport>,
    /// What happened while taking it (quiesce results), for the task log.
    pub notes: Vec<Note>,
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

/// A new VM to define from a restored point ("restore as a new VM").
#[derive(Debug, Clone)]
pub struct NewVm<'a> {
    pub name: &'a str,
    /// The point's `vm_config`, as the platform gave it at backup time.
    pub config: &'a serde_json::Value,
    /// Each restored disk: its name in the point, image file and image format.
    pub disks: Vec<(String, PathBuf, &'a str)>,
    /// Start it once defined.
    pub start: bool,
}

/// A VM `define_vm` made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DefinedVm {
    pub name: String,
    pub identity: Option<String>,
    /// Started once defined (`restore --start`). JSON: `running`, as `started`
    /// names a time in every document (docs/JSON.md).
    #[serde(rename = "running")]
    pub started: bool,
}

/// A virtualization host or manager.
pub trait Platform: Send + Sync {
    /// Whether the platform answers now (R31 `unknown` when it does not); the
    /// error says why.
    fn reachable(&self) -> anyhow::Result<()>;
    /// Every VM with its disks. A VM that cannot be queried has `error` set.
    fn inventory(&self) -> anyhow::Result<Vec<VmInfo>>;
    /// Open one VM by name for backup work.
    fn open_vm(&self, vm: &str) -> anyhow::Result<Box<dyn VmHandle>>;
    /// Define (and maybe start) a new VM from a restored point's configuration
    /// on its restored images. Platforms without VM definitions refuse
    /// ([`PlatformSpec::why_no_new_vm`] says why).
    fn define_vm(&self, vm: &NewVm) -> anyhow::Result<DefinedVm> {
        anyhow::bail!("this platform cannot define VM '{}'", vm.name)
    }
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
    /// End the view. `stored = true`: the point's data is stored and its manifest is
    /// about to be written; returns the new point's tracking token (see module docs).
    /// `stored = false`: the run failed; restore the tracking state it found.
    fn finish_backup(&mut self, stored: bool) -> anyhow::Result<Option<TrackingToken>>;
    /// Once `cancel` is set, stop waiting for the hypervisor soon (a few
    /// seconds: enough to tear the view down on a healthy one), so a cancelled
    /// task on a stuck hypervisor ends at once; its leftovers are repaired by the
    /// next `cleanup`. The default (a driver that never blocks long) does nothing.
    fn watch_cancel(&mut self, _cancel: std::sync::Arc<std::sync::atomic::AtomicBool>) {}
    /// The user and group the hypervisor process runs as, when it opens scratch
    /// files itself (qemu: fleecing images, the NBD socket): the engine hands
    /// the VM's scratch directory to that user. `None`: it never does.
    fn runs_as(&mut self) -> anyhow::Result<Option<(u32, u32)>> {
        Ok(None)
    }
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

/// Connect to a registered platform; every request to a `qemu` platform waits at
/// most `io_timeout` (system.conf) for its answer. libvirt calls are bounded by
/// libvirt's own keepalive.
pub fn connect(
    spec: &PlatformSpec,
    io_timeout: std::time::Duration,
) -> anyhow::Result<Box<dyn Platform>> {
    match spec {
        PlatformSpec::Qemu { qmp_dir } => Ok(Box::new(
            qemu::QemuPlatform::new(qmp_dir.clone()).with_timeout(io_timeout),
        )),
        PlatformSpec::Libvirt { uri } => Ok(Box::new(libvirt::LibvirtPlatform::connect(uri)?)),
    }
}
