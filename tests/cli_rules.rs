//! Rules, platforms and targets through the real binary against real QEMU VMs
//! (issue 2). Every refusal: exit 2, one line naming the field, state unchanged.

mod common;
use common::*;

use chrono::{Duration, Local};

struct Lab {
    env: Env,
    _vms: Vec<TestVm>,
}

/// Platform `lab` with VMs web (1 qcow2 disk), db (2 qcow2 disks), rawvm (raw disk);
/// target `t1`.
fn lab() -> Lab {
    let env = Env::new();
    let vms = vec![
        env.vm("web", &[DiskSpec::qcow2("disk0", 16 * MIB)], false),
        env.vm(
            "db",
            &[
                DiskSpec::qcow2("disk0", 16 * MIB),
                DiskSpec::qcow2("disk1", 8 * MIB),
            ],
            false,
        ),
        env.vm("rawvm", &[DiskSpec::raw("disk0", 8 * MIB)], false),
    ];
    env.add_lab("t1");
    Lab { env, _vms: vms }
}

const DAILY: &str = "full daily at 01:00";

fn add_rule<'a>(name: &'a str, vm: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "rule",
        "add",
        name,
        "--platform",
        "lab",
        "--vm",
        vm,
        "--target",
        "t1",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn platform_discovers_vms_disks_and_cbt_support() {
    let l = lab();
    let vms = l.env.json(&["platform", "vms", "lab"]);
    let vms = vms.as_array().unwrap();
    assert_eq!(vms.len(), 3);
    let db = vms.iter().find(|v| v["name"] == "db").unwrap();
    assert_eq!(db["disks"].as_array().unwrap().len(), 2);
    assert_eq!(db["disks"][0]["size"], 16 * MIB);
    assert_eq!(db["disks"][0]["format"], "qcow2");
    assert_eq!(db["disks"][0]["cbt"], true);
    let raw = vms.iter().find(|v| v["name"] == "rawvm").unwrap();
    assert_eq!(raw["disks"][0]["cbt"], false);
    // State persists across invocations.
    let list = l.env.json(&["platform", "list"]);
    assert_eq!(list[0]["name"], "lab");
    assert_eq!(list[0]["vm_count"], 3);
}

#[test]
fn unreachable_vm_socket_is_reported_per_vm() {
    let l = lab();
    // A socket file nobody listens on.
    let dead = l.env.qmp_dir.join("ghost.qmp");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let out = l.env.ok(&["platform", "refresh", "lab"]);
    assert!(out.contains("4 VM(s), 1 unreachable"), "{out}");
    let vms = l.env.json(&["platform", "vms", "lab"]);
    let ghost = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "ghost")
        .unwrap();
    assert!(
        ghost["error"].as_str().unwrap().contains("ghost.qmp"),
        "{ghost}"
    );
    assert!(
        vms.as_array()
            .unwrap()
            .iter()
            .filter(|v| v["error"].is_null())
            .count()
            == 3
    );
}

#[test]
fn r1_rule_names_are_unique() {
    let l = lab();
    l.env.ok(&add_rule("r1", "web", &["--schedule", DAILY]));
    l.env.refused(
        &add_rule("r1", "db", &["--schedule", DAILY]),
        &["rule name", "r1", "R1"],
    );
    l.env.refused(
        &add_rule("bad/name", "db", &["--schedule", DAILY]),
        &["rule name", "bad/name"],
    );
}

#[test]
fn r2_platform_must_be_registered() {
    let l = lab();
    let mut a = add_rule("r1", "web", &["--schedule", DAILY]);
    a[4] = "nope";
    l.env.refused(&a, &["--platform", "nope", "R2", "lab"]);
}

#[test]
fn r3_vms_come_from_the_platform_list() {
    let l = lab();
    l.env.refused(
        &add_rule("r1", "nosuchvm", &["--schedule", DAILY]),
        &["--vm", "nosuchvm", "R3", "web"],
    );
    // Several VMs at once, comma-separated.
    l.env.ok(&add_rule("r2", "web,db", &["--schedule", DAILY]));
    let r = l.env.json(&["rule", "show", "r2"]);
    assert_eq!(r["vms"].as_array().unwrap().len(), 2);
}

