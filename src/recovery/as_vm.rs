//! `restore --as-vm NAME --to DIR`: the point's disks as image files plus a
//! launch script made from the captured configuration (new name, new MACs, a
//! QMP socket in DIR, secrets supplied with `--set-secret`), and with `--start`
//! the VM launched from it. The command line is checked before any disk is
//! written, so a configuration that cannot launch changes nothing.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::cmdline::{self, LaunchOptions, Rewrite};
use super::{captured_cmdline, disk_images, launch};
use crate::platform::DefinedVm;
use crate::repo::{encode_name, Manifest};
use crate::restore::{ImageFormat, RestoreReport};
use crate::task::progress::{LogLevel, Progress};

/// The launch, decided before the disks are written.
pub struct AsVmPlan {
    pub name: String,
    pub script: PathBuf,
    pub qmp: PathBuf,
    pub pidfile: PathBuf,
    pub args: Vec<String>,
}

/// Check that the point can be launched as `launch.name` from `dest`.
pub fn plan(
    point: &Manifest,
    dest: &Path,
    format: ImageFormat,
    launch_opts: &LaunchOptions,
) -> Result<AsVmPlan> {
    let name = launch_opts.name.clone().context("--as-vm needs a name")?;
    let line = captured_cmdline(point).ok_or_else(|| {
        crate::error::refused(format!(
            "point {} has no captured QEMU command line",
            point.point
        ))
    })?;
    let ext = match format {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
    };
    let images: Vec<(String, PathBuf, String)> = point
        .disks
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                dest.join(format!("{}.{ext}", encode_name(&d.name))),
                ext.to_string(),
            )
        })
        .collect();
    let disks = disk_images(point, &images);
    let stem = encode_name(&name);
    let qmp = dest.join(format!("{stem}.qmp"));
    let pidfile = dest.join(format!("{stem}.pid"));
    let launch = cmdline::rewrite(
        &line,
        &Rewrite {
            name: &name,
            disks: &disks,
            qmp_socket: &qmp,
            dir: dest,
            net: &launch_opts.net,
            secrets: &launch_opts.secrets,
            serial_log: None,
            agent_socket: None,
            accel: launch_opts.accel,
            pidfile: Some(&pidfile),
        },
    )?;
    Ok(AsVmPlan {
        script: dest.join(format!("{stem}.sh")),
        name,
        qmp,
        pidfile,
        args: launch.args,
    })
}

/// Shell-quote one argument.
fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// Write the launch script (0700, never over an existing file) and maybe start.
pub fn finish(
    plan: &AsVmPlan,
    report: &mut RestoreReport,
    start: bool,
    progress: &dyn Progress,
) -> Result<()> {
    let body = format!(
        "#!/bin/sh\n# VM '{}' restored by vmbackup from point {}; starts in the background.\n\
         # QMP socket: {}\nexec {}\n",
        plan.name,
        report.point,
        plan.qmp.display(),
        plan.args
            .iter()
            .map(|a| quote(a))
            .collect::<Vec<_>>()
            .join(" \\\n  ")
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&plan.script)
        .with_context(|| format!("cannot create launch script {}", plan.script.display()))?;
    f.write_all(body.as_bytes())?;
    f.sync_all()?;
    progress.log(
        LogLevel::Info,
        &format!("launch script {}", plan.script.display()),
    );
    report.launch_script = Some(plan.script.clone());
    if start {
        let pid = launch::launch_daemonized(
            &plan.args,
            &plan.pidfile,
            &plan.script.with_extension("log"),
        )?;
        progress.log(
            LogLevel::Info,
            &format!("VM '{}' started (pid {pid})", plan.name),
        );
    }
    // A qemu VM's identity is its QMP socket (platform::qemu).
    report.new_vm = Some(DefinedVm {
        name: plan.name.clone(),
        identity: Some(plan.qmp.display().to_string()),
        started: start,
    });
    Ok(())
}
