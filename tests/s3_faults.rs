//! A SeaweedFS volume server killed in the middle of a backup to S3 (issue
//! 13). In a binary of its own: the test kills and restarts a server of the
//! cluster this binary shares.
//!
//! With replication `010` every write needs both racks, so the backup either
//! fails cleanly (exit 3, no visible partial point, the frozen bitmap merged
//! back) or completes; never a corrupt point. Once the server is back, the
//! next incremental completes and restores byte-identical to the disk: the
//! changes the failed run had frozen were not lost.

mod common;
use common::seaweedfs::{add_s3_target, cluster};
use common::*;

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

#[test]
fn a_volume_server_killed_mid_backup_fails_the_task_cleanly_and_the_next_run_completes() {
    let c = cluster();
    let env = Env::new();
    std::fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 32 * MIB)], true);
    env.add_platform();
    add_s3_target(&env, "s3t", "", "default", &[]);
    env.add_rule(
        "r",
        "lab",
        "vm1",
        "s3t",
        &[
            "--schedule",
            "full daily at 01:00",
            "--bandwidth",
            "mon-sun 00:00-24:00 4MiB/s",
        ],
    );
    vm.write_random("disk0", 0, 4 * MIB, 1);
    let full_digest = vm.shadow_digest("disk0");
    env.ok(&["run-now", "r", "--level", "full"]);

    // Changes for the incremental that will meet the dead server.
    vm.write_random("disk0", 4 * MIB, 24 * MIB, 2);
    let child = env
        .child_cmd()
        .args(["--json", "run-now", "r", "--level", "inc"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill a volume server once the incremental is transferring.
    let t = Instant::now();
    loop {
        let tasks = env.json(&["task", "list"]);
        let running = tasks.as_array().is_some_and(|a| {
            a.iter()
                .any(|t| t["percent"].as_f64().is_some_and(|p| p > 5.0))
        });
        if running {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "inc did not start: {tasks}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.kill_volume(1);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|v: &Value| v["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {out:?}"));
    let code = out.status.code().unwrap();
    eprintln!(
        "inc with a volume server killed: exit {code} after {:?}",
        t.elapsed()
    );
    assert!(
        code == 3 || code == 0,
        "the task fails cleanly or completes: {code} {stdout}"
    );

    // Whatever happened, every visible point restores byte-exact.
    c.start_volume(1);
    let points = env.json(&["points", "r", "--vm", "vm1"]);
    let ids: Vec<String> = points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["point"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), if code == 0 { 2 } else { 1 }, "{points}");
    let restore = |point: &str| env.restored_digest("r", "vm1", Some(point), "disk0");
    assert_eq!(restore(&ids[0]), full_digest);
    if code == 3 {
        let error = summary.to_string();
        assert!(error.contains("failed"), "{summary}");
    }

    // The next incremental completes and holds every change since the last
    // good point: a failed run merged its frozen bitmap back.
    vm.write("disk0", 30 * MIB, 4096, 0x77);
    env.ok(&["rule", "edit", "r", "--clear-bandwidth"]);
    let digest = vm.shadow_digest("disk0");
    env.ok(&["run-now", "r", "--level", "inc"]);
    let points = env.json(&["points", "r", "--vm", "vm1"]);
    let last = points.as_array().unwrap().last().unwrap()["point"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(restore(&last), digest, "the next run holds every change");
    env.ok(&["verify", "r"]);
}
