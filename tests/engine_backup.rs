//! The backup engine end to end against real QEMU (issue 3): every point of a
//! full / inc / diff chain restores byte-identical to the VM's disks at snapshot
//! time (the shadow oracle), across multi-disk VMs, sparse disks, zeroed ranges,
//! partial-chunk writes and a guest writing during the backup.

mod common;
use common::*;

use std::path::Path;

const CHUNK: u64 = MIB; // system.conf i2vp_transbuffer = 1M: many slots in small disks

struct Lab {
    env: Env,
    vm: TestVm,
}

fn lab(name: &str, disks: &[DiskSpec]) -> Lab {
    let env = Env::new();
    std::fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm(name, disks, true);
    env.add_lab("t");
    env.add_rule(
        "r",
        "lab",
        name,
        "t",
        &["--schedule", "full daily at 01:00"],
    );
    Lab { env, vm }
}

/// `run-now --json`; returns (exit code, the summary's entry for the VM).
fn run_now(env: &Env, level: &str) -> (i32, serde_json::Value) {
    let out = env
        .cmd()
        .args(["--json", "run-now", "r", "--level", level])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == "summary")
        .unwrap_or_else(|| {
            panic!(
                "no summary: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (out.status.code().unwrap(), summary["tasks"][0].clone())
}

fn backup(env: &Env, level: &str) -> serde_json::Value {
    let (code, vm) = run_now(env, level);
    assert_eq!(code, 0, "{level} backup: {vm}");
    assert_eq!(vm["outcome"]["level"], level, "{vm}");
    vm["outcome"].clone()
}

/// Restore `point` of VM `vm` into a fresh dir; digest of each disk's raw image.
fn restored(env: &Env, vm: &str, point: &str, disks: &[&str]) -> Vec<String> {
    let dir = env.path(&format!("restore-{point}"));
    env.ok(&[
        "restore",
        "r",
        "--vm",
        vm,
        "--point",
        point,
        "--to",
        dir.to_str().unwrap(),
    ]);
    disks
        .iter()
        .map(|d| file_digest(&dir.join(format!("{d}.raw"))))
        .collect()
}

fn digests(paths: &[&Path]) -> Vec<String> {
    paths.iter().map(|p| file_digest(p)).collect()
}

#[test]
fn full_inc_diff_chain_every_point_restores_byte_exact() {
    let l = lab(
        "vm1",
        &[
            DiskSpec::qcow2("disk0", 24 * MIB),
            DiskSpec::qcow2("disk1", 8 * MIB),
        ],
    );
    let (env, vm) = (&l.env, &l.vm);
    let disks = ["disk0", "disk1"];
    let mut expect = Vec::new();

    // p1 full: data in a few places, both disks; most of the disk stays sparse.
    vm.write_random("disk0", 0, 3 * MIB, 1);
    vm.write_random("disk0", 10 * MIB + 4096, 2 * MIB, 2);
    vm.write("disk1", 5 * MIB, 64 * 1024, 0x5a);
    let p1 = backup(env, "full");
    expect.push((
        p1["point"].as_str().unwrap().to_string(),
        disks.map(|d| vm.keep_shadow(d, "p1")),
    ));
    assert!(
        p1["totals"]["bytes_read"].as_u64().unwrap() <= 6 * MIB,
        "full read only allocated data: {p1}"
    );

    // p2 inc: partial-chunk writes, a zeroed range over old data, a new region.
    vm.write("disk0", 4096, 4096, 0x11);
    vm.write("disk0", CHUNK - 512, 1024, 0x22); // straddles a slot boundary
    vm.write_zeroes("disk0", 10 * MIB + 4096, MIB);
    vm.write_random("disk0", 20 * MIB, 512 * 1024, 3);
    let p2 = backup(env, "inc");
    expect.push((
        p2["point"].as_str().unwrap().to_string(),
        disks.map(|d| vm.keep_shadow(d, "p2")),
    ));
    assert_eq!(p2["base"], p1["point"]);
    // Partly changed slots are stored as deltas (changed bytes only), not as
    // rewritten 1 MiB chunks: slots 0 and 1 alone would be 2 MiB of random data.
    assert!(
        p2["totals"]["bytes_written"].as_u64().unwrap() < CHUNK,
        "inc stored whole chunks: {p2}"
    );
    assert!(
        p2["totals"]["bytes_read"].as_u64().unwrap() < 2 * MIB,
        "inc read only changed data: {p2}"
    );

    // p3 diff: against the full; includes p2's changes too.
    vm.write("disk1", 0, 8192, 0x33);
    let p3 = backup(env, "diff");
    expect.push((
        p3["point"].as_str().unwrap().to_string(),
        disks.map(|d| vm.keep_shadow(d, "p3")),
    ));
    assert_eq!(p3["base"], p1["point"]);

    // p4 inc after a diff: based on the diff.
    vm.write_random("disk0", 2 * MIB, 256 * 1024, 4);
    // More than half of slot 12 changes: stored as a whole chunk again.
    vm.write_random("disk0", 12 * MIB, 700 * 1024, 6);
    let p4 = backup(env, "inc");
    expect.push((
        p4["point"].as_str().unwrap().to_string(),
        disks.map(|d| vm.keep_shadow(d, "p4")),
    ));
    assert_eq!(p4["base"], p3["point"]);

    // p5 diff: still against the full, so it holds everything since p1.
    vm.write_zeroes("disk0", 0, 64 * 1024);
    let p5 = backup(env, "diff");
    expect.push((
        p5["point"].as_str().unwrap().to_string(),
        disks.map(|d| vm.keep_shadow(d, "p5")),
    ));
    assert_eq!(p5["base"], p1["point"]);
    assert!(
        p5["totals"]["bytes_read"].as_u64().unwrap()
            >= p3["totals"]["bytes_read"].as_u64().unwrap()
    );

    // Every point restores to exactly what the disks held when it was taken.
    for (point, shadows) in &expect {
        let want = digests(&shadows.iter().map(|p| p.as_path()).collect::<Vec<_>>());
        assert_eq!(restored(env, "vm1", point, &disks), want, "point {point}");
    }
    let pts = env.json(&["points", "r", "--vm", "vm1"]);
    let levels: Vec<&str> = pts
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["level"].as_str().unwrap())
        .collect();
    assert_eq!(levels, ["full", "inc", "diff", "inc", "diff"]);
    env.ok(&["verify", "r"]);
    // Only our tracking bitmaps are left on the VM: the newest point's inc and the full's diff.
    let names: Vec<String> = vm.bitmaps("disk0").into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            format!("vmbackup-diff-{}", expect[0].0),
            format!("vmbackup-inc-{}", expect[4].0)
        ]
    );
}

