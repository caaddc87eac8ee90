//! Injected faults mid-backup (issue 8): a hypervisor that stops answering
//! (SIGSTOP), read errors under the VM's disk (QEMU's blkdebug driver) and an NBD
//! server that stalls (nbdkit's delay filter, for fulls). Each ends in a clean
//! failed task: nothing committed, dirty bitmaps merged back (tracking exactly as
//! before the run), the `io_timeout` deadline fired, and after the hypervisor
//! answers again `cleanup` leaves nothing behind and the next backup restores
//! byte-identical to the disk. `task cancel` of a task stuck on a stopped
//! hypervisor ends it within seconds, releasing its slot and the VM's lock.

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RULE: &str = "r";
const VM: &str = "vm1";
const DISK: &str = "disk0";

struct Lab {
    vm: TestVm,
    env: Env,
}

/// A VM with one 32 MiB qcow2 disk holding 16 MiB of data, protected by rule
/// `r`; `conf` is system.conf.
fn lab(conf: &str) -> Lab {
    let env = Env::new();
    std::fs::write(&env.config, format!("i2vp_transbuffer = 1M\n{conf}")).unwrap();
    let vm = env.vm(VM, &[DiskSpec::qcow2(DISK, 32 * MIB)], true);
    vm.write_random(DISK, 0, 16 * MIB, 1);
    env.add_lab("t");
    env.add_rule(RULE, "lab", VM, "t", &WEEKLY_FULL_AND_INC);
    Lab { vm, env }
}

impl Lab {
    /// The newest task row (JSON).
    fn last_task(&self) -> serde_json::Value {
        self.env.json(&["task", "list", "--all"])[0].clone()
    }

