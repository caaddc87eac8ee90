//! Garbage collection against real QEMU (issue 7 §3): it frees what prune
//! removed and nothing a point still names (every kept point restores and
//! verifies afterwards) but stale staging files, refuses to sweep while a point
//! cannot be read, and is deferred while the repository is locked.

mod common;
use common::json_doc::assert_documented;
use common::*;

use std::fs;
use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

struct Lab {
    env: Env,
    vm: TestVm,
}

fn lab() -> Lab {
    let (env, vm) = lab_with_rule(
        "1M",
        "vm1",
        8 * MIB,
        &["--schedule", "full daily at 01:00", "--retention", "0"],
    );
    Lab { env, vm }
}

impl Lab {
    fn at(&self, now: &str, args: &[&str]) -> Output {
        self.env.cmd_at(now).args(args).output().unwrap()
    }

    /// New random data in `mib` whole slots, then a backup at `now`.
    fn backup_at(&self, now: &str, level: &str, mib: u64, seed: u64) -> (String, String) {
        self.vm
            .write_random("disk0", (seed % 4) * MIB, mib * MIB, seed);
        let digest = self.vm.shadow_digest("disk0");
        let (code, summary, logs) = self.env.run_now_at(Some(now), "r", level);
        assert_eq!(code, 0, "{summary} {logs}");
        let point = summary["tasks"][0]["outcome"]["point"].as_str().unwrap();
        (point.to_string(), digest)
    }

    fn repo(&self) -> PathBuf {
        self.env.path("target/r")
    }

    fn gc(&self, extra: &[&str]) -> (i32, Value) {
        let mut args = vec!["--json", "gc"];
        args.extend_from_slice(extra);
        let out = self.env.cmd().args(&args).output().unwrap();
        assert_documented("vmbackup gc", &String::from_utf8_lossy(&out.stdout));
        let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        (out.status.code().unwrap(), doc)
    }

    fn assert_restores(&self, point: &str, digest: &str) {
        let got = self.env.restored_digest("r", "vm1", Some(point), "disk0");
        assert_eq!(got, digest, "point {point}");
    }
}

#[test]
fn gc_frees_what_prune_removed_and_every_kept_point_restores() {
    let l = lab();
    let (f1, d_f1) = l.backup_at("2026-11-30 01:00:00", "full", 2, 1);
    let (_i1, _) = l.backup_at("2026-11-30 13:00:00", "inc", 2, 2);
    let (i2, d_i2) = l.backup_at("2026-12-01 01:00:00", "inc", 1, 3);
    let chunks = l.repo().join("chunks");
    let before = files_under(&chunks);

    // Nothing was removed yet: nothing is garbage.
    let (code, doc) = l.gc(&[]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["repositories"][0]["report"]["removed_count"], 0);
    assert_eq!(files_under(&chunks), before);

    let out = l.at("2026-12-01 02:00:00", &["prune", "r"]);
    assert!(out.status.success(), "{out:?}");
    let (code, dry) = l.gc(&["--dry-run"]);
    assert_eq!(code, 0);
    let would = dry["repositories"][0]["report"]["removed_count"]
        .as_u64()
        .unwrap();
    assert!(would > 0, "the pruned inc's own objects are garbage: {dry}");
    assert_eq!(files_under(&chunks), before, "a dry run deletes nothing");

    let (code, doc) = l.gc(&["r"]);
    assert_eq!(code, 0, "{doc}");
    let r = &doc["repositories"][0];
    assert_eq!(r["status"], "completed");
    assert_eq!(r["rules"], serde_json::json!(["r"]));
    assert_eq!(r["report"]["removed_count"].as_u64().unwrap(), would);
    assert!(r["report"]["bytes_freed"].as_u64().unwrap() > 0);
    assert_eq!(r["report"]["missing_count"], 0);
    assert_eq!(files_under(&chunks) as u64, before as u64 - would);
    assert!(
        l.repo().join("gc.json").is_file(),
        "the last run is recorded"
    );

    l.assert_restores(&f1, &d_f1);
    l.assert_restores(&i2, &d_i2);
    l.env.ok(&["verify", "r"]);

    // Staging files of killed writers: GC deletes those older than an hour,
    // never a young one (a writer may still be publishing it).
    let leaf = first_file(&chunks).parent().unwrap().to_path_buf();
    let stale = leaf.join("deadbeef.tmp-1-0000000000000001");
    let young = leaf.join("deadbeef.tmp-1-0000000000000002");
    fs::write(&stale, b"x").unwrap();
    fs::write(&young, b"y").unwrap();
    fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .unwrap();
    let (_, again) = l.gc(&["--target", "t"]);
    let report = &again["repositories"][0]["report"];
    assert_eq!(report["removed_count"], 0, "{again}");
    assert_eq!(report["staging_removed_count"], 1, "{again}");
    assert!(!stale.exists() && young.exists());
}

