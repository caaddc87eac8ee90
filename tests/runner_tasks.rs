//! The task runner against real QEMU (qemu-storage-daemon VMs): slot limits across
//! tasks and processes (R38, R41, R42), including a daemon and `run-now` together;
//! bandwidth rate and pause windows (R29, R30) and R28 skips under `run-due` with
//! the test clock; the daemon picking up rule changes and one-time rules; missed
//! slots run once; `task cancel`; a SIGKILLed daemon's task reclaimed (R44).
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
    let mut c = vmbackup(env, args);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    if let Some(now) = test_now {
        c.env("VMBACKUP_TEST_NOW", now);
    }
    Proc(c.spawn().expect("start vmbackup"))
}

/// `vmbackup ARGS` with this env's state and config, stdin closed.
fn vmbackup(env: &Env, args: &[&str]) -> Command {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin("vmbackup"));
    c.env("VMBACKUP_STATE", &env.state)
        .env("VMBACKUP_CONFIG", &env.config)
        .env_remove("XDG_STATE_HOME")
        .env_remove("VMBACKUP_TEST_NOW")
        .env_remove("VMBACKUP_TEST_CLOCK_SPEED")
        .args(args)
        .stdin(Stdio::null());
    c
}

/// Milliseconds between two stored RFC 3339 times.
fn millis_between(from: &str, to: &str) -> i64 {
    let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).expect("RFC 3339 time");
    (parse(to) - parse(from)).num_milliseconds()
}

/// What `vmbackup` left on a VM: exports, jobs and nodes named `vmbackup-*`, and
/// temporary bitmaps. Persistent tracking bitmaps (`vmbackup-inc-*`) are not
/// leftovers: they are how the next incremental finds the changes.
fn leftovers(vm: &TestVm) -> Vec<String> {
    let r = vm.qmp(&[
        r#"{"execute":"query-block-exports"}"#,
        r#"{"execute":"query-block-jobs"}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
    ]);
    let mut found = Vec::new();
    for e in r[0]["return"].as_array().expect("exports") {
        let id = e["id"].as_str().unwrap_or_default();
        if id.starts_with("vmbackup-") {
            found.push(format!("export {id}"));
        }
    }
    for j in r[1]["return"].as_array().expect("jobs") {
        found.push(format!("job {}", j["device"]));
    }
    for n in r[2]["return"].as_array().expect("nodes") {
        let name = n["node-name"].as_str().unwrap_or_default();
        if name.starts_with("vmbackup-") {
            found.push(format!("node {name}"));
        }
        for b in n["dirty-bitmaps"].as_array().cloned().unwrap_or_default() {
            let b = b["name"].as_str().unwrap_or_default().to_string();
            if b.starts_with("vmbackup-tmp-") {
                found.push(format!("bitmap {b} on {name}"));
            }
        }
    }
    found
}