    fn points(&self) -> Vec<String> {
        self.env
            .json(&["points", RULE, "--vm", VM])
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["point"].as_str().unwrap().to_string())
            .collect()
    }

    /// Our dirty bitmaps on the disk: (name, recording), sorted.
    fn bitmaps(&self) -> Vec<(String, bool)> {
        let r = self
            .vm
            .qmp(&[r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#]);
        let mut out = Vec::new();
        for n in r[0]["return"].as_array().unwrap() {
            if n["node-name"] != DISK {
                continue;
            }
            for b in n["dirty-bitmaps"].as_array().cloned().unwrap_or_default() {
                out.push((
                    b["name"].as_str().unwrap().to_string(),
                    b["recording"].as_bool().unwrap_or(false),
                ));
            }
        }
        out.sort();
        out
    }

    /// vmbackup's jobs, exports and nodes in QEMU and entries in the run directory.
    fn leftovers(&self) -> Vec<String> {
        let mut found = self.vm.qemu_leftovers();
        let run = self.env.state.parent().unwrap().join("run");
        for e in std::fs::read_dir(run).into_iter().flatten() {
            found.push(format!("run dir entry {:?}", e.unwrap().file_name()));
        }
        found
    }

    fn restores_exactly(&self, point: &str) {
        assert_eq!(
            self.env.restored_digest(RULE, VM, Some(point), DISK),
            self.vm.shadow_digest(DISK),
            "point {point} differs from the disk"
        );
    }

    fn backup(&self, level: &str) -> String {
        self.env.ok(&["run-now", RULE, "--level", level]);
        self.points().pop().unwrap()
    }
}

fn signal(pid: u32, sig: &str) {
    run("kill", &[&format!("-{sig}"), &pid.to_string()]);
}

/// A hypervisor that stops answering mid-backup: `task cancel` ends the task at
/// once (NBD connections closed, QMP given up after a short grace) although
/// io_timeout is 120 s, releasing its slot and the VM's lock. Once QEMU runs
/// again, cleanup repairs what the task could not, and no change is lost.
#[test]
fn cancel_ends_a_task_stuck_on_a_stopped_hypervisor_at_once() {
    let l = lab("io_timeout = 120\n");
    let full = l.backup("full");
    l.vm.write_random(DISK, 16 * MIB, 8 * MIB, 2);
    l.env.ok(&[
        "rule",
        "edit",
        RULE,
        "--bandwidth",
        "mon-sun 00:00-24:00 1MiB/s",
    ]);
    let run = l.env.spawn(&["run-now", RULE, "--level", "inc"], &[]);
    let task = l.env.wait_transferring();
    signal(l.vm.pid(), "STOP");
    let cancelled = Instant::now();
    l.env.ok(&["task", "cancel", &task.to_string()]);
    let (code, err) = run.wait();
    let took = cancelled.elapsed();
    signal(l.vm.pid(), "CONT");
    println!(
        "FIGURE cancel_on_stopped_hypervisor_seconds={:.1}",
        took.as_secs_f64()
    );
    assert_eq!(code, Some(130), "{err}");
    assert!(
        took <= Duration::from_secs(10),
        "the cancel took {took:?}: {err}"
    );
    assert_eq!(l.last_task()["status"], "interrupted");
    assert!(
        l.env.json(&["task", "list"]).as_array().unwrap().is_empty(),
        "a slot is still held"
    );
    // The VM's lock is free: the next run does not report it busy.
    l.env.ok(&["cleanup", RULE]);
    assert_eq!(l.leftovers(), Vec::<String>::new());
    assert_eq!(l.points(), std::slice::from_ref(&full));
    l.env.ok(&["rule", "edit", RULE, "--clear-bandwidth"]);
    let inc = l.backup("inc");
    l.restores_exactly(&inc);
}

/// A stall of the hypervisor (SIGSTOP) at every level: the io_timeout deadline
/// fires, the task fails cleanly, and after SIGCONT cleanup restores tracking.
#[test]
fn a_stalled_hypervisor_fails_the_task_at_the_io_timeout_at_every_level() {
    let l = lab("io_timeout = 2\n");
    l.backup("full");
    l.env.ok(&[
        "rule",
        "edit",
        RULE,
        "--bandwidth",
        "mon-sun 00:00-24:00 2MiB/s",
    ]);
    for (i, level) in ["full", "inc", "diff"].into_iter().enumerate() {
        l.vm.write_random(DISK, 16 * MIB, 8 * MIB, 10 + i as u64);
        let points = l.points();
        let bitmaps = l.bitmaps();
        let run = l.env.spawn(&["run-now", RULE, "--level", level], &[]);
        l.env.wait_transferring();
        signal(l.vm.pid(), "STOP");
        let stopped = Instant::now();
        let (code, err) = run.wait();
        let took = stopped.elapsed();
        signal(l.vm.pid(), "CONT");
        println!(
            "FIGURE stall_{level}_to_failed_seconds={:.1}",
            took.as_secs_f64()
        );
        assert_eq!(code, Some(3), "{level}: {err}");
        assert!(err.contains("no answer within 2s"), "{level}: {err}");
        assert!(
            took <= Duration::from_secs(15),
            "{level}: the stall took {took:?} to fail"
        );
        assert_eq!(l.last_task()["status"], "failed");
        assert_eq!(l.points(), points, "{level}: a point was committed");
        l.env.ok(&["cleanup", RULE]);
        assert_eq!(l.leftovers(), Vec::<String>::new(), "{level}");
        assert_eq!(l.bitmaps(), bitmaps, "{level}: tracking changed");
    }
    l.env.ok(&["rule", "edit", RULE, "--clear-bandwidth"]);
    let inc = l.backup("inc");
    l.restores_exactly(&inc);
}

/// Read errors under the disk (blkdebug, EIO at one cluster) at every level.
#[test]
fn read_errors_under_the_disk_fail_the_task_cleanly_at_every_level() {
    let mut l = lab("");
    l.backup("full");
    let bad = l.vm.host_offset(DISK, 8 * MIB);
    l.vm.restart_with_read_error(DISK, Some(bad));
    for (i, level) in ["full", "inc", "diff"].into_iter().enumerate() {
        // Dirty the failing cluster so inc and diff read it too.
        l.vm.write_random(DISK, 8 * MIB, MIB, 20 + i as u64);
        let points = l.points();
        let bitmaps = l.bitmaps();
        let out = l
            .env
            .cmd()
            .args(["run-now", RULE, "--level", level])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{level}: {err}");
        // QEMU drops the NBD connection on a read error: the task names the read.
        assert!(
            err.contains("reading 1048576 bytes at offset"),
            "{level}: {err}"
        );
        assert_eq!(l.points(), points, "{level}: a point was committed");
        assert_eq!(l.leftovers(), Vec::<String>::new(), "{level}");
        assert_eq!(l.bitmaps(), bitmaps, "{level}: tracking changed");
    }
    l.vm.restart_with_read_error(DISK, None);
    let inc = l.backup("inc");
    l.restores_exactly(&inc);
}

/// nbdkit serving the disk's bytes with every read delayed 30 s (the test-only
/// address override, read only by tests): a full's reads hit the 2 s deadline.
#[test]
fn an_nbd_server_that_stalls_fails_a_full_at_the_io_timeout() {
    let l = lab("io_timeout = 2\n");
    let full = l.backup("full");
    let bitmaps = l.bitmaps();
    let sock = l.env.path("nbdkit.sock");
    let mut nbdkit = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--readonly", "--unix"])
        .arg(&sock)
        .args(["--filter=delay", "file"])
        .arg(l.vm.shadow(DISK))
        .arg("rdelay=30")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbdkit (scripts/install-deps.sh installs it)");
    wait_for(|| sock.exists(), "nbdkit socket");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let started = Instant::now();
    let run = l.env.spawn(
        &["run-now", RULE, "--level", "full"],
        &[("VMBACKUP_TEST_NBD_URI", uri.as_str())],
    );
    let (code, err) = run.wait();
    let took = started.elapsed();
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
    println!(
        "FIGURE nbdkit_delay_full_to_failed_seconds={:.1}",
        took.as_secs_f64()
    );
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("no answer within 2s"), "{err}");
    assert!(took <= Duration::from_secs(15), "took {took:?}");
    assert_eq!(l.points(), [full]);
    assert_eq!(l.leftovers(), Vec::<String>::new());
    assert_eq!(l.bitmaps(), bitmaps);
}

/// A bandwidth pause longer than io_timeout is waiting, not a stall: the task
/// survives it and completes.
#[test]
fn a_pause_longer_than_io_timeout_is_not_a_stall() {
    let l = lab("io_timeout = 2\n");
    l.env.ok(&[
        "rule",
        "edit",
        RULE,
        "--bandwidth",
        "mon-sun 00:00-01:00 pause",
    ]);
    // Five seconds before the pause window ends (the test clock).
    let today = chrono::Local::now().format("%Y-%m-%d").to_string();
    let started = Instant::now();
    let run = l.env.spawn(
        &["run-now", RULE, "--level", "full"],
        &[("VMBACKUP_TEST_NOW", &format!("{today} 00:59:55"))],
    );
    let (code, err) = run.wait();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "the pause did not hold the task"
    );
    let point = l.points().pop().unwrap();
    l.restores_exactly(&point);
}
