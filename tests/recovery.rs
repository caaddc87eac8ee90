//! Recovery against real QEMU (issue 11, R32, R37, R38): a point served by
//! vmbackup's own NBD server equals the point (nbdcopy, digest) for a full, an
//! incremental and a differential; a VM started on overlays reads the point and
//! its writes land in its overlay (read with qemu-img while it runs and after it
//! quit) while the repository stays unchanged; recover list/stop; instant
//! recovery ends with the VM on new images equal to the point plus the writes
//! made during the mirror; the process driving the mirror killed mid-mirror,
//! then `recover resume`, and `recover abort`; a restarted server is picked up
//! by QEMU's reconnect-delay; in-place restore is refused while the image is
//! open and followed by a full.
//!
//! VMs are qemu-system under TCG with no OS (SeaBIOS finds nothing to boot);
//! their disks are written through HMP `qemu-io` on the guest device and read
//! from outside through NBD exports of their nodes (tests/common/system_vm.rs).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::json_doc::recover_doc;
use common::system_vm::{
    export_digest, hmp_qemu_io, image_digest, patched_digest, SystemVm, VmOptions,
};
use common::*;
use serde_json::Value;

/// The point restored with `restore --to`, its digest.
fn restored_digest(env: &Env, rule: &str, vm: &str, point: &str) -> String {
    let to = env.path(&format!("restored-{vm}-{point}"));
    env.ok(&[
        "restore",
        rule,
        "--vm",
        vm,
        "--point",
        point,
        "--to",
        to.to_str().unwrap(),
    ]);
    file_digest(&to.join("vda.raw"))
}

/// Every object of the target, hashed: "the repository is unchanged".
fn repo_digest(env: &Env) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . -type f | sort | xargs cat | b2sum",
            env.path("target").display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn points(env: &Env, rule: &str, vm: &str) -> Vec<String> {
    env.json(&["points", rule, "--vm", vm])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["point"].as_str().unwrap().to_string())
        .collect()
}

fn recover_json(env: &Env, args: &[&str]) -> Value {
    let mut a = vec!["recover"];
    a.extend_from_slice(args);
    recover_doc(env, &a)
}

/// `recover list --all` entry of recovery `id`.
fn recovery(env: &Env, id: i64) -> Value {
    let list = recover_doc(env, &["recover", "list", "--all"]);
    list["recoveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no recovery {id}: {list}"))
}