#[test]
fn r27_first_inc_runs_as_a_planned_full() {
    let l = lab("vm1", &[DiskSpec::qcow2("disk0", 8 * MIB)]);
    l.vm.write("disk0", 0, MIB, 0x42);
    let (code, out) = run_now(&l.env, "inc");
    // The VM's very first backup is a full by design: info, exit 0.
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["outcome"]["level"], "full");
    assert!(
        out["outcome"]["fallback"].as_str().unwrap().contains("R27"),
        "{out}"
    );
    assert_eq!(out["outcome"]["fallback_planned"], true, "{out}");
    let p = out["outcome"]["point"].as_str().unwrap();
    assert_eq!(
        restored(&l.env, "vm1", p, &["disk0"]),
        [l.vm.shadow_digest("disk0")]
    );
}

#[test]
fn r26_raw_disk_without_cbt_backs_up_as_a_planned_full() {
    let l = lab("vm1", &[DiskSpec::raw("disk0", 8 * MIB)]);
    l.vm.write("disk0", MIB, MIB, 0x42);
    backup(&l.env, "full");
    l.vm.write("disk0", 3 * MIB, 4096, 0x43);
    let (code, out) = run_now(&l.env, "inc");
    // A raw disk cannot hold a bitmap: every backup is a full, by design, so
    // nightly runs exit 0 instead of warning forever.
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["outcome"]["fallback_planned"], true, "{out}");
    assert_eq!(out["outcome"]["level"], "full");
    assert!(
        out["outcome"]["fallback"].as_str().unwrap().contains("R26"),
        "{out}"
    );
    let p = out["outcome"]["point"].as_str().unwrap();
    assert_eq!(
        restored(&l.env, "vm1", p, &["disk0"]),
        [l.vm.shadow_digest("disk0")]
    );
}

