//! Removing a rule (issue 7 §5, R9, R37), against real QEMU: --delete-data
//! removes a repository no other rule uses whole, only the VM's points (then a
//! GC) from a shared one, keeps the data otherwise and says where; vmbackup's
//! bitmaps leave the VMs; any running task of the rule refuses with exit 4.

mod common;
use common::json_doc::assert_documented;
use common::*;

use std::fs;

fn ours(vm: &TestVm) -> Vec<String> {
    vm.bitmaps("disk0")
        .into_iter()
        .map(|b| b.0)
        .filter(|n| n.starts_with("vmbackup-"))
        .collect()
}

/// `rule remove` with `--json`, expecting exit 0; its output as docs/JSON.md says.
fn remove_json(env: &Env, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json", "rule", "remove"];
    a.extend_from_slice(args);
    let out = env.ok(&a);
    assert_documented("vmbackup rule remove", &out);
    serde_json::from_str(&out).unwrap()
}

fn env_with(vms: &[&str]) -> (Env, Vec<TestVm>) {
    let env = Env::new();
    fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vms: Vec<TestVm> = vms
        .iter()
        .map(|n| {
            let vm = env.vm(n, &[DiskSpec::qcow2("disk0", 4 * MIB)], true);
            vm.write_random("disk0", 0, 2 * MIB, n.len() as u64);
            vm
        })
        .collect();
    env.add_lab("t");
    (env, vms)
}

#[test]
fn r9_delete_data_removes_an_unshared_repository_whole_and_the_vms_bitmaps() {
    let (env, vms) = env_with(&["vm1"]);
    env.add_rule(
        "r",
        "lab",
        "vm1",
        "t",
        &["--schedule", "full daily at 01:00"],
    );
    env.ok(&["run-now", "r", "--level", "full"]);
    vms[0].write("disk0", 0, 4096, 1);
    env.ok(&["run-now", "r", "--level", "inc"]);
    assert!(!ours(&vms[0]).is_empty());
    let repo = env.path("target/r");
    assert!(repo.is_dir());

    let v = remove_json(&env, &["r", "--delete-data"]);
    assert_eq!(v["message"], "rule 'r' removed");
    assert_eq!(v["data_deleted"], true);
    assert_eq!(v["repository_removed"], true);
    assert_eq!(v["point_count"], 2);
    assert!(!repo.exists(), "removed whole");
    assert!(
        env.path("target/vmbackup-target.json").is_file(),
        "the target stays"
    );
    assert_eq!(ours(&vms[0]), Vec::<String>::new(), "bitmaps removed");
    assert!(
        v["tracking"][0]["actions"]
            .to_string()
            .contains("removed bitmap"),
        "{v}"
    );
    env.fails(2, &["rule", "show", "r"]);
}

