//! Quiesce (R10) on the `qemu` platform: a qemu-system VM (TCG) booting the tiny
//! guest, which runs qemu-guest-agent on its `org.qemu.guest_agent.0` channel and
//! has an ext4 file system mounted. vmbackup finds the agent's socket on the VM's
//! command line, freezes around the snapshot, and a run killed while the guest is
//! frozen is thawed by `cleanup` (R44). A VM without an agent: `require` fails
//! naming the fix, `try` backs up crash-consistent with a warning.
//! The guest agent runs in the guest only, never on the host.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::libvirt::ext4_image;
use common::tiny_guest;
use common::{file_digest, DiskSpec, Env, MIB};
use serde_json::Value;

/// A qemu-system VM booting the tiny guest, killed on drop.
struct GuestVm {
    child: Child,
    serial: PathBuf,
    qga: PathBuf,
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_guest(env: &Env, name: &str, disk: &Path) -> GuestVm {
    let (kernel, initrd) = tiny_guest();
    let work = env.path("guest");
    std::fs::create_dir_all(&work).unwrap();
    let serial = work.join("serial.log");
    let qga = work.join("qga.sock");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "256",
        ])
        .args(["-name", name])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet vmb.agent=1"])
        .arg("-chardev")
        .arg(format!("file,id=ser,path={}", serial.display()))
        .args(["-serial", "chardev:ser"])
        .arg("-blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            disk.display()
        ))
        .args(["-blockdev", "driver=qcow2,node-name=d0,file=f0"])
        .args(["-device", "virtio-blk-pci,drive=d0,id=vda"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=qga0,path={},server=on,wait=off",
            qga.display()
        ))
        .args(["-device", "virtio-serial-pci"])
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ])
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            env.qmp_dir.join(format!("{name}.qmp")).display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64");
    let vm = GuestVm { child, serial, qga };
    let t = Instant::now();
    loop {
        let s = std::fs::read_to_string(&vm.serial).unwrap_or_default();
        // The agent answers once the guest started it and opened its port.
        if s.contains("VMB-AGENT") && agent_try(&vm.qga, "guest-ping").is_some() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "guest did not start its agent:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    vm
}

/// One guest agent command from the test (an independent client); `None` when
/// the agent does not answer within 5 s.
fn agent_try(socket: &Path, cmd: &str) -> Option<Value> {
    let s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut w = s.try_clone().ok()?;
    let mut r = BufReader::new(s);
    let sync = r#"{"execute":"guest-sync-delimited","arguments":{"id":4242}}"#;
    w.write_all(format!("{sync}\n").as_bytes()).ok()?;
    let mut b = [0u8; 1];
    while b[0] != 0xff {
        r.read_exact(&mut b).ok()?;
    }
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    w.write_all(format!("{{\"execute\":\"{cmd}\"}}\n").as_bytes())
        .ok()?;
    line.clear();
    r.read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

fn agent(socket: &Path, cmd: &str) -> Value {
    agent_try(socket, cmd).unwrap_or_else(|| panic!("the guest agent did not answer {cmd}"))
}

fn run_now(env: &Env, level: &str, hold: Option<&Path>) -> Child {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("vmbackup"));
    cmd.env("VMBACKUP_STATE", &env.state)
        .env("VMBACKUP_CONFIG", &env.config)
        .env_remove("XDG_STATE_HOME")
        .args(["--json", "run-now", "r", "--level", level])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(h) = hold {
        cmd.env("VMBACKUP_TEST_HOLD_FROZEN", h);
    }
    cmd.spawn().unwrap()
}

