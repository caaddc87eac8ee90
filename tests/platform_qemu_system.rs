//! The QEMU platform driver against a real qemu-system-x86_64 (TCG, paused, no OS):
//! guest devices become disks named by device id, R43 marks disks a snapshot cannot
//! cover, and a full backup works through an NBD server the driver starts itself.

mod common;

use std::path::Path;

use common::MIB;
use vmbackup::level::Level;
use vmbackup::platform::qemu::QemuPlatform;
use vmbackup::platform::{BackupRequest, NbdAddr, Platform};

/// Start `name` with the given `-blockdev`/`-device` arguments, QMP socket in
/// `qmp_dir` (`<name>-sock.qmp`); killed when dropped.
fn start(qmp_dir: &Path, name: &str, args: &[String]) -> common::Proc {
    common::qemu_system(&qmp_dir.join(format!("{name}-sock.qmp")), name, args)
}

fn image(dir: &Path, name: &str, format: &str, size: u64) -> String {
    let path = dir.join(name);
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            format,
            path.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    path.display().to_string()
}

fn disk_args(node: &str, format: &str, file: &str, device: &str) -> Vec<String> {
    vec![
        "-blockdev".into(),
        format!("driver=file,node-name={node}-file,filename={file}"),
        "-blockdev".into(),
        format!("driver={format},node-name={node},file={node}-file"),
        "-device".into(),
        device.into(),
    ]
}

#[test]
fn guest_devices_are_disks_and_uncoverable_ones_are_marked_r43() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let vda = image(dir, "vda.qcow2", "qcow2", 32 * MIB);
    let vdb = image(dir, "vdb.raw", "raw", 8 * MIB);
    let iso = image(dir, "cd.iso", "raw", MIB);
    let mut args = disk_args("disk0", "qcow2", &vda, "virtio-blk-pci,drive=disk0,id=vda");
    args.extend(disk_args(
        "shared0",
        "raw",
        &vdb,
        "virtio-blk-pci,drive=shared0,id=vdb,share-rw=on",
    ));
    args.extend([
        "-blockdev".into(),
        format!("driver=file,node-name=cd0-file,filename={iso},read-only=on"),
        "-blockdev".into(),
        "driver=raw,node-name=cd0,file=cd0-file,read-only=on".into(),
        "-device".into(),
        "ide-cd,drive=cd0,id=cdrom".into(),
    ]);
    let _vm = start(dir, "sysvm", &args);

    let platform = QemuPlatform::new(dir.to_path_buf());
    let vms = platform.inventory().unwrap();
    assert_eq!(vms.len(), 1);
    let vm = &vms[0];
    assert_eq!(
        (vm.name.as_str(), vm.status.as_str()),
        ("sysvm", "prelaunch")
    );
    let names: Vec<&str> = vm.disks.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["vda", "vdb", "cdrom"]);

    let vda = &vm.disks[0];
    assert_eq!(
        (vda.node.as_str(), vda.format.as_str(), vda.size, vda.cbt),
        ("disk0", "qcow2", 32 * MIB, true)
    );
    assert_eq!(vda.uncoverable, None);
    let vdb = &vm.disks[1];
    assert!(!vdb.cbt);
    assert!(
        vdb.uncoverable.as_deref().unwrap().contains("share-rw=on"),
        "{vdb:?}"
    );
    let cd = &vm.disks[2];
    assert!(
        cd.uncoverable
            .as_deref()
            .unwrap()
            .contains("removable media"),
        "{cd:?}"
    );

    let mut h = platform.open_vm("sysvm").unwrap();
    let req = BackupRequest {
        new_point: "P1".into(),
        level: Level::Full,
        base: None,
        base_tracking: None,
        latest_full: None,
        track: true,
        quiesce: vmbackup::platform::Quiesce::Off,
        allow_plain_tcp_export: false,
        run_dir: dir.to_path_buf(),
    };
    let err = h.begin_backup(&req).unwrap_err();
    assert!(
        format!("{err:#}").contains("disk 'vdb'"),
        "R43 refusal names the disk: {err:#}"
    );
}

