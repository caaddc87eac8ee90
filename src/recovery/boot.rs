//! Boot verification (`verify --boot`): a point booted from a transient
//! recovery without network, judged, measured and cleaned up.
//!
//! The point is served by an in-process NBD server; overlays take the guest's
//! writes; the VM is launched from the captured configuration (KVM when
//! `/dev/kvm` is usable, else TCG with a default CPU). It passes when its first
//! serial port prints a line matching `--expect`, or, without `--expect`, when its
//! guest agent answers a ping (the VM had a guest agent channel); the time from launch to
//! that moment is the measured recovery time. With a display, a screenshot
//! (QMP `screendump`) is kept with the task. Everything is stopped and removed
//! afterwards; a VM that does not pass fails the task (exit 3) with the reason.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde::Serialize;

use super::cmdline::{self, Net, Rewrite};
use super::export::serve_here;
use super::{captured_cmdline, create_overlay, disk_images, launch, private_dir};
use crate::error::{refused, Error};
use crate::platform::qmp::Qmp;
use crate::repo::{encode_name, vm_key, Manifest};
use crate::state::rules::RuleRow;
use crate::task::progress::{LogLevel, Progress};

/// `--expect` and `--timeout`.
#[derive(Debug, Clone)]
pub struct BootOptions {
    pub expect: Option<String>,
    pub timeout: Duration,
    pub accel: super::cmdline::Accel,
}

/// How a boot is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Judge {
    GuestAgent,
    SerialConsole,
}

pub struct BootRequest<'a> {
    pub state_path: &'a Path,
    pub repo: &'a crate::repo::Repository,
    pub rule: &'a RuleRow,
    pub vm: &'a str,
    pub point: &'a Manifest,
    pub task: i64,
    pub opts: &'a BootOptions,
}

/// A passed boot verification.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    pub point: String,
    pub judged_by: Judge,
    /// From launch to the agent's answer or the console's match.
    pub boot_seconds: f64,
    /// The console line that matched `--expect`.
    pub matched: Option<String>,
    pub screenshot: Option<PathBuf>,
}

impl BootReport {
    pub fn summary(&self) -> Vec<String> {
        let how = match self.judged_by {
            Judge::GuestAgent => "its guest agent answered".to_string(),
            Judge::SerialConsole => format!(
                "its console printed '{}'",
                self.matched.as_deref().unwrap_or("")
            ),
        };
        let mut out = vec![format!(
            "point {} boots: {how} after {:.1} s",
            self.point, self.boot_seconds
        )];
        if let Some(s) = &self.screenshot {
            out.push(format!("screenshot {}", s.display()));
        }
        out
    }
}

/// How the point's VM will be judged: by its serial console when `--expect` is
/// given (what the user asked for), else by its guest agent when the VM had an
/// agent channel; refused (exit 2, naming both ways) with neither.
pub fn judge_for(point: &Manifest, expect: Option<&str>) -> Result<Judge> {
    if let Some(e) = expect {
        Regex::new(e).map_err(|err| {
            crate::error::invalid("--expect", e, format!("not a regular expression: {err}"))
        })?;
    }
    let line = captured_cmdline(point).ok_or_else(|| {
        refused(format!(
            "point {} has no captured QEMU command line to boot",
            point.point
        ))
    })?;
    let has_agent = line.iter().any(|a| a.contains("org.qemu.guest_agent.0"));
    match (expect, has_agent) {
        (Some(_), _) => Ok(Judge::SerialConsole),
        (None, true) => Ok(Judge::GuestAgent),
        (None, false) => Err(refused(
            "the VM has no guest agent channel to ping and no --expect was given: \
             give --expect REGEX (matched against the serial console)",
        )),
    }
}