/// Some file below `dir`.
fn first_file(dir: &std::path::Path) -> PathBuf {
    fn find(dir: &std::path::Path) -> Option<PathBuf> {
        fs::read_dir(dir).ok()?.find_map(|e| {
            let path = e.ok()?.path();
            match path.is_dir() {
                true => find(&path),
                false => Some(path),
            }
        })
    }
    find(dir).unwrap_or_else(|| panic!("no file under {}", dir.display()))
}

#[test]
fn gc_refuses_to_sweep_while_a_manifest_cannot_be_read() {
    let l = lab();
    l.backup_at("2026-11-30 01:00:00", "full", 2, 1);
    let (i1, _) = l.backup_at("2026-11-30 13:00:00", "inc", 2, 2);
    let (i2, d_i2) = l.backup_at("2026-12-01 01:00:00", "inc", 1, 3);
    assert!(l
        .at("2026-12-01 02:00:00", &["prune", "r"])
        .status
        .success());
    let manifest = l.repo().join(format!("vms/lab/vm1/{i2}/manifest.json"));
    let good = fs::read(&manifest).unwrap();
    fs::write(&manifest, b"{ torn").unwrap();
    let before = files_under(&l.repo().join("chunks"));

    let (code, doc) = l.gc(&[]);
    assert_eq!(code, 3, "{doc}");
    let r = &doc["repositories"][0];
    assert_eq!(r["status"], "failed");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("refuses to sweep") && err.contains(&i2),
        "{err}"
    );
    assert_eq!(
        files_under(&l.repo().join("chunks")),
        before,
        "nothing deleted"
    );
    // The damaged point is listed as such.
    let pts = l.env.json(&["points", "r", "--vm", "vm1"]);
    let row = pts
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["point"] == i2.as_str())
        .unwrap();
    assert_eq!(row["status"], "damaged");

    fs::write(&manifest, good).unwrap();
    let (code, doc) = l.gc(&[]);
    assert_eq!(code, 0, "{doc}");
    l.assert_restores(&i2, &d_i2);
    let _ = i1;
}

#[test]
fn gc_is_deferred_while_the_repository_is_locked() {
    let l = lab();
    l.backup_at("2026-11-30 01:00:00", "full", 1, 1);
    // A live holder (this test process) of a shared lock, as a backup holds it.
    let path = l.repo().join("locks/20261130T010000Z-1-00000000000000aa");
    write_live_lock(&path, "shared", "backup");

    let (code, doc) = l.gc(&[]);
    assert_eq!(code, 4, "{doc}");
    let r = &doc["repositories"][0];
    assert_eq!(r["status"], "skipped");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .starts_with("deferred: repository"),
        "{r}"
    );
    assert!(!l.repo().join("gc.json").exists());
    fs::remove_file(&path).unwrap();
    assert_eq!(l.gc(&[]).0, 0);
}
