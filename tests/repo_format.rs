//! The repository on disk, end to end: write points, read them back, damage them,
//! and check every damage is reported (docs/FORMAT.md).

use std::fs;
use std::path::Path;

use vmbackup::error::{exit_code_of, ExitCode};
use vmbackup::level::Level;
use vmbackup::repo::{
    digest_hex, index_file_name, vm_key, DiskIndex, Manifest, ManifestDisk, ManifestTotals,
    ManifestVm, PointStatus, ProblemKind, Repository, Slot, MANIFEST_FILE,
};

const CS: u32 = 64 * 1024;

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

/// A repository with one committed full point of `lab/web 01`; returns its key.
fn repo_with_full(root: &Path, point: &str) -> (Repository, String) {
    let repo = Repository::init_or_open(root).unwrap();
    let key = vm_key("lab", "web 01");
    let lock = repo.lock_vm(&key).unwrap();
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

#[test]
fn committed_point_round_trips_and_restores_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let (repo, key) = repo_with_full(&root, "20261124T120000Z");
    assert_eq!(key, "lab/web%2001");
    assert!(root.join("vmbackup-repo.toml").is_file());

    let repo = Repository::open(repo.root()).unwrap();
    assert_eq!(repo.list_vms().unwrap(), vec![key.clone()]);
    let points = repo.list_points(&key).unwrap();
    assert_eq!(points.len(), 1);
    let m = &points[0];
    assert_eq!(m.point, "20261124T120000Z");
    assert_eq!(
        m.disks[0].new_chunks, 2,
        "slot 2 deduplicated against slot 0"
    );
    assert_eq!(m.disks[0].reused_chunks, 1);
    assert_eq!(m.disks[0].zero_slots, 1);
    assert_eq!(restore(&repo, &key, "20261124T120000Z"), disk_bytes());

    let report = repo.verify_point(&key, "20261124T120000Z").unwrap();
    assert_eq!(report.chunks_checked, 2);
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn incremental_commit_needs_its_base_and_lists_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, key) = repo_with_full(dir.path(), "20261124T120000Z");
    let lock = repo.lock_vm(&key).unwrap();

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
    assert_eq!(repo.list_points(&key).unwrap().len(), 1);

    let mut writer = repo.begin_point(&lock, "20261126T120000Z").unwrap();
    writer.write_index("vda", &index).unwrap();
    let inc = manifest(
        "20261126T120000Z",
        Level::Inc,
        Some("20261124T120000Z"),
        vec![disk],
    );
    writer.commit(&inc).unwrap();
    let ids: Vec<String> = repo
        .list_points(&key)
        .unwrap()
        .into_iter()
        .map(|m| m.point)
        .collect();
    assert_eq!(ids, ["20261124T120000Z", "20261126T120000Z"]);
    assert_eq!(repo.load_manifest(&key, "20261126T120000Z").unwrap(), inc);
    assert_eq!(restore(&repo, &key, "20261126T120000Z"), changed);
    assert_eq!(restore(&repo, &key, "20261124T120000Z"), disk_bytes());
}

#[test]
fn commit_refuses_a_manifest_that_does_not_match_the_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, key) = repo_with_full(dir.path(), "20261124T120000Z");
    let lock = repo.lock_vm(&key).unwrap();
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
fn flipped_byte_is_corrupt_and_deleted_chunk_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let point = "20261124T120000Z";
    let (repo, key) = repo_with_full(dir.path(), point);
    let index = repo.load_index(&key, point, "vda").unwrap();
    let (Slot::Chunk(first), Slot::Chunk(last)) = (index.slots[0], index.slots[3]) else {
        panic!("slots 0 and 3 hold chunks");
    };

    let path = repo.chunks().path_of(&first);
    let mut bytes = fs::read(&path).unwrap();
    bytes[25] ^= 0x80;
    fs::write(&path, bytes).unwrap();
    fs::remove_file(repo.chunks().path_of(&last)).unwrap();

    let err = repo.chunks().get(&first).unwrap_err().to_string();
    assert!(
        err.contains(&digest_hex(&first)) && err.contains("corrupt"),
        "{err}"
    );

    let report = repo.verify_point(&key, point).unwrap();
    assert_eq!(report.chunks_checked, 2);
    assert_eq!(report.problems.len(), 2);
    let corrupt = &report.problems[0];
    assert_eq!((corrupt.disk.as_str(), corrupt.slot), ("vda", 0));
    assert_eq!(corrupt.digest, first);
    assert!(matches!(corrupt.kind, ProblemKind::Corrupt(_)));
    assert!(corrupt.to_string().contains(&digest_hex(&first)));
    let missing = &report.problems[1];
    assert_eq!((missing.slot, missing.digest), (3, last));
    assert_eq!(missing.kind, ProblemKind::Missing);
}

