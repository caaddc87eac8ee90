//! Backup of a shut-off domain: each disk image is served by `qemu-nbd
//! --read-only` on a unix socket in the run directory, with, for an incremental or
//! differential, the persistent bitmap of the base point's checkpoint (`-B`), which
//! holds every change since that checkpoint was created.
//!
//! libvirt cannot create a checkpoint for a shut-off domain and vmbackup never adds
//! bitmaps libvirt does not know about, so the point's tracking token is the newest
//! checkpoint there is: the next backup reads the changes since it (a superset of
//! the changes since this point, which is allowed). With no checkpoint at all the
//! point has no token and the next inc/diff runs as a full.
//!
//! qemu-nbd holds the images' lock while it runs: starting the domain during an
//! offline backup fails on that lock (QEMU: "Failed to get "write" lock").
//! qemu-nbd is started with a parent-death signal, and its pid file lets `cleanup`
//! stop one that outlived a killed vmbackup.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::checkpoints;
use super::ffi::Domain;
use super::xml;
use crate::level::Level;
use crate::platform::{
    BackupRequest, CbtUnavailable, ChangedBlocks, DiskExport, NbdAddr, Note, Snapshot,
    TrackingToken, VmInfo,
};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The qemu-nbd servers of one offline backup.
pub struct View {
    servers: Vec<Server>,
    token: Option<TrackingToken>,
}

struct Server {
    child: Child,
    socket: PathBuf,
    pid_file: PathBuf,
}

fn stem(run_dir: &Path, uuid: &str, disk: &str) -> PathBuf {
    let safe: String = disk
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    run_dir.join(format!("vmbackup-qnbd-{uuid}-{safe}"))
}

pub fn begin(
    dom: &Domain,
    uuid: &str,
    info: &VmInfo,
    req: &BackupRequest,
) -> Result<(View, Snapshot)> {
    let name = dom.name();
    // The changes since the base: the bitmaps of the checkpoint its token names
    // (read from the token: libvirt's metadata may be gone, the bitmaps are in
    // the images).
    let bitmaps: Option<Vec<(String, String)>> = match req.level {
        Level::Full => None,
        Level::Inc | Level::Diff => {
            let base = req.base.as_deref().unwrap_or("?");
            let first = info
                .disks
                .first()
                .map(|d| d.name.clone())
                .unwrap_or_default();
            let Some((cp, cp_xml)) = req.base_tracking.as_ref().and_then(checkpoints::from_token)
            else {
                return Err(CbtUnavailable {
                    disk: first,
                    reason: format!(
                        "point {base} has no libvirt checkpoint (taken while the domain was \
                         shut off and no checkpoint existed)"
                    ),
                }
                .into());
            };
            let list = xml::checkpoint_bitmaps(cp_xml)?;
            for d in &info.disks {
                if !list.iter().any(|(t, _)| *t == d.name) {
                    return Err(CbtUnavailable {
                        disk: d.name.clone(),
                        reason: format!("checkpoint {cp} has no bitmap for this disk"),
                    }
                    .into());
                }
            }
            Some(list)
        }
    };
    let token = match checkpoints::newest(dom)? {
        Some(cp) => Some(checkpoints::token(&cp)?),
        None => req.base_tracking.clone(),
    };
    std::fs::create_dir_all(&req.run_dir)
        .with_context(|| format!("cannot create {}", req.run_dir.display()))?;
    let mut view = View {
        servers: Vec::new(),
        token,
    };
    let mut exports = Vec::new();
    for d in &info.disks {
        let Some(file) = d.file.as_deref().filter(|f| f.starts_with('/')) else {
            let _ = finish(view, false);
            bail!(
                "domain '{name}' is shut off and disk '{}' is not a local file or device \
                 ({}): it can only be read while the domain runs",
                d.name,
                d.file.as_deref().unwrap_or("no source")
            );
        };
        let bitmap = bitmaps
            .as_ref()
            .and_then(|l| l.iter().find(|(t, _)| *t == d.name).map(|(_, b)| b.clone()));
        let base = stem(&req.run_dir, uuid, &d.name);
        let socket = base.with_extension("sock");
        let pid_file = base.with_extension("pid");
        match start(
            file,
            &d.format,
            &d.name,
            bitmap.as_deref(),
            &socket,
            &pid_file,
        ) {
            Ok(child) => view.servers.push(Server {
                child,
                socket: socket.clone(),
                pid_file,
            }),
            Err(e) => {
                let _ = finish(view, false);
                let e = e.context(format!("domain '{name}' disk '{}'", d.name));
                if let Some(b) = bitmap {
                    // A missing or inconsistent bitmap: changes are not provable.
                    return Err(CbtUnavailable {
                        disk: d.name.clone(),
                        reason: format!("bitmap {b} cannot be exported ({e:#})"),
                    }
                    .into());
                }
                return Err(e);
            }
        }
        exports.push(DiskExport {
            disk: d.clone(),
            addr: NbdAddr::Unix { path: socket },
            export: d.name.clone(),
            changes: bitmap.map(|b| ChangedBlocks::MetaContext(format!("qemu:dirty-bitmap:{b}"))),
        });
    }
    let mut notes = vec![Note::Info(format!(
        "domain '{name}' is shut off: its disks are read with qemu-nbd --read-only; starting \
         it before this backup ends fails on the image lock"
    ))];
    if req.quiesce != crate::platform::Quiesce::Off {
        notes.push(Note::Info(
            "quiesce: nothing to freeze, the domain is shut off".into(),
        ));
    }
    Ok((view, Snapshot { exports, notes }))
}

