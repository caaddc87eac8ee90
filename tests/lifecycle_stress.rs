//! Prune and GC under fire, against real QEMU (issue 7 §3): backups that
//! dedup against chunks of points being pruned run in a loop while prune and
//! GC run over and over; SIGKILL during a prune and during a GC. Afterwards
//! every point restores byte-exact and verify is clean; a rerun completes.

mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmbackup::repo::{LocalStore, Repository, Store};

const CHUNK: u64 = 64 * 1024;

struct Lab {
    env: Env,
    vm: TestVm,
}

/// A VM with a 16 MiB disk, 64 KiB chunks, rule `r` with retention 0 days.
fn lab() -> Lab {
    let (env, vm) = lab_with_rule(
        "64K",
        "vm1",
        16 * MIB,
        &["--schedule", "full daily at 01:00", "--retention", "0"],
    );
    vm.write_random("disk0", 0, 8 * MIB, 99);
    Lab { env, vm }
}

/// `YYYY-MM-DD 12:00:00` of simulated day `d` (2027-02-01 is day 0).
fn day(d: u64) -> String {
    (chrono::NaiveDate::from_ymd_opt(2027, 2, 1).unwrap() + chrono::Days::new(d))
        .format("%Y-%m-%d 12:00:00")
        .to_string()
}

impl Lab {
    fn at(&self, now: &str, args: &[&str]) -> Output {
        self.env.cmd_at(now).args(args).output().unwrap()
    }

    /// A guest write into the hot first 2 MiB, then a backup on day `d`:
    /// (point, digest at snapshot).
    fn backup(&self, d: u64, level: &str, seed: u64) -> (String, String) {
        self.vm
            .write_random("disk0", (seed % 16) * 2 * CHUNK, 4 * CHUNK, seed);
        let digest = self.vm.shadow_digest("disk0");
        let (code, summary, logs) = self.env.run_now_at(Some(&day(d)), "r", level);
        assert!(matches!(code, 0 | 1), "backup on day {d}: {summary} {logs}");
        let point = summary["tasks"][0]["outcome"]["point"].as_str().unwrap();
        (point.to_string(), digest)
    }

    fn repo(&self) -> Repository {
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(&self.env.path("target")).unwrap());
        Repository::open_in(store, "r").unwrap()
    }

    fn points(&self) -> Vec<String> {
        self.repo().list_points("lab/vm1").unwrap().all_ids()
    }

    fn vm_dir(&self) -> PathBuf {
        self.env.path("target/r/vms/lab/vm1")
    }

    /// Every listed point restores (CLI) to the digest taken at its snapshot.
    fn all_restore(&self, taken: &[(String, String)]) {
        let listed = self.points();
        assert!(!listed.is_empty());
        for point in &listed {
            let want = &taken
                .iter()
                .find(|(p, _)| p == point)
                .unwrap_or_else(|| panic!("point {point} was never taken"))
                .1;
            let got = self.env.restored_digest("r", "vm1", Some(point), "disk0");
            assert_eq!(&got, want, "point {point}");
        }
    }
}

/// Point directories of the VM (committed or not).
fn point_dirs(dir: &Path) -> usize {
    fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn backups_run_while_prune_and_gc_run_over_and_over_and_every_point_restores() {
    let l = Arc::new(lab());
    let today = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let taken = Arc::new(Mutex::new(Vec::new()));
    // (start, end) of each backup process, and of each GC that freed objects.
    let backups = Arc::new(Mutex::new(Vec::<(Instant, Instant)>::new()));
    let freeing = Arc::new(Mutex::new(Vec::<(Instant, Instant)>::new()));
    let backup = |d: u64| {
        today.store(d, Ordering::SeqCst);
        let level = if d % 5 == 1 { "full" } else { "inc" };
        let t0 = Instant::now();
        let p = l.backup(d, level, d);
        backups.lock().unwrap().push((t0, Instant::now()));
        taken.lock().unwrap().push(p);
    };
    // The repository exists from the first backup on.
    backup(1);

    let pruner = {
        let (l, today, done, freeing) = (l.clone(), today.clone(), done.clone(), freeing.clone());
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !done.load(Ordering::SeqCst) {
                let now = day(today.load(Ordering::SeqCst));
                // Prune may meet a backup holding the VM's lock: exit 4, again.
                let out = l.at(&now, &["prune", "r"]);
                assert!(
                    matches!(out.status.code(), Some(0) | Some(4)),
                    "prune: {out:?}"
                );
                let t0 = Instant::now();
                let out = l.at(&now, &["--json", "gc"]);
                let t1 = Instant::now();
                let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
                let r = &doc["repositories"][0];
                match out.status.code() {
                    Some(0) => {
                        assert_eq!(r["report"]["missing_count"], 0, "{doc}");
                        if r["report"]["removed_count"].as_u64().unwrap() > 0 {
                            freeing.lock().unwrap().push((t0, t1));
                        }
                    }
                    // Deferred: a backup holds the repository.
                    Some(4) => assert_eq!(r["status"], "skipped", "{doc}"),
                    _ => panic!("gc: {out:?}"),
                }
                rounds += 1;
            }
            rounds
        })
    };

    for d in 2..=14u64 {
        backup(d);
    }
    done.store(true, Ordering::SeqCst);
    let rounds = pruner.join().unwrap();

    let backups = backups.lock().unwrap().clone();
    let freeing = freeing.lock().unwrap().clone();
    let (first_end, last_start) = (backups[0].1, backups.last().unwrap().0);
    let between = freeing
        .iter()
        .filter(|(s, e)| *s >= first_end && *e <= last_start)
        .count();
    assert!(
        between >= 1,
        "{rounds} prune/gc rounds, {} freeing GCs, none between the backups",
        freeing.len()
    );
    // A last prune after the last backup: retention 0 days leaves at most
    // today's point and the newest full.
    let out = l.at(&day(14), &["prune", "r"]);
    assert!(out.status.success(), "{out:?}");
    let listed = l.points();
    assert!(listed.len() <= 2, "{listed:?}");
    l.all_restore(&taken.lock().unwrap());
    l.env.ok(&["verify", "r"]);
}

