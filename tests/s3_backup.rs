//! Backups to an S3 target (issue 13) against a real, replicated SeaweedFS
//! cluster: full / inc / diff chains restore byte-identical to the disk at
//! snapshot time (the shadow oracle), verify, forget and GC on S3, secrets
//! never stored or shown, and lock expiry after a killed writer (the next
//! backup waits, pending, until the lock object expires).

mod common;
use common::seaweedfs::{add_s3_target, cluster, SECRET_KEY};
use common::store_contract::keys;
use common::*;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::SubsecRound;
use serde_json::Value;
use vmbackup::repo::store::S3Store;
use vmbackup::repo::Store;

struct Lab {
    env: Env,
    vm: TestVm,
    bucket: String,
    creds: PathBuf,
}

fn lab(extra: &[&str]) -> Lab {
    let env = Env::new();
    std::fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 16 * MIB)], true);
    env.add_platform();
    let (bucket, creds) = add_s3_target(&env, "s3t", "site/backups", "backup", &[]);
    let mut args = vec!["--schedule", "full daily at 01:00"];
    args.extend_from_slice(extra);
    env.add_rule("r", "lab", "vm1", "s3t", &args);
    Lab {
        env,
        vm,
        bucket,
        creds,
    }
}

impl Lab {
    /// The target's store, seen by the test (prefix `site/backups`).
    fn store(&self) -> S3Store {
        cluster().store(&self.bucket, &self.creds, "site/backups", "backup")
    }

    /// `run-now --json`: exit code and the VM's entry of the summary.
    fn run_now(&self, level: &str) -> (i32, Value, String) {
        let out = self
            .env
            .cmd()
            .args(["--json", "run-now", "r", "--level", level])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let summary: Value = stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .find(|v: &Value| v["type"] == "summary")
            .unwrap_or_else(|| panic!("no summary: {stdout}{out:?}"));
        (
            out.status.code().unwrap(),
            summary["tasks"][0].clone(),
            format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        )
    }

    fn backup(&self, level: &str) -> String {
        let (code, vm, all) = self.run_now(level);
        assert_eq!(code, 0, "{level}: {all}");
        assert_eq!(vm["outcome"]["level"], level, "{vm}");
        assert!(!all.contains(SECRET_KEY), "secret in output: {all}");
        vm["outcome"]["point"].as_str().unwrap().to_string()
    }

    fn restored_digest(&self, point: &str) -> String {
        self.env.restored_digest("r", "vm1", Some(point), "disk0")
    }
}

#[test]
fn full_inc_diff_chain_restores_byte_exact_from_s3_and_survives_forget_and_gc() {
    let l = lab(&[]);
    l.vm.write_random("disk0", 0, 6 * MIB, 1);
    let full_digest = l.vm.shadow_digest("disk0");
    let full = l.backup("full");
    // Part of a slot, a whole slot and zeros: deltas, chunks, zero slots.
    l.vm.write("disk0", MIB + 100, 3000, 0xab);
    l.vm.write_random("disk0", 8 * MIB, MIB, 2);
    l.vm.write_zeroes("disk0", 2 * MIB, MIB);
    let inc_digest = l.vm.shadow_digest("disk0");
    // Distinct point ids (one per second).
    std::thread::sleep(Duration::from_millis(1100));
    let inc = l.backup("inc");
    l.vm.write("disk0", 12 * MIB, 5000, 0x5c);
    let diff_digest = l.vm.shadow_digest("disk0");
    std::thread::sleep(Duration::from_millis(1100));
    let diff = l.backup("diff");

    assert_eq!(l.restored_digest(&full), full_digest, "full");
    assert_eq!(l.restored_digest(&inc), inc_digest, "inc");
    assert_eq!(l.restored_digest(&diff), diff_digest, "diff");

    // The repository is in the bucket under the target's prefix.
    let s = l.store();
    assert!(s.exists("vmbackup-target.json").unwrap());
    assert!(s.exists("r/vmbackup-repo.toml").unwrap());
    assert_eq!(
        keys(&s, "r/vms/lab/vm1/")
            .iter()
            .filter(|k| k.ends_with("/manifest.json"))
            .count(),
        3
    );
    assert!(keys(&s, "r/locks/").is_empty(), "locks released");
    let points = l.env.json(&["points", "r", "--vm", "vm1"]);
    assert_eq!(points.as_array().map(Vec::len), Some(3), "{points}");
    l.env.ok(&["verify", "r"]);

    // forget + GC on S3: the diff alone holds the delta of its last write;
    // what the remaining points need stays.
    let before = keys(&s, "r/chunks/").len();
    l.env.ok(&["forget", "r", "--vm", "vm1", "--point", &diff]);
    l.env.ok(&["gc", "r"]);
    let after = keys(&s, "r/chunks/").len();
    assert!(
        after < before,
        "GC removed the forgotten point's objects ({before} -> {after})"
    );
    assert_eq!(l.restored_digest(&full), full_digest, "full after GC");
    assert_eq!(l.restored_digest(&inc), inc_digest, "inc after GC");

    // The secret is never stored or shown; where it comes from is.
    let dump = l.env.dump();
    assert!(!dump.contains(SECRET_KEY), "secret in the state");
    assert!(dump.contains("s3-credentials-backup"), "{dump}");
    let show = l.env.json(&["target", "show", "s3t"]);
    assert_eq!(show["reachable"], true, "{show}");
    assert!(!show.to_string().contains(SECRET_KEY));
}

