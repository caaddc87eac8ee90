//! Garbage collection against real QEMU (issue 7 §3): it frees what prune
//! removed and nothing a point still names (every kept point restores and
//! verifies afterwards), refuses to sweep while a point cannot be read, and is
//! deferred while the repository is locked.

mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

struct Lab {
    env: Env,
    vm: TestVm,
}

fn lab() -> Lab {
    let env = Env::new();
    fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 8 * MIB)], true);
    env.add_lab("t");
    env.add_rule(
        "r",
        "lab",
        "vm1",
        "t",
        &["--schedule", "full daily at 01:00", "--retention", "0"],
    );
    Lab { env, vm }
}

impl Lab {
    fn at(&self, now: &str, args: &[&str]) -> Output {
        self.env
            .cmd()
            .env("TZ", "UTC")
            .env("VMBACKUP_TEST_NOW", now)
            .args(args)
            .output()
            .unwrap()
    }

    /// New random data in `mib` whole slots, then a backup at `now`.
    fn backup_at(&self, now: &str, level: &str, mib: u64, seed: u64) -> (String, String) {
        self.vm
            .write_random("disk0", (seed % 4) * MIB, mib * MIB, seed);
        let digest = self.vm.shadow_digest("disk0");
        let out = self.at(now, &["--json", "run-now", "r", "--level", level]);
        assert!(out.status.success(), "{out:?}");
        let summary: Value = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .find(|v: &Value| v["type"] == "summary")
            .unwrap();
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
        let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        (out.status.code().unwrap(), doc)
    }

    fn assert_restores(&self, point: &str, digest: &str) {
        let dir = self.env.path(&format!("restore-{point}"));
        let to = dir.to_str().unwrap();
        self.env
            .ok(&["restore", "r", "--vm", "vm1", "--point", point, "--to", to]);
        assert_eq!(file_digest(&dir.join("disk0.raw")), digest, "point {point}");
        fs::remove_dir_all(dir).unwrap();
    }
}

/// Files under `dir`, recursively.
fn files(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() {
                files(&p)
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn gc_frees_what_prune_removed_and_every_kept_point_restores() {
    let l = lab();
    let (f1, d_f1) = l.backup_at("2026-11-30 01:00:00", "full", 2, 1);
    let (_i1, _) = l.backup_at("2026-11-30 13:00:00", "inc", 2, 2);
    let (i2, d_i2) = l.backup_at("2026-12-01 01:00:00", "inc", 1, 3);
    let chunks = l.repo().join("chunks");
    let before = files(&chunks);

    // Nothing was removed yet: nothing is garbage.
    let (code, doc) = l.gc(&[]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["repositories"][0]["report"]["removed_count"], 0);
    assert_eq!(files(&chunks), before);

    let out = l.at("2026-12-01 02:00:00", &["prune", "r"]);
    assert!(out.status.success(), "{out:?}");
    let (code, dry) = l.gc(&["--dry-run"]);
    assert_eq!(code, 0);
    let would = dry["repositories"][0]["report"]["removed_count"]
        .as_u64()
        .unwrap();
    assert!(would > 0, "the pruned inc's own objects are garbage: {dry}");
    assert_eq!(files(&chunks), before, "a dry run deletes nothing");

    let (code, doc) = l.gc(&["r"]);
    assert_eq!(code, 0, "{doc}");
    let r = &doc["repositories"][0];
    assert_eq!(r["status"], "completed");
    assert_eq!(r["rules"], serde_json::json!(["r"]));
    assert_eq!(r["report"]["removed_count"].as_u64().unwrap(), would);
    assert!(r["report"]["bytes_freed"].as_u64().unwrap() > 0);
    assert_eq!(r["report"]["missing_count"], 0);
    assert_eq!(files(&chunks) as u64, before as u64 - would);
    assert!(
        l.repo().join("gc.json").is_file(),
        "the last run is recorded"
    );

    l.assert_restores(&f1, &d_f1);
    l.assert_restores(&i2, &d_i2);
    l.env.ok(&["verify", "r"]);
    let (_, again) = l.gc(&["--target", "t"]);
    assert_eq!(again["repositories"][0]["report"]["removed_count"], 0);
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
    let before = files(&l.repo().join("chunks"));

    let (code, doc) = l.gc(&[]);
    assert_eq!(code, 3, "{doc}");
    let r = &doc["repositories"][0];
    assert_eq!(r["status"], "failed");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("refuses to sweep") && err.contains(&i2),
        "{err}"
    );
    assert_eq!(files(&l.repo().join("chunks")), before, "nothing deleted");
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
    let host = String::from_utf8(
        std::process::Command::new("uname")
            .arg("-n")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let stat = fs::read_to_string(format!("/proc/{}/stat", std::process::id())).unwrap();
    let start: u64 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let id = format!("20261130T010000Z-{}-00000000000000aa", std::process::id());
    let lock = serde_json::json!({
        "id": id,
        "scope": {"kind": "repository"},
        "mode": "shared",
        "purpose": "backup",
        "host": host,
        "machine_id": fs::read_to_string("/etc/machine-id").ok().map(|s| s.trim().to_string()),
        "pid": std::process::id(),
        "pid_start": start,
        "created": "2026-11-30T01:00:00Z",
        "heartbeat": "2099-01-01T00:00:00Z",
        "expires": "2099-01-01T00:05:00Z",
    });
    let path = l.repo().join(format!("locks/{id}"));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, serde_json::to_vec(&lock).unwrap()).unwrap();

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
