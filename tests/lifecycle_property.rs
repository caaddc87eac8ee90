//! A randomized sequence test of the whole lifecycle against real QEMU (issue
//! 7, "Tests and figures"): guest writes, full/inc/diff backups, failed
//! backups, retention changes, prunes, forgets and GCs over simulated days
//! (the test clock), from fixed seeds.
//!
//! After every step, every listed point's bytes (read through the library,
//! slot by slot, digest-verified) equal the shadow digest recorded when the
//! point was taken; points vanish only in the steps that remove them, and only
//! the ones those steps said; the newest point and the newest full survive
//! every prune; after every GC, every object a point refers to exists. Every
//! 20th step and at the end, every point is restored with the CLI.
//!
//! Bounded for CI (a 16 MiB disk, 64 KiB chunks, two seeds of 100 steps run
//! side by side, about half a minute). Longer runs: `scripts/lifecycle-soak.sh` (LIFECYCLE_SEEDS,
//! LIFECYCLE_STEPS). The steps are drawn from a seeded SplitMix64 rather than a
//! property-testing framework: a step is a QEMU process round trip, so a
//! failing sequence is replayed by its seed, not shrunk.

mod common;
use common::json_doc::assert_documented;
use common::*;

use std::collections::BTreeMap;
use std::fs;
use std::sync::Arc;

use serde_json::Value;
use vmbackup::repo::{LocalStore, Repository, Store};

const DISK: u64 = 16 * MIB;
const CHUNK: u64 = 64 * 1024;

/// SplitMix64: deterministic steps from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct World {
    env: Env,
    vm: TestVm,
    rng: Rng,
    /// Simulated minutes since the start (2027-01-04 00:00 UTC, a Monday).
    minutes: u64,
    /// Digest of the disk at each point's snapshot.
    taken: BTreeMap<String, String>,
    log: Vec<String>,
    /// Points removed by prune and forget; objects removed by GC.
    points_removed: usize,
    objects_removed: u64,
}

impl World {
    fn now(&self) -> String {
        let t = chrono::NaiveDate::from_ymd_opt(2027, 1, 4)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            + chrono::Duration::minutes(self.minutes as i64);
        t.format("%Y-%m-%d %H:%M:%S").to_string()
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        self.env.cmd_at(&self.now()).args(args).output().unwrap()
    }

    fn fail(&self, what: &str) -> ! {
        panic!("{what}\nsteps so far:\n{}", self.log.join("\n"))
    }

