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
