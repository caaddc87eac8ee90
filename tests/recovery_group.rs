//! Group restore and recovery of a whole rule (R34), and the prune protection
//! of points that recoveries serve (issue 11 with issue 7's prune/forget).
//! VMs are qemu-storage-daemon instances with shadow files as oracles.

mod common;

use std::fs;
use std::process::Output;

use common::json_doc::{assert_documented, recover_doc};
use common::*;
use serde_json::Value;

/// Three VMs `a`, `b`, `c` (two disks for `b`) in rule `g`, each with its own data.
fn three_vms(env: &Env) -> Vec<TestVm> {
    fs::write(&env.config, "bk_tsk_thd = 2\ni2vp_transbuffer = 1M\n").unwrap();
    let a = env.vm("a", &[DiskSpec::qcow2("vda", 4 * MIB)], true);
    let b = env.vm(
        "b",
        &[
            DiskSpec::qcow2("vda", 4 * MIB),
            DiskSpec::raw("vdb", 2 * MIB),
        ],
        true,
    );
    let c = env.vm("c", &[DiskSpec::qcow2("vda", 8 * MIB)], true);
    a.write_random("vda", 0, 256 * 1024, 1);
    b.write_random("vda", MIB, 512 * 1024, 2);
    b.write("vdb", 0, 64 * 1024, 0x42);
    c.write_random("vda", 5 * MIB, MIB, 3);
    env.add_lab("t");
    env.add_rule("g", "lab", "a,b,c", "t", &["--once", "2099-01-01 00:00"]);
    vec![a, b, c]
}

/// `vmbackup --json ARGS`: its output and its summary line.
fn json_lines(env: &Env, args: &[&str]) -> (Output, Value) {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = env.cmd().args(&a).output().unwrap();
    let doc = summary(&out);
    assert_documented(
        &format!("vmbackup {}", args[0]),
        &String::from_utf8_lossy(&out.stdout),
    );
    (out, doc)
}

