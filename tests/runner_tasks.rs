//! The task runner against real QEMU (qemu-storage-daemon VMs): slot limits across
//! tasks and processes (R38, R41, R42), bandwidth pause and R28 skips under
//! `run-due` with the test clock, and a SIGKILLed daemon's task reclaimed (R44).
//!
//! Concurrency is asserted from the task rows' start and end times (milliseconds).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{Duration as Days, Local};
use common::{file_digest, wait_for, DiskSpec, Env, TestVm, MIB};

/// Kills a spawned vmbackup process when a test ends early.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(env: &Env, args: &[&str], test_now: Option<&str>) -> Proc {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin("vmbackup"));
    c.env("VMBACKUP_STATE", &env.state)
        .env("VMBACKUP_CONFIG", &env.config)
        .env_remove("XDG_STATE_HOME")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(now) = test_now {
        c.env("VMBACKUP_TEST_NOW", now);
    }
    Proc(c.spawn().expect("start vmbackup"))
}

fn run_with_clock(env: &Env, args: &[&str], now: &str) -> (i32, String) {
    let out = env
        .cmd()
        .env("VMBACKUP_TEST_NOW", now)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn setup(env: &Env, platform: &str, qmp_dir: &std::path::Path) {
    env.ok(&[
        "platform",
        "add",
        platform,
        "--type",
        "qemu",
        "--qmp-dir",
        qmp_dir.to_str().unwrap(),
    ]);
}

fn target(env: &Env) {
    std::fs::create_dir_all(env.path("target")).unwrap();
    env.ok(&[
        "target",
        "add",
        "t1",
        "--path",
        env.path("target").to_str().unwrap(),
    ]);
}

/// (id, rule, vm, state, started_at, finished_at) of every task.
type Row = (i64, String, String, String, Option<String>, Option<String>);

fn task_rows(env: &Env) -> Vec<Row> {
    let conn = rusqlite::Connection::open(&env.state).unwrap();
    let mut st = conn
        .prepare("SELECT id, rule, vm, state, started_at, finished_at FROM tasks ORDER BY id")
        .unwrap();
    st.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn task_field(env: &Env, id: i64, col: &str) -> Option<String> {
    let conn = rusqlite::Connection::open(&env.state).unwrap();
    conn.query_row(
        &format!("SELECT CAST({col} AS TEXT) FROM tasks WHERE id = ?1"),
        [id],
        |r| r.get(0),
    )
    .unwrap()
}

fn waited(env: &Env, id: i64) -> bool {
    let conn = rusqlite::Connection::open(&env.state).unwrap();
    conn.query_row(
        "SELECT COUNT(*) FROM task_logs WHERE task = ?1 AND message LIKE 'waiting for a slot%'",
        [id],
        |r| r.get::<_, i64>(0),
    )
    .unwrap()
        > 0
}

/// The most tasks whose [start, end) intervals overlap at one instant.
fn max_concurrent(rows: &[&Row]) -> usize {
    let mut edges: Vec<(String, i32)> = Vec::new();
    for r in rows {
        edges.push((r.4.clone().expect("started"), 1));
        edges.push((r.5.clone().expect("finished"), -1));
    }
    // At equal times an end comes before a start.
    edges.sort();
    let (mut now, mut best) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        best = best.max(now);
    }
    best as usize
}

#[test]
fn r38_r41_two_global_slots_five_vms_never_more_than_two_running() {
    let env = Env::new();
    std::fs::write(&env.config, "bk_tsk_thd = 2\nMax_ThreadNum_PerHost = 2\n").unwrap();
    let names = ["v1", "v2", "v3", "v4", "v5"];
    let vms: Vec<TestVm> = names
        .iter()
        .map(|n| env.vm(n, &[DiskSpec::qcow2("disk0", 32 * MIB)], true))
        .collect();
    for (i, vm) in vms.iter().enumerate() {
        vm.write_random("disk0", 0, 8 * MIB, i as u64 + 1);
    }
    setup(&env, "lab", &env.qmp_dir);
    target(&env);
    env.ok(&[
        "rule",
        "add",
        "r",
        "--platform",
        "lab",
        "--vm",
        &names.join(","),
        "--target",
        "t1",
        "--schedule",
        "full daily at 01:00",
    ]);
    let out = env.ok(&["--json", "run-now", "r", "--level", "full"]);
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap()).expect("summary line");
    assert_eq!(summary["exit_code"], 0, "{summary}");
    assert_eq!(summary["vms"].as_array().unwrap().len(), 5);
    let rows = task_rows(&env);
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| r.3 == "completed"), "{rows:?}");
    let refs: Vec<&Row> = rows.iter().collect();
    assert!(
        max_concurrent(&refs) <= 2,
        "more than 2 ran at once: {rows:?}"
    );
    let pending = rows.iter().filter(|r| waited(&env, r.0)).count();
    assert!(
        pending >= 3,
        "5 tasks, 2 slots: at least 3 waited pending, saw {pending}"
    );
    // Nothing is left active or leased.
    let list = env.json(&["task", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
}

#[test]
fn r42_per_host_limit_holds_across_two_platforms_and_processes() {
    let env = Env::new();
    std::fs::write(&env.config, "bk_tsk_thd = 4\nMax_ThreadNum_PerHost = 1\n").unwrap();
    let qmp2 = env.path("qmp2");
    let mut vms = Vec::new();
    for n in ["a1", "a2"] {
        vms.push(env.vm(n, &[DiskSpec::qcow2("disk0", 32 * MIB)], true));
    }
    for n in ["b1", "b2"] {
        vms.push(TestVm::start(
            &qmp2,
            &env.path(&format!("vms/{n}")),
            n,
            &[DiskSpec::qcow2("disk0", 32 * MIB)],
            true,
        ));
    }
    for (i, vm) in vms.iter().enumerate() {
        vm.write_random("disk0", 0, 8 * MIB, i as u64 + 10);
    }
    setup(&env, "lab", &env.qmp_dir);
    setup(&env, "lab2", &qmp2);
    target(&env);
    env.ok(&[
        "rule",
        "add",
        "ra",
        "--platform",
        "lab",
        "--vm",
        "a1,a2",
        "--target",
        "t1",
        "--once",
        &Local::now().format("%Y-%m-%d 23:59").to_string(),
    ]);
    env.ok(&[
        "rule",
        "add",
        "rb",
        "--platform",
        "lab2",
        "--vm",
        "b1,b2",
        "--target",
        "t1",
        "--once",
        &Local::now().format("%Y-%m-%d 23:59").to_string(),
    ]);
    let mut a = spawn(&env, &["run-now", "ra", "--level", "full"], None);
    let mut b = spawn(&env, &["run-now", "rb", "--level", "full"], None);
    assert_eq!(a.0.wait().unwrap().code(), Some(0));
    assert_eq!(b.0.wait().unwrap().code(), Some(0));
    let rows = task_rows(&env);
    assert_eq!(rows.len(), 4);
    for rule in ["ra", "rb"] {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.1 == rule).collect();
        assert!(mine.iter().all(|r| r.3 == "completed"), "{rows:?}");
        assert_eq!(
            max_concurrent(&mine),
            1,
            "two tasks ran at once on one host: {mine:?}"
        );
        assert!(
            mine.iter().any(|r| waited(&env, r.0)),
            "one of {rule}'s tasks waited for its host slot"
        );
    }
}

