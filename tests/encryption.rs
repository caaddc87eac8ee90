//! Client-side encryption (issue 13, section 2) on a directory target, and
//! on S3 against the SeaweedFS cluster: every object encrypted and
//! authenticated, chunk names keyed, byte-exact restores, a wrong key and a
//! tampered object fail clearly, key slots added and removed.

mod common;

use common::seaweedfs::{add_s3_target, cluster};
use common::*;
use vmbackup::repo::Store;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn encrypted_repository_restores_byte_exact_and_refuses_wrong_keys_and_tampering() {
    let env = Env::new();
    fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 8 * MIB)], true);
    env.add_platform();
    let key = env.path("backup.key");
    env.ok(&["key", "generate", key.to_str().unwrap()]);
    let text = fs::read_to_string(&key).unwrap();
    assert_eq!(text.trim().len(), 64, "{text}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    env.refused(
        &["key", "generate", key.to_str().unwrap()],
        &["key file", "never overwritten"],
    );
    env.refused(
        &[
            "target",
            "add",
            "t",
            "--path",
            env.dir.path().to_str().unwrap(),
            "--encrypt",
        ],
        &["--encrypt", "--key-file"],
    );
    let bad_key = env.path("bad.key");
    fs::write(&bad_key, "not a key\n").unwrap();
    env.refused(
        &[
            "target",
            "add",
            "t",
            "--path",
            env.dir.path().to_str().unwrap(),
            "--encrypt",
            "--key-file",
            bad_key.to_str().unwrap(),
        ],
        &["--key-file", "64 hex digits"],
    );
    let target = env.path("target");
    fs::create_dir_all(&target).unwrap();
    env.ok(&[
        "target",
        "add",
        "t",
        "--path",
        target.to_str().unwrap(),
        "--encrypt",
        "--key-file",
        key.to_str().unwrap(),
    ]);
    env.add_rule(
        "r",
        "lab",
        "vm1",
        "t",
        &["--schedule", "full daily at 01:00"],
    );

    vm.write_random("disk0", 0, 3 * MIB, 11);
    let full_digest = vm.shadow_digest("disk0");
    let full = env.backup_point("r", "full");
    vm.write("disk0", MIB + 10, 2000, 0x42);
    let inc_digest = vm.shadow_digest("disk0");
    std::thread::sleep(Duration::from_millis(1100));
    let inc = env.backup_point("r", "inc");
    assert_eq!(
        env.restored_digest("r", "vm1", Some(&full), "disk0"),
        full_digest
    );
    assert_eq!(
        env.restored_digest("r", "vm1", Some(&inc), "disk0"),
        inc_digest
    );
    env.ok(&["verify", "r"]);

    // Every object but the config and the key slots is encrypted; nothing
    // is named by the plain BLAKE3 of its content.
    let repo = target.join("r");
    let config = fs::read_to_string(repo.join("vmbackup-repo.toml")).unwrap();
    assert!(
        config.contains("blake3-keyed") && config.contains("aes-256-gcm"),
        "{config}"
    );
    let mut all = Vec::new();
    files(&repo, &mut all);
    let mut chunks = Vec::new();
    for f in &all {
        let rel = f.strip_prefix(&repo).unwrap().to_str().unwrap().to_string();
        if rel == "vmbackup-repo.toml" || rel.starts_with("keys/") {
            continue;
        }
        let bytes = fs::read(f).unwrap();
        assert_eq!(&bytes[..8], b"VMBCRYP1", "{rel} is not encrypted");
        // The manifest names the VM as a JSON string: never in clear.
        assert!(
            !bytes.windows(5).any(|w| w == b"\"vm1\""),
            "{rel} shows the VM name"
        );
        if rel.starts_with("chunks/") {
            chunks.push(f.clone());
        }
    }
    let first_slot = pseudo_random(3 * MIB as usize, 11)[..MIB as usize].to_vec();
    let plain = blake3::hash(&first_slot).to_hex().to_string();
    assert!(
        !all.iter().any(|f| f.ends_with(&plain)),
        "chunk names are keyed"
    );

    // Key slots: a passphrase slot added, listed, removed; the registered
    // key's slot cannot be removed.
    let pass = env.path("pass");
    fs::write(&pass, "correct horse battery staple\n").unwrap();
    env.ok(&[
        "key",
        "add",
        "t",
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    let list = env.json(&["key", "list", "t"]);
    let slots = list["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 2, "{list}");
    let by_kind = |k: &str| {
        slots.iter().find(|s| s["kind"] == k).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (file_slot, pass_slot) = (by_kind("key-file"), by_kind("passphrase"));
    env.refused(&["key", "remove", "t", &file_slot], &["registered"]);
    env.ok(&["key", "remove", "t", &pass_slot]);
    assert_eq!(
        env.json(&["key", "list", "t"])["slots"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A tampered object fails verification and is quarantined.
    let victim = chunks.last().unwrap();
    let mut bytes = fs::read(victim).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    fs::write(victim, &bytes).unwrap();
    let err = env.fails(3, &["verify", "r"]);
    assert!(err.contains("damaged") || err.contains("corrupt"), "{err}");
    assert!(
        repo.join("quarantine").is_dir(),
        "the tampered object was moved aside"
    );

    // A wrong key fails with a clear error and reads nothing.
    fs::remove_file(&key).unwrap();
    env.ok(&["key", "generate", key.to_str().unwrap()]);
    let dir = env.path("wrong");
    let out = env
        .cmd()
        .args([
            "restore",
            "r",
            "--vm",
            "vm1",
            "--point",
            &full,
            "--to",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong key"),
        "{out:?}"
    );
}

#[test]
fn an_encrypted_s3_target_restores_byte_exact_and_stores_no_plaintext() {
    let env = Env::new();
    fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 8 * MIB)], true);
    env.add_platform();
    // The target's key is a passphrase (Argon2id).
    let pass = env.path("pass");
    fs::write(&pass, "a long passphrase for the offsite copy\n").unwrap();
    let (bucket, creds) = add_s3_target(
        &env,
        "s3t",
        "site",
        "default",
        &["--encrypt", "--passphrase-file", pass.to_str().unwrap()],
    );
    env.add_rule(
        "r",
        "lab",
        "vm1",
        "s3t",
        &["--schedule", "full daily at 01:00"],
    );
    vm.write_random("disk0", 0, 2 * MIB, 5);
    vm.write(
        "disk0",
        3 * MIB,
        64 * 1024,
        b'P', // a page of plain text the bucket must not show
    );
    let digest = vm.shadow_digest("disk0");
    let full = env.backup_point("r", "full");
    assert_eq!(
        env.restored_digest("r", "vm1", Some(&full), "disk0"),
        digest
    );
    let show = env.json(&["target", "show", "s3t"]);
    assert!(show.to_string().contains("passphrase_file"), "{show}");

    // In the bucket: the config and the key slot in clear, everything else
    // sealed; no plain text and no VM name inside any object.
    let s3 = cluster().store(&bucket, &creds, "site", "default");
    let mut keys = Vec::new();
    s3.list("r/", &mut |i| {
        keys.push(i.key);
        Ok(())
    })
    .unwrap();
    let mut sealed = Vec::new();
    for key in &keys {
        let bytes = s3.get(key).unwrap().unwrap();
        if key == "r/vmbackup-repo.toml" || key.starts_with("r/keys/") {
            continue;
        }
        assert_eq!(&bytes[..8], b"VMBCRYP1", "{key} is not encrypted");
        assert!(
            !bytes.windows(64).any(|w| w.iter().all(|b| *b == b'P')),
            "{key}"
        );
        assert!(!bytes.windows(5).any(|w| w == b"\"vm1\""), "{key}");
        if key.starts_with("r/chunks/") {
            sealed.push(key.clone());
        }
    }
    assert!(keys.iter().any(|k| k.starts_with("r/keys/")), "{keys:?}");
    assert!(sealed.len() >= 3, "{keys:?}");

    // A missing key file (passphrase file) is a clear error; nothing is read.
    let moved = env.path("pass.moved");
    fs::rename(&pass, &moved).unwrap();
    let err = env.fails(3, &["verify", "r"]);
    assert!(err.contains("cannot read passphrase file"), "{err}");
    fs::rename(&moved, &pass).unwrap();

    // A tampered object in the bucket fails verification: moved to quarantine.
    let victim = &sealed[0];
    let mut bytes = s3.get(victim).unwrap().unwrap();
    bytes[40] ^= 0x80;
    s3.put(victim, &bytes).unwrap();
    let err = env.fails(3, &["verify", "r"]);
    assert!(err.contains("damaged") || err.contains("corrupt"), "{err}");
    let mut quarantined = 0;
    s3.list("r/quarantine/", &mut |_| {
        quarantined += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(quarantined, 1);
    assert!(!s3.exists(victim).unwrap());
}