/// (exit code, log lines, summary entry) of a finished run-now.
fn finished(child: Child) -> (i32, String, Value) {
    let out = child.wait_with_output().unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let logs = lines
        .iter()
        .filter(|l| l["type"] == "log")
        .map(|l| format!("{}: {}\n", l["level"], l["message"]))
        .collect();
    let vm = lines
        .iter()
        .find(|l| l["type"] == "summary")
        .map(|s| s["tasks"][0].clone())
        .unwrap_or_else(|| {
            panic!(
                "no summary: {lines:?} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (out.status.code().unwrap_or(-1), logs, vm)
}

fn restored_digest(env: &Env, vm: &str, point: &str, disk: &str) -> String {
    let dir = env.path(&format!("restore-{point}"));
    env.ok(&[
        "restore",
        "r",
        "--vm",
        vm,
        "--point",
        point,
        "--to",
        dir.to_str().unwrap(),
    ]);
    file_digest(&dir.join(format!("{disk}.raw")))
}

#[test]
fn guest_agent_freezes_around_the_snapshot_and_cleanup_thaws_a_killed_run_r10_r44() {
    let env = Env::new();
    let raw = ext4_image(env.dir.path(), 64 * MIB);
    let disk = env.path("vda.qcow2");
    common::run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            disk.to_str().unwrap(),
        ],
    );
    let vm = start_guest(&env, "qga1", &disk);
    env.add_lab("t");
    env.add_rule(
        "r",
        "lab",
        "qga1",
        "t",
        &["--schedule", "full daily at 01:00", "--quiesce"],
    );
    assert_eq!(agent(&vm.qga, "guest-fsfreeze-status")["return"], "thawed");

    let (code, logs, out) = finished(run_now(&env, "full", None));
    assert_eq!(code, 0, "{out}\n{logs}");
    assert!(logs.contains("froze 1 guest file system"), "{logs}");
    assert_eq!(agent(&vm.qga, "guest-fsfreeze-status")["return"], "thawed");
    let p1 = out["outcome"]["point"].as_str().unwrap().to_string();
    // The point restores to the file system the guest had mounted.
    let restored = restored_digest(&env, "qga1", &p1, "vda");
    assert_eq!(restored.len(), 64);

    let hold = env.path("frozen");
    let mut child = run_now(&env, "inc", Some(&hold));
    let t = Instant::now();
    while !hold.exists() {
        assert!(t.elapsed() < Duration::from_secs(120), "never frozen");
        assert!(
            child.try_wait().unwrap().is_none(),
            "run-now ended before freezing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(agent(&vm.qga, "guest-fsfreeze-status")["return"], "frozen");
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(
        agent(&vm.qga, "guest-fsfreeze-status")["return"],
        "frozen",
        "SIGKILL leaves it frozen"
    );
    let out = env.ok(&["cleanup", "r"]);
    assert!(out.contains("thawed 1 guest file system"), "{out}");
    assert_eq!(agent(&vm.qga, "guest-fsfreeze-status")["return"], "thawed");
    let (code, logs, out) = finished(run_now(&env, "inc", None));
    assert_eq!(
        (code, &out["outcome"]["level"]),
        (0, &Value::from("inc")),
        "{out}\n{logs}"
    );
    assert!(logs.contains("froze 1 guest file system"), "{logs}");
}

#[test]
fn without_a_guest_agent_require_fails_naming_the_fix_and_try_warns_r10() {
    let env = Env::new();
    let vm = env.vm("plain", &[DiskSpec::qcow2("disk0", 4 * MIB)], true);
    vm.write("disk0", 0, MIB, 0x42);
    env.add_lab("t");
    env.add_rule(
        "r",
        "lab",
        "plain",
        "t",
        &["--schedule", "full daily at 01:00", "--quiesce=require"],
    );
    assert_eq!(env.json(&["rule", "show", "r"])["quiesce"], "require");
    let (code, logs, out) = finished(run_now(&env, "full", None));
    assert_eq!(code, 3, "{out}\n{logs}");
    let err = out["error"].as_str().unwrap();
    assert!(
        err.contains("org.qemu.guest_agent.0") && err.contains("--quiesce=try"),
        "{err}"
    );
    env.ok(&["rule", "remove", "r"]);
    env.add_rule(
        "r",
        "lab",
        "plain",
        "t",
        &["--schedule", "full daily at 01:00", "--quiesce=try"],
    );
    let (code, logs, out) = finished(run_now(&env, "full", None));
    assert_eq!(code, 1, "completed with a warning: {out}\n{logs}");
    assert!(logs.contains("crash-consistent"), "{logs}");
    let p = out["outcome"]["point"].as_str().unwrap();
    assert_eq!(
        restored_digest(&env, "plain", p, "disk0"),
        vm.shadow_digest("disk0")
    );
    env.refused(
        &[
            "rule",
            "add",
            "r2",
            "--platform",
            "lab",
            "--vm",
            "plain",
            "--target",
            "t",
            "--quiesce=maybe",
            "--schedule",
            "full daily at 01:00",
        ],
        &["--quiesce", "maybe"],
    );
}
