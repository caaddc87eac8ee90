//! The repository on disk, end to end: write points, read them back, damage them,
//! and check every damage is reported (docs/FORMAT.md).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmbackup::error::{exit_code_of, ExitCode};
use vmbackup::level::Level;
use vmbackup::repo::{
    digest_hex, index_file_name, object_key, vm_key, DiskIndex, LocalStore, Manifest, ManifestDisk,
    ManifestTotals, ManifestVm, PointStatus, ProblemKind, RepoLock, Repository, Slot, Store,
    VmLock, MANIFEST_FILE,
};

#[path = "common/store_contract.rs"]
mod store_contract;

const CS: u32 = 64 * 1024;

/// A directory keeps the same `Store` contract as S3 (tests/s3_store.rs).
#[test]
fn a_directory_store_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStore::open(dir.path()).unwrap();
    store_contract::check_store_contract(&s);
}

/// Disk content: slot 0 text, slot 1 zeros, slot 2 = slot 0 (dedup), short slot 3.
fn disk_bytes() -> Vec<u8> {
    let mut disk = Vec::new();
    disk.extend(b"slot zero ".repeat(CS as usize / 10 + 1)[..CS as usize].iter());
    disk.extend(vec![0u8; CS as usize]);
    disk.extend_from_within(..CS as usize);
    disk.extend(b"tail".repeat(250));
    disk
}

/// What the backup engine does: chunk the disk, store non-zero slots, index them.
fn store_disk(repo: &Repository, disk: &[u8]) -> (DiskIndex, ManifestDisk) {
    let mut index = DiskIndex::new_zero(disk.len() as u64, CS);
    let (mut new, mut reused, mut written) = (0, 0, 0);
    for i in 0..index.slots.len() {
        let start = index.slot_offset(i) as usize;
        let data = &disk[start..start + index.slot_len(i)];
        if data.iter().all(|&b| b == 0) {
            continue;
        }
        let inserted = repo.chunks().insert(data).unwrap();
        if inserted.new {
            new += 1;
        } else {
            reused += 1;
        }
        written += inserted.stored_bytes;
        index.slots[i] = Slot::Chunk(inserted.digest);
    }
    let entry = ManifestDisk {
        name: "vda".into(),
        size: disk.len() as u64,
        chunk_size: CS,
        index: index_file_name("vda"),
        bytes_read: disk.len() as u64,
        bytes_written: written,
        new_chunks: new,
        reused_chunks: reused,
        zero_slots: index.zero_slots(),
    };
    (index, entry)
}

fn manifest(point: &str, level: Level, base: Option<&str>, disks: Vec<ManifestDisk>) -> Manifest {
    let started = vmbackup::repo::parse_point_id(point).unwrap();
    Manifest {
        format: 1,
        vm: ManifestVm {
            platform: "lab".into(),
            name: "web 01".into(),
        },
        point: point.into(),
        level,
        base: base.map(String::from),
        full: base.map(String::from),
        status: PointStatus::Completed,
        started,
        finished: started,
        fallback_reason: None,
        vm_config: serde_json::json!({"memory": 2048}),
        tracking: None,
        totals: ManifestTotals::of(&disks),
        disks,
    }
}

/// A directory store in a temp dir; repositories live under its sub-directories.
struct Target {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
}

impl Target {
    fn new() -> Target {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(dir.path()).unwrap());
        Target { dir, store }
    }

    /// The file of `key` inside repository `repo`.
    fn file(&self, repo: &str, key: &str) -> PathBuf {
        self.dir.path().join(repo).join(key)
    }

    fn create(&self, repo: &str) -> Repository {
        Repository::create_in(self.store.clone(), repo).unwrap()
    }
}

/// The repository lock (shared) and the lock of VM `key`.
fn locks(repo: &Repository, key: &str) -> (RepoLock, VmLock) {
    let shared = repo.lock_shared("test").unwrap();
    let vm = repo.lock_vm(&shared, key, "test").unwrap();
    (shared, vm)
}

