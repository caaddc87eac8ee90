//! What people see of running and finished tasks: progress lines when stderr is
//! not a terminal, two live bars on a terminal (a pseudo-terminal from
//! `script`), the result line's times, a task log that tells the story of a
//! backup and of a restore (R32), `logs --since/-n/--task`, and `-v` showing QMP
//! and NBD detail with secrets redacted.

mod common;

use std::process::Command;

use common::{DiskSpec, Env, TestVm, MIB};

/// `(task id, kind, status)` of every task, oldest first.
fn tasks(env: &Env) -> Vec<(i64, String, String)> {
    let list = env.json(&["task", "list", "--all"]);
    let mut out: Vec<(i64, String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_i64().unwrap(),
                t["kind"].as_str().unwrap().to_string(),
                t["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.reverse();
    out
}

fn lab(vms: &[&str], rule_extra: &[&str]) -> (Env, Vec<TestVm>) {
    let env = Env::new();
    // Small chunks: progress advances in 256 KiB steps.
    std::fs::write(&env.config, "i2vp_transbuffer = 256K\n").unwrap();
    let vms: Vec<TestVm> = vms
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let vm = env.vm(name, &[DiskSpec::qcow2("vda", 16 * MIB)], true);
            vm.write_random("vda", 0, 8 * MIB, 10 + i as u64);
            vm
        })
        .collect();
    env.add_lab("t1");
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    let mut extra = vec!["--once", "2030-01-01 00:00"];
    extra.extend_from_slice(rule_extra);
    env.add_rule("r", "lab", &names.join(","), "t1", &extra);
    (env, vms)
}