#[test]
fn r4_target_must_be_registered_and_r5_path_is_a_subdirectory() {
    let l = lab();
    let mut a = add_rule("r1", "web", &["--schedule", DAILY]);
    a[8] = "nope";
    l.env.refused(&a, &["--target", "nope", "R4", "t1"]);
    l.env.refused(
        &add_rule("r1", "web", &["--schedule", DAILY, "--path", "../escape"]),
        &["--path", "R5"],
    );
    l.env.refused(
        &add_rule("r1", "web", &["--schedule", DAILY, "--path", "/abs"]),
        &["--path", "R5"],
    );
    l.env.ok(&add_rule(
        "r1",
        "web",
        &["--schedule", DAILY, "--path", "site-a/web"],
    ));
    assert_eq!(l.env.json(&["rule", "show", "r1"])["subdir"], "site-a/web");
}

#[test]
fn r6_r7_cbt_choice_needs_auto_off() {
    let l = lab();
    l.env.fails(
        2,
        &add_rule("r1", "web", &["--schedule", DAILY, "--cbt", "off"]),
    );
    l.env.ok(&add_rule(
        "r1",
        "web",
        &["--schedule", DAILY, "--no-auto-cbt", "--cbt", "off"],
    ));
    let r = l.env.json(&["rule", "show", "r1"]);
    assert_eq!(
        (r["auto_cbt"].as_bool(), r["cbt"].as_bool()),
        (Some(false), Some(false))
    );
    l.env.ok(&add_rule("r2", "db", &["--schedule", DAILY]));
    assert_eq!(l.env.json(&["rule", "show", "r2"])["auto_cbt"], true);
}

#[test]
fn r11_once_runs_at_the_given_local_time() {
    let l = lab();
    let at = (Local::now() + Duration::days(2))
        .format("%Y-%m-%d 03:15")
        .to_string();
    l.env.ok(&add_rule("r1", "web", &["--once", &at]));
    let r = l.env.json(&["rule", "show", "r1"]);
    // JSON times are UTC with milliseconds (docs/JSON.md).
    let local = chrono::NaiveDateTime::parse_from_str(&at, "%Y-%m-%d %H:%M").unwrap();
    let utc = chrono::TimeZone::from_local_datetime(&Local, &local)
        .unwrap()
        .with_timezone(&chrono::Utc)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    assert_eq!(r["next_runs"][0]["time"], utc.as_str());
    assert_eq!(r["next_runs"].as_array().unwrap().len(), 1);
}

#[test]
fn r12_once_before_today_is_refused() {
    let l = lab();
    let at = (Local::now() - Duration::days(1))
        .format("%Y-%m-%d 23:00")
        .to_string();
    l.env
        .refused(&add_rule("r1", "web", &["--once", &at]), &["--once", "R12"]);
}

#[test]
fn r13_once_earlier_today_is_due_now() {
    let l = lab();
    let mut now = Local::now();
    if now.format("%H:%M").to_string() == "00:00" {
        std::thread::sleep(std::time::Duration::from_secs(61));
        now = Local::now();
    }
    let at = now.format("%Y-%m-%d 00:00").to_string();
    l.env.ok(&add_rule("r1", "web", &["--once", &at]));
    let r = l.env.json(&["rule", "show", "r1"]);
    let next = r["next_runs"][0]["time"].as_str().unwrap().to_string();
    let next = chrono::DateTime::parse_from_rfc3339(&next).unwrap();
    assert!(next <= chrono::Utc::now(), "next run {next} is not due now");
}

