//! The automatic lifecycle, against real QEMU with the test clock (issue 7 §2,
//! §3): run-due prunes a VM after its last scheduled backup of the day (R17),
//! not while its newest backup failed (R18), collects garbage once a day, and a
//! backup that meets a running GC waits as pending, never fails.

mod common;
use common::*;

use std::fs;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

struct Lab {
    env: Env,
    vm: TestVm,
}

/// The UTC date `offset` days from today: the scheduler's slots start when
/// the VM joined its rule (now), so simulated days lie ahead.
fn day(offset: u64) -> String {
    (chrono::Utc::now() + chrono::Days::new(offset))
        .format("%Y-%m-%d")
        .to_string()
}

/// A point id's date prefix for `day(offset)`.
fn id_day(offset: u64) -> String {
    day(offset).replace('-', "")
}

fn lab() -> Lab {
    let env = Env::new();
    fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 4 * MIB)], true);
    env.add_lab("t");
    env.add_rule(
        "r",
        "lab",
        "vm1",
        "t",
        &[
            "--schedule",
            "full daily at 01:00",
            "--schedule",
            "inc daily at 13:00",
            "--retention",
            "0",
        ],
    );
    Lab { env, vm }
}

impl Lab {
    fn run_due_at(&self, now: &str) -> Output {
        self.env
            .cmd()
            .env("TZ", "UTC")
            .env("VMBACKUP_TEST_NOW", now)
            .args(["run-due"])
            .output()
            .unwrap()
    }

    fn points(&self) -> Vec<String> {
        self.env
            .json(&["points", "r", "--vm", "vm1"])
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["point"].as_str().unwrap().to_string())
            .collect()
    }

    /// (kind, vm, state) of every task, oldest first.
    fn tasks(&self) -> Vec<(String, String, String)> {
        let conn = rusqlite::Connection::open(&self.env.state).unwrap();
        let mut st = conn
            .prepare("SELECT kind, vm, state FROM tasks ORDER BY id")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn kinds_since(&self, n: usize) -> Vec<String> {
        self.tasks()[n..].iter().map(|t| t.0.clone()).collect()
    }
}

#[test]
fn r17_r18_run_due_prunes_after_the_days_last_backup_and_never_after_a_failure() {
    let mut l = lab();
    l.vm.write("disk0", 0, MIB, 1);
    let out = l.run_due_at(&format!("{} 01:00:30", day(1)));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        l.kinds_since(0),
        ["backup"],
        "not the day's last slot: no prune"
    );

    l.vm.write("disk0", MIB, 4096, 2);
    let out = l.run_due_at(&format!("{} 13:00:30", day(1)));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(l.kinds_since(1), ["backup", "prune", "gc"]);
    assert!(
        l.tasks().iter().all(|t| t.2 == "completed"),
        "{:?}",
        l.tasks()
    );
    let day1 = l.points();
    assert_eq!(day1.len(), 2, "both of today's points stay");
    assert!(l.env.path("target/r/gc.json").is_file());

    // Day 2, 01:00: a new full, but the day is not over: nothing is pruned (R17).
    l.vm.write("disk0", 2 * MIB, 4096, 3);
    let out = l.run_due_at(&format!("{} 01:00:30", day(2)));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(l.points().len(), 3);
    // Day 2, 13:05 (the 13:00 slot, late): the last of the day; day 1 goes.
    l.vm.write("disk0", 3 * MIB, 4096, 4);
    let expected = l.vm.shadow_digest("disk0");
    let out = l.run_due_at(&format!("{} 13:05:30", day(2)));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        l.kinds_since(5),
        ["backup", "prune", "gc"],
        "GC: a day since the last"
    );
    let day2 = l.points();
    assert_eq!(day2.len(), 2);
    assert!(day2.iter().all(|p| p.starts_with(&id_day(2))), "{day2:?}");
    let logs = l.env.ok(&["logs", "r"]);
    assert!(
        logs.contains(&format!("removed point {}T0100", id_day(1))),
        "{logs}"
    );

    // Day 3: the VM is gone, the backup fails: nothing expired is pruned (R18).
    l.vm.kill();
    let out = l.run_due_at(&format!("{} 13:00:30", day(3)));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(l.points(), day2, "R18: day 2's points stay");
    assert_eq!(
        l.kinds_since(8),
        ["backup"],
        "no prune (R18), no GC (the last one is not a day old)"
    );
    let logs = l.env.ok(&["logs", "r"]);
    assert!(
        logs.contains("not pruning: this backup failed") && logs.contains("(R18)"),
        "{logs}"
    );

    // Day 4: a backup completes again; then day 2 and 3 expire.
    l.vm.restart();
    let out = l.run_due_at(&format!("{} 13:00:30", day(4)));
    assert!(out.status.success(), "{out:?}");
    let day4 = l.points();
    assert_eq!(day4.len(), 1, "{day4:?}");
    let dir = l.env.path("restored");
    l.env
        .ok(&["restore", "r", "--vm", "vm1", "--to", dir.to_str().unwrap()]);
    assert_eq!(
        file_digest(&dir.join("disk0.raw")),
        l.vm.shadow_digest("disk0")
    );
    let _ = expected;
    l.env.ok(&["verify", "r"]);
}