#[test]
fn full_and_inc_backup_of_a_qemu_system_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let file = image(dir, "vda.qcow2", "qcow2", 16 * MIB);
    common::run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 1M", &file],
    );
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let _vm = start(
        dir,
        "sys2",
        &disk_args("disk0", "qcow2", &file, "virtio-blk-pci,drive=disk0,id=vda"),
    );

    let mut h = QemuPlatform::new(dir.to_path_buf())
        .open_vm("sys2")
        .unwrap();
    let config = h.config().unwrap();
    assert_eq!(config["name"], "sys2");
    assert_eq!(config["disks"][0]["name"], "vda");
    let cmdline = config["cmdline"].as_array().expect("command line readable");
    assert!(cmdline[0].as_str().unwrap().contains("qemu-system-x86_64"));

    let mut req = BackupRequest {
        new_point: "P1".into(),
        level: Level::Full,
        base: None,
        base_tracking: None,
        latest_full: None,
        track: true,
        quiesce: vmbackup::platform::Quiesce::Off,
        allow_plain_tcp_export: false,
        run_dir: run_dir.clone(),
    };
    let snap = h.begin_backup(&req).unwrap();
    let sock = run_dir.join("nbd.sock");
    assert_eq!(snap.exports[0].addr, NbdAddr::Unix { path: sock.clone() });
    assert_eq!(snap.exports[0].disk.name, "vda");
    // While the view is open the guest device sits on our copy-before-write
    // filter; the disk is still found and named.
    assert_eq!(h.info().unwrap().disks[0].node, "disk0");
    let uri = format!("nbd+unix:///vmbackup-disk0?socket={}", sock.display());
    let out = common::run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 1M", &uri],
    );
    assert!(!out.contains("verification failed"), "{out}");
    h.finish_backup(true).unwrap();
    assert!(!sock.exists());

    drop(h); // QMP takes one client: write as the guest would, through HMP qemu-io
    let hmp = r#"{"execute":"human-monitor-command","arguments":{"command-line":"qemu-io -d /machine/peripheral/vda/virtio-backend \"write -P 0x11 1M 4k\""}}"#;
    let reply = common::qmp_session(&dir.join("sys2-sock.qmp"), &[hmp]);
    assert_eq!(reply[0]["return"], "", "{reply:?}");

    let mut h = QemuPlatform::new(dir.to_path_buf())
        .open_vm("sys2")
        .unwrap();
    req.new_point = "P2".into();
    req.level = Level::Inc;
    req.base = Some("P1".into());
    let snap = h.begin_backup(&req).unwrap();
    let ctx = snap.exports[0]
        .changes
        .as_ref()
        .and_then(|c| c.meta_context())
        .unwrap()
        .to_string();
    let map = common::run("nbdinfo", &[&format!("--map={ctx}"), &uri]);
    let dirty: Vec<(u64, u64)> = map
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 3 && f[2] == "1")
        .map(|f| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        .collect();
    assert_eq!(dirty, [(MIB, 64 * 1024)], "{map}");
    let out = common::run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x11 1M 4k", &uri],
    );
    assert!(!out.contains("verification failed"), "{out}");
    h.finish_backup(true).unwrap();
    // The engine drops superseded tracking once the manifest is written.
    h.cleanup(Some("P2"), Some("P1"), &req.run_dir).unwrap();
    let bitmaps: Vec<String> = h.config().unwrap()["block_graph"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node"] == "disk0")
        .flat_map(|n| n["bitmaps"].as_array().unwrap().clone())
        .map(|b| b.as_str().unwrap().to_string())
        .collect();
    assert_eq!(bitmaps.len(), 2);
    assert!(
        bitmaps.contains(&"vmbackup-diff-P1".to_string()),
        "{bitmaps:?}"
    );
    assert!(
        bitmaps.contains(&"vmbackup-inc-P2".to_string()),
        "{bitmaps:?}"
    );
}