#[test]
fn r9_delete_data_in_a_shared_repository_removes_the_vms_points_then_collects() {
    let (env, vms) = env_with(&["vm1", "vm22"]);
    for (rule, vm) in [("r1", "vm1"), ("r2", "vm22")] {
        env.add_rule(
            rule,
            "lab",
            vm,
            "t",
            &["--schedule", "full daily at 01:00", "--path", "shared"],
        );
        env.ok(&["run-now", rule, "--level", "full"]);
    }
    let expected = vms[1].shadow_digest("disk0");
    let chunks = env.path("target/shared/chunks");
    let before = files_under(&chunks);

    let out = env.ok(&["rule", "remove", "r1", "--delete-data"]);
    assert!(out.contains("deleted 1 point(s) from repository"), "{out}");
    assert!(out.contains("garbage collection: removed"), "{out}");
    assert!(files_under(&chunks) < before, "vm1's own chunks are freed");
    assert!(!env.path("target/shared/vms/lab/vm1").exists());
    let dir = env.path("restored");
    env.ok(&[
        "restore",
        "r2",
        "--vm",
        "vm22",
        "--to",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(file_digest(&dir.join("disk0.raw")), expected);
    env.ok(&["verify", "r2"]);

    // The same with --json: the points deleted and the collection that followed.
    env.add_rule(
        "r3",
        "lab",
        "vm1",
        "t",
        &["--schedule", "full daily at 01:00", "--path", "shared"],
    );
    env.ok(&["run-now", "r3", "--level", "full"]);
    let v = remove_json(&env, &["r3", "--delete-data"]);
    assert_eq!(v["rule"], "r3");
    assert_eq!(v["vm"], serde_json::Value::Null);
    assert_eq!(v["rule_removed"], true);
    assert_eq!(v["data_deleted"], true);
    assert_eq!(v["repository_removed"], false);
    assert_eq!(v["point_count"], 1);
    assert_eq!(v["gc"]["status"], "completed", "{v}");
    assert_eq!(v["gc"]["target"], "t", "{v}");
    assert_eq!(v["gc"]["rules"], serde_json::json!(["r2"]), "{v}");
    assert!(
        v["gc"]["report"]["removed_count"].as_u64().unwrap() > 0,
        "{v}"
    );
    assert_eq!(v["tracking"][0]["vm"], "vm1");
    assert_eq!(v["tracking"][0]["error"], serde_json::Value::Null);
    assert!(!env.path("target/shared/vms/lab/vm1").exists());
    env.ok(&["verify", "r2"]);
}

#[test]
fn r9_the_rules_setting_deletes_keep_data_overrides_and_kept_data_is_located() {
    let (env, vms) = env_with(&["vm1", "vm22"]);
    env.add_rule(
        "r",
        "lab",
        "vm1,vm22",
        "t",
        &["--schedule", "full daily at 01:00", "--delete-data"],
    );
    env.ok(&["run-now", "r", "--level", "full"]);
    let out = env.ok(&["rule", "remove", "r", "--vm", "vm22", "--keep-data"]);
    assert!(out.contains("VM 'vm22' removed from rule 'r'"), "{out}");
    assert!(
        out.contains(&format!(
            "its backup data stays at {}",
            env.path("target/r").display()
        )),
        "{out}"
    );
    assert!(env.path("target/r/vms/lab/vm22").is_dir());
    assert_eq!(ours(&vms[1]), Vec::<String>::new(), "bitmaps go anyway");
    // The rule's own setting deletes (the kept VM key is orphaned, and goes too).
    let v = remove_json(&env, &["r"]);
    assert_eq!(v["data_deleted"], true);
    assert_eq!(v["repository_removed"], true);
    assert!(!env.path("target/r").exists());
}

#[test]
fn r37_any_running_task_of_the_rule_refuses_removal_with_exit_4_and_changes_nothing() {
    let (env, mut vms) = env_with(&["vm1"]);
    env.add_rule(
        "r",
        "lab",
        "vm1",
        "t",
        &["--schedule", "full daily at 01:00", "--delete-data"],
    );
    env.ok(&["run-now", "r", "--level", "full"]);
    let conn = rusqlite::Connection::open(&env.state).unwrap();
    for kind in ["backup", "restore"] {
        conn.execute(
            "INSERT INTO tasks (kind, rule, vm, state, pid, created_at) VALUES (?1, 'r', 'vm1', 'running', ?2, '2026-01-01T00:00:00Z')",
            rusqlite::params![kind, std::process::id()],
        )
        .unwrap();
        let before = env.dump();
        let err = env.fails(4, &["rule", "remove", "r", "--delete-data"]);
        assert!(err.contains(&format!("has a {kind} in progress")), "{err}");
        assert!(err.contains("R37"), "{err}");
        assert_eq!(env.dump(), before);
        assert!(env.path("target/r/vmbackup-repo.toml").is_file());
        conn.execute("UPDATE tasks SET state = 'completed'", [])
            .unwrap();
    }
    // A VM that cannot be reached keeps its bitmaps: listed, exit 1.
    vms[0].kill();
    let out = env.cmd().args(["rule", "remove", "r"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not reach VM 'vm1'"),
        "{out:?}"
    );
    assert!(!env.path("target/r").exists(), "the data went all the same");
}