/// A backup that meets a GC (the repository locked exclusively) is pending
/// with the reason, and runs once the lock is released.
#[test]
fn a_backup_waits_pending_while_gc_holds_the_repository() {
    let l = lab();
    l.vm.write("disk0", 0, MIB, 1);
    l.env.ok(&["run-now", "r", "--level", "full"]);
    let lock = l
        .env
        .path("target/r/locks/20261130T010000Z-1-00000000000000gc");
    write_live_lock(&lock, "exclusive", "gc");

    l.vm.write("disk0", MIB, 4096, 2);
    let expected = l.vm.shadow_digest("disk0");
    let child: Child = l
        .env
        .child_cmd()
        .args(["--json", "run-now", "r", "--level", "inc"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let conn = rusqlite::Connection::open(&l.env.state).unwrap();
    let waiting = || -> Option<String> {
        conn.query_row(
            "SELECT waiting FROM tasks WHERE kind = 'backup' AND state = 'pending' ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .ok()
    };
    let t = Instant::now();
    let reason = loop {
        if let Some(w) = waiting() {
            break w;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never pending");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(reason.contains("is locked: gc (exclusive)"), "{reason}");
    let list = l.env.ok(&["task", "list"]);
    assert!(list.contains("pending"), "{list}");
    fs::remove_file(&lock).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let points = l.points();
    let dir = l.env.path("restored");
    l.env.ok(&[
        "restore",
        "r",
        "--vm",
        "vm1",
        "--point",
        points.last().unwrap(),
        "--to",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(file_digest(&dir.join("disk0.raw")), expected);
}

/// A lock object held by this (live) test process, as vmbackup writes them.
pub fn write_live_lock(path: &std::path::Path, mode: &str, purpose: &str) {
    let id = path.file_name().unwrap().to_str().unwrap();
    let host = String::from_utf8(
        std::process::Command::new("uname")
            .arg("-n")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let stat = fs::read_to_string(format!("/proc/{}/stat", std::process::id())).unwrap();
    let start: u64 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let lock = serde_json::json!({
        "id": id,
        "scope": {"kind": "repository"},
        "mode": mode,
        "purpose": purpose,
        "host": host,
        "machine_id": fs::read_to_string("/etc/machine-id").ok().map(|s| s.trim().to_string()),
        "pid": std::process::id(),
        "pid_start": start,
        "created": "2026-11-30T01:00:00Z",
        "heartbeat": "2099-01-01T00:00:00Z",
        "expires": "2099-01-01T00:05:00Z",
    });
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, serde_json::to_vec(&lock).unwrap()).unwrap();
}