    fn repo(&self) -> Repository {
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(&self.env.path("target")).unwrap());
        Repository::open_in(store, "r").unwrap()
    }

    /// Listed point ids (good and damaged) through the library.
    fn listed(&self) -> Vec<String> {
        let repo = self.repo();
        let list = repo.list_points("lab/vm1").unwrap();
        if !list.damaged.is_empty() {
            self.fail(&format!("damaged points: {:?}", list.damaged));
        }
        list.all_ids()
    }

    /// Every listed point's bytes against its recorded digest (`full`: all of
    /// them; otherwise only `only`).
    fn check_points(&self, only: Option<&str>) {
        let repo = self.repo();
        for m in repo.list_points("lab/vm1").unwrap().points {
            if only.is_some_and(|o| o != m.point) {
                continue;
            }
            let index = repo.load_index("lab/vm1", &m.point, "disk0").unwrap();
            let mut h = blake3::Hasher::new();
            for (i, slot) in index.slots.iter().enumerate() {
                let data = repo
                    .chunks()
                    .read_slot(slot, index.slot_len(i))
                    .unwrap_or_else(|e| self.fail(&format!("point {} slot {i}: {e:#}", m.point)));
                h.update(&data);
            }
            let got = h.finalize().to_hex().to_string();
            match self.taken.get(&m.point) {
                Some(want) if *want == got => {}
                Some(_) => self.fail(&format!("point {} holds other bytes", m.point)),
                None => self.fail(&format!("point {} was never taken", m.point)),
            }
        }
    }

    /// GC never removes a referenced object: everything a point names exists.
    fn check_references(&self) {
        let repo = self.repo();
        let (marks, _) = vmbackup::repo::gc::mark(&repo).unwrap();
        for id in marks.ids() {
            if !repo.chunks().contains(id).unwrap() {
                self.fail(&format!(
                    "referenced object {} is gone",
                    vmbackup::repo::digest_hex(id)
                ));
            }
        }
    }

    fn restore_all(&self) {
        for (point, want) in &self.taken {
            if !self.listed().contains(point) {
                continue;
            }
            let dir = self.env.path("restore");
            let out = self.cli(&[
                "restore",
                "r",
                "--vm",
                "vm1",
                "--point",
                point,
                "--to",
                dir.to_str().unwrap(),
            ]);
            if !out.status.success() {
                self.fail(&format!("restore {point}: {out:?}"));
            }
            if file_digest(&dir.join("disk0.raw")) != *want {
                self.fail(&format!("CLI restore of {point} differs"));
            }
            fs::remove_dir_all(dir).unwrap();
        }
    }

    fn guest_write(&mut self) {
        // Mostly a hot 2 MiB region, so slots are rewritten and old versions
        // become garbage once the points naming them go.
        let span = if self.rng.below(10) < 7 {
            2 * MIB
        } else {
            DISK
        };
        let offset = self.rng.below(span / 512) * 512;
        let len = (1 + self.rng.below(4 * CHUNK / 512)) * 512;
        let len = len.min(DISK - offset);
        let seed = self.rng.next();
        match self.rng.below(4) {
            0 => self.vm.write_zeroes("disk0", offset, len),
            1 => self.vm.write("disk0", offset, len, (seed % 255) as u8 + 1),
            _ => self.vm.write_random("disk0", offset, len, seed),
        }
        self.log.push(format!("write {offset}+{len}"));
    }

    fn backup(&mut self) {
        let level = ["full", "inc", "inc", "diff"][self.rng.below(4) as usize];
        self.backup_at(level);
    }

    fn backup_at(&mut self, level: &str) {
        let digest = self.vm.shadow_digest("disk0");
        let out = self.cli(&["--json", "run-now", "r", "--level", level]);
        let code = out.status.code();
        if !matches!(code, Some(0) | Some(1)) {
            self.fail(&format!("{level} backup: {out:?}"));
        }
        let summary: Value = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .find(|v: &Value| v["type"] == "summary")
            .unwrap();
        let point = summary["tasks"][0]["outcome"]["point"]
            .as_str()
            .unwrap()
            .to_string();
        self.log
            .push(format!("{level} backup -> {point} ({code:?})"));
        self.taken.insert(point.clone(), digest);
        self.check_points(Some(&point));
        self.minutes += 1;
    }

    fn failed_backup(&mut self) {
        self.vm.quit();
        let out = self.cli(&["run-now", "r", "--level", "inc"]);
        if out.status.code() != Some(3) {
            self.fail(&format!("a backup of a stopped VM: {out:?}"));
        }
        self.vm.restart();
        self.log.push("failed backup".into());
        self.minutes += 1;
    }

    /// Prune, forget: the listing loses exactly the points the command removed,
    /// never the newest point nor the newest full (prune).
    fn remove_step(&mut self, args: &[&str], prune: bool) {
        let before = self.listed();
        let repo = self.repo();
        let good = repo.list_points("lab/vm1").unwrap().points;
        let newest = good.last().map(|m| m.point.clone());
        let newest_full = good
            .iter()
            .rev()
            .find(|m| m.level == vmbackup::level::Level::Full)
            .map(|m| m.point.clone());
        let out = self.cli(args);
        if !out.status.success() {
            self.fail(&format!("{args:?}: {out:?}"));
        }
        let command = if prune {
            "vmbackup prune"
        } else {
            "vmbackup forget"
        };
        assert_documented(command, &String::from_utf8_lossy(&out.stdout));
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        let marks: Vec<&Value> = if prune {
            doc["vms"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|v| v["points"].as_array().unwrap())
                .collect()
        } else {
            doc["points"].as_array().unwrap().iter().collect()
        };
        let removed: Vec<String> = marks
            .iter()
            .filter(|m| m["action"] == "remove")
            .map(|m| m["point"].as_str().unwrap().to_string())
            .collect();
        let after = self.listed();
        let expected: Vec<String> = before
            .iter()
            .filter(|p| !removed.contains(p))
            .cloned()
            .collect();
        if after != expected {
            self.fail(&format!(
                "{args:?} removed {removed:?}: {before:?} -> {after:?}"
            ));
        }
        if prune {
            for keep in [&newest, &newest_full].into_iter().flatten() {
                if !after.contains(keep) {
                    self.fail(&format!("prune removed the newest point or full {keep}"));
                }
            }
        }
        self.log.push(format!("{args:?} removed {removed:?}"));
        self.points_removed += removed.len();
        self.check_points(None);
    }

    fn prune(&mut self) {
        self.remove_step(&["--json", "prune", "r"], true);
    }

    fn forget(&mut self) {
        let listed = self.listed();
        if listed.is_empty() {
            return;
        }
        let pick = listed[self.rng.below(listed.len() as u64) as usize].clone();
        self.remove_step(
            &["--json", "forget", "r", "--vm", "vm1", "--point", &pick],
            false,
        );
    }

    fn gc(&mut self) {
        let out = self.cli(&["--json", "gc"]);
        if !out.status.success() {
            self.fail(&format!("gc: {out:?}"));
        }
        assert_documented("vmbackup gc", &String::from_utf8_lossy(&out.stdout));
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        let r = &doc["repositories"][0]["report"];
        if r["missing_count"] != 0 {
            self.fail(&format!("gc found referenced objects missing: {doc}"));
        }
        self.log.push(format!("gc removed {}", r["removed_count"]));
        self.objects_removed += r["removed_count"].as_u64().expect("removed_count");
        self.check_references();
        self.check_points(None);
    }

    fn retention(&mut self) {
        let r = match self.rng.below(5) {
            4 => "all".to_string(),
            n => n.to_string(),
        };
        let out = self.cli(&["rule", "edit", "r", "--retention", &r]);
        if !out.status.success() {
            self.fail(&format!("retention {r}: {out:?}"));
        }
        self.log.push(format!("retention {r}"));
    }
}