#[test]
fn r29_r28_pause_holds_progress_then_completes_and_a_new_slot_is_skipped() {
    let env = Env::new();
    let vm = env.vm("web", &[DiskSpec::qcow2("disk0", 32 * MIB)], true);
    vm.write_random("disk0", 0, 4 * MIB, 7);
    setup(&env, "lab", &env.qmp_dir);
    target(&env);
    env.ok(&[
        "rule",
        "add",
        "r",
        "--platform",
        "lab",
        "--vm",
        "web",
        "--target",
        "t1",
        "--schedule",
        "full daily at 01:00",
        "--bandwidth",
        "mon-sun 01:00-01:01 pause",
    ]);
    let day1 = (Local::now() + Days::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let day2 = (Local::now() + Days::days(2))
        .format("%Y-%m-%d")
        .to_string();
    // Five seconds before the pause window ends.
    let began = Instant::now();
    let mut first = spawn(&env, &["run-due"], Some(&format!("{day1} 01:00:55")));
    wait_for(
        || task_rows(&env).first().is_some_and(|r| r.3 == "running"),
        "task running",
    );
    let id = task_rows(&env)[0].0;
    wait_for(
        || task_field(&env, id, "bw_limit").as_deref() == Some("pause"),
        "pause reported",
    );
    assert_eq!(
        task_field(&env, id, "bytes_done").as_deref(),
        Some("0"),
        "a paused task reads nothing"
    );
    let list = env.json(&["task", "list"]);
    assert_eq!(list[0]["bw_limit"], "pause", "{list}");
    assert_eq!(list[0]["state"], "running", "{list}");
    // The next day's slot comes while the task still runs: recorded as skipped (R28).
    let (code, err) = run_with_clock(&env, &["run-due"], &format!("{day2} 01:00:30"));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("R28"), "{err}");
    assert_eq!(first.0.wait().unwrap().code(), Some(0));
    assert!(
        began.elapsed() >= Duration::from_secs(3),
        "the pause held the task"
    );
    let rows = task_rows(&env);
    assert_eq!(rows[0].3, "completed");
    assert_eq!(rows[1].3, "skipped");
    let logs = env.ok(&["logs", "r", "--vm", "web"]);
    assert!(logs.contains("skipped: task 1"), "{logs}");
    // The same slots again: nothing is due, nothing runs twice.
    let (code, _) = run_with_clock(&env, &["run-due"], &format!("{day2} 01:00:40"));
    assert_eq!(code, 0);
    assert_eq!(task_rows(&env).len(), 2);
}

