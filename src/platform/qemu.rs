//! The QEMU platform: VMs are QMP sockets in one directory.
//!
//! Each `*.qmp` or `*.sock` unix socket in the directory is one VM (qemu-system or
//! qemu-storage-daemon), named by `query-name` when set, else by the socket's file
//! stem. Everything goes through QMP ([`super::qmp`]); the point-in-time view is
//! fleecing plus dirty bitmaps exported over QEMU's own NBD server (see `backup`).
//!
//! Quiesce (R10, `agent`): through the guest agent's socket, found on the VM's
//! command line (an `org.qemu.guest_agent.0` channel on a listening unix socket).

mod agent;
mod backup;
mod cleanup;
mod graph;
mod inventory;
pub mod names;
mod nbd_server;

pub use nbd_server::read_cmdline;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use self::backup::ActiveBackup;
use self::inventory::{identity_of, query_vm, VmKind};
use super::qmp::{Qmp, DEFAULT_TIMEOUT};
use super::{
    BackupRequest, CleanupReport, FreezeOutcome, Platform, Quiesce, Snapshot, TrackingToken,
    VmHandle, VmInfo,
};

/// VMs whose QMP sockets live in one directory.
pub struct QemuPlatform {
    qmp_dir: PathBuf,
    timeout: Duration,
}

impl QemuPlatform {
    pub fn new(qmp_dir: PathBuf) -> QemuPlatform {
        QemuPlatform {
            qmp_dir,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// How long one QMP command may wait for its answer (system.conf
    /// `io_timeout`; default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> QemuPlatform {
        self.timeout = timeout;
        self
    }

    /// The QMP sockets in the directory, sorted by path.
    fn sockets(&self) -> Result<Vec<PathBuf>> {
        use std::os::unix::fs::FileTypeExt;
        let entries = std::fs::read_dir(&self.qmp_dir)
            .with_context(|| format!("list QMP directory {}", self.qmp_dir.display()))?;
        let mut sockets = Vec::new();
        for entry in entries {
            let entry =
                entry.with_context(|| format!("list QMP directory {}", self.qmp_dir.display()))?;
            let path = entry.path();
            let is_qmp_name = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("qmp") | Some("sock")
            );
            // Symlinked sockets count (the VM's identity, the canonical path,
            // tells two names of one socket apart from two VMs).
            let is_socket = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_socket());
            if is_qmp_name && is_socket {
                sockets.push(path);
            }
        }
        sockets.sort();
        Ok(sockets)
    }

    fn connect(&self, socket: &Path) -> Result<QemuVm> {
        let mut qmp = Qmp::connect_with_timeout(socket, self.timeout)?;
        let stem = stem_of(socket);
        let state = query_vm(&mut qmp, &stem)?;
        Ok(QemuVm {
            name: state.info.name,
            stem,
            kind: state.kind,
            qmp,
            active: None,
            removed_inconsistent: Vec::new(),
        })
    }
}

/// The QEMU command line captured in a point's VM configuration (`"cmdline"`,
/// secrets redacted), if the point has one.
pub fn cmdline_of(config: &serde_json::Value) -> Option<Vec<String>> {
    config["cmdline"].as_array().map(|a| {
        a.iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect()
    })
}