fn no_quarantine() -> HashSet<vmbackup::repo::Digest> {
    HashSet::new()
}

/// A repository `repo` with one committed full point of `lab/web 01`.
fn repo_with_full(t: &Target, point: &str) -> (Repository, String) {
    let repo = t.create("repo");
    let key = vm_key("lab", "web 01");
    let (_shared, lock) = locks(&repo, &key);
    let mut writer = repo.begin_point(&lock, point).unwrap();
    let (index, disk) = store_disk(&repo, &disk_bytes());
    writer.write_index("vda", &index).unwrap();
    writer
        .commit(&manifest(point, Level::Full, None, vec![disk]))
        .unwrap();
    (repo, key)
}

fn restore(repo: &Repository, key: &str, point: &str) -> Vec<u8> {
    let index = repo.load_index(key, point, "vda").unwrap();
    let mut out = Vec::new();
    for (i, slot) in index.slots.iter().enumerate() {
        out.extend(repo.chunks().read_slot(slot, index.slot_len(i)).unwrap());
    }
    out
}

fn ids(repo: &Repository, key: &str) -> Vec<String> {
    repo.list_points(key)
        .unwrap()
        .points
        .into_iter()
        .map(|m| m.point)
        .collect()
}

#[test]
fn committed_point_round_trips_and_restores_byte_for_byte() {
    let t = Target::new();
    let (_, key) = repo_with_full(&t, "20261124T120000Z");
    assert_eq!(key, "lab/web%2001");
    assert!(t.file("repo", "vmbackup-repo.toml").is_file());

    let repo = Repository::open_in(t.store.clone(), "repo").unwrap();
    assert_eq!(repo.list_vms().unwrap(), vec![key.clone()]);
    let points = repo.list_points(&key).unwrap();
    assert_eq!(points.points.len(), 1);
    assert!(points.damaged.is_empty());
    let m = &points.points[0];
    assert_eq!(m.point, "20261124T120000Z");
    assert_eq!(
        m.disks[0].new_chunks, 2,
        "slot 2 deduplicated against slot 0"
    );
    assert_eq!(m.disks[0].reused_chunks, 1);
    assert_eq!(m.disks[0].zero_slots, 1);
    assert_eq!(restore(&repo, &key, "20261124T120000Z"), disk_bytes());

    let report = repo
        .verify_point(&key, "20261124T120000Z", &no_quarantine())
        .unwrap();
    assert_eq!(report.chunks_checked, 2);
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn incremental_commit_needs_its_base_and_lists_oldest_first() {
    let t = Target::new();
    let (repo, key) = repo_with_full(&t, "20261124T120000Z");
    let (_shared, lock) = locks(&repo, &key);

    let mut changed = disk_bytes();
    changed[10] = b'X';
    let (index, disk) = store_disk(&repo, &changed);
    assert_eq!(disk.new_chunks, 1, "only the changed slot is new");

    // A base that does not exist is refused, and nothing is published.
    let mut writer = repo.begin_point(&lock, "20261125T120000Z").unwrap();
    writer.write_index("vda", &index).unwrap();
    let ghost = manifest(
        "20261125T120000Z",
        Level::Inc,
        Some("20261101T000000Z"),
        vec![disk.clone()],
    );
    let err = writer.commit(&ghost).unwrap_err();
    assert!(
        format!("{err:#}").contains("was removed during the backup"),
        "{err:#}"
    );
    assert_eq!(ids(&repo, &key).len(), 1);

    let mut writer = repo.begin_point(&lock, "20261126T120000Z").unwrap();
    writer.write_index("vda", &index).unwrap();
    let inc = manifest(
        "20261126T120000Z",
        Level::Inc,
        Some("20261124T120000Z"),
        vec![disk],
    );
    writer.commit(&inc).unwrap();
    assert_eq!(ids(&repo, &key), ["20261124T120000Z", "20261126T120000Z"]);
    assert_eq!(repo.load_manifest(&key, "20261126T120000Z").unwrap(), inc);
    assert_eq!(restore(&repo, &key, "20261126T120000Z"), changed);
    assert_eq!(restore(&repo, &key, "20261124T120000Z"), disk_bytes());
}

#[test]
fn commit_refuses_a_manifest_that_does_not_match_the_indexes() {
    let t = Target::new();
    let (repo, key) = repo_with_full(&t, "20261124T120000Z");
    let (_shared, lock) = locks(&repo, &key);
    let (index, disk) = store_disk(&repo, &disk_bytes());
    let point = "20261125T120000Z";

    let writer = repo.begin_point(&lock, point).unwrap();
    let err = writer
        .commit(&manifest(point, Level::Full, None, vec![disk.clone()]))
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("indexes were written for"),
        "{err:#}"
    );

    let mut writer = repo.begin_point(&lock, point).unwrap();
    writer.write_index("vda", &index).unwrap();
    let mut wrong_size = disk;
    wrong_size.size += 1;
    let mut m = manifest(point, Level::Full, None, vec![wrong_size]);
    m.totals = ManifestTotals::of(&m.disks);
    let err = writer.commit(&m).unwrap_err();
    assert!(
        format!("{err:#}").contains("differ from its index"),
        "{err:#}"
    );
    assert!(
        repo.incomplete_points(&key).unwrap().is_empty(),
        "dropped writers clean up"
    );
}

