//! Offsite copies (issue 13, section 3) between an encrypted directory target
//! and an encrypted S3 target on the SeaweedFS cluster, both ways: every
//! copied point restores byte-exact from the copy (`restore --from`), a copy
//! sends only what the destination lacks, a killed or interrupted copy
//! resumes, and a host with an empty state restores from the copy alone.

mod common;

use common::json_doc::assert_documented;
use common::seaweedfs::{add_s3_target, cluster};
use common::*;

use std::fs;
use std::time::Duration;

use serde_json::Value;
use vmbackup::repo::Store;

/// `copy ... --json`: the one VM's entry.
fn copy(env: &Env, args: &[&str]) -> Value {
    let mut a = vec!["copy"];
    a.extend_from_slice(args);
    let doc = env.json(&a);
    assert_eq!(doc["vms"].as_array().unwrap().len(), 1, "{doc}");
    doc["vms"][0].clone()
}

fn restored_from(env: &Env, rule: &str, vm: &str, from: &str, point: &str) -> String {
    let dir = env.path(&format!("restore-{rule}-{from}-{point}"));
    let to = dir.to_str().unwrap();
    env.ok(&[
        "restore", rule, "--vm", vm, "--point", point, "--to", to, "--from", from,
    ]);
    let digest = file_digest(&dir.join("disk0.raw"));
    fs::remove_dir_all(dir).unwrap();
    digest
}