/// Restore the newest point of `vm` into a fresh directory; BLAKE3 of its one image.
fn restored_digest(env: &Env, rule: &str, vm: &str, dir: &str) -> String {
    let dest = env.path(dir);
    env.ok(&["restore", rule, "--vm", vm, "--to", dest.to_str().unwrap()]);
    let img = std::fs::read_dir(&dest)
        .unwrap()
        .next()
        .expect("one restored image")
        .unwrap()
        .path();
    file_digest(&img)
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

/// (id, rule, vm, state, started_at, finished_at) of every backup and restore task.
type Row = (i64, String, String, String, Option<String>, Option<String>);

fn task_rows(env: &Env) -> Vec<Row> {
    let conn = rusqlite::Connection::open(&env.state).unwrap();
    let mut st = conn
        // Not prune and GC tasks, which follow the day's last scheduled backup
        // (tests/lifecycle_auto.rs covers those).
        .prepare("SELECT id, rule, vm, state, started_at, finished_at FROM tasks WHERE kind IN ('backup', 'restore') ORDER BY id")
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
    env.add_rule(
        "r",
        "lab",
        &names.join(","),
        "t1",
        &["--schedule", "full daily at 01:00"],
    );
    let out = env.ok(&["--json", "run-now", "r", "--level", "full"]);
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap()).expect("summary line");
    assert_eq!(summary["exit_code"], 0, "{summary}");
    assert_eq!(summary["tasks"].as_array().unwrap().len(), 5);
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
    env.add_rule(
        "ra",
        "lab",
        "a1,a2",
        "t1",
        &["--once", &Local::now().format("%Y-%m-%d 23:59").to_string()],
    );
    env.add_rule(
        "rb",
        "lab2",
        "b1,b2",
        "t1",
        &["--once", &Local::now().format("%Y-%m-%d 23:59").to_string()],
    );
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
    env.add_rule(
        "r",
        "lab",
        "web",
        "t1",
        &[
            "--schedule",
            "full daily at 01:00",
            "--bandwidth",
            "mon-sun 01:00-01:01 pause",
        ],
    );
    let day1 = (Local::now() + Days::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let day2 = (Local::now() + Days::days(2))
        .format("%Y-%m-%d")
        .to_string();
    // Ten seconds before the pause window ends: the margin for seeing the task
    // paused and for the next slot's run-due to find it still running.
    let began = Instant::now();
    let mut first = spawn(&env, &["run-due"], Some(&format!("{day1} 01:00:50")));
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
    assert_eq!(list[0]["limit"], "pause", "{list}");
    assert_eq!(list[0]["status"], "running", "{list}");
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
    env.add_rule(
        "r",
        "lab",
        "web",
        "t1",
        &["--schedule", "inc daily at 01:00"],
    );
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
    assert_eq!(summary["tasks"][0]["outcome"]["level"], "inc", "{summary}");
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

/// A rule's VM with `data` bytes of incompressible data written, platform `lab`,
/// target `t1`, rule `rule` with `extra` policy arguments.
fn one_vm_rule(env: &Env, rule: &str, vm: &str, data: u64, extra: &[&str]) -> TestVm {
    let v = env.vm(vm, &[DiskSpec::qcow2("disk0", 64 * MIB)], true);
    v.write_random("disk0", 0, data, 99);
    setup(env, "lab", &env.qmp_dir);
    target(env);
    env.add_rule(rule, "lab", vm, "t1", extra);
    v
}

#[test]
fn r29_r30_rate_window_bounds_the_backup_and_progress_shows_rate_and_limit() {
    const RATE: u64 = 4 * MIB;
    let env = Env::new();
    let _vm = one_vm_rule(
        &env,
        "r",
        "web",
        40 * MIB,
        &[
            "--schedule",
            "full daily at 01:00",
            "--bandwidth",
            "mon-sun 00:00-24:00 4MiB/s",
        ],
    );
    let mut child = vmbackup(&env, &["--json", "run-now", "r", "--level", "full"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start run-now");
    let stdout = child.stdout.take().unwrap();
    let mut proc = Proc(child);
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap())
            .collect::<Vec<_>>()
    });

    // While it runs, `task list` shows the limit in force and a live rate.
    wait_for(
        || {
            let list = env.json(&["task", "list"]);
            list.get(0).is_some_and(|t| {
                t["status"] == "running" && t["current_rate_bytes_per_sec"].as_u64() > Some(0)
            })
        },
        "a running task with a rate",
    );
    let list = env.json(&["task", "list"]);
    assert_eq!(list[0]["limit"], "4MiB/s", "{list}");
    assert!(
        list[0]["current_rate_bytes_per_sec"].as_u64().unwrap() > 0,
        "{list}"
    );

    assert_eq!(proc.0.wait().unwrap().code(), Some(0));
    let lines = reader.join().unwrap();
    let summary = lines.last().expect("summary");
    assert_eq!(summary["type"], "summary", "{summary}");
    let bytes_read = summary["tasks"][0]["outcome"]["totals"]["bytes_read"]
        .as_u64()
        .expect("bytes_read");
    assert!(bytes_read >= 40 * MIB, "{summary}");

    // Lower bound: every byte read waited for a token, and the bucket starts empty;
    // allow the 250 ms burst.
    let rows = task_rows(&env);
    let took = millis_between(rows[0].4.as_deref().unwrap(), rows[0].5.as_deref().unwrap());
    let floor = (bytes_read * 1000 / RATE) as i64 - 250;
    assert!(took >= floor, "{bytes_read} bytes in {took} ms at 4 MiB/s");

    // JSON progress: the limit in force on every line, a current rate while
    // running, and an average that never beats the limit by more than one burst.
    let progress: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["type"] == "progress").collect();
    assert!(progress.len() >= 3, "{lines:?}");
    assert!(
        progress.iter().all(|p| p["limit"] == "4MiB/s"),
        "{progress:?}"
    );
    assert!(
        progress
            .iter()
            .any(|p| p["current_rate_bytes_per_sec"].as_u64() > Some(0)),
        "{progress:?}"
    );
    let last = progress.last().unwrap();
    assert_eq!(last["bytes_done"], last["bytes_total"], "{last}");
    let average = last["rate_bytes_per_sec"].as_u64().unwrap();
    assert!(
        average <= RATE + RATE / 4,
        "average {average} B/s over a 4 MiB/s limit"
    );
}