#[test]
fn commit_refuses_once_the_locks_are_lost() {
    let t = Target::new();
    let (repo, key) = repo_with_full(&t, "20261124T120000Z");
    let (shared, lock) = locks(&repo, &key);
    let (index, disk) = store_disk(&repo, &disk_bytes());
    let point = "20261125T120000Z";
    let mut writer = repo.begin_point(&lock, point).unwrap();
    writer.write_index("vda", &index).unwrap();
    // Someone judged our repository lock stale and removed it (a GC may run).
    drop(shared);
    let err = writer
        .commit(&manifest(point, Level::Full, None, vec![disk]))
        .unwrap_err();
    assert!(format!("{err:#}").contains("was lost"), "{err:#}");
    assert_eq!(ids(&repo, &key), ["20261124T120000Z"]);
}

#[test]
fn flipped_byte_is_corrupt_and_quarantined_deleted_chunk_is_missing() {
    let t = Target::new();
    let point = "20261124T120000Z";
    let (repo, key) = repo_with_full(&t, point);
    let index = repo.load_index(&key, point, "vda").unwrap();
    let (Slot::Chunk(first), Slot::Chunk(last)) = (index.slots[0], index.slots[3]) else {
        panic!("slots 0 and 3 hold chunks");
    };

    let path = t.file("repo", &object_key(&first));
    let mut bytes = fs::read(&path).unwrap();
    bytes[25] ^= 0x80;
    fs::write(&path, bytes).unwrap();
    fs::remove_file(t.file("repo", &object_key(&last))).unwrap();

    let report = repo.verify_point(&key, point, &no_quarantine()).unwrap();
    assert_eq!(report.chunks_checked, 2);
    assert_eq!(report.problems.len(), 2);
    let corrupt = &report.problems[0];
    assert_eq!((corrupt.disk.as_str(), corrupt.slot), ("vda", 0));
    assert_eq!(corrupt.digest, first);
    assert!(matches!(corrupt.kind, ProblemKind::Corrupt(_)));
    assert!(corrupt.to_string().contains(&digest_hex(&first)));
    assert!(corrupt.to_string().contains("moved to quarantine/"));
    let missing = &report.problems[1];
    assert_eq!((missing.slot, missing.digest), (3, last));
    assert_eq!(missing.kind, ProblemKind::Missing);

    // The corrupt chunk was moved aside: the next verify says so.
    assert!(!path.exists());
    let quarantined = repo.chunks().quarantined().unwrap();
    let report = repo.verify_point(&key, point, &quarantined).unwrap();
    assert_eq!(report.problems[0].kind, ProblemKind::Quarantined);
    let err = repo.chunks().get(&first).unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");

    // Storing the same content again heals the point.
    let data = &disk_bytes()[..64 * 1024];
    assert!(repo.chunks().insert(data).unwrap().new);
    repo.chunks().flush().unwrap();
    let report = repo.verify_point(&key, point, &quarantined).unwrap();
    assert_eq!(report.healed, 1);
    assert_eq!(
        report.problems.len(),
        1,
        "only the deleted chunk is missing"
    );
}