/// The `{"type":"summary"}` line of a task-running command's JSON lines.
fn summary(out: &Output) -> Value {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "summary")
        .unwrap_or_else(|| {
            panic!(
                "no summary line: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

#[test]
fn r34_restore_and_recover_a_whole_rule() {
    let env = Env::new();
    let vms = three_vms(&env);
    env.ok(&["run-now", "g", "--level", "full"]);

    // restore --all: each VM's latest point into DIR/<VM>/, one summary.
    let to = env.path("group");
    let (out, doc) = json_lines(
        &env,
        &["restore", "g", "--all", "--to", to.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{doc}");
    assert_eq!(doc["exit_code"], 0, "{doc}");
    let tasks = doc["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3, "{doc}");
    assert!(
        tasks
            .iter()
            .all(|t| t["kind"] == "restore" && t["status"] == "completed"),
        "{doc}"
    );
    assert_eq!(doc["vms_without_point"], serde_json::json!([]), "{doc}");
    for vm in &vms {
        for d in &vm.disks {
            let file = to.join(&vm.name).join(format!("{}.raw", d.node));
            assert_eq!(
                file_digest(&file),
                vm.shadow_digest(&d.node),
                "{} disk {}",
                vm.name,
                d.node
            );
        }
    }

    // --at before every point: nothing to restore, each VM named, exit 3.
    let none = env.path("none");
    let (out, doc) = json_lines(
        &env,
        &[
            "restore",
            "g",
            "--all",
            "--at",
            "2000-01-01 00:00",
            "--to",
            none.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(doc["vms_without_point"], serde_json::json!(["a", "b", "c"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no restore point at or before"));
    // --all with --vm or --point: a usage error, nothing recorded.
    env.refused(
        &["restore", "g", "--all", "--vm", "a", "--to", "/tmp/x"],
        &["--all", "--vm"],
    );

    // recover --all: a transient recovery per VM, each export equal to its disk.
    let out = env
        .cmd()
        .args(["--json", "recover", "g", "--all", "--transient"])
        .output()
        .unwrap();
    let doc: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(out.status.code(), Some(0), "{doc}");
    assert_documented("vmbackup recover", &String::from_utf8_lossy(&out.stdout));
    let tasks = doc["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3, "{doc}");
    let mut ids = Vec::new();
    for t in tasks {
        assert_eq!(t["kind"], "recovery", "{t}");
        assert_eq!(t["status"], "running", "{t}");
        let vm = vms.iter().find(|v| v.name == t["vm"]).unwrap();
        let rep = &t["outcome"];
        // qemu-storage-daemon has no guest to start: the command line is refused, the
        // export is served.
        assert!(rep["command_line"].is_null(), "{rep}");
        assert!(
            rep["command_line_error"]
                .as_str()
                .unwrap()
                .contains("not qemu-system"),
            "{rep}"
        );
        for d in rep["disks"].as_array().unwrap() {
            let copy = env.path(&format!(
                "copy-{}-{}.raw",
                vm.name,
                d["disk"].as_str().unwrap()
            ));
            run(
                "nbdcopy",
                &[d["uri"].as_str().unwrap(), copy.to_str().unwrap()],
            );
            assert_eq!(
                file_digest(&copy),
                vm.shadow_digest(d["disk"].as_str().unwrap()),
                "{rep}"
            );
        }
        ids.push(rep["recovery"].as_i64().unwrap());
    }
    let list = recover_doc(&env, &["recover", "list"]);
    assert_eq!(list["recoveries"].as_array().unwrap().len(), 3, "{list}");
    for id in ids {
        env.ok(&["recover", "stop", &id.to_string()]);
    }
    assert_eq!(
        recover_doc(&env, &["recover", "list"])["recoveries"],
        serde_json::json!([])
    );
    drop(vms);
}

#[test]
fn a_served_point_is_kept_by_prune_and_forget_even_while_its_server_is_down() {
    let env = Env::new();
    let vm = env.vm("vm1", &[DiskSpec::qcow2("vda", 2 * MIB)], true);
    env.add_lab("t");
    env.add_rule(
        "r",
        "lab",
        "vm1",
        "t",
        &["--schedule", "full daily at 01:00", "--retention", "1"],
    );
    let mut points = Vec::new();
    for (day, seed) in [("2026-11-29", 1), ("2026-11-30", 2), ("2026-12-01", 3)] {
        vm.write_random("vda", 0, 64 * 1024, seed);
        let out = env.run_at(
            &format!("{day} 01:00:00"),
            &["run-now", "r", "--level", "full"],
        );
        assert!(out.status.success(), "{out:?}");
    }
    for p in env
        .json(&["points", "r", "--vm", "vm1"])
        .as_array()
        .unwrap()
    {
        points.push(p["point"].as_str().unwrap().to_string());
    }
    assert_eq!(points.len(), 3);
    let oldest = points[0].clone();
    let doc: Value = serde_json::from_str(
        env.ok(&[
            "--json",
            "recover",
            "r",
            "--vm",
            "vm1",
            "--point",
            &oldest,
            "--transient",
        ])
        .trim(),
    )
    .unwrap();
    let rep = &doc["tasks"][0]["outcome"];
    let id = rep["recovery"].as_i64().unwrap();
    let task = rep["task"].as_i64().unwrap();

    // The recovery task reads it: forget refuses, prune keeps it.
    let err = env.fails(4, &["forget", "r", "--vm", "vm1", "--point", &oldest]);
    assert!(
        err.contains(&format!("read by recovery task {task}")),
        "{err}"
    );
    let prune = |now: &str, extra: &[&str]| -> Value {
        let mut args = vec!["--json", "prune", "r"];
        args.extend_from_slice(extra);
        let out = env.run_at(now, &args);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let mark = |doc: &Value| -> (String, String) {
        let p = doc["vms"][0]["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["point"] == oldest.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{doc}"));
        (
            p["action"].as_str().unwrap().to_string(),
            p["reason"].as_str().unwrap().to_string(),
        )
    };
    let (action, reason) = mark(&prune("2026-12-10 00:00:00", &["--dry-run"]));
    assert_eq!(action, "keep", "{reason}");
    assert!(reason.contains("read by recovery task"), "{reason}");

    // Its server dies: the task ends interrupted, the recovery still keeps it.
    let server = rep["server_pid"].as_i64().unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &server.to_string()])
        .status()
        .unwrap();
    wait_for(
        || !std::path::Path::new(&format!("/proc/{server}")).exists(),
        "the server's end",
    );
    env.ok(&["task", "list"]); // reclaims the dead server's task
    let err = env.fails(4, &["forget", "r", "--vm", "vm1", "--point", &oldest]);
    assert!(err.contains(&format!("served by recovery {id}")), "{err}");
    let doc = prune("2026-12-10 00:00:00", &[]);
    let (action, reason) = mark(&doc);
    assert_eq!(action, "keep", "{reason}");
    assert!(
        reason.contains(&format!("served by recovery {id}")),
        "{reason}"
    );
    assert!(env
        .json(&["points", "r", "--vm", "vm1"])
        .to_string()
        .contains(&oldest));

    // Stopped: nothing holds it any more.
    env.ok(&["recover", "stop", &id.to_string()]);
    env.ok(&["forget", "r", "--vm", "vm1", "--point", &oldest]);
    assert!(!env
        .json(&["points", "r", "--vm", "vm1"])
        .to_string()
        .contains(&oldest));
    drop(vm);
}