#[test]
fn sparse_disk_reads_only_allocated_data_and_restores_sparse() {
    let l = lab("vm1", &[DiskSpec::qcow2("disk0", 1024 * MIB)]);
    l.vm.write_random("disk0", 700 * MIB, 2 * MIB, 9);
    let out = backup(&l.env, "full");
    assert!(
        out["totals"]["bytes_read"].as_u64().unwrap() <= 2 * MIB,
        "{out}"
    );
    let p = out["point"].as_str().unwrap();
    let dir = l.env.path("restore");
    l.env.ok(&[
        "restore",
        "r",
        "--vm",
        "vm1",
        "--point",
        p,
        "--to",
        dir.to_str().unwrap(),
    ]);
    let img = dir.join("disk0.raw");
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&img).unwrap();
    assert_eq!(md.len(), 1024 * MIB);
    assert!(
        md.blocks() * 512 < 16 * MIB,
        "restored image is not sparse: {} bytes allocated",
        md.blocks() * 512
    );
    assert_eq!(file_digest(&img), l.vm.shadow_digest("disk0"));
}

/// A disk whose size is not a multiple of 4 KiB (8 MiB + 512 bytes), its last
/// sector written: the restored image has exactly the disk's size and bytes
/// (a direct write pads the last block; the image is cut back after).
#[test]
fn a_disk_ending_inside_a_block_restores_to_its_exact_size() {
    let size = 8 * MIB + 512;
    let l = lab("vm1", &[DiskSpec::qcow2("disk0", size)]);
    l.vm.write_random("disk0", 0, MIB, 3);
    l.vm.write("disk0", size - 512, 512, 0x6b);
    let out = backup(&l.env, "full");
    let p = out["point"].as_str().unwrap();
    assert_eq!(
        restored(&l.env, "vm1", p, &["disk0"]),
        vec![l.vm.shadow_digest("disk0")]
    );
    let img = l.env.path(&format!("restore-{p}/disk0.raw"));
    assert_eq!(std::fs::metadata(img).unwrap().len(), size);
}

