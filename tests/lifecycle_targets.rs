//! A missing repository is an error, never a new one (issue 7 §1, sysadmin
//! review B3): an unmounted target, an empty mount point, a removed repository
//! or another target's disk fail with exit 3 and a distinct message, and
//! create nothing; the first backup of a rule creates its repository.

mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};

struct Lab {
    env: Env,
    vm: TestVm,
}

fn lab() -> Lab {
    let env = Env::new();
    fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 4 * MIB)], true);
    env.add_lab("t");
    env.add_rule(
        "r",
        "lab",
        "vm1",
        "t",
        &["--schedule", "full daily at 01:00"],
    );
    vm.write("disk0", 0, MIB, 0x42);
    Lab { env, vm }
}

impl Lab {
    fn target(&self) -> PathBuf {
        self.env.path("target")
    }

    fn backup(&self, level: &str) -> serde_json::Value {
        let out = self.env.ok(&["--json", "run-now", "r", "--level", level]);
        let summary = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["type"] == "summary")
            .unwrap();
        summary["tasks"][0]["outcome"].clone()
    }

    /// `run-now` that must fail with exit 3; returns stderr.
    fn backup_fails(&self) -> String {
        self.env.fails(3, &["run-now", "r", "--level", "inc"])
    }
}

/// Every path under `dir` (relative), for "nothing was created" checks.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if p.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn first_backup_creates_the_repository_and_verify_says_no_points_yet() {
    let l = lab();
    assert!(l.target().join("vmbackup-target.json").is_file(), "marked");
    let out = l.env.ok(&["verify", "r"]);
    assert!(out.contains("r: no points yet"), "{out}");
    let v = l.env.json(&["verify", "r"]);
    assert_eq!(v["rules"][0]["status"], "no points yet");
    assert_eq!(
        l.env.json(&["points", "r", "--vm", "vm1"]),
        serde_json::json!([])
    );
    assert!(!l.target().join("r").exists(), "reading creates nothing");
    let full = l.backup("full");
    assert!(l.target().join("r/vmbackup-repo.toml").is_file());
    let v = l.env.json(&["verify", "r"]);
    assert_eq!(v["rules"][0]["status"], "checked");
    assert_eq!(v["points"][0]["point"], full["point"]);
}

#[test]
fn unmounted_target_directory_fails_with_exit_3_and_creates_nothing() {
    let l = lab();
    let full = l.backup("full");
    let aside = l.env.path("target.unmounted");
    fs::rename(l.target(), &aside).unwrap();

    let err = l.backup_fails();
    assert!(
        err.contains("target 't'") && err.contains("not mounted?"),
        "{err}"
    );
    assert!(
        !l.target().exists(),
        "the target directory was not re-created"
    );
    let err = l.env.fails(3, &["verify", "r"]);
    assert!(err.contains("not mounted?"), "{err}");
    l.env.fails(3, &["points", "r", "--vm", "vm1"]);

    // Mounted again: the chain goes on (an inc, not a fallback full).
    fs::rename(&aside, l.target()).unwrap();
    l.vm.write("disk0", 2 * MIB, 4096, 0x43);
    let inc = l.backup("inc");
    assert_eq!(inc["level"], "inc");
    assert_eq!(inc["base"], full["point"]);
}

#[test]
fn empty_mount_point_without_marker_is_refused_with_the_mark_hint() {
    let l = lab();
    l.backup("full");
    let aside = l.env.path("target.disk");
    fs::rename(l.target(), &aside).unwrap();
    fs::create_dir(l.target()).unwrap();

    let err = l.backup_fails();
    assert!(
        err.contains("has no vmbackup target marker (not mounted?)")
            && err.contains("vmbackup target mark t"),
        "{err}"
    );
    assert_eq!(tree(&l.target()), Vec::<String>::new(), "nothing created");
    let shown = l.env.json(&["target", "show", "t"]);
    assert_eq!(shown["reachable"], false);
    assert_eq!(
        l.env.json(&["rule", "show", "r"])["vms"][0]["state"],
        "unknown",
        "R31: the target cannot be reached"
    );
}

#[test]
fn repository_missing_under_a_marked_target_is_an_error_not_a_new_one() {
    let l = lab();
    l.backup("full");
    fs::remove_dir_all(l.target().join("r")).unwrap();
    let before = tree(&l.target());

    let err = l.backup_fails();
    assert!(
        err.contains(&format!(
            "target 't' at {}: repository of rule 'r' missing; not mounted?",
            l.target().display()
        )),
        "{err}"
    );
    assert_eq!(tree(&l.target()), before, "nothing created");
    let err = l.env.fails(3, &["verify", "r"]);
    assert!(err.contains("repository of rule 'r' missing"), "{err}");
}

#[test]
fn a_target_registered_before_markers_needs_target_mark_once() {
    let l = lab();
    let full = l.backup("full");
    // As a state store migrated from before markers: no marker id, no marker.
    rusqlite::Connection::open(&l.env.state)
        .unwrap()
        .execute("UPDATE targets SET marker_id = NULL", [])
        .unwrap();
    fs::remove_file(l.target().join("vmbackup-target.json")).unwrap();
    let err = l.backup_fails();
    assert!(err.contains("run 'vmbackup target mark t'"), "{err}");

    let out = l.env.ok(&["target", "mark", "t"]);
    assert!(out.contains("target 't' marked"), "{out}");
    l.env.ok(&["target", "mark", "t"]);
    l.vm.write("disk0", 2 * MIB, 4096, 0x44);
    let inc = l.backup("inc");
    assert_eq!(inc["base"], full["point"]);
}

#[test]
fn another_targets_disk_is_refused_by_backups_and_by_mark() {
    let l = lab();
    l.backup("full");
    let marker = l.target().join("vmbackup-target.json");
    let mut other: serde_json::Value = serde_json::from_slice(&fs::read(&marker).unwrap()).unwrap();
    other["target_id"] = "0123456789abcdef0123456789abcdef".into();
    other["name"] = "offsite".into();
    fs::write(&marker, serde_json::to_vec(&other).unwrap()).unwrap();

    let err = l.backup_fails();
    assert!(
        err.contains("holds the marker of another target ('offsite'"),
        "{err}"
    );
    let before = l.env.dump();
    let err = l.env.fails(2, &["target", "mark", "t"]);
    assert!(err.contains("is the right disk mounted?"), "{err}");
    assert_eq!(l.env.dump(), before);
}

#[test]
fn target_add_keeps_the_marker_of_a_disk_registered_again() {
    let l = lab();
    let id = l.env.json(&["target", "show", "t"])["marker_id"].clone();
    let again = l.env.json(&[
        "target",
        "add",
        "t2",
        "--path",
        l.target().to_str().unwrap(),
    ]);
    assert_eq!(again["marker_id"], id, "same disk, same id");
}