fn run(seed: u64, steps: usize) {
    let (env, vm) = lab_with_rule(
        "64K",
        "vm1",
        DISK,
        &["--schedule", "full daily at 01:00", "--retention", "1"],
    );
    let mut w = World {
        env,
        vm,
        rng: Rng(seed),
        minutes: 0,
        taken: BTreeMap::new(),
        log: vec![format!("seed {seed}")],
        points_removed: 0,
        objects_removed: 0,
    };
    w.guest_write();
    w.backup_at("full");
    for step in 1..=steps {
        match w.rng.below(100) {
            0..=24 => w.guest_write(),
            25..=51 => w.backup(),
            52..=54 => w.failed_backup(),
            55..=69 => {
                // Time passes: hours or days.
                w.minutes += 60 * (1 + w.rng.below(40));
                w.log.push(format!("now {}", w.now()));
            }
            70..=81 => w.prune(),
            82..=86 => w.forget(),
            87..=96 => w.gc(),
            _ => w.retention(),
        }
        if step % 20 == 0 {
            w.restore_all();
        }
    }
    // The end: days later, retention 0 days, a new full, prune and collect:
    // every earlier point but the full goes, and so do their own objects.
    w.minutes += 3 * 24 * 60;
    let out = w.cli(&["rule", "edit", "r", "--retention", "0"]);
    assert!(out.status.success(), "{out:?}");
    w.guest_write();
    w.backup_at("full");
    w.prune();
    w.gc();
    w.restore_all();
    let out = w.cli(&["verify", "r"]);
    if !out.status.success() && !w.listed().is_empty() {
        w.fail(&format!("verify: {out:?}"));
    }
    // The sequence must have exercised what it checks.
    eprintln!(
        "seed {seed}: {} points taken, {} removed, {} objects collected",
        w.taken.len(),
        w.points_removed,
        w.objects_removed
    );
    if w.taken.len() <= steps / 10 || w.points_removed == 0 || w.objects_removed == 0 {
        w.fail(&format!(
            "seed {seed} exercised too little: {} points taken, {} removed, {} objects collected",
            w.taken.len(),
            w.points_removed,
            w.objects_removed
        ));
    }
}

fn config() -> (Vec<u64>, usize) {
    let seeds = std::env::var("LIFECYCLE_SEEDS")
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().parse().unwrap()).collect())
        .unwrap_or_else(|| vec![1, 2]);
    let steps = std::env::var("LIFECYCLE_STEPS")
        .ok()
        .map(|s| s.parse().unwrap())
        .unwrap_or(100);
    (seeds, steps)
}

#[test]
fn random_lifecycles_never_lose_a_listed_point_or_a_referenced_object() {
    let (seeds, steps) = config();
    assert!(steps <= 10_000 && !seeds.is_empty());
    let threads: Vec<_> = seeds
        .into_iter()
        .map(|seed| std::thread::spawn(move || run(seed, steps)))
        .collect();
    for t in threads {
        if let Err(e) = t.join() {
            std::panic::resume_unwind(e);
        }
    }
}