fn chunk_keys(s3: &dyn Store) -> Vec<String> {
    let mut keys = Vec::new();
    s3.list("r/chunks/", &mut |i| {
        keys.push(i.key);
        Ok(())
    })
    .unwrap();
    keys
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn copies_between_a_directory_and_s3_resume_and_restore_on_a_new_host() {
    let env = Env::new();
    fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 8 * MIB)], true);
    let vm2 = env.vm("vm2", &[DiskSpec::qcow2("disk0", 4 * MIB)], true);
    env.add_platform();
    let key = env.path("site.key");
    env.ok(&["key", "generate", key.to_str().unwrap()]);
    let key = key.to_str().unwrap();
    let dir = env.path("target");
    fs::create_dir_all(&dir).unwrap();
    env.ok(&[
        "target",
        "add",
        "local",
        "--path",
        dir.to_str().unwrap(),
        "--encrypt",
        "--key-file",
        key,
    ]);
    let (bucket, creds) = add_s3_target(
        &env,
        "offsite",
        "copies",
        "default",
        &["--encrypt", "--key-file", key],
    );
    let s3 = cluster().store(&bucket, &creds, "copies", "default");
    let sched = ["--schedule", "full daily at 01:00"];
    env.add_rule("r", "lab", "vm1", "local", &sched);

    // Refusals: the rule's own target, an unencrypted destination.
    let plain = env.path("plain");
    fs::create_dir_all(&plain).unwrap();
    env.ok(&["target", "add", "plain", "--path", plain.to_str().unwrap()]);
    vm.write_random("disk0", 0, 3 * MIB, 1);
    let d_full = vm.shadow_digest("disk0");
    let full = env.backup_point("r", "full");
    env.refused(&["copy", "r", "--to", "local"], &["--to", "own target"]);
    env.refused(
        &["rule", "edit", "r", "--copy-to", "plain"],
        &["--copy-to", "'plain'", "not encrypted", "offsite"],
    );
    let err = env.fails(3, &["copy", "r", "--to", "plain"]);
    assert!(err.contains("encrypted"), "{err}");

    // Directory -> S3: both points, then nothing more.
    vm.write("disk0", 2 * MIB + 100, 5000, 0x33);
    let d_inc = vm.shadow_digest("disk0");
    std::thread::sleep(Duration::from_millis(1100));
    let inc = env.backup_point("r", "inc");
    let first = copy(&env, &["r", "--to", "offsite"]);
    assert_eq!(ids(&first["points_copied"]), [full.clone(), inc.clone()]);
    assert!(first["sent_count"].as_u64().unwrap() >= 3, "{first}");
    let again = copy(&env, &["r", "--to", "offsite"]);
    assert_eq!(ids(&again["points_present"]), [full.clone(), inc.clone()]);
    assert_eq!(again["sent_count"], 0, "{again}");
    assert_eq!(restored_from(&env, "r", "vm1", "offsite", &full), d_full);
    assert_eq!(restored_from(&env, "r", "vm1", "offsite", &inc), d_inc);
    // The copy holds the source's key slot and is sealed like the source.
    assert!(s3.exists("r/vmbackup-repo.toml").unwrap());
    let mut slots = Vec::new();
    s3.list("r/keys/", &mut |i| {
        slots.push(i.key);
        Ok(())
    })
    .unwrap();
    assert_eq!(slots.len(), 1, "{slots:?}");
    let src_slots: Vec<_> = fs::read_dir(dir.join("r/keys")).unwrap().collect();
    assert_eq!(src_slots.len(), 1);

    // Interrupted: a copy killed as soon as it holds its lock, then a copy
    // whose point lost its manifest and some objects (killed before its
    // commit). The next copy resumes: only the missing objects are sent.
    vm.write_random("disk0", 4 * MIB, 3 * MIB, 2);
    let d_inc2 = vm.shadow_digest("disk0");
    std::thread::sleep(Duration::from_millis(1100));
    let inc2 = env.backup_point("r", "inc");
    let before = chunk_keys(&s3);
    let mut child = env
        .child_cmd()
        .args(["copy", "r", "--to", "offsite"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        || {
            let mut locked = false;
            s3.list("r/locks/", &mut |_| {
                locked = true;
                Ok(())
            })
            .unwrap();
            locked || child.try_wait().unwrap().is_some()
        },
        "the copy to take its lock",
    );
    let _ = child.kill();
    child.wait().unwrap();
    let resumed = copy(&env, &["r", "--to", "offsite"]);
    let done: Vec<String> = [
        ids(&resumed["points_copied"]),
        ids(&resumed["points_present"]),
    ]
    .concat();
    assert!(done.contains(&inc2), "{resumed}");
    // Two objects only inc2 has (new since the first copy) and its manifest go.
    let now = chunk_keys(&s3);
    let new: Vec<&String> = now.iter().filter(|k| !before.contains(k)).collect();
    assert!(new.len() >= 3, "{new:?}");
    s3.delete(&format!("r/vms/lab/vm1/{inc2}/manifest.json"))
        .unwrap();
    for k in &new[..2] {
        s3.delete(k).unwrap();
    }
    let resumed = copy(&env, &["r", "--to", "offsite"]);
    assert_eq!(
        ids(&resumed["points_copied"]),
        vec![inc2.clone()],
        "{resumed}"
    );
    assert_eq!(resumed["sent_count"], 2, "{resumed}");
    assert!(resumed["present_count"].as_u64().unwrap() >= 1, "{resumed}");
    assert_eq!(restored_from(&env, "r", "vm1", "offsite", &inc2), d_inc2);
    let listed = env.json(&["points", "r", "--from", "offsite"]);
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["point"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [full.as_str(), inc.as_str(), inc2.as_str()]);

    // S3 -> directory: a rule on the S3 target, copied to the directory.
    env.add_rule("r2", "lab", "vm2", "offsite", &sched);
    vm2.write_random("disk0", MIB, 2 * MIB, 3);
    let d_r2 = vm2.shadow_digest("disk0");
    let r2 = env.backup_point("r2", "full");
    let back = copy(
        &env,
        &["r2", "--vm", "vm2", "--point", "latest", "--to", "local"],
    );
    assert_eq!(ids(&back["points_copied"]), vec![r2.clone()]);
    assert!(dir.join("r2/vmbackup-repo.toml").exists());
    assert_eq!(restored_from(&env, "r2", "vm2", "local", &r2), d_r2);

    // A new host: the state is lost. The copy alone, registered again with
    // the key, restores every point byte-exact.
    fs::remove_file(&env.state).unwrap();
    env.add_platform();
    add_s3_target_at(&env, &bucket, &creds, key);
    env.add_rule("r", "lab", "vm1", "offsite", &sched);
    env.ok(&["verify", "r"]);
    for (point, digest) in [(&full, &d_full), (&inc, &d_inc), (&inc2, &d_inc2)] {
        assert_eq!(
            &env.restored_digest("r", "vm1", Some(point), "disk0"),
            digest
        );
    }
}

/// `target add offsite` on the bucket that holds the copies (a new host).
fn add_s3_target_at(env: &Env, bucket: &str, creds: &std::path::Path, key: &str) {
    let c = cluster();
    let out = env.json(&[
        "target",
        "add",
        "offsite",
        "--s3",
        &c.endpoint,
        "--bucket",
        bucket,
        "--prefix",
        "copies",
        "--credentials-file",
        creds.to_str().unwrap(),
        "--encrypt",
        "--key-file",
        key,
    ]);
    assert!(out["marker_id"].is_string(), "{out}");
}