#[test]
fn task_cancel_stops_a_running_backup_cleanly_and_the_next_inc_restores_exactly() {
    let env = Env::new();
    let vm = one_vm_rule(
        &env,
        "r",
        "web",
        4 * MIB,
        &["--schedule", "inc daily at 01:00"],
    );
    env.ok(&["run-now", "r", "--level", "full"]);
    vm.write_random("disk0", 8 * MIB, 16 * MIB, 2);
    env.ok(&[
        "rule",
        "edit",
        "r",
        "--bandwidth",
        "mon-sun 00:00-24:00 2MiB/s",
    ]);
    let mut run = spawn(&env, &["run-now", "r", "--level", "inc"], None);
    wait_for(
        || {
            task_rows(&env).get(1).is_some_and(|r| r.3 == "running")
                && task_field(&env, 2, "bytes_done").is_some_and(|b| b != "0")
        },
        "the inc transferring",
    );
    let out = env.ok(&["task", "cancel", "2"]);
    assert!(out.contains("cancel requested"), "{out}");
    assert_eq!(run.0.wait().unwrap().code(), Some(130));

    assert_eq!(task_field(&env, 2, "state").as_deref(), Some("interrupted"));
    let done: u64 = task_field(&env, 2, "bytes_done").unwrap().parse().unwrap();
    assert!(
        done < 16 * MIB,
        "the cancel came mid-transfer: {done} bytes"
    );
    assert_eq!(leftovers(&vm), Vec::<String>::new());
    // Each VM's scratch directory (run/<hash>/) is empty again.
    let scratch: Vec<_> = std::fs::read_dir(env.state.parent().unwrap().join("run"))
        .map(|d| {
            d.flat_map(|e| std::fs::read_dir(e.unwrap().path()).unwrap())
                .map(|e| e.unwrap().path())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(scratch, Vec::<std::path::PathBuf>::new());
    let points = env.json(&["points", "r", "--vm", "web"]);
    assert_eq!(points.as_array().unwrap().len(), 1, "{points}");
    assert!(env.json(&["task", "list"]).as_array().unwrap().is_empty());

    // No change was lost: the next inc (still an inc) restores byte-exact.
    env.ok(&["rule", "edit", "r", "--clear-bandwidth"]);
    vm.write_random("disk0", 40 * MIB, MIB, 3);
    let out = env.ok(&["--json", "run-now", "r", "--level", "inc"]);
    let summary: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(summary["tasks"][0]["outcome"]["level"], "inc", "{summary}");
    assert_eq!(
        restored_digest(&env, "r", "web", "restored"),
        vm.shadow_digest("disk0"),
        "restored inc differs from the disk"
    );
}

fn day(offset: i64) -> String {
    (Local::now() + Days::days(offset))
        .format("%Y-%m-%d")
        .to_string()
}

/// `mon`..`sun` of the day `offset` days from today. Weekly schedules on days
/// other than today make the due slots independent of the real time of day (a
/// daily slot later today would be due too).
fn weekday(offset: i64) -> String {
    (Local::now() + Days::days(offset))
        .format("%a")
        .to_string()
        .to_lowercase()
}

/// `vmbackup daemon` on the test clock, stderr into `log`.
fn daemon(env: &Env, now: &str, speed: &str, log: &std::path::Path) -> Proc {
    let mut c = vmbackup(env, &["daemon"]);
    c.env("VMBACKUP_TEST_NOW", now)
        .env("VMBACKUP_TEST_CLOCK_SPEED", speed)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    Proc(c.spawn().expect("start daemon"))
}

#[test]
fn r38_r41_daemon_and_run_now_together_respect_bk_tsk_thd() {
    let env = Env::new();
    std::fs::write(&env.config, "bk_tsk_thd = 2\nMax_ThreadNum_PerHost = 2\n").unwrap();
    let vms: Vec<TestVm> = ["d1", "d2", "m1"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let v = env.vm(n, &[DiskSpec::qcow2("disk0", 16 * MIB)], true);
            v.write_random("disk0", 0, 4 * MIB, i as u64 + 30);
            v
        })
        .collect();
    setup(&env, "lab", &env.qmp_dir);
    target(&env);
    // The daemon's two tasks hold both slots in a paused window until the test
    // cancels them, so the manual run has to wait (no race against the clock).
    // The manual run has no window: it runs on the real clock, and a window
    // would pause it at that time of day (this test hung from 05:00 to 06:00).
    let schedule = format!("full weekly on {} at 01:00", weekday(1));
    let paused = ["--bandwidth", "mon-sun 00:00-24:00 pause"];
    for (rule, vm, extra) in [("rd", "d1,d2", &paused[..]), ("rm", "m1", &[])] {
        let mut args = vec!["--schedule", &schedule];
        args.extend_from_slice(extra);
        env.add_rule(rule, "lab", vm, "t1", &args);
    }
    env.ok(&["rule", "stop", "rm"]);
    let log = env.path("daemon.log");
    let _daemon = daemon(&env, &format!("{} 00:59:58", day(1)), "10", &log);
    wait_for(
        || task_rows(&env).iter().filter(|r| r.3 == "running").count() == 2,
        "the daemon's two tasks running",
    );
    let mut manual = spawn(&env, &["run-now", "rm", "--level", "full"], None);
    wait_for(
        || {
            task_rows(&env)
                .iter()
                .any(|r| r.2 == "m1" && r.3 == "pending")
        },
        "the manual task pending",
    );
    let list = env.json(&["task", "list"]);
    let m1 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["vm"] == "m1")
        .expect("m1 listed");
    assert_eq!(m1["status"], "pending", "{list}");
    let why = m1["waiting"].as_str().unwrap_or_default();
    assert!(
        why.contains("2 of 2") && why.contains("bk_tsk_thd"),
        "{list}"
    );

    // Free both slots: the manual task then takes one and completes.
    for r in task_rows(&env).iter().filter(|r| r.1 == "rd") {
        env.ok(&["task", "cancel", &r.0.to_string()]);
    }
    assert_eq!(manual.0.wait().unwrap().code(), Some(0));
    wait_for(
        || {
            task_rows(&env).iter().all(|r| {
                r.3 == if r.1 == "rd" {
                    "interrupted"
                } else {
                    "completed"
                }
            })
        },
        "the daemon's tasks interrupted and the manual one completed",
    );
    let rows = task_rows(&env);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let refs: Vec<&Row> = rows.iter().collect();
    assert_eq!(max_concurrent(&refs), 2, "{rows:?}");
    let manual_row = rows.iter().find(|r| r.2 == "m1").unwrap();
    assert!(waited(&env, manual_row.0));
    drop(vms);
}

