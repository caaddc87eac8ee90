//! Secrets on the VM's command line (issue 8): values of option keys that name a
//! secret (`data`, `password`, `passwd`, `secret`, `key`, `token`) are stored and
//! shown as `<redacted>` (a reference to a secret object by id stays), in the
//! manifest, the task log and debug output; `cleanup --redact` rewrites manifests
//! written before, atomically, and the points stay restorable.

mod common;
use common::*;

use std::path::{Path, PathBuf};

const SECRETS: [&str; 3] = ["s3cr3t-dotted", "s3cr3t-json", "s3cr3t-pass"];

/// A QSD whose command line carries secrets in both option syntaxes, and the
/// path of its NBD socket.
fn secret_vm(env: &Env) -> (Proc, PathBuf) {
    let work = env.path("vms/vm1");
    std::fs::create_dir_all(&work).unwrap();
    let img = work.join("disk0.qcow2");
    qcow2_image(&img, 8 * MIB, 0, 0);
    let nbd = work.join("nbd.sock");
    let vm = Qsd::new()
        .args(&["--object", "secret,id=sec0,data=s3cr3t-dotted"])
        .args(&[
            "--object",
            r#"{"qom-type":"secret","id":"sec1","data":"s3cr3t-json"}"#,
        ])
        .args(&[
            "--object",
            "secret,id=sec2,data=s3cr3t-pass,,with-a-comma,format=raw",
        ])
        .qcow2_disk("disk0", &img)
        .qmp(&env.qmp_dir.join("vm1.qmp"))
        .nbd_unix(&nbd, "disk0")
        .start();
    (vm, nbd)
}

/// Every manifest.json under `dir`.
fn manifests(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(manifests(&p));
        } else if p.file_name().is_some_and(|n| n == "manifest.json") {
            out.push(p);
        }
    }
    out
}

fn assert_no_secret(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what} holds the secret {s}:\n{text}");
    }
}

#[test]
fn secrets_on_the_command_line_are_never_stored_or_shown() {
    let env = Env::new();
    let (_vm, nbd) = secret_vm(&env);
    env.add_lab("t");
    env.add_rule("r", "lab", "vm1", "t", &["--once", "2099-01-01 00:00"]);
    let out = env
        .cmd()
        .args(["-vv", "--json", "run-now", "r", "--level", "full"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_secret("run-now output", &String::from_utf8_lossy(&out.stdout));
    assert_no_secret(
        "run-now -vv diagnostics",
        &String::from_utf8_lossy(&out.stderr),
    );
    assert_no_secret("the task log", &env.ok(&["--json", "logs", "r"]));
    let found = manifests(&env.path("target"));
    assert_eq!(found.len(), 1);
    let text = std::fs::read_to_string(&found[0]).unwrap();
    assert_no_secret("the manifest", &text);
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cmdline: Vec<String> = m["vm_config"]["cmdline"]
        .as_array()
        .unwrap_or_else(|| panic!("no cmdline: {text}"))
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    // What stays: the options, the ids, everything that is not a secret value.
    assert!(
        cmdline.contains(&"secret,id=sec0,data=<redacted>".to_string()),
        "{cmdline:?}"
    );
    assert!(
        cmdline.contains(&"secret,id=sec2,data=<redacted>,format=raw".to_string()),
        "{cmdline:?}"
    );
    assert!(
        cmdline
            .iter()
            .any(|a| a.contains(r#""data":"<redacted>""#) && a.contains(r#""id":"sec1""#)),
        "{cmdline:?}"
    );
    assert!(
        cmdline
            .iter()
            .any(|a| a.contains(&nbd.display().to_string())),
        "{cmdline:?}"
    );
}

#[test]
fn cleanup_redact_rewrites_manifests_written_before() {
    let env = Env::new();
    let _vm = secret_vm(&env);
    env.add_lab("t");
    env.add_rule("r", "lab", "vm1", "t", &["--once", "2099-01-01 00:00"]);
    env.ok(&["run-now", "r", "--level", "full"]);
    let path = manifests(&env.path("target")).pop().unwrap();
    // A manifest as vmbackup wrote it before redaction: the secrets in clear.
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["vm_config"]["cmdline"] = serde_json::json!([
        "qemu-storage-daemon",
        "--object",
        "secret,id=sec0,data=s3cr3t-dotted",
        "--object",
        r#"{"qom-type":"secret","id":"sec1","data":"s3cr3t-json"}"#,
        "-drive",
        "file=rbd:pool/img,password-secret=sec0,key=s3cr3t-pass",
    ]);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let out = env.ok(&["cleanup", "--redact"]);
    assert!(out.contains("redacted"), "{out}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_no_secret("the rewritten manifest", &text);
    assert!(
        text.contains("password-secret=sec0"),
        "a reference by id stays: {text}"
    );
    // Still a valid point, and idempotent.
    let points = env.json(&["points", "r", "--vm", "vm1"]);
    assert_eq!(points.as_array().unwrap().len(), 1);
    let dest = env.path("restored");
    env.ok(&[
        "restore",
        "r",
        "--vm",
        "vm1",
        "--to",
        dest.to_str().unwrap(),
    ]);
    assert!(!env.ok(&["cleanup", "--redact"]).contains("redacted"));
}