/// `run-now` for rule `r` with the clock at `now` (UTC): its summary.
fn run_now_at(env: &Env, now: &str, level: &str) -> Value {
    let out = env
        .cmd()
        .env("TZ", "UTC")
        .env("VMBACKUP_TEST_NOW", now)
        .args(["--json", "run-now", "r", "--level", level])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "run-now at {now}: {:?}\n{stdout}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_documented("vmbackup run-now", &stdout);
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|v: &Value| v["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {stdout}"))
}

fn points_of(env: &Env, args: &[&str]) -> Vec<String> {
    let mut a = vec!["points", "r", "--vm", "vm1"];
    a.extend_from_slice(args);
    env.json(&a)
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["point"].as_str().unwrap().to_string())
        .collect()
}

/// `rule add/edit --copy-to TARGET [--copy-retention N]`: after each
/// successful backup, a copy task (kind `copy`, a slot of its own) copies the
/// new point to the S3 target and prunes the copy with its own retention,
/// while the rule's own repository keeps every point; `rule show`/`rule list`
/// show the setting; bad input is refused (exit 2, one line, nothing changed);
/// `--copy-to none` stops the copies.
#[test]
fn copy_to_copies_each_new_point_as_a_task_and_prunes_the_copy() {
    let env = Env::new();
    fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 4 * MIB)], true);
    env.add_lab("local");
    let (bucket, creds) = add_s3_target(&env, "offsite", "auto", "default", &[]);
    let s3 = cluster().store(&bucket, &creds, "auto", "default");
    let sched = ["--schedule", "full daily at 01:00"];

    // Refused: an unknown target, the rule's own target, a retention without
    // a copy, out of range, or for a one-time rule.
    let add = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<&str> = rule_add("r", "lab", "vm1", "local", &sched);
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect()
    };
    let refused = |args: Vec<String>, needles: &[&str]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.refused(&args, needles);
    };
    refused(
        add(&["--copy-to", "nosuch"]),
        &["--copy-to", "'nosuch'", "offsite", "none"],
    );
    refused(add(&["--copy-to", "local"]), &["--copy-to", "own target"]);
    refused(
        add(&["--copy-to", "offsite", "--copy-retention", "65"]),
        &["--copy-retention", "0..=64"],
    );
    refused(
        add(&["--copy-to", "none", "--copy-retention", "2"]),
        &["--copy-retention", "--copy-to"],
    );
    env.refused(
        &[
            "rule",
            "add",
            "once",
            "--platform",
            "lab",
            "--vm",
            "vm1",
            "--target",
            "local",
            "--once",
            "2030-01-01 10:00",
            "--copy-to",
            "offsite",
            "--copy-retention",
            "1",
        ],
        &["--copy-retention", "periodic"],
    );
    env.add_rule(
        "r",
        "lab",
        "vm1",
        "local",
        &[&sched[..], &["--copy-to", "offsite"]].concat(),
    );
    let shown = env.ok(&["--json", "rule", "show", "r"]);
    assert_documented("vmbackup rule show", &shown);
    let doc: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(doc["copy_to"], "offsite", "{doc}");
    assert_eq!(doc["copy_retention"], Value::Null, "{doc}");
    env.refused(
        &["rule", "edit", "r", "--copy-to", "local"],
        &["--copy-to", "own target", "offsite"],
    );
    env.refused(
        &[
            "rule",
            "edit",
            "r",
            "--copy-to",
            "none",
            "--copy-retention",
            "1",
        ],
        &["--copy-retention", "--copy-to none"],
    );
    let err = env.fails(2, &["rule", "edit", "r", "--copy-retention", "x"]);
    assert!(
        err.contains("--copy-retention") && err.contains("0..=64") && err.contains("'all'"),
        "{err}"
    );
    env.refused(
        &["target", "remove", "offsite"],
        &["offsite", "rule(s) r", "--copy-to"],
    );
    env.ok(&["rule", "edit", "r", "--copy-retention", "0"]);
    let listed = env.ok(&["--json", "rule", "list"]);
    assert_documented("vmbackup rule list", &listed);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["copy_to"], "offsite", "{listed}");
    assert_eq!(listed[0]["copy_retention"], 0, "{listed}");
    let text = env.ok(&["rule", "show", "r"]);
    assert!(
        text.contains("copy to:      offsite after each backup, retention 0 days"),
        "{text}"
    );

    // Day 1 full, day 2 inc, day 3 full: each backup is followed by its copy.
    let mut points: Vec<String> = Vec::new();
    let mut digests = Vec::new();
    for (i, (now, level)) in [
        ("2026-05-01 12:00:00", "full"),
        ("2026-05-02 12:00:00", "inc"),
        ("2026-05-03 12:00:00", "full"),
    ]
    .into_iter()
    .enumerate()
    {
        vm.write_random("disk0", i as u64 * MIB, 512 * 1024, 10 + i as u64);
        digests.push(vm.shadow_digest("disk0"));
        let summary = run_now_at(&env, now, level);
        let tasks = summary["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 2, "{summary}");
        assert_eq!(tasks[0]["kind"], "backup", "{summary}");
        let point = tasks[0]["outcome"]["point"].as_str().unwrap().to_string();
        let copy = &tasks[1];
        assert_eq!(copy["kind"], "copy", "{summary}");
        assert_eq!(copy["status"], "completed", "{summary}");
        assert_eq!(copy["vm"], "vm1", "{summary}");
        assert_eq!(copy["outcome"]["to"], "offsite", "{summary}");
        assert_eq!(copy["outcome"]["point"], point.as_str(), "{summary}");
        assert_eq!(ids(&copy["outcome"]["points_copied"]), vec![point.clone()]);
        assert!(
            copy["outcome"]["sent_count"].as_u64().unwrap() >= 1,
            "{summary}"
        );
        let pruned = ids(&copy["outcome"]["pruned"]);
        match i {
            // Day 2: the full is the base of the newest incremental (R21).
            0 | 1 => assert!(pruned.is_empty(), "{summary}"),
            // Day 3: day 1's full and day 2's incremental are outside 0 days.
            _ => assert_eq!(pruned, [points[0].clone(), points[1].clone()], "{summary}"),
        }
        points.push(point);
    }
    // The rule's repository keeps every point (its retention is "all").
    assert_eq!(points_of(&env, &[]), points);
    assert_eq!(points_of(&env, &["--from", "offsite"]), [points[2].clone()]);
    assert!(s3.exists("r/vmbackup-repo.toml").unwrap());
    assert_eq!(
        restored_from(&env, "r", "vm1", "offsite", &points[2]),
        digests[2]
    );
    let copies: Vec<Value> = env
        .json(&["task", "list", "--all"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "copy")
        .cloned()
        .collect();
    assert_eq!(copies.len(), 3, "{copies:?}");
    for t in &copies {
        assert_eq!(t["status"], "completed", "{t}");
        assert_eq!(t["rule"], "r", "{t}");
        assert!(t["started"].is_string(), "a copy task holds a slot: {t}");
        assert!(t["bytes_done"].as_u64().unwrap() > 0, "what it sent: {t}");
    }
    let log = env.ok(&["logs", "r", "--task", &copies[0]["id"].to_string()]);
    assert!(log.contains("removed point"), "{log}");

    // A scheduled backup (run-due, its slot long after the rule was added) is
    // followed by its copy too; the copy's retention then removes day 3.
    vm.write_random("disk0", 2 * MIB, 512 * 1024, 19);
    let due_digest = vm.shadow_digest("disk0");
    let out = env
        .cmd()
        .env("TZ", "UTC")
        .env("VMBACKUP_TEST_NOW", "2030-01-05 01:00:30")
        .args(["--json", "run-due"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let summary: Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|v: &Value| v["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {stdout}"));
    let of_kind = |kind: &str| -> Vec<Value> {
        summary["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"] == kind)
            .cloned()
            .collect()
    };
    let (backups, copies) = (of_kind("backup"), of_kind("copy"));
    assert_eq!((backups.len(), copies.len()), (1, 1), "{summary}");
    let due = backups[0]["outcome"]["point"].as_str().unwrap().to_string();
    assert_eq!(copies[0]["status"], "completed", "{summary}");
    assert_eq!(copies[0]["outcome"]["point"], due.as_str(), "{summary}");
    assert_eq!(ids(&copies[0]["outcome"]["pruned"]), [points[2].clone()]);
    assert_eq!(points_of(&env, &["--from", "offsite"]), vec![due.clone()]);
    assert_eq!(restored_from(&env, "r", "vm1", "offsite", &due), due_digest);

    // --copy-to none: the next backup is not copied; the copy stays.
    env.ok(&["rule", "edit", "r", "--copy-to", "none"]);
    let doc = env.json(&["rule", "show", "r"]);
    assert_eq!(doc["copy_to"], Value::Null, "{doc}");
    assert_eq!(doc["copy_retention"], Value::Null, "{doc}");
    vm.write_random("disk0", 3 * MIB, 512 * 1024, 20);
    let summary = run_now_at(&env, "2030-01-05 13:00:00", "inc");
    assert_eq!(summary["tasks"].as_array().unwrap().len(), 1, "{summary}");
    assert_eq!(points_of(&env, &["--from", "offsite"]), [due]);
    assert_eq!(points_of(&env, &[]).len(), 5);
}

/// `copy` follows the rule's bandwidth windows as its backups do: inside a
/// 1 MiB/s window, copying ~3 MiB of incompressible data takes over two
/// seconds (unthrottled it takes a fraction of one); outside the window the
/// same copy to another target is not held back. The copies restore
/// byte-exact.
/// A VM `vm1` (one 4 MiB disk, 1 MiB chunks) on platform `lab`, its rule `r`
/// (a daily full and `rule_args`) on directory target `local`, and the
/// directory targets `copies` to copy to.
fn lab_with_copy_targets(copies: &[&str], rule_args: &[&str]) -> (Env, TestVm) {
    let env = Env::new();
    fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 4 * MIB)], true);
    env.add_lab("local");
    for name in copies {
        let dir = env.path(name);
        fs::create_dir_all(&dir).unwrap();
        env.ok(&["target", "add", name, "--path", dir.to_str().unwrap()]);
    }
    let mut args = vec!["--schedule", "full daily at 01:00"];
    args.extend_from_slice(rule_args);
    env.add_rule("r", "lab", "vm1", "local", &args);
    (env, vm)
}

