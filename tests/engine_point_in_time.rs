//! A guest write during a backup lands after the snapshot: the point holds the
//! old data, and the write is tracked for the next incremental (R7, CBT rotation).
//! The write is made from inside the engine's progress callback on its first read,
//! so it is guaranteed to happen while the backup is reading.

mod common;
use common::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmbackup::backup::{run_backup, BackupJob};
use vmbackup::level::Level;
use vmbackup::platform::qemu::QemuPlatform;
use vmbackup::repo::Repository;
use vmbackup::restore::{restore_point, ImageFormat, RestoreRequest};
use vmbackup::task::progress::{LogLevel, Phase, Progress};

/// Runs `action` once, at the first byte the engine reads.
struct WriteOnFirstRead {
    fired: AtomicBool,
    action: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Progress for WriteOnFirstRead {
    fn phase(&self, _: Phase) {}
    fn disk_total(&self, _: &str, _: u64) {}
    fn advance(&self, _: &str, _: u64) {
        if !self.fired.swap(true, Ordering::SeqCst) {
            if let Some(f) = self.action.lock().unwrap().take() {
                f();
            }
        }
    }
    fn log(&self, _: LogLevel, _: &str) {}
}

/// The repository `repo` in the directory `dir` (created by the first call).
fn repo(dir: &std::path::Path) -> Repository {
    let store: std::sync::Arc<dyn vmbackup::repo::Store> =
        std::sync::Arc::new(vmbackup::repo::LocalStore::open(dir).unwrap());
    Repository::create_in(store, "repo").unwrap()
}

fn job(dir: &std::path::Path, level: Level) -> BackupJob {
    BackupJob {
        platform: "lab".into(),
        vm: "vm1".into(),
        repo: repo(dir),
        requested: level,
        auto_cbt: true,
        cbt: true,
        quiesce: vmbackup::platform::Quiesce::Off,
        allow_plain_tcp_export: false,
        chunk_size: MIB as u32,
        run_dir: dir.join("run"),
        buffers: Arc::new(tokio::sync::Semaphore::new(2)),
        clock: vmbackup::clock::Clock::real(),
        bandwidth: Arc::new(vmbackup::task::throttle::Throttle::unlimited()),
        force_full: None,
        io_timeout: vmbackup::config::DEFAULT_IO_TIMEOUT,
    }
}

fn restore_digest(dir: &std::path::Path, point: &str) -> String {
    let repo = repo(dir);
    let to = dir.join(format!("restore-{point}"));
    let key = vmbackup::repo::vm_key("lab", "vm1");
    let manifest = vmbackup::restore::select_point(&repo, &key, Some(point)).unwrap();
    let req = RestoreRequest {
        repo: &repo,
        vm_key: &key,
        point: &manifest,
        dest: &to,
        format: ImageFormat::Raw,
        force: false,
        mode: vmbackup::restore::DEFAULT_MODE,
        workers: 2,
        on_staging: &|_| Ok(()),
    };
    restore_point(
        &req,
        &vmbackup::task::progress::Silent,
        &AtomicBool::new(false),
    )
    .unwrap();
    file_digest(&to.join("disk0.raw"))
}

#[test]
fn write_during_backup_is_not_in_the_point_but_in_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let qmp = tmp.path().join("qmp");
    let vm = Arc::new(TestVm::start(
        &qmp,
        &tmp.path().join("vm"),
        "vm1",
        &[DiskSpec::qcow2("disk0", 32 * MIB)],
        true,
    ));
    vm.write_random("disk0", 0, 32 * MIB, 11);
    let platform = QemuPlatform::new(qmp);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cancel = Arc::new(AtomicBool::new(false));

    for (level, round) in [(Level::Full, 1u8), (Level::Inc, 2u8)] {
        let before = vm.keep_shadow("disk0", &format!("before{round}"));
        // The last slot of the disk has not been read when the first bytes arrive.
        let writer = vm.clone();
        let progress = Arc::new(WriteOnFirstRead {
            fired: AtomicBool::new(false),
            action: Mutex::new(Some(Box::new(move || {
                writer.write("disk0", 31 * MIB, 64 * 1024, 0xe0 + round)
            }))),
        });
        let job = job(tmp.path(), level);
        let shared = job.repo.lock_shared("backup").unwrap();
        let lock = job.repo.lock_vm(&shared, "lab/vm1", "backup").unwrap();
        let out = run_backup(
            &job,
            &lock,
            &platform,
            progress.clone(),
            cancel.clone(),
            rt.handle(),
        )
        .unwrap();
        assert!(
            progress.fired.load(Ordering::SeqCst),
            "the guest write did not happen during the backup"
        );
        assert_eq!(out.level, level);
        assert_eq!(
            restore_digest(tmp.path(), &out.point),
            file_digest(&before),
            "{level} point holds data written after its snapshot"
        );
        assert_ne!(
            file_digest(&before),
            vm.shadow_digest("disk0"),
            "the write changed the disk"
        );
    }
    // A last incremental picks up the write made during the previous backup.
    let job = job(tmp.path(), Level::Inc);
    let shared = job.repo.lock_shared("backup").unwrap();
    let lock = job.repo.lock_vm(&shared, "lab/vm1", "backup").unwrap();
    let out = run_backup(
        &job,
        &lock,
        &platform,
        Arc::new(vmbackup::task::progress::Silent),
        cancel,
        rt.handle(),
    )
    .unwrap();
    assert_eq!(out.level, Level::Inc);
    assert!(
        out.totals.bytes_read >= 64 * 1024 && out.totals.bytes_read < MIB,
        "{:?}",
        out.totals
    );
    assert_eq!(
        restore_digest(tmp.path(), &out.point),
        vm.shadow_digest("disk0")
    );
}
