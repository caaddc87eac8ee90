//! Verify that heals, and damage that stays local (issue 7 §4), against real
//! QEMU: a corrupt chunk is quarantined by verify and stored again by the next
//! backup, which heals the older points; a corrupt delta met by a backup is
//! quarantined and its slot read again; a damaged manifest or index makes one
//! point damaged (listed, skipped as a base, removable), never the VM.

mod common;
use common::json_doc::assert_documented;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The chunk size: larger than QEMU's dirty-bitmap granularity (64 KiB), so a
/// small write changes a slot only in part (a delta).
const SLOT: u64 = 1024 * 1024;

struct Lab {
    env: Env,
    vm: TestVm,
}

/// A VM with a 16 MiB disk in 1 MiB slots, rule `r` (keep all).
fn lab() -> Lab {
    let (env, vm) = lab_with_rule(
        "1M",
        "vm1",
        16 * SLOT,
        &["--schedule", "full daily at 01:00"],
    );
    Lab { env, vm }
}

impl Lab {
    /// Run a backup; (point, exit code, its log lines and stderr, digest of the
    /// disk at snapshot).
    fn backup(&self, level: &str) -> (String, i32, String, String) {
        let digest = self.vm.shadow_digest("disk0");
        let (code, summary, logs) = self.env.run_now_at(None, "r", level);
        let point = summary["tasks"][0]["outcome"]["point"]
            .as_str()
            .unwrap_or_else(|| panic!("{summary} {logs}"))
            .to_string();
        (point, code, logs, digest)
    }

    fn repo(&self) -> PathBuf {
        self.env.path("target/r")
    }

    /// The object file a point's index names for `slot` (chunk or delta).
    fn object_of(&self, point: &str, slot: usize) -> PathBuf {
        let idx = fs::read(self.repo().join(format!("vms/lab/vm1/{point}/disk0.idx"))).unwrap();
        let at = 64 + 33 * slot;
        assert_ne!(idx[at], 0, "slot {slot} is not zero");
        let hex: String = idx[at + 1..at + 33]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.repo()
            .join(format!("chunks/{}/{}/{hex}", &hex[..2], &hex[2..4]))
    }

    fn verify(&self) -> (i32, Value) {
        let out = self
            .env
            .cmd()
            .args(["--json", "verify", "r"])
            .output()
            .unwrap();
        assert_documented("vmbackup verify", &String::from_utf8_lossy(&out.stdout));
        (
            out.status.code().unwrap(),
            serde_json::from_slice(&out.stdout).unwrap(),
        )
    }

    fn restores(&self, point: &str, digest: &str) {
        let got = self.env.restored_digest("r", "vm1", Some(point), "disk0");
        assert_eq!(got, digest, "point {point}");
    }
}

fn flip_last_byte(path: &Path) {
    let mut b = fs::read(path).unwrap();
    let last = b.len() - 1;
    b[last] ^= 0x55;
    fs::write(path, b).unwrap();
}

