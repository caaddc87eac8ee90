//! Recovery with a real guest (issue 11): the tiny guest of
//! `scripts/tiny-guest.sh` (a Debian kernel and a busybox initramfs, built once
//! per test run) checks its disk for a marker and prints what it read on its
//! serial console. `verify --boot` passes for a good point and fails (exit 3,
//! with the reason) for a point whose disk lacks the marker; `restore --as-vm`
//! writes a launch script that starts a VM reading the point, after the secret
//! redacted at backup is supplied with `--set-secret`. Guests run under TCG
//! (`--accel tcg`): CI machines have no usable KVM.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::json_doc::{assert_documented, recover_doc};
use common::system_vm::{guest_sum, SystemVm, VmOptions};
use common::*;
use serde_json::Value;

fn guest_vm(env: &Env, name: &str, agent: bool, extra: &[&str]) -> SystemVm {
    SystemVm::start(
        env,
        name,
        16 * MIB,
        &VmOptions {
            tiny_guest: true,
            vga: true,
            agent,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..VmOptions::default()
        },
    )
}

/// The JSON summary of a command that ran tasks, and its exit code.
fn run_json(env: &Env, args: &[&str]) -> (Option<i32>, Value, String) {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = env.cmd().args(&a).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let doc = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "summary" || v.get("error").is_some())
        .unwrap_or_else(|| {
            panic!(
                "no summary: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    if doc["type"] == "summary" {
        let command = if args[0] == "verify" && args.contains(&"--boot") {
            "vmbackup verify --boot".to_string()
        } else {
            format!("vmbackup {}", args[0])
        };
        assert_documented(&command, &stdout);
    }
    (
        out.status.code(),
        doc,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `verify r1 --boot --vm g --point POINT [--expect REGEX]` under TCG, with a
/// timeout only a broken boot reaches.
fn verify_boot(env: &Env, point: &str, expect: Option<&str>) -> (Option<i32>, Value, String) {
    let mut args = vec![
        "verify",
        "r1",
        "--boot",
        "--vm",
        "g",
        "--point",
        point,
        "--accel",
        "tcg",
        "--timeout",
        "600",
    ];
    if let Some(e) = expect {
        args.extend(["--expect", e]);
    }
    run_json(env, &args)
}

/// Wait (up to 10 minutes: TCG on a loaded machine) for `file` to contain `needle`.
fn wait_for_text(file: &Path, needle: &str) -> String {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "{} has no '{needle}' after 10 minutes: {text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn verify_boot_passes_a_point_whose_guest_finds_its_disk_and_fails_one_that_does_not() {
    let env = Env::new();
    let vm = guest_vm(&env, "g", true, &[]);
    let scratch = env.path("scratch.bin");
    vm.write_marker("alpha", &scratch);
    vm.write(MIB, MIB, 0x42);
    env.add_lab("t1");
    env.add_rule("r1", "lab", "g", "t1", &["--once", "2099-01-01 00:00"]);
    env.ok(&["run-now", "r1", "--level", "full"]);
    let good_sum = guest_sum(&vm.shadow);
    vm.write(0, 512, 0); // the marker goes
    env.ok(&["run-now", "r1", "--level", "inc"]);
    let points: Vec<String> = env
        .json(&["points", "r1", "--vm", "g"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["point"].as_str().unwrap().to_string())
        .collect();
    let (good, bad) = (&points[0], &points[1]);

    // Without --expect the VM is judged by its guest agent (it had a channel):
    // the good point boots and the agent in it answers.
    let (code, doc, err) = verify_boot(&env, good, None);
    assert_eq!(code, Some(0), "{doc} {err}");
    let rep = &doc["tasks"][0]["outcome"];
    assert_eq!(rep["judged_by"], "guest-agent", "{doc}");
    assert_eq!(rep["matched"], Value::Null, "{doc}");
    assert!(rep["boot_seconds"].as_f64().unwrap() > 0.0, "{doc}");

    // With --expect, by its console: its guest reads exactly the point's bytes.
    let expect = format!("VMB-SUM {good_sum}");
    let (code, doc, err) = verify_boot(&env, good, Some(&expect));
    assert_eq!(code, Some(0), "{doc} {err}");
    let task = &doc["tasks"][0];
    assert_eq!(task["kind"], "boot-verify", "{doc}");
    assert_eq!(task["status"], "completed", "{doc}");
    let rep = &task["outcome"];
    assert_eq!(rep["point"], good.as_str(), "{doc}");
    assert_eq!(rep["judged_by"], "serial-console", "{doc}");
    assert!(
        rep["matched"].as_str().unwrap().contains(&good_sum),
        "{doc}"
    );
    assert!(rep["boot_seconds"].as_f64().unwrap() > 0.0, "{doc}");
    let shot = rep["screenshot"]
        .as_str()
        .expect("a VGA VM has a screenshot");
    let png = std::fs::read(shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{shot} is not a PNG");
    assert_eq!(
        std::fs::metadata(Path::new(shot).parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    // The point without the marker: its guest halts before its agent starts;
    // exit 3 with the reason.
    let (code, doc, err) = verify_boot(&env, bad, None);
    assert_eq!(code, Some(3), "{doc} {err}");
    let task = &doc["tasks"][0];
    assert_eq!(task["status"], "failed", "{doc}");
    let reason = task["error"].as_str().unwrap();
    assert!(
        reason.contains("exited") && reason.contains("VMB-NO-MARKER /dev/vda"),
        "{reason}"
    );
    assert!(err.contains("VMB-NO-MARKER /dev/vda"), "{err}");

    // Nothing is left: no verify directory, no recovery, the repository's
    // points untouched.
    let verify_dir = env.state.parent().unwrap().join("verify");
    let left: Vec<_> = std::fs::read_dir(&verify_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(
        recover_doc(&env, &["recover", "list", "--all"])["recoveries"],
        serde_json::json!([])
    );
    let ps = Command::new("pgrep")
        .args(["-f", "g-boot-verify-"])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "a boot-verify VM still runs: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
    drop(vm);
}

#[test]
fn restore_as_vm_writes_a_launch_script_that_boots_the_point_once_its_secret_is_supplied() {
    let env = Env::new();
    // The VM has a secret; the backup stores its command line with the value
    // redacted (issue 8), so a launch needs it back.
    let vm = guest_vm(
        &env,
        "s",
        false,
        &["-object", "secret,id=vmsec0,data=hunter2,format=raw"],
    );
    let scratch = env.path("scratch.bin");
    vm.write_marker("beta", &scratch);
    vm.write(2 * MIB, 512 * 1024, 0x5c);
    env.add_lab("t1");
    env.add_rule("r1", "lab", "s", "t1", &["--once", "2099-01-01 00:00"]);
    env.ok(&["run-now", "r1", "--level", "full"]);
    let sum = guest_sum(&vm.shadow);
    // This VM has no guest agent channel: verify --boot without --expect is
    // refused, naming both ways.
    env.refused(
        &["verify", "r1", "--boot", "--vm", "s", "--accel", "tcg"],
        &["--expect", "guest agent"],
    );
    let to = env.path("s2");

    // Without the secret: refused before anything is written, naming it.
    let restore = [
        "restore", "r1", "--vm", "s", "--as-vm", "s2", "--accel", "tcg", "--to",
    ];
    let to_arg = to.to_str().unwrap();
    let err = env.fails(2, &[&restore[..], &[to_arg]].concat());
    assert!(
        err.contains("vmsec0") && err.contains("--set-secret"),
        "{err}"
    );
    assert!(
        !to.join("vda.raw").exists(),
        "a refused restore wrote disks"
    );

    let secret = env.path("vmsec0.txt");
    std::fs::write(&secret, "hunter2").unwrap();
    let set = format!("vmsec0={}", secret.display());
    let (code, doc, err) = run_json(
        &env,
        &[&restore[..], &[to_arg, "--set-secret", &set]].concat(),
    );
    assert_eq!(code, Some(0), "{doc} {err}");
    let rep = &doc["tasks"][0]["outcome"];
    let script = Path::new(rep["launch_script"].as_str().unwrap()).to_path_buf();
    assert_eq!(script, to.join("s2.sh"));
    // The new VM, named by its QMP socket (a qemu VM's identity); not started.
    assert_eq!(rep["new_vm"]["name"], "s2", "{doc}");
    assert_eq!(
        rep["new_vm"]["identity"],
        to.join("s2.qmp").display().to_string(),
        "{doc}"
    );
    assert_eq!(rep["new_vm"]["running"], false, "{doc}");
    assert_eq!(
        std::fs::metadata(&script).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(
        text.contains(&format!("file={}", secret.display())) && !text.contains("<redacted>"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert_eq!(file_digest(&to.join("vda.raw")), vm.shadow_digest());

    // The script starts a VM named s2 that boots from the restored disk and
    // reads the point.
    let out = Command::new(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serial = to.join("serial0.log");
    let text = wait_for_text(&serial, "VMB-READY");
    assert!(
        text.contains("VMB-MARKER beta") && text.contains(&format!("VMB-SUM {sum}")),
        "{text}"
    );
    let qmp = to.join("s2.qmp");
    let name = qmp_session(&qmp, &[r#"{"execute":"query-name"}"#]);
    assert_eq!(name[0]["return"]["name"], "s2");
    let pid: i32 = std::fs::read_to_string(to.join("s2.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    qmp_session(&qmp, &[r#"{"execute":"quit"}"#]);
    wait_for(
        || !Path::new(&format!("/proc/{pid}")).exists(),
        "the restored VM's end",
    );
    drop(vm);
}