#[test]
fn daemon_picks_up_a_rule_edit_and_a_new_once_rule_without_a_restart() {
    let env = Env::new();
    let a = env.vm("a", &[DiskSpec::qcow2("disk0", 16 * MIB)], true);
    let b = env.vm("b", &[DiskSpec::qcow2("disk0", 16 * MIB)], true);
    a.write_random("disk0", 0, MIB, 41);
    b.write_random("disk0", 0, MIB, 42);
    setup(&env, "lab", &env.qmp_dir);
    target(&env);
    env.add_rule(
        "ra",
        "lab",
        "a",
        "t1",
        &[
            "--schedule",
            &format!("full weekly on {} at 03:00", weekday(1)),
        ],
    );
    let log = env.path("daemon.log");
    let day1 = day(1);
    let _daemon = daemon(&env, &format!("{day1} 00:59:58"), "1", &log);
    let next_runs = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("next run at")
            .count()
    };
    wait_for(|| next_runs() > 0, "the daemon planning");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("next run at {day1} 03:00:00")),
        "{text}"
    );

    // Edited by another process: the daemon runs at the new time, not at 03:00.
    let at_one = format!("full weekly on {} at 01:00", weekday(1));
    env.ok(&["rule", "edit", "ra", "--schedule", &at_one]);
    wait_for(
        || task_rows(&env).first().is_some_and(|r| r.3 == "completed"),
        "ra's task after the edit",
    );
    // A one-time rule added meanwhile runs once, and its VM shows completed.
    env.add_rule(
        "rb",
        "lab",
        "b",
        "t1",
        &["--once", &format!("{day1} 01:00")],
    );
    wait_for(
        || {
            task_rows(&env)
                .iter()
                .any(|r| r.2 == "b" && r.3 == "completed")
        },
        "the once rule's task",
    );
    let show = env.json(&["rule", "show", "rb"]);
    assert_eq!(show["vms"][0]["state"], "completed", "{show}");
    // Another change makes the daemon look at every rule again: nothing reruns.
    let seen = next_runs();
    env.ok(&[
        "rule",
        "edit",
        "ra",
        "--bandwidth",
        "mon-sun 05:00-06:00 pause",
    ]);
    wait_for(|| next_runs() > seen, "the daemon re-planning");
    let rows = task_rows(&env);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].2.as_str(), rows[1].2.as_str()), ("a", "b"));
    // Nor in another process on the same clock.
    let (code, _) = run_with_clock(&env, &["run-due"], &format!("{day1} 01:00:30"));
    assert_eq!(code, 0);
    assert_eq!(task_rows(&env).len(), 2);
}

