//! `stats` (R33, R34) against real backups and real failures: counts per day and
//! month with the test clock moved forward, all-time totals, bytes and points,
//! the unviewed-failure counter across invocations (`--peek` keeps it), and
//! `rule list/show` reporting the last *backup* (not a later restore, B6).

mod common;

use chrono::{Duration as Days, Local};
use common::{DiskSpec, Env, MIB};

/// `stats ... --json` with the test clock at noon, `days` days from today.
fn stats_on(env: &Env, days: i64, args: &[&str]) -> serde_json::Value {
    let now = format!(
        "{} 12:00:00",
        (Local::now() + Days::days(days)).format("%Y-%m-%d")
    );
    let out = env
        .cmd()
        .env("VMBACKUP_TEST_NOW", &now)
        .arg("--json")
        .arg("stats")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn counts(bucket: &serde_json::Value) -> (u64, u64, u64) {
    (
        bucket["succeeded"].as_u64().unwrap(),
        bucket["failed"].as_u64().unwrap(),
        bucket["skipped"].as_u64().unwrap(),
    )
}

fn sum(buckets: &serde_json::Value) -> (u64, u64, u64) {
    buckets
        .as_array()
        .unwrap()
        .iter()
        .map(counts)
        .fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2))
}

#[test]
fn r33_counts_per_period_totals_and_the_unviewed_counter() {
    let env = Env::new();
    let mut vm = env.vm("s1", &[DiskSpec::qcow2("vda", 8 * MIB)], true);
    vm.write_random("vda", 0, 2 * MIB, 7);
    env.add_lab("t1");
    env.add_rule("st", "lab", "s1", "t1", &["--once", "2030-01-01 00:00"]);

    env.ok(&["run-now", "st", "--level", "full"]);
    vm.write_random("vda", 4 * MIB, MIB, 8);
    env.ok(&["run-now", "st", "--level", "inc"]);
    let points = env.json(&["points", "st", "--vm", "s1"]);
    let first = points[0]["point"].as_str().unwrap().to_string();
    let second = points[1]["point"].as_str().unwrap().to_string();
    // Two failures: the VM is gone.
    vm.kill();
    for _ in 0..2 {
        env.fails(3, &["run-now", "st", "--level", "inc"]);
    }

    // Today: 2 succeeded, 2 failed; --peek leaves the counter alone.
    for _ in 0..2 {
        let s = stats_on(&env, 0, &["st", "--peek"]);
        assert_eq!(s["unviewed_failures"], 2, "{s}");
        assert_eq!(s["vms"][0]["unviewed_failures"], 2, "{s}");
    }
    let s = stats_on(&env, 0, &["st", "--peek"]);
    let week = &s["week"];
    assert_eq!(week.as_array().unwrap().len(), 7);
    assert_eq!(counts(&week[6]), (2, 2, 0), "{s}");
    assert_eq!(sum(week), (2, 2, 0));
    assert_eq!(sum(&s["month"]), (2, 2, 0));
    assert_eq!(s["month"].as_array().unwrap().len(), 30);
    assert_eq!(s["year"].as_array().unwrap().len(), 12);
    assert_eq!(counts(&s["year"][11]), (2, 2, 0));
    let t = &s["totals"];
    assert_eq!(counts(t), (2, 2, 0), "{s}");
    assert!(t["bytes_read"].as_u64().unwrap() >= 3 * MIB, "{s}");
    assert!(t["bytes_written"].as_u64().unwrap() > 0, "{s}");
    assert!(t["ratio"].as_f64().unwrap() > 0.0, "{s}");
    let v = &s["vms"][0];
    assert_eq!(v["point_count"], 2, "{s}");
    assert_eq!(v["last_backup"]["point"], second.as_str(), "{s}");
    assert_eq!(v["last_backup"]["level"], "inc", "{s}");

    // A restore of the older point is not the last backup (B6).
    let dest = env.path("restored");
    env.ok(&[
        "restore",
        "st",
        "--vm",
        "s1",
        "--point",
        &first,
        "--to",
        dest.to_str().unwrap(),
    ]);
    let show = env.json(&["rule", "show", "st"]);
    assert_eq!(
        show["vms"][0]["last_backup"]["point"],
        second.as_str(),
        "{show}"
    );
    assert_eq!(show["vms"][0]["last_task"]["kind"], "restore", "{show}");
    assert_eq!(show["vms"][0]["unviewed_failures"], 2, "{show}");

    // A plain `stats` (here for people) shows the count and marks it viewed.
    let out = env.ok(&["stats", "st"]);
    assert!(
        out.contains("unviewed failures: 2 (now marked viewed)"),
        "{out}"
    );
    assert!(out.contains("backups of rule 'st', last 7 days"), "{out}");
    let s = stats_on(&env, 0, &["st"]);
    assert_eq!(s["unviewed_failures"], 0, "{s}");
    let list = env.json(&["rule", "list"]);
    assert_eq!(list[0]["vms"][0]["unviewed_failures"], 0, "{list}");
    assert_eq!(list[0]["vms"][0]["last_backup"]["point"], second.as_str());
    // A new failure is unviewed again; `--tasks --failed` lists it with its error.
    env.fails(3, &["run-now", "st", "--level", "inc"]);
    let list = env.json(&["rule", "list"]);
    assert_eq!(list[0]["vms"][0]["unviewed_failures"], 1, "{list}");
    let s = stats_on(&env, 0, &["st", "--peek", "--tasks", "--failed"]);
    let failed = s["tasks"].as_array().unwrap();
    assert_eq!(failed.len(), 3, "{s}");
    assert!(
        failed
            .iter()
            .all(|t| t["message"].as_str().unwrap().contains("s1")),
        "{s}"
    );
    assert_eq!(s["unviewed_failures"], 1);

    // The test clock moves on: the same tasks fall into older buckets.
    let s = stats_on(&env, 3, &["st", "--peek", "--period", "week"]);
    assert_eq!(counts(&s["week"][3]), (2, 3, 0), "{s}");
    assert!(s["month"].is_null() && s["year"].is_null(), "{s}");
    let s = stats_on(&env, 10, &["st", "--peek"]);
    assert_eq!(sum(&s["week"]), (0, 0, 0), "{s}");
    assert_eq!(counts(&s["month"][19]), (2, 3, 0), "{s}");
    assert_eq!(sum(&s["year"]), (2, 3, 0), "{s}");
    let s = stats_on(&env, 400, &["st", "--peek"]);
    assert_eq!(sum(&s["year"]), (0, 0, 0), "{s}");
    assert_eq!(s["totals"]["succeeded"], 2, "all-time totals stay: {s}");
    assert_eq!(s["totals"]["failed"], 3, "{s}");
    assert_eq!(s["vms"][0]["last_backup"]["point"], second.as_str());
    assert!(s["vms"][0]["last_backup"]["age_seconds"].as_f64().unwrap() > 399.0 * 86400.0);
}

#[test]
fn stats_refuses_an_unknown_rule_or_vm() {
    let env = Env::new();
    env.ok(&["rule", "list"]);
    env.refused(&["stats", "nope"], &["rule", "nope"]);
    env.refused(&["stats", "nope", "--failed"], &["--tasks"]);
}