#[test]
fn r14_periodic_schedules_compile_to_cron_with_next_runs() {
    let l = lab();
    l.env.ok(&add_rule(
        "r1",
        "web",
        &[
            "--schedule",
            "full weekly on sun at 01:00",
            "--schedule",
            "inc weekly on mon-sat at 01:00",
            "--retention",
            "2",
        ],
    ));
    let r = l.env.json(&["rule", "show", "r1"]);
    let crons: Vec<String> = r["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["cron"].as_array().unwrap().clone())
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert!(crons.contains(&"0 1 * * 0".to_string()), "{crons:?}");
    assert!(
        crons
            .iter()
            .any(|c| c == "0 1 * * 1-6" || c == "0 1 * * 1,2,3,4,5,6"),
        "{crons:?}"
    );
    assert_eq!(r["next_runs"].as_array().unwrap().len(), 5);
    let text = l.env.ok(&["rule", "show", "r1"]);
    assert!(text.contains("next runs:"), "{text}");
}

#[test]
fn r15_retention_is_0_to_64_and_periodic_only() {
    let l = lab();
    l.env.refused(
        &add_rule("r1", "web", &["--schedule", DAILY, "--retention", "65"]),
        &["--retention", "65", "R15"],
    );
    let at = (Local::now() + Duration::days(1))
        .format("%Y-%m-%d 03:00")
        .to_string();
    l.env.fails(
        2,
        &add_rule("r1", "web", &["--once", &at, "--retention", "3"]),
    );
    l.env.ok(&add_rule(
        "r1",
        "web",
        &["--schedule", DAILY, "--retention", "64"],
    ));
    l.env.refused(
        &["rule", "edit", "r1", "--retention", "99"],
        &["--retention", "R15"],
    );
}

#[test]
fn r22_at_most_two_schedules() {
    let l = lab();
    l.env.refused(
        &add_rule(
            "r1",
            "web",
            &[
                "--schedule",
                "full daily at 01:00",
                "--schedule",
                "inc daily at 12:00",
                "--schedule",
                "inc daily at 18:00",
            ],
        ),
        &["--schedule", "R22"],
    );
}

#[test]
fn r23_never_inc_and_diff_together() {
    let l = lab();
    l.env.refused(
        &add_rule(
            "r1",
            "web",
            &[
                "--schedule",
                "inc daily at 01:00",
                "--schedule",
                "diff daily at 12:00",
            ],
        ),
        &["R23"],
    );
}

#[test]
fn r24_weekly_inc_runs_at_the_full_times() {
    let l = lab();
    l.env.refused(
        &add_rule(
            "r1",
            "web",
            &[
                "--schedule",
                "full weekly on sun at 01:00",
                "--schedule",
                "inc weekly on mon-sat at 02:00",
            ],
        ),
        &["R24"],
    );
}

#[test]
fn r25_one_period_type_per_rule() {
    let l = lab();
    l.env.refused(
        &add_rule(
            "r1",
            "web",
            &[
                "--schedule",
                "full weekly on sun at 01:00",
                "--schedule",
                "inc daily at 01:00",
            ],
        ),
        &["R25"],
    );
}

#[test]
fn r29_bandwidth_windows_parse_and_overlaps_are_refused() {
    let l = lab();
    l.env.refused(
        &add_rule(
            "r1",
            "web",
            &[
                "--schedule",
                DAILY,
                "--bandwidth",
                "mon-fri 08:00-18:00 20MiB/s",
                "--bandwidth",
                "fri 17:00-20:00 pause",
            ],
        ),
        &["overlap", "fri", "R29"],
    );
    l.env.refused(
        &add_rule(
            "r1",
            "web",
            &[
                "--schedule",
                DAILY,
                "--bandwidth",
                "mon-fri 08:00-18:00 fast",
            ],
        ),
        &["--bandwidth"],
    );
    l.env.ok(&add_rule(
        "r1",
        "web",
        &[
            "--schedule",
            DAILY,
            "--bandwidth",
            "mon-fri 08:00-18:00 20MiB/s",
            "--bandwidth",
            "sat,sun 00:00-24:00 pause",
        ],
    ));
    let r = l.env.json(&["rule", "show", "r1"]);
    assert_eq!(r["bandwidth"].as_array().unwrap().len(), 2);
}

#[test]
fn r34_edit_changes_only_policy_and_bandwidth() {
    let l = lab();
    l.env.ok(&add_rule(
        "r1",
        "web",
        &["--schedule", DAILY, "--retention", "3"],
    ));
    l.env
        .refused(&["rule", "edit", "r1"], &["nothing to change", "R34"]);
    l.env.fails(2, &["rule", "edit", "r1", "--target", "t1"]);
    l.env.ok(&["rule", "edit", "r1", "--retention", "7"]);
    let r = l.env.json(&["rule", "show", "r1"]);
    assert_eq!(r["policy"]["retention"], 7);
    assert_eq!(r["schedules"][0]["spec"], DAILY);
    l.env.ok(&[
        "rule",
        "edit",
        "r1",
        "--schedule",
        "full daily at 02:30",
        "--bandwidth",
        "mon 01:00-02:00 pause",
    ]);
    let r = l.env.json(&["rule", "show", "r1"]);
    assert_eq!(r["schedules"][0]["spec"], "full daily at 02:30");
    assert_eq!(r["bandwidth"][0], "mon 01:00-02:00 pause");
    // Added VMs inherit the rule's settings and policy.
    l.env.ok(&["rule", "add-vm", "r1", "--vm", "db"]);
    assert_eq!(
        l.env.json(&["rule", "show", "r1"])["vms"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn r35_vm_in_one_rule_only_and_listings_mark_it() {
    let l = lab();
    l.env.ok(&add_rule("r1", "web", &["--schedule", DAILY]));
    l.env.refused(
        &add_rule("r2", "web", &["--schedule", DAILY]),
        &["web", "r1", "R35"],
    );
    l.env.ok(&add_rule("r2", "db", &["--schedule", DAILY]));
    l.env
        .refused(&["rule", "add-vm", "r2", "--vm", "web"], &["web", "R35"]);
    let text = l.env.ok(&["platform", "vms", "lab"]);
    assert!(
        text.lines()
            .any(|line| line.starts_with("web") && line.contains("in rule r1")),
        "{text}"
    );
    let vms = l.env.json(&["platform", "vms", "lab"]);
    let web = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "web")
        .unwrap();
    assert_eq!(web["rule"], "r1");
}

#[test]
fn r37_rule_with_a_running_restore_or_recovery_cannot_be_removed() {
    let l = lab();
    l.env.ok(&add_rule("r1", "web", &["--schedule", DAILY]));
    let conn = rusqlite::Connection::open(&l.env.state).unwrap();
    // A restore, then a recovery, in progress, as the runner records them: busy
    // (exit 4), naming the kind and the task, nothing changed.
    for kind in ["restore", "recovery", "migration"] {
        conn.execute(
            "INSERT INTO tasks (kind, rule, vm, state, pid, created_at) VALUES (?1, 'r1', 'web', 'running', ?2, '2026-01-01T00:00:00Z')",
            rusqlite::params![kind, std::process::id()],
        )
        .unwrap();
        let before = l.env.dump();
        let err = l.env.fails(4, &["rule", "remove", "r1"]);
        assert!(
            err.contains(&format!("{kind} in progress")) && err.contains("R37"),
            "{err}"
        );
        assert_eq!(before, l.env.dump());
        conn.execute("UPDATE tasks SET state = 'completed'", [])
            .unwrap();
    }
    l.env.ok(&["rule", "remove", "r1"]);
    l.env.fails(2, &["rule", "show", "r1"]);
}

#[test]
fn platform_and_target_in_use_cannot_be_removed() {
    let l = lab();
    l.env.ok(&add_rule("r1", "web", &["--schedule", DAILY]));
    l.env
        .refused(&["platform", "remove", "lab"], &["lab", "r1"]);
    l.env.refused(&["target", "remove", "t1"], &["t1", "r1"]);
    l.env.ok(&["rule", "remove", "r1"]);
    l.env.ok(&["target", "remove", "t1"]);
    l.env.ok(&["platform", "remove", "lab"]);
    assert_eq!(
        l.env.json(&["platform", "list"]).as_array().unwrap().len(),
        0
    );
}

#[test]
fn target_path_must_exist() {
    let l = lab();
    l.env.refused(
        &[
            "target",
            "add",
            "t2",
            "--path",
            l.env.path("missing").to_str().unwrap(),
        ],
        &["--path", "existing directory"],
    );
}

#[test]
fn start_stop_and_per_vm_state() {
    let l = lab();
    l.env.ok(&add_rule("r1", "web,db", &["--schedule", DAILY]));
    l.env.ok(&["rule", "stop", "r1", "--vm", "db"]);
    let r = l.env.json(&["rule", "show", "r1"]);
    let st = |vm: &str| {
        r["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == vm)
            .unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        (st("web"), st("db")),
        ("idle".to_string(), "stopped".to_string())
    );
    l.env
        .refused(&["rule", "stop", "r1", "--vm", "nope"], &["--vm", "nope"]);
    l.env.ok(&["rule", "remove", "r1", "--vm", "db"]);
    assert_eq!(
        l.env.json(&["rule", "show", "r1"])["vms"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn state_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let l = lab();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&l.env.state), 0o600);
    assert_eq!(mode(l.env.state.parent().unwrap()), 0o700);
}

#[test]
fn concurrent_invocations_never_corrupt_state_and_r35_holds() {
    let l = lab();
    // Eight processes race to put the same VM into eight different rules, and
    // eight more add distinct targets at the same time.
    let spawn = |args: Vec<String>| {
        let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmbackup"));
        c.env("VMBACKUP_STATE", &l.env.state)
            .env("VMBACKUP_CONFIG", &l.env.config)
            .args(args);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut kids = Vec::new();
    for i in 0..8 {
        kids.push(spawn(
            add_rule(&format!("race{i}"), "web", &["--schedule", DAILY])
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ));
        let dir = l.env.path(&format!("t{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        kids.push(spawn(vec![
            "target".into(),
            "add".into(),
            format!("tt{i}"),
            "--path".into(),
            dir.to_str().unwrap().into(),
        ]));
    }
    let codes: Vec<i32> = kids
        .into_iter()
        .map(|mut k| k.wait().unwrap().code().unwrap())
        .collect();
    let rule_wins = codes.iter().step_by(2).filter(|&&c| c == 0).count();
    assert_eq!(rule_wins, 1, "exactly one rule may take VM web: {codes:?}");
    assert!(
        codes.iter().step_by(2).all(|&c| c == 0 || c == 2),
        "{codes:?}"
    );
    assert!(
        codes.iter().skip(1).step_by(2).all(|&c| c == 0),
        "{codes:?}"
    );
    assert_eq!(l.env.json(&["target", "list"]).as_array().unwrap().len(), 9);
    let conn = rusqlite::Connection::open(&l.env.state).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

#[test]
fn r43_vm_with_a_read_only_disk_is_refused_at_rule_admission() {
    let l = lab();
    let _mixed = l.env.vm(
        "mixed",
        &[
            DiskSpec::qcow2("disk0", 8 * MIB),
            DiskSpec::qcow2_read_only("iso0", 4 * MIB),
        ],
        false,
    );
    l.env.ok(&["platform", "refresh", "lab"]);

    // `platform vms` marks the read-only disk, and only it.
    let vms = l.env.json(&["platform", "vms", "lab"]);
    let mixed = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "mixed")
        .expect("mixed listed after refresh");
    let disk = |node: &str| {
        mixed["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["node"] == node)
            .unwrap_or_else(|| panic!("no disk {node}: {mixed}"))
            .clone()
    };
    assert_eq!(disk("iso0")["uncoverable"], "read-only disk", "{mixed}");
    assert!(disk("disk0")["uncoverable"].is_null(), "{mixed}");
    let text = l.env.ok(&["platform", "vms", "lab"]);
    assert!(
        text.lines().any(|line| line.contains("iso0")
            && line.contains("not coverable")
            && line.contains("R43")),
        "{text}"
    );
    assert!(
        !text
            .lines()
            .any(|line| line.contains("mixed") && line.contains("not coverable")),
        "the writable disk0 row is not marked:\n{text}"
    );

    // `rule add`: alone, and next to an admissible VM (all or nothing).
    let needles = ["mixed", "iso0", "R43"];
    l.env
        .refused(&add_rule("r1", "mixed", &["--schedule", DAILY]), &needles);
    l.env.refused(
        &add_rule("r1", "web,mixed", &["--schedule", DAILY]),
        &needles,
    );

    // `rule add-vm`: alone, and after an admissible VM in the same command.
    l.env.ok(&add_rule("r1", "web", &["--schedule", DAILY]));
    l.env
        .refused(&["rule", "add-vm", "r1", "--vm", "mixed"], &needles);
    l.env.refused(
        &["rule", "add-vm", "r1", "--vm", "db", "--vm", "mixed"],
        &needles,
    );
    let vms = l.env.json(&["rule", "show", "r1"])["vms"].clone();
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
}

#[test]
fn r10_quiesce_mode_is_stored_bare_means_require() {
    let l = lab();
    l.env
        .ok(&add_rule("r1", "web", &["--schedule", DAILY, "--quiesce"]));
    assert_eq!(l.env.json(&["rule", "show", "r1"])["quiesce"], "require");
    l.env.refused(
        &add_rule("r2", "db", &["--schedule", DAILY, "--quiesce=sometimes"]),
        &["--quiesce", "sometimes"],
    );
    l.env.ok(&add_rule(
        "r2",
        "db",
        &["--schedule", DAILY, "--quiesce=try"],
    ));
    assert_eq!(l.env.json(&["rule", "show", "r2"])["quiesce"], "try");
}

#[test]
fn r31_vm_state_is_unknown_while_the_target_cannot_be_reached() {
    let l = lab();
    l.env.ok(&add_rule("r1", "web", &["--schedule", DAILY]));
    let state = |env: &Env| {
        env.json(&["rule", "show", "r1"])["vms"][0]["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(state(&l.env), "idle");
    let target = l.env.path("target");
    let aside = l.env.path("target-away");
    std::fs::rename(&target, &aside).unwrap(); // e.g. an unmounted NFS target
    assert_eq!(state(&l.env), "unknown");
    std::fs::rename(&aside, &target).unwrap();
    assert_eq!(state(&l.env), "idle");
    l.env.ok(&["rule", "stop", "r1"]);
    assert_eq!(state(&l.env), "stopped");
}
