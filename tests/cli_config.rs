//! system.conf through `vmbackup config show` (R38-R42), completions and exit codes.

mod common;
use common::*;

fn with_conf(text: &str) -> Env {
    let env = Env::new();
    std::fs::write(&env.config, text).unwrap();
    env
}

#[test]
fn defaults_and_sources() {
    let env = Env::new();
    let v = env.json(&["config", "show"]);
    let get = |k: &str| {
        v["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == k)
            .unwrap()
            .clone()
    };
    assert_eq!(get("bk_tsk_thd")["number"], 8);
    assert_eq!(get("i2vp_transbuffer")["number"], 4 * MIB);
    assert_eq!(get("Max_ThreadNum_PerHost")["number"], 4);
    assert_eq!(get("bk_tsk_thd")["source"], "default");
    let env = with_conf("bk_tsk_thd = 4\ni2vp_transbuffer=512K\n");
    let v = env.json(&["config", "show"]);
    let e = v["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "i2vp_transbuffer")
        .unwrap()
        .clone();
    assert_eq!(e["number"], 512 * 1024);
    assert!(
        e["source"].as_str().unwrap().ends_with("system.conf:2"),
        "{e}"
    );
}

#[test]
fn missing_default_file_means_defaults_but_explicit_must_exist() {
    let env = Env::new();
    let out = env
        .cmd()
        .env_remove("VMBACKUP_CONFIG")
        .args(["config", "show"])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::remove_file(&env.config).unwrap();
    env.fails(2, &["config", "show"]);
}

#[test]
fn r38_bk_tsk_thd_must_be_positive() {
    with_conf("bk_tsk_thd = 0\n").refused(&["config", "show"], &["bk_tsk_thd", "'0'"]);
    with_conf("bk_tsk_thd = many\n").refused(&["config", "show"], &["bk_tsk_thd", "many"]);
}

#[test]
fn r39_transbuffer_spellings_and_power_of_two_range() {
    for ok in ["4", "4M", "4MiB", "512K", "64K", "32M"] {
        let env = with_conf(&format!("bk_tsk_thd = 1\ni2vp_transbuffer = {ok}\n"));
        env.ok(&["config", "show"]);
    }
    for bad in ["3M", "32K", "64M", "lots"] {
        with_conf(&format!("bk_tsk_thd = 1\ni2vp_transbuffer = {bad}\n"))
            .refused(&["config", "show"], &["i2vp_transbuffer", bad]);
    }
}

#[test]
fn r40_tasks_times_buffer_at_most_32_mib() {
    with_conf("bk_tsk_thd = 16\n").refused(&["config", "show"], &["R40", "32"]);
    with_conf("bk_tsk_thd = 8\ni2vp_transbuffer = 8M\n").refused(&["config", "show"], &["R40"]);
    with_conf("bk_tsk_thd = 4\ni2vp_transbuffer = 8M\n").ok(&["config", "show"]);
}

#[test]
fn r42_per_host_limit_never_above_global() {
    with_conf("Max_ThreadNum_PerHost = 9\n")
        .refused(&["config", "show"], &["Max_ThreadNum_PerHost", "R42"]);
    with_conf("bk_tsk_thd = 2\nMax_ThreadNum_PerHost = 2\n").ok(&["config", "show"]);
}

#[test]
fn unknown_keys_are_named_with_the_known_ones() {
    with_conf("bk_task_thd = 4\n").refused(
        &["config", "show"],
        &[
            "bk_task_thd",
            "bk_tsk_thd",
            "i2vp_transbuffer",
            "Max_ThreadNum_PerHost",
        ],
    );
}

#[test]
fn completions_and_usage_errors() {
    let env = Env::new();
    for sh in ["bash", "zsh", "fish"] {
        let out = env.ok(&["completions", sh]);
        // The script calls vmbackup back for candidates (tests/cli_help.rs).
        assert!(
            out.contains("vmbackup") && out.contains("VMBACKUP_COMPLETE"),
            "{sh}"
        );
    }
    env.fails(2, &["no-such-command"]);
    // Usage errors are one line naming the argument and the allowed values.
    let err = env.fails(2, &["run-now", "r", "--level", "bogus"]);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("--level") && err.contains("full, inc, diff"),
        "{err}"
    );
    env.fails(2, &["rule", "add"]);
    env.ok(&["--help"]);
}

#[test]
fn closed_stdout_pipe_is_not_a_crash() {
    // `vmbackup ... | head -1`: the reader goes away; the command must not panic.
    let env = Env::new();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmbackup"))
        .env("VMBACKUP_STATE", &env.state)
        .env("VMBACKUP_CONFIG", &env.config)
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}