fn start(
    file: &str,
    format: &str,
    export: &str,
    bitmap: Option<&str>,
    socket: &Path,
    pid_file: &Path,
) -> Result<Child> {
    let _ = std::fs::remove_file(socket);
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["--read-only", "--persistent", "--shared=16", "--cache=none"])
        .arg(format!("--socket={}", socket.display()))
        .arg(format!("--pid-file={}", pid_file.display()))
        .arg(format!("--export-name={export}"));
    if !format.is_empty() {
        cmd.arg(format!("--format={format}"));
    }
    if let Some(b) = bitmap {
        cmd.arg(format!("--bitmap={b}"));
    }
    cmd.arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only an async-signal-safe prctl between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::Term))
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .spawn()
        .context("cannot run qemu-nbd (package qemu-utils)")?;
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            bail!("qemu-nbd exited ({status}): {}", err.trim());
        }
        if socket.exists() {
            return Ok(child);
        }
        if t.elapsed() > START_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "qemu-nbd did not listen on {} in {START_TIMEOUT:?}",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stop the servers; stored → the point's token.
pub fn finish(view: View, stored: bool) -> Result<Option<TrackingToken>> {
    for mut s in view.servers {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&s.child),
            rustix::process::Signal::Term,
        );
        let _ = s.child.wait();
        let _ = std::fs::remove_file(&s.socket);
        let _ = std::fs::remove_file(&s.pid_file);
    }
    Ok(if stored { view.token } else { None })
}

/// After a crash: stop qemu-nbd servers of ours that outlived their vmbackup and
/// remove their files.
pub fn remove_leftovers(uuid: &str, run_dir: &Path, actions: &mut Vec<String>) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Ok(());
    };
    let prefix = format!("vmbackup-qnbd-{uuid}-");
    for e in entries.flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        if !fname.starts_with(&prefix) {
            continue;
        }
        let path = e.path();
        if fname.ends_with(".pid") {
            let socket = path.with_extension("sock");
            if let Some(pid) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                if cmdline.contains("qemu-nbd") && cmdline.contains(&*socket.to_string_lossy()) {
                    if let Some(p) = rustix::process::Pid::from_raw(pid) {
                        let _ = rustix::process::kill_process(p, rustix::process::Signal::Term);
                        let t = Instant::now();
                        while std::path::Path::new(&format!("/proc/{pid}")).exists()
                            && t.elapsed() < Duration::from_secs(10)
                        {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    actions.push(format!(
                        "stopped qemu-nbd (pid {pid}) of an interrupted run"
                    ));
                }
            }
        }
        let _ = std::fs::remove_file(&path);
        actions.push(format!("removed {}", path.display()));
    }
    Ok(())
}
