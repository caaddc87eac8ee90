//! The state and run directories (issue 8): scratch names that cannot collide
//! whatever the VMs are called, bounded in length (unix sockets take 108 bytes),
//! and modes that keep disk data private: directories 0700, fleecing images 0600,
//! an existing directory others can read tightened, one others can write refused.

mod common;
use common::*;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

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
    qcow2_image(&img, 4 * MIB, 0, 0);
    let _vm = qemu_system(
        &env.qmp_dir.join("long.qmp"),
        &name,
        &[
            "-blockdev".into(),
            format!(
                "driver=file,node-name=disk0-file,filename={}",
                img.display()
            ),
            "-blockdev".into(),
            "driver=qcow2,node-name=disk0,file=disk0-file".into(),
            "-device".into(),
            "virtio-blk-pci,drive=disk0,id=vda".into(),
        ],
    );
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
    // A VM without an NBD server of its own: vmbackup starts one.
    let img = env.path("disk0.qcow2");
    qcow2_image(&img, 8 * MIB, 0x61, 4 * MIB);
    let _vm = Qsd::new()
        .qcow2_disk("disk0", &img)
        .qmp(&env.qmp_dir.join("vm1.qmp"))
        .start();
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
    let run = env.spawn(&["run-now", "r", "--level", "full"], &[]);
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
        // The NBD server vmbackup started serves disk data: its socket is 0600.
        assert_eq!(mode(&dir.join("nbd.sock")), 0o600, "NBD socket");
    }
    env.ok(&["task", "cancel", "1"]);
    assert_eq!(run.wait().0, Some(130));

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

/// A hypervisor that runs as another user (libvirt's qemu user, here `nobody`)
/// must open its fleecing images and create its NBD socket: it gets its VM's
/// scratch directory (0700, its own) and search permission on the directories
/// above, nothing more (README "Files").
#[test]
fn a_hypervisor_running_as_another_user_reaches_its_scratch_directory_only() {
    use std::os::unix::fs::chown;
    const NOBODY: u32 = 65534;
    let env = Env::new();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let work = env.path("vms/vm1");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::set_permissions(env.path("vms"), std::fs::Permissions::from_mode(0o711)).unwrap();
    let img = work.join("disk0.qcow2");
    qcow2_image(&img, 8 * MIB, 0x33, 2 * MIB);
    for p in [&work, &img, &env.qmp_dir] {
        chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let qsd = Qsd::new()
        .qcow2_disk("disk0", &img)
        .qmp(&env.qmp_dir.join("vm1.qmp"))
        .run_as(NOBODY)
        .start();
    env.add_lab("t");
    env.add_rule("r", "lab", "vm1", "t", &["--once", "2099-01-01 00:00"]);
    let out = env
        .cmd()
        .args(["run-now", "r", "--level", "full"])
        .output()
        .unwrap();
    drop(qsd);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Search permission only: others cannot list the state or run directory.
    let state_dir = env.state.parent().unwrap();
    assert_eq!(mode(state_dir), 0o701);
    assert_eq!(mode(&run_dir(&env)), 0o701);
    assert_eq!(mode(&env.state), 0o600);
    assert_eq!(
        env.restored_digest("r", "vm1", None, "disk0"),
        pattern_digest(0x33, 2 * MIB, 8 * MIB)
    );
}