/// Spawn `vmbackup ARGS` at `now`, wait until `started` says it got going,
/// SIGKILL it at once; panics if it finished first.
fn kill_during(l: &Lab, now: &str, args: &[&str], started: impl Fn() -> bool) {
    let mut child = l
        .env
        .child_cmd()
        .env("TZ", "UTC")
        .env("VMBACKUP_TEST_NOW", now)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !started() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{args:?} ended ({status}) before it could be killed mid-way");
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{args:?} never started"
        );
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "{args:?} was killed by a signal");
}

#[test]
fn sigkill_during_prune_and_during_gc_loses_no_retained_point_and_reruns_complete() {
    let l = lab();
    let mut taken = Vec::new();
    for d in 1..=16u64 {
        let level = if d == 1 { "full" } else { "inc" };
        taken.push(l.backup(d, level, d));
    }
    let before = l.points();
    assert_eq!(before.len(), 16);

    // Prune on day 20 keeps the full (day 1) and the newest point (day 16).
    let dirs = point_dirs(&l.vm_dir());
    kill_during(&l, &day(20), &["prune", "r"], || {
        point_dirs(&l.vm_dir()) < dirs
    });
    let after_kill = l.points();
    assert!(
        after_kill.contains(&before[0]) && after_kill.contains(&before[15]),
        "retained points are never lost: {after_kill:?}"
    );
    assert!(
        after_kill.iter().all(|p| before.contains(p)),
        "{after_kill:?}"
    );
    l.env.ok(&["verify", "r"]);
    // The killed prune's lock objects are stale (its process is gone): a rerun
    // takes the locks and completes.
    let out = l.at(&day(20), &["prune", "r"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(l.points(), [before[0].clone(), before[15].clone()]);
    // What the killed prune left half-removed (objects without a manifest) is
    // not a point; cleanup removes it.
    l.env.ok(&["cleanup", "r"]);
    assert!(l.repo().incomplete_points("lab/vm1").unwrap().is_empty());
    l.all_restore(&taken);

    // GC: killed once it has deleted its first object.
    let chunks = l.env.path("target/r/chunks");
    let objects = files_under(&chunks);
    let garbage = l.env.json(&["gc", "--dry-run"])["repositories"][0]["report"]["removed_count"]
        .as_u64()
        .unwrap();
    assert!(
        garbage > 20,
        "enough garbage to kill a GC mid-way: {garbage}"
    );
    kill_during(&l, &day(20), &["gc"], || files_under(&chunks) < objects);
    let left = files_under(&chunks);
    assert!(left < objects, "it was sweeping");
    l.env.ok(&["verify", "r"]);
    l.all_restore(&taken);
    // A backup is not blocked by the dead GC's exclusive lock.
    let (p, d) = l.backup(21, "inc", 77);
    taken.push((p, d));
    let out = l.at(&day(21), &["--json", "gc"]);
    assert!(out.status.success(), "{out:?}");
    let dry = l.env.json(&["gc", "--dry-run"]);
    assert_eq!(
        dry["repositories"][0]["report"]["removed_count"], 0,
        "{dry}"
    );
    l.env.ok(&["verify", "r"]);
    l.all_restore(&taken);
}