/// (point, status, healed) per verified point.
fn verdicts(doc: &Value) -> Vec<(String, String, u64)> {
    doc["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["point"].as_str().unwrap().to_string(),
                p["status"].as_str().unwrap().to_string(),
                p["healed_count"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_corrupt_chunk_is_quarantined_by_verify_and_healed_by_the_next_backup() {
    let l = lab();
    l.vm.write_random("disk0", 0, 4 * SLOT, 1);
    let (f1, _, _, d_f1) = l.backup("full");
    l.vm.write("disk0", 100, 10, 0x11);
    let (i1, _, _, d_i1) = l.backup("inc");
    // Slot 2 is in both points (the inc did not touch it).
    let chunk = l.object_of(&f1, 2);
    assert_eq!(chunk, l.object_of(&i1, 2));
    flip_last_byte(&chunk);

    let (code, doc) = l.verify();
    assert_eq!(code, 3, "{doc}");
    let v = verdicts(&doc);
    assert_eq!(v.iter().filter(|x| x.1 == "damaged").count(), 2, "{doc}");
    assert!(doc.to_string().contains("moved to quarantine/"), "{doc}");
    assert!(!chunk.exists(), "moved aside");
    let quarantine: Vec<_> = fs::read_dir(l.repo().join("quarantine")).unwrap().collect();
    assert_eq!(quarantine.len(), 1, "never deleted");
    // Verify again: the damage is still reported, now as quarantined.
    let (code, doc) = l.verify();
    assert_eq!(code, 3);
    assert!(doc.to_string().contains("quarantined"), "{doc}");

    // The next backup reads slot 2 again from the VM: same content, same name.
    l.vm.write("disk0", 12 * SLOT, 10, 0x22);
    let (i2, code, err, d_i2) = l.backup("inc");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 slot(s) name quarantined objects"), "{err}");
    assert!(chunk.exists(), "stored again");
    let (code, doc) = l.verify();
    assert_eq!(code, 0, "{doc}");
    let v = verdicts(&doc);
    assert!(v.iter().all(|x| x.1 == "ok"), "{doc}");
    assert!(v.iter().any(|x| x.0 == f1 && x.2 == 1), "healed: {doc}");
    let text = l.env.ok(&["verify", "r"]);
    assert!(text.contains("ok, healed"), "{text}");
    l.restores(&f1, &d_f1);
    l.restores(&i1, &d_i1);
    l.restores(&i2, &d_i2);
}

#[test]
fn a_corrupt_delta_met_by_a_backup_is_quarantined_and_its_slot_read_again() {
    let l = lab();
    l.vm.write_random("disk0", 0, 4 * SLOT, 2);
    let (f1, _, _, d_f1) = l.backup("full");
    l.vm.write("disk0", SLOT + 100, 10, 0x33);
    let (i1, _, _, _) = l.backup("inc");
    let delta = l.object_of(&i1, 1);
    assert!(fs::read(&delta).unwrap().starts_with(b"VMBDLTA1"));
    flip_last_byte(&delta);

    // The next inc changes slot 1 again: it reads the delta, finds it corrupt.
    l.vm.write("disk0", SLOT + 200, 10, 0x44);
    let (i2, code, err, d_i2) = l.backup("inc");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("slot 1: base delta") && err.contains("read again from the VM"),
        "{err}"
    );
    assert!(!delta.exists(), "quarantined");
    l.restores(&i2, &d_i2);
    l.restores(&f1, &d_f1);
    let (code, doc) = l.verify();
    assert_eq!(code, 3, "the inc that named the delta is damaged: {doc}");
    let v = verdicts(&doc);
    assert_eq!(
        v.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(),
        ["ok", "damaged", "ok"],
        "{doc}"
    );
}

#[test]
fn a_damaged_point_is_listed_skipped_as_base_and_removable_never_blocking_the_vm() {
    let l = lab();
    l.vm.write_random("disk0", 0, 2 * SLOT, 3);
    let (f1, _, _, d_f1) = l.backup("full");
    l.vm.write("disk0", 100, 10, 0x55);
    let (i1, _, _, d_i1) = l.backup("inc");
    l.vm.write("disk0", 200, 10, 0x66);
    let (i2, _, _, _) = l.backup("inc");

    // The newest point's manifest is torn.
    let manifest = l.repo().join(format!("vms/lab/vm1/{i2}/manifest.json"));
    fs::write(&manifest, b"{\"format\": 1, \"vm\"").unwrap();
    let pts = l.env.json(&["points", "r", "--vm", "vm1"]);
    let row = |id: &str| {
        pts.as_array()
            .unwrap()
            .iter()
            .find(|p| p["point"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(row(&i2)["status"], "damaged");
    assert!(row(&i2)["error"].as_str().unwrap().contains("manifest"));
    assert_eq!(row(&i1)["status"], "completed");
    let err = l.env.fails(
        3,
        &[
            "restore",
            "r",
            "--vm",
            "vm1",
            "--point",
            &i2,
            "--to",
            "/tmp/nowhere-x",
        ],
    );
    assert!(err.contains(&format!("point {i2} is damaged")), "{err}");
    l.restores(&i1, &d_i1);
    // Cleanup leaves it alone (it has a manifest object), verify reports it.
    l.env.ok(&["cleanup", "r"]);
    assert!(manifest.exists());
    let (code, doc) = l.verify();
    assert_eq!(code, 3);
    assert_eq!(
        verdicts(&doc)
            .iter()
            .map(|x| x.1.as_str())
            .collect::<Vec<_>>(),
        ["ok", "ok", "damaged"]
    );

    // The next inc does not use tracking relative to an older point: a full.
    l.vm.write("disk0", 300, 10, 0x77);
    let (f2, code, err, d_f2) = l.backup("inc");
    assert_eq!(code, 1, "a fallback: {err}");
    assert!(
        err.contains(&format!("point {i2} (newer than base {i1}) is damaged")),
        "{err}"
    );
    l.restores(&f2, &d_f2);

    // A bit flip inside the newest index (size intact): the next inc reads all.
    let index = l.repo().join(format!("vms/lab/vm1/{f2}/disk0.idx"));
    let mut b = fs::read(&index).unwrap();
    b[70] ^= 1;
    fs::write(&index, b).unwrap();
    l.vm.write("disk0", 400, 10, 0x78);
    let (f3, code, err, d_f3) = l.backup("inc");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("base point {f2} cannot be used")),
        "{err}"
    );
    l.restores(&f3, &d_f3);

    // forget removes the damaged points; verify is clean again.
    l.env.ok(&[
        "forget",
        "r",
        "--vm",
        "vm1",
        "--point",
        &format!("{i2},{f2}"),
    ]);
    let (code, doc) = l.verify();
    assert_eq!(code, 0, "{doc}");
    l.restores(&f1, &d_f1);
}