#[test]
fn target_add_checks_the_bucket_and_credentials_and_adopts_an_existing_marker() {
    let c = cluster();
    let env = Env::new();
    let creds = c.credentials_file(env.dir.path(), "default");
    let bucket = c.bucket();
    let add = |name: &str, bucket: &str, extra: &[&str]| {
        let mut args = vec![
            "target",
            "add",
            name,
            "--s3",
            &c.endpoint,
            "--bucket",
            bucket,
            "--credentials-file",
            creds.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        env.cmd().args(&args).output().unwrap()
    };
    // A bucket that does not exist: nothing registered.
    let out = add("x", "no-such-bucket", &[]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-bucket"));
    // Usage errors name the option.
    env.refused(
        &[
            "target",
            "add",
            "y",
            "--s3",
            "http://s3.example.net",
            "--bucket",
            &bucket,
            "--credentials",
            "environment",
        ],
        &["--s3", "--allow-http"],
    );
    env.refused(
        &[
            "target",
            "add",
            "y",
            "--s3",
            &c.endpoint,
            "--bucket",
            &bucket,
        ],
        &["--credentials-file"],
    );
    assert!(env.json(&["target", "list"]).as_array().unwrap().is_empty());

    let out = add("first", &bucket, &[]);
    assert!(out.status.success(), "{out:?}");
    let first = env.json(&["target", "show", "first"]);
    // Credentials from the environment work too.
    let out = env
        .cmd()
        .env("AWS_ACCESS_KEY_ID", common::seaweedfs::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .args([
            "target",
            "add",
            "again",
            "--s3",
            &c.endpoint,
            "--bucket",
            &bucket,
            "--credentials",
            "environment",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let again = env.json(&["target", "show", "again"]);
    assert_eq!(
        first["marker_id"], again["marker_id"],
        "the marker in the bucket is adopted, never overwritten"
    );
    // Without the variables, opening the target fails clearly.
    let show = env.json(&["target", "show", "again"]);
    assert_eq!(show["reachable"], false, "{show}");
    assert!(show["error"]
        .as_str()
        .unwrap()
        .contains("AWS_ACCESS_KEY_ID"));
}

#[test]
fn a_killed_writers_lock_expires_and_the_next_backup_proceeds() {
    // 2 MiB/s: the backup of 12 MiB takes long enough to be killed mid-way.
    let l = lab(&["--bandwidth", "mon-sun 00:00-24:00 2MiB/s"]);
    l.vm.write_random("disk0", 0, 12 * MIB, 7);
    let mut child = l
        .env
        .child_cmd()
        .args(["run-now", "r", "--level", "full"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = l.store();
    let t = Instant::now();
    // Killed once its VM lock is held and chunks are being written.
    while keys(&s, "r/locks/").len() < 2 || keys(&s, "r/chunks/").is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "backup did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let locks = keys(&s, "r/locks/");
    assert_eq!(locks.len(), 2, "the killed writer's locks stay: {locks:?}");

    // Pretend the writer ran on another machine: only its expiry frees it.
    // Whole seconds: the lock's expiry is stored to the second, and the
    // assertion below compares against exactly what was stored.
    let expires = (chrono::Utc::now() + chrono::Duration::seconds(10)).trunc_subsecs(0);
    for key in &locks {
        let mut lock: Value = serde_json::from_slice(&s.get(key).unwrap().unwrap()).unwrap();
        lock["host"] = "elsewhere".into();
        lock["machine_id"] = "another-machine".into();
        lock["expires"] = expires
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            .into();
        s.put(key, &serde_json::to_vec(&lock).unwrap()).unwrap();
    }
    // The next backup waits (pending) while the lock is valid, then proceeds.
    l.env.ok(&["rule", "edit", "r", "--clear-bandwidth"]);
    let digest = l.vm.shadow_digest("disk0");
    let (code, vm, all) = l.run_now("full");
    assert_eq!(code, 0, "{all}");
    assert!(
        chrono::Utc::now() > expires,
        "it did not wait for the lock to expire: {all}"
    );
    let logs = l.env.ok(&["logs", "r"]);
    assert!(
        logs.contains("waiting") && logs.contains("is locked"),
        "the wait is in the task log: {logs}"
    );
    let point = vm["outcome"]["point"].as_str().unwrap().to_string();
    assert_eq!(l.restored_digest(&point), digest);
    let points = l.env.json(&["points", "r", "--vm", "vm1"]);
    assert_eq!(
        points.as_array().map(Vec::len),
        Some(1),
        "the killed run left no point: {points}"
    );
    assert!(keys(&s, "r/locks/").is_empty(), "stale locks removed");
}