/// Data allocated in an overlay itself (not in its backing): (offset, length).
fn overlay_data(overlay: &Path) -> Vec<(u64, u64)> {
    let map = run(
        "qemu-img",
        &["map", "-U", "--output=json", overlay.to_str().unwrap()],
    );
    serde_json::from_str::<Vec<Value>>(&map)
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn pid_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn transient_recovery_serves_every_level_byte_exact_and_a_started_vm_writes_to_its_overlay() {
    let env = Env::new();
    let vm = SystemVm::start(
        &env,
        "web",
        16 * MIB,
        &VmOptions {
            nic: true,
            ..VmOptions::default()
        },
    );
    vm.write(0, MIB, 0x11);
    vm.write(5 * MIB, 300 * 1024, 0x22);
    env.add_lab("t1");
    env.add_rule("r1", "lab", "web", "t1", &["--once", "2099-01-01 00:00"]);
    let mut expected = Vec::new();
    env.ok(&["run-now", "r1", "--level", "full"]);
    expected.push(vm.keep_shadow("full"));
    vm.write(64 * 1024, 64 * 1024, 0x33);
    vm.write(9 * MIB, 4096, 0x44);
    env.ok(&["run-now", "r1", "--level", "inc"]);
    expected.push(vm.keep_shadow("inc"));
    vm.write(12 * MIB, 128 * 1024, 0x55);
    env.ok(&["run-now", "r1", "--level", "diff"]);
    expected.push(vm.keep_shadow("diff"));
    let ids = points(&env, "r1", "web");
    assert_eq!(ids.len(), 3);
    let repo_before = repo_digest(&env);

    let mut recoveries = Vec::new();
    for (point, shadow) in ids.iter().zip(&expected) {
        let want = file_digest(shadow);
        assert_eq!(restored_digest(&env, "r1", "web", point), want);
        let doc = recover_json(
            &env,
            &["r1", "--vm", "web", "--point", point, "--transient"],
        );
        assert_eq!(doc["exit_code"], 0, "{doc}");
        let task = &doc["tasks"][0];
        assert_eq!(task["status"], "running", "{doc}");
        let rep = &task["outcome"];
        let uri = rep["disks"][0]["uri"].as_str().unwrap();
        let overlay = PathBuf::from(rep["disks"][0]["overlay"].as_str().unwrap());
        assert!(rep["command_line"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().contains("vda.overlay.qcow2")));
        let copy = env.path(&format!("copy-{point}.raw"));
        run("nbdcopy", &[uri, copy.to_str().unwrap()]);
        assert_eq!(file_digest(&copy), want, "export of point {point}");
        // The overlay reads as the point too (QEMU's NBD driver as its backing).
        let scratch = env.path("scratch.raw");
        assert_eq!(image_digest(&overlay, &scratch), want, "overlay of {point}");
        recoveries.push(rep["recovery"].as_i64().unwrap());
    }

    // A VM started from the captured configuration reads the full point through
    // overlay + export; its writes go to its overlay; the repository is never written.
    let doc = recover_json(
        &env,
        &[
            "r1",
            "--vm",
            "web",
            "--point",
            &ids[0],
            "--transient",
            "--start",
            "--name",
            "web-copy",
            "--accel",
            "tcg",
        ],
    );
    let rep = &doc["tasks"][0]["outcome"];
    let started = rep["recovery"].as_i64().unwrap();
    let qmp = PathBuf::from(rep["started_vm"]["qmp"].as_str().unwrap());
    let overlay = PathBuf::from(rep["disks"][0]["overlay"].as_str().unwrap());
    let names = qmp_session(&qmp, &[r#"{"execute":"query-name"}"#]);
    assert_eq!(names[0]["return"]["name"], "web-copy");
    let blocks = qmp_session(&qmp, &[r#"{"execute":"query-block"}"#]);
    assert_eq!(
        blocks[0]["return"][0]["inserted"]["file"],
        overlay.to_str().unwrap()
    );
    let scratch = env.path("scratch.raw");
    let full = file_digest(&expected[0]);
    assert_eq!(export_digest(&qmp, "disk0", &env.path("")), full);
    assert!(overlay_data(&overlay).is_empty(), "reads wrote the overlay");
    hmp_qemu_io(&qmp, "write -P 0x77 2M 64k");
    hmp_qemu_io(&qmp, "flush");
    let written = patched_digest(
        &expected[0],
        &env.path("full+write.raw"),
        &[(2 * MIB, 64 * 1024, 0x77)],
    );
    assert_eq!(export_digest(&qmp, "disk0", &env.path("")), written);
    // From outside QEMU, after the flush: the overlay holds exactly the write.
    assert_eq!(overlay_data(&overlay), [(2 * MIB, 64 * 1024)]);
    assert_eq!(image_digest(&overlay, &scratch), written);

    let list = recover_doc(&env, &["recover", "list"]);
    let listed = list["recoveries"].as_array().unwrap();
    assert_eq!(listed.len(), 4, "{list}");
    assert!(
        listed
            .iter()
            .all(|r| r["server_running"] == true && r["status"] == "running"),
        "{list}"
    );
    assert!(listed.iter().all(|r| r["stage"] == "serving"), "{list}");
    // Transient recovery takes no slot (R38) and its point is in its task row.
    let tasks = env.json(&["task", "list"]);
    let recov: Vec<&Value> = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "recovery")
        .collect();
    assert_eq!(recov.len(), 4, "{tasks}");
    assert!(recov.iter().all(|t| t["point"].is_string()), "{tasks}");
    // R37: the rule is held while recoveries run.
    let err = env.fails(4, &["rule", "remove", "r1"]);
    assert!(err.contains("R37"), "{err}");

    // Stopped with its overlay kept: the VM quit, and the overlay file alone
    // (no backing) holds the write.
    let stop = recover_doc(
        &env,
        &["recover", "stop", &started.to_string(), "--keep-overlays"],
    );
    assert_eq!(
        stop["kept_overlays"][0],
        overlay.to_str().unwrap(),
        "{stop}"
    );
    let alone = format!(
        "json:{}",
        serde_json::json!({"driver": "qcow2", "backing": null,
            "file": {"driver": "file", "filename": overlay}})
    );
    run(
        "qemu-img",
        &["convert", "-O", "raw", &alone, scratch.to_str().unwrap()],
    );
    let mut only_write = vec![0u8; 16 * MIB as usize];
    only_write[2 * MIB as usize..(2 * MIB + 64 * 1024) as usize].fill(0x77);
    assert_eq!(std::fs::read(&scratch).unwrap(), only_write);
    std::fs::remove_file(&overlay).unwrap();

    for id in &recoveries {
        env.ok(&["recover", "stop", &id.to_string()]);
    }
    assert!(recover_doc(&env, &["recover", "list"])["recoveries"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(repo_before, repo_digest(&env), "the repository changed");
    let all = env.json(&["task", "list", "--all"]);
    let ended: Vec<&Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "recovery")
        .collect();
    assert_eq!(ended.len(), 4, "{all}");
    assert!(
        ended
            .iter()
            .all(|t| t["state"] == "completed" || t["status"] == "completed"),
        "{all}"
    );
    drop(vm);
}

/// A rule whose transfers are limited to 1 MiB/s all week: a mirror of a few
/// MiB takes seconds, long enough to write during it and to kill its driver.
fn slow_rule(env: &Env, vm: &str) {
    env.add_rule(
        "r1",
        "lab",
        vm,
        "t1",
        &[
            "--once",
            "2099-01-01 00:00",
            "--bandwidth",
            "mon-sun 00:00-24:00 1MiB/s",
        ],
    );
}

/// `recover --instant` in the background (it returns when the migration ends).
fn spawn_instant(env: &Env, vm: &str, to: &Path, name: &str) -> Child {
    std::fs::create_dir_all(to).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("vmbackup");
    Command::new(bin)
        .env("VMBACKUP_STATE", &env.state)
        .env("VMBACKUP_CONFIG", &env.config)
        .args(["--json", "recover", "r1", "--vm", vm, "--instant", "--to"])
        .arg(to)
        .args(["--name", name, "--accel", "tcg"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait until the newest recovery migrates with its mirror job running in QEMU
/// (not yet ready); returns the recovery's id and the VM's QMP socket.
fn wait_mirroring(env: &Env, child: &mut Child) -> (i64, PathBuf) {
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            for pipe in [
                child.stdout.take().map(|p| Box::new(p) as Box<dyn Read>),
                child.stderr.take().map(|p| Box::new(p) as Box<dyn Read>),
            ]
            .into_iter()
            .flatten()
            {
                let mut p = pipe;
                let _ = p.read_to_string(&mut out);
            }
            panic!("recover --instant ended ({status}) before its mirror was seen: {out}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no mirror job within 120 s"
        );
        let list = recover_doc(env, &["recover", "list"]);
        if let Some(r) = list["recoveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["stage"] == "migrating" && r["vm_qmp"].is_string())
        {
            let qmp = PathBuf::from(r["vm_qmp"].as_str().unwrap());
            let jobs = qmp_session(&qmp, &[r#"{"execute":"query-block-jobs"}"#]);
            let running = jobs[0]["return"]
                .as_array()
                .unwrap()
                .iter()
                .any(|j| j["type"] == "mirror" && j["ready"] == false);
            if running {
                return (r["id"].as_i64().unwrap(), qmp);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn instant_recovery_moves_the_point_and_the_writes_made_during_the_mirror_to_new_images() {
    let env = Env::new();
    let vm = SystemVm::start(&env, "db", 16 * MIB, &VmOptions::default());
    vm.write(0, 2 * MIB, 0x5a);
    vm.write(12 * MIB, MIB, 0x6b);
    env.add_lab("t1");
    slow_rule(&env, "db");
    env.ok(&["run-now", "r1", "--level", "full"]);
    let point = vm.keep_shadow("full");
    let repo_before = repo_digest(&env);
    let to = env.path("production");
    let mut child = spawn_instant(&env, "db", &to, "db2");
    let (id, hidden_qmp) = wait_mirroring(&env, &mut child);
    // Writes while the mirror runs: one over data being copied, one elsewhere.
    hmp_qemu_io(&hidden_qmp, "write -P 0x99 1M 64k");
    hmp_qemu_io(&hidden_qmp, "write -P 0x98 8M 128k");
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_str(text.trim()).unwrap();
    let kinds: Vec<&str> = doc["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["recovery", "migration"], "{doc}");
    let mig = &doc["tasks"][1]["outcome"];
    let qmp = PathBuf::from(mig["qmp"].as_str().unwrap());
    assert_eq!(qmp, env.qmp_dir.join("db2.qmp"));
    let image = PathBuf::from(mig["images"][0]["path"].as_str().unwrap());
    assert_eq!(image, to.join("vda.qcow2"));
    let blocks = qmp_session(&qmp, &[r#"{"execute":"query-block"}"#]);
    assert_eq!(
        blocks[0]["return"][0]["inserted"]["file"],
        image.to_str().unwrap()
    );
    // The export is closed, the recovery migrated, the platform lists the VM.
    let r = recovery(&env, id);
    assert_eq!(r["stage"], "migrated", "{r}");
    assert_eq!(r["server_running"], false, "{r}");
    let vms = env.json(&["platform", "vms", "lab", "--refresh"]);
    assert!(vms.to_string().contains("db2"), "{vms}");
    let want = patched_digest(
        &point,
        &env.path("want.raw"),
        &[(MIB, 64 * 1024, 0x99), (8 * MIB, 128 * 1024, 0x98)],
    );
    hmp_qemu_io(&qmp, "flush");
    assert_eq!(
        image_digest(&image, &env.path("final.raw")),
        want,
        "the migrated image is not the point plus the writes made during the mirror"
    );
    assert_eq!(repo_before, repo_digest(&env), "the repository changed");
    qmp_session(&qmp, &[r#"{"execute":"quit"}"#]);
    drop(vm);
}

#[test]
fn a_killed_migration_is_finished_by_resume_or_cancelled_by_abort_while_the_vm_runs() {
    let env = Env::new();
    let vm = SystemVm::start(&env, "app", 16 * MIB, &VmOptions::default());
    vm.write(0, 3 * MIB, 0x21);
    vm.write(10 * MIB, MIB, 0x22);
    env.add_lab("t1");
    slow_rule(&env, "app");
    env.ok(&["run-now", "r1", "--level", "full"]);
    let point = vm.keep_shadow("full");

    // 1. Killed mid-mirror: the VM keeps running on its overlay, served by the
    // recovery's own server; `recover resume` finishes the migration.
    let to = env.path("prod-a");
    let mut child = spawn_instant(&env, "app", &to, "app-a");
    let (a, qmp) = wait_mirroring(&env, &mut child);
    hmp_qemu_io(&qmp, "write -P 0x31 512k 64k");
    child.kill().unwrap();
    child.wait().unwrap();
    let r = recovery(&env, a);
    assert_eq!(r["stage"], "migrating", "{r}");
    assert_eq!(r["server_running"], true, "{r}");
    assert_eq!(r["vm_running"], true, "{r}");
    hmp_qemu_io(&qmp, "write -P 0x32 6M 64k");
    let doc = recover_doc(&env, &["recover", "resume", &a.to_string()]);
    assert_eq!(doc["exit_code"], 0, "{doc}");
    assert_eq!(doc["tasks"][0]["kind"], "migration", "{doc}");
    let mig = &doc["tasks"][0]["outcome"];
    let new_qmp = PathBuf::from(mig["qmp"].as_str().unwrap());
    assert_eq!(new_qmp, env.qmp_dir.join("app-a.qmp"));
    hmp_qemu_io(&new_qmp, "flush");
    let want = patched_digest(
        &point,
        &env.path("want-a.raw"),
        &[(512 * 1024, 64 * 1024, 0x31), (6 * MIB, 64 * 1024, 0x32)],
    );
    assert_eq!(
        image_digest(&to.join("vda.qcow2"), &env.path("final-a.raw")),
        want
    );
    assert_eq!(recovery(&env, a)["stage"], "migrated");
    let tasks = env.json(&["task", "list", "--all"]);
    let migrations: Vec<&str> = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "migration")
        .map(|t| t["status"].as_str().or(t["state"].as_str()).unwrap())
        .collect();
    assert_eq!(migrations, ["completed", "interrupted"], "{tasks}");
    qmp_session(&new_qmp, &[r#"{"execute":"quit"}"#]);

    // 2. Killed mid-mirror, then aborted: the mirror is cancelled, the partial
    // image removed, the VM runs on as a transient recovery until stopped.
    let to = env.path("prod-b");
    let mut child = spawn_instant(&env, "app", &to, "app-b");
    let (b, qmp) = wait_mirroring(&env, &mut child);
    hmp_qemu_io(&qmp, "write -P 0x41 7M 64k");
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = to.join("vda.qcow2");
    assert!(partial.exists());
    let doc = recover_doc(&env, &["recover", "abort", &b.to_string()]);
    let actions = doc["actions"].to_string();
    assert!(
        actions.contains("cancelled the mirror job")
            && actions.contains("removed the partial image"),
        "{doc}"
    );
    assert!(!partial.exists(), "the partial image is left");
    let r = recovery(&env, b);
    assert_eq!(r["stage"], "serving", "{r}");
    assert_eq!(r["mode"], "transient", "{r}");
    assert!(
        r["vm_running"] == true && r["server_running"] == true,
        "{r}"
    );
    let jobs = qmp_session(&qmp, &[r#"{"execute":"query-block-jobs"}"#]);
    assert_eq!(jobs[0]["return"], serde_json::json!([]), "{jobs:?}");
    let want = patched_digest(
        &point,
        &env.path("want-b.raw"),
        &[(7 * MIB, 64 * 1024, 0x41)],
    );
    assert_eq!(export_digest(&qmp, "disk0", &env.path("")), want);
    env.ok(&["recover", "stop", &b.to_string()]);
    assert!(!qmp.exists());
    drop(vm);
}

#[test]
fn a_restarted_server_is_picked_up_by_the_vms_nbd_client() {
    let env = Env::new();
    let vm = SystemVm::start(&env, "rc", 16 * MIB, &VmOptions::default());
    vm.write(0, MIB, 0x61);
    vm.write(11 * MIB, 2 * MIB, 0x62);
    env.add_lab("t1");
    env.add_rule("r1", "lab", "rc", "t1", &["--once", "2099-01-01 00:00"]);
    env.ok(&["run-now", "r1", "--level", "full"]);
    let want = vm.shadow_digest();
    let doc = recover_json(
        &env,
        &[
            "r1",
            "--vm",
            "rc",
            "--transient",
            "--start",
            "--accel",
            "tcg",
        ],
    );
    let rep = &doc["tasks"][0]["outcome"];
    let id = rep["recovery"].as_i64().unwrap();
    let server = rep["server_pid"].as_i64().unwrap();
    let qmp = PathBuf::from(rep["started_vm"]["qmp"].as_str().unwrap());
    // The server dies (SIGKILL: it cleans nothing up).
    Command::new("kill")
        .args(["-KILL", &server.to_string()])
        .status()
        .unwrap();
    wait_for(|| !pid_alive(server), "the server's end");
    let r = recovery(&env, id);
    assert_eq!(r["server_running"], false, "{r}");
    assert_eq!(r["vm_running"], true, "{r}");
    // A read of the VM's disk now waits for the server (nothing of the point is
    // in the overlay)...
    let dir = env.path("");
    let reader = {
        let qmp = qmp.clone();
        std::thread::spawn(move || export_digest(&qmp, "disk0", &dir))
    };
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !reader.is_finished(),
        "a read finished while the NBD server was down"
    );
    // ...and completes once `recover resume` restarted it on the same socket.
    let doc = recover_doc(&env, &["recover", "resume", &id.to_string()]);
    assert_eq!(doc["exit_code"], 0, "{doc}");
    assert_eq!(doc["tasks"][0]["kind"], "recovery", "{doc}");
    assert_eq!(reader.join().unwrap(), want);
    let r = recovery(&env, id);
    assert_eq!(r["server_running"], true, "{r}");
    assert_ne!(r["server_pid"], server, "{r}");
    let tasks = env.json(&["task", "list", "--all"]);
    let states: Vec<&str> = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "recovery")
        .map(|t| t["status"].as_str().or(t["state"].as_str()).unwrap())
        .collect();
    assert_eq!(states, ["running", "interrupted"], "{tasks}");
    env.ok(&["recover", "stop", &id.to_string()]);
    drop(vm);
}

#[test]
fn in_place_restore_is_refused_while_the_image_is_open_and_the_next_backup_is_a_full() {
    let env = Env::new();
    let mut vm = SystemVm::start(&env, "app", 8 * MIB, &VmOptions::default());
    vm.write(0, MIB, 0x21);
    vm.write(6 * MIB, 64 * 1024, 0x23);
    env.add_lab("t1");
    env.add_rule("r1", "lab", "app", "t1", &["--once", "2099-01-01 00:00"]);
    env.ok(&["run-now", "r1", "--level", "full"]);
    let want = vm.shadow_digest();
    let err = env.fails(4, &["restore", "r1", "--vm", "app", "--in-place"]);
    assert!(
        err.contains("is open in pid") && err.contains(vm.image.to_str().unwrap()),
        "{err}"
    );
    // The refusal is the restore task's end, with the reason.
    let tasks = env.json(&["task", "list", "--all"]);
    let restore = &tasks[0];
    assert_eq!(restore["kind"], "restore", "{tasks}");
    assert!(restore.to_string().contains("is open in pid"), "{tasks}");
    vm.write(0, 64 * 1024, 0x99);
    vm.quit();
    assert_ne!(
        image_digest(&vm.image, &env.path("changed.raw")),
        want,
        "the VM's write did not reach its image"
    );
    env.ok(&["restore", "r1", "--vm", "app", "--in-place"]);
    assert_eq!(image_digest(&vm.image, &env.path("inplace.raw")), want);
    let info = run(
        "qemu-img",
        &["info", "--output=json", vm.image.to_str().unwrap()],
    );
    assert!(!info.contains("vmbackup-"), "bitmaps left: {info}");
    vm.launch(&VmOptions::default());
    let out = env
        .cmd()
        .args(["--json", "run-now", "r1", "--level", "inc"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("restored in place from point"), "{text}");
    let newest = points(&env, "r1", "app").pop().unwrap();
    assert_eq!(restored_digest(&env, "r1", "app", &newest), want);
    drop(vm);
}
