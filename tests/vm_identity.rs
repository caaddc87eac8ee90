//! One VM, one rule (R35) even when two platforms reach the same VM (issue 8):
//! a VM's identity (qemu: the canonical path of its QMP socket) is stored with
//! the inventory and checked at `platform add` and `rule add` (exit 2, naming the
//! first platform or rule); at backup start, a VM whose QEMU process is in
//! another rule's running task is refused (exit 3, naming it).

mod common;
use common::*;

const ONCE: [&str; 2] = ["--once", "2099-01-01 00:00"];

#[test]
fn a_second_platform_on_the_same_qmp_directory_is_refused() {
    let env = Env::new();
    let _vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 4 * MIB)], false);
    env.add_lab("t");
    let qmp = env.qmp_dir.to_str().unwrap().to_string();
    let link = env.path("qmp-link");
    std::os::unix::fs::symlink(&env.qmp_dir, &link).unwrap();
    for dir in [qmp.as_str(), link.to_str().unwrap()] {
        env.refused(
            &[
                "platform",
                "add",
                "lab2",
                "--type",
                "qemu",
                "--qmp-dir",
                dir,
            ],
            &["platform 'lab'", "vm1"],
        );
    }
}

#[test]
fn a_vm_reached_through_two_platforms_joins_one_rule_only() {
    let env = Env::new();
    let _vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 4 * MIB)], false);
    let _other_vm = env.vm("vm2", &[DiskSpec::qcow2("disk0", 4 * MIB)], false);
    env.add_lab("t");
    env.add_rule("r1", "lab", "vm1", "t", &ONCE);
    // A second platform, empty when added, whose directory gains links to both
    // VMs' sockets later (platform add could not see them).
    let other = env.path("qmp2");
    std::fs::create_dir_all(&other).unwrap();
    env.ok(&[
        "platform",
        "add",
        "lab2",
        "--type",
        "qemu",
        "--qmp-dir",
        other.to_str().unwrap(),
    ]);
    for vm in ["vm1", "vm2"] {
        let sock = format!("{vm}.qmp");
        std::os::unix::fs::symlink(env.qmp_dir.join(&sock), other.join(&sock)).unwrap();
    }
    env.ok(&["platform", "refresh", "lab2"]);
    env.refused(
        &rule_add("r2", "lab2", "vm1", "t", &ONCE),
        &["rule 'r1'", "vm1"],
    );
    // vm2 joins a rule through lab2; through lab it cannot join r1 any more.
    env.add_rule("r3", "lab2", "vm2", "t", &ONCE);
    env.refused(
        &["rule", "add-vm", "r1", "--vm", "vm2"],
        &["rule 'r3'", "vm2"],
    );
}

/// One QEMU process with two QMP monitors in two directories: two platforms, two
/// rules (the sockets differ), but never two backups of it at once.
#[test]
fn a_backup_of_a_qemu_in_another_rules_running_task_is_refused() {
    let env = Env::new();
    std::fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let work = env.path("vms/vm1");
    std::fs::create_dir_all(&work).unwrap();
    let img = work.join("disk0.qcow2");
    qcow2_image(&img, 32 * MIB, 0x42, 8 * MIB);
    let dir2 = env.path("qmp2");
    std::fs::create_dir_all(&dir2).unwrap();
    let _vm = Qsd::new()
        .qcow2_disk("disk0", &img)
        .qmp(&env.qmp_dir.join("vm1.qmp"))
        .qmp(&dir2.join("vm1.qmp"))
        .start();
    env.add_lab("t");
    env.ok(&[
        "platform",
        "add",
        "lab2",
        "--type",
        "qemu",
        "--qmp-dir",
        dir2.to_str().unwrap(),
    ]);
    let mut r1 = vec!["--bandwidth", "mon-sun 00:00-24:00 2MiB/s"];
    r1.extend(ONCE);
    env.add_rule("r1", "lab", "vm1", "t", &r1);
    env.add_rule("r2", "lab2", "vm1", "t", &ONCE);

    let first = env.spawn(&["run-now", "r1", "--level", "full"], &[]);
    env.wait_transferring();
    let err = env.fails(3, &["run-now", "r2", "--level", "full"]);
    assert!(err.contains("rule 'r1'"), "{err}");
    assert!(err.contains("task 1"), "{err}");
    let (code, first_err) = first.wait();
    assert_eq!(code, Some(0), "r1: {first_err}");
    // Once r1's task has ended, r2 may back the VM up.
    env.ok(&["run-now", "r2", "--level", "full"]);
}
