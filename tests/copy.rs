//! Offsite copies (issue 13, section 3) between an encrypted directory target
//! and an encrypted S3 target on the SeaweedFS cluster, both ways: every
//! copied point restores byte-exact from the copy (`restore --from`), a copy
//! sends only what the destination lacks, a killed or interrupted copy
//! resumes, and a host with an empty state restores from the copy alone.

mod common;

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