#[test]
fn r14_run_due_runs_missed_slots_once_even_when_started_twice_at_once() {
    let env = Env::new();
    let days = format!("{},{},{}", weekday(1), weekday(2), weekday(3));
    let schedule = format!("full weekly on {days} at 01:00");
    let vm = one_vm_rule(&env, "r", "web", MIB, &["--schedule", &schedule]);
    // Three slots passed since the VM joined (the host was off).
    let now = format!("{} 01:00:30", day(3));
    let both: Vec<std::process::Output> = (0..2)
        .map(|_| {
            vmbackup(&env, &["run-due"])
                .env("VMBACKUP_TEST_NOW", &now)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    assert!(both.iter().all(|o| o.status.code() == Some(0)), "{both:?}");
    let stderr: String = both
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(stderr.contains("2 earlier slot(s) were missed"), "{stderr}");
    let rows = task_rows(&env);
    assert_eq!(rows.len(), 1, "one run for three slots: {rows:?}");
    assert_eq!(rows[0].3, "completed");
    // The fold is in the task's own log too (R32), not only on stderr.
    let logs = env.ok(&["--json", "logs", "r", "--vm", "web"]);
    assert!(
        logs.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .any(|l| l["level"] == "warn"
                && l["message"]
                    .as_str()
                    .unwrap()
                    .contains("2 earlier slot(s) were missed")),
        "{logs}"
    );
    // Later that day nothing is due; the next day's slot runs, with nothing missed.
    let (code, _) = run_with_clock(&env, &["run-due"], &format!("{} 23:00:00", day(3)));
    assert_eq!(code, 0);
    assert_eq!(task_rows(&env).len(), 1);
    let (code, err) = run_with_clock(&env, &["run-due"], &format!("{} 01:00:30", day(8)));
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("missed"), "{err}");
    assert_eq!(task_rows(&env).len(), 2);
    drop(vm);
}

#[test]
fn daemon_tells_systemd_when_it_is_ready_and_when_it_stops() {
    use std::os::unix::net::UnixDatagram;
    let env = Env::new();
    let path = env.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmbackup"))
        .env("VMBACKUP_STATE", &env.state)
        .env("VMBACKUP_CONFIG", &env.config)
        .env("NOTIFY_SOCKET", &path)
        .arg("daemon")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("READY=1 from the daemon");
    assert_eq!(&buf[..n], b"READY=1");
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let n = sock.recv(&mut buf).expect("STOPPING=1 from the daemon");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert_eq!(child.wait().unwrap().code(), Some(130));
}

#[test]
fn restore_is_a_runner_task_recorded_and_logged_and_v_shows_qmp_commands() {
    let env = Env::new();
    let vm = one_vm_rule(
        &env,
        "r",
        "web",
        8 * MIB,
        &["--schedule", "full daily at 01:00"],
    );
    // -v: debug diagnostics on stderr, with a timestamp, naming QMP commands.
    let out = env
        .cmd()
        .args(["-v", "run-now", "r", "--level", "full"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let qmp_line = stderr
        .lines()
        .find(|l| l.contains("vmbackup: debug: QMP") && l.contains("transaction"))
        .unwrap_or_else(|| panic!("no QMP debug line in:\n{stderr}"));
    // `2026-12-03 09:30:00.123 +01:00 vmbackup: debug: ...`: local time, offset.
    let stamp: Vec<&str> = qmp_line.splitn(4, ' ').take(3).collect();
    assert!(
        chrono::DateTime::parse_from_str(&stamp.join(" "), "%Y-%m-%d %H:%M:%S%.3f %:z").is_ok(),
        "no timestamp: {qmp_line}"
    );
    let quiet = env.cmd().args(["run-now", "r", "--level", "inc"]).output();
    let quiet = String::from_utf8_lossy(&quiet.unwrap().stderr).into_owned();
    assert!(
        !quiet.contains("debug:"),
        "debug lines without -v:\n{quiet}"
    );

    // A restore is a task: a row of kind restore, progress, its point, log lines.
    let dest = env.path("restored");
    let printed = env.ok(&[
        "restore",
        "r",
        "--vm",
        "web",
        "--to",
        dest.to_str().unwrap(),
    ]);
    let id = task_rows(&env).last().unwrap().0;
    assert_eq!(task_field(&env, id, "kind").as_deref(), Some("restore"));
    assert_eq!(task_field(&env, id, "state").as_deref(), Some("completed"));
    let point = task_field(&env, id, "point").expect("restored point recorded");
    assert_eq!(
        task_field(&env, id, "bytes_done"),
        task_field(&env, id, "bytes_total")
    );
    // Progress counts the data restored: the 8 MiB written, not the zero slots.
    assert_eq!(
        task_field(&env, id, "bytes_total").as_deref(),
        Some((8 * MIB).to_string().as_str())
    );
    let logs = env.ok(&["logs", "r", "--task", &id.to_string()]);
    let image = dest.join("disk0.raw");
    assert!(
        logs.contains(&point) && logs.contains(image.to_str().unwrap()),
        "{logs}"
    );
    assert!(printed.contains(image.to_str().unwrap()), "{printed}");
    assert_eq!(file_digest(&image), vm.shadow_digest("disk0"));

    // A failed restore logs its error in its task, and says it once on stderr.
    let err = env.fails(
        2,
        &[
            "restore",
            "r",
            "--vm",
            "web",
            "--to",
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let failed = task_rows(&env).last().unwrap().0;
    assert_eq!(task_field(&env, failed, "state").as_deref(), Some("failed"));
    let logs = env.ok(&["logs", "r", "--task", &failed.to_string()]);
    assert!(logs.contains("--force"), "{logs}");
}
