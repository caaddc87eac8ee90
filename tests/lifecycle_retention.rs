//! Retention over simulated days, against real QEMU (issue 7 §2): the seed's
//! examples R19, R20, R21 with the test clock moved (VMBACKUP_TEST_NOW, TZ=UTC),
//! weekly, monthly and quarterly retention at period edges, `forget`, orphaned
//! VM keys, and `rule edit` keeping omitted policy flags (sysadmin review B2).
//! Every kept point restores byte-exact against the digest recorded when it
//! was taken.

mod common;
use common::*;

use std::fs;
use std::process::Output;

use serde_json::Value;

struct Lab {
    env: Env,
    vm: TestVm,
}

/// A VM `vm1` (4 MiB disk) in rule `r` with `policy` options.
fn lab(policy: &[&str]) -> Lab {
    let env = Env::new();
    fs::write(&env.config, "i2vp_transbuffer = 1M\n").unwrap();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("disk0", 4 * MIB)], true);
    env.add_lab("t");
    env.add_rule("r", "lab", "vm1", "t", policy);
    Lab { env, vm }
}

impl Lab {
    /// `vmbackup ARGS` with the clock at `now` (UTC wall time).
    fn at(&self, now: &str, args: &[&str]) -> Output {
        self.env
            .cmd()
            .env("TZ", "UTC")
            .env("VMBACKUP_TEST_NOW", now)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok_at(&self, now: &str, args: &[&str]) -> String {
        let out = self.at(now, args);
        assert!(
            out.status.success(),
            "{args:?} at {now}: {:?}\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A guest write, then a backup at `now`: (point, level, digest at snapshot).
    fn backup_at(&self, now: &str, level: &str, seed: u64) -> (String, String) {
        self.vm
            .write_random("disk0", (seed % 4) * MIB, 64 * 1024, seed);
        let digest = self.vm.shadow_digest("disk0");
        let out = self.ok_at(now, &["--json", "run-now", "r", "--level", level]);
        let summary: Value = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .find(|v: &Value| v["type"] == "summary")
            .unwrap();
        let outcome = &summary["tasks"][0]["outcome"];
        assert_eq!(outcome["level"], level, "{summary}");
        (outcome["point"].as_str().unwrap().to_string(), digest)
    }

    fn prune_at(&self, now: &str, extra: &[&str]) -> Value {
        let mut args = vec!["--json", "prune", "r"];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.ok_at(now, &args)).unwrap()
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

    fn assert_restores(&self, point: &str, digest: &str) {
        let dir = self.env.path(&format!("restore-{point}"));
        self.env.ok(&[
            "restore",
            "r",
            "--vm",
            "vm1",
            "--point",
            point,
            "--to",
            dir.to_str().unwrap(),
        ]);
        assert_eq!(file_digest(&dir.join("disk0.raw")), digest, "point {point}");
        fs::remove_dir_all(dir).unwrap();
    }
}

/// (point, action, reason) of the prune document's VM `vm1`.
fn marks(doc: &Value) -> Vec<(String, String, String)> {
    let vm = doc["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == "vm1")
        .unwrap();
    vm["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["point"].as_str().unwrap().to_string(),
                p["action"].as_str().unwrap().to_string(),
                p["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// R21, R16: retention 0 days with a full and incrementals. After day 2's
/// incremental, day 1's incremental goes, the full it depends on stays, and
/// every kept point restores byte-exact.
#[test]
fn r21_zero_days_day_two_incremental_keeps_the_full_and_merges_day_one() {
    let l = lab(&[
        "--schedule",
        "full daily at 01:00",
        "--schedule",
        "inc daily at 13:00",
        "--retention",
        "0",
    ]);
    let (f1, d_f1) = l.backup_at("2026-11-30 01:00:00", "full", 1);
    let (i1, _) = l.backup_at("2026-11-30 13:00:00", "inc", 2);
    let (i2, d_i2) = l.backup_at("2026-12-01 13:00:00", "inc", 3);
    assert_eq!(
        (f1.as_str(), i1.as_str(), i2.as_str()),
        ("20261130T010000Z", "20261130T130000Z", "20261201T130000Z")
    );

    let dry = l.prune_at("2026-12-01 13:05:00", &["--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        l.points(),
        [f1.as_str(), i1.as_str(), i2.as_str()],
        "a dry run removes nothing"
    );
    let doc = l.prune_at("2026-12-01 13:05:00", &[]);
    assert_eq!(doc["exit_code"], 0);
    assert_eq!(marks(&doc), marks(&dry));
    assert_eq!(
        marks(&doc),
        [
            (
                f1.clone(),
                "keep".into(),
                "newest full, base of the next incremental (R21)".into()
            ),
            (
                i1.clone(),
                "remove".into(),
                "2026-11-30 is outside retention 0 days".into()
            ),
            (
                i2.clone(),
                "keep".into(),
                "newest point; 2026-12-01 is within retention 0 days (the current one)".into()
            ),
        ]
    );
    assert_eq!(l.points(), [f1.as_str(), i2.as_str()]);
    // Day 2's incremental was taken against day 1's: its base is gone, and it
    // restores on its own (R16).
    let m = &l.env.json(&["points", "r", "--vm", "vm1"])[1];
    assert_eq!(m["base"], i1.as_str());
    l.assert_restores(&f1, &d_f1);
    l.assert_restores(&i2, &d_i2);

    // Day 3: the chain goes on from day 2's incremental; day 2 then goes too.
    let (i3, d_i3) = l.backup_at("2026-12-02 13:00:00", "inc", 4);
    let doc = l.prune_at("2026-12-02 13:05:00", &[]);
    assert_eq!(l.points(), [f1.as_str(), i3.as_str()], "{doc}");
    l.assert_restores(&f1, &d_f1);
    l.assert_restores(&i3, &d_i3);
    l.env.ok(&["verify", "r"]);
}

/// R19: 1 day keeps today and yesterday, 0 days today only (at the day's edge).
#[test]
fn r19_one_day_keeps_yesterday_zero_days_only_today() {
    let l = lab(&["--schedule", "full daily at 01:00", "--retention", "1"]);
    let (p1, _) = l.backup_at("2026-11-29 23:59:00", "full", 1);
    let (p2, d2) = l.backup_at("2026-11-30 00:00:30", "full", 2);
    let (p3, d3) = l.backup_at("2026-12-01 00:00:30", "full", 3);
    l.prune_at("2026-12-01 23:59:00", &[]);
    assert_eq!(
        l.points(),
        [p2.as_str(), p3.as_str()],
        "{p1} is two days old"
    );
    l.env
        .ok(&["rule", "edit", "r", "--retention", "0"])
        .contains("the next prune removes 1 point(s)")
        .then_some(())
        .expect("lowering retention says how many points go");
    l.prune_at("2026-12-01 23:59:00", &[]);
    assert_eq!(l.points(), [p3.as_str()]);
    l.assert_restores(&p3, &d3);
    let _ = d2;
}

/// R20: 0 weeks keeps this week, Monday to Sunday. Then the same VM under a
/// monthly and a quarterly schedule (rule edit keeps the retention, B2).
#[test]
fn r20_weeks_start_on_monday_months_and_quarters_turn_at_their_edges() {
    let l = lab(&[
        "--schedule",
        "full weekly on sun at 01:00",
        "--retention",
        "0",
    ]);
    let (sun, _) = l.backup_at("2026-11-29 23:00:00", "full", 1); // Sunday
    let (mon, _) = l.backup_at("2026-11-30 00:30:00", "full", 2); // Monday
    let (wed, d_wed) = l.backup_at("2026-12-02 12:00:00", "full", 3);
    let doc = l.prune_at("2026-12-06 23:59:00", &["--dry-run"]);
    let m = marks(&doc);
    assert_eq!(
        m[0].2,
        "the week of Mon 2026-11-23 is outside retention 0 weeks"
    );
    assert_eq!(m[0].1, "remove");
    assert_eq!((m[1].1.as_str(), m[2].1.as_str()), ("keep", "keep"));
    l.prune_at("2026-12-06 23:59:00", &[]);
    assert_eq!(
        l.points(),
        [mon.as_str(), wed.as_str()],
        "{sun} was last week"
    );
    // Monday morning: a new week; only the newest point (and full) stays.
    l.prune_at("2026-12-07 00:30:00", &[]);
    assert_eq!(l.points(), [wed.as_str()]);
    l.assert_restores(&wed, &d_wed);

    // B2: --schedule alone keeps the retention (0, now in months).
    l.env.ok(&[
        "rule",
        "edit",
        "r",
        "--schedule",
        "full monthly on 1 at 01:00",
    ]);
    let shown = l.env.json(&["rule", "show", "r"]);
    assert!(
        shown["policy_text"]
            .as_str()
            .unwrap()
            .contains("retention 0 (monthly)"),
        "{shown}"
    );
    let (dec31, _) = l.backup_at("2026-12-31 23:59:00", "full", 4);
    let (jan1, d_jan1) = l.backup_at("2027-01-01 00:00:30", "full", 5);
    l.prune_at("2027-01-31 23:00:00", &[]);
    assert_eq!(
        l.points(),
        [jan1.as_str()],
        "{dec31} and {wed} are last year"
    );

    l.env.ok(&[
        "rule",
        "edit",
        "r",
        "--schedule",
        "full quarterly on 1 at 01:00",
        "--retention",
        "1",
    ]);
    let (mar31, _) = l.backup_at("2027-03-31 23:59:00", "full", 6);
    let (apr1, d_apr1) = l.backup_at("2027-04-01 00:00:30", "full", 7);
    let (jul1, d_jul1) = l.backup_at("2027-07-01 00:00:30", "full", 8);
    l.prune_at("2027-07-02 00:00:00", &[]);
    // Q3 now; retention 1 quarter keeps Q2 (April) and Q3 (July).
    assert_eq!(l.points(), [apr1.as_str(), jul1.as_str()], "{mar31} is Q1");
    l.assert_restores(&apr1, &d_apr1);
    l.assert_restores(&jul1, &d_jul1);
    let _ = d_jan1;

    // --retention all: keep everything again.
    l.env.ok(&["rule", "edit", "r", "--retention", "all"]);
    let doc = l.prune_at("2030-01-01 00:00:00", &[]);
    assert!(marks(&doc).iter().all(|m| m.1 == "keep"), "{doc}");
    assert!(marks(&doc)[0].2.contains("retention keeps all points"));
}

/// B2 in detail: each flag left out keeps its value.
#[test]
fn rule_edit_keeps_omitted_policy_flags() {
    let l = lab(&[
        "--schedule",
        "full daily at 01:00",
        "--retention",
        "7",
        "--bandwidth",
        "mon-fri 08:00-18:00 20MiB/s",
    ]);
    let policy = |l: &Lab| {
        l.env.json(&["rule", "show", "r"])["policy_text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    l.env
        .ok(&["rule", "edit", "r", "--schedule", "full daily at 02:00"]);
    assert_eq!(policy(&l), "full daily at 02:00; retention 7 (daily)");
    l.env
        .ok(&["rule", "edit", "r", "--bandwidth", "sat 00:00-24:00 pause"]);
    assert_eq!(policy(&l), "full daily at 02:00; retention 7 (daily)");
    l.env.ok(&["rule", "edit", "r", "--retention", "all"]);
    assert_eq!(policy(&l), "full daily at 02:00; retention: keep all");
    l.env.ok(&["rule", "edit", "r", "--retention", "3"]);
    assert_eq!(policy(&l), "full daily at 02:00; retention 3 (daily)");
    l.env.refused(
        &["rule", "edit", "r", "--retention", "some"],
        &["--retention", "'all'"],
    );
    l.env.refused(
        &["rule", "edit", "r", "--retention", "65"],
        &["--retention", "R15"],
    );
    let v = l.env.json(&["rule", "edit", "r", "--retention", "2"]);
    assert_eq!(v["prune_would_remove_count"], 0, "{v}");
}

/// `forget`: chosen points go; unknown ids and points a running restore reads
/// are refused and change nothing; the newest full's removal is explained.
#[test]
fn forget_removes_chosen_points_and_refuses_protected_ones() {
    let l = lab(&["--schedule", "full daily at 01:00"]);
    let (f1, _) = l.backup_at("2026-11-30 01:00:00", "full", 1);
    let (f2, d_f2) = l.backup_at("2026-12-01 01:00:00", "full", 2);
    let (i3, d_i3) = l.backup_at("2026-12-02 01:00:00", "inc", 3);

    let err = l.env.fails(
        2,
        &["forget", "r", "--vm", "vm1", "--point", "20200101T000000Z"],
    );
    assert!(err.contains("no such point"), "{err}");
    assert_eq!(l.points(), [f1.as_str(), f2.as_str(), i3.as_str()]);

    // A running restore reads f1 (its task row says so): refused, exit 4.
    let conn = rusqlite::Connection::open(&l.env.state).unwrap();
    conn.execute(
        "INSERT INTO tasks (kind, rule, vm, state, pid, created_at, point)
         VALUES ('restore', 'r', 'vm1', 'running', ?1, '2026-12-02T00:00:00.000Z', ?2)",
        rusqlite::params![std::process::id(), f1],
    )
    .unwrap();
    let task: i64 = conn.last_insert_rowid();
    let err = l
        .env
        .fails(4, &["forget", "r", "--vm", "vm1", "--point", &f1]);
    assert!(
        err.contains(&format!("read by restore task {task}")),
        "{err}"
    );
    let doc = l.prune_at("2027-01-01 00:00:00", &["--dry-run"]);
    let f1_mark = marks(&doc).into_iter().find(|m| m.0 == f1).unwrap();
    assert_eq!(f1_mark.1, "keep");
    assert!(f1_mark.2.contains("read by restore task"), "{f1_mark:?}");
    conn.execute("UPDATE tasks SET state = 'completed' WHERE id = ?1", [task])
        .unwrap();

    let out = l
        .env
        .ok(&["forget", "r", "--vm", "vm1", "--point", &f1, "--dry-run"]);
    assert!(out.contains("would remove"), "{out}");
    assert_eq!(l.points(), [f1.as_str(), f2.as_str(), i3.as_str()]);
    let v = l.env.json(&[
        "forget",
        "r",
        "--vm",
        "vm1",
        "--point",
        &format!("{f1},{f2}"),
    ]);
    let notes = v["notes"].to_string();
    assert!(
        notes.contains("no full is left") || notes.contains(&format!("newest full {f2}")),
        "{v}"
    );
    assert_eq!(l.points(), [i3.as_str()]);
    l.assert_restores(&i3, &d_i3);
    let _ = d_f2;
    // With no full left, the next inc runs as a full (R27), exit 1.
    l.vm.write("disk0", 0, 4096, 9);
    let out = l.at("2026-12-03 01:00:00", &["run-now", "r", "--level", "inc"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("R27"));
}

/// Points of a VM key no rule owns are listed as orphaned by points and
/// prune, kept by prune, and removable by forget.
#[test]
fn orphaned_vm_keys_are_listed_kept_and_forgettable() {
    let l = lab(&["--schedule", "full daily at 01:00", "--retention", "0"]);
    let vm2 = l.env.vm("vm2", &[DiskSpec::qcow2("disk0", 2 * MIB)], true);
    l.env.ok(&["platform", "refresh", "lab"]);
    l.env.ok(&["rule", "add-vm", "r", "--vm", "vm2"]);
    vm2.write("disk0", 0, MIB, 7);
    let (p1, _) = l.backup_at("2026-11-30 01:00:00", "full", 1);
    let all = l.env.json(&["points", "r"]);
    let vm2_point = all
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["vm"] == "vm2")
        .unwrap()["point"]
        .as_str()
        .unwrap()
        .to_string();
    l.env.ok(&["rule", "remove", "r", "--vm", "vm2"]);

    let all = l.env.json(&["points", "r"]);
    let orphan: Vec<&Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["orphaned"] == true)
        .collect();
    assert_eq!(orphan.len(), 1, "{all}");
    assert_eq!(orphan[0]["vm"], "lab/vm2");
    let doc = l.prune_at("2027-01-01 00:00:00", &[]);
    let o = doc["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["orphaned"] == true)
        .unwrap();
    assert_eq!(o["points"][0]["action"], "keep");
    assert!(o["points"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("orphaned"));
    l.env
        .ok(&["forget", "r", "--vm", "lab/vm2", "--point", &vm2_point]);
    let all = l.env.json(&["points", "r"]);
    assert!(all
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["orphaned"] == false));
    assert_eq!(l.points(), [p1.as_str()]);
}