#[test]
fn copy_follows_the_rules_bandwidth_windows() {
    let (env, vm) = lab_with_copy_targets(
        &["slow", "fast"],
        &["--bandwidth", "mon-sun 10:00-11:00 1MiB/s"],
    );
    vm.write_random("disk0", 0, 3 * MIB, 7);
    let digest = vm.shadow_digest("disk0");
    let at = |now: &str, args: &[&str]| -> (Value, f64) {
        let began = std::time::Instant::now();
        let out = env
            .cmd()
            .env("TZ", "UTC")
            .env("VMBACKUP_TEST_NOW", now)
            .args(args)
            .output()
            .unwrap();
        let secs = began.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?} at {now}: {:?}\n{stdout}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        // One document (copy), or JSON lines ending with the summary (run-now).
        let doc = serde_json::from_str(&stdout)
            .ok()
            .or_else(|| {
                stdout
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .next_back()
            })
            .unwrap_or(Value::Null);
        (doc, secs)
    };
    // The backup runs outside the window (unthrottled).
    let (summary, _) = at(
        "2026-05-04 09:00:00",
        &["--json", "run-now", "r", "--level", "full"],
    );
    let point = summary["tasks"][0]["outcome"]["point"]
        .as_str()
        .unwrap_or_else(|| panic!("{summary}"))
        .to_string();
    let (slow, slow_secs) = at(
        "2026-05-04 10:00:00",
        &["--json", "copy", "r", "--to", "slow"],
    );
    let sent = slow["vms"][0]["sent_bytes"].as_u64().unwrap();
    assert!(sent >= 3 * MIB, "{slow}");
    // 1 MiB/s from an empty bucket (a quarter-second burst at most).
    let floor = sent as f64 / MIB as f64 - 0.5;
    assert!(
        slow_secs >= floor,
        "a copy of {sent} bytes in a 1 MiB/s window took {slow_secs:.2}s (< {floor:.2}s)"
    );
    let (fast, fast_secs) = at(
        "2026-05-04 12:00:00",
        &["--json", "copy", "r", "--to", "fast"],
    );
    assert_eq!(fast["vms"][0]["sent_bytes"].as_u64(), Some(sent), "{fast}");
    assert!(
        fast_secs < slow_secs,
        "outside the window: {fast_secs:.2}s, inside: {slow_secs:.2}s"
    );
    for from in ["slow", "fast"] {
        assert_eq!(restored_from(&env, "r", "vm1", from, &point), digest);
    }
}

