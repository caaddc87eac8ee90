//! The state and run directories (issue 8): scratch names that cannot collide
//! whatever the VMs are called, bounded in length (unix sockets take 108 bytes),
//! and modes that keep disk data private: directories 0700, fleecing images 0600,
//! an existing directory others can read tightened, one others can write refused.

mod common;
use common::*;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn run_dir(env: &Env) -> PathBuf {
    env.state.parent().unwrap().join("run")
}

/// VMs whose names map to the same file name when odd characters become `_`
/// back up at the same time, each to its own point.
#[test]
fn vms_named_alike_back_up_concurrently_without_colliding() {
    let env = Env::new();
    std::fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let names = ["a b", "a_b", "a+b", "a&b"];
    let vms: Vec<TestVm> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            // Work directories without the odd characters (qemu-io's command line).
            let vm = TestVm::start(
                &env.qmp_dir,
                &env.path(&format!("vms/vm{i}")),
                n,
                &[DiskSpec::qcow2("disk0", 8 * MIB)],
                true,
            );
            vm.write_random("disk0", 0, 4 * MIB, i as u64 + 1);
            vm
        })
        .collect();
    env.add_lab("t");
    env.add_rule(
        "r",
        "lab",
        &names.join(","),
        "t",
        &["--schedule", "inc daily at 01:00"],
    );
    for round in 0..2 {
        let level = if round == 0 { "full" } else { "inc" };
        let out = env
            .cmd()
            .args(["run-now", "r", "--level", level])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{level}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (i, vm) in vms.iter().enumerate() {
            vm.write_random("disk0", 4 * MIB, MIB, 10 * round + i as u64);
        }
    }
    for vm in &vms {
        let points = env.json(&["points", "r", "--vm", &vm.name]);
        assert_eq!(points.as_array().unwrap().len(), 2, "{}: {points}", vm.name);
    }
}

/// A qemu-system VM called by a 200-character name: the scratch files' names
/// (the NBD socket above all) do not grow with it.
#[test]
fn run_dir_names_stay_short_whatever_the_vm_is_called() {
    let env = Env::new();
    let name = "v".repeat(200);
    let img = env.path("disk0.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"],
    );
    let qmp = env.qmp_dir.join("long.qmp");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-S",
        ])
        .args(["-name", &name])
        .arg("-blockdev")
        .arg(format!(
            "driver=file,node-name=disk0-file,filename={}",
            img.display()
        ))
        .args(["-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file"])
        .args(["-device", "virtio-blk-pci,drive=disk0,id=vda"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _vm = Kill(child);
    wait_for(|| qmp.exists(), "QMP socket");
    env.add_lab("t");
    env.add_rule(
        "r",
        "lab",
        &name,
        "t",
        &["--schedule", "full daily at 01:00"],
    );
    let out = env
        .cmd()
        .args(["run-now", "r", "--level", "full"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dest = env.path("restored");
    env.ok(&[
        "restore",
        "r",
        "--vm",
        &name,
        "--to",
        dest.to_str().unwrap(),
    ]);
    assert!(dest.join("vda.raw").is_file());
}

/// While a backup holds its snapshot (paused by a bandwidth window), its scratch
/// files are private: run dir and VM scratch dir 0700, fleecing image 0600.
#[test]
fn state_run_and_scratch_files_are_private() {
    let env = Env::new();
    // A state directory that already exists, readable by everyone.
    let state_dir = env.state.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 8 * MIB)], true);
    vm.write_random("disk0", 0, 4 * MIB, 1);
    env.add_lab("t");
    assert_eq!(
        mode(&state_dir),
        0o700,
        "an existing state dir is tightened"
    );
    env.add_rule(
        "r",
        "lab",
        "vm1",
        "t",
        &[
            "--schedule",
            "full daily at 01:00",
            "--bandwidth",
            "mon-sun 00:00-24:00 pause",
        ],
    );
    let mut run = Command::new(assert_cmd::cargo::cargo_bin("vmbackup"))
        .env("VMBACKUP_STATE", &env.state)
        .env("VMBACKUP_CONFIG", &env.config)
        .args(["run-now", "r", "--level", "full"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let fleece = || -> Vec<PathBuf> {
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir(run_dir(&env)) else {
            return found;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                for f in std::fs::read_dir(&p).unwrap() {
                    let f = f.unwrap().path();
                    if f.extension().is_some_and(|x| x == "qcow2") {
                        found.push(f);
                    }
                }
            } else if p.extension().is_some_and(|x| x == "qcow2") {
                found.push(p);
            }
        }
        found
    };
    wait_for(|| !fleece().is_empty(), "a fleecing image");
    let images = fleece();
    assert_eq!(mode(&run_dir(&env)), 0o700, "run dir");
    for img in &images {
        assert_eq!(mode(img), 0o600, "{img:?}");
        let dir = img.parent().unwrap();
        assert_eq!(mode(dir), 0o700, "{dir:?}");
    }
    env.ok(&["task", "cancel", "1"]);
    assert_eq!(run.wait().unwrap().code(), Some(130));

    // A run directory others can write to is refused, naming it.
    std::fs::set_permissions(run_dir(&env), std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = env.fails(2, &["run-now", "r", "--level", "full"]);
    assert!(err.contains(&run_dir(&env).display().to_string()), "{err}");
    assert!(err.contains("can be written by others"), "{err}");
    std::fs::set_permissions(run_dir(&env), std::fs::Permissions::from_mode(0o755)).unwrap();
    env.ok(&["rule", "edit", "r", "--clear-bandwidth"]);
    env.ok(&["run-now", "r", "--level", "full"]);
    assert_eq!(
        mode(&run_dir(&env)),
        0o700,
        "an existing run dir is tightened"
    );
    // The same for the state directory.
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o757)).unwrap();
    let err = env.fails(2, &["rule", "list"]);
    assert!(err.contains(&state_dir.display().to_string()), "{err}");
}
