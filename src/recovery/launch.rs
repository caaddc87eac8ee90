//! Starting and stopping the QEMU of a recovered VM, and the processes a
//! recovery leaves running (its NBD server): by pid, checked to be ours.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::platform::qmp::Qmp;
use crate::state::slots::pid_alive;

/// How long a VM gets to quit over QMP before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(20);

/// Launch `args` (ending in `-daemonize -pidfile PIDFILE`); returns the VM's pid
/// once QEMU has daemonized. Its early errors go to `log`.
pub fn launch_daemonized(args: &[String], pidfile: &Path, log: &Path) -> Result<u32> {
    let (program, rest) = args.split_first().context("empty command line")?;
    let err =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let status = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        bail!(
            "{program} failed to start the VM ({status}): {}",
            text.trim().lines().last().unwrap_or("no message")
        );
    }
    let pid = std::fs::read_to_string(pidfile)
        .with_context(|| format!("QEMU wrote no pid file {}", pidfile.display()))?;
    pid.trim()
        .parse()
        .with_context(|| format!("bad pid file {}", pidfile.display()))
}

/// Whether `pid` runs a program whose command line contains `needle` (so a pid
/// recorded long ago is not someone else's process now).
pub fn pid_runs(pid: i64, needle: &str) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Ok(u) = u32::try_from(pid) else {
        return false;
    };
    crate::platform::qemu::read_cmdline(u).is_ok_and(|args| args.iter().any(|a| a.contains(needle)))
}

/// Wait until `pid` is gone, up to `limit`.
pub fn wait_gone(pid: i64, limit: Duration) -> bool {
    let t = Instant::now();
    while pid_alive(pid) {
        if t.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Send `signal` to `pid`.
pub fn signal(pid: i64, signal: rustix::process::Signal) {
    if let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(p, signal);
    }
}

/// Stop a VM: QMP `quit`, then SIGKILL after a grace period. Fine when gone.
pub fn quit_vm(qmp: Option<&Path>, pid: Option<i64>) -> Result<()> {
    let Some(pid) = pid.filter(|p| pid_alive(*p)) else {
        return Ok(());
    };
    if let Some(sock) = qmp {
        if let Ok(mut q) = Qmp::connect_with_timeout(sock, Duration::from_secs(5)) {
            let _ = q.execute("quit", Value::Null);
        }
    }
    if !wait_gone(pid, QUIT_GRACE) {
        signal(pid, rustix::process::Signal::Kill);
        if !wait_gone(pid, Duration::from_secs(5)) {
            bail!("VM process {pid} does not stop");
        }
    }
    Ok(())
}

/// Whether this machine can run KVM guests (else TCG).
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