/// A new host after losing the old one, with no rule in the state:
/// `points --target T --vm PLATFORM/VM` and `restore --target T --vm
/// PLATFORM/VM --to DIR` find the VM's repository from the target's layout
/// (an encrypted S3 copy, and a directory target where two repositories hold
/// the VM: `--path` picks one) and restore byte-exact; bad input is refused
/// (exit 2, one line, nothing changed) and nothing is created on the target.
#[test]
fn points_and_restore_by_target_with_no_rule_in_the_state() {
    let env = Env::new();
    fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 4 * MIB)], true);
    let key = env.path("site.key");
    env.ok(&["key", "generate", key.to_str().unwrap()]);
    let key = key.to_str().unwrap();
    env.add_platform();
    let dir = env.path("target");
    fs::create_dir_all(&dir).unwrap();
    let add_local = || {
        env.ok(&[
            "target",
            "add",
            "local",
            "--path",
            dir.to_str().unwrap(),
            "--encrypt",
            "--key-file",
            key,
        ])
    };
    add_local();
    let (bucket, creds) = add_s3_target(
        &env,
        "offsite",
        "dr",
        "default",
        &["--encrypt", "--key-file", key],
    );
    let s3 = cluster().store(&bucket, &creds, "dr", "default");
    let sched = ["--schedule", "full daily at 01:00"];
    env.add_rule("r", "lab", "vm1", "local", &sched);
    vm.write_random("disk0", 0, MIB, 31);
    let d_full = vm.shadow_digest("disk0");
    let full = env.backup_point("r", "full");
    vm.write_random("disk0", 2 * MIB, MIB, 32);
    let d_inc = vm.shadow_digest("disk0");
    std::thread::sleep(Duration::from_millis(1100));
    let inc = env.backup_point("r", "inc");
    env.ok(&["copy", "r", "--to", "offsite"]);
    // The VM moves to rule r2 (another repository on the same target).
    env.ok(&["rule", "remove", "r"]);
    env.add_rule("r2", "lab", "vm1", "local", &sched);
    vm.write_random("disk0", MIB, MIB, 33);
    let d_r2 = vm.shadow_digest("disk0");
    let r2 = env.backup_point("r2", "full");

    // A new host: no state. Only the targets are registered again (adopted).
    fs::remove_file(&env.state).unwrap();
    add_local();
    let c = cluster();
    env.ok(&[
        "target",
        "add",
        "offsite",
        "--s3",
        &c.endpoint,
        "--bucket",
        &bucket,
        "--prefix",
        "dr",
        "--credentials-file",
        creds.to_str().unwrap(),
        "--encrypt",
        "--key-file",
        key,
    ]);
    let listed = env.ok(&["--json", "points", "--target", "offsite", "--vm", "lab/vm1"]);
    assert_documented("vmbackup points", &listed);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let ids_of = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p["point"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids_of(&listed), [full.clone(), inc.clone()]);
    assert_eq!(listed[0]["vm"], "lab/vm1", "{listed}");
    let text = env.ok(&["points", "--target", "offsite", "--vm", "lab/vm1"]);
    assert!(text.contains(&inc), "{text}");

    let restore = |args: &[&str], point: &str| -> String {
        let dest = env.path(&format!("dr-{point}"));
        let _ = fs::remove_dir_all(&dest);
        let mut a = vec!["restore", "--to", dest.to_str().unwrap()];
        a.extend_from_slice(args);
        env.ok(&a);
        let d = file_digest(&dest.join("disk0.raw"));
        fs::remove_dir_all(dest).unwrap();
        d
    };
    let from_s3 = ["--target", "offsite", "--vm", "lab/vm1"];
    assert_eq!(
        restore(&[&from_s3[..], &["--point", &full]].concat(), &full),
        d_full
    );
    assert_eq!(restore(&from_s3, "latest"), d_inc);
    let tasks = env.json(&["task", "list", "--all"]);
    let t = &tasks.as_array().unwrap()[0];
    assert_eq!(t["kind"], "restore", "{tasks}");
    assert_eq!(t["rule"], "offsite:r", "{tasks}");
    assert_eq!(t["vm"], "vm1", "{tasks}");

    // Two repositories of the directory target hold lab/vm1: --path decides.
    env.refused(
        &["points", "--target", "local", "--vm", "lab/vm1"],
        &["--path", "several repositories", "r, r2"],
    );
    let in_r2 = env.json(&[
        "points", "--target", "local", "--vm", "lab/vm1", "--path", "r2",
    ]);
    assert_eq!(ids_of(&in_r2), vec![r2.clone()]);
    let local = ["--target", "local", "--vm", "lab/vm1"];
    assert_eq!(
        restore(
            &[&local[..], &["--path", "r", "--point", &inc]].concat(),
            &inc
        ),
        d_inc
    );
    assert_eq!(
        restore(&[&local[..], &["--path", "r2"]].concat(), "r2"),
        d_r2
    );

    // Bad input: exit 2, one line, the state unchanged, nothing created.
    let dest = env.path("dr-bad");
    let to = dest.to_str().unwrap();
    env.refused(
        &["points", "--target", "offsite", "--vm", "vm1"],
        &["--vm", "'vm1'", "PLATFORM/VM"],
    );
    env.refused(
        &["points", "--target", "offsite", "--vm", "lab/nosuch"],
        &["--vm", "lab/nosuch", "r (lab/vm1)"],
    );
    env.refused(
        &["points", "--target", "nosuch", "--vm", "lab/vm1"],
        &["--target", "nosuch", "local, offsite"],
    );
    env.refused(
        &[
            "restore", "--target", "offsite", "--vm", "lab/vm1", "--path", "gone", "--to", to,
        ],
        &["--path", "gone", "r (lab/vm1)"],
    );
    env.refused(
        &[
            "restore",
            "--target",
            "offsite",
            "--vm",
            "lab/vm1",
            "--point",
            "20200101T000000Z",
            "--to",
            to,
        ],
        &["--point", "20200101T000000Z"],
    );
    assert!(!dest.exists());
    assert!(!s3.exists("gone/vmbackup-repo.toml").unwrap());
    let mut tops = std::collections::BTreeSet::new();
    s3.list("", &mut |i| {
        tops.insert(i.key.split('/').next().unwrap().to_string());
        Ok(())
    })
    .unwrap();
    assert_eq!(
        tops.into_iter().collect::<Vec<_>>(),
        ["r", "vmbackup-target.json"],
        "the S3 target holds only the marker and the copy"
    );
    // RULE and --target do not go together (clap: exit 2).
    let err = env.fails(
        2,
        &["points", "r", "--target", "offsite", "--vm", "lab/vm1"],
    );
    assert!(err.contains("--target"), "{err}");
}