#[test]
fn restore_qcow2_refuses_overwrite_and_force_replaces() {
    let l = lab("vm1", &[DiskSpec::qcow2("disk0", 8 * MIB)]);
    l.vm.write_random("disk0", 0, MIB, 5);
    backup(&l.env, "full");
    let dir = l.env.path("out");
    let to = dir.to_str().unwrap();
    l.env.ok(&[
        "restore", "r", "--vm", "vm1", "--to", to, "--format", "qcow2",
    ]);
    let raw = l.env.path("converted.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            dir.join("disk0.qcow2").to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert_eq!(file_digest(&raw), l.vm.shadow_digest("disk0"));
    let err = l.env.fails(
        2,
        &[
            "restore", "r", "--vm", "vm1", "--to", to, "--format", "qcow2",
        ],
    );
    assert!(err.contains("--force"), "{err}");
    l.env.ok(&[
        "restore", "r", "--vm", "vm1", "--to", to, "--format", "qcow2", "--force",
    ]);
    l.env.fails(
        2,
        &[
            "restore",
            "r",
            "--vm",
            "vm1",
            "--to",
            to,
            "--point",
            "19990101T000000Z",
        ],
    );
    // Nothing but the image is left in the directory.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["disk0.qcow2"]);
}

#[test]
fn identical_vms_share_chunks_in_one_repository() {
    let env = Env::new();
    let a = env.vm("a", &[DiskSpec::qcow2("disk0", 8 * MIB)], true);
    let b = env.vm("b", &[DiskSpec::qcow2("disk0", 8 * MIB)], true);
    for vm in [&a, &b] {
        vm.write_random("disk0", 0, 4 * MIB, 77);
    }
    env.add_lab("t");
    env.add_rule(
        "r",
        "lab",
        "a,b",
        "t",
        &["--schedule", "full daily at 01:00"],
    );
    // One after the other: the second VM finds every chunk already stored.
    let written: Vec<u64> = ["a", "b"]
        .iter()
        .map(|vm| {
            let out = env
                .cmd()
                .args(["--json", "run-now", "r", "--vm", vm, "--level", "full"])
                .output()
                .unwrap();
            assert!(out.status.success());
            let stdout = String::from_utf8_lossy(&out.stdout);
            let summary: serde_json::Value = stdout
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .find(|v: &serde_json::Value| v["type"] == "summary")
                .unwrap();
            summary["tasks"][0]["outcome"]["totals"]["bytes_written"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(written[0] > 0, "{written:?}");
    assert_eq!(
        written[1], 0,
        "the second VM stored nothing new: {written:?}"
    );
    for vm in ["a", "b"] {
        let dir = env.path(&format!("restore-{vm}"));
        env.ok(&["restore", "r", "--vm", vm, "--to", dir.to_str().unwrap()]);
        assert_eq!(
            file_digest(&dir.join("disk0.raw")),
            a.shadow_digest("disk0")
        );
    }
}

/// Chunk-store files (chunks and deltas) under the repository.
fn objects(env: &Env) -> std::collections::BTreeSet<std::path::PathBuf> {
    fn walk(dir: &Path, out: &mut std::collections::BTreeSet<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.insert(p);
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(&env.path("target/r/chunks"), &mut out);
    out
}

#[test]
fn damaged_delta_or_missing_base_chunk_fails_verify_and_restore() {
    let l = lab("vm1", &[DiskSpec::qcow2("disk0", 4 * MIB)]);
    l.vm.write_random("disk0", 0, MIB, 21);
    let full = backup(&l.env, "full");
    let base_objects = objects(&l.env);
    assert_eq!(base_objects.len(), 1, "one chunk");
    l.vm.write("disk0", 8192, 4096, 0x77);
    let inc = backup(&l.env, "inc");
    let new: Vec<_> = objects(&l.env).difference(&base_objects).cloned().collect();
    assert_eq!(new.len(), 1, "one delta object: {new:?}");
    let delta = &new[0];
    assert!(std::fs::read(delta).unwrap().starts_with(b"VMBDLTA1"));
    l.env.ok(&["verify", "r"]);

    // A flipped byte in the delta: the inc is damaged, the full is not. Verify
    // moves the corrupt delta aside (quarantine), and says so.
    let good = std::fs::read(delta).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x20;
    std::fs::write(delta, &bad).unwrap();
    let out = l.env.cmd().args(["verify", "r"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    let inc_line = text
        .lines()
        .find(|l| l.contains(inc["point"].as_str().unwrap()))
        .unwrap();
    assert!(inc_line.contains("DAMAGED"), "{text}");
    assert!(
        text.contains("corrupt") && text.contains("moved to quarantine/"),
        "{text}"
    );
    let full_line = text
        .lines()
        .find(|l| l.contains(full["point"].as_str().unwrap()))
        .unwrap();
    assert!(full_line.ends_with("ok"), "{text}");
    assert!(!delta.exists(), "quarantined");
    let err = l.env.fails(
        3,
        &[
            "restore",
            "r",
            "--vm",
            "vm1",
            "--to",
            l.env.path("out").to_str().unwrap(),
        ],
    );
    assert!(err.contains("delta") && err.contains("missing"), "{err}");
    // Put it back (its emptied directory went with it).
    std::fs::create_dir_all(delta.parent().unwrap()).unwrap();
    std::fs::write(delta, &good).unwrap();

    // The base chunk gone: both points need it.
    let chunk = base_objects.iter().next().unwrap();
    std::fs::rename(chunk, l.env.path("aside")).unwrap();
    let out = l.env.cmd().args(["verify", "r"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("missing").count(), 2, "{text}");
    std::fs::rename(l.env.path("aside"), chunk).unwrap();
    let got = restored(&l.env, "vm1", inc["point"].as_str().unwrap(), &["disk0"]);
    assert_eq!(got, [l.vm.shadow_digest("disk0")]);
}

/// How an object's payload is stored: 0 raw, 1 zstd (docs/FORMAT.md: byte 8 of
/// a chunk object, byte 48 of a delta object).
fn payload_form(object: &Path) -> (bool, u8) {
    let bytes = std::fs::read(object).unwrap();
    match &bytes[..8] {
        b"VMBCHNK1" => (false, bytes[8]),
        b"VMBDLTA1" => (true, bytes[48]),
        other => panic!("{}: unknown magic {other:?}", object.display()),
    }
}

/// system.conf `compression = none`: every new chunk and delta is stored raw,
/// data that compresses to nothing too; back at zstd, new objects are
/// compressed again. Every point of the mixed repository verifies and restores
/// byte-exact.
#[test]
fn compression_none_stores_raw_objects_and_a_mixed_repository_restores_exact() {
    let l = lab("vm1", &[DiskSpec::qcow2("disk0", 8 * MIB)]);
    let (env, vm) = (&l.env, &l.vm);
    std::fs::write(&env.config, "i2vp_transbuffer = 1M\ncompression = none\n").unwrap();
    assert!(env.ok(&["config", "show"]).contains("none"));
    vm.write("disk0", 0, 2 * MIB, 0x41);
    vm.write_random("disk0", 4 * MIB, MIB, 8);
    let mut points = vec![(backup(env, "full"), vm.keep_shadow("disk0", "p1"))];
    vm.write("disk0", 8192, 4096, 0x77);
    points.push((backup(env, "inc"), vm.keep_shadow("disk0", "p2")));
    let raw = objects(env);
    let forms: Vec<_> = raw.iter().map(|o| payload_form(o)).collect();
    assert!(forms.contains(&(true, 0)), "a delta: {forms:?}");
    assert!(forms.iter().all(|&(_, form)| form == 0), "{forms:?}");
    assert!(
        raw.iter()
            .any(|o| std::fs::metadata(o).unwrap().len() == MIB + 20),
        "the slot of one repeated byte is stored whole"
    );

    std::fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    vm.write("disk0", 6 * MIB, MIB, 0x42);
    points.push((backup(env, "inc"), vm.keep_shadow("disk0", "p3")));
    let forms: Vec<_> = objects(env)
        .difference(&raw)
        .map(|o| payload_form(o))
        .collect();
    assert!(forms.contains(&(false, 1)), "zstd again: {forms:?}");

    env.ok(&["verify", "r"]);
    for (outcome, shadow) in &points {
        let point = outcome["point"].as_str().unwrap();
        assert_eq!(
            restored(env, "vm1", point, &["disk0"]),
            [file_digest(shadow)],
            "{point}"
        );
    }
}

#[test]
fn r31_run_now_reports_each_phase_in_order() {
    let l = lab("vm1", &[DiskSpec::qcow2("disk0", 4 * MIB)]);
    l.vm.write("disk0", 0, MIB, 0x31);
    let out = l
        .env
        .cmd()
        .args(["--json", "run-now", "r", "--level", "full"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let phases: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "phase")
        .map(|v| v["phase"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        phases,
        [
            "preparing",
            "backing up VM configuration",
            "querying changed data",
            "checking data",
            "running"
        ]
    );
}
