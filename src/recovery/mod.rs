//! Recovery: a restore point's disks served over NBD straight from the
//! repository, and what is built on that (issue 11, R32, R34, R37, R38).
//!
//! - **Transient recovery** (瞬时恢复, [`start`]): a background server process of
//!   vmbackup's ([`server`]) serves the point on a unix socket of its own; a
//!   qcow2 overlay per disk (backing = the export, with a reconnect delay) takes
//!   writes; with `--start` a VM launched from the captured configuration
//!   ([`cmdline`], [`launch`]) runs on the overlays. The repository is never
//!   written. The recovery task stays `running`, owned by the server process,
//!   until [`stop`].
//! - **Instant recovery** (即时恢复, [`mirror`]): a transient recovery whose disks
//!   QEMU mirrors to new images while the VM runs, then pivots; the export
//!   closes and the VM joins the platform's QMP directory.
//! - **Restore as a VM** ([`as_vm`]) and **in place** ([`in_place`]).
//! - **Boot verification** ([`boot`]): a transient recovery booted and judged.
//!
//! A recovery's facts live in the state store (`state::recoveries`); its id is
//! the id of the task that started it.

pub mod as_vm;
pub mod boot;
pub mod cmdline;
pub mod export;
pub mod in_place;
pub mod launch;
pub mod mirror;
pub mod server;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use self::cmdline::{DiskImage, LaunchOptions, Net, Rewrite};
use crate::repo::{encode_name, Manifest};
use crate::state::recoveries::{RecoveredDisk, RecoveryMode, RecoveryRow, RecoveryStage};
use crate::state::rules::RuleRow;
use crate::state::slots::{now_millis_text, pid_alive};
use crate::state::State;
use crate::task::progress::{LogLevel, Progress};

/// How long QEMU's NBD client retries a lost server before failing requests.
pub const RECONNECT_DELAY_SECS: u32 = 300;

/// What `recover` was asked for.
#[derive(Debug, Clone)]
pub struct RecoverOptions {
    pub mode: RecoveryMode,
    /// Launch the VM (always for instant recovery).
    pub start: bool,
    pub launch: LaunchOptions,
    /// Where the overlays go instead of the recovery's directory.
    pub overlay_dir: Option<PathBuf>,
    /// Instant recovery: where the new images go.
    pub target_dir: Option<PathBuf>,
    /// Instant recovery: the platform's QMP directory (the VM joins it).
    pub qmp_dir: Option<PathBuf>,
    /// Restart the server of this existing recovery instead of a new one.
    pub resume: Option<i64>,
}

/// What `start` needs besides the options.
pub struct StartRequest<'a> {
    pub state_path: &'a Path,
    pub rule: &'a RuleRow,
    pub vm: &'a str,
    pub point: &'a Manifest,
    pub task: i64,
    pub opts: &'a RecoverOptions,
}

/// A started recovery, as `recover` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryReport {
    pub recovery: i64,
    pub task: i64,
    pub point: String,
    pub mode: RecoveryMode,
    pub socket: PathBuf,
    pub server_pid: u32,
    pub disks: Vec<RecoveredDisk>,
    /// The started VM, if any (JSON: `started_vm`; `vm` names the VM recovered).
    #[serde(rename = "started_vm")]
    pub vm: Option<StartedVm>,
    /// A QEMU command line that runs the VM on the overlays (what `--start` runs).
    pub command_line: Option<Vec<String>>,
    /// Why no command line could be made (e.g. a qemu-storage-daemon "VM").
    pub command_line_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StartedVm {
    pub name: String,
    pub pid: u32,
    pub qmp: PathBuf,
}

impl RecoveryReport {
    pub fn summary(&self) -> Vec<String> {
        let mut out = vec![format!(
            "recovery {} of point {} served on {} (server pid {})",
            self.recovery,
            self.point,
            self.socket.display(),
            self.server_pid
        )];
        for d in &self.disks {
            out.push(format!("disk {}: {} overlay {}", d.disk, d.uri, d.overlay));
        }
        if let Some(vm) = &self.vm {
            out.push(format!(
                "VM '{}' started (pid {}, QMP {})",
                vm.name,
                vm.pid,
                vm.qmp.display()
            ));
        }
        out
    }
}

/// The private directory of a recovery: `<state dir>/recover/<id>`.
pub fn recovery_dir(state_path: &Path, id: i64) -> PathBuf {
    state_path
        .parent()
        .unwrap_or(Path::new("."))
        .join("recover")
        .join(id.to_string())
}

/// Create a directory 0700 that must not exist yet, in a parent that is
/// private to this user (`crate::private_dir::ensure`: created 0700, refused
/// when others can write it).
pub fn private_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent() {
        crate::private_dir::ensure(parent, "recovery directory")?;
    }
    new_private_dir(dir)
}