#[test]
fn truncated_corrupt_or_foreign_index_is_detected() {
    let t = Target::new();
    let point = "20261124T120000Z";
    let (repo, key) = repo_with_full(&t, point);
    let path = t.file("repo", &format!("vms/{key}/{point}/vda.idx"));
    let good = fs::read(&path).unwrap();

    fs::write(&path, &good[..good.len() - 5]).unwrap();
    let err = format!("{:#}", repo.load_index(&key, point, "vda").unwrap_err());
    assert!(
        err.contains("damaged") && err.contains("truncated"),
        "{err}"
    );
    let list = repo.list_points(&key).unwrap();
    assert!(list.points.is_empty());
    assert!(
        list.damaged[0].reason.contains("torn or damaged"),
        "{list:?}"
    );

    let mut flipped = good.clone();
    flipped[64 + 33 + 7] ^= 1;
    fs::write(&path, &flipped).unwrap();
    let report = repo.verify_point(&key, point, &no_quarantine()).unwrap();
    assert!(
        report
            .damaged
            .as_deref()
            .unwrap()
            .contains("checksum mismatch"),
        "{report:?}"
    );

    let mut newer = good.clone();
    newer[..8].copy_from_slice(b"VMBINDX2");
    fs::write(&path, &newer).unwrap();
    let err = format!("{:#}", repo.load_index(&key, point, "vda").unwrap_err());
    assert!(
        err.contains("'VMBINDX2'") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn unreadable_manifest_makes_a_damaged_point_not_a_failed_listing() {
    let t = Target::new();
    let (repo, key) = repo_with_full(&t, "20261124T120000Z");
    let (_shared, lock) = locks(&repo, &key);
    let mut writer = repo.begin_point(&lock, "20261125T120000Z").unwrap();
    let (index, disk) = store_disk(&repo, &disk_bytes());
    writer.write_index("vda", &index).unwrap();
    writer
        .commit(&manifest("20261125T120000Z", Level::Full, None, vec![disk]))
        .unwrap();
    fs::write(
        t.file(
            "repo",
            &format!("vms/{key}/20261124T120000Z/{MANIFEST_FILE}"),
        ),
        b"{ not json",
    )
    .unwrap();
    let list = repo.list_points(&key).unwrap();
    assert_eq!(ids(&repo, &key), ["20261125T120000Z"]);
    assert_eq!(list.damaged.len(), 1);
    assert_eq!(list.damaged[0].point, "20261124T120000Z");
    assert!(list.damaged[0].reason.contains("cannot parse manifest"));
    assert_eq!(list.all_ids().len(), 2);
    // Incomplete points are the ones without a manifest: a damaged one is not.
    assert!(repo.incomplete_points(&key).unwrap().is_empty());
    // Removable like any point.
    repo.remove_point(&lock, "20261124T120000Z").unwrap();
    assert!(repo.list_points(&key).unwrap().damaged.is_empty());
    assert!(!t
        .file("repo", &format!("vms/{key}/20261124T120000Z"))
        .exists());
}

#[test]
fn point_without_manifest_is_incomplete_not_listed_and_cleanup_removes_it() {
    let t = Target::new();
    let (repo, key) = repo_with_full(&t, "20261124T120000Z");
    let point_dir = t.file("repo", &format!("vms/{key}/20261125T120000Z"));
    fs::create_dir(&point_dir).unwrap();
    fs::write(point_dir.join("vda.idx"), b"partial").unwrap();

    assert_eq!(ids(&repo, &key).len(), 1);
    assert_eq!(
        repo.incomplete_points(&key).unwrap(),
        vec!["20261125T120000Z".to_string()]
    );
    let err = repo.load_manifest(&key, "20261125T120000Z").unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");

    // A crash mid-backup: the writer is leaked, so its Drop never runs.
    let (_shared, lock) = locks(&repo, &key);
    let mut leaked = repo.begin_point(&lock, "20261126T120000Z").unwrap();
    leaked
        .write_index("vda", &DiskIndex::new_zero(1 << 20, 64 * 1024))
        .unwrap();
    std::mem::forget(leaked);
    assert_eq!(repo.incomplete_points(&key).unwrap().len(), 2);

    let removed = repo.remove_incomplete_points(&lock).unwrap();
    assert_eq!(removed, ["20261125T120000Z", "20261126T120000Z"]);
    assert!(!point_dir.exists());
    assert!(repo.incomplete_points(&key).unwrap().is_empty());
    assert_eq!(ids(&repo, &key).len(), 1);
}

#[test]
fn aborted_point_leaves_nothing_and_point_ids_are_not_reused() {
    let t = Target::new();
    let (repo, key) = repo_with_full(&t, "20261124T120000Z");
    let (_shared, lock) = locks(&repo, &key);
    let err = repo.begin_point(&lock, "20261124T120000Z").unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot create point"),
        "{err:#}"
    );

    let mut writer = repo.begin_point(&lock, "20261125T120000Z").unwrap();
    writer
        .write_index("vda", &DiskIndex::new_zero(1 << 20, 64 * 1024))
        .unwrap();
    let point_dir = t.file("repo", &format!("vms/{key}/20261125T120000Z"));
    assert!(point_dir.is_dir());
    writer.abort().unwrap();
    assert!(!point_dir.exists());
    assert!(repo.incomplete_points(&key).unwrap().is_empty());
}

#[test]
fn second_lock_of_a_vm_is_busy_exit_4_and_other_vms_are_free() {
    let t = Target::new();
    let repo = t.create("repo");
    let key = vm_key("lab", "web01");
    let (shared, held) = locks(&repo, &key);
    let err = repo.lock_vm(&shared, &key, "backup").unwrap_err();
    assert_eq!(exit_code_of(&err), ExitCode::Busy);
    assert!(
        err.to_string().contains("VM 'lab/web01' is locked: test"),
        "{err}"
    );
    let _other = repo
        .lock_vm(&shared, &vm_key("lab", "db01"), "backup")
        .unwrap();
    drop(held);
    repo.lock_vm(&shared, &key, "backup").unwrap();
    // Locks are objects in the repository, not files beside the points.
    assert!(!t.file("repo", "vms/lab/web01/.lock").exists());
}

#[test]
fn create_refuses_foreign_directories_and_open_needs_a_repository() {
    let t = Target::new();
    fs::create_dir(t.dir.path().join("repo")).unwrap();
    fs::write(t.file("repo", "important.txt"), b"data").unwrap();
    let err = format!(
        "{:#}",
        Repository::create_in(t.store.clone(), "repo").unwrap_err()
    );
    assert!(
        err.contains("not empty and is not a vmbackup repository"),
        "{err}"
    );
    assert!(!t.file("repo", "vmbackup-repo.toml").exists());

    let err = Repository::open_in(t.store.clone(), "nowhere").unwrap_err();
    assert!(
        err.to_string().contains("not a vmbackup repository"),
        "{err}"
    );
    assert!(
        !t.dir.path().join("nowhere").exists(),
        "open creates nothing"
    );
    let err = Repository::open_in(t.store.clone(), "repo").unwrap_err();
    assert!(
        err.to_string().contains("not a vmbackup repository"),
        "{err}"
    );

    t.create("fresh");
    t.create("fresh");
    Repository::open_in(t.store.clone(), "fresh").unwrap();
}

#[test]
fn manifest_written_on_disk_is_the_commit_marker() {
    let t = Target::new();
    let point = "20261124T120000Z";
    let (repo, key) = repo_with_full(&t, point);
    let point_dir = t.file("repo", &format!("vms/{key}/{point}"));
    let mut names: Vec<String> = fs::read_dir(&point_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [MANIFEST_FILE, "vda.idx"], "no staging files left");
    fs::remove_file(point_dir.join(MANIFEST_FILE)).unwrap();
    assert!(repo.list_vms().unwrap().is_empty());
    assert!(ids(&repo, &key).is_empty());
}

#[test]
fn format_md_manifest_example_parses_and_is_consistent() {
    let doc = include_str!("../docs/FORMAT.md");
    let start = doc.find("```json\n").expect("FORMAT.md has a json block") + "```json\n".len();
    let len = doc[start..].find("```").expect("json block is closed");
    let manifest = Manifest::parse(&doc[start..start + len], Path::new("FORMAT.md")).unwrap();
    manifest.check().unwrap();
    assert_eq!(manifest.level, Level::Inc);
    assert_eq!(manifest.base.as_deref(), Some("20261123T120000Z"));
    let disk = &manifest.disks[0];
    let slots = disk.size.div_ceil(u64::from(disk.chunk_size));
    assert_eq!(
        disk.new_chunks + disk.reused_chunks + disk.zero_slots,
        slots
    );
}

#[test]
fn two_vms_back_up_into_one_repository_at_once_and_share_chunks() {
    fn assert_shareable<T: Send + Sync>() {}
    assert_shareable::<Repository>();
    assert_shareable::<vmbackup::repo::ChunkStore>();

    let t = Target::new();
    let repo = t.create("repo");
    let point = "20261124T120000Z";
    let threads: Vec<_> = ["web01", "web02"]
        .into_iter()
        .map(|vm| {
            let repo = repo.clone();
            std::thread::spawn(move || {
                let key = vm_key("lab", vm);
                let (_shared, lock) = locks(&repo, &key);
                let mut writer = repo.begin_point(&lock, point).unwrap();
                let (index, disk) = store_disk(&repo, &disk_bytes());
                writer.write_index("vda", &index).unwrap();
                let mut m = manifest(point, Level::Full, None, vec![disk]);
                m.vm.name = vm.into();
                writer.commit(&m).unwrap();
                key
            })
        })
        .collect();
    let keys: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(repo.list_vms().unwrap(), keys);
    for key in &keys {
        assert!(repo
            .verify_point(key, point, &no_quarantine())
            .unwrap()
            .is_ok());
        assert_eq!(restore(&repo, key, point), disk_bytes());
    }
    let chunk_files = walk_files(&t.file("repo", "chunks"));
    assert_eq!(chunk_files, 2, "both VMs' identical disks share two chunks");
}

fn walk_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk_files(&path)
            } else {
                1
            }
        })
        .sum()
}

/// Backups of several VMs may create one repository at the same moment.
#[test]
fn concurrent_first_opens_of_a_new_repository_all_succeed() {
    for round in 0..5 {
        let t = Target::new();
        let name = format!("repo{round}");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, name) = (t.store.clone(), name.clone());
                std::thread::spawn(move || Repository::create_in(store, &name).map(|_| ()))
            })
            .collect();
        for th in threads {
            th.join().unwrap().unwrap();
        }
        Repository::open_in(t.store.clone(), &name).unwrap();
    }
}

#[test]
fn files_and_directories_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let t = Target::new();
    let (_, key) = repo_with_full(&t, "20261124T120000Z");
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let root_mode = mode(t.dir.path());
    let mut stack = vec![t.dir.path().join("repo")];
    let mut checked = 0;
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            assert_eq!(mode(&p), 0o700, "{}", p.display());
            stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        checked += 1;
    }
    assert!(checked > 8, "{key}: {checked}");
    assert_eq!(mode(t.dir.path()), root_mode, "the target is the admin's");
}