fn stem_of(socket: &Path) -> String {
    socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Platform for QemuPlatform {
    fn reachable(&self) -> Result<()> {
        if self.qmp_dir.is_dir() {
            Ok(())
        } else {
            bail!("QMP directory {} does not exist", self.qmp_dir.display())
        }
    }

    fn inventory(&self) -> Result<Vec<VmInfo>> {
        let mut vms = Vec::new();
        for socket in self.sockets()? {
            let queried = Qmp::connect_with_timeout(&socket, self.timeout)
                .and_then(|mut qmp| query_vm(&mut qmp, &stem_of(&socket)));
            vms.push(match queried {
                Ok(state) => state.info,
                Err(e) => VmInfo {
                    name: stem_of(&socket),
                    status: String::new(),
                    disks: Vec::new(),
                    error: Some(format!("QMP socket {}: {e:#}", socket.display())),
                    identity: Some(identity_of(&socket)),
                },
            });
        }
        Ok(vms)
    }

    fn open_vm(&self, vm: &str) -> Result<Box<dyn VmHandle>> {
        let mut sockets = self.sockets()?;
        // The socket named after the VM first: usually the right one.
        sockets.sort_by_key(|s| stem_of(s) != vm);
        let mut first_error = None;
        for socket in sockets {
            match self.connect(&socket) {
                Ok(handle) if handle.name == vm => return Ok(Box::new(handle)),
                Ok(_) => {}
                Err(e) if stem_of(&socket) == vm => first_error = Some(e),
                Err(_) => {}
            }
        }
        match first_error {
            Some(e) => Err(e.context(format!("open VM '{vm}'"))),
            None => bail!("no VM '{vm}' in QMP directory {}", self.qmp_dir.display()),
        }
    }
}

/// One VM, with an open QMP session.
pub struct QemuVm {
    name: String,
    stem: String,
    kind: VmKind,
    qmp: Qmp,
    active: Option<ActiveBackup>,
    /// `(node, bitmap)` pairs `cleanup` removed as inconsistent, so that
    /// `begin_backup` can tell why an inc/diff's base bitmap is gone (R26).
    removed_inconsistent: Vec<(String, String)>,
}

impl QemuVm {
    /// Open the VM behind one QMP socket directly.
    pub fn open(socket: &Path) -> Result<QemuVm> {
        QemuPlatform::new(socket.parent().unwrap_or(Path::new(".")).to_path_buf()).connect(socket)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest agent's socket, from the VM's command line (qemu-system only).
    fn agent_socket(&self) -> Option<PathBuf> {
        if self.kind != VmKind::System {
            return None;
        }
        let args = self
            .qmp
            .peer_pid()
            .and_then(nbd_server::read_cmdline)
            .ok()?;
        agent::socket_from_cmdline(&args)
    }
}

impl VmHandle for QemuVm {
    fn info(&mut self) -> Result<VmInfo> {
        Ok(query_vm(&mut self.qmp, &self.stem)?.info)
    }

    fn config(&mut self) -> Result<serde_json::Value> {
        let state = query_vm(&mut self.qmp, &self.stem)?;
        let nodes: Vec<serde_json::Value> = state
            .graph
            .nodes
            .values()
            .map(|n| {
                json!({
                    "node": n.name,
                    "driver": n.drv,
                    "file": n.file,
                    "read_only": n.read_only,
                    "size": n.size,
                    "children": n.children.iter()
                        .map(|(role, child)| json!({ "role": role, "node": child }))
                        .collect::<Vec<_>>(),
                    "bitmaps": n.bitmaps.iter().map(|b| &b.name).collect::<Vec<_>>(),
                })
            })
            .collect();
        // Secret values (`-object secret,data=...`, passwords) never leave here.
        let cmdline = self
            .qmp
            .peer_pid()
            .and_then(nbd_server::read_cmdline)
            .ok()
            .map(|args| crate::platform::redact::redact_args(&args));
        Ok(json!({
            "name": state.info.name,
            "kind": state.kind,
            "status": state.info.status,
            "disks": state.info.disks,
            "block_graph": nodes,
            "cmdline": cmdline,
        }))
    }

    fn begin_backup(&mut self, req: &BackupRequest) -> Result<Snapshot> {
        if self.active.is_some() {
            bail!("VM '{}': a backup view is already open", self.name);
        }
        let state = query_vm(&mut self.qmp, &self.stem)?;
        let mut quiescer = agent::Quiescer {
            mode: req.quiesce,
            socket: match req.quiesce {
                Quiesce::Off => None,
                _ => self.agent_socket(),
            },
            vm: &self.name,
            run_dir: &req.run_dir,
            outcome: FreezeOutcome::NotAsked,
        };
        let (active, snapshot) = backup::begin(
            &mut self.qmp,
            &state,
            req,
            &self.removed_inconsistent,
            &mut quiescer,
        )?;
        self.active = Some(active);
        Ok(snapshot)
    }

    fn finish_backup(&mut self, stored: bool) -> Result<Option<TrackingToken>> {
        let Some(active) = self.active.take() else {
            bail!("VM '{}': no backup view is open", self.name);
        };
        // Bitmaps are named after point ids: no token needed.
        backup::finish(&mut self.qmp, active, stored, &self.name).map(|()| None)
    }

    fn watch_cancel(&mut self, cancel: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.qmp.watch_cancel(cancel);
    }

    fn runs_as(&mut self) -> Result<Option<(u32, u32)>> {
        self.qmp.peer_user().map(Some)
    }

    /// The QEMU process at the other end of the QMP socket: its pid and start
    /// time (a later process with the same pid is another VM run).
    fn running_identity(&mut self) -> Result<Option<String>> {
        let pid = self.qmp.peer_pid()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("read /proc/{pid}/stat"))?;
        // Field 22 (start time), counted after the parenthesised command name.
        let started = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(19))
            .unwrap_or("0");
        Ok(Some(format!("qemu-process:{pid}@{started}")))
    }

    fn cleanup(
        &mut self,
        latest_point: Option<&str>,
        latest_full: Option<&str>,
        run_dir: &Path,
    ) -> Result<CleanupReport> {
        if self.active.is_some() {
            bail!(
                "VM '{}': a backup view is open in this process; finish it first",
                self.name
            );
        }
        let inconsistent: Vec<(String, String)> = query_vm(&mut self.qmp, &self.stem)?
            .graph
            .our_bitmaps()
            .into_iter()
            .flat_map(|(node, bitmaps)| {
                bitmaps
                    .into_iter()
                    .filter(|b| b.inconsistent)
                    .map(|b| (node.name.clone(), b.name.clone()))
            })
            .collect();
        let mut thawed = Vec::new();
        agent::thaw_leftover(
            &self.name,
            self.agent_socket().as_deref(),
            run_dir,
            &mut thawed,
        )?;
        let mut report = cleanup::cleanup(
            &mut self.qmp,
            &self.name,
            latest_point,
            latest_full,
            run_dir,
        )?;
        thawed.append(&mut report.actions);
        report.actions = thawed;
        self.removed_inconsistent.extend(inconsistent);
        Ok(report)
    }

    fn forget_tracking(&mut self, run_dir: &Path) -> Result<CleanupReport> {
        let mut report = self.cleanup(None, None, run_dir)?;
        report
            .actions
            .extend(cleanup::remove_all_bitmaps(&mut self.qmp, &self.name)?);
        Ok(report)
    }
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuVm")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("socket", &self.qmp.socket())
            .finish()
    }
}