/// Create a directory 0700 that must not exist yet (mkdir neither follows nor
/// replaces anything planted there), in a parent of the user's choosing.
pub fn new_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// The recovered VM's default name.
pub fn default_name(vm: &str, id: i64) -> String {
    format!("{vm}-recovered-{id}")
}

/// The disks of the VM as the platform reported them at backup (manifest
/// `vm_config.disks`): node, file and format by disk name.
fn platform_disks(point: &Manifest) -> Vec<(String, String, Option<String>, String)> {
    point.vm_config["disks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    (
                        d["name"].as_str().unwrap_or_default().to_string(),
                        d["node"].as_str().unwrap_or_default().to_string(),
                        d["file"].as_str().map(String::from),
                        d["format"].as_str().unwrap_or("raw").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The captured QEMU command line of a point, if any.
pub fn captured_cmdline(point: &Manifest) -> Option<Vec<String>> {
    crate::platform::qemu::cmdline_of(&point.vm_config)
}

/// The disks of `point` as they will run on `images` (disk name → image, format).
pub fn disk_images(point: &Manifest, images: &[(String, PathBuf, String)]) -> Vec<DiskImage> {
    let known = platform_disks(point);
    images
        .iter()
        .map(|(name, image, format)| {
            let (node, file) = known
                .iter()
                .find(|(n, ..)| n == name)
                .map(|(_, node, file, _)| (node.clone(), file.clone()))
                .unwrap_or_else(|| (name.clone(), None));
            DiskImage {
                name: name.clone(),
                node,
                file,
                image: image.clone(),
                format: format.clone(),
            }
        })
        .collect()
}

/// Create a qcow2 overlay at `path` over `export` of the server on `socket`.
/// QEMU's NBD client reconnects for [`RECONNECT_DELAY_SECS`] when the server
/// goes away, so a restarted server is picked up.
pub fn create_overlay(path: &Path, socket: &Path, export: &str, size: u64) -> Result<()> {
    let backing = serde_json::json!({
        "driver": "raw",
        "file": {
            "driver": "nbd",
            "server": { "type": "unix", "path": socket },
            "export": export,
            "reconnect-delay": RECONNECT_DELAY_SECS,
        }
    });
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(format!("json:{backing}"))
        .arg(path)
        .arg(size.to_string())
        .output()
        .context("cannot run qemu-img (package qemu-utils)")?;
    if !out.status.success() {
        bail!(
            "cannot create overlay {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

/// Start a transient recovery (or restart the server of an existing one, with
/// `opts.resume`): serve, create overlays, maybe launch the VM.
pub fn start(req: &StartRequest, progress: &dyn Progress) -> Result<RecoveryReport> {
    let mut state = State::open(req.state_path)?;
    let opts = req.opts;
    let (mut row, fresh) = match opts.resume {
        Some(id) => {
            let mut row = state.require_recovery(id)?;
            // The server reads which task it runs from the row.
            row.task = req.task;
            state.update_recovery(&row)?;
            (row, false)
        }
        None => {
            let dir = recovery_dir(req.state_path, req.task);
            private_dir(&dir)?;
            let row = RecoveryRow {
                id: req.task,
                task: req.task,
                rule: req.rule.name.clone(),
                vm: req.vm.to_string(),
                point: req.point.point.clone(),
                mode: opts.mode,
                stage: RecoveryStage::Serving,
                socket: dir.join("nbd.sock").display().to_string(),
                dir: dir.display().to_string(),
                server_pid: None,
                vm_name: None,
                vm_pid: None,
                vm_qmp: None,
                disks: Vec::new(),
                target_dir: opts.target_dir.as_ref().map(|p| p.display().to_string()),
                qmp_dir: opts.qmp_dir.as_ref().map(|p| p.display().to_string()),
                migration_task: None,
                created: now_millis_text(),
                finished: None,
            };
            state.add_recovery(&row)?;
            (row, true)
        }
    };
    let mut guard = Undo::new(req.state_path, row.id, fresh);
    let socket = PathBuf::from(&row.socket);
    let dir = PathBuf::from(&row.dir);
    progress.log(
        LogLevel::Info,
        &format!("serving point {} on {}", req.point.point, socket.display()),
    );
    let pid = server::spawn(req.state_path, row.id, &dir)?;
    guard.server = Some(pid);
    row.server_pid = Some(i64::from(pid));
    state.update_recovery(&row)?;

    if fresh {
        let overlay_dir = match &opts.overlay_dir {
            Some(d) => {
                let d = d.join(format!("recover-{}", row.id));
                new_private_dir(&d)?;
                guard.extra_dir = Some(d.clone());
                d
            }
            None => dir.clone(),
        };
        for d in &req.point.disks {
            let overlay = overlay_dir.join(format!("{}.overlay.qcow2", encode_name(&d.name)));
            create_overlay(&overlay, &socket, &d.name, d.size)?;
            row.disks.push(RecoveredDisk {
                disk: d.name.clone(),
                export: d.name.clone(),
                uri: export::unix_uri(&socket, &d.name),
                size: d.size,
                overlay: overlay.display().to_string(),
                node: None,
                target: None,
            });
        }
        state.update_recovery(&row)?;
    }

    let name = opts
        .launch
        .name
        .clone()
        .unwrap_or_else(|| default_name(req.vm, row.id));
    let qmp = match (opts.mode, &opts.qmp_dir) {
        // The VM joins the platform's directory once migrated: its socket is made
        // on that file system, in a hidden directory the platform does not list.
        (RecoveryMode::Instant, Some(q)) => {
            let hidden = q.join(".vmbackup-recovering");
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&hidden)
                .with_context(|| format!("cannot create {}", hidden.display()))?;
            hidden.join(format!("{}.qmp", row.id))
        }
        _ => dir.join("vm.qmp"),
    };
    let pidfile = dir.join("vm.pid");
    let images: Vec<(String, PathBuf, String)> = row
        .disks
        .iter()
        .map(|d| {
            (
                d.disk.clone(),
                PathBuf::from(&d.overlay),
                "qcow2".to_string(),
            )
        })
        .collect();
    let disks = disk_images(req.point, &images);
    let planned = match captured_cmdline(req.point) {
        Some(line) => cmdline::rewrite(
            &line,
            &Rewrite {
                name: &name,
                disks: &disks,
                qmp_socket: &qmp,
                dir: &dir,
                net: &opts.launch.net,
                secrets: &opts.launch.secrets,
                serial_log: None,
                agent_socket: None,
                accel: opts.launch.accel,
                pidfile: Some(&pidfile),
            },
        ),
        None => Err(crate::error::refused(
            "the point has no captured QEMU command line",
        )),
    };
    let (command_line, command_line_error) = match &planned {
        Ok(l) => (Some(l.args.clone()), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let mut started = None;
    if fresh && opts.start {
        let launch_args = planned?.args;
        let vm_pid = launch::launch_daemonized(&launch_args, &pidfile, &dir.join("vm.log"))?;
        progress.log(
            LogLevel::Info,
            &format!("VM '{name}' started (pid {vm_pid})"),
        );
        row.vm_name = Some(name.clone());
        row.vm_pid = Some(i64::from(vm_pid));
        row.vm_qmp = Some(qmp.display().to_string());
        for d in row.disks.iter_mut() {
            d.node = disks
                .iter()
                .find(|x| x.name == d.disk)
                .map(|x| x.node.clone());
        }
        state.update_recovery(&row)?;
        started = Some(StartedVm {
            name,
            pid: vm_pid,
            qmp,
        });
    } else if let (Some(vm_name), Some(vm_pid), Some(q)) = (&row.vm_name, row.vm_pid, &row.vm_qmp) {
        started = Some(StartedVm {
            name: vm_name.clone(),
            pid: vm_pid as u32,
            qmp: PathBuf::from(q),
        });
    }
    guard.disarm();
    Ok(RecoveryReport {
        recovery: row.id,
        task: req.task,
        point: req.point.point.clone(),
        mode: row.mode,
        socket,
        server_pid: pid,
        disks: row.disks.clone(),
        vm: started,
        command_line,
        command_line_error,
    })
}

/// Undoes a half-started recovery: stops its server, removes what it created.
struct Undo {
    state_path: PathBuf,
    id: i64,
    fresh: bool,
    server: Option<u32>,
    extra_dir: Option<PathBuf>,
    armed: bool,
}

impl Undo {
    fn new(state_path: &Path, id: i64, fresh: bool) -> Undo {
        Undo {
            state_path: state_path.to_path_buf(),
            id,
            fresh,
            server: None,
            extra_dir: None,
            armed: true,
        }
    }
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(pid) = self.server {
            launch::signal(i64::from(pid), rustix::process::Signal::Term);
            launch::wait_gone(i64::from(pid), std::time::Duration::from_secs(10));
        }
        if !self.fresh {
            return;
        }
        if let Ok(mut state) = State::open(&self.state_path) {
            if let Ok(Some(mut row)) = state.recovery(self.id) {
                if let Some(pid) = row.vm_pid {
                    let _ = launch::quit_vm(row.vm_qmp.as_deref().map(Path::new), Some(pid));
                }
                let _ = std::fs::remove_dir_all(&row.dir);
                row.stage = RecoveryStage::Stopped;
                row.finished = Some(now_millis_text());
                let _ = state.update_recovery(&row);
            }
        }
        if let Some(d) = &self.extra_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A recovery as `recover list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryView {
    #[serde(flatten)]
    pub row: RecoveryRow,
    pub server_running: bool,
    pub vm_running: bool,
    /// The status of its current task (`running` while it serves).
    pub status: Option<crate::task::TaskState>,
}

/// Recoveries not stopped (all with `all`), with what still runs.
pub fn list(state: &State, all: bool) -> Result<Vec<RecoveryView>> {
    state
        .recoveries(all)?
        .into_iter()
        .map(|row| {
            let status = state.task(row.task)?.map(|t| t.state);
            Ok(RecoveryView {
                server_running: row
                    .server_pid
                    .is_some_and(|p| launch::pid_runs(p, "recover-serve")),
                vm_running: row.vm_pid.is_some_and(pid_alive),
                status,
                row,
            })
        })
        .collect()
}

/// What `recover stop` did.
#[derive(Debug, Clone, Serialize)]
pub struct StopReport {
    pub recovery: i64,
    pub actions: Vec<String>,
    pub kept_overlays: Vec<String>,
}

/// Stop a recovery: the VM, the server, the partial images of an unfinished
/// migration, and (unless `keep_overlays`) the overlays. The repository is
/// never written.
pub fn stop(state_path: &Path, id: i64, keep_overlays: bool) -> Result<StopReport> {
    let mut state = State::open(state_path)?;
    let mut row = state.require_recovery(id)?;
    if row.stage == RecoveryStage::Stopped {
        return Err(crate::error::refused(format!(
            "recovery {id} is already stopped"
        )));
    }
    let mut actions = Vec::new();
    let task_active = state.task(row.task)?.is_some_and(|t| t.state.is_active());
    if task_active {
        // This process owns the task now: the server's exit is not its end.
        state.hand_over_task(row.task, std::process::id(), "stopping")?;
    }
    if row.stage != RecoveryStage::Migrated {
        if let Some(pid) = row.vm_pid.filter(|p| pid_alive(*p)) {
            launch::quit_vm(row.vm_qmp.as_deref().map(Path::new), Some(pid))?;
            actions.push(format!(
                "stopped VM '{}' (pid {pid})",
                row.vm_name.as_deref().unwrap_or("?")
            ));
        }
    }
    if let Some(pid) = row
        .server_pid
        .filter(|p| launch::pid_runs(*p, "recover-serve"))
    {
        launch::signal(pid, rustix::process::Signal::Term);
        if !launch::wait_gone(pid, std::time::Duration::from_secs(10)) {
            launch::signal(pid, rustix::process::Signal::Kill);
            launch::wait_gone(pid, std::time::Duration::from_secs(5));
        }
        actions.push(format!("stopped the NBD server (pid {pid})"));
    }
    if row.stage == RecoveryStage::Migrating {
        for d in &row.disks {
            if let Some(t) = &d.target {
                if std::fs::remove_file(t).is_ok() {
                    actions.push(format!("removed the partial image {t}"));
                }
            }
        }
    }
    let mut kept = Vec::new();
    for d in &row.disks {
        if keep_overlays {
            kept.push(d.overlay.clone());
        } else if std::fs::remove_file(&d.overlay).is_ok() {
            actions.push(format!("removed overlay {}", d.overlay));
        }
    }
    if !keep_overlays {
        for d in &row.disks {
            if let Some(parent) = Path::new(&d.overlay).parent() {
                if parent != Path::new(&row.dir) {
                    let _ = std::fs::remove_dir(parent);
                }
            }
        }
    }
    remove_dir_except(Path::new(&row.dir), &kept)?;
    if let Some(q) = row
        .vm_qmp
        .as_deref()
        .filter(|_| row.stage != RecoveryStage::Migrated)
    {
        let _ = std::fs::remove_file(q);
    }
    row.stage = RecoveryStage::Stopped;
    row.finished = Some(now_millis_text());
    state.update_recovery(&row)?;
    if task_active {
        state.log(
            row.task,
            LogLevel::Info,
            &format!("recovery stopped: {}", actions.join("; ")),
        )?;
        state.end_task(
            row.task,
            crate::task::TaskState::Completed,
            Some(&row.point),
            Some("stopped by 'recover stop'"),
        )?;
    }
    Ok(StopReport {
        recovery: id,
        actions,
        kept_overlays: kept,
    })
}

/// Remove `dir` and everything in it but the files in `keep`.
fn remove_dir_except(dir: &Path, keep: &[String]) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if keep.iter().all(|k| !Path::new(k).starts_with(dir)) {
        return std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot remove {}", dir.display()));
    }
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if !keep.iter().any(|k| Path::new(k) == p) {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
    Ok(())
}

/// The recovery's first task: the net choice words for messages.
pub fn net_label(net: &Net) -> String {
    match net {
        Net::None => "none".into(),
        Net::User => "user".into(),
        Net::Bridge(b) => format!("bridge {b}"),
    }
}