#[test]
fn truncated_corrupt_or_foreign_index_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let point = "20261124T120000Z";
    let (repo, key) = repo_with_full(dir.path(), point);
    let path = repo
        .root()
        .join("vms")
        .join(&key)
        .join(point)
        .join("vda.idx");
    let good = fs::read(&path).unwrap();

    fs::write(&path, &good[..good.len() - 5]).unwrap();
    let err = format!("{:#}", repo.load_index(&key, point, "vda").unwrap_err());
    assert!(
        err.contains("damaged") && err.contains("truncated"),
        "{err}"
    );

    let mut flipped = good.clone();
    flipped[64 + 33 + 7] ^= 1;
    fs::write(&path, &flipped).unwrap();
    let err = format!("{:#}", repo.verify_point(&key, point).unwrap_err());
    assert!(err.contains("checksum mismatch"), "{err}");

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
fn point_without_manifest_is_incomplete_not_listed_and_cleanup_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, key) = repo_with_full(dir.path(), "20261124T120000Z");
    let point_dir = repo.root().join("vms").join(&key).join("20261125T120000Z");
    fs::create_dir(&point_dir).unwrap();
    fs::write(point_dir.join("vda.idx"), b"partial").unwrap();

    assert_eq!(repo.list_points(&key).unwrap().len(), 1);
    assert_eq!(
        repo.incomplete_points(&key).unwrap(),
        vec![point_dir.clone()]
    );
    let err = repo.load_manifest(&key, "20261125T120000Z").unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");

    // A crash mid-backup: the writer is leaked, so its Drop never runs.
    let lock = repo.lock_vm(&key).unwrap();
    std::mem::forget(repo.begin_point(&lock, "20261126T120000Z").unwrap());
    assert_eq!(repo.incomplete_points(&key).unwrap().len(), 2);

    let removed = repo.remove_incomplete_points(&lock).unwrap();
    assert_eq!(removed, ["20261125T120000Z", "20261126T120000Z"]);
    assert!(!point_dir.exists());
    assert!(repo.incomplete_points(&key).unwrap().is_empty());
    assert_eq!(repo.list_points(&key).unwrap().len(), 1);
}

#[test]
fn aborted_point_leaves_nothing_and_point_ids_are_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, key) = repo_with_full(dir.path(), "20261124T120000Z");
    let lock = repo.lock_vm(&key).unwrap();
    let err = repo.begin_point(&lock, "20261124T120000Z").unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot create point"),
        "{err:#}"
    );

    let writer = repo.begin_point(&lock, "20261125T120000Z").unwrap();
    let point_dir = writer.dir().to_path_buf();
    assert!(point_dir.is_dir());
    writer.abort().unwrap();
    assert!(!point_dir.exists());
    assert!(repo.incomplete_points(&key).unwrap().is_empty());
}

#[test]
fn second_lock_of_a_vm_is_busy_exit_4_and_other_vms_are_free() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init_or_open(dir.path()).unwrap();
    let key = vm_key("lab", "web01");
    let held = repo.lock_vm(&key).unwrap();
    let err = repo.lock_vm(&key).unwrap_err();
    assert_eq!(exit_code_of(&err), ExitCode::Busy);
    assert!(
        err.to_string().contains("another backup of VM 'lab/web01'"),
        "{err}"
    );
    assert!(err.to_string().contains(".lock"), "{err}");
    let _other = repo.lock_vm(&vm_key("lab", "db01")).unwrap();
    drop(held);
    repo.lock_vm(&key).unwrap();
}

#[test]
fn init_refuses_foreign_directories_and_open_needs_a_repository() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("important.txt"), b"data").unwrap();
    let err = format!("{:#}", Repository::init_or_open(dir.path()).unwrap_err());
    assert!(
        err.contains("not empty and is not a vmbackup repository"),
        "{err}"
    );
    assert!(!dir.path().join("vmbackup-repo.toml").exists());

    let err = Repository::open(&dir.path().join("nowhere")).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = Repository::open(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("not a vmbackup repository"),
        "{err}"
    );

    let empty = dir.path().join("fresh");
    fs::create_dir_all(empty.join("lost+found")).unwrap();
    Repository::init_or_open(&empty).unwrap();
    Repository::init_or_open(&empty).unwrap();
}

#[test]
fn manifest_written_on_disk_is_the_commit_marker() {
    let dir = tempfile::tempdir().unwrap();
    let point = "20261124T120000Z";
    let (repo, key) = repo_with_full(dir.path(), point);
    let point_dir = repo.root().join("vms").join(&key).join(point);
    let mut names: Vec<String> = fs::read_dir(&point_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [MANIFEST_FILE, "vda.idx"], "no staging files left");
    fs::remove_file(point_dir.join(MANIFEST_FILE)).unwrap();
    assert!(repo.list_vms().unwrap().is_empty());
    assert!(repo.list_points(&key).unwrap().is_empty());
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

    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init_or_open(dir.path()).unwrap();
    let point = "20261124T120000Z";
    let threads: Vec<_> = ["web01", "web02"]
        .into_iter()
        .map(|vm| {
            let repo = repo.clone();
            std::thread::spawn(move || {
                let key = vm_key("lab", vm);
                let lock = repo.lock_vm(&key).unwrap();
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
        assert!(repo.verify_point(key, point).unwrap().is_ok());
        assert_eq!(restore(&repo, key, point), disk_bytes());
    }
    let chunk_files = walk_files(&repo.root().join("chunks"));
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
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(format!("repo{round}"));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let root = root.clone();
                std::thread::spawn(move || Repository::init_or_open(&root).map(|_| ()))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        Repository::open(&root).unwrap();
    }
}