#[test]
fn piped_run_prints_progress_lines_and_the_log_tells_the_story() {
    let (env, _vms) = lab(&["p1"], &["--bandwidth", "mon-sun 00:00-24:00 8MiB/s"]);
    let out = env
        .cmd()
        .args(["run-now", "r", "--level", "full"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // `p1/vda 40% 3.2MiB of 8MiB 8MiB/s (limit 8MiB/s) eta 1s`, stamped.
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("vmbackup: p1/vda "))
        .collect();
    let percents: Vec<u64> = lines
        .iter()
        .map(|l| {
            let after = l.split("p1/vda ").nth(1).unwrap();
            after.split('%').next().unwrap().parse().unwrap()
        })
        .collect();
    assert!(percents.len() >= 4, "{err}");
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?}");
    assert_eq!(percents.last(), Some(&100), "{err}");
    assert!(
        percents.iter().any(|p| (1..100).contains(p)),
        "{percents:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l.contains(" of 8MiB ") && l.contains("/s")),
        "{err}"
    );
    assert!(lines.iter().any(|l| l.contains(" eta ")), "{err}");
    // Each line carries the time: `2026-12-03 09:30:00.123 +01:00 vmbackup: ...`.
    assert!(
        lines
            .iter()
            .all(|l| l.as_bytes()[4] == b'-' && l.contains(" vmbackup: ")),
        "{err}"
    );
    // The result line has the start, the duration and the rate.
    let result = stdout
        .lines()
        .find(|l| l.starts_with("p1: full point"))
        .expect(&stdout);
    assert!(
        result.contains("; started ") && result.contains(", took ") && result.ends_with("/s"),
        "{result}"
    );

    // -q: no progress lines, the result still on stdout.
    let out = env
        .cmd()
        .args(["-q", "run-now", "r", "--level", "inc"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("p1/vda"));

    // The backup's log: start, every phase, the plan, the disk, the end.
    let (backup, _, _) = tasks(&env)[0].clone();
    let log = env.ok(&["logs", "r", "--task", &backup.to_string()]);
    let want = [
        "backup started: level full requested (run now)",
        "phase: preparing",
        "phase: backing up VM configuration",
        "phase: querying changed data",
        ": full of every allocated block, 1 disk(s)",
        "phase: checking data",
        "phase: running",
        "disk vda: size 16MiB, 8MiB allocated; read 8MiB, stored",
        "full point ",
        "task completed after ",
    ];
    let mut at = 0;
    for w in want {
        let found = log[at..]
            .find(w)
            .unwrap_or_else(|| panic!("{w:?} not in order in:\n{log}"));
        at += found + w.len();
    }
    // The inc says what changed.
    let (inc, _, _) = tasks(&env)[1].clone();
    let log = env.ok(&["logs", "r", "--task", &inc.to_string()]);
    assert!(
        log.contains("inc against point") && log.contains("changed ("),
        "{log}"
    );

    // A restore is logged too, and so is a restore that fails.
    let dest = env.path("restored");
    env.ok(&["restore", "r", "--vm", "p1", "--to", dest.to_str().unwrap()]);
    env.fails(
        2,
        &["restore", "r", "--vm", "p1", "--to", dest.to_str().unwrap()],
    );
    let all = tasks(&env);
    let restores: Vec<i64> = all
        .iter()
        .filter(|t| t.1 == "restore")
        .map(|t| t.0)
        .collect();
    assert_eq!(restores.len(), 2, "{all:?}");
    let log = env.ok(&["logs", "r", "--task", &restores[0].to_string()]);
    for w in [
        "restore started: point ",
        "disk vda -> ",
        "task completed after ",
    ] {
        assert!(log.contains(w), "{w:?} in {log}");
    }
    let log = env.ok(&["logs", "r", "--task", &restores[1].to_string()]);
    assert!(
        log.contains("error") && log.contains("--force") && log.contains("task failed"),
        "{log}"
    );

    // --since, -n, and --task of another rule.
    assert_eq!(env.ok(&["logs", "r", "-n", "2"]).lines().count(), 2);
    assert!(env.ok(&["logs", "r", "--since", "1h"]).lines().count() > 20);
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    assert_eq!(
        env.ok(&["logs", "r", "--since", &future]).lines().count(),
        0
    );
    env.refused(&["logs", "r", "--since", "soon"], &["--since", "RFC 3339"]);
    let json: Vec<serde_json::Value> = env
        .ok(&["--json", "logs", "r", "-n", "1"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json.len(), 1);
    assert!(json[0]["time"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn logs_refuses_a_task_of_another_rule() {
    let env = Env::new();
    let _a = env.vm("a1", &[DiskSpec::qcow2("vda", 4 * MIB)], true);
    let _b = env.vm("b1", &[DiskSpec::qcow2("vda", 4 * MIB)], true);
    env.add_lab("t1");
    env.add_rule("ra", "lab", "a1", "t1", &["--once", "2030-01-01 00:00"]);
    env.add_rule("rb", "lab", "b1", "t1", &["--once", "2030-01-01 00:00"]);
    env.ok(&["run-now", "ra", "--level", "full"]);
    let id = tasks(&env)[0].0.to_string();
    env.refused(&["logs", "rb", "--task", &id], &["--task", "rule 'ra'"]);
    env.refused(
        &["logs", "ra", "--task", "999"],
        &["--task", "no such task"],
    );
    assert!(env
        .ok(&["logs", "ra", "--task", &id])
        .contains("backup started"));
}

#[test]
fn two_vms_on_a_terminal_show_two_live_bars() {
    let (env, _vms) = lab(
        &["t1vm", "t2vm"],
        &["--bandwidth", "mon-sun 00:00-24:00 4MiB/s"],
    );
    let bin = assert_cmd::cargo::cargo_bin("vmbackup");
    let cmd = format!("{} run-now r --level full", bin.display());
    let out = Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .env("VMBACKUP_STATE", &env.state)
        .env("VMBACKUP_CONFIG", &env.config)
        .env("TERM", "xterm")
        .env("COLUMNS", "160")
        .env("LINES", "40")
        .output()
        .expect("script (util-linux) runs the command under a pseudo-terminal");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}");
    // Every redraw writes all bars; one frame with both bars part-way through
    // shows both are live at once.
    let frames: Vec<&str> = text.split("\u{1b}[").collect();
    let percent = |line: &str, vm: &str| -> Option<u64> {
        let at = line.find(&format!("{vm}/vda"))?;
        let rest = &line[at..];
        let close = rest.find("] ")?;
        rest[close + 2..]
            .trim_start()
            .split('%')
            .next()?
            .trim()
            .parse()
            .ok()
    };
    let mut both_live = false;
    for w in text.split('\n').collect::<Vec<_>>().windows(2) {
        let (a, b) = (w[0], w[1]);
        let pa = percent(a, "t1vm").or_else(|| percent(b, "t1vm"));
        let pb = percent(b, "t2vm").or_else(|| percent(a, "t2vm"));
        if let (Some(x), Some(y)) = (pa, pb) {
            if (1..100).contains(&x) && (1..100).contains(&y) {
                both_live = true;
            }
        }
    }
    assert!(
        both_live,
        "no frame with two live bars ({} escape frames):\n{text}",
        frames.len()
    );
    // Bars carry the phase, bytes, rate, elapsed time and ETA.
    assert!(
        text.contains("running") && text.contains("MiB/s") && text.contains("eta "),
        "{text}"
    );
}

#[test]
fn verbose_shows_qmp_and_nbd_detail_with_secrets_redacted() {
    let env = Env::new();
    let vm = TestVm::start_with(
        &env.qmp_dir,
        &env.path("vms/s1"),
        "s1",
        &[DiskSpec::qcow2("vda", 4 * MIB)],
        true,
        &["--object", "secret,id=sec0,data=TOPSECRET42"],
    );
    vm.write_random("vda", 0, MIB, 4);
    env.add_lab("t1");
    env.add_rule("r", "lab", "s1", "t1", &["--once", "2030-01-01 00:00"]);
    let out = env
        .cmd()
        .args(["-v", "run-now", "r", "--level", "full"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "debug: QMP ",
        "-> query-named-block-nodes",
        "<- query-named-block-nodes: {",
        "-> transaction {",
        "debug: NBD export '",
        "structured replies true",
        "debug: disk 'vda': 4194304 bytes;",
        "debug: VM 's1' configuration: ",
        "secret,id=sec0,data=<redacted>",
    ] {
        assert!(err.contains(want), "{want:?} not in:\n{err}");
    }
    assert!(!err.contains("TOPSECRET42"), "the secret leaked:\n{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("TOPSECRET42"));
    // Without -v: no debug lines.
    let out = env
        .cmd()
        .args(["run-now", "r", "--level", "inc"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("debug:"));
}
