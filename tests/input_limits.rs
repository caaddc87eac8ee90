//! Input limits at input time (issue 8): bad input is refused with exit 2 and a
//! one-line error naming the field, before anything runs or changes.

mod common;
use common::*;

use std::process::Command;

/// Run the binary with this env's state, under an address-space limit (so a
/// regression that reads without bound fails instead of eating the machine).
fn run_limited(env: &Env, config: &str, args: &[&str]) -> std::process::Output {
    let bin = assert_cmd::cargo::cargo_bin("vmbackup");
    let mut script = format!("ulimit -v 2000000; exec '{}'", bin.display());
    for a in args {
        script.push_str(&format!(" '{a}'"));
    }
    Command::new("sh")
        .args(["-c", &script])
        .env("VMBACKUP_STATE", &env.state)
        .env("VMBACKUP_CONFIG", config)
        .env_remove("XDG_STATE_HOME")
        .output()
        .unwrap()
}

#[test]
fn system_conf_with_binary_bytes_is_a_usage_error() {
    let env = Env::new();
    std::fs::write(&env.config, b"bk_tsk_thd = 4\n\x00\x01\x02\xff\xfe\n").unwrap();
    let err = env.fails(2, &["config", "show"]);
    assert!(err.contains("system.conf:2: not text"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Valid UTF-8 that is still binary (NUL bytes) is refused too.
    std::fs::write(&env.config, b"bk_tsk_thd = 4\x00\n").unwrap();
    let err = env.fails(2, &["config", "show"]);
    assert!(err.contains("system.conf:1: not text"), "{err}");
}

#[test]
fn system_conf_with_a_byte_order_mark_is_read() {
    let env = Env::new();
    std::fs::write(&env.config, b"\xef\xbb\xbfbk_tsk_thd = 4\n").unwrap();
    let v = env.json(&["config", "show"]);
    let tasks = v["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "bk_tsk_thd")
        .unwrap()
        .clone();
    assert_eq!(tasks["number"], 4, "{v}");
}

#[test]
fn a_system_conf_that_never_ends_is_refused_after_a_size_bound() {
    let env = Env::new();
    let out = run_limited(&env, "/dev/zero", &["config", "show"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("larger than 1MiB"), "{err}");
    // A large regular file, too.
    let big = env.path("big.conf");
    std::fs::write(&big, "# padding\n".repeat(200_000)).unwrap();
    let out = run_limited(&env, big.to_str().unwrap(), &["config", "show"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Names and paths whose length would break something later are refused when
/// they are given (exit 2, naming the argument and the limit), not at run time.
#[test]
fn over_long_names_and_paths_are_refused_at_add() {
    let env = Env::new();
    let _vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 4 * MIB)], false);
    // A QMP directory whose sockets could not fit a unix socket path.
    let deep = env.path(&format!("{}/qmp", "d".repeat(100)));
    std::fs::create_dir_all(&deep).unwrap();
    env.refused(
        &[
            "platform",
            "add",
            "p",
            "--type",
            "qemu",
            "--qmp-dir",
            deep.to_str().unwrap(),
        ],
        &["--qmp-dir", "bytes"],
    );
    env.add_lab("t");
    // A target path longer than the documented limit.
    let long_target = env.path(&"t/".repeat(600));
    std::fs::create_dir_all(&long_target).unwrap();
    env.refused(
        &[
            "target",
            "add",
            "t2",
            "--path",
            long_target.to_str().unwrap(),
        ],
        &["--path", "1024 bytes"],
    );
    // A repository sub-directory longer than a file name may be.
    let sub = "s".repeat(300);
    env.refused(
        &rule_add(
            "r",
            "lab",
            "vm1",
            "t",
            &["--path", &sub, "--once", "2099-01-01 00:00"],
        ),
        &["--path", "255"],
    );
    // A rule name error names the rule, not --path (which defaults to it).
    let err = env.fails(
        2,
        &rule_add(
            "bad/name",
            "lab",
            "vm1",
            "t",
            &["--once", "2099-01-01 00:00"],
        ),
    );
    assert!(err.contains("rule name"), "{err}");
    assert!(!err.contains("--path"), "{err}");
    let long = "r".repeat(65);
    env.refused(
        &rule_add(&long, "lab", "vm1", "t", &["--once", "2099-01-01 00:00"]),
        &["rule name", "1-64"],
    );
}

/// A relative --state is made absolute: scratch files handed to QEMU (which
/// has its own working directory) are found, and the backup works.
#[test]
fn a_relative_state_path_is_made_absolute() {
    let env = Env::new();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 4 * MIB)], true);
    vm.write_random("disk0", 0, MIB, 1);
    let run = |args: &[&str]| {
        let out = env
            .cmd()
            .env_remove("VMBACKUP_STATE")
            .current_dir(env.dir.path())
            .args(["--state", "rel/state.db"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let qmp = env.qmp_dir.to_str().unwrap().to_string();
    run(&[
        "platform",
        "add",
        "lab",
        "--type",
        "qemu",
        "--qmp-dir",
        &qmp,
    ]);
    let target = env.path("target");
    std::fs::create_dir_all(&target).unwrap();
    run(&["target", "add", "t", "--path", target.to_str().unwrap()]);
    run(&rule_add(
        "r",
        "lab",
        "vm1",
        "t",
        &["--once", "2099-01-01 00:00"],
    ));
    run(&["run-now", "r", "--level", "full"]);
    assert!(env.path("rel/state.db").is_file());
    // A state directory too long for the sockets below it is refused up front.
    let long = env.path(&format!("{}/state.db", "s".repeat(90)));
    let out = env
        .cmd()
        .env("VMBACKUP_STATE", &long)
        .args(["rule", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--state"), "{err}");
}

#[test]
fn database_errors_name_the_database_file() {
    let env = Env::new();
    std::fs::create_dir_all(env.state.parent().unwrap()).unwrap();
    std::fs::write(&env.state, vec![0x42u8; 8192]).unwrap();
    let err = env.fails(3, &["rule", "list"]);
    assert!(err.contains(&env.state.display().to_string()), "{err}");
}

/// A VM whose name cannot name a directory in the repository (255 bytes once
/// encoded) is refused when it joins a rule, not when its backup runs.
#[test]
fn a_vm_name_too_long_for_the_repository_is_refused_at_rule_add() {
    let env = Env::new();
    let name = "é".repeat(100); // 200 bytes, 600 once encoded
    let _vm = qemu_system(&env.qmp_dir.join("long.qmp"), &name, &[]);
    env.add_lab("t");
    env.refused(
        &rule_add("r", "lab", &name, "t", &["--once", "2099-01-01 00:00"]),
        &["--vm", "too long"],
    );
}
