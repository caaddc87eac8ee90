//! The kill campaign behind `scripts/faults.sh` (docs/RELIABILITY.md): SIGKILL
//! vmbackup at distinct moments of fulls, incrementals, differentials and
//! restores of a real VM (qemu-storage-daemon), let the next runs and `cleanup`
//! repair what each kill left, then check what must hold: every listed point
//! restores byte-identical to the disk at its snapshot (the shadow oracle of the
//! test harness), and QEMU holds no vmbackup block job, export, node or extra
//! bitmap; no staging directory or scratch file is left. Prints the counts and
//! exits 1 when anything does not hold.
//!
//! Run through scripts/faults.sh (which builds the binary it points at with
//! `CARGO_BIN_EXE_vmbackup`); the argument is the number of kills (default 24).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;

const RULE: &str = "r";
const VM: &str = "vm1";
const DISK: &str = "disk0";
const KINDS: [&str; 4] = ["full", "inc", "diff", "restore"];

fn main() {
    let kills: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("the number of kills"))
        .unwrap_or(24);
    let env = Env::new();
    std::fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm(VM, &[DiskSpec::qcow2(DISK, 64 * MIB)], true);
    vm.write_random(DISK, 0, 32 * MIB, 1);
    env.add_lab("t");
    env.add_rule(
        RULE,
        "lab",
        VM,
        "t",
        // Slow enough that a kill lands in any phase of a run.
        &[
            &WEEKLY_FULL_AND_INC[..],
            &["--bandwidth", "mon-sun 00:00-24:00 32MiB/s"],
        ]
        .concat(),
    );
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    let record_new = |expected: &mut BTreeMap<String, String>, digest: &str| {
        for p in points(&env) {
            expected.entry(p).or_insert_with(|| digest.to_string());
        }
    };
    env.ok(&["run-now", RULE, "--level", "full"]);
    record_new(&mut expected, &vm.shadow_digest(DISK));

    let mut killed: BTreeMap<&str, usize> = BTreeMap::new();
    let mut committed_by_killed = 0;
    for i in 0..kills {
        let kind = KINDS[i % KINDS.len()];
        // Distinct moments: 25 ms apart, spread over the first 1.5 s of a run.
        let delay = Duration::from_millis(20 + (i as u64 * 97) % 1500);
        if kind == "restore" {
            let listed = points(&env);
            let point = &listed[i % listed.len()];
            let to = env.path(&format!("restore-killed-{i}"));
            std::fs::create_dir_all(&to).unwrap();
            kill_after(
                &env,
                &[
                    "restore",
                    RULE,
                    "--vm",
                    VM,
                    "--point",
                    point,
                    "--to",
                    to.to_str().unwrap(),
                ],
                delay,
            );
        } else {
            let seed = 100 + i as u64;
            let offset = (i as u64 * 3 * MIB) % (56 * MIB);
            vm.write_random(DISK, offset, 2 * MIB + (i as u64 % 5) * MIB, seed);
            let digest = vm.shadow_digest(DISK);
            let before = expected.len();
            kill_after(&env, &["run-now", RULE, "--level", kind], delay);
            record_new(&mut expected, &digest);
            committed_by_killed += expected.len() - before;
            // The next run of the same level repairs what the kill left and
            // moves the chain on.
            env.ok(&["run-now", RULE, "--level", kind]);
            record_new(&mut expected, &digest);
        }
        *killed.entry(kind).or_default() += 1;
    }
    let cleanup = env.ok(&["cleanup", RULE]);

    // Every listed point restores to the disk as it was at its snapshot.
    let listed = points(&env);
    let (mut ok, mut bad, mut unknown) = (0, 0, 0);
    for p in &listed {
        let to = env.path(&format!("verify-{p}"));
        env.ok(&[
            "restore",
            RULE,
            "--vm",
            VM,
            "--point",
            p,
            "--to",
            to.to_str().unwrap(),
        ]);
        let got = file_digest(&to.join(format!("{DISK}.raw")));
        match expected.get(p) {
            Some(want) if *want == got => ok += 1,
            Some(_) => {
                bad += 1;
                eprintln!("point {p}: restored image differs from the disk at its snapshot");
            }
            None => unknown += 1,
        }
        std::fs::remove_dir_all(&to).unwrap();
    }

    // What QEMU, the run directory and the restore destinations hold.
    let in_qemu = vm.qemu_leftovers();
    let bitmaps: Vec<String> = vm
        .bitmaps(DISK)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|n| n.starts_with("vmbackup-"))
        .collect();
    // Tracking relative to the newest point (inc) and the newest full (diff).
    let extra_bitmaps = bitmaps.len().saturating_sub(2)
        + bitmaps
            .iter()
            .filter(|b| b.starts_with("vmbackup-tmp-"))
            .count();
    let run_dir_entries = count_entries(&env.state.parent().unwrap().join("run"));
    let staging_left: usize = (0..kills)
        .map(|i| env.path(&format!("restore-killed-{i}")))
        .filter(|d| d.exists())
        .map(|d| {
            std::fs::read_dir(d)
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with(".vmbackup-restore-")
                })
                .count()
        })
        .sum();

    let total: usize = killed.values().sum();
    println!(
        "kills: {total} ({})",
        killed
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("points committed by a killed run before it died: {committed_by_killed}");
    println!("points listed: {}; restored byte-identical: {ok}; differing: {bad}; without a recorded digest: {unknown}", listed.len());
    println!(
        "left in QEMU: block jobs, exports, nodes: {} {in_qemu:?}; extra bitmaps {extra_bitmaps} (ours: {bitmaps:?})",
        in_qemu.len()
    );
    println!("left on disk: run directory entries {run_dir_entries}, restore staging directories {staging_left}");
    println!(
        "cleanup at the end said: {}",
        cleanup.trim().replace('\n', " | ")
    );
    let clean = bad == 0
        && unknown == 0
        && ok == listed.len()
        && in_qemu.len() + extra_bitmaps + run_dir_entries + staging_left == 0
        && total >= 20.min(kills);
    println!("result: {}", if clean { "PASS" } else { "FAIL" });
    std::process::exit(if clean { 0 } else { 1 });
}

/// The VM's points, oldest first.
fn points(env: &Env) -> Vec<String> {
    env.json(&["points", RULE, "--vm", VM])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["point"].as_str().unwrap().to_string())
        .collect()
}

/// Start `vmbackup ARGS`, SIGKILL it after `delay` (if it still runs), reap it.
fn kill_after(env: &Env, args: &[&str], delay: Duration) {
    let mut proc = env.spawn(args, &[]);
    std::thread::sleep(delay);
    let _ = proc.child().kill();
    proc.wait();
}

fn count_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}
