//! The QEMU platform driver against real qemu-storage-daemon processes: inventory
//! (R3, R36), point-in-time exports, CBT bitmaps (R26), and crash cleanup (R44).
//! Oracles: qemu-io pattern reads and `nbdinfo --map` over the driver's exports,
//! and QMP queries of what is left in QEMU.

mod common;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use common::{DiskSpec, TestVm, MIB};
use vmbackup::level::Level;
use vmbackup::platform::qemu::QemuPlatform;
use vmbackup::platform::{BackupRequest, CbtUnavailable, NbdAddr, Platform, Snapshot, VmHandle};

const KIB64: u64 = 64 * 1024;

struct Lab {
    _tmp: tempfile::TempDir,
    qmp_dir: PathBuf,
    run_dir: PathBuf,
    work: PathBuf,
}

fn lab() -> Lab {
    let tmp = tempfile::tempdir().unwrap();
    let qmp_dir = tmp.path().join("qmp");
    let run_dir = tmp.path().join("run");
    std::fs::create_dir_all(&qmp_dir).unwrap();
    std::fs::create_dir_all(&run_dir).unwrap();
    Lab {
        qmp_dir,
        run_dir,
        work: tmp.path().join("work"),
        _tmp: tmp,
    }
}

impl Lab {
    fn vm(&self, name: &str, disks: &[DiskSpec], nbd: bool) -> TestVm {
        TestVm::start(&self.qmp_dir, &self.work.join(name), name, disks, nbd)
    }

    fn open(&self, name: &str) -> Box<dyn VmHandle> {
        QemuPlatform::new(self.qmp_dir.clone())
            .open_vm(name)
            .unwrap()
    }

    fn req(&self, new: &str, level: Level, base: Option<&str>) -> BackupRequest {
        BackupRequest {
            new_point: new.into(),
            level,
            base: base.map(str::to_string),
            base_tracking: None,
            latest_full: None,
            track: true,
            quiesce: vmbackup::platform::Quiesce::Off,
            allow_plain_tcp_export: false,
            run_dir: self.run_dir.clone(),
        }
    }

    /// Files left in the run directory.
    fn run_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.run_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn uri(snap: &Snapshot, i: usize) -> String {
    let e = &snap.exports[i];
    match &e.addr {
        NbdAddr::Unix { path } => format!("nbd+unix:///{}?socket={}", e.export, path.display()),
        NbdAddr::Tcp { host, port } => format!("nbd://{host}:{port}/{}", e.export),
    }
}

/// qemu-io pattern read over NBD: true when every byte matches.
fn reads_pattern(uri: &str, offset: u64, len: u64, pattern: u8) -> bool {
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c"])
        .arg(format!("read -P {pattern:#x} {offset} {len}"))
        .arg(uri)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    out.status.success() && text.contains("read ") && !text.contains("verification failed")
}

/// The meta context carrying an export's changed blocks.
fn context(snap: &Snapshot, i: usize) -> Option<String> {
    snap.exports[i]
        .changes
        .as_ref()
        .and_then(|c| c.meta_context())
        .map(str::to_string)
}

/// Dirty extents `(offset, length)` of an export's meta context, per nbdinfo.
fn dirty_map(snap: &Snapshot, i: usize) -> Vec<(u64, u64)> {
    let ctx = context(snap, i).expect("no dirty context");
    let out = common::run("nbdinfo", &[&format!("--map={ctx}"), &uri(snap, i)]);
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[2] != "1" {
            continue;
        }
        let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        match extents.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => extents.push((off, len)),
        }
    }
    extents
}