pub fn verify_boot(
    req: &BootRequest,
    progress: &dyn Progress,
    cancel: &AtomicBool,
    rt: &tokio::runtime::Handle,
) -> Result<BootReport> {
    let judge = judge_for(req.point, req.opts.expect.as_deref())?;
    let expect = req.opts.expect.as_deref().map(Regex::new).transpose()?;
    let state_dir = req
        .state_path
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let dir = state_dir.join("verify").join(req.task.to_string());
    private_dir(&dir)?;
    let key = vm_key(&req.rule.settings.platform, req.vm);
    let (server, socket) = serve_here(req.repo, &key, req.vm, req.point, &dir, rt)?;
    let result = boot(
        req,
        judge,
        expect.as_ref(),
        &dir,
        &socket,
        &state_dir,
        progress,
        cancel,
    );
    rt.block_on(server.stop());
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[allow(clippy::too_many_arguments)]
fn boot(
    req: &BootRequest,
    judge: Judge,
    expect: Option<&Regex>,
    dir: &Path,
    socket: &Path,
    state_dir: &Path,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<BootReport> {
    let mut images = Vec::new();
    for d in &req.point.disks {
        let overlay = dir.join(format!("{}.overlay.qcow2", encode_name(&d.name)));
        create_overlay(&overlay, socket, &d.name, d.size)?;
        images.push((d.name.clone(), overlay, "qcow2".to_string()));
    }
    let disks = disk_images(req.point, &images);
    let serial = dir.join("serial.log");
    let agent = dir.join("qga.sock");
    let qmp = dir.join("vm.qmp");
    let none = Default::default();
    let line = captured_cmdline(req.point).context("no captured command line")?;
    let launch = cmdline::rewrite(
        &line,
        &Rewrite {
            name: &format!("{}-boot-verify-{}", req.vm, req.task),
            disks: &disks,
            qmp_socket: &qmp,
            dir,
            net: &Net::None,
            secrets: &none,
            serial_log: Some(&serial),
            agent_socket: Some(&agent),
            accel: req.opts.accel,
            pidfile: None,
        },
    )?;
    let (program, args) = launch.args.split_first().context("empty command line")?;
    let log = std::fs::File::create(dir.join("vm.log"))?;
    let t0 = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    progress.log(
        LogLevel::Info,
        &format!("booting point {} (judged by {judge:?})", req.point.point),
    );
    let outcome = (|| -> Result<Option<String>> {
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Err(Error::Interrupted.into());
            }
            if let Some(status) = child.try_wait()? {
                let err = std::fs::read_to_string(dir.join("vm.log")).unwrap_or_default();
                bail!(
                    "the VM exited ({status}) before it {}{}",
                    match judge {
                        Judge::GuestAgent => "answered a guest agent ping".to_string(),
                        Judge::SerialConsole => "printed a line matching --expect".to_string(),
                    },
                    console_tail(&serial, &err)
                );
            }
            match judge {
                Judge::GuestAgent => {
                    if agent_ping(&agent) {
                        return Ok(None);
                    }
                }
                Judge::SerialConsole => {
                    let text = std::fs::read(&serial).unwrap_or_default();
                    let text = String::from_utf8_lossy(&text);
                    if let Some(l) = text
                        .lines()
                        .find(|l| expect.is_some_and(|re| re.is_match(l)))
                    {
                        return Ok(Some(l.trim().to_string()));
                    }
                }
            }
            if t0.elapsed() > req.opts.timeout {
                bail!(
                    "no {} within {} s{}",
                    match judge {
                        Judge::GuestAgent => "answer from the guest agent".to_string(),
                        Judge::SerialConsole => format!(
                            "console line matching '{}'",
                            expect.map(|r| r.as_str()).unwrap_or("")
                        ),
                    },
                    req.opts.timeout.as_secs(),
                    console_tail(&serial, "")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })();
    let boot_seconds = (t0.elapsed().as_millis() as f64) / 1000.0;
    let screenshot = match (&outcome, launch.has_display) {
        (Ok(_), true) => screenshot(&qmp, state_dir, req.task)
            .map_err(|e| {
                progress.log(LogLevel::Warn, &format!("no screenshot: {e:#}"));
            })
            .ok(),
        _ => None,
    };
    let _ = launch::quit_vm(Some(&qmp), Some(i64::from(child.id())));
    let _ = child.kill();
    let _ = child.wait();
    let matched = outcome?;
    progress.log(
        LogLevel::Info,
        &format!("boot verified in {boot_seconds:.1} s"),
    );
    Ok(BootReport {
        point: req.point.point.clone(),
        judged_by: judge,
        boot_seconds,
        matched,
        screenshot,
    })
}

/// The last console lines, for a failure message.
fn console_tail(serial: &Path, extra: &str) -> String {
    let text = std::fs::read(serial)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .chain(extra.lines())
        .filter(|l| !l.trim().is_empty())
        .collect();
    let tail = &lines[lines.len().saturating_sub(3)..];
    if tail.is_empty() {
        String::new()
    } else {
        format!("; last console lines: {}", tail.join(" | "))
    }
}

/// `guest-sync` then `guest-ping` over the agent's socket.
fn agent_ping(socket: &Path) -> bool {
    let Ok(s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let Ok(mut w) = s.try_clone() else {
        return false;
    };
    let mut r = BufReader::new(s);
    let id = std::process::id();
    if writeln!(w, r#"{{"execute":"guest-sync","arguments":{{"id":{id}}}}}"#).is_err() {
        return false;
    }
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        if line.contains(&id.to_string()) {
            break;
        }
    }
    if writeln!(w, r#"{{"execute":"guest-ping"}}"#).is_err() {
        return false;
    }
    line.clear();
    r.read_line(&mut line).unwrap_or(0) > 0 && line.contains("return")
}

/// QMP `screendump` into `<state dir>/screenshots/task-<id>.png`.
fn screenshot(qmp: &Path, state_dir: &Path, task: i64) -> Result<PathBuf> {
    let dir = state_dir.join("screenshots");
    crate::private_dir::ensure(&dir, "screenshot directory")?;
    let path = dir.join(format!("task-{task}.png"));
    let mut q = Qmp::connect_with_timeout(qmp, Duration::from_secs(10))?;
    q.execute(
        "screendump",
        serde_json::json!({ "filename": path, "format": "png" }),
    )?;
    Ok(path)
}