/// A copy task reads its point from the moment it is admitted (R16): while the
/// copy after a backup runs (slowed by the rule's bandwidth window), `forget`
/// of that point is refused (exit 4, naming the copy task) and the point stays;
/// the copy restores byte-exact, and once the copy ended the forget proceeds.
#[test]
fn a_running_copy_keeps_its_point_from_forget() {
    let (env, vm) = lab_with_copy_targets(
        &["offsite"],
        &[
            "--copy-to",
            "offsite",
            "--bandwidth",
            "mon-sun 00:00-24:00 1MiB/s",
        ],
    );
    vm.write_random("disk0", 0, 3 * MIB, 11);
    let digest = vm.shadow_digest("disk0");
    let mut child = env
        .child_cmd()
        .args(["run-now", "r", "--level", "full"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let began = std::time::Instant::now();
    let copy_task = loop {
        let tasks = env.json(&["task", "list", "--all"]);
        let active = tasks.as_array().unwrap().iter().find(|t| {
            t["kind"] == "copy"
                && ["queued", "pending", "running"].contains(&t["status"].as_str().unwrap())
        });
        if let Some(t) = active {
            break t.clone();
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "no copy task started: {tasks}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let points = points_of(&env, &[]);
    assert_eq!(points.len(), 1, "{points:?}");
    let point = points[0].clone();
    assert_eq!(
        copy_task["point"], point,
        "the copy task's row names the point it reads: {copy_task}"
    );
    let err = env.fails(4, &["forget", "r", "--vm", "vm1", "--point", &point]);
    assert!(
        err.contains(&format!("read by copy task {}", copy_task["id"])),
        "{err}"
    );
    assert!(child.wait().unwrap().success());
    assert_eq!(points_of(&env, &[]), [point.as_str()], "the point stayed");
    assert_eq!(restored_from(&env, "r", "vm1", "offsite", &point), digest);
    env.ok(&["forget", "r", "--vm", "vm1", "--point", &point]);
    assert!(points_of(&env, &[]).is_empty());
}