/// Everything named `vmbackup-*` in QEMU except bitmaps: exports, jobs, nodes.
/// (A QMP socket takes one client at a time: call with no handle open.)
fn qemu_leftovers(vm: &TestVm) -> Vec<String> {
    let r = vm.qmp(&[
        r#"{"execute":"query-block-exports"}"#,
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    let mut found = Vec::new();
    for (reply, key) in r.iter().zip(["id", "device", "node-name"]) {
        for item in reply["return"].as_array().unwrap() {
            let name = item[key].as_str().unwrap_or("");
            if name.starts_with("vmbackup-") {
                found.push(name.to_string());
            }
        }
    }
    found
}

fn bitmaps(vm: &TestVm, node: &str) -> Vec<String> {
    vm.bitmaps(node).into_iter().map(|(name, _)| name).collect()
}

fn cbt_reason(err: &anyhow::Error) -> String {
    err.downcast_ref::<CbtUnavailable>()
        .unwrap_or_else(|| panic!("expected CbtUnavailable, got: {err:#}"))
        .reason
        .clone()
}

/// What the engine does once a point's data is stored: end the view, (write the
/// manifest,) then drop tracking no future backup needs.
fn commit(lab: &Lab, h: &mut Box<dyn VmHandle>, point: &str, full: &str) {
    assert_eq!(h.finish_backup(true).unwrap(), None, "qemu needs no token");
    h.cleanup(Some(point), Some(full), &lab.run_dir).unwrap();
}

/// A committed full backup `point` on a fresh handle.
fn committed_full(lab: &Lab, vm: &str, point: &str) {
    let mut h = lab.open(vm);
    h.begin_backup(&lab.req(point, Level::Full, None)).unwrap();
    commit(lab, &mut h, point, point);
}

#[test]
fn inventory_lists_vms_and_reports_a_dead_socket_r3_r36() {
    let lab = lab();
    let _a = lab.vm(
        "alpha",
        &[
            DiskSpec::qcow2("disk0", 8 * MIB),
            DiskSpec::raw("disk1", 4 * MIB),
        ],
        false,
    );
    let _b = lab.vm("beta", &[DiskSpec::qcow2("sys", 16 * MIB)], true);
    let dead = lab.qmp_dir.join("gamma.qmp");
    drop(UnixListener::bind(&dead).unwrap()); // socket file, nobody listening

    let vms = QemuPlatform::new(lab.qmp_dir.clone()).inventory().unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta", "gamma"]);

    let alpha = &vms[0];
    assert_eq!(alpha.error, None);
    assert_eq!(alpha.status, "running");
    assert_eq!(alpha.disks.len(), 2);
    let d0 = alpha.disks.iter().find(|d| d.name == "disk0").unwrap();
    assert_eq!(
        (d0.node.as_str(), d0.format.as_str(), d0.size, d0.cbt),
        ("disk0", "qcow2", 8 * MIB, true)
    );
    assert!(d0.file.as_deref().unwrap().ends_with("disk0.qcow2"));
    assert_eq!(d0.uncoverable, None);
    let d1 = alpha.disks.iter().find(|d| d.name == "disk1").unwrap();
    assert_eq!(
        (d1.format.as_str(), d1.size, d1.cbt),
        ("raw", 4 * MIB, false)
    );

    assert_eq!(
        vms[1].disks.len(),
        1,
        "guest exports are not disks: {:?}",
        vms[1].disks
    );
    assert_eq!(vms[1].disks[0].size, 16 * MIB);

    let gamma = &vms[2];
    let err = gamma
        .error
        .as_deref()
        .expect("dead socket must report an error");
    assert!(err.contains("gamma.qmp"), "error names the socket: {err}");
    assert!(gamma.disks.is_empty());
}

#[test]
fn read_only_node_is_uncoverable_r43() {
    let lab = lab();
    let vm = lab.vm("ro", &[DiskSpec::qcow2("disk0", 4 * MIB)], false);
    let img = lab.work.join("extra.qcow2");
    common::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"],
    );
    let add = format!(
        r#"{{"execute":"blockdev-add","arguments":{{"driver":"qcow2","node-name":"iso0","read-only":true,"file":{{"driver":"file","filename":"{}","read-only":true}}}}}}"#,
        img.display()
    );
    assert!(vm.qmp(&[&add])[0].get("return").is_some());
    let mut h = lab.open("ro");
    let info = h.info().unwrap();
    let iso = info.disks.iter().find(|d| d.node == "iso0").unwrap();
    assert_eq!(iso.uncoverable.as_deref(), Some("read-only disk"));
    let disk0 = info.disks.iter().find(|d| d.node == "disk0").unwrap();
    assert_eq!(disk0.uncoverable, None);
    let err = h
        .begin_backup(&lab.req("P1", Level::Full, None))
        .unwrap_err();
    assert!(format!("{err:#}").contains("disk 'iso0'"), "{err:#}");
    drop(h);
    assert!(qemu_leftovers(&vm).is_empty());
}

#[test]
fn full_backup_exports_the_point_in_time_while_the_guest_writes() {
    let lab = lab();
    let vm = lab.vm("web", &[DiskSpec::qcow2("disk0", 16 * MIB)], true);
    vm.write("disk0", 0, MIB, 0xaa);
    let mut h = lab.open("web");
    let snap = h.begin_backup(&lab.req("P1", Level::Full, None)).unwrap();
    assert_eq!(snap.exports.len(), 1);
    let e = &snap.exports[0];
    assert_eq!(
        (e.disk.name.as_str(), e.export.as_str()),
        ("disk0", "vmbackup-disk0")
    );
    assert_eq!(e.changes, None);
    // The QSD already runs an NBD server: its address comes from the command line.
    assert_eq!(
        e.addr,
        NbdAddr::Unix {
            path: vm.nbd_sock.clone().unwrap()
        }
    );

    vm.write("disk0", 0, 64 * 1024, 0xbb);
    vm.write("disk0", 8 * MIB, 64 * 1024, 0xcc);
    assert!(
        reads_pattern(&uri(&snap, 0), 0, MIB, 0xaa),
        "snapshot keeps old data"
    );
    assert!(
        reads_pattern(&uri(&snap, 0), 8 * MIB, 64 * 1024, 0),
        "snapshot keeps old zeroes"
    );
    assert!(
        reads_pattern(&vm.guest_uri("disk0"), 0, 64 * 1024, 0xbb),
        "guest sees new data"
    );

    h.finish_backup(true).unwrap();
    drop(h);
    assert!(qemu_leftovers(&vm).is_empty(), "{:?}", qemu_leftovers(&vm));
    assert_eq!(
        bitmaps(&vm, "disk0"),
        ["vmbackup-diff-P1", "vmbackup-inc-P1"]
    );
    assert!(lab.run_files().is_empty(), "{:?}", lab.run_files());
    assert!(reads_pattern(
        &vm.guest_uri("disk0"),
        8 * MIB,
        64 * 1024,
        0xcc
    ));
}

#[test]
fn inc_and_diff_export_exactly_the_changes_r26() {
    let lab = lab();
    let vm = lab.vm("db", &[DiskSpec::qcow2("disk0", 16 * MIB)], true);
    vm.write("disk0", 0, 4 * MIB, 0x11);
    committed_full(&lab, "db", "P1");
    vm.write("disk0", MIB, 64 * 1024, 0x22);
    vm.write("disk0", 5 * MIB, 4096, 0x33); // one 64 KiB granule

    let mut h = lab.open("db");
    let snap = h
        .begin_backup(&lab.req("P2", Level::Inc, Some("P1")))
        .unwrap();
    assert_eq!(
        context(&snap, 0).as_deref(),
        Some("qemu:dirty-bitmap:vmbackup-inc-P1")
    );
    assert_eq!(dirty_map(&snap, 0), [(MIB, KIB64), (5 * MIB, KIB64)]);
    vm.write("disk0", 7 * MIB, 64 * 1024, 0x44); // during the run: next point's change
    assert_eq!(dirty_map(&snap, 0), [(MIB, KIB64), (5 * MIB, KIB64)]);
    commit(&lab, &mut h, "P2", "P1");
    drop(h);
    assert_eq!(
        bitmaps(&vm, "disk0"),
        ["vmbackup-diff-P1", "vmbackup-inc-P2"]
    );

    let mut h = lab.open("db");
    let snap = h
        .begin_backup(&lab.req("P3", Level::Inc, Some("P2")))
        .unwrap();
    assert_eq!(dirty_map(&snap, 0), [(7 * MIB, KIB64)]);
    commit(&lab, &mut h, "P3", "P1");

    // A differential sees everything since the full, through a frozen copy.
    let mut req = lab.req("P4", Level::Diff, Some("P1"));
    req.latest_full = Some("P1".into());
    let snap = h.begin_backup(&req).unwrap();
    assert_eq!(
        context(&snap, 0).as_deref(),
        Some("qemu:dirty-bitmap:vmbackup-tmp-P4")
    );
    assert_eq!(
        dirty_map(&snap, 0),
        [(MIB, KIB64), (5 * MIB, KIB64), (7 * MIB, KIB64)]
    );
    commit(&lab, &mut h, "P4", "P1");
    drop(h);
    assert_eq!(
        bitmaps(&vm, "disk0"),
        ["vmbackup-diff-P1", "vmbackup-inc-P4"]
    );
    assert!(qemu_leftovers(&vm).is_empty());
}

#[test]
fn failed_run_keeps_every_change_tracked() {
    let lab = lab();
    let vm = lab.vm("mail", &[DiskSpec::qcow2("disk0", 16 * MIB)], true);
    committed_full(&lab, "mail", "P1");
    vm.write("disk0", 2 * MIB, 64 * 1024, 0x21); // before the failed run

    let mut h = lab.open("mail");
    h.begin_backup(&lab.req("P2", Level::Inc, Some("P1")))
        .unwrap();
    vm.write("disk0", 9 * MIB, 64 * 1024, 0x22); // during it
    h.finish_backup(false).unwrap();
    drop(h);
    assert_eq!(
        bitmaps(&vm, "disk0"),
        ["vmbackup-diff-P1", "vmbackup-inc-P1"]
    );
    assert!(qemu_leftovers(&vm).is_empty());

    let mut h = lab.open("mail");
    let snap = h
        .begin_backup(&lab.req("P3", Level::Inc, Some("P1")))
        .unwrap();
    assert_eq!(dirty_map(&snap, 0), [(2 * MIB, KIB64), (9 * MIB, KIB64)]);
    h.finish_backup(false).unwrap();

    // A failed full restores both generations.
    h.begin_backup(&lab.req("P5", Level::Full, None)).unwrap();
    vm.write("disk0", 12 * MIB, 64 * 1024, 0x23);
    h.finish_backup(false).unwrap();
    drop(h);
    assert_eq!(
        bitmaps(&vm, "disk0"),
        ["vmbackup-diff-P1", "vmbackup-inc-P1"]
    );
    let mut h = lab.open("mail");
    let mut req = lab.req("P6", Level::Diff, Some("P1"));
    req.latest_full = Some("P1".into());
    let snap = h.begin_backup(&req).unwrap();
    assert_eq!(
        dirty_map(&snap, 0),
        [(2 * MIB, KIB64), (9 * MIB, KIB64), (12 * MIB, KIB64)]
    );
    h.finish_backup(true).unwrap();
}

#[test]
fn cbt_unavailable_for_raw_missing_and_inconsistent_bitmaps() {
    let lab = lab();
    let mut vm = lab.vm(
        "app",
        &[
            DiskSpec::qcow2("disk0", 8 * MIB),
            DiskSpec::raw("disk1", 4 * MIB),
        ],
        false,
    );
    let mut h = lab.open("app");
    let err = h
        .begin_backup(&lab.req("P2", Level::Inc, Some("P1")))
        .unwrap_err();
    assert_eq!(cbt_reason(&err), "no bitmap for point P1");
    drop(h);
    assert!(bitmaps(&vm, "disk0").is_empty(), "nothing changed");
    assert!(qemu_leftovers(&vm).is_empty());
    let mut h = lab.open("app");

    // A full still works; the raw disk just gets no bitmaps.
    h.begin_backup(&lab.req("P1", Level::Full, None)).unwrap();
    h.finish_backup(true).unwrap();
    let err = h
        .begin_backup(&lab.req("P2", Level::Inc, Some("P1")))
        .unwrap_err();
    let cbt = err.downcast_ref::<CbtUnavailable>().unwrap();
    assert_eq!(
        (cbt.disk.as_str(), cbt.reason.as_str()),
        ("disk1", "disk is raw: no persistent bitmaps")
    );
    drop(h);
    assert!(bitmaps(&vm, "disk1").is_empty());
    assert_eq!(
        bitmaps(&vm, "disk0"),
        ["vmbackup-diff-P1", "vmbackup-inc-P1"]
    );

    // Stored once by a clean stop, then SIGKILL: they come back inconsistent.
    vm.quit();
    vm.restart();
    vm.kill();
    vm.restart();
    let after_kill = vm.bitmaps("disk0");
    assert_eq!(after_kill.len(), 2);
    assert!(after_kill.iter().all(|(_, inconsistent)| *inconsistent));
    let mut h = lab.open("app");
    let err = h
        .begin_backup(&lab.req("P2", Level::Inc, Some("P1")))
        .unwrap_err();
    assert_eq!(
        cbt_reason(&err),
        "bitmap inconsistent (QEMU stopped uncleanly)"
    );
    let report = h.cleanup(Some("P1"), Some("P1"), &lab.run_dir).unwrap();
    assert_eq!(report.actions.len(), 2, "{:?}", report.actions);
    assert!(report.actions.iter().all(|a| a.contains("inconsistent")));
    drop(h);
    assert!(bitmaps(&vm, "disk0").is_empty());
}

#[test]
fn cleanup_after_crash_of_an_uncommitted_run_r44() {
    let lab = lab();
    let vm = lab.vm("crm", &[DiskSpec::qcow2("disk0", 16 * MIB)], true);
    committed_full(&lab, "crm", "P1");
    vm.write("disk0", MIB, 64 * 1024, 0x31);
    let mut h = lab.open("crm");
    h.begin_backup(&lab.req("P2", Level::Inc, Some("P1")))
        .unwrap();
    vm.write("disk0", 3 * MIB, 64 * 1024, 0x32);
    drop(h); // vmbackup SIGKILLed mid-backup
    assert!(!qemu_leftovers(&vm).is_empty());
    assert!(!lab.run_files().is_empty());

    let mut h = lab.open("crm");
    let err = h
        .begin_backup(&lab.req("P3", Level::Inc, Some("P1")))
        .unwrap_err();
    assert!(format!("{err:#}").contains("run cleanup"), "{err:#}");

    let report = h.cleanup(Some("P1"), Some("P1"), &lab.run_dir).unwrap();
    let text = report.actions.join("\n");
    for expected in [
        "export vmbackup-disk0",
        "job vmbackup-job-disk0",
        "node vmbackup-fleece-disk0",
        "scratch file",
        "merged uncommitted bitmap vmbackup-inc-P2 into vmbackup-inc-P1",
        "re-enabled bitmap vmbackup-inc-P1",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    drop(h);
    assert!(qemu_leftovers(&vm).is_empty());
    assert!(lab.run_files().is_empty());
    assert_eq!(
        bitmaps(&vm, "disk0"),
        ["vmbackup-diff-P1", "vmbackup-inc-P1"]
    );
    let mut h = lab.open("crm");
    assert!(
        h.cleanup(Some("P1"), Some("P1"), &lab.run_dir)
            .unwrap()
            .actions
            .is_empty(),
        "idempotent"
    );

    let snap = h
        .begin_backup(&lab.req("P3", Level::Inc, Some("P1")))
        .unwrap();
    assert_eq!(dirty_map(&snap, 0), [(MIB, KIB64), (3 * MIB, KIB64)]);
    h.finish_backup(true).unwrap();
}

#[test]
fn cleanup_after_crash_of_a_committed_run_r44() {
    let lab = lab();
    let vm = lab.vm("erp", &[DiskSpec::qcow2("disk0", 16 * MIB)], true);
    committed_full(&lab, "erp", "P1");
    let mut h = lab.open("erp");
    h.begin_backup(&lab.req("P2", Level::Full, None)).unwrap();
    vm.write("disk0", 6 * MIB, 64 * 1024, 0x41);
    drop(h); // crashed after the engine committed P2

    let mut h = lab.open("erp");
    let report = h.cleanup(Some("P2"), Some("P2"), &lab.run_dir).unwrap();
    let text = report.actions.join("\n");
    assert!(
        text.contains("removed superseded bitmap vmbackup-inc-P1"),
        "{text}"
    );
    assert!(
        text.contains("removed superseded bitmap vmbackup-diff-P1"),
        "{text}"
    );
    drop(h);
    assert!(qemu_leftovers(&vm).is_empty());
    assert_eq!(
        bitmaps(&vm, "disk0"),
        ["vmbackup-diff-P2", "vmbackup-inc-P2"]
    );
    let mut h = lab.open("erp");

    let snap = h
        .begin_backup(&lab.req("P3", Level::Inc, Some("P2")))
        .unwrap();
    assert_eq!(dirty_map(&snap, 0), [(6 * MIB, KIB64)]);
    h.finish_backup(true).unwrap();
}

#[test]
fn own_nbd_server_is_started_and_stopped() {
    let lab = lab();
    let vm = lab.vm("plain", &[DiskSpec::qcow2("disk0", 4 * MIB)], false);
    let mut h = lab.open("plain");
    let snap = h.begin_backup(&lab.req("P1", Level::Full, None)).unwrap();
    // The platform is handed the VM's own scratch directory: fixed names inside.
    let sock = lab.run_dir.join("nbd.sock");
    assert_eq!(snap.exports[0].addr, NbdAddr::Unix { path: sock.clone() });
    assert!(reads_pattern(&uri(&snap, 0), 0, 4 * MIB, 0));
    h.finish_backup(true).unwrap();
    drop(h);
    assert!(!sock.exists());
    assert!(nbd_server_stopped(&vm, &lab.run_dir));

    // Crash with our server up: cleanup stops it.
    let mut h = lab.open("plain");
    h.begin_backup(&lab.req("P2", Level::Inc, Some("P1")))
        .unwrap();
    drop(h);
    let mut h = lab.open("plain");
    let report = h.cleanup(Some("P1"), Some("P1"), &lab.run_dir).unwrap();
    assert!(
        report
            .actions
            .iter()
            .any(|a| a.starts_with("stopped NBD server")),
        "{:?}",
        report.actions
    );
    drop(h);
    assert!(!sock.exists());
    assert!(nbd_server_stopped(&vm, &lab.run_dir));
    assert!(qemu_leftovers(&vm).is_empty());
}

/// QEMU has no NBD server running: starting one succeeds (then stop it again).
fn nbd_server_stopped(vm: &TestVm, dir: &Path) -> bool {
    let start = format!(
        r#"{{"execute":"nbd-server-start","arguments":{{"addr":{{"type":"unix","data":{{"path":"{}"}}}}}}}}"#,
        dir.join("probe.sock").display()
    );
    let r = vm.qmp(&[&start, r#"{"execute":"nbd-server-stop"}"#]);
    let _ = std::fs::remove_file(dir.join("probe.sock"));
    r[0].get("return").is_some()
}

#[test]
fn qmp_client_reports_errors_peer_pid_and_does_not_hang() {
    use std::time::Duration;
    use vmbackup::platform::qmp::{Qmp, QmpError};
    let lab = lab();
    let vm = lab.vm("q", &[DiskSpec::qcow2("disk0", MIB)], false);
    let mut qmp = Qmp::connect(&vm.qmp_sock).unwrap();
    assert_eq!(qmp.peer_pid().unwrap(), vm.pid());
    let err = qmp
        .execute(
            "block-dirty-bitmap-remove",
            serde_json::json!({"node": "disk0", "name": "nope"}),
        )
        .unwrap_err();
    let qmp_err = err.downcast_ref::<QmpError>().unwrap();
    assert_eq!(qmp_err.command, "block-dirty-bitmap-remove");
    assert!(
        err.to_string().contains("Dirty bitmap 'nope' not found"),
        "{err}"
    );
    // Replies stay matched to their commands after an error.
    let nodes = qmp
        .execute("query-named-block-nodes", serde_json::Value::Null)
        .unwrap();
    assert!(nodes
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["node-name"] == "disk0"));

    // A socket that accepts but never greets: an error, not a hang.
    let silent = lab.qmp_dir.join("silent.qmp");
    let _listener = UnixListener::bind(&silent).unwrap();
    let err = Qmp::connect_with_timeout(&silent, Duration::from_millis(200)).unwrap_err();
    assert!(
        format!("{err:#}").contains("no answer within 200ms (io_timeout)"),
        "{err:#}"
    );
}
