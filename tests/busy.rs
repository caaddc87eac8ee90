//! Busy means busy (issue 8): a command that waits for the state database more
//! than 10 s exits 4 naming the database file and the process holding it; a
//! `cleanup` while a backup of the VM runs exits 4 at once naming the task, even
//! when the hypervisor does not answer.

mod common;
use common::*;

use std::time::{Duration, Instant};

#[test]
fn a_held_state_database_is_busy_within_10_seconds_naming_file_and_holder() {
    let env = Env::new();
    env.ok(&["rule", "list"]); // creates the database
    let dir = env.path("nas");
    std::fs::create_dir_all(&dir).unwrap();
    // This test process holds the write lock.
    let holder = rusqlite::Connection::open(&env.state).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    let err = env.fails(
        4,
        &["target", "add", "nas", "--path", dir.to_str().unwrap()],
    );
    let took = started.elapsed();
    holder.execute_batch("ROLLBACK").unwrap();
    assert!(took <= Duration::from_secs(13), "busy after {took:?}");
    assert!(
        took >= Duration::from_secs(9),
        "gave up after {took:?}, before waiting 10 s"
    );
    assert!(err.contains(&env.state.display().to_string()), "{err}");
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Nothing was changed, and once the holder is gone the command works.
    env.ok(&["target", "add", "nas", "--path", dir.to_str().unwrap()]);
}

#[test]
fn cleanup_while_a_backup_of_the_vm_runs_is_busy_at_once_naming_the_task() {
    let env = Env::new();
    std::fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 32 * MIB)], true);
    vm.write_random("disk0", 0, 16 * MIB, 1);
    env.add_lab("t");
    env.add_rule(
        "r",
        "lab",
        "vm1",
        "t",
        &[
            "--once",
            "2099-01-01 00:00",
            "--bandwidth",
            "mon-sun 00:00-24:00 2MiB/s",
        ],
    );
    let _backup = env.spawn(&["run-now", "r", "--level", "full"], &[]);
    env.wait_transferring();
    // Even with the hypervisor not answering, cleanup says so at once.
    run("kill", &["-STOP", &vm.pid().to_string()]);
    let started = Instant::now();
    let err = env.fails(4, &["cleanup", "r"]);
    let took = started.elapsed();
    run("kill", &["-CONT", &vm.pid().to_string()]);
    assert!(took <= Duration::from_secs(3), "cleanup took {took:?}");
    assert!(err.contains("task 1"), "{err}");
    assert!(err.contains("vm1"), "{err}");
}