#[test]
fn r44_sigkilled_daemon_task_is_reclaimed_cleaned_and_next_inc_restores_exactly() {
    let env = Env::new();
    let vm = env.vm("web", &[DiskSpec::qcow2("disk0", 32 * MIB)], true);
    vm.write_random("disk0", 0, 4 * MIB, 1);
    setup(&env, "lab", &env.qmp_dir);
    target(&env);
    env.ok(&[
        "rule",
        "add",
        "r",
        "--platform",
        "lab",
        "--vm",
        "web",
        "--target",
        "t1",
        "--schedule",
        "inc daily at 01:00",
    ]);
    env.ok(&["run-now", "r", "--level", "full"]);
    vm.write_random("disk0", 8 * MIB, 2 * MIB, 2);
    env.ok(&[
        "rule",
        "edit",
        "r",
        "--bandwidth",
        "mon-sun 01:00-01:30 pause",
    ]);
    let day1 = (Local::now() + Days::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let mut daemon = spawn(&env, &["daemon"], Some(&format!("{day1} 01:00:10")));
    wait_for(
        || task_rows(&env).get(1).is_some_and(|r| r.3 == "running"),
        "daemon task running",
    );
    let id = task_rows(&env)[1].0;
    wait_for(
        || task_field(&env, id, "bw_limit").as_deref() == Some("pause"),
        "task paused mid-backup",
    );
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    assert_eq!(
        task_field(&env, id, "state").as_deref(),
        Some("running"),
        "a dead task still looks running"
    );
    env.ok(&["rule", "edit", "r", "--clear-bandwidth"]);
    vm.write_random("disk0", 16 * MIB, MIB, 3);
    let out = env.ok(&["--json", "run-now", "r", "--level", "inc"]);
    assert_eq!(
        task_field(&env, id, "state").as_deref(),
        Some("interrupted")
    );
    let logs = env.ok(&["logs", "r", "--task", &id.to_string()]);
    assert!(logs.contains("cleanup after the interrupted run"), "{logs}");
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["vms"][0]["outcome"]["level"], "inc", "{summary}");
    let dest = env.path("restored");
    env.ok(&[
        "restore",
        "r",
        "--vm",
        "web",
        "--to",
        dest.to_str().unwrap(),
    ]);
    let img = std::fs::read_dir(&dest)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        file_digest(&img),
        vm.shadow_digest("disk0"),
        "restored inc differs from the disk"
    );
}
